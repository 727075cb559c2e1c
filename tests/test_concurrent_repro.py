"""Two pipeline runs started at the same moment on one checkout. The flows run every DVC call through
`flows.dvc_runner.run_dvc`, whose checkout lock queues the second run (DVC's own lock would fail it: two bare
`dvc repro` at once stop the second with "is busy"): both succeed, one trains, the other finds everything up to
date, the outputs are complete and consistent, and the registry holds one version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medseg.io import read_json

from conftest import make_dvc_project, paths

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
RUN = "import sys; from flows.dvc_runner import run_dvc; run_dvc(['repro'], sys.argv[1], log=print)"


def test_two_pipeline_runs_at_once_one_waits_and_nothing_is_duplicated(tmp_path, tiny_params):
    root = make_dvc_project(tmp_path / "project", tiny_params)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    runs = [subprocess.Popen([sys.executable, "-c", RUN, str(root)], cwd=root, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=900)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], "\n\n".join(outputs)
    # exactly one of them trained: the other waited, then found every stage up to date
    assert sum("Running stage 'train@unet'" in out for out in outputs) == 1, "\n\n".join(outputs)
    done = subprocess.run(["dvc", "status"], cwd=root, env=env, capture_output=True, text=True)
    assert "Data and pipelines are up to date" in done.stdout, done.stdout + done.stderr
    assert str(read_json(paths(root).registry_record("unet"))["version"]) == "1"  # no duplicate registration
    leftovers = [p for p in root.rglob(".*.tmp*") if ".dvc" not in p.parts]  # medseg.io's temp files
    assert not leftovers, f"half-written files left behind: {leftovers}"
