"""The batch-prediction flow (flows/predict.py): its helpers and tasks through `.fn()` (no Prefect server), the
prefect.yaml deployment, and one run of the real flow on the session's temporary server (`prefect_server`).

A tiny unet is trained, evaluated, exported, registered and promoted to `champion` once for the module, in an
MLflow sqlite store of its own, so every test resolves and runs a real model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from medseg.errors import ConfigError, PredictError
from medseg.io import read_json

from conftest import ROOT, paths, trained_project
from flows import predict as flow_predict
from flows.dvc_runner import retry_if_transient

ARCH = "unet"


@pytest.fixture(scope="module")
def project(tiny_project, tmp_path_factory, mlflow_db_template) -> Path:
    from medseg.tracking.promotion import promote_from_params

    root, params = trained_project(tiny_project, tmp_path_factory.mktemp("batch_predict") / "project", (ARCH,),
                                   store_template=mlflow_db_template, register=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own store
        assert promote_from_params(params, ARCH, root)["decision"] == "promoted"
    return root


def _store(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def _registered(root: Path) -> dict:
    return read_json(paths(root).registry_record(ARCH))  # model_name, version


def _raw_cases(root: Path) -> list[Path]:
    cases = read_json(paths(root).cases_json)["cases"]
    return [root / "data" / "phantom" / c["source_image"] for c in cases]


def _inputs(root: Path, folder: Path, broken: bool = True) -> Path:
    """Two good phantom volumes (a_good, b_good) and, with `broken`, a truncated c_broken.nii.gz."""
    folder.mkdir(parents=True)
    first, second = _raw_cases(root)[:2]
    shutil.copy2(first, folder / "a_good.nii.gz")
    shutil.copy2(second, folder / "b_good.nii.gz")
    if broken:
        blob = first.read_bytes()
        (folder / "c_broken.nii.gz").write_bytes(blob[: len(blob) // 2])
    return folder


# --------------------------------------------------------------------------------------------------------- helpers


def test_table_rows_have_the_same_columns_for_every_status():
    names = ["background", "liver"]
    summary = {"case": "a", "output": "out/a.nii.gz", "skipped": False, "seconds": 0.5,
               "voxels": {"background": 90, "liver": 10}}
    done = flow_predict.summary_row(summary, "3", names)
    skipped = flow_predict.summary_row({**summary, "skipped": True, "seconds": 0.0, "voxels": None}, "3", names)
    failed = flow_predict.table_row("c", "failed", names, version="3", message="x" * 2000)
    assert list(done) == list(skipped) == list(failed)
    assert done == {"case": "a", "status": "done", "model_version": "3", "seconds": 0.5, "voxels_background": 90,
                    "voxels_liver": 10, "output": "out/a.nii.gz", "message": ""}
    # the mask was made by an earlier run: its version is not this run's to claim
    assert skipped["status"] == "skipped" and skipped["model_version"] is None and skipped["voxels_liver"] is None
    assert len(failed["message"]) == flow_predict.MESSAGE_CHARS


def test_registered_version_pins_an_alias_to_its_number(project):
    name, version = _registered(project)["model_name"], str(_registered(project)["version"])
    assert flow_predict.registered_version(f"models:/{name}@champion", _store(project)) == (
        f"models:/{name}/{version}", version)
    assert flow_predict.registered_version(f"models:/{name}/7", _store(project)) == (f"models:/{name}/7", "7")
    with pytest.raises(PredictError, match="alias 'nope'"):
        flow_predict.registered_version(f"models:/{name}@nope", _store(project))
    with pytest.raises(PredictError, match="expected models:/<name>@<alias>"):
        flow_predict.registered_version(f"models:/{name}", _store(project))


def test_load_model_resolves_the_champion_or_names_a_local_file_by_its_hash(project, monkeypatch):
    from medseg.io import sha256_file

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name, version = _registered(project)["model_name"], str(_registered(project)["version"])
    registered = flow_predict.load_model.fn(f"models:/{name}@champion", _store(project))
    assert registered.version == version and registered.predictor.source == f"models:/{name}/{version}"
    local = flow_predict.load_model.fn(str(paths(project).model_dir(ARCH)))
    assert local.version == f"sha256:{sha256_file(project / 'models' / ARCH / 'model.onnx')[:12]}"
    assert local.predictor.card == registered.predictor.card
    with pytest.raises(ConfigError, match="no MLflow store"):
        flow_predict.load_model.fn(f"models:/{name}@champion")
    # the value holds a live ONNX Runtime session; only transient failures are retried
    assert flow_predict.load_model.persist_result is False
    assert flow_predict.load_model.retry_condition_fn is retry_if_transient
    assert flow_predict.predict_case.retry_condition_fn is retry_if_transient


def test_plan_takes_an_empty_folder_as_nothing_to_do_and_refuses_bad_folders(project, tmp_path):
    predictor = flow_predict.load_model.fn(str(paths(project).model_dir(ARCH))).predictor
    (tmp_path / "empty").mkdir()
    assert flow_predict.plan(predictor, tmp_path / "empty", tmp_path / "out") == []
    with pytest.raises(PredictError, match="no such file or folder"):
        flow_predict.plan(predictor, tmp_path / "missing", tmp_path / "out")
    inputs = _inputs(project, tmp_path / "in")
    with pytest.raises(PredictError, match="inside the input folder"):
        flow_predict.plan(predictor, inputs, inputs / "out")
    cases = flow_predict.plan(predictor, inputs, tmp_path / "out")
    assert [c.name for c in cases] == ["a_good", "b_good", "c_broken"]
    assert not any(flow_predict.is_done(c) for c in cases)


def test_predict_case_segments_one_case_and_names_a_broken_file(project, tmp_path):
    model = flow_predict.load_model.fn(str(paths(project).model_dir(ARCH)))
    inputs = _inputs(project, tmp_path / "in")
    out = tmp_path / "out"
    summary = flow_predict.predict_case.fn(model, "a_good", [str(inputs / "a_good.nii.gz")], str(out))
    assert summary["skipped"] is False and (out / "a_good.nii.gz").is_file()
    assert sum(summary["voxels"].values()) == int(np.prod(nib.load(inputs / "a_good.nii.gz").shape))
    with pytest.raises(PredictError, match="cannot read NIfTI") as info:
        flow_predict.predict_case.fn(model, "c_broken", [str(inputs / "c_broken.nii.gz")], str(out))
    assert info.value.path == str(inputs / "c_broken.nii.gz")
    assert sorted(p.name for p in out.iterdir()) == ["a_good.nii.gz"]


def test_bad_labels_are_refused_before_the_model_is_loaded(tmp_path):
    with pytest.raises(ConfigError, match="labels='ids'"):
        flow_predict.batch_predict.fn(str(tmp_path), str(tmp_path / "out"), model="never-loaded", labels="ids")


def test_main_passes_arguments_and_exits_1_when_a_case_failed(monkeypatch, capsys):
    calls = []

    class State:
        def __init__(self, failed):
            self.failed = failed

        def is_completed(self):
            return True

        def result(self):
            return {"failed": self.failed}

    def fake_flow(**kwargs):
        calls.append(kwargs)
        return State(["c_broken"] if len(calls) == 1 else [])

    monkeypatch.setattr(flow_predict, "batch_predict", fake_flow)
    assert flow_predict.main(["-i", "in", "-o", "out", "-m", "models/unet", "--labels", "index"]) == 1
    assert flow_predict.main(["--input", "in", "--output", "out"]) == 0
    assert calls[0] == {"input_dir": "in", "output_dir": "out", "model": "models/unet", "tracking_uri": None,
                        "labels": "index", "tta": False, "return_state": True}
    assert calls[1]["model"] == flow_predict.DEFAULT_MODEL
    assert '"failed": [\n    "c_broken"\n  ]' in capsys.readouterr().out  # the summary, as JSON


def test_deployment_is_valid_for_prefect_deploy_and_points_at_the_flow():
    from prefect.cli.deploy._models import PrefectYamlModel  # what `prefect deploy` validates prefect.yaml with
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    PrefectYamlModel.model_validate(spec)
    (dep,) = [d for d in spec["deployments"] if d["name"] == flow_predict.FLOW_NAME]
    path, func = dep["entrypoint"].split(":")
    loaded = load_flow_from_entrypoint(f"{ROOT / path}:{func}")
    assert loaded.name == flow_predict.FLOW_NAME
    assert set(dep["parameters"]) <= set(loaded.parameters.properties)
    assert set(loaded.parameters.required) <= set(dep["parameters"])  # input_dir, output_dir
    assert dep["work_pool"]["name"] == "medseg-process"
    (schedule,) = dep["schedules"]
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert schedule["active"] is False  # folders to set first


# --------------------------------------------------------------------------------------------------------- the flow


@pytest.mark.prefect
def test_batch_predict_segments_new_cases_reports_the_broken_one_and_skips_done_ones(
        prefect_server, project, tmp_path, monkeypatch):
    from prefect.artifacts import Artifact

    def rows() -> dict[str, dict]:
        artifact = Artifact.get(flow_predict.PREDICTIONS_ARTIFACT_KEY)
        assert artifact is not None and artifact.type == "table"
        data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
        return {row["case"]: row for row in data}

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    inputs, out = _inputs(project, tmp_path / "in"), tmp_path / "out"
    name, version = _registered(project)["model_name"], str(_registered(project)["version"])
    run = dict(input_dir=str(inputs), output_dir=str(out), model=f"models:/{name}@champion",
               tracking_uri=_store(project))

    summary = flow_predict.batch_predict(**run)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (["a_good", "b_good"], [], ["c_broken"])
    assert summary["model_version"] == version
    assert sorted(p.name for p in out.iterdir()) == ["a_good.nii.gz", "b_good.nii.gz"]
    table = rows()
    for case in ("a_good", "b_good"):
        row = table[case]
        assert (row["status"], row["model_version"], row["message"]) == ("done", version, "")
        voxels = sum(v for k, v in row.items() if k.startswith("voxels_"))
        assert voxels == int(np.prod(nib.load(inputs / f"{case}.nii.gz").shape)) and row["seconds"] > 0
    broken = table["c_broken"]
    assert broken["status"] == "failed" and str(inputs / "c_broken.nii.gz") in broken["message"]
    assert "cannot read NIfTI" in broken["message"]

    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = flow_predict.batch_predict(**run)
    assert (again["done"], again["skipped"], again["failed"]) == ([], ["a_good", "b_good"], ["c_broken"])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
    table = rows()  # the second run's version of the artifact
    assert [table[c]["status"] for c in ("a_good", "b_good", "c_broken")] == ["skipped", "skipped", "failed"]
