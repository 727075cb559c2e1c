"""The planned recipe against nnU-Net 2D and against the resize recipe, at the same number of optimizer steps.

    python benchmarks/bench_recipe.py                          # ISBI 2012 EM (../shared/data) and the phantom
    python benchmarks/bench_recipe.py --datasets phantom --epochs 4 --steps-per-epoch 25

Per dataset, in one project built in a temporary folder (the raw data copied there and made read-only), one after
the other on the same cores, each through medseg's own stage functions (what `dvc repro` runs):
1. nnU-Net 2D (`nnunet_2d`, trained by nnunetv2: its planning, preprocessing, augmentation, deep supervision, SGD and
   sliding-window inference with mirroring), E epochs x S iterations, planned for `--gpu-memory-target` GB so that
   its patch and batch fit a CPU's budget;
2. medseg's `unet` under the planned recipe (medseg.data.plan) with nnU-Net's patch and batch size, E x S steps;
3. medseg's `unet` under the resize recipe (TransUNet's: slices resized to --resize-size, one pass per epoch) with
   the same batch, its epochs chosen to give the same number of steps.
All are scored by medseg's one scoring loop on the same test patients: mean DSC and NSD (tolerance 1 mm, or 1 pixel
where the spacing is unknown) over cases and foreground classes.
Goal (not a test): the planned UNet's DSC and NSD within 2 points of nnU-Net's, or ahead, on every dataset.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MARGIN = 0.02  # two points of DSC / NSD


def read_only(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def project(work: Path, name: str, threads: int) -> tuple[Path, dict]:
    """A project root with the dataset ingested and split: `isbi` (a read-only copy of the shared ISBI 2012 EM
    set, described by `medseg dataset init`'s rules) or `phantom` (the built-in one)."""
    from medseg.data.detect import infer_dataset_section
    from medseg.data.ingest import ingest_from_params
    from medseg.data.phantom import generate_from_params
    from medseg.data.split import split_from_params

    params = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    root = work / name
    root.mkdir(parents=True)
    if name == "isbi":
        raw = work / "raw" / "isbi2012_em"
        shutil.copytree(SHARED / "isbi2012_em", raw)
        read_only(raw)
        section, _ = infer_dataset_section(raw, root=root)
        params["dataset"] = section
    else:
        generate_from_params(params, root)
    params["compute"]["threads"] = threads
    params["split"].update(folds=0)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ingest_from_params(params, root)
    split_from_params(params, root)
    return root, params


def run(params: dict, arch: str, root: Path) -> dict:
    from medseg.evaluation.evaluate import evaluate_model
    from medseg.nnunet.evaluate import evaluate_nnunet_entry
    from medseg.nnunet.train import is_nnunet_entry, train_nnunet_entry
    from medseg.training.trainer import train_model

    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    start = time.perf_counter()
    nnunet = is_nnunet_entry(arch)
    summary = (train_nnunet_entry if nnunet else train_model)(params, arch, root)
    seconds = time.perf_counter() - start
    metrics = (evaluate_nnunet_entry if nnunet else evaluate_model)(params, arch, root)
    return {"steps": summary["steps"], "batch": summary.get("batch_size"), "input": summary.get("input_size"),
            "recipe": summary.get("recipe"), "train_s": round(seconds, 1), "dsc": metrics["mean_dsc"],
            "nsd": metrics["mean_nsd"], "hd95": metrics["mean_hd95"]}


def compare(root: Path, params: dict, args: argparse.Namespace) -> dict[str, dict]:
    from medseg.data.cases import read_cases
    from medseg.io import read_json

    base = copy.deepcopy(params)
    base["evaluate"]["nsd_tolerance"] = 1.0
    results = {}
    nn = copy.deepcopy(base)
    nn["models"] = ["nnunet_2d"]
    nn["model_options"] = {"nnunet_2d": {"epochs": args.epochs, "iterations_per_epoch": args.steps_per_epoch,
                                         "val_iterations_per_epoch": 5, "gpu_memory_target": args.gpu_memory_target}}
    results["nnunet_2d"] = run(nn, "nnunet_2d", root)
    patch, batch = results["nnunet_2d"]["input"], results["nnunet_2d"]["batch"]

    planned = copy.deepcopy(base)
    planned["models"] = ["unet"]
    planned["model_options"] = {"unet": {"base_channels": 32}}
    planned["data"].update(recipe="planned")
    planned["data"]["plan"].update(patch_size=[int(p) // 16 * 16 for p in patch], batch_size=batch)
    planned["train"].update(epochs=args.epochs, steps_per_epoch=args.steps_per_epoch)
    results["unet planned"] = run(planned, "unet", root)

    resize = copy.deepcopy(planned)
    size = args.resize_size or (128 if params["dataset"]["name"] != "phantom" else params["data"]["image_size"][0])
    resize["data"].update(recipe="resize", image_size=[size, size])
    slices = sum(int(c["shape"][0]) for c in read_cases(root / "data" / "ingested" / params["dataset"]["name"])[
        "cases"] if c["id"] in set(read_json(root / "data" / "splits" / f"{params['dataset']['name']}.json")["train"]))
    per_epoch = max(1, min(slices // batch, args.steps_per_epoch))
    total = args.epochs * args.steps_per_epoch
    resize["train"].update(batch_size=batch, max_steps_per_epoch=per_epoch, epochs=max(1, round(total / per_epoch)))
    results["unet resize"] = run(resize, "unet", root)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["isbi", "phantom"], choices=["isbi", "phantom"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps-per-epoch", type=int, default=50)
    parser.add_argument("--gpu-memory-target", type=float, default=1.0, help="GB nnU-Net plans patch and batch for")
    parser.add_argument("--resize-size", type=int, default=None,
                        help="the resize recipe's size (default: 128 on ISBI as issue 34 tried, the quick preset's "
                             "data.image_size on the phantom)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    if "isbi" in args.datasets and not (SHARED / "isbi2012_em").is_dir():
        sys.exit(f"{SHARED / 'isbi2012_em'}: not found (the shared data); run with --datasets phantom")

    all_results = {}
    with tempfile.TemporaryDirectory(prefix="medseg-bench-recipe-") as tmp:
        for name in args.datasets:
            root, params = project(Path(tmp), name, args.threads)
            all_results[name] = compare(root, params, args)
    print(f"{'dataset':8} {'run':14} {'steps':>6} {'batch x input':>16} {'train s':>8} {'DSC %':>7} {'NSD %':>7}")
    verdicts = []
    for name, results in all_results.items():
        for label, r in results.items():
            size = "x".join(str(v) for v in r["input"] or [])
            shown = f"{r['batch']} x {size}"
            print(f"{name:8} {label:14} {r['steps']:>6} {shown:>16} {r['train_s']:>8.0f} {100 * r['dsc']:>7.2f} "
                  f"{100 * r['nsd']:>7.2f}")
        nn, planned = results["nnunet_2d"], results["unet planned"]
        verdicts.append(planned["dsc"] >= nn["dsc"] - MARGIN and planned["nsd"] >= nn["nsd"] - MARGIN)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": all_results},
                                       indent=2))
    gaps = "; ".join(f"{name}: DSC {100 * (r['unet planned']['dsc'] - r['nnunet_2d']['dsc']):+.2f}, "
                     f"NSD {100 * (r['unet planned']['nsd'] - r['nnunet_2d']['nsd']):+.2f} points"
                     for name, r in all_results.items())
    print(f"goal: planned UNet within 2 points of nnU-Net 2D at the same steps ({gaps}) -> "
          f"{'met' if all(verdicts) else 'NOT met'}")


if __name__ == "__main__":
    main()
