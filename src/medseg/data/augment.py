"""The training augmentation, drawn per item and applied per batch: flips and rot90 as index operations on groups
of items of one kind, rotations by grid_sample, intensity jitter; on the CPU or on the training device.

Each item's augmentation is one row of a table (`draw_augmentation`, from a generator seeded by (seed, epoch,
index)), so the same item gets the same augmentation whatever the batch, the number of workers or the device
(`apply_augmentation` applies a batch's table).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# One row per item of a batch's augmentation, drawn on the CPU from the item's own generator; any device applies it.
AUG_FLIP_W, AUG_FLIP_H, AUG_ROT90, AUG_ANGLE, AUG_SCALE, AUG_SHIFT = range(6)
AUG_COLUMNS = 6


def draw_augmentation(options: Mapping[str, Any], rng: np.random.Generator, square: bool) -> np.ndarray:
    """What one item's augmentation is: (flip W, flip H, rot90 k, angle in radians or NaN, scale, shift).

    The draws, and their order, are what the per-item augmentation has always used: each transform fires with
    probability p; rot90 takes k in {1, 2, 3} on square slices and 2 otherwise (90/270 would change the shape)."""
    p = float(options.get("p", 0.5))
    row = np.array([0.0, 0.0, 0.0, np.nan, 1.0, 0.0])
    if options.get("flip") and rng.random() < p:
        row[AUG_FLIP_W] = 1
    if options.get("flip") and rng.random() < p:
        row[AUG_FLIP_H] = 1
    if options.get("rot90") and rng.random() < p:
        row[AUG_ROT90] = int(rng.integers(1, 4)) if square else 2
    degrees = float(options.get("rotate_deg") or 0.0)
    if degrees > 0 and rng.random() < p:
        row[AUG_ANGLE] = math.radians(rng.uniform(-degrees, degrees))
    jitter = float(options.get("intensity_jitter") or 0.0)
    if jitter > 0 and rng.random() < p:
        row[AUG_SCALE], row[AUG_SHIFT] = 1.0 + rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)
    return row


def _dihedral(flip_w: bool, flip_h: bool, k: int) -> tuple[tuple[int, ...], bool]:
    """Flip W, then flip H, then rot90 by k, as one flip of some axes followed (or not) by a transpose:
    rot90 k=1 is flip(-1) then transpose, k=2 flip(-2, -1), k=3 flip(-2) then transpose (torch.rot90's own rule),
    and flips compose by parity. One copy of the slice instead of up to three."""
    axes = {-1} if flip_w else set()
    axes ^= {-2} if flip_h else set()
    axes ^= {1: {-1}, 2: {-2, -1}, 3: {-2}}.get(k, set())
    return tuple(sorted(axes)), k in (1, 3)


def apply_augmentation(images: torch.Tensor, labels: torch.Tensor, table: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch, images (B, C, H, W) float and labels (B, H, W) integer, as `table` (B, AUG_COLUMNS) from
    `draw_augmentation` says, in place, on whatever device they are. Item by item, the result equals augmenting
    each slice alone in the order flip W, flip H, rot90, rotate, jitter (bit for bit: flips and rot90 are exact
    index operations, composed into one copy per slice), with the batch's costly parts done once: the rotations
    are a few grid_sample calls (bilinear for the image with border padding, nearest for the label with
    background outside). Returns (images, labels)."""
    rows = table.to("cpu", torch.float64).tolist()
    # Items grouped by whether they rotate and what their flips and rot90 compose to (at most 15 groups): one
    # gather, one flip or transpose and one scatter per group, rather than two copies per item (a batch of 32 was
    # ~100 small copies). A rotated item is gathered once: its flips are taken on the gathered rows and
    # grid_sample writes its result, so it is scattered once too.
    groups: dict[tuple[bool, tuple[int, ...], bool], list[int]] = {}
    for i, (flip_w, flip_h, k, angle, *_rest) in enumerate(rows):
        axes, transpose = _dihedral(flip_w > 0, flip_h > 0, int(k))
        rotate = math.isfinite(angle)
        if rotate or axes or transpose:
            groups.setdefault((rotate, axes, transpose), []).append(i)
    for (rotate, axes, transpose), items in groups.items():
        where = torch.tensor(items, device=images.device)
        moved_images, moved_labels = images.index_select(0, where), labels.index_select(0, where)
        if axes:
            moved_images, moved_labels = moved_images.flip(axes), moved_labels.flip(axes)
        if transpose:  # a view: the scatter (or grid_sample) below reads it as it is, no copy of its own
            moved_images, moved_labels = moved_images.transpose(-2, -1), moved_labels.transpose(-2, -1)
        if rotate:
            moved_images, moved_labels = _rotate(moved_images, moved_labels, [rows[i][AUG_ANGLE] for i in items])
        scatter_rows(images, where, moved_images)
        scatter_rows(labels, where, moved_labels)
    if any(row[AUG_SCALE] != 1.0 or row[AUG_SHIFT] != 0.0 for row in rows):
        # the whole batch in two passes, x * 1 + 0 (exact) for the others: image * scale + shift, two roundings,
        # with float32 factors as a Python float scalar gives them
        factors = torch.tensor([[row[AUG_SCALE], row[AUG_SHIFT]] for row in rows], dtype=images.dtype,
                               device=images.device)[:, :, None, None, None]
        images.mul_(factors[:, 0]).add_(factors[:, 1])
    return images, labels


def scatter_rows(batch: torch.Tensor, where: torch.Tensor, rows: torch.Tensor) -> None:
    """batch[where] = rows along the first axis. On the CPU one copy_ per row: index_copy_ is an
    element-by-element kernel (for 16 uint8 label slices of 224 x 224, 1.26 ms against 0.10 ms as row copies, one
    thread); on a GPU one index_copy_ (one kernel launch rather than one per row)."""
    if batch.device.type != "cpu":
        batch.index_copy_(0, where, rows)
        return
    for row, i in zip(rows, where.tolist()):
        batch[i].copy_(row)


def rotation_grid(height: int, width: int, angle: float | Sequence[float], dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """The sampling grid (B, H, W, 2) of F.affine_grid for rotations by `angle` (one, or one per item) about the
    centre (align_corners=False), written from two coordinate vectors: F.affine_grid's generic batched matmul
    cost 2.5x more and was 40% of an augmented item's time."""
    angles = [float(angle)] if isinstance(angle, (int, float)) else [float(a) for a in angle]
    # cos/sin as float32 factors: the values x * cos gives for a Python float cos
    cos = torch.tensor([math.cos(a) for a in angles], dtype=dtype, device=device)[:, None, None]
    sin = torch.tensor([math.sin(a) for a in angles], dtype=dtype, device=device)[:, None, None]
    x = (torch.arange(width, dtype=dtype, device=device) * 2 + 1) / width - 1  # pixel centres in [-1, 1]
    y = ((torch.arange(height, dtype=dtype, device=device) * 2 + 1) / height - 1)[:, None]
    grid = torch.empty(len(angles), height, width, 2, dtype=dtype, device=device)
    torch.sub(x * cos, y * sin, out=grid[..., 0])
    torch.add(x * sin, y * cos, out=grid[..., 1])
    return grid


def _rotate(images: torch.Tensor, labels: torch.Tensor, angles: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    grid = rotation_grid(images.shape[-2], images.shape[-1], angles, images.dtype, images.device)
    # Corners rotated in from outside take the border value (air / background), not zeros mid-range.
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    rotated = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return images, rotated[:, 0].to(labels.dtype)
