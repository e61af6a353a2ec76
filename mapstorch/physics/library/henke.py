"""Reader for XRF-Maps' ``henke.xdr``: Henke atomic scattering factors f1, f2.

Layout (XDR, big-endian): ``int32 n_elements, int32 n_energies, float32 energies_eV[n_energies]``,
then for each element Z = 1..n_elements ``float32 f1[n_energies], float32 f2[n_energies]``, then
``int32 n_extra`` and per element ``int32 Z, float32 energies[n_extra], f1[n_extra], f2[n_extra]``
(edge fine structure; XRF-Maps' detector absorption does not use it, and neither do we).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from mapstorch.errors import LibraryError

__all__ = ["HenkeTable", "read_henke_xdr"]


@dataclass(frozen=True)
class HenkeTable:
    """Henke tables on a common energy grid.

    energies_ev : (N,) float64, increasing.
    f1, f2 : (Z_max, N) float64; row ``z - 1`` belongs to atomic number ``z``.
    """

    path: str
    energies_ev: np.ndarray
    f1: np.ndarray
    f2: np.ndarray

    @property
    def max_z(self) -> int:
        return int(self.f2.shape[0])

    def f2_at(self, z: int, energies_ev: np.ndarray, float32_log: bool = False) -> np.ndarray:
        """f2 of element ``z`` at ``energies_ev`` by log-log interpolation, as XRF-Maps does.

        ``float32_log=True`` takes the logarithm of the (float32) table values in float32, as
        XRF-Maps' ``std::log(float)`` does (1e-8 relative), for bit-level agreement with it.
        Energies outside the grid (10 eV - 30 keV) are extrapolated from the nearest interval;
        XRF-Maps leaves the interpolation bracket unset there (undefined behaviour), so no
        reference exists to match.
        """
        if not 1 <= z <= self.max_z:
            raise LibraryError(f"{self.path}: no Henke data for Z={z} (file covers 1-{self.max_z})")
        e = np.asarray(energies_ev, dtype=np.float64)
        grid = self.energies_ev
        hi = np.clip(np.searchsorted(grid, e, side="right"), 1, grid.size - 1)
        lo = hi - 1
        ln_e = np.log(np.maximum(e, 1e-30))
        frac = (ln_e - np.log(grid[lo])) / (np.log(grid[hi]) - np.log(grid[lo]))
        row = np.abs(self.f2[z - 1])
        with np.errstate(divide="ignore"):
            ln_row = np.log(row)
        if float32_log:  # a correctly rounded float32 log, like glibc's logf
            ln_row = ln_row.astype(np.float32).astype(np.float64)
        ln_lo, ln_hi = ln_row[lo], ln_row[hi]
        return np.exp(ln_lo + frac * (ln_hi - ln_lo))


def _need(buf: bytes, offset: int, nbytes: int, path: str, what: str) -> None:
    if offset + nbytes > len(buf):
        raise LibraryError(
            f"{path}: file ends at byte {len(buf)} while reading {what} (needs {offset + nbytes}); "
            "the file is truncated or not a henke.xdr table"
        )


@functools.lru_cache(maxsize=4)
def read_henke_xdr(path: str | os.PathLike[str]) -> HenkeTable:
    """Read ``henke.xdr`` (see module docstring). Raises :class:`LibraryError` on a bad file."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as fh:
            buf = fh.read()
    except FileNotFoundError:
        raise LibraryError(f"Henke table not found: {p}; pass the path of XRF-Maps' reference/henke.xdr") from None
    except OSError as exc:
        raise LibraryError(f"cannot read Henke table {p}: {exc}") from None
    _need(buf, 0, 8, p, "the header")
    n_el, n_e = (int(v) for v in np.frombuffer(buf, dtype=">i4", count=2))
    if not (1 <= n_el <= 120 and 2 <= n_e <= 100_000):
        raise LibraryError(f"{p}: implausible header (elements={n_el}, energies={n_e}); not a henke.xdr file")
    off = 8
    _need(buf, off, 4 * n_e, p, "the energy grid")
    energies = np.frombuffer(buf, dtype=">f4", count=n_e, offset=off).astype(np.float64)
    off += 4 * n_e
    _need(buf, off, 8 * n_e * n_el, p, "the f1/f2 tables")
    table = np.frombuffer(buf, dtype=">f4", count=2 * n_e * n_el, offset=off).astype(np.float64)
    table = table.reshape(n_el, 2, n_e)
    if not np.all(np.diff(energies) > 0):
        raise LibraryError(f"{p}: energy grid is not increasing; the file is corrupt")
    return HenkeTable(path=p, energies_ev=energies, f1=table[:, 0, :].copy(), f2=table[:, 1, :].copy())
