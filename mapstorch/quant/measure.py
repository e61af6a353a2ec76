"""Measuring a standard: its integrated spectrum fitted as the sample's maps are, and its
normalisers (ion chambers, ring current) per pixel."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mapstorch.errors import InputError
from mapstorch.quant.standards import Standard

__all__ = ["StandardMeasurement", "measure_standard", "NORMALISERS"]

#: Normalisers XRF-Maps calibrates against, by its names, and the scaler roles they come from.
NORMALISERS = {"US_IC": ("US_IC",), "DS_IC": ("DS_IC",), "SR_Current": ("SR_current", "SR_Current")}


@dataclass
class StandardMeasurement:
    """A standard as measured: counts per second (amplitude / live time, as the maps) of each of
    its elements in the integrated spectrum, with standard errors, and the mean per pixel of
    each normaliser the file records."""

    standard: Standard
    method: str
    detector: str
    counts_per_sec: dict[str, float]
    counts_per_sec_stderr: dict[str, float]
    normalisers: dict[str, float]
    live_time: float
    pixels: int
    notes: list[str] = field(default_factory=list)


def _normalisers(ds) -> dict[str, float]:
    out = {}
    for name, roles in NORMALISERS.items():
        for role in roles:
            if role in ds.scaler_roles or role in ds.scalers:
                values = ds.scaler(role)
                mean = float(np.nanmean(values))
                if math.isfinite(mean) and mean > 0:
                    out[name] = mean
                break
    return out


def measure_standard(standard: Standard, params=None, *, method: str = "nnls", detector: int | str = "sum",
                     line_source=None, override=None) -> StandardMeasurement:
    """Open ``standard.file``, sum its spectra over the pixels (one detector or all), and fit
    that spectrum with ``fit_map``'s ``method`` and ``params`` (an override file or parameter
    set: the sample's, so both are fitted alike); the standard's elements are added to the fit
    when ``params`` lacks them. ``override`` names the scaler roles (default ``params`` when it
    is an override file)."""
    from mapstorch.io import Dataset, open_dataset
    from mapstorch.io.override import OverrideFile
    from mapstorch.maps import fit_map

    if override is None and isinstance(params, OverrideFile):
        override = params
    with open_dataset(standard.file, override=override) as ds:
        dets = list(range(ds.detectors)) if detector == "sum" else [int(detector)]
        if detector != "sum" and not 0 <= int(detector) < ds.detectors:
            raise InputError(f"detector {detector}: the standard {standard.file} has detectors 0-{ds.detectors - 1}")
        spectrum = ds.integrated(None)[dets].sum(0)
        if ds.live_time is not None:
            live = float(np.nansum(ds.live_time[..., dets]))
        else:
            live = float("nan")
        norms = _normalisers(ds)
        calibration = ds.calibration[dets[0]]
        pixels = ds.rows * ds.cols
    notes = []
    if not math.isfinite(live) or live <= 0:
        notes.append("the standard's file records no live time: its counts per second are counts per pixel")
        live = float(pixels)
    if not norms:
        raise InputError(f"{standard.file}: records none of the normalisers {', '.join(NORMALISERS)} (check the "
                         "override file's scaler names)")
    elements = None
    comps = list(getattr(params, "components", []) or [])
    missing = [e for e in standard.weights if e not in comps]
    if missing:
        elements = comps + missing
        notes.append(f"added the standard's {', '.join(missing)} to the fitted elements")
    one = Dataset(path=str(standard.file), format="integrated", rows=1, cols=1, detectors=1,
                  channels=len(spectrum), calibration=calibration,
                  spectra=spectrum[None, None, None, :].astype(np.float32), live_time=np.full((1, 1, 1), live))
    import torch

    r = fit_map(one, params, elements, method=method, dtype=torch.float64, line_source=line_source)
    cps, err = {}, {}
    for el in standard.weights:
        i = r.names.index(el)
        cps[el] = float(r.counts_per_sec[i, 0, 0])
        amp, amp_err = float(r.amplitudes[i, 0, 0]), float(r.amplitudes_stderr[i, 0, 0])
        err[el] = amp_err / live if math.isfinite(amp_err) and amp > 0 else float("nan")
    return StandardMeasurement(standard, method, str(detector), cps, err, norms, live, pixels, notes + r.notes)
