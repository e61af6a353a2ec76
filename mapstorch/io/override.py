"""Reader for XRF-Maps' ``maps_fit_parameters_override.txt``.

The file is line-oriented: a line that starts with whitespace, or has no ``:``, is a comment;
every other line is ``KEY: value``. :func:`read_override` keeps every line (so a writer can
reproduce the file) and interprets the keys the model needs:

* ``ELEMENTS_TO_FIT``, ``ELEMENTS_WITH_PILEUP`` (comma-separated component names);
* parameters under their file keys (``CAL_OFFSET_[E_OFFSET]``, ``COMPTON_STEP``, ...), with
  ``<KEY>_MIN`` / ``<KEY>_MAX`` bounds;
* ``BRANCHING_RATIO_ADJUSTMENT_K/L/M`` and ``BRANCHING_FAMILY_ADJUSTMENT_L`` (repeatable);
* ``WIDTH_MULTIPLIER: El, factor``, ``DETECTOR_MATERIAL`` (0 Ge, 1 Si), ``FIT_SNIP_WIDTH``,
  ``SI_ESCAPE_ENABLE``/``GE_ESCAPE_ENABLE``, detector thicknesses;
* everything else (scaler mappings, names, dates) is kept as text in :attr:`OverrideFile.entries`.

A malformed number raises :class:`~mapstorch.errors.OverrideFileError` naming the file and line.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from mapstorch.errors import ElementError, OverrideFileError
from mapstorch.parameters.set import ParameterSet
from mapstorch.parameters.table import SHAPE_PARAMETER_NAMES, name_from_file_key
from mapstorch.physics.elements import parse_component
from mapstorch.physics.lines import LineTable, branching_factors, build_line_table
from mapstorch.physics.library.base import LineSource

__all__ = ["Entry", "OverrideFile", "read_override"]

_BRANCHING_KEYS = {
    "BRANCHING_RATIO_ADJUSTMENT_K": ("ratio_k", 4),
    "BRANCHING_RATIO_ADJUSTMENT_L": ("ratio_l", 12),
    "BRANCHING_RATIO_ADJUSTMENT_M": ("ratio_m", 4),
    "BRANCHING_FAMILY_ADJUSTMENT_L": ("family_l", 3),
}
_NUMERIC_KEYS = {
    "VERSION", "DETECTOR_ELEMENTS", "FIT_SNIP_WIDTH", "DETECTOR_MATERIAL", "BE_WINDOW_THICKNESS",
    "DET_CHIP_THICKNESS", "GE_DEAD_LAYER", "LINEAR_ESCAPE_FACTOR", "SI_ESCAPE_ENABLE", "GE_ESCAPE_ENABLE",
    "AIRPATH",
}  # fmt: skip


@dataclass(frozen=True)
class Entry:
    """One ``KEY: value`` line: 1-based line number, key and raw value text."""

    lineno: int
    key: str
    value: str


@dataclass
class OverrideFile:
    """A parsed override file (see module docstring)."""

    path: str
    lines: list[str]
    entries: list[Entry]
    elements: list[str] = field(default_factory=list)
    pileups: list[str] = field(default_factory=list)
    parameters: dict[str, float] = field(default_factory=dict)
    lower: dict[str, float] = field(default_factory=dict)
    upper: dict[str, float] = field(default_factory=dict)
    branching: dict[str, list[tuple[str, tuple[float, ...]]]] = field(default_factory=dict)
    width_multipliers: dict[str, float] = field(default_factory=dict)
    settings: dict[str, float] = field(default_factory=dict)

    @property
    def components(self) -> list[str]:
        """Fit components: ELEMENTS_TO_FIT then ELEMENTS_WITH_PILEUP."""
        return self.elements + [p for p in self.pileups if p not in self.elements]

    @property
    def detector(self) -> str:
        """``"Si"`` or ``"Ge"`` from DETECTOR_MATERIAL (1 = Si, 0 = Ge; Si when absent)."""
        return "Ge" if self.settings.get("DETECTOR_MATERIAL", 1.0) == 0.0 else "Si"

    def get(self, key: str) -> list[Entry]:
        """Every entry with this key, in file order."""
        return [e for e in self.entries if e.key == key]

    def branching_factors(self) -> dict[str, np.ndarray]:
        """Per-component ratio factors, combined as XRF-Maps combines them."""
        b = self.branching
        return branching_factors(
            ratio_k=b.get("ratio_k", ()), ratio_l=b.get("ratio_l", ()),
            ratio_m=b.get("ratio_m", ()), family_l=b.get("family_l", ()),
        )

    def line_table(self, source: LineSource | None = None, mu_convention: str = "maps") -> LineTable:
        """The :class:`LineTable` of this file's components, adjustments and detector."""
        return build_line_table(
            self.components,
            source=source,
            detector=self.detector,
            branching=self.branching_factors(),
            width_multipliers=self.width_multipliers,
            mu_convention=mu_convention,  # type: ignore[arg-type]
        )

    def parameter_set(self, preset: str | int = "2", **kw) -> ParameterSet:
        """Defaults updated with this file's values and bounds; one amplitude per component."""
        ps = ParameterSet.default(self.components, preset=preset, **kw)
        values: dict[str, float] = dict(self.parameters)
        values.update({f"{k}_MIN": v for k, v in self.lower.items()})
        values.update({f"{k}_MAX": v for k, v in self.upper.items()})
        return ps.with_maps_values(values)


def _numbers(text: str, path: str, lineno: int, key: str) -> list[float]:
    out = []
    for tok in text.replace(",", " ").split():
        try:
            v = float(tok)
        except ValueError:
            raise OverrideFileError(f"{path}, line {lineno}: {key}: {tok!r} is not a number") from None
        if not math.isfinite(v):
            raise OverrideFileError(f"{path}, line {lineno}: {key}: {tok!r} is not finite")
        out.append(v)
    return out


def _one_number(text: str, path: str, lineno: int, key: str) -> float:
    vals = _numbers(text, path, lineno, key)
    if len(vals) != 1:
        raise OverrideFileError(f"{path}, line {lineno}: {key} needs one number, got {text.strip()!r}")
    return vals[0]


def _names(text: str, path: str, lineno: int, key: str) -> list[str]:
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        if not tok:
            continue
        try:
            out.append(parse_component(tok).name)
        except ElementError as exc:
            raise OverrideFileError(f"{path}, line {lineno}: {key}: {exc}") from None
    return out


def _split_named(text: str, path: str, lineno: int, key: str, count: int) -> tuple[str, tuple[float, ...]]:
    name, _, rest = text.partition(",")
    name = name.strip()
    vals = _numbers(rest, path, lineno, key)
    if len(vals) != count:
        raise OverrideFileError(f"{path}, line {lineno}: {key} for {name!r} needs {count} numbers, got {len(vals)}")
    try:
        name = parse_component(name).name
    except ElementError as exc:
        raise OverrideFileError(f"{path}, line {lineno}: {key}: {exc}") from None
    return name, tuple(vals)


_PARAM_KEYS = set(SHAPE_PARAMETER_NAMES)


def read_override(path: str | os.PathLike[str]) -> OverrideFile:
    """Read an override file; see the module docstring for what is interpreted."""
    p = os.fspath(path)
    try:
        with open(p, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise OverrideFileError(f"override file not found: {p}") from None
    except IsADirectoryError:
        raise OverrideFileError(f"{p} is a directory; pass the maps_fit_parameters_override.txt file") from None
    except OSError as exc:
        raise OverrideFileError(f"cannot read override file {p}: {exc}") from None
    if "\x00" in text:
        raise OverrideFileError(f"{p} is a binary file, not a maps_fit_parameters_override.txt")
    lines = text.splitlines()
    ov = OverrideFile(path=p, lines=lines, entries=[])
    for lineno, line in enumerate(lines, start=1):
        if not line or line[0].isspace() or ":" not in line:
            continue
        key, _, value = line.partition(":")
        key = key.strip()
        ov.entries.append(Entry(lineno, key, value))
        if key == "ELEMENTS_TO_FIT":
            ov.elements = _names(value, p, lineno, key)
        elif key == "ELEMENTS_WITH_PILEUP":
            ov.pileups = _names(value, p, lineno, key)
        elif key in _BRANCHING_KEYS:
            slot, count = _BRANCHING_KEYS[key]
            ov.branching.setdefault(slot, []).append(_split_named(value, p, lineno, key, count))
        elif key == "WIDTH_MULTIPLIER":
            name, (factor,) = _split_named(value, p, lineno, key, 1)
            ov.width_multipliers[name] = factor
        elif key in _NUMERIC_KEYS:
            if value.strip():
                ov.settings[key] = _one_number(value, p, lineno, key)
        else:
            base, bound = key, None
            for suffix in ("_MIN", "_MAX"):
                if key.endswith(suffix) and name_from_file_key(key[: -len(suffix)]) in _PARAM_KEYS:
                    base, bound = key[: -len(suffix)], suffix
            name = name_from_file_key(base)
            if name not in _PARAM_KEYS or not value.strip():
                continue
            v = _one_number(value, p, lineno, key)
            target = ov.upper if bound == "_MAX" else ov.lower if bound == "_MIN" else ov.parameters
            target[name] = v
    return ov

