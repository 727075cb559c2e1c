"""medseg: medical imaging datasets to registered, deployable 2D segmentation models."""

__version__ = "0.1.0"
