"""The comparison as an MLflow run (`comparison-<dataset>`) in the register stage's experiment, when that store exists."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

from medseg.config import settings
from medseg.report.statistics import statistics_metrics

log = logging.getLogger(__name__)


def log_comparison_run(params: dict[str, Any], root: str | Path, statistics: dict[str, Any],
                       cv_statistics: dict[str, Any] | None, files: Sequence[Path]) -> str | None:
    """The comparison as its own MLflow run in the register stage's experiment (run name `comparison-<dataset>`,
    tag `medseg.kind=comparison`): the statistics as metrics, comparison.md and statistics.json as artifacts.
    Only into a store that exists (a local store the register stage made, or a server): the report never creates
    one. A store that does not answer is a warning, not a failed report. Returns the run id."""
    from medseg.tracking.store import connect, ensure_experiment, resolve_tracking_uri, short_error

    uri = resolve_tracking_uri(params, root)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        log.info("report: no MLflow store at %s yet (the register stage makes it); comparison not logged", uri)
        return None
    run = None
    try:
        from mlflow.entities import Metric

        client = connect(uri, retries=0)
        project = settings(params)
        experiment_id = ensure_experiment(client, project.register.experiment, uri, root)
        dataset = project.dataset_name
        run = client.create_run(experiment_id, run_name=f"comparison-{dataset}",
                                tags={"medseg.kind": "comparison", "dataset": dataset,
                                      "best": str((statistics or {}).get("best")),
                                      "significant": str((statistics or {}).get("significant"))})
        values = {**statistics_metrics(statistics, "test."), **statistics_metrics(cv_statistics, "cv.")}
        stamp = int(time.time() * 1000)
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, stamp, 0) for k, v in values.items()])
        for path in files:
            client.log_artifact(run.info.run_id, str(path))
        client.set_terminated(run.info.run_id)
        return run.info.run_id
    except Exception as exc:  # noqa: BLE001 - the report's files are written; MLflow is a copy of them
        log.warning("report: comparison not logged to MLflow at %s: %s", uri, short_error(exc))
        if run is not None:  # not left RUNNING in the UI
            try:
                client.set_terminated(run.info.run_id, "FAILED")
            except Exception:  # noqa: BLE001 - the store is what failed; the warning above says so
                pass
        return None
