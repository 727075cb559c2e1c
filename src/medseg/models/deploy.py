"""The inference form of a trained network: exact rewrites applied before ONNX export.

Like folding BatchNorm into a convolution, each rewrite computes the same function in fewer operations for a
model in eval mode (outputs agree to float32 rounding; export's parity check against the trained module still
runs). The trained module itself is never changed: training, evaluation and checkpoints keep the original layout.
"""

from __future__ import annotations

import sys

from torch import nn


def inference_form(model: nn.Module) -> nn.Module:
    """`model` in eval mode with every known exact fold applied (today: smp's SegFormer decoder): a copy when
    something is folded, `model` itself when nothing is (no second copy of a large network's weights)."""
    model = model.eval()
    if "segmentation_models_pytorch" in sys.modules:  # no smp module can be in the model otherwise
        from medseg.models.smp_models import fold_segformer_decoders

        model = fold_segformer_decoders(model)
    return model
