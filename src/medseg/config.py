"""params.yaml: loaded and validated once into typed sections with one set of defaults (the dataclasses below).

`load_params` returns the file as a dict with every default filled in (what DVC, MLflow and the config hashes
see) after checking each section against its dataclass: an unknown key or a wrong type is a ConfigError naming
the key and the file before any work starts. `settings(params)` gives the same values typed
(`settings(params).train.epochs`). `dataset:` is checked by medseg.data.formats.dataset_spec (its keys depend on
the format's adapter) and `model_options:` by each network's builder.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from medseg.errors import ConfigError

PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class PhantomSettings:
    num_cases: int = 12
    shape: list[int] = field(default_factory=lambda: [96, 96, 20])  # x, y, z voxels
    spacing: list[float] = field(default_factory=lambda: [0.7, 0.7, 3.0])  # mm
    seed: int = 0


@dataclass(frozen=True)
class SplitSettings:
    preset: str | None = None
    test_fraction: float = 0.25
    val_fraction: float = 0.2
    folds: int = 0
    seed: int | None = None  # None: the top-level seed


@dataclass(frozen=True)
class AugmentSettings:
    """Each transform fires with probability p; a transform left out is off."""

    p: float = 0.5
    flip: bool = False
    rot90: bool = False
    rotate_deg: float = 0.0
    intensity_jitter: float = 0.0


@dataclass(frozen=True)
class PlanSettings:
    """The planned recipe's budget (medseg.data.plan): null values are planned from the dataset's fingerprint."""
    target_spacing: list[float] | None = None  # in-plane (row, column) mm; null: the median, coarser if too large
    max_image_side: int = 1024  # the planned median slice's longer side at most this (else a coarser spacing)
    patch_size: list[int] | None = None  # null: the planned median slice, shrunk to max_patch_pixels, aspect kept
    max_patch_pixels: int = 65536  # 256 x 256: a CPU's budget; nnU-Net 2D on a GPU plans up to ~512 x 512
    batch_size: int | None = None  # null: batch_pixels // patch pixels, at least 2
    batch_pixels: int = 524288  # pixels per optimizer step (8 patches of 256 x 256)
    foreground_oversample: float = 0.33  # fraction of patches centred on a foreground pixel (nnU-Net's 0.33)
    tile_step: float = 0.5  # sliding-window step, a fraction of the patch (nnU-Net's 0.5)


@dataclass(frozen=True)
class DataSettings:
    # resize: every slice resized to image_size, an epoch one pass (TransUNet's recipe, the seed's protocol);
    # planned: slices at a planned spacing, patches, sliding-window inference (nnU-Net's 2D recipe)
    recipe: Literal["resize", "planned"] = "resize"
    image_size: list[int] = field(default_factory=lambda: [224, 224])
    plan: PlanSettings = field(default_factory=PlanSettings)
    context: int = 0
    num_workers: int = 0
    cache_resized: bool = True
    augment: AugmentSettings | None = None  # None: no augmentation


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 150
    batch_size: int = 24
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Literal["poly", "cosine"] = "poly"
    poly_power: float = 0.9
    ce_weight: float = 0.5
    dice_weight: float = 0.5
    dice_include_background: bool = True
    amp: bool = False  # CUDA only
    channels_last: bool = False  # CUDA only
    device: str = "auto"
    max_steps_per_epoch: int | None = None  # resize recipe: an epoch's pass cut to at most this many steps
    steps_per_epoch: int = 250  # planned recipe: optimizer steps per epoch, patches sampled with replacement
    grad_clip: float | None = None
    checkpoint_every_steps: int = 50


@dataclass(frozen=True)
class EvaluateSettings:
    protocol: Literal["mm", "transunet"] = "mm"
    batch_size: int = 32
    overlay_cases: int = 1
    # NSD tolerance in HD95's unit (mm; voxels under transunet): one number, or {class name: tolerance}
    nsd_tolerance: float | dict[str, float] = 2.0


@dataclass(frozen=True)
class ExportSettings:
    opset: int = 17
    max_abs_diff: float = 1e-3
    max_rel_diff: float = 1e-5
    latency_runs: int = 10


@dataclass(frozen=True)
class ReportSettings:
    qualitative_slices: int = 3
    confidence: float = 0.95  # medseg.evaluation.stats: patient-bootstrap intervals
    alpha: float = 0.05  # Holm-corrected paired Wilcoxon tests against the best
    bootstrap_resamples: int = 2000


@dataclass(frozen=True)
class RegisterSettings:
    experiment: str = "medseg"
    model_prefix: str = "medseg"
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else medseg.tracking.store.DEFAULT_TRACKING_URI
    retries: int = 3
    backoff_s: float = 2.0


@dataclass(frozen=True)
class CVSettings:
    """Cross-validation (medseg.evaluation.cross_validation): the architectures to cross-validate and the folds of
    split.folds to train, both DVC matrix axes; empty lists (the default) switch it off."""

    models: list[str] = field(default_factory=list)
    folds: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ComputeSettings:
    """CPU threads (medseg.runtime.threads): not part of any result, so no stage depends on these keys."""

    threads: int | None = None  # intra-op threads; None: the cores this job may use (see medseg.runtime.threads)
    parallel_jobs: int = 1  # medseg jobs sharing this machine's cores (MEDSEG_PARALLEL_JOBS overrides)
    # torchrun jobs: how long a rank waits in a collective for the others before the job fails (a rank that hangs
    # instead of dying); torch's own default, stated so that a stuck job ends
    dist_timeout_s: int = 1800


SECTIONS: dict[str, type] = {
    "phantom": PhantomSettings, "split": SplitSettings, "data": DataSettings, "train": TrainSettings,
    "evaluate": EvaluateSettings, "export": ExportSettings, "report": ReportSettings, "register": RegisterSettings,
    "compute": ComputeSettings, "cv": CVSettings,
}
TOP_LEVEL = {"preset", "seed", "dataset", "models", "model_options", *SECTIONS}


@dataclass(frozen=True)
class Settings:
    seed: int
    models: list[str]
    phantom: PhantomSettings
    split: SplitSettings
    data: DataSettings
    train: TrainSettings
    evaluate: EvaluateSettings
    export: ExportSettings
    report: ReportSettings
    register: RegisterSettings
    compute: ComputeSettings
    cv: CVSettings
    preset: str | None = None  # the preset params.yaml was made from (`medseg params --preset`), for the report
    dataset_name: str = ""  # dataset.name (the rest of `dataset:` is medseg.data.formats.dataset_spec's)


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """params.yaml as a dict, validated, with every section's defaults filled in."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameters file not found (run from the project root or pass --params)")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return validate_params(params, path)


def validate_params(params: dict[str, Any], source: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """A copy of `params` with the sections' defaults filled in; ConfigError naming `source` and the key otherwise."""
    _check_keys(params, TOP_LEVEL, "", source)
    out = dict(params)
    out["seed"] = _check_value(params.get("seed", 0), int, "seed", source)
    models = params.get("models") or []
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise ConfigError(f"{source}: models must be a list of architecture names (see `medseg models`)")
    out["models"] = list(models)
    if params.get("preset") is not None and not isinstance(params["preset"], str):
        raise ConfigError(f"{source}: preset must be a preset's name, got {params['preset']!r}")
    for key in ("dataset", "model_options"):
        if params.get(key) is not None and not isinstance(params[key], dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {type(params[key]).__name__}")
    for name, cls in SECTIONS.items():
        out[name] = dataclasses.asdict(_build(cls, params.get(name), name, source))
    for key in ("threads", "parallel_jobs", "dist_timeout_s"):
        if out["compute"][key] is not None and out["compute"][key] < 1:
            raise ConfigError(f"{source}: compute.{key} must be >= 1, got {out['compute'][key]}")
    _check_cv(out["cv"], out["split"], source)
    return out


def check_cv_fold(params: dict[str, Any], arch: str, fold: int) -> None:
    """`arch` x `fold` is a cell of params.yaml's cv matrix (a fold stage run by hand with other values is refused)."""
    cv = settings(params).cv
    if arch not in cv.models:
        raise ConfigError(f"params.yaml: {arch} is not in cv.models {cv.models}")
    if int(fold) not in cv.folds:
        raise ConfigError(f"params.yaml: fold {fold} is not in cv.folds {cv.folds}")


def _check_cv(cv: dict[str, Any], split: dict[str, Any], source: str | Path) -> None:
    """cv.folds must be folds the split makes (0 .. split.folds - 1), each once, when any model is cross-validated."""
    if not cv["models"]:
        return
    k = int(split.get("folds") or 0)
    if not cv["folds"]:
        raise ConfigError(f"{source}: cv.models is set but cv.folds is empty; e.g. cv.folds: "
                          f"{list(range(max(k, 3)))} with split.folds: {max(k, 3)}")
    if k < 2:
        raise ConfigError(f"{source}: cv needs split.folds >= 2, got {split.get('folds')}")
    bad = [f for f in cv["folds"] if not 0 <= f < k]
    if bad or len(set(cv["folds"])) != len(cv["folds"]):
        raise ConfigError(f"{source}: cv.folds {cv['folds']} must be distinct folds of split.folds={k} "
                          f"(0..{k - 1})")
    if len(set(cv["models"])) != len(cv["models"]):
        raise ConfigError(f"{source}: cv.models lists an architecture twice: {cv['models']}")


def settings(params: dict[str, Any], source: str | Path = PARAMS_FILE) -> Settings:
    """The typed view of params (validated again: cheap, and callers may pass a dict not read by load_params)."""
    valid = validate_params(params, source)
    return Settings(seed=valid["seed"], models=valid["models"], preset=valid.get("preset"),
                    dataset_name=str((valid.get("dataset") or {}).get("name") or ""),
                    **{name: _build(cls, valid[name], name, source) for name, cls in SECTIONS.items()})


def _check_keys(given: dict[str, Any], known: set[str], prefix: str, source: str | Path) -> None:
    for key in given:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f"; known: {', '.join(sorted(known))}"
            raise ConfigError(f"{source}: unknown key {prefix}{key}{hint}")


def _build(cls: type, given: Any, name: str, source: str | Path) -> Any:
    if given is None:
        given = {}
    if isinstance(given, cls):
        return given
    if not isinstance(given, dict):
        raise ConfigError(f"{source}: {name} must be a mapping, got {type(given).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(given, set(fields), f"{name}.", source)
    hints = typing.get_type_hints(cls)
    values = {key: _check_value(value, hints[key], f"{name}.{key}", source) for key, value in given.items()}
    return cls(**values)


def _check_value(value: Any, hint: Any, key: str, source: str | Path) -> Any:
    """`value` if it fits the type hint (ints are accepted for floats), else a ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _check_value(value, option, key, source)
            except ConfigError as exc:
                if isinstance(value, dict) and typing.get_origin(option) is dict:
                    raise  # a mapping for a number-or-mapping key: what is wrong inside it is the message
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: {key}: {value!r} fits none of {hint}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}={value!r}; expected one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else _build(hint, value, key, source)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return {_check_value(k, args[0], f"{key} key", source): _check_value(v, args[1], f"{key}.{k}", source)
                for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_check_value(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if hint in (bool, str) and not isinstance(value, hint):
        raise ConfigError(f"{source}: {key} must be {'true or false' if hint is bool else 'a string'}, got {value!r}")
    return value


def model_options(params: dict[str, Any], arch: str) -> dict[str, Any]:
    return dict((params.get("model_options") or {}).get(arch) or {})


def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-able config (used to refuse resuming a run trained with other settings)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def resolve_device(name: str = "auto") -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available on this machine")
    return name


def env_number(name: str, default: Any, kind: type = int, minimum: float = 1) -> Any:
    """A limit set in the environment (the default when unset or empty); a ConfigError naming the variable when it
    is not a finite number of `kind` >= `minimum`. Read where the limit applies, so a changed value takes effect."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < minimum:
        whole = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{name}={text!r}: expected {whole} >= {minimum:g}")
    return value


def disable_telemetry() -> None:
    """Stages and tests never phone home."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
