"""The built-in phantom: real NIfTI in Synapse raw layout, deterministic, anatomically arranged, learnable contrast."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from medseg.data import phantom
from medseg.data.phantom import generate_from_params, generate_phantom_dataset
from medseg.errors import ConfigError, OutputConflictError

SHAPE, SPACING = (64, 64, 10), (0.7, 0.7, 3.0)
MAPPED = {8, 4, 3, 2, 6, 11, 1, 7}  # params.yaml label_map keys (the 8 TransUNet organs)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "raw"
    generate_phantom_dataset(out, 3, SHAPE, SPACING, seed=7)
    loaded = []
    for i in (1, 2, 3):
        img = nib.load(out / "img" / f"img{i:04d}.nii.gz")
        lbl = nib.load(out / "label" / f"label{i:04d}.nii.gz")
        loaded.append((img, lbl, np.asarray(img.dataobj), np.asarray(lbl.dataobj)))
    return out, loaded


def test_synapse_layout_spacing_and_types(cases):
    out, loaded = cases
    assert sorted(p.name for p in (out / "img").iterdir()) == ["img0001.nii.gz", "img0002.nii.gz", "img0003.nii.gz"]
    assert sorted(p.name for p in (out / "label").iterdir()) == ["label0001.nii.gz", "label0002.nii.gz", "label0003.nii.gz"]
    for img, lbl, image, label in loaded:
        assert image.shape == label.shape == SHAPE
        assert image.dtype == np.int16 and label.dtype == np.uint8
        np.testing.assert_allclose(img.header.get_zooms(), SPACING, rtol=1e-6)
        np.testing.assert_allclose(np.abs(np.diag(img.affine))[:3], SPACING, rtol=1e-6)
        np.testing.assert_array_equal(img.affine, lbl.affine)


def test_raw_synapse_labels_with_mapped_and_unmapped_organs(cases):
    _, loaded = cases
    for *_, label in loaded:
        values = set(np.unique(label).tolist())
        assert MAPPED <= values  # every case has all 8 protocol organs
        assert values - MAPPED - {0}, "needs unmapped organs too (IVC, esophagus)"
        assert values <= set(phantom.SYNAPSE_LABELS) | {0}
        sizes = {v: int((label == v).sum()) for v in MAPPED}
        assert sizes[6] == max(sizes.values())  # liver is the largest
        for small in (4, 11, 8):  # gallbladder, pancreas, aorta: small structures
            assert 0 < sizes[small] < 0.2 * sizes[6]


def test_hu_like_intensities_and_organ_contrast(cases):
    _, loaded = cases
    _, _, image, label = loaded[0]
    assert image[0, 0, :].max() < -900  # air outside the body
    assert -1024 <= image.min() and image.max() <= 3071
    # Unlabelled body voxels: fat (-100) and intra-abdominal tissue (-60), plus the bright vertebra.
    body = (label == 0) & (image > -500)
    assert np.median(image[body]) < 0
    background = phantom.ABDOMEN_HU
    for value in MAPPED:
        organ = image[label == value]
        # Organs stand clear of the abdominal background by several noise sigmas, so a small UNet can learn them.
        assert abs(np.median(organ) - background) > 3 * phantom.NOISE_HU, value
    assert image[label == 4].std() > 5  # noisy, not flat


def test_cases_vary_but_regenerating_is_byte_identical(tmp_path, cases):
    out, loaded = cases
    labels = [lbl for *_, lbl in loaded]
    assert not np.array_equal(labels[0], labels[1])
    centroids = [np.argwhere(lbl == 6).mean(0) for lbl in labels]
    assert np.abs(centroids[0] - centroids[1]).max() > 0.3  # liver moves between cases

    again = tmp_path / "again"
    generate_phantom_dataset(again, 3, SHAPE, SPACING, seed=7)
    for sub in ("img/img0002.nii.gz", "label/label0003.nii.gz"):
        assert (again / sub).read_bytes() == (out / sub).read_bytes()
    other = tmp_path / "other"
    generate_phantom_dataset(other, 1, SHAPE, SPACING, seed=8)
    assert (other / "img/img0001.nii.gz").read_bytes() != (out / "img/img0001.nii.gz").read_bytes()


def test_generate_from_params_replaces_the_folder_atomically(tmp_path, monkeypatch):
    params = {"dataset": {"raw_dir": "data/phantom"}, "phantom": {"num_cases": 2, "shape": [16, 16, 3], "spacing": [1, 1, 2], "seed": 0}}
    raw = generate_from_params(params, tmp_path)
    assert raw == tmp_path / "data/phantom"
    assert len(list((raw / "img").iterdir())) == 2
    before = {p.name: p.read_bytes() for p in (raw / "img").iterdir()}

    real = phantom.make_phantom_case
    calls = []

    def fail_on_second(shape, rng):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(shape, rng)

    monkeypatch.setattr(phantom, "make_phantom_case", fail_on_second)
    with pytest.raises(RuntimeError):
        generate_from_params({**params, "phantom": {**params["phantom"], "num_cases": 3, "seed": 1}}, tmp_path)
    assert {p.name: p.read_bytes() for p in (raw / "img").iterdir()} == before
    assert sorted(p.name for p in raw.parent.iterdir()) == ["phantom"]


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_phantom_never_writes_to_dataset_raw_dir(tmp_path):
    """Regression: the phantom stage wrote into `dataset.raw_dir` and swapped a user's dataset away."""
    users = tmp_path / "outside" / "Task02_Heart"
    (users / "imagesTr").mkdir(parents=True)
    (users / "imagesTr" / "la_003_0000.nii.gz").write_bytes(b"the only copy")
    (users / "dataset.json").write_text('{"labels": {"background": 0, "left atrium": 1}}')
    before = _tree(users)
    params = {"dataset": {"raw_dir": str(users)}, "phantom": {"num_cases": 1, "shape": [16, 16, 3], "spacing": [1, 1, 2], "seed": 0}}
    out = generate_from_params(params, tmp_path / "project")
    assert out == tmp_path / "project" / "data" / "phantom"
    assert (out / "img" / "img0001.nii.gz").is_file()
    assert _tree(users) == before
    assert sorted(p.name for p in users.parent.iterdir()) == ["Task02_Heart"]


def test_the_phantom_refuses_to_replace_a_folder_medseg_did_not_write(tmp_path):
    taken = tmp_path / "data" / "phantom"
    taken.mkdir(parents=True)
    (taken / "scan.nii.gz").write_bytes(b"someone's file")
    params = {"dataset": {"raw_dir": "data/phantom"}, "phantom": {"num_cases": 1, "shape": [16, 16, 3], "spacing": [1, 1, 2], "seed": 0}}
    with pytest.raises(OutputConflictError, match="phantom: folder was not written by medseg"):
        generate_from_params(params, tmp_path)
    assert _tree(taken) == {"scan.nii.gz": b"someone's file"}


@pytest.mark.parametrize(
    "kwargs, message",
    [({"num_cases": 0}, "num_cases"), ({"shape": [16, 16]}, "shape"), ({"spacing": [1, 0, 1]}, "spacing")],
)
def test_bad_phantom_params(tmp_path, kwargs, message):
    args = {"num_cases": 1, "shape": [16, 16, 3], "spacing": [1, 1, 1], "seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=message):
        generate_phantom_dataset(tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()
