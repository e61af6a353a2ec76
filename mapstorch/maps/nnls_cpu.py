"""The NNLS iterations of many pixels, compiled for the CPU (numba).

:func:`mapstorch.maps.solvers.nnls` runs accelerated projected gradient (FISTA with restarts)
on ``K`` amplitudes per pixel, ``K`` about 20, for thousands of pixels that share one Gram
matrix. As tensor operations every iteration is a dozen passes over the whole ``[P, K]`` batch,
and the batch iterates until its slowest pixel has converged (a pixel that never converges, e.g.
one with a NaN, keeps the whole batch going to ``max_iter``). Here ``_LANES`` pixels iterate
side by side (the innermost loops over the lanes, so they run in SIMD registers); a pixel leaves
its lane as soon as it has converged, and the next pixel of the range takes the lane.

Every pixel sees the same steps as in the tensor version (the same formulas in the same order),
each pixel on its own, so the results do not depend on how pixels are grouped into blocks or
threads. The sums of the matrix-vector products run in index order, which rounds differently
from a BLAS product in the last bits.
"""

from __future__ import annotations

import numba
import numpy as np

from mapstorch.parallel import run_chunks

__all__ = ["fista"]

_CHUNK = 1024  # pixels per work item
_LANES = 64  # pixels side by side in the innermost loops


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _matvec_lanes(gram, v, out, nl):  # pragma: no cover - compiled
    """``out[k, l] = sum_i v[i, l] gram[i, k]`` for ``nl`` lanes, ``i`` ascending."""
    k = gram.shape[0]
    zero = out.dtype.type(0)
    for j in range(k):
        o = out[j]
        for l in range(nl):
            o[l] = zero
    for i in range(k):
        vi = v[i]
        gi = gram[i]
        for j in range(k):
            o = out[j]
            g = gi[j]
            for l in range(nl):
                o[l] += vi[l] * g


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _load_lane(l, p, b, x, scale, tol, bb, xx, yy, t, thr, live, conv, count):  # pragma: no cover - compiled
    """Pixel ``p`` into lane ``l``: its ``b`` and start, a fresh momentum and iteration count."""
    dt = b.dtype.type
    for j in range(b.shape[1]):
        bb[j, l] = b[p, j]
        xx[j, l] = x[p, j]
        yy[j, l] = x[p, j]
    s = scale[p]
    live[l] = s - s == dt(0)  # a non-finite scale (NaN or infinite data): not iterated
    t[l] = dt(1)
    thr[l] = tol * s
    conv[l] = False
    count[l] = 0


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _fista(gram, b, x, scale, lip, tol, max_iter, lo, hi, iters, done):  # pragma: no cover - compiled
    """FISTA for pixels ``lo .. hi - 1``: ``b, x [P, K]`` (``x`` the start, overwritten with the
    result), ``scale [P]`` (``||b||``), ``iters [P]`` and ``done [P]`` written.

    ``_LANES`` pixels iterate side by side; a pixel leaves its lane when it has converged (or
    reached ``max_iter``, or cannot be iterated) and the next pixel of the range takes the lane,
    so the lanes stay busy while the range lasts, whatever the pixels' iteration counts."""
    k = gram.shape[0]
    lanes = min(_LANES, hi - lo)
    dt = b.dtype.type
    zero, one, half, four = dt(0), dt(1), dt(0.5), dt(4)
    bb = np.empty((k, lanes), dtype=b.dtype)
    xx = np.empty((k, lanes), dtype=b.dtype)
    yy = np.empty((k, lanes), dtype=b.dtype)
    xn = np.empty((k, lanes), dtype=b.dtype)
    yn = np.empty((k, lanes), dtype=b.dtype)
    gg = np.empty((k, lanes), dtype=b.dtype)
    t = np.empty(lanes, dtype=b.dtype)
    tn = np.empty(lanes, dtype=b.dtype)
    mom = np.empty(lanes, dtype=b.dtype)
    thr = np.empty(lanes, dtype=b.dtype)
    acc = np.empty(lanes, dtype=b.dtype)
    dot = np.empty(lanes, dtype=b.dtype)
    live = np.zeros(lanes, dtype=np.bool_)
    up = np.empty(lanes, dtype=np.bool_)
    conv = np.zeros(lanes, dtype=np.bool_)
    count = np.zeros(lanes, dtype=np.int64)
    pix = np.full(lanes, -1, dtype=np.int64)  # the pixel in each lane; -1: none
    nxt = lo
    for l in range(lanes):
        pix[l] = nxt
        _load_lane(l, nxt, b, x, scale, tol, bb, xx, yy, t, thr, live, conv, count)
        nxt += 1
    nl = lanes  # lanes in use: run-time count, so LLVM vectorises the lane loops
    while nl > 0:
        # retire the lanes whose pixel is finished, and give them the next pixels
        for l in range(nl):
            while pix[l] >= 0 and not (live[l] and count[l] < max_iter):
                p = pix[l]
                iters[p] = count[l]
                done[p] = conv[l]
                for j in range(k):
                    x[p, j] = xx[j, l]
                if nxt < hi:
                    pix[l] = nxt
                    _load_lane(l, nxt, b, x, scale, tol, bb, xx, yy, t, thr, live, conv, count)
                    nxt += 1
                else:
                    pix[l] = -1
                    live[l] = False
        while nl > 0 and pix[nl - 1] < 0:
            nl -= 1
        if nl == 0:
            break
        # x_new = max(y - (y G - b) / L, 0), NaN kept (as torch's clamp)
        _matvec_lanes(gram, yy, gg, nl)
        for j in range(k):
            g = gg[j]
            bj = bb[j]
            yj = yy[j]
            o = xn[j]
            for l in range(nl):
                v = yj[l] - (g[l] - bj[l]) / lip
                o[l] = zero if v < zero else v
        # the gradient at x_new, and the norm of its projection (convergence)
        _matvec_lanes(gram, xn, gg, nl)
        for l in range(nl):
            acc[l] = zero
            dot[l] = zero
            tn[l] = half * (one + np.sqrt(one + four * t[l] * t[l]))
            mom[l] = (t[l] - one) / tn[l]
        for j in range(k):
            g = gg[j]
            bj = bb[j]
            o = xn[j]
            for l in range(nl):
                gv = g[l] - bj[l]
                g[l] = gv
                pv = gv if o[l] > zero else (zero if gv > zero else gv)
                acc[l] += pv * pv
        # momentum, restarted where it points uphill
        for j in range(k):
            g = gg[j]
            o = xn[j]
            old = xx[j]
            dst = yn[j]
            for l in range(nl):
                v = o[l] + mom[l] * (o[l] - old[l])
                dst[l] = v
                dot[l] += (v - o[l]) * g[l]
        for l in range(nl):
            up[l] = dot[l] > zero
            if live[l]:
                t[l] = one if up[l] else tn[l]
        for j in range(k):
            o = xn[j]
            v = yn[j]
            xj = xx[j]
            yj = yy[j]
            for l in range(nl):
                if live[l]:
                    xj[l] = o[l]
                    yj[l] = o[l] if up[l] else v[l]
        for l in range(nl):
            if live[l]:
                count[l] += 1
                if np.sqrt(acc[l]) <= thr[l]:
                    live[l] = False
                    conv[l] = True


def fista(gram: np.ndarray, b: np.ndarray, x: np.ndarray, scale: np.ndarray, lip: float, tol: float,
          max_iter: int, n_threads: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x [P, K], iterations [P], converged [P])``: FISTA with restarts for
    ``min ||D a - t||^2, a >= 0`` in the normal-equation form ``G = D^T D [K, K]``,
    ``b = t D [P, K]``, from ``x [P, K]`` (not modified), at step ``1 / lip``; a pixel has
    converged when its projected gradient's norm is at most ``tol * scale`` (``scale [P]``).
    Pixels with a non-finite ``scale`` are returned as started, not converged, after 0 iterations.
    C-contiguous float32 or float64 arrays of one dtype; on up to ``n_threads`` threads."""
    dtype = b.dtype
    if dtype not in (np.float32, np.float64) or any(a.dtype != dtype for a in (gram, x, scale)):
        raise ValueError(f"fista needs float32 or float64 arrays of one dtype, got {gram.dtype}, {b.dtype}, "
                         f"{x.dtype}, {scale.dtype}")
    p, k = b.shape
    if gram.shape != (k, k) or x.shape != (p, k) or scale.shape != (p,):
        raise ValueError(f"fista: shapes gram {gram.shape}, b {b.shape}, x {x.shape}, scale {scale.shape} do not match")
    gram, b, scale = (np.ascontiguousarray(a) for a in (gram, b, scale))
    out = np.array(x, dtype=dtype, order="C", copy=True)
    iters = np.zeros(p, dtype=np.int64)
    done = np.zeros(p, dtype=np.bool_)
    step, limit = dtype.type(lip), dtype.type(tol)

    def work(chunks):
        for i in chunks:
            _fista(gram, b, out, scale, step, limit, int(max_iter), i * _CHUNK, min(p, (i + 1) * _CHUNK), iters, done)

    run_chunks(work, -(-p // _CHUNK), n_threads, name="mapstorch-nnls")
    return out, iters, done
