"""2D (and 2.5D) slices out of the ingested, memory-mapped case arrays.

`SliceDataset` indexes every (case, slice) pair up front and opens each case's `.npy` files lazily with
`mmap_mode="r"` in whichever process reads them (DataLoader workers included), so only the slices asked for
are read. Resizing follows `medseg.data.preprocessing` (numpy, the rules every path uses). `__getitems__` serves a
whole batch at once: one resize call per source shape, or with `cache_resized=True` (every slice resized once,
when the dataset is built) one gather from the cache; then the batch is augmented as a batch
(`apply_augmentation`: items grouped by kind, flips and rot90 as index operations, rotations by grid_sample),
on the CPU or, when training defers it, on the training device. Each item's augmentation is drawn from a
generator seeded by (seed, epoch, index): the same item gets the same augmentation whatever the batch, the number
of workers or the order.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    default_collate,
    get_worker_info,
)

from medseg.data.augment import apply_augmentation, draw_augmentation, scatter_rows
from medseg.data.cases import case_entry, open_case, read_cases
from medseg.data.preprocessing import context_indices, nearest_indices, resize, resize_labels
from medseg.errors import ConfigError


def resize_slices(
    image: torch.Tensor, label: torch.Tensor | None, size: Sequence[int], mode: str = "bicubic"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Batched resize of CPU tensors with `medseg.data.preprocessing` (the rules evaluation and predict use): image
    (B, C, H, W) with `mode`, label (B, H, W) nearest. No-op at the target size."""
    image = torch.from_numpy(resize(image.numpy(), size, mode))
    if label is not None:
        label = torch.from_numpy(resize_labels(label.numpy(), size))
    return image, label


class SliceBatch(list):
    """What SliceDataset.__getitems__ returns: a list of (image, label) items like any dataset's, that also holds
    them stacked (`images` (B, C, H, W), `labels` (B, H, W) int64) so `collate_slices` needs no second copy, and,
    when augmentation is left to the training device, the batch's augmentation table (B, AUG_COLUMNS)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augmentation: torch.Tensor | None = None):
        super().__init__(zip(images.unbind(0), labels.unbind(0)))
        self.images, self.labels, self.augmentation = images, labels, augmentation


def collate_slices(batch: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    """DataLoader collate_fn for SliceDataset: (images, labels), plus the augmentation table when deferred;
    a RingTicket (a SliceLoader worker's batch, left in shared memory) as it is, for SliceLoader to collect;
    anything else (a plain list of items) goes through PyTorch's default_collate."""
    if isinstance(batch, RingTicket):
        return batch
    if isinstance(batch, SliceBatch):
        if batch.augmentation is not None:
            return batch.images, batch.labels, batch.augmentation
        return batch.images, batch.labels
    return default_collate(batch)


class SequencedBatch(list):
    """A batch's indices with its position `seq` in the epoch's batch order and the dataset's augmentation
    `epoch` when the epoch began (SliceLoader's batch sampler makes them): a worker writes batch `seq` into ring
    slot `seq % slots`, and draws its augmentation for `epoch`, which a persistent worker's copy of the dataset
    would not know from set_epoch in the main process."""

    def __init__(self, indices: Sequence[int], seq: int, epoch: int | None = None):
        super().__init__(indices)
        self.seq = int(seq)
        self.epoch = epoch


class _SequencedBatches:
    """Any batch sampler (or list of index lists), each batch tagged with its position and the dataset's epoch;
    `batches` may be replaced between epochs (SliceLoader.set_batches)."""

    def __init__(self, batches: Any, dataset: Any):
        self.batches, self.dataset = batches, dataset

    def __iter__(self):
        epoch = getattr(self.dataset, "epoch", None)  # read in the main process as the epoch's iteration starts
        for seq, indices in enumerate(self.batches):
            yield SequencedBatch(indices, seq, epoch)

    def __len__(self) -> int:
        return len(self.batches)


@dataclasses.dataclass(frozen=True)
class RingTicket:
    """What a SliceLoader worker sends instead of the batch: where in the ring it wrote it. A few bytes through
    the result queue, where a tensor would cost a fresh shared-memory segment, mapped and faulted in on both
    sides, per batch (10-30 ms per 32 slices at 224 x 224 on a 2-core VM)."""

    seq: int
    slot: int
    size: int
    augmentation: np.ndarray | None = None  # the deferred augmentation table, as numpy: pickled as bytes


class BatchRing:
    """Batch buffers in shared memory, allocated in the main process before DataLoader workers start (so every
    worker maps the same pages) and reused every batch. Slot reuse is safe without locks because of how a
    DataLoader dispatches in order: at most prefetch_factor x workers (P) batches are sent ahead, and batch
    `seq + P` is sent only when batch `seq` is handed back, which SliceLoader does after copying batch
    `seq - 1` out; with P + 1 slots, batch `seq + P` lands in batch `seq - 1`'s slot, already read. A stamp per
    slot (the seq written, -1 while writing) is checked before and after each read, so a broken assumption is a
    clear error, never a silently mixed batch."""

    def __init__(self, slots: int, max_batch: int, image_shape: Sequence[int], label_shape: Sequence[int],
                 label_dtype: torch.dtype):
        self.slots, self.max_batch = int(slots), int(max_batch)
        self.images = torch.empty((self.slots, self.max_batch, *image_shape), dtype=torch.float32).share_memory_()
        self.labels = torch.empty((self.slots, self.max_batch, *label_shape), dtype=label_dtype).share_memory_()
        self.stamps = torch.full((self.slots,), -1, dtype=torch.int64).share_memory_()

    def fits(self, slots: int, max_batch: int, image_shape: Sequence[int], label_dtype: torch.dtype) -> bool:
        return (self.slots, self.max_batch, tuple(self.images.shape[2:]), self.labels.dtype) == (
            int(slots), int(max_batch), tuple(image_shape), label_dtype)

    def begin(self, seq: int, size: int) -> tuple[int, torch.Tensor]:
        """(slot, image buffer (size, C, H, W)) for batch `seq`, stamped as being written."""
        if size > self.max_batch:
            raise RuntimeError(f"batch {seq} has {size} items, more than the ring's {self.max_batch}")
        slot = int(seq) % self.slots
        self.stamps[slot] = -1
        return slot, self.images[slot, :size]

    def publish(self, seq: int, slot: int, labels: torch.Tensor, augmentation: torch.Tensor | None) -> RingTicket:
        self.labels[slot, :labels.shape[0]].copy_(labels)
        self.stamps[slot] = int(seq)
        table = None if augmentation is None else augmentation.numpy()
        return RingTicket(int(seq), slot, int(labels.shape[0]), table)

    def collect(self, ticket: RingTicket, pin_memory: bool = False) -> tuple[torch.Tensor, ...]:
        """The ticket's batch, copied out of the ring (the slot is then free for reuse), as collate_slices
        returns it: (images, labels) or (images, labels, augmentation)."""
        self._check(ticket, "before")
        images, labels = self.images[ticket.slot, :ticket.size], self.labels[ticket.slot, :ticket.size]
        images = torch.empty(images.shape, dtype=images.dtype, pin_memory=pin_memory).copy_(images)
        labels = torch.empty(labels.shape, dtype=labels.dtype, pin_memory=pin_memory).copy_(labels)
        self._check(ticket, "while")
        if ticket.augmentation is not None:
            return images, labels, torch.from_numpy(ticket.augmentation)
        return images, labels

    def _check(self, ticket: RingTicket, when: str) -> None:
        stamp = int(self.stamps[ticket.slot])
        if stamp != ticket.seq:
            raise RuntimeError(f"SliceLoader ring slot {ticket.slot} holds batch {stamp}, not batch {ticket.seq}, "
                               f"{when} it was read (more batches in flight than the ring's {self.slots} slots)")


class SliceLoader(DataLoader):
    """DataLoader over a SliceDataset whose workers hand batches back through a BatchRing: each worker builds
    and augments its batch straight into a shared slot and sends a RingTicket; the main process copies the slot
    out. Same batches, order and seeds as a DataLoader with the same arguments (shuffling uses the RandomSampler
    a DataLoader would build, on the same generator). With num_workers=0 it is a plain DataLoader. Memory:
    (prefetch_factor x workers + 1) batch buffers, e.g. 5 x 32 slices x 224 x 224 x 4 B = 32 MB for 2 workers.

    Persistent workers see set_epoch: each batch carries the epoch the main process's dataset had when the
    epoch's iteration began. Training keeps one loader with persistent workers for the whole run and gives it
    each epoch's batches with set_batches (starting workers every epoch cost ~0.1 s and made them lose to the
    main process on a 2-core VM, docs/benchmarks.md).

    Arguments are DataLoader's; `batch_sampler` may be any sized iterable of index lists (training passes the
    epoch's batches); `max_batch`: the largest batch set_batches may bring (default: this sampler's).
    `collate_fn` is always collate_slices."""

    def __init__(self, dataset: "SliceDataset", batch_size: int | None = 1, shuffle: bool = False, *,
                 batch_sampler: Any = None, drop_last: bool = False, generator: torch.Generator | None = None,
                 max_batch: int | None = None, **kwargs: Any):
        if batch_sampler is None:
            sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
            batch_sampler = BatchSampler(sampler, int(batch_size), drop_last)
        if max_batch is not None:
            self.max_batch = int(max_batch)
        elif isinstance(batch_sampler, BatchSampler):
            self.max_batch = int(batch_sampler.batch_size)
        else:
            self.max_batch = max((len(b) for b in batch_sampler), default=1)
        kwargs.pop("collate_fn", None)
        super().__init__(dataset, batch_sampler=_SequencedBatches(batch_sampler, dataset), generator=generator,
                         collate_fn=collate_slices, **kwargs)
        # the ring of the last iteration: free once its workers exited, or held by the persistent workers
        self._free_ring: BatchRing | None = None

    def set_batches(self, batches: Any) -> None:
        """The index lists of the next iteration (an epoch's batches); workers, persistent ones included, and
        the ring stay."""
        if any(len(b) > self.max_batch for b in batches):
            raise ValueError(f"a batch of more than max_batch={self.max_batch} items")
        self.batch_sampler.batches = batches

    def close(self) -> None:
        """Stop persistent workers now (dropping the iterator shuts them down) rather than at garbage collection."""
        self._iterator = None
        self._free_ring = None

    def _take_ring(self) -> BatchRing:
        ring = self._free_ring
        if self.persistent_workers and ring is not None:
            return ring  # the ring the persistent workers were started with
        self._free_ring = None  # taken: a second iterator running meanwhile gets a ring of its own
        ds = self.dataset
        slots = int(self.prefetch_factor) * self.num_workers + 1
        image_shape = (ds.in_channels, *ds.image_size)
        label_dtype = torch.uint8 if (ds.uint8_labels or ds.defer_augmentation) else torch.int64
        if ring is not None and ring.fits(slots, self.max_batch, image_shape, label_dtype):
            return ring
        return BatchRing(slots, self.max_batch, image_shape, ds.image_size, label_dtype)

    def __iter__(self):
        if self.num_workers == 0 or not isinstance(self.dataset, SliceDataset):
            yield from super().__iter__()
            return
        ring = self._take_ring()
        self.dataset._ring = ring  # workers start (fork, or pickle the dataset) inside super().__iter__()
        try:
            batches = super().__iter__()
        finally:
            self.dataset._ring = None
        pin = bool(self.pin_memory) and torch.cuda.is_available()
        if self.persistent_workers:
            self._free_ring = ring  # kept for the workers' lifetime
        for batch in batches:
            yield ring.collect(batch, pin) if isinstance(batch, RingTicket) else batch
        if not self.persistent_workers:  # exhausted: the iterator has joined its workers, the ring is free
            self._free_ring = ring


def _empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A batch buffer; in a DataLoader worker, in shared memory, as default_collate allocates it (the batch
    then travels to the main process without another copy)."""
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    numel = math.prod(shape)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
    return torch.empty(0, dtype=dtype).new(storage).view(tuple(shape))


class SliceDataset(Dataset):
    """Item: (image float32 (C * (2 * context + 1), H, W), label int64 (H, W)) at `image_size`.

    `__getitems__` (which DataLoader calls with a batch's indices) builds the batch as two tensors and augments it
    as a batch (apply_augmentation); with `collate_slices` (make_loader and training use it) those tensors are the
    batch, no second copy. `defer_augmentation = True` (training on a GPU) leaves the augmentation to the caller:
    the batch then carries its augmentation table and labels stay uint8 until augmented.

    `cache_resized=True` resizes every slice of every case once, in the constructor (so in the main process,
    before DataLoader workers fork and inherit it copy-on-write; training re-forks workers every epoch, so a
    cache built inside a worker would be thrown away), with the same functions as the uncached path (image with
    `image_mode`, label nearest), into one tensor of all slices; a batch is then one index_select (2.5D context
    gathers the neighbours' rows). The same values as without the cache (resizing is per channel, so
    resize-then-stack equals stack-then-resize). Memory: total slices x C x H x W x 4 bytes for the images plus
    slices x H x W bytes for the labels (uint8), at `image_size`, e.g. 2,211 Synapse training slices x 1 x 224 x
    224 x 4 B = 444 MB (+ 111 MB labels); the build costs one uncached epoch.
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
        self._setup(ingested_dir, case_ids, image_size, context, augment, seed, image_mode)
        depths = [int(c["shape"][0]) for c in self.cases]
        # (case index, slice index) for every slice, built once; items are looked up, never searched.
        self.index = np.concatenate([np.stack([np.full(d, i), np.arange(d)], 1) for i, d in enumerate(depths)]).astype(np.int64)
        # Per item, the rows of the slices it stacks (itself, or its 2.5D neighbours, edges replicated) among all
        # slices of all cases in order: the cache's rows.
        offsets = np.concatenate([[0], np.cumsum(depths)[:-1]]).astype(np.int64)
        self._rows = torch.from_numpy(np.stack([offsets[c] + np.atleast_1d(self._slices(int(z), depths[c]))
                                                for c, z in self.index]).astype(np.int64))
        # (images (slices, C, H, W) float32, labels (slices, H, W) uint8) at image_size, or None when not caching.
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        if cache_resized:
            parts = [self._resize_case(i) for i in range(len(self.cases))]
            self._cache = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    def _setup(self, ingested_dir: str | Path, case_ids: Sequence[str], image_size: Sequence[int], context: int,
               augment: Mapping[str, Any] | None, seed: int, image_mode: str) -> None:
        """What every slice dataset holds: its cases, channels, item size, augmentation and worker state."""
        self.ingested_dir = Path(ingested_dir)
        manifest = read_cases(self.ingested_dir)
        self.cases = [dict(case_entry(manifest, str(cid), self.ingested_dir)) for cid in case_ids]
        if not self.cases:
            raise ConfigError(f"{type(self).__name__} over {self.ingested_dir}: no case ids given")
        if int(context) < 0:
            raise ConfigError(f"data.context must be >= 0, got {context}")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.context = int(context)
        self.augment = dict(augment) if augment else None
        self.defer_augmentation = False
        # Labels as uint8 (the consumer makes them int64): 8x fewer bytes from a DataLoader worker to the training
        # process, whose shared-memory pages cost more than the copy (training sets it, see Trainer).
        self.uint8_labels = False
        self.seed = int(seed)
        self.image_mode = image_mode
        self.epoch = 0
        self.in_channels = int(manifest["in_channels"]) * (2 * self.context + 1)
        self.num_classes = int(manifest["num_classes"])
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._pid = os.getpid()
        self._ring: BatchRing | None = None  # set by SliceLoader while its workers start

    def __len__(self) -> int:
        return len(self.index)

    def training_pixels(self) -> int:
        """Pixels of every slice at the network's input size: what an epoch of one pass shows the network."""
        return len(self) * self.image_size[0] * self.image_size[1]

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
            self._arrays[i] = tuple(np.asarray(a) for a in open_case(self.ingested_dir, self.cases[i]))
        return self._arrays[i]

    def _resize_case(self, i: int, chunk: int = 32, size: Sequence[int] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slice of case `i` resized to `size` (default image_size), in chunks to bound the native-size copy."""
        image, label = self._case(i)
        size = self.image_size if size is None else size
        parts = [
            resize_slices(torch.from_numpy(np.array(image[s:s + chunk])), torch.from_numpy(np.array(label[s:s + chunk])),
                          size, self.image_mode)
            for s in range(0, image.shape[0], chunk)
        ]
        return torch.cat([p[0] for p in parts]).contiguous(), torch.cat([p[1] for p in parts]).contiguous()

    def _slices(self, z: int, depth: int) -> np.ndarray | int:
        """The slice index, or with 2.5D context the (2 * context + 1) neighbours, edges replicated."""
        return context_indices(depth, z, self.context) if self.context else z

    def _read_into(self, idx: int, image_out: np.ndarray, label_out: np.ndarray) -> None:
        """Copy item `idx` straight from the memmaps into batch buffers: image (C', H, W) at native size, label
        already at image_size (nearest is a pure row/column lookup, so only the needed rows are read)."""
        case, z = self.index[idx]
        image, label = self._case(int(case))
        rows = nearest_indices(label.shape[1], self.image_size[0])
        cols = nearest_indices(label.shape[2], self.image_size[1])
        label_out[...] = label[z][rows[:, None], cols[None, :]]
        image_out[...] = image[self._slices(int(z), image.shape[0])].reshape(image_out.shape)

    def _rng(self, idx: int, epoch: int | None = None) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch if epoch is None else int(epoch), int(idx)])

    def augmentation_table(self, indices: Sequence[int], epoch: int | None = None) -> torch.Tensor:
        """(B, AUG_COLUMNS) float64: each item's augmentation for this epoch (or `epoch`), from its own (seed,
        epoch, index) generator, so it is the same whatever the batch, the worker or the order."""
        square = self.image_size[0] == self.image_size[1]
        return torch.from_numpy(np.stack([draw_augmentation(self.augment, self._rng(i, epoch), square)
                                          for i in indices]))

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([idx])[0]

    def __getitems__(self, indices: Sequence[int]) -> SliceBatch | RingTicket:
        # In a SliceLoader worker the batch is built in a shared ring slot and only a ticket travels back.
        seq, epoch = getattr(indices, "seq", None), getattr(indices, "epoch", None)
        ring = self._ring if (seq is not None and get_worker_info() is not None) else None
        indices = [int(i) for i in indices]
        slot, out = ring.begin(seq, len(indices)) if ring is not None else (None, None)
        images, labels = self._batch(indices, out)
        table = self.augmentation_table(indices, epoch) if self.augment else None
        deferred = table is not None and self.defer_augmentation
        if table is not None and not deferred:
            images, labels = apply_augmentation(images, labels, table)
        if ring is not None:
            if images.data_ptr() != out.data_ptr():
                out.copy_(images)
            return ring.publish(seq, slot, labels, table if deferred else None)
        if deferred:
            return SliceBatch(images, labels, table)  # labels uint8: augmented on the device, then made int64
        if self.uint8_labels:
            return SliceBatch(images, labels)
        # Labels stay uint8 until here: flips and rotations move 8x fewer bytes than on int64.
        return SliceBatch(images, _empty(labels.shape, torch.int64).copy_(labels))

    def _batch(self, indices: list[int], out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, C', H, W) float32 in `out` when given, labels (B, H, W) uint8), before augmentation."""
        return self._cached_batch(indices, out) if self._cache is not None else self._resized_batch(indices, out)

    def _cached_batch(self, indices: list[int], out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's rows of the cache: one gather for the images (2.5D: every neighbour), one for the labels.
        `out`: where the images go (a ring slot), else a new buffer."""
        cached_images, cached_labels = self._cache
        rows = self._rows[indices]  # (B, 2 * context + 1)
        images = out if out is not None else _empty((len(indices), self.in_channels, *self.image_size),
                                                    cached_images.dtype)
        torch.index_select(cached_images, 0, rows.flatten(), out=images.view(-1, *cached_images.shape[1:]))
        labels = torch.index_select(cached_labels, 0, rows[:, self.context])
        return images, labels

    def _resized_batch(self, indices: list[int], out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncached: read the batch's slices at native size and resize them (one call per input shape)."""
        images = out if out is not None else _empty((len(indices), self.in_channels, *self.image_size), torch.float32)
        labels = torch.empty((len(indices), *self.image_size), dtype=torch.uint8)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for pos, i in enumerate(indices):
            shape = self.cases[self.index[i][0]]["shape"]
            by_shape.setdefault((int(shape[1]), int(shape[2])), []).append(pos)
        for (h, w), positions in by_shape.items():  # one buffer and one interpolate call per input shape
            native = np.empty((len(positions), self.in_channels, h, w), dtype=np.float32)
            group_labels = np.empty((len(positions), *self.image_size), dtype=np.uint8)
            for row, pos in enumerate(positions):
                self._read_into(indices[pos], native[row], group_labels[row])
            resized, _ = resize_slices(torch.from_numpy(native), None, self.image_size, self.image_mode)
            where = torch.tensor(positions)
            scatter_rows(images, where, resized)
            scatter_rows(labels, where, torch.from_numpy(group_labels))
        return images, labels


FOREGROUND_SAMPLES = 10_000  # foreground pixels kept per case and class to centre patches on (nnU-Net's 10,000)


class PatchDataset(SliceDataset):
    """The planned recipe's training items (medseg.data.plan): patches of `plan.image_size` cut from slices
    resampled to the plan's in-plane spacing, drawn with replacement. Item `i` is a draw from its own generator
    (seed, i): a case uniformly, then with probability `plan.foreground_oversample` (and a foreground class in the
    case) a class present, one of its pixels and the patch centred on it, else a slice and a position uniformly;
    patches reaching past a slice are zero-padded (image) and background (label), as nnU-Net pads. Indices are
    therefore unbounded: training numbers an epoch's items by (epoch, rank, step), so a 20-image set trains as
    many optimizer steps per epoch as a 20,000-slice one, and a resumed run draws the same patches.

    Every case is resampled once, in the constructor (main process, before workers fork), with the rules every
    path uses (medseg.data.preprocessing: image bicubic, label nearest). Memory: the training slices at the plan's
    spacing (float32 images, uint8 labels). Augmentation, batches, rings and workers are SliceDataset's."""

    def __init__(self, ingested_dir: str | Path, case_ids: Sequence[str], plan: Any, context: int = 0,
                 augment: Mapping[str, Any] | None = None, seed: int = 0, image_mode: str = "bicubic"):
        self._setup(ingested_dir, case_ids, plan.image_size, context, augment, seed, image_mode)
        self.plan = plan
        self._cache = None
        self.volumes: list[tuple[torch.Tensor, torch.Tensor]] = []  # (D, C, h, w) float32, (D, h, w) uint8
        self.foreground: list[list[np.ndarray]] = []  # per case, per class present (>0): (n, 3) (z, y, x) pixels
        rng = np.random.default_rng([self.seed, 1])
        for i, case in enumerate(self.cases):
            size = plan.slice_shape(case["shape"][1:], [float(s) for s in case["spacing"]][1:])
            images, labels = self._resize_case(i, size=size)
            self.volumes.append((images, labels))
            where = []
            for k in range(1, self.num_classes):
                pixels = np.argwhere(labels.numpy() == k)
                if len(pixels) > FOREGROUND_SAMPLES:
                    pixels = pixels[rng.choice(len(pixels), FOREGROUND_SAMPLES, replace=False)]
                if len(pixels):
                    where.append(pixels)
            self.foreground.append(where)
        self._arrays = {}  # the native memmaps are not needed again

    def __len__(self) -> int:
        """Slices to draw from (items themselves are unbounded, see the class docstring)."""
        return sum(int(v[1].shape[0]) for v in self.volumes)

    def training_pixels(self) -> int:
        """Pixels of every training slice at the plan's spacing."""
        return sum(int(labels.numel()) for _, labels in self.volumes)

    def draw(self, idx: int) -> tuple[int, int, int, int]:
        """Item `idx`'s (case, slice, top row, left column) of the patch; rows/columns may be negative or reach
        past the slice (padding)."""
        rng = np.random.default_rng([self.seed, 7, int(idx)])  # not augmentation's (seed, epoch, idx) stream
        case = int(rng.integers(len(self.volumes)))
        labels = self.volumes[case][1]
        depth, h, w = labels.shape
        ph, pw = self.image_size
        where = self.foreground[case]
        if where and rng.random() < self.plan.foreground_oversample:
            pixels = where[int(rng.integers(len(where)))]
            z, cy, cx = (int(v) for v in pixels[int(rng.integers(len(pixels)))])
            top = min(max(cy - ph // 2, min(0, h - ph)), max(0, h - ph))
            left = min(max(cx - pw // 2, min(0, w - pw)), max(0, w - pw))
            return case, z, top, left
        z = int(rng.integers(depth))
        top = int(rng.integers(min(0, h - ph), max(0, h - ph) + 1))
        left = int(rng.integers(min(0, w - pw), max(0, w - pw) + 1))
        return case, z, top, left

    def _batch(self, indices: list[int], out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        ph, pw = self.image_size
        images = out if out is not None else _empty((len(indices), self.in_channels, ph, pw), torch.float32)
        images.zero_()
        labels = torch.zeros((len(indices), ph, pw), dtype=torch.uint8)
        for row, idx in enumerate(indices):
            case, z, top, left = self.draw(idx)
            volume, label = self.volumes[case]
            depth, h, w = label.shape
            y0, y1, x0, x1 = max(top, 0), min(top + ph, h), max(left, 0), min(left + pw, w)
            into = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
            stack = volume[torch.as_tensor(np.atleast_1d(self._slices(z, depth)))][:, :, y0:y1, x0:x1]
            images[row, :, into[0], into[1]] = stack.reshape(-1, y1 - y0, x1 - x0)
            labels[row, into[0], into[1]] = label[z, y0:y1, x0:x1]
        return images, labels


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
) -> "SliceLoader":
    """SliceLoader over a SliceDataset; the shuffle order is drawn from a generator seeded with `seed`."""
    dataset = SliceDataset(ingested_dir, case_ids, image_size, context, augment, seed, image_mode, cache_resized)
    return SliceLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=shuffle,
        num_workers=int(num_workers),
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(int(seed)),
        persistent_workers=False,  # fresh workers per iteration (training keeps its own persistent loader)
    )
