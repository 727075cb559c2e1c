"""The MLflow store a project talks to: which URI, a client that answered, the experiment, fluent URIs for a while.

Below training (per-epoch logging), predict (`models:/` URIs), register and promote, so none of them needs another
for this. mlflow is imported only inside the functions that talk to the store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from medseg.config import disable_telemetry, settings
from medseg.errors import MedsegError

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# MLflow's own HTTP client retries 7 times with exponential backoff (minutes) before failing; our retry loop
# replaces it while probing, and the real work gets a short leash so a server dying mid-run fails in about a minute.
PROBE_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
WORK_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


def resolve_tracking_uri(params: dict[str, Any], root: str | Path = ".") -> str:
    """MLFLOW_TRACKING_URI, else params.register.tracking_uri; local stores are made absolute from `root`.

    A relative `sqlite:///mlflow.db` would otherwise land wherever the process happens to run.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or settings(params).register.tracking_uri
    uri = uri or DEFAULT_TRACKING_URI
    root = Path(root).resolve()
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///") :]
        if not db.startswith("/") and db != ":memory:":
            return f"sqlite:///{root / db}"
        return uri
    if "://" not in uri:  # a plain folder means a file store
        path = Path(uri)
        return (path if path.is_absolute() else root / path).as_uri()
    return uri


def artifact_location(uri: str, root: Path) -> str | None:
    # Only a store on this machine gets root/mlartifacts; a tracking server decides its own artifact store.
    if uri.startswith(("sqlite:", "file:")):
        return (root / "mlartifacts").resolve().as_uri()
    return None


@contextlib.contextmanager
def temporary_env(values: dict[str, str], force: bool) -> Iterator[None]:
    """Temporarily set environment variables (`force=False` keeps values the user set)."""
    saved = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if force or key not in os.environ:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def with_retries(attempt: Callable[[], T], retries: int, backoff_s: float, what: str,
                 give_up: Callable[[int, Exception], Exception]) -> T:
    """attempt() until it returns: a failure is retried `retries` times after backoff_s * 2**n seconds, with a
    warning naming `what`; after the last, give_up(attempts, error) is raised. A MedsegError (a medseg check that
    failed, not a store that did not answer) is raised at once."""
    attempts = max(int(retries), 0) + 1
    for n in range(attempts):
        try:
            return attempt()
        except MedsegError:
            raise
        except Exception as exc:  # any failure to reach the store counts: connection, auth, bad database
            if n + 1 == attempts:
                raise give_up(attempts, exc) from exc
            delay = float(backoff_s) * 2**n
            log.warning("%s failed (%s); retry %d/%d in %.1fs", what, short_error(exc), n + 1, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises


def connect(tracking_uri: str, retries: int = 3, backoff_s: float = 2.0):
    """An MlflowClient whose store answered; retries with exponential backoff, then raises MedsegError."""
    from mlflow import MlflowClient

    disable_telemetry()
    registry_uri = registry_uri_for(tracking_uri)

    def probe():
        with temporary_env(PROBE_HTTP_ENV, force=True):
            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
            client.search_experiments(max_results=1)
        return client

    return with_retries(probe, retries, backoff_s, f"reaching MLflow at {tracking_uri}", lambda attempts, exc: (
        MedsegError(f"MLflow tracking store {tracking_uri} unreachable after {attempts} attempt(s): "
                    f"{short_error(exc)}. Start the server (see docs/mlflow.md) or set MLFLOW_TRACKING_URI / "
                    "register.tracking_uri.")))


def registry_uri_for(tracking_uri: str) -> str:
    # The registry lives in the tracking store unless the user points MLFLOW_REGISTRY_URI elsewhere.
    return os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri


def short_error(exc: BaseException | None) -> str:
    text = f"{type(exc).__name__}: {exc}" if exc else "unknown error"
    return text if len(text) < 300 else text[:300] + "..."


@contextlib.contextmanager
def mlflow_store(tracking_uri: str, registry_uri: str | None = None) -> Iterator[None]:
    """Point MLflow's global (fluent) URIs here for log_model/register_model, then restore them exactly.

    mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which would leak this store into later calls.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    registry_uri = registry_uri or registry_uri_for(tracking_uri)
    saved_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value



def ensure_experiment(client, name: str, tracking_uri: str, root: str | Path) -> str:
    """The experiment's id, creating it with root/mlartifacts as artifact store when the store is local."""
    return ensure_experiment_at(client, name, artifact_location(tracking_uri, Path(root)))


# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces, prompts); a model-training
# experiment shows runs, metrics and models.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def ensure_experiment_at(client, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # another architecture's register stage created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id
