"""Model size and cost: parameter count and GFLOPs.

GFLOPs convention: **one multiply-add counts as one FLOP** (i.e. the number reported is GMACs). This is what
most segmentation papers print as "GFLOPs" (fvcore, thop and ptflops all count this way), so our numbers sit
next to theirs in docs/models.md. PyTorch's FlopCounterMode counts a multiply-add as two FLOPs; we halve it.
Like fvcore, only matmul/convolution/attention-type ops are counted (elementwise ops, norms and activations are
ignored), which is where nearly all of the cost of these networks is.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_gflops(model: nn.Module, input_shape: Sequence[int]) -> float:
    """GFLOPs (multiply-adds, see module doc) of one forward pass in eval mode on a zero tensor of `input_shape`.

    `input_shape` is (B, C, H, W); the result is for the whole batch. The model's train/eval mode is restored.
    Selective scans (Mamba networks), which FlopCounterMode cannot see, are added with their analytic count.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(tuple(int(s) for s in input_shape), device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2.0 / 1e9 + _scan_gflops(model, input_shape)


def _scan_gflops(model: nn.Module, input_shape: Sequence[int]) -> float:
    from medseg.models.mamba.ss2d import SS2D, MambaLayer, count_scan_gflops

    if not any(isinstance(m, (SS2D, MambaLayer)) for m in model.modules()):
        return 0.0  # no scan: skip the meta-device copy
    return count_scan_gflops(model, input_shape)


class _MetaParameters(TorchFunctionMode):
    """Like `with torch.device("meta")`, except for torch.linspace: several constructors turn a linspace into
    Python floats (`.item()`, a drop-path schedule), which meta tensors cannot do."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and func is not torch.linspace and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def count_params_of(name: str, in_channels: int, num_classes: int, image_size: Sequence[int], **options: Any) -> int:
    """Parameter count of a registry entry without allocating or initialising it (meta tensors).

    BEiT-L + UperNet (436M) is counted ~20x faster than a real build (benchmarks/bench_param_count.py).
    """
    from medseg.models.table import build_model

    with _MetaParameters():
        model = build_model(name, in_channels, num_classes, tuple(image_size), **options)
    return count_params(model)
