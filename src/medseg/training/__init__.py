"""Training: the trainer (one architecture, one split or CV fold; DDP under torchrun), its losses, and the
checkpoint files it writes."""
