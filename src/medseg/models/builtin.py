"""Imports every module that registers models (what `available_models()` does).

The modules and the names each registers are listed once, in `medseg.models.registry` (`_FAMILY_OF`), so that
looking up one model imports only its family: add a new model module's names there.
"""

from medseg.models.registry import MODEL_MODULES, _load_builtin

__all__ = ["MODEL_MODULES"]

_load_builtin()
