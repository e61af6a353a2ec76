"""The table of MAPS fit parameters: one row per parameter, built once.

Each :class:`ParamSpec` carries the MAPS name (as XRF-Maps and its HDF5 output call it), the key
in ``maps_fit_parameters_override.txt`` when it differs, a default value, bounds, whether it is
fixed by default, unit and meaning. Defaults and bounds follow XRF-Maps'
``Gaussian_Model::_generate_default_fit_parameters`` except where noted in ``note``.

Amplitudes (``COHERENT_SCT_AMPLITUDE``, ``COMPTON_AMPLITUDE`` and every element) are log10 of
counts, as in MAPS. Element amplitudes are not rows of this table: they are added per fit by
:class:`~mapstorch.parameters.set.ParameterSet` with :data:`AMPLITUDE_BOUNDS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mapstorch.errors import ParameterError

__all__ = [
    "ParamSpec",
    "PARAMETERS",
    "SHAPE_PARAMETER_NAMES",
    "AMPLITUDE_BOUNDS",
    "AMPLITUDE_DEFAULT",
    "spec",
    "file_key",
    "name_from_file_key",
    "PRESETS",
    "preset_free_names",
]

#: log10 bounds of every amplitude (XRF-Maps MIN/MAX_COUNTS_LIMIT_LOG).
AMPLITUDE_BOUNDS = (-11.0, 20.0)
AMPLITUDE_DEFAULT = 5.0


@dataclass(frozen=True)
class ParamSpec:
    """One MAPS parameter: name, override-file key, default, bounds, default fixed flag."""

    name: str
    value: float
    lower: float
    upper: float
    fixed: bool = True
    unit: str = ""
    description: str = ""
    file_key: str | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if not (self.lower <= self.value <= self.upper) and not math.isnan(self.value):
            raise ParameterError(f"default of {self.name} ({self.value}) is outside [{self.lower}, {self.upper}]")


def _p(name, value, lower, upper, fixed=True, unit="", description="", file_key=None, note=""):
    return ParamSpec(name, float(value), float(lower), float(upper), fixed, unit, description, file_key, note)


#: Every MAPS parameter of the spectrum model, in a fixed order (the model indexes this order).
PARAMETERS: tuple[ParamSpec, ...] = (
    _p("ENERGY_OFFSET", 0.0, -0.2, 0.2, False, "keV", "energy of channel 0", "CAL_OFFSET_[E_OFFSET]"),
    _p("ENERGY_SLOPE", 0.01, 0.001, 0.1, False, "keV/channel", "energy width of a channel", "CAL_SLOPE_[E_LINEAR]",
       note="XRF-Maps defaults to 1.0 within [0.001, 10]; we default to 0.01 within [0.001, 0.1]"),
    _p("ENERGY_QUADRATIC", 0.0, -1e-5, 1e-5, True, "keV/channel^2", "quadratic calibration term",
       "CAL_QUAD_[E_QUADRATIC]", note="XRF-Maps bounds [-1e-9, 1e-5]; we use symmetric bounds"),
    _p("FWHM_OFFSET", 0.12, 0.005, 0.5, False, "keV", "detector FWHM at 0 keV"),
    _p("FWHM_FANOPRIME", 0.00012, 1e-6, 0.05, False, "", "energy dependence of the FWHM"),
    _p("COHERENT_SCT_ENERGY", 10.0, 1.0, 100.0, False, "keV", "incident (elastic) energy",
       note="XRF-Maps default 9.99 within [9.4, 10.4]; override files set their own bounds"),
    _p("COHERENT_SCT_AMPLITUDE", AMPLITUDE_DEFAULT, *AMPLITUDE_BOUNDS, False, "log10 counts", "elastic amplitude"),
    _p("COMPTON_ANGLE", 90.0, 0.0, 180.0, False, "degree", "scattering angle for the Compton energy",
       note="XRF-Maps bounds [0, 359]; cos() is symmetric about 180"),
    _p("COMPTON_FWHM_CORR", 1.0, 1.0, 4.0, False, "", "Compton width / detector width"),
    _p("COMPTON_AMPLITUDE", AMPLITUDE_DEFAULT, *AMPLITUDE_BOUNDS, False, "log10 counts", "Compton amplitude"),
    _p("COMPTON_F_STEP", 0.0, 0.0, 1.0, True, "", "Compton step fraction", "COMPTON_STEP"),
    _p("COMPTON_F_TAIL", 0.1, 0.0, 1.0, False, "", "Compton low-energy tail fraction"),
    _p("COMPTON_GAMMA", 1.0, 0.1, 10.0, True, "", "Compton low-energy tail width"),
    _p("COMPTON_HI_F_TAIL", 0.013, 0.0, 1.0, True, "", "Compton high-energy tail fraction",
       note="fixed by default here, free in XRF-Maps' table but fixed by every preset"),
    _p("COMPTON_HI_GAMMA", 1.0, 0.1, 3.0, True, "", "Compton high-energy tail width"),
    _p("SNIP_WIDTH", 0.25, 0.1, 2.828427, True, "", "SNIP background window, in FWHM units"),
    _p("F_STEP_OFFSET", 0.0, 0.0, 1.0, True, "", "step fraction, constant term", "STEP_OFFSET"),
    _p("F_STEP_LINEAR", 0.0, 0.0, 1.0, True, "1/keV", "step fraction, linear term", "STEP_LINEAR"),
    _p("F_STEP_QUADRATIC", 0.0, 0.0, 0.0, True, "", "unused by MAPS (kept for files)", "STEP_QUADRATIC"),
    _p("F_TAIL_OFFSET", 0.003, 0.0, 0.1, True, "", "K alpha / L tail fraction, constant term"),
    _p("F_TAIL_LINEAR", 0.001, 0.0, 1.0, True, "g/cm^2", "K alpha / L tail fraction per mu_fraction"),
    _p("F_TAIL_QUADRATIC", 0.0, 0.0, 0.01, True, "", "unused by MAPS (kept for files)"),
    _p("KB_F_TAIL_OFFSET", 0.05, 0.0, 0.2, True, "", "K beta tail fraction, constant term"),
    _p("KB_F_TAIL_LINEAR", 0.0, 0.0, 0.02, True, "g/cm^2", "K beta tail fraction per mu_fraction"),
    _p("KB_F_TAIL_QUADRATIC", 0.0, 0.0, 0.0, True, "", "unused by MAPS (kept for files)"),
    _p("GAMMA_OFFSET", 2.2, 0.1, 10.0, True, "", "line tail width, constant term"),
    _p("GAMMA_LINEAR", 0.0, 0.0, 3.0, True, "1/keV", "line tail width, linear term"),
    _p("GAMMA_QUADRATIC", 0.0, 0.0, 0.0, True, "", "unused by MAPS (kept for files)"),
    _p("SI_ESCAPE", 0.0, 0.0, 0.2, True, "", "Si escape-peak fraction", "SI_ESCAPE_FACTOR"),
    _p("GE_ESCAPE", 0.0, 0.0, 0.2, True, "", "Ge escape-peak fraction", "GE_ESCAPE_FACTOR",
       note="read but unused by XRF-Maps; modelled here"),
    _p("MIN_ENERGY_TO_FIT", 1.0, 0.1, 100.0, True, "keV", "lower end of the fit window"),
    _p("MAX_ENERGY_TO_FIT", 11.0, 0.1, 100.0, True, "keV", "upper end of the fit window"),
)

SHAPE_PARAMETER_NAMES: tuple[str, ...] = tuple(p.name for p in PARAMETERS)
_BY_NAME = {p.name: p for p in PARAMETERS}
_FILE_TO_NAME = {(p.file_key or p.name): p.name for p in PARAMETERS}


def spec(name: str) -> ParamSpec:
    """The :class:`ParamSpec` of a MAPS parameter name (or override-file key)."""
    key = name_from_file_key(name)
    try:
        return _BY_NAME[key]
    except KeyError:
        raise ParameterError(
            f"unknown parameter {name!r}; known: {', '.join(SHAPE_PARAMETER_NAMES)}"
        ) from None


def file_key(name: str) -> str:
    """Override-file key of a MAPS parameter (``ENERGY_OFFSET`` -> ``CAL_OFFSET_[E_OFFSET]``)."""
    return spec(name).file_key or spec(name).name


def name_from_file_key(key: str) -> str:
    """MAPS name of an override-file key (``COMPTON_STEP`` -> ``COMPTON_F_STEP``); other names pass."""
    k = key.strip()
    return _FILE_TO_NAME.get(k, k)


_PRESET_2 = (
    "ENERGY_OFFSET", "ENERGY_SLOPE", "FWHM_OFFSET", "FWHM_FANOPRIME", "COHERENT_SCT_ENERGY",
    "COHERENT_SCT_AMPLITUDE", "COMPTON_ANGLE", "COMPTON_FWHM_CORR", "COMPTON_AMPLITUDE", "COMPTON_F_TAIL",
)  # fmt: skip
_UNUSED = ("F_STEP_QUADRATIC", "F_TAIL_QUADRATIC", "KB_F_TAIL_QUADRATIC", "GAMMA_QUADRATIC")

#: XRF-Maps fit presets (which shape parameters are free); element amplitudes are always free.
#: 1 matrix (amplitudes only), 2 no tails, 3 with tails, 4 free energy, 5 no tails + quadratic,
#: "all": every parameter the model uses except the fit window and SNIP width.
PRESETS: dict[str, tuple[str, ...]] = {
    "1": ("COHERENT_SCT_AMPLITUDE", "COMPTON_AMPLITUDE"),
    "2": _PRESET_2,
    "3": _PRESET_2 + ("COMPTON_GAMMA", "F_TAIL_OFFSET", "F_TAIL_LINEAR", "KB_F_TAIL_OFFSET", "KB_F_TAIL_LINEAR"),
    "4": ("ENERGY_OFFSET", "ENERGY_SLOPE", "COHERENT_SCT_ENERGY", "COHERENT_SCT_AMPLITUDE", "COMPTON_AMPLITUDE"),
    "5": _PRESET_2 + ("ENERGY_QUADRATIC",),
    "all": tuple(
        n for n in SHAPE_PARAMETER_NAMES
        if n not in _UNUSED + ("MIN_ENERGY_TO_FIT", "MAX_ENERGY_TO_FIT", "SNIP_WIDTH")
    ),
}
_PRESET_ALIASES = {
    "matrix": "1", "no-tails": "2", "with-tails": "3", "free-energy": "4", "no-tails-quad": "5",
}  # fmt: skip


def preset_free_names(preset: str | int) -> tuple[str, ...]:
    """Names of the shape parameters a preset frees (``2``, ``3``, ``5``, ``"all"``, ...)."""
    key = _PRESET_ALIASES.get(str(preset).strip().lower(), str(preset).strip().lower())
    if key not in PRESETS:
        raise ParameterError(
            f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)} "
            f"or {', '.join(_PRESET_ALIASES)}"
        )
    return PRESETS[key]
