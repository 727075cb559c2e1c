"""A PACS round trip (`medseg-pacs-segment`): segment a study on a DICOMweb server with the current champion and
store each DICOM SEG back into the study.

    python flows/pacs.py --url http://127.0.0.1:8042/dicom-web --study 1.2.840...   # models:/...@champion
    python flows/pacs.py --url https://pacs.example/dicom-web --study <uid> --model models/unet

The model is resolved once (an alias pinned to its version, as the batch-prediction flow does); the library
(medseg.deployment.pacs) finds the study's CT/MR series (QIDO-RS), retrieves them (WADO-RS), segments each and
stores the SEG (STOW-RS), checking that the PACS lists it. A series with a SEG of the same model version already
is left alone, so a rerun (or an event that fires twice) stores nothing twice. A refused store fails the run with
the PACS's reason. The table artifact `medseg-pacs` has one row per series: UIDs, status, frames; no patient
attribute reaches the artifact, the logs or the flow's result.

A PACS that notifies (Orthanc's OnStableStudy Lua callback, a dcm4chee study-received hook) triggers this flow
through a Prefect deployment's webhook or `prefect deployment run medseg-pacs-segment/<name> -p study_uid=...`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script, or loaded from its path by a Prefect worker
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from medseg.config import disable_telemetry
from medseg.deployment.pacs import outcomes_as_rows, segment_study

from flows import environment_ready
from flows.pipeline import flow_exit_code
from flows.predict import DEFAULT_MODEL, ResolvedModel, load_model

FLOW_NAME = "medseg-pacs-segment"
PACS_ARTIFACT_KEY = "medseg-pacs"


@task(name="segment-study", task_run_name="segment-{study_uid}", cache_policy=NO_CACHE)
def segment_study_task(url: str, study_uid: str, model: ResolvedModel, tta: bool | None = None) -> list[dict]:
    """Every image series of the study segmented, its SEG stored (or found there already)."""
    return outcomes_as_rows(segment_study(url, study_uid, model.predictor, model_version=model.version, tta=tta))


@task(name="publish-pacs", cache_policy=NO_CACHE)
def publish(rows: list[dict[str, Any]], description: str) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact(table=rows, key=PACS_ARTIFACT_KEY, description=description)


@flow(name=FLOW_NAME, log_prints=True)
def pacs_segment(url: str, study_uid: str, model: str = DEFAULT_MODEL, tracking_uri: str | None = None,
                 tta: bool | None = None) -> dict[str, Any]:
    """Segment study `study_uid` on the DICOMweb server `url` and store the SEGs there; returns {"model",
    "model_version", "study", "series" (the table's rows), "stored", "already_there"}."""
    disable_telemetry()
    resolved = load_model(model, tracking_uri)
    rows = segment_study_task(url, study_uid, resolved, tta)
    publish(rows, f"study {study_uid} on {url} with {model} (version {resolved.version})")
    stored = [r["series_uid"] for r in rows if r["status"] == "stored"]
    there = [r["series_uid"] for r in rows if r["status"] == "already there"]
    print(f"study {study_uid}: {len(stored)} SEG(s) stored, {len(there)} series segmented already "
          f"(model version {resolved.version})")
    return {"model": model, "model_version": resolved.version, "study": study_uid, "series": rows,
            "stored": stored, "already_there": there}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Segment a PACS study and store its DICOM SEGs (flow "
                                                 f"{FLOW_NAME}).")
    parser.add_argument("--url", required=True, help="the DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    parser.add_argument("--study", required=True, dest="study_uid", help="StudyInstanceUID")
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL,
                        help=f"models:/<name>@<alias>, models:/<name>/<version>, models/<arch>/ or a model.onnx "
                             f"(default {DEFAULT_MODEL})")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store of a models:/ URI")
    args = parser.parse_args(argv)
    disable_telemetry()
    if not environment_ready():
        return 2
    state = pacs_segment(url=args.url, study_uid=args.study_uid, model=args.model, tracking_uri=args.tracking_uri,
                         return_state=True)
    return flow_exit_code(state, "PACS segmentation")


if __name__ == "__main__":
    raise SystemExit(main())
