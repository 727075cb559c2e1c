"""Selective scan (the S6 recurrence of Mamba) with two backends behind one function.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (per channel d, state size N)
    y_t = <C_t, h_t> + D * u_t,   out = y * silu(z)

`selective_scan` has the argument semantics of `mamba_ssm.ops.selective_scan_interface.selective_scan_ref`:
u, delta (batch, dim, L); A (dim, N) real; B and C (batch, N, L), grouped (batch, G, N, L) or fixed (dim, N);
D, delta_bias (dim,); z (batch, dim, L). It returns out (batch, dim, L) and, if asked, the last state
(batch, dim, N). Complex A is not supported.

Backends:
- "mamba_ssm": the fused CUDA kernel of the optional `mamba-ssm` package (CUDA tensors only).
- "torch": a chunked pure-PyTorch scan that runs on any device and exports to ONNX (opset 17).
- "auto": the fused kernel when it imports and the tensors are on CUDA (and we are not exporting), else "torch".

The chunked scan splits L into chunks of T tokens. A loop over the T positions runs the recurrence for *all
chunks at once* (each chunk starting from a zero state); the chunk-to-chunk carry is then computed without a loop
from the chunk totals of the log-decay with a "segment sum" (as in Mamba-2's SSD):
state_end[c] = sum_{c' <= c} exp(sum_{c' < k <= c} logdecay_k) * local_end[c'], and a second loop over the T
positions adds each chunk's entering state, decayed, to the output. Every exponent is a sum of log-decays taken
directly (not a difference of two large cumulative sums), so nothing overflows or loses precision, and no
exp(-cumsum) factor is ever formed. Work is O(L*N) per channel plus O((L/T)^2*N) for the carry; the Python loops
have the fixed length T, so a traced ONNX graph works for any L. Complex A is not supported.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

_log = logging.getLogger(__name__)

# CPU sweet spot measured by benchmarks/bench_selective_scan.py (B=2, D=96, N=16, L=3136): 64 -> 1.7x,
# 128 -> 3.0x, 256 -> 3.1x the sequential loop's forward speed; 128 keeps the unrolled ONNX graph smaller.
DEFAULT_CHUNK_SIZE = 128
BACKENDS = ("auto", "torch", "mamba_ssm")
# Log-decays are clamped here before exp: exp(-60) ~ 1e-26 is as good as zero next to float32's 1e-7 resolution,
# while exp(< -87) gives subnormal floats that make CPU arithmetic 10-60x slower (measured: addcmul 57x, exp 13x).
_MIN_LOG_DECAY = -60.0

_fused_fn: Callable[..., Any] | None = None
_fused_tried = False


def fused_kernel() -> Callable[..., Any] | None:
    """`mamba_ssm`'s fused selective_scan_fn, or None when the package is missing or broken.

    Imported lazily and once: a broken install (ImportError, undefined CUDA symbol, ...) logs one warning and the
    pure-PyTorch scan is used instead.
    """
    global _fused_fn, _fused_tried
    if not _fused_tried:
        _fused_tried = True
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        except Exception as exc:  # noqa: BLE001 - any import failure means "not usable", never a crash
            _log.warning(
                "mamba_ssm fused selective scan unavailable (%s: %s); using the pure-PyTorch chunked scan",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
        else:
            _fused_fn = selective_scan_fn
    return _fused_fn


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan; see the module docstring for shapes. `chunk_size` only affects the "torch" backend."""
    if backend not in BACKENDS:
        raise ValueError(f"selective_scan backend must be one of {BACKENDS}, got {backend!r}")
    if A.is_complex():
        raise NotImplementedError("selective_scan: complex A is not supported (real-valued A only)")
    use_fused = False
    if backend == "mamba_ssm":
        if not u.is_cuda:
            raise ValueError("selective_scan backend='mamba_ssm' needs CUDA tensors, got device " + str(u.device))
        if fused_kernel() is None:
            raise RuntimeError("selective_scan backend='mamba_ssm' requested but mamba_ssm cannot be imported")
        use_fused = True
    elif backend == "auto" and u.is_cuda and not _exporting():
        use_fused = fused_kernel() is not None
    if use_fused:
        return _fused_fn(  # type: ignore[misc]
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
        )
    return selective_scan_torch(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size=chunk_size
    )


def _chunked_bc(x: Tensor, groups: int, what: str, dim: int, n: int, pad: int, chunk: int) -> Tensor:
    """B or C -> a tensor broadcastable to the work layout (T, batch, groups, dim // groups, L/T, N)."""
    if x.dim() == 2:  # fixed per channel (dim, N)
        if tuple(x.shape) != (dim, n):
            raise ValueError(f"selective_scan: {what} of shape {tuple(x.shape)} should be ({dim}, {n})")
        return x.reshape(1, 1, groups, dim // groups, 1, n)
    if x.dim() == 3:  # (batch, N, L), shared by every channel
        x = x[:, None]
    elif x.dim() == 4:  # (batch, G, N, L): channel d uses group d // (dim // G)
        g = x.shape[1]
        if g != groups:  # B and C grouped differently: spread the coarser one over the common groups
            if groups % g:
                raise ValueError(f"selective_scan: {what} has {g} groups, not a divisor of {groups}")
            x = x.repeat_interleave(groups // g, dim=1)
    else:
        raise ValueError(f"selective_scan: {what} must have 2, 3 or 4 dims, got shape {tuple(x.shape)}")
    x = F.pad(x, (0, pad))  # (b, G, N, L + pad)
    x = x.reshape(x.shape[0], x.shape[1], x.shape[2], -1, chunk)  # (b, G, N, nc, T)
    return x.permute(4, 0, 1, 3, 2).unsqueeze(3)  # (T, b, G, 1, nc, N)


def _segsum_exp(x: Tensor) -> Tensor:
    """exp(segsum(x)) over the last axis, lower triangular: out[..., i, j] = exp(sum_{j < k <= i} x_k) for j <= i.

    The sums are accumulated per (i, j) pair rather than as cumsum[i] - cumsum[j], which loses precision when the
    cumulative sums are large.
    """
    n = x.shape[-1]
    idx = torch.arange(n, device=x.device)
    strictly_lower = idx[:, None] > idx[None, :]  # [k, j]: k > j
    lower = idx[:, None] >= idx[None, :]
    rep = x[..., :, None].expand(*x.shape, n)  # rep[..., k, j] = x_k
    sums = torch.cumsum(torch.where(strictly_lower, rep, torch.zeros_like(rep)), dim=-2)
    return torch.where(lower, torch.exp(sums.clamp_min(_MIN_LOG_DECAY)), torch.zeros_like(sums))


def selective_scan_torch(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked pure-PyTorch selective scan (any device, differentiable, ONNX-exportable)."""
    if A.is_complex():
        raise NotImplementedError("selective_scan: complex A is not supported (real-valued A only)")
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective_scan: u and delta must both be (batch, dim, L), got {tuple(u.shape)}, "
                         f"{tuple(delta.shape)}")
    dtype_in = u.dtype
    dtype = torch.promote_types(dtype_in, torch.float32)  # half inputs are computed in float32, float64 stays
    batch, dim, length = u.shape
    n = A.shape[1]
    groups = max(x.shape[1] if x.dim() == 4 else 1 for x in (B, C))
    if dim % groups:
        raise ValueError(f"selective_scan: dim {dim} is not divisible by the {groups} groups of B/C")
    chunk = int(min(chunk_size or DEFAULT_CHUNK_SIZE, int(length)))

    u = u.to(dtype)
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(dtype)
    if delta_softplus:
        delta = F.softplus(delta)

    # Work layout (T, batch, groups, dim_per_group, L/T, N): position-in-chunk first, so each step of the loops
    # below touches one contiguous slice. L is padded to a multiple of T with delta = 0 and u = 0 (decay 1, no
    # input), which carries the state unchanged through the padding. Tensors of size L*N are never materialised:
    # each step builds its (batch, dim, L/T, N) slice from the small per-token tensors, which keeps the work in
    # cache (the scan is memory-bound on CPU otherwise).
    pad = (chunk - length % chunk) % chunk
    dg = dim // groups

    def chunked(x: Tensor) -> Tensor:  # (b, dim, L) -> (T, b, g, dg, nc, 1), contiguous
        x = F.pad(x, (0, pad)).reshape(batch, groups, dg, -1, chunk)
        return x.permute(4, 0, 1, 2, 3).contiguous().unsqueeze(-1)

    delta6 = chunked(delta)
    x6 = delta6 * chunked(u)  # delta_t * u_t
    A5 = A.to(dtype).reshape(1, groups, dg, 1, n)
    B6 = _chunked_bc(B.to(dtype), groups, "B", dim, n, pad, chunk)
    C6 = _chunked_bc(C.to(dtype), groups, "C", dim, n, pad, chunk)

    def at(x: Tensor, t: int) -> Tensor:  # step t of a chunked tensor (fixed B/C have no position axis)
        return x[t] if x.shape[0] > 1 else x[0]

    def decay(log_decay: Tensor) -> Tensor:
        return torch.exp(log_decay.clamp_min(_MIN_LOG_DECAY))

    # 1) Within every chunk at once: the recurrence from a zero state, a loop over the T positions.
    h = x6[0] * at(B6, 0)
    y_local = [(h * at(C6, 0)).sum(-1)]
    for t in range(1, chunk):
        h = torch.addcmul(x6[t] * at(B6, t), decay(delta6[t] * A5), h)
        y_local.append((h * at(C6, t)).sum(-1))
    # h is now every chunk's local end state (b, g, dg, nc, N)

    # 2) Chunk-to-chunk carry from the chunk totals of the log-decay, A * sum(delta) (A is constant in time).
    elapsed = torch.cumsum(delta6, dim=0)  # sum of delta from the chunk start, (T, b, g, dg, nc, 1)
    chunk_log_decay = (elapsed[-1] * A5).transpose(-1, -2)  # (b, g, dg, N, nc)
    carry = _segsum_exp(chunk_log_decay)  # (b, g, dg, N, nc, nc)
    # A broadcast multiply-sum rather than matmul: the same cost here (matrix-vector), and FLOP counters that only
    # see matmuls do not count a chunking artefact as model FLOPs (the scan is counted analytically instead).
    ends = (carry * h.transpose(-1, -2).unsqueeze(-2)).sum(-1).transpose(-1, -2)  # (b, g, dg, nc, N)
    starts = F.pad(ends, (0, 0, 1, 0))[..., :-1, :]  # state entering each chunk (zero for the first)

    # 3) Output: local part plus the entering state decayed to each position, contracted with C.
    y = torch.stack(
        [y_local[t] + (decay(elapsed[t] * A5) * starts * at(C6, t)).sum(-1) for t in range(chunk)]
    )  # (T, b, g, dg, nc)
    y = y.permute(1, 2, 3, 4, 0).reshape(batch, dim, -1)[..., :length]
    out = y if D is None else y + u * D.to(dtype)[:, None]
    if z is not None:
        out = out * F.silu(z.to(dtype))
    out = out.to(dtype_in)
    if return_last_state:
        return out, ends[..., -1, :].reshape(batch, dim, n)
    return out
