"""Fit parameters as data: the MAPS parameter table, presets, bounds and transforms."""

from mapstorch.parameters.set import N_SHAPE, ParameterSet, index_of
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
from mapstorch.parameters.transforms import to_bounded, to_unbounded

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
