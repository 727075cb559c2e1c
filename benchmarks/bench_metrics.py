"""Per-case DSC + HD95 (8 organs, mm): medseg.evaluation.metrics against medpy.metric.binary, side by side.

medseg computes the same pooled HD95 as medpy (checked here: max difference printed) but runs the distance
transforms on the bounding box of each organ pair instead of the whole volume.
Data: a phantom-like label volume with 8 ellipsoid "organs" and a prediction that is the ground truth shifted
and eroded in places, at an abdominal-CT-like size and spacing.

    python benchmarks/bench_metrics.py [--shape 64 256 256] [--repeats 3]

Goal (not a test): >= 5x faster than medpy per case, identical values (|diff| < 1e-9).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from scipy import ndimage

from medseg.evaluation.metrics import case_metrics

CLASSES = ["background", "aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas", "spleen", "stomach"]


def make_volumes(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    gt = np.zeros(shape, dtype=np.uint8)
    for label in range(1, len(CLASSES)):
        c = rng.uniform(-0.6, 0.6, 3)
        r = rng.uniform(0.08, 0.3, 3)
        gt[((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1] = label
    pred = np.roll(gt, (1, 3, -2), axis=(0, 1, 2))
    pred[ndimage.binary_erosion(pred == 5, iterations=2) ^ (pred == 5)] = 0  # thinner liver
    return pred, gt


def medpy_case(pred, gt, spacing):
    from medpy.metric.binary import dc, hd95

    rows = []
    for index, name in enumerate(CLASSES[1:], start=1):
        p, g = pred == index, gt == index
        rows.append({"class": name, "dsc": dc(p, g), "hd95": hd95(p, g, voxelspacing=spacing)})
    return rows


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 256, 256], help="D H W")
    parser.add_argument("--spacing", type=float, nargs=3, default=[3.0, 0.76, 0.76], help="sz sy sx (mm)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pred, gt = make_volumes(tuple(args.shape))
    spacing = tuple(args.spacing)
    t_ours, ours = timed(lambda: case_metrics(pred, gt, CLASSES, spacing, "mm"), args.repeats)
    t_medpy, ref = timed(lambda: medpy_case(pred, gt, spacing), args.repeats)
    diff = max(max(abs(a["dsc"] - b["dsc"]), abs(a["hd95"] - b["hd95"])) for a, b in zip(ours, ref))
    print(f"volume {tuple(args.shape)} spacing {spacing}, 8 classes, median of {args.repeats}")
    print(f"medseg.evaluation.metrics : {t_ours * 1000:9.1f} ms/case")
    print(f"medpy          : {t_medpy * 1000:9.1f} ms/case")
    print(f"speed-up       : {t_medpy / t_ours:9.1f}x   max |difference| {diff:.2e}")
    met = t_medpy / t_ours >= 5 and diff < 1e-9
    print(f"goal: medseg.evaluation.metrics >= 5x medpy per case with identical values ({t_medpy / t_ours:.1f}x, "
          f"max |difference| {diff:.1e}) -> {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
