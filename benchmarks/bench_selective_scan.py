"""Selective scan speed: medseg's chunked pure-PyTorch scan against a sequential reference, side by side.

    python benchmarks/bench_selective_scan.py                 # B=2, D=96, N=16, L=56*56 on CPU
    python benchmarks/bench_selective_scan.py --chunks 16 32 64 --device cuda

The sequential reference is the algorithm of mamba_ssm's `selective_scan_ref` (a Python loop over L). Where
`mamba_ssm` is installed its own `selective_scan_ref` is timed too, and on CUDA its fused kernel.
Prints wall and process-CPU milliseconds per call (best of --repeats) and the speed-up ratios against the
loop (CPU time sums all threads: it measures work, wall time measures latency).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from medseg.models.mamba.selective_scan import DEFAULT_CHUNK_SIZE, fused_kernel, selective_scan_torch


def sequential_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The selective_scan_ref algorithm (variable, ungrouped B/C): one recurrence step per token."""
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    delta_a = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    delta_b_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x = A.new_zeros((u.shape[0], A.shape[0], A.shape[1]))
    ys = []
    for i in range(u.shape[2]):
        x = delta_a[:, :, i] * x + delta_b_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D[:, None]
    return out if z is None else out * F.silu(z)


def timed(fn: Callable[[], object], device: str, repeats: int, warmup: bool = True) -> tuple[float, float]:
    """Best (minimum) wall and process-CPU milliseconds of `fn` after one warm-up call. On a shared machine the
    minimum is the least noisy estimate of the code's own cost, and CPU time is immune to waiting for a core."""
    if warmup:
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return min(wall), min(cpu)


def make_inputs(batch: int, dim: int, state: int, length: int, device: str, grad: bool, kind: str) -> dict:
    """kind="mamba": Mamba's initialisation (A = -(1..N), softplus(delta) in about [1e-3, 0.1]);
    kind="stress": A = -exp(randn), softplus(delta) around 1, i.e. fast-forgetting states (large log-decays)."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    if kind == "mamba":
        a = -torch.arange(1, state + 1, dtype=torch.float32).repeat(dim, 1)
        dt = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
        delta = rnd(batch, dim, length, scale=0.1)
    else:
        a, bias, delta = -torch.exp(rnd(dim, state)), rnd(dim, scale=0.1), rnd(batch, dim, length, scale=0.5)
    tensors = {"u": rnd(batch, dim, length), "delta": delta, "A": a, "B": rnd(batch, state, length),
               "C": rnd(batch, state, length), "D": rnd(dim), "z": rnd(batch, dim, length), "delta_bias": bias}
    inputs = {k: v.to(device).requires_grad_(grad) for k, v in tensors.items()}
    return {**inputs, "delta_softplus": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--length", type=int, default=56 * 56)
    parser.add_argument("--chunks", type=int, nargs="+", default=sorted({16, DEFAULT_CHUNK_SIZE, 128}))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--inputs", choices=["mamba", "stress"], default="mamba", help=make_inputs.__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    print(f"selective scan B={args.batch} D={args.dim} N={args.state} L={args.length} on {dev} "
          f"({torch.get_num_threads()} threads), {args.inputs} inputs, best of {args.repeats}")

    candidates: dict[str, Callable] = {"sequential loop (selective_scan_ref algorithm)": sequential_scan}
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

        candidates["mamba_ssm selective_scan_ref"] = selective_scan_ref
    except Exception:  # noqa: BLE001 - optional package
        pass
    for chunk in args.chunks:
        default = " (default)" if chunk == DEFAULT_CHUNK_SIZE else ""
        candidates[f"medseg chunked torch scan, T={chunk}{default}"] = (
            lambda *a, chunk=chunk, **k: selective_scan_torch(*a, chunk_size=chunk, **k)
        )
    if dev == "cuda" and fused_kernel() is not None:
        candidates["mamba_ssm fused CUDA kernel"] = fused_kernel()

    baseline: dict[str, tuple[float, float]] = {}
    goal_ratios: tuple[float, float] | None = None
    for mode in ("forward", "forward+backward"):
        grad = mode != "forward"
        inputs = make_inputs(args.batch, args.dim, args.state, args.length, dev, grad, args.inputs)
        tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
        print(f"\n{mode}:")
        for name, fn in candidates.items():
            def call(fn=fn):
                if grad:
                    for t in tensors:
                        t.grad = None
                    fn(**inputs).sum().backward()
                else:
                    with torch.no_grad():
                        fn(**inputs)

            # The loop's backward takes minutes (every per-token slice's gradient is a full-size zero tensor):
            # time it once.
            slow = grad and mode not in baseline
            wall, cpu = timed(call, dev, 1 if slow else args.repeats, warmup=not slow)
            base_wall, base_cpu = baseline.setdefault(mode, (wall, cpu))
            print(f"  {name:<58s} wall {wall:9.1f} ms {base_wall / wall:6.1f}x | "
                  f"CPU {cpu:9.1f} ms {base_cpu / cpu:6.1f}x")
            if not grad and name.endswith("(default)"):
                goal_ratios = (base_wall / wall, base_cpu / cpu)

    if goal_ratios is not None:
        met = "met" if min(goal_ratios) >= 10 else "NOT met"
        print(f"\ngoal: forward >= 10x the sequential loop with the default T={DEFAULT_CHUNK_SIZE}: "
              f"{goal_ratios[0]:.1f}x wall, {goal_ratios[1]:.1f}x CPU -> {met}")


if __name__ == "__main__":
    main()
