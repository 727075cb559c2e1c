"""CNN and MiT-encoder networks from segmentation_models_pytorch (smp).

smp builds the whole network; these entries only fix the encoder/decoder pairing and expose `encoder_weights`
(None by default, so nothing is downloaded; "imagenet" works for users who are online) and any smp keyword
(e.g. `decoder_channels`). smp adapts the first convolution to any number of input channels.
"""

from __future__ import annotations

import copy
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.segformer.decoder import SegformerDecoder
from torch import nn

from medseg.errors import ConfigError
from medseg.models.table import register_model

_SMP_ARCHS = {"unet": smp.Unet, "unetpp": smp.UnetPlusPlus, "segformer": smp.Segformer}

_SEGFORMER_PAPER = "Xie et al. SegFormer. NeurIPS 2021 (ADE20K figures at 512x512, 150 classes)"
_SMP = "segmentation_models_pytorch (Iakubovskii), encoder from the cited backbone paper"

# name: (smp architecture, smp encoder, description, registry info, smp defaults)
_ENTRIES: dict[str, tuple[str, str, str, dict[str, Any], dict[str, Any]]] = {
    "unet_resnet18": ("unet", "resnet18", "U-Net decoder on a ResNet-18 encoder (smp)", {}, {}),
    "unet_resnet34": ("unet", "resnet34", "U-Net decoder on a ResNet-34 encoder (smp)", {}, {}),
    "unet_resnet50": ("unet", "resnet50", "U-Net decoder on a ResNet-50 encoder (smp)", {}, {}),
    "unet_resnet152": ("unet", "resnet152", "U-Net decoder on a ResNet-152 encoder (smp)", {}, {}),
    "unetpp_resnet50": ("unetpp", "resnet50", "UNet++ decoder on a ResNet-50 encoder (smp)", {}, {}),
    "unet_effb5": ("unet", "efficientnet-b5", "U-Net decoder on an EfficientNet-B5 encoder (smp)", {}, {}),
    "unet_effb7": ("unet", "efficientnet-b7", "U-Net decoder on an EfficientNet-B7 encoder (smp)", {}, {}),
    "unet_mit_b2": ("unet", "mit_b2", "U-Net decoder on a SegFormer MiT-B2 encoder (smp)", {"family": "hybrid"}, {}),
    # SegFormer's all-MLP decoder is 256 wide for B0 and 768 wide for B1-B5 (paper, section 4.1).
    "segformer_b0": (
        "segformer", "mit_b0", "SegFormer-B0: MiT-B0 encoder + all-MLP decoder (smp)",
        {"family": "transformer", "paper": _SEGFORMER_PAPER, "paper_params_m": 3.8, "paper_gflops": 8.4,
         "paper_input": (512, 512)},
        {"decoder_segmentation_channels": 256},
    ),
    "segformer_b2": (
        "segformer", "mit_b2", "SegFormer-B2: MiT-B2 encoder + all-MLP decoder, 768 wide (smp)",
        {"family": "transformer", "paper": _SEGFORMER_PAPER, "paper_params_m": 27.5, "paper_gflops": 62.4,
         "paper_input": (512, 512)},
        {"decoder_segmentation_channels": 768},
    ),
    "segformer_b4": (
        "segformer", "mit_b4", "SegFormer-B4: MiT-B4 encoder + all-MLP decoder, 768 wide (smp)",
        {"family": "transformer", "paper": _SEGFORMER_PAPER, "paper_params_m": 64.1, "paper_gflops": 95.7,
         "paper_input": (512, 512)},
        {"decoder_segmentation_channels": 768},
    ),
}


def build_smp(
    arch: str, encoder: str, in_channels: int, num_classes: int, encoder_weights: str | None = None, **options: Any
) -> nn.Module:
    """Any smp architecture/encoder pair; smp's own errors (unknown encoder, bad keyword) become ConfigError."""
    try:
        return _SMP_ARCHS[arch](
            encoder_name=encoder,
            encoder_weights=encoder_weights,
            in_channels=in_channels,
            classes=num_classes,
            **options,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"smp {arch} with encoder {encoder!r} and options {options}: {exc}") from exc


def _encoder_stride(image_size: tuple[int, int], encoder_depth: int = 5, **_: Any) -> int:
    return 2 ** int(encoder_depth)  # smp's encoder.output_stride: one x2 reduction per encoder stage


def _register(name: str, arch: str, encoder: str, description: str, info: dict, defaults: dict) -> None:
    def builder(in_channels: int, num_classes: int, image_size: tuple[int, int], **options: Any) -> nn.Module:
        return build_smp(arch, encoder, in_channels, num_classes, **options)

    builder.__name__ = f"build_{name}"
    info = {"family": "cnn", "paper": _SMP, "size_multiple": 32, "size_rule": _encoder_stride, **info}
    register_model(name, description=description, defaults={"encoder_weights": None, **defaults}, **info)(builder)


for _name, (_arch, _encoder, _description, _info, _defaults) in _ENTRIES.items():
    _register(_name, _arch, _encoder, _description, _info, _defaults)


# ------------------------------------------------------------------------------------ exact inference-time fold
class FoldedSegformerDecoder(nn.Module):
    """SegFormer's all-MLP decoder with its linear layers folded, for inference (export): the same function.

    smp's decoder maps each stage by a Linear (C_i -> S), resizes it bilinearly to 1/4 of the input, concatenates
    the four and fuses them by a 1x1 conv (4S -> S) + BatchNorm + ReLU. Linear maps over channels commute with the
    bilinear resize (it mixes pixels with weights that sum to 1), so Linear, the fuse conv's block for that stage and
    the BatchNorm (eval statistics) compose into one 1x1 conv C_i -> S applied before the resize, and the fuse conv
    becomes a sum. Computed in float64 at construction; outputs agree to float32 rounding. The 1x1 conv of 1,024
    channels at 1/4 resolution was 20 % of SegFormer-B0's ONNX Runtime time at batch 16.
    """

    def __init__(self, decoder: nn.Module):
        super().__init__()
        fuse, norm = decoder.fuse_stage[0], decoder.fuse_stage[1]
        width = fuse.out_channels
        weight = fuse.weight[:, :, 0, 0].detach().double()  # (S, 4S)
        scale = torch.ones(width, dtype=torch.float64)
        shift = fuse.bias.detach().double() if fuse.bias is not None else torch.zeros(width, dtype=torch.float64)
        if isinstance(norm, nn.BatchNorm2d):
            scale = norm.weight.detach().double() / torch.sqrt(norm.running_var.double() + norm.eps)
            shift = scale * (shift - norm.running_mean.double()) + norm.bias.detach().double()
        self.branches = nn.ModuleList()
        for i, mlp in enumerate(decoder.mlp_stage):
            block = weight[:, i * width:(i + 1) * width]
            conv = nn.Conv2d(mlp.linear.in_features, width, 1)
            with torch.no_grad():
                conv.weight.copy_((scale[:, None] * (block @ mlp.linear.weight.double()))[:, :, None, None])
                conv.bias.zero_()
            shift = shift + scale * (block @ mlp.linear.bias.detach().double())
            self.branches.append(conv)
        with torch.no_grad():  # every constant on the 1/4-resolution branch, which is not resized
            self.branches[-1].bias.copy_(shift)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:  # smp SegformerDecoder.forward's contract
        target_size = [dim // 4 for dim in features[0].shape[2:]]
        features = features[2:] if features[1].size(1) == 0 else features[1:]
        features = features[::-1]
        out = self.branches[-1](features[len(self.branches) - 1])
        for conv, feature in zip(self.branches[:-1], features):
            out = out + F.interpolate(conv(feature), size=target_size, mode="bilinear", align_corners=False)
        return F.relu(out)


def _foldable(decoder: nn.Module) -> bool:
    """smp's SegformerDecoder as this module knows it: Linear MLPs, fuse = 1x1 Conv, BatchNorm or none, ReLU."""
    fuse = getattr(decoder, "fuse_stage", None)
    return (isinstance(decoder, SegformerDecoder) and isinstance(fuse, nn.Sequential) and len(fuse) == 3
            and isinstance(fuse[0], nn.Conv2d) and fuse[0].kernel_size == (1, 1) and fuse[0].groups == 1
            and isinstance(fuse[1], (nn.BatchNorm2d, nn.Identity)) and isinstance(fuse[2], nn.ReLU)
            and fuse[0].in_channels == len(decoder.mlp_stage) * fuse[0].out_channels
            and all(isinstance(getattr(m, "linear", None), nn.Linear) for m in decoder.mlp_stage))


def fold_segformer_decoders(model: nn.Module) -> nn.Module:
    """A copy of `model` (in eval mode) with every smp SegFormer decoder replaced by its FoldedSegformerDecoder, or
    `model` itself when it has none. A decoder laid out differently (another smp version, InPlaceABN) is left as
    it is."""
    if not any(_foldable(m) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _foldable(child):
                setattr(parent, name, FoldedSegformerDecoder(child))
    return model
