"""Reader for XRF-Maps' ``maps_fit_parameters_override.txt``.

The file is line-oriented: a line that starts with whitespace, or has no ``:``, is a comment;
every other line is ``KEY: value``. :func:`read_override` keeps every line (so a writer can
reproduce the file) and interprets the keys the model needs:

* ``ELEMENTS_TO_FIT``, ``ELEMENTS_WITH_PILEUP`` (comma-separated component names);
* parameters under their file keys (``CAL_OFFSET_[E_OFFSET]``, ``COMPTON_STEP``, ...), with
  ``<KEY>_MIN`` / ``<KEY>_MAX`` bounds;
* ``BRANCHING_RATIO_ADJUSTMENT_K/L/M`` and ``BRANCHING_FAMILY_ADJUSTMENT_L`` (repeatable);
* ``WIDTH_MULTIPLIER: El, factor``, ``DETECTOR_MATERIAL`` (0 Ge, 1 Si), ``FIT_SNIP_WIDTH``,
  ``SI_ESCAPE_ENABLE``/``GE_ESCAPE_ENABLE``, ``LINEAR_ESCAPE_FACTOR``, detector thicknesses,
  amplifier settings (``US_AMP_SENS_NUM``...);
* scaler mappings (``US_IC: 2xfm:scaler3_cts1.B``, ``ELT1: ...``, ``TIME_NORMALIZED_SCALER:
  NAME;PV``, ``SUMMED_SCALER: NAME:A,B``) into :attr:`OverrideFile.scaler_pvs` and friends;
* ``VERSION``, ``DATE``, ``IDENTIFYING_NAME_...`` and any other key as text.

:meth:`OverrideFile.with_values` changes values *in place* (the line keeps its key, position
and separator; new keys are added after the parameter block) and :meth:`OverrideFile.write`
writes the file atomically: every line the change does not touch is written back unchanged, in
order. XRF-Maps reads ``maps_fit_parameters_override.txt<N>`` for detector element N and falls
back to the file without suffix; :func:`find_override` does the same.

A malformed number raises :class:`~mapstorch.errors.OverrideFileError` naming the file and line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mapstorch.errors import ElementError, OverrideFileError
from mapstorch.io.atomic import atomic_write_text as _atomic_write_text
from mapstorch.io.files import read_bytes
from mapstorch.parameters.table import SHAPE_PARAMETER_NAMES, file_key, name_from_file_key
from mapstorch.physics.elements import parse_component

if TYPE_CHECKING:  # PyTorch is imported only when a ParameterSet or line table is asked for
    from mapstorch.parameters.set import ParameterSet
    from mapstorch.physics.library.base import LineSource
    from mapstorch.physics.lines import LineTable

__all__ = ["Entry", "OverrideFile", "read_override", "find_override", "atomic_write_text", "new_override"]

_BRANCHING_KEYS = {
    "BRANCHING_RATIO_ADJUSTMENT_K": ("ratio_k", 4),
    "BRANCHING_RATIO_ADJUSTMENT_L": ("ratio_l", 12),
    "BRANCHING_RATIO_ADJUSTMENT_M": ("ratio_m", 4),
    "BRANCHING_FAMILY_ADJUSTMENT_L": ("family_l", 3),
}
_NUMERIC_KEYS = {
    "VERSION", "DETECTOR_ELEMENTS", "FIT_SNIP_WIDTH", "DETECTOR_MATERIAL", "BE_WINDOW_THICKNESS",
    "DET_CHIP_THICKNESS", "GE_DEAD_LAYER", "LINEAR_ESCAPE_FACTOR", "SI_ESCAPE_ENABLE", "GE_ESCAPE_ENABLE",
    "AIRPATH", "TIME_SCALER_CLOCK", "US_AMP_SENS_NUM", "US_AMP_SENS_UNIT", "DS_AMP_SENS_NUM", "DS_AMP_SENS_UNIT",
}  # fmt: skip
#: Keys whose value is a process variable (PV) name: the scaler that plays a role.
_SCALER_KEY_PREFIXES = ("ELT", "ERT", "ICR", "OCR", "CFG_")
_SCALER_KEYS = {
    "SRCURRENT", "US_IC", "DS_IC", "US_FM", "DPC1_IC", "DPC2_IC", "TIME_SCALER_PV", "US_AMP_SENS_NUM_PV",
    "US_AMP_SENS_UNIT_PV", "DS_AMP_SENS_NUM_PV", "DS_AMP_SENS_UNIT_PV", "THETA_PV",
}  # fmt: skip
_TEXT_KEYS = {"DATE", "IDENTIFYING_NAME_[WHATEVERE_YOU_LIKE]"}


def _is_scaler_key(key: str) -> bool:
    return key in _SCALER_KEYS or (key.startswith(_SCALER_KEY_PREFIXES) and key[-1:].isdigit())


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
    scaler_pvs: dict[str, str] = field(default_factory=dict)
    time_normalized_scalers: list[tuple[str, str]] = field(default_factory=list)
    summed_scalers: list[tuple[str, list[str]]] = field(default_factory=list)
    time_normalized_summed_scalers: list[tuple[str, list[str]]] = field(default_factory=list)
    text: dict[str, str] = field(default_factory=dict)
    eol: str = "\n"
    final_eol: bool = True

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
        from mapstorch.physics.lines import branching_factors

        b = self.branching
        return branching_factors(
            ratio_k=b.get("ratio_k", ()), ratio_l=b.get("ratio_l", ()),
            ratio_m=b.get("ratio_m", ()), family_l=b.get("family_l", ()),
        )

    def line_table(self, source: LineSource | None = None, mu_convention: str = "maps") -> LineTable:
        """The :class:`LineTable` of this file's components, adjustments and detector."""
        from mapstorch.physics.lines import build_line_table

        return build_line_table(
            self.components,
            source=source,
            detector=self.detector,
            branching=self.branching_factors(),
            width_multipliers=self.width_multipliers,
            mu_convention=mu_convention,  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------------ writing
    def to_text(self) -> str:
        """The file's text: every line, in order (unchanged lines byte for byte)."""
        return self.eol.join(self.lines) + (self.eol if self.final_eol else "")

    def write(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the file atomically (temporary file + rename); returns the path written."""
        target = Path(path if path is not None else self.path)
        atomic_write_text(target, self.to_text())
        return target

    def with_values(
        self,
        parameters: Mapping[str, float] | ParameterSet | None = None,
        bounds: bool = False,
        elements: Sequence[str] | None = None,
        pileups: Sequence[str] | None = None,
    ) -> "OverrideFile":
        """A copy with new values, each changed on its own line; other lines stay as they are.

        parameters : ``{MAPS name or file key: value}`` or a (unbatched) ParameterSet, whose
            shape parameters are written (amplitudes are not part of the file format);
        bounds : also write ``_MIN``/``_MAX`` lines (from the ParameterSet) where the file has
            them, or add them for parameters that are free in the ParameterSet;
        elements, pileups : new ELEMENTS_TO_FIT / ELEMENTS_WITH_PILEUP lists.
        A key the file lacks is added after the last parameter line.
        """
        lines = list(self.lines)
        values: dict[str, float] = {}
        limits: dict[str, tuple[float, float]] = {}
        free: set[str] = set()
        from mapstorch.parameters.set import ParameterSet

        if isinstance(parameters, ParameterSet):
            if parameters.values.dim() != 1:
                raise OverrideFileError("with_values() needs an unbatched ParameterSet (one spectrum)")
            for i, name in enumerate(parameters.names[: len(SHAPE_PARAMETER_NAMES)]):
                if name in _NOT_IN_FILES:
                    continue
                values[name] = float(parameters.values[i])
                limits[name] = (float(parameters.lower[i]), float(parameters.upper[i]))
                if bool(parameters.free[i]):
                    free.add(name)
        elif parameters:
            for key, v in parameters.items():
                name = name_from_file_key(key)
                if name not in _PARAM_KEYS:
                    raise OverrideFileError(f"{key!r} is not a parameter of the override file")
                values[name] = float(v)
        for name, v in values.items():
            key = file_key(name)
            if self.parameters.get(name) != v or _find(lines, key) is None:  # unchanged lines keep their text
                _set_line(lines, key, _fmt_number(v))
            if bounds and name in limits and (name in free or _find(lines, key + "_MIN") is not None):
                lo, hi = limits[name]
                if self.upper.get(name) != hi:
                    _set_line(lines, key + "_MAX", _fmt_number(hi), after=key)
                if self.lower.get(name) != lo:
                    _set_line(lines, key + "_MIN", _fmt_number(lo), after=key)
        if elements is not None:
            _set_line(lines, "ELEMENTS_TO_FIT", ", ".join(parse_component(e).name for e in elements))
        if pileups is not None:
            _set_line(lines, "ELEMENTS_WITH_PILEUP", ", ".join(parse_component(e).name for e in pileups))
        out = _parse_lines(self.path, lines)
        out.eol, out.final_eol = self.eol, self.final_eol
        return out

    def parameter_set(self, preset: str | int = "2", **kw) -> ParameterSet:
        """Defaults updated with this file's values and bounds; one amplitude per component."""
        from mapstorch.parameters.set import ParameterSet

        ps = ParameterSet.default(self.components, preset=preset, **kw)
        values: dict[str, float] = dict(self.parameters)
        values.update({f"{k}_MIN": v for k, v in self.lower.items()})
        values.update({f"{k}_MAX": v for k, v in self.upper.items()})
        return ps.with_maps_values(values)


def new_override(params: ParameterSet, detector: str = "Si", name: str = "mapstorch",
                 date: str | None = None) -> OverrideFile:
    """A fresh override file for ``params`` (values; bounds of the free parameters; the
    components as ELEMENTS_TO_FIT / ELEMENTS_WITH_PILEUP), for when no input file exists.
    ``path`` is ``"<new>"`` until written."""
    import datetime

    comps = [parse_component(c) for c in params.components]
    stamp = date or datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
    lines = [
        "   This file will override default fit settings for the maps program (written by mapstorch).",
        "   note, the filename MUST be maps_fit_parameters_override.txt",
        "VERSION: 5.0",
        f"DATE: {stamp}",
        "DETECTOR_ELEMENTS: 1",
        f"IDENTIFYING_NAME_[WHATEVERE_YOU_LIKE]: {name}",
        "   list the elements that you want to be fit. For K lines, just use the element",
        "   name, for L lines add _L, e.g., Au_L, for M lines add _M",
        "ELEMENTS_TO_FIT: " + ", ".join(c.name for c in comps if c.partner is None),
        "   list the element combinations you want to fit for pileup, e.g., Si_Si, Si_Cl",
        "ELEMENTS_WITH_PILEUP: " + ", ".join(c.name for c in comps if c.partner is not None),
        "   detector material: 0 = Germanium, 1 = Silicon",
        f"DETECTOR_MATERIAL: {1 if detector == 'Si' else 0}",
        "   fit parameters (file keys as XRF-Maps reads them)",
    ]
    return _parse_lines("<new>", lines).with_values(params, bounds=True)


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
    text = read_bytes(p, "override file (maps_fit_parameters_override.txt)", error=OverrideFileError).decode(
        "utf-8", errors="replace")  # bytes, not text mode: line endings are kept as they are
    if "\x00" in text:
        raise OverrideFileError(f"{p} is a binary file, not a maps_fit_parameters_override.txt")
    ov = _parse_lines(p, text.splitlines())
    ov.eol = "\r\n" if "\r\n" in text else "\n"
    ov.final_eol = text.endswith(("\n", "\r"))
    return ov


def _parse_lines(p: str, lines: list[str]) -> OverrideFile:
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
        elif key == "TIME_NORMALIZED_SCALER":
            name, sep, pv = value.partition(";")
            if not sep or not name.strip() or not pv.strip():
                raise OverrideFileError(f"{p}, line {lineno}: TIME_NORMALIZED_SCALER needs 'NAME;PV', got {value.strip()!r}")
            ov.time_normalized_scalers.append((name.strip(), pv.strip()))
        elif key in ("SUMMED_SCALER", "TIME_NORMALIZED_SUMMED_SCALER"):
            name, sep, parts = value.partition(":")
            names = [x.strip() for x in parts.split(",") if x.strip()]
            if not sep or not name.strip() or not names:
                raise OverrideFileError(f"{p}, line {lineno}: {key} needs 'NAME:A,B,...', got {value.strip()!r}")
            target = ov.summed_scalers if key == "SUMMED_SCALER" else ov.time_normalized_summed_scalers
            target.append((name.strip(), names))
        elif _is_scaler_key(key):
            ov.scaler_pvs[key] = value.strip()
        elif key in _TEXT_KEYS:
            ov.text[key] = value.strip()
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


# ---------------------------------------------------------------------- writing helpers
_NOT_IN_FILES = {"COHERENT_SCT_AMPLITUDE", "COMPTON_AMPLITUDE"}  # fitted per spectrum, not configuration


def _fmt_number(v: float) -> str:
    """Numbers as XRF-Maps reads them: plain decimal or exponent, 10 significant digits."""
    if v == 0.0:
        return "0.0"
    text = f"{v:.10g}"
    return text if any(c in text for c in ".en") else text + ".0"


def _find(lines: list[str], key: str) -> int | None:
    """Index of the first ``KEY:`` line (comments excluded)."""
    for i, line in enumerate(lines):
        if line and not line[0].isspace() and line.partition(":")[0].strip() == key:
            return i
    return None


def _set_line(lines: list[str], key: str, value: str, after: str | None = None) -> None:
    """Replace the value of ``KEY:`` in place (keeping the key and separator), or insert it."""
    i = _find(lines, key)
    if i is not None:
        head, _, rest = lines[i].partition(":")
        spaces = rest[: len(rest) - len(rest.lstrip(" \t"))] if rest.strip() else " "
        lines[i] = f"{head}:{spaces}{value}"
        return
    anchor = _find(lines, after) if after else None
    if anchor is None:  # after the last parameter line, else at the end
        keys = [j for j, line in enumerate(lines) if line and not line[0].isspace()
                and name_from_file_key(line.partition(":")[0].strip().removesuffix("_MIN").removesuffix("_MAX")) in _PARAM_KEYS]
        anchor = keys[-1] if keys else len(lines) - 1
    lines.insert(anchor + 1, f"{key}: {value}")


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write an override file's text to ``path`` through a temporary file and a rename."""
    _atomic_write_text(path, text, what="override file", error=OverrideFileError)


def find_override(folder: str | os.PathLike[str], detector: int | None = None,
                  name: str = "maps_fit_parameters_override.txt") -> Path:
    """The override file XRF-Maps would use for ``detector`` in ``folder``.

    ``<name><detector>`` if it exists (per-element files ``...override.txt0``..``3``), else
    ``<name>``; raises OverrideFileError when neither exists.
    """
    base = Path(folder)
    if detector is not None:
        per = base / f"{name}{int(detector)}"
        if per.is_file():
            return per
    if (base / name).is_file():
        return base / name
    tried = f"{name}{detector} or {name}" if detector is not None else name
    raise OverrideFileError(f"no override file in {base} (looked for {tried})")
