"""Reference standards: which elements a measured standard holds, and how much (ug/cm2).

Two forms are read:

Elements are named as fit components: ``Fe`` is measured by its K lines, ``Pb_L`` / ``Au_M`` by
their L / M lines (as XRF-Maps names them).

* XRF-Maps' ``maps_standardinfo.txt``: lines ``FILENAME: <data file>``,
  ``ELEMENTS_IN_STANDARD: Ca, Fe, Cu`` and ``WEIGHT: 1.931, 0.504, 0.284`` (ug/cm2); lines that
  begin with whitespace are comments. Several standards may follow one another, each starting
  with its ``FILENAME`` line.
* our own JSON (or YAML, when PyYAML is installed)::

      {"name": "AXO RF8-200-S2453", "file": "axo_std.mda", "units": "ug/cm2",
       "elements": {"Ca": 1.931, "Fe": 0.504, "Cu": 0.284},
       "uncertainty": {"Ca": 0.05, "Fe": 0.02}}

  ``units`` is one of :data:`UNITS` (converted to ug/cm2); ``uncertainty`` (same units,
  optional, one standard deviation) propagates into the calibration.

No certified values are shipped: they belong to each standard's certificate (AXO and Micromatter
films differ from batch to batch); write them in one of these forms.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from mapstorch.errors import InputError

__all__ = ["Standard", "read_standards", "UNITS"]

#: Areal-density units and their factor to ug/cm2.
UNITS = {"ug/cm2": 1.0, "µg/cm2": 1.0, "ug/cm^2": 1.0, "µg/cm²": 1.0, "ng/mm2": 0.1, "ng/mm^2": 0.1,
         "mg/cm2": 1000.0, "g/cm2": 1.0e6, "ng/cm2": 1.0e-3}


@dataclass
class Standard:
    """One measured standard: its data ``file`` (resolved beside the description when relative),
    its elements' areal densities ``weights`` in ug/cm2 and their ``uncertainty`` (ug/cm2,
    missing = not given)."""

    name: str
    file: str
    weights: dict[str, float]
    uncertainty: dict[str, float] = field(default_factory=dict)
    source: str = ""


def _element(name: str, where: str) -> str:
    from mapstorch.physics.elements import parse_component

    try:
        comp = parse_component(name)
    except Exception as exc:  # noqa: BLE001 -- an ElementError with its own message
        raise InputError(f"{where}: {exc}") from None
    if comp.is_pileup:
        raise InputError(f"{where}: {name!r} is a pile-up, not an element of the standard")
    return comp.name  # "Fe" (K lines), or "Pb_L" / "Au_M": the family measured, as XRF-Maps names them


def _weights(names, values, where: str) -> dict[str, float]:
    if len(names) != len(values):
        raise InputError(f"{where}: {len(names)} element(s) but {len(values)} weight(s); give one weight per "
                         "element, in the same order")
    out: dict[str, float] = {}
    for n, v in zip(names, values):
        el = _element(n, where)
        try:
            w = float(v)
        except (TypeError, ValueError):
            raise InputError(f"{where}: the weight of {el} is {v!r}, not a number") from None
        if not (w > 0 and math.isfinite(w)):
            raise InputError(f"{where}: the weight of {el} must be a positive number of ug/cm2, got {v!r}")
        if el in out:
            raise InputError(f"{where}: {el} is listed twice")
        out[el] = w
    if not out:
        raise InputError(f"{where}: no elements given")
    return out


def _resolve(file: str, base: Path) -> str:
    """The data file of a standard: absolute, or beside the description, or in its ``mda/``
    sub-folder (XRF-Maps' dataset layout keeps the raw files there)."""
    p = Path(file)
    if p.is_absolute():
        return str(p)
    for candidate in (base / p, base / "mda" / p):
        if candidate.exists():
            return str(candidate)
    return str(base / p)


def _read_standardinfo(path: Path) -> list[Standard]:
    found: list[dict] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not raw.strip() or raw[:1].isspace() or ":" not in raw:
            continue
        key, value = (s.strip() for s in raw.split(":", 1))
        key = key.upper()
        if key == "FILENAME":
            found.append({"file": value, "line": number})
        elif key in ("ELEMENTS_IN_STANDARD", "WEIGHT"):
            if not found:
                raise InputError(f"{path}:{number}: {key} before any FILENAME line")
            found[-1][key] = [v.strip() for v in value.replace(";", ",").split(",") if v.strip()]
    if not found:
        raise InputError(f"{path}: no FILENAME line: is this an XRF-Maps maps_standardinfo.txt?")
    out = []
    for f in found:
        where = f"{path}:{f['line']}"
        for key in ("ELEMENTS_IN_STANDARD", "WEIGHT"):
            if key not in f:
                raise InputError(f"{where}: the standard {f['file']!r} has no {key} line")
        out.append(Standard(name=Path(f["file"]).name, file=_resolve(f["file"], path.parent),
                            weights=_weights(f["ELEMENTS_IN_STANDARD"], f["WEIGHT"], where), source=str(path)))
    return out


def _read_structured(path: Path) -> list[Standard]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InputError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or write the standard as "
                             "JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: not valid YAML: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
    items = data if isinstance(data, list) else [data]
    out = []
    for i, item in enumerate(items):
        where = f"{path} (standard {i + 1})"
        if not isinstance(item, dict):
            raise InputError(f"{where}: expected an object with 'file' and 'elements'")
        missing = [k for k in ("file", "elements") if k not in item]
        if missing:
            raise InputError(f"{where}: missing {', '.join(missing)}")
        units = str(item.get("units", "ug/cm2")).strip()
        if units not in UNITS:
            raise InputError(f"{where}: unknown units {units!r}; use one of {', '.join(UNITS)}")
        scale = UNITS[units]
        elements = item["elements"]
        if not isinstance(elements, dict):
            raise InputError(f"{where}: 'elements' must map element symbols to areal densities")
        weights = {k: v * scale for k, v in _weights(list(elements), list(elements.values()), where).items()}
        unc: dict[str, float] = {}
        for k, v in dict(item.get("uncertainty") or {}).items():
            el = _element(k, where)
            if el not in weights:
                raise InputError(f"{where}: an uncertainty for {el}, which the standard does not list")
            try:
                u = float(v) * scale
            except (TypeError, ValueError):
                raise InputError(f"{where}: the uncertainty of {el} is {v!r}, not a number") from None
            if not (u >= 0 and math.isfinite(u)):
                raise InputError(f"{where}: the uncertainty of {el} must be >= 0")
            unc[el] = u
        out.append(Standard(name=str(item.get("name") or Path(str(item["file"])).name),
                            file=_resolve(str(item["file"]), path.parent), weights=weights, uncertainty=unc,
                            source=str(path)))
    return out


def read_standards(path: str | os.PathLike[str]) -> list[Standard]:
    """The standards described in ``path`` (``maps_standardinfo.txt``, ``.json``, ``.yaml``)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such standard description (maps_standardinfo.txt, .json or .yaml)")
    if p.suffix.lower() in (".json", ".yaml", ".yml"):
        return _read_structured(p)
    return _read_standardinfo(p)
