"""Fit parameters as data: the MAPS parameter table, presets, bounds and transforms.

The table (:mod:`mapstorch.parameters.table`) is plain Python; :class:`ParameterSet` and the
transforms need PyTorch and are imported on first use, so reading files stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from mapstorch.parameters.table import (
    AMPLITUDE_BOUNDS,
    PARAMETERS,
    PRESETS,
    SHAPE_PARAMETER_NAMES,
    ParamSpec,
    file_key,
    name_from_file_key,
    preset_free_names,
    spec,
)

_LAZY = {
    "N_SHAPE": "mapstorch.parameters.set",
    "ParameterSet": "mapstorch.parameters.set",
    "index_of": "mapstorch.parameters.set",
    "to_bounded": "mapstorch.parameters.transforms",
    "to_unbounded": "mapstorch.parameters.transforms",
}

__all__ = [
    "AMPLITUDE_BOUNDS",
    "N_SHAPE",
    "PARAMETERS",
    "PRESETS",
    "SHAPE_PARAMETER_NAMES",
    "ParamSpec",
    "ParameterSet",
    "file_key",
    "index_of",
    "name_from_file_key",
    "preset_free_names",
    "spec",
    "to_bounded",
    "to_unbounded",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mapstorch.parameters' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
