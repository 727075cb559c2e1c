"""A prediction-only install: `medseg predict` needs the base dependencies only, and model families load lazily.

- the prediction path (API and CLI) on an exported model.onnx imports none of torch, mlflow, prefect, dvc,
  transformers, timm, segmentation_models_pytorch (checked in a child process, whose sys.modules is clean);
- looking a model up imports its own family module only, and the registry's static name -> module table is what
  the modules really register;
- (slow) a fresh venv with the base dependencies of pyproject.toml and a non-editable `pip install --no-deps` of
  medseg runs `medseg predict` and writes a label volume of the input's shape.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from medseg.io import read_json

from conftest import ROOT, paths

# what a deployment does not install (the train, transformers and pipeline extras)
HEAVY = ("torch", "torchvision", "mlflow", "prefect", "dvc", "transformers", "timm", "segmentation_models_pytorch",
         "onnx", "matplotlib")
FAMILY_MODULES = ("medseg.models.unet", "medseg.models.smp_models", "medseg.models.timm_models", "medseg.models.detection",
                  "medseg.models.mamba")

# appended to every child script: which heavy top-level packages ended up imported (JSON on the last stdout line)
REPORT = textwrap.dedent(
    """
    import json as _json, sys as _sys
    _heavy = sorted({m.split(".")[0] for m in _sys.modules} & set(HEAVY))
    _families = sorted(m for m in _sys.modules if m.startswith(FAMILY_MODULES))
    print(_json.dumps({"heavy": _heavy, "families": _families}))
    """
)


def _child(script: str, *args: str, cwd: Path | None = None, timeout: float = 180) -> dict:
    """Run `script` in a fresh interpreter; the sys.modules report it ends with."""
    prelude = f"HEAVY = {HEAVY!r}\nFAMILY_MODULES = {FAMILY_MODULES!r}\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script) + REPORT, *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exported(tiny_project, tmp_path_factory) -> Path:
    """A project with models/unet/model.onnx (trained, evaluated and exported here: torch is allowed in pytest)."""
    import torch

    from medseg.deployment.export import export_model
    from medseg.evaluation.evaluate import evaluate_model
    from medseg.training.trainer import train_model

    root = tmp_path_factory.mktemp("lean") / "project"
    shutil.copytree(tiny_project, root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.update(models=["unet"], model_options={"unet": {"base_channels": 4}})
    params["train"].update(max_steps_per_epoch=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_model(params, "unet", root)
        evaluate_model(params, "unet", root)
        export_model(params, "unet", root)
    finally:
        torch.set_num_threads(threads)
    assert paths(root).onnx("unet").is_file()
    return root


def _model(root: Path) -> Path:
    return paths(root).onnx("unet")


def _raw_nifti(root: Path) -> Path:
    """One raw phantom test volume (the file ingest read)."""
    cases = {c["id"]: c for c in read_json(paths(root).cases_json)["cases"]}
    case_id = read_json(paths(root).split_file)["test"][0]
    return root / "data" / "phantom" / cases[case_id]["source_image"]


def _output_for(out_dir: Path, raw: Path) -> Path:
    return out_dir / raw.name


# ------------------------------------------------------------------------------------------------ prediction path
def test_predict_api_imports_no_training_or_pipeline_package(exported, tmp_path):
    raw = _raw_nifti(exported)
    report = _child(
        """
        import sys
        import nibabel as nib
        import numpy as np
        from medseg.deployment.predict import load_predictor, predict_files

        predictor = load_predictor(sys.argv[1])
        image = nib.load(sys.argv[2])
        labels = predictor.predict_volume(np.asarray(image.dataobj), image.affine)
        assert labels.shape == image.shape, (labels.shape, image.shape)
        results = predict_files(predictor, [sys.argv[2]], sys.argv[3])
        assert len(results) == 1
        """,
        str(_model(exported)), str(raw), str(tmp_path / "out"),
    )
    assert report["heavy"] == [], f"the prediction path imported {report['heavy']}"
    assert report["families"] == [], f"the prediction path imported model code: {report['families']}"
    written = nib.load(_output_for(tmp_path / "out", raw))
    assert written.shape == nib.load(raw).shape


def test_medseg_predict_cli_imports_no_training_or_pipeline_package(exported, tmp_path):
    """`python -m medseg.cli predict` as the console script runs it (runpy, __main__), sys.modules checked after."""
    raw = _raw_nifti(exported)
    report = _child(
        """
        import runpy, sys
        sys.argv = ["medseg", "predict", "-m", sys.argv[1], "-i", sys.argv[2], "-o", sys.argv[3]]
        try:
            runpy.run_module("medseg.cli", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            assert not exc.code, f"medseg predict exited with {exc.code}"
        """,
        str(_model(exported)), str(raw), str(tmp_path / "out"), cwd=tmp_path,
    )
    assert report["heavy"] == [], f"medseg predict imported {report['heavy']}"
    written = nib.load(_output_for(tmp_path / "out", raw))
    assert written.shape == nib.load(raw).shape
    assert set(np.unique(np.asarray(written.dataobj))) <= set(range(256))


# ------------------------------------------------------------------------------------------------ lazy model families
@pytest.mark.parametrize(
    ("name", "family", "absent"),
    [
        # the brief's case: the plain UNet needs torch only
        ("unet", "medseg.models.unet", ("transformers", "timm", "segmentation_models_pytorch", "torchvision")),
        # a Mamba network: no smp, no transformers, no other family
        ("msvm_unet", "medseg.models.mamba", ("transformers", "segmentation_models_pytorch")),
        # Mask2Former's module is importable without transformers; only building it imports that
        ("mask2former_r50", "medseg.models.detection", ("transformers", "timm", "segmentation_models_pytorch")),
    ],
)
def test_looking_up_a_model_imports_only_its_family(name, family, absent):
    report = _child(
        f"""
        import sys
        import medseg.models
        assert "torch" not in sys.modules, "import medseg.models imported torch"
        from medseg.models import get_model_info, size_multiple_of

        info = get_model_info({name!r})
        assert info.name == {name!r}
        size_multiple_of({name!r}, (64, 64))
        if {name!r} == "unet":
            from medseg.models import build_model

            build_model("unet", 1, 2, (32, 32), base_channels=2)
        """
    )
    others = sorted(m for m in report["families"] if not m.startswith(family))
    assert others == [], f"looking up {name!r} imported {others}"
    assert any(m.startswith(family) for m in report["families"])
    loaded = sorted(set(absent) & set(report["heavy"]))
    assert loaded == [], f"looking up {name!r} imported {loaded}"


def test_unet_lookup_imports_neither_zoo_nor_mamba_nor_transformers():
    report = _child(
        """
        import sys
        from medseg.models import build_model, get_model_info

        get_model_info("unet")
        build_model("unet", 1, 2, (32, 32), base_channels=2)
        for name in ("transformers", "medseg.models.timm_models", "medseg.models.mamba", "medseg.models.mamba.networks",
                     "medseg.models.mamba.ss2d", "medseg.models.mamba.selective_scan"):
            assert name not in sys.modules, name
        """
    )
    assert report["families"] == ["medseg.models.unet"]


def test_family_table_is_what_the_modules_register():
    """Import every module under medseg.models (a new model module the table misses is caught too) and compare the
    names each registered with table._FAMILY_OF, name for name."""
    import medseg.models
    from medseg.models import available_models, table

    for module in pkgutil.walk_packages(medseg.models.__path__, "medseg.models."):
        importlib.import_module(module.name)
    registered = {name: module for name, module in table._REGISTERED_BY.items()
                  if module.startswith("medseg.models.")}
    assert registered == table._FAMILY_OF
    assert available_models() == sorted(table._FAMILY_OF)
    assert set(table.MODEL_MODULES) == set(table._FAMILY_OF.values())
    for name, info in table._REGISTRY.items():
        if name in table._FAMILY_OF:
            assert info.builder.__module__ == table._FAMILY_OF[name], name


def test_a_missing_extra_names_the_extra_to_install():
    from medseg.models import table

    exc = table._missing_extra(ModuleNotFoundError("No module named 'transformers'", name="transformers"), "m")
    assert "medseg[transformers]" in str(exc)
    exc = table._missing_extra(ModuleNotFoundError("No module named 'timm'", name="timm.layers"), "m")
    assert "medseg[train]" in str(exc)
    other = ModuleNotFoundError("No module named 'foo'", name="foo")
    assert table._missing_extra(other, "m") is other


# ------------------------------------------------------------------------------------------------ extras
def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _top_level(requirement: str) -> str:
    name = requirement
    for stop in "<>=!~;[ ":
        name = name.split(stop)[0]
    return name.strip().lower().replace("_", "-")


def test_base_dependencies_are_the_prediction_set_and_dev_installs_every_extra():
    project = _pyproject()["project"]
    base = {_top_level(r) for r in project["dependencies"]}
    assert base == {"numpy", "nibabel", "pillow", "onnxruntime", "pyyaml", "tqdm"}
    extras = project["optional-dependencies"]
    assert {"data", "train", "transformers", "pipeline", "all", "dev", "cuda"} <= set(extras)
    assert {"torch", "torchvision", "timm", "segmentation-models-pytorch", "onnx"} <= {
        _top_level(r) for r in extras["train"]}
    assert {_top_level(r) for r in extras["pipeline"]} == {"mlflow", "dvc", "prefect"}
    assert "medseg[data,train,transformers,pipeline,dicom]" in extras["all"]
    # DICOM series and SEG, NRRD/MHA: an extra of their own (a NIfTI deployment needs none of it)
    assert {"pydicom", "highdicom", "simpleitk"} <= {_top_level(r).lower() for r in extras["dicom"]}
    assert "medseg[all,nnunet]" in extras["dev"]
    # nnU-Net: nnunetv2 where it trains or is imported; a machine that only predicts with an imported model
    # needs nnU-Net's resampling (scipy, scikit-image), still no torch
    assert {_top_level(r) for r in extras["nnunet-predict"]} == {"scipy", "scikit-image"}
    assert "nnunetv2" in {_top_level(r) for r in extras["nnunet"]} and "medseg[train,nnunet-predict]" in extras["nnunet"]


# ------------------------------------------------------------------------------------------------ a real lean venv
NETWORK_ERRORS = ("Could not find a version", "No matching distribution", "ConnectionError", "Max retries",
                  "NewConnectionError", "Name or service not known", "Temporary failure in name resolution",
                  "Network is unreachable", "Read timed out", "ProxyError", "SSLError", "HTTPError")


def _pip(venv_python: Path, *args: str, timeout: float, env: dict) -> None:
    try:
        done = subprocess.run([str(venv_python), "-m", "pip", "install", "--no-input", *args],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip install {' '.join(args)} did not finish within {timeout:.0f} s (slow or no index)")
    if done.returncode:
        text = done.stdout + done.stderr
        if any(marker in text for marker in NETWORK_ERRORS):
            pytest.skip(f"pip could not reach a package index: {text.strip().splitlines()[-1]}")
        pytest.fail(f"pip install {' '.join(args)} failed:\n{text[-4000:]}")


@pytest.mark.slow
def test_prediction_only_venv_runs_medseg_predict(exported, tmp_path):
    """Base dependencies (read from pyproject.toml) + `pip install --no-deps` of a copy of the sources (so the build
    writes nothing into the working tree) in a venv without system site-packages: `medseg predict` works there."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, medseg = venv / "bin" / "python", venv / "bin" / "medseg"
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    env.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")

    base = _pyproject()["project"]["dependencies"]
    build = _pyproject()["build-system"]["requires"]
    _pip(python, *base, *build, timeout=150, env=env)

    source = tmp_path / "medseg-src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src" / "medseg", source / "src" / "medseg",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _pip(python, "--no-deps", "--no-build-isolation", str(source), timeout=120, env=env)

    # the venv really is lean: none of the extras' packages can be imported there
    probe = ("import importlib.util as u, json, sys; "
             f"print(json.dumps([m for m in {HEAVY!r} if u.find_spec(m)])); "
             "import medseg; print(medseg.__file__)")
    found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path,
                           check=True, timeout=60).stdout.splitlines()
    assert json.loads(found[0]) == [], f"the prediction-only venv has {found[0]}"
    assert str(venv) in found[1], f"medseg imported from {found[1]}, not the venv"

    raw = _raw_nifti(exported)
    out = tmp_path / "out"
    done = subprocess.run([str(medseg), "predict", "-m", str(_model(exported)), "-i", str(raw), "-o", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    written = nib.load(_output_for(out, raw))
    source_image = nib.load(raw)
    assert written.shape == source_image.shape
    assert np.allclose(written.affine, source_image.affine)
