"""MLflow on a real tracking server backed by PostgreSQL (tests/services.py; the set-up of docs/mlflow.md):
register, promote, load the champion from a fresh process and predict with it; a server SIGKILLed in the middle of
a registration and restarted: the stage retries and ends with one version, nothing local half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_registry import fabricate_outputs, registry_params

from conftest import paths
from services import MlflowServer, Postgres

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def postgres():
    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture()
def mlflow_server(postgres, tmp_path):
    """A server on a database of its own (each test starts from an empty registry)."""
    backend = postgres.create_database(f"mlflow_{tmp_path.name.lower()[-40:]}".replace("-", "_"))
    server = MlflowServer(backend, tmp_path / "server-artifacts", tmp_path / "mlflow-server.log").start()
    yield server
    server.kill()


def _project(tmp_path: Path, server: MlflowServer, **register) -> tuple[Path, dict]:
    root = tmp_path / "project"
    params = registry_params(root)
    params["register"].update(tracking_uri=server.uri, **register)
    fabricate_outputs(root, "unet")
    return root, params


def _scan(path: Path) -> Path:
    data = np.random.default_rng(0).uniform(-200, 300, (40, 36, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0])), path)
    return path


def _predict(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    return subprocess.run([sys.executable, "-m", "medseg.cli", "predict", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env)


def test_register_promote_and_predict_from_a_fresh_client(mlflow_server, tmp_path, monkeypatch):
    from medseg.tracking.promotion import promote_from_params
    from medseg.tracking.registry import register_model_version

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root, params = _project(tmp_path, mlflow_server)
    record = register_model_version(params, "unet", root)
    assert record["tracking_uri"] == mlflow_server.uri and record["created"]
    assert promote_from_params(params, "unet", root)["champion_version"] == record["version"]
    assert register_model_version(params, "unet", root)["created"] is False  # idempotent on the server too

    scan = _scan(tmp_path / "scan.nii.gz")
    served = _predict("-m", f"models:/{record['model_name']}@champion", "-i", scan, "-o", tmp_path / "served",
                      "--tracking-uri", mlflow_server.uri)
    assert served.returncode == 0, served.stderr[-3000:]
    local = _predict("-m", paths(root).model_dir("unet"), "-i", scan, "-o", tmp_path / "local")
    assert local.returncode == 0, local.stderr[-3000:]
    labels = nib.load(tmp_path / "served" / "scan.nii.gz")
    assert labels.shape == (40, 36, 3)
    assert np.array_equal(np.asarray(labels.dataobj), np.asarray(nib.load(tmp_path / "local" / "scan.nii.gz").dataobj))
    assert any((tmp_path / "server-artifacts").rglob("model.onnx"))  # the server stored the artefact itself

    # a fresh process, knowing only the server: the pyfunc loads by alias and serves a NIfTI payload
    code = (
        "import base64, sys, mlflow\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "out = model.predict({'nifti_base64': base64.b64encode(open(sys.argv[2], 'rb').read()).decode()})\n"
        "open(sys.argv[3], 'wb').write(base64.b64decode(out['mask_nifti_base64']))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    mask = tmp_path / "pyfunc.nii.gz"
    done = subprocess.run([sys.executable, "-c", code, f"models:/{record['model_name']}@champion", str(scan),
                           str(mask)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert np.array_equal(np.asarray(nib.load(mask).dataobj), np.asarray(labels.dataobj))


@pytest.mark.parametrize("when", ["before", "after"])
def test_server_killed_during_registration_then_restarted(when, mlflow_server, tmp_path, monkeypatch):
    """SIGKILL of the server as the model version is being created (`before`: the request never arrives; `after`:
    the version exists but its answer, and everything after it, is lost); restarted 3 s later on the same port."""
    import mlflow

    import medseg.tracking.registry as registry
    from medseg.tracking.store import connect

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root, params = _project(tmp_path, mlflow_server, retries=4, backoff_s=1.0)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    register, killed = mlflow.register_model, []

    def kill_and_restart_later():
        mlflow_server.kill()
        killed.append(True)
        threading.Timer(3.0, mlflow_server.start).start()

    def register_model(*args, **kwargs):
        if not killed and when == "before":
            kill_and_restart_later()
        version = register(*args, **kwargs)
        if len(killed) == 0 and when == "after":
            kill_and_restart_later()
        return version

    monkeypatch.setattr(mlflow, "register_model", register_model)
    record = registry.register_model_version(params, "unet", root)
    assert killed == [True]

    client = connect(mlflow_server.uri, retries=3, backoff_s=1.0)
    versions = client.search_model_versions(f"name = '{record['model_name']}'")
    assert [v.version for v in versions] == [record["version"]]  # one version, whatever the server got
    assert client.get_model_version_by_alias(record["model_name"], "challenger").version == record["version"]
    runs = client.search_runs([client.get_experiment_by_name(params["register"]["experiment"]).experiment_id])
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert [r.info.run_id for r in finished] == [record["run_id"]]
    # an attempt the kill cut off is closed and points at the run that made the version
    for run in runs:
        if run.info.run_id != record["run_id"]:
            assert run.info.status == "FAILED" and run.data.tags["medseg.superseded_by"] == record["run_id"]

    after = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    written = set(after) - set(before)
    assert written == {paths(root).registry_record("unet")}  # the stage's one declared output, nothing else
    assert all(after[p] == before[p] for p in before)
    assert json.loads(paths(root).registry_record("unet").read_text())["version"] == record["version"]
    # and the version is whole: its model loads
    with registry.mlflow_store(mlflow_server.uri):
        assert mlflow.models.get_model_info(f"models:/{record['model_name']}/{record['version']}").flavors
