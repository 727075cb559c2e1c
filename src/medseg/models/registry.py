"""Name -> builder table. Every builder has the same signature:

    builder(in_channels: int, num_classes: int, image_size: tuple[int, int], **options) -> nn.Module

and the module maps (B, in_channels, H, W) float32 to logits (B, num_classes, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from medseg.errors import ConfigError

Builder = Callable[..., nn.Module]


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


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    name: str, *, family: str, description: str, size_multiple: int, **info: Any
) -> Callable[[Builder], Builder]:
    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelInfo(name=name, builder=builder, family=family, description=description,
                                    size_multiple=size_multiple, **info)
        return builder

    return decorate


def _load_builtin() -> None:
    # Importing the modules runs their @register_model decorators.
    from medseg.models import builtin  # noqa: F401


def get_model_info(name: str) -> ModelInfo:
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
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


def build_model(
    name: str, in_channels: int, num_classes: int, image_size: tuple[int, int] | list[int], **options: Any
) -> nn.Module:
    info = get_model_info(name)
    h, w = int(image_size[0]), int(image_size[1])
    if h % info.size_multiple or w % info.size_multiple:
        raise ConfigError(f"model {name!r} needs image_size multiples of {info.size_multiple}, got {h}x{w}")
    kwargs = {**info.defaults, **options}
    return info.builder(in_channels=in_channels, num_classes=num_classes, image_size=(h, w), **kwargs)
