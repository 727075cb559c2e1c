"""SliceDataset over memory-mapped ingested arrays: shapes, 2.5D context, resize, deterministic augmentation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg.data.augment import apply_augmentation, rotation_grid
from medseg.data.cases import load_case, read_cases
from medseg.data.loader import SliceDataset, collate_slices, make_loader
from medseg.errors import ConfigError, IngestError
from medseg.io import save_npy, write_json

from conftest import augment_slice, dataset_from_params, paths

K = 4  # classes


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """Two cases of different in-plane size; image = label / K + slice index * 10, so alignment is checkable."""
    root = tmp_path_factory.mktemp("ingested")
    cases = []
    for case_id, (d, h, w) in {"a": (3, 16, 16), "b": (2, 12, 20)}.items():
        rng = np.random.default_rng(len(case_id) + d)
        label = rng.integers(0, K, size=(d, h, w)).astype(np.uint8)
        image = (label / K + 10 * np.arange(d)[:, None, None]).astype(np.float32)[:, None]
        save_npy(root / f"cases/{case_id}_image.npy", image)
        save_npy(root / f"cases/{case_id}_label.npy", label)
        cases.append(
            {"id": case_id, "patient": case_id, "shape": [d, h, w], "spacing": [3.0, 0.5, 0.5],
             "image": f"cases/{case_id}_image.npy", "label": f"cases/{case_id}_label.npy"}
        )
    write_json(root / "cases.json", {"dataset": "t", "num_classes": K, "class_names": list("abcd"), "in_channels": 1, "cases": cases})
    return root


def test_read_and_load_case(ingested):
    assert [c["id"] for c in read_cases(ingested)["cases"]] == ["a", "b"]
    image, label, spacing = load_case(ingested, "b")
    assert isinstance(image, np.memmap) and image.shape == (2, 1, 12, 20) and label.shape == (2, 12, 20)
    assert spacing == (3.0, 0.5, 0.5)
    with pytest.raises(ConfigError, match="'zz' is not in"):
        load_case(ingested, "zz")
    with pytest.raises(IngestError, match="cases.json: not found; run the ingest stage first"):
        read_cases(ingested / "missing")


def test_items_at_native_size_are_the_stored_slices(ingested):
    ds = SliceDataset(ingested, ["a"], (16, 16))
    assert len(ds) == 3 and ds.in_channels == 1 and ds.num_classes == K
    image, label = ds[2]
    stored_image, stored_label, _ = load_case(ingested, "a")
    assert image.dtype == torch.float32 and label.dtype == torch.int64
    np.testing.assert_array_equal(image.numpy(), stored_image[2])
    np.testing.assert_array_equal(label.numpy(), stored_label[2])


def test_resize_image_bicubic_label_nearest(ingested):
    ds = SliceDataset(ingested, ["a", "b"], (24, 24))
    assert len(ds) == 5
    image, label = ds[4]  # case b, slice 1 (12 x 20 -> 24 x 24)
    stored_image, stored_label, _ = load_case(ingested, "b")
    expected = F.interpolate(torch.from_numpy(np.array(stored_image[1:2])), size=(24, 24), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(image, expected)
    assert image.shape == (1, 24, 24) and label.shape == (24, 24)
    assert set(label.unique().tolist()) <= set(range(K))  # nearest: no blended labels
    near = F.interpolate(torch.from_numpy(stored_label[1:2].astype(np.float32))[None], size=(24, 24), mode="nearest")[0, 0]
    torch.testing.assert_close(label, near.long())


def test_context_stacks_neighbours_and_replicates_edges(ingested):
    ds = SliceDataset(ingested, ["a"], (16, 16), context=1)
    assert ds.in_channels == 3
    first, _ = ds[0]
    last, _ = ds[2]
    middle, _ = ds[1]
    # The image encodes the slice index in its tens: channels hold slices (z-1, z, z+1).
    assert [int(c.min() // 10) for c in first] == [0, 0, 1]
    assert [int(c.min() // 10) for c in middle] == [0, 1, 2]
    assert [int(c.min() // 10) for c in last] == [1, 2, 2]


def test_batched_fetch_equals_single_items(ingested):
    aug = {"p": 0.5, "flip": True, "rot90": True, "rotate_deg": 10, "intensity_jitter": 0.1}
    ds = SliceDataset(ingested, ["a", "b"], (16, 16), augment=aug, seed=3)
    batch = ds.__getitems__([4, 0, 3, 1])  # mixed source shapes
    for (img, lbl), i in zip(batch, [4, 0, 3, 1]):
        single_img, single_lbl = ds[i]
        torch.testing.assert_close(img, single_img)
        torch.testing.assert_close(lbl, single_lbl)


def test_flip_and_rot90_keep_image_and_label_aligned(ingested):
    ds = SliceDataset(ingested, ["a"], (16, 16), augment={"p": 1.0, "flip": True, "rot90": True}, seed=0)
    plain = SliceDataset(ingested, ["a"], (16, 16))
    changed = 0
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            image, label = ds[i]
            torch.testing.assert_close(image[0] % 10, label.float() / K)  # image still encodes the label
            changed += not torch.equal(label, plain[i][1])
    assert changed > 0


@pytest.mark.parametrize("height,width,angle", [(224, 224, 0.1), (64, 96, -0.25), (5, 3, 1.0)])
def test_rotation_grid_is_affine_grid(height, width, angle):
    cos, sin = np.cos(angle), np.sin(angle)
    theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]], dtype=torch.float32)
    want = F.affine_grid(theta, [1, 1, height, width], align_corners=False)
    torch.testing.assert_close(rotation_grid(height, width, angle), want, atol=1e-6, rtol=0)


def test_augmentation_keeps_the_label_dtype_and_items_have_int64_labels(ingested):
    aug = {"p": 1.0, "flip": True, "rot90": True, "rotate_deg": 15, "intensity_jitter": 0.1}
    image, label = torch.rand(1, 16, 16), torch.randint(0, K, (16, 16), dtype=torch.uint8)
    _, rotated = augment_slice(image, label, aug, np.random.default_rng(0))
    assert rotated.dtype == torch.uint8 and set(rotated.unique().tolist()) <= set(range(K))
    ds = SliceDataset(ingested, ["a"], (16, 16), augment=aug, seed=0, cache_resized=True)
    assert all(item[1].dtype == torch.int64 for item in ds.__getitems__(list(range(len(ds)))))


def test_augmentation_is_deterministic_per_seed_and_epoch(ingested):
    aug = {"p": 0.7, "flip": True, "rot90": True, "rotate_deg": 15, "intensity_jitter": 0.2}
    ds1 = SliceDataset(ingested, ["a", "b"], (16, 16), augment=aug, seed=5)
    ds2 = SliceDataset(ingested, ["a", "b"], (16, 16), augment=aug, seed=5)
    for i in range(len(ds1)):
        torch.testing.assert_close(ds1[i], ds2[i])
    epoch0 = [ds1[i] for i in range(len(ds1))]
    ds1.set_epoch(1)
    epoch1 = [ds1[i] for i in range(len(ds1))]
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(epoch0, epoch1))
    for _, label in epoch1:
        assert set(label.unique().tolist()) <= set(range(K))


def test_workers_give_the_same_batches_as_the_main_process(ingested):
    aug = {"p": 0.5, "flip": True, "rot90": True, "rotate_deg": 15, "intensity_jitter": 0.1}
    batches = []
    for workers in (0, 2):
        loader = make_loader(ingested, ["a", "b"], (16, 16), batch_size=2, shuffle=True, augment=aug, seed=9, num_workers=workers)
        loader.dataset.set_epoch(2)
        batches.append([(x.clone(), y.clone()) for x, y in loader])
    assert len(batches[0]) == 3
    for (x0, y0), (x1, y1) in zip(*batches):
        torch.testing.assert_close(x0, x1)
        torch.testing.assert_close(y0, y1)


@pytest.mark.parametrize("context", [0, 1])
@pytest.mark.parametrize("augment", [None, {"p": 0.5, "flip": True, "rot90": True, "rotate_deg": 15, "intensity_jitter": 0.1}])
@pytest.mark.parametrize("size", [(24, 24), (16, 16)])  # resized from both shapes; native for case a
def test_cached_resize_gives_identical_items(ingested, context, augment, size):
    kwargs = dict(image_size=size, context=context, augment=augment, seed=7)
    plain = SliceDataset(ingested, ["a", "b"], **kwargs)
    cached = SliceDataset(ingested, ["a", "b"], cache_resized=True, **kwargs)
    assert plain._cache is None and cached._cache[0].shape == (5, 1, *size) and cached._cache[1].shape == (5, *size)
    for epoch in (0, 3):
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        batch = [4, 0, 3, 1, 2]
        for (x0, y0), (x1, y1) in zip(plain.__getitems__(batch), cached.__getitems__(batch)):
            assert x1.shape == (2 * context + 1, *size)
            assert torch.equal(x0, x1) and torch.equal(y0, y1) and y1.dtype == torch.int64
        for i in range(len(plain)):
            assert all(torch.equal(u, v) for u, v in zip(plain[i], cached[i]))


def test_cached_loader_with_workers_matches_uncached(ingested):
    aug = {"p": 0.5, "flip": True, "rot90": True, "rotate_deg": 15, "intensity_jitter": 0.1}
    batches = []
    for cache, workers in ((False, 0), (True, 2)):
        loader = make_loader(ingested, ["a", "b"], (24, 24), batch_size=2, shuffle=True, context=1, augment=aug,
                             seed=9, num_workers=workers, cache_resized=cache)
        loader.dataset.set_epoch(1)
        batches.append([(x.clone(), y.clone()) for x, y in loader])
    for (x0, y0), (x1, y1) in zip(*batches):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_bad_arguments(ingested):
    with pytest.raises(ConfigError, match="no case ids"):
        SliceDataset(ingested, [], (16, 16))
    with pytest.raises(ConfigError, match="context"):
        SliceDataset(ingested, ["a"], (16, 16), context=-1)


def test_on_the_tiny_phantom_project(tiny_project, tiny_params):
    split = json.loads(paths(tiny_project).split_file.read_text())
    ds = dataset_from_params(tiny_params, tiny_project, split["train"], train=True)
    assert ds.augment == tiny_params["data"]["augment"]
    assert (ds._cache is not None) == tiny_params["data"].get("cache_resized", True)
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    images, labels = next(iter(loader))
    assert images.shape == (8, 1, 32, 32) and labels.shape == (8, 32, 32)
    assert labels.max() < len(tiny_params["dataset"]["class_names"])
    assert len(ds) == sum(read_cases_depth(tiny_project, c) for c in split["train"])


def read_cases_depth(root, case_id):
    return load_case(paths(root).ingested, case_id)[1].shape[0]


def reference_augment(image, label, options, rng):
    """The item-by-item augmentation medseg used before it was batched (kept here as the semantics to match)."""
    p = float(options.get("p", 0.5))
    if options.get("flip") and rng.random() < p:
        image, label = image.flip(-1), label.flip(-1)
    if options.get("flip") and rng.random() < p:
        image, label = image.flip(-2), label.flip(-2)
    if options.get("rot90") and rng.random() < p:
        k = int(rng.integers(1, 4)) if image.shape[-1] == image.shape[-2] else 2
        image, label = torch.rot90(image, k, (-2, -1)), torch.rot90(label, k, (-2, -1))
    degrees = float(options.get("rotate_deg") or 0.0)
    if degrees > 0 and rng.random() < p:
        angle = math.radians(rng.uniform(-degrees, degrees))
        cos, sin = math.cos(angle), math.sin(angle)  # the grid of F.affine_grid, as medseg wrote it per item
        height, width = image.shape[-2:]
        x = (torch.arange(width, dtype=torch.float32) * 2 + 1) / width - 1
        y = ((torch.arange(height, dtype=torch.float32) * 2 + 1) / height - 1)[:, None]
        grid = torch.stack([x * cos - y * sin, x * sin + y * cos], -1)[None]
        image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        label = F.grid_sample(label[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                              align_corners=False)[0, 0].to(label.dtype)
    jitter = float(options.get("intensity_jitter") or 0.0)
    if jitter > 0 and rng.random() < p:
        scale, shift = 1.0 + rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)
        image = image * scale + shift
    return image.contiguous(), label.contiguous()


@pytest.mark.parametrize("shape", [(3, 24, 24), (2, 16, 20)])
@pytest.mark.parametrize("p", [0.5, 1.0])
def test_batched_augmentation_equals_item_by_item(ingested, shape, p):
    """One batch call gives, item for item, exactly what augmenting each slice alone gave, with the same draws."""
    aug = {"p": p, "flip": True, "rot90": True, "rotate_deg": 20, "intensity_jitter": 0.2}
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(16, *shape, generator=gen)
    labels = torch.randint(0, K, (16, *shape[1:]), dtype=torch.uint8, generator=gen)
    want = [reference_augment(images[i], labels[i], aug, np.random.default_rng([1, 2, i])) for i in range(16)]
    ds = SliceDataset(ingested, ["a"], shape[1:], augment=aug, seed=1)
    ds.set_epoch(2)
    got_images, got_labels = apply_augmentation(images.clone(), labels.clone(), ds.augmentation_table(range(16)))
    for i, (want_image, want_label) in enumerate(want):
        assert torch.equal(got_images[i], want_image), f"item {i}"
        assert torch.equal(got_labels[i], want_label), f"item {i}"
    single = augment_slice(images[3], labels[3], aug, np.random.default_rng([1, 2, 3]))
    assert torch.equal(single[0], want[3][0]) and torch.equal(single[1], want[3][1])


@pytest.mark.parametrize("cache", [False, True])
def test_deferred_augmentation_gives_the_same_batch_when_applied_by_the_caller(ingested, cache):
    """Training on a GPU takes the un-augmented batch with its table and augments on the device: same batch."""
    aug = {"p": 0.7, "flip": True, "rot90": True, "rotate_deg": 15, "intensity_jitter": 0.1}
    ds = SliceDataset(ingested, ["a", "b"], (16, 16), augment=aug, seed=4, cache_resized=cache)
    ds.set_epoch(1)
    batch = [4, 0, 3, 1, 2]
    images, labels = collate_slices(ds.__getitems__(batch))
    ds.defer_augmentation = True
    raw_images, raw_labels, table = collate_slices(ds.__getitems__(batch))
    assert raw_labels.dtype == torch.uint8 and table.shape == (5, 6)
    later_images, later_labels = apply_augmentation(raw_images, raw_labels, table)
    assert torch.equal(later_images, images) and torch.equal(later_labels.long(), labels)


def test_the_loader_hands_over_the_batch_the_dataset_built(ingested):
    """collate_slices returns the batch tensors themselves (no second copy); plain item lists still collate."""
    ds = SliceDataset(ingested, ["a", "b"], (16, 16), cache_resized=True)
    batch = ds.__getitems__([0, 1, 2])
    images, labels = collate_slices(batch)
    assert images.data_ptr() == batch.images.data_ptr() and images.shape == (3, 1, 16, 16)
    plain_images, plain_labels = collate_slices(list(batch))
    assert torch.equal(plain_images, images) and torch.equal(plain_labels, labels)


def test_uint8_labels_are_the_same_labels(ingested):
    """Training takes labels as uint8 (8x fewer bytes from a worker) and makes them int64 itself: same values."""
    aug = {"p": 0.5, "flip": True, "rot90": True, "rotate_deg": 15, "intensity_jitter": 0.1}
    ds = SliceDataset(ingested, ["a", "b"], (16, 16), augment=aug, seed=2, cache_resized=True)
    images, labels = collate_slices(ds.__getitems__([0, 3, 4]))
    ds.uint8_labels = True
    small_images, small_labels = collate_slices(ds.__getitems__([0, 3, 4]))
    assert labels.dtype == torch.int64 and small_labels.dtype == torch.uint8
    assert torch.equal(small_labels.long(), labels) and torch.equal(small_images, images)


AUG = {"p": 0.5, "flip": True, "rot90": True, "rotate_deg": 15, "intensity_jitter": 0.1}


def _reference_batches(dataset, batches):
    """What a plain DataLoader with collate_slices hands over, in process."""
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_slices)
    return [tuple(t.clone() for t in batch) for batch in loader]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("mode", ["int64", "uint8", "deferred"])
def test_slice_loader_ring_gives_the_in_process_batches(ingested, workers, mode):
    """Workers build each batch in a shared ring slot and send a ticket; the batches, dtypes and the deferred
    augmentation table are those of the in-process path, batch sizes varying as training's lists do."""
    from medseg.data.loader import SliceLoader

    ds = SliceDataset(ingested, ["a", "b"], (24, 24), context=1, augment=AUG, seed=3, cache_resized=mode != "int64")
    ds.uint8_labels = mode == "uint8"
    ds.defer_augmentation = mode == "deferred"
    ds.set_epoch(4)
    batches = [[4, 0], [3], [1, 2, 0], [2, 2]]
    expected = _reference_batches(ds, batches)
    loader = SliceLoader(ds, batch_sampler=batches, num_workers=workers)
    assert loader.max_batch == 3
    for _ in range(2):  # a second epoch reuses the first one's ring (its workers have exited)
        got = [tuple(t.clone() for t in batch) for batch in loader]
        assert len(got) == len(expected)
        for want, have in zip(expected, got):
            assert len(have) == (3 if mode == "deferred" else 2)
            for a, b in zip(want, have):
                assert a.dtype == b.dtype
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # NaN angle: no rotation
        assert loader._free_ring is not None
        ring = loader._free_ring
        assert ring.slots == loader.prefetch_factor * workers + 1 and ring.labels.dtype == (
            torch.int64 if mode == "int64" else torch.uint8)
    assert ds._ring is None  # only set while workers start


def test_slice_loader_shuffles_as_a_dataloader_does(ingested):
    from medseg.data.loader import SliceLoader

    ds = SliceDataset(ingested, ["a", "b"], (16, 16), augment=AUG, seed=1)
    plain = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True, collate_fn=collate_slices,
                                        generator=torch.Generator().manual_seed(5))
    ring = SliceLoader(ds, batch_size=2, shuffle=True, num_workers=1, generator=torch.Generator().manual_seed(5))
    for (x0, y0), (x1, y1) in zip(plain, ring, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    persistent = SliceLoader(ds, batch_size=2, num_workers=1, persistent_workers=True)
    first = [x.clone() for x, _ in persistent]
    again = [x.clone() for x, _ in persistent]  # same workers, same ring
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, again))


def test_ring_refuses_a_slot_that_holds_another_batch():
    from medseg.data.loader import BatchRing

    ring = BatchRing(2, 4, (1, 8, 8), (8, 8), torch.uint8)
    slot, images = ring.begin(0, 3)
    images.fill_(1.0)
    ticket = ring.publish(0, slot, torch.ones(3, 8, 8, dtype=torch.uint8), None)
    x, y = ring.collect(ticket)
    assert x.shape == (3, 1, 8, 8) and bool((x == 1).all()) and y.dtype == torch.uint8
    ring.begin(2, 1)  # batch 2 goes to slot 0 before batch 0 was read: a broken in-flight bound
    with pytest.raises(RuntimeError, match="slot 0 holds batch -1, not batch 0"):
        ring.collect(ticket)
    with pytest.raises(RuntimeError, match="more items than|5 items, more than the ring's 4"):
        ring.begin(1, 5)


def test_persistent_workers_augment_for_the_epoch_set_in_the_main_process(ingested):
    """A persistent worker's dataset copy never sees set_epoch; each batch carries the epoch instead. Before,
    persistent workers kept augmenting every epoch as the first one (so training could not use them)."""
    from medseg.data.loader import SliceLoader

    ds = SliceDataset(ingested, ["a", "b"], (16, 16), augment=AUG, seed=2, cache_resized=True)
    batches = [[0, 1], [2, 3], [4]]
    loader = SliceLoader(ds, batch_sampler=batches, num_workers=1, persistent_workers=True, max_batch=2)
    for epoch in (0, 1, 5):
        ds.set_epoch(epoch)
        got = [tuple(t.clone() for t in batch) for batch in loader]
        for want, have in zip(_reference_batches(ds, batches), got, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(want, have))
    loader.set_batches([[4, 3], [1]])  # the next epoch's lists, same workers and ring
    ring = loader._free_ring
    ds.set_epoch(6)
    got = [tuple(t.clone() for t in batch) for batch in loader]
    assert loader._free_ring is ring
    for want, have in zip(_reference_batches(ds, [[4, 3], [1]]), got, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(want, have))
    with pytest.raises(ValueError, match="max_batch=2"):
        loader.set_batches([[0, 1, 2]])
    loader.close()
    assert loader._iterator is None
