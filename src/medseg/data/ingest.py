"""Raw dataset -> `data/ingested/<name>/`: per-case memory-mappable arrays, cases.json, fingerprint.json.

Per case: read (adapter in `medseg.data.formats`), check (`medseg.data.checks`), remap labels to class
indices, normalise intensities (ct: HU window -> [0, 1]; mr: 0.5/99.5 percentile clip then z-score per channel;
rgb: /255; TransUNet's npz/h5 are already windowed to [0, 1] and kept as they are), and store
image float32 (D, C, H, W) + label uint8 (D, H, W). The folder is built with `atomic_dir`: a failing case
leaves the previous output (or nothing), never half a dataset.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medseg.data import checks
from medseg.data.archive import dataset_root, is_archive, safe_extract
from medseg.data.fingerprint import FingerprintBuilder
from medseg.data.formats import FORMATS_3D, CaseSource, DatasetSpec, RawCase, dataset_spec, discover, read_case
from medseg.errors import ConfigError, IngestError
from medseg.io import atomic_dir, save_npy, sha256_file, write_json

MR_PERCENTILES = (0.5, 99.5)


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
    run(checks.check_finite, label_path, raw.label)
    image_dhw = (raw.image.shape[0], raw.image.shape[2], raw.image.shape[3])
    run(checks.check_same_shape, label_path, image_dhw, raw.label.shape)
    if raw.image_affine is not None and raw.label_affine is not None:
        run(checks.check_affine, label_path, raw.image_affine, raw.label_affine)
    if spec.format in FORMATS_3D or case.kind == "h5":
        run(checks.check_not_single_slice, image_path, raw.image.shape[0])
    label = None
    if not np.issubdtype(raw.label.dtype, np.floating) or np.isfinite(raw.label).all():
        label = run(checks.map_labels, label_path, raw.label, spec.num_classes, _label_map(spec), spec.unmapped_labels)
    return raw, label, problems


def _label_map(spec: DatasetSpec) -> dict[int, int] | None:
    # TransUNet's npz/h5 labels are already class indices (its 8-organ order); a raw Synapse map would scramble them.
    return None if spec.format == "transunet" else spec.label_map


def normalise_image(image: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """Raw intensities (D, C, H, W) -> float32 network input, per `spec.modality`."""
    image = image.astype(np.float32, copy=False)
    if spec.format == "transunet":
        return np.ascontiguousarray(image)  # windowed to [0, 1] by TransUNet's preprocessing
    if spec.modality == "ct":
        lo, hi = spec.hu_window
        return ((np.clip(image, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    if spec.modality == "rgb":
        return (image / 255.0).astype(np.float32)
    out = np.empty_like(image)
    for c in range(image.shape[1]):
        channel = image[:, c]
        lo, hi = np.percentile(channel, MR_PERCENTILES)
        channel = np.clip(channel, lo, hi)
        std = float(channel.std())
        out[:, c] = (channel - float(channel.mean())) / (std if std > 1e-8 else 1.0)
    return out


def _relative(path: Path, raw_dir: Path) -> str:
    try:
        return path.resolve().relative_to(raw_dir.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _source(case: CaseSource, raw_dir: Path) -> tuple[str, str]:
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
            extracted = safe_extract(raw_dir, Path(tmp) / "raw")
            return _ingest_folder(dataset_params, dataset_root(extracted), Path(out_dir), source=raw_dir)
    return _ingest_folder(dataset_params, raw_dir, Path(out_dir), source=raw_dir)


def _ingest_folder(dataset_params: dict[str, Any], raw_dir: Path, out_dir: Path, source: Path) -> dict[str, Any]:
    spec = dataset_spec(dataset_params, raw_dir)
    checks.check_label_map(spec.label_map, spec.num_classes)
    cases, problems = discover(spec, raw_dir)
    if problems:
        raise problems[0]
    fingerprint = FingerprintBuilder(spec.class_names)
    records = []
    in_channels = None
    with atomic_dir(out_dir) as tmp:
        (tmp / "cases").mkdir()
        for case in tqdm(cases, desc=f"ingest {spec.name}", unit="case", disable=None):
            raw, label, problems = load_and_check(case, spec)
            if problems:
                raise problems[0]
            channels = raw.image.shape[1]
            if in_channels is None:
                in_channels = channels
            elif channels != in_channels:
                raise IngestError(case.images[0], f"has {channels} channels, earlier cases have {in_channels}")
            spacing = raw.spacing or (1.0, 1.0, 1.0)
            image = normalise_image(raw.image, spec)
            image_rel, label_rel = f"cases/{case.id}_image.npy", f"cases/{case.id}_label.npy"
            save_npy(tmp / image_rel, image)
            save_npy(tmp / label_rel, label)
            fingerprint.add(raw.image, label, spacing)
            source_image, source_label = _source(case, raw_dir)
            records.append(
                {
                    "id": case.id,
                    "patient": case.patient,
                    "shape": [int(s) for s in label.shape],
                    "spacing": [float(s) for s in spacing],
                    "spacing_known": raw.spacing is not None,
                    "image": image_rel,
                    "label": label_rel,
                    "source_image": source_image,
                    "source_label": source_label,
                    "source_channels": [_relative(p, raw_dir) for p in case.images] if len(case.images) > 1 and case.kind == "nifti" else None,
                    "sha256": sha256_file(tmp / image_rel),
                    "label_sha256": sha256_file(tmp / label_rel),
                }
            )
        manifest = {
            "dataset": spec.name,
            "format": spec.format,
            "modality": spec.modality,
            "num_classes": spec.num_classes,
            "class_names": spec.class_names,
            "in_channels": int(in_channels),
            "source": source.name,  # not the absolute path: the manifest must not depend on where the project lives
            "normalisation": _normalisation(spec),
            "cases": records,
        }
        write_json(tmp / "cases.json", manifest)
        fp = fingerprint.result()
        fp = {"dataset": spec.name, "modality": spec.modality, "spacing_known": all(r["spacing_known"] for r in records), **fp}
        write_json(tmp / "fingerprint.json", fp)
    return manifest


def _normalisation(spec: DatasetSpec) -> dict[str, Any]:
    if spec.format == "transunet":
        return {"method": "none", "note": "TransUNet data is pre-windowed to [0, 1]"}
    if spec.modality == "ct":
        return {"method": "hu_window", "window": list(spec.hu_window)}
    if spec.modality == "mr":
        return {"method": "percentile_clip_zscore", "percentiles": list(MR_PERCENTILES)}
    return {"method": "divide_255"}


def ingested_dir(params: dict[str, Any], root: str | Path = ".") -> Path:
    """`<root>/data/ingested/<dataset.name>`."""
    try:
        return Path(root) / "data" / "ingested" / str(params["dataset"]["name"])
    except KeyError as exc:
        raise ConfigError(f"params.yaml: missing key {exc} (dataset.name)") from exc


def ingest_from_params(params: dict[str, Any], root: str | Path = ".") -> dict[str, Any]:
    """Ingest `<root>/<dataset.raw_dir>` into `<root>/data/ingested/<dataset.name>/`; returns cases.json's content."""
    ds = params.get("dataset") or {}
    if "raw_dir" not in ds:
        raise ConfigError("params.yaml: dataset.raw_dir is required")
    return ingest_dataset(ds, Path(root) / ds["raw_dir"], ingested_dir(params, root))
