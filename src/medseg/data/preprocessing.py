"""Preprocessing, implemented once: the rules that turn a scan into network input and logits into labels.

Every path uses these functions: ingest (normalisation), training (`medseg.data.loader`: resize), evaluation and
export (`network_input`, `logits_to_labels`) and `medseg predict` (all of them, with ONNX Runtime). So this
module is numpy only (no torch, no scipy, nothing of `medseg.data`): the prediction path runs without torch.

Steps, in order, with the parameters the model card carries (`medseg.deployment.card`):
- volume layout: NIfTI (x, y, z[, c]) in the canonical orientation -> (D=z, C, H=y, W=x) (`volume_from_canonical_xyz`);
- intensity normalisation, from the `normalisation` dict ingest records in cases.json (`normalise_image`);
- 2.5D context: each slice with `context` neighbours a side, edges replicated, stacked as channels (`stack_context`);
- resize to the training image size with PyTorch's `F.interpolate(..., align_corners=False)` rules: image
  bicubic (a = -0.75, taps clamped at the border), label nearest, logits back to the native size bilinear; like
  torch, no antialiasing when downsampling (`resize`, `resize_labels`, `network_input`);
- argmax over classes (`logits_to_labels`) or softmax (`probabilities_at`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import numpy as np

from medseg.errors import ConfigError

RESIZE = {"image": "bicubic", "label": "nearest", "logits": "bilinear"}  # align_corners=False everywhere
NORMALISATIONS = ("hu_window", "percentile_clip_zscore", "divide_255", "none")
MR_PERCENTILES = (0.5, 99.5)
SLAB_VOXELS = 1 << 20  # 4 slices of 512 x 512: 4 MiB of float32, 8 MiB of int64, and still few numpy calls
CUBIC_A = -0.75  # PyTorch's (and OpenCV's) bicubic convolution coefficient
BAND_ROWS = 32  # output rows per block of a banded resize product (fastest of 16..128 for 512 -> 224)


def slabs(shape: Sequence[int]) -> list[slice]:
    """Consecutive ranges of the first axis of an array of `shape`, about SLAB_VOXELS voxels each (at least one
    range, empty for an empty array, so that reductions over the slabs see every array)."""
    step = max(1, SLAB_VOXELS // max(int(np.prod(shape[1:], dtype=np.int64)), 1))
    return [slice(start, min(start + step, shape[0])) for start in range(0, max(shape[0], 1), step)]


# ------------------------------------------------------------------ layout


def volume_from_canonical_xyz(data: np.ndarray) -> np.ndarray:
    """A canonical (RAS+) NIfTI array (x, y, z) or (x, y, z, c) -> a (D=z, C, H=y, W=x) view (no copy)."""
    if data.ndim == 3:
        return data.transpose(2, 1, 0)[:, None]
    if data.ndim == 4:
        return data.transpose(2, 3, 1, 0)
    raise ValueError(f"expected (x, y, z) or (x, y, z, c) data, got shape {data.shape}")


# ------------------------------------------------------------------ intensity normalisation


def normalisation_for(format: str, modality: str, hu_window: Sequence[float]) -> dict[str, Any]:
    """The normalisation ingest applies to a dataset (recorded in cases.json, carried by the model card)."""
    if format == "transunet":
        return {"method": "none", "note": "TransUNet data is pre-windowed to [0, 1]"}
    if modality == "ct":
        return {"method": "hu_window", "window": [float(v) for v in hu_window]}
    if modality in ("mr", "grey"):  # grey 2D images (8 or 16 bit) as nnU-Net's z-score of a non-CT channel
        return {"method": "percentile_clip_zscore", "percentiles": list(MR_PERCENTILES)}
    return {"method": "divide_255"}


# (low, high, shift, scale) per channel, float32, shaped (C, 1, 1): input = (clip(raw, low, high) - shift) / scale;
# None where nothing is clipped, or (method "none") nothing is done at all.
Transform = tuple[np.ndarray | None, np.ndarray | None, np.ndarray, np.ndarray] | None


def intensity_transform(image_dchw: np.ndarray, normalisation: Mapping[str, Any]) -> Transform:
    """The transform `normalisation` gives this raw image (D, C, H, W); z-score statistics come from the image."""
    method = normalisation.get("method")

    def per_channel(values) -> np.ndarray:
        return np.asarray(values, dtype=np.float32).reshape(-1, 1, 1)

    channels = image_dchw.shape[1]
    if method == "none":
        return None
    if method == "hu_window":
        lo, hi = normalisation["window"]
        return tuple(per_channel([value] * channels) for value in (lo, hi, lo, hi - lo))
    if method == "divide_255":
        return None, None, per_channel([0.0] * channels), per_channel([255.0] * channels)
    if method == "percentile_clip_zscore":
        percentiles = [float(p) for p in normalisation["percentiles"]]
        stats = []  # (low, high, mean, std) of each channel
        for c in range(channels):
            lo, hi = (float(v) for v in np.percentile(image_dchw[:, c], percentiles))
            mean, std = _clipped_mean_std(image_dchw[:, c], lo, hi)
            stats.append((lo, hi, mean, std if std > 1e-8 else 1.0))
        return tuple(per_channel(column) for column in zip(*stats))
    raise ConfigError(f"normalisation method {method!r} is not one of {', '.join(NORMALISATIONS)}")


def _clipped_mean_std(channel: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """Mean and standard deviation of clip(channel, lo, hi) in float64, two passes over slabs (a float64 copy
    of the whole channel would cost twice the float32 volume)."""
    ranges = slabs(channel.shape)
    mean = sum(float(np.clip(channel[s], lo, hi, dtype=np.float64).sum()) for s in ranges) / channel.size
    squares = sum(float(np.square(np.clip(channel[s], lo, hi, dtype=np.float64) - mean).sum()) for s in ranges)
    return mean, math.sqrt(squares / channel.size)


def normalise_slab(raw: np.ndarray, transform: Transform) -> np.ndarray:
    """Raw intensities (k, C, H, W) -> a new float32 array of network input."""
    out = raw.astype(np.float32, order="C")  # the one copy; every step below works in place
    if transform is None:
        return out
    low, high, shift, scale = transform
    if low is not None:
        np.clip(out, low, high, out=out)
    out -= shift
    out /= scale
    return out


def normalise_image(image_dchw: np.ndarray, normalisation: Mapping[str, Any]) -> np.ndarray:
    """Raw intensities (D, C, H, W) -> float32 network input (one float32 copy; ingest writes it slab by slab)."""
    return normalise_slab(image_dchw, intensity_transform(image_dchw, normalisation))


# ------------------------------------------------------------------ resize (PyTorch's align_corners=False rules)


def _source_positions(in_size: int, out_size: int) -> np.ndarray:
    """Where output pixel centres fall in input coordinates, in float32 as PyTorch's CPU kernels compute them."""
    scale = np.float32(in_size) / np.float32(out_size)
    return scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)


def _floor_and_fraction(real: np.ndarray, in_size: int) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's guard_index_and_lambda: the tap below (at most in_size - 1) and the fraction past it in [0, 1]."""
    index = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    return index, np.clip(real - index.astype(np.float32), np.float32(0), np.float32(1))


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """(n, 4) weights of the taps at floor - 1 .. floor + 2 for fractions t (Keys' cubic, A = -0.75), float32."""
    a = np.float32(CUBIC_A)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    one = np.float32(1)
    return np.stack([far(t + one), near(t), near(one - t), far(one - t + one)], axis=1).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _taps(in_size: int, out_size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(indices (out, k) int64, weights (out, k) float32) of each output pixel's k input taps, clamped at the border."""
    if mode == "bicubic":
        index, t = _floor_and_fraction(_source_positions(in_size, out_size), in_size)
        indices = np.clip(index[:, None] + np.arange(-1, 3), 0, in_size - 1)
        return indices, _cubic_weights(t)
    if mode == "bilinear":
        real = np.maximum(_source_positions(in_size, out_size), np.float32(0))  # linear clamps below at 0
        index, t = _floor_and_fraction(real, in_size)
        indices = np.stack([index, index + (index < in_size - 1)], axis=1)
        return indices, np.stack([np.float32(1) - t, t], axis=1).astype(np.float32)
    raise ConfigError(f"resize mode {mode!r}; expected bicubic or bilinear")


@functools.lru_cache(maxsize=64)
def interpolation_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
    """(out_size, in_size) float32 M with resized = M @ x along one axis (read-only: it is cached and shared)."""
    indices, weights = _taps(int(in_size), int(out_size), mode)
    matrix = np.zeros((out_size, in_size), dtype=np.float32)
    np.add.at(matrix, (np.arange(out_size)[:, None], indices), weights)  # clamped border taps add up
    matrix.setflags(write=False)
    return matrix


@functools.lru_cache(maxsize=64)
def _bands(in_size: int, out_size: int, mode: str) -> tuple[tuple[slice, slice, np.ndarray], ...]:
    """interpolation_matrix cut into blocks of BAND_ROWS output rows, each with only the input columns its taps
    reach, transposed: (output rows, input columns, (columns, rows) float32). Each output pixel has 2 or 4 taps,
    so a dense product mostly multiplies zeros; the blocks cost a third (512 -> 224: 0.57 vs 1.66 ms a slice)."""
    matrix, indices = interpolation_matrix(in_size, out_size, mode), _taps(in_size, out_size, mode)[0]
    blocks = []
    for start in range(0, out_size, BAND_ROWS):
        rows = slice(start, min(start + BAND_ROWS, out_size))
        cols = slice(int(indices[rows].min()), int(indices[rows].max()) + 1)
        block = np.ascontiguousarray(matrix[rows, cols].T)
        block.setflags(write=False)
        blocks.append((rows, cols, block))
    return tuple(blocks)


def resize(x_nchw: np.ndarray, size: Sequence[int], mode: str = RESIZE["image"]) -> np.ndarray:
    """(N, C, H, W) -> float32 (N, C, h, w), equal to `F.interpolate(x, size, mode=mode, align_corners=False)`
    within float32 rounding (bicubic | bilinear). Separable: columns, then rows (the order of torch's CPU kernel,
    which sums each row tap's column taps), each a banded matrix product. An axis already at its size is left as
    it is (torch's weights are then exactly 1 and 0)."""
    x = np.ascontiguousarray(x_nchw, dtype=np.float32)
    n, c, height, width = x.shape
    out_h, out_w = int(size[0]), int(size[1])
    if width != out_w:
        # Plane by plane (a stacked matmul), not one product over all N*C*H rows: BLAS picks its kernel and
        # summation order by the matrix's row count, so one flat product gave a slice different last bits in a
        # batch than alone (seen with OpenBLAS 0.3.31); each plane's product has the same shape whatever the batch.
        planes, cols_out = x.reshape(n * c, height, width), np.empty((n * c, height, out_w), dtype=np.float32)
        for rows, cols, block in _bands(width, out_w, mode):
            np.matmul(planes[:, :, cols], block, out=cols_out[:, :, rows])
        x = cols_out.reshape(n, c, height, out_w)
    if height != out_h:
        planes, rows_out = x.reshape(n * c, height, -1), np.empty((n * c, out_h, x.shape[-1]), dtype=np.float32)
        for rows, cols, block in _bands(height, out_h, mode):
            np.matmul(block.T, planes[:, cols], out=rows_out[:, rows])
        x = rows_out.reshape(n, c, out_h, -1)
    return x


@functools.lru_cache(maxsize=64)
def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source rows/cols of PyTorch's mode="nearest" (floor(dst * in / out)), to index labels without a float copy."""
    scale = np.float32(in_size / out_size)
    return np.minimum(np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64), in_size - 1)


def resize_labels(labels_nhw: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """(N, H, W) label maps -> (N, h, w) nearest, same dtype (a row/column lookup, no blended labels)."""
    height, width = labels_nhw.shape[-2:]
    if (height, width) == (int(size[0]), int(size[1])):
        return labels_nhw
    rows, cols = nearest_indices(height, int(size[0])), nearest_indices(width, int(size[1]))
    return labels_nhw[:, rows[:, None], cols[None, :]]


# ------------------------------------------------------------------ network input


def context_indices(num_slices: int, index: int, context: int) -> list[int]:
    """Slices stacked as channels for 2.5D input: index-context..index+context, clamped at the volume ends."""
    return [min(max(index + offset, 0), num_slices - 1) for offset in range(-context, context + 1)]


def stack_context(image_dchw: np.ndarray, indices: Sequence[int], context: int) -> np.ndarray:
    """float32 (len(indices), C * (2 * context + 1), H, W): each slice's neighbours' channels, slice-major.
    Reads only those slices of a memory-mapped volume."""
    depth = image_dchw.shape[0]
    rows = [j for i in indices for j in context_indices(depth, int(i), context)]
    stacked = np.asarray(image_dchw[rows], dtype=np.float32)
    return stacked.reshape(len(indices), -1, *image_dchw.shape[2:])


def network_input(
    image_dchw: np.ndarray, indices: Sequence[int], context: int, image_size: Sequence[int]
) -> np.ndarray:
    """THE network input: float32 (len(indices), C * (2 * context + 1), h, w) for slices `indices` of a normalised
    (D, C, H, W) volume, resized to the training `image_size` (bicubic, as in training)."""
    return resize(stack_context(image_dchw, indices, context), image_size, RESIZE["image"])


# ------------------------------------------------------------------ output


def _logits_at(logits_nkhw: np.ndarray, size: Sequence[int]) -> np.ndarray:
    return resize(logits_nkhw, size, RESIZE["logits"])


def logits_to_labels(logits_nkhw: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """uint8 (N, H, W) class indices at the native slice `size`: logits resized back (bilinear), then argmax.

    One slice at a time: a batch's logits at 512 x 512 are 9 MiB a slice for 9 classes, 300 MiB for 32, and
    every pass over them then runs at memory speed instead of in cache (9 classes, 64 -> 512: 34 -> 6 ms a slice)."""
    logits = np.asarray(logits_nkhw, dtype=np.float32)
    out = np.empty((logits.shape[0], int(size[0]), int(size[1])), dtype=np.uint8)
    for i in range(logits.shape[0]):
        out[i] = argmax_classes(_logits_at(logits[i : i + 1], size))[0]
    return out


def argmax_classes(x_nkhw: np.ndarray) -> np.ndarray:
    """np.argmax(x, axis=1) as uint8 (N, H, W): the first maximum on ties, and where a pixel has a NaN, the first
    NaN (numpy's rule). For finite values it is one pass per class over contiguous planes, where numpy's argmax
    across a non-last axis strides through memory."""
    classes = x_nkhw.shape[1]
    if classes > 256 or not np.isfinite(x_nkhw).all():  # rare: numpy's own argmax keeps its NaN rule
        return x_nkhw.argmax(axis=1).astype(np.uint8)
    best = x_nkhw[:, 0].copy()
    index = np.zeros(best.shape, dtype=np.uint8)
    better = np.empty(best.shape, dtype=bool)
    for k in range(1, classes):
        np.greater(x_nkhw[:, k], best, out=better)  # strictly: a tie keeps the earlier class, as argmax does
        index[better] = k
        np.maximum(best, x_nkhw[:, k], out=best)
    return index


def softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    """float32 softmax over `axis`, shifted by the maximum so large logits do not overflow."""
    logits = np.asarray(logits, dtype=np.float32)
    out = logits - logits.max(axis=axis, keepdims=True)
    np.exp(out, out=out)
    out /= out.sum(axis=axis, keepdims=True)
    return out


def probabilities_at(logits_nkhw: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """float32 (N, K, H, W) class probabilities at `size`: softmax of the resized logits, so their argmax is
    `logits_to_labels`."""
    return softmax(_logits_at(logits_nkhw, size), axis=1)
