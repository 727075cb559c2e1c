"""export@<nnU-Net entry>: `medseg nnunet import`'s function on the unpacked results pack: model.onnx with its
schema-2 card, and the parity of the graph with the torch network (export.json, as a network's export writes)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import disable_telemetry, settings
from medseg.contracts import EvaluationMetrics, ExportReport
from medseg.deployment.card import evaluation_of
from medseg.errors import ConfigError
from medseg.io import atomic_path, sha256_file, write_dvc_metrics
from medseg.layout import ProjectLayout
from medseg.nnunet.evaluate import torch_runner
from medseg.nnunet.pack import unpacked_results


def export_nnunet_entry(params: dict[str, Any], arch: str, root: str | Path = ".") -> dict[str, Any]:
    """export@<nnU-Net entry>: model.onnx with its card (`medseg nnunet import`), checked against torch."""
    from medseg.nnunet.convert import import_nnunet_model

    disable_telemetry()
    root = Path(root)
    layout = ProjectLayout.of(params, root)
    opset = int(settings(params).export.opset)
    # the card's split hashes come from the pack's dataset.json (medseg wrote it from this split); the test scores
    # from evaluate's metrics.json, as a network's card has them
    evaluation = evaluation_of(EvaluationMetrics.read(layout.metrics(arch)).to_dict())
    with unpacked_results(layout.checkpoint(arch)) as (folder, fold), \
            tempfile.TemporaryDirectory(prefix=f"medseg-{arch}-export-") as out:
        import_nnunet_model(folder, Path(out) / "model", folds=[str(fold)], arch=arch, opset=opset,
                            evaluation=evaluation)
        onnx_path = Path(out) / "model" / "model.onnx"
        report = _parity(folder, fold, onnx_path, arch, opset)
        with atomic_path(layout.onnx(arch)) as tmp:
            shutil.copyfile(onnx_path, tmp)
    report.onnx_sha256 = sha256_file(layout.onnx(arch))
    report.write(layout.export_report(arch))
    write_dvc_metrics(layout.export_scores(arch), {"max_abs_diff": report.max_abs_diff,
                                                   "label_agreement": report.label_agreement,
                                                   "onnx_latency_ms": report.onnx_latency_ms}, arch)
    if not report.parity_passed:
        raise ConfigError(f"{arch}: the ONNX graph disagrees with the torch network (max |diff| "
                          f"{report.max_abs_diff:.3g} > {report.allowed_diff:.3g}); see {layout.export_report(arch)}")
    return report.to_dict()


def _parity(folder: Path, fold: int, onnx_path: Path, arch: str, opset: int) -> ExportReport:
    """ONNX vs torch logits on random patches of the network's input size (nnU-Net's inputs are normalised)."""
    import onnxruntime as ort

    run, recipe, _, _ = torch_runner(folder, fold)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    channels = len(recipe.normalization_schemes)
    tiles = np.random.default_rng(0).standard_normal((2, channels, *recipe.patch_size)).astype(np.float32)
    expected = run(tiles)
    start = time.perf_counter()
    got = session.run(None, {name: tiles})[0]
    onnx_ms = (time.perf_counter() - start) * 1000 / len(tiles)
    diff = float(np.max(np.abs(expected - got)))
    scale = float(np.max(np.abs(expected))) or 1.0
    rel, absolute = 1e-4, 1e-4
    allowed = absolute + rel * scale
    agreement = float(np.mean(expected.argmax(1) == got.argmax(1)))
    return ExportReport(arch=arch, max_abs_diff=diff, parity_passed=diff <= allowed, threshold=absolute,
                        rel_threshold=rel, allowed_diff=allowed, logit_scale=scale, label_agreement=agreement,
                        onnx_latency_ms=round(onnx_ms, 3), opset=opset, dynamic_hw=False,
                        input_shape=[1, channels, *recipe.patch_size],
                        checked_shapes=[[len(tiles), channels, *recipe.patch_size]])
