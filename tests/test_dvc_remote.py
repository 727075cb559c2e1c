"""A team's DVC remote: `dvc push` from one checkout, `git clone` + `dvc pull` in another, and the pulled
artefacts are the pipeline's: nothing to re-run, `dvc status -c` clean, `medseg predict` works without training."""

from __future__ import annotations

import os
import subprocess
import sys

import nibabel as nib
import pytest

from conftest import make_dvc_project, paths

pytestmark = pytest.mark.slow


def _run(cwd, *cmd) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the project's own store
    done = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_push_then_pull_in_a_fresh_clone_reuses_every_artefact(tmp_path, tiny_params):
    origin = make_dvc_project(tmp_path / "origin", tiny_params, git=True)
    remote = tmp_path / "remote"
    _run(origin, "dvc", "repro", "-q")
    _run(origin, "dvc", "remote", "add", "-d", "team", str(remote))
    _run(origin, "dvc", "push", "-q")
    _run(origin, "git", "add", "-A")
    _run(origin, "git", "commit", "-q", "-m", "pipeline run")

    clone = tmp_path / "clone"
    _run(tmp_path, "git", "clone", "-q", str(origin), str(clone))
    assert not paths(clone).checkpoint("unet").exists()  # cached artefacts come from the remote, not git
    _run(clone, "dvc", "pull", "-q")
    assert paths(clone).checkpoint("unet").is_file() and paths(clone).onnx("unet").is_file()
    status = _run(clone, "dvc", "status")
    assert "Data and pipelines are up to date" in status, status
    assert "in sync" in _run(clone, "dvc", "status", "-c")  # nothing missing from the remote, nothing to push
    assert "didn't change" in _run(clone, "dvc", "repro")  # a no-op: every stage skipped

    # the pulled model segments a scan, no training in this checkout
    scan = sorted((clone / "data" / "phantom" / "img").glob("*.nii.gz"))[0]
    out = tmp_path / "predictions"
    _run(clone, sys.executable, "-m", "medseg.cli", "predict", "-m", "models/unet/", "-i", str(scan), "-o", str(out))
    (written,) = sorted(out.glob("*.nii.gz"))
    assert nib.load(written).shape == nib.load(scan).shape
