"""What the stages wrote for each architecture, read through medseg.contracts: the report's rows (`ArchRow`: the
numbers, per-case scores, the complexity counted from the checkpoint) and the cross-validation rows (`CVRow`)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from medseg.config import settings
from medseg.contracts import (
    CheckpointMeta,
    EvaluationMetrics,
    ExportReport,
    RegistryRecord,
    TrainSummary,
    read_per_case,
)
from medseg.errors import MedsegError
from medseg.evaluation.metrics import finite_or_none
from medseg.io import read_json
from medseg.layout import ProjectLayout

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
    from medseg.nnunet.train import family_of

    try:
        return family_of(arch)
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


@dataclass
class ArchRow:
    """One architecture's line in the comparison (no model in it: the figure loads a checkpoint when it draws)."""

    arch: str
    family: str = "?"
    mean_dsc: float | None = None
    mean_hd95: float | None = None
    mean_nsd: float | None = None
    nsd_tolerance: dict[str, float] | None = None
    protocol: str = ""
    hd95_unit: str = "?"
    test_cases_sha256: str | None = None
    per_class: dict[str, dict[str, Any]] = field(default_factory=dict)
    params_m: float | None = None
    gflops: float | None = None
    torch_latency_ms: float | None = None
    onnx_latency_ms: float | None = None
    latency: dict[str, Any] = field(default_factory=dict)  # runs, warm-up, threads, machine, load (export)
    parity_passed: bool | None = None
    train_seconds: float | None = None
    epochs: int | None = None
    steps: int | None = None  # optimizer steps in all (nnU-Net: epochs x iterations per epoch)
    recipe: str | None = None  # resize | planned | nnunet (medseg.data.plan; nnU-Net's own)
    input_size: list[int] | None = None  # the network's input: the resize size or the patch size
    batch_size: int | None = None
    seconds_per_epoch: float | None = None
    train_memory_mb: float | None = None
    train_device: str | None = None
    registry_version: str | None = None
    per_case: list[dict[str, str]] = field(default_factory=list)
    checkpoint: Path | None = None  # the trained network, when there is one

    @property
    def steps_per_epoch(self) -> float | None:
        return self.steps / self.epochs if self.epochs and self.steps else None

    @property
    def budget(self) -> str | None:
        """"epochs x steps per epoch" of the training run, the compute it was given."""
        per_epoch = self.steps_per_epoch
        if per_epoch is None:
            return None
        return f"{self.epochs} x {per_epoch:.0f}" if per_epoch == int(per_epoch) else f"{self.epochs} x {per_epoch:.1f}"

    @property
    def network_input(self) -> str | None:
        """"batch x patch (recipe)": what one optimizer step showed the network."""
        if not self.input_size:
            return None
        size = "x".join(str(v) for v in self.input_size)
        kind = {"planned": "patches", "nnunet": "patches", "resize": "resized"}.get(self.recipe or "", "")
        return f"{self.batch_size} x {size} {kind}".strip() if self.batch_size else f"{size} {kind}".strip()

    def public(self) -> dict[str, Any]:
        """The summary numbers (what build_report returns and the flows show): no per-case rows, no paths."""
        return {k: v for k, v in asdict(self).items() if k not in ("per_case", "checkpoint")}


@dataclass
class CVRow:
    """One cross-validated architecture: its out-of-fold per-case rows and reports/cv/<A>/cv_metrics.json."""

    arch: str
    per_case: list[dict[str, str]]
    cv: dict[str, Any]


def arch_row(params: dict[str, Any], arch: str, root: Path, metrics: EvaluationMetrics,
             outputs: ArchOutputs) -> ArchRow:
    from medseg.evaluation.evaluate import HD95_UNITS
    from medseg.nnunet.train import is_nnunet_entry

    layout = ProjectLayout.of(params, root)
    export, summary = outputs.export or ExportReport(arch=arch), outputs.train_summary or TrainSummary(arch=arch)
    protocol = str(metrics.protocol or "")
    checkpoint = layout.checkpoint(arch)
    nnunet = is_nnunet_entry(arch)
    return ArchRow(
        arch=arch, family=_family(arch), mean_dsc=finite_or_none(metrics.mean_dsc),
        mean_hd95=finite_or_none(metrics.mean_hd95), mean_nsd=finite_or_none(metrics.mean_nsd),
        nsd_tolerance=metrics.nsd_tolerance, protocol=protocol,
        hd95_unit=metrics.hd95_unit or HD95_UNITS.get(protocol, "?"), test_cases_sha256=metrics.test_cases_sha256,
        per_class={name: scores.to_dict() for name, scores in metrics.per_class.items()},
        torch_latency_ms=finite_or_none(export.torch_latency_ms),
        onnx_latency_ms=finite_or_none(export.onnx_latency_ms),
        latency=export.latency or {}, parity_passed=export.parity_passed if outputs.export else None,
        train_seconds=finite_or_none(summary.train_seconds), epochs=summary.epochs, steps=summary.steps,
        recipe=summary.recipe, input_size=summary.input_size, batch_size=summary.batch_size,
        seconds_per_epoch=finite_or_none(summary.seconds_per_epoch),
        train_memory_mb=finite_or_none(summary.train_memory_mb), train_device=summary.device,
        registry_version=outputs.registry.version if outputs.registry else None,
        per_case=read_per_case(layout.per_case(arch), missing_ok=True),
        # an nnU-Net entry's checkpoint.pt is its results pack, no slice network: counted by its training, not drawn
        params_m=round(summary.params / 1e6, 3) if nnunet and summary.params else None,
        checkpoint=checkpoint if checkpoint.is_file() and not nnunet else None)


def collect_results(params: dict[str, Any], root: str | Path = ".", load_models: bool = True
                    ) -> tuple[list[ArchRow], dict[str, str]]:
    """(rows for the architectures with metrics, {arch: why it is missing}); with `load_models`, each checkpoint is
    loaded in turn (and let go) to count the complexity columns."""
    from medseg.inference.torch_backend import load_trained_model

    root = Path(root)
    rows, missing = [], {}
    for arch in settings(params).models:
        outputs = read_arch_outputs(params, arch, root)
        if outputs.metrics is None:
            missing[arch] = f"no reports/{arch}/metrics.json (run `dvc repro evaluate@{arch}`)"
            continue
        row = arch_row(params, arch, root, outputs.metrics, outputs)
        if load_models and row.checkpoint is not None:
            try:
                row.params_m, row.gflops = _complexity(*load_trained_model(row.checkpoint))
            except MedsegError as exc:
                log.warning("%s: %s", row.checkpoint, exc)
                row.checkpoint = None  # nor drawn in the figure
        rows.append(row)
    return rows, missing


def collect_cv_results(params: dict[str, Any], root: str | Path = ".") -> list[CVRow]:
    """Rows for the cross-validated architectures with a CV summary (reports/cv/<arch>/): `per_case` = the
    out-of-fold rows (every development patient once), `cv` = cv_metrics.json."""
    layout = ProjectLayout.of(params, root)
    rows = []
    for arch in settings(params).cv.models:
        metrics = _optional_json(layout.cv_metrics(arch))
        if metrics:
            rows.append(CVRow(arch, read_per_case(layout.cv_oof_per_case(arch), missing_ok=True), metrics))
    return rows


def class_names_of(rows: Sequence[ArchRow]) -> list[str]:
    names: list[str] = []
    for row in rows:
        for name in row.per_class:
            if name not in names:
                names.append(name)
    return names
