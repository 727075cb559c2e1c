"""ONNX export with a PyTorch-vs-ONNX Runtime parity check and CPU latency.

The exported graph has one input `image` (N, C, H, W) float32 and one output `logits` (N, K, H, W);
the batch axis is always dynamic, H and W too when the architecture allows it (ModelInfo.dynamic_hw).
`export_model` writes the model card (medseg.deployment.card), with the test evaluation, into the file's metadata_props.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.config import settings
from medseg.contracts import CheckpointMeta, EvaluationMetrics, ExportReport
from medseg.deployment.card import ONNX_METADATA_KEY, CardError, ModelCard, card_from_metadata, evaluation_of
from medseg.errors import ExportError
from medseg.io import atomic_path, sha256_file, write_dvc_metrics
from medseg.layout import ProjectLayout
from medseg.models.deploy import inference_form
from medseg.runtime.threads import apply_torch_threads, available_cpus, plan_from_params

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
    exporter (torch.export + dynamic_shapes) is the fallback for models the tracer cannot handle. What is traced is
    the model's inference form (medseg.models.deploy: exact folds, e.g. SegFormer's decoder), not `model` itself.
    """
    path = Path(path)
    model = inference_form(model.eval().cpu())
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


def write_card_metadata(path: str | Path, card: ModelCard) -> None:
    """Put `card` (JSON under ONNX_METADATA_KEY) and `medseg.version` / `medseg.arch` (for tools that list
    metadata_props) into the ONNX file at `path`, keeping its other properties."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update({ONNX_METADATA_KEY: card.to_json(), "medseg.version": card.medseg_version, "medseg.arch": card.arch})
    onnx.helper.set_model_props(model, props)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def _trained_card(meta: CheckpointMeta, checkpoint: Path, metrics_path: Path) -> ModelCard:
    """The checkpoint's card with the test evaluation of reports/<arch>/metrics.json."""
    if meta.card is None:
        raise ExportError(f"{checkpoint}: no model card (trained by an older medseg); re-run the train stage")
    try:
        card = ModelCard.from_dict(meta.card, checkpoint)
    except CardError as exc:
        raise ExportError(str(exc)) from exc
    network = (int(meta.in_channels), int(meta.num_classes), [int(v) for v in meta.image_size])
    if (card.in_channels, card.num_classes, [int(v) for v in card.image_size]) != network:
        raise ExportError(f"{checkpoint}: model card (in_channels, classes, image_size) "
                          f"{card.in_channels, card.num_classes, card.image_size} != the network's {network}")
    if not metrics_path.is_file():
        raise ExportError(f"{metrics_path}: missing; run the evaluate stage first (the card carries the test metrics)")
    return card.with_evaluation(evaluation_of(EvaluationMetrics.read(metrics_path).to_dict()))


def ort_session(onnx_path: str | Path):
    """A CPU onnxruntime session with torch's intra-op thread count, so the latencies compare like with like."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])


def onnx_parity(model: nn.Module, onnx_path: str | Path, x: torch.Tensor, session=None) -> dict[str, float]:
    """torch(x) against onnxruntime(x), the torch model in eval mode on CPU: max |diff| over all logits, the logits'
    scale (max |torch logit|, which float32 rounding differences grow with) and the fraction of pixels whose
    predicted label (argmax over classes) is the same."""
    model = model.eval().cpu()
    x = x.detach().to(torch.float32).cpu()
    with torch.no_grad():
        expected = model(x).numpy()
    session = session or ort_session(onnx_path)
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
    if got.shape != expected.shape:
        raise ExportError(f"{onnx_path}: ONNX output shape {got.shape} != PyTorch {expected.shape}")
    return {
        "max_abs_diff": float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64)))),
        "logit_scale": float(np.max(np.abs(expected))),
        "label_agreement": float(np.mean(got.argmax(axis=1) == expected.argmax(axis=1))),
    }


def onnx_max_abs_diff(model: nn.Module, onnx_path: str | Path, x: torch.Tensor, session=None) -> float:
    """Max |torch(x) - onnxruntime(x)| over all logits (see onnx_parity)."""
    return onnx_parity(model, onnx_path, x, session=session)["max_abs_diff"]


LATENCY_WARMUP = 3  # untimed calls first: allocator, thread pool and ONNX Runtime's first-run graph work


def _latency_ms(fn, runs: int, warmup: int = LATENCY_WARMUP) -> tuple[float, float]:
    """(median, interquartile range) in ms of `runs` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    if len(times) < 2:
        return float(times[0]), 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return float(statistics.median(times)), float(q3 - q1)


def machine_description() -> str:
    """What a latency depends on besides the model: CPU model, usable cores, torch and onnxruntime versions. The
    report compares latencies only between exports that give the same description."""
    import platform

    import onnxruntime

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{model}, {available_cpus()} usable cores, torch {torch.__version__.split('+')[0]}, "
            f"onnxruntime {onnxruntime.__version__}")


def _load_per_core() -> float | None:
    """1-minute load average per usable core while timing: above 1, other work competed for the cores."""
    try:
        return round(os.getloadavg()[0] / available_cpus(), 2)
    except (AttributeError, OSError):
        return None


def _onnx_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))


def _parity_inputs(params: dict[str, Any], root: Path, meta: CheckpointMeta, size: tuple[int, int]) -> torch.Tensor:
    """A real batch of 2 slices (the first test case's most central ones) at `size`; random if no data is there."""
    from medseg.inference.torch_backend import prepare_slices

    layout = ProjectLayout.of(params, root)
    ingested, split_path = layout.ingested, layout.split_file
    try:
        from medseg.data.cases import load_case
        from medseg.io import read_json

        split = read_json(split_path)
        case_id = (split.get("test") or split.get("val") or split.get("train"))[0]
        image, _label, _spacing = load_case(ingested, case_id)
        middle = image.shape[0] // 2
        indices = [middle, min(middle + 1, image.shape[0] - 1)]
        return prepare_slices(image, indices, int(meta.context or 0), size)
    except Exception as exc:  # noqa: BLE001 - parity still means something on random input
        _log.warning("parity check on random input (no test slices readable: %s)", exc)
        generator = torch.Generator().manual_seed(settings(params).seed)
        return torch.rand(2, int(meta.in_channels), *size, generator=generator)


def _check_parity(report: ExportReport, model: torch.nn.Module, onnx_file: Path, session, inputs: list[torch.Tensor],
                  onnx_path: Path) -> None:
    """Fill the report's parity fields from PyTorch vs ONNX Runtime on `inputs`; ExportError when they differ by
    more than the report's threshold + rel_threshold x the logits' scale."""
    checks = []
    for x in inputs:
        checks.append(onnx_parity(model, onnx_file, x, session=session))
        report.checked_shapes.append(list(x.shape))
    report.max_abs_diff = max(c["max_abs_diff"] for c in checks)
    report.logit_scale = max(c["logit_scale"] for c in checks)
    report.label_agreement = min(c["label_agreement"] for c in checks)
    report.allowed_diff = report.threshold + report.rel_threshold * report.logit_scale
    report.parity_passed = bool(report.max_abs_diff <= report.allowed_diff)
    if not report.parity_passed:
        raise ExportError(
            f"{onnx_path}: ONNX Runtime output differs from PyTorch by {report.max_abs_diff:.3g} "
            f"> {report.allowed_diff:.3g} = export.max_abs_diff {report.threshold:g} + export.max_rel_diff "
            f"{report.rel_threshold:g} x logit scale {report.logit_scale:.3g} (shapes {report.checked_shapes})")


def _time_both(report: ExportReport, model: torch.nn.Module, session, one: torch.Tensor, runs: int) -> None:
    """Single-slice latencies of PyTorch and ONNX Runtime, one after the other, and how they were measured."""
    load_before = _load_per_core()
    with torch.inference_mode():
        report.torch_latency_ms, report.torch_latency_iqr_ms = _latency_ms(lambda: model(one), runs)
    feed = {INPUT_NAME: one.numpy()}
    report.onnx_latency_ms, report.onnx_latency_iqr_ms = _latency_ms(lambda: session.run([OUTPUT_NAME], feed), runs)
    report.latency = {"runs": max(1, int(runs)), "warmup": LATENCY_WARMUP, "threads": torch.get_num_threads(),
                      "machine": machine_description(), "load_per_core": load_before}


def export_model(params: dict[str, Any], arch: str, root: str | Path = ".") -> dict[str, Any]:
    """models/<arch>/checkpoint.pt + reports/<arch>/metrics.json -> models/<arch>/model.onnx + export.json.

    model.onnx carries the checkpoint's model card with the test evaluation in its metadata_props
    (`medseg.deployment.card.card_from_onnx` reads it back). Parity is checked at the card's image_size and, when the card
    says H and W are dynamic, at a second, non-square size (multiples of its size_multiple).

    Parity passes when max |torch - onnxruntime| <= export.max_abs_diff + export.max_rel_diff * max |torch logit|
    (numpy's allclose rule with the logits' own scale: float32 rounding differences grow with the values, and an
    untrained deep BatchNorm network can have logits of 1e6). Raises ExportError otherwise; model.onnx is then
    removed, so a failed export never looks like an output (export.json still records the numbers).
    """
    from medseg.config import disable_telemetry, settings
    from medseg.inference.torch_backend import load_trained_model

    disable_telemetry()
    # torch and ONNX Runtime (ort_session: the same count) are timed one after the other, never at once
    apply_torch_threads(plan_from_params(params, num_workers=0))
    root = Path(root)
    export_p = settings(params).export
    opset, runs = export_p.opset, export_p.latency_runs
    threshold, rel_threshold = export_p.max_abs_diff, export_p.max_rel_diff
    layout = ProjectLayout.of(params, root)
    onnx_path, report_path, checkpoint = layout.onnx(arch), layout.export_report(arch), layout.checkpoint(arch)

    model, meta = load_trained_model(checkpoint)
    model = model.cpu().eval()
    card = _trained_card(meta, checkpoint, layout.metrics(arch))
    h, w = (int(v) for v in card.image_size)
    sizes = [(h, w)]
    if card.dynamic_hw:
        sizes.append((h + card.size_multiple, w + 2 * card.size_multiple))  # a second, non-square size
    report = ExportReport(arch=arch, threshold=threshold, rel_threshold=rel_threshold, opset=opset,
                          dynamic_hw=card.dynamic_hw,
                          input_shape=[None, card.in_channels, None if card.dynamic_hw else h,
                                       None if card.dynamic_hw else w])
    try:
        with atomic_path(onnx_path) as tmp:
            export_onnx(model, card.in_channels, (h, w), tmp, opset=opset, dynamic_hw=card.dynamic_hw)
            # Into the file before parity and latency, so both measure the graph that is renamed to model.onnx.
            write_card_metadata(tmp, card)
            report.opset = _onnx_opset(tmp)
            session = ort_session(tmp)
            if card_from_metadata(session.get_modelmeta().custom_metadata_map, onnx_path) != card:
                raise ExportError(f"{onnx_path}: the model card read back from metadata_props differs from the written one")
            inputs = [_parity_inputs(params, root, meta, size) for size in sizes]
            _check_parity(report, model, tmp, session, inputs, onnx_path)
            _time_both(report, model, session, torch.rand(1, card.in_channels, h, w), runs)
    except BaseException:
        onnx_path.unlink(missing_ok=True)  # never leave a stale or failed graph as the stage output
        report.write(report_path)
        raise
    report.onnx_sha256 = sha256_file(onnx_path)
    report.write(report_path)
    write_dvc_metrics(layout.export_scores(arch), {"parity_diff": report.max_abs_diff,
                                                   "onnx_ms": report.onnx_latency_ms}, arch)
    _log.info("%s: ONNX max |diff| %.3g (allowed %.3g), labels agree on %.4f of pixels, latency torch %.2f ms / "
              "onnxruntime %.2f ms", arch, report.max_abs_diff, report.allowed_diff,
              report.label_agreement, report.torch_latency_ms, report.onnx_latency_ms)
    return report.to_dict()
