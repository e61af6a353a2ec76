"""Line library built from xraylib, in the MAPS conventions.

MAPS weights a line by ``yield(shell) * rate(line) / sum(rates of the listed lines of its
subshell)`` with one common yield for L1, L2 and L3 and no jump ratios, and reports ratios
relative to Ka1 / La1 / Ma1. The common yield cancels in every ratio, so only radiative rates
enter here. Listed lines (MAPS ``xrf_library.csv`` columns):

* K:  Ka1 K-L3, Ka2 K-L2, Kb1 K-M2+K-M3 (at the K-M3 energy), Kb2 K-N2+K-N3 (at K-N3)
* L3: La1 L3-M5, La2 L3-M4, Lb2 L3-N5, Ll L3-M1
* L2: Lb1 L2-M4, Lg1 L2-N4, Ln L2-M1
* L1: Lb3 L1-M3, Lb4 L1-M2, Lg2 L1-N2, Lg3 L1-N3, Lg4 L1-O3
* M:  Ma1 M5-N7, Ma2 M5-N6, Mb M4-N6, Mg M3-N5, ratios 1:1:1:1 (MAPS default)

A family is available when its reference line (Ka1, La1, Ma1) lies inside 0.5-100 keV.
"""

from __future__ import annotations

import functools

import numpy as np

from mapstorch.errors import ElementError, LibraryError
from mapstorch.physics.elements import symbol
from mapstorch.physics.library.base import DETECTOR_Z, LINE_NAMES, FamilyLines, MuConvention

__all__ = ["XraylibSource", "FAMILY_ENERGY_RANGE_KEV"]

#: Reference-line energy range (keV) inside which a family is offered.
FAMILY_ENERGY_RANGE_KEV = (0.5, 100.0)

# (energy transition, [rate transitions]) per MAPS line, named by xraylib macro suffixes.
_TRANSITIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Ka1": ("KL3", ("KL3",)),
    "Ka2": ("KL2", ("KL2",)),
    "Kb1": ("KM3", ("KM2", "KM3")),
    "Kb2": ("KN3", ("KN2", "KN3")),
    "La1": ("L3M5", ("L3M5",)),
    "La2": ("L3M4", ("L3M4",)),
    "Lb1": ("L2M4", ("L2M4",)),
    "Lb2": ("L3N5", ("L3N5",)),
    "Lb3": ("L1M3", ("L1M3",)),
    "Lb4": ("L1M2", ("L1M2",)),
    "Lg1": ("L2N4", ("L2N4",)),
    "Lg2": ("L1N2", ("L1N2",)),
    "Lg3": ("L1N3", ("L1N3",)),
    "Lg4": ("L1O3", ("L1O3",)),
    "Ll": ("L3M1", ("L3M1",)),
    "Ln": ("L2M1", ("L2M1",)),
    "Ma1": ("M5N7", ("M5N7",)),
    "Ma2": ("M5N6", ("M5N6",)),
    "Mb": ("M4N6", ("M4N6",)),
    "Mg": ("M3N5", ("M3N5",)),
}
_L_SUBSHELL_LINES = {
    "L3": ("La1", "La2", "Lb2", "Ll"),
    "L2": ("Lb1", "Lg1", "Ln"),
    "L1": ("Lb3", "Lb4", "Lg2", "Lg3", "Lg4"),
}
_SHELL_MACRO = {
    "K": "K_SHELL", "L1": "L1_SHELL", "L2": "L2_SHELL", "L3": "L3_SHELL",
    "M1": "M1_SHELL", "M2": "M2_SHELL", "M3": "M3_SHELL", "M4": "M4_SHELL", "M5": "M5_SHELL",
}  # fmt: skip


def _xraylib():
    try:
        import xraylib
    except ImportError as exc:  # pragma: no cover - xraylib is a declared dependency
        raise LibraryError("xraylib is not installed; `pip install xraylib`") from exc
    return xraylib


class XraylibSource:
    """MAPS-convention line data from xraylib (see module docstring)."""

    name = "xraylib"

    def __init__(self) -> None:
        self._xl = _xraylib()

    def _line(self, z: int, transition: str) -> tuple[float, float]:
        """(energy keV, radiative rate) of one transition; 0 for what xraylib does not have."""
        macro = getattr(self._xl, f"{transition}_LINE")
        out = []
        for fn in (self._xl.LineEnergy, self._xl.RadRate):
            try:
                out.append(float(fn(z, macro)))
            except ValueError:
                out.append(0.0)
        return out[0], out[1]

    @functools.lru_cache(maxsize=512)
    def family(self, z: int, shell: str) -> FamilyLines:
        names = LINE_NAMES[shell]
        energies = np.zeros(len(names))
        rates = np.zeros(len(names))
        for i, line in enumerate(names):
            e_tr, rate_trs = _TRANSITIONS[line]
            energies[i] = self._line(z, e_tr)[0]
            if energies[i] <= 0.0 and line in ("Kb1", "Kb2"):  # K-M3 / K-N3 missing: try partner
                energies[i] = self._line(z, "KM2" if line == "Kb1" else "KN2")[0]
            rates[i] = sum(self._line(z, t)[1] for t in rate_trs) if energies[i] > 0 else 0.0
        lo, hi = FAMILY_ENERGY_RANGE_KEV
        ref = energies[0]
        label = symbol(z) if shell == "K" else f"{symbol(z)}_{shell}"
        if not (lo <= ref <= hi) or (shell != "M" and rates[0] <= 0.0):
            raise ElementError(
                f"{label}: xraylib has no {shell} lines for {symbol(z)} with the reference line "
                f"inside {lo}-{hi} keV (reference line energy {ref:.4g} keV)"
            )
        if shell == "K":
            ratios = rates / rates[0]
        elif shell == "L":
            weights = np.zeros(len(names))
            for sub_lines in _L_SUBSHELL_LINES.values():
                idx = [names.index(n) for n in sub_lines]
                total = rates[idx].sum()
                if total > 0:
                    weights[idx] = rates[idx] / total
            ratios = weights / weights[0]
        else:  # M: MAPS uses 1:1:1:1
            ratios = np.where(energies > 0, 1.0, 0.0)
        return FamilyLines(symbol(z), shell, energies, ratios)

    @functools.lru_cache(maxsize=1024)
    def edge_kev(self, z: int, subshell: str) -> float:
        try:
            return float(self._xl.EdgeEnergy(z, getattr(self._xl, _SHELL_MACRO[subshell])))
        except ValueError:
            return 0.0

    @functools.lru_cache(maxsize=256)
    def atomic_mass(self, z: int) -> float:
        return float(self._xl.AtomicWeight(z))

    def _photo(self, z: int, energy_kev: float) -> float:
        """Photo-absorption cross section (cm^2/g); 0 outside xraylib's energy range."""
        if energy_kev <= 0.0:
            return 0.0
        try:
            return float(self._xl.CS_Photo(z, energy_kev))
        except ValueError:
            return 0.0

    def mu_fraction(
        self, detector: str, energies_kev: np.ndarray, element_z: int, convention: MuConvention
    ) -> np.ndarray:
        z_det = DETECTOR_Z[detector]
        e = np.asarray(energies_kev, dtype=np.float64)
        mu = np.array([self._photo(z_det, float(v)) for v in e.ravel()]).reshape(e.shape)
        if convention == "maps":
            mu = mu * self.atomic_mass(z_det) / self.atomic_mass(element_z)
        return mu
