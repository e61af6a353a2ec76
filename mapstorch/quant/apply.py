"""Quantifying a maps file: measure the standard, calibrate, divide the maps, write it all.

:func:`quantify_file` reads ``/MAPS/XRF_Analyzed/<routine>`` of a maps file (ours or
XRF-Maps'), fits the standard's integrated spectrum with the same method and parameters,
calibrates against every normaliser the standard records, and writes a copy of the maps file
with

* ``/MAPS/Quantification`` in XRF-Maps' layout: ``Number_Of_Standards``,
  ``Standard0/{Standard_Name, Element_Weights, Element_Weights_Names, Scalers/<N>,
  XRF_Analyzed/<routine>/{Channel_Names, Channel_Units, Counts_Per_Sec}}`` and
  ``Calibration/<routine>/{Calibration_Curve_<N> [3, 100], Calibration_Curve_Labels,
  <N>_Element_Info_Index, <N>_Element_Info_Names, <N>_Element_Info_Values}``; plus ours beside
  them: ``Calibration/<routine>/<N>_Scale``, ``<N>_Scale_Stderr``, ``<N>_Relative_Error``;
* the quantified maps (ug/cm2, XRF-Maps keeps none in its files) as
  ``/MAPS/XRF_Analyzed/<routine>/Quantified_<N>`` and ``Quantified_<N>_Stderr``, on the
  ``Channel_Names`` axis (NaN for channels that are not elements), with ``units = "ug/cm2"``.

The output is written to a temporary file and renamed when complete.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mapstorch.errors import InputError
from mapstorch.quant.calibrate import INFO_NAMES, Calibration, calibrate, quantify, shell_of
from mapstorch.quant.physics import MAX_Z, SHELLS

__all__ = ["QuantResult", "quantify_file", "ROUTINE_METHODS"]

#: Our map methods per XRF-Maps routine.
ROUTINE_METHODS = {"NNLS": "nnls", "Fitted": "nonlinear", "Poisson": "poisson"}


@dataclass
class QuantResult:
    """What :func:`quantify_file` computed: the calibration, the routine and normaliser used,
    the quantified maps ``{channel: (ug/cm2 [rows, cols], stderr)}`` and notes."""

    calibration: Calibration
    routine: str
    normaliser: str
    maps: dict[str, tuple[np.ndarray, np.ndarray]]
    written: Path | None = None
    notes: list[str] = field(default_factory=list)


def _is_element(name: str) -> bool:
    try:
        shell_of(name)
    except Exception:  # noqa: BLE001 -- extra channels (Num_Iter, COMPTON_AMPLITUDE, pile-ups)
        return False
    return True


def _labels() -> np.ndarray:
    from mapstorch.physics.elements import symbol

    names = [symbol(z) for z in range(1, MAX_Z + 1)]
    return np.array([[n if s == "K" else f"{n}_{s}"[:9] for n in names] for s in SHELLS], dtype="S50")


def _write(path: Path, result: QuantResult, channel_names: list[str], rows: int, cols: int) -> None:
    import h5py

    cal, routine = result.calibration, result.routine
    with h5py.File(path, "a") as f:
        maps = f.require_group("MAPS")
        if "Quantification" in maps:
            del maps["Quantification"]
        q = maps.create_group("Quantification")
        q.create_dataset("Number_Of_Standards", data=np.array([len(cal.measurements)], np.int32))
        for k, meas in enumerate(cal.measurements):
            std = meas.standard
            s0 = q.create_group(f"Standard{k}")
            s0.create_dataset("Standard_Name", data=np.array([Path(std.file).name], dtype="S256"))
            s0.create_dataset("Element_Weights", data=np.array(list(std.weights.values()), np.float64))
            s0.create_dataset("Element_Weights_Names", data=np.array(list(std.weights), dtype="S256"))
            sc = s0.create_group("Scalers")
            for n, v in meas.normalisers.items():
                sc.create_dataset(n, data=np.array([v], np.float64))
            g = s0.create_group("XRF_Analyzed").create_group(routine)
            names = list(meas.counts_per_sec)
            g.create_dataset("Channel_Names", data=np.array(names, dtype="S256"))
            g.create_dataset("Channel_Units", data=np.array(["cts/s"] * len(names), dtype="S256"))
            g.create_dataset("Counts_Per_Sec", data=np.array(list(meas.counts_per_sec.values()), np.float64))
        c = q.create_group("Calibration").create_group(routine)
        c.create_dataset("Calibration_Curve_Labels", data=_labels())
        for n, nc in cal.by_normaliser.items():
            c.create_dataset(f"Calibration_Curve_{n}", data=nc.curve)
            c.create_dataset(f"{n}_Element_Info_Index", data=np.array(nc.elements, dtype="S50"))
            c.create_dataset(f"{n}_Element_Info_Names", data=np.array(INFO_NAMES, dtype="S50"))
            c.create_dataset(f"{n}_Element_Info_Values", data=nc.info)
            c.create_dataset(f"{n}_Scale", data=np.array([nc.scale]))
            c.create_dataset(f"{n}_Scale_Stderr", data=np.array([nc.scale_stderr]))
            c.create_dataset(f"{n}_Relative_Error", data=np.array([nc.relative_error()]))
        c.attrs["line_data"] = cal.tables
        a = maps["XRF_Analyzed"][routine]
        value = np.full((len(channel_names), rows, cols), np.nan, np.float32)
        err = np.full_like(value, np.nan)
        for i, name in enumerate(channel_names):
            if name in result.maps:
                value[i], err[i] = result.maps[name]
        for key, arr in ((f"Quantified_{result.normaliser}", value), (f"Quantified_{result.normaliser}_Stderr", err)):
            if key in a:
                del a[key]
            d = a.create_dataset(key, data=arr, compression="gzip")
            d.attrs["units"] = "ug/cm2"


def quantify_file(maps_path, standards_path, out=None, *, standard_file=None, normaliser: str = "US_IC",
                  routine: str | None = None, override=None, detector: int | str = "sum", tables=None,
                  line_source=None, direct: bool = False, replace: bool = False) -> QuantResult:
    """Quantify the maps in ``maps_path`` with the standards of ``standards_path`` (several:
    each element's factor is averaged over the standards that hold it, as XRF-Maps)
    (module docstring); ``out`` (default: none written) gets a copy with the results (``out``
    may be the maps file itself only with ``replace``: it is then replaced when complete)."""
    from mapstorch.io import open_dataset, override_beside, read_override, read_xrfmaps_results
    from mapstorch.io.atomic import check_target, temporary_beside
    from mapstorch.quant.measure import NORMALISERS, measure_standard
    from mapstorch.quant.physics import Geometry
    from mapstorch.quant.standards import read_standards

    maps_path = Path(maps_path)
    standards = read_standards(standards_path)
    std = standards[0]
    notes = []
    if standard_file is not None:
        if len(standards) > 1:
            raise InputError(f"{standards_path} describes {len(standards)} standards: their files come from it, "
                             "not from --standard")
        std.file = str(standard_file)
    for st in standards:
        if not Path(st.file).is_file():
            raise InputError(f"the standard's data file {st.file} does not exist; give it with --standard")
    if normaliser not in NORMALISERS:
        low = {k.lower(): k for k in NORMALISERS}
        if normaliser.lower() not in low:
            raise InputError(f"--normalize {normaliser}: choose one of {', '.join(NORMALISERS)}")
        normaliser = low[normaliser.lower()]
    results = read_xrfmaps_results(maps_path)
    if routine is None:
        routine = next((r for r in ("NNLS", "Fitted", "Poisson") if r in results), None)
        if routine is None:
            raise InputError(f"{maps_path}: no NNLS, Fitted or Poisson maps to quantify (found {', '.join(results)})")
    if routine not in results:
        raise InputError(f"{maps_path}: no {routine} maps; it holds {', '.join(results)}")
    method = ROUTINE_METHODS.get(routine)
    if method is None:
        raise InputError(f"routine {routine}: quantifying it needs the same fit of the standard, which mapstorch "
                         f"does not do; use one of {', '.join(ROUTINE_METHODS)}")
    found = override or override_beside(maps_path) or override_beside(std.file)
    if found is None:
        raise InputError("no override file found beside the maps or the standard: give --override")
    ovr = read_override(found) if not hasattr(found, "parameters") else found
    geometry = Geometry.from_override(ovr)
    measurements = [measure_standard(st, ovr, method=method, detector=detector, line_source=line_source)
                    for st in standards]
    cal = calibrate(measurements, geometry, tables)
    if normaliser not in cal.by_normaliser:
        raise InputError(f"the standard {std.file} records no {normaliser}; it has {', '.join(cal.by_normaliser)}")
    res = results[routine]
    names = list(res["channel_names"])
    cps = np.asarray(res["counts_per_sec"], dtype=np.float64)
    extra = res.get("extra", {})
    cps_err = extra.get("Counts_Per_Sec_Stderr")
    with open_dataset(maps_path) as ds:
        try:
            norm_map = ds.scaler(NORMALISERS[normaliser][0] if NORMALISERS[normaliser][0] in ds.scaler_roles
                                 else normaliser)
        except InputError:
            raise InputError(f"{maps_path} records no {normaliser} scaler to normalise the maps by") from None
        rows, cols = ds.rows, ds.cols
    maps = {}
    for i, name in enumerate(names):
        if not _is_element(name):
            continue
        maps[name] = quantify(cps[i], norm_map, cal[normaliser], name,
                              None if cps_err is None else np.asarray(cps_err[i], dtype=np.float64), direct=direct)
    result = QuantResult(cal, routine, normaliser, maps, None, notes + cal.notes)
    if out is not None:
        target = check_target(out, "--out")
        if target.resolve() == maps_path.resolve() and not replace:
            raise InputError("--out must differ from the maps file (the maps file is not changed)")
        tmp = Path(temporary_beside(target))
        try:
            shutil.copyfile(maps_path, tmp)
            _write(tmp, result, names, rows, cols)
            tmp.replace(target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        result.written = target
    if not math.isfinite(cal[normaliser].scale):
        result.notes.append("the calibration's scale is not finite: check the standard's counts")
    return result
