"""2D (and 2.5D) slices out of the ingested, memory-mapped case arrays.

`SliceDataset` indexes every (case, slice) pair up front and opens each case's `.npy` files lazily with
`mmap_mode="r"` in whichever process reads them (DataLoader workers included), so only the slices asked for
are read. Resizing follows `medseg.preprocessing` (numpy, the rules every path uses); augmentation runs in
torch on the slice. Augmentation draws from a generator seeded by
(seed, epoch, index): the same item gets the same augmentation whatever the number of workers or the order.
`__getitems__` serves a whole batch at once (one resize call for same-sized slices), which DataLoader uses.
With `cache_resized=True` every slice is resized once, when the dataset is built, and items are copied out of
that in-memory cache (identical values; only the augmentation runs per item).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from medseg.config import settings
from medseg.errors import ConfigError, IngestError
from medseg.io import read_json
from medseg.layout import ProjectLayout
from medseg.preprocessing import context_indices, nearest_indices, resize, resize_labels

def read_cases(ingested_dir: str | Path) -> dict[str, Any]:
    """The parsed `cases.json` of an ingested dataset."""
    path = Path(ingested_dir) / "cases.json"
    if not path.is_file():
        raise IngestError(path, "not found; run the ingest stage first")
    return read_json(path)


def _case_entry(manifest: Mapping[str, Any], case_id: str, ingested_dir: Path) -> Mapping[str, Any]:
    for case in manifest["cases"]:
        if case["id"] == case_id:
            return case
    raise ConfigError(f"case {case_id!r} is not in {ingested_dir / 'cases.json'}")


def _open(ingested_dir: Path, case: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = np.load(ingested_dir / case["image"], mmap_mode="r")
        label = np.load(ingested_dir / case["label"], mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise IngestError(ingested_dir / case["image"], f"cannot memory-map ingested case ({exc}); re-run ingest") from exc
    return image, label


def load_case(ingested_dir: str | Path, case_id: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(image (D, C, H, W) float32 memmap, label (D, H, W) uint8 memmap, spacing (sz, sy, sx) mm)."""
    ingested_dir = Path(ingested_dir)
    case = _case_entry(read_cases(ingested_dir), case_id, ingested_dir)
    image, label = _open(ingested_dir, case)
    return image, label, tuple(float(s) for s in case["spacing"])


def resize_slices(
    image: torch.Tensor, label: torch.Tensor | None, size: Sequence[int], mode: str = "bicubic"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Batched resize of CPU tensors with `medseg.preprocessing` (the rules evaluation and predict use): image
    (B, C, H, W) with `mode`, label (B, H, W) nearest. No-op at the target size."""
    image = torch.from_numpy(resize(image.numpy(), size, mode))
    if label is not None:
        label = torch.from_numpy(resize_labels(label.numpy(), size))
    return image, label


def augment_slice(
    image: torch.Tensor, label: torch.Tensor, options: Mapping[str, Any], rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random augmentation of image (C, H, W) / label (H, W); each transform fires with probability p."""
    p = float(options.get("p", 0.5))
    if options.get("flip") and rng.random() < p:
        image, label = image.flip(-1), label.flip(-1)
    if options.get("flip") and rng.random() < p:
        image, label = image.flip(-2), label.flip(-2)
    if options.get("rot90") and rng.random() < p:
        k = int(rng.integers(1, 4)) if image.shape[-1] == image.shape[-2] else 2  # 90/270 only keep square shapes
        image, label = torch.rot90(image, k, (-2, -1)), torch.rot90(label, k, (-2, -1))
    degrees = float(options.get("rotate_deg") or 0.0)
    if degrees > 0 and rng.random() < p:
        image, label = _rotate(image, label, math.radians(rng.uniform(-degrees, degrees)))
    jitter = float(options.get("intensity_jitter") or 0.0)
    if jitter > 0 and rng.random() < p:
        scale, shift = 1.0 + rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)
        image = image * scale + shift
    return image.contiguous(), label.contiguous()


def rotation_grid(height: int, width: int, angle: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sampling grid (1, H, W, 2) of F.affine_grid for a rotation by `angle` about the centre
    (align_corners=False), written from two coordinate vectors: F.affine_grid's generic batched matmul cost 2.5x
    more and was 40% of an augmented item's time."""
    cos, sin = math.cos(angle), math.sin(angle)
    x = (torch.arange(width, dtype=dtype) * 2 + 1) / width - 1  # pixel centres in [-1, 1]
    y = ((torch.arange(height, dtype=dtype) * 2 + 1) / height - 1)[:, None]
    grid = torch.empty(1, height, width, 2, dtype=dtype)
    torch.sub(x * cos, y * sin, out=grid[0, :, :, 0])
    torch.add(x * sin, y * cos, out=grid[0, :, :, 1])
    return grid


def _rotate(image: torch.Tensor, label: torch.Tensor, angle: float) -> tuple[torch.Tensor, torch.Tensor]:
    grid = rotation_grid(image.shape[-2], image.shape[-1], angle, image.dtype)
    # Corners rotated in from outside take the border value (air / background), not zeros mid-range.
    image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    rotated = F.grid_sample(label[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                            align_corners=False)
    return image, rotated[0, 0].to(label.dtype)


class SliceDataset(Dataset):
    """Item: (image float32 (C * (2 * context + 1), H, W), label int64 (H, W)) at `image_size`.

    `cache_resized=True` resizes every slice of every case once, in the constructor (so in the main process,
    before DataLoader workers fork and inherit it copy-on-write; training re-forks workers every epoch, so a
    cache built inside a worker would be thrown away), with the same functions as the uncached path (image with
    `image_mode`, label nearest), and keeps them as contiguous tensors. Items are then copied out of the cache
    (2.5D context stacks the cached neighbours) and augmented as usual: the same values as without the cache
    (resizing is per channel, so resize-then-stack equals stack-then-resize). Memory: total slices x C x H x W
    x 4 bytes for the images plus slices x H x W bytes for the labels (uint8), at `image_size`, e.g. 2,211
    Synapse training slices x 1 x 224 x 224 x 4 B = 444 MB (+ 111 MB labels); the build costs one uncached epoch.
    """

    def __init__(
        self,
        ingested_dir: str | Path,
        case_ids: Sequence[str],
        image_size: Sequence[int],
        context: int = 0,
        augment: Mapping[str, Any] | None = None,
        seed: int = 0,
        image_mode: str = "bicubic",
        cache_resized: bool = False,
    ):
        self.ingested_dir = Path(ingested_dir)
        manifest = read_cases(self.ingested_dir)
        self.cases = [dict(_case_entry(manifest, str(cid), self.ingested_dir)) for cid in case_ids]
        if not self.cases:
            raise ConfigError(f"SliceDataset over {self.ingested_dir}: no case ids given")
        if int(context) < 0:
            raise ConfigError(f"data.context must be >= 0, got {context}")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.context = int(context)
        self.augment = dict(augment) if augment else None
        self.seed = int(seed)
        self.image_mode = image_mode
        self.epoch = 0
        self.in_channels = int(manifest["in_channels"]) * (2 * self.context + 1)
        self.num_classes = int(manifest["num_classes"])
        depths = [int(c["shape"][0]) for c in self.cases]
        # (case index, slice index) for every slice, built once; items are looked up, never searched.
        self.index = np.concatenate([np.stack([np.full(d, i), np.arange(d)], 1) for i, d in enumerate(depths)]).astype(np.int64)
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._pid = os.getpid()
        # Per case: (image (D, C, H, W) float32, label (D, H, W) uint8) at image_size, or None when not caching.
        self._cache = [self._resize_case(i) for i in range(len(self.cases))] if cache_resized else None

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation stream (call before iterating; DataLoader workers get a fresh copy)."""
        self.epoch = int(epoch)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = {}  # memmaps are reopened in the worker
        return state

    def _case(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self._pid != os.getpid():  # forked worker: do not share the parent's file handles
            self._arrays, self._pid = {}, os.getpid()
        if i not in self._arrays:
            # Plain ndarray views of the memmaps: same pages, without np.memmap's per-index Python overhead.
            self._arrays[i] = tuple(np.asarray(a) for a in _open(self.ingested_dir, self.cases[i]))
        return self._arrays[i]

    def _resize_case(self, i: int, chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slice of case `i` resized to image_size (in chunks, to bound the native-size copy)."""
        image, label = self._case(i)
        parts = [
            resize_slices(torch.from_numpy(np.array(image[s:s + chunk])), torch.from_numpy(np.array(label[s:s + chunk])),
                          self.image_size, self.image_mode)
            for s in range(0, image.shape[0], chunk)
        ]
        return torch.cat([p[0] for p in parts]).contiguous(), torch.cat([p[1] for p in parts]).contiguous()

    def _slices(self, z: int, depth: int) -> np.ndarray | int:
        """The slice index, or with 2.5D context the (2 * context + 1) neighbours, edges replicated."""
        return context_indices(depth, z, self.context) if self.context else z

    def _cached_item(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        case, z = (int(v) for v in self.index[idx])
        image, label = self._cache[case]
        return image[self._slices(z, image.shape[0])].reshape(self.in_channels, *self.image_size), label[z]

    def _read_into(self, idx: int, image_out: np.ndarray, label_out: np.ndarray) -> None:
        """Copy item `idx` straight from the memmaps into batch buffers: image (C', H, W) at native size, label
        already at image_size (nearest is a pure row/column lookup, so only the needed rows are read)."""
        case, z = self.index[idx]
        image, label = self._case(int(case))
        rows = nearest_indices(label.shape[1], self.image_size[0])
        cols = nearest_indices(label.shape[2], self.image_size[1])
        label_out[...] = label[z][rows[:, None], cols[None, :]]
        image_out[...] = image[self._slices(int(z), image.shape[0])].reshape(image_out.shape)

    def _rng(self, idx: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(idx)])

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([idx])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        indices = [int(i) for i in indices]
        out = [self._cached_item(i) for i in indices] if self._cache is not None else self._resized_items(indices)
        if self.augment:
            out = [augment_slice(img, lbl, self.augment, self._rng(i)) for (img, lbl), i in zip(out, indices)]
        # Labels stay uint8 until here: flips and rotations move 8x fewer bytes than on int64.
        return [(img, lbl.long()) for img, lbl in out]

    def _resized_items(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Uncached: read the batch's slices at native size and resize them (one call per input shape)."""
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(indices)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for pos, i in enumerate(indices):
            shape = self.cases[self.index[i][0]]["shape"]
            by_shape.setdefault((int(shape[1]), int(shape[2])), []).append(pos)
        for (h, w), positions in by_shape.items():  # one buffer and one interpolate call per input shape
            images = np.empty((len(positions), self.in_channels, h, w), dtype=np.float32)
            labels = np.empty((len(positions), *self.image_size), dtype=np.uint8)
            for row, pos in enumerate(positions):
                self._read_into(indices[pos], images[row], labels[row])
            batch, _ = resize_slices(torch.from_numpy(images), None, self.image_size, self.image_mode)
            label_batch = torch.from_numpy(labels)
            for row, pos in enumerate(positions):
                out[pos] = (batch[row], label_batch[row])
        return out


def make_loader(
    ingested_dir: str | Path,
    case_ids: Sequence[str],
    image_size: Sequence[int],
    batch_size: int,
    *,
    shuffle: bool = False,
    context: int = 0,
    augment: Mapping[str, Any] | None = None,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    image_mode: str = "bicubic",
    cache_resized: bool = True,
) -> DataLoader:
    """DataLoader over a SliceDataset; the shuffle order is drawn from a generator seeded with `seed`."""
    dataset = SliceDataset(ingested_dir, case_ids, image_size, context, augment, seed, image_mode, cache_resized)
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=shuffle,
        num_workers=int(num_workers),
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(int(seed)),
        persistent_workers=False,  # workers must see set_epoch()
    )


def dataset_from_params(
    params: Mapping[str, Any], root: str | Path, case_ids: Sequence[str], train: bool = False
) -> SliceDataset:
    """SliceDataset configured from params.yaml `data:` (augmentation only when `train`)."""
    config = settings(dict(params))
    data = config.data
    return SliceDataset(
        ProjectLayout.of(dict(params), root).ingested,
        case_ids,
        data.image_size,
        context=data.context,
        augment=dataclasses.asdict(data.augment) if (train and data.augment) else None,
        seed=config.seed,
        cache_resized=data.cache_resized,
    )
