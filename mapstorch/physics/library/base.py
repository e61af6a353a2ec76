"""What a line-library source provides, in the MAPS conventions.

A source answers, per element and shell, the line energies and MAPS-convention relative ratios
(before any branching adjustment), absorption edges, the atomic mass, and the detector's
photo-absorption at given energies. Two sources exist: :mod:`xraylib_source` (default, any
element) and :mod:`xrfmaps_csv` (XRF-Maps' own ``xrf_library.csv`` + ``henke.xdr``, for exact
agreement with XRF-Maps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

__all__ = [
    "LINE_NAMES",
    "LINE_SUBSHELL",
    "DETECTOR_Z",
    "DETECTOR_MATERIALS",
    "FamilyLines",
    "LineSource",
    "MuConvention",
]

#: Line names per family, in XRF-Maps' order (the order of BRANCHING_RATIO_ADJUSTMENT_K/L/M).
LINE_NAMES: dict[str, tuple[str, ...]] = {
    "K": ("Ka1", "Ka2", "Kb1", "Kb2"),
    "L": ("La1", "La2", "Lb1", "Lb2", "Lb3", "Lb4", "Lg1", "Lg2", "Lg3", "Lg4", "Ll", "Ln"),
    "M": ("Ma1", "Ma2", "Mb", "Mg"),
}

#: Vacancy subshell of each line (Kb1 stands for K-M2,3 and Kb2 for K-N2,3).
LINE_SUBSHELL: dict[str, str] = {
    "Ka1": "K", "Ka2": "K", "Kb1": "K", "Kb2": "K",
    "La1": "L3", "La2": "L3", "Lb2": "L3", "Ll": "L3",
    "Lb1": "L2", "Lg1": "L2", "Ln": "L2",
    "Lb3": "L1", "Lb4": "L1", "Lg2": "L1", "Lg3": "L1", "Lg4": "L1",
    "Ma1": "M5", "Ma2": "M5", "Mb": "M4", "Mg": "M3",
}  # fmt: skip

DETECTOR_Z = {"Si": 14, "Ge": 32}
DETECTOR_MATERIALS = tuple(DETECTOR_Z)

#: ``"maps"``: XRF-Maps' mu_fraction, the detector's photo-absorption per gram computed with the
#: *fitted element's* atomic mass (a MAPS quirk, kept by default so that override-file values of
#: F_STEP/F_TAIL_LINEAR mean the same as in XRF-Maps). ``"physical"``: the detector's own mass.
MuConvention = Literal["maps", "physical"]


@dataclass(frozen=True)
class FamilyLines:
    """One element's K, L or M family from a source, before branching adjustments.

    energies_kev, ratios : (n_lines,) float64 in :data:`LINE_NAMES` order; a line the source does
        not have has energy 0 (and is dropped when the table is built).
    """

    element: str
    shell: str
    energies_kev: np.ndarray
    ratios: np.ndarray


class LineSource(Protocol):
    """Interface of a line-library source."""

    name: str

    def family(self, z: int, shell: str) -> FamilyLines:
        """Energies and MAPS ratios of element ``z``'s family; raises ElementError if absent."""

    def edge_kev(self, z: int, subshell: str) -> float:
        """Absorption edge (keV) of subshell ``K``, ``L1``-``L3`` or ``M1``-``M5``; 0 if unknown."""

    def atomic_mass(self, z: int) -> float:
        """Atomic mass (g/mol)."""

    def mu_fraction(
        self, detector: str, energies_kev: np.ndarray, element_z: int, convention: MuConvention
    ) -> np.ndarray:
        """Detector photo-absorption (cm^2/g) at ``energies_kev`` in the chosen convention."""
