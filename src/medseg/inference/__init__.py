"""Inference on a network: the one numpy slice inferer (`inferer`) and its PyTorch side (`torch_backend`);
the ONNX side, torch-free, is `medseg.deployment.predict`."""
