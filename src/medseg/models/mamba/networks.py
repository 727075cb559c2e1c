"""Mamba segmentation networks (registered in the medseg model registry).

- vm_unet     VM-UNet (Ruan & Xiang 2024): VSS encoder/decoder, patch merging/expanding, skip additions.
- mamba_unet  Mamba-UNet (Wang et al. 2024): Swin-UNet layout with VSS blocks, skip concatenation + linear.
- swin_umamba Swin-UMamba (Liu et al. 2024): conv stem + VMamba-T encoder, UNETR-style residual CNN decoder.
- msvm_unet   MSVM-UNet (Chen et al. 2024): VMamba v2 encoder, multi-scale VSS decoder, large-kernel expanding.
- umamba_bot  U-Mamba-Bot (Ma et al. 2024): nnU-Net residual UNet with a Mamba layer at the bottleneck.
- <name>_nomamba  each one's ablation twin: the same network with its selective scans removed
  (ss2d.remove_selective_scans), registered so the report can pair them and say what the Mamba layers add.

VSS networks keep features channels-last (B, H, W, C) like VMamba. Every builder has the registry signature
(in_channels, num_classes, image_size, **options) and returns logits (B, num_classes, H, W). `pretrained` (a
path or URL of a state dict, e.g. VMamba ImageNet weights) loads the encoder weights whose names and shapes
match; tests never use it.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Sequence

import torch
from torch import Tensor, nn

from medseg.errors import ConfigError
from medseg.models.mamba.ss2d import MambaLayer, VSSStage, remove_selective_scans
from medseg.models.table import register_model

_log = logging.getLogger(__name__)

_FAMILY = "mamba"


# ----------------------------------------------------------------------------------------------- helpers


def _widths(dims: int | Sequence[int], stages: int) -> list[int]:
    if isinstance(dims, int):
        return [dims * 2**i for i in range(stages)]
    dims = [int(d) for d in dims]
    if len(dims) != stages:
        raise ConfigError(f"dims {dims} must have one entry per stage ({stages})")
    return dims


def _check_depths(name: str, depths: Sequence[int], stages: int | None = None) -> list[int]:
    depths = [int(d) for d in depths]
    if (stages is not None and len(depths) != stages) or any(d < 1 for d in depths):
        want = f"{stages} positive integers" if stages else "positive integers"
        raise ConfigError(f"{name} must be {want}, got {depths}")
    return depths


def _drop_paths(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Stochastic depth rates rising linearly over all blocks, split per stage."""
    rates = torch.linspace(0, rate, sum(depths)).tolist()
    out, start = [], 0
    for d in depths:
        out.append(rates[start : start + d])
        start += d
    return out


def _to_channels_first(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2)


def _to_channels_last(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding (VMamba v0): conv k=s=patch, then LayerNorm; output channels-last."""

    def __init__(self, in_channels: int, dim: int, patch: int = 4):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(_to_channels_last(self.proj(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> LayerNorm(4C) -> Linear(4C, 2C) (Swin / VMamba v0 downsampling)."""

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim or 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


def _pixel_shuffle_last(x: Tensor, scale: int) -> Tensor:
    """(B, H, W, s*s*C) -> (B, s*H, s*W, C), the 'b h w (p1 p2 c) -> b (h p1) (w p2) c' rearrangement."""
    b, h, w, c = x.shape
    c_out = c // (scale * scale)
    x = x.reshape(b, h, w, scale, scale, c_out).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * scale, w * scale, c_out)


class PatchExpand(nn.Module):
    """Linear(C_in, s*s*C_out) -> pixel shuffle x s -> LayerNorm(C_out) (Swin-UNet / VM-UNet upsampling)."""

    def __init__(self, in_dim: int, out_dim: int, scale: int = 2):
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(in_dim, scale * scale * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(_pixel_shuffle_last(self.expand(x), self.scale))


def _load_pretrained(module: nn.Module, source: str | None, what: str) -> None:
    """Copy every tensor of a checkpoint whose name (optionally under 'model'/'state_dict') and shape match."""
    if not source:
        return
    if "://" in source:
        state = torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=True)
    else:
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:
            raise ConfigError(f"{source}: pretrained weights for {what} not found") from exc
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    own = module.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ConfigError(f"{source}: no tensor matches the {what} (names or shapes differ)")
    module.load_state_dict(matched, strict=False)
    _log.info("%s: loaded %d/%d tensors from %s", what, len(matched), len(own), source)


class VSSEncoder(nn.Module):
    """VMamba v0 encoder: patch embedding, then per stage VSS blocks followed by patch merging (not after the last).

    forward returns [stage input of every stage..., final output] so decoders can pick their skips.
    """

    def __init__(self, in_channels: int, dims: list[int], depths: list[int], patch: int, drop_path_rate: float,
                 **block_options):
        super().__init__()
        self.patch_embed = PatchEmbed(in_channels, dims[0], patch)
        rates = _drop_paths(drop_path_rate, depths)
        self.stages = nn.ModuleList(VSSStage(d, n, r, **block_options) for d, n, r in zip(dims, depths, rates))
        self.downsamples = nn.ModuleList(PatchMerging(dims[i], dims[i + 1]) for i in range(len(dims) - 1))

    def forward(self, x: Tensor) -> list[Tensor]:
        """Channels-last outputs of each stage's blocks (before its downsampling)."""
        x = self.patch_embed(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            outs.append(x)
            if i < len(self.downsamples):
                x = self.downsamples[i](x)
        return outs


def _patch_stride(image_size: tuple[int, int], patch_size: int = 4, **_: object) -> int:
    return int(patch_size) * 8  # patch embedding, then 3 x2 patch mergings (4 stages)


# ------------------------------------------------------------------------------------------------ VM-UNet


class VMUNet(nn.Module):
    """VM-UNet: the decoder adds each encoder skip, expands x2 and runs VSS blocks; final x4 expand + 1x1 conv.

    Skips as in the reference code: the inputs of encoder stages 4, 3, 2 (merged features) are added before each
    decoder expansion; the patch-embedding output is not used as a skip.
    """

    def __init__(self, in_channels: int, num_classes: int, dims: list[int], depths: list[int],
                 depths_decoder: list[int], d_state: int, drop_path_rate: float, patch_size: int):
        super().__init__()
        self.encoder = VSSEncoder(in_channels, dims, depths, patch_size, drop_path_rate, d_state=d_state)
        rev = dims[::-1]
        rates = _drop_paths(drop_path_rate, depths_decoder[::-1])[::-1]
        self.expands = nn.ModuleList(PatchExpand(rev[i], rev[i + 1]) for i in range(len(rev) - 1))
        self.decoder = nn.ModuleList(
            VSSStage(d, n, r[::-1], d_state=d_state) for d, n, r in zip(rev, depths_decoder, rates)
        )
        self.final_expand = PatchExpand(dims[0], dims[0] // patch_size, scale=patch_size)
        self.head = nn.Conv2d(dims[0] // patch_size, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        enc = self.encoder
        x = enc.patch_embed(x)
        skips = []  # the input of every encoder stage, as in the reference code
        for i, stage in enumerate(enc.stages):
            skips.append(x)
            x = stage(x)
            if i < len(enc.downsamples):
                x = enc.downsamples[i](x)
        y = self.decoder[0](x)
        for i in range(1, len(self.decoder)):
            y = self.decoder[i](self.expands[i - 1](y + skips[-i]))
        return self.head(_to_channels_first(self.final_expand(y)))


@register_model(
    "vm_unet",
    family=_FAMILY,
    description="VM-UNet: VSS (VMamba v0) encoder-decoder, skip additions, patch merging/expanding",
    paper="Ruan & Xiang 2024, VM-UNet: Vision Mamba UNet for Medical Image Segmentation (arXiv:2402.02491)",
    paper_params_m=27.43,
    paper_gflops=4.11,
    dynamic_hw=True,
    size_multiple=32,
    size_rule=_patch_stride,
)
def build_vm_unet(
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    dims: int | Sequence[int] = 96,
    depths: Sequence[int] = (2, 2, 2, 2),
    depths_decoder: Sequence[int] | None = None,
    d_state: int = 16,
    drop_path_rate: float = 0.2,
    patch_size: int = 4,
    pretrained: str | None = None,
) -> nn.Module:
    """depths_decoder defaults to the encoder depths reversed with the last one less (paper: [2,2,2,2] ->
    [2,2,2,1])."""
    depths = _check_depths("vm_unet depths", depths, 4)
    if depths_decoder is None:
        depths_decoder = depths[::-1]
        depths_decoder[-1] = max(1, depths_decoder[-1] - 1)
    model = VMUNet(in_channels, num_classes, _widths(dims, 4), depths,
                   _check_depths("vm_unet depths_decoder", depths_decoder, 4), d_state, drop_path_rate, patch_size)
    _load_pretrained(model.encoder, pretrained, "vm_unet encoder")
    return model


# --------------------------------------------------------------------------------------------- Mamba-UNet


class MambaUNet(nn.Module):
    """Mamba-UNet: Swin-UNet with VSS blocks. Decoder stage: concat skip -> Linear(2C, C) -> VSS -> expand."""

    def __init__(self, in_channels: int, num_classes: int, dims: list[int], depths: list[int], d_state: int,
                 drop_path_rate: float, patch_size: int):
        super().__init__()
        self.encoder = VSSEncoder(in_channels, dims, depths, patch_size, drop_path_rate, d_state=d_state)
        self.norm = nn.LayerNorm(dims[-1])
        rev = dims[::-1]
        rates = _drop_paths(drop_path_rate, depths[::-1])
        self.first_expand = PatchExpand(rev[0], rev[1])
        self.concat_back = nn.ModuleList(nn.Linear(2 * d, d) for d in rev[1:])
        self.decoder = nn.ModuleList(
            VSSStage(d, n, r, d_state=d_state) for d, n, r in zip(rev[1:], depths[::-1][1:], rates[1:])
        )
        self.expands = nn.ModuleList(PatchExpand(rev[i], rev[i + 1]) for i in range(1, len(rev) - 1))
        self.norm_up = nn.LayerNorm(dims[0])
        self.final_expand = PatchExpand(dims[0], dims[0], scale=patch_size)
        self.head = nn.Conv2d(dims[0], num_classes, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        feats = self.encoder(x)
        y = self.first_expand(self.norm(feats[-1]))
        for i, (fuse, stage) in enumerate(zip(self.concat_back, self.decoder)):
            y = stage(fuse(torch.cat([y, feats[-2 - i]], dim=-1)))
            if i < len(self.expands):
                y = self.expands[i](y)
        y = self.final_expand(self.norm_up(y))
        return self.head(_to_channels_first(y))


@register_model(
    "mamba_unet",
    family=_FAMILY,
    description="Mamba-UNet: Swin-UNet-like pure VSS encoder-decoder with skip concatenation",
    paper="Wang et al. 2024, Mamba-UNet: UNet-Like Pure Visual Mamba for Medical Image Segmentation (arXiv:2402.05079)",
    dynamic_hw=True,
    size_multiple=32,
    size_rule=_patch_stride,
)
def build_mamba_unet(
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    dims: int | Sequence[int] = 96,
    depths: Sequence[int] = (2, 2, 2, 2),
    d_state: int = 16,
    drop_path_rate: float = 0.1,
    patch_size: int = 4,
    pretrained: str | None = None,
) -> nn.Module:
    model = MambaUNet(in_channels, num_classes, _widths(dims, 4), _check_depths("mamba_unet depths", depths, 4),
                      d_state, drop_path_rate, patch_size)
    _load_pretrained(model.encoder, pretrained, "mamba_unet encoder")
    return model


# ---------------------------------------------------------------------------------- residual conv blocks


def _conv_norm_act(cin: int, cout: int, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                               nn.InstanceNorm2d(cout, affine=True)]
    if act:
        layers.append(nn.LeakyReLU(0.01, inplace=True))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """conv-IN-LReLU-conv-IN + (1x1 conv-IN projection when the shape changes), then LReLU (MONAI UnetResBlock,
    nnU-Net BasicBlockD with a strided conv instead of avg-pool + 1x1)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv_norm_act(cin, cout, stride)
        self.conv2 = _conv_norm_act(cout, cout, act=False)
        self.skip = nn.Identity()
        if cin != cout or stride != 1:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                      nn.InstanceNorm2d(cout, affine=True))
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))


class UpBlock(nn.Module):
    """Transposed conv x2 -> concat skip -> residual block (MONAI UnetrUpBlock)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False)
        self.block = ResBlock(2 * cout, cout)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


# -------------------------------------------------------------------------------------------- Swin-UMamba


class SwinUMamba(nn.Module):
    """Swin-UMamba: conv stem (7x7, /2) -> VMamba-T encoder (patch 2: /4 ... /32), UNETR-style CNN decoder
    whose skips are residual blocks on the image, the stem output and every VSS stage."""

    def __init__(self, in_channels: int, num_classes: int, dims: list[int], depths: list[int], d_state: int,
                 drop_path_rate: float):
        super().__init__()
        feat = [dims[0] // 2, *dims]  # [48, 96, 192, 384, 768]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, feat[0], 7, stride=2, padding=3),
                                  nn.InstanceNorm2d(feat[0], affine=True))
        self.encoder = VSSEncoder(feat[0], dims, depths, 2, drop_path_rate, d_state=d_state)
        # skip adapters at full, 1/2, 1/4, 1/8, 1/16 resolution; the 1/32 VSS output is the bottleneck
        self.skips = nn.ModuleList([ResBlock(in_channels, feat[0]), ResBlock(feat[0], feat[1]),
                                    ResBlock(feat[1], feat[2]), ResBlock(feat[2], feat[3]), ResBlock(feat[3], feat[4])])
        self.ups = nn.ModuleList([UpBlock(feat[4], feat[4]), UpBlock(feat[4], feat[3]), UpBlock(feat[3], feat[2]),
                                  UpBlock(feat[2], feat[1]), UpBlock(feat[1], feat[0])])
        self.final = ResBlock(feat[0], feat[0])
        self.head = nn.Conv2d(feat[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        stem = self.stem(x)
        vss = [_to_channels_first(f) for f in self.encoder(stem)]  # 1/4 ... 1/32
        inputs = [x, stem, *vss[:-1]]  # the input of each skip adapter
        skips = [block(f) for block, f in zip(self.skips, inputs)]
        y = vss[-1]
        for up, skip in zip(self.ups, reversed(skips)):
            y = up(y, skip)
        return self.head(self.final(y))


@register_model(
    "swin_umamba",
    family=_FAMILY,
    description="Swin-UMamba: conv stem + VMamba-T (VSS) encoder, UNETR-style residual CNN decoder",
    paper="Liu et al. 2024, Swin-UMamba: Mamba-based UNet with ImageNet-based pretraining (MICCAI 2024)",
    paper_params_m=59.89,
    paper_gflops=68.32,
    dynamic_hw=True,
    size_multiple=32,
)
def build_swin_umamba(
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    dims: int | Sequence[int] = 96,
    depths: Sequence[int] = (2, 2, 9, 2),
    d_state: int = 16,
    drop_path_rate: float = 0.0,
    pretrained: str | None = None,
) -> nn.Module:
    model = SwinUMamba(in_channels, num_classes, _widths(dims, 4), _check_depths("swin_umamba depths", depths, 4),
                       d_state, drop_path_rate)
    _load_pretrained(model.encoder, pretrained, "swin_umamba encoder")
    return model


# ---------------------------------------------------------------------------------------------- MSVM-UNet


class ConvDownsample(nn.Module):
    """VMamba v2 downsampling: 3x3 conv stride 2, LayerNorm (channels-last in and out)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(_to_channels_last(self.conv(_to_channels_first(x))))


class ConvStem(nn.Module):
    """VMamba v2 patch embedding: two 3x3 stride-2 convs (C/2 then C) with LayerNorm + GELU between."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, dim // 2, 3, stride=2, padding=1)
        self.norm1 = nn.LayerNorm(dim // 2)
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.gelu(self.norm1(_to_channels_last(self.conv1(x))))
        return self.norm2(_to_channels_last(self.conv2(_to_channels_first(x))))


class LKPE(nn.Module):
    """Large-kernel patch expanding: 1x1 conv (C -> s*s*C_out) + BN + ReLU + 3x3 depthwise conv, pixel shuffle,
    LayerNorm. Input and output channels-last."""

    def __init__(self, dim: int, out_dim: int, scale: int = 2):
        super().__init__()
        hidden = scale * scale * out_dim
        self.scale = scale
        self.expand = nn.Sequential(
            nn.Conv2d(dim, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
        )
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = _to_channels_last(self.expand(_to_channels_first(x)))
        return self.norm(_pixel_shuffle_last(x, self.scale))


class MSVMUNet(nn.Module):
    """MSVM-UNet: VMamba v2 encoder (SS2D without gate, d_state 1, MLP), decoder stages LKPE -> concat skip ->
    Linear(2C, C) -> multi-scale VSS blocks (MLP with 1/3/5 depthwise convs); final LKPE x4 + 1x1 conv."""

    def __init__(self, in_channels: int, num_classes: int, dims: list[int], depths: list[int],
                 depths_decoder: list[int], d_state: int, ssm_ratio: float, mlp_ratio: float,
                 drop_path_rate: float, kernel_sizes: Sequence[int]):
        super().__init__()
        v2 = dict(d_state=d_state, ssm_ratio=ssm_ratio, gate=False, conv_bias=False, mlp_ratio=mlp_ratio)
        self.stem = ConvStem(in_channels, dims[0])
        rates = _drop_paths(drop_path_rate, depths)
        self.stages = nn.ModuleList(VSSStage(d, n, r, **v2) for d, n, r in zip(dims, depths, rates))
        self.downsamples = nn.ModuleList(ConvDownsample(dims[i], dims[i + 1]) for i in range(len(dims) - 1))
        rev = dims[::-1]
        dec_rates = _drop_paths(drop_path_rate, depths_decoder)[::-1]
        self.ups = nn.ModuleList(LKPE(rev[i], rev[i + 1]) for i in range(len(rev) - 1))
        self.fuse = nn.ModuleList(nn.Linear(2 * d, d) for d in rev[1:])
        self.decoder = nn.ModuleList(
            VSSStage(d, n, r, **v2, mlp_kernel_sizes=kernel_sizes)
            for d, n, r in zip(rev[1:], depths_decoder, dec_rates)
        )
        self.final_expand = LKPE(dims[0], dims[0], scale=4)
        self.head = nn.Conv2d(dims[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            feats.append(x)
            if i < len(self.downsamples):
                x = self.downsamples[i](x)
        y = feats[-1]
        for i, (up, fuse, stage) in enumerate(zip(self.ups, self.fuse, self.decoder)):
            y = stage(fuse(torch.cat([up(y), feats[-2 - i]], dim=-1)))
        return self.head(_to_channels_first(self.final_expand(y)))


@register_model(
    "msvm_unet",
    family=_FAMILY,
    description="MSVM-UNet: VMamba v2 encoder, multi-scale VSS decoder blocks, large-kernel patch expanding",
    paper="Chen et al. 2024, MSVM-UNet: Multi-Scale Vision Mamba UNet for Medical Image Segmentation (BIBM 2024)",
    paper_params_m=35.9,
    paper_gflops=15.5,
    dynamic_hw=True,
    size_multiple=32,
)
def build_msvm_unet(
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    dims: int | Sequence[int] = 96,
    depths: Sequence[int] = (2, 2, 8, 2),
    depths_decoder: Sequence[int] | None = None,
    d_state: int = 1,
    ssm_ratio: float = 1.0,
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.2,
    kernel_sizes: Sequence[int] = (1, 3, 5),
    pretrained: str | None = None,
) -> nn.Module:
    """VMamba-T v2 ("tiny_0230s": depths [2, 2, 8, 2], ssm_ratio 1, d_state 1) encoder defaults;
    depths_decoder defaults to 2 blocks per decoder stage (1 where the encoder stage has depth 1)."""
    depths = _check_depths("msvm_unet depths", depths, 4)
    if depths_decoder is None:
        depths_decoder = [min(2, d) for d in depths[::-1][1:]]
    model = MSVMUNet(in_channels, num_classes, _widths(dims, 4), depths,
                     _check_depths("msvm_unet depths_decoder", depths_decoder, 3), d_state, ssm_ratio, mlp_ratio,
                     drop_path_rate, tuple(int(k) for k in kernel_sizes))
    _load_pretrained(model, pretrained, "msvm_unet")
    return model


# -------------------------------------------------------------------------------------------- U-Mamba-Bot


class UMambaBot(nn.Module):
    """nnU-Net residual-encoder UNet; the bottleneck feature map is flattened to tokens and passed through
    LayerNorm + Mamba (with a residual connection) before the decoder."""

    def __init__(self, in_channels: int, num_classes: int, widths: list[int], blocks_per_stage: int,
                 decoder_convs: int, d_state: int, d_conv: int, expand: int):
        super().__init__()
        self.stem = _conv_norm_act(in_channels, widths[0])
        self.encoder = nn.ModuleList()
        cin = widths[0]
        for i, w in enumerate(widths):
            blocks = [ResBlock(cin, w, stride=1 if i == 0 else 2)]
            blocks += [ResBlock(w, w) for _ in range(blocks_per_stage - 1)]
            self.encoder.append(nn.Sequential(*blocks))
            cin = w
        self.mamba_norm = nn.LayerNorm(widths[-1])
        self.mamba: MambaLayer | None = MambaLayer(widths[-1], d_state=d_state, d_conv=d_conv, expand=expand)
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2, bias=False) for i in range(len(widths) - 1)
        )
        self.decoder = nn.ModuleList(
            nn.Sequential(*[_conv_norm_act(2 * widths[i] if j == 0 else widths[i], widths[i])
                            for j in range(decoder_convs)])
            for i in range(len(widths) - 1)
        )
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        y = x
        if self.mamba is not None:  # None in the no-Mamba twin: the residual branch is gone
            b, c, h, w = x.shape
            tokens = x.flatten(2).transpose(1, 2)  # (B, L, C)
            tokens = tokens + self.mamba(self.mamba_norm(tokens))
            y = tokens.transpose(1, 2).reshape(b, c, h, w)
        for i in range(len(self.ups) - 1, -1, -1):
            y = self.decoder[i](torch.cat([self.ups[i](y), skips[i]], dim=1))
        return self.head(y)


def _umamba_stages(image_size: tuple[int, int], num_stages: int | None) -> int:
    """nnU-Net's rule unless given: downsample while the bottleneck stays >= 4 pixels, at most 6 stages."""
    return int(num_stages) if num_stages is not None else max(2, min(6, int(math.log2(min(image_size) / 4)) + 1))


@register_model(
    "umamba_bot",
    family=_FAMILY,
    description="U-Mamba-Bot: nnU-Net residual CNN UNet with a Mamba layer at the bottleneck",
    paper="Ma, Li & Wang 2024, U-Mamba: Enhancing Long-range Dependency for Biomedical Image Segmentation "
    "(arXiv:2401.04722)",
    dynamic_hw=True,
    size_multiple=32,  # the most stages the default rule builds (6, at image sides >= 128)
    size_rule=lambda image_size, num_stages=None, **_: 2 ** (_umamba_stages(image_size, num_stages) - 1),
)
def build_umamba_bot(
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    base_channels: int = 32,
    max_channels: int = 512,
    num_stages: int | None = None,
    blocks_per_stage: int = 2,
    decoder_convs: int = 2,
    d_state: int = 16,
    d_conv: int = 4,
    expand: int = 2,
) -> nn.Module:
    """num_stages defaults to nnU-Net's rule: downsample while the bottleneck stays >= 4 pixels, at most 6
    stages (x32); widths double per stage from base_channels up to max_channels (nnU-Net 2D: 32 ... 512)."""
    num_stages = _umamba_stages(image_size, num_stages)
    if num_stages < 2 or min(image_size) % 2 ** (num_stages - 1):
        raise ConfigError(f"umamba_bot: {num_stages} stages need image sides divisible by {2 ** (num_stages - 1)}, "
                          f"got {tuple(image_size)}")
    widths = [min(base_channels * 2**i, max_channels) for i in range(num_stages)]
    return UMambaBot(in_channels, num_classes, widths, blocks_per_stage, decoder_convs, d_state, d_conv, expand)


# ------------------------------------------------------------------------------------------ no-Mamba twins


def _no_mamba(builder, **kwargs) -> nn.Module:
    kwargs.pop("pretrained", None)  # VMamba weights hold the scans' parameters; the twin trains from scratch
    return remove_selective_scans(builder(**kwargs))


def _register_twin(name: str, builder) -> None:
    from medseg.models.table import get_model_info

    info = get_model_info(name)
    register_model(
        f"{name}_nomamba",
        family="cnn",
        description=f"ablation twin of {name}: its selective scans removed (identity; U-Mamba: no bottleneck "
        "Mamba branch), the rest identical",
        paper="ablation as nnU-Net Revisited's No-Mamba Base (Isensee et al., MICCAI 2024)",
        dynamic_hw=info.dynamic_hw,
        size_multiple=info.size_multiple,
        size_rule=info.size_rule,
        ablation_of=name,
    )(functools.wraps(builder)(functools.partial(_no_mamba, builder)))


for _name, _builder in (("vm_unet", build_vm_unet), ("mamba_unet", build_mamba_unet),
                        ("swin_umamba", build_swin_umamba), ("msvm_unet", build_msvm_unet),
                        ("umamba_bot", build_umamba_bot)):
    _register_twin(_name, _builder)
