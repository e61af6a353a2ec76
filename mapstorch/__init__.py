"""mapstorch: the MAPS X-ray fluorescence model as batched, differentiable PyTorch.

The main entry points (imported lazily so that ``import mapstorch`` stays light):

* :func:`build_line_table` / :class:`LineTable` - emission lines of fit components;
* :class:`ParameterSet` - MAPS parameters with bounds and presets;
* :class:`SpectrumModel` - the forward model, its design matrix and components;
* :func:`snip_background` - the SNIP background, batched;
* :func:`read_override` - XRF-Maps ``maps_fit_parameters_override.txt``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "build_line_table": "mapstorch.physics.lines",
    "xrfmaps_source": "mapstorch.physics.lines",
    "branching_factors": "mapstorch.physics.lines",
    "LineTable": "mapstorch.physics.lines",
    "ParameterSet": "mapstorch.parameters",
    "PARAMETERS": "mapstorch.parameters",
    "SpectrumModel": "mapstorch.physics.model",
    "FitWindow": "mapstorch.physics.model",
    "fit_window": "mapstorch.physics.model",
    "snip_background": "mapstorch.physics.snip",
    "read_override": "mapstorch.io.override",
    "simulate_spectrum": "mapstorch.synthetic",
    "simulate_map": "mapstorch.synthetic",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mapstorch' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
