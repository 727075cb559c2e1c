"""medseg doctor: every problem listed (not just the first), same messages as ingest, exit code, table."""

from __future__ import annotations

import numpy as np
from test_ingest import make_acdc, make_kvasir, make_synapse, synapse_params, volume_pair, write_nifti

from medseg.data.doctor import Problem, check_dataset, run_doctor
from medseg.data.ingest import ingest_dataset
from medseg.errors import IngestError


def _broken_synapse(tmp_path):
    """Four cases, three broken in different ways, one image without a label."""
    raw = make_synapse(tmp_path / "raw", n=4)
    write_nifti(raw / "label" / "label0002.nii.gz", np.zeros((12, 10, 5), np.uint8))  # shape mismatch
    image = volume_pair(3)[0].astype(np.float32)
    image[0, 0, 0] = np.nan
    write_nifti(raw / "img" / "img0003.nii.gz", image)  # NaN
    label = volume_pair(4)[1].astype(np.float32)
    label[1, 1, 1] = 2.5
    write_nifti(raw / "label" / "label0004.nii.gz", label)  # non-integer
    write_nifti(raw / "img" / "img0005.nii.gz", volume_pair(5)[0])  # no label
    return raw


def test_lists_every_problem_with_the_ingest_messages(tmp_path):
    raw = _broken_synapse(tmp_path)
    problems = check_dataset(synapse_params(), raw)
    errors = {p.file.split("raw/")[-1]: p.problem for p in problems if p.severity == "error"}
    expected = {
        "img/img0005.nii.gz": "image has no matching label file",
        "label/label0002.nii.gz": "shape (5, 10, 12) != image (4, 10, 12)",
        "img/img0003.nii.gz": "contains 1 NaN and 0 Inf voxels",
        "label/label0004.nii.gz": "label volume has 1 non-integer values (e.g. 2.5)",
    }
    assert errors == expected
    # Ingest stops at the first of these, with the same wording: one implementation of each check.
    try:
        ingest_dataset(synapse_params(), raw, tmp_path / "out")
    except IngestError as exc:
        assert Problem(exc.path, exc.problem) in problems
    else:
        raise AssertionError("ingest accepted a broken dataset")


def test_clean_dataset_exits_zero_and_broken_exits_one(tmp_path, capsys):
    raw = make_synapse(tmp_path / "data/raw/syn", n=2)
    # a training budget big enough for the data (the default 150 epochs of one step each would be warned about)
    params = {"dataset": {**synapse_params(), "raw_dir": "data/raw/syn"}, "train": {"epochs": 300}}
    assert check_dataset(params["dataset"], raw) == []
    assert run_doctor(params, tmp_path) == 0
    assert "2 cases checked: 0 error(s), 0 warning(s) - ready to ingest" in capsys.readouterr().out

    broken = _broken_synapse(tmp_path / "other")
    assert run_doctor(params, tmp_path, raw_dir=broken) == 1
    out = capsys.readouterr().out
    assert "medseg doctor" in out and "img0005.nii.gz" in out and "NaN" in out
    assert "4 cases checked: 4 error(s)" in out


def test_format_override_and_config_problems(tmp_path, capsys):
    raw = make_acdc(tmp_path / "ACDC", patients=(1,))
    params = {"dataset": {"name": "acdc", "format": "synapse", "modality": "mr", "class_names": ["background", "rv", "myo", "lv"]}}
    assert run_doctor(params, tmp_path, raw_dir=raw, fmt="synapse") == 1  # not a Synapse layout
    assert "Synapse layout needs" in capsys.readouterr().out
    assert run_doctor(params, tmp_path, raw_dir=raw, fmt="acdc") == 0
    assert run_doctor(params, tmp_path, raw_dir=raw) == 0  # a folder that is not params' raw_dir: layout detected
    assert "dataset described by the acdc layout's conventions: acdc" in capsys.readouterr().out
    problems = check_dataset({**params["dataset"], "format": "analyze"}, raw)
    assert [p.severity for p in problems] == ["error"] and "dataset.format" in problems[0].problem


def test_warnings_do_not_fail(tmp_path):
    raw = make_synapse(tmp_path / "raw", n=3)
    write_nifti(raw / "label" / "label0002.nii.gz", np.zeros((12, 10, 4), np.uint8))  # no foreground
    # A case whose spacing is far from the others, and mixed orientations.
    flipped = np.diag([-0.8, 0.9, 10.0, 1.0])
    write_nifti(raw / "img" / "img0001.nii.gz", volume_pair(1)[0], spacing=(0.8, 0.9, 10.0), affine=flipped)
    write_nifti(raw / "label" / "label0001.nii.gz", volume_pair(1)[1], spacing=(0.8, 0.9, 10.0), affine=flipped)
    problems = check_dataset(synapse_params(), raw)
    assert all(p.severity == "warning" for p in problems), problems
    text = " | ".join(p.problem for p in problems)
    assert "no foreground" in text and "mixed volume orientations" in text and "far from the median" in text


def test_folder2d_problems_all_reported(tmp_path):
    from PIL import Image

    raw = make_kvasir(tmp_path / "kvasir", stems=("a", "b"))
    Image.fromarray(np.zeros((10, 14, 3), np.uint8)).save(raw / "images" / "c.jpg")  # no mask
    Image.fromarray(np.zeros((10, 14), np.uint8)).save(raw / "masks" / "d.png")  # no image
    colour = np.zeros((10, 14, 3), np.uint8)
    colour[0, 0] = (0, 255, 0)
    Image.fromarray(colour).save(raw / "masks" / "b.png")
    params = {"name": "k", "format": "folder2d", "modality": "rgb", "class_names": ["background", "polyp"]}
    files = sorted(p.file.rsplit("/", 1)[-1] for p in check_dataset(params, raw) if p.severity == "error")
    assert files == ["b.png", "c.jpg", "d.png"]


def _brats_like(root):
    """An MSD dataset that describes itself: 4 classes and 4 MR channels in its dataset.json."""
    import json

    root.mkdir(parents=True)
    labels = {"0": "background", "1": "edema", "2": "non-enhancing tumour", "3": "enhancing tumour"}
    meta = {"name": "BrainTumour", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}, "labels": labels}
    (root / "dataset.json").write_text(json.dumps(meta))
    for k, case in enumerate(("BRATS_001", "BRATS_002")):
        rng = np.random.default_rng(k)
        write_nifti(root / "imagesTr" / f"{case}.nii.gz", rng.normal(100, 30, size=(8, 6, 3, 4)).astype(np.float32))
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", rng.integers(0, 4, size=(8, 6, 3)).astype(np.uint8))
    return root


def test_raw_dir_elsewhere_is_described_by_its_own_dataset_json(tmp_path, capsys):
    # Regression: params.yaml still describes another dataset; doctor used its classes (and modality) for D.
    raw = _brats_like(tmp_path / "Task01_BrainTumour")
    synapse = {"dataset": {**synapse_params(), "raw_dir": "data/raw/phantom"}}
    kvasir = {"dataset": {"name": "k", "format": "folder2d", "raw_dir": "data/raw/k", "modality": "rgb", "class_names": ["background", "polyp"]}}
    for params in (kvasir, synapse):  # kvasir: today 2 classes -> label values [2, 3] are errors
        assert run_doctor(params, tmp_path, raw_dir=raw, fmt="msd") == 0
        out = capsys.readouterr().out
        assert "dataset described by its dataset.json" in out and "background, edema" in out
        assert "aorta" not in out and "error" not in out.replace("0 error(s)", "")
    assert run_doctor(synapse, tmp_path, raw_dir=raw) == 0  # the layout is detected too
    assert "dataset described by its dataset.json" in capsys.readouterr().out


def test_params_raw_dir_is_described_by_params(tmp_path, capsys):
    make_synapse(tmp_path / "data/raw/syn", n=1)
    params = {"dataset": {**synapse_params(), "raw_dir": "data/raw/syn"}}
    assert run_doctor(params, tmp_path, raw_dir=tmp_path / "data/raw/syn") == 0
    assert "dataset described by params.yaml" in capsys.readouterr().out
