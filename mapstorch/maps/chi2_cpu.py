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

:func:`model_chi2_stderr` goes one step further for a map fit: four channels' weights at a time
are added to the Fisher information of a block of pixels while they are in the core's cache
(:mod:`spd_cpu`), and the block's standard errors follow, so the weights are never stored.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from mapstorch import simd
from mapstorch.maps.spd_cpu import (
    _FISHER_PIXELS,
    _add_quad,
    _block_stderr,
    _fisher_scratch,
    _packing,
    _rel,
    _zero_columns,
    quad_table,
)
from mapstorch.parallel import run_chunks
from mapstorch.physics.snip_cpu import nonzeros_by_row

__all__ = ["model_weights_chi2", "model_chi2_stderr"]

_CHUNK = 2048  # pixels per work item


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _model_row(dval, dcol, dptr, a_t, bg, y, c, lo, n, mrow, w, acc):  # pragma: no cover - compiled
    """Channel ``c`` of pixels ``lo .. lo + n - 1``: the model ``m = sum_e dval[e] a_t[dcol[e]] +
    bg[c]`` over the design's non-zeros ``dptr[c] .. dptr[c + 1] - 1`` of row ``c`` (in column
    order; ``mrow``: scratch), the weights ``w[:n] = 1 / max(m, 1)`` (NaN kept) and
    ``acc[:n] += (y[c] - m)^2 w`` (float64)."""
    zero = bg.dtype.type(0)
    one = bg.dtype.type(1)
    for j in range(n):
        mrow[j] = zero
    for e in range(dptr[c], dptr[c + 1]):
        coef = dval[e]
        ar = a_t[dcol[e], lo:lo + n]
        for j in range(n):
            mrow[j] += coef * ar[j]
    bc = bg[c, lo:lo + n]
    yc = y[c, lo:lo + n]
    for j in range(n):
        mv = mrow[j] + bc[j]
        wv = one / (one if mv < one else mv)
        w[j] = wv
        r = yc[j] - mv
        acc[j] += np.float64(r * r * wv)


_MODEL_BLOCK = 4  # vectors of pixels whose models are summed side by side (independent chains)


@intrinsic
def _model_lanes(typingctx, dval, dcol, dptr, a_t, bg, y, c, p0, nvec, w, acc):
    """:func:`_model_row` of channel ``c`` for the ``nvec`` whole vectors of pixels from ``p0``
    (``w``, ``acc`` indexed from pixel ``p0``), written as LLVM vector code (:mod:`mapstorch.simd`):
    each vector's model is summed in a register, :data:`_MODEL_BLOCK` vectors side by side, with
    the same float operations in the same order (the same bits). The loop LLVM made of
    :func:`_model_row` kept the model in memory, loading and storing it for every non-zero of
    the row: 0.8 against 0.3 us per pixel of a 1052-channel window."""
    arrays = (a_t, bg, y)
    if not (all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" for a in arrays)
            and a_t.dtype in (types.float32, types.float64) and all(a.dtype == a_t.dtype for a in (dval, bg, y, w))
            and isinstance(w, types.Array) and w.ndim == 1 and w.layout == "C"
            and isinstance(acc, types.Array) and acc.ndim == 1 and acc.layout == "C" and acc.dtype == types.float64):
        return None
    sig = types.void(dval, dcol, dptr, a_t, bg, y, c, p0, nvec, w, acc)

    def codegen(context, builder, signature, args):
        st = signature.args
        vec, lanes = simd.vector_type(context, a_t.dtype)
        wide = ir.VectorType(ir.DoubleType(), lanes)
        i64 = ir.IntType(64)
        val, col, ptr, amp, back, cnt = (context.make_array(t)(context, builder, value=v) for t, v in zip(st[:6], args[:6]))
        wt = context.make_array(st[9])(context, builder, value=args[9])
        at = context.make_array(st[10])(context, builder, value=args[10])
        ch, first, n_vec = (simd.int64(context, builder, args[i], st[i]) for i in (6, 7, 8))
        elem = vec.element.as_pointer()

        def row_at(arr, row, pixel):  # a pointer to vectors at (row, pixel) of a C-contiguous 2-D array
            base = builder.bitcast(simd.row_pointer(builder, arr.data, row, builder.extract_value(arr.strides, 0), vec),
                                   elem)
            return builder.bitcast(builder.gep(base, [pixel]), vec.as_pointer())

        def entry(arr, index, numba_type):
            return context.cast(builder, builder.load(builder.gep(arr.data, [index])), numba_type, types.int64) \
                if numba_type is not None else builder.load(builder.gep(arr.data, [index]))

        e0 = entry(ptr, ch, st[2].dtype)
        e1 = entry(ptr, builder.add(ch, ir.Constant(i64, 1)), st[2].dtype)
        bg_row = row_at(back, ch, first)
        y_row = row_at(cnt, ch, first)
        w_row = builder.bitcast(wt.data, vec.as_pointer())
        acc_row = builder.bitcast(at.data, wide.as_pointer())
        zero = ir.Constant(vec, [0.0] * lanes)
        one = ir.Constant(vec, [1.0] * lanes)
        sums = [cgutils.alloca_once(builder, vec) for _ in range(_MODEL_BLOCK)]

        def block(v0, width):
            for u in range(width):
                builder.store(zero, sums[u])
            with cgutils.for_range_slice(builder, e0, e1, ir.Constant(i64, 1), i64) as (e, _):
                coef = simd.splat(builder, vec, entry(val, e, None))
                a_row = row_at(amp, entry(col, e, st[1].dtype), first)
                for u in range(width):
                    a = builder.load(builder.gep(a_row, [builder.add(v0, ir.Constant(i64, u))]), align=4)
                    builder.store(builder.fadd(builder.load(sums[u]), builder.fmul(coef, a)), sums[u])
            for u in range(width):
                v = builder.add(v0, ir.Constant(i64, u))
                m = builder.fadd(builder.load(sums[u]), builder.load(builder.gep(bg_row, [v]), align=4))
                wv = builder.fdiv(one, builder.select(builder.fcmp_ordered("<", m, one), one, m))
                builder.store(wv, builder.gep(w_row, [v]), align=4)
                r = builder.fsub(builder.load(builder.gep(y_row, [v]), align=4), m)
                term = builder.fmul(builder.fmul(r, r), wv)
                if lanes != wide.count or vec.element != wide.element:
                    term = builder.fpext(term, wide)
                target = builder.gep(acc_row, [v])
                builder.store(builder.fadd(builder.load(target, align=8), term), target, align=8)

        simd.in_blocks(builder, n_vec, _MODEL_BLOCK, block)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _pass(dval, dcol, dptr, a_t, bg, y, w, chi, lo, hi):  # pragma: no cover - compiled
    """Pixels ``lo .. hi - 1``: :func:`_model_row` of every channel (:func:`_model_lanes` for the
    whole vectors), the weights into ``w [C, P]``, the chi-squares into ``chi``."""
    n = hi - lo
    acc = np.zeros(n, dtype=np.float64)
    mrow = np.empty(n, dtype=bg.dtype)
    lanes = simd.VECTOR_BYTES // y.itemsize
    full = n // lanes
    for c in range(y.shape[0]):
        row = w[c]
        if full > 0:
            _model_lanes(dval, dcol, dptr, a_t, bg, y, c, lo, full, row[lo:], acc)
        if n > full * lanes:
            _model_row(dval, dcol, dptr, a_t, bg, y, c, lo + full * lanes, n - full * lanes, mrow,
                       row[lo + full * lanes:hi], acc[full * lanes:])
    for j in range(n):
        chi[lo + j] = acc[j]


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _pass_stderr(dval, dcol, dptr, a_t, bg, y, qptr, qpair, qcoef, active, where, lo, hi, chi, out, ok,
                 rel):  # pragma: no cover - compiled
    """Pixels ``lo .. hi - 1``, a block of ``spd_cpu._FISHER_PIXELS`` at a time: each channel
    quad's weights from :func:`_model_lanes` and :func:`_model_row` (kept in the core's cache,
    never stored), added at
    once to the block's Fisher information (``spd_cpu._add_quad``), then the standard errors
    (``spd_cpu._block_stderr``): the numbers of :func:`_pass` and ``spd_cpu.fisher_stderr``
    bit for bit."""
    n_c = y.shape[0]
    dtype = bg.dtype
    zero = dtype.type(0)
    buf, low, inv, diag, scale, act, bad, ut, acc = _fisher_scratch(active.shape[1], where.max() + 1, dtype)
    npix = _FISHER_PIXELS
    wq = simd.empty_rows(4, npix, dtype)
    mrow = np.empty(npix, dtype=dtype)
    sq = np.empty(npix, dtype=np.float64)
    lanes = simd.VECTOR_BYTES // y.itemsize
    for b0 in range(lo, hi, npix):
        nb = min(npix, hi - b0)
        _zero_columns(acc, nb)
        for j in range(nb):
            sq[j] = 0.0
        full = nb // lanes
        for q in range(qptr.shape[0] - 1):
            for i in range(4):
                c = 4 * q + i
                if c < n_c:
                    if full > 0:
                        _model_lanes(dval, dcol, dptr, a_t, bg, y, c, b0, full, wq[i], sq)
                    if nb > full * lanes:  # the last pixels, fewer than a vector
                        _model_row(dval, dcol, dptr, a_t, bg, y, c, b0 + full * lanes, nb - full * lanes, mrow,
                                   wq[i, full * lanes:], sq[full * lanes:])
                else:
                    row = wq[i]
                    for j in range(nb):
                        row[j] = zero
            _add_quad(acc, nb, qptr, qpair, qcoef, q, wq[0, :nb], wq[1, :nb], wq[2, :nb], wq[3, :nb])
        for j in range(nb):
            chi[b0 + j] = sq[j]
        _block_stderr(acc, nb, b0, ut, active, where, out, ok, rel, buf, low, inv, diag, scale, act, bad)


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


def model_chi2_stderr(design: np.ndarray, pairs: np.ndarray, amplitudes: np.ndarray, active: np.ndarray,
                      background: np.ndarray, counts: np.ndarray, n_threads: int = 1
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(chi2 [P], stderr [P, K], positive definite [P])``: :func:`model_weights_chi2`'s
    chi-square and ``spd_cpu.fisher_stderr``'s standard errors (over the ``active [P, K]``
    amplitudes; rows that are not positive definite left for the caller), the same numbers, in
    one pass that does not store the weights either.

    design ``[C, K]``, pairs ``[C, K (K + 1) / 2]`` (the products of its columns, as
    ``torch.triu_indices``), amplitudes ``[P, K]``; background and counts channel-major
    ``[C, P]``; all float32 or all float64. On up to ``n_threads`` threads.
    """
    dtype = counts.dtype
    c, k = design.shape
    p = counts.shape[1]
    where, pos = _packing(k)
    if dtype not in (np.float32, np.float64) or any(x.dtype != dtype for x in (design, pairs, amplitudes, background)):
        raise ValueError(f"model_chi2_stderr needs float32 or float64 arrays of one dtype, got {design.dtype}, "
                         f"{pairs.dtype}, {amplitudes.dtype}, {background.dtype}, {counts.dtype}")
    if amplitudes.shape != (p, k) or active.shape != (p, k) or pairs.shape != (c, pos) \
            or background.shape != (c, p) or counts.shape != (c, p):
        raise ValueError(f"model_chi2_stderr: design {design.shape}, pairs {pairs.shape}, amplitudes "
                         f"{amplitudes.shape}, active {active.shape}, background {background.shape} and counts "
                         f"{counts.shape} do not match ([C, K], [C, K (K + 1) / 2], [P, K], [P, K], [C, P], [C, P])")
    dptr, dval, dcol = nonzeros_by_row(design, dtype)
    qptr, qpair, qcoef = quad_table(np.ascontiguousarray(pairs, dtype=dtype))
    a_t = np.ascontiguousarray(amplitudes.T)
    background, counts = np.ascontiguousarray(background), np.ascontiguousarray(counts)
    active = np.ascontiguousarray(active, dtype=np.bool_)
    chi = np.empty(p, dtype=np.float64)
    out = np.empty((p, k), dtype=dtype)
    ok = np.empty(p, dtype=np.bool_)
    rel = _rel(counts)
    step = 2 * _FISHER_PIXELS

    def work(chunks):
        for i in chunks:
            _pass_stderr(dval, dcol, dptr, a_t, background, counts, qptr, qpair, qcoef, active, where, i * step,
                         min(p, (i + 1) * step), chi, out, ok, rel)

    run_chunks(work, -(-p // step), n_threads, name="mapstorch-chi2")
    return chi, out, ok
