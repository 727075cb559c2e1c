"""Name -> builder table. Every builder has the same signature:

    builder(in_channels: int, num_classes: int, image_size: tuple[int, int], **options) -> nn.Module

and the module maps (B, in_channels, H, W) float32 to logits (B, num_classes, H, W).

Model families load lazily: `_FAMILY_OF` says which module registers each built-in name, so `get_model_info("unet")`
and `build_model("unet", ...)` import `medseg.models.unet` only (not timm, segmentation_models_pytorch, transformers
nor the Mamba networks); `available_models()` imports every family. tests/test_lean_install.py checks the table
against what the modules register, so it cannot drift: a new model module adds its names here.
"""

from __future__ import annotations

import importlib
import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from medseg.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

Builder = Callable[..., "nn.Module"]

_UNET = "medseg.models.unet"  # original 2015 UNet and the nested UNet++ (torch only)
_SMP = "medseg.models.smp_models"  # segmentation_models_pytorch: UNet/UNet++/SegFormer with ResNet/EfficientNet/MiT
_TIMM = "medseg.models.timm_models"  # TransUNet, Swin-UNet, UperNet on DeiT/BEiT, TransNeXt stand-in (timm)
_DETECTION = "medseg.models.detection"  # Mask2Former (transformers) and Mask R-CNN (torchvision) as segmenters
_MAMBA = "medseg.models.mamba.networks"  # VM-UNet, Mamba-UNet, Swin-UMamba, MSVM-UNet, U-Mamba-Bot

# built-in name -> the module whose import registers it
_FAMILY_OF: dict[str, str] = {
    "unet": _UNET,
    "unetpp": _UNET,
    "unet_resnet18": _SMP,
    "unet_resnet34": _SMP,
    "unet_resnet50": _SMP,
    "unet_resnet152": _SMP,
    "unet_effb5": _SMP,
    "unet_effb7": _SMP,
    "unet_mit_b2": _SMP,
    "unetpp_resnet50": _SMP,
    "segformer_b0": _SMP,
    "segformer_b2": _SMP,
    "segformer_b4": _SMP,
    "transunet_r50_vit": _TIMM,
    "swin_unet": _TIMM,
    "upernet_deit_s": _TIMM,
    "upernet_deit_b": _TIMM,
    "upernet_beit_b": _TIMM,
    "upernet_beit_l": _TIMM,
    "transnext_base_standin": _TIMM,
    "mask2former_r50": _DETECTION,
    "mask2former_swin_l": _DETECTION,
    "maskrcnn_r101_fpn": _DETECTION,
    "maskrcnn_x101_fpn": _DETECTION,
    "vm_unet": _MAMBA,
    "mamba_unet": _MAMBA,
    "swin_umamba": _MAMBA,
    "msvm_unet": _MAMBA,
    "umamba_bot": _MAMBA,
    # the no-Mamba ablation twins (the same networks without their selective scans)
    "vm_unet_nomamba": _MAMBA,
    "mamba_unet_nomamba": _MAMBA,
    "swin_umamba_nomamba": _MAMBA,
    "msvm_unet_nomamba": _MAMBA,
    "umamba_bot_nomamba": _MAMBA,
}
# every module that registers built-in models, in the order available_models() imports them
MODEL_MODULES: tuple[str, ...] = tuple(dict.fromkeys(_FAMILY_OF.values()))

# the extra that installs a third-party package a model family imports (for the error when it is missing)
_EXTRA_OF = {"transformers": "transformers", "mamba_ssm": "cuda", "causal_conv1d": "cuda"}
_TRAIN_PACKAGES = {"torch", "torchvision", "timm", "segmentation_models_pytorch"}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Builder
    family: str  # "cnn" | "transformer" | "mamba" | "hybrid"
    description: str
    # The network's output stride with its default options: H and W must be multiples of it so that every strided
    # layer divides exactly (no padding, cropping or re-aligning resize inside); declared by every entry, no default.
    size_multiple: int
    paper: str = ""  # citation / source of the design
    paper_params_m: float | None = None  # parameter count reported by the paper (millions)
    paper_gflops: float | None = None  # GFLOPs reported by the paper at paper_input
    paper_input: tuple[int, int] | None = (224, 224)
    dynamic_hw: bool = True  # ONNX export may leave H and W dynamic
    # size_rule(image_size, **options) -> the stride for these options, where options change it (e.g. U-Net depth)
    size_rule: Callable[..., int] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    ablation_of: str | None = None  # a no-Mamba twin: the Mamba network it is paired with in the report


_REGISTRY: dict[str, ModelInfo] = {}
_REGISTERED_BY: dict[str, str] = {}  # name -> the module that called register_model (checked against _FAMILY_OF)


def register_model(
    name: str, *, family: str, description: str, size_multiple: int, **info: Any
) -> Callable[[Builder], Builder]:
    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTERED_BY[name] = sys._getframe(1).f_globals.get("__name__", "")
        _REGISTRY[name] = ModelInfo(name=name, builder=builder, family=family, description=description,
                                    size_multiple=size_multiple, **info)
        return builder

    return decorate


def _import_family(module: str) -> None:
    """Import one model module (its @register_model decorators run); a missing extra says which to install."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise _missing_extra(exc, module) from exc


def _missing_extra(exc: ModuleNotFoundError, what: str) -> ModuleNotFoundError:
    package = (exc.name or "").split(".")[0]
    extra = _EXTRA_OF.get(package) or ("train" if package in _TRAIN_PACKAGES else None)
    if extra is None:
        return exc
    return ModuleNotFoundError(f"{what} needs {package!r}, which is not installed: pip install 'medseg[{extra}]'",
                               name=exc.name)


def _load_builtin() -> None:
    """Import every built-in model family."""
    for module in MODEL_MODULES:
        _import_family(module)


def get_model_info(name: str) -> ModelInfo:
    if name not in _REGISTRY and name in _FAMILY_OF:
        _import_family(_FAMILY_OF[name])  # only the family that defines it
    if name not in _REGISTRY and name.startswith("nnunet_"):
        raise ConfigError(f"{name} is an nnU-Net entry, trained by nnunetv2 through its stages (medseg.nnunet), "
                          "not a network medseg builds; this takes networks only (docs/nnunet.md)")
    if name not in _REGISTRY:
        known = sorted(set(_FAMILY_OF) | set(_REGISTRY))
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(known)}")
    return _REGISTRY[name]


def available_models() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def size_multiple_of(name: str, image_size: tuple[int, int] | list[int], **options: Any) -> int:
    """The output stride of `name` built at `image_size` with `options`: what H and W must be multiples of."""
    info = get_model_info(name)
    if info.size_rule is None:
        return info.size_multiple
    return int(info.size_rule((int(image_size[0]), int(image_size[1])), **{**info.defaults, **options}))


def input_multiple_of(name: str, image_size: tuple[int, int] | list[int], **options: Any) -> int:
    """What an input of `name` built with `options` at `image_size` must be a multiple of: its stride there and
    the declared size_multiple, which build_model checks whatever the options (a patch size is planned to both)."""
    return math.lcm(size_multiple_of(name, image_size, **options), get_model_info(name).size_multiple)


def build_model(
    name: str, in_channels: int, num_classes: int, image_size: tuple[int, int] | list[int], **options: Any
) -> nn.Module:
    info = get_model_info(name)
    h, w = int(image_size[0]), int(image_size[1])
    if h % info.size_multiple or w % info.size_multiple:
        raise ConfigError(f"model {name!r} needs image_size multiples of {info.size_multiple}, got {h}x{w}")
    kwargs = {**info.defaults, **options}
    try:
        return info.builder(in_channels=in_channels, num_classes=num_classes, image_size=(h, w), **kwargs)
    except ModuleNotFoundError as exc:  # a builder that imports its package lazily (Mask2Former: transformers)
        hinted = _missing_extra(exc, f"model {name!r}")
        if hinted is exc:
            raise
        raise hinted from exc
