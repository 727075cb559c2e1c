"""`medseg predict` throughput, and ONNX Runtime against PyTorch eager for the same networks, side by side.

    python benchmarks/bench_predict.py                       # 2 threads, one 512 x 512 x 100 CT volume
    python benchmarks/bench_predict.py --threads 1 --depth 40 --repeats 3

Same weights: each network is built with medseg.models.build_model (random initialisation: the work does not
depend on the weights), exported with medseg.deployment.export.export_onnx and given a model card (write_card_metadata), so
the ONNX side is the very session `medseg.deployment.predict.load_predictor` opens. Same threads: torch.set_num_threads(N)
and ONNX Runtime intra_op_num_threads N (which `medseg predict` takes from OMP_NUM_THREADS).
Each engine is timed in a subprocess of its own, as it is deployed (`medseg predict` never imports torch):
in one process, torch's OpenMP threads and ONNX Runtime's pool spin-wait against each other, and on 2 CPUs torch
calls then stalled for seconds. Each round runs a torch then an ONNX subprocess for the volume, then the same pair
for each architecture in turn (the two engines measured seconds apart, so the VM's drifting speed hits both);
each times one warm-up call, then --repeats (--latency-repeats) calls; every line is the median and (min..max)
of all rounds' calls. Ratios are of medians; "fastest" is the ratio of the quickest calls, for a noisy machine.

(a) one synthetic CT-like int16 .nii.gz (benchmarks/bench_ingest.py's volume) with the quick preset's unet at
    the preset's image size: `medseg predict` file to file (read, reorient, normalise, resize, network, resize
    back, argmax, write), then the in-memory segmentation with the same preprocessing, ONNX Runtime
    (`Predictor`) against PyTorch eager (`medseg.inference.torch_backend.predict_volume`), then the network alone.
(b) every architecture of params.yaml `models` with its `model_options`, 1 channel, 9 classes, 64 x 64: latency
    per slice at batch 1 and batch 16, and the ONNX / PyTorch ratio.
Goal (not a test): ONNX Runtime latency <= 0.7x PyTorch eager for every exported architecture, both batches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOAL_RATIO = 0.7
BATCH = 32  # slices per network call in the volume, load_predictor's and predict_volume's default
LATENCY_SIZE = [64, 64]
LATENCY_BATCHES = (1, 16)
SPACING_ZYX = [2.5, 0.7, 0.7]  # bench_ingest's voxel size, so predict warns about nothing


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Seconds of `repeats` calls after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def spread(values: list[float], scale: float = 1.0) -> str:
    v = [x * scale for x in values]
    return f"{statistics.median(v):8.3f} ({min(v):.3f}..{max(v):.3f})"


# ----------------------------------------------------------------------------------------------- parent: setup


def export_model(params: dict[str, Any], arch: str, image_size: list[int], folder: Path) -> None:
    """`arch` with its params.yaml options, randomly initialised: weights.pt and model.onnx with a model card."""
    import torch

    from medseg.config import model_options
    from medseg.data.preprocessing import normalisation_for
    from medseg.deployment.card import ModelCard, inverse_label_map
    from medseg.deployment.export import export_onnx, write_card_metadata
    from medseg.models import build_model, get_model_info, size_multiple_of

    dataset = params["dataset"]
    options = model_options(params, arch)
    classes = list(dataset["class_names"])
    torch.manual_seed(0)
    model = build_model(arch, 1, len(classes), image_size, **options).eval()
    info = get_model_info(arch)
    card = ModelCard(
        arch=arch, model_options=options, image_channels=1, context=0, class_names=classes,
        label_values=inverse_label_map(dataset.get("label_map"), len(classes)), image_size=list(image_size),
        size_multiple=size_multiple_of(arch, image_size, **options), dynamic_hw=info.dynamic_hw, modality="ct",
        normalisation=normalisation_for("synapse", "ct", dataset["hu_window"]), input_kind="volume",
        spacing=SPACING_ZYX, dataset={"name": "bench", "format": "synapse", "version": "random-init"}, split={},
    )
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "weights.pt")
    path = export_onnx(model, 1, image_size, folder / "model.onnx", opset=int(params["export"]["opset"]),
                       dynamic_hw=info.dynamic_hw)
    write_card_metadata(path, card)


VOLUME = "volume"  # the part (a) child; any other part is an architecture of part (b)


def run_child(engine: str, work: Path, threads: int, part: str) -> dict[str, Any]:
    # OMP_NUM_THREADS: load_predictor's intra-op threads; no progress bars between the timings
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", engine, str(work), "--part", part,
                           "--threads", str(threads)], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{engine} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- children


def read_canonical(scan: str) -> np.ndarray:
    """The raw (D, C, H, W) volume as predict reads it (canonical orientation)."""
    import nibabel as nib

    from medseg.data import orientation
    from medseg.data.preprocessing import volume_from_canonical_xyz

    volume = nib.load(scan)
    canonical, _, _ = orientation.to_canonical(np.asarray(volume.dataobj), volume.affine)
    return volume_from_canonical_xyz(canonical)


def network_batches(meta: dict[str, Any], raw: np.ndarray) -> list[np.ndarray]:
    from medseg.data.preprocessing import network_input, normalise_image

    image = normalise_image(raw, meta["normalisation"])
    depth = image.shape[0]
    return [network_input(image, list(range(s, min(s + BATCH, depth))), 0, meta["image_size"])
            for s in range(0, depth, BATCH)]


def child_onnx(work: Path, meta: dict[str, Any], part: str) -> dict[str, Any]:
    """ONNX Runtime through medseg.deployment.predict only: this process never imports torch."""
    from medseg.deployment.predict import load_predictor, predict_files

    if part != VOLUME:
        predictor = load_predictor(work / "archs" / part / "model.onnx")
        out = {}
        for batch in LATENCY_BATCHES:
            x = np.random.default_rng(0).random((batch, 1, *LATENCY_SIZE), dtype=np.float32)
            out[batch] = timed(lambda: predictor._run(x), meta["latency_repeats"])
        assert "torch" not in sys.modules, "the ONNX side must run as deployed, without torch"
        return out
    repeats = meta["repeats"]
    predictor = load_predictor(work / meta["volume_arch"] / "model.onnx")
    scan = meta["scan"]
    out: dict[str, Any] = {"file": timed(lambda: predict_files(predictor, scan, work / "out"), repeats)}
    raw = read_canonical(scan)
    labels = {}

    def segment():
        labels["v"] = predictor._segment(raw, False, probabilities=False)[0]  # predict_volume's work, no I/O

    out["segment"] = timed(segment, repeats)
    np.save(work / "labels_onnx.npy", labels["v"])
    batches = network_batches(meta, raw)
    out["network"] = timed(lambda: [predictor._run(b) for b in batches], repeats)  # the call _segment makes
    assert "torch" not in sys.modules, "the ONNX side must run as deployed, without torch"
    return out


def child_torch(work: Path, meta: dict[str, Any], part: str) -> dict[str, Any]:
    """PyTorch eager through medseg.inference.torch_backend.predict_volume: this process never imports onnxruntime."""
    import torch

    from medseg.data.preprocessing import normalise_image
    from medseg.inference.torch_backend import predict_volume
    from medseg.models import build_model

    def load(folder: Path, arch: str, image_size: list[int]) -> torch.nn.Module:
        options = meta["options"][arch]
        model = build_model(arch, 1, meta["num_classes"], image_size, **options)
        model.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
        return model.eval()

    if part != VOLUME:
        model = load(work / "archs" / part, part, LATENCY_SIZE)
        out = {}
        for batch in LATENCY_BATCHES:
            t = torch.from_numpy(np.random.default_rng(0).random((batch, 1, *LATENCY_SIZE), dtype=np.float32))

            def call(t=t):
                with torch.inference_mode():
                    model(t)

            out[batch] = timed(call, meta["latency_repeats"])
        return out
    repeats = meta["repeats"]
    model = load(work / meta["volume_arch"], meta["volume_arch"], meta["image_size"])
    raw = read_canonical(meta["scan"])
    labels = {}

    def segment():
        labels["v"] = predict_volume(model, normalise_image(raw, meta["normalisation"]), meta["image_size"], 0, BATCH)

    out: dict[str, Any] = {"segment": timed(segment, repeats)}
    np.save(work / "labels_torch.npy", labels["v"])
    tensors = [torch.from_numpy(b) for b in network_batches(meta, raw)]

    def network():
        with torch.inference_mode():
            for t in tensors:
                model(t)

    out["network"] = timed(network, repeats)
    return out


def child(engine: str, work: Path, threads: int, part: str) -> None:
    meta = json.loads((work / "meta.json").read_text())
    if engine == "torch":
        import torch

        torch.set_num_threads(threads)
        result = child_torch(work, meta, part)
    else:
        result = child_onnx(work, meta, part)
    print(json.dumps(result))


# ----------------------------------------------------------------------------------------------- report


def merge(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """The samples of several children of one engine and part, pooled per key."""
    return {key: [x for run in runs for x in run[key]] for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads = ONNX Runtime intra-op threads")
    parser.add_argument("--size", type=int, default=512, help="in-plane size of the volume")
    parser.add_argument("--depth", type=int, default=100, help="slices of the volume")
    parser.add_argument("--arch", default="unet", help="architecture of part (a)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per volume measurement")
    parser.add_argument("--latency-repeats", type=int, default=20, help="timed calls per latency measurement")
    parser.add_argument("--rounds", type=int, default=2, help="torch and ONNX subprocesses, alternating")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--child", nargs=2, metavar=("ENGINE", "WORK"), help=argparse.SUPPRESS)
    parser.add_argument("--part", default=VOLUME, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], Path(args.child[1]), args.threads, args.part)

    import onnxruntime as ort
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_ingest import write_case  # the same CT-like volume the ingest benchmark writes

    from medseg.config import load_params, model_options
    from medseg.data.preprocessing import normalisation_for

    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    archs = list(params["models"])
    image_size = [int(v) for v in params["data"]["image_size"]]
    shape = (args.size, args.size, args.depth)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} threads each "
          f"({os.cpu_count()} CPUs), params {args.params} (preset {params.get('preset')})")
    with tempfile.TemporaryDirectory(prefix="medseg-bench-predict-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        write_case(work / "raw", 0, shape)
        scan = work / "raw" / "img" / "img0000.nii.gz"
        export_model(params, args.arch, image_size, work / args.arch)
        for arch in archs:
            export_model(params, arch, LATENCY_SIZE, work / "archs" / arch)
        meta = {"scan": str(scan), "volume_arch": args.arch, "archs": archs, "image_size": image_size,
                "num_classes": len(params["dataset"]["class_names"]), "repeats": args.repeats,
                "latency_repeats": args.latency_repeats,
                "options": {a: model_options(params, a) for a in {args.arch, *archs}},
                "normalisation": normalisation_for("synapse", "ct", params["dataset"]["hu_window"])}
        (work / "meta.json").write_text(json.dumps(meta))
        print(f"volume written, {len({args.arch, *archs})} architectures built and exported in "
              f"{time.perf_counter() - start:.1f} s")
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for _ in range(args.rounds):  # the two engines in turn for each part, so a passing disturbance hits both
            for part in (VOLUME, *archs):
                for engine in ("torch", "onnx"):
                    runs.setdefault((engine, part), []).append(run_child(engine, work, args.threads, part))
        merged = {key: merge(results) for key, results in runs.items()}
        eager, onnx = merged["torch", VOLUME], merged["onnx", VOLUME]
        agree = float(np.mean(np.load(work / "labels_onnx.npy") == np.load(work / "labels_torch.npy")))
        size_mib = scan.stat().st_size / 2**20

    depth = args.depth
    print(f"\n(a) {'x'.join(map(str, shape))} int16 CT volume ({size_mib:.0f} MiB .nii.gz), {args.arch} "
          f"{model_options(params, args.arch)} at {image_size[0]}x{image_size[1]}, batch {BATCH}; "
          f"median (min..max) of {args.repeats * args.rounds}")
    lines = [("medseg predict, file to file (ONNX Runtime)", onnx["file"]),
             ("segmentation in memory, PyTorch eager (predict_volume)", eager["segment"]),
             ("segmentation in memory, ONNX Runtime (Predictor)", onnx["segment"]),
             ("network only, PyTorch eager", eager["network"]),
             ("network only, ONNX Runtime", onnx["network"])]
    for name, samples in lines:
        print(f"  {name:55s} {spread(samples)} s/volume {depth / statistics.median(samples):7.1f} slices/s")
    seg = statistics.median(onnx["segment"]), statistics.median(eager["segment"])
    net = statistics.median(onnx["network"]), statistics.median(eager["network"])
    print(f"  ONNX / PyTorch: segmentation {seg[0] / seg[1]:.2f}x, network {net[0] / net[1]:.2f}x; the network is "
          f"{net[0] / seg[0]:.0%} of the ONNX segmentation (the rest: numpy resizing and argmax at "
          f"{args.size}x{args.size}); labels agree on {agree:.4%} of voxels")

    print(f"\n(b) ms per slice at {LATENCY_SIZE[0]}x{LATENCY_SIZE[1]}, 1 channel, {meta['num_classes']} classes; "
          f"median (min..max) of {args.latency_repeats * args.rounds}")
    worst: dict[str, float] = {}
    for arch in archs:
        cells, ratios = [], []
        for batch in LATENCY_BATCHES:
            t, o = merged["torch", arch][str(batch)], merged["onnx", arch][str(batch)]
            ratios.append(statistics.median(o) / statistics.median(t))
            cells.append(f"b{batch:<2d} torch {spread(t, 1e3 / batch)} onnx {spread(o, 1e3 / batch)} "
                         f"-> {ratios[-1]:.2f}x (fastest {min(o) / min(t):.2f}x)")
        worst[arch] = max(ratios)
        print(f"  {arch:14s} " + " | ".join(cells))
    arch, ratio = max(worst.items(), key=lambda item: item[1])
    outcome = "met" if ratio <= GOAL_RATIO else f"NOT met ({arch} {ratio:.2f})"
    print(f"\ngoal: ONNX Runtime latency <= {GOAL_RATIO}x PyTorch eager for every exported architecture -> {outcome}")


if __name__ == "__main__":
    main()
