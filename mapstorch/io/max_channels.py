"""XRF-Maps' ``Max_Channels_Integrated_Spectra`` and ``Max_10_Channels_Integrated_Spectra``:
the sum over spectra of each spectrum's largest channel, and of its 10 largest, each left at
its channel. Channels are taken largest first, the lowest channel first among equal values (as
XRF-Maps' loop takes the maximum, adds it, zeroes it, k times).

:func:`max_channel_sums` computes both in one compiled pass over the spectra (numba, a chunk of
spectra per thread: each spectrum's k largest kept in a small sorted list while its channels
go by), or, where numba is not usable, with NumPy (a partition per piece of spectra, about
30 times slower). Both give the same sums (float64; exact for integer counts).
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from mapstorch.parallel import run_chunks

__all__ = ["max_channel_sums", "max_channel_sums_numpy"]

log = logging.getLogger(__name__)

_SPECTRA_PER_TASK = 2048


@functools.lru_cache(maxsize=1)
def _kernel():
    """The compiled kernel, or None where numba cannot be imported."""
    try:
        import numba
    except Exception as exc:  # noqa: BLE001 -- not installed or broken: NumPy does it
        log.debug("numba is not usable (%s): Max_Channels sums with NumPy", exc)
        return None

    @numba.njit(nogil=True, cache=True)
    def top_sums(x, k, lo, hi, out):  # pragma: no cover - compiled
        """Spectra ``lo .. hi - 1`` of ``x [N, C]``: ``out[0, c] +=`` the largest channel of each
        spectrum at its channel ``c``, ``out[1, c] +=`` its ``k`` largest (float64)."""
        vals = np.empty(k + 1, dtype=np.float64)
        idx = np.empty(k + 1, dtype=np.int64)
        n_c = x.shape[1]
        for s in range(lo, hi):
            row = x[s]
            n = 0
            for c in range(n_c):
                v = np.float64(row[c])
                if n == k and not v > vals[k - 1]:  # not above the k-th: an equal one came first
                    continue
                pos = n
                while pos > 0 and vals[pos - 1] < v:  # after every value >= v (lower channels first)
                    vals[pos] = vals[pos - 1]
                    idx[pos] = idx[pos - 1]
                    pos -= 1
                vals[pos] = v
                idx[pos] = c
                if n < k:
                    n += 1
            if n > 0:
                out[0, idx[0]] += vals[0]
            for i in range(n):
                out[1, idx[i]] += vals[i]

    @numba.njit(nogil=True, cache=True)
    def top_sums_cm(xc, k, lo, hi, out):  # pragma: no cover - compiled
        """:func:`top_sums` of channel-major spectra ``xc [C, N]`` (spectra ``lo .. hi - 1``), the
        spectra's lists side by side, channel after channel (reading each channel's row once)."""
        m = hi - lo
        vals = np.empty((m, k + 1), dtype=np.float64)
        idx = np.empty((m, k + 1), dtype=np.int64)
        count = np.zeros(m, dtype=np.int64)
        for c in range(xc.shape[0]):
            row = xc[c]
            for j in range(m):
                v = np.float64(row[lo + j])
                n = count[j]
                if n == k and not v > vals[j, k - 1]:
                    continue
                pos = n
                while pos > 0 and vals[j, pos - 1] < v:
                    vals[j, pos] = vals[j, pos - 1]
                    idx[j, pos] = idx[j, pos - 1]
                    pos -= 1
                vals[j, pos] = v
                idx[j, pos] = c
                if n < k:
                    count[j] = n + 1
        for j in range(m):
            if count[j] > 0:
                out[0, idx[j, 0]] += vals[j, 0]
            for i in range(count[j]):
                out[1, idx[j, i]] += vals[j, i]

    return top_sums, top_sums_cm


def max_channel_sums_numpy(spectra: np.ndarray, k: int, piece: int = 4096) -> np.ndarray:
    """:func:`max_channel_sums` for one ``k`` with NumPy (the fallback, and the tests' second
    opinion): ``(C,)`` float64."""
    n, c = spectra.shape
    out = np.zeros(c, dtype=np.float64)
    if n == 0 or c == 0:
        return out
    k = min(k, c)
    for s0 in range(0, n, piece):
        x = np.asarray(spectra[s0 : s0 + piece], dtype=np.float64)
        if k == 1:  # argmax takes the lowest channel among equal maxima
            idx = np.argmax(x, axis=1)
            out += np.bincount(idx, weights=x[np.arange(len(x)), idx], minlength=c)
            continue
        kth = -np.partition(-x, k - 1, axis=1)[:, k - 1 : k]  # (n, 1) k-th largest value
        above = x > kth
        tied = x == kth
        need = k - above.sum(1, keepdims=True)  # how many tied channels are taken, lowest first
        take = above | (tied & (np.cumsum(tied, axis=1) <= need))
        out += np.where(take, x, 0.0).sum(0)
    return out


def max_channel_sums(spectra: np.ndarray, k: int = 10, n_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(Max_Channels, Max_10_Channels)`` sums of ``spectra [..., C]`` (any leading axes, e.g.
    ``[rows, cols, C]``): ``(C,)`` float64 each, the largest channel of every spectrum and its
    ``k`` largest, summed at their channels. Spectra stored channel-major (the transpose of a
    C-contiguous ``[C, ...]`` array, as XRF-Maps files hold them) are read in place, others
    pixel-major (copied first unless C-contiguous). On up to ``n_threads`` threads; each task of
    2048 spectra has its own sums, added in task order at the end (the same numbers on any
    thread count)."""
    spectra = np.asarray(spectra)
    c = spectra.shape[-1]
    kernels = _kernel()
    k = max(1, min(k, c)) if c else 1
    n = spectra.size // c if c else 0
    if kernels is None or n == 0:
        flat = spectra.reshape(n, c)
        return max_channel_sums_numpy(flat, 1), max_channel_sums_numpy(flat, k)
    cm = np.moveaxis(spectra, -1, 0)
    if cm.flags.c_contiguous and spectra.dtype in (np.float32, np.float64):
        data, kernel = cm.reshape(c, n), kernels[1]
    else:
        data = spectra.reshape(n, c)
        if data.dtype not in (np.float32, np.float64) or not data.flags.c_contiguous:
            data = np.ascontiguousarray(data, dtype=np.float64)
        kernel = kernels[0]
    tasks = -(-n // _SPECTRA_PER_TASK)
    partial = np.zeros((tasks, 2, c), dtype=np.float64)  # each task's sums, added in task order

    def work(chunks):
        for i in chunks:
            kernel(data, k, i * _SPECTRA_PER_TASK, min(n, (i + 1) * _SPECTRA_PER_TASK), partial[i])

    run_chunks(work, tasks, n_threads, name="mapstorch-maxch")
    total = np.zeros((2, c), dtype=np.float64)
    for part in partial:  # a fixed order: the same sums on any number of threads
        total += part
    return total[0], total[1]
