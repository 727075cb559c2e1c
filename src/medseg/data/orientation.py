"""Voxel orientation: NIfTI volumes to one canonical orientation (nibabel's closest canonical, RAS+) and back.

Only flips and axis permutations (never a resampling), chosen by `nib.orientations.io_orientation` exactly as
`nib.as_closest_canonical` does, so `from_canonical(to_canonical(x, A)[0], A)` is `x` bit for bit: a prediction
made on the canonical arrays can be written back voxel for voxel in the source file's orientation. The data keep
NIfTI's axis order (x, y, z[, channels]); the results are views, not copies.
"""

from __future__ import annotations

import numpy as np

CANONICAL = "RAS"


def _orientation(affine: np.ndarray) -> np.ndarray:
    """(3, 2) ornt of io_orientation: row i = (canonical axis of voxel axis i, +1 or -1 for a flip)."""
    from nibabel import orientations

    ornt = orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    if np.isnan(ornt).any():  # a zero column: the affine does not say where an axis points
        raise ValueError(f"affine has no orientation for voxel axis {int(np.isnan(ornt[:, 0]).argmax())}")
    return ornt


def axcodes(affine: np.ndarray) -> str:
    """Where the voxel axes point, e.g. "RAS" or "LPS" (nibabel's aff2axcodes, closest axes for oblique affines)."""
    from nibabel import orientations

    return "".join(orientations.ornt2axcodes(_orientation(affine)))


def to_canonical(data_xyz: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data in canonical RAS+ voxel order, its affine, the ornt applied); trailing axes beyond 3 are kept.

    ValueError for an affine without an orientation (the caller names the file).
    """
    from nibabel import orientations

    ornt = _orientation(affine)
    canonical = orientations.apply_orientation(data_xyz, ornt)
    canonical_affine = np.asarray(affine, dtype=np.float64) @ orientations.inv_ornt_aff(ornt, data_xyz.shape[:3])
    return canonical, canonical_affine, ornt


def from_canonical(data_canonical: np.ndarray, source_affine: np.ndarray) -> np.ndarray:
    """The exact inverse of `to_canonical`: canonical data back in the voxel order of the file with `source_affine`."""
    from nibabel import orientations

    back = orientations.ornt_transform(orientations.axcodes2ornt(CANONICAL), _orientation(source_affine))
    return orientations.apply_orientation(data_canonical, back)


def canonical_zooms(zooms_xyz: tuple[float, float, float], ornt: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes of the source axes, reordered to follow the canonical axes (x, y, z)."""
    out = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(ornt):
        out[int(target)] = float(zooms_xyz[axis])
    return out[0], out[1], out[2]
