"""Poisson weights and Pearson chi-square of many pixels in one pass, compiled for the CPU (numba).

After the amplitudes of a chunk of pixels are known, the map fit needs the weights
``w = 1 / max(m, 1)`` of every channel (for the Fisher information) and each pixel's
``sum_c (y - m)^2 w``. As tensor operations that is five passes over ``[C, P]`` arrays and four
temporaries; here it is one pass that reads the counts and the model once and writes the
weights, with the sums accumulated in float64 channel after channel (so each pixel's sum, and
the result, do not depend on how pixels are shared out to threads).
"""

from __future__ import annotations

import numba
import numpy as np

from mapstorch.parallel import run_chunks

__all__ = ["weights_and_chi2"]

_CHUNK = 2048  # pixels per work item


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _pass(y, m, w, chi, lo, hi):  # pragma: no cover - compiled
    """Pixels ``lo .. hi - 1`` of channel-major ``y, m [C, P]``: ``w = 1 / max(m, 1)`` (NaN
    kept) and ``chi[p] = sum_c (y - m)^2 w`` (float64)."""
    one = m.dtype.type(1)
    n = hi - lo
    acc = np.zeros(n, dtype=np.float64)
    for c in range(y.shape[0]):
        yc = y[c, lo:hi]
        mc = m[c, lo:hi]
        wc = w[c, lo:hi]
        for j in range(n):
            mv = mc[j]
            wv = one / (one if mv < one else mv)
            wc[j] = wv
            r = yc[j] - mv
            acc[j] += np.float64(r * r * wv)
    for j in range(n):
        chi[lo + j] = acc[j]


def weights_and_chi2(counts: np.ndarray, model: np.ndarray, n_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(w [C, P], chi2 [P])`` for channel-major C-contiguous ``counts, model [C, P]`` of one
    float dtype: ``w = 1 / max(model, 1)`` in that dtype, ``chi2 = sum_c (counts - model)^2 w``
    in float64 (the terms in the input's dtype, as the tensor version); on up to ``n_threads``
    threads."""
    if counts.shape != model.shape or counts.ndim != 2 or counts.dtype != model.dtype \
            or counts.dtype not in (np.float32, np.float64):
        raise ValueError(f"weights_and_chi2 needs two float32/float64 [C, P] arrays of one shape and dtype, got "
                         f"{counts.dtype} {counts.shape} and {model.dtype} {model.shape}")
    counts, model = np.ascontiguousarray(counts), np.ascontiguousarray(model)
    n_pix = counts.shape[1]
    w = np.empty_like(model)
    chi = np.empty(n_pix, dtype=np.float64)

    def work(chunks):
        for i in chunks:
            _pass(counts, model, w, chi, i * _CHUNK, min(n_pix, (i + 1) * _CHUNK))

    run_chunks(work, -(-n_pix // _CHUNK), n_threads, name="mapstorch-chi2")
    return w, chi
