"""CNN and MiT-encoder networks from segmentation_models_pytorch (smp).

smp builds the whole network; these entries only fix the encoder/decoder pairing and expose `encoder_weights`
(None by default, so nothing is downloaded; "imagenet" works for users who are online) and any smp keyword
(e.g. `decoder_channels`). smp adapts the first convolution to any number of input channels.
"""

from __future__ import annotations

from typing import Any

import segmentation_models_pytorch as smp
from torch import nn

from medseg.errors import ConfigError
from medseg.models.registry import register_model

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
