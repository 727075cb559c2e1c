"""Per-class Dice (DSC), 95th-percentile Hausdorff distance (HD95) and Normalized Surface Dice (NSD) on 3D label
volumes.

HD95 is medpy's definition: the 95th percentile of the POOLED surface distances of both directions,
`np.percentile(np.hstack((d_pred_to_gt, d_gt_to_pred)), 95)`, surfaces being the voxels removed by one
binary erosion with a face-connected (connectivity 1) structure. It is computed here with scipy distance
transforms on the bounding box of the two masks (exact, and much faster than on the whole volume).

Two protocols decide units and empty masks (see docs/metrics.md):

- "mm" (default): distances in millimetres from the voxel spacing (spacing None: in voxels, which is how
  evaluation scores data whose spacing is unknown, labelled "voxels").
  both masks non-empty -> status "ok"; both empty -> "both_empty": DSC and HD95 NaN, excluded from the means
  (and counted); exactly one empty ("pred_empty" = missed organ, "gt_empty" = false positive) -> DSC 0 and
  HD95 = the volume's diagonal in mm (the largest distance possible inside the volume: a worst case).
- "transunet": TransUNet's calculate_metric_percase (medpy dc/hd95 in voxels, spacing ignored):
  both non-empty -> dc, hd95; pred non-empty and gt empty -> (1, 0); pred empty -> (0, 0).

NSD (Nikolov et al. 2021; MONAI's SurfaceDiceMetric without sub-voxels): the share of both surfaces (the same
surface voxels and distances as HD95) lying within a tolerance of the other surface,
`(#{d(P->G) <= tau} + #{d(G->P) <= tau}) / (|dP| + |dG|)`. tau is in the unit HD95 is in (mm, or voxels under
"transunet" and for unknown spacing). Empty masks follow the protocol's DSC rule (mm: both empty NaN, one empty 0;
transunet: gt empty and pred non-empty 1, pred empty 0).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
from scipy import ndimage

PROTOCOLS = ("mm", "transunet")

OK, BOTH_EMPTY, PRED_EMPTY, GT_EMPTY = "ok", "both_empty", "pred_empty", "gt_empty"

# NSD tolerance when params.yaml gives none: 2 mm, within the 1-3 mm inter-rater boundary variation reported for
# abdominal organs (Nikolov et al. 2021 set it per organ from such data; so can evaluate.nsd_tolerance).
DEFAULT_NSD_TOLERANCE = 2.0

class Scores(NamedTuple):
    dsc: float
    hd95: float
    nsd: float
    status: str


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        from medseg.errors import ConfigError

        raise ConfigError(f"evaluate.protocol={protocol!r}; expected one of {', '.join(PROTOCOLS)}")


def status_of(pred: np.ndarray, gt: np.ndarray) -> str:
    p, g = bool(np.any(pred)), bool(np.any(gt))
    if p and g:
        return OK
    if not p and not g:
        return BOTH_EMPTY
    return PRED_EMPTY if g else GT_EMPTY


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2|P∩G| / (|P|+|G|) of two binary masks; 1.0 when both are empty (they agree perfectly)."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"dice: prediction shape {pred.shape} != ground truth shape {gt.shape}")
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def foreground_dice(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> list[float]:
    """Dice of each foreground class 1..K-1 of a label volume, classes empty in both left out: training's
    validation score (one pass over the volume: the joint histogram of (truth, prediction) gives every class's
    intersection and sizes)."""
    joint = np.bincount(np.asarray(gt).astype(np.int64).ravel() * num_classes + np.asarray(pred).ravel(),
                        minlength=num_classes**2).reshape(num_classes, num_classes)
    inter, gt_sum, pred_sum = np.diag(joint), joint.sum(1), joint.sum(0)
    return [float(2.0 * inter[c] / (gt_sum[c] + pred_sum[c])) for c in range(1, num_classes)
            if gt_sum[c] + pred_sum[c] > 0]


def _bbox_crop(pred: np.ndarray, gt: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of pred|gt. Exact for surfaces: a voxel on the box's face is a surface voxel either way,
    because its neighbour outside the box is outside both masks."""
    union = pred | gt
    crop = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        crop.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(crop)


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(distances from each pred surface voxel to the gt surface, and gt -> pred); both masks non-empty."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"surface distances: prediction shape {pred.shape} != ground truth shape {gt.shape}")
    if not pred.any() or not gt.any():
        raise ValueError("surface distances need two non-empty masks")
    crop = _bbox_crop(pred, gt)
    pred, gt = pred[crop], gt[crop]
    sampling = None if spacing is None else np.asarray(spacing, dtype=np.float64)
    footprint = ndimage.generate_binary_structure(pred.ndim, 1)
    pred_border = pred ^ ndimage.binary_erosion(pred, structure=footprint, iterations=1)
    gt_border = gt ^ ndimage.binary_erosion(gt, structure=footprint, iterations=1)
    # The EDT measures the distance to the nearest zero, so invert the borders.
    to_gt = ndimage.distance_transform_edt(~gt_border, sampling=sampling)[pred_border]
    to_pred = ndimage.distance_transform_edt(~pred_border, sampling=sampling)[gt_border]
    return to_gt, to_pred


def _surface_scores(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None,
                    tolerance: float) -> tuple[float, float]:
    """(HD95, NSD at `tolerance`) of two non-empty masks, from one pair of distance transforms."""
    to_gt, to_pred = surface_distances(pred, gt, spacing)
    pooled = np.hstack((to_gt, to_pred))
    return float(np.percentile(pooled, 95)), float(np.count_nonzero(pooled <= tolerance) / pooled.size)


def volume_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the volume's diagonal in mm (in voxels for unit spacing): the worst-case HD95 for a missed or
    hallucinated structure."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def binary_scores(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None, protocol: str = "mm",
    nsd_tolerance: float = DEFAULT_NSD_TOLERANCE,
) -> Scores:
    """(dsc, hd95, nsd, status) of two binary masks under `protocol` (module docstring has the rules)."""
    _check_protocol(protocol)
    if not (isinstance(nsd_tolerance, (int, float)) and math.isfinite(nsd_tolerance) and nsd_tolerance >= 0):
        raise ValueError(f"NSD tolerance {nsd_tolerance!r}; expected a finite number >= 0")
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    status = status_of(pred, gt)
    if protocol == "transunet":
        if status == OK:
            return Scores(dice(pred, gt), *_surface_scores(pred, gt, None, nsd_tolerance), status)
        if status == GT_EMPTY:  # pred.sum() > 0 and gt.sum() == 0
            return Scores(1.0, 0.0, 1.0, status)
        return Scores(0.0, 0.0, 0.0, status)  # pred empty (whether or not gt is)
    if spacing is None:
        spacing = (1.0,) * pred.ndim
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {pred.ndim}-D mask")
    if status == OK:
        return Scores(dice(pred, gt), *_surface_scores(pred, gt, spacing, nsd_tolerance), status)
    if status == BOTH_EMPTY:
        return Scores(math.nan, math.nan, math.nan, status)
    return Scores(0.0, volume_diagonal(pred.shape, spacing), 0.0, status)


def binary_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None, protocol: str = "mm"
) -> tuple[float, float, str]:
    """(dsc, hd95, status) of two binary masks under `protocol` (module docstring has the rules)."""
    dsc, hd, _, status = binary_scores(pred, gt, spacing, protocol)
    return dsc, hd, status


def nsd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None, protocol: str = "mm",
        tolerance: float = DEFAULT_NSD_TOLERANCE) -> float:
    """Normalized Surface Dice at `tolerance` (in the unit of `spacing`) with `protocol`'s empty-mask rules."""
    return binary_scores(pred, gt, spacing, protocol, tolerance).nsd


def class_tolerance(tolerance: "float | Mapping[str, float] | None", name: str) -> float:
    """A class's NSD tolerance: one number for every class, or a {class: tolerance} map (a class it does not name
    gets the default)."""
    if tolerance is None:
        return DEFAULT_NSD_TOLERANCE
    if isinstance(tolerance, Mapping):
        return float(tolerance.get(name, DEFAULT_NSD_TOLERANCE))
    return float(tolerance)


def hd95(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None, protocol: str = "mm"
) -> float:
    """HD95 (pooled 95th percentile of both directed surface distances) with `protocol`'s empty-mask rules."""
    return binary_metrics(pred, gt, spacing, protocol)[1]


def case_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    class_names: Sequence[str],
    spacing: Sequence[float] | None,
    protocol: str = "mm",
    nsd_tolerance: "float | Mapping[str, float] | None" = None,
) -> list[dict]:
    """One row per foreground class (index >= 1): {"class", "dsc", "hd95", "nsd", "status"} for label volumes.

    A single-slice volume (1, H, W) (2D datasets) is scored as a 2D image with the in-plane spacing.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    if pred.ndim == 3 and pred.shape[0] == 1:
        # 2D images (D=1): surfaces are in-plane contours; a 3D erosion would make every pixel "surface"
        pred, gt = pred[0], gt[0]
        spacing = None if spacing is None else tuple(spacing)[-2:]
    rows = []
    for index, name in enumerate(class_names):
        if index == 0:
            continue
        scores = binary_scores(pred == index, gt == index, spacing, protocol, class_tolerance(nsd_tolerance, name))
        rows.append({"class": name, "dsc": scores.dsc, "hd95": scores.hd95, "nsd": scores.nsd,
                     "status": scores.status})
    return rows


def aggregate(rows: Sequence[dict], class_names: Sequence[str]) -> dict:
    """Per-class means over cases (NaN entries excluded and counted), then the mean over classes.

    Returns {"per_class": {name: {"dsc", "hd95", "nsd", "n", "excluded", "statuses"}}, "mean_dsc", "mean_hd95",
    "mean_nsd"}; a value with nothing defined to average is None (JSON null), never a silent NaN. Rows without
    "nsd" (older per_case.csv files) give NSD None.
    """
    per_class: dict[str, dict] = {}
    for name in class_names[1:]:
        mine = [r for r in rows if r["class"] == name]
        dsc = [r["dsc"] for r in mine if not _isnan(r["dsc"])]
        hd = [r["hd95"] for r in mine if not _isnan(r["hd95"])]
        surface = [r["nsd"] for r in mine if not _isnan(r.get("nsd"))]
        statuses: dict[str, int] = {}
        for r in mine:
            statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        per_class[name] = {
            "dsc": _mean(dsc),
            "hd95": _mean(hd),
            "nsd": _mean(surface),
            "n": len(dsc),
            "excluded": len(mine) - len(dsc),
            "statuses": statuses,
        }
    return {
        "per_class": per_class,
        "mean_dsc": _mean([v["dsc"] for v in per_class.values() if v["dsc"] is not None]),
        "mean_hd95": _mean([v["hd95"] for v in per_class.values() if v["hd95"] is not None]),
        "mean_nsd": _mean([v["nsd"] for v in per_class.values() if v["nsd"] is not None]),
    }


def _isnan(value: float) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def finite_or_none(value: Any) -> float | None:
    """A metric read back from JSON/CSV/MLflow tags as float, or None when missing, unparsable, NaN or Inf."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
