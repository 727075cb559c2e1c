"""Sliding-window inference with Gaussian weighting, as nnU-Net predicts (nnunetv2 2.8's compute_gaussian,
compute_steps_for_sliding_window, predict_sliding_window_return_logits): patch-size tiles at a step of a fraction of
the patch, each tile's logits weighted by a Gaussian centred on it (the border of a tile, where the network saw
the least context, counts least), summed and divided by the summed weights. numpy only: the planned recipe's
inference (medseg.data.plan) and the nnU-Net import (medseg.nnunet.inference) both tile with these functions,
under PyTorch and under ONNX Runtime alike.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

Runner = Callable[[np.ndarray], np.ndarray]
GAUSSIAN_SIGMA_SCALE = 1.0 / 8
GAUSSIAN_PEAK = 10.0


@lru_cache(maxsize=8)
def _gaussian(patch: tuple[int, int]) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1
    weights = gaussian_filter(impulse, [p * GAUSSIAN_SIGMA_SCALE for p in patch], 0, mode="constant", cval=0)
    weights /= np.max(weights) / GAUSSIAN_PEAK
    weights = weights.astype(np.float16)
    weights[weights == 0] = np.min(weights[weights != 0])
    weights.flags.writeable = False
    return weights


def gaussian_weights(patch: Sequence[int]) -> np.ndarray:
    """nnU-Net's compute_gaussian (float16, zeros replaced by the smallest weight); read-only, cached."""
    return _gaussian((int(patch[0]), int(patch[1])))


def tile_starts(size: Sequence[int], patch: Sequence[int], step: float) -> list[list[int]]:
    """nnU-Net's compute_steps_for_sliding_window: per axis, the tile origins covering `size` (>= patch)."""
    starts = []
    for n, p in zip(size, patch):
        count = int(np.ceil((n - p) / (p * step))) + 1
        stride = (n - p) / (count - 1) if count > 1 else 99999999999
        starts.append([int(np.round(stride * i)) for i in range(count)])
    return starts


def pad_to_patch(data: np.ndarray, patch: Sequence[int]) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Zero-pad the last two axes of `data` to at least the patch, the content centred (the odd pixel after it);
    returns (padded, the content's slices in it)."""
    pads, keep = [(0, 0)] * (data.ndim - 2), []
    for n, p in zip(data.shape[-2:], patch):
        extra = max(int(p) - n, 0)
        pads.append((extra // 2, extra // 2 + extra % 2))
        keep.append(slice(extra // 2, extra // 2 + n))
    return np.pad(data, pads, mode="constant", constant_values=0), tuple(keep)  # type: ignore[return-value]


def sliding_window(run: Runner, patch: Sequence[int], step: float = 0.5, tiles_per_call: int = 8) -> Runner:
    """`run` (float32 (N, C, ph, pw) at the patch size -> logits (N, K, ph, pw)) as a Runner of any slice size:
    (N, C, H, W) -> float32 logits (N, K, H, W), Gaussian-weighted over tiles, `tiles_per_call` tiles per call."""
    patch = (int(patch[0]), int(patch[1]))

    def run_windows(x: np.ndarray) -> np.ndarray:
        if tuple(x.shape[-2:]) == patch:  # one tile covers the slice: the weights cancel out
            return np.asarray(run(x), dtype=np.float32)
        padded, keep = pad_to_patch(np.asarray(x, dtype=np.float32), patch)
        starts = tile_starts(padded.shape[-2:], patch, step)
        weights = gaussian_weights(patch).astype(np.float32)
        places = [(n, y, xx) for n in range(padded.shape[0]) for y in starts[0] for xx in starts[1]]
        logits: np.ndarray | None = None
        counts = np.zeros((padded.shape[0], *padded.shape[-2:]), dtype=np.float32)
        for first in range(0, len(places), tiles_per_call):
            batch = places[first: first + tiles_per_call]
            tiles = np.stack([padded[n, :, y: y + patch[0], xx: xx + patch[1]] for n, y, xx in batch])
            predicted = np.asarray(run(np.ascontiguousarray(tiles)), dtype=np.float32)
            if logits is None:
                logits = np.zeros((padded.shape[0], predicted.shape[1], *padded.shape[-2:]), dtype=np.float32)
            for (n, y, xx), tile in zip(batch, predicted):
                logits[n, :, y: y + patch[0], xx: xx + patch[1]] += tile * weights
                counts[n, y: y + patch[0], xx: xx + patch[1]] += weights
        logits /= counts[:, None]
        return np.ascontiguousarray(logits[(slice(None), slice(None), *keep)])

    return run_windows
