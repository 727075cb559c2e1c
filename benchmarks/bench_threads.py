"""Alone vs with a concurrent copy of itself, with and without medseg's thread policy, side by side in one run.

Two workloads: the pure-PyTorch selective scan forward (B=2 D=96 N=16 L=3136, the shape of
bench_selective_scan.py) and a UNet training step (medseg `unet`, base_channels 16, 64x64, batch 16, AdamW,
CE + Dice). Each measurement is one or two child processes that warm up, wait at a common start line, then run
the workload for `--seconds` and report their median time per iteration; the concurrent copies overlap for
the whole timed window.

  without the policy: torch's default thread count (one per core), what two `python train.py` get
  with the policy:    each child applies medseg.runtime.threads (apply_torch_threads(plan_threads())) with
                      MEDSEG_PARALLEL_JOBS set to the number of copies running, as the Prefect pipeline sets it
                      for stages started side by side (max_parallel)

    python benchmarks/bench_threads.py [--seconds 5] [--workloads scan unet_step]

Goal: with the policy, the concurrent case within 2.5x of the alone case for both workloads (the issue
measured over 100x for the scan and 4.1x for a training without it).
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

GOAL = 2.5
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MEDSEG_THREADS", "MEDSEG_PARALLEL_JOBS")

CHILD = r'''
import json, os, statistics, sys, time
from pathlib import Path
workload, start_file, seconds, policy = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
import torch
if policy:
    from medseg.runtime.threads import apply_torch_threads, plan_threads
    apply_torch_threads(plan_threads())
threads = torch.get_num_threads()
if workload == "scan":
    sys.path.insert(0, os.environ["MEDSEG_BENCH_DIR"])
    from bench_selective_scan import make_inputs
    from medseg.models.mamba.selective_scan import selective_scan_torch
    inputs = make_inputs(2, 96, 16, 56 * 56, "cpu", False, "mamba")
    def step():
        with torch.no_grad():
            selective_scan_torch(**inputs)
else:
    from medseg.config import TrainSettings
    from medseg.training.losses import build_loss
    from medseg.models import build_model
    torch.manual_seed(0)
    model = build_model("unet", 1, 9, (64, 64), base_channels=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = build_loss(TrainSettings(ce_weight=0.5, dice_weight=0.5, dice_include_background=True), 9)
    x, y = torch.rand(16, 1, 64, 64), torch.randint(0, 9, (16, 64, 64))
    def step():
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
for _ in range(2):
    step()
ready = start_file.with_suffix(f".ready{os.getpid()}")
ready.write_text("")
while not start_file.exists():
    time.sleep(0.005)
times, begin = [], time.perf_counter()
while time.perf_counter() - begin < seconds or len(times) < 2:
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
print(json.dumps({"median_s": statistics.median(times), "iterations": len(times), "threads": threads}))
'''


def measure(workload: str, copies: int, policy: bool, seconds: float, script: Path) -> dict:
    """Start `copies` children, release them together once all are warm, return their median iteration time."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env["MEDSEG_BENCH_DIR"] = str(Path(__file__).resolve().parent)
    if policy:
        env["MEDSEG_PARALLEL_JOBS"] = str(copies)
    with tempfile.TemporaryDirectory(prefix="medseg-bench-threads-") as tmp:
        start = Path(tmp) / "start"
        children = [subprocess.Popen([sys.executable, str(script), workload, str(start), str(seconds), str(int(policy))],
                                     env=env, stdout=subprocess.PIPE, text=True) for _ in range(copies)]
        while len(list(Path(tmp).glob("start.ready*"))) < copies:
            if any(c.poll() not in (None, 0) for c in children):
                raise RuntimeError(f"{workload}: a child failed before the start")
            time.sleep(0.01)
        start.write_text("")
        results = [json.loads(c.communicate()[0].strip().splitlines()[-1]) for c in children]
    return {"median_s": statistics.median(r["median_s"] for r in results), "threads": results[0]["threads"],
            "iterations": [r["iterations"] for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="timed window of each measurement")
    parser.add_argument("--workloads", nargs="+", default=["scan", "unet_step"], choices=["scan", "unet_step"])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from medseg.runtime.threads import available_cpus

    print(f"usable cores: {available_cpus()}; each figure is the median time per iteration over {args.seconds:.0f} s")
    rows, ratios = [], {}
    with tempfile.TemporaryDirectory(prefix="medseg-bench-threads-") as tmp:
        script = Path(tmp) / "child.py"
        script.write_text(CHILD)
        for workload in args.workloads:
            for policy in (False, True):
                alone = measure(workload, 1, policy, args.seconds, script)
                together = measure(workload, 2, policy, args.seconds, script)
                ratio = together["median_s"] / alone["median_s"]
                name = "with policy" if policy else "without policy"
                ratios[(workload, policy)] = ratio
                rows.append({"workload": workload, "policy": policy, "alone_ms": alone["median_s"] * 1e3,
                             "concurrent_ms": together["median_s"] * 1e3, "ratio": ratio,
                             "threads_alone": alone["threads"], "threads_concurrent": together["threads"]})
                print(f"{workload:10s} {name:15s}: alone {alone['median_s'] * 1e3:9.1f} ms "
                      f"({alone['threads']} threads), with a concurrent copy {together['median_s'] * 1e3:9.1f} ms "
                      f"({together['threads']} threads each, iterations {together['iterations']}) -> {ratio:6.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    with_policy = {w: r for (w, p), r in ratios.items() if p}
    worst = max(with_policy, key=with_policy.get)
    figures = ", ".join(f"{w} {r:.2f}x (without: {ratios[(w, False)]:.2f}x)" for w, r in with_policy.items())
    verdict = "met" if with_policy[worst] <= GOAL else "NOT met"
    print(f"goal: with the thread policy a concurrent copy costs <= {GOAL}x of running alone ({figures}) -> {verdict}")


if __name__ == "__main__":
    main()
