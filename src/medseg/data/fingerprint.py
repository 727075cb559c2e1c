"""Dataset fingerprint (as nnU-Net's): spacings, shapes, foreground intensity statistics, class frequencies.

Built incrementally, one case at a time, so a dataset never has to fit in memory, and each case is read in
slabs (no int64 copy or index array of a whole CT). Intensities are sampled from foreground voxels (label > 0)
of the *raw* image, with a seeded generator, like nnU-Net does.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from medseg.data.checks import slabs

SAMPLES_PER_CASE = 10_000


class FingerprintBuilder:
    def __init__(self, class_names: Sequence[str], num_channels: int | None = None, seed: int = 1234):
        self.class_names = list(class_names)
        self.num_channels = num_channels
        self.rng = np.random.default_rng(seed)
        self.spacings: list[list[float]] = []
        self.shapes: list[list[int]] = []
        self.samples: list[np.ndarray] = []  # per case (n, C) raw foreground intensities
        self.voxels = np.zeros(len(self.class_names), dtype=np.int64)
        self.cases_with = np.zeros(len(self.class_names), dtype=np.int64)

    def add(self, raw_image: np.ndarray, label: np.ndarray, spacing: Sequence[float]) -> None:
        """raw_image (D, C, H, W) before normalisation; label (D, H, W) class indices."""
        self.spacings.append([float(s) for s in spacing])
        self.shapes.append([int(s) for s in label.shape])
        k = len(self.class_names)
        ranges = slabs(label.shape)
        counts = np.zeros(k, dtype=np.int64)
        fg_per_slab = np.zeros(len(ranges), dtype=np.int64)
        for i, s in enumerate(ranges):
            slab_counts = np.bincount(label[s].ravel(), minlength=k)
            counts += slab_counts[:k]
            fg_per_slab[i] = label[s].size - slab_counts[0]
        self.voxels += counts
        self.cases_with += counts > 0
        fg = int(fg_per_slab.sum())
        if fg:
            # Ranks among the foreground voxels in C order: the same draw as rng.choice(np.flatnonzero(label > 0))
            # without an index array of every foreground voxel.
            rank = np.arange(fg) if fg <= SAMPLES_PER_CASE else self.rng.choice(fg, SAMPLES_PER_CASE, replace=False)
            ends = np.cumsum(fg_per_slab)
            slab_of = np.searchsorted(ends, rank, side="right")
            pick = np.empty(rank.size, dtype=np.int64)
            _, h, w = label.shape
            for i in np.unique(slab_of):
                mine = slab_of == i
                local = np.flatnonzero(label[ranges[i]].ravel() > 0)[rank[mine] - (ends[i] - fg_per_slab[i])]
                pick[mine] = ranges[i].start * h * w + local
            z, rest = np.divmod(pick, h * w)
            y, x = np.divmod(rest, w)
            self.samples.append(np.asarray(raw_image[z, :, y, x], dtype=np.float64))

    def result(self) -> dict[str, Any]:
        spacings = np.asarray(self.spacings, dtype=np.float64).reshape(-1, 3)
        shapes = np.asarray(self.shapes, dtype=np.int64).reshape(-1, 3)
        total = int(self.voxels.sum())
        median_spacing = np.median(spacings, axis=0) if len(spacings) else np.ones(3)
        return {
            "num_cases": len(self.shapes),
            "spacing": {
                "median": median_spacing.tolist(),
                "min": spacings.min(axis=0).tolist() if len(spacings) else None,
                "max": spacings.max(axis=0).tolist() if len(spacings) else None,
                "anisotropy": float(median_spacing.max() / median_spacing.min()),
                "all": spacings.tolist(),
            },
            "shape": {
                "median": np.median(shapes, axis=0).tolist() if len(shapes) else None,
                "min": shapes.min(axis=0).tolist() if len(shapes) else None,
                "max": shapes.max(axis=0).tolist() if len(shapes) else None,
                "all": shapes.tolist(),
            },
            "foreground_intensity": self._intensity(),
            "class_voxels": {n: int(v) for n, v in zip(self.class_names, self.voxels)},
            "class_frequency": {n: (int(v) / total if total else 0.0) for n, v in zip(self.class_names, self.voxels)},
            "cases_per_class": {n: int(c) for n, c in zip(self.class_names, self.cases_with)},
        }

    def _intensity(self) -> list[dict[str, float]]:
        """Per channel statistics of the sampled raw foreground intensities (empty when no foreground)."""
        if not self.samples:
            return []
        values = np.concatenate(self.samples, axis=0)
        stats = []
        for c in range(values.shape[1]):
            v = values[:, c]
            p = np.percentile(v, [0.5, 50, 99.5])
            stats.append(
                {
                    "mean": float(v.mean()),
                    "std": float(v.std()),
                    "min": float(v.min()),
                    "max": float(v.max()),
                    "median": float(p[1]),
                    "percentile_00_5": float(p[0]),
                    "percentile_99_5": float(p[2]),
                }
            )
        return stats
