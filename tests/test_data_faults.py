"""Issue 7, data half: one table of broken datasets. Each must raise IngestError naming the bad file and the
problem, leave the previous ingested output untouched and no temp folders behind."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from test_ingest import (
    SYNAPSE_CLASSES,
    folder2d_params,
    make_kvasir,
    make_msd,
    make_synapse,
    make_transunet,
    msd_params,
    synapse_params,
    transunet_params,
    volume_pair,
    write_nifti,
)

from medseg.data.archive import safe_extract
from medseg.data.ingest import ingest_dataset
from medseg.errors import IngestError
from medseg.io import atomic_dir

from conftest import snapshot


def _synapse(tmp: Path, n: int = 2) -> Path:
    return make_synapse(tmp / "raw", n=n)


def truncated_nifti(tmp):
    raw = _synapse(tmp)
    path = raw / "img" / "img0002.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return raw, synapse_params(), "img/img0002.nii.gz", "cannot read NIfTI"


def garbage_nifti(tmp):
    raw = _synapse(tmp)
    (raw / "label" / "label0001.nii.gz").write_bytes(b"this is not a nifti file" * 20)
    return raw, synapse_params(), "label/label0001.nii.gz", "cannot read NIfTI"


def shape_mismatch(tmp):
    raw = _synapse(tmp)
    write_nifti(raw / "label" / "label0002.nii.gz", np.zeros((12, 10, 5), np.uint8))
    return raw, synapse_params(), "label/label0002.nii.gz", r"shape \(5, 10, 12\) != image \(4, 10, 12\)"


def affine_mismatch(tmp):
    raw = _synapse(tmp)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[0, 3] = 5.0
    write_nifti(raw / "label" / "label0001.nii.gz", volume_pair(1)[1], affine=affine)
    return raw, synapse_params(), "label/label0001.nii.gz", "affine differs from the image's"


def label_outside_classes(tmp):
    raw = _synapse(tmp)  # raw values up to 11 with no label_map and 9 classes
    return raw, synapse_params(label_map=None), "label/label0001.nii.gz", r"label values \[9, 11\] outside the 9 declared classes"


def unmapped_label_error(tmp):
    raw = _synapse(tmp)
    return raw, synapse_params(unmapped_labels="error"), "label/label0001.nii.gz", r"label values \[9\] are not in dataset.label_map"


def non_integer_labels(tmp):
    raw = _synapse(tmp)
    label = volume_pair(2)[1].astype(np.float32)
    label[0, 0, 0] = 1.5
    write_nifti(raw / "label" / "label0002.nii.gz", label)
    return raw, synapse_params(), "label/label0002.nii.gz", "non-integer values"


def nan_voxels(tmp):
    raw = _synapse(tmp)
    image = volume_pair(2)[0].astype(np.float32)
    image[3, 2, 1] = np.nan
    write_nifti(raw / "img" / "img0002.nii.gz", image)
    return raw, synapse_params(), "img/img0002.nii.gz", "1 NaN and 0 Inf voxels"


def inf_voxels(tmp):
    raw = _synapse(tmp)
    image = volume_pair(1)[0].astype(np.float32)
    image[0, 0, 0] = np.inf
    write_nifti(raw / "img" / "img0001.nii.gz", image)
    return raw, synapse_params(), "img/img0001.nii.gz", "0 NaN and 1 Inf voxels"


def single_slice(tmp):
    raw = make_synapse(tmp / "raw", n=1, shape=(12, 10, 1))
    return raw, synapse_params(), "img/img0001.nii.gz", "3D volume has a single slice"


def four_d_in_synapse(tmp):
    raw = _synapse(tmp)
    write_nifti(raw / "img" / "img0001.nii.gz", np.zeros((12, 10, 4, 2), np.int16))
    return raw, synapse_params(), "img/img0001.nii.gz", "expected a 3D volume, got 4D"


def empty_dataset(tmp):
    raw = tmp / "raw"
    (raw / "img").mkdir(parents=True)
    (raw / "label").mkdir()
    return raw, synapse_params(), "raw", "empty dataset"


def missing_raw_dir(tmp):
    return tmp / "nowhere", synapse_params(), "nowhere", "does not exist"


def image_without_label(tmp):
    raw = _synapse(tmp)
    (raw / "label" / "label0002.nii.gz").unlink()
    return raw, synapse_params(), "img/img0002.nii.gz", "no matching label"


def label_without_image(tmp):
    raw = _synapse(tmp)
    (raw / "img" / "img0001.nii.gz").unlink()
    return raw, synapse_params(), "label/label0001.nii.gz", "no matching image"


def path_is_a_directory(tmp):
    raw = _synapse(tmp)
    path = raw / "img" / "img0002.nii.gz"
    path.unlink()
    path.mkdir()  # unreadable as a file (stands in for chmod 000, which root ignores)
    return raw, synapse_params(), "img/img0002.nii.gz", "cannot read NIfTI"


def broken_symlink(tmp):
    raw = _synapse(tmp)
    path = raw / "label" / "label0002.nii.gz"
    path.unlink()
    path.symlink_to(raw / "label" / "gone.nii.gz")  # inside the dataset: a link out of it is refused as such first
    return raw, synapse_params(), "label/label0002.nii.gz", "cannot read NIfTI"


def msd_without_dataset_json(tmp):
    raw = make_msd(tmp / "Task09")
    (raw / "dataset.json").unlink()
    return raw, msd_params(), "dataset.json", "missing"


def msd_channel_count_differs(tmp):
    raw = make_msd(tmp / "Dataset002", channels=2)
    (raw / "imagesTr" / "spleen_2_0001.nii.gz").unlink()
    return raw, msd_params(), "imagesTr", "different numbers of channel files"


def folder2d_missing_mask(tmp):
    raw = make_kvasir(tmp / "kvasir")
    Image.fromarray(np.zeros((10, 14, 3), np.uint8)).save(raw / "images" / "extra_image.jpg")
    return raw, folder2d_params(), "images/extra_image.jpg", "no matching label"


def folder2d_extra_mask(tmp):
    raw = make_kvasir(tmp / "kvasir")
    Image.fromarray(np.zeros((10, 14), np.uint8)).save(raw / "masks" / "orphan.png")
    return raw, folder2d_params(), "masks/orphan.png", "no matching image"


def rgb_mask(tmp):
    raw = make_kvasir(tmp / "kvasir", stems=("a",))
    mask = np.zeros((10, 14, 3), np.uint8)
    mask[2:5, 2:5] = (255, 0, 0)
    Image.fromarray(mask).save(raw / "masks" / "a.png")
    return raw, folder2d_params(), "masks/a.png", "RGB mask with differing channels"


def mask_size_differs(tmp):
    raw = make_kvasir(tmp / "kvasir", stems=("a",))
    Image.fromarray(np.zeros((9, 14), np.uint8)).save(raw / "masks" / "a.png")
    return raw, folder2d_params(), "masks/a.png", r"shape \(1, 9, 14\) != image \(1, 10, 14\)"


def npz_missing_label(tmp):
    raw = make_transunet(tmp / "Synapse")
    np.savez(raw / "train_npz" / "case0005_slice001.npz", image=np.zeros((8, 8), np.float32))
    return raw, transunet_params(), "train_npz/case0005_slice001.npz", "missing array 'label'"


def npz_slice_gap(tmp):
    raw = make_transunet(tmp / "Synapse")
    (raw / "train_npz" / "case0006_slice001.npz").unlink()
    return raw, transunet_params(), "train_npz/case0006_slice*.npz", r"missing slices \[1\]"


def h5_corrupt(tmp):
    raw = make_transunet(tmp / "Synapse")
    (raw / "test_vol_h5" / "case0001.npy.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 40)
    return raw, transunet_params(), "test_vol_h5/case0001.npy.h5", "cannot read HDF5"


def h5_label_out_of_range(tmp):
    raw = make_transunet(tmp / "Synapse")
    with h5py.File(raw / "test_vol_h5" / "case0001.npy.h5", "a") as h5:
        del h5["label"]
        h5["label"] = np.full((4, 8, 8), 13, np.float32)
    return raw, transunet_params(), "test_vol_h5/case0001.npy.h5", r"label values \[13\] outside the 9 declared classes"


def _zip(tmp: Path, entries: dict[str, bytes]) -> Path:
    path = tmp / "data.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def zip_slip(tmp):
    archive = _zip(tmp, {"img/img0001.nii.gz": b"x", "../evil.txt": b"owned"})
    return archive, synapse_params(), "data.zip", r"'\.\./evil\.txt' escapes the destination"


def zip_absolute(tmp):
    archive = _zip(tmp, {"/tmp/evil.txt": b"owned"})
    return archive, synapse_params(), "data.zip", "absolute path"


def zip_symlink_escape(tmp):
    path = tmp / "data.zip"
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("raw/img")
        info.external_attr = (0o120777 << 16)  # symlink mode bits
        zf.writestr(info, "../../../etc")
    return path, synapse_params(), "data.zip", "symlink 'raw/img' -> '../../../etc' points outside"


def tar_symlink_escape(tmp):
    path = tmp / "data.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        link = tarfile.TarInfo("raw/label")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tf.addfile(link)
    return path, synapse_params(), "data.tar.gz", "points outside the destination"


def tar_dotdot(tmp):
    path = tmp / "data.tar"
    with tarfile.open(path, "w") as tf:
        member = tarfile.TarInfo("raw/../../evil.txt")
        member.size = 5
        tf.addfile(member, io.BytesIO(b"owned"))
    return path, synapse_params(), "data.tar", "escapes the destination"


def corrupt_archive(tmp):
    path = tmp / "data.zip"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    return path, synapse_params(), "data.zip", "corrupt or unreadable archive"


FAULTS = [
    truncated_nifti,
    garbage_nifti,
    shape_mismatch,
    affine_mismatch,
    label_outside_classes,
    unmapped_label_error,
    non_integer_labels,
    nan_voxels,
    inf_voxels,
    single_slice,
    four_d_in_synapse,
    empty_dataset,
    missing_raw_dir,
    image_without_label,
    label_without_image,
    path_is_a_directory,
    broken_symlink,
    msd_without_dataset_json,
    msd_channel_count_differs,
    folder2d_missing_mask,
    folder2d_extra_mask,
    rgb_mask,
    mask_size_differs,
    npz_missing_label,
    npz_slice_gap,
    h5_corrupt,
    h5_label_out_of_range,
    zip_slip,
    zip_absolute,
    zip_symlink_escape,
    tar_symlink_escape,
    tar_dotdot,
    corrupt_archive,
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.__name__ for f in FAULTS])
def test_bad_input_names_the_file_and_leaves_previous_output(tmp_path, fault):
    raw, params, file_part, problem = fault(tmp_path)
    out = tmp_path / "ingested" / "ds"
    with atomic_dir(out) as previous:  # an earlier ingest's output (medseg's, so a new ingest may replace it)
        (previous / "cases.json").write_text(json.dumps({"previous": "ingest"}))
    before = snapshot(out)

    with pytest.raises(IngestError) as info:
        ingest_dataset(params, raw, out)

    err = info.value
    assert err.path.replace(os.sep, "/").endswith(file_part), err.path
    assert str(err).startswith(err.path + ": ")
    assert __import__("re").search(problem, err.problem), err.problem
    assert snapshot(out) == before  # the previous dataset is intact
    assert sorted(p.name for p in out.parent.iterdir()) == ["ds"]  # no half-built temp folder
    assert not (tmp_path.parent / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_permissions(tmp_path):
    raw = _synapse(tmp_path)
    path = raw / "img" / "img0001.nii.gz"
    path.chmod(0)
    try:
        with pytest.raises(IngestError, match=r"img0001\.nii\.gz: cannot read NIfTI"):
            ingest_dataset(synapse_params(), raw, tmp_path / "out")
    finally:
        path.chmod(0o644)
    assert not (tmp_path / "out").exists()


def test_safe_extract_refuses_before_writing_anything(tmp_path):
    archive = _zip(tmp_path, {"a/ok.txt": b"fine", "a/../../evil.txt": b"owned"})
    with pytest.raises(IngestError, match="escapes the destination"):
        safe_extract(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and not (tmp_path / "evil.txt").exists()


def test_safe_extract_keeps_inner_symlinks(tmp_path):
    path = tmp_path / "ok.tar"
    with tarfile.open(path, "w") as tf:
        data = tarfile.TarInfo("d/real.txt")
        data.size = 2
        tf.addfile(data, io.BytesIO(b"hi"))
        link = tarfile.TarInfo("d/alias.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "real.txt"
        tf.addfile(link)
    dest = safe_extract(path, tmp_path / "dest")
    assert (dest / "d" / "alias.txt").read_text() == "hi"


def test_class_names_must_cover_background_and_a_class(tmp_path):
    from medseg.errors import ConfigError

    with pytest.raises(ConfigError, match="class_names"):
        ingest_dataset(synapse_params(class_names=["background"]), _synapse(tmp_path), tmp_path / "out")
    assert SYNAPSE_CLASSES[0] == "background"
