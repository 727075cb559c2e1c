"""DICOM series and NRRD/MHA volumes in (medseg.data.clinical, the dicom and itk layouts): geometry from the headers,
slices ordered by position, rescale applied, and every bad series refused with the file and the problem."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_series import phantom_hu, write_series

from medseg.data.clinical import read_dicom_series, read_itk
from medseg.data.detect import infer_dataset_section
from medseg.data.ingest import ingest_dataset
from medseg.errors import IngestError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_a_series_is_ordered_by_position_rescaled_and_placed_in_the_patient(tmp_path):
    hu, _ = phantom_hu(slices=5, rows=12, cols=9)
    write_series(tmp_path / "s", hu, spacing=(0.7, 0.9), step=3.0, origin=(-50, -60, 10), shuffle=True)
    series = read_dicom_series(tmp_path / "s")
    v = series.volume
    np.testing.assert_array_equal(v.data, hu.transpose(2, 1, 0).astype(np.float32))  # (x = column, y = row, z)
    assert v.zooms == (0.9, 0.7, 3.0)  # x: column spacing (PixelSpacing[1]), y: row spacing, z: the step
    assert nib.aff2axcodes(v.affine) == ("L", "P", "S")  # LPS voxel axes, in a RAS+ affine
    # voxel (0, 0, 0) is the first slice's ImagePositionPatient (-50, -60, 10) LPS = (50, 60, 10) RAS
    np.testing.assert_allclose(v.affine @ [0, 0, 0, 1], [50, 60, 10, 1])
    np.testing.assert_allclose(v.affine @ [0, 0, 4, 1], [50, 60, 22, 1])
    import pydicom

    # the files are named in a shuffled order; the series is in position order (here also InstanceNumber's)
    assert [int(pydicom.dcmread(p).InstanceNumber) for p in series.files] == [1, 2, 3, 4, 5]
    assert [p.name for p in series.files] != sorted(p.name for p in series.files)


def _series(tmp_path, **kwargs):
    hu, _ = phantom_hu(slices=5, rows=8, cols=8)
    return write_series(tmp_path / "s", hu, shuffle=False, **kwargs), hu


@pytest.mark.parametrize("fault, message", [
    ("duplicate", r"IM0002b?.dcm: duplicated slice: at the same position .* as IM0002b?.dcm"),
    ("gap", r"IM0003.dcm: gap in the slice positions: 5.000 mm after IM0001.dcm"),
    ("mixed", r"s: holds 2 series \(mixed SeriesInstanceUID"),
    ("spacing", r"IM0004.dcm: PixelSpacing \[0.5, 0.5\] differs .* inconsistent spacing"),
    ("orientation", r"IM0004.dcm: ImageOrientationPatient .* inconsistent orientation"),
    ("oblique", r"an oblique stack"),
    ("not_dicom", r"notes.txt: not a DICOM file"),
    ("no_decoder", r"IM0000.dcm: cannot decode its pixel data \(transfer syntax .*\).*needs a decoder"),
])
def test_bad_series_are_refused_naming_the_file(fault, message, tmp_path):
    import pydicom

    files, hu = _series(tmp_path, **({"orientation": (0.8, 0.6, 0, -0.6, 0.8, 0)} if fault == "oblique" else {}))
    if fault == "duplicate":
        shutil.copy(files[2], tmp_path / "s" / "IM0002b.dcm")
    elif fault == "gap":
        files[2].unlink()
    elif fault == "mixed":
        write_series(tmp_path / "s", hu[:2], series_number=9, shuffle=False)  # overwrites IM0000/1 with series 2
    elif fault in ("spacing", "orientation"):
        ds = pydicom.dcmread(files[4])
        if fault == "spacing":
            ds.PixelSpacing = [0.5, 0.5]
        else:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.save_as(files[4])
    elif fault == "not_dicom":
        (tmp_path / "s" / "notes.txt").write_text("scanner notes")
    elif fault == "no_decoder":  # a syntax no pydicom plug-in decodes (MPEG-2), its data encapsulated
        from pydicom.encaps import encapsulate

        ds = pydicom.dcmread(files[0])
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
        ds.PixelData = encapsulate([b"\x00\x01" * 32])
        ds.save_as(files[0], enforce_file_format=True)
    with pytest.raises(IngestError, match=message):
        read_dicom_series(tmp_path / "s")


def test_the_dicom_layout_ingests_series_with_label_maps_in_any_voxel_order(tmp_path):
    raw = tmp_path / "DICOM"
    for i in range(2):
        hu, labels = phantom_hu(slices=4, rows=16, cols=20, seed=i)
        write_series(raw / f"pt{i}", hu)
        volume = read_dicom_series(raw / f"pt{i}").volume
        (raw / "labels").mkdir(exist_ok=True)
        data, affine = labels.transpose(2, 1, 0), volume.affine
        if i == 1:  # stored flipped along y (as TotalSegmentator writes LAS for an LPS series): the same grid
            flip = np.diag([1.0, -1.0, 1.0, 1.0])
            flip[1, 3] = data.shape[1] - 1
            data, affine = data[:, ::-1], affine @ flip
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), raw / "labels" / f"pt{i}.nii.gz")
    section, _ = infer_dataset_section(raw)
    assert section["format"] == "dicom" and section["modality"] == "ct" and section["class_names"][1] == "foreground"
    manifest = ingest_dataset(section, raw, tmp_path / "out")
    for i, case in enumerate(manifest["cases"]):
        _, labels = phantom_hu(slices=4, rows=16, cols=20, seed=i)
        stored = np.load(tmp_path / "out" / case["image"].replace("image", "label"))
        # canonical RAS (D=z, H=y, W=x): the LPS series is flipped along x and y
        np.testing.assert_array_equal(stored, labels[:, ::-1, ::-1])
        assert case["spacing"] == [2.5, 0.8, 0.8] and case["source_axcodes"] == "LPS"
        assert case["source_image"] == f"pt{i}"


def test_a_folder_of_several_series_is_one_case_per_series(tmp_path):
    raw = tmp_path / "DICOM"
    hu, labels = phantom_hu(slices=3, rows=8, cols=8)
    write_series(raw / "study", hu, series_number=2)
    write_series(raw / "study" / "second", hu + 5, series_number=5)
    (raw / "labels").mkdir()
    for case in ("study-1", "study-2"):
        nib.save(nib.Nifti1Image(labels.transpose(2, 1, 0), read_dicom_series(raw / "study" / "second").volume.affine),
                 raw / "labels" / f"{case}.nii.gz")
    section, _ = infer_dataset_section(raw)
    manifest = ingest_dataset(section, raw, tmp_path / "out")
    assert [c["id"] for c in manifest["cases"]] == ["study-1", "study-2"]
    first = np.load(tmp_path / "out" / "cases" / "study-1_image.npy")
    second = np.load(tmp_path / "out" / "cases" / "study-2_image.npy")
    assert second.mean() > first.mean()  # series 5 (+5 HU) is the second case


def test_nrrd_and_mha_volumes_keep_their_geometry(tmp_path):
    import SimpleITK as sitk

    hu, labels = phantom_hu(slices=4, rows=10, cols=12)
    image = sitk.GetImageFromArray(hu)  # (z, y, x) array -> (x, y, z) image
    image.SetSpacing((0.5, 0.6, 3.0))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))  # y runs anterior (LPS -y): an "LAS" grid
    raw = tmp_path / "MHA"
    raw.mkdir()
    sitk.WriteImage(image, str(raw / "a_image.mha"))
    label = sitk.GetImageFromArray(labels)
    label.CopyInformation(image)
    sitk.WriteImage(label, str(raw / "a_label.nrrd"))
    v = read_itk(raw / "a_image.mha")
    np.testing.assert_array_equal(v.data, hu.transpose(2, 1, 0))
    assert v.zooms == (0.5, 0.6, 3.0) and nib.aff2axcodes(v.affine) == ("L", "A", "S")
    np.testing.assert_allclose(v.affine @ [0, 0, 0, 1], [-10, 20, 30, 1])  # LPS origin -> RAS
    section, _ = infer_dataset_section(raw)
    assert section["format"] == "itk"
    case = ingest_dataset({**section, "modality": "ct", "hu_window": [-125, 275]}, raw, tmp_path / "out")["cases"][0]
    assert case["spacing"] == [3.0, 0.6, 0.5] and case["source_axcodes"] == "LAS"
    assert np.load(tmp_path / "out" / "cases" / "a_label.npy").sum() == labels.sum()


@pytest.mark.skipif(not (SHARED / "totalseg_ct_dicom").is_dir(), reason="../shared/data is not here")
def test_the_shared_ct_series_matches_its_totalsegmentator_labels(tmp_path):
    """A real series (JPEG 2000 lossless, LPS) beside its label map stored LAS: paired voxel for voxel."""
    raw = tmp_path / "CT"
    shutil.copytree(SHARED / "totalseg_ct_dicom" / "series", raw / "abdomen")
    (raw / "labels").mkdir()
    shutil.copy(SHARED / "totalseg_ct_dicom" / "totalsegmentator_seg.nii.gz", raw / "labels" / "abdomen.nii.gz")
    section, _ = infer_dataset_section(raw)
    manifest = ingest_dataset(section, raw, tmp_path / "out")
    label = np.load(tmp_path / "out" / "cases" / "abdomen_label.npy")
    truth = nib.as_closest_canonical(nib.load(raw / "labels" / "abdomen.nii.gz")).get_fdata().transpose(2, 1, 0)
    assert np.array_equal(label, truth) and manifest["cases"][0]["spacing"] == [2.0, 0.976562, 0.976562]
    image = np.load(tmp_path / "out" / "cases" / "abdomen_image.npy")
    liver = image[:, 0][label == 5]  # TotalSegmentator's liver, HU windowed [-125, 275] -> [0, 1]
    assert 0.4 < float(np.median(liver)) < 0.7  # ~ 40-150 HU: the rescale intercept (-1024) was applied


@pytest.mark.skipif(not (SHARED / "pyradiomics_nrrd").is_dir(), reason="../shared/data is not here")
def test_the_shared_nrrd_cases_ingest_with_their_header_spacing(tmp_path):
    raw = tmp_path / "nrrd"
    shutil.copytree(SHARED / "pyradiomics_nrrd", raw)
    section, _ = infer_dataset_section(raw)
    manifest = ingest_dataset(section, raw, tmp_path / "out")
    spacing = {c["id"]: c["spacing"] for c in manifest["cases"]}
    assert spacing["brain1"] == [6.5, 0.78125, 0.78125] and set(spacing) == {"brain1", "brain2", "breast1"}


def test_dicom_seg_labels_are_read_on_their_series(tmp_path):
    """labels/<case>.dcm: a DICOM SEG referencing the case's series gives its label map (segment numbers)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    raw = tmp_path / "DICOM"
    hu, labels = phantom_hu(slices=4, rows=16, cols=20)
    labels[2, :3, :3] = 2  # a second segment
    write_series(raw / "pt0", hu)
    series = read_dicom_series(raw / "pt0")
    sources = [pydicom.dcmread(p) for p in series.files]  # position order: labels[k] is slice k
    segments = [hd.seg.SegmentDescription(k, name, codes.SCT.AnatomicalStructure, codes.SCT.Tissue,
                                          hd.seg.SegmentAlgorithmTypeValues.MANUAL) for k, name in ((1, "organ"),
                                                                                                   (2, "lesion"))]
    seg = hd.seg.Segmentation(sources, labels, hd.seg.SegmentationTypeValues.BINARY, segments, hd.UID(), 5,
                              hd.UID(), 1, "a reader", "by hand", "1", "0")
    (raw / "labels").mkdir()
    seg.save_as(raw / "labels" / "pt0.dcm")
    section, _ = infer_dataset_section(raw, fmt="dicom")
    manifest = ingest_dataset({**section, "class_names": ["background", "organ", "lesion"]}, raw, tmp_path / "out")
    stored = np.load(tmp_path / "out" / "cases" / "pt0_label.npy")
    np.testing.assert_array_equal(stored, labels[:, ::-1, ::-1])  # canonical RAS of an LPS series
    assert manifest["cases"][0]["source_label"] == "labels/pt0.dcm"


def test_doctor_lists_a_broken_series_with_its_file(tmp_path, capsys):
    from medseg.data.doctor import run_doctor

    raw = tmp_path / "DICOM"
    for i in range(2):
        hu, labels = phantom_hu(slices=5, rows=8, cols=8, seed=i)
        files = write_series(raw / f"pt{i}", hu, shuffle=False)
        (raw / "labels").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(labels.transpose(2, 1, 0), read_dicom_series(raw / f"pt{i}").volume.affine),
                 raw / "labels" / f"pt{i}.nii.gz")
    files[2].unlink()  # pt1 loses a slice
    params = {"dataset": {"name": "d", "format": "dicom", "raw_dir": str(raw), "modality": "ct",
                          "class_names": ["background", "organ"]}, "train": {"epochs": 400}}
    assert run_doctor(params, tmp_path) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "IM0003.dcm" in out and "gap in the slice positions" in out
