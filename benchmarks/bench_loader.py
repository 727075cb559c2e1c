"""Slices/s of SliceDataset (memory-mapped ingested arrays) vs naive per-slice NIfTI loading, side by side.

Both paths deliver the same thing: one CT slice, HU-windowed to [0, 1], resized to 224 x 224 (bicubic) with
its label (nearest). The naive path is what a quick script does: nib.load the .nii.gz for every slice, take the
slice, window, resize. SliceDataset runs uncached (resize every item, every epoch) and with `cache_resized`
(every slice resized once when the dataset is built; the one-time build is printed apart). Data: phantom volumes at Synapse's in-plane size (512 x 512) in a temp folder.

    python benchmarks/bench_loader.py [--cases 4] [--depth 96] [--size 512] [--batch 32] [--workers 0 1 2] [--step-ms 8]

Goal (not a test): cached + augmented >= 5,000 slices/s at 224 x 224 on 2 CPU cores, and DataLoader workers
helping rather than hurting where they are for: feeding a training step that leaves the CPU free (a GPU step,
stood in for by the main process waiting --step-ms per batch), with as many workers as the thread policy allows
(the last line says where a run stands). Workers run SliceLoader's shared ring (medseg.data.loader).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from medseg.config import disable_telemetry
from medseg.data.ingest import ingest_dataset
from medseg.data.loader import SliceDataset, SliceLoader
from medseg.data.phantom import generate_phantom_dataset

DATASET = {
    "name": "bench",
    "format": "synapse",
    "modality": "ct",
    "hu_window": [-125, 275],
    "class_names": ["background", "aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas", "spleen", "stomach"],
    "label_map": {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8},
}
SIZE = (224, 224)


def bench_slice_dataset(
    ingested: Path, ids: list[str], batch: int, workers: int, augment: dict | None, epochs: int, mode: str, cache: bool,
    min_seconds: float = 2.0, step_ms: float = 0.0,
) -> tuple[float, float, float]:
    """(slices per wall-clock second, slices per CPU-second of this process, seconds to build the dataset); the
    CPU rate only means something with workers=0, and tells what an uncontended core would do on a busy machine.
    `step_ms`: after each batch the main process waits this long without using a core, as it waits on a GPU
    step (a blocking CUDA synchronize): in process loading then adds to the step, a worker overlaps with it."""
    build = time.perf_counter()
    dataset = SliceDataset(ingested, ids, SIZE, augment=augment, image_mode=mode, cache_resized=cache)
    dataset.uint8_labels = True  # as training: labels cross from workers as uint8, made int64 by the consumer
    build = time.perf_counter() - build
    # SliceLoader, as training uses it: in process the batch the dataset built is the batch (no second stacking
    # copy); workers persist across epochs (each batch carries the epoch set here), build their batches in
    # shared ring slots and send a ticket
    loader = SliceLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                         generator=torch.Generator().manual_seed(0))
    for _ in loader:  # warm-up: page cache, worker start
        break
    # at least `epochs` epochs and `min_seconds` seconds: a tiny dataset's epoch is a few ms, too short to time
    count, start, cpu, epoch = 0, time.perf_counter(), time.process_time(), 0
    while epoch < epochs or time.perf_counter() - start < min_seconds:
        dataset.set_epoch(epoch)
        for images, labels in loader:
            labels.long()  # what Trainer.train_step does with them
            if step_ms:
                time.sleep(step_ms / 1000)
            count += images.shape[0]
        epoch += 1
    return count / (time.perf_counter() - start), count / max(time.process_time() - cpu, 1e-9), build


def bench_naive(raw: Path, stems: list[str], depth: int, limit: int, mode: str) -> tuple[float, float]:
    window = DATASET["hu_window"]
    start, cpu, count = time.perf_counter(), time.process_time(), 0
    for k in range(limit):
        stem, z = stems[k % len(stems)], (k * 7) % depth
        image = np.asarray(nib.load(raw / "img" / f"img{stem}.nii.gz").dataobj)[:, :, z].T.astype(np.float32)
        label = np.asarray(nib.load(raw / "label" / f"label{stem}.nii.gz").dataobj)[:, :, z].T
        image = (np.clip(image, *window) - window[0]) / (window[1] - window[0])
        image = F.interpolate(torch.from_numpy(image)[None, None], size=SIZE, mode=mode, align_corners=False)[0]
        label = F.interpolate(torch.from_numpy(label.astype(np.float32))[None, None], size=SIZE, mode="nearest")[0, 0].long()
        count += 1
    return count / (time.perf_counter() - start), count / max(time.process_time() - cpu, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--depth", type=int, default=96, help="slices per case (4 x 96: 12 batches of 32 an "
                        "epoch; an epoch of 3 batches measures mostly worker start and pipeline drain)")
    parser.add_argument("--size", type=int, default=512, help="in-plane size of the raw volumes")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=3, help="at least this many epochs ...")
    parser.add_argument("--seconds", type=float, default=2.0, help="... and at least this long per measurement")
    parser.add_argument("--step-ms", type=float, default=8.0, help="the GPU step a loader feeds: the main "
                        "process waits this long per batch (a 224x224 UNet step of 32 slices on a data-centre GPU)")
    parser.add_argument("--mode", default="bicubic", choices=["bicubic", "bilinear"], help="image resize")
    parser.add_argument("--naive-slices", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads in the main process "
                        "(default: medseg's thread policy, i.e. the usable cores; DataLoader workers use 1 each)")
    args = parser.parse_args()
    disable_telemetry()
    from medseg.runtime.threads import plan_threads

    torch.set_num_threads(args.threads or plan_threads().intra_op)

    with tempfile.TemporaryDirectory(prefix="medseg-bench-") as tmp:
        raw, ingested = Path(tmp) / "raw", Path(tmp) / "ingested"
        stems = generate_phantom_dataset(raw, args.cases, [args.size, args.size, args.depth], [0.7, 0.7, 3.0], seed=0)
        manifest = ingest_dataset(DATASET, raw, ingested)
        ids = [c["id"] for c in manifest["cases"]]
        print(f"data: {args.cases} cases x {args.depth} slices of {args.size}x{args.size} -> {SIZE[0]}x{SIZE[1]}, "
              f"torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}")

        naive, naive_cpu = bench_naive(raw, stems, args.depth, args.naive_slices, args.mode)
        print(f"{'naive nibabel per slice':42s}: {naive:8.1f} slices/s  ({naive_cpu:8.1f} per CPU-s)")
        augment = {"p": 0.5, "flip": True, "rot90": True, "rotate_deg": 15, "intensity_jitter": 0.1}
        augmented: dict[int, float] = {}  # workers -> cached augmented slices/s
        for workers in args.workers:
            # the main process's threads as training sets them: the thread policy counts workers against the cores
            torch.set_num_threads(args.threads or plan_threads(workers).intra_op)
            for name, aug in (("no aug", None), ("aug", augment)):
                uncached = None
                for cache in (False, True):
                    rate, rate_cpu, build = bench_slice_dataset(ingested, ids, args.batch, workers, aug, args.epochs,
                                                                args.mode, cache, args.seconds)
                    uncached = uncached or (rate, rate_cpu)
                    if cache and aug:
                        augmented[workers] = rate
                    cpu_note = f"{rate_cpu:8.1f} per CPU-s, {rate_cpu / naive_cpu:6.1f}x" if workers == 0 else " " * 27
                    extra = (f", {rate / uncached[0]:5.1f}x uncached wall"
                             + (f" {rate_cpu / uncached[1]:5.1f}x CPU" if workers == 0 else "")
                             + f"; cache build {build:.2f} s once") if cache else ""
                    label = f"SliceDataset {'cached' if cache else 'uncached'} {name}, workers={workers}"
                    print(f"{label:42s}: {rate:8.1f} slices/s  ({cpu_note})  {rate / naive:6.1f}x naive wall{extra}")
        # Feeding a GPU step: the case the loader's speed is for. Workers as the thread policy allows them here.
        policy_workers = plan_threads(max(args.workers)).loader_workers
        fed: dict[int, float] = {}
        for workers in sorted({0, policy_workers}):
            torch.set_num_threads(args.threads or plan_threads(workers).intra_op)
            fed[workers], _, _ = bench_slice_dataset(ingested, ids, args.batch, workers, augment, args.epochs,
                                                     args.mode, True, args.seconds, args.step_ms)
            label = f"feeding a {args.step_ms:g} ms step, workers={workers}"
            print(f"{label:42s}: {fed[workers]:8.1f} slices/s  (cached aug; step alone: "
                  f"{args.batch / args.step_ms * 1000:.0f}/s)")
        in_process = augmented.get(0, max(augmented.values()))
        workers_help = policy_workers > 0 and fed[policy_workers] > fed[0]
        pure = ", ".join(f"{w} -> {v:.0f}/s" for w, v in sorted(augmented.items()))
        met = in_process >= 5000 and workers_help
        print(f"goal: cached + augmented >= 5,000 slices/s at {SIZE[0]}x{SIZE[1]} on {os.cpu_count()} cores "
              f"({in_process:.0f}/s in process; workers {pure}), and workers helping a {args.step_ms:g} ms step "
              f"({', '.join(f'{w} -> {v:.0f}/s' for w, v in sorted(fed.items()))}: "
              f"{'help' if workers_help else 'hurt'}) -> {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
