"""Raw dataset -> `data/ingested/<name>/`: per-case memory-mappable arrays, cases.json, fingerprint.json.

Per case: read (adapter in `medseg.data.formats`), check (`medseg.data.checks`), remap labels to class
indices, normalise intensities (`medseg.data.preprocessing`, recorded in cases.json `normalisation`; ct: HU window ->
[0, 1]; mr: 0.5/99.5 percentile clip then z-score per channel; rgb: /255; TransUNet's npz/h5 are already
windowed to [0, 1] and kept as they are), and store
image float32 (D, C, H, W) + label uint8 (D, H, W). NIfTI volumes arrive in the canonical (RAS+) orientation
(`medseg.data.orientation`); cases.json keeps the source affine, shape and axis codes to write predictions back.
The folder is built with `atomic_dir`: a failing case leaves the previous output (or nothing), never half a dataset.

Memory: one case at a time (its arrays die with `_ingest_case`), and within a case no float32 copy of the whole
volume: the image is normalised and written slab by slab (`medseg.data.checks.slabs`).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data import checks
from medseg.data.archive import ArchiveLimits, dataset_root, is_archive, safe_extract
from medseg.data.fingerprint import FingerprintBuilder
from medseg.data.formats import FORMATS_3D, CaseSource, DatasetSpec, RawCase, dataset_spec, discover, read_case
from medseg.data.orientation import axcodes
from medseg.data.preprocessing import intensity_transform, normalisation_for, normalise_slab
from medseg.errors import ConfigError, IngestError
from medseg.io import atomic_dir, save_npy, sha256_file, write_json
from medseg.layout import OUTPUT_DIRS, PHANTOM_DIR, ProjectLayout
from medseg.runtime.progress import progress

_log = logging.getLogger(__name__)


def load_and_check(case: CaseSource, spec: DatasetSpec) -> tuple[RawCase | None, np.ndarray | None, list[IngestError]]:
    """Read one case and run every check on it.

    Returns (raw case, label as class indices, problems). Ingest stops at the first problem; doctor lists all.
    """
    try:
        raw = read_case(case, spec)
    except IngestError as exc:
        return None, None, [exc]
    image_path = case.images[0]
    label_path = case.label or image_path
    problems: list[IngestError] = []

    def run(check, *args):
        try:
            return check(*args)
        except IngestError as exc:
            problems.append(exc)
            return None

    run(checks.check_finite, image_path, raw.image)
    before = len(problems)
    run(checks.check_finite, label_path, raw.label)
    label_finite = len(problems) == before
    image_dhw = (raw.image.shape[0], raw.image.shape[2], raw.image.shape[3])
    run(checks.check_same_shape, label_path, image_dhw, raw.label.shape)
    if raw.image_affine is not None and raw.label_affine is not None:
        run(checks.check_affine, label_path, raw.image_affine, raw.label_affine)
    if spec.format in FORMATS_3D or case.kind == "h5":
        run(checks.check_not_single_slice, image_path, raw.image.shape[0])
    label = None
    if label_finite:
        label = run(checks.map_labels, label_path, raw.label, spec.num_classes, _label_map(spec), spec.unmapped_labels)
    return raw, label, problems


def _label_map(spec: DatasetSpec) -> dict[int, int] | None:
    # TransUNet's npz/h5 labels are already class indices (its 8-organ order); a raw Synapse map would scramble them.
    return None if spec.format == "transunet" else spec.label_map


def _save_normalised(path: Path, image: np.ndarray, normalisation: dict[str, Any]) -> None:
    """`medseg.data.preprocessing.normalise_image` written straight into an .npy (the same bytes as np.save), one slab
    at a time (no float32 copy of the whole volume)."""
    transform = intensity_transform(image, normalisation)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": image.shape}
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for s in checks.slabs(image.shape):
            fh.write(normalise_slab(image[s], transform).data)


def _relative(path: Path, raw_dir: Path) -> str:
    try:
        return path.resolve().relative_to(raw_dir.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _source(case: CaseSource, raw_dir: Path) -> tuple[str, str]:
    if case.kind == "dicom":  # the series' folder
        return _relative(case.images[0].parent, raw_dir), _relative(case.label, raw_dir)
    if case.kind == "npz_slices":
        first = _relative(case.images[0], raw_dir)
        return str(Path(first).parent / f"{case.id}_slice*.npz"), str(Path(first).parent / f"{case.id}_slice*.npz")
    image = _relative(case.images[0], raw_dir)
    return image, _relative(case.label, raw_dir) if case.label else image


def ingest_dataset(dataset_params: dict[str, Any], raw_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Ingest the dataset at `raw_dir` (a folder, or a .zip/.tar[.gz] archive extracted safely first) into `out_dir`.

    Returns the cases.json content. Raises IngestError naming the first bad file; `out_dir` is then untouched.
    """
    raw_dir = Path(raw_dir)
    if is_archive(raw_dir):
        with tempfile.TemporaryDirectory(prefix="medseg-extract-") as tmp:
            extracted = safe_extract(raw_dir, Path(tmp) / "raw", ArchiveLimits.from_params(dataset_params))
            return _ingest_folder(dataset_params, dataset_root(extracted), Path(out_dir), source=raw_dir)
    return _ingest_folder(dataset_params, raw_dir, Path(out_dir), source=raw_dir)


def _ingest_folder(dataset_params: dict[str, Any], raw_dir: Path, out_dir: Path, source: Path) -> dict[str, Any]:
    spec = dataset_spec(dataset_params, raw_dir)
    checks.check_label_map(spec.label_map, spec.num_classes)
    cases, problems = discover(spec, raw_dir)
    if problems:
        raise problems[0]
    fingerprint = FingerprintBuilder(spec.class_names)
    normalisation = normalisation_for(spec.format, spec.modality, spec.hu_window)
    records = []
    in_channels = None
    with atomic_dir(out_dir) as tmp:
        (tmp / "cases").mkdir()
        for case in progress(cases, desc=f"ingest {spec.name}", unit="case"):
            record, channels = _ingest_case(case, spec, normalisation, raw_dir, tmp, fingerprint, in_channels)
            in_channels = channels
            records.append(record)
        unknown = sum(not r["spacing_known"] for r in records)
        if unknown:
            _log.warning("%s: voxel spacing unknown for %d of %d cases; distances (HD95) will be in voxels, not mm",
                         source, unknown, len(records))
        manifest = {
            "dataset": spec.name,
            "format": spec.format,
            "modality": spec.modality,
            "num_classes": spec.num_classes,
            "class_names": spec.class_names,
            "in_channels": int(in_channels),
            "source": source.name,  # not the absolute path: the manifest must not depend on where the project lives
            "normalisation": normalisation,
            "cases": records,
        }
        write_json(tmp / "cases.json", manifest)
        fp = fingerprint.result()
        fp = {"dataset": spec.name, "modality": spec.modality, "spacing_known": not unknown, **fp}
        write_json(tmp / "fingerprint.json", fp)
    return manifest


def _ingest_case(
    case: CaseSource,
    spec: DatasetSpec,
    normalisation: dict[str, Any],
    raw_dir: Path,
    tmp: Path,
    fingerprint: FingerprintBuilder,
    in_channels: int | None,
) -> tuple[dict[str, Any], int]:
    """Check, normalise and store one case; returns (its cases.json record, its channel count)."""
    raw, label, problems = load_and_check(case, spec)
    if problems:
        raise problems[0]
    channels = raw.image.shape[1]
    if in_channels is not None and channels != in_channels:
        raise IngestError(case.images[0], f"has {channels} channels, earlier cases have {in_channels}")
    spacing = raw.spacing or (1.0, 1.0, 1.0)
    image_rel, label_rel = f"cases/{case.id}_image.npy", f"cases/{case.id}_label.npy"
    _save_normalised(tmp / image_rel, raw.image, normalisation)
    save_npy(tmp / label_rel, label)
    fingerprint.add(raw.image, label, spacing)
    source_image, source_label = _source(case, raw_dir)
    record = {
        "id": case.id,
        "patient": case.patient,
        "shape": [int(s) for s in label.shape],
        "spacing": [float(s) for s in spacing],
        "spacing_known": raw.spacing is not None,
        "affine": _nested(raw.affine),
        "source_affine": _nested(raw.image_affine),
        "source_shape": list(raw.source_shape) if raw.source_shape else None,
        "source_axcodes": axcodes(raw.image_affine) if raw.image_affine is not None else None,
        "image": image_rel,
        "label": label_rel,
        "source_image": source_image,
        "source_label": source_label,
        "source_channels": [_relative(p, raw_dir) for p in case.images] if len(case.images) > 1 and case.kind == "nifti" else None,
        "sha256": sha256_file(tmp / image_rel),
        "label_sha256": sha256_file(tmp / label_rel),
    }
    return record, channels


def _nested(affine: np.ndarray | None) -> list[list[float]] | None:
    return None if affine is None else [[float(v) for v in row] for row in affine]


def ingested_dir(params: dict[str, Any], root: str | Path = ".") -> Path:
    """`<root>/data/ingested/<dataset.name>` (ProjectLayout.ingested), with a clear error without dataset.name."""
    try:
        return ProjectLayout.of(params, root).ingested
    except KeyError as exc:
        raise ConfigError(f"params.yaml: missing key {exc} (dataset.name)") from exc


def raw_dir_from_params(params: dict[str, Any], root: str | Path = ".") -> Path:
    """`dataset.raw_dir` as a path: absolute as given (`~` expanded), else relative to the project root."""
    ds = params.get("dataset") or {}
    if not ds.get("raw_dir"):
        raise ConfigError("params.yaml: dataset.raw_dir is required")
    return Path(root) / Path(str(ds["raw_dir"])).expanduser()


def check_outside_raw(out_dir: str | Path, raw_dir: str | Path) -> None:
    """Refuse an output that is, holds or lies inside the raw dataset: medseg only ever reads a user's data."""
    out, raw = Path(out_dir).resolve(), Path(raw_dir).resolve()
    if out == raw or raw in out.parents or out in raw.parents:
        raise ConfigError(
            f"{out_dir}: output overlaps the raw dataset {raw_dir} (dataset.raw_dir); medseg never writes there. "
            "Keep the raw data outside data/ingested/ or rename dataset.name"
        )


# Folders that are DVC stage outputs (DVC deletes an output before its stage runs) or medseg's own: no place
# for a user's raw data. The phantom's folder is a raw dataset, but only ever the built-in one.
PHANTOM_RAW_DIR = PHANTOM_DIR.as_posix()


def check_raw_dir_is_not_an_output(raw_dir: str | Path, root: str | Path = ".", builtin_ok: bool = True) -> None:
    """Refuse a raw dataset inside a folder that a stage replaces: there it would be deleted by the next run."""
    raw, root = Path(raw_dir).resolve(), Path(root).resolve()
    reserved = [*OUTPUT_DIRS, *(() if builtin_ok else (PHANTOM_RAW_DIR,))]
    for rel in reserved:
        folder = root / rel
        if raw == folder or folder in raw.parents:
            raise ConfigError(
                f"{raw_dir}: raw data inside {rel}/, which medseg's stages replace on every run; move the data "
                "elsewhere (any folder, inside the project under data/raw/ or outside it) and point dataset.raw_dir there"
            )


def ingest_from_params(params: dict[str, Any], root: str | Path = ".") -> dict[str, Any]:
    """Ingest `dataset.raw_dir` into `<root>/data/ingested/<dataset.name>/`; returns cases.json's content."""
    raw_dir, out_dir = raw_dir_from_params(params, root), ingested_dir(params, root)
    check_raw_dir_is_not_an_output(raw_dir, root)
    check_outside_raw(out_dir, raw_dir)
    return ingest_dataset(params["dataset"], raw_dir, out_dir)
