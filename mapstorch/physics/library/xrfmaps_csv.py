"""Line library read from XRF-Maps' own reference tables, for exact agreement with XRF-Maps.

``xrf_library.csv`` holds per element (by column position, as XRF-Maps reads it): line
energies (Ka1, Ka2, Kb1,3, Kb2, La1 ... Ln, Ma1, Ma2, Mb, Mg), shell yields, absolute line yields
(yield x branching, same order as the energies), density, atomic mass, binding energies
(K, L1-L3, M1-M5, N1-N7, O1-O5, P1-P3) and jump factors. Ratios are absolute yields relative to
Ka1 / La1; M lines are 1 unless the csv gives a yield. ``henke.xdr`` supplies f2 for the detector
absorption ``mu_fraction`` (:mod:`mapstorch.physics.library.henke`).
"""

from __future__ import annotations

import csv
import functools
import math
import os

import numpy as np

from mapstorch.errors import ElementError, LibraryError
from mapstorch.physics.elements import symbol
from mapstorch.physics.library.base import DETECTOR_Z, LINE_NAMES, FamilyLines, MuConvention
from mapstorch.physics.library.henke import read_henke_xdr

__all__ = ["XrfMapsCsvSource", "read_xrf_library_csv"]

# Column layout after Z and Symbol (offsets into the row).
_N_LINES = 20  # Ka1..Kb2 (4), La1..Ln (12), Ma1..Mg (4)
_COL_ENERGY = 2
_COL_YIELD = _COL_ENERGY + _N_LINES  # w_K, w_L1, w_L2, w_L3, w_M
_COL_ABS_YIELD = _COL_YIELD + 5
_COL_DENSITY = _COL_ABS_YIELD + _N_LINES
_COL_MASS = _COL_DENSITY + 1
_COL_BINDING = _COL_MASS + 1
_BINDING_NAMES = (
    "K", "L1", "L2", "L3", "M1", "M2", "M3", "M4", "M5", "N1", "N2", "N3", "N4", "N5", "N6", "N7",
    "O1", "O2", "O3", "O4", "O5", "P1", "P2", "P3",
)  # fmt: skip
_MIN_COLUMNS = _COL_BINDING + len(_BINDING_NAMES)
_SHELL_OFFSET = {"K": 0, "L": 4, "M": 16}

# XRF-Maps' detector densities (g/cm^3); the MAPS mu_fraction formula divides by them.
_MAPS_DETECTOR_DENSITY = {"Si": 2.33, "Ge": 5.323}
_AVOGADRO = 6.02204531e23
_HC_ANGSTROM_EV = 12398.52
_R_ELECTRON_CM = 2.817938070e-13


def _number(text: str) -> float:
    try:
        v = float(text) if text.strip() else 0.0
    except ValueError:
        return 0.0
    return v if math.isfinite(v) else 0.0


@functools.lru_cache(maxsize=4)
def read_xrf_library_csv(path: str | os.PathLike[str]) -> dict[int, dict]:
    """Parse ``xrf_library.csv`` into ``{Z: {"symbol", "energy", "abs_yield", "mass", "binding",
    "shell_yield", "density", "jump"}}``.

    Raises :class:`LibraryError` naming the file and line for a malformed row.
    """
    p = os.fspath(path)
    try:
        fh = open(p, newline="", encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise LibraryError(f"line library not found: {p}; pass the path of XRF-Maps' reference/xrf_library.csv") from None
    except OSError as exc:
        raise LibraryError(f"cannot read line library {p}: {exc}") from None
    table: dict[int, dict] = {}
    with fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            if not row or not row[0].strip()[:1].isdigit():
                continue  # header and blank rows, as XRF-Maps skips them
            if len(row) < _MIN_COLUMNS:
                raise LibraryError(
                    f"{p}, line {lineno}: {len(row)} columns, expected at least {_MIN_COLUMNS}; "
                    "is this XRF-Maps' xrf_library.csv?"
                )
            try:
                z = int(row[0])
                nums = [float(v) if v.strip() else 0.0 for v in row[2:_MIN_COLUMNS]]
            except ValueError as exc:
                raise LibraryError(f"{p}, line {lineno}: not a number ({exc})") from None
            if not all(math.isfinite(v) for v in nums):
                raise LibraryError(f"{p}, line {lineno}: non-finite value")
            vals = np.array([0.0, 0.0, *nums])
            table[z] = {
                "symbol": row[1].strip(),
                "energy": vals[_COL_ENERGY:_COL_ENERGY + _N_LINES].copy(),
                "abs_yield": vals[_COL_ABS_YIELD:_COL_ABS_YIELD + _N_LINES].copy(),
                "mass": float(vals[_COL_MASS]),
                "binding": dict(zip(_BINDING_NAMES, vals[_COL_BINDING:_MIN_COLUMNS].tolist())),
                "shell_yield": dict(zip(("K", "L1", "L2", "L3", "M"), vals[_COL_YIELD:_COL_YIELD + 5].tolist())),
                "density": float(vals[_COL_DENSITY]),
                # jump factors (K, L1-L3, M1-M5, ...) follow the binding energies; missing ones are 0
                "jump": dict(zip(_BINDING_NAMES, [_number(v) for v in row[_MIN_COLUMNS:_MIN_COLUMNS + len(_BINDING_NAMES)]]
                                 + [0.0] * len(_BINDING_NAMES))),
            }
    if not table:
        raise LibraryError(f"{p}: no element rows found; is this XRF-Maps' xrf_library.csv?")
    return table


class XrfMapsCsvSource:
    """Line data from XRF-Maps' ``xrf_library.csv`` and ``henke.xdr`` (see module docstring)."""

    name = "xrf_library.csv"

    def __init__(self, csv_path: str | os.PathLike[str], henke_path: str | os.PathLike[str]) -> None:
        self.csv_path = os.fspath(csv_path)
        self.henke_path = os.fspath(henke_path)
        self._table = read_xrf_library_csv(self.csv_path)
        self._henke = read_henke_xdr(self.henke_path)

    def _row(self, z: int) -> dict:
        row = self._table.get(z)
        if row is None:
            raise ElementError(f"{symbol(z)} (Z={z}) is not in {self.csv_path}")
        return row

    def family(self, z: int, shell: str) -> FamilyLines:
        row = self._row(z)
        off = _SHELL_OFFSET[shell]
        n = len(LINE_NAMES[shell])
        energies = row["energy"][off:off + n].copy()
        yields = row["abs_yield"][off:off + n]
        label = symbol(z) if shell == "K" else f"{symbol(z)}_{shell}"
        if energies[0] <= 0.0:
            raise ElementError(f"{label}: {self.csv_path} has no {shell} lines for {symbol(z)}")
        ratios = np.ones(n)
        if shell == "M":
            # XRF-Maps: a listed M yield gives yield/yield(Ma1); otherwise the ratio stays 1.
            has = yields[1:] != 0
            if has.any() and yields[0] == 0:
                raise ElementError(f"{label}: {self.csv_path} gives M yields but none for Ma1")
            ratios[1:] = np.where(has, yields[1:] / np.where(yields[0] != 0, yields[0], 1.0), 1.0)
        else:
            if yields[0] <= 0.0:
                raise ElementError(f"{label}: {self.csv_path} gives zero yield for the reference line")
            ratios[1:] = yields[1:] / yields[0]
        return FamilyLines(symbol(z), shell, energies, ratios)

    def edge_kev(self, z: int, subshell: str) -> float:
        return float(self._row(z)["binding"][subshell])

    def atomic_mass(self, z: int) -> float:
        return float(self._row(z)["mass"])

    def mu_fraction(
        self, detector: str, energies_kev: np.ndarray, element_z: int, convention: MuConvention
    ) -> np.ndarray:
        """XRF-Maps' ``mu_fraction`` from Henke f2 of the detector (cm^2/g).

        ``mu = 2 r_e lambda N_A f2 / A`` with ``A`` the fitted element's csv mass (``"maps"``)
        or the detector's (``"physical"``); written out as XRF-Maps computes it.
        """
        z_det = DETECTOR_Z[detector]
        e_ev = np.asarray(energies_kev, dtype=np.float64) * 1000.0
        mass = self.atomic_mass(element_z if convention == "maps" else z_det)
        density = _MAPS_DETECTOR_DENSITY[detector]
        f2 = self._henke.f2_at(z_det, np.maximum(e_ev, 1e-9), float32_log=True)
        wavelength_a = _HC_ANGSTROM_EV / np.maximum(e_ev, 1e-9)
        molecules_per_cc = density * _AVOGADRO / mass if mass > 0 else 0.0
        beta = _R_ELECTRON_CM * (1e-16 * wavelength_a**2) * molecules_per_cc / (2.0 * math.pi) * f2
        mu = e_ev * 4.0 * math.pi * beta / (density * 1.239852) * 1e4
        return np.where((e_ev > 0) & np.isfinite(mu), mu, 0.0)
