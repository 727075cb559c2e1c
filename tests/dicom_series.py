"""Synthetic DICOM CT series for the tests, written with pydicom: made-up patient identifiers (that no log, report
or artefact may ever show), real UIDs, geometry as asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PATIENT_NAME = "Testpatient^Medsegina"
PATIENT_ID = "MEDSEG-PID-4711"
BIRTH_DATE = "19420817"
ACCESSION = "ACC-0815-MEDSEG"


def write_series(folder: Path, hu: np.ndarray, spacing=(0.8, 0.8), step=2.5, origin=(-100.0, -120.0, 50.0),
                 orientation=(1, 0, 0, 0, 1, 0), *, series_uid: str | None = None, study_uid: str | None = None,
                 frame_uid: str | None = None, series_number: int = 3, shuffle: bool = True,
                 transfer_syntax: str | None = None) -> list[Path]:
    """`hu` (slices, rows, columns) as one CT series in `folder`, one file per slice (in a shuffled file order
    unless told otherwise: a reader must sort by position), stored as uint16 with intercept -1024."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid = series_uid or generate_uid(), study_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    order = np.random.default_rng(0).permutation(len(hu)) if shuffle else np.arange(len(hu))
    paths = []
    for k in range(len(hu)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
        path = folder / f"IM{int(order[k]):04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = PATIENT_NAME, PATIENT_ID, BIRTH_DATE, "F"
        ds.AccessionNumber, ds.StudyID, ds.StudyDate, ds.StudyTime = ACCESSION, "1", "20260101", "120000"
        ds.ReferringPhysicianName = "Referrer^Made^Up"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", series_number, int(k + 1)
        ds.Manufacturer, ds.PositionReferenceIndicator = "medseg tests", ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + normal * step * k]
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.SliceThickness = float(step)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.KVP, ds.AcquisitionNumber = 120, 1
        ds.PixelData = (np.asarray(hu[k]) + 1024).clip(0, 65535).astype(np.uint16).tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def phantom_hu(slices: int = 6, rows: int = 32, cols: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(HU (slices, rows, columns) int16, labels uint8): a bright 'organ' disc (label 1) in noisy soft tissue."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :cols]
    disc = ((yy - rows * 0.4) ** 2 + (xx - cols * 0.6) ** 2) < (min(rows, cols) * 0.25) ** 2
    labels = np.repeat(disc[None], slices, axis=0).astype(np.uint8)
    labels[0] = 0
    hu = rng.normal(40, 10, (slices, rows, cols)) + 120 * labels
    return hu.round().astype(np.int16), labels


def identified_copy(source: Path, dest: Path) -> list[Path]:
    """A copy of a de-identified series (the shared TotalSegmentator CT has no UIDs) given what a PACS needs:
    study, series and instance UIDs, and made-up patient identifiers; pixel data kept as stored (compressed)."""
    import pydicom
    from pydicom.uid import CTImageStorage, generate_uid

    dest.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i, path in enumerate(sorted(p for p in source.iterdir() if p.is_file())):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
        ds.AccessionNumber, ds.SeriesNumber = ACCESSION, 2
        out = dest / f"CT{i:04d}.dcm"
        ds.save_as(out, enforce_file_format=True)
        paths.append(out)
    return paths
