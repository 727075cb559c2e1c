"""Peak memory and time of ingesting large CT volumes: does ingest hold one case at a time?

Writes CT-like 512 x 512 x 200 int16 volumes (air around a body of soft tissue, bone and organs) with uint8
labels as .nii.gz in the Synapse layout, in a temp folder, then ingests 1 case and 2 cases, each in a fresh
subprocess, so the peak RSS printed (`getrusage(RUSAGE_SELF).ru_maxrss` of the child) is that ingest's own.
A child that only imports what ingest loads (medseg, nibabel) gives the interpreter's baseline. Linux carries a
process's peak RSS over `exec`, so the volumes are written by a subprocess too and this parent stays small
(stdlib only).

    python benchmarks/bench_ingest.py [--size 512] [--depth 200]

Goal (not a test): peak RSS for 2 cases <= 1.25x that for 1 case (memory does not grow with the number of
cases) and <= the budget of one case (printed with its reasoning).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20
DATASET = {
    "name": "bench",
    "format": "synapse",
    "modality": "ct",
    "hu_window": [-125, 275],
    "class_names": ["background", "aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas", "spleen", "stomach"],
    "label_map": {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8},
}


def write_case(raw: Path, index: int, shape: tuple[int, int, int]) -> None:
    """One CT-like case: int16 HU image and uint8 Synapse raw labels, (x, y, z), 0.7 x 0.7 x 2.5 mm."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(index)
    x, y = np.ogrid[-1 : 1 : shape[0] * 1j, -1 : 1 : shape[1] * 1j]
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    liver = ((x + 0.35) / 0.3) ** 2 + ((y + 0.1) / 0.25) ** 2 < 1
    spine = (x / 0.08) ** 2 + ((y - 0.45) / 0.08) ** 2 < 1
    aorta = ((x - 0.05) / 0.05) ** 2 + ((y - 0.3) / 0.05) ** 2 < 1
    image = np.empty(shape, np.int16)
    label = np.zeros(shape, np.uint8)
    for z in range(shape[2]):  # slice by slice: no full-size int64/float64 temporaries
        plane = np.where(body, 40, -1000).astype(np.int16)
        plane[liver] = 60
        plane[spine] = 700
        plane[aorta] = 180
        plane += rng.integers(-25, 26, size=plane.shape, dtype=np.int16)
        image[:, :, z] = plane
        label[:, :, z][liver] = 6
        label[:, :, z][aorta] = 8
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    for array, folder, stem in ((image, "img", "img"), (label, "label", "label")):
        path = raw / folder / f"{stem}{index:04d}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nifti = nib.Nifti1Image(array, affine)
        nifti.header.set_xyzt_units("mm")
        nib.save(nifti, path)


def link_cases(src: Path, dst: Path, indices: list[int]) -> None:
    for index in indices:
        for folder, stem in (("img", "img"), ("label", "label")):
            (dst / folder).mkdir(parents=True, exist_ok=True)
            os.link(src / folder / f"{stem}{index:04d}.nii.gz", dst / folder / f"{stem}{index:04d}.nii.gz")


def child(raw: str, out: str) -> None:
    """Runs in the subprocess: ingest (or, with raw '-', only import what ingest loads) and print one JSON line."""
    import nibabel  # noqa: F401  (imported by the NIfTI reader on first use)

    from medseg.data.ingest import ingest_dataset

    start = time.perf_counter()
    cases = len(ingest_dataset(DATASET, raw, out)["cases"]) if raw != "-" else 0
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # Linux: KiB
    print(json.dumps({"cases": cases, "seconds": seconds, "peak_mib": peak}))


def run_child(raw: Path | str, out: Path | str) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", str(raw), str(out)], capture_output=True, text=True,
                          env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"ingest child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="in-plane size")
    parser.add_argument("--depth", type=int, default=200, help="slices per case")
    parser.add_argument("--child", nargs=2, metavar=("RAW", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--write", metavar="RAW", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.size, args.size, args.depth)
    if args.child:
        return child(*args.child)
    if args.write:
        return write_case(Path(args.write), args.index, shape)

    voxels = shape[0] * shape[1] * shape[2]
    raw_mib, float_mib, label_mib = 2 * voxels / MIB, 4 * voxels / MIB, voxels / MIB
    with tempfile.TemporaryDirectory(prefix="medseg-bench-ingest-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        for index in (1, 2):
            subprocess.run([sys.executable, __file__, "--write", str(tmp / "raw2"), "--index", str(index),
                            "--size", str(args.size), "--depth", str(args.depth)], check=True)
        link_cases(tmp / "raw2", tmp / "raw1", [1])
        print(f"data: 2 cases of {'x'.join(map(str, shape))} int16 + uint8 labels (.nii.gz), "
              f"written in {time.perf_counter() - start:.1f} s; cpu count {os.cpu_count()}")
        base = run_child("-", tmp / "unused")
        one = run_child(tmp / "raw1", tmp / "out1")
        two = run_child(tmp / "raw2", tmp / "out2")

    print(f"{'one case raw int16 volume':34s}: {raw_mib:8.0f} MiB")
    print(f"{'one case float32 volume':34s}: {float_mib:8.0f} MiB")
    print(f"{'one case uint8 label':34s}: {label_mib:8.0f} MiB")
    print(f"{'interpreter + imports (no ingest)':34s}: {base['peak_mib']:8.0f} MiB peak RSS")
    for name, r in (("ingest 1 case", one), ("ingest 2 cases", two)):
        print(f"{name:34s}: {r['peak_mib']:8.0f} MiB peak RSS, {r['seconds'] / r['cases']:6.2f} s per case")
    # What one case must hold at once: the raw int16 image (nibabel decompresses a .nii.gz whole), the raw label
    # and its class-index copy (uint8 each); the float32 image is written slab by slab and never held whole.
    # A quarter on top for slabs, nibabel's and gzip's buffers and allocator slack, plus the import baseline.
    budget = base["peak_mib"] + 1.25 * (raw_mib + 2 * label_mib)
    met = two["peak_mib"] <= 1.25 * one["peak_mib"] and two["peak_mib"] <= budget
    print(f"{'budget for one case':34s}: {budget:8.0f} MiB = baseline + 1.25 x (raw image + raw label + class label)")
    print(f"goal: ingest peak RSS for 2 cases <= 1.25x that for 1 case and <= {budget:.0f} MiB "
          f"-> {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
