"""`medseg predict` on clinical formats: a DICOM series gives a DICOM SEG (valid for dciodvfy, the same labels as
the NIfTI path, referencing its series), an NRRD/MHA volume gives labels in its own format and grid."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dicom_series import PATIENT_ID, phantom_hu, write_series

from medseg.data.clinical import read_dicom_series, read_itk
from medseg.deployment.dicom_seg import read_segmentation
from medseg.deployment.predict import load_predictor, predict_files
from medseg.errors import PredictError

from conftest import snapshot, trained_project


@pytest.fixture(scope="module")
def model(tiny_project, tmp_path_factory) -> Path:
    root, _ = trained_project(tiny_project, tmp_path_factory.mktemp("clinical") / "project")
    return root / "models" / "unet" / "model.onnx"


def _nifti_of_series(folder: Path, out: Path) -> Path:
    """The series as a NIfTI file (its own voxel order and affine): what a user would convert it to."""
    volume = read_dicom_series(folder).volume
    nib.save(nib.Nifti1Image(volume.data.astype(np.int16), volume.affine), out)
    return out


def test_a_dicom_series_gives_a_valid_seg_with_the_labels_of_the_nifti_path(model, tmp_path):
    import pydicom

    hu, _ = phantom_hu(slices=6, rows=48, cols=40)
    files = write_series(tmp_path / "in" / "ct1", hu)
    before = snapshot(tmp_path / "in")
    predictor = load_predictor(model)
    (summary,) = predict_files(predictor, tmp_path / "in", tmp_path / "out")
    seg_path = tmp_path / "out" / "ct1_seg.dcm"
    assert summary["output"] == str(seg_path) and snapshot(tmp_path / "in") == before  # the series is untouched
    # the same classes as `medseg predict` on the series converted to NIfTI, voxel for voxel
    nifti = _nifti_of_series(tmp_path / "in" / "ct1", tmp_path / "ct1.nii.gz")
    predict_files(predictor, nifti, tmp_path / "nifti_out", labels="index")
    expected = np.asarray(nib.load(tmp_path / "nifti_out" / "ct1.nii.gz").dataobj)
    back = read_segmentation(seg_path, tmp_path / "in" / "ct1")
    assert back.shape == expected.shape and np.array_equal(back, expected) and expected.max() > 0
    seg, source = pydicom.dcmread(seg_path), pydicom.dcmread(files[0])
    card = predictor.card
    assert seg.Modality == "SEG" and seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == card.class_names[1:]
    import highdicom as hd

    colours = [hd.color.CIELabColor.from_dicom_value(s.RecommendedDisplayCIELabValue).to_rgb()
               for s in seg.SegmentSequence]
    assert card.class_colours is not None and all(
        max(abs(a - b) for a, b in zip(got, card.class_colours[k + 1])) <= 2 for k, got in enumerate(colours))
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == f"medseg {card.arch}"
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert seg.PatientID == PATIENT_ID  # filed under the source's patient, as a PACS expects
    # medseg's own output: a rerun with --continue keeps it; a foreign file of that name is never replaced
    assert predict_files(predictor, tmp_path / "in", tmp_path / "out", resume=True)[0]["skipped"]
    seg_path.write_bytes(files[0].read_bytes())  # somebody's image in the way
    with pytest.raises(PredictError, match="ct1_seg.dcm: exists and is not medseg's prediction"):
        predict_files(predictor, tmp_path / "in", tmp_path / "out")


def test_the_seg_passes_dciodvfy(model, tmp_path):
    """dicom3tools' validator finds no error in the SEG (the source series carry none either)."""
    from services import unavailable

    if shutil.which("dciodvfy") is None:
        unavailable("dciodvfy is not installed (Debian: apt-get install dicom3tools)")
    hu, _ = phantom_hu(slices=5, rows=48, cols=40)
    write_series(tmp_path / "in" / "ct2", hu)
    (summary,) = predict_files(load_predictor(model), tmp_path / "in", tmp_path / "out")
    report = subprocess.run(["dciodvfy", summary["output"]], capture_output=True, text=True)
    text = report.stdout + report.stderr
    assert "Segmentation" in text and "Error" not in text, text[-3000:]


def test_a_series_without_uids_is_refused_before_anything_is_written(model, tmp_path):
    import pydicom

    hu, _ = phantom_hu(slices=4, rows=48, cols=40)
    for path in write_series(tmp_path / "in" / "anon", hu):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ""  # as the shared TotalSegmentator series: de-identified down to its UIDs
        ds.save_as(path)
    with pytest.raises(PredictError, match="anon: the series has no SOPInstanceUID: a DICOM SEG must reference"):
        predict_files(load_predictor(model), tmp_path / "in", tmp_path / "out")
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_and_mha_give_labels_in_their_own_format_and_grid(model, tmp_path, suffix):
    import SimpleITK as sitk

    hu, _ = phantom_hu(slices=6, rows=48, cols=40)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.7, 0.7, 3.0))
    image.SetOrigin((12.0, -30.0, 4.0))
    image.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    (tmp_path / "in").mkdir()
    sitk.WriteImage(image, str(tmp_path / "in" / f"scan{suffix}"))
    predictor = load_predictor(model)
    (summary,) = predict_files(predictor, tmp_path / "in", tmp_path / "out", labels="index")
    out = tmp_path / "out" / f"scan{suffix}"
    assert summary["output"] == str(out)
    written = sitk.ReadImage(str(out))
    assert written.GetSpacing() == image.GetSpacing() and written.GetOrigin() == image.GetOrigin()
    assert written.GetDirection() == image.GetDirection()
    volume = read_itk(tmp_path / "in" / f"scan{suffix}")
    nib.save(nib.Nifti1Image(volume.data, volume.affine), tmp_path / "scan.nii.gz")
    predict_files(predictor, tmp_path / "scan.nii.gz", tmp_path / "nifti_out", labels="index")
    expected = np.asarray(nib.load(tmp_path / "nifti_out" / "scan.nii.gz").dataobj)
    np.testing.assert_array_equal(read_itk(out).data, expected)
    assert predict_files(predictor, tmp_path / "in", tmp_path / "out", resume=True)[0]["skipped"]
