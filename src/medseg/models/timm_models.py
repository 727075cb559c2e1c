"""Transformer segmentation networks assembled from timm backbones, with the decoders written here:

- TransUNet (R50-ViT-B/16 hybrid encoder from timm + the cascaded upsampler "CUP" with skips),
- Swin-UNet (timm Swin stages in a U shape with patch-expanding layers),
- UperNet on plain ViTs (DeiT, BEiT; features from 4 blocks, deconv/pool multi-scale neck as in BEiT/mmseg),
- a TransNeXt-Base stand-in (no package ships TransNeXt; see its entry).

Mask2Former and Mask R-CNN live in medseg.models.detection.
"""

from __future__ import annotations

from typing import Sequence

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.swin_transformer import SwinTransformerStage
from torch import nn

from medseg.models.table import register_model


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


def _timm_backbone(name: str, pretrained: bool, **kwargs) -> nn.Module:
    # pretrained=True downloads from the Hugging Face hub (users online); tests and CI always use False.
    return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)


# --------------------------------------------------------------------------------------------- TransUNet
class CupBlock(nn.Module):
    """TransUNet DecoderBlock: bilinear x2 (align_corners=True, as nn.UpsamplingBilinear2d), concat skip, 2 convs."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = ConvBNReLU(in_ch + skip_ch, out_ch)
        self.conv2 = ConvBNReLU(out_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class TransUNet(nn.Module):
    """Chen et al. 2021. Encoder: ResNet-50 (GroupNorm, weight-standardised convs, 3 stages) -> 1x1 patch
    embedding -> 12 ViT-B blocks on the 1/16 grid (timm `vit_base_r50_s16_224`). Decoder (CUP): 3x3 conv 768->512,
    four x2 upsampling blocks (256, 128, 64, 16 channels) fed with the CNN features at 1/8, 1/4, 1/2 (n_skip=3),
    3x3 conv to classes."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        decoder_channels: Sequence[int] = (256, 128, 64, 16),
        pretrained: bool = False,
        depth: int = 12,
    ):
        super().__init__()
        self.vit = _timm_backbone(
            "vit_base_r50_s16_224", pretrained, in_chans=in_channels, img_size=tuple(image_size), depth=depth
        )
        # TransUNet embeds patches only: keep the patch rows of the position table (as TransUNet does when it loads
        # the R50-ViT-B/16 checkpoint) and drop the [CLS] token, so pretrained timm weights still load.
        self.pos_embed = nn.Parameter(self.vit.pos_embed[:, self.vit.num_prefix_tokens:].detach().clone())
        self.vit.pos_embed, self.vit.cls_token = None, None
        if not pretrained:
            # timm zero-initialises each bottleneck's last GroupNorm; TransUNet's ResNetV2 keeps the default (ones),
            # which also lets every layer of a from-scratch network receive a gradient on the first step.
            for stage in self.vit.patch_embed.backbone.stages:
                for block in stage.blocks:
                    nn.init.ones_(block.norm3.weight)
        self.grid = (image_size[0] // 16, image_size[1] // 16)
        resnet = self.vit.patch_embed.backbone
        skip_channels = [resnet.stages[1].blocks[-1].conv3.out_channels,  # 512 at 1/8
                         resnet.stages[0].blocks[-1].conv3.out_channels,  # 256 at 1/4
                         resnet.stem.conv.out_channels,  # 64 at 1/2
                         0]  # no skip at full resolution (n_skip = 3)
        self.conv_more = ConvBNReLU(self.vit.embed_dim, 512)
        in_chs = [512, *decoder_channels[:-1]]
        self.blocks = nn.ModuleList(
            CupBlock(i, s, o) for i, s, o in zip(in_chs, skip_channels, decoder_channels)
        )
        self.head = nn.Conv2d(decoder_channels[-1], num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        resnet = self.vit.patch_embed.backbone
        half = resnet.stem.norm(resnet.stem.conv(x))
        quarter = resnet.stages[0](resnet.stem.pool(half))
        eighth = resnet.stages[1](quarter)
        x = resnet.stages[2](eighth)  # 1024 channels at 1/16
        tokens = self.vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = self.vit.pos_drop(tokens + self.pos_embed)
        tokens = self.vit.norm(self.vit.blocks(self.vit.norm_pre(tokens)))
        b, _, c = tokens.shape
        x = self.conv_more(tokens.transpose(1, 2).reshape(b, c, *self.grid))
        for block, skip in zip(self.blocks, (eighth, quarter, half, None)):
            x = block(x, skip)
        return self.head(x)


@register_model(
    "transunet_r50_vit",
    family="hybrid",
    description="TransUNet: R50-ViT-B/16 hybrid encoder (timm) + cascaded upsampler with 3 skips (written here)",
    paper="Chen et al. TransUNet. arXiv:2102.04306 (params/GFLOPs as tabulated by follow-ups, e.g. HiFormer)",
    paper_params_m=105.28,
    paper_gflops=24.64,
    dynamic_hw=False,  # learned position embeddings for a fixed 1/16 grid
    size_multiple=16,
)
def build_transunet(
    in_channels: int, num_classes: int, image_size: tuple[int, int], pretrained: bool = False, depth: int = 12,
    decoder_channels: Sequence[int] = (256, 128, 64, 16),
) -> nn.Module:
    return TransUNet(in_channels, num_classes, image_size, tuple(decoder_channels), pretrained, depth)


# --------------------------------------------------------------------------------------------- Swin-UNet
def _pixel_shuffle_nhwc(x: torch.Tensor, scale: int) -> torch.Tensor:
    """'b h w (p1 p2 c) -> b (h p1) (w p2) c' (einops rearrange of the Swin-UNet code)."""
    b, h, w, c = x.shape
    c_out = c // (scale * scale)
    x = x.reshape(b, h, w, scale, scale, c_out).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * scale, w * scale, c_out)


class PatchExpand(nn.Module):
    """Swin-UNet patch expanding: linear dim -> scale^2*out_dim, rearrange to a scale-times larger grid, LayerNorm."""

    def __init__(self, dim: int, out_dim: int, scale: int):
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(dim, scale * scale * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_pixel_shuffle_nhwc(self.expand(x), self.scale))


class SwinUNet(nn.Module):
    """Cao et al. 2022. Encoder: Swin-T style (patch 4, dims 96..768, depths 2-2-2-2, window 7); the skip at each
    scale is the encoder's input to that scale's blocks (after patch merging), as in the original code.
    Decoder: patch expand x2, [concat skip -> linear 2C->C -> Swin blocks -> patch expand] x3, final x4 expand,
    1x1 conv (no bias) to classes. Swin blocks are timm's."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        drop_path_rate: float = 0.2,
    ):
        super().__init__()
        n = len(depths)
        dims = [embed_dim * 2**i for i in range(n)]
        grid = (image_size[0] // 4, image_size[1] // 4)
        res = [(grid[0] // 2**i, grid[1] // 2**i) for i in range(n)]
        total = sum(depths)  # stochastic depth grows linearly over the encoder blocks (plain floats: meta-safe)
        dpr = [drop_path_rate * k / max(total - 1, 1) for k in range(total)]
        dpr_of = [dpr[sum(depths[:i]): sum(depths[: i + 1])] for i in range(n)]

        self.patch_embed = PatchEmbed(
            image_size, 4, in_channels, embed_dim, norm_layer=nn.LayerNorm, output_fmt="NHWC", strict_img_size=False
        )

        def stage(i: int, downsample: bool) -> SwinTransformerStage:
            return SwinTransformerStage(
                dim=dims[i - 1] if downsample else dims[i],
                out_dim=dims[i],
                input_resolution=res[i - 1] if downsample else res[i],
                depth=depths[i],
                downsample=downsample,
                num_heads=num_heads[i],
                window_size=window_size,
                drop_path=dpr_of[i],
            )

        self.encoder = nn.ModuleList(stage(i, downsample=i > 0) for i in range(n))
        self.norm = nn.LayerNorm(dims[-1])
        self.expand_bottleneck = PatchExpand(dims[-1], dims[-2], 2)
        levels = list(reversed(range(n - 1)))  # decoder levels, deepest first
        self.concat_back = nn.ModuleList(nn.Linear(2 * dims[i], dims[i]) for i in levels)
        self.decoder = nn.ModuleList(stage(i, downsample=False) for i in levels)
        self.expand = nn.ModuleList(PatchExpand(dims[i], dims[i - 1], 2) for i in levels if i > 0)
        self.norm_up = nn.LayerNorm(embed_dim)
        self.final_expand = PatchExpand(embed_dim, embed_dim, 4)
        self.head = nn.Conv2d(embed_dim, num_classes, 1, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # B, H/4, W/4, C (NHWC throughout)
        skips = []
        for stage in self.encoder:
            x = stage.downsample(x)
            skips.append(x)
            x = stage.blocks(x)
        x = self.expand_bottleneck(self.norm(x))
        for k, (linear, stage) in enumerate(zip(self.concat_back, self.decoder)):
            x = stage.blocks(linear(torch.cat([x, skips[len(skips) - 2 - k]], dim=-1)))
            if k < len(self.expand):
                x = self.expand[k](x)
        x = self.final_expand(self.norm_up(x))
        return self.head(x.permute(0, 3, 1, 2))


@register_model(
    "swin_unet",
    family="transformer",
    description="Swin-UNet: Swin-T encoder (timm Swin stages), patch-expanding Swin decoder with skips (written here)",
    paper="Cao et al. Swin-Unet. ECCV Workshops 2022, arXiv:2105.05537 (params/GFLOPs as tabulated by follow-ups)",
    paper_params_m=27.17,
    paper_gflops=6.16,
    dynamic_hw=False,  # shifted-window attention masks are built for a fixed grid
    size_multiple=32,  # patch 4, then one x2 patch merging per further stage
    size_rule=lambda image_size, depths=(2, 2, 2, 2), **_: 4 * 2 ** (len(depths) - 1),
)
def build_swin_unet(
    in_channels: int, num_classes: int, image_size: tuple[int, int], embed_dim: int = 96,
    depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
    drop_path_rate: float = 0.2,
) -> nn.Module:
    return SwinUNet(in_channels, num_classes, image_size, embed_dim, tuple(depths), tuple(num_heads), window_size,
                    drop_path_rate)


# --------------------------------------------------------------------------------------------- UperNet
def adaptive_avg_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """F.adaptive_avg_pool2d(x, size) written with slices and means, same bins as PyTorch's.

    ONNX has no adaptive pooling and the exporter refuses sizes that do not divide the input (7x7 -> 3x3 in every
    UperNet at 224); the slices are exported for the (fixed) input size of these models.
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])
    rows = [x[..., (i * h) // size: -((-(i + 1) * h) // size), :].mean(-2, keepdim=True) for i in range(size)]
    x = torch.cat(rows, dim=-2)
    cols = [x[..., (j * w) // size: -((-(j + 1) * w) // size)].mean(-1, keepdim=True) for j in range(size)]
    return torch.cat(cols, dim=-1)


class UperHead(nn.Module):
    """UperNet decode head (Xiao et al. 2018) as in mmseg's UPerHead: PPM (scales 1,2,3,6) on the deepest level,
    FPN top-down path with 1x1 laterals and 3x3 output convs, all levels resized to 1/4 and fused by a 3x3 conv."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.ppm = nn.ModuleList(ConvBNReLU(in_channels[-1], channels, 1) for _ in self.pool_scales)
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(self.pool_scales) * channels, channels)
        self.lateral = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(ConvBNReLU(channels, channels) for _ in in_channels[:-1])
        self.fuse = ConvBNReLU(len(in_channels) * channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        pooled = [
            F.interpolate(conv(adaptive_avg_pool(top, s)), size=top.shape[-2:], mode="bilinear", align_corners=False)
            for s, conv in zip(self.pool_scales, self.ppm)
        ]
        laterals = [conv(f) for conv, f in zip(self.lateral, feats)] + [self.bottleneck(torch.cat([top, *pooled], 1))]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="bilinear", align_corners=False
            )
        outs = [conv(lat) for conv, lat in zip(self.fpn, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.classifier(self.dropout(self.fuse(torch.cat(outs, dim=1))))


class UperNet(nn.Module):
    """Backbone features (a list of NCHW maps, fine to coarse) -> optional neck -> UperHead -> bilinear to input."""

    def __init__(self, backbone: nn.Module, neck: nn.Module, head: UperHead):
        super().__init__()
        self.backbone, self.neck, self.head = backbone, neck, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.neck(self.backbone(x)))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ViTFeatures(nn.Module):
    """Patch-token maps (NCHW, 1/16) after 4 chosen blocks of a timm ViT/DeiT/BEiT."""

    def __init__(self, vit: nn.Module, indices: Sequence[int]):
        super().__init__()
        self.vit, self.indices = vit, list(indices)
        self.vit.reset_classifier(0)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.vit.forward_intermediates(x, indices=self.indices, output_fmt="NCHW", intermediates_only=True)


class ViTMultiScaleNeck(nn.Module):
    """BEiT's neck (fpn1..fpn4): 1/16 maps -> 1/4 (two 2x2 deconvs), 1/8 (one deconv), 1/16, 1/32 (max-pool)."""

    def __init__(self, dim: int):
        super().__init__()
        self.ops = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                          nn.ConvTranspose2d(dim, dim, 2, 2)),
            nn.ConvTranspose2d(dim, dim, 2, 2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ])

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [op(f) for op, f in zip(self.ops, feats)]


def _vit_upernet(timm_name: str, indices_of, in_channels: int, num_classes: int, image_size: tuple[int, int],
                 pretrained: bool, head_channels: int, depth: int | None, drop_path_rate: float) -> UperNet:
    kwargs = {"drop_path_rate": drop_path_rate}
    if depth is not None:
        kwargs["depth"] = depth
    vit = _timm_backbone(timm_name, pretrained, in_chans=in_channels, img_size=tuple(image_size), **kwargs)
    indices = indices_of(len(vit.blocks))
    return UperNet(ViTFeatures(vit, indices), ViTMultiScaleNeck(vit.embed_dim),
                   UperHead([vit.embed_dim] * 4, num_classes, head_channels))


def deit_indices(depth: int) -> list[int]:
    """mmseg's ViT/DeiT out_indices: (2, 5, 8, 11) for 12 blocks."""
    return [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1]


def beit_indices(depth: int) -> list[int]:
    """BEiT's out_indices: (3, 5, 7, 11) for 12 blocks, (7, 11, 15, 23) for 24."""
    return [depth // 3 - 1, depth // 2 - 1, 2 * depth // 3 - 1, depth - 1]


_UPERNET_VITS = {
    # name: (timm model, out-index rule, mmseg decode-head width, paper params M, paper GFLOPs, paper input, paper)
    "upernet_deit_s": ("deit_small_patch16_224", deit_indices, 512, 52.0, 1099.0, (512, 2048),
                       "Touvron et al. DeiT, ICML 2021; UperNet figures from Liu et al. Swin Transformer, Table 3"),
    "upernet_deit_b": ("deit_base_patch16_224", deit_indices, 512, None, None, (512, 512),
                       "Touvron et al. DeiT, ICML 2021 (UperNet as in mmseg's vit/deit configs)"),
    "upernet_beit_b": ("beit_base_patch16_224", beit_indices, 768, None, None, (640, 640),
                       "Bao et al. BEiT, ICLR 2022 (UperNet as in the BEiT semantic segmentation code)"),
    "upernet_beit_l": ("beit_large_patch16_224", beit_indices, 1024, None, None, (640, 640),
                       "Bao et al. BEiT, ICLR 2022 (UperNet as in the BEiT semantic segmentation code)"),
}


def _register_vit_upernet(name: str, timm_name: str, indices_of, head_channels: int, params_m, gflops, paper_input,
                          paper: str) -> None:
    def builder(in_channels: int, num_classes: int, image_size: tuple[int, int], pretrained: bool = False,
                head_channels: int = head_channels, depth: int | None = None, drop_path_rate: float = 0.1) -> nn.Module:
        return _vit_upernet(timm_name, indices_of, in_channels, num_classes, image_size, pretrained, head_channels,
                            depth, drop_path_rate)

    builder.__name__ = f"build_{name}"
    register_model(
        name,
        family="transformer",
        description=f"UperNet on timm {timm_name} (features of 4 blocks, deconv/pool neck, UperNet head written here)",
        paper=paper,
        paper_params_m=params_m,
        paper_gflops=gflops,
        paper_input=paper_input,
        dynamic_hw=False,  # learned absolute / relative position tables for a fixed patch grid
        size_multiple=32,  # 1/16 patch grid, max-pooled once more for the 1/32 level
    )(builder)


for _name, _spec in _UPERNET_VITS.items():
    _register_vit_upernet(_name, *_spec)


# --------------------------------------------------------------------------------------------- TransNeXt stand-in
class TimmPyramid(nn.Module):
    """The 4 stage outputs (NCHW) of a hierarchical timm backbone."""

    def __init__(self, name: str, in_channels: int, pretrained: bool, **kwargs):
        super().__init__()
        self.body = timm.create_model(name, pretrained=pretrained, features_only=True, in_chans=in_channels,
                                      out_indices=(0, 1, 2, 3), **kwargs)
        self.channels = list(self.body.feature_info.channels())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))


@register_model(
    "transnext_base_standin",
    family="transformer",
    description=(
        "STAND-IN for TransNeXt-Base + UperNet (no PyPI package ships TransNeXt): timm PVTv2-B5, the hierarchical "
        "ViT TransNeXt extends (spatial-reduction attention, conv FFN), ~82M backbone vs TransNeXt-Base 89.7M, "
        "with the UperNet head written here"
    ),
    paper="Shi. TransNeXt, CVPR 2024 (architecture not reproduced); stand-in backbone: Wang et al. PVTv2, 2022",
    dynamic_hw=False,  # UperNet's pyramid pooling is exported for a fixed input size
    size_multiple=32,
)
def build_transnext_base_standin(
    in_channels: int, num_classes: int, image_size: tuple[int, int], pretrained: bool = False,
    backbone: str = "pvt_v2_b5", head_channels: int = 512, drop_path_rate: float = 0.3,
) -> nn.Module:
    body = TimmPyramid(backbone, in_channels, pretrained, drop_path_rate=drop_path_rate)
    return UperNet(body, nn.Identity(), UperHead(body.channels, num_classes, head_channels))
