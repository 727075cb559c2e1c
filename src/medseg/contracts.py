"""What one stage hands to the next, typed: every file below is written and read through these, so a field is
added in one place and no reader spells a key its writer forgot.

| file | type | written by | read by |
|---|---|---|---|
| `reports/<A>/train_summary.json` | `TrainSummary` | training | registry, report, flows |
| `reports/<A>/metrics.json` (and CV's `oof_metrics.json`, `cv_metrics.json` parts) | `EvaluationMetrics` | evaluation, cv, onnx_eval | export (the card), registry, report, flows, promotion |
| `reports/<A>/export.json` | `ExportReport` | export | registry, report, flows |
| `reports/<A>/per_case.csv` (and CV's per-case files) | `CaseScore` rows, `PER_CASE_COLUMNS` | evaluation, cv | report, cv, statistics |
| `registry/<A>.json` | `RegistryRecord` | register | report, flows |
| `models/<A>/checkpoint.pt` (beside `state_dict`) | `CheckpointMeta` | training | inference, evaluation, cv, export, report |

Reading is lenient where files written by an older medseg lack a field (it reads as None) and strict where a file is
not what it claims (`MedsegError` naming it). Writing goes through medseg.io (a temp file, then a rename).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, TypedDict, TypeVar

from medseg.errors import MedsegError
from medseg.io import read_json, write_json, write_text

T = TypeVar("T", bound="_JsonFile")


class _JsonFile:
    """A JSON object file with one dataclass field per key (in the file's key order)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def write(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any], source: str | Path = "") -> T:
        if not isinstance(data, Mapping):
            raise MedsegError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        required = [name for name, f in known.items()
                    if f.default is MISSING and f.default_factory is MISSING and name not in data]
        if required:
            raise MedsegError(f"{source}: not a {cls.__name__} file (no {', '.join(required)})")
        return cls(**{k: v for k, v in data.items() if k in known})  # keys of a newer medseg are left out

    @classmethod
    def read(cls: type[T], path: str | Path) -> T:
        try:
            data = read_json(path)
        except (OSError, ValueError) as exc:
            raise MedsegError(f"{path}: cannot read JSON: {exc}") from exc
        return cls.from_dict(data, path)

    @classmethod
    def read_if_there(cls: type[T], path: str | Path) -> T | None:
        """The file's content, or None when the stage that writes it has not run."""
        return cls.read(path) if Path(path).is_file() else None


@dataclass
class TrainSummary(_JsonFile):
    """reports/<A>/train_summary.json (folds: reports/<A>/folds/<k>/): one training run."""

    arch: str
    fold: int | None = None
    params: int | None = None
    epochs: int | None = None
    steps: int | None = None
    best_val_dice: float | None = None
    best_epoch: int | None = None
    val_dice_definition: str | None = None
    train_seconds: float | None = None
    seconds_per_epoch: float | None = None
    peak_rss_mb: float | None = None  # the training process's resident high-water mark
    cuda_max_allocated_mb: float | None = None  # on CUDA: the most torch allocated on the device
    device: str | None = None
    world_size: int | None = None
    resumed_from_step: int | None = None
    config_hash: str | None = None
    recipe: str | None = None  # resize | planned (medseg.data.plan); None: written before recipes were recorded
    input_size: list[int] | None = None  # the network's input: the resize size or the patch size
    batch_size: int | None = None  # items per optimizer step (per rank)

    @property
    def train_memory_mb(self) -> float | None:
        """GPU: what torch allocated on the device; CPU: the process's peak resident memory."""
        return self.cuda_max_allocated_mb if self.cuda_max_allocated_mb is not None else self.peak_rss_mb


@dataclass
class ClassScores(_JsonFile):
    """One class's scores in metrics.json: means over the cases with a defined value."""

    dsc: float | None = None
    hd95: float | None = None
    nsd: float | None = None
    n: int | None = None
    excluded: int | None = None
    statuses: dict[str, int] = field(default_factory=dict)


@dataclass
class EvaluationMetrics(_JsonFile):
    """reports/<A>/metrics.json: a model's scores on a set of cases (the test split; CV: a fold's held-out cases)."""

    protocol: str
    mean_dsc: float | None
    mean_hd95: float | None = None
    mean_nsd: float | None = None
    per_class: dict[str, ClassScores] = field(default_factory=dict)
    arch: str | None = None
    fold: int | None = None
    hd95_unit: str | None = None
    test_cases_sha256: str | None = None  # the cases scored (the gate compares it)
    test_data_sha256: str | None = None  # their ids and content
    dataset_version: str | None = None
    nsd_tolerance: dict[str, float] = field(default_factory=dict)  # per class, in hd95_unit
    num_cases: int | None = None
    excluded: int | None = None
    checkpoint_epoch: int | None = None
    val_dice: float | None = None

    def __post_init__(self) -> None:
        self.per_class = {str(name): scores if isinstance(scores, ClassScores) else ClassScores.from_dict(scores)
                          for name, scores in (self.per_class or {}).items()}

    # The key order metrics.json has always had; fields unset for this kind of file are left out.
    _ORDER = ("arch", "fold", "protocol", "hd95_unit", "test_cases_sha256", "test_data_sha256", "dataset_version",
              "mean_dsc", "mean_hd95", "mean_nsd", "nsd_tolerance", "per_class", "num_cases", "excluded",
              "checkpoint_epoch", "val_dice")
    _OPTIONAL = ("arch", "fold", "checkpoint_epoch", "val_dice")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {key: data[key] for key in self._ORDER if not (key in self._OPTIONAL and data[key] is None)}


# One row of per_case.csv: a (case, class) pair's scores, NaN where undefined and `status` saying why ("class" is a
# keyword, hence the functional form).
CaseScore = TypedDict("CaseScore", {"case": str, "class": str, "dsc": float, "hd95": float, "nsd": float,
                                    "status": str})


PER_CASE_COLUMNS = ("case", "class", "dsc", "hd95", "nsd", "status")
SCORE_COLUMNS = ("dsc", "hd95", "nsd")


def write_per_case(path: str | Path, rows: list[Mapping[str, Any]]) -> None:
    """per_case.csv: one row per (case, class), NaN written as "nan" beside its status."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(PER_CASE_COLUMNS)
    for r in rows:
        writer.writerow([r["case"], r["class"], *(_fmt(r.get(key)) for key in SCORE_COLUMNS), r["status"]])
    write_text(path, buf.getvalue())


def read_per_case(path: str | Path, missing_ok: bool = False) -> list[dict[str, Any]]:
    """per_case.csv rows with the scores as numbers ("nan" -> NaN; no `nsd` column in an older file -> None);
    [] for a missing file when `missing_ok`, else MedsegError naming it."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return []
        raise MedsegError(f"{path}: not found; run `dvc repro` (the stage that scores these cases writes it)")
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error) as exc:
        raise MedsegError(f"{path}: cannot read per-case metrics: {exc}") from exc
    return [{**row, **{key: _number(row.get(key)) for key in SCORE_COLUMNS}} for row in rows]


def _fmt(value: Any) -> str:
    # NaN stays visible ("nan"): the status column says why the value is undefined.
    return "nan" if value is None or math.isnan(value) else repr(float(value))


def _number(text: str | None) -> float | None:
    return None if text in (None, "") else float(text)


@dataclass
class ExportReport(_JsonFile):
    """reports/<A>/export.json: the ONNX export's parity check and latencies (medseg.deployment.export)."""

    arch: str
    max_abs_diff: float | None = None
    parity_passed: bool = False
    threshold: float | None = None
    rel_threshold: float | None = None
    allowed_diff: float | None = None
    logit_scale: float | None = None
    label_agreement: float | None = None
    torch_latency_ms: float | None = None  # median of export.latency_runs single-slice calls after warm-up
    torch_latency_iqr_ms: float | None = None
    onnx_latency_ms: float | None = None
    onnx_latency_iqr_ms: float | None = None
    latency: dict[str, Any] | None = None  # how they were measured: runs, warm-up, threads, machine, load
    opset: int | None = None
    dynamic_hw: bool | None = None
    input_shape: list[Any] | None = None
    checked_shapes: list[list[int]] = field(default_factory=list)
    onnx_sha256: str | None = None  # of the model.onnx these numbers describe; None when the export failed

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["onnx_sha256"] is None:  # a failed export's report, as it has always been written
            del data["onnx_sha256"]
        return data


@dataclass
class RegistryRecord(_JsonFile):
    """registry/<A>.json: the MLflow model version the register stage made (or found unchanged) for an architecture."""

    model_name: str
    version: str
    run_id: str | None = None
    experiment_id: str | None = None
    artifact_sha256: str | None = None
    tracking_uri: str | None = None
    created: bool | None = None
    model_uri: str | None = None
    test_dsc: float | None = None
    parity_passed: bool | None = None


@dataclass
class CheckpointMeta(_JsonFile):
    """What checkpoint.pt records beside the weights (`state_dict`): how to rebuild the network, what it was trained
    on and selected by, and the model card (medseg.deployment.card) as a dict."""

    arch: str
    in_channels: int
    num_classes: int
    image_size: list[int]
    model_options: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    context: int | None = None  # None: a checkpoint from before 2.5D was recorded (params' data.context then)
    epoch: int | None = None
    val_dice: float | None = None
    config_hash: str | None = None
    training_cases_hash: str | None = None
    card: dict[str, Any] | None = None
    recipe: dict[str, Any] | None = None  # medseg.data.plan.SlicePlan.to_dict(); None: resize to image_size

    def with_weights(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """The dict torch.save writes to checkpoint.pt, in the key order it has always had."""
        data = self.to_dict()
        head = {key: data.pop(key) for key in ("arch", "model_options", "in_channels", "num_classes", "image_size",
                                               "class_names", "context")}
        return {**head, "state_dict": state_dict, **data}
