"""MLflow model registry: one run + one ONNX model version per architecture.

`register_model_version` logs what the train/evaluate/export stages wrote for one architecture to an MLflow run,
registers `models/<A>/model.onnx` as a version of `<prefix>-<dataset>-<arch>` with alias `challenger`, and writes
`registry/<A>.json`. It is idempotent: the sha256 of the ONNX file identifies a version, so re-running the stage
for an unchanged model reuses the existing version instead of piling up duplicates.

Promotion (the champion gate) is medseg.tracking.promotion: the register stage never promotes, so it does not depend on
the scoring code a champion's re-evaluation needs.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from medseg.config import config_hash, model_options, settings
from medseg.contracts import EvaluationMetrics, ExportReport, RegistryRecord, TrainSummary
from medseg.deployment.card import ModelCard, card_from_metadata
from medseg.errors import MedsegError
from medseg.evaluation.metrics import finite_or_none
from medseg.io import sha256_file
from medseg.layout import ProjectLayout
from medseg.tracking.store import (
    WORK_HTTP_ENV,
    artifact_location,
    connect,
    ensure_experiment_at,
    mlflow_store,
    resolve_tracking_uri,
    short_error,
    temporary_env,
    with_retries,
)

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
MAX_TAG_VALUE = 5000  # MLflow's limit on a model version tag value


# --------------------------------------------------------------------------------------------------- naming
def model_name(params: dict[str, Any], arch: str) -> str:
    """Registered model name `<register.model_prefix>-<dataset.name>-<arch>`."""
    prefix = settings(params).register.model_prefix
    return f"{prefix}-{params['dataset']['name']}-{arch}"


# --------------------------------------------------------------------------------------------------- inputs
def _arch_files(layout: ProjectLayout, arch: str) -> dict[str, Path]:
    return {
        "onnx": layout.onnx(arch),
        "metrics": layout.metrics(arch),
        "export": layout.export_report(arch),
        "train_summary": layout.train_summary(arch),
        "train_log": layout.train_log(arch),
        "per_case": layout.per_case(arch),
        "curves": layout.curves(arch),
        "overlay": layout.overlay(arch),
    }


_REQUIRED = ("onnx", "metrics", "export")


def _flatten(prefix: str, obj: Any, out: dict[str, str]) -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), value, out)
    else:
        out[prefix] = str(obj)[:500]


def run_params(params: dict[str, Any], arch: str) -> dict[str, str]:
    """The settings that define a trained model, flattened for mlflow.log_params."""
    flat: dict[str, str] = {"arch": arch, "preset": str(params.get("preset")), "seed": str(params.get("seed"))}
    dataset = params.get("dataset") or {}
    for key in ("name", "format", "modality"):
        if key in dataset:
            flat[f"dataset.{key}"] = str(dataset[key])
    for key in ("hu_window", "class_names"):  # JSON, so the run says exactly what the model was trained on
        if key in dataset:
            flat[f"dataset.{key}"] = json.dumps(dataset[key])[:500]
    for section in ("data", "train"):
        _flatten(section, params.get(section) or {}, flat)
    _flatten("model", model_options(params, arch), flat)
    if params.get("evaluate"):
        flat["evaluate.protocol"] = str(params["evaluate"].get("protocol"))
    if params.get("export"):
        flat["export.opset"] = str(params["export"].get("opset"))
    return flat


def _metric_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def run_metrics(metrics: EvaluationMetrics, export: ExportReport, train_summary: TrainSummary | None
                ) -> dict[str, float]:
    """Scalar metrics of a run (non-finite values are left out: not every backend stores NaN/inf)."""
    values: dict[str, Any] = {
        "mean_dsc": metrics.mean_dsc,
        "mean_hd95": metrics.mean_hd95,
        "mean_nsd": metrics.mean_nsd,
        "export_max_abs_diff": export.max_abs_diff,
        "export_label_agreement": export.label_agreement,
        "torch_latency_ms": export.torch_latency_ms,
        "onnx_latency_ms": export.onnx_latency_ms,
    }
    for organ, scores in metrics.per_class.items():
        values[f"dsc_{organ}"], values[f"hd95_{organ}"], values[f"nsd_{organ}"] = scores.dsc, scores.hd95, scores.nsd
    summary = train_summary.to_dict() if train_summary else {}
    for key, value in summary.items():  # e.g. best_val_dice, train_seconds, epochs
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values[key if "val" in key or key.startswith("train") else f"train_{key}"] = value
    out = {}
    for key, value in values.items():
        number = finite_or_none(value)
        if number is not None:
            out[_metric_key(key)] = number
    return out


def read_train_log(path: Path) -> list[dict[str, float]]:
    """Rows of reports/<A>/train_log.csv with numeric columns (empty list if the file is missing)."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            parsed = {key: finite_or_none(value) for key, value in row.items() if key}
            rows.append({key: value for key, value in parsed.items() if value is not None})
    return rows


def _onnx_io(path: Path) -> tuple[str, list[int], str, list[int]]:
    """(input name, input shape, output name, output shape) with dynamic dims as -1, read from the graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or not model.graph.output:
        raise MedsegError(f"{path}: expected one image input and a logits output, got {[i.name for i in inputs]}")

    def shape(value_info) -> list[int]:
        dims = value_info.type.tensor_type.shape.dim
        return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in dims]

    return inputs[0].name, shape(inputs[0]), model.graph.output[0].name, shape(model.graph.output[0])


def _onnx_signature(onnx_path: Path, card: ModelCard):
    """What the ONNX graph accepts, from its card: float32 (-1, in_channels, h, w), h and w fixed to image_size unless
    H and W are dynamic (-1; multiples of card.size_multiple, stated in the model metadata). Checked against the graph.
    """
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    in_name, in_shape, out_name, out_shape = _onnx_io(onnx_path)
    h, w = (-1, -1) if card.dynamic_hw else (int(card.image_size[0]), int(card.image_size[1]))
    want_in, want_out = [-1, card.in_channels, h, w], [-1, card.num_classes, h, w]
    for what, graph, want in (("input", in_shape, want_in), ("output", out_shape, want_out)):
        if len(graph) != 4 or any(g != -1 and g != c for g, c in zip(graph, want)):
            raise MedsegError(f"{onnx_path}: {what} shape {graph} does not fit its model card ({want})")
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), tuple(want_in), in_name)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), tuple(want_out), out_name)]),
    )


def _pip_requirements() -> list[str]:
    # Pinned explicitly: MLflow's requirement inference would load the model in a subprocess (slow, offline-hostile).
    pins = []
    for package in ("onnx", "onnxruntime", "numpy"):
        try:
            pins.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(package)
    return pins


# --------------------------------------------------------------------------------------------------- register
def _find_version_by_sha(client, name: str, sha: str):
    escaped = name.replace("'", "\\'")
    for version in client.search_model_versions(f"name = '{escaped}'"):
        if version.tags.get("artifact_sha256") == sha:
            return version
    return None


def alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def register_model_version(params: dict[str, Any], arch: str, root: str | Path = ".") -> dict[str, Any]:
    """Log one architecture's outputs to MLflow and register its ONNX model; writes registry/<arch>.json.

    Raises MedsegError if an input file is missing or the tracking store stays unreachable after
    register.retries retries (registry/<arch>.json is then left as it was).
    """
    root = Path(root).resolve()
    reg = settings(params).register
    layout = ProjectLayout.of(params, root)
    files = _arch_files(layout, arch)
    for key in _REQUIRED:
        if not files[key].is_file():
            raise MedsegError(f"{files[key]}: missing; run the train/evaluate/export stages for {arch!r} first")
    metrics = EvaluationMetrics.read(files["metrics"])
    export = ExportReport.read(files["export"])
    train_summary = TrainSummary.read_if_there(files["train_summary"])
    sha = sha256_file(files["onnx"])
    if export.onnx_sha256 and export.onnx_sha256 != sha:  # parity/latency would describe another file
        raise MedsegError(f"{files['export']}: describes an ONNX file with sha256 {export.onnx_sha256[:12]}…, "
                          f"but {files['onnx']} has {sha[:12]}…; re-run the export stage for {arch!r}")
    card = _onnx_card(files["onnx"])
    name = model_name(params, arch)

    tracking_uri = resolve_tracking_uri(params, root)
    client = connect(tracking_uri, reg.retries, reg.backoff_s)
    started_runs: list[str] = []

    def attempt() -> tuple[str, str | None, bool]:
        # The whole registration is retried: a server that went away mid-way (restarted, failed over) may have
        # made the version before its answer was lost; the next attempt then finds it by sha256 and reuses it.
        with temporary_env(WORK_HTTP_ENV, force=False):
            existing = _find_version_by_sha(client, name, sha)
            if existing is not None:
                version, run_id, created = str(existing.version), existing.run_id, False
                _refresh_tags(client, name, existing, evaluation_tags(metrics, export, params))
                log.info("%s: model.onnx unchanged (sha256 %s…), reusing version %s", name, sha[:12], version)
            else:
                version, run_id = _log_and_register(client, params, arch, root, files, metrics, export,
                                                    train_summary, sha, name, tracking_uri, card, started_runs)
                created = True
            if alias_version(client, name, CHAMPION) != version:
                client.set_registered_model_alias(name, CHALLENGER, version)
        return version, run_id, created

    version, run_id, created = with_retries(
        attempt, reg.retries, reg.backoff_s, f"MLflow registration of {name} at {tracking_uri}",
        lambda attempts, exc: MedsegError(f"MLflow registration of {name} at {tracking_uri} failed after "
                                          f"{attempts} attempt(s): {short_error(exc)}"))
    _close_abandoned_runs(client, started_runs, run_id)

    try:  # for links to the run in MLflow's UI (the Prefect artifacts)
        experiment_id = str(client.get_run(run_id).info.experiment_id) if run_id else None
    except Exception:  # noqa: BLE001 - a link is not worth failing a registration for
        experiment_id = None
    record = RegistryRecord(model_name=name, version=version, run_id=run_id, experiment_id=experiment_id,
                            artifact_sha256=sha, tracking_uri=tracking_uri, created=created,
                            model_uri=f"models:/{name}/{version}", test_dsc=metrics.mean_dsc,
                            parity_passed=bool(export.parity_passed))
    record.write(layout.registry_record(arch))
    return record.to_dict()


def version_description(arch: str, family: str, dataset: str, metrics: EvaluationMetrics, protocol: str,
                        parity: bool, export: ExportReport) -> str:
    """One readable line for the model version page: DSC in %, HD95 with its unit, parity (rounded for reading;
    the exact values are the version's tags and the run's metrics)."""
    def num(value: Any, spec: str, scale: float = 1.0) -> str:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return format(value * scale, spec) if ok else "n/a"

    unit = metrics.hd95_unit
    dsc = num(metrics.mean_dsc, ".1f", 100)
    return (f"{arch} ({family}) on {dataset}: test DSC {dsc}{' %' if dsc != 'n/a' else ''}, "
            f"HD95 {num(metrics.mean_hd95, '.2f')}{' ' + unit if unit else ''} ({protocol} protocol), "
            f"ONNX parity {'passed' if parity else 'FAILED'} (max |diff| {num(export.max_abs_diff, '.1e')})")


def evaluation_tags(metrics: EvaluationMetrics, export: ExportReport, params: dict) -> dict[str, str]:
    """The model-version tags promotion compares: test split, protocol, test DSC, ONNX parity."""
    test_dsc = finite_or_none(metrics.mean_dsc)
    return {
        "test_cases_sha256": str(metrics.test_cases_sha256 or ""),
        "test_data_sha256": str(metrics.test_data_sha256 or ""),  # ids and content (medseg.deployment.card)
        "dataset_version": str(metrics.dataset_version or ""),
        "protocol": str(metrics.protocol or settings(params).evaluate.protocol),
        "test_dsc": repr(test_dsc if test_dsc is not None else float("nan")),  # nan never promotes
        "parity_passed": "true" if export.parity_passed else "false",
    }


def card_tags(card: ModelCard) -> dict[str, str]:
    """Model-version tags from the card, for searching the registry. A value longer than MLflow allows (the whole
    card, or the class names of a dataset with hundreds of classes) is left out: the model's metadata has it."""
    evaluation = card.evaluation or {}
    tags = {
        "medseg.arch": card.arch,
        "medseg.dataset": str(card.dataset.get("name", "")),
        "medseg.dataset_version": str(card.dataset.get("version", "")),
        "medseg.test_cases_sha256": str(card.split.get("test_cases_sha256", "")),
        "medseg.split_sha256": str(card.split.get("split_sha256", "")),
        "medseg.protocol": str(evaluation.get("protocol", "")),
        "medseg.image_size": json.dumps(card.image_size),
        "medseg.modality": card.modality,
        "medseg.class_names": json.dumps(card.class_names),
        "medseg.card": card.to_json(),
    }
    return {key: value for key, value in tags.items() if len(value) <= MAX_TAG_VALUE}


def _refresh_tags(client, name: str, version, tags: dict[str, str]) -> None:
    """A reused version takes the latest evaluation's tags (e.g. re-evaluated under another protocol)."""
    stale = {key: value for key, value in tags.items() if version.tags.get(key) != value}
    for key, value in stale.items():
        log.warning("%s version %s: tag %s %r -> %r (re-evaluated, same model.onnx)", name, version.version, key,
                    version.tags.get(key), value)
        client.set_model_version_tag(name, str(version.version), key, value)


def _onnx_card(path: Path) -> ModelCard:
    """The card export wrote into model.onnx (CardError, a MedsegError, names the file when it has none)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return card_from_metadata({p.key: p.value for p in model.metadata_props}, path)


def provenance(root: Path) -> dict[str, str]:
    """What the run was made from, as run tags: the Git commit of the checkout (a `dvc exp run` runs on its
    baseline commit with the experiment's params applied: the experiment's own commit is made after the run, so
    the DVC experiment name and the dvc.lock hash say which workspace it was) and the dvc.lock sha256."""
    import subprocess

    tags: dict[str, str] = {}
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if done.returncode == 0:
            tags["git_commit"] = done.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    for env, tag in (("DVC_EXP_NAME", "dvc_exp_name"), ("DVC_EXP_BASELINE_REV", "dvc_exp_baseline")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    lock = root / "dvc.lock"
    if lock.is_file():
        tags["dvc_lock_sha256"] = sha256_file(lock)
    return tags


def _close_abandoned_runs(client, run_ids: list[str], kept: str | None) -> None:
    """Runs that attempts cut off by a lost server left RUNNING: FAILED, with a tag naming the run that made it."""
    for run_id in run_ids:
        if run_id == kept:
            continue
        try:
            client.set_tag(run_id, "medseg.superseded_by", str(kept))
            client.set_terminated(run_id, "FAILED")
        except Exception as exc:  # noqa: BLE001 - tidying up is not worth failing a registration for
            log.warning("could not mark the abandoned MLflow run %s as FAILED: %s", run_id, short_error(exc))


def _log_and_register(client, params, arch, root, files, metrics, export, train_summary, sha, name, tracking_uri,
                      card, started_runs: list[str] | None = None):
    import mlflow
    from mlflow.models import Model

    from medseg.deployment import serving
    from medseg.nnunet.train import family_of

    experiment_id = ensure_experiment_at(
        client, settings(params).register.experiment, artifact_location(tracking_uri, root)
    )
    try:
        family = family_of(arch)
    except MedsegError:
        family = "unknown"
    dataset = settings(params).dataset_name
    eval_tags = evaluation_tags(metrics, export, params)
    protocol, parity = eval_tags["protocol"], eval_tags["parity_passed"] == "true"
    dataset_version = str(card.dataset.get("version", "")) or "unversioned"
    origin = provenance(Path(root))
    run_tags = {
        **origin,
        "arch": arch,
        "family": family,
        "dataset": dataset,
        "dataset_version": dataset_version,
        "protocol": protocol,
        "test_cases_sha256": eval_tags["test_cases_sha256"],
        "config_hash": config_hash(run_params(params, arch)),
        "artifact_sha256": sha,
    }
    onnx_signature = _onnx_signature(files["onnx"], card)
    with mlflow_store(tracking_uri):
        # e.g. unet-phantom-3f2a9c1b04de-lr1e-3 (a DVC experiment) or unet-phantom-3f2a9c1b04de-a1b2c3d (a commit)
        source = origin.get("dvc_exp_name") or origin.get("git_commit", "")[:7]
        run_name = "-".join(part for part in (arch, dataset, dataset_version, source) if part)
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=run_tags) as run:
            run_id = run.info.run_id
            if started_runs is not None:
                started_runs.append(run_id)
            mlflow.log_params(run_params(params, arch))
            _log_dataset_input(dataset, dataset_version, ProjectLayout.of(params, root).ingested)
            _log_run_contents(client, run_id, files, metrics, export, train_summary)
            # One model, two flavors over one model.onnx: python_function serves NIfTI/PNG payloads (its signature),
            # onnx gives the graph, whose tensor signature is medseg_input's (medseg.deployment.serving).
            model_info = Model.log(
                artifact_path=None,
                name=arch,  # the logged model's name in MLflow 3's Models tab
                flavor=serving,
                onnx_path=files["onnx"],
                card=card,
                pip_requirements=_pip_requirements(),
                metadata={
                    "medseg_card": card.to_dict(),
                    # The signature's -1 H, W: any multiple of size_multiple when dynamic, else exactly image_size.
                    "medseg_input": {"layout": "NCHW", "dtype": "float32", "in_channels": card.in_channels,
                                     "image_size": card.image_size, "dynamic_hw": card.dynamic_hw,
                                     "size_multiple": card.size_multiple, "onnx_signature": onnx_signature.to_dict()},
                },
            )
        version_tags = {**eval_tags, "artifact_sha256": sha, "arch": arch, "family": family, **card_tags(card)}
        model_version = mlflow.register_model(model_info.model_uri, name, tags=version_tags)
    client.update_model_version(
        name,
        model_version.version,
        description=version_description(arch, family, dataset, metrics, protocol, parity, export),
    )
    _describe_registered_model(client, name, arch, family, dataset, protocol, card)
    return str(model_version.version), run_id


def _log_run_contents(client, run_id: str, files: dict[str, Path], metrics: EvaluationMetrics, export: ExportReport,
                      train_summary: TrainSummary | None) -> None:
    """The run's numbers (the scalars, then the training curves per epoch), its report files and the per-class
    table, into the active run `run_id`."""
    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, value, now, 0) for key, value in run_metrics(metrics, export, train_summary).items()]
    for row in read_train_log(files["train_log"]):
        step = int(row.get("epoch", row.get("step", 0)))
        for key in ("train_loss", "val_dice", "lr"):
            if key in row:
                batch.append(Metric(key, row[key], now, step))
    for start in range(0, len(batch), 1000):  # log_batch accepts at most 1000 metrics per call
        client.log_batch(run_id, metrics=batch[start : start + 1000])
    for key in ("metrics", "export", "train_summary", "per_case", "train_log", "curves", "overlay"):
        if files[key].is_file():
            mlflow.log_artifact(str(files[key]), artifact_path="reports")
    if metrics.per_class:
        mlflow.log_table({"class": list(metrics.per_class),
                          "dsc": [finite_or_none(s.dsc) for s in metrics.per_class.values()],
                          "hd95": [finite_or_none(s.hd95) for s in metrics.per_class.values()]},
                         artifact_file="reports/per_class.json")


def _log_dataset_input(dataset: str, version: str, ingested: Path) -> None:
    """The run's dataset input (MLflow's Datasets column): the ingested dataset, named, with its content
    version as the digest."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    mlflow.log_input(MetaDataset(LocalArtifactDatasetSource(str(ingested)), name=dataset, digest=version),
                     context="train+test")


def _describe_registered_model(client, name: str, arch: str, family: str, dataset: str, protocol: str,
                               card: ModelCard) -> None:
    """The registered model's page: what it is, what its aliases mean, and searchable tags."""
    classes = [c for c in card.class_names if c != "background"]
    client.update_registered_model(name, description=(
        f"medseg {arch} ({family}): 2D segmentation of {dataset} ({card.modality}), {len(classes)} classes "
        f"({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''}), tested under protocol {protocol}. "
        f"Alias challenger: the newest registered version; champion: the one `medseg promote` let through "
        f"the gate. Apply it with `medseg predict -m models:/{name}@champion -i scans/ -o masks/`."))
    for key, value in {"arch": arch, "family": family, "dataset": dataset, "protocol": protocol,
                       "modality": card.modality, "medseg_version": _medseg_version()}.items():
        client.set_registered_model_tag(name, key, str(value))


def _medseg_version() -> str:
    try:
        return importlib.metadata.version("medseg")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
