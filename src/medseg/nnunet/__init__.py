"""nnU-Net v2 beside medseg's networks: the dataset and medseg's split in nnU-Net's raw layout (`dataset`), nnunetv2's
planning and trainer on it (`train`, `worker`), a trained model folder read and checked (`results`) and imported
as model.onnx with its recipe on the card (`convert`), and that recipe applied without torch (`inference`).
nnunetv2 (the `[nnunet]` extra) is imported only by the functions that train or rebuild a network."""
