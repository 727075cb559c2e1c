"""PyTorch inference on ingested volumes: rebuild a trained network from checkpoint.pt and segment a volume slice
by slice with the shared preprocessing (medseg.preprocessing: resize to the training size, logits resized back,
argmax). Training's validation, evaluation, export's parity check and the report's figures all call these, so
they segment exactly alike; `medseg.predict` does the same on ONNX Runtime without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from medseg.checkpoint import load_checkpoint
from medseg.errors import TrainingError
from medseg.preprocessing import logits_to_labels, network_input, probabilities_at


def load_trained_model(checkpoint_path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network recorded in checkpoint.pt, load its weights; returns (model in eval mode, meta).

    meta is the checkpoint dict without "state_dict" (arch, model_options, in_channels, num_classes,
    image_size, class_names, epoch, val_dice, config_hash, split_hash, context).
    """
    from medseg.models import build_model

    checkpoint = load_checkpoint(checkpoint_path)
    missing = [k for k in ("arch", "in_channels", "num_classes", "image_size", "state_dict") if k not in checkpoint]
    if missing:
        raise TrainingError(f"{checkpoint_path}: not a medseg checkpoint (missing {', '.join(missing)})")
    meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    model = build_model(meta["arch"], meta["in_channels"], meta["num_classes"], meta["image_size"],
                        **(meta.get("model_options") or {}))
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise TrainingError(f"{checkpoint_path}: weights do not fit {meta['arch']}: {exc}") from exc
    return model.eval(), meta


def prepare_slices(image: np.ndarray, indices: Sequence[int], context: int, image_size: Sequence[int]) -> torch.Tensor:
    """(len(indices), C*(2*context+1), h, w) float32 network input from an ingested (D, C, H, W) volume."""
    return torch.from_numpy(network_input(image, indices, context, image_size))


@torch.no_grad()
def predict_volume(
    model: nn.Module,
    image: np.ndarray,
    image_size: Sequence[int],
    context: int = 0,
    batch_size: int = 32,
    device: str = "cpu",
    amp: tuple[bool, torch.dtype] = (False, torch.float32),
) -> np.ndarray:
    """Label volume (D, H, W) uint8 for an ingested image (D, C, H, W) at its native slice size."""
    model.eval()
    depth, _, height, width = image.shape
    out = np.empty((depth, height, width), dtype=np.uint8)
    for start in range(0, depth, batch_size):
        indices = list(range(start, min(start + batch_size, depth)))
        x = prepare_slices(image, indices, context, image_size).to(device)
        on_cuda = str(device).startswith("cuda")
        with torch.autocast("cuda" if on_cuda else "cpu", dtype=amp[1], enabled=amp[0] and on_cuda):
            logits = model(x)
        out[start : start + len(indices)] = logits_to_labels(logits.float().cpu().numpy(), (height, width))
    return out


@torch.no_grad()
def volume_probabilities(
    model: nn.Module, image: np.ndarray, image_size: Sequence[int], context: int = 0, batch_size: int = 32,
    device: str = "cpu",
) -> np.ndarray:
    """float32 class probabilities (D, K, H, W) at the native slice size (softmax of the resized logits, so their
    argmax is predict_volume's labels): what an ensemble averages, as nnU-Net does."""
    model.eval()
    depth, _, height, width = image.shape
    out: np.ndarray | None = None
    for start in range(0, depth, batch_size):
        indices = list(range(start, min(start + batch_size, depth)))
        logits = model(prepare_slices(image, indices, context, image_size).to(device)).float().cpu().numpy()
        probs = probabilities_at(logits, (height, width))
        if out is None:
            out = np.empty((depth, probs.shape[1], height, width), dtype=np.float32)
        out[start : start + len(indices)] = probs
    assert out is not None, "an ingested volume has at least one slice"
    return out
