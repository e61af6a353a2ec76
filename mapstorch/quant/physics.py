"""The physics of a thin-film calibration curve, per element and shell, as XRF-Maps builds it.

For an element ``Z`` and shell ``s`` (K, L, M) at incident energy ``E0`` (keV), the detected
counts per unit areal density and per unit normaliser are ``p * m(Z, s)`` with one fitted scale
``p`` and the model value

    m = absorption * T_Be * T_Ge * yield * (1 - T_det) * T_air

* ``absorption = 1 - exp(-tau(Z, E0 + 0.1 keV) * 1e-5 g/cm2 * sf)``: photo-absorption of a thin
  layer (XRF-Maps evaluates it 0.1 keV above E0 for an effective 10 ug/cm2; the fitted scale
  takes up the constant), ``sf = (J - 1) / J`` the fraction of absorptions in the shell, from its
  jump factor ``J`` (K: only when E0 is above the K edge; L: the L3 jump, divided by the L2 and L1
  jumps when E0 is above those edges; M: the M5 jump divided by the M1-M4 jumps);
* ``yield``: the K fluorescence yield, or the absolute yield of La1 / Ma1;
* ``T_Be``, ``T_Ge``: transmission of the Be window and of a Ge dead layer at the main line's
  energy (Ka1, La1, Ma1), ``exp(-tau * rho * t)``; ``1 - T_det`` the fraction the detector chip
  (Si or Ge) absorbs (1 when no thickness is given); ``T_air`` the air path's transmission.

Thicknesses come from the override file (``BE_WINDOW_THICKNESS``, ``GE_DEAD_LAYER``,
``DET_CHIP_THICKNESS``, ``AIRPATH``, in micrometres; ``DETECTOR_MATERIAL``).

Two sources of the atomic data: :class:`XraylibTables` (default) and :class:`XrfMapsTables`
(XRF-Maps' ``xrf_library.csv`` and ``henke.xdr``; with these the curve equals XRF-Maps' to
about 1e-4). XRF-Maps' air quirk (the f2 of N, O and Ar added unweighted) is kept with its own
tables; xraylib gives air its mass-weighted attenuation.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mapstorch.errors import InputError

__all__ = ["Geometry", "XraylibTables", "XrfMapsTables", "element_terms", "model_value", "curve_values",
           "SHELLS", "MAX_Z"]

SHELLS = ("K", "L", "M")
MAX_Z = 100
_DENSITY = {"Be": 1.848, "Ge": 5.323, "Si": 2.33, "air": 1.2047e-3}
_AIR = {"N": 0.7808, "O": 0.2095, "Ar": 0.0093}  # mole fractions


@dataclass(frozen=True)
class Geometry:
    """Detector and path: thicknesses in micrometres, the incident energy in keV."""

    incident_energy: float
    be_window: float = 0.0
    ge_dead_layer: float = 0.0
    chip: float = 0.0
    air: float = 0.0
    detector: str = "Si"

    @classmethod
    def from_override(cls, override, incident_energy: float | None = None) -> "Geometry":
        """From an override file's settings (missing thicknesses are 0) and its incident energy."""
        s = dict(getattr(override, "settings", {}) or {})
        e0 = incident_energy
        if e0 is None:
            e0 = float(getattr(override, "parameters", {}).get("COHERENT_SCT_ENERGY", math.nan))
        if not (e0 > 0 and math.isfinite(e0)):
            raise InputError("the calibration needs the incident energy: COHERENT_SCT_ENERGY in the override file")
        return cls(e0, float(s.get("BE_WINDOW_THICKNESS", 0.0)), float(s.get("GE_DEAD_LAYER", 0.0)),
                   float(s.get("DET_CHIP_THICKNESS", 0.0)), float(s.get("AIRPATH", 0.0)),
                   getattr(override, "detector", "Si"))


class XraylibTables:
    """Atomic data from xraylib: photo-absorption, jump factors, edges, yields, line energies."""

    name = "xraylib"

    def __init__(self) -> None:
        from mapstorch.physics.library.xraylib_source import _xraylib

        self.xl = _xraylib()
        xl = self.xl
        self._line = {"K": xl.KA1_LINE, "L": xl.LA1_LINE, "M": xl.MA1_LINE}
        self._shell = {n: getattr(xl, f"{n}_SHELL") for n in ("K", "L1", "L2", "L3", "M1", "M2", "M3", "M4", "M5")}

    def _call(self, fn, *args) -> float:
        try:
            v = float(fn(*args))
        except ValueError:
            return 0.0
        return v if math.isfinite(v) else 0.0

    def tau(self, z: int, energy_kev: float) -> float:
        return self._call(self.xl.CS_Photo, z, energy_kev) if energy_kev > 0 else 0.0

    def jump(self, z: int, sub: str) -> float:
        return self._call(self.xl.JumpFactor, z, self._shell[sub])

    def edge(self, z: int, sub: str) -> float:
        return self._call(self.xl.EdgeEnergy, z, self._shell[sub])

    def line_energy(self, z: int, shell: str) -> float:
        return self._call(self.xl.LineEnergy, z, self._line[shell])

    def line_yield(self, z: int, shell: str) -> float:
        if shell == "K":
            return self._call(self.xl.FluorYield, z, self.xl.K_SHELL)
        sub = "L3" if shell == "L" else "M5"
        return self._call(self.xl.FluorYield, z, self._shell[sub]) * self._call(self.xl.RadRate, z, self._line[shell])

    def compound_tau(self, name: str, energy_kev: float) -> float:
        """Mass attenuation by photo-absorption (cm2/g) of Be, Ge, Si or air."""
        if name == "air":
            mass = {el: frac * self.xl.AtomicWeight(self.xl.SymbolToAtomicNumber(el)) for el, frac in _AIR.items()}
            total = sum(mass.values())
            return sum(m / total * self.tau(self.xl.SymbolToAtomicNumber(el), energy_kev) for el, m in mass.items())
        return self.tau(self.xl.SymbolToAtomicNumber(name), energy_kev)


class XrfMapsTables:
    """Atomic data from XRF-Maps' ``xrf_library.csv`` (edges, jumps, yields, lines, density)
    and ``henke.xdr`` (f2, hence photo-absorption), computed as XRF-Maps does."""

    name = "xrf_library.csv"
    _R_E = 2.817938070e-13  # cm
    _N_A = 6.02204531e23
    _HC = 12398.52  # eV Angstrom

    def __init__(self, csv_path: str | os.PathLike[str], henke_path: str | os.PathLike[str]) -> None:
        from mapstorch.physics.library.henke import read_henke_xdr
        from mapstorch.physics.library.xrfmaps_csv import read_xrf_library_csv

        self.table = read_xrf_library_csv(os.fspath(csv_path))
        self.henke = read_henke_xdr(os.fspath(henke_path))
        from mapstorch.physics.library.xraylib_source import _xraylib

        self._xl = _xraylib()  # atomic weights only

    def _row(self, z: int) -> dict | None:
        return self.table.get(z)

    def tau(self, z: int, energy_kev: float) -> float:
        """``2 r_e lambda N_A f2 / A`` (cm2/g), f2 interpolated in float32 logs as XRF-Maps."""
        if z > self.henke.max_z or energy_kev <= 0:
            return 0.0
        e_ev = energy_kev * 1000.0
        f2 = float(self.henke.f2_at(z, np.array([e_ev]), float32_log=True)[0])
        lam_cm = self._HC / e_ev * 1e-8
        mass = float(self._xl.AtomicWeight(z))
        v = 2.0 * self._R_E * lam_cm * self._N_A * f2 / mass
        return v if math.isfinite(v) and v > 0 else 0.0

    def jump(self, z: int, sub: str) -> float:
        row = self._row(z)
        return float(row["jump"].get(sub, 0.0)) if row else 0.0

    def edge(self, z: int, sub: str) -> float:
        row = self._row(z)
        return float(row["binding"].get(sub, 0.0)) if row else 0.0

    def line_energy(self, z: int, shell: str) -> float:
        row = self._row(z)
        return float(row["energy"][{"K": 0, "L": 4, "M": 16}[shell]]) if row else 0.0

    def line_yield(self, z: int, shell: str) -> float:
        row = self._row(z)
        if not row:
            return 0.0
        if shell == "K":
            return float(row["shell_yield"]["K"])
        return float(row["abs_yield"][{"L": 4, "M": 16}[shell]])

    def density(self, z: int) -> float:
        row = self._row(z)
        return float(row["density"]) if row else 0.0

    def compound_tau(self, name: str, energy_kev: float) -> float:
        if name == "air":  # XRF-Maps: f2 of N, O, Ar added unweighted over the mixture's mass
            e_ev = energy_kev * 1000.0
            zs = {el: int(self._xl.SymbolToAtomicNumber(el)) for el in _AIR}
            f2 = sum(float(self.henke.f2_at(z, np.array([e_ev]), float32_log=True)[0]) for z in zs.values())
            mass = sum(frac * float(self._xl.AtomicWeight(zs[el])) for el, frac in _AIR.items())
            return 2.0 * self._R_E * (self._HC / e_ev * 1e-8) * self._N_A * f2 / mass
        return self.tau(int(self._xl.SymbolToAtomicNumber(name)), energy_kev)


def _shell_factor(tables, z: int, shell: str, e0: float) -> float:
    if shell == "K":
        j = tables.jump(z, "K") if e0 > tables.edge(z, "K") > 0 else 0.0
        total = 0.0
    elif shell == "L":
        j = tables.jump(z, "L3")
        total = 0.0
        if e0 > tables.edge(z, "L2") > 0:
            total = tables.jump(z, "L2")
            if e0 > tables.edge(z, "L1") > 0:
                total *= tables.jump(z, "L1")
    else:
        j = tables.jump(z, "M5")
        total = math.prod(tables.jump(z, s) for s in ("M1", "M2", "M3", "M4"))
    if j <= 1.0:
        return 0.0
    sf = (j - 1.0) / j
    return sf / total if total > 0 else sf


def element_terms(tables, z: int, shell: str, geometry: Geometry) -> dict[str, float]:
    """The terms of ``m(Z, shell)``: absorption, transmission_Be, transmission_Ge, yield,
    transmission_through_Si_detector (the chip's transmission T; the model uses 1 - T, and T
    is 0 without a chip thickness), transmission_through_air, Z (XRF-Maps' Element_Info names)."""
    if shell not in SHELLS:
        raise InputError(f"shell must be K, L or M, got {shell!r}")
    e0 = geometry.incident_energy
    sf = _shell_factor(tables, z, shell, e0)
    tau0 = tables.tau(z, e0 + 0.1)
    absorption = 1.0 - math.exp(-tau0 * 1e-5 * sf) if sf > 0 and tau0 > 0 else 0.0
    if hasattr(tables, "density") and tables.density(z) <= 0:
        absorption = 0.0  # XRF-Maps: the layer's thickness is 1 / density: no density, no value
    e_line = tables.line_energy(z, shell)

    def transmit(material: str, microns: float) -> float:
        if e_line <= 0:
            return 0.0
        if microns <= 0:
            return 1.0
        return math.exp(-tables.compound_tau(material, e_line) * _DENSITY[material] * microns * 1e-4)

    chip = 0.0
    if geometry.chip > 0 and e_line > 0 and geometry.detector in ("Si", "Ge"):
        chip = transmit(geometry.detector, geometry.chip)
    return {"absorption": absorption, "transmission_Be": transmit("Be", geometry.be_window),
            "transmission_Ge": transmit("Ge", geometry.ge_dead_layer), "yield": tables.line_yield(z, shell),
            "transmission_through_Si_detector": chip, "transmission_through_air": transmit("air", geometry.air),
            "Z": float(z)}


def model_value(terms: Mapping[str, float]) -> float:
    """``m = absorption * T_Be * T_Ge * yield * (1 - T_det) * T_air``."""
    v = (terms["absorption"] * terms["transmission_Be"] * terms["transmission_Ge"] * terms["yield"]
         * (1.0 - terms["transmission_through_Si_detector"]) * terms["transmission_through_air"])
    return v if math.isfinite(v) and v > 0 else 0.0


def curve_values(tables, geometry: Geometry) -> np.ndarray:
    """``m(Z, shell)`` for shells K, L, M (rows) and Z = 1..100 (columns): ``[3, 100]``."""
    out = np.zeros((3, MAX_Z))
    for s, shell in enumerate(SHELLS):
        for z in range(1, MAX_Z + 1):
            try:
                out[s, z - 1] = model_value(element_terms(tables, z, shell, geometry))
            except (ValueError, KeyError):  # no data for this element
                out[s, z - 1] = 0.0
    return out
