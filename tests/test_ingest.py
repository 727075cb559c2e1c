"""Ingest: every adapter on files written here in the real on-disk layout, normalisation, manifest, fingerprint.

The writers at the top are reused by test_data_faults.py and test_doctor.py.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medseg.data.cases import load_case, read_cases
from medseg.data.ingest import ingest_dataset, ingest_from_params
from medseg.errors import ConfigError

from conftest import paths

SPACING = (0.8, 0.9, 2.5)  # x, y, z mm
SYNAPSE_CLASSES = ["background", "aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas", "spleen", "stomach"]
SYNAPSE_MAP = {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8}


def write_nifti(path: Path, data: np.ndarray, spacing=SPACING, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if affine is None:
        affine = np.diag([*spacing, 1.0])
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms(tuple(spacing) + (1.0,) * (data.ndim - 3))
    nib.save(img, path)
    return path


def volume_pair(seed: int, shape=(12, 10, 4), labels=(0, 1, 2, 3, 4, 6, 7, 8, 11, 9)):
    """A raw (x, y, z) CT-like int16 image and a label volume holding the given raw values."""
    rng = np.random.default_rng(seed)
    image = rng.integers(-300, 400, size=shape).astype(np.int16)
    label = rng.choice(np.asarray(labels, dtype=np.uint8), size=shape)
    return image, label


def synapse_params(**overrides) -> dict:
    params = {
        "name": "syn",
        "format": "synapse",
        "modality": "ct",
        "hu_window": [-125, 275],
        "class_names": list(SYNAPSE_CLASSES),
        "label_map": dict(SYNAPSE_MAP),
        "unmapped_labels": "background",
    }
    params.update(overrides)
    return params


def make_synapse(root: Path, n: int = 2, shape=(12, 10, 4), dirs=("img", "label")) -> Path:
    for i in range(1, n + 1):
        image, label = volume_pair(i, shape)
        write_nifti(root / dirs[0] / f"img{i:04d}.nii.gz", image)
        write_nifti(root / dirs[1] / f"label{i:04d}.nii.gz", label)
    return root


def make_msd(root: Path, cases=("spleen_1", "spleen_2"), channels: int = 1, style: str = "nnunet", shape=(8, 6, 3)) -> Path:
    """nnU-Net style: one file per channel `<case>_XXXX`; msd style: one (x, y, z[, c]) file per case."""
    root.mkdir(parents=True, exist_ok=True)
    names = {str(c): f"MRI{c}" for c in range(channels)} if channels > 1 else {"0": "CT"}
    (root / "dataset.json").write_text(
        json.dumps(
            {"name": "Task", "modality" if style == "msd" else "channel_names": names, "labels": {"0": "background", "1": "organ", "2": "tumour"}}
            if style == "msd"
            else {"channel_names": names, "labels": {"background": 0, "organ": 1, "tumour": 2}, "file_ending": ".nii.gz"}
        )
    )
    for k, case in enumerate(cases):
        rng = np.random.default_rng(k)
        data = rng.normal(100, 30, size=(*shape, channels)).astype(np.float32)
        label = rng.integers(0, 3, size=shape).astype(np.uint8)
        if style == "msd":
            write_nifti(root / "imagesTr" / f"{case}.nii.gz", data if channels > 1 else data[..., 0])
        else:
            for c in range(channels):
                write_nifti(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", data[..., c])
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", label)
    return root


def msd_params(**overrides) -> dict:
    params = {"name": "msd", "format": "msd", "modality": None, "class_names": None}
    params.update(overrides)
    return params


def make_acdc(root: Path, patients=(1, 2), frames=(1, 12), shape=(8, 6, 3)) -> Path:
    for p in patients:
        folder = root / "training" / f"patient{p:03d}"
        for f in frames:
            rng = np.random.default_rng(p * 100 + f)
            write_nifti(folder / f"patient{p:03d}_frame{f:02d}.nii.gz", rng.normal(200, 50, size=shape).astype(np.float32), (1.5, 1.5, 10.0))
            write_nifti(folder / f"patient{p:03d}_frame{f:02d}_gt.nii.gz", rng.integers(0, 4, size=shape).astype(np.uint8), (1.5, 1.5, 10.0))
        write_nifti(folder / f"patient{p:03d}_4d.nii.gz", np.zeros((*shape, 2), np.float32), (1.5, 1.5, 10.0))
        (folder / "Info.cfg").write_text("ED: 1\nES: 12\n")
    return root


def acdc_params() -> dict:
    return {"name": "acdc", "format": "acdc", "modality": "mr", "class_names": ["background", "rv", "myo", "lv"]}


def make_kvasir(root: Path, stems=("cju0qkwl35piu0993l0dewei2", "cju0qoxqj9q6s0835b43399p4"), size=(10, 14)) -> Path:
    for k, stem in enumerate(stems):
        rng = np.random.default_rng(k)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.jpg")
        mask = np.zeros(size, np.uint8)
        mask[2:6, 3:9] = 255
        mask[6, 3] = 100  # JPEG-like grey edge pixel: below the threshold
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    return root


def folder2d_params(**overrides) -> dict:
    params = {"name": "kvasir", "format": "folder2d", "modality": "rgb", "class_names": ["background", "polyp"]}
    params.update(overrides)
    return params


def make_transunet(root: Path, train_cases=(5, 6), slices=3, test_cases=(1,), size=(8, 8)) -> Path:
    (root / "train_npz").mkdir(parents=True, exist_ok=True)
    (root / "test_vol_h5").mkdir(parents=True, exist_ok=True)
    for case in train_cases:
        for s in range(slices):
            rng = np.random.default_rng(case * 10 + s)
            np.savez(
                root / "train_npz" / f"case{case:04d}_slice{s:03d}.npz",
                image=rng.random(size, dtype=np.float32),
                label=rng.integers(0, 9, size=size).astype(np.float32),
            )
    for case in test_cases:
        rng = np.random.default_rng(case)
        with h5py.File(root / "test_vol_h5" / f"case{case:04d}.npy.h5", "w") as h5:
            h5["image"] = rng.random((4, *size), dtype=np.float32)
            h5["label"] = rng.integers(0, 9, size=(4, *size)).astype(np.float32)
    return root


def transunet_params() -> dict:
    return {"name": "tu", "format": "transunet", "modality": "ct", "class_names": list(SYNAPSE_CLASSES), "label_map": dict(SYNAPSE_MAP)}


# ------------------------------------------------------------------ synapse


def test_synapse_arrays_axes_spacing_labels_and_window(tmp_path):
    raw = make_synapse(tmp_path / "raw", n=2)
    manifest = ingest_dataset(synapse_params(), raw, tmp_path / "out")
    out = tmp_path / "out"
    assert [c["id"] for c in manifest["cases"]] == ["case0001", "case0002"]
    assert manifest["num_classes"] == 9 and manifest["in_channels"] == 1
    assert read_cases(out) == manifest

    image, label, spacing = load_case(out, "case0001")
    raw_image, raw_label = volume_pair(1)
    assert image.dtype == np.float32 and image.shape == (4, 1, 10, 12)  # (z, c, y, x)
    assert label.dtype == np.uint8 and label.shape == (4, 10, 12)
    assert spacing == (2.5, 0.9, 0.8)
    assert isinstance(image, np.memmap)
    expected = (np.clip(raw_image.transpose(2, 1, 0), -125, 275) + 125) / 400
    np.testing.assert_allclose(image[:, 0], expected, atol=1e-6)
    lut = np.zeros(256, np.uint8)
    for raw_value, cls in SYNAPSE_MAP.items():
        lut[raw_value] = cls
    np.testing.assert_array_equal(label, lut[raw_label.transpose(2, 1, 0)])  # raw 9 (IVC) -> background

    case = manifest["cases"][0]
    assert case["source_image"] == "img/img0001.nii.gz" and case["source_label"] == "label/label0001.nii.gz"
    assert case["shape"] == [4, 10, 12] and case["spacing"] == [2.5, 0.9, 0.8] and case["spacing_known"] is True
    from medseg.io import sha256_file

    assert case["sha256"] == sha256_file(out / case["image"])


def test_fingerprint_matches_the_data(tmp_path):
    raw = make_synapse(tmp_path / "raw", n=2)
    ingest_dataset(synapse_params(), raw, tmp_path / "out")
    fp = json.loads((tmp_path / "out" / "fingerprint.json").read_text())
    labels = [load_case(tmp_path / "out", c)[1] for c in ("case0001", "case0002")]
    counts = np.bincount(np.concatenate([lbl.ravel() for lbl in labels]), minlength=9)
    assert fp["class_voxels"] == dict(zip(SYNAPSE_CLASSES, counts.tolist()))
    assert fp["cases_per_class"]["liver"] == 2
    assert abs(sum(fp["class_frequency"].values()) - 1) < 1e-9
    assert fp["spacing"]["median"] == [2.5, 0.9, 0.8] and fp["spacing"]["anisotropy"] == pytest.approx(2.5 / 0.8)
    assert fp["shape"]["all"] == [[4, 10, 12], [4, 10, 12]]
    # Raw foreground HU (not the windowed values): the images span -300..400.
    fg = np.concatenate(
        [volume_pair(i)[0].transpose(2, 1, 0)[lbl > 0] for i, lbl in zip((1, 2), labels)]
    ).astype(np.float64)
    stats = fp["foreground_intensity"][0]
    assert stats["mean"] == pytest.approx(fg.mean()) and stats["max"] == fg.max() and stats["min"] == fg.min()
    assert stats["percentile_99_5"] == pytest.approx(np.percentile(fg, 99.5))


def test_scaled_nifti_is_read_as_float32_not_float64(tmp_path):
    """scl_slope/scl_inter (common in CT exports): nibabel would scale to float64, twice float32's memory."""
    from medseg.data.formats import read_nifti

    hu = np.linspace(-1024.0, 1500.0, 12 * 10 * 4).reshape(12, 10, 4)
    path = tmp_path / "scaled.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.diag([*SPACING, 1.0]), dtype=np.int16), path)  # int16 on disk, with a slope
    assert nib.load(path).dataobj.slope != 1.0
    data = read_nifti(path).data
    assert data.dtype == np.float32
    np.testing.assert_allclose(data, np.asanyarray(nib.load(path).dataobj), rtol=1e-6)


def test_btcv_names_and_reingest_is_deterministic_and_replaces(tmp_path):
    raw = make_synapse(tmp_path / "raw", n=2, dirs=("imagesTr", "labelsTr"))
    out = tmp_path / "out"
    first = ingest_dataset(synapse_params(), raw, out)
    (out / "stale.txt").write_text("from an older ingest")
    second = ingest_dataset(synapse_params(), raw, out)
    assert first == second
    assert not (out / "stale.txt").exists()  # the folder is swapped whole
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_unmapped_raw_value_can_be_an_error(tmp_path):
    from medseg.errors import IngestError

    raw = make_synapse(tmp_path / "raw", n=1)
    with pytest.raises(IngestError, match=r"label0001\.nii\.gz: label values \[9\] are not in dataset.label_map"):
        ingest_dataset(synapse_params(unmapped_labels="error"), raw, tmp_path / "out")


def test_label_map_pointing_outside_the_classes_is_a_config_error(tmp_path):
    raw = make_synapse(tmp_path / "raw", n=1)
    with pytest.raises(ConfigError, match="maps to class 12"):
        ingest_dataset(synapse_params(label_map={8: 12}), raw, tmp_path / "out")


# ------------------------------------------------------------------ msd / nnU-Net


def test_nnunet_channel_files_and_dataset_json(tmp_path):
    raw = make_msd(tmp_path / "Dataset001_Brain", channels=2, style="nnunet")
    manifest = ingest_dataset(msd_params(), raw, tmp_path / "out")
    assert manifest["class_names"] == ["background", "organ", "tumour"]
    assert manifest["modality"] == "mr" and manifest["in_channels"] == 2
    assert manifest["cases"][0]["source_channels"] == ["imagesTr/spleen_1_0000.nii.gz", "imagesTr/spleen_1_0001.nii.gz"]
    image, label, _ = load_case(tmp_path / "out", "spleen_1")
    assert image.shape == (3, 2, 6, 8)
    # mr: per channel percentile clip then z-score.
    for c in range(2):
        assert abs(float(image[:, c].mean())) < 1e-4 and float(image[:, c].std()) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("style, channels, modality", [("nnunet", 2, None), ("msd", 1, "ct")])
def test_stored_image_is_normalise_image_of_the_read_case(tmp_path, monkeypatch, style, channels, modality):
    """Ingest writes the image slab by slab; the bytes are those of the in-memory `normalise_image`."""
    from medseg.data.formats import dataset_spec, discover, read_case
    from medseg.data.preprocessing import normalisation_for, normalise_image

    raw = make_msd(tmp_path / "raw", channels=channels, style=style, shape=(40, 30, 7))
    params = msd_params(modality=modality)
    spec = dataset_spec(params, raw)
    case = discover(spec, raw)[0][0]
    expected = normalise_image(read_case(case, spec).image, normalisation_for(spec.format, spec.modality, spec.hu_window))
    monkeypatch.setattr("medseg.data.preprocessing.SLAB_VOXELS", 500)  # one slice a slab (the one slab rule)
    ingest_dataset(params, raw, tmp_path / "out")
    stored, _, _ = load_case(tmp_path / "out", case.id)
    assert stored.dtype == expected.dtype and stored.shape == expected.shape
    assert np.asarray(stored).tobytes() == expected.tobytes()


def test_msd_4d_volume_and_macos_shadow_files(tmp_path):
    raw = make_msd(tmp_path / "Task01", channels=3, style="msd")
    (raw / "imagesTr" / "._spleen_1.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    manifest = ingest_dataset(msd_params(modality="mr"), raw, tmp_path / "out")
    assert [c["id"] for c in manifest["cases"]] == ["spleen_1", "spleen_2"]
    image, _, _ = load_case(tmp_path / "out", "spleen_2")
    assert image.shape == (3, 3, 6, 8)


def test_msd_ct_from_dataset_json(tmp_path):
    raw = make_msd(tmp_path / "Task09_Spleen", style="msd")
    manifest = ingest_dataset(msd_params(hu_window=[0, 200]), raw, tmp_path / "out")
    assert manifest["modality"] == "ct" and manifest["normalisation"] == {"method": "hu_window", "window": [0.0, 200.0]}
    image, _, _ = load_case(tmp_path / "out", "spleen_1")
    assert 0.0 <= image.min() and image.max() <= 1.0


# ------------------------------------------------------------------ acdc


def test_acdc_frames_grouped_by_patient(tmp_path):
    raw = make_acdc(tmp_path / "ACDC")
    manifest = ingest_dataset(acdc_params(), raw, tmp_path / "out")
    ids = [(c["id"], c["patient"]) for c in manifest["cases"]]
    assert ids == [
        ("patient001_frame01", "patient001"),
        ("patient001_frame12", "patient001"),
        ("patient002_frame01", "patient002"),
        ("patient002_frame12", "patient002"),
    ]
    assert manifest["cases"][0]["spacing"] == [10.0, 1.5, 1.5]
    assert manifest["cases"][0]["source_label"] == "training/patient001/patient001_frame01_gt.nii.gz"


# ------------------------------------------------------------------ folder2d


def test_kvasir_same_stem_rgb_and_thresholded_masks(tmp_path):
    raw = make_kvasir(tmp_path / "Kvasir-SEG")
    manifest = ingest_dataset(folder2d_params(), raw, tmp_path / "out")
    assert manifest["in_channels"] == 3
    case = manifest["cases"][0]
    assert case["shape"] == [1, 10, 14] and case["spacing_known"] is False and case["spacing"] == [1.0, 1.0, 1.0]
    image, label, _ = load_case(tmp_path / "out", case["id"])
    original = np.asarray(Image.open(raw / "images" / f"{case['id']}.jpg").convert("RGB"))
    np.testing.assert_allclose(image[0], original.transpose(2, 0, 1) / 255.0, atol=1e-6)
    assert label.shape == (1, 10, 14) and set(np.unique(label)) == {0, 1}
    assert label[0, 2:6, 3:9].all() and label.sum() == 4 * 6  # the 100-valued pixel stays background


def test_isic_suffix_and_separate_folders(tmp_path):
    raw = tmp_path / "ISIC2018"
    inputs, truth = raw / "ISIC2018_Task1-2_Training_Input", raw / "ISIC2018_Task1_Training_GroundTruth"
    inputs.mkdir(parents=True)
    truth.mkdir()
    (inputs / "LICENSE.txt").write_text("CC-BY-NC")
    for stem in ("ISIC_0000000", "ISIC_0000001"):
        Image.fromarray(np.full((6, 8, 3), 90, np.uint8)).save(inputs / f"{stem}.jpg")
        mask = np.zeros((6, 8), np.uint8)
        mask[1:3, 1:5] = 255
        Image.fromarray(mask).save(truth / f"{stem}_segmentation.png")
    manifest = ingest_dataset(folder2d_params(name="isic"), raw, tmp_path / "out")
    assert [c["id"] for c in manifest["cases"]] == ["ISIC_0000000", "ISIC_0000001"]
    assert manifest["cases"][1]["source_label"].endswith("ISIC_0000001_segmentation.png")
    assert load_case(tmp_path / "out", "ISIC_0000001")[1].sum() == 8


def test_multiclass_index_masks_are_kept(tmp_path):
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "masks").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(raw / "images" / "a.png")
    Image.fromarray(np.array([[0, 1, 2, 2]] * 4, np.uint8)).save(raw / "masks" / "a.png")
    params = folder2d_params(modality="mr", class_names=["background", "one", "two"])
    ingest_dataset(params, raw, tmp_path / "out")
    _, label, _ = load_case(tmp_path / "out", "a")
    np.testing.assert_array_equal(label[0, 0], [0, 1, 2, 2])


# ------------------------------------------------------------------ transunet


def test_transunet_npz_slices_grouped_and_h5_volumes(tmp_path):
    raw = make_transunet(tmp_path / "Synapse")
    manifest = ingest_dataset(transunet_params(), raw, tmp_path / "out")
    cases = {c["id"]: c for c in manifest["cases"]}
    assert sorted(cases) == ["case0001", "case0005", "case0006"]
    assert cases["case0005"]["shape"] == [3, 8, 8] and cases["case0001"]["shape"] == [4, 8, 8]
    assert cases["case0005"]["spacing_known"] is False
    image, label, _ = load_case(tmp_path / "out", "case0005")
    with np.load(raw / "train_npz" / "case0005_slice002.npz") as npz:
        np.testing.assert_array_equal(image[2, 0], npz["image"])  # no window on pre-windowed data
        np.testing.assert_array_equal(label[2], npz["label"].astype(np.uint8))  # already class indices
    fp = json.loads((tmp_path / "out" / "fingerprint.json").read_text())
    assert fp["spacing_known"] is False


# ------------------------------------------------------------------ archives and params


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_ingest_from_an_archive(tmp_path, kind):
    raw = make_synapse(tmp_path / "src" / "Synapse", n=2)
    archive = tmp_path / f"Synapse.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for p in sorted(raw.rglob("*")):
                zf.write(p, p.relative_to(raw.parent).as_posix())
    else:
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(raw, arcname="Synapse")
    manifest = ingest_dataset(synapse_params(), archive, tmp_path / "out")
    direct = ingest_dataset(synapse_params(), raw, tmp_path / "direct")
    assert [c["sha256"] for c in manifest["cases"]] == [c["sha256"] for c in direct["cases"]]
    assert manifest["source"] == archive.name


def test_ingest_from_params_writes_under_data_ingested(tmp_path):
    make_synapse(tmp_path / "data" / "raw" / "syn", n=1)
    params = {"dataset": {**synapse_params(), "raw_dir": "data/raw/syn"}}
    ingest_from_params(params, tmp_path)
    assert (paths(tmp_path, "syn").ingested / "cases" / "case0001_image.npy").is_file()
    shutil.rmtree(tmp_path / "data" / "ingested")
    with pytest.raises(ConfigError, match="dataset.format"):
        ingest_from_params({"dataset": {**params["dataset"], "format": "analyze"}}, tmp_path)
    assert not (tmp_path / "data" / "ingested").exists() or not any((tmp_path / "data" / "ingested").iterdir())


def test_patient_pattern_groups_images_of_one_patient(tmp_path):
    raw = make_kvasir(tmp_path / "raw", stems=("p01_a", "p01_b", "p02_a"))
    manifest = ingest_dataset(folder2d_params(patient_pattern=r"^(p\d+)_"), raw, tmp_path / "out")
    assert [(c["id"], c["patient"]) for c in manifest["cases"]] == [("p01_a", "p01"), ("p01_b", "p01"), ("p02_a", "p02")]
    from medseg.errors import IngestError

    with pytest.raises(IngestError, match=r"p01_a\.jpg: case id 'p01_a' does not match dataset.patient_pattern"):
        ingest_dataset(folder2d_params(patient_pattern=r"^patient(\d+)"), raw, tmp_path / "out2")


def test_unknown_dataset_keys_are_refused(tmp_path):
    raw = make_kvasir(tmp_path / "raw")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['image_folder'\]"):
        ingest_dataset(folder2d_params(image_folder="imgs"), raw, tmp_path / "out")
    manifest = ingest_dataset(folder2d_params(images_dir="images", masks_dir="masks", mask_suffix=""), raw, tmp_path / "out")
    assert len(manifest["cases"]) == 2


def test_btcv_rawdata_with_testing_beside_training_pairs_training_images(tmp_path):
    """BTCV's RawData/ has Testing/img (no labels) sorted before Training/: images must come from Training."""
    raw = tmp_path / "RawData"
    make_synapse(raw / "Training", n=2)
    for i in (61, 62):
        image, _ = volume_pair(i)
        write_nifti(raw / "Testing" / "img" / f"img{i:04d}.nii.gz", image)
    manifest = ingest_dataset(synapse_params(), raw, tmp_path / "out")
    assert [c["id"] for c in manifest["cases"]] == ["case0001", "case0002"]
    assert all(c["source_image"].startswith("Training/img/") for c in manifest["cases"])
