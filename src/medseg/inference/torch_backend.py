"""PyTorch inference on ingested volumes: rebuild a trained network from checkpoint.pt and segment a volume slice
by slice through the one slice inferer (medseg.inference.inferer: resize to the training size, logits resized back,
argmax) with the network as its Runner (`torch_runner`). Training's validation, evaluation, export's parity check
and the report's figures all call these; `medseg.deployment.predict` runs the same inferer on ONNX Runtime without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from medseg.contracts import CheckpointMeta
from medseg.data.plan import SlicePlan
from medseg.data.preprocessing import network_input
from medseg.errors import TrainingError
from medseg.inference.inferer import Runner, segment_slices
from medseg.training.checkpoint import load_checkpoint


def load_trained_model(checkpoint_path: str | Path) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the network recorded in checkpoint.pt, load its weights; returns (model in eval mode, what the
    checkpoint records beside its weights)."""
    from medseg.models import build_model

    checkpoint = load_checkpoint(checkpoint_path)
    missing = [k for k in ("arch", "in_channels", "num_classes", "image_size", "state_dict") if k not in checkpoint]
    if missing:
        raise TrainingError(f"{checkpoint_path}: not a medseg checkpoint (missing {', '.join(missing)})")
    meta = CheckpointMeta.from_dict(checkpoint, checkpoint_path)
    model = build_model(meta.arch, meta.in_channels, meta.num_classes, meta.image_size, **(meta.model_options or {}))
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise TrainingError(f"{checkpoint_path}: weights do not fit {meta.arch}: {exc}") from exc
    return model.eval(), meta


def prepare_slices(image: np.ndarray, indices: Sequence[int], context: int, image_size: Sequence[int]) -> torch.Tensor:
    """(len(indices), C*(2*context+1), h, w) float32 network input from an ingested (D, C, H, W) volume."""
    return torch.from_numpy(network_input(image, indices, context, image_size))


def torch_runner(model: nn.Module, device: str = "cpu", amp: tuple[bool, torch.dtype] = (False, torch.float32)
                 ) -> Runner:
    """`model` as the slice inferer's Runner: numpy input in, float32 numpy logits out, in eval mode without
    gradients (autocast only on CUDA, when `amp` asks)."""
    on_cuda = str(device).startswith("cuda")

    @torch.no_grad()
    def run(x: np.ndarray) -> np.ndarray:
        model.eval()
        with torch.autocast("cuda" if on_cuda else "cpu", dtype=amp[1], enabled=amp[0] and on_cuda):
            logits = model(torch.from_numpy(np.ascontiguousarray(x)).to(device))
        return logits.float().cpu().numpy()

    return run


def predict_volume(
    model: nn.Module,
    image: np.ndarray,
    image_size: Sequence[int],
    context: int = 0,
    batch_size: int = 32,
    device: str = "cpu",
    amp: tuple[bool, torch.dtype] = (False, torch.float32),
    *,
    plan: SlicePlan | None = None,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Label volume (D, H, W) uint8 for an ingested image (D, C, H, W) at its native slice size, under `plan`
    (a planned recipe needs the volume's (sz, sy, sx) `spacing`)."""
    return segment_slices(torch_runner(model, device, amp), image, image_size, context, batch_size,
                          plan=plan, spacing=spacing)[0]


def volume_probabilities(
    model: nn.Module, image: np.ndarray, image_size: Sequence[int], context: int = 0, batch_size: int = 32,
    device: str = "cpu", *, plan: SlicePlan | None = None, spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """float32 class probabilities (D, K, H, W) at the native slice size (softmax of the resized logits, so their
    argmax is predict_volume's labels): what an ensemble averages, as nnU-Net does."""
    return segment_slices(torch_runner(model, device), image, image_size, context, batch_size,
                          probabilities=np.float32, plan=plan, spacing=spacing)[1]


def checkpoint_plan(meta: CheckpointMeta) -> SlicePlan:
    """The recipe a checkpoint was trained with (resize to its image_size when it records none)."""
    return SlicePlan.from_dict(meta.recipe, meta.image_size, f"checkpoint of {meta.arch}")
