"""Prefect flows for the medseg pipeline: data prep, one training per architecture, promotion, report.

    python flows/pipeline.py                        # every architecture in params.yaml, in this checkout
    python flows/pipeline.py --arch unet --arch segformer_b0
    python flows/pipeline.py --work-pool medseg-gpu  # fan trainings out to the pool's train-architecture deployment

Local runs submit one task per architecture on a thread pool; their `dvc repro` calls take turns in the checkout
(`--max-parallel N` lets N run side by side), and promotion of a finished architecture overlaps the next training.
With `--work-pool`, each architecture is its own flow run of `train-architecture` on a worker with its own
checkout and GPU: real parallelism, and a crash or OOM stays inside that run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script, or loaded from its path by a Prefect worker
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from medseg.config import disable_telemetry, load_params, settings
from medseg.errors import ConfigError, MedsegError

from flows import environment_ready
from flows.artifacts import publish_artifacts
from flows.dvc_runner import arch_stages
from flows.tasks import name_flow_run, prepare_data, promote_arch, push_outputs, repro_report, train_arch

TRAIN_FLOW_NAME = "train-architecture"
DEFAULT_TRAIN_TIMEOUT_S = 12 * 3600


def resolve_architectures(params: dict[str, Any], architectures: list[str] | None, params_path: Path) -> list[str]:
    """The architectures to train: the given ones (each must be in params `models`), else all of `models`."""
    models = settings(params).models
    if not architectures:
        if not models:
            raise ConfigError(f"{params_path}: `models` is empty; nothing to train")
        return models
    unknown = [a for a in architectures if a not in models]
    if unknown:
        raise ConfigError(
            f"{params_path}: {', '.join(unknown)} not in `models` ({', '.join(models)}); "
            "dvc.yaml only has stages for those"
        )
    return list(dict.fromkeys(architectures))


# How Prefect words a failed run's message: "Flow run encountered an exception: DvcCommandError: <its text>".
_PREFECT_PREFIX = re.compile(r"^(?:Flow|Task) run encountered an exception:\s*(?:[A-Za-z_][\w.]*: )?")


def failure_message(state: Any) -> str:
    """The exception (or message) of a failed/crashed state, first lines only. The state's message when its
    exception cannot be rebuilt here: a flow run on a worker stores it as JSON (type + text), and a class whose
    constructor takes more than the text (DvcCommandError) does not come back from that, while the message that
    Prefect wrote on the worker ("Flow run encountered an exception: ...") has the same text."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - the result itself could not be read back
        exc = None
    text = str(exc) if isinstance(exc, BaseException) else _PREFECT_PREFIX.sub("", state.message or state.name)
    return "\n".join(text.strip().splitlines()[:8]) or state.name


def find_train_deployment(work_pool: str) -> str:
    """The id of the `train-architecture` deployment on `work_pool` (exactly one must exist)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, WorkPoolFilter

    with get_client(sync_client=True) as client:
        deployments = client.read_deployments(
            flow_filter=FlowFilter(name={"any_": [TRAIN_FLOW_NAME]}),
            work_pool_filter=WorkPoolFilter(name={"any_": [work_pool]}),
        )
    if len(deployments) != 1:
        found = ", ".join(d.name for d in deployments) or "none"
        raise ConfigError(
            f"work pool {work_pool!r}: expected one {TRAIN_FLOW_NAME} deployment, found {found} "
            "(deploy it with `prefect deploy -n medseg-train-arch` or see docs/orchestration.md)"
        )
    return str(deployments[0].id)


@task(name="train-on-work-pool", task_run_name="train-{arch}-on-work-pool", cache_policy=NO_CACHE)
def train_remote(arch: str, deployment_id: str, root: str, timeout_s: float) -> dict[str, Any]:
    """Run `train-architecture` for one architecture as its own flow run on the deployment's work pool."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(
        deployment_id, parameters={"arch": arch, "root": root}, timeout=timeout_s, tags=["medseg", arch]
    )
    state = flow_run.state
    if state is None or not state.is_final():
        raise MedsegError(f"{TRAIN_FLOW_NAME} run {flow_run.name} for {arch} did not finish within {timeout_s:.0f} s")
    if not state.is_completed():
        raise MedsegError(f"{TRAIN_FLOW_NAME} run {flow_run.name} for {arch}: {failure_message(state)}")
    try:  # readable when the workers share result storage (see docs/orchestration.md)
        summary = state.result()
    except Exception as exc:
        summary = {"arch": arch, "note": f"metrics stayed on the worker ({exc.__class__.__name__})"}
    return {**summary, "arch": arch, "status": "completed", "flow_run": flow_run.name}


@flow(name=TRAIN_FLOW_NAME, flow_run_name="train-{arch}", persist_result=True, result_serializer="json",
      log_prints=True)
def train_architecture(arch: str, root: str = ".", push: bool = False) -> dict[str, Any]:
    """One architecture's train/evaluate/export/register in this checkout (a work-pool flow run per arch).

    `push`: `dvc push` the stages' outputs afterwards, so the orchestrating checkout can `dvc pull` them.
    """
    disable_telemetry()
    root = str(Path(root).resolve())
    summary = train_arch(arch, root)
    if push:
        push_outputs(arch_stages(arch), root)
    return summary


@flow(name="medseg-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=8), log_prints=True)
def medseg_pipeline(
    root: str = ".",
    architectures: list[str] | None = None,
    work_pool: str | None = None,
    promote: bool = True,
    report: bool = True,
    max_parallel: int = 1,
    train_timeout_s: float = DEFAULT_TRAIN_TIMEOUT_S,
) -> dict[str, Any]:
    """Data prep once, one training per architecture, the champion gate per architecture, then the report.

    Locally, at most `max_parallel` trainings run at once in this checkout (1: they share one device); with
    `work_pool`, each architecture is a `train-architecture` flow run on that pool, all at once.
    One architecture failing does not stop the others: the result lists every architecture's status, and the
    flow fails only when none of them made it. Artifacts `medseg-metrics` (table) and `medseg-promotion`
    (markdown) summarise the run.
    """
    disable_telemetry()
    root_path = Path(root).resolve()
    params_path = root_path / "params.yaml"
    params = load_params(params_path)
    archs = resolve_architectures(params, architectures, params_path)

    data = prepare_data(str(root_path))  # nothing can train without it: a failure here fails the run
    name_flow_run(f"{data.get('dataset')}-{data.get('version') or 'unversioned'}")  # e.g. phantom-3f2a9c1b04de

    if work_pool:
        deployment_id = find_train_deployment(work_pool)
        futures = {
            train_remote.submit(arch, deployment_id, str(root), train_timeout_s): arch for arch in archs
        }  # the worker's own checkout: `root` is passed as given, not resolved here
    else:
        futures = {train_arch.submit(arch, str(root_path), max_parallel): arch for arch in archs}

    results: dict[str, dict[str, Any]] = {}
    promotions: dict[str, Any] = {}
    for future in as_completed(list(futures)):
        arch = futures[future]
        future.wait()  # sets the future's final state (`.state` alone may still read the API's older one)
        state = future.state
        if state.is_completed():
            results[arch] = future.result()
            if promote:  # as soon as this architecture is registered, while others still train
                promotions[arch] = promote_arch.submit(arch, str(root_path))
        else:
            results[arch] = {"arch": arch, "status": "failed", "error": failure_message(state)}
            print(f"{arch}: training failed; the other architectures go on.\n{results[arch]['error']}")

    decisions: dict[str, dict[str, Any]] = {}
    for arch in archs:
        if arch not in promotions:
            reason = "promotion disabled" if results[arch]["status"] == "completed" else "training failed"
            decisions[arch] = {"arch": arch, "decision": "skipped", "reason": reason}
            continue
        promotions[arch].wait()
        state = promotions[arch].state
        if state.is_completed():
            # the version the decision is about, linked in the promotion artifact where MLflow has a UI
            decisions[arch] = {"model_version_url": results[arch].get("model_version_url"),
                               **promotions[arch].result()}
        else:  # e.g. the tracking server stayed unreachable through the retries
            decisions[arch] = {"arch": arch, "decision": "error", "reason": failure_message(state)}

    failed = [a for a in archs if results[a]["status"] != "completed"]
    report_status = run_report(str(root_path), report=report, failed=failed, fanned_out=bool(work_pool))

    ordered = {a: results[a] for a in archs}
    publish_artifacts(ordered, decisions, data.get("version"))
    summary = {
        "dataset": data.get("dataset"),
        "dataset_version": data.get("version"),
        "architectures": ordered,
        "promotions": decisions,
        "report": report_status,
        "failed": failed,
    }
    if len(failed) == len(archs):
        raise MedsegError(f"every architecture failed: {json.dumps({a: results[a]['error'] for a in failed})}")
    return summary


def run_report(root: str, *, report: bool, failed: list[str], fanned_out: bool) -> dict[str, Any]:
    """`dvc repro report` when every architecture has its artefacts here; otherwise say why not."""
    if not report:
        return {"status": "skipped", "reason": "report disabled"}
    if failed:
        # report depends on every architecture's registry entry: DVC would re-run the failed training
        return {"status": "skipped", "reason": f"failed architectures: {', '.join(failed)}"}
    if fanned_out:
        return {"status": "skipped", "reason": "artefacts are on the workers: `dvc pull && dvc repro report`"}
    state = repro_report(root, return_state=True)
    if state.is_completed():
        return {"status": "completed", "path": state.result()}
    return {"status": "failed", "reason": failure_message(state)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the medseg pipeline as a Prefect flow.")
    parser.add_argument("--root", default=".", help="project root (where params.yaml and dvc.yaml are)")
    parser.add_argument("--arch", action="append", dest="architectures", help="architecture (repeatable)")
    parser.add_argument(
        "--work-pool", default=None, help="fan trainings out to this pool's train-architecture deployment"
    )
    parser.add_argument("--max-parallel", type=int, default=1, help="local trainings at once in this checkout")
    parser.add_argument("--no-promote", action="store_true", help="register challengers but do not apply the gate")
    parser.add_argument("--no-report", action="store_true", help="skip `dvc repro report`")
    args = parser.parse_args(argv)
    if not environment_ready():
        return 2
    state = medseg_pipeline(
        root=args.root,
        architectures=args.architectures,
        work_pool=args.work_pool,
        promote=not args.no_promote,
        report=not args.no_report,
        max_parallel=args.max_parallel,
        return_state=True,
    )
    return flow_exit_code(state, "pipeline")


def flow_exit_code(state: Any, what: str) -> int:
    """A flow run's CLI ending: the summary printed as JSON; 0 only when it completed with nothing failed."""
    if not state.is_completed():
        print(f"{what} failed: {failure_message(state)}", file=sys.stderr)
        return 1
    summary = state.result()
    print(json.dumps(summary, indent=2, default=str))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
