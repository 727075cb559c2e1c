"""Batch prediction: segment every new scan in a folder with the current champion (`medseg-batch-predict`).

    python flows/predict.py --input data/incoming --output predictions          # models:/...@champion
    python flows/predict.py -i scans/ -o out/ --model models/unet --labels index  # a local model

The model is resolved once per run. An alias (`models:/<name>@champion`) is read from the MLflow registry and
pinned to its version number before the download, so every mask of the run comes from that one version even if
the alias moves meanwhile, and the artifact says which (a local model is named by its file's sha256).
One ONNX Runtime session serves the whole run: the cases are `predict-case` tasks run one after another in the
flow's thread (ONNX Runtime already uses its intra-op threads inside each call).
Cases whose mask exists are skipped (resume), so a scheduled run segments only the new files. A case that cannot
be segmented (a truncated file, NaN voxels, another channel count: a MedsegError) fails alone, with its message;
the others go on. The table artifact `medseg-predictions` has one row per case: status (done / skipped /
failed), model version, seconds, voxels per class, output, message.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script, or loaded from its path by a Prefect worker
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from medseg.config import disable_telemetry
from medseg.deployment.predict import LABEL_KINDS, Case, Predictor, load_predictor, plan_cases, predict_files
from medseg.errors import ConfigError, MedsegError, PredictError
from medseg.io import sha256_file

from flows import environment_ready
from flows.dvc_runner import retry_if_transient
from flows.pipeline import failure_message, flow_exit_code
from flows.tasks import retry_delay

FLOW_NAME = "medseg-batch-predict"
PREDICTIONS_ARTIFACT_KEY = "medseg-predictions"
DEFAULT_MODEL = "models:/medseg-phantom-unet@champion"  # the quick preset's unet (<model_prefix>-<dataset>-<arch>)
REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
MESSAGE_CHARS = 500


@dataclass
class ResolvedModel:
    """The model every case of one run is segmented with."""

    predictor: Predictor
    version: str  # the registry version number, or sha256:<12 hex> of a local model.onnx


def registered_version(uri: str, tracking_uri: str) -> tuple[str, str]:
    """(`models:/<name>/<version>`, version) for a registry URI; an alias is read from the registry here, once."""
    match = REGISTERED.match(uri)
    if not match:
        raise PredictError(uri, "expected models:/<name>@<alias> or models:/<name>/<version>")
    if match["version"]:
        return uri, match["version"]
    from mlflow.exceptions import MlflowException

    from medseg.tracking.store import connect

    client = connect(tracking_uri)  # retries an unreachable store with backoff, then a MedsegError
    try:
        version = str(client.get_model_version_by_alias(match["name"], match["alias"]).version)
    except MlflowException as exc:  # unknown model name or alias: the same answer on every try
        raise PredictError(uri, f"no version with alias {match['alias']!r} in {tracking_uri} ({exc.message})") from exc
    return f"models:/{match['name']}/{version}", version


# No result persistence: the value holds a live ONNX Runtime session, used by this run's tasks in this process.
@task(name="load-model", retries=2, retry_delay_seconds=retry_delay(10), retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE, persist_result=False)
def load_model(model: str, tracking_uri: str | None = None) -> ResolvedModel:
    """Resolve `model` (models:/ URI, models/<arch>/ folder or model.onnx) to one version and open its session."""
    if str(model).startswith("models:/"):
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not tracking_uri:
            raise ConfigError(f"{model}: no MLflow store to resolve it in; pass tracking_uri or set "
                              "MLFLOW_TRACKING_URI")
        pinned, version = registered_version(str(model), tracking_uri)
        return ResolvedModel(load_predictor(pinned, tracking_uri=tracking_uri), version)
    predictor = load_predictor(model)
    return ResolvedModel(predictor, f"sha256:{sha256_file(Path(predictor.source))[:12]}")


def plan(predictor: Predictor, input_dir: str | Path, output_dir: str | Path) -> list[Case]:
    """The cases of `input_dir`; none for an empty folder (a scheduled run before any scan arrived).

    Every other planning error (output folder inside the input folder, incomplete channel files, a 2D image for
    a 3D model) is about the folder, not one case: it fails the run before anything is read.
    """
    try:
        return plan_cases(predictor, input_dir, output_dir)
    except PredictError as exc:
        if exc.path == str(Path(input_dir)) and Path(input_dir).is_dir():  # "no NIfTI or image files"
            return []
        raise


def is_done(case: Case) -> bool:
    """`medseg predict --continue`'s rule: every output of the case exists."""
    return all(path.exists() for path in case.outputs)


@task(name="predict-case", task_run_name="predict-{case}", retries=2, retry_delay_seconds=retry_delay(5),
      retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def predict_case(model: ResolvedModel, case: str, inputs: list[str], output_dir: str, labels: str = "raw",
                 tta: bool = False) -> dict[str, Any]:
    """Segment one case (`case` names the task run) with the run's session; predict_files' summary of it."""
    # resume: a case that an overlapping run finished after this one planned is not done twice
    (summary,) = predict_files(model.predictor, inputs, output_dir, labels=labels, tta=tta, resume=True)
    return summary


def table_row(case: str, status: str, class_names: Sequence[str], *, version: str | None = None,
              seconds: float | None = None, voxels: dict[str, int] | None = None, output: str = "",
              message: str = "") -> dict[str, Any]:
    """One row of the predictions table; a column per class keeps the table flat for the UI."""
    row: dict[str, Any] = {"case": case, "status": status, "model_version": version, "seconds": seconds}
    row.update({f"voxels_{name}": (voxels or {}).get(name) for name in class_names})
    row.update(output=output, message=message[:MESSAGE_CHARS])
    return row


def summary_row(summary: dict[str, Any], version: str, class_names: Sequence[str]) -> dict[str, Any]:
    """The row of a case predict_files handled: done by `version`, or skipped (its mask's version is unknown)."""
    if summary["skipped"]:
        return table_row(summary["case"], "skipped", class_names, output=summary["output"],
                         message="output exists, kept")
    return table_row(summary["case"], "done", class_names, version=version, seconds=summary["seconds"],
                     voxels=summary["voxels"], output=summary["output"])


@task(name="publish-predictions", cache_policy=NO_CACHE)
def publish_predictions(rows: list[dict[str, Any]], description: str) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact(table=rows, key=PREDICTIONS_ARTIFACT_KEY, description=description)


@flow(name=FLOW_NAME, log_prints=True)
def batch_predict(
    input_dir: str,
    output_dir: str,
    model: str = DEFAULT_MODEL,
    tracking_uri: str | None = None,
    labels: str = "raw",
    tta: bool = False,
) -> dict[str, Any]:
    """Segment every case of `input_dir` that has no mask in `output_dir` yet, with one resolved model version.

    `tracking_uri` (else MLFLOW_TRACKING_URI) names the MLflow store of a models:/ URI; `labels`: "raw" label
    values or class "index"; `tta`: mirroring test-time augmentation. Returns {"model", "model_version",
    "source", "cases" (the table's rows), "done", "skipped", "failed"}. A failed case does not stop the others;
    the run fails only when the folder had cases and every one of them failed.
    """
    disable_telemetry()
    if labels not in LABEL_KINDS:
        raise ConfigError(f"labels={labels!r}; expected one of {', '.join(LABEL_KINDS)}")
    resolved = load_model(model, tracking_uri)
    class_names = resolved.predictor.card.class_names
    rows = []
    for case in plan(resolved.predictor, input_dir, output_dir):
        if is_done(case):  # no task run for a finished case: a scheduled run over a large folder stays cheap
            rows.append(table_row(case.name, "skipped", class_names, output=str(case.labels),
                                  message="output exists, kept"))
            continue
        state = predict_case(resolved, case.name, [str(p) for p in case.inputs], str(output_dir), labels, tta,
                             return_state=True)
        if state.is_completed():
            rows.append(summary_row(state.result(), resolved.version, class_names))
        else:
            message = failure_message(state)
            print(f"{case.name}: failed; the other cases go on.\n{message}")
            rows.append(table_row(case.name, "failed", class_names, version=resolved.version,
                                  output=str(case.labels), message=message))
    publish_predictions(rows, f"{model} -> version {resolved.version} ({resolved.predictor.source})")
    by_status = {s: [r["case"] for r in rows if r["status"] == s] for s in ("done", "skipped", "failed")}
    summary = {"model": model, "model_version": resolved.version, "source": resolved.predictor.source,
               "cases": rows, **by_status}
    print(f"{len(by_status['done'])} done, {len(by_status['skipped'])} skipped, {len(by_status['failed'])} failed "
          f"with {model} (version {resolved.version})")
    if rows and len(by_status["failed"]) == len(rows):
        raise MedsegError(f"every case failed: {json.dumps({r['case']: r['message'] for r in rows})}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Segment every new scan in a folder (flow medseg-batch-predict).")
    parser.add_argument("--input", "-i", required=True, dest="input_dir",
                        help="folder of scans (NIfTI volumes or 2D images)")
    parser.add_argument("--output", "-o", required=True, dest="output_dir",
                        help="folder for the masks (not inside --input)")
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL,
                        help="models:/<name>@<alias>, models:/<name>/<version>, models/<arch>/ or a model.onnx "
                             f"(default {DEFAULT_MODEL})")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store of a models:/ URI (default $MLFLOW_TRACKING_URI)")
    parser.add_argument("--labels", choices=LABEL_KINDS, default="raw",
                        help="raw label values (default) or class indices")
    parser.add_argument("--tta", action="store_true", help="mirroring test-time augmentation")
    args = parser.parse_args(argv)
    disable_telemetry()  # before the flow starts Prefect's temporary server
    if not environment_ready():
        return 2
    state = batch_predict(input_dir=args.input_dir, output_dir=args.output_dir, model=args.model,
                          tracking_uri=args.tracking_uri, labels=args.labels, tta=args.tta, return_state=True)
    return flow_exit_code(state, "batch prediction")


if __name__ == "__main__":
    raise SystemExit(main())
