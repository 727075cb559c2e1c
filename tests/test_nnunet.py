"""nnU-Net v2 beside medseg: the dataset and medseg's split written in nnU-Net's raw layout, read by nnunetv2 itself."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import paths, snapshot


def needs_nnunetv2() -> None:
    """Skip without the optional [nnunet] extra, except where the extras are required (CI installs `.[dev]`)."""
    import os

    if os.environ.get("MEDSEG_REQUIRE_EXTRAS"):
        import nnunetv2  # noqa: F401 - an ImportError fails the test
    else:
        pytest.importorskip("nnunetv2", reason="nnunetv2 is the optional [nnunet] extra")


@pytest.fixture()
def written(project_copy, tiny_params):
    from medseg.nnunet.dataset import write_nnunet_raw

    raw_before = snapshot(project_copy / "data" / "phantom")
    folder = write_nnunet_raw(tiny_params, project_copy, dataset_id=901)
    assert snapshot(project_copy / "data" / "phantom") == raw_before  # the raw dataset is only read
    return project_copy, tiny_params, folder


def test_the_raw_layout_holds_the_development_cases_and_the_test_cases_apart(written):
    root, params, folder = written
    split = json.loads(paths(root).split_file.read_text())
    assert folder == root / "data" / "nnunet" / "raw" / "Dataset901_phantom"
    development = sorted(split["train"] + split["val"])
    assert sorted(p.name[: -len("_0000.nii.gz")] for p in (folder / "imagesTr").iterdir()) == development
    assert sorted(p.name[: -len(".nii.gz")] for p in (folder / "labelsTr").iterdir()) == development
    assert sorted(p.name[: -len("_0000.nii.gz")] for p in (folder / "imagesTs").iterdir()) == sorted(split["test"])
    meta = json.loads((folder / "dataset.json").read_text())
    cases = json.loads((paths(root).cases_json).read_text())
    assert meta["labels"] == {"background": 0, **{n: i for i, n in enumerate(cases["class_names"]) if i}}
    assert meta["numTraining"] == len(development) and meta["file_ending"] == ".nii.gz"
    assert meta["channel_names"] == {"0": "CT"}  # the phantom is CT: nnU-Net's CT normalisation


def test_splits_final_is_medsegs_split_and_its_folds(written):
    root, _, folder = written
    split = json.loads(paths(root).split_file.read_text())
    splits = json.loads((folder / "splits_final.json").read_text())
    assert splits[0] == {"train": sorted(split["train"]), "val": sorted(split["val"])}
    assert len(splits) == 1 + len(split["folds"]) == 3
    for k, fold in enumerate(split["folds"]):
        assert splits[1 + k] == {"train": sorted(fold["train"]), "val": sorted(fold["val"])}
    test = set(split["test"])
    assert not any(test & set(s["train"] + s["val"]) for s in splits)


def test_volumes_are_the_raw_intensities_with_the_scans_geometry_and_class_index_labels(written):
    from medseg.data.cases import load_case

    root, _, folder = written
    cases = json.loads(paths(root).cases_json.read_text())
    case = next(c for c in cases["cases"] if (folder / "labelsTr" / f"{c['id']}.nii.gz").is_file())
    image = nib.load(folder / "imagesTr" / f"{case['id']}_0000.nii.gz")
    label = nib.load(folder / "labelsTr" / f"{case['id']}.nii.gz")
    _, ingested_label, spacing = load_case(paths(root).ingested, case["id"])
    np.testing.assert_array_equal(np.asarray(label.dataobj).transpose(2, 1, 0), ingested_label)
    assert np.asarray(label.dataobj).dtype == np.uint8
    np.testing.assert_allclose(image.header.get_zooms()[::-1], spacing)
    np.testing.assert_allclose(image.affine, np.asarray(case["affine"]))
    source = nib.load(root / "data" / "phantom" / case["source_image"])  # RAS already: the same voxels, unscaled
    np.testing.assert_allclose(np.asarray(image.dataobj), np.asarray(source.dataobj))


def test_a_rerun_replaces_its_own_folder_and_never_a_folder_it_did_not_write(written):
    from medseg.errors import OutputConflictError
    from medseg.nnunet.dataset import write_nnunet_raw

    root, params, folder = written
    (folder / "stale.txt").write_text("from an earlier run")
    write_nnunet_raw(params, root, dataset_id=901)
    assert not (folder / "stale.txt").exists()
    foreign = paths(root).nnunet_raw / "Dataset902_phantom"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("a user's nnU-Net dataset")
    with pytest.raises(OutputConflictError):
        write_nnunet_raw(params, root, dataset_id=902)
    assert (foreign / "mine.txt").read_text() == "a user's nnU-Net dataset"


def test_a_bad_dataset_id_or_a_missing_split_is_named(project_copy, tiny_params):
    from medseg.errors import ConfigError
    from medseg.nnunet.dataset import write_nnunet_raw

    with pytest.raises(ConfigError, match="nnU-Net dataset id 1000 must be 1..999"):
        write_nnunet_raw(tiny_params, project_copy, dataset_id=1000)
    paths(project_copy).split_file.unlink()
    with pytest.raises(ConfigError, match=r"phantom\.json: not found; run the split stage first"):
        write_nnunet_raw(tiny_params, project_copy)


def test_nnunetv2s_integrity_check_accepts_the_dataset(written, tmp_path, monkeypatch):
    """nnU-Net's own integrity check reads the folder (training below plans and trains on it)."""
    needs_nnunetv2()
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    _, _, folder = written
    verify_dataset_integrity(str(folder), num_processes=1)


# ------------------------------------------------------------------ nnunetv2 itself: train, import, predict parity

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "totalseg_example"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_params):
    """nnU-Net trained on a phantom through medseg (2 epochs x 3 iterations), imported to model.onnx. The phantom's
    4.5 mm pixels make the real 3 mm scans below go through nnU-Net's resampling both ways."""
    needs_nnunetv2()
    from medseg.data.ingest import ingest_from_params
    from medseg.data.phantom import generate_from_params
    from medseg.data.split import split_from_params
    from medseg.nnunet.convert import import_nnunet_model
    from medseg.nnunet.dataset import write_nnunet_raw
    from medseg.nnunet.train import NnunetFolders, train_nnunet

    root = tmp_path_factory.mktemp("nnunet") / "project"
    root.mkdir()
    params = copy.deepcopy(tiny_params)
    params["phantom"].update(spacing=[4.5, 4.5, 3.0])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    generate_from_params(params, root)
    ingest_from_params(params, root)
    split_from_params(params, root)
    dataset = write_nnunet_raw(params, root, dataset_id=901)
    nn = root / "data" / "nnunet"
    folders = NnunetFolders(nn / "raw", nn / "preprocessed", nn / "results")
    results = train_nnunet(dataset, folders, 901, "nnunet_2d", fold=0, epochs=2, iterations=3, val_iterations=2,
                           device="cpu", threads=2, log_file=root / "reports" / "nnunet_2d" / "nnunet.log")
    summary = import_nnunet_model(results, root / "models" / "nnunet_2d", folds=["0"])
    return root, params, dataset, results, summary


def _nnunetv2_predict(results: Path, files: list[Path], out: Path, mirror: bool) -> dict[str, np.ndarray]:
    """nnunetv2's own predictor on these files (in a child process: nnunetv2 reads its folders at import)."""
    import subprocess
    import sys

    out.mkdir(parents=True, exist_ok=True)
    code = f"""
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
torch.set_num_threads(2)
p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring={mirror}, perform_everything_on_device=False,
                    device=torch.device('cpu'), verbose=False, verbose_preprocessing=False, allow_tqdm=False)
p.initialize_from_trained_model_folder({str(results)!r}, use_folds=(0,), checkpoint_name='checkpoint_final.pth')
p.predict_from_files_sequential({[[str(f)] for f in files]!r}, {str(out)!r}, save_probabilities=False,
                                overwrite=True)
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return {f.name: np.asarray(nib.load(out / f.name.replace("_0000", "")).dataobj) for f in files}


def _dice_per_class(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    scores = {}
    for c in np.union1d(np.unique(a), np.unique(b)):
        if c == 0:
            continue
        both = np.logical_and(a == c, b == c).sum()
        scores[int(c)] = 2 * both / ((a == c).sum() + (b == c).sum())
    return scores


@pytest.mark.parametrize("mirror", [True, False], ids=["mirroring", "no-mirroring"])
def test_medseg_predict_reproduces_nnunetv2_predict_without_torch(trained, tmp_path, mirror):
    import subprocess
    import sys

    root, _, dataset, results, _ = trained
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for f in sorted((dataset / "imagesTs").glob("*_0000.nii.gz")):
        shutil.copy(f, inputs / f.name)
    if REAL.is_dir():  # a RAS CT and an LPS MR at 3 mm: nnU-Net reads both in their own voxel order and resamples
        shutil.copy(REAL / "ct_sm.nii.gz", inputs / "ct_sm_0000.nii.gz")
        shutil.copy(REAL / "mr_sm.nii.gz", inputs / "mr_sm_0000.nii.gz")
    files = sorted(inputs.glob("*_0000.nii.gz"))
    theirs = _nnunetv2_predict(results, files, tmp_path / "nnunetv2", mirror)
    # medseg predict in a process that must not import torch (the deployment install has none)
    code = ("import sys, builtins; real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name == 'torch' or name.startswith('torch.'): raise ImportError('torch imported by predict')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "from medseg.cli import main; sys.exit(main(sys.argv[1:]))")
    ours_dir = tmp_path / "medseg"
    subprocess.run([sys.executable, "-c", code, "predict", "-m", str(root / "models" / "nnunet_2d"),
                    "-i", str(inputs), "-o", str(ours_dir), "--labels", "index", "--tta" if mirror else "--no-tta"],
                   check=True, capture_output=True)
    assert len(theirs) == len(files) >= 2
    for f in files:
        ours = np.asarray(nib.load(ours_dir / f.name.replace("_0000", "")).dataobj)
        assert ours.shape == theirs[f.name].shape
        agreement = float((ours == theirs[f.name]).mean())
        assert agreement >= 0.999, f"{f.name}: {agreement:.5f} of voxels agree"
        assert all(d >= 0.99 for d in _dice_per_class(ours, theirs[f.name]).values()), f.name


def test_the_imported_card_carries_nnunets_recipe_and_medsegs_classes(trained):
    from medseg.deployment.card import card_from_onnx

    root, params, dataset, results, summary = trained
    card = card_from_onnx(root / "models" / "nnunet_2d" / "model.onnx")
    plans = json.loads((results / "plans.json").read_text())
    config = plans["configurations"]["2d"]
    assert card.nnunet["patch_size"] == config["patch_size"] == card.image_size
    assert card.nnunet["spacing"] == pytest.approx(config["spacing"])
    assert card.nnunet["normalization_schemes"] == ["CTNormalization"]
    assert card.nnunet["intensity_properties"][0]["percentile_99_5"] == pytest.approx(
        plans["foreground_intensity_properties_per_channel"]["0"]["percentile_99_5"])
    assert card.nnunet["mirror_axes"] == [0, 1] and card.nnunet["tile_step_size"] == 0.5
    cases = json.loads(paths(root).cases_json.read_text())
    assert card.class_names == cases["class_names"]
    meta = json.loads((dataset / "dataset.json").read_text())
    assert card.label_values == meta["medseg"]["label_values"] and card.label_values != list(range(9))
    assert card.split["test_cases_sha256"] == meta["medseg"]["test_cases_sha256"]
    assert card.orientation == "native" and card.schema == 2 and summary["folds"] == ["0"]


def test_an_older_medseg_refuses_an_nnunet_card_instead_of_running_it_wrong(trained):
    from medseg.deployment.card import CardError, ModelCard, card_from_onnx

    card = card_from_onnx(trained[0] / "models" / "nnunet_2d" / "model.onnx").to_dict()
    with pytest.raises(CardError, match="must be schema 2"):
        ModelCard.from_dict({**card, "schema": 1}, "m.onnx")
    with pytest.raises(CardError, match="normalisation method 'nnunet'"):
        ModelCard.from_dict({**card, "orientation": "RAS"}, "m.onnx")


def _copy_results(results: Path, dst: Path) -> Path:
    target = dst / results.name
    shutil.copytree(results, target)
    return target


@pytest.mark.parametrize("damage,message", [
    (lambda r: (r / "plans.json").unlink(), r"plans\.json: not found"),
    (lambda r: (r / "dataset.json").write_text("{not json"), r"dataset\.json: cannot read it as JSON"),
    (lambda r: (r / "fold_0" / "checkpoint_final.pth").unlink(), r"no fold_<k>/checkpoint_final\.pth"),
    (lambda r: (r / "fold_0" / "checkpoint_final.pth").write_bytes(b"PK\x03\x04 truncated"),
     r"checkpoint_final\.pth: cannot read it as an nnU-Net checkpoint"),
])
def test_an_incomplete_or_corrupt_results_folder_is_named(trained, tmp_path, damage, message):
    from medseg.nnunet.convert import import_nnunet_model
    from medseg.nnunet.results import NnunetResultsError

    results = _copy_results(trained[3], tmp_path)
    damage(results)
    with pytest.raises(NnunetResultsError, match=message):
        import_nnunet_model(results, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_3d_configuration_is_refused_clearly_for_now(trained, tmp_path):
    from medseg.nnunet.results import NnunetResultsError, read_results

    results = _copy_results(trained[3], tmp_path)
    plans = json.loads((results / "plans.json").read_text())
    plans["configurations"]["3d_fullres"] = {**plans["configurations"]["2d"], "patch_size": [8, 48, 48]}
    full = results.with_name(results.name.replace("__2d", "__3d_fullres"))
    results.rename(full)
    (full / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(NnunetResultsError, match=r"is a 3D network .* medseg imports 2D nnU-Net models"):
        read_results(full)
    with pytest.raises(NnunetResultsError, match=r"fold_7/checkpoint_final\.pth: not found"):
        read_results(_copy_results(trained[3], tmp_path / "again"), ["7"])


def test_the_cli_writes_the_dataset_and_says_what_nnunet_runs_next(project_copy, capsys):
    from medseg.cli import main

    assert main(["--root", str(project_copy), "nnunet", "dataset", "--id", "903"]) == 0
    out = capsys.readouterr().out
    assert (project_copy / "data" / "nnunet" / "raw" / "Dataset903_phantom" / "splits_final.json").is_file()
    assert "nnUNetv2_plan_and_preprocess -d 903 -c 2d" in out and "nnUNetv2_train 903 2d 0" in out
    assert "medseg nnunet import" in out and "medseg nnunet adopt" in out


def test_a_model_trained_elsewhere_is_adopted_then_evaluated_exported_registered_and_reported(
        trained, tmp_path, mlflow_db_template, monkeypatch, capsys):
    """What a GPU user does with an nnU-Net trained on `medseg nnunet dataset`'s folder: no retraining here."""
    from conftest import seed_store

    from medseg.cli import main

    root, params, _, results, _ = trained
    project = tmp_path / "project"
    shutil.copytree(root, project, ignore=shutil.ignore_patterns("nnunet"))  # not the data/nnunet work folders
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    seed_store(project, mlflow_db_template)
    args = ["--root", str(project)]
    assert main([*args, "nnunet", "adopt", str(results)]) == 0
    adopted = json.loads(capsys.readouterr().out)
    assert adopted["arch"] == "nnunet_2d" and adopted["epochs"] == 2 and adopted["steps"] is None
    layout = paths(project)
    assert layout.checkpoint("nnunet_2d").is_file() and layout.last_checkpoint("nnunet_2d").is_file()
    for stage in ("evaluate", "export", "register"):
        assert main([*args, stage, "nnunet_2d"]) == 0, stage
    metrics = json.loads(layout.metrics("nnunet_2d").read_text())
    split = json.loads(layout.split_file.read_text())
    assert metrics["num_cases"] == len(split["test"]) and set(metrics["per_class"]) == set(params["dataset"]["class_names"][1:])
    assert json.loads(layout.export_report("nnunet_2d").read_text())["parity_passed"] is True
    record = json.loads(layout.registry_record("nnunet_2d").read_text())
    assert record["model_name"].endswith("nnunet_2d")

    # served by the registered pyfunc exactly as `medseg predict` writes it, and promotable
    import base64

    import mlflow.pyfunc

    from medseg.tracking.store import mlflow_store

    scan = sorted((project / "data" / "phantom" / "img").glob("*.nii.gz"))[0]
    with mlflow_store(record["tracking_uri"]):
        served = mlflow.pyfunc.load_model(f"models:/{record['model_name']}@challenger")
    answer = served.predict({"nifti_base64": base64.b64encode(scan.read_bytes()).decode("ascii")})
    assert main(["predict", "-m", str(layout.model_dir("nnunet_2d")), "-i", str(scan), "-o", str(tmp_path / "out")]) == 0
    assert base64.b64decode(answer["mask_nifti_base64"]) == (tmp_path / "out" / scan.name).read_bytes()
    capsys.readouterr()
    assert main([*args, "promote", record["model_name"]]) == 0

    # the split changed since: its test patients may be in nnU-Net's training set, so it is not scored
    split["val"], split["test"] = split["test"], split["val"]
    layout.split_file.write_text(json.dumps(split))
    assert main([*args, "evaluate", "nnunet_2d"]) == 2
    assert "trained on split" in capsys.readouterr().err
    # nor adopted
    from medseg.errors import MedsegError
    from medseg.nnunet.train import adopt_nnunet_results

    with pytest.raises(MedsegError, match=r"dataset\.json: trained on split .* may include this split's test"):
        adopt_nnunet_results(params, "nnunet_2d", results, root=project)
    foreign = _copy_results(results, tmp_path / "foreign")
    dataset_json = json.loads((foreign / "dataset.json").read_text())
    del dataset_json["medseg"]
    (foreign / "dataset.json").write_text(json.dumps(dataset_json))
    with pytest.raises(MedsegError, match=r"records no medseg split .* nothing proves the test patients"):
        adopt_nnunet_results(params, "nnunet_2d", foreign, root=project)
