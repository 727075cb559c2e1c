"""What the stages wrote for each architecture, read through medseg.contracts: the report's rows (numbers, per-case scores,
and optionally the trained model for the complexity columns and the figures) and the cross-validation rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


from medseg.config import settings
from medseg.contracts import (CheckpointMeta, EvaluationMetrics, ExportReport, RegistryRecord, TrainSummary,
                              read_per_case)
from medseg.errors import MedsegError
from medseg.io import read_json
from medseg.layout import ProjectLayout
from medseg.evaluation.metrics import finite_or_none

log = logging.getLogger(__name__)


def _optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise MedsegError(f"{path}: cannot read JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _family(arch: str) -> str:
    from medseg.models import get_model_info

    try:
        return get_model_info(arch).family
    except MedsegError:
        return "?"


def _complexity(model, meta: CheckpointMeta) -> tuple[float | None, float | None]:
    """(params in millions, GFLOPs of one slice at the training size) from medseg.models.complexity."""
    from medseg.models.complexity import count_gflops, count_params

    params_m = count_params(model) / 1e6
    try:
        gflops = count_gflops(model, (1, int(meta.in_channels), *[int(s) for s in meta.image_size]))
    except Exception as exc:  # an op the counter cannot trace must not sink the whole report
        log.warning("GFLOPs of %s not counted: %s", meta.arch, exc)
        gflops = None
    return params_m, gflops


def patients_of_cases(params: dict[str, Any], root: str | Path = ".") -> dict[str, str]:
    """{case id: patient} from the ingested cases.json ({} before ingest: every case is then its own patient)."""
    cases_json = ProjectLayout.of(params, root).cases_json
    if not cases_json.is_file():
        return {}
    return {str(c["id"]): str(c.get("patient") or c["id"]) for c in read_json(cases_json).get("cases", [])}


@dataclass(frozen=True)
class ArchOutputs:
    """What one architecture's stages wrote (medseg.contracts), None where a stage has not run."""

    metrics: EvaluationMetrics | None
    export: ExportReport | None
    train_summary: TrainSummary | None
    registry: RegistryRecord | None


def read_arch_outputs(params: dict[str, Any], arch: str, root: str | Path = ".") -> ArchOutputs:
    """The report and the Prefect flows' summaries both read results through this."""
    layout = ProjectLayout.of(params, root)
    return ArchOutputs(EvaluationMetrics.read_if_there(layout.metrics(arch)),
                       ExportReport.read_if_there(layout.export_report(arch)),
                       TrainSummary.read_if_there(layout.train_summary(arch)),
                       RegistryRecord.read_if_there(layout.registry_record(arch)))


def collect_results(params: dict[str, Any], root: str | Path = ".", load_models: bool = True) -> tuple[list, dict]:
    """(rows for the architectures with metrics, {arch: why it is missing}).

    A row holds the numbers of the summary table plus `per_class`, and (if `load_models`) the trained `model`
    and checkpoint `meta` for the complexity columns and the qualitative figure.
    """
    from medseg.evaluation.evaluate import HD95_UNITS
    from medseg.inference.torch_backend import load_trained_model

    root = Path(root)
    layout = ProjectLayout.of(params, root)
    rows, missing = [], {}
    for arch in params.get("models") or []:
        outputs = read_arch_outputs(params, arch, root)
        metrics = outputs.metrics
        if metrics is None:
            missing[arch] = f"no reports/{arch}/metrics.json (run `dvc repro evaluate@{arch}`)"
            continue
        export, summary = outputs.export or ExportReport(arch=arch), outputs.train_summary or TrainSummary(arch=arch)
        protocol = str(metrics.protocol or "")
        row: dict[str, Any] = {
            "arch": arch,
            "family": _family(arch),
            "mean_dsc": finite_or_none(metrics.mean_dsc),
            "mean_hd95": finite_or_none(metrics.mean_hd95),
            "mean_nsd": finite_or_none(metrics.mean_nsd),
            "nsd_tolerance": metrics.nsd_tolerance,
            "protocol": protocol,
            "hd95_unit": metrics.hd95_unit or HD95_UNITS.get(protocol, "?"),
            "test_cases_sha256": metrics.test_cases_sha256,
            "per_class": {name: scores.to_dict() for name, scores in metrics.per_class.items()},
            "params_m": None,
            "gflops": None,
            "torch_latency_ms": finite_or_none(export.torch_latency_ms),
            "onnx_latency_ms": finite_or_none(export.onnx_latency_ms),
            "latency": export.latency or {},  # runs, warm-up, threads, machine, load (medseg.deployment.export)
            "parity_passed": export.parity_passed if outputs.export else None,
            "train_seconds": finite_or_none(summary.train_seconds),
            "seconds_per_epoch": finite_or_none(summary.seconds_per_epoch),
            "train_memory_mb": finite_or_none(summary.train_memory_mb),
            "train_device": summary.device,
            "registry_version": outputs.registry.version if outputs.registry else None,
            "per_case": read_per_case(layout.per_case(arch), missing_ok=True),
            "model": None,
            "meta": None,
        }
        checkpoint = layout.checkpoint(arch)
        if load_models and checkpoint.is_file():
            try:
                row["model"], row["meta"] = load_trained_model(checkpoint)
                row["params_m"], row["gflops"] = _complexity(row["model"], row["meta"])
            except MedsegError as exc:
                log.warning("%s: %s", checkpoint, exc)
        rows.append(row)
    return rows, missing


def collect_cv_results(params: dict[str, Any], root: str | Path = ".") -> list[dict[str, Any]]:
    """Rows for the cross-validated architectures with a CV summary (reports/cv/<arch>/): `per_case` = the
    out-of-fold rows (every development patient once), `cv` = cv_metrics.json."""
    layout = ProjectLayout.of(params, root)
    rows = []
    for arch in settings(params).cv.models:
        metrics = _optional_json(layout.cv_metrics(arch))
        if metrics:
            rows.append({"arch": arch, "per_case": read_per_case(layout.cv_oof_per_case(arch), missing_ok=True),
                         "cv": metrics})
    return rows


def class_names_of(rows: Sequence[dict]) -> list[str]:
    names: list[str] = []
    for row in rows:
        for name in row["per_class"]:
            if name not in names:
                names.append(name)
    return names
