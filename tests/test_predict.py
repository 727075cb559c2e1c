"""`medseg predict`: ONNX Runtime only (no torch), parity with evaluation, orientation, refusals, resume, TTA.

Two tiny models (a CNN and a Mamba UNet) are trained, evaluated and exported once for the module, so every test
runs a real model.onnx carrying its model card.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from medseg.cli import main
from medseg.deployment.predict import load_predictor, predict_files
from medseg.errors import ConfigError, PredictError
from medseg.io import read_json

from conftest import paths, seed_store, trained_project

# Small enough that training, evaluation and export of both take seconds on one CPU thread.
ARCHS = {
    "unet": {"base_channels": 4},
    "msvm_unet": {"depths": [1, 1, 1, 1], "dims": 8, "d_state": 1},
}


@pytest.fixture(scope="module")
def project(tiny_project, tmp_path_factory) -> Path:
    return trained_project(tiny_project, tmp_path_factory.mktemp("predict") / "project", ARCHS)[0]


def _model(root: Path, arch: str = "unet") -> Path:
    return paths(root).onnx(arch)


def _test_cases(root: Path) -> dict[str, Path]:
    """Test case id -> its raw phantom NIfTI (the file ingest read)."""
    cases = {c["id"]: c for c in read_json(paths(root).cases_json)["cases"]}
    test = read_json(paths(root).split_file)["test"]
    return {case_id: root / "data" / "phantom" / cases[case_id]["source_image"] for case_id in test}


def _raw_file(root: Path) -> Path:
    return next(iter(_test_cases(root).values()))


def _predict(*args: str) -> int:
    return main(["predict", *map(str, args)])


def _to_index(raw: np.ndarray, label_values: list[int]) -> np.ndarray:
    lut = np.full(max(label_values) + 1, 255, dtype=np.uint8)
    lut[label_values] = np.arange(len(label_values))
    return lut[raw]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_cli_labels_equal_evaluation_voxel_for_voxel_with_the_input_header(project, tmp_path, arch):
    from medseg.data.cases import load_case
    from medseg.inference.torch_backend import load_trained_model, predict_volume

    cases = _test_cases(project)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for raw in cases.values():
        shutil.copy2(raw, inputs / raw.name)
    assert _predict("-m", paths(project).model_dir(arch), "-i", inputs, "-o", tmp_path / "out") == 0

    model, meta = load_trained_model(paths(project).checkpoint(arch))
    label_values = meta.card["label_values"]
    for case_id, raw in cases.items():
        image, _label, _spacing = load_case(paths(project).ingested, case_id)
        expected = predict_volume(model, image, meta.image_size, meta.context).transpose(2, 1, 0)
        source, written = nib.load(raw), nib.load(tmp_path / "out" / raw.name)
        got = np.asarray(written.dataobj)
        assert got.dtype == np.uint8 and set(np.unique(got)) <= set(label_values)
        assert np.array_equal(_to_index(got, label_values), expected)
        assert len(np.unique(expected)) > 2  # an untrained net still predicts several classes: the check has teeth
        assert got.shape == source.shape
        assert np.array_equal(written.affine, source.affine)
        for key in ("qform_code", "sform_code", "pixdim", "quatern_b", "srow_x", "xyzt_units", "dim"):
            assert np.array_equal(written.header[key], source.header[key]), key
        assert written.header.get_zooms() == source.header.get_zooms()
        assert written.header.get_slope_inter() == (None, None)


def test_lps_volume_gives_the_same_labels_flipped_back(project, tmp_path):
    raw = _raw_file(project)
    source = nib.load(raw)
    data = np.asarray(source.dataobj)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]  # voxel (i, j, k) of the LPS file = (X-1-i, Y-1-j, k)
    lps_affine = source.affine @ flip
    lps = nib.Nifti1Image(data[::-1, ::-1].copy(), lps_affine)
    lps.set_qform(lps_affine, code=1)
    (tmp_path / "lps").mkdir()
    nib.save(lps, tmp_path / "lps" / raw.name)
    assert nib.aff2axcodes(lps_affine) == ("L", "P", "S")

    assert _predict("-m", _model(project), "-i", raw, "-o", tmp_path / "ras", "--labels", "index") == 0
    assert _predict("-m", _model(project), "-i", tmp_path / "lps", "-o", tmp_path / "out", "--labels", "index") == 0
    ras_labels = np.asarray(nib.load(tmp_path / "ras" / raw.name).dataobj)
    written = nib.load(tmp_path / "out" / raw.name)
    assert np.array_equal(np.asarray(written.dataobj), ras_labels[::-1, ::-1])
    assert np.allclose(written.affine, lps_affine) and nib.aff2axcodes(written.affine) == ("L", "P", "S")
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 2
    # the API gives the same, in the source voxel order
    predictor = load_predictor(_model(project))
    assert np.array_equal(predictor.predict_volume(data[::-1, ::-1], lps_affine, labels="index"), ras_labels[::-1, ::-1])


REFUSING = textwrap.dedent(
    """
    import sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "mlflow", "prefect", "dvc"}:
                raise ImportError(f"predict must not import {name}")
            return None

    sys.meta_path.insert(0, Refuse())
    from medseg.cli import main

    rc = main(["predict", "-m", sys.argv[1], "-i", sys.argv[2], "-o", sys.argv[3]])
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "mlflow", "prefect", "dvc"})
    sys.exit(rc or bool(heavy))
    """
)


def test_predict_runs_without_torch_mlflow_prefect_or_dvc(project, tmp_path):
    raw = _raw_file(project)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", REFUSING, str(_model(project)), str(raw), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / raw.name).is_file()


def _two_channels(path: Path, source) -> None:
    nib.save(nib.Nifti1Image(np.zeros((*source.shape, 2), np.int16), source.affine), path)


def _nan_voxel(path: Path, source) -> None:
    data = np.zeros(source.shape, dtype=np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, source.affine), path)


def _truncated(path: Path, source) -> None:
    blob = Path(source.get_filename()).read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


def _png(path: Path, source) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)


@pytest.mark.parametrize(
    "name, write, message",
    [
        ("z.nii.gz", _two_channels, "has 2 channel.*expects 1"),
        ("z.nii.gz", _nan_voxel, "1 NaN"),
        ("z.nii.gz", _truncated, "cannot read NIfTI"),
        ("z.png", _png, "is a 2D image, but .* segments 3D NIfTI volumes"),
    ],
)
def test_bad_inputs_are_refused_before_any_output(project, tmp_path, capsys, name, write, message):
    """The bad case sorts last: the good one before it must not be written either."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy2(_raw_file(project), folder / "a_good.nii.gz")
    write(folder / name, nib.load(_raw_file(project)))
    with pytest.raises(PredictError, match=message) as info:
        predict_files(load_predictor(_model(project)), folder, tmp_path / "out")
    assert info.value.path == str(folder / name)
    assert not (tmp_path / "out").exists()
    assert _predict("-m", _model(project), "-i", folder, "-o", tmp_path / "out") == 2
    assert str(folder / name) in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_outputs_on_or_inside_an_input_are_refused(project, tmp_path):
    predictor = load_predictor(_model(project))
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy2(_raw_file(project), inputs / "case.nii.gz")
    before = sorted(inputs.rglob("*"))
    for output in (inputs, inputs / "pred"):
        with pytest.raises(PredictError, match="inside the input folder"):
            predict_files(predictor, inputs, output)
    with pytest.raises(PredictError, match="overwrite an input"):  # a single file into its own folder
        predict_files(predictor, inputs / "case.nii.gz", inputs)
    with pytest.raises(PredictError, match="output folder is a file"):
        predict_files(predictor, inputs, inputs / "case.nii.gz")
    assert sorted(inputs.rglob("*")) == before


def test_continue_skips_finished_cases_and_makes_the_missing_ones(project, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for raw in _test_cases(project).values():
        shutil.copy2(raw, inputs / raw.name)
    first, second = sorted(p.name for p in inputs.iterdir())
    out = tmp_path / "out"
    predictor = load_predictor(_model(project))
    predict_files(predictor, inputs, out)
    kept = (out / first).stat()
    (out / second).unlink()
    assert _predict("-m", _model(project), "-i", inputs, "-o", out, "--continue") == 0
    assert (out / first).stat().st_mtime_ns == kept.st_mtime_ns and (out / first).stat().st_ino == kept.st_ino
    results = predict_files(predictor, inputs, out, resume=True)
    assert [r["skipped"] for r in results] == [True, True]
    (out / second).unlink()
    results = predict_files(predictor, inputs, out, resume=True)
    assert [r["skipped"] for r in results] == [True, False]
    assert (out / first).stat().st_mtime_ns == kept.st_mtime_ns and (out / first).stat().st_ino == kept.st_ino
    assert (out / second).is_file()
    assert sum(results[1]["voxels"].values()) == int(np.prod(nib.load(inputs / second).shape))
    predict_files(predictor, inputs, out)  # without resume: replaced (atomically: a new file)
    assert (out / first).stat().st_ino != kept.st_ino
    assert sorted(p.name for p in out.iterdir()) == [first, second]  # no temp files left


@pytest.mark.parametrize("tta", [False, True])
def test_probabilities_sum_to_one_in_the_source_shape(project, tmp_path, tta):
    raw = _raw_file(project)
    predictor = load_predictor(_model(project, "msvm_unet"))
    predict_files(predictor, raw, tmp_path, labels="index", save_probabilities=True, tta=tta)
    name = raw.name.removesuffix(".nii.gz")
    card = predictor.card
    with np.load(tmp_path / f"{name}.npz") as saved:
        probs, class_names = saved["probabilities"], list(saved["class_names"])
    labels = np.asarray(nib.load(tmp_path / raw.name).dataobj)
    assert class_names == card.class_names
    assert probs.shape == (card.num_classes, *nib.load(raw).shape) and probs.dtype == np.float16
    assert np.allclose(probs.astype(np.float32).sum(axis=0), 1.0, atol=1e-2)
    assert np.mean(probs.argmax(axis=0) == labels) > 0.99  # float16 rounding may break near-ties
    if tta:
        plain = predictor.predict_volume(np.asarray(nib.load(raw).dataobj), nib.load(raw).affine, labels="index")
        assert plain.shape == labels.shape and not np.array_equal(plain, labels)  # the mirrors changed something


def test_2d_model_segments_images_as_evaluation_does(project, tmp_path):
    """The unet's graph with a card that says image2d (greyscale, /255): PNG in, PNG of raw label values out."""
    from PIL import Image

    from medseg.deployment.card import ModelCard
    from medseg.deployment.export import write_card_metadata
    from medseg.inference.torch_backend import load_trained_model, predict_volume

    onnx_2d = tmp_path / "model2d.onnx"
    shutil.copy2(_model(project), onnx_2d)
    card = load_predictor(onnx_2d).card
    values = [0, 10, 20, 30, 40, 50, 60, 70, 80]
    write_card_metadata(onnx_2d, ModelCard.from_dict({**card.to_dict(), "input_kind": "image2d", "modality": "mr",
                                                     "normalisation": {"method": "divide_255"}, "spacing": None,
                                                     "label_values": values}))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 56), dtype=np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(image).save(tmp_path / "in" / "slice.jpg", quality=100)
    Image.fromarray(np.stack([image] * 3, axis=-1)).save(tmp_path / "in" / "grey_as_rgb.png")
    assert _predict("-m", onnx_2d, "-i", tmp_path / "in", "-o", tmp_path / "out") == 0

    model, meta = load_trained_model(paths(project).checkpoint("unet"))
    expected = {}
    for name in ("slice.jpg", "grey_as_rgb.png"):
        pixels = np.asarray(Image.open(tmp_path / "in" / name).convert("L"), dtype=np.float32)
        expected[name] = np.asarray(values)[predict_volume(model, pixels[None, None] / 255, meta.image_size)[0]]
    for name, out in (("slice.jpg", "slice.png"), ("grey_as_rgb.png", "grey_as_rgb.png")):
        written = np.asarray(Image.open(tmp_path / "out" / out))
        assert written.dtype == np.uint8 and np.array_equal(written, expected[name])
    assert np.array_equal(load_predictor(onnx_2d).predict_image(image), expected["grey_as_rgb.png"])

    colour = image[..., None] + np.array([0, 1, 2], dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(PredictError, match="has 3 channel"):
        predict_files(load_predictor(onnx_2d), tmp_path / "colour.png", tmp_path / "out2")
    with pytest.raises(PredictError, match="is a 3D volume, but .* segments 2D images"):
        predict_files(load_predictor(onnx_2d), _raw_file(project), tmp_path / "out2")


def test_far_spacing_and_intensity_are_warned_once_per_case(project, tmp_path, caplog):
    source = nib.load(_raw_file(project))
    affine = source.affine @ np.diag([3.0, 3.0, 1.0, 1.0])
    odd = np.asarray(source.dataobj).astype(np.int16) + 2000  # not CT any more
    nib.save(nib.Nifti1Image(odd, affine), tmp_path / "odd.nii.gz")
    with caplog.at_level("WARNING", logger="medseg.deployment.predict"):
        predict_files(load_predictor(_model(project)), tmp_path / "odd.nii.gz", tmp_path / "out")
    (record,) = [r for r in caplog.records if r.name == "medseg.deployment.predict"]
    assert "odd: voxel spacing" in record.getMessage() and "median intensity" in record.getMessage()


def test_registered_model_predicts_from_models_uri(project, tmp_path, mlflow_db_template, monkeypatch):
    from medseg.tracking.registry import register_model_version

    root = tmp_path / "store"
    seed_store(root, mlflow_db_template)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's default store would be ./mlflow.db
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["register"]["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    shutil.copytree(paths(project).model_dir("unet"), paths(root).model_dir("unet"))
    shutil.copytree(paths(project).reports_dir("unet"), paths(root).reports_dir("unet"))
    record = register_model_version(params, "unet", root)
    raw = _raw_file(project)
    assert _predict("-m", f"models:/{record['model_name']}@challenger", "-i", raw, "-o", tmp_path / "out",
                    "--tracking-uri", params["register"]["tracking_uri"]) == 0
    assert _predict("-m", _model(project), "-i", raw, "-o", tmp_path / "local") == 0
    assert np.array_equal(nib.load(tmp_path / "out" / raw.name).get_fdata(), nib.load(tmp_path / "local" / raw.name).get_fdata())
    assert not (tmp_path / "mlflow.db").exists()  # the version was looked up in the store named, not the default


def test_cuda_without_its_provider_is_a_clear_error(project):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ConfigError, match="no CUDAExecutionProvider"):
        load_predictor(_model(project), "cuda")


def test_channel_files_of_a_case_are_grouped_in_channel_order(project, tmp_path):
    """nnU-Net naming for a two-channel model (planning only: the tiny models are single-channel)."""
    from dataclasses import replace

    from medseg.deployment.predict import Predictor, plan_cases

    card = load_predictor(_model(project)).card
    predictor = Predictor(None, replace(card, image_channels=2), "two-channel model")
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("b_0001.nii.gz", "b_0000.nii.gz", "a_0000.nii", "a_0001.nii", "four_d.nii.gz"):
        (folder / name).touch()
    cases = plan_cases(predictor, folder, tmp_path / "out", save_probabilities=True)
    assert [(c.name, [p.name for p in c.inputs], c.labels.name, c.probabilities.name) for c in cases] == [
        ("a", ["a_0000.nii", "a_0001.nii"], "a.nii", "a.npz"),
        ("b", ["b_0000.nii.gz", "b_0001.nii.gz"], "b.nii.gz", "b.npz"),
        ("four_d", ["four_d.nii.gz"], "four_d.nii.gz", "four_d.npz"),  # one 4D file, channels last
    ]
    (folder / "c_0001.nii.gz").touch()
    with pytest.raises(PredictError, match=r"c: channel files \['c_0001.nii.gz'\] are not c_0000 .. c_0001"):
        plan_cases(predictor, folder, tmp_path / "out")


def test_single_channel_outputs_drop_nnunets_channel_suffix(project, tmp_path):
    """nnU-Net names a prediction after the case: imagesTs/organ_000_0000.nii.gz -> organ_000.nii.gz. Other
    trailing numbers are part of the name; two inputs that would give one output name are refused."""
    from medseg.deployment.predict import plan_cases

    predictor = load_predictor(_model(project))
    assert predictor.card.image_channels == 1
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("organ_000_0000.nii.gz", "scan_2023.nii.gz", "organ_001_0001.nii.gz"):
        (folder / name).touch()
    cases = plan_cases(predictor, folder, tmp_path / "out")
    assert sorted(c.labels.name for c in cases) == ["organ_000.nii.gz", "organ_001_0001.nii.gz", "scan_2023.nii.gz"]
    (folder / "organ_000.nii.gz").touch()
    with pytest.raises(PredictError, match="would be written for both"):
        plan_cases(predictor, folder, tmp_path / "out")
