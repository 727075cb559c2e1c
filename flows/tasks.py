"""Prefect tasks shared by the medseg flows: prepare the data, train one architecture (its four stages), push,
promote, the report; and what they read back of what the stages wrote. Every task that produces artefacts runs
`dvc repro <stages>` through `flows.dvc_runner` (DVC decides what is stale); the artifacts are `flows.artifacts`'.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_logger

from medseg.config import load_params, settings
from medseg.deployment.card import dataset_version as cases_json_version
from medseg.errors import ConfigError
from medseg.layout import ProjectLayout

from flows.dvc_runner import DATA_STAGES, DVC_TAG, REPORT_STAGE, arch_stages, repro_args, retry_if_transient, run_dvc

# ---------------------------------------------------------------------------------------------------------
# Reading what the stages wrote


def ingested_version(params: dict[str, Any], root: str | Path) -> str | None:
    """Content version of the ingested dataset (the one model cards record), None before ingest."""
    cases = ProjectLayout.of(params, root).cases_json
    return cases_json_version(cases) if cases.is_file() else None


def mlflow_links(tracking_uri: str | None, experiment_id: str | None, run_id: str | None, model: str,
                 version: str | None) -> dict[str, str | None]:
    """Where to look in MLflow: the model version's URI always, and UI links when the store is a tracking server
    (an http(s) URI; a sqlite store has no UI address until `mlflow ui` serves it)."""
    base = tracking_uri.rstrip("/") if tracking_uri and tracking_uri.startswith(("http://", "https://")) else None
    return {
        "model_uri": f"models:/{model}/{version}" if version else None,
        "mlflow_run_url": f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
        if base and experiment_id and run_id else None,
        "model_version_url": f"{base}/#/models/{model}/versions/{version}" if base and version else None,
    }


def arch_summary(params: dict[str, Any], arch: str, root: str | Path) -> dict[str, Any]:
    """What one architecture's stages produced: metrics, export parity and the registered version."""
    from medseg.report import read_arch_outputs  # the report's reading, so both show the same numbers
    from medseg.tracking.registry import model_name

    outputs = read_arch_outputs(params, arch, root)
    metrics, export, registry = outputs.metrics, outputs.export, outputs.registry
    name = registry.model_name if registry else model_name(params, arch)
    version, run_id = (registry.version, registry.run_id) if registry else (None, None)
    return {
        "arch": arch,
        "status": "completed",
        "model_name": name,
        "version": version,
        "run_id": run_id,
        **mlflow_links(registry.tracking_uri if registry else None, registry.experiment_id if registry else None,
                       run_id, name, version),
        "mean_dsc": metrics.mean_dsc if metrics else None,
        "mean_hd95": metrics.mean_hd95 if metrics else None,
        "mean_nsd": metrics.mean_nsd if metrics else None,
        "hd95_unit": metrics.hd95_unit if metrics else None,
        "protocol": metrics.protocol if metrics else None,
        "per_class": {cls: s.to_dict() for cls, s in metrics.per_class.items()} if metrics else {},
        "parity_passed": export.parity_passed if export else None,
        "max_abs_diff": export.max_abs_diff if export else None,
    }


# ---------------------------------------------------------------------------------------------------------
# Tasks

# Two retries for transient failures only; no Prefect result cache (DVC alone decides what is stale).
TASK_POLICY: dict[str, Any] = {"retries": 2, "retry_condition_fn": retry_if_transient, "cache_policy": NO_CACHE}
RETRY_DELAY_ENV = "MEDSEG_RETRY_DELAY_S"


def retry_delay(default_s: float) -> float:
    """A task's wait before a retry: `default_s`, or MEDSEG_RETRY_DELAY_S for every task of the process (read when
    flows/ is imported: set it in the worker's or the deployment's environment; e.g. longer on a preemptible pool)."""
    value = os.environ.get(RETRY_DELAY_ENV)
    if value is None or not value.strip():
        return default_s
    try:
        delay = float(value)
    except ValueError:
        raise ConfigError(f"{RETRY_DELAY_ENV}={value!r}: expected seconds (a number >= 0)") from None
    if delay < 0:
        raise ConfigError(f"{RETRY_DELAY_ENV}={value!r}: expected seconds (a number >= 0)")
    return delay


@task(name="prepare-data", tags=[DVC_TAG], retry_delay_seconds=retry_delay(10), **TASK_POLICY)
def prepare_data(root: str = ".") -> dict[str, Any]:
    """`dvc repro ingest split` (and `phantom` when the dataset is the built-in one)."""
    run_dvc(repro_args(DATA_STAGES), root)
    params = load_params(Path(root) / "params.yaml")
    return {"dataset": settings(params).dataset_name, "version": ingested_version(params, root)}


@task(name="train-evaluate-export-register", task_run_name="train-{arch}", tags=[DVC_TAG],
      retry_delay_seconds=retry_delay(30), **TASK_POLICY)
def train_arch(arch: str, root: str = ".", max_parallel: int = 1) -> dict[str, Any]:
    """One architecture's `train@A evaluate@A export@A register@A`, then what they produced.

    At most `max_parallel` of these run at once in one checkout (see `checkout_lock`).
    """
    params = load_params(Path(root) / "params.yaml")
    models = settings(params).models
    if arch not in models:
        raise ConfigError(
            f"{Path(root) / 'params.yaml'}: architecture {arch!r} is not in `models` "
            f"({', '.join(models)}); dvc.yaml has no stages for it"
        )
    run_dvc(repro_args(arch_stages(arch)), root, slots=max_parallel, exclusive=False)
    return arch_summary(params, arch, root)


@task(name="dvc-push", tags=[DVC_TAG], retry_delay_seconds=retry_delay(30), **TASK_POLICY)
def push_outputs(stages: list[str], root: str = ".") -> None:
    """`dvc push` these stages' outputs to the DVC remote (a worker's results for the orchestrating checkout)."""
    run_dvc(["push", *stages], root)


def name_flow_run(name: str) -> None:
    """Rename the running flow run: Prefect names runs at random ("quick-otter"); the dataset version tells
    runs apart in the UI. Best effort: a failure is logged, never fatal; outside a flow run nothing happens."""
    from prefect import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if not run_id:
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(run_id, name=name)
    except Exception as exc:  # noqa: BLE001 - a name is not worth failing a pipeline for
        get_logger(__name__).warning("could not rename flow run %s to %r: %s", run_id, name, exc)


def promote_model(params: dict[str, Any], arch: str, root: str | Path, promote_fn: Callable | None = None) -> dict:
    """Apply the champion gate (medseg.tracking.promotion) to one architecture; a refusal is a decision, not a failure.

    The decision is "promoted", "unchanged" (already the champion) or "refused", with the gate's reason.
    """
    from medseg.errors import PromotionRefused
    from medseg.tracking.promotion import promote_from_params
    from medseg.tracking.registry import model_name

    promote_fn = promote_fn or promote_from_params
    try:
        result = dict(promote_fn(params, arch, root) or {})
    except PromotionRefused as exc:
        result = dict(getattr(exc, "result", None) or {})
        result["decision"] = "refused"
        result["reason"] = result.get("reason") or str(exc)
    return {"arch": arch, "model_name": model_name(params, arch), **result}


# The tag lets a Prefect tag concurrency limit (`prefect concurrency-limit create medseg-promote 1`) serialise
# promotions started on several machines; on one machine medseg.tracking.promotion's lock already does.
@task(name="promote", task_run_name="promote-{arch}", retry_delay_seconds=retry_delay(10), tags=["medseg-promote"],
      **TASK_POLICY)
def promote_arch(arch: str, root: str = ".") -> dict[str, Any]:
    params = load_params(Path(root) / "params.yaml")
    return promote_model(params, arch, root)


@task(name="report", tags=[DVC_TAG], retry_delay_seconds=retry_delay(10), **TASK_POLICY)
def repro_report(root: str = ".") -> str:
    run_dvc(repro_args([REPORT_STAGE]), root)
    return str(ProjectLayout.of(load_params(Path(root) / "params.yaml"), root).comparison_dir / "comparison.md")
