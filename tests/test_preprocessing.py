"""medseg.data.preprocessing: torch's resize rules in numpy, the normalisations ingest records, and one network input
for the same slices whichever path builds it (training loader, evaluation, export, predict from the raw file)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medseg.data import preprocessing as pp
from medseg.errors import ConfigError

from conftest import paths

SIZES = [  # (in h, in w) -> (out h, out w): up, down, odd, non-square, 1 x 1 on either side, one axis unchanged
    ((16, 16), (24, 24)),
    ((512, 512), (224, 224)),
    ((48, 48), (32, 32)),
    ((12, 20), (24, 24)),
    ((7, 5), (3, 11)),
    ((33, 17), (64, 9)),
    ((100, 100), (13, 7)),
    ((1, 1), (4, 3)),
    ((5, 3), (1, 1)),
    ((1, 9), (1, 4)),
    ((40, 36), (40, 50)),
]


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("in_hw, out_hw", SIZES)
def test_resize_is_torch_interpolate(mode, in_hw, out_hw):
    x = (np.random.default_rng(sum(in_hw + out_hw)).normal(size=(2, 3, *in_hw)) * 300).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x), size=out_hw, mode=mode, align_corners=False).numpy()
    got = pp.resize(x, out_hw, mode)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * np.ptp(x)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resize_is_the_matrix_product_and_the_same_for_any_batch(mode):
    """resize = M_h @ x @ M_w^T (banded for speed), plane by plane: batching never changes a value."""
    x = np.random.default_rng(0).normal(size=(4, 2, 21, 30)).astype(np.float32)
    m_h, m_w = pp.interpolation_matrix(21, 16, mode), pp.interpolation_matrix(30, 45, mode)
    assert m_h.shape == (16, 21) and m_h.dtype == np.float32 and not m_h.flags.writeable
    np.testing.assert_allclose(m_h.sum(1), 1.0, atol=1e-6)  # clamped border taps add up to a partition of unity
    got = pp.resize(x, (16, 45), mode)
    np.testing.assert_allclose(got, m_h @ x @ m_w.T, rtol=0, atol=1e-5)
    one_by_one = np.stack([np.stack([pp.resize(x[n:n + 1, c:c + 1], (16, 45), mode)[0, 0] for c in range(2)])
                           for n in range(4)])
    np.testing.assert_array_equal(got, one_by_one)
    np.testing.assert_array_equal(pp.resize(x, (21, 30), mode), x)  # at the target size: unchanged
    with pytest.raises(ConfigError, match="bicubic or bilinear"):
        pp.resize(x, (8, 8), "area")


def test_nearest_indices_and_resize_labels_are_torch_nearest():
    for in_size in range(1, 40):
        for out_size in range(1, 70):
            want = F.interpolate(torch.arange(in_size, dtype=torch.float32)[None, None], size=out_size, mode="nearest")
            np.testing.assert_array_equal(pp.nearest_indices(in_size, out_size), want[0, 0].long().numpy())
    labels = np.random.default_rng(1).integers(0, 9, size=(3, 12, 20)).astype(np.uint8)
    got = pp.resize_labels(labels, (24, 7))
    want = F.interpolate(torch.from_numpy(labels).float()[:, None], size=(24, 7), mode="nearest")[:, 0]
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want.numpy().astype(np.uint8))


def test_context_stacks_clamped_neighbours_slice_major():
    image = np.arange(5)[:, None, None, None] * 10.0 + np.arange(2)[None, :, None, None] + np.zeros((5, 2, 3, 4))
    assert pp.context_indices(5, 0, 2) == [0, 0, 0, 1, 2] and pp.context_indices(5, 4, 1) == [3, 4, 4]
    stacked = pp.stack_context(image, [0, 4], 1)
    assert stacked.dtype == np.float32 and stacked.shape == (2, 6, 3, 4)
    # channels: (slice z-1: c0, c1), (z: c0, c1), (z+1: c0, c1); edges repeat the end slice
    assert stacked[0, :, 0, 0].tolist() == [0, 1, 0, 1, 10, 11]
    assert stacked[1, :, 0, 0].tolist() == [30, 31, 40, 41, 40, 41]
    np.testing.assert_array_equal(pp.stack_context(image, [2], 0), image[2:3].astype(np.float32))


def test_volume_from_canonical_xyz():
    xyz = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    dchw = pp.volume_from_canonical_xyz(xyz)
    assert dchw.shape == (4, 1, 3, 2) and dchw[3, 0, 2, 1] == xyz[1, 2, 3]
    xyzc = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    assert pp.volume_from_canonical_xyz(xyzc)[3, 4, 2, 1] == xyzc[1, 2, 3, 4]


def test_normalisation_dicts_and_their_values():
    raw = np.random.default_rng(2).normal(0, 400, size=(6, 2, 9, 11)).astype(np.int16)
    ct = pp.normalisation_for("synapse", "ct", (-125, 275))
    assert ct == {"method": "hu_window", "window": [-125.0, 275.0]}
    want = (np.clip(raw, -125, 275).astype(np.float32) + np.float32(125)) / np.float32(400)
    got = pp.normalise_image(raw, ct)
    assert got.dtype == np.float32 and got.min() == 0.0 and got.max() == 1.0
    np.testing.assert_array_equal(got, want)

    mr = pp.normalisation_for("msd", "mr", (-125, 275))
    assert mr == {"method": "percentile_clip_zscore", "percentiles": [0.5, 99.5]}
    got = pp.normalise_image(raw, mr)
    for c in range(2):  # per channel: clip to its 0.5 / 99.5 percentiles, then zero mean, unit std (float64 stats)
        lo, hi = np.percentile(raw[:, c], [0.5, 99.5])
        clipped = np.clip(raw[:, c].astype(np.float64), lo, hi)
        np.testing.assert_allclose(got[:, c], (clipped - clipped.mean()) / clipped.std(), rtol=0, atol=1e-5)

    rgb = pp.normalisation_for("folder2d", "rgb", (-125, 275))
    assert rgb == {"method": "divide_255"}
    pixels = np.random.default_rng(3).integers(0, 256, size=(1, 3, 5, 7)).astype(np.uint8)
    np.testing.assert_array_equal(pp.normalise_image(pixels, rgb), pixels.astype(np.float32) / np.float32(255))

    none = pp.normalisation_for("transunet", "ct", (-125, 275))
    assert none["method"] == "none"
    windowed = np.random.default_rng(4).random((2, 1, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(pp.normalise_image(windowed, none), windowed)

    flat = np.full((2, 1, 3, 3), 7.0)  # zero spread: divided by 1, not by 0
    np.testing.assert_array_equal(pp.normalise_image(flat, mr), np.zeros_like(flat, dtype=np.float32))
    with pytest.raises(ConfigError, match="normalisation method 'gamma'"):
        pp.normalise_image(raw, {"method": "gamma"})


def test_logits_to_labels_and_probabilities():
    logits = np.random.default_rng(5).normal(size=(3, 4, 16, 12)).astype(np.float32) * 5
    want = F.interpolate(torch.from_numpy(logits), size=(40, 30), mode="bilinear", align_corners=False).argmax(1)
    labels = pp.logits_to_labels(logits, (40, 30))
    assert labels.dtype == np.uint8 and labels.shape == (3, 40, 30)
    np.testing.assert_array_equal(labels, want.numpy())
    np.testing.assert_array_equal(pp.logits_to_labels(logits, (16, 12)), logits.argmax(1))  # native size: no resize
    probs = pp.probabilities_at(logits, (40, 30))
    assert probs.dtype == np.float32 and probs.shape == (3, 4, 40, 30)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(probs.argmax(1), labels)
    huge = np.array([[[[1e4]], [[1e4 - 1]]]], dtype=np.float32)  # exp(1e4) overflows unless shifted
    np.testing.assert_allclose(pp.softmax(huge)[0, :, 0, 0], [1 / (1 + np.exp(-1)), 1 / (1 + np.exp(1))], rtol=1e-6)


def test_argmax_classes_is_numpys_argmax_with_its_tie_and_nan_rules():
    rng = np.random.default_rng(6)
    x = rng.integers(0, 3, size=(2, 5, 7, 9)).astype(np.float32)  # few values: many ties between classes
    got = pp.argmax_classes(x)
    assert got.dtype == np.uint8 and got.shape == (2, 7, 9)
    np.testing.assert_array_equal(got, x.argmax(axis=1))  # a tie keeps the first class
    x[0, 3, 2, 4], x[1, 1, 0, 0], x[1, 4, 0, 0] = np.nan, np.nan, np.nan
    np.testing.assert_array_equal(pp.argmax_classes(x), x.argmax(axis=1))  # a NaN pixel: its first NaN
    big = rng.normal(size=(3, 9, 64, 48)).astype(np.float32)
    np.testing.assert_array_equal(pp.argmax_classes(big), big.argmax(axis=1))


def test_import_does_not_load_torch_or_the_rest_of_the_data_package():
    # predict imports these rules; the data package's other rooms (formats, ingest, the loader) are not for it
    code = ("import sys, medseg.data.preprocessing; "
            "heavy = [m for m in sys.modules if m in ('torch', 'scipy') "
            "or (m.startswith('medseg.data.') and m != 'medseg.data.preprocessing')]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_path_builds_the_same_network_input(tiny_project, tiny_params):
    """Training loader (cached and not), evaluation, export's parity batch and the predict path from the raw
    NIfTI give the same float32 network input for the same slices (2.5D context 1, 48x48 -> 32x32)."""
    import nibabel as nib

    from medseg.contracts import CheckpointMeta
    from medseg.data.cases import load_case, read_cases
    from medseg.data.loader import SliceDataset
    from medseg.data.orientation import to_canonical
    from medseg.deployment.export import _parity_inputs
    from medseg.inference.torch_backend import prepare_slices
    from medseg.io import read_json

    context, size = 1, tuple(tiny_params["data"]["image_size"])
    ingested = paths(tiny_project).ingested
    manifest = read_cases(ingested)
    case_id = read_json(paths(tiny_project).split_file)["test"][0]  # the one export reads
    record = next(c for c in manifest["cases"] if c["id"] == case_id)
    image, _, _ = load_case(ingested, case_id)
    depth = image.shape[0]
    middle = depth // 2
    indices = [0, middle, middle + 1, depth - 1]  # both ends (clamped neighbours) and export's two slices
    assert image.shape[-2:] != size  # the resize is exercised

    # (d) predict: the raw file, reoriented and laid out as ingest does, normalised with the card's dict
    img = nib.load(tiny_project / tiny_params["dataset"]["raw_dir"] / record["source_image"])
    canonical = to_canonical(np.asanyarray(img.dataobj), img.affine)[0]
    volume = pp.normalise_image(pp.volume_from_canonical_xyz(canonical), manifest["normalisation"])
    np.testing.assert_array_equal(volume, image)
    expected = pp.network_input(volume, indices, context, size)
    assert expected.dtype == np.float32 and expected.shape == (4, 3, *size)

    for cache in (False, True):  # (a) training, no augmentation
        dataset = SliceDataset(ingested, [case_id], size, context=context, augment=None, cache_resized=cache)
        np.testing.assert_array_equal(np.stack([dataset[i][0].numpy() for i in indices]), expected)
    # (b) evaluation
    np.testing.assert_array_equal(prepare_slices(image, indices, context, size).numpy(), expected)
    # (c) export's parity batch: the test case's two middle slices
    meta = CheckpointMeta(arch="unet", in_channels=3, num_classes=9, image_size=list(size), context=context)
    parity = _parity_inputs(tiny_params, tiny_project, meta, size)
    np.testing.assert_array_equal(parity.numpy(), expected[1:3])
