"""ONNX export with a PyTorch-vs-ONNX Runtime parity check and CPU latency.

The exported graph has one input `image` (N, C, H, W) float32 and one output `logits` (N, K, H, W);
the batch axis is always dynamic, H and W too when the architecture allows it (ModelInfo.dynamic_hw).
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.errors import ExportError
from medseg.io import atomic_path, write_json

_log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def export_onnx(
    model: nn.Module,
    in_channels: int,
    image_size: tuple[int, int] | list[int],
    path: str | Path,
    opset: int = 17,
    dynamic_hw: bool = True,
) -> Path:
    """Export `model` (put in eval mode) to `path` atomically; returns the path.

    The legacy TorchScript exporter is tried first (fast, mature, supports `dynamic_axes`); the dynamo
    exporter (torch.export + dynamic_shapes) is the fallback for models the tracer cannot handle.
    """
    path = Path(path)
    model = model.eval().cpu()
    h, w = int(image_size[0]), int(image_size[1])
    # Batch of 2 so the tracer does not specialise the batch axis to 1.
    example = torch.randn(2, in_channels, h, w, dtype=torch.float32)
    errors: list[str] = []
    with atomic_path(path) as tmp:
        for exporter in (_export_legacy, _export_dynamo):
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # deprecation / tracer warnings are noise for users
                    exporter(model, example, tmp, opset, dynamic_hw)
                _check_onnx(tmp)
                break
            except Exception as exc:  # noqa: BLE001 - report every exporter's failure together
                errors.append(f"{exporter.__name__.removeprefix('_export_')}: {type(exc).__name__}: {exc}")
                _log.info("ONNX exporter %s failed: %s", exporter.__name__, exc)
        else:
            raise ExportError(f"{path}: ONNX export failed: " + " | ".join(e[:500] for e in errors))
    return path


def _dynamic_axes(dynamic_hw: bool) -> dict[str, dict[int, str]]:
    axes = {0: "batch"}
    if dynamic_hw:
        axes.update({2: "height", 3: "width"})
    return {INPUT_NAME: dict(axes), OUTPUT_NAME: dict(axes)}


def _export_legacy(model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_hw: bool) -> None:
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamic_axes=_dynamic_axes(dynamic_hw),
        do_constant_folding=True,
    )


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic_hw: bool) -> None:
    dim = torch.export.Dim
    shapes: dict[int, Any] = {0: dim("batch", min=1, max=1024)}
    if dynamic_hw:
        shapes.update({2: dim.AUTO, 3: dim.AUTO})
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamic_shapes=({**shapes},),
        external_data=False,
        optimize=True,
        verbose=False,
    )
    program.save(str(path), external_data=False)


def _check_onnx(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path))
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise ExportError(f"{path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, got {inputs} -> {outputs}")


def ort_session(onnx_path: str | Path):
    """A CPU onnxruntime session (single-threaded intra-op so latency numbers are comparable to torch's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])


def onnx_max_abs_diff(model: nn.Module, onnx_path: str | Path, x: torch.Tensor, session=None) -> float:
    """Max |torch(x) - onnxruntime(x)| over all logits, with the torch model in eval mode on CPU."""
    model = model.eval().cpu()
    x = x.detach().to(torch.float32).cpu()
    with torch.no_grad():
        expected = model(x).numpy()
    session = session or ort_session(onnx_path)
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
    if got.shape != expected.shape:
        raise ExportError(f"{onnx_path}: ONNX output shape {got.shape} != PyTorch {expected.shape}")
    return float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
