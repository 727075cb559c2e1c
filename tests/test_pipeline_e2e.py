"""The main job end to end: `dvc repro` on tiny settings in a temp project, then the artefacts and the registry."""

from __future__ import annotations

import copy
import json
import os
import subprocess

import numpy as np
import pytest

from conftest import make_dvc_project, paths

pytestmark = pytest.mark.slow


def _dvc(project, *args) -> subprocess.CompletedProcess:
    # the project's own sqlite store, whatever the caller's environment points at
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(["dvc", *args], cwd=project, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_dvc_repro_end_to_end(tmp_path, tiny_params):
    params = copy.deepcopy(tiny_params)
    # a CNN and a Mamba network, so both families go through train/evaluate/export/register
    params["models"] = ["unet", "vm_unet"]
    params["model_options"] = {"unet": {"base_channels": 4}, "vm_unet": {"depths": [1, 1, 1, 1], "dims": 8}}
    project = make_dvc_project(tmp_path / "project", params)

    _dvc(project, "repro")

    for arch in params["models"]:
        metrics = json.loads(paths(project).metrics(arch).read_text())
        assert 0.0 <= metrics["mean_dsc"] <= 1.0
        assert set(metrics["per_class"]) == set(params["dataset"]["class_names"][1:])
        export = json.loads(paths(project).export_report(arch).read_text())
        assert export["parity_passed"] is True
        assert export["max_abs_diff"] <= params["export"]["max_abs_diff"]
        assert paths(project).onnx(arch).stat().st_size > 0
        assert paths(project).registry_record(arch).is_file()
    assert "unet" in (paths(project).comparison_dir / "comparison.md").read_text()

    # DVC's metrics are flat numbers, one short column each: what `dvc metrics show` / `dvc exp show` print
    shown = json.loads(_dvc(project, "metrics", "show", "--json").stdout)
    files = {path: entry["data"] for path, entry in next(iter(shown.values()))["data"].items()}
    assert set(files) == {f"reports/{a}/{f}_scores.json" for a in params["models"] for f in ("train", "test", "export")}
    for path, values in files.items():
        assert values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()), path
    # keys unique across files (`unet.dsc`), so dvc exp show names a column by its key, not `path:key`
    classes = params["dataset"]["class_names"][1:]
    assert set(files["reports/unet/test_scores.json"]) <= {"unet.dsc", "unet.hd95", "unet.nsd",
                                                           *(f"unet.{s}_{c}" for s in ("dsc", "hd95") for c in classes)}
    assert {"unet.dsc", "unet.hd95", "unet.nsd", f"unet.dsc_{classes[0]}"} <= set(files["reports/unet/test_scores.json"])
    per_class = json.loads(paths(project).metrics("unet").read_text())["per_class"]
    for name, scores in per_class.items():  # per class: the number metrics.json has, where it has one
        if scores["dsc"] is not None:
            assert files["reports/unet/test_scores.json"][f"unet.dsc_{name}"] == float(f"{scores['dsc']:.4g}")
    keys = [key for values in files.values() for key in values]
    assert len(keys) == len(set(keys))
    metrics = json.loads(paths(project).metrics("unet").read_text())
    assert files["reports/unet/test_scores.json"]["unet.dsc"] == float(f"{metrics['mean_dsc']:.4g}")

    # A fresh MLflow client (new process) loads the challenger: the pyfunc segments a raw phantom scan (the
    # serving payload), the ONNX flavor gives the graph with its model card.
    model_name = f"{params['register']['model_prefix']}-{params['dataset']['name']}-vm_unet"
    scan = project / "data" / "phantom" / "img" / "img0001.nii.gz"
    script = f"""
import base64, gzip, io, mlflow, nibabel as nib, numpy as np
mlflow.set_tracking_uri("sqlite:///{project / 'mlflow.db'}")
uri = "models:/{model_name}@challenger"
out = mlflow.pyfunc.load_model(uri).predict({{"nifti_base64": base64.b64encode(open("{scan}", "rb").read()).decode()}})
mask = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(out["mask_nifti_base64"])))
meta = {{p.key for p in mlflow.onnx.load_model(uri).metadata_props}}
print(mask.shape, "medseg.model_card" in meta)
"""
    proc = subprocess.run(["python", "-c", script], capture_output=True, text=True, cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"{tuple(params['phantom']['shape'])} True"

    # Nothing changed: the second repro runs no stage.
    second = _dvc(project, "repro")
    assert "Running stage" not in second.stdout, second.stdout
    assert np.isfinite(json.loads(paths(project).metrics("unet").read_text())["mean_dsc"])
