"""nnU-Net v2's 2D inference recipe in numpy, scipy and scikit-image, around any network runner (an ONNX Runtime
session in `medseg predict`): no torch, no nnunetv2.

The steps are nnunetv2 2.8's (`DefaultPreprocessor.run_case_npy`, `nnUNetPredictor.predict_sliding_window_return_logits`,
`convert_predicted_logits_to_segmentation_with_correct_shape`; Apache-2.0, DKFZ), in its order and arithmetic:
1. the volume as nnU-Net's SimpleITK reader gives it, (C, z, y, x) in the file's own voxel order (nnU-Net never
   reorients), `transpose_forward`;
2. crop to the non-zero region of all channels (holes filled);
3. normalise each channel by its scheme (CT: clip to the training foreground's 0.5/99.5 percentiles, then its mean
   and std; z-score: the image's own, inside the non-zero mask when the plans say so; rescale / RGB to [0, 1]);
4. resample in-plane to the configuration's spacing (cubic, scikit-image; the slice spacing is kept: 2D);
5. every slice in patch-size tiles, padded to the patch where smaller, at `tile_step_size` of the patch, each
   tile's logits weighted by a Gaussian (sigma 1/8 of the patch, peak 10) and, with mirroring, averaged over the
   allowed flips; accumulated in float16 as nnU-Net does;
6. logits resampled back to the cropped shape (linear), argmax, pasted into the uncropped volume (background
   outside), `transpose_backward`.
A fold ensemble is one graph whose output is the mean of its folds' logits (nnU-Net averages logits over folds).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.inference.sliding import gaussian_weights, pad_to_patch, tile_starts

ANISOTROPY_THRESHOLD = 3  # nnunetv2.configuration.ANISO_THRESHOLD
SCHEMES = ("CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization",
           "RGBTo01Normalization")
RESAMPLING_FN = "resample_data_or_seg_to_shape"

# tiles (N, C, h, w) float32 -> logits (N, K, h, w) float32
Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class NnunetRecipe:
    """What the model card's `nnunet` section says, typed: everything between a scan and a label map."""

    patch_size: tuple[int, int]
    spacing: tuple[float, float]  # the configuration's in-plane target spacing (after transpose_forward)
    transpose_forward: tuple[int, int, int]
    transpose_backward: tuple[int, int, int]
    normalization_schemes: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    intensity_properties: tuple[dict[str, float], ...]  # per channel: mean, std, percentile_00_5, percentile_99_5
    data_resampling: dict[str, Any]  # order, order_z, force_separate_z
    logits_resampling: dict[str, Any]
    mirror_axes: tuple[int, ...]
    num_classes: int
    tile_step_size: float = 0.5
    use_gaussian: bool = True

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "NnunetRecipe":
        return cls(
            patch_size=tuple(int(v) for v in data["patch_size"]),
            spacing=tuple(float(v) for v in data["spacing"]),
            transpose_forward=tuple(int(v) for v in data["transpose_forward"]),
            transpose_backward=tuple(int(v) for v in data["transpose_backward"]),
            normalization_schemes=tuple(str(v) for v in data["normalization_schemes"]),
            use_mask_for_norm=tuple(bool(v) for v in data["use_mask_for_norm"]),
            intensity_properties=tuple(dict(v) for v in data["intensity_properties"]),
            data_resampling=dict(data["data_resampling"]),
            logits_resampling=dict(data["logits_resampling"]),
            mirror_axes=tuple(int(v) for v in data.get("mirror_axes") or ()),
            num_classes=int(data["num_classes"]),
            tile_step_size=float(data.get("tile_step_size", 0.5)),
            use_gaussian=bool(data.get("use_gaussian", True)),
        )

    def validate(self, source: str) -> None:
        def bad(problem: str) -> MedsegError:
            return MedsegError(f"{source}: model card nnunet {problem}")

        if len(self.patch_size) != 2 or min(self.patch_size) < 1:
            raise bad(f"patch_size must be [h, w] >= 1, got {list(self.patch_size)}")
        if len(self.spacing) != 2 or not all(np.isfinite(self.spacing)) or min(self.spacing) <= 0:
            raise bad(f"spacing must be two positive numbers, got {list(self.spacing)}")
        for name in ("transpose_forward", "transpose_backward"):
            if sorted(getattr(self, name)) != [0, 1, 2]:
                raise bad(f"{name} must be a permutation of 0, 1, 2")
        channels = len(self.normalization_schemes)
        if channels < 1 or len(self.use_mask_for_norm) != channels or len(self.intensity_properties) != channels:
            raise bad("needs one normalization scheme, mask flag and intensity record per channel")
        unknown = sorted(set(self.normalization_schemes) - set(SCHEMES))
        if unknown:
            raise bad(f"normalization {unknown} is not one of {', '.join(SCHEMES)}")
        if not 0 < self.tile_step_size <= 1:
            raise bad(f"tile_step_size must be in (0, 1], got {self.tile_step_size}")
        if any(a not in (0, 1) for a in self.mirror_axes):
            raise bad(f"mirror_axes of a 2D network are 0 and/or 1, got {list(self.mirror_axes)}")


# ------------------------------------------------------------------ preprocessing


def nonzero_bbox(data: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    """([[start, end) per axis], the filled non-zero mask) of (C, z, y, x) data, as nnU-Net crops."""
    from scipy.ndimage import binary_fill_holes

    mask = np.any(data != 0, axis=0)
    mask = binary_fill_holes(mask)
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=other))
        bbox.append([int(hits[0]), int(hits[-1]) + 1] if hits.size else [0, mask.shape[axis]])
    return bbox, mask


def normalise(data: np.ndarray, nonzero: np.ndarray, recipe: NnunetRecipe) -> np.ndarray:
    """Each channel by its scheme, in float32 as nnU-Net computes it (`seg >= 0` is the cropped non-zero mask)."""
    out = np.empty(data.shape, dtype=np.float32)
    for c, scheme in enumerate(recipe.normalization_schemes):
        image = data[c].astype(np.float32, copy=True)
        props = recipe.intensity_properties[c]
        if scheme == "CTNormalization":
            np.clip(image, props["percentile_00_5"], props["percentile_99_5"], out=image)
            image -= props["mean"]
            image /= max(props["std"], 1e-8)
        elif scheme == "ZScoreNormalization":
            if recipe.use_mask_for_norm[c]:
                values = image[nonzero]
                mean, std = values.mean(), values.std()
                image[nonzero] = (image[nonzero] - mean) / max(std, 1e-8)
            else:
                mean, std = image.mean(), image.std()
                image -= mean
                image /= max(std, 1e-8)
        elif scheme == "RescaleTo01Normalization":
            image -= image.min()
            image /= np.clip(image.max(), a_min=1e-8, a_max=None)
        elif scheme == "RGBTo01Normalization":
            image /= 255.0
        out[c] = image
    return out


def new_shape_for(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> list[int]:
    """nnU-Net's compute_new_shape, except that an axis keeps at least one voxel: nnU-Net rounds a thin axis (one
    slice of a model that slices along another axis) to 0 and crashes in scipy's zoom; medseg segments it."""
    return [max(1, int(round(s / t * n))) for s, t, n in zip(spacing, target, shape)]


def _separate_z(force: bool | None, current: tuple[float, ...], new: tuple[float, ...]) -> tuple[bool, int | None]:
    """nnU-Net's determine_do_sep_z_and_axis."""
    def low_res_axes(spacing):
        spacing = np.asarray(spacing, dtype=float)
        return np.where(max(spacing) / spacing == 1)[0]

    if force is not None:
        separate, axes = bool(force), (low_res_axes(current) if force else None)
    elif max(current) / min(current) > ANISOTROPY_THRESHOLD:
        separate, axes = True, low_res_axes(current)
    elif max(new) / min(new) > ANISOTROPY_THRESHOLD:
        separate, axes = True, low_res_axes(new)
    else:
        separate, axes = False, None
    if axes is not None and len(axes) != 1:
        return False, None
    return separate, (int(axes[0]) if axes is not None else None)


def resample(data: np.ndarray, new_shape: list[int], current: tuple[float, ...], new: tuple[float, ...],
             order: int, order_z: int = 0, force_separate_z: bool | None = None) -> np.ndarray:
    """nnU-Net's resample_data_or_seg (the data / probabilities path): scikit-image's resize (edge mode, no
    anti-aliasing), slice by slice along a low-resolution axis, which is resampled with map_coordinates."""
    from scipy.ndimage import map_coordinates
    from skimage.transform import resize

    shape = np.array(data[0].shape)
    new_shape = np.array(new_shape)
    if np.all(shape == new_shape):
        return data
    separate, axis = _separate_z(force_separate_z, current, new)
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    data = data.astype(float, copy=False)
    kwargs = {"mode": "edge", "anti_aliasing": False}
    for c in range(data.shape[0]):
        if not separate:
            out[c] = resize(data[c], new_shape, order, **kwargs)
            continue
        in_plane = new_shape[[a for a in range(3) if a != axis]]
        staged_shape = new_shape.copy()
        staged_shape[axis] = shape[axis]
        staged = np.zeros(staged_shape)
        for i in range(shape[axis]):
            index = [slice(None)] * 3
            index[axis] = i
            staged[tuple(index)] = resize(data[c][tuple(index)], in_plane, order, **kwargs)
        if shape[axis] == new_shape[axis]:
            out[c] = staged
            continue
        scale = np.array(staged.shape, dtype=float) / new_shape
        grid = np.mgrid[: new_shape[0], : new_shape[1], : new_shape[2]].astype(float)
        coords = np.array([scale[a] * (grid[a] + 0.5) - 0.5 for a in range(3)])
        out[c] = map_coordinates(staged, coords, order=order_z, mode="nearest")
    return out


# ------------------------------------------------------------------ sliding window


def _mirrored(run: Runner, tiles: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """The runner's logits, averaged over every non-empty combination of flips of `axes` (plus none)."""
    logits = run(tiles).astype(np.float32)
    combos = [c for i in range(len(axes)) for c in itertools.combinations([a + 2 for a in axes], i + 1)]
    for flip in combos:
        logits += np.flip(run(np.ascontiguousarray(np.flip(tiles, flip))), flip)
    if combos:
        logits /= len(combos) + 1
    return logits


def sliding_window_logits(data: np.ndarray, recipe: NnunetRecipe, run: Runner, mirror: bool = True,
                          batch_size: int = 8, check: Callable[[], None] | None = None) -> np.ndarray:
    """(K, z, y, x) float16 logits of preprocessed (C, z, y, x) data: every slice in Gaussian-weighted tiles;
    `check` (a deadline) is called before each batch of tiles."""
    patch = recipe.patch_size
    padded, keep = pad_to_patch(data, patch)
    starts = tile_starts(padded.shape[2:], patch, recipe.tile_step_size)
    weights = gaussian_weights(patch) if recipe.use_gaussian else np.ones(patch, dtype=np.float16)
    weights32 = weights.astype(np.float32)
    logits = np.zeros((recipe.num_classes, *padded.shape[1:]), dtype=np.float16)
    counts = np.zeros(padded.shape[1:], dtype=np.float16)
    places = [(z, y, x) for z in range(padded.shape[1]) for y in starts[0] for x in starts[1]]
    axes = recipe.mirror_axes if mirror else ()
    for first in range(0, len(places), batch_size):
        if check is not None:
            check()
        batch = places[first: first + batch_size]
        tiles = np.stack([padded[:, z, y: y + patch[0], x: x + patch[1]] for z, y, x in batch]).astype(np.float32)
        predicted = _mirrored(run, tiles, axes)
        for (z, y, x), tile in zip(batch, predicted):
            region = (slice(None), z, slice(y, y + patch[0]), slice(x, x + patch[1]))
            logits[region] += tile * weights32  # float32 product, stored in float16 as nnU-Net's accumulator
            counts[region[1:]] += weights
    np.divide(logits, counts, out=logits)
    if np.isinf(logits).any():
        raise MedsegError("nnU-Net sliding window: logits overflowed float16 (as nnunetv2 would refuse too)")
    return logits[(slice(None), slice(None), *keep)]


# ------------------------------------------------------------------ the whole case


def segment_case(image: np.ndarray, spacing: tuple[float, float, float], recipe: NnunetRecipe, run: Runner,
                 mirror: bool = True, batch_size: int = 8, check: Callable[[], None] | None = None) -> np.ndarray:
    """Class indices (z, y, x) of a (C, z, y, x) volume in nnU-Net's reader order with its (sz, sy, sx) spacing."""
    logits, crop, shape_before_crop = _case_logits(image, spacing, recipe, run, mirror, batch_size, check)
    classes = np.zeros(shape_before_crop, dtype=np.uint8)
    classes[crop] = np.argmax(logits, axis=0)
    return classes.transpose(recipe.transpose_backward)


def case_probabilities(image: np.ndarray, spacing: tuple[float, float, float], recipe: NnunetRecipe, run: Runner,
                       mirror: bool = True, batch_size: int = 8) -> np.ndarray:
    """Softmax probabilities (K, z, y, x) float32 of segment_case's volume (background 1 outside nnU-Net's crop),
    for averaging several models' (a fold ensemble)."""
    logits, crop, shape_before_crop = _case_logits(image, spacing, recipe, run, mirror, batch_size, None)
    logits = logits.astype(np.float32) - logits.max(axis=0, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=0, keepdims=True)
    probs = np.zeros((logits.shape[0], *shape_before_crop), dtype=np.float32)
    probs[0] = 1.0
    probs[(slice(None), *crop)] = logits
    return probs.transpose([0, *[a + 1 for a in recipe.transpose_backward]])


def _case_logits(image: np.ndarray, spacing: tuple[float, float, float], recipe: NnunetRecipe, run: Runner,
                 mirror: bool, batch_size: int, check: Callable[[], None] | None):
    """(logits (K, ...) of the cropped region at the scan's spacing, the crop, the shape before it), in the
    transposed order nnU-Net works in."""
    forward = recipe.transpose_forward
    data = image.astype(np.float32).transpose([0, *[a + 1 for a in forward]])
    spacing_t = tuple(float(spacing[a]) for a in forward)
    shape_before_crop = data.shape[1:]
    bbox, mask = nonzero_bbox(data)
    crop = tuple(slice(a, b) for a, b in bbox)
    data = data[(slice(None), *crop)]
    nonzero = mask[crop]
    target = (spacing_t[0], *recipe.spacing)
    new_shape = new_shape_for(data.shape[1:], spacing_t, target)
    data = normalise(data, nonzero, recipe)
    data = resample(data, new_shape, spacing_t, target, **_resampling_args(recipe.data_resampling))
    logits = sliding_window_logits(data, recipe, run, mirror, batch_size, check)
    logits = resample(logits, list(nonzero.shape), target, spacing_t, **_resampling_args(recipe.logits_resampling))
    return logits, crop, shape_before_crop


def _resampling_args(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {"order": int(kwargs.get("order", 3)), "order_z": int(kwargs.get("order_z", 0)),
            "force_separate_z": kwargs.get("force_separate_z")}
