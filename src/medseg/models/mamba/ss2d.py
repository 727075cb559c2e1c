"""Mamba building blocks: SS2D / VSS block (VMamba) for images and the 1D Mamba layer (Mamba-1, U-Mamba).

All 2D blocks work channels-last: (B, H, W, C). Shapes only ever derive from the input's, so a traced ONNX graph
works at other H and W.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from medseg.models.mamba.selective_scan import _exporting, selective_scan, selective_scan_channels_last

# Every SS2D / MambaLayer adds its analytic scan cost here while `count_scan_flops` is active (FlopCounterMode
# does not see the scan's elementwise recurrence, so GFLOPs from it alone would leave the scan out).
_scan_flop_log: list[float] | None = None


def _log_scan_flops(batch: int, dim: int, length: int, state: int) -> None:
    if _scan_flop_log is not None:
        _scan_flop_log.append(9.0 * batch * length * dim * state)  # VMamba's count for one selective scan


def _dt_projection(dt_rank: int, d_inner: int, dt_min: float = 1e-3, dt_max: float = 0.1) -> tuple[Tensor, Tensor]:
    """Mamba's dt initialisation: weight ~ U(+-rank^-0.5), bias so that softplus(bias) is in [dt_min, dt_max]."""
    std = dt_rank**-0.5
    weight = torch.empty(d_inner, dt_rank).uniform_(-std, std)
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
    bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    return weight, bias


def _a_log(d_inner: int, d_state: int) -> Tensor:
    """S4D-real initialisation A = -(1..N) per channel, stored as log(-A)."""
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)


class SS2D(nn.Module):
    """2D selective scan (VMamba): in_proj -> depthwise conv -> 4 scan directions -> merge -> norm -> gate -> out.

    The four directions are row-major, column-major and both reversed; each has its own x_proj (-> dt, B, C),
    dt_proj, A and D (the groups of one selective scan call). `gate=True` is VMamba v0 (used by VM-UNet,
    Mamba-UNet, Swin-UMamba): out_norm(y) * silu(z). `gate=False` is VMamba v2's "v05_noz" (MSVM-UNet).
    """

    directions = 4

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: int | None = None,
        d_conv: int = 3,
        conv_bias: bool = True,
        gate: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        d_inner = int(ssm_ratio * d_model)
        self.d_inner, self.d_state, self.gate = d_inner, d_state, gate
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        k = self.directions
        self.in_proj = nn.Linear(d_model, d_inner * (2 if gate else 1), bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias)
        self.x_proj_weight = nn.Parameter(
            torch.empty(k, self.dt_rank + 2 * d_state, d_inner).uniform_(-(d_inner**-0.5), d_inner**-0.5)
        )
        dts = [_dt_projection(self.dt_rank, d_inner) for _ in range(k)]
        self.dt_projs_weight = nn.Parameter(torch.stack([w for w, _ in dts]))  # (K, d_inner, rank)
        self.dt_projs_bias = nn.Parameter(torch.stack([b for _, b in dts]))  # (K, d_inner)
        self.A_logs = nn.Parameter(_a_log(k * d_inner, d_state))  # (K * d_inner, N)
        self.Ds = nn.Parameter(torch.ones(k * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    scan = True  # False: the ablation twin (remove_selective_scans), the 4-direction scan replaced by identity

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C) -> (B, H, W, C)
        batch, height, width, _ = x.shape
        xz = self.in_proj(x)
        if self.gate:
            x, z = xz.chunk(2, dim=-1)
        else:
            x, z = xz, None
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2)))  # (B, D, H, W)
        if self.scan and _exporting():
            y = self._scan_4_directions_channels_last(x.permute(0, 2, 3, 1).reshape(batch, height * width, -1),
                                                      height, width)
        else:  # (B, D, H*W), row-major
            y = self._scan_4_directions(x) if self.scan else x.flatten(2)
            y = y.transpose(1, 2)
        y = self.out_norm(y.reshape(batch, height, width, self.d_inner))
        if z is not None:
            y = y * F.silu(z)
        return self.dropout(self.out_proj(y))

    def _scan_4_directions(self, x: Tensor) -> Tensor:
        batch, d, height, width = x.shape
        k = self.directions
        xs = _cross_scan(x)  # (B, K, D, L)
        # matmul, not einsum: the same products, and ONNX Runtime's Einsum kernel was 12 % of MSVM-UNet's time
        x_dbl = torch.matmul(self.x_proj_weight, xs)  # (K, R + 2N, D) @ (B, K, D, L) -> (B, K, R + 2N, L)
        dts, bs, cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.matmul(self.dt_projs_weight, dts)  # (K, D, R) @ (B, K, R, L) -> (B, K, D, L)
        length = xs.shape[-1]
        _log_scan_flops(batch, k * d, length, self.d_state)
        # float32 in, as VMamba does: under autocast the fused kernel wants one dtype for u/delta/B/C
        y = selective_scan(
            xs.reshape(batch, k * d, -1).float(),
            dts.reshape(batch, k * d, -1).float(),
            -torch.exp(self.A_logs.float()),
            bs.float().contiguous(),
            cs.float().contiguous(),
            self.Ds.float(),
            delta_bias=self.dt_projs_bias.float().reshape(-1),
            delta_softplus=True,
        ).reshape(batch, k, d, -1)
        return _cross_merge(y, height, width)

    def _scan_4_directions_channels_last(self, x: Tensor, height: int, width: int) -> Tensor:
        """The traced graph's scan: (B, L, D) row-major -> (B, L, D), every step channels-last (see
        selective_scan_channels_last). Each reordering is one Gather of whole rows of D channels."""
        batch, length, d = x.shape
        k = self.directions
        _log_scan_flops(batch, k * d, length, self.d_state)
        order = torch.cat(_direction_orders(height, width, x.device))  # (K * L,)
        xs = x.index_select(1, order).reshape(batch, k, length, d)  # (B, K, L, D)
        x_dbl = torch.matmul(xs, self.x_proj_weight.transpose(1, 2))  # (B, K, L, R + 2N)
        dts, bs, cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dts = torch.matmul(dts, self.dt_projs_weight.transpose(1, 2))  # (B, K, L, D)
        y = selective_scan_channels_last(xs, dts, -torch.exp(self.A_logs.float()), bs, cs, self.Ds,
                                         delta_bias=self.dt_projs_bias.reshape(-1), delta_softplus=True)
        # back to row-major: direction i's sequence has row-major position p at back_i[p], i.e. at i * L + back_i[p]
        back = torch.cat([idx + i * length for i, idx in
                          enumerate(_direction_orders(height, width, x.device, inverse=True))])
        return y.reshape(batch, k * length, d).index_select(1, back).reshape(batch, k, length, d).sum(1)


def _cross_scan(x: Tensor) -> Tensor:
    """(B, D, H, W) -> (B, 4, D, H*W): row-major, column-major and both reversed. Eager only: PyTorch's transpose and
    flip are several times faster than index_select (forward and backward); traced graphs take
    SS2D._scan_4_directions_channels_last instead."""
    rows = x.flatten(2)
    cols = x.transpose(2, 3).flatten(2)
    return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)


def _cross_merge(y: Tensor, height: int, width: int) -> Tensor:
    """(B, 4, D, L) in the four scan orders -> (B, D, L) row-major, the sum of the four directions."""
    batch, _, d, _ = y.shape
    along_rows = y[:, 0] + y[:, 2].flip(-1)
    along_cols = y[:, 1] + y[:, 3].flip(-1)  # column-major order -> back to row-major
    along_cols = along_cols.reshape(batch, d, width, height).transpose(2, 3).reshape(batch, d, -1)
    return along_rows + along_cols


def _direction_orders(height: int, width: int, device: torch.device, inverse: bool = False) -> list[Tensor]:
    """Row-major positions of an (H, W) map in the order each direction visits them; with `inverse`, for every
    row-major position, where each direction's sequence has it (the argsort of the former)."""
    length = height * width
    forward = torch.arange(length, device=device)
    if inverse:  # position i*W + j is at j*H + i in column-major order
        cols = forward.reshape(width, height).t().reshape(-1)
        return [forward, cols, (length - 1) - forward, (length - 1) - cols]
    cols = forward.reshape(height, width).t().reshape(-1)  # column-major visits i*W + j at j*H + i
    return [forward, cols, forward.flip(0), cols.flip(0)]


class Mlp(nn.Module):
    """Token MLP; `kernel_sizes` adds MSVM-UNet's multi-scale depthwise convolutions after the activation."""

    def __init__(self, dim: int, hidden: int, kernel_sizes: Sequence[int] = ()):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.dw_convs = nn.ModuleList(
            nn.Conv2d(hidden, hidden, k, padding=k // 2, groups=hidden, bias=False) for k in kernel_sizes
        )
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, H, W, C)
        x = self.act(self.fc1(x))
        if len(self.dw_convs):
            xc = x.permute(0, 3, 1, 2)
            xc = xc + sum(conv(xc) for conv in self.dw_convs)
            x = xc.permute(0, 2, 3, 1)
        return self.fc2(x)


class VSSBlock(nn.Module):
    """x + DropPath(SS2D(LN(x))) [+ DropPath(MLP(LN(x))) when mlp_ratio > 0, as in VMamba v2]."""

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        gate: bool = True,
        conv_bias: bool = True,
        mlp_ratio: float = 0.0,
        mlp_kernel_sizes: Sequence[int] = (),
    ):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.ss2d = SS2D(dim, d_state=d_state, ssm_ratio=ssm_ratio, gate=gate, conv_bias=conv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = None
        if mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(dim, eps=1e-6)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), mlp_kernel_sizes)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.ss2d(self.norm(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class VSSStage(nn.Sequential):
    """`depth` VSS blocks with a linearly spaced drop-path schedule slice."""

    def __init__(self, dim: int, depth: int, drop_path: Sequence[float], **block_options):
        super().__init__(*[VSSBlock(dim, drop_path=drop_path[i], **block_options) for i in range(depth)])


class MambaLayer(nn.Module):
    """Mamba-1 over a token sequence (B, L, C): in_proj -> causal depthwise conv1d -> x_proj -> dt_proj ->
    selective scan (gated by silu(z)) -> out_proj. As U-Mamba's bottleneck it runs on the flattened feature map."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2):
        super().__init__()
        d_inner = expand * d_model
        self.d_inner, self.d_state, self.d_conv = d_inner, d_state, d_conv
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        weight, bias = _dt_projection(self.dt_rank, d_inner)
        with torch.no_grad():
            self.dt_proj.weight.copy_(weight)
            self.dt_proj.bias.copy_(bias)
        self.A_log = nn.Parameter(_a_log(d_inner, d_state))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, L, C)
        batch, length, _ = x.shape
        x, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (B, D, L) each
        x = F.silu(self.conv1d(x)[..., :length])  # causal: keep the first L outputs
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, R + 2N)
        dt, b, c = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # bias goes in as delta_bias, as in mamba_ssm
        _log_scan_flops(batch, self.d_inner, length, self.d_state)
        y = selective_scan(
            x.float(),
            dt.float(),
            -torch.exp(self.A_log.float()),
            b.transpose(1, 2).float().contiguous(),
            c.transpose(1, 2).float().contiguous(),
            self.D.float(),
            z=z.float(),
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )
        return self.out_proj(y.transpose(1, 2).to(z.dtype))


SCAN_PARAMETERS = ("x_proj_weight", "dt_projs_weight", "dt_projs_bias", "A_logs", "Ds")


def remove_selective_scans(model: nn.Module) -> nn.Module:
    """The no-Mamba ablation twin of a Mamba network, in place (as nnU-Net Revisited's "No-Mamba Base"):
    - every SS2D keeps in_proj, its depthwise conv (the local mixing), norm, gate and out_proj; the four-direction
      selective scan becomes the identity and its parameters (x_proj, dt_proj, A, D) are removed;
    - every MambaLayer (U-Mamba's bottleneck, a residual branch) is removed, so the branch adds nothing.
    What is left is a conv/MLP network with the same layout, so the paired comparison isolates the scans."""
    found = False
    for module in model.modules():
        if isinstance(module, SS2D):
            module.scan = False
            for name in SCAN_PARAMETERS:
                delattr(module, name)
            found = True
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MambaLayer):
                setattr(parent, name, None)
                found = True
    if not found:
        raise ValueError(f"{type(model).__name__} has no selective scan to remove")
    return model


def count_scan_gflops(model: nn.Module, input_shape: Sequence[int]) -> float:
    """Analytic GFLOPs of every selective scan in one forward pass (9*B*L*D*N each, VMamba's count).

    Add this to medseg.models.complexity.count_gflops, which counts matmuls/convolutions only.
    """
    global _scan_flop_log
    # Shapes are all the count needs: run a copy of the model on the meta device (no memory, no compute).
    meta_model = copy.deepcopy(model).to("meta").eval()
    _scan_flop_log = []
    try:
        with torch.no_grad():
            meta_model(torch.zeros(tuple(int(s) for s in input_shape), device="meta"))
        return sum(_scan_flop_log) / 1e9
    finally:
        _scan_flop_log = None
