"""medseg's dataset in nnU-Net v2's raw layout, so that nnU-Net trains on exactly what every medseg network does.

Written under the project's `data/nnunet/raw/` (never the user's raw folder), from the raw scans through the same
readers and checks as ingest (`medseg.data.ingest.load_and_check`: raw intensities, canonical orientation, labels
mapped to class indices 0..K-1 by `dataset.label_map`), because nnU-Net normalises intensities itself:

    Dataset<ID>_<name>/
      imagesTr/<case>_<channel:04d>.nii.gz    the split's train and val patients only (nnU-Net's fingerprint and
      labelsTr/<case>.nii.gz                   normalisation statistics never see a test patient)
      imagesTs/<case>_<channel:04d>.nii.gz    the test patients, for prediction
      dataset.json                            channel_names, labels (class name -> index), numTraining, file_ending,
                                              and `medseg` (dataset version, raw label values, the split's sha256)
      splits_final.json                       [0]: medseg's train/val split; [1 + k]: CV fold k's (split.folds)

nnU-Net reads splits_final.json from its preprocessed folder: the training step copies it there after planning.
Volumes keep the canonical (RAS+) affine of the arrays medseg ingests, so spacing and geometry are the scan's; a 2D
image becomes a one-slice volume with 1 mm spacing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import settings
from medseg.data.formats import CaseSource, DatasetSpec, RawCase, dataset_spec, discover
from medseg.data.ingest import load_and_check, raw_dir_from_params
from medseg.data.split import split_sha256
from medseg.deployment.card import dataset_version, inverse_label_map, sha256_of_test_cases
from medseg.errors import ConfigError, IngestError
from medseg.io import atomic_dir, read_json
from medseg.layout import ProjectLayout

FILE_ENDING = ".nii.gz"
DEFAULT_DATASET_ID = 900  # nnU-Net's ids 1-999; the 900s are unused by its published datasets
# nnU-Net picks a normalisation by channel name: CT (dataset-wide foreground percentiles), z-score otherwise,
# rgb_to_0_1 for 8-bit colour pictures.
CHANNEL_NAMES = {"ct": "CT", "mr": "MRI", "rgb": "rgb_to_0_1", "grey": "zscore"}


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's `Dataset<ID:03d>_<name>` (its name part: letters, digits, `_` and `-`)."""
    if not 1 <= int(dataset_id) <= 999:
        raise ConfigError(f"nnU-Net dataset id {dataset_id} must be 1..999")
    return f"Dataset{int(dataset_id):03d}_{re.sub(r'[^A-Za-z0-9_-]', '_', name)}"


def nnunet_splits(split: dict[str, Any]) -> list[dict[str, list[str]]]:
    """splits_final.json from medseg's split file: [0] the train/val split, [1 + k] fold k (train = the other
    folds' development patients). Case ids, as nnU-Net lists them; test cases appear in none."""
    splits = [{"train": sorted(split["train"]), "val": sorted(split["val"])}]
    for fold in split.get("folds") or []:
        splits.append({"train": sorted(fold["train"]), "val": sorted(fold["val"])})
    return splits


def channel_names(spec: DatasetSpec, channels: int) -> dict[str, str]:
    name = CHANNEL_NAMES.get(spec.modality, "zscore")
    return {str(c): name for c in range(channels)}


def raw_scans(params: dict[str, Any], root: str | Path = ".") -> tuple[DatasetSpec, Path, list[CaseSource]]:
    """(the dataset's spec, its raw folder, its cases) as ingest finds them; the first problem is raised."""
    raw_dir = raw_dir_from_params(params, Path(root))
    spec = dataset_spec(params.get("dataset") or {}, raw_dir)
    sources, problems = discover(spec, raw_dir)
    if problems:
        raise problems[0]
    return spec, raw_dir, sources


def raw_case(case: CaseSource, spec: DatasetSpec) -> tuple[RawCase, np.ndarray]:
    """One case's raw scan (canonical (D, C, H, W), raw intensities) and class-index label, checked as ingest does."""
    raw, label, problems = load_and_check(case, spec)
    if problems:
        raise problems[0]
    return raw, label


def write_nnunet_raw(params: dict[str, Any], root: str | Path = ".", dataset_id: int = DEFAULT_DATASET_ID,
                     raw_root: str | Path | None = None) -> Path:
    """Write the dataset, split as medseg split it, in nnU-Net v2's raw layout under `raw_root` (default the
    project's data/nnunet/raw); returns its Dataset folder."""
    import nibabel as nib

    root = Path(root)
    layout = ProjectLayout.of(params, root)
    if not layout.split_file.is_file():
        raise ConfigError(f"{layout.split_file}: not found; run the split stage first")
    spec, raw_dir, sources = raw_scans(params, root)
    split = read_json(layout.split_file)
    development = set(split["train"]) | set(split["val"])
    test = set(split["test"])
    out = Path(raw_root or layout.nnunet_raw) / dataset_folder_name(dataset_id, settings(params).dataset_name)
    channels = None
    with atomic_dir(out) as tmp:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (tmp / sub).mkdir()
        written = 0
        for case in sources:
            if case.id not in development and case.id not in test:
                continue  # a preset's unused cases
            raw, label = raw_case(case, spec)
            channels = raw.image.shape[1] if channels is None else channels
            affine = raw.affine if raw.affine is not None else _affine_of_spacing(raw.spacing)
            images = "imagesTr" if case.id in development else "imagesTs"
            for c in range(raw.image.shape[1]):
                _save(nib, tmp / images / f"{case.id}_{c:04d}{FILE_ENDING}", raw.image[:, c], affine)
            if case.id in development:
                _save(nib, tmp / "labelsTr" / f"{case.id}{FILE_ENDING}", label.astype(_label_dtype(spec)), affine)
                written += 1
        missing = sorted(development - {c.id for c in sources})
        if missing:
            raise IngestError(raw_dir, f"{len(missing)} case(s) of {layout.split_file.name} are not in the raw "
                                       f"dataset (first: {missing[0]}); re-run ingest and split")
        version = dataset_version(layout.cases_json) if layout.cases_json.is_file() else ""
        (tmp / "dataset.json").write_text(json.dumps(
            dataset_json(spec, channels or 1, written, split, version), indent=2), encoding="utf-8")
        (tmp / "splits_final.json").write_text(json.dumps(nnunet_splits(split), indent=2), encoding="utf-8")
    return out


def dataset_json(spec: DatasetSpec, channels: int, num_training: int, split: dict[str, Any],
                 version: str = "") -> dict[str, Any]:
    labels = {"background": 0, **{name: i for i, name in enumerate(spec.class_names) if i > 0}}
    # what a prediction's class indices are written back as: the card's rule (medseg.deployment.card)
    label_values = inverse_label_map(None if spec.format == "transunet" else spec.label_map, spec.num_classes)
    return {
        "channel_names": channel_names(spec, channels),
        "labels": labels,
        "numTraining": num_training,
        "file_ending": FILE_ENDING,
        "name": spec.name,
        "medseg": {"dataset": spec.name, "format": spec.format, "modality": spec.modality,
                   "label_values": label_values, "version": version, "split_sha256": split_sha256(split),
                   "test_cases_sha256": sha256_of_test_cases(split.get("test") or [])},
    }


def _label_dtype(spec: DatasetSpec) -> type:
    return np.uint8 if spec.num_classes <= 255 else np.uint16


def _affine_of_spacing(spacing: tuple[float, float, float] | None) -> np.ndarray:
    sz, sy, sx = spacing or (1.0, 1.0, 1.0)
    return np.diag([sx, sy, sz, 1.0])


def _save(nib, path: Path, volume_dhw: np.ndarray, affine: np.ndarray) -> None:
    """A (D, H, W) canonical array as the NIfTI volume (x, y, z) its affine describes."""
    xyz = np.ascontiguousarray(np.transpose(volume_dhw, (2, 1, 0)))
    image = nib.Nifti1Image(xyz, affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))
