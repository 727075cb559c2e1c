"""`medseg predict` on an imported nnU-Net model against `nnUNetv2_predict` itself, on the same cases, side by side.

    python benchmarks/bench_nnunet_predict.py                  # 2 threads, a phantom-trained model, 2 rounds
    python benchmarks/bench_nnunet_predict.py --results $nnUNet_results/Dataset900_x/nnUNetTrainer__nnUNetPlans__2d \\
        --inputs scans/ --threads 4

Without --results, nnU-Net is trained through medseg (medseg.nnunet.train: 2 epochs x 3 iterations; the speed of
inference does not depend on the weights) on a phantom with 2.5 mm pixels, and the inputs are the phantom's test
scans plus the real TotalSegmentator CT (RAS) and MR (LPS) of ../shared/data at 3 mm, which both engines resample.
The model is imported with `medseg nnunet import`. Each round runs, as a user runs them, each in its own process:
- `nnUNetv2_predict_from_modelfolder -f 0 -device cpu -npp 1 -nps 1` (torch with OMP_NUM_THREADS threads);
- `medseg predict` (ONNX Runtime with --threads).
Mirroring is on in both (the default of both); the order alternates between rounds. Throughput is cases per second
of wall time, whole commands (imports, reading and writing included); the ratio is of the rounds' medians. The
outputs are compared voxel for voxel.
Goal (not a test): medseg predict >= 2x the throughput of nnUNetv2_predict on CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "totalseg_example"
GOAL = 2.0


def phantom_model(work: Path, threads: int) -> tuple[Path, list[Path]]:
    """(trained nnU-Net model folder, input scans) from a phantom project built in `work`."""
    from medseg.data.ingest import ingest_from_params
    from medseg.data.phantom import generate_from_params
    from medseg.data.split import split_from_params
    from medseg.nnunet.dataset import write_nnunet_raw
    from medseg.nnunet.train import NnunetFolders, train_nnunet

    params = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["phantom"].update(num_cases=8, shape=[96, 96, 20], spacing=[2.5, 2.5, 3.0], seed=0)
    params["split"].update(test_fraction=0.25, val_fraction=0.2, folds=0)
    root = work / "project"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    generate_from_params(params, root)
    ingest_from_params(params, root)
    split_from_params(params, root)
    dataset = write_nnunet_raw(params, root, dataset_id=950)
    nn = root / "data" / "nnunet"
    results = train_nnunet(dataset, NnunetFolders(nn / "raw", nn / "preprocessed", nn / "results"), 950, "nnunet_2d",
                           fold=0, epochs=2, iterations=3, val_iterations=2, device="cpu", threads=threads,
                           log_file=work / "nnunet.log")
    inputs = sorted((dataset / "imagesTs").glob("*_0000.nii.gz"))
    if REAL.is_dir():
        inputs += [REAL / "ct_sm.nii.gz", REAL / "mr_sm.nii.gz"]
    return results, inputs


def run_nnunet(results: Path, inputs: Path, out: Path, threads: int) -> float:
    code = ("import sys; from nnunetv2.inference.predict_from_raw_data import predict_entry_point_modelfolder as m; "
            "sys.argv[0] = 'nnUNetv2_predict_from_modelfolder'; m()")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "nnUNet_raw": str(out), "nnUNet_preprocessed": str(out), "nnUNet_results": str(out)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, "-i", str(inputs), "-o", str(out), "-m", str(results), "-f", "0",
                    "-device", "cpu", "-npp", "1", "-nps", "1"], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def run_medseg(model: Path, inputs: Path, out: Path, threads: int) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medseg.cli", "predict", "-m", str(model), "-i", str(inputs), "-o",
                    str(out), "--labels", "index", "--threads", str(threads), "--overwrite"],
                   check=True, capture_output=True)
    return time.perf_counter() - start


def agreement(a_dir: Path, b_dir: Path) -> float:
    import nibabel as nib

    fractions = []
    for a in sorted(a_dir.glob("*.nii.gz")):
        b = np.asarray(nib.load(b_dir / a.name).dataobj)
        fractions.append(float((np.asarray(nib.load(a).dataobj) == b).mean()))
    return min(fractions)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=None, help="a trained nnU-Net 2D model folder (fold 0)")
    parser.add_argument("--inputs", type=Path, default=None, help="scans to segment (with --results)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from medseg.nnunet.convert import import_nnunet_model

    with tempfile.TemporaryDirectory(prefix="bench-nnunet-") as tmp:
        work = Path(tmp)
        if args.results is None:
            results, files = phantom_model(work, args.threads)
        else:
            results, files = args.results, sorted(args.inputs.glob("*.nii*"))
        inputs = work / "inputs"
        inputs.mkdir()
        for f in files:  # nnU-Net's file naming: <case>_0000.nii.gz
            name = f.name if "_0000" in f.name else f.name.replace(".nii", "_0000.nii", 1)
            shutil.copy(f, inputs / name)
        model = work / "model"
        import_nnunet_model(results, model, folds=["0"])
        times: dict[str, list[float]] = {"nnUNetv2_predict": [], "medseg predict": []}
        for round_ in range(args.rounds):
            order = ["nnUNetv2_predict", "medseg predict"][:: 1 if round_ % 2 == 0 else -1]
            for engine in order:
                out = work / engine.split()[0] / str(round_)
                run = run_nnunet if engine == "nnUNetv2_predict" else run_medseg
                times[engine].append(run(results if run is run_nnunet else model, inputs, out, args.threads))
        n = len(files)
        median = {k: statistics.median(v) for k, v in times.items()}
        for engine, seconds in times.items():
            print(f"{engine:18s}: {n / median[engine]:.3f} cases/s (median of {len(seconds)} rounds: "
                  f"{', '.join(f'{s:.1f} s' for s in seconds)} for {n} cases, {args.threads} threads)")
        agree = agreement(work / "medseg" / "0", work / "nnUNetv2_predict" / "0")
        ratio = median["nnUNetv2_predict"] / median["medseg predict"]
        print(json.dumps({"cases": n, "seconds": times, "min_voxel_agreement": agree}))
        print(f"goal: medseg predict >= {GOAL:g}x the throughput of nnUNetv2_predict on CPU ({ratio:.2f}x, "
              f"{args.threads} threads, {n} cases, lowest voxel agreement {agree:.5f}) -> "
              f"{'met' if ratio >= GOAL else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
