"""Many small symmetric positive definite systems at once, compiled for the CPU (numba).

A map fit factorises one ``K x K`` matrix per pixel (the Fisher information for the standard
errors, the damped scoring matrix at each Levenberg-Marquardt step), ``K`` about 20. LAPACK's
batched routines pay a call per matrix; these kernels loop over the pixels of a range in compiled
code (Cholesky in float64, whatever the input's dtype), and :func:`mapstorch.parallel.run_chunks`
shares the ranges out to threads. A matrix that is not positive definite (a pivot below 16
units in the last place of the input's dtype, relative to its diagonal entry) is reported in
``ok`` and its row of the output left for the caller to fill (e.g. by a pseudo-inverse).
"""

from __future__ import annotations

import numba
import numpy as np

from mapstorch.parallel import run_chunks

__all__ = ["inverse_diagonal", "solve", "packed_stderr"]

_CHUNK = 1024  # matrices per work item


@numba.njit(nogil=True, cache=True)
def _cholesky(a, p, m, low, rel):  # pragma: no cover - compiled
    """Lower Cholesky factor of the leading ``m x m`` block of ``a[p]`` into ``low`` (float64);
    False if not positive definite, counting a pivot below ``rel`` times its diagonal entry
    (rounding of the input) as zero."""
    for j in range(m):
        s = np.float64(a[p, j, j])
        floor = rel * abs(s)
        for t in range(j):
            s -= low[j, t] * low[j, t]
        if not s > floor:
            return False
        d = np.sqrt(s)
        low[j, j] = d
        for i in range(j + 1, m):
            v = np.float64(a[p, i, j])
            for t in range(j):
                v -= low[i, t] * low[j, t]
            low[i, j] = v / d
    return True


@numba.njit(nogil=True, cache=True)
def _inverse_diagonal_from(low, m, inv, diag):  # pragma: no cover - compiled
    """``diag[i] = diag(inv(L L^T))_i = sum_r (L^-1)[r, i]^2`` for the ``m x m`` factor ``low``
    (``inv``: scratch for ``L^-1``, built column by column by forward substitution)."""
    for c in range(m):
        inv[c, c] = 1.0 / low[c, c]
        for r in range(c + 1, m):
            v = 0.0
            for t in range(c, r):
                v -= low[r, t] * inv[t, c]
            inv[r, c] = v / low[r, r]
    for i in range(m):
        v = 0.0
        for r in range(i, m):
            v += inv[r, i] * inv[r, i]
        diag[i] = v


@numba.njit(nogil=True, cache=True)
def _inverse_diagonal(a, lo, hi, out, ok, rel):  # pragma: no cover - compiled
    """``out[p] = diag(inv(a[p]))`` for ``p`` in ``lo..hi - 1``."""
    k = a.shape[1]
    low = np.empty((k, k))
    inv = np.empty((k, k))
    diag = np.empty(k)
    for p in range(lo, hi):
        good = _cholesky(a, p, k, low, rel)
        ok[p] = good
        if good:
            _inverse_diagonal_from(low, k, inv, diag)
            for i in range(k):
                out[p, i] = diag[i]


@numba.njit(nogil=True, cache=True)
def _solve(a, b, lo, hi, out, ok, rel):  # pragma: no cover - compiled
    """``out[p] = inv(a[p]) b[p]`` for ``p`` in ``lo..hi - 1`` (forward and back substitution)."""
    k = a.shape[1]
    low = np.empty((k, k))
    z = np.empty(k)
    for p in range(lo, hi):
        good = _cholesky(a, p, k, low, rel)
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


@numba.njit(nogil=True, cache=True)
def _packed_stderr(upper, active, where, lo, hi, out, ok, rel):  # pragma: no cover - compiled
    """Standard errors from packed symmetric information matrices: for ``p`` in ``lo..hi - 1``,
    the matrix ``A[i, j] = upper[p, where[i, j]]`` restricted to the ``active[p]`` rows and
    columns, scaled to a unit diagonal; ``out[p, i] = sqrt(diag(inv(A))_i)`` where active, NaN
    elsewhere."""
    k = active.shape[1]
    idx = np.empty(k, dtype=np.int64)
    scale = np.empty(k)
    a = np.empty((1, k, k))
    low = np.empty((k, k))
    inv = np.empty((k, k))
    diag = np.empty(k)
    for p in range(lo, hi):
        m = 0
        for i in range(k):
            out[p, i] = np.nan
            if active[p, i]:
                idx[m] = i
                m += 1
        good = True
        for r in range(m):
            d = np.float64(upper[p, where[idx[r], idx[r]]])
            if not d > 0.0:
                good = False
                break
            scale[r] = 1.0 / np.sqrt(d)
        if good:
            for r in range(m):
                for c in range(r + 1):
                    v = np.float64(upper[p, where[idx[r], idx[c]]]) * scale[r] * scale[c]
                    a[0, r, c] = v
                    a[0, c, r] = v
            good = _cholesky(a, 0, m, low, rel)
        ok[p] = good
        if good:
            _inverse_diagonal_from(low, m, inv, diag)
            for i in range(m):
                out[p, idx[i]] = np.sqrt(max(diag[i], 0.0)) * scale[i]


def _rel(a: np.ndarray) -> float:
    """The smallest pivot, relative to its diagonal entry, that is not rounding of the input:
    16 units in the last place of the input's dtype (the arithmetic is float64)."""
    return 16.0 * float(np.finfo(a.dtype).eps)


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
    _ranges(a.shape[0], lambda lo, hi: _inverse_diagonal(a, lo, hi, out, ok, _rel(a)), n_threads)
    return out, ok


def solve(a: np.ndarray, b: np.ndarray, n_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(inv(a[p]) b[p] [P, K], positive definite [P])`` for C-contiguous ``a [P, K, K]`` and
    ``b [P, K]`` (only the lower triangle of ``a`` is read). Rows that are not positive definite
    are left unset."""
    out = np.empty(b.shape, dtype=b.dtype)
    ok = np.empty(a.shape[0], dtype=np.bool_)
    _ranges(a.shape[0], lambda lo, hi: _solve(a, b, lo, hi, out, ok, _rel(a)), n_threads)
    return out, ok


def packed_stderr(upper: np.ndarray, active: np.ndarray, n_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Standard errors ``[P, K]`` from the upper triangles ``upper [P, K (K + 1) / 2]`` of
    symmetric information matrices (row by row, as ``torch.triu_indices``), over the ``active
    [P, K]`` entries (NaN elsewhere), and whether each restricted matrix was positive definite
    ``[P]`` (rows where not are left NaN for the caller)."""
    k = active.shape[1]
    where = np.zeros((k, k), dtype=np.int64)
    pos = 0
    for i in range(k):
        for j in range(i, k):
            where[i, j] = where[j, i] = pos
            pos += 1
    if upper.shape != (active.shape[0], pos):
        raise ValueError(f"packed information {upper.shape} does not match {active.shape[0]} matrices of {k}")
    out = np.empty(active.shape, dtype=upper.dtype)
    ok = np.empty(active.shape[0], dtype=np.bool_)
    _ranges(active.shape[0], lambda lo, hi: _packed_stderr(upper, active, where, lo, hi, out, ok, _rel(upper)),
            n_threads)
    return out, ok
