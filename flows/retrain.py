"""Scheduled and event-driven retraining.

    python flows/retrain.py serve                      # weekly cron + retrain on "medseg.dataset.updated"
    python flows/retrain.py serve --cron "0 3 * * *"   # or MEDSEG_RETRAIN_CRON="0 3 * * *"
    python flows/retrain.py ingest                     # ingest new data; emits the event when the data changed
    python flows/retrain.py run                        # one retraining now, no server process needed

`serve` registers two deployments and runs them in this process until Ctrl-C:
- `medseg-retrain/medseg-retrain-served`: the full pipeline (every architecture in params.yaml), on the cron
  schedule and whenever a `medseg.dataset.updated` event arrives (a DeploymentEventTrigger).
- `medseg-ingest/medseg-ingest-served`: `dvc repro ingest split`; emits `medseg.dataset.updated` when the ingested
  dataset's content changed, which starts the retraining.
Their names are not prefect.yaml's (`medseg-retrain`, `medseg-ingest`): serving never takes over a deployment that
`prefect deploy` made for a worker.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script, or loaded from its path by a Prefect worker
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import flow
from prefect.events import emit_event
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

from medseg.config import disable_telemetry, load_params, settings

from flows import environment_ready
from flows.pipeline import medseg_pipeline
from flows.tasks import ingested_version, prepare_data

DATASET_UPDATED_EVENT = "medseg.dataset.updated"
DEFAULT_CRON = "0 2 * * 0"  # Sundays 02:00, when the GPUs are idle
CRON_ENV = "MEDSEG_RETRAIN_CRON"
# `serve` owns deployments of its own names: prefect.yaml's `medseg-retrain` / `medseg-ingest` (from `prefect
# deploy`, run by a worker with the pull step) must not be taken over by a served copy without code storage.
RETRAIN_DEPLOYMENT = "medseg-retrain-served"
INGEST_DEPLOYMENT = "medseg-ingest-served"


def dataset_resource_id(dataset: str) -> str:
    return f"medseg.dataset.{dataset}"


def emit_dataset_updated(dataset: str, version: str | None, root: str | None = None) -> Any:
    """Tell Prefect that `dataset` has a new ingested version; the retrain deployment's trigger listens for it.

    Returns the emitted Event (None when no Prefect API is configured to receive events).
    """
    payload = {"dataset": dataset, "version": version}
    if root is not None:
        payload["root"] = str(root)
    return emit_event(
        event=DATASET_UPDATED_EVENT,
        resource={
            "prefect.resource.id": dataset_resource_id(dataset),
            "prefect.resource.name": dataset,
            "medseg.dataset.version": str(version),
        },
        payload=payload,
    )


def dataset_updated_trigger(dataset: str | None = None) -> DeploymentEventTrigger:
    """Run the retrain deployment for each `medseg.dataset.updated` event (of `dataset`, or of any dataset)."""
    return DeploymentEventTrigger(
        name="medseg-retrain-on-new-data",
        enabled=True,
        expect={DATASET_UPDATED_EVENT},
        match={"prefect.resource.id": dataset_resource_id(dataset or "*")},
        parameters={"dataset": "{{ event.payload.dataset }}", "dataset_version": "{{ event.payload.version }}"},
    )


def retrain_cron(cli_value: str | None = None) -> str:
    return cli_value or os.environ.get(CRON_ENV) or DEFAULT_CRON


@flow(name="medseg-retrain", log_prints=True)
def retrain(
    root: str = ".",
    dataset: str | None = None,
    dataset_version: str | None = None,
    architectures: list[str] | None = None,
    work_pool: str | None = None,
) -> dict[str, Any]:
    """Retrain every architecture of params.yaml (DVC re-runs only what the new data or params made stale).

    `dataset` / `dataset_version` come from the triggering event; an event about another dataset than the
    one params.yaml trains on is acknowledged and skipped.
    """
    disable_telemetry()
    params = load_params(Path(root) / "params.yaml")
    configured = settings(params).dataset_name
    if dataset and dataset != configured:
        reason = f"event for dataset {dataset!r}, params.yaml trains on {configured!r}"
        print(f"skipped: {reason}")
        return {"status": "skipped", "reason": reason}
    if dataset_version:
        print(f"retraining on {configured} version {dataset_version}")
    summary = medseg_pipeline(root=root, architectures=architectures, work_pool=work_pool)
    return {"status": "completed", **summary}


@flow(name="medseg-ingest", log_prints=True)
def ingest_new_data(root: str = ".", always_emit: bool = False) -> dict[str, Any]:
    """`dvc repro ingest split`; emit `medseg.dataset.updated` when the ingested data changed (or `always_emit`)."""
    disable_telemetry()
    params = load_params(Path(root) / "params.yaml")
    before = ingested_version(params, root)
    data = prepare_data(str(Path(root).resolve()))
    changed = data["version"] != before
    emitted = False
    if changed or always_emit:
        emitted = emit_dataset_updated(data["dataset"], data["version"], root=str(Path(root).resolve())) is not None
    print(f"{data['dataset']}: version {before} -> {data['version']} ({'changed' if changed else 'unchanged'})")
    return {**data, "previous_version": before, "changed": changed, "event_emitted": emitted}


def build_deployments(root: str, cron: str, with_trigger: bool = True, with_schedule: bool = True) -> list:
    """The deployments `serve` runs (built without contacting the server)."""
    root = str(Path(root).resolve())
    retrain_deployment = retrain.to_deployment(
        name=RETRAIN_DEPLOYMENT,
        cron=cron if with_schedule else None,
        triggers=[dataset_updated_trigger()] if with_trigger else None,
        parameters={"root": root},
        tags=["medseg"],
        description="Retrain and gate every architecture of params.yaml (cron + new-dataset trigger).",
    )
    ingest_deployment = ingest_new_data.to_deployment(
        name=INGEST_DEPLOYMENT,
        parameters={"root": root},
        tags=["medseg"],
        description="Ingest the raw dataset; a changed dataset emits medseg.dataset.updated.",
    )
    return [retrain_deployment, ingest_deployment]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="medseg retraining: serve the schedule/trigger, or run once.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="serve the retrain + ingest deployments (cron and event trigger)")
    p_serve.add_argument("--cron", default=None, help=f"cron schedule (default ${CRON_ENV} or {DEFAULT_CRON!r})")
    p_serve.add_argument("--no-schedule", action="store_true", help="no cron schedule, event trigger only")
    p_serve.add_argument("--no-trigger", action="store_true", help="no event trigger, schedule only")
    p_run = sub.add_parser("run", help="retrain once now")
    p_run.add_argument("--arch", action="append", dest="architectures")
    p_run.add_argument("--work-pool", default=None)
    p_ingest = sub.add_parser("ingest", help="ingest new data and emit medseg.dataset.updated if it changed")
    p_ingest.add_argument("--always-emit", action="store_true")
    for p in (p_serve, p_run, p_ingest):
        p.add_argument("--root", default=".", help="project root (where params.yaml and dvc.yaml are)")
    args = parser.parse_args(argv)
    disable_telemetry()
    if not environment_ready():
        return 2

    if args.command == "serve":
        from prefect import serve

        deployments = build_deployments(
            args.root, retrain_cron(args.cron), with_trigger=not args.no_trigger, with_schedule=not args.no_schedule
        )
        serve(*deployments)
        return 0
    if args.command == "run":
        result = retrain(root=args.root, architectures=args.architectures, work_pool=args.work_pool)
    else:
        result = ingest_new_data(root=args.root, always_emit=args.always_emit)
    print(json.dumps(result, indent=2, default=str))
    return 1 if result.get("failed") else 0


if __name__ == "__main__":
    raise SystemExit(main())
