"""Deployment: the model card, ONNX export with its parity check, torch-free `medseg predict`, the MLflow
serving flavor, and scoring an exported model on a test split."""
