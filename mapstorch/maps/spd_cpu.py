"""Many small symmetric positive definite systems at once, compiled for the CPU (numba).

A map fit factorises one ``K x K`` matrix per pixel (the Fisher information for the standard
errors, the damped scoring matrix at each Levenberg-Marquardt step), ``K`` about 20. LAPACK's
batched routines pay a call per matrix; these kernels loop over the pixels of a range in compiled
code (Cholesky in float64, whatever the input's dtype), and :func:`mapstorch.parallel.run_chunks`
shares the ranges out to threads. A matrix that is not positive definite is reported in ``ok``
and its row of the output left for the caller to fill (e.g. by a pseudo-inverse).
"""

from __future__ import annotations

import numba
import numpy as np

from mapstorch.parallel import run_chunks

__all__ = ["inverse_diagonal", "solve"]

_CHUNK = 1024  # matrices per work item


@numba.njit(nogil=True, cache=True)
def _cholesky(a, p, low):  # pragma: no cover - compiled
    """Lower Cholesky factor of ``a[p]`` into ``low`` (float64); False if not positive definite."""
    k = a.shape[1]
    for j in range(k):
        s = np.float64(a[p, j, j])
        for t in range(j):
            s -= low[j, t] * low[j, t]
        if not s > 0.0:
            return False
        d = np.sqrt(s)
        low[j, j] = d
        for i in range(j + 1, k):
            v = np.float64(a[p, i, j])
            for t in range(j):
                v -= low[i, t] * low[j, t]
            low[i, j] = v / d
    return True


@numba.njit(nogil=True, cache=True)
def _inverse_diagonal(a, lo, hi, out, ok):  # pragma: no cover - compiled
    """``out[p] = diag(inv(a[p]))`` for ``p`` in ``lo..hi - 1``: ``sum_r (L^-1)[r, i]^2``."""
    k = a.shape[1]
    low = np.empty((k, k))
    inv = np.empty((k, k))
    for p in range(lo, hi):
        good = _cholesky(a, p, low)
        ok[p] = good
        if not good:
            continue
        for c in range(k):  # L^-1, column by column (forward substitution)
            inv[c, c] = 1.0 / low[c, c]
            for r in range(c + 1, k):
                v = 0.0
                for t in range(c, r):
                    v -= low[r, t] * inv[t, c]
                inv[r, c] = v / low[r, r]
        for i in range(k):
            v = 0.0
            for r in range(i, k):
                v += inv[r, i] * inv[r, i]
            out[p, i] = v


@numba.njit(nogil=True, cache=True)
def _solve(a, b, lo, hi, out, ok):  # pragma: no cover - compiled
    """``out[p] = inv(a[p]) b[p]`` for ``p`` in ``lo..hi - 1`` (forward and back substitution)."""
    k = a.shape[1]
    low = np.empty((k, k))
    z = np.empty(k)
    for p in range(lo, hi):
        good = _cholesky(a, p, low)
        ok[p] = good
        if not good:
            continue
        for i in range(k):
            v = np.float64(b[p, i])
            for t in range(i):
                v -= low[i, t] * z[t]
            z[i] = v / low[i, i]
        for i in range(k - 1, -1, -1):
            v = z[i]
            for t in range(i + 1, k):
                v -= low[t, i] * z[t]
            z[i] = v / low[i, i]
        for i in range(k):
            out[p, i] = z[i]


def _ranges(n: int, kernel, n_threads: int) -> None:
    def work(chunks):
        for i in chunks:
            kernel(i * _CHUNK, min(n, (i + 1) * _CHUNK))

    run_chunks(work, -(-n // _CHUNK), n_threads, name="mapstorch-spd")


def inverse_diagonal(a: np.ndarray, n_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(diag(inv(a[p])) [P, K], positive definite [P])`` for C-contiguous ``a [P, K, K]``
    (float32/float64; only the lower triangle is read). Rows that are not positive definite are
    left unset."""
    out = np.empty(a.shape[:2], dtype=a.dtype)
    ok = np.empty(a.shape[0], dtype=np.bool_)
    _ranges(a.shape[0], lambda lo, hi: _inverse_diagonal(a, lo, hi, out, ok), n_threads)
    return out, ok


def solve(a: np.ndarray, b: np.ndarray, n_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(inv(a[p]) b[p] [P, K], positive definite [P])`` for C-contiguous ``a [P, K, K]`` and
    ``b [P, K]`` (only the lower triangle of ``a`` is read). Rows that are not positive definite
    are left unset."""
    out = np.empty(b.shape, dtype=b.dtype)
    ok = np.empty(a.shape[0], dtype=np.bool_)
    _ranges(a.shape[0], lambda lo, hi: _solve(a, b, lo, hi, out, ok), n_threads)
    return out, ok
