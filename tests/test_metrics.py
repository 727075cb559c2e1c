"""DSC / HD95: properties, known distances, empty-mask protocols and agreement with medpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from medseg.errors import ConfigError
from medseg.evaluation.metrics import (
    DEFAULT_NSD_TOLERANCE,
    aggregate,
    binary_metrics,
    binary_scores,
    case_metrics,
    dice,
    hd95,
    nsd,
    volume_diagonal,
)

medpy_binary = pytest.importorskip("medpy.metric.binary")

masks_3d = hnp.arrays(
    dtype=bool,
    shape=st.tuples(st.integers(2, 9), st.integers(2, 9), st.integers(2, 9)),
    elements=st.booleans(),
)
spacings = st.tuples(*[st.floats(0.3, 5.0, allow_nan=False) for _ in range(3)])


def _pair(draw_mask: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A second non-empty mask of the same shape: a random perturbation of the first."""
    rng = np.random.default_rng(seed)
    other = draw_mask ^ (rng.random(draw_mask.shape) < 0.3)
    other.flat[rng.integers(other.size)] = True
    return draw_mask, other


@settings(max_examples=60, deadline=None)
@given(mask=masks_3d, seed=st.integers(0, 2**31 - 1), spacing=spacings)
def test_matches_medpy_on_random_masks(mask, seed, spacing):
    mask.flat[0] = True  # both non-empty so medpy is defined
    pred, gt = _pair(mask, seed)
    dsc, hd, status = binary_metrics(pred, gt, spacing, "mm")
    assert status == "ok"
    assert dsc == pytest.approx(medpy_binary.dc(pred, gt), abs=1e-12)
    assert hd == pytest.approx(medpy_binary.hd95(pred, gt, voxelspacing=spacing), abs=1e-9)
    # transunet protocol: voxels, spacing ignored
    assert hd95(pred, gt, spacing, "transunet") == pytest.approx(medpy_binary.hd95(pred, gt), abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(mask=masks_3d, seed=st.integers(0, 2**31 - 1), spacing=spacings)
def test_symmetry_and_identity(mask, seed, spacing):
    mask.flat[-1] = True
    pred, gt = _pair(mask, seed)
    assert dice(pred, gt) == pytest.approx(dice(gt, pred))
    assert hd95(pred, gt, spacing) == pytest.approx(hd95(gt, pred, spacing))
    assert dice(pred, pred) == 1.0
    assert hd95(pred, pred, spacing) == 0.0


@settings(max_examples=40, deadline=None)
@given(
    axis=st.integers(0, 2),
    k=st.integers(1, 6),
    spacing=spacings,
    position=st.integers(0, 3),
)
def test_sheet_shifted_by_k_voxels_is_k_times_spacing(axis, k, spacing, position):
    # A one-voxel-thick sheet perpendicular to `axis`: every voxel is surface and its partner in the shifted
    # sheet is exactly k voxels away along `axis`, so every pooled distance (and HD95) is k * spacing[axis].
    shape = [6, 7, 8]
    shape[axis] = position + k + 2
    pred = np.zeros(shape, dtype=bool)
    gt = np.zeros(shape, dtype=bool)
    index = [slice(None)] * 3
    index[axis] = position
    pred[tuple(index)] = True
    index[axis] = position + k
    gt[tuple(index)] = True
    assert hd95(pred, gt, spacing) == pytest.approx(k * spacing[axis])
    assert hd95(pred, gt, spacing, "transunet") == pytest.approx(k)
    assert dice(pred, gt) == 0.0


@pytest.mark.parametrize("k", [1, 3, 7])
def test_translated_cube_is_bounded_by_shift(k):
    spacing = (3.0, 0.7, 0.7)
    pred = np.zeros((24, 24, 24), dtype=bool)
    pred[4:12, 5:13, 6:14] = True
    gt = np.roll(pred, k, axis=0)
    value = hd95(pred, gt, spacing)
    # every surface voxel has its translated partner k*3 mm away: an upper bound, reached by the end faces
    assert 0 < value <= k * 3.0 + 1e-9
    assert value == pytest.approx(medpy_binary.hd95(pred, gt, voxelspacing=spacing))
    assert dice(pred, gt) == pytest.approx(max(0, 8 - k) / 8)


def test_anisotropic_spacing_changes_only_the_shifted_axis():
    pred = np.zeros((10, 10, 10), dtype=bool)
    pred[2:5, 2:5, 2:5] = True
    gt = np.roll(pred, 4, axis=2)  # disjoint along x
    a = hd95(pred, gt, (5.0, 5.0, 1.0))
    b = hd95(pred, gt, (1.0, 1.0, 1.0))
    assert a == pytest.approx(b)  # distances lie along x whose spacing is unchanged
    assert hd95(pred, gt, (1.0, 1.0, 2.0)) == pytest.approx(2 * b)


def test_mm_protocol_empty_masks():
    empty = np.zeros((4, 5, 6), dtype=bool)
    full = empty.copy()
    full[1:3, 1:3, 1:3] = True
    spacing = (3.0, 1.0, 0.5)
    dsc, hd, status = binary_metrics(empty, empty, spacing, "mm")
    assert status == "both_empty" and math.isnan(dsc) and math.isnan(hd)
    diag = math.sqrt(12.0**2 + 5.0**2 + 3.0**2)
    assert volume_diagonal(empty.shape, spacing) == pytest.approx(diag)
    assert binary_metrics(empty, full, spacing, "mm") == (0.0, pytest.approx(diag), "pred_empty")
    assert binary_metrics(full, empty, spacing, "mm") == (0.0, pytest.approx(diag), "gt_empty")


def test_transunet_protocol_rules():
    # TransUNet calculate_metric_percase: pred>0 & gt>0 -> dc, hd95; pred>0 & gt==0 -> 1, 0; else 0, 0
    empty = np.zeros((4, 5, 6), dtype=bool)
    full = empty.copy()
    full[1:3, 1:3, 1:3] = True
    assert binary_metrics(full, empty, None, "transunet") == (1.0, 0.0, "gt_empty")
    assert binary_metrics(empty, full, None, "transunet") == (0.0, 0.0, "pred_empty")
    assert binary_metrics(empty, empty, None, "transunet") == (0.0, 0.0, "both_empty")


def test_unknown_protocol_and_shape_mismatch():
    a = np.ones((2, 2, 2), dtype=bool)
    with pytest.raises(ConfigError, match="protocol"):
        hd95(a, a, None, "pixels")
    with pytest.raises(ValueError, match="shape"):
        dice(a, np.ones((2, 2, 3), dtype=bool))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1.0, 1.0), "mm")


def test_case_metrics_and_aggregate_count_exclusions():
    names = ["background", "a", "b", "c"]
    gt = np.zeros((4, 8, 8), dtype=np.uint8)
    gt[1:3, 1:4, 1:4] = 1
    gt[1:3, 5:7, 5:7] = 2
    pred = gt.copy()
    pred[pred == 2] = 0  # class b missed; class c absent in both
    rows = case_metrics(pred, gt, names, (2.0, 1.0, 1.0), "mm")
    assert [r["class"] for r in rows] == ["a", "b", "c"]
    assert [r["status"] for r in rows] == ["ok", "pred_empty", "both_empty"]
    assert rows[0]["dsc"] == 1.0 and rows[0]["hd95"] == 0.0
    rows2 = case_metrics(gt, gt, names, (2.0, 1.0, 1.0), "mm")
    summary = aggregate(rows + rows2, names)
    assert summary["per_class"]["b"]["dsc"] == pytest.approx(0.5)
    assert summary["per_class"]["b"]["hd95"] == pytest.approx(volume_diagonal(gt.shape, (2.0, 1.0, 1.0)) / 2)
    assert summary["per_class"]["c"] == {"dsc": None, "hd95": None, "nsd": None, "n": 0, "excluded": 2,
                                         "statuses": {"both_empty": 2}}
    assert summary["per_class"]["b"]["nsd"] == pytest.approx(0.5)  # missed once (0), perfect once (1)
    assert summary["mean_dsc"] == pytest.approx((1.0 + 0.5) / 2)  # class c has no defined value


def test_single_slice_volumes_are_scored_in_2d():
    names = ["background", "disc"]
    gt = np.zeros((1, 20, 20), dtype=np.uint8)
    gt[0, 4:14, 4:14] = 1
    pred = np.roll(gt, 2, axis=2)  # shifted 2 pixels along x (0.5 mm each)
    (row,) = case_metrics(pred, gt, names, (5.0, 0.8, 0.5), "mm")
    # contours only: the shifted square's left/right edges are 2 px = 1 mm apart, the top/bottom edges overlap
    assert row["hd95"] == pytest.approx(medpy_binary.hd95(pred[0], gt[0], voxelspacing=(0.8, 0.5)))
    assert row["hd95"] == pytest.approx(1.0)
    assert row["dsc"] == pytest.approx(0.8)


# ------------------------------------------------------------------------------------------------------------ NSD
@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own internal deprecation notice
@settings(max_examples=60, deadline=None)
@given(mask=masks_3d, seed=st.integers(0, 2**31 - 1), spacing=spacings, tolerance=st.floats(0.0, 8.0))
def test_nsd_matches_monai_surface_dice_on_random_anisotropic_masks(mask, seed, spacing, tolerance):
    """MONAI's SurfaceDiceMetric (edges by erosion, EDT with spacing, no sub-voxels) is the same definition; it
    computes in float32, hence the tolerance."""
    import torch
    from monai.metrics import compute_surface_dice

    mask.flat[0] = True
    pred, gt = _pair(mask, seed)

    def one_hot(m):
        return torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))

    expected = compute_surface_dice(one_hot(pred), one_hot(gt), [tolerance], include_background=False,
                                    spacing=spacing).item()
    assert nsd(pred, gt, spacing, "mm", tolerance) == pytest.approx(expected, abs=1e-6)
    # symmetric, and never outside [0, 1]
    assert nsd(gt, pred, spacing, "mm", tolerance) == pytest.approx(nsd(pred, gt, spacing, "mm", tolerance))


def test_nsd_tolerance_is_in_millimetres_under_mm_and_in_voxels_under_transunet():
    gt = np.zeros((8, 10, 10), dtype=bool)
    gt[2:5, 2:8, 2:8] = True
    pred = np.roll(gt, 1, axis=0)  # one slice further: 3 mm along z, every surface voxel within one voxel
    spacing = (3.0, 1.0, 1.0)
    assert nsd(pred, gt, spacing, "mm", 3.0) == 1.0
    assert nsd(pred, gt, spacing, "mm", 2.9) < 1.0
    assert nsd(pred, gt, spacing, "transunet", 1.0) == 1.0  # spacing ignored: one voxel
    assert nsd(pred, gt, spacing, "transunet", 0.9) < 1.0
    assert nsd(gt, gt, spacing, "mm", 0.0) == 1.0
    far = np.zeros_like(gt)
    far[6:8, 8:10, 8:10] = True
    assert nsd(far, gt, spacing, "mm", 1.0) == 0.0
    assert nsd(far, gt, spacing, "mm", 100.0) == 1.0  # beyond every distance in the volume


def test_nsd_empty_masks_follow_each_protocols_dsc_rule():
    empty, full = np.zeros((3, 4, 4), dtype=bool), np.ones((3, 4, 4), dtype=bool)
    assert math.isnan(binary_scores(empty, empty, (1.0, 1.0, 1.0), "mm").nsd)
    assert binary_scores(empty, full, (1.0, 1.0, 1.0), "mm").nsd == 0.0
    assert binary_scores(full, empty, (1.0, 1.0, 1.0), "mm").nsd == 0.0
    assert binary_scores(full, empty, None, "transunet").nsd == 1.0
    assert binary_scores(empty, full, None, "transunet").nsd == 0.0
    assert binary_scores(empty, empty, None, "transunet").nsd == 0.0
    with pytest.raises(ValueError, match="NSD tolerance"):
        binary_scores(full, full, None, "mm", -1.0)


def test_case_metrics_take_a_tolerance_per_class():
    names = ["background", "a", "b"]
    gt = np.zeros((6, 10, 10), dtype=np.uint8)
    gt[1:4, 1:4, 1:4] = 1
    gt[1:4, 6:9, 6:9] = 2
    pred = np.roll(gt, 1, axis=0)
    rows = case_metrics(pred, gt, names, (3.0, 1.0, 1.0), "mm", {"a": 3.0})
    assert rows[0]["nsd"] == 1.0  # a: 3 mm
    assert rows[1]["nsd"] < 1.0  # b: the default 2 mm
    assert rows[1]["nsd"] == nsd(pred == 2, gt == 2, (3.0, 1.0, 1.0), "mm", DEFAULT_NSD_TOLERANCE)
