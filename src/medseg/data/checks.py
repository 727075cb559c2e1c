"""Data integrity checks, one function per check, shared by `ingest` (stops at the first problem) and
`medseg.data.doctor` (runs them all and lists every problem).

Every check raises `IngestError(path, problem)`; none of them modifies its input. Volumes are walked in slabs
of the first axis (`slabs`): a whole-volume temporary of a 512 x 512 x 200 CT (a bool mask, a rounded float copy,
int64 indices) would cost as much as the case itself, or 4x more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from medseg.data.preprocessing import slabs  # one slab rule for checks, ingest and normalisation
from medseg.errors import IngestError

AFFINE_ATOL_MM = 1e-3  # image and label grids may differ by float noise, not by a voxel
AFFINE_RTOL = 1e-4


def check_finite(path: str | Path, array: np.ndarray) -> None:
    if not np.issubdtype(array.dtype, np.floating):
        return
    n_nan = n_bad = 0
    for s in slabs(array.shape):
        part = array[s]
        if not np.isfinite(part).all():
            n_nan += int(np.isnan(part).sum())
            n_bad += int((~np.isfinite(part)).sum())
    if n_bad:
        raise IngestError(path, f"contains {n_nan} NaN and {n_bad - n_nan} Inf voxels")


def check_integer_labels(path: str | Path, label: np.ndarray) -> None:
    if not np.issubdtype(label.dtype, np.floating):
        return
    count, example = 0, None
    for s in slabs(label.shape):
        part = label[s]
        frac = part != np.round(part)
        if frac.any():
            count += int(frac.sum())
            example = float(part[frac].flat[0]) if example is None else example
    if count:
        raise IngestError(path, f"label volume has {count} non-integer values (e.g. {example:g})")


def label_values(label: np.ndarray) -> np.ndarray:
    """The distinct values of a label volume, sorted (np.unique of the whole volume would sort a copy of it)."""
    return np.unique(np.concatenate([np.unique(label[s]) for s in slabs(label.shape)]))


def check_same_shape(label_path: str | Path, image_shape: Sequence[int], label_shape: Sequence[int]) -> None:
    if tuple(image_shape) != tuple(label_shape):
        raise IngestError(label_path, f"shape {tuple(label_shape)} != image {tuple(image_shape)}")


def check_affine(label_path: str | Path, image_affine: np.ndarray, label_affine: np.ndarray) -> None:
    if not np.allclose(image_affine, label_affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL_MM):
        diff = float(np.abs(np.asarray(image_affine) - np.asarray(label_affine)).max())
        raise IngestError(label_path, f"affine differs from the image's (max difference {diff:.4g} mm)")


def check_not_single_slice(path: str | Path, num_slices: int) -> None:
    """A 3D volume with one slice is almost always a broken export (or a 2D image in a 3D format)."""
    if num_slices < 2:
        raise IngestError(path, "3D volume has a single slice (use format folder2d for 2D images)")


def check_mask_channels(path: str | Path, mask: np.ndarray) -> np.ndarray:
    """Reduce an (H, W, C) mask to (H, W); colour masks are refused unless every channel is equal."""
    if mask.ndim == 2:
        return mask
    if mask.ndim == 3:
        colour = mask[..., :3]
        if mask.shape[-1] == 4 and (mask[..., 3] == 0).any():
            raise IngestError(path, "RGBA mask has transparent pixels; save masks as greyscale PNG")
        if (colour != colour[..., :1]).any():
            raise IngestError(path, "RGB mask with differing channels; masks must be greyscale class indices")
        return colour[..., 0]
    raise IngestError(path, f"mask has {mask.ndim} dimensions, expected 2")


def map_labels(
    path: str | Path,
    label: np.ndarray,
    num_classes: int,
    label_map: Mapping[int, int] | None = None,
    unmapped: str = "background",
) -> np.ndarray:
    """Raw label values -> class indices (uint8), refusing values that do not belong to any class.

    With a label_map: listed raw values map to their class, 0 stays background, other values become
    background (unmapped="background") or an error (unmapped="error"). Without one: values must be < num_classes.
    """
    check_integer_labels(path, label)
    values = label_values(label).astype(np.int64)
    if values.size and values.min() < 0:
        raise IngestError(path, f"negative label values {values[values < 0].tolist()}")
    if not label_map:
        bad = values[values >= num_classes]
        if bad.size:
            raise IngestError(
                path, f"label values {bad.tolist()} outside the {num_classes} declared classes (0..{num_classes - 1})"
            )
        return np.ascontiguousarray(label, dtype=np.uint8)
    known = {int(k) for k in label_map} | {0}
    unknown = [int(v) for v in values if int(v) not in known]
    if unknown and unmapped == "error":
        raise IngestError(path, f"label values {unknown} are not in dataset.label_map (unmapped_labels=error)")
    lut = np.zeros(int(max(values.max(initial=0), max(known))) + 1, dtype=np.uint8)
    for raw, cls in label_map.items():
        lut[int(raw)] = int(cls)
    out = np.empty(label.shape, dtype=np.uint8)
    for s in slabs(label.shape):  # int64 indices for the whole volume would be 8 bytes a voxel
        part = label[s]
        out[s] = lut[part if part.dtype.kind in "ui" else part.astype(np.intp)]
    return out


def check_label_map(label_map: Mapping[int, int] | None, num_classes: int, where: str = "dataset.label_map") -> None:
    """The map itself must point into the declared classes (a config mistake, reported as such)."""
    from medseg.errors import ConfigError

    for raw, cls in (label_map or {}).items():
        if not (0 <= int(cls) < num_classes):
            raise ConfigError(f"{where}: raw value {raw} maps to class {cls}, outside 0..{num_classes - 1}")
