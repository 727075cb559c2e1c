"""Data integrity checks, one function per check, shared by `ingest` (stops at the first problem) and
`medseg.doctor` (runs them all and lists every problem).

Every check raises `IngestError(path, problem)`; none of them modifies its input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from medseg.errors import IngestError

AFFINE_ATOL_MM = 1e-3  # image and label grids may differ by float noise, not by a voxel
AFFINE_RTOL = 1e-4


def check_finite(path: str | Path, array: np.ndarray) -> None:
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            n_nan = int(np.isnan(array).sum())
            raise IngestError(path, f"contains {n_nan} NaN and {int(bad.sum()) - n_nan} Inf voxels")


def check_integer_labels(path: str | Path, label: np.ndarray) -> None:
    if np.issubdtype(label.dtype, np.floating):
        frac = label != np.round(label)
        if frac.any():
            example = float(label[frac].flat[0])
            raise IngestError(path, f"label volume has {int(frac.sum())} non-integer values (e.g. {example:g})")


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
    values = np.unique(label).astype(np.int64)
    if values.size and values.min() < 0:
        raise IngestError(path, f"negative label values {values[values < 0].tolist()}")
    if not label_map:
        bad = values[values >= num_classes]
        if bad.size:
            raise IngestError(
                path, f"label values {bad.tolist()} outside the {num_classes} declared classes (0..{num_classes - 1})"
            )
        return label.astype(np.uint8)
    known = {int(k) for k in label_map} | {0}
    unknown = [int(v) for v in values if int(v) not in known]
    if unknown and unmapped == "error":
        raise IngestError(path, f"label values {unknown} are not in dataset.label_map (unmapped_labels=error)")
    lut = np.zeros(int(max(values.max(initial=0), max(known))) + 1, dtype=np.uint8)
    for raw, cls in label_map.items():
        lut[int(raw)] = int(cls)
    return lut[label.astype(np.int64)]


def check_label_map(label_map: Mapping[int, int] | None, num_classes: int, where: str = "dataset.label_map") -> None:
    """The map itself must point into the declared classes (a config mistake, reported as such)."""
    from medseg.errors import ConfigError

    for raw, cls in (label_map or {}).items():
        if not (0 <= int(cls) < num_classes):
            raise ConfigError(f"{where}: raw value {raw} maps to class {cls}, outside 0..{num_classes - 1}")
