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

The eager chunked scan splits L into chunks of T tokens and makes two passes of T steps, each step advancing the
recurrence by one position in *all chunks at once*:
1. every chunk from a zero state, which gives the chunks' local end states;
2. the state entering each chunk, from start[c+1] = exp(A * sum of delta over chunk c) * start[c] + local_end[c]
   (a loop over the L/T chunks on one state each);
3. the recurrence again from the true entering states, read out with C at every position.
This is the exact recurrence (no exp of a cumulative sum, nothing that can overflow), O(L*N) work per channel, in
2T Python steps on tensors of L/T positions. Without autograd the steps update preallocated buffers in place. With
autograd (training) the eager scan is a torch.autograd.Function whose backward runs the adjoint recurrence backwards
with the same chunking, recomputing the forward states from the saved chunk-entering states: between forward and
backward it keeps O(L*D + L*N*D/T) values instead of autograd's several tensors of L*N*D per step.
Traced graphs (ONNX, torch.compile) must serve any L in few nodes: see `_traced_scan` (chunks of 8 solved by 8
multiply-adds, the chunk carry by the same recurrence one level up, the rest by a segment sum), and
`selective_scan_channels_last`, the same recurrence on channels-last groups, which SS2D's traced graph uses.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_log = logging.getLogger(__name__)

# Chunk sizes. Eager: the CPU sweet spot measured by benchmarks/bench_selective_scan.py (B=2, D=96, N=16, L=3136):
# large enough that each step's tensors amortise the per-op overhead, small enough that they stay in L2 cache.
# Traced (ONNX): each of TRACED_LEVELS levels unrolls T steps; 8 gave the fastest ONNX Runtime MSVM-UNet of 4, 8, 16.
DEFAULT_CHUNK_SIZE = 32
TRACED_CHUNK_SIZE = 8
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
    """B or C in the work layout: (T, batch, L/T, groups, N, 1), or (groups, N, dim // groups) when fixed per channel
    (no position axis)."""
    if x.dim() == 2:  # fixed per channel (dim, N)
        if tuple(x.shape) != (dim, n):
            raise ValueError(f"selective_scan: {what} of shape {tuple(x.shape)} should be ({dim}, {n})")
        return x.reshape(groups, dim // groups, n).transpose(-1, -2).contiguous()
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
    x = _pad_end(x, pad).permute(0, 3, 1, 2).contiguous()  # (b, Lp, G, N)
    x = x.reshape(x.shape[0], -1, chunk, x.shape[2], n)  # (b, nc, T, G, N)
    return x.permute(2, 0, 1, 3, 4).contiguous().unsqueeze(-1)


def _pad_end(x: Tensor, pad: int) -> Tensor:
    """Zero-pad the last axis. Skipped (it would copy) when there is nothing to pad, except in a traced graph, where
    the padding must stay in the graph for other lengths."""
    return x if pad == 0 and not _exporting() else F.pad(x, (0, pad))


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
    traced = _exporting()
    chunk = int(min(chunk_size or (TRACED_CHUNK_SIZE if traced else DEFAULT_CHUNK_SIZE), int(length)))

    u = u.to(dtype)
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(dtype)
    if delta_softplus:
        delta = _softplus_traced(delta) if traced else F.softplus(delta)

    # Work layout (T, batch, L/T, groups, ., dim_per_group): position-in-chunk first and channels last, so that each
    # step of the loops reads contiguous slices and vectorises over channels. L is padded to a multiple of T with
    # delta = 0 and u = 0 (decay 1, no input), which carries the state unchanged through the padding.
    pad = (chunk - length % chunk) % chunk
    dg = dim // groups

    def chunked(x: Tensor) -> Tensor:  # (b, dim, L) -> (T, b, nc, g, 1, dg)
        # Two copies (a plain transpose, then whole rows of channels) are several times faster than one 6-d permute.
        x = _pad_end(x, pad).transpose(1, 2).contiguous().reshape(batch, -1, chunk, groups, 1, dg)
        return x.permute(2, 0, 1, 3, 4, 5).contiguous()

    if not traced:
        delta6 = chunked(delta)
        x6 = chunked(delta * u)  # delta_t * u_t
        A5 = A.to(dtype).reshape(groups, dg, n).transpose(-1, -2).contiguous()  # (g, N, dg)
        B6 = _chunked_bc(B.to(dtype), groups, "B", dim, n, pad, chunk)  # (T, b, nc, g, N, 1) or fixed (g, N, dg)
        C6 = _chunked_bc(C.to(dtype), groups, "C", dim, n, pad, chunk)
    # The recurrence stays in float32 under autocast too (as mamba_ssm's kernel does): a half-precision readout
    # matmul would cost about three significant digits.
    device_type = u.device.type
    no_autocast = (torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type)
                   else contextlib.nullcontext())  # e.g. "meta" tensors (FLOP counting) have no autocast
    with no_autocast:
        if traced:  # plain differentiable ops on a few large tensors: one small graph for every L
            y, last = _traced_scan(delta, delta * u, A.to(dtype), B.to(dtype), C.to(dtype), groups, chunk)
        elif torch.is_grad_enabled() and any(x.requires_grad for x in (delta6, x6, A5, B6, C6)):
            y, last = _ChunkedScan.apply(delta6, x6, A5, B6, C6)  # hand-written chunked backward
        else:
            with torch.no_grad():
                y, _, ends = _scan_chunks(delta6, x6, A5, B6, C6)
            last = ends[:, -1]
    if not traced:
        y = y.squeeze(-2).permute(1, 2, 0, 3, 4).reshape(batch, -1, dim)[:, :length].transpose(1, 2).contiguous()
    out = y if D is None else y + u * D.to(dtype)[:, None]
    if z is not None:
        out = out * F.silu(z.to(dtype))
    out = out.to(dtype_in)
    if return_last_state:
        return out, last.transpose(-1, -2).reshape(batch, dim, n)
    return out


def _steps(x: Tensor, chunk: int) -> Sequence[Tensor]:
    """Per-step views of a work-layout tensor, taken once with unbind (indexing x[t] in a loop would make autograd
    build a full-size zero gradient per step). Fixed B or C have no position axis: the same tensor at every step."""
    return x.unbind(0) if x.dim() == 6 else [x] * chunk


def _decay(delta_t: Tensor, A5: Tensor, out: Tensor | None = None) -> Tensor:
    """exp(delta_t * A), (b, nc, g, N, dg), log-decay clamped at _MIN_LOG_DECAY; in place in `out` when given.
    With delta summed over a chunk it is the whole chunk's decay."""
    if out is not None:
        return torch.mul(delta_t, A5, out=out).clamp_min_(_MIN_LOG_DECAY).exp_()
    return torch.exp((delta_t * A5).clamp_min(_MIN_LOG_DECAY))


def _scan_chunks(delta6: Tensor, x6: Tensor, A5: Tensor, B6: Tensor, C6: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The eager chunked scan on the work layout: y (T, b, nc, g, 1, dg), the state entering each chunk and the
    state at each chunk's end (b, nc, g, N, dg). In place in its own buffers: call it under no_grad."""
    chunk = delta6.shape[0]
    state_shape = (*delta6.shape[1:4], A5.shape[1], A5.shape[2])
    decay_buffer = torch.empty(state_shape, dtype=A5.dtype, device=A5.device)
    delta_at, x_at, B_at, C_at = (_steps(x, chunk) for x in (delta6, x6, B6, C6))

    def advance(h: Tensor, t: int) -> Tensor:  # h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t
        return h.mul_(_decay(delta_at[t], A5, decay_buffer)).addcmul_(x_at[t], B_at[t])

    # 1) Every chunk at once from a zero state: the chunks' local end states.
    h = torch.zeros(state_shape, dtype=A5.dtype, device=A5.device)
    for t in range(chunk):
        h = advance(h, t)

    # 2) The state entering each chunk: start[c+1] = decay over chunk c * start[c] + local end of chunk c.
    # The decay over a whole chunk is exp(A * sum of delta over it), A being constant in time: (b, nc, g, N, dg).
    chunk_decay = _decay(delta6.sum(0), A5)  # a loop over the L/T chunks on tensors of one state each
    starts_list = [torch.zeros_like(h[:, 0])]
    for c in range(h.shape[1] - 1):
        starts_list.append(torch.addcmul(h[:, c], chunk_decay[:, c], starts_list[-1]))
    starts = torch.stack(starts_list, dim=1)

    # 3) The recurrence again, every chunk from its true entering state, read out with C at every position.
    h = starts.clone()
    ys = []
    for t in range(chunk):
        h = advance(h, t)
        ys.append(_readout(h, C_at[t]))
    return torch.stack(ys), starts, h


def _readout(h: Tensor, C_t: Tensor) -> Tensor:
    """<C_t, h_t> over the state axis, (b, nc, g, 1, dg)."""
    if C_t.dim() == 3:  # fixed C (g, N, dg)
        return (h * C_t).sum(-2, keepdim=True)
    return torch.matmul(C_t.transpose(-1, -2), h)


class _ChunkedScan(torch.autograd.Function):
    """The eager scan with a hand-written backward: the adjoint recurrence g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}
    runs backwards with the same two-pass chunking as the forward (local adjoints from zero, a carry over chunks, then
    the true adjoints with every gradient read off at each step). Autograd through the forward's per-step ops took
    about twice as long (132 vs 70 ms forward+backward in benchmarks/bench_selective_scan.py) and kept several
    full-size tensors per step alive until backward."""

    @staticmethod
    def forward(ctx, delta6, x6, A5, B6, C6):  # type: ignore[override]
        y, starts, ends = _scan_chunks(delta6, x6, A5, B6, C6)
        ctx.save_for_backward(delta6, x6, A5, B6, C6, starts)
        return y, ends[:, -1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy6, dlast):  # type: ignore[override]
        delta6, x6, A5, B6, C6, starts = ctx.saved_tensors
        chunk = delta6.shape[0]
        delta_at, x_at, B_at, C_at = (_steps(x, chunk) for x in (delta6, x6, B6, C6))
        dy_at = _steps(dy6, chunk)

        # The forward states, recomputed from the saved entering states: history[t] = h_{t-1} (history[0] = start).
        # Decays are recomputed where needed: cheaper here than keeping T more full-size tensors in memory.
        decay = torch.empty_like(starts)
        history = starts.new_empty((chunk + 1, *starts.shape))
        history[0] = starts
        for t in range(chunk):
            torch.mul(history[t], _decay(delta_at[t], A5, decay), out=history[t + 1]).addcmul_(x_at[t], B_at[t])

        # 1) Every chunk at once from a zero adjoint at its end: what each chunk sends to the previous one.
        g = torch.zeros_like(starts)
        for t in reversed(range(chunk)):
            g.addcmul_(C_at[t], dy_at[t]).mul_(_decay(delta_at[t], A5, decay))
        # 2) The adjoint arriving at each chunk's last state from later chunks (the last chunk's: dlast).
        chunk_decay = _decay(delta6.sum(0), A5)  # the same chunk decays as the forward's carry
        arriving = [dlast]  # autograd passes zeros when the last state was not used
        for c in range(starts.shape[1] - 1, 0, -1):
            arriving.append(torch.addcmul(g[:, c], chunk_decay[:, c], arriving[-1]))
        g = torch.stack(arriving[::-1], dim=1)
        # 3) The true adjoints g_t = dL/dh_t, backwards, with every gradient read off at each step.
        fixed_B, fixed_C = B6.dim() == 3, C6.dim() == 3
        d_delta, d_x, d_B, d_C = [], [], [], []
        d_A = torch.zeros_like(g)
        d_B_fixed = torch.zeros_like(g) if fixed_B else None
        d_C_fixed = torch.zeros_like(g) if fixed_C else None
        d_log_decay = torch.empty_like(g)
        for t in reversed(range(chunk)):
            g.addcmul_(C_at[t], dy_at[t])
            h_t = history[t + 1]
            if fixed_C:
                d_C_fixed.addcmul_(h_t, dy_at[t])
            else:
                d_C.append(torch.matmul(h_t, dy_at[t].transpose(-1, -2)))  # sum over channels, (b, nc, g, N, 1)
            if fixed_B:
                d_B_fixed.addcmul_(g, x_at[t])
                d_x.append((g * B6).sum(-2, keepdim=True))
            else:
                d_B.append(torch.matmul(g, x_at[t].transpose(-1, -2)))
                d_x.append(torch.matmul(B_at[t].transpose(-1, -2), g))  # sum over the state, (b, nc, g, 1, dg)
            # d log-decay; where the log-decay was clamped the true derivative is below exp(-60) * |g h|: ~0 anyway.
            _decay(delta_at[t], A5, decay)
            torch.mul(g, history[t], out=d_log_decay).mul_(decay)
            d_delta.append((d_log_decay * A5).sum(-2, keepdim=True))
            d_A.addcmul_(d_log_decay, delta_at[t])
            g.mul_(decay)  # dL/dh_{t-1} through this step

        def stacked(grads: list[Tensor]) -> Tensor:
            return torch.stack(grads[::-1])

        d_B6 = d_B_fixed.sum((0, 1)) if fixed_B else stacked(d_B)
        d_C6 = d_C_fixed.sum((0, 1)) if fixed_C else stacked(d_C)
        return stacked(d_delta), stacked(d_x), d_A.sum((0, 1)), d_B6, d_C6


# ------------------------------------------------------------------------------------ traced (ONNX) formulation
# A graph must serve every L, and ONNX Runtime pays per node: the eager scan's 2T unrolled steps gave ~1,700 nodes
# per scan call (14,000 for the quick MSVM-UNet, 5x slower than PyTorch eager). Here the recurrence is solved on
# whole tensors instead: inside chunks of T positions by T multiply-adds, the states entering the chunks by the same
# recurrence one level up (on L/T chunk-end states), and, after TRACED_LEVELS levels, the few remaining positions by
# a quadratic segment sum (as Mamba-2's SSD does). Every exp is of a sum of non-positive log-decays: no overflow.
# Three levels of 8 leave L/512 positions to the segment sum (7 for a 224x224 image at patch size 4, 32 at 512x512),
# whose (L/512)^2 weights per state must stay small next to the states themselves.
TRACED_LEVELS = 3


def _softplus_traced(x: Tensor) -> Tensor:
    """softplus as relu(x) + log(1 + exp(-|x|)) (stable for every x): ONNX Runtime's Softplus kernel took 3.3 ms
    for 16x96x256 values, these four ops 1.2 ms."""
    return torch.relu(x) + torch.log(1 + torch.exp(-x.abs()))


def _traced_scan(delta: Tensor, x: Tensor, A: Tensor, B: Tensor, C: Tensor, groups: int,
                 chunk: int) -> tuple[Tensor, Tensor]:
    """y (batch, dim, L) and the last state (batch, groups, N, dim // groups) from delta and x = delta * u
    (batch, dim, L), in plain differentiable ops on the layout (batch, groups, N, dim // groups, L): time stays the
    last axis, as it comes, so no transposes are needed."""
    batch, dim, _ = delta.shape
    n = A.shape[1]
    dg = dim // groups

    def grouped(v: Tensor) -> Tensor:  # (b, dim, L) -> (b, g, 1, dg, L), a view
        return v.reshape(batch, groups, 1, dg, -1)

    A5 = A.reshape(groups, dg, n).transpose(-1, -2)[..., None]  # (g, N, dg, 1)
    B5, C5 = (_grouped_bc(v, groups, what, dim, n) for v, what in ((B, "B"), (C, "C")))
    log_decay = (grouped(delta) * A5).clamp_min(_MIN_LOG_DECAY)  # (b, g, N, dg, L)
    h = _linear_recurrence(log_decay, grouped(x) * B5, chunk, TRACED_LEVELS)
    y = (h * C5).sum(2)  # <C_t, h_t>: (b, g, dg, L)
    return y.reshape(batch, dim, -1), h[..., -1]


def selective_scan_channels_last(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                                 delta_bias: Tensor | None = None, delta_softplus: bool = False,
                                 chunk: int = TRACED_CHUNK_SIZE) -> Tensor:
    """The traced formulation on channels-last groups: u, delta (batch, G, L, dim // G); A (dim, N); B, C
    (batch, G, L, N); D, delta_bias (dim,). Returns y (batch, G, L, dim // G) in float32, as `selective_scan`
    would give for the same values laid out (batch, dim, L).

    SS2D's exported graph uses it: with time not the last axis, reordering the four scan directions gathers whole
    rows of channels (ONNX Runtime's Gather of single elements along the last axis was 17 % of MSVM-UNet's time)
    and no transposes are needed between the projections, the scan and the merge."""
    batch, groups, _, dg = u.shape
    n = A.shape[1]
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float().reshape(groups, 1, dg)
    if delta_softplus:
        delta = _softplus_traced(delta)
    x = delta * u
    if n == 1:  # one state per channel (MSVM-UNet): no state axis at all (reducing a size-1 axis is a slow copy)
        log_decay = (delta * A.float().reshape(groups, 1, dg)).clamp_min(_MIN_LOG_DECAY)  # (batch, G, L, dg)
        y = _linear_recurrence(log_decay, x * B.float(), chunk, TRACED_LEVELS, axis=-2) * C.float()
    else:
        A4 = A.float().reshape(groups, dg, n).transpose(-1, -2)[:, None]  # (G, 1, N, dg)
        log_decay = (delta.unsqueeze(-2) * A4).clamp_min(_MIN_LOG_DECAY)  # (batch, G, L, N, dg)
        h = _linear_recurrence(log_decay, x.unsqueeze(-2) * B.float().unsqueeze(-1), chunk, TRACED_LEVELS, axis=-3)
        y = (h * C.float().unsqueeze(-1)).sum(-2)  # <C_t, h_t> (a MatMul of 1 x N rows took 3 % of the graph)
    return y if D is None else y + u * D.float().reshape(groups, 1, dg)


def _grouped_bc(x: Tensor, groups: int, what: str, dim: int, n: int) -> Tensor:
    """B or C as (b, groups, N, 1, L), or (groups, N, dim // groups, 1) when fixed per channel."""
    if x.dim() == 2:  # fixed per channel (dim, N)
        if tuple(x.shape) != (dim, n):
            raise ValueError(f"selective_scan: {what} of shape {tuple(x.shape)} should be ({dim}, {n})")
        return x.reshape(groups, dim // groups, n).transpose(-1, -2)[..., None]
    if x.dim() == 3:  # (batch, N, L), shared by every channel
        x = x[:, None]
    elif x.dim() == 4:
        g = x.shape[1]
        if g != groups:
            if groups % g:
                raise ValueError(f"selective_scan: {what} has {g} groups, not a divisor of {groups}")
            x = x.repeat_interleave(groups // g, dim=1)
    else:
        raise ValueError(f"selective_scan: {what} must have 2, 3 or 4 dims, got shape {tuple(x.shape)}")
    return x.unsqueeze(-2)


def _linear_recurrence(log_decay: Tensor, inputs: Tensor, chunk: int, levels: int, axis: int = -1) -> Tensor:
    """Every h_t of h_t = exp(log_decay_t) * h_{t-1} + inputs_t, h_{-1} = 0, along `axis` (negative: counted from
    the end; log_decay <= 0)."""
    if levels == 0:
        return _segment_sum_recurrence(log_decay, inputs, axis)
    rest = -1 - axis  # axes after time
    length = log_decay.shape[axis]
    pad = (chunk - length % chunk) % chunk  # decay 1 and no input: the padding changes no real position
    shape = log_decay.shape

    def chunked(v: Tensor) -> Tensor:  # (..., L, rest) -> (..., L/T, T, rest)
        v = F.pad(v, (0, 0) * rest + (0, pad))
        return v.reshape(*v.shape[:axis], -1, chunk, *v.shape[len(v.shape) + axis + 1:])

    log_c, in_c = chunked(log_decay), chunked(inputs)
    step = axis  # the position-in-chunk axis of the chunked tensors
    # 1) Inside each chunk from a zero state: T multiply-adds on (..., L/T, 1, ...) tensors (split and cat, not unbind
    # and stack, which would add a Squeeze or Unsqueeze node per step).
    decays, ins = torch.exp(log_c).split(1, step), in_c.split(1, step)
    local = [ins[0]]
    for t in range(1, chunk):
        local.append(torch.addcmul(ins[t], decays[t], local[-1]))
    local_h = torch.cat(local, step)  # (..., L/T, T, ...)
    # 2) The true state at each chunk's end: the same recurrence over chunks, with a chunk's total log-decay.
    # With axes after time, select (a Gather of whole rows): the exporter cannot tell the split's axis has size 1 and
    # wraps Squeeze in an If node. With time last, squeeze: a Gather there would copy single floats.
    last = local[-1].squeeze(step) if rest == 0 else local_h.select(step, -1)
    ends = _linear_recurrence(log_c.sum(step), last, chunk, levels - 1, axis)
    # the state entering chunk c is the end of chunk c - 1
    starts = F.pad(ends, (0, 0) * rest + (1, 0))[_along(rest, slice(None, -1))].unsqueeze(step)
    # 3) h_t = local h_t + (decay from the chunk's start through t) * entering state.
    from_start = torch.exp(torch.cumsum(log_c, step).clamp_min(_MIN_LOG_DECAY))
    h = torch.addcmul(local_h, from_start, starts)
    h = h.reshape(*shape[:axis], -1, *shape[len(shape) + axis + 1:])
    return h[_along(rest, slice(None, length))]


def _along(rest: int, index: slice) -> tuple:
    """An index applying `index` to the axis that has `rest` axes after it."""
    return (Ellipsis, index) + (slice(None),) * rest


def _segment_sum_recurrence(log_decay: Tensor, inputs: Tensor, axis: int = -1) -> Tensor:
    """The recurrence in closed form, h_t = sum_{s <= t} exp(sum_{s < k <= t} log_decay_k) inputs_s: O(L^2), for
    the few positions left after the chunk levels. The sums are accumulated per (t, s) pair, not as differences of
    cumulative sums, which lose precision when those grow large."""
    rest = -1 - axis
    length = log_decay.shape[axis]
    idx = torch.arange(length, device=log_decay.device)
    trailing = (slice(None), slice(None)) + (None,) * rest  # the (L, L) masks broadcast over the axes after time
    after_s = (idx[:, None] > idx[None, :])[trailing]  # [k, s]: k > s
    at_or_after_s = (idx[:, None] >= idx[None, :])[trailing]  # [t, s]: t >= s
    rep = log_decay.unsqueeze(axis)  # rep[..., k, s, ...] = log_decay_k
    rep = rep.expand(*rep.shape[:axis - 1], length, length, *rep.shape[len(rep.shape) + axis + 1:])
    sums = torch.cumsum(torch.where(after_s, rep, torch.zeros_like(rep)), dim=axis - 1)  # [t, s]: s < k <= t
    weights = torch.where(at_or_after_s, torch.exp(sums.clamp_min(_MIN_LOG_DECAY)), torch.zeros_like(sums))
    return (weights * inputs.unsqueeze(axis - 1)).sum(axis)
