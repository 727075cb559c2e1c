"""Selective scan speed: medseg's chunked pure-PyTorch scan against a sequential reference, side by side.

    python benchmarks/bench_selective_scan.py                 # B=2, D=96, N=16, L=56*56 on CPU
    python benchmarks/bench_selective_scan.py --chunks 16 32 64 128 --device cuda

The sequential reference is the algorithm of mamba_ssm's `selective_scan_ref` (a Python loop over L). Where
`mamba_ssm` is installed its own `selective_scan_ref` is timed too, and on CUDA its fused kernel.
Prints milliseconds per call (median) and the speed-up ratio; the goal on CPU is >= 10x over the loop.
"""

from __future__ import annotations

import argparse
import statistics
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


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median milliseconds of `fn` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def make_inputs(batch: int, dim: int, state: int, length: int, device: str, grad: bool) -> dict:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_(grad)

    return {
        "u": rnd(batch, dim, length),
        "delta": rnd(batch, dim, length, scale=0.5),
        "A": (-torch.exp(torch.randn(dim, state, generator=g))).to(device).requires_grad_(grad),
        "B": rnd(batch, state, length),
        "C": rnd(batch, state, length),
        "D": rnd(dim),
        "z": rnd(batch, dim, length),
        "delta_bias": rnd(dim, scale=0.1),
        "delta_softplus": True,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--length", type=int, default=56 * 56)
    parser.add_argument("--chunks", type=int, nargs="+", default=[16, 32, DEFAULT_CHUNK_SIZE, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    print(f"selective scan B={args.batch} D={args.dim} N={args.state} L={args.length} on {dev} "
          f"({torch.get_num_threads()} threads), median of {args.repeats}")

    candidates: dict[str, Callable] = {"sequential loop (selective_scan_ref algorithm)": sequential_scan}
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

        candidates["mamba_ssm selective_scan_ref"] = selective_scan_ref
    except Exception:  # noqa: BLE001 - optional package
        pass
    for chunk in args.chunks:
        candidates[f"medseg chunked torch scan, T={chunk}"] = (
            lambda *a, chunk=chunk, **k: selective_scan_torch(*a, chunk_size=chunk, **k)
        )
    if dev == "cuda" and fused_kernel() is not None:
        candidates["mamba_ssm fused CUDA kernel"] = fused_kernel()

    baseline: dict[str, float] = {}
    for mode in ("forward", "forward+backward"):
        grad = mode != "forward"
        inputs = make_inputs(args.batch, args.dim, args.state, args.length, dev, grad)
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

            ms = timed(call, dev, args.repeats)
            baseline.setdefault(mode, ms)
            print(f"  {name:<50s} {ms:10.2f} ms   {baseline[mode] / ms:6.1f}x vs sequential loop")


if __name__ == "__main__":
    main()
