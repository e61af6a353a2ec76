"""Calibration from a measured standard, and quantified maps (ug/cm2).

Per normaliser ``N`` (US_IC, DS_IC, SR_Current), each element of the standard gives a measured
factor ``e = cps / (weight * N_std)`` (counts per second per ug/cm2 per unit of the normaliser,
``N_std`` the standard's mean normaliser per pixel). The physics (:mod:`mapstorch.quant.physics`)
gives the relative value ``m(Z, shell)``; one scale ``p`` is fitted, as XRF-Maps does, by
minimising ``sum (1 - e / (p m))^2``, whose minimum is ``p = sum r^2 / sum r`` with ``r = e / m``.
The calibration curve ``p * m`` then covers every element and shell, and a map is quantified as

    ug/cm2 = Counts_Per_Sec / (p * m(Z, shell) * N(pixel))

Uncertainty of the curve: the standard's counting errors and certificate uncertainties move
``p`` (delta method), and the scatter of the standard's elements around the one-scale curve (the
relative root-mean-square misfit, with n - 1 degrees of freedom) is a systematic error of the
physics, added in quadrature for every element. ``direct=True`` uses each standard element's own
factor ``e`` for that element instead of the curve (other elements still use the curve).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mapstorch.errors import InputError
from mapstorch.quant.measure import StandardMeasurement
from mapstorch.quant.physics import MAX_Z, SHELLS, Geometry, curve_values, element_terms, model_value

__all__ = ["Calibration", "NormaliserCalibration", "calibrate", "quantify", "INFO_NAMES", "shell_of"]

#: Columns of XRF-Maps' ``<normaliser>_Element_Info_Values``.
INFO_NAMES = ("weight", "absorption", "transmission_Be", "transmission_Ge", "yield",
              "transmission_through_Si_detector", "transmission_through_air", "Z", "e_cal_ratio",
              "calib_curve_val")


def shell_of(name: str) -> tuple[int, str]:
    """``(Z, shell)`` of a map channel (``Fe`` -> K, ``Pb_L`` -> L, ``Au_M`` -> M)."""
    from mapstorch.physics.elements import parse_component

    comp = parse_component(name)
    if comp.is_pileup:
        raise InputError(f"{name}: a pile-up has no areal density")
    return comp.z, comp.shell


@dataclass
class NormaliserCalibration:
    """The calibration against one normaliser: the fitted scale, its standard error, the curve
    ``[3, 100]`` (shells K, L, M; Z = 1..100) and the standard's rows (XRF-Maps' Element_Info)."""

    normaliser: str
    standard_value: float
    scale: float
    scale_stderr: float
    misfit: float
    curve: np.ndarray
    elements: list[str]
    info: np.ndarray  # [n, len(INFO_NAMES)]
    measured_stderr: np.ndarray  # [n] standard error of e_cal_ratio

    def factor(self, name: str) -> float:
        z, shell = shell_of(name)
        return float(self.curve[SHELLS.index(shell), z - 1]) if 1 <= z <= MAX_Z else 0.0

    def relative_error(self) -> float:
        """Relative standard error of any curve value: the scale's and the physics misfit."""
        return math.hypot(self.scale_stderr / self.scale if self.scale > 0 else math.nan, self.misfit)

    def recovered(self) -> dict[str, tuple[float, float]]:
        """The standard's own elements quantified with the curve: ``{el: (ug/cm2, stderr)}``
        (what its certificate says, within the uncertainty, if the curve is right)."""
        out = {}
        for i, el in enumerate(self.elements):
            w, e, c = self.info[i, 0], self.info[i, 8], self.info[i, 9]
            value = w * e / c if c > 0 else math.nan
            rel = math.hypot(self.measured_stderr[i] / e if e > 0 else math.nan, self.relative_error())
            out[el] = (value, abs(value) * rel)
        return out


@dataclass
class Calibration:
    """Calibration of one or more standard measurements against every normaliser they record."""

    measurements: list[StandardMeasurement]
    geometry: Geometry
    tables: str
    by_normaliser: dict[str, NormaliserCalibration]
    notes: list[str] = field(default_factory=list)

    @property
    def measurement(self) -> StandardMeasurement:
        """The first standard's measurement."""
        return self.measurements[0]

    def __getitem__(self, normaliser: str) -> NormaliserCalibration:
        try:
            return self.by_normaliser[normaliser]
        except KeyError:
            raise InputError(f"no calibration against {normaliser!r}; the standard records "
                             f"{', '.join(self.by_normaliser) or 'no normaliser'}") from None


def calibrate(measurement, geometry: Geometry, tables=None) -> Calibration:
    """Fit the calibration curve to one measured standard, or to several (a list): as XRF-Maps,
    an element's factor is then the mean over the standards that hold it (module docstring)."""
    from mapstorch.quant.physics import XraylibTables

    measurements = list(measurement) if isinstance(measurement, (list, tuple)) else [measurement]
    if not measurements:
        raise InputError("no measured standard to calibrate with")
    tables = tables or XraylibTables()
    elements: list[str] = []
    for ms in measurements:
        elements += [el for el in ms.standard.weights if el in ms.counts_per_sec and el not in elements]
    terms = {el: element_terms(tables, shell_of(el)[0], shell_of(el)[1], geometry) for el in elements}
    m = np.array([model_value(terms[el]) for el in elements])
    counted = {el: any(ms.counts_per_sec.get(el, 0.0) > 0 for ms in measurements) for el in elements}
    usable = [i for i, el in enumerate(elements) if m[i] > 0 and counted[el]]
    notes = []
    for i, el in enumerate(elements):
        if i not in usable:
            notes.append(f"{el}: no counts in the standard or no physics value at {geometry.incident_energy:g} keV; "
                         "left out of the fit of the curve")
    if not usable:
        names = ", ".join(ms.standard.file for ms in measurements)
        raise InputError(f"{names}: none of the standard's elements ({', '.join(elements)}) was measured with "
                         "counts; check the standard's file and elements")
    shape = curve_values(tables, geometry)
    common = set.intersection(*(set(ms.normalisers) for ms in measurements))
    out = {}
    for norm in [n for n in measurements[0].normalisers if n in common]:
        e = np.zeros(len(elements))
        e_err = np.zeros(len(elements))
        w = np.zeros(len(elements))
        for i, el in enumerate(elements):
            values, errors = [], []
            for ms in measurements:
                if el not in ms.standard.weights or ms.counts_per_sec.get(el, 0.0) <= 0:
                    continue
                weight = ms.standard.weights[el]
                cps = ms.counts_per_sec[el]
                rel = math.hypot(ms.counts_per_sec_stderr.get(el, 0.0) / cps if math.isfinite(
                    ms.counts_per_sec_stderr.get(el, math.nan)) else 0.0, ms.standard.uncertainty.get(el, 0.0) / weight)
                values.append(cps / (weight * ms.normalisers[norm]))
                errors.append(values[-1] * rel)
                w[i] = w[i] or weight
            if values:
                e[i] = float(np.mean(values))
                e_err[i] = float(np.sqrt(np.sum(np.square(errors)))) / len(values)
        e_rel = np.where(e > 0, e_err / np.where(e > 0, e, 1.0), 0.0)
        r = e[usable] / m[usable]
        p = float((r * r).sum() / r.sum())
        # delta method: dp/dr_i = (2 r_i sum r - sum r^2) / (sum r)^2
        grad = (2 * r * r.sum() - (r * r).sum()) / r.sum() ** 2
        p_err = float(np.sqrt(((grad * r * e_rel[usable]) ** 2).sum()))
        n = len(usable)
        misfit = float(np.sqrt(((1 - r / p) ** 2).sum() / (n - 1))) if n > 1 else 0.0
        info = np.zeros((len(elements), len(INFO_NAMES)))
        for i, el in enumerate(elements):
            t = terms[el]
            info[i] = [w[i], t["absorption"], t["transmission_Be"], t["transmission_Ge"], t["yield"],
                       t["transmission_through_Si_detector"], t["transmission_through_air"], t["Z"], e[i], p * m[i]]
        s_std = float(np.mean([ms.normalisers[norm] for ms in measurements]))
        out[norm] = NormaliserCalibration(norm, s_std, p, p_err, misfit, p * shape, elements, info, e_err)
    if not out:
        raise InputError("the standards record no normaliser in common (US_IC, DS_IC, SR_Current)")
    if len(usable) < 2:
        notes.append("one standard element: the curve's scale rests on it alone and its physics misfit is unknown")
    return Calibration(measurements, geometry, getattr(tables, "name", "?"), out,
                       notes + [n for ms in measurements for n in ms.notes])


def quantify(counts_per_sec: np.ndarray, normaliser_map: np.ndarray, calibration: NormaliserCalibration, name: str,
             counts_per_sec_stderr: np.ndarray | None = None, direct: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(ug/cm2, stderr)`` maps of channel ``name`` from its counts-per-second map, the
    normaliser's map (per pixel, as the standard's) and the calibration. Pixels without a
    positive normaliser, and elements the curve does not cover, are NaN."""
    factor = calibration.factor(name)
    rel_curve = calibration.relative_error()
    if direct and name in calibration.elements:  # the standard's own measured factor
        i = calibration.elements.index(name)
        factor = float(calibration.info[i, 8])
        rel_curve = float(calibration.measured_stderr[i] / factor) if factor > 0 else math.nan
    cps = np.asarray(counts_per_sec, dtype=np.float64)
    norm = np.asarray(normaliser_map, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where((norm > 0) & (factor > 0), cps / (factor * norm), np.nan)
        rel = np.full(cps.shape, rel_curve)
        if counts_per_sec_stderr is not None:
            rel = np.hypot(rel, np.asarray(counts_per_sec_stderr, dtype=np.float64) / np.abs(cps))
    return value, np.abs(value) * rel
