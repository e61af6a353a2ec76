"""The model, Poisson weights and Pearson chi-square of many pixels in one pass, compiled for the
CPU (numba).

Once the amplitudes ``a [P, K]`` of a chunk of pixels are known, the map fit needs the weights
``w = 1 / max(m, 1)`` of every channel (for the Fisher information) and each pixel's
``sum_c (y - m)^2 w``, where ``m = a D^T + b`` is the model with its background. As tensor
operations that is a matrix product that writes ``m [C, P]`` and five more passes over such
arrays with four temporaries. Here one pass per channel computes the channel's model for a range
of pixels from the non-zero entries of the design's row (most components are zero in most
channels), adds the background, and writes the weights, without storing the model; the sums are
accumulated in float64 channel after channel, so each pixel's sum, and the result, do not depend
on how the pixels are shared out to threads.
"""

from __future__ import annotations

import numba
import numpy as np

from mapstorch.parallel import run_chunks
from mapstorch.physics.snip_cpu import nonzeros_by_row

__all__ = ["model_weights_chi2"]

_CHUNK = 2048  # pixels per work item


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _pass(dval, dcol, dptr, a_t, bg, y, w, chi, lo, hi):  # pragma: no cover - compiled
    """Pixels ``lo .. hi - 1``: channel ``c``'s model ``m = sum_e dval[e] a_t[dcol[e]] + bg[c]``
    over the design's non-zeros ``dptr[c] .. dptr[c + 1] - 1`` of row ``c`` (in column order), the
    weight ``w[c] = 1 / max(m, 1)`` (NaN kept) and ``chi += (y[c] - m)^2 w`` (float64)."""
    zero = bg.dtype.type(0)
    one = bg.dtype.type(1)
    n = hi - lo
    acc = np.zeros(n, dtype=np.float64)
    mrow = np.empty(n, dtype=bg.dtype)
    for c in range(y.shape[0]):
        for j in range(n):
            mrow[j] = zero
        for e in range(dptr[c], dptr[c + 1]):
            coef = dval[e]
            ar = a_t[dcol[e], lo:hi]
            for j in range(n):
                mrow[j] += coef * ar[j]
        bc = bg[c, lo:hi]
        yc = y[c, lo:hi]
        wc = w[c, lo:hi]
        for j in range(n):
            mv = mrow[j] + bc[j]
            wv = one / (one if mv < one else mv)
            wc[j] = wv
            r = yc[j] - mv
            acc[j] += np.float64(r * r * wv)
    for j in range(n):
        chi[lo + j] = acc[j]


def model_weights_chi2(design: np.ndarray, amplitudes: np.ndarray, background: np.ndarray, counts: np.ndarray,
                       n_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(w [C, P], chi2 [P])`` for the model ``m = amplitudes @ design.T + background``:
    ``w = 1 / max(m, 1)`` in the inputs' dtype, ``chi2 = sum_c (counts - m)^2 w`` in float64.

    design ``[C, K]``, amplitudes ``[P, K]``; background and counts channel-major ``[C, P]``;
    all float32 or all float64. On up to ``n_threads`` threads; the model is not stored.
    """
    dtype = counts.dtype
    c, k = design.shape
    p = counts.shape[1]
    if dtype not in (np.float32, np.float64) or any(x.dtype != dtype for x in (design, amplitudes, background)):
        raise ValueError(f"model_weights_chi2 needs float32 or float64 arrays of one dtype, got {design.dtype}, "
                         f"{amplitudes.dtype}, {background.dtype}, {counts.dtype}")
    if amplitudes.shape != (p, k) or background.shape != (c, p) or counts.shape != (c, p):
        raise ValueError(f"model_weights_chi2: design {design.shape}, amplitudes {amplitudes.shape}, background "
                         f"{background.shape} and counts {counts.shape} do not match ([C, K], [P, K], [C, P], [C, P])")
    dptr, dval, dcol = nonzeros_by_row(design, dtype)  # each channel's non-zeros, by column
    a_t = np.ascontiguousarray(amplitudes.T)
    background, counts = np.ascontiguousarray(background), np.ascontiguousarray(counts)
    w = np.empty_like(counts)
    chi = np.empty(p, dtype=np.float64)

    def work(chunks):
        for i in chunks:
            _pass(dval, dcol, dptr, a_t, background, counts, w, chi, i * _CHUNK, min(p, (i + 1) * _CHUNK))

    run_chunks(work, -(-p // _CHUNK), n_threads, name="mapstorch-chi2")
    return w, chi
