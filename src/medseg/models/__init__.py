"""Segmentation networks behind one registry (see registry.py for the builder contract)."""

from medseg.models.registry import (
    ModelInfo,
    available_models,
    build_model,
    get_model_info,
    register_model,
    size_multiple_of,
)

__all__ = ["ModelInfo", "available_models", "build_model", "get_model_info", "register_model", "size_multiple_of"]
