"""Clinical volume formats read as NIfTI is read: NRRD/MHA/MHD (SimpleITK, as nnU-Net reads them) and DICOM series
(pydicom), each as a `NiftiVolume` (data in NIfTI's (x, y, z) voxel order, a RAS+ affine, zooms), so ingest, doctor
and predict treat them like any volume (canonical orientation, spacing from the header).

A DICOM series is checked before its voxels are trusted; each problem is an IngestError naming a file: a file that
is not DICOM, slices of another series (mixed SeriesInstanceUID), missing geometry, orientation, pixel spacing or
size that differ between slices, an oblique stack (ImageOrientationPatient not along the patient axes), two slices at
one position (duplicates), a gap in the slice positions (a missing slice), a compressed transfer syntax with no
decoder installed. Slices are ordered by their position along the slice normal (never by InstanceNumber or file
name), rescale slope and intercept applied. Only the geometry and pixel data are read: no patient attribute leaves
this module into medseg's records (`DicomSeries.headers`, the slices' headers without pixel data, serve a DICOM SEG
that references the series and belongs to its patient).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import IngestError

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ORIENTATION_TOLERANCE = 1e-4  # direction cosines that differ by less are the same orientation
OBLIQUE_TOLERANCE = 1e-3  # a direction cosine further than this from 0 or +-1 makes the stack oblique
GAP_TOLERANCE = 0.1  # a slice step more than 10 % off the median step is a gap (or an irregular stack)
DECODERS_HINT = "pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg (or python-gdcm)"


@dataclass
class NiftiVolume:
    """One volume as stored: data in NIfTI's axis order (x, y, z[, c]), a RAS+ affine, header zooms (NIfTI files
    as they are; NRRD/MHA/MHD and DICOM series converted from LPS)."""

    data: np.ndarray
    affine: np.ndarray
    zooms: tuple[float, ...]
    spacing_known: bool


def require(module: str) -> Any:
    """`module` (pydicom, highdicom, SimpleITK), or ModuleNotFoundError naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"clinical formats (DICOM, NRRD/MHA) need {module!r}, which is not installed: "
                                  f"pip install 'medseg[dicom]'", name=module) from exc


def is_itk_file(path: str | Path) -> bool:
    return str(path).lower().endswith(ITK_SUFFIXES)


def read_itk(path: str | Path) -> NiftiVolume:
    """An NRRD/MHA/MHD file as a NiftiVolume: voxels in (x, y, z) order, the RAS+ affine from
    its LPS direction, origin and spacing."""
    sitk = require("SimpleITK")
    path = Path(path)
    try:
        image = sitk.ReadImage(str(path))
    except Exception as exc:  # SimpleITK raises RuntimeError with its own message
        raise IngestError(path, f"cannot read {path.suffix.lstrip('.').upper()} ({_first_line(exc)})") from exc
    if image.GetDimension() not in (2, 3):
        raise IngestError(path, f"expected a 2D or 3D image, got {image.GetDimension()} dimensions")
    array = sitk.GetArrayFromImage(image)  # (z, y, x[, c]) or (y, x[, c])
    if image.GetDimension() == 2:
        array = array[None]
    data = np.moveaxis(array, [0, 1, 2], [2, 1, 0])  # (x, y, z[, c])
    spacing = list(image.GetSpacing()) + [1.0] * (3 - image.GetDimension())
    origin = list(image.GetOrigin()) + [0.0] * (3 - image.GetDimension())
    direction = np.eye(3)
    d = np.asarray(image.GetDirection(), dtype=np.float64)
    n = image.GetDimension()
    direction[:n, :n] = d.reshape(n, n)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = origin
    zooms = tuple(round(float(s), 6) for s in spacing)
    return NiftiVolume(np.ascontiguousarray(data), LPS_TO_RAS @ affine, zooms, True)


def write_itk_like(labels_xyz: np.ndarray, reference: str | Path, out: str | Path,
                   metadata: dict[str, str] | None = None) -> None:
    """Labels (x, y, z) in the voxel grid of the NRRD/MHA/MHD file `reference`, written to `out` (its format from
    the suffix) with the reference's spacing, origin and direction, and `metadata` as header fields."""
    sitk = require("SimpleITK")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(reference))
    reader.ReadImageInformation()  # the geometry only: the voxels were read before
    array = np.moveaxis(np.asarray(labels_xyz), [0, 1, 2], [2, 1, 0])
    if reader.GetDimension() == 2:
        array = array[0]
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(reader.GetSpacing())
    image.SetOrigin(reader.GetOrigin())
    image.SetDirection(reader.GetDirection())
    for key, value in (metadata or {}).items():
        image.SetMetaData(key, value)
    sitk.WriteImage(image, str(out), useCompression=True)


def itk_metadata(path: str | Path) -> dict[str, str]:
    """The header fields of an NRRD/MHA/MHD file (no voxels read)."""
    sitk = require("SimpleITK")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}


def is_dicom_file(path: str | Path) -> bool:
    """Whether `path` starts like a DICOM Part 10 file (128-byte preamble, then "DICM")."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


@dataclass(frozen=True)
class DicomSeries:
    """A checked DICOM series: the volume, its files and their headers (no pixel data) in slice order."""

    volume: NiftiVolume
    files: list[Path]  # in slice order (along the slice normal)
    headers: list[Any]  # pydicom Datasets read without pixel data, in the same order


def series_files(folder: Path) -> list[Path]:
    """The files of a series folder (hidden files and DICOMDIR left out)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR")


def read_dicom_series(folder: str | Path, files: list[Path] | None = None) -> DicomSeries:
    """The one series in `folder` (or in `files`), checked (see the module docstring)."""
    headers, normal, step = series_headers(folder, files)
    ds0 = headers[0][1]
    iop = np.asarray([float(v) for v in ds0.ImageOrientationPatient], dtype=np.float64)
    spacing0 = [float(v) for v in ds0.PixelSpacing]
    slices = [_pixels(path) for path, _ in headers]
    volume = np.stack(slices, axis=-1).transpose(1, 0, 2)  # (rows i, cols j, k) -> NIfTI (x = j, y = i, z = k)
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * spacing0[1]
    affine[:3, 1] = iop[3:] * spacing0[0]
    affine[:3, 2] = normal * step
    affine[:3, 3] = [float(v) for v in ds0.ImagePositionPatient]
    zooms = (round(spacing0[1], 6), round(spacing0[0], 6), round(step, 6))
    return DicomSeries(NiftiVolume(volume, LPS_TO_RAS @ affine, zooms, True), [p for p, _ in headers],
                       [ds for _, ds in headers])


def series_headers(folder: str | Path, files: list[Path] | None = None
                   ) -> tuple[list[tuple[Path, Any]], np.ndarray, float]:
    """(the (file, header without pixel data) of each slice in position order, the slice normal, the slice step)
    of the one series in `folder` (or in `files`), checked: what read_dicom_series builds on, without decoding a
    pixel."""
    pydicom = require("pydicom")

    folder = Path(folder)
    files = series_files(folder) if files is None else list(files)
    if not files:
        raise IngestError(folder, "no DICOM files in this series folder")
    headers = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # InvalidDicomError, truncated files, ...
            raise IngestError(path, f"not a DICOM file ({_first_line(exc)})") from exc
        headers.append((path, ds))
    _check_one_series(folder, headers)
    ds0 = headers[0][1]
    iop = np.asarray([float(v) for v in ds0.ImageOrientationPatient], dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    positions = np.asarray([np.dot(normal, [float(v) for v in ds.ImagePositionPatient]) for _, ds in headers])
    order = np.argsort(positions, kind="stable")
    headers = [headers[i] for i in order]
    positions = positions[order]
    steps = np.diff(positions)
    if len(steps):
        same = np.flatnonzero(steps < 1e-3)
        if len(same):
            i = int(same[0])
            raise IngestError(headers[i + 1][0], f"duplicated slice: at the same position ({positions[i]:.3f} mm "
                                                 f"along the normal) as {headers[i][0].name}")
        median = float(np.median(steps))
        off = np.flatnonzero(np.abs(steps - median) > GAP_TOLERANCE * median)
        if len(off):
            i = int(off[0])
            raise IngestError(headers[i + 1][0], f"gap in the slice positions: {steps[i]:.3f} mm after "
                                                 f"{headers[i][0].name}, where the series steps {median:.3f} mm "
                                                 f"(a missing or extra slice)")
        step = median
    else:
        step = float(ds0.get("SpacingBetweenSlices") or ds0.get("SliceThickness") or 1.0)
    return headers, normal, step


def read_seg_labels(seg_path: str | Path, series: DicomSeries) -> np.ndarray:
    """The segment numbers of a DICOM SEG (labelled 1..n; 0 outside every segment) in the voxel order of its
    source `series` (x, y, z): a label map from a SEG, for ingest and for checks. Frames that reference no slice of
    the series, or overlapping segments, are errors naming the SEG."""
    hd = require("highdicom")
    uids = [str(ds.SOPInstanceUID) for ds in series.headers]
    try:
        seg = hd.seg.segread(str(seg_path))
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    except Exception as exc:  # not a SEG, another series, overlapping segments
        raise IngestError(seg_path, f"cannot read its segments on series {series.files[0].parent.name} "
                                    f"({_first_line(exc)})") from exc
    return np.asarray(pixels).transpose(2, 1, 0)


def _check_one_series(folder: Path, headers: list[tuple[Path, Any]]) -> None:
    """One series of single-frame slices with geometry, the same orientation, spacing and size on every slice, not
    oblique; IngestError naming the file otherwise."""
    series = {str(ds.get("SeriesInstanceUID", "") or "") for _, ds in headers}
    if len(series) > 1:
        first = {}
        for path, ds in headers:
            first.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), path)
        names = ", ".join(p.name for p in list(first.values())[:3])
        raise IngestError(folder, f"holds {len(series)} series (mixed SeriesInstanceUID, e.g. {names}); give each "
                                  f"series its own folder")
    for path, ds in headers:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise IngestError(path, "a multi-frame (enhanced) DICOM image: only single-frame series are read")
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
                   if ds.get(k) in (None, "")]
        if missing:
            raise IngestError(path, f"missing {', '.join(missing)}: not a volume slice")
    path0, ds0 = headers[0]
    iop = np.asarray([float(v) for v in ds0.ImageOrientationPatient], dtype=np.float64)
    spacing0 = [float(v) for v in ds0.PixelSpacing]
    size0 = (int(ds0.Rows), int(ds0.Columns))
    for path, ds in headers[1:]:
        if np.abs(np.asarray([float(v) for v in ds.ImageOrientationPatient]) - iop).max() > ORIENTATION_TOLERANCE:
            found = [float(v) for v in ds.ImageOrientationPatient]
            raise IngestError(path, f"ImageOrientationPatient {found} differs from {path0.name}'s {iop.tolist()}: "
                                    f"inconsistent orientation")
        if np.abs(np.asarray([float(v) for v in ds.PixelSpacing]) - spacing0).max() > 1e-4:
            raise IngestError(path, f"PixelSpacing {[float(v) for v in ds.PixelSpacing]} differs from "
                                    f"{path0.name}'s {spacing0}: inconsistent spacing")
        if (int(ds.Rows), int(ds.Columns)) != size0:
            raise IngestError(path, f"{ds.Rows}x{ds.Columns} pixels, {path0.name} has {size0[0]}x{size0[1]}")
    if np.abs(np.abs(iop) - np.round(np.abs(iop))).max() > OBLIQUE_TOLERANCE:
        raise IngestError(path0, f"an oblique stack (ImageOrientationPatient {iop.round(4).tolist()} is not along "
                                 f"the patient axes): resample it to an axial, coronal or sagittal grid first")


def _pixels(path: Path) -> np.ndarray:
    """One slice's stored values with rescale slope and intercept applied (float32), rows x columns."""
    pydicom = require("pydicom")

    ds = pydicom.dcmread(path)
    try:
        array = ds.pixel_array
    except Exception as exc:  # no handler for the transfer syntax, or a corrupt stream
        syntax = ds.file_meta.get("TransferSyntaxUID")
        name = getattr(syntax, "name", str(syntax))
        raise IngestError(path, f"cannot decode its pixel data (transfer syntax {name}): {_first_line(exc)}; "
                                f"a compressed series needs a decoder: {DECODERS_HINT}") from exc
    if array.ndim != 2:
        raise IngestError(path, f"pixel data of shape {array.shape}: expected one greyscale frame")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return array.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
