"""Segmentation networks behind one table of names (see table.py for the builder contract)."""

from medseg.models.table import (
    ModelInfo,
    available_models,
    build_model,
    get_model_info,
    input_multiple_of,
    register_model,
    size_multiple_of,
)

__all__ = ["ModelInfo", "available_models", "build_model", "get_model_info", "input_multiple_of", "register_model",
           "size_multiple_of"]
