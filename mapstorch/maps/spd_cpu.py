"""Many small symmetric positive definite systems at once, compiled for the CPU (numba).

A map fit factorises one ``K x K`` matrix per pixel (the Fisher information for the standard
errors, the damped scoring matrix at each Levenberg-Marquardt step), ``K`` about 20. LAPACK's
batched routines pay a call per matrix; these kernels work through the pixels of a range in
compiled code, ``_LANES`` matrices side by side (float64, whatever the input's dtype), the
innermost loops over the matrices so that they run in SIMD registers, with the same float
operations in the same order for each matrix as a loop over one matrix at a time (the numbers
are the same bit for bit). :func:`mapstorch.parallel.run_chunks` shares the ranges out to
threads. A matrix that is not positive definite (a pivot below 16
units in the last place of the input's dtype, relative to its diagonal entry) is reported in
``ok`` and its row of the output left for the caller to fill (e.g. by a pseudo-inverse).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from mapstorch import simd
from mapstorch.parallel import run_chunks

__all__ = ["inverse_diagonal", "solve", "packed_stderr", "fisher_stderr", "quad_table"]

_CHUNK = 1024  # matrices per work item
_LANES = 64  # matrices side by side in the kernels' innermost loops (SIMD over matrices); 64 measured fastest
_FISHER_PIXELS = 512  # pixels whose Fisher information is summed together (measured best of 128 / 256 / 512)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _cholesky_lanes(a, low, bad, rel, nl):  # pragma: no cover - compiled
    """Lower Cholesky factors of ``nl`` matrices side by side: ``a, low [K, K, nl]`` float64
    (the lower triangle of ``a`` read, ``low``'s lower triangle written), the innermost loops
    over the lanes (SIMD). Right-looking: each column, once final, is taken off the columns to
    its right, so no loop waits on the one before it; every entry still sees its subtractions
    in the order of the textbook (left-looking) sums, so the numbers are the same bit for bit.
    A lane whose pivot is not above ``rel`` times its diagonal entry (rounding of the input) gets
    ``bad`` set; its factor is then meaningless (NaN or worse), the other lanes unaffected."""
    k = a.shape[0]
    for i in range(k):
        for j in range(i + 1):
            src = a[i, j]
            dst = low[i, j]
            for l in range(nl):
                dst[l] = src[l]
    for j in range(k):
        piv = low[j, j]
        diag = a[j, j]
        for l in range(nl):
            bad[l] |= not piv[l] > rel * abs(diag[l])
            piv[l] = np.sqrt(piv[l])
        for i in range(j + 1, k):
            v = low[i, j]
            for l in range(nl):
                v[l] = v[l] / piv[l]
        for c in range(j + 1, k):
            lc = low[c, j]
            for i in range(c, k):
                li = low[i, j]
                dst = low[i, c]
                for l in range(nl):
                    dst[l] -= li[l] * lc[l]


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _inverse_diagonal_lanes(low, inv, diag, nl):  # pragma: no cover - compiled
    """``diag[i] = diag(inv(L L^T))_i = sum_r (L^-1)[r, i]^2`` per lane for the factors
    ``low [K, K, nl]`` (``inv``: scratch for ``L^-1``, built column by column by forward
    substitution, right-looking as :func:`_cholesky_lanes`); ``diag [K, nl]``."""
    k = low.shape[0]
    for c in range(k):
        icc = inv[c, c]
        lcc = low[c, c]
        for l in range(nl):
            icc[l] = 1.0 / lcc[l]
        for r in range(c + 1, k):
            v = inv[r, c]
            for l in range(nl):
                v[l] = 0.0
        for t in range(c, k):
            itc = inv[t, c]
            if t > c:
                ltt = low[t, t]
                for l in range(nl):
                    itc[l] = itc[l] / ltt[l]
            for r in range(t + 1, k):
                lrt = low[r, t]
                v = inv[r, c]
                for l in range(nl):
                    v[l] -= lrt[l] * itc[l]
    for i in range(k):
        d = diag[i]
        for l in range(nl):
            d[l] = 0.0
    for r in range(k):
        for i in range(r + 1):
            d = diag[i]
            iri = inv[r, i]
            for l in range(nl):
                d[l] += iri[l] * iri[l]


# --- the same two steps as LLVM vector code, each entry's sums in registers --------------------
#
# The loops above keep every partial sum in memory: each multiply-subtract loads two factors and
# the entry, and stores the entry, and these 8-lane float64 loads and stores, not the arithmetic,
# bound the time (0.27 and 0.33 us per matrix of 18 x 18 on a Zen 4 core). Left-looking, an entry
# gathers all its subtractions in a register before it is stored once, in the same order as the
# right-looking loops make them (column after column), so the numbers are the same bit for bit;
# :data:`_CHAINS` vectors of lanes side by side keep as many independent chains of operations in
# flight (0.12 and 0.16 us per matrix).

_F64 = ir.DoubleType()
_F64X8 = ir.VectorType(_F64, 8)
_CHAINS = 8  # 8-lane vectors worked on together: the kernels below need lanes % (8 * _CHAINS) == 0


def _i64(value: int) -> ir.Constant:
    return ir.Constant(ir.IntType(64), value)


def _span(builder, start, stop):
    """``for index in range(start, stop)`` (int64 values) in LLVM IR: yields ``(index, count)``."""
    return cgutils.for_range_slice(builder, start, stop, _i64(1), ir.IntType(64))


class _LaneVectors:
    """The 8-lane vectors of a C-contiguous float64 array ``[K, K, nl]`` (entry ``(i, j)``) or
    ``[K, nl]`` (entry ``i``, ``j`` None): vector ``u`` of lane group ``g`` (in vectors)."""

    def __init__(self, context, builder, typ, value, k, n_vec) -> None:
        self.builder, self.k, self.n_vec = builder, k, n_vec
        data = context.make_array(typ)(context, builder, value=value).data
        self.base = builder.bitcast(data, _F64X8.as_pointer())

    def pointer(self, i, j, g, u: int):
        b = self.builder
        row = i if j is None else b.add(b.mul(i, self.k), j)
        return b.gep(self.base, [b.add(b.mul(row, self.n_vec), b.add(g, _i64(u)))])

    def load(self, i, j, g, u: int):
        return self.builder.load(self.pointer(i, j, g, u), align=8)

    def store(self, value, i, j, g, u: int) -> None:
        self.builder.store(value, self.pointer(i, j, g, u), align=8)


def _lane_setup(context, builder, typ, value):
    """``(K, vectors per lane row, lane groups)`` of a ``[K, K, nl]`` argument."""
    shape = context.make_array(typ)(context, builder, value=value).shape
    n_vec = builder.sdiv(builder.extract_value(shape, 2), _i64(8))
    return builder.extract_value(shape, 0), n_vec, builder.sdiv(n_vec, _i64(_CHAINS))


def _f64x8_call(builder, name: str, value):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F64X8, [_F64X8]), name)
    return builder.call(fn, [value])


def _float64_lanes(*arrays) -> bool:
    return all(isinstance(a, types.Array) and a.layout == "C" and a.dtype == types.float64 for a in arrays)


@intrinsic
def _cholesky_registers(typingctx, a, low, bad, rel):
    """:func:`_cholesky_lanes` (the same numbers, ``bad`` the same) for ``a, low [K, K, nl]``
    float64, ``nl`` a multiple of ``8 * _CHAINS``: entry ``(i, c)`` is ``a[i, c]`` minus
    ``low[i, j] low[c, j]`` for ``j < c`` in order, summed in a register, then the pivot's square
    root on the diagonal, or divided by it below."""
    if not (_float64_lanes(a, low) and a.ndim == low.ndim == 3 and isinstance(bad, types.Array)
            and bad.dtype == types.boolean and bad.layout == "C"):
        return None
    sig = types.void(a, low, bad, rel)

    def codegen(context, builder, signature, args):
        a_t, low_t, bad_t, rel_t = signature.args
        k, n_vec, groups = _lane_setup(context, builder, a_t, args[0])
        src = _LaneVectors(context, builder, a_t, args[0], k, n_vec)
        dst = _LaneVectors(context, builder, low_t, args[1], k, n_vec)
        flags_t = ir.VectorType(ir.IntType(8), 8)
        flags = builder.bitcast(context.make_array(bad_t)(context, builder, value=args[2]).data, flags_t.as_pointer())
        floor = simd.splat(builder, _F64X8, context.cast(builder, args[3], rel_t, types.float64))
        acc = [cgutils.alloca_once(builder, _F64X8) for _ in range(_CHAINS)]
        with cgutils.for_range(builder, groups) as group:
            g = builder.mul(group.index, _i64(_CHAINS))
            with _span(builder, _i64(0), k) as (c, _):
                with _span(builder, c, k) as (i, _):
                    for u in range(_CHAINS):
                        builder.store(src.load(i, c, g, u), acc[u])
                    with _span(builder, _i64(0), c) as (j, _):
                        for u in range(_CHAINS):
                            prod = builder.fmul(dst.load(i, j, g, u), dst.load(c, j, g, u))
                            builder.store(builder.fsub(builder.load(acc[u]), prod), acc[u])
                    with builder.if_else(builder.icmp_signed("==", i, c)) as (pivot, below):
                        with pivot:
                            for u in range(_CHAINS):
                                piv = builder.load(acc[u])
                                limit = builder.fmul(floor, _f64x8_call(builder, "llvm.fabs.v8f64", src.load(c, c, g, u)))
                                not_above = builder.fcmp_unordered("<=", piv, limit)  # (NaN: not above)
                                flag = builder.gep(flags, [builder.add(g, _i64(u))])
                                builder.store(builder.or_(builder.load(flag, align=1), builder.zext(not_above, flags_t)),
                                              flag, align=1)
                                dst.store(_f64x8_call(builder, "llvm.sqrt.v8f64", piv), c, c, g, u)
                        with below:
                            for u in range(_CHAINS):
                                dst.store(builder.fdiv(builder.load(acc[u]), dst.load(c, c, g, u)), i, c, g, u)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _inverse_diagonal_registers(typingctx, low, inv, diag):
    """:func:`_inverse_diagonal_lanes` (the same numbers) for ``low, inv [K, K, nl]`` and ``diag
    [K, nl]`` float64, ``nl`` a multiple of ``8 * _CHAINS``: column ``c`` of ``L^-1`` entry after
    entry, ``inv[r, c] = (0 - sum_t low[r, t] inv[t, c]) / low[r, r]`` (``t`` from ``c`` in order,
    in a register), and ``diag[c]`` its squares summed from row ``c`` down."""
    if not (_float64_lanes(low, inv, diag) and low.ndim == inv.ndim == 3 and diag.ndim == 2):
        return None
    sig = types.void(low, inv, diag)

    def codegen(context, builder, signature, args):
        low_t, inv_t, diag_t = signature.args
        k, n_vec, groups = _lane_setup(context, builder, low_t, args[0])
        fac = _LaneVectors(context, builder, low_t, args[0], k, n_vec)
        out = _LaneVectors(context, builder, inv_t, args[1], k, n_vec)
        dsum = _LaneVectors(context, builder, diag_t, args[2], k, n_vec)
        one = ir.Constant(_F64X8, [1.0] * 8)
        zero = ir.Constant(_F64X8, [0.0] * 8)
        acc = [cgutils.alloca_once(builder, _F64X8) for _ in range(_CHAINS)]
        squares = [cgutils.alloca_once(builder, _F64X8) for _ in range(_CHAINS)]
        with cgutils.for_range(builder, groups) as group:
            g = builder.mul(group.index, _i64(_CHAINS))
            with _span(builder, _i64(0), k) as (c, _):
                for u in range(_CHAINS):
                    first = builder.fdiv(one, fac.load(c, c, g, u))
                    out.store(first, c, c, g, u)
                    builder.store(builder.fadd(zero, builder.fmul(first, first)), squares[u])
                with _span(builder, builder.add(c, _i64(1)), k) as (r, _):
                    for u in range(_CHAINS):
                        builder.store(zero, acc[u])
                    with _span(builder, c, r) as (t, _):
                        for u in range(_CHAINS):
                            prod = builder.fmul(fac.load(r, t, g, u), out.load(t, c, g, u))
                            builder.store(builder.fsub(builder.load(acc[u]), prod), acc[u])
                    for u in range(_CHAINS):
                        value = builder.fdiv(builder.load(acc[u]), fac.load(r, r, g, u))
                        out.store(value, r, c, g, u)
                        builder.store(builder.fadd(builder.load(squares[u]), builder.fmul(value, value)), squares[u])
                for u in range(_CHAINS):
                    dsum.store(builder.load(squares[u]), c, None, g, u)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _cholesky(a, low, bad, rel, nl):  # pragma: no cover - compiled
    """:func:`_cholesky_lanes`, by :func:`_cholesky_registers` where the lanes allow."""
    if nl == a.shape[2] == low.shape[2] and nl % (8 * _CHAINS) == 0 and bad.shape[0] >= nl:
        _cholesky_registers(a, low, bad, rel)
    else:
        _cholesky_lanes(a, low, bad, rel, nl)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _inverse_diag(low, inv, diag, nl):  # pragma: no cover - compiled
    """:func:`_inverse_diagonal_lanes`, by :func:`_inverse_diagonal_registers` where the lanes allow."""
    if nl == low.shape[2] == inv.shape[2] == diag.shape[1] and nl % (8 * _CHAINS) == 0:
        _inverse_diagonal_registers(low, inv, diag)
    else:
        _inverse_diagonal_lanes(low, inv, diag, nl)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _gather_lanes(a, p0, nb, buf, nl):  # pragma: no cover - compiled
    """The lower triangles of ``a[p0:p0 + nb]`` (``[P, K, K]``) into ``buf [K, K, _LANES]``
    (float64); lanes past ``nb`` get the identity."""
    k = a.shape[1]
    for i in range(k):
        for j in range(i + 1):
            dst = buf[i, j]
            for l in range(nb):
                dst[l] = a[p0 + l, i, j]
            for l in range(nb, nl):
                dst[l] = 1.0 if i == j else 0.0


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _factor_block(a, p0, nb, buf, low, bad, rel, nl):  # pragma: no cover - compiled
    """The Cholesky factors of ``a[p0:p0 + nb]`` (``[P, K, K]``) side by side in ``low``
    (``buf``: scratch), ``bad`` set for the lanes that are not positive definite."""
    _gather_lanes(a, p0, nb, buf, nl)
    bad[:] = False
    _cholesky(buf, low, bad, rel, nl)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _inverse_diagonal(a, lo, hi, out, ok, rel):  # pragma: no cover - compiled
    """``out[p] = diag(inv(a[p]))`` for ``p`` in ``lo..hi - 1``, ``_LANES`` matrices at a time."""
    nl = _LANES  # a run-time trip count: LLVM vectorises the lane loops (a constant one it unrolls)
    k = a.shape[1]
    buf = np.empty((k, k, nl))
    low = np.empty((k, k, nl))
    inv = np.empty((k, k, nl))
    diag = np.empty((k, nl))
    bad = np.empty(nl, dtype=np.bool_)
    for p0 in range(lo, hi, nl):
        nb = min(nl, hi - p0)
        _factor_block(a, p0, nb, buf, low, bad, rel, nl)
        _inverse_diag(low, inv, diag, nl)
        for l in range(nb):
            ok[p0 + l] = not bad[l]
            if not bad[l]:
                for i in range(k):
                    out[p0 + l, i] = diag[i, l]


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _solve(a, b, lo, hi, out, ok, rel):  # pragma: no cover - compiled
    """``out[p] = inv(a[p]) b[p]`` for ``p`` in ``lo..hi - 1`` (forward and back substitution),
    ``_LANES`` systems at a time."""
    nl = _LANES  # a run-time trip count: LLVM vectorises the lane loops (a constant one it unrolls)
    k = a.shape[1]
    buf = np.empty((k, k, nl))
    low = np.empty((k, k, nl))
    z = np.empty((k, nl))
    bad = np.empty(nl, dtype=np.bool_)
    for p0 in range(lo, hi, nl):
        nb = min(nl, hi - p0)
        _factor_block(a, p0, nb, buf, low, bad, rel, nl)
        for i in range(k):
            zi = z[i]
            for l in range(nb):
                zi[l] = b[p0 + l, i]
            for l in range(nb, nl):
                zi[l] = 0.0
        for t in range(k):  # forward substitution, right-looking (the same order of subtractions)
            zt = z[t]
            ltt = low[t, t]
            for l in range(nl):
                zt[l] = zt[l] / ltt[l]
            for i in range(t + 1, k):
                lit = low[i, t]
                zi = z[i]
                for l in range(nl):
                    zi[l] -= lit[l] * zt[l]
        for i in range(k - 1, -1, -1):
            zi = z[i]
            for t in range(i + 1, k):
                lti = low[t, i]
                zt = z[t]
                for l in range(nl):
                    zi[l] -= lti[l] * zt[l]
            lii = low[i, i]
            for l in range(nl):
                zi[l] = zi[l] / lii[l]
        for l in range(nb):
            ok[p0 + l] = not bad[l]
            if not bad[l]:
                for i in range(k):
                    out[p0 + l, i] = z[i, l]


@numba.njit(nogil=True, cache=True)
def _stderr_scratch(k, nl):  # pragma: no cover - compiled
    """The work arrays of :func:`_stderr_lanes` for ``nl`` lanes of ``k x k`` matrices."""
    return (np.empty((k, k, nl)), np.empty((k, k, nl)), np.empty((k, k, nl)), np.empty((k, nl)), np.empty((k, nl)),
            np.empty((k, nl), dtype=np.bool_), np.empty(nl, dtype=np.bool_))


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _stderr_lanes(ut, active, where, p0, nb, out, ok, rel, buf, low, inv, diag, scale, act, bad):  # pragma: no cover
    """The standard errors of pixels ``p0 .. p0 + nb - 1`` from their packed matrices side by side,
    ``ut [T, nl]`` float64 (lanes past ``nb`` zero): see :func:`_packed_stderr`."""
    nl = ut.shape[1]
    k = active.shape[1]
    for l in range(nl):
        bad[l] = False
    for i in range(k):
        for l in range(nb):
            act[i, l] = active[p0 + l, i]
        for l in range(nb, nl):
            act[i, l] = False
        d = ut[where[i, i]]
        si = scale[i]
        ai = act[i]
        for l in range(nl):
            good = d[l] > 0.0
            bad[l] |= ai[l] and not good
            si[l] = 1.0 / np.sqrt(d[l]) if ai[l] and good else 1.0
    for i in range(k):
        for j in range(i + 1):
            dst = buf[i, j]
            u = ut[where[i, j]]
            si = scale[i]
            sj = scale[j]
            ai = act[i]
            aj = act[j]
            off = 1.0 if i == j else 0.0
            for l in range(nl):
                v = u[l] * si[l] * sj[l]
                dst[l] = v if ai[l] and aj[l] else off
    _cholesky(buf, low, bad, rel, nl)
    _inverse_diag(low, inv, diag, nl)
    for l in range(nb):
        ok[p0 + l] = not bad[l]
        for i in range(k):
            if act[i, l] and not bad[l]:
                out[p0 + l, i] = np.sqrt(max(diag[i, l], 0.0)) * scale[i, l]
            else:
                out[p0 + l, i] = np.nan


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _packed_stderr(upper, active, where, lo, hi, out, ok, rel):  # pragma: no cover - compiled
    """Standard errors from packed symmetric information matrices: for ``p`` in ``lo..hi - 1``,
    the matrix ``A[i, j] = upper[p, where[i, j]]`` restricted to the ``active[p]`` rows and
    columns, scaled to a unit diagonal; ``out[p, i] = sqrt(diag(inv(A))_i)`` where active, NaN
    elsewhere. ``_LANES`` pixels at a time, each inactive row and column replaced by the
    identity's: its factor's entries are then exact zeros, which change no sum, so the numbers
    are those of the restricted matrix bit for bit."""
    nl = _LANES  # a run-time trip count: LLVM vectorises the lane loops (a constant one it unrolls)
    k = active.shape[1]
    buf, low, inv, diag, scale, act, bad = _stderr_scratch(k, nl)
    cols = upper.shape[1]
    ut = np.zeros((cols, nl))  # the block's packed matrices, lane-minor (lanes past the block: 0)
    for p0 in range(lo, hi, nl):
        nb = min(nl, hi - p0)
        for l in range(nb):
            src = upper[p0 + l]
            for c in range(cols):
                ut[c, l] = src[c]
        for l in range(nb, nl):
            for c in range(cols):
                ut[c, l] = 0.0
        _stderr_lanes(ut, active, where, p0, nb, out, ok, rel, buf, low, inv, diag, scale, act, bad)


@numba.njit(nogil=True, cache=True)
def _fisher_scratch(k, n_t, dtype):  # pragma: no cover - compiled
    """The work arrays of a Fisher-information pass: :func:`_stderr_scratch`'s, then the lanes'
    packed matrices ``ut [T, _LANES]`` and the block's sums ``acc [T, _FISHER_PIXELS]``."""
    buf, low, inv, diag, scale, act, bad = _stderr_scratch(k, _LANES)
    return (buf, low, inv, diag, scale, act, bad, np.zeros((n_t, _LANES)),
            simd.empty_rows(n_t, _FISHER_PIXELS, dtype))


@numba.njit(nogil=True, cache=True)
def _zero_columns(acc, nb):  # pragma: no cover - compiled
    """``acc[:, :nb] = 0``."""
    zero = acc.dtype.type(0)
    for t in range(acc.shape[0]):
        a = acc[t]
        for j in range(nb):
            a[j] = zero


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _add_quad_lanes(acc, j0, nb, qptr, qpair, qcoef, q, w1, w2, w3, w4):  # pragma: no cover - compiled
    """Channel quad ``q``'s share of the packed Fisher information of ``nb`` pixels:
    ``acc[t, :nb] += (k1 w1 + k2 w2) + (k3 w3 + k4 w4)`` for each entry ``t`` whose product of
    design columns is not zero in the quad (``qpair[e]``, its four products ``qcoef[e]``, ``e``
    in ``qptr[q] .. qptr[q + 1] - 1``); ``w1 .. w4`` the quad's weights ``[>= nb]``. The four
    rows of weights stay in the core's L1 cache while every entry of the quad reads them. Pixels
    ``j0 .. nb - 1`` only (:func:`_add_quad` does the whole vectors before ``j0``)."""
    for e in range(qptr[q], qptr[q + 1]):
        a = acc[qpair[e], :nb]
        k1 = qcoef[e, 0]
        k2 = qcoef[e, 1]
        k3 = qcoef[e, 2]
        k4 = qcoef[e, 3]
        for j in range(j0, nb):
            a[j] += (k1 * w1[j] + k2 * w2[j]) + (k3 * w3[j] + k4 * w4[j])


_QUAD_BLOCK = 4  # vectors of pixels whose weights stay in registers while a quad's entries pass


@intrinsic
def _quad_lanes(typingctx, acc, nvec, qpair, qcoef, e0, e1, w1, w2, w3, w4):
    """:func:`_add_quad_lanes` for the first ``nvec`` whole vectors of pixels, written as LLVM
    vector code (:mod:`mapstorch.simd`): the four weights of :data:`_QUAD_BLOCK` vectors of pixels
    are loaded once and stay in registers while each entry ``e0 .. e1 - 1`` adds to its row of
    ``acc`` (C-contiguous), the same float operations in the same order (the same bits). The
    loop took a quarter to a third longer, loading the weights again for every entry."""
    if not (isinstance(acc, types.Array) and acc.ndim == 2 and acc.layout == "C"
            and acc.dtype in (types.float32, types.float64) and qcoef.dtype == acc.dtype
            and all(isinstance(w, types.Array) and w.ndim == 1 and w.dtype == acc.dtype for w in (w1, w2, w3, w4))):
        return None  # (the caller checks at run time that the weights' rows are contiguous)
    sig = types.void(acc, nvec, qpair, qcoef, e0, e1, w1, w2, w3, w4)

    def codegen(context, builder, signature, args):
        at, nt, pt, ct, e0t, e1t = signature.args[:6]
        rows = context.make_array(at)(context, builder, value=args[0])
        pair = context.make_array(pt)(context, builder, value=args[2])
        coef = context.make_array(ct)(context, builder, value=args[3])
        vec, _ = simd.vector_type(context, at.dtype)
        weights = [builder.bitcast(context.make_array(t)(context, builder, value=v).data, vec.as_pointer())
                   for t, v in zip(signature.args[6:], args[6:])]
        i64 = ir.IntType(64)
        nvec = simd.int64(context, builder, args[1], nt)
        e0 = simd.int64(context, builder, args[4], e0t)
        e1 = simd.int64(context, builder, args[5], e1t)
        row_bytes = builder.extract_value(rows.strides, 0)
        coef_bytes = builder.extract_value(coef.strides, 0)

        def block(j0, width):
            w = [[builder.load(builder.gep(weights[i], [builder.add(j0, ir.Constant(i64, v))]), align=4)
                  for v in range(width)] for i in range(4)]
            with cgutils.for_range(builder, builder.sub(e1, e0)) as loop:
                e = builder.add(e0, loop.index)
                t = simd.int64(context, builder, builder.load(builder.gep(pair.data, [e])), pt.dtype)
                row = simd.row_pointer(builder, rows.data, t, row_bytes, vec)
                cp = builder.bitcast(simd.row_pointer(builder, coef.data, e, coef_bytes, vec), vec.element.as_pointer())
                k = [simd.splat(builder, vec, builder.load(builder.gep(cp, [ir.Constant(i64, i)]))) for i in range(4)]
                for v in range(width):
                    add = builder.fadd(builder.fadd(builder.fmul(k[0], w[0][v]), builder.fmul(k[1], w[1][v])),
                                       builder.fadd(builder.fmul(k[2], w[2][v]), builder.fmul(k[3], w[3][v])))
                    target = builder.gep(row, [builder.add(j0, ir.Constant(i64, v))])
                    builder.store(builder.fadd(builder.load(target, align=4), add), target, align=4)

        simd.in_blocks(builder, nvec, _QUAD_BLOCK, block)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _add_quad(acc, nb, qptr, qpair, qcoef, q, w1, w2, w3, w4):  # pragma: no cover - compiled
    """Channel quad ``q``'s share of the packed Fisher information of ``nb`` pixels:
    ``acc[t, :nb] += (k1 w1 + k2 w2) + (k3 w3 + k4 w4)`` for each entry ``t`` whose product of
    design columns is not zero in the quad (``qpair[e]``, its four products ``qcoef[e]``, ``e``
    in ``qptr[q] .. qptr[q + 1] - 1``); ``w1 .. w4`` the quad's weights ``[>= nb]``. Whole
    vectors of pixels by :func:`_quad_lanes` where the weights are contiguous, the rest by
    :func:`_add_quad_lanes`."""
    size = w1.itemsize
    lanes = simd.VECTOR_BYTES // size
    full = nb // lanes
    if full > 0 and w1.strides[0] == size and w2.strides[0] == size and w3.strides[0] == size \
            and w4.strides[0] == size and acc.strides[1] == size:
        _quad_lanes(acc, full, qpair, qcoef, qptr[q], qptr[q + 1], w1, w2, w3, w4)
        _add_quad_lanes(acc, full * lanes, nb, qptr, qpair, qcoef, q, w1, w2, w3, w4)
    else:
        _add_quad_lanes(acc, 0, nb, qptr, qpair, qcoef, q, w1, w2, w3, w4)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _block_stderr(acc, nb, b0, ut, active, where, out, ok, rel, buf, low, inv, diag, scale, act,
                  bad):  # pragma: no cover - compiled
    """The standard errors of pixels ``b0 .. b0 + nb - 1`` from their summed packed information
    ``acc [T, >= nb]``, ``_LANES`` at a time through :func:`_stderr_lanes` (``ut``: its scratch)."""
    nl = ut.shape[1]
    for s0 in range(0, nb, nl):
        ns = min(nl, nb - s0)
        for t in range(acc.shape[0]):
            src = acc[t]
            dst = ut[t]
            for l in range(ns):
                dst[l] = src[s0 + l]
            for l in range(ns, nl):
                dst[l] = 0.0
        _stderr_lanes(ut, active, where, b0 + s0, ns, out, ok, rel, buf, low, inv, diag, scale, act, bad)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _fisher_stderr(w, qptr, qpair, qcoef, active, where, lo, hi, out, ok, rel):  # pragma: no cover - compiled
    """Standard errors of pixels ``lo .. hi - 1`` from their Fisher information, built here from
    channel-major weights ``w [C, P]`` a channel quad at a time (:func:`_add_quad`; channels past
    ``C`` have no products), ``_FISHER_PIXELS`` pixels together, summed in the weights' dtype.
    Each pixel's numbers depend only on its own weights: not on the block or thread it is in."""
    n_c = w.shape[0]
    buf, low, inv, diag, scale, act, bad, ut, acc = _fisher_scratch(active.shape[1], where.max() + 1, w.dtype)
    for b0 in range(lo, hi, _FISHER_PIXELS):
        nb = min(_FISHER_PIXELS, hi - b0)
        _zero_columns(acc, nb)
        for q in range(qptr.shape[0] - 1):
            c = 4 * q
            _add_quad(acc, nb, qptr, qpair, qcoef, q, w[min(c, n_c - 1), b0:b0 + nb],
                      w[min(c + 1, n_c - 1), b0:b0 + nb], w[min(c + 2, n_c - 1), b0:b0 + nb],
                      w[min(c + 3, n_c - 1), b0:b0 + nb])
        _block_stderr(acc, nb, b0, ut, active, where, out, ok, rel, buf, low, inv, diag, scale, act, bad)


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


def _packing(k: int) -> tuple[np.ndarray, int]:
    """``where [K, K]``: the packed index of entry ``(i, j)`` (row by row of the upper triangle,
    as ``torch.triu_indices``), and the number of packed entries."""
    where = np.zeros((k, k), dtype=np.int64)
    pos = 0
    for i in range(k):
        for j in range(i, k):
            where[i, j] = where[j, i] = pos
            pos += 1
    return where, pos


_NEGLIGIBLE = 1e-15  # quad_table: float32 products below this share of their column's largest are left out


def quad_table(pairs: np.ndarray, negligible: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The products of design columns ``pairs [C, T]`` by channel quad (channels ``4q .. 4q + 3``;
    past ``C``: none): ``(qptr [Q + 1], qpair, qcoef [E, 4])``, quad ``q``'s entries at
    ``qptr[q] .. qptr[q + 1] - 1``, each a packed entry ``qpair`` whose product is not zero in the
    quad and its four products (in ``pairs``' dtype, zero where the product is).

    Products smaller than ``negligible`` times the largest of their column count as zero: the
    far tails of two peaks, down to 1e-39 in float32 designs. Weighted by ``w <= 1`` they add
    less than the dtype's rounding to an information whose largest term, ``product * w``, has
    ``w >= 1 / m`` for a model below ``m = eps / (2 negligible)`` counts in that channel. The
    default, :data:`_NEGLIGIBLE` scaled by the dtype's ``eps`` over float32's (1e-15 for float32,
    1.9e-24 for float64), keeps that for models below 6e7 counts per channel. On the bench's map the
    errors come out the same bit for bit, with 25 % fewer entries to sum (bench/RESULTS.md,
    tenth session)."""
    n_c, n_t = pairs.shape
    if negligible is None:
        negligible = _NEGLIGIBLE * float(np.finfo(pairs.dtype).eps / np.finfo(np.float32).eps)
    negligible = float(negligible)
    if negligible > 0:
        scale = np.abs(pairs).max(0, initial=0.0) * negligible
        pairs = np.where(np.abs(pairs) < scale[None, :], 0, pairs)  # (NaN kept: no comparison holds)
    n_q = -(-n_c // 4)
    padded = np.zeros((4 * n_q, n_t), dtype=pairs.dtype)
    padded[:n_c] = pairs
    quads = padded.reshape(n_q, 4, n_t).transpose(0, 2, 1)  # [Q, T, 4]
    q_idx, t_idx = np.nonzero((quads != 0).any(2))  # by quad, then entry
    qptr = np.zeros(n_q + 1, dtype=np.int64)
    np.cumsum(np.bincount(q_idx, minlength=n_q), out=qptr[1:])
    return qptr, t_idx.astype(np.int64), np.ascontiguousarray(quads[q_idx, t_idx])


def fisher_stderr(weights: np.ndarray, pairs: np.ndarray, active: np.ndarray, n_threads: int = 1
                  ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`packed_stderr` of the Fisher information ``pairs.T @ weights``, summed here without
    storing it: ``weights [C, P]`` channel-major, ``pairs [C, K (K + 1) / 2]`` the products of
    the design's columns (as ``torch.triu_indices``), both float32 or both float64. Only the
    channel quads where a product is not zero are summed (:func:`quad_table`); the sums of each
    pixel do not depend on the other pixels or the threads."""
    k = active.shape[1]
    where, pos = _packing(k)
    if pairs.shape[1] != pos or weights.shape[0] != pairs.shape[0] or weights.shape[1] != active.shape[0]:
        raise ValueError(f"fisher_stderr: weights {weights.shape}, pairs {pairs.shape} and active {active.shape} "
                         "do not match ([C, P], [C, K (K + 1) / 2], [P, K])")
    if weights.dtype != pairs.dtype:
        raise ValueError(f"fisher_stderr: weights and pairs must share a dtype, got {weights.dtype}, {pairs.dtype}")
    qptr, qpair, qcoef = quad_table(pairs)
    weights = np.ascontiguousarray(weights)
    out = np.empty(active.shape, dtype=weights.dtype)
    ok = np.empty(active.shape[0], dtype=np.bool_)
    _ranges(active.shape[0], lambda lo, hi: _fisher_stderr(weights, qptr, qpair, qcoef, active, where, lo, hi, out, ok,
                                                           _rel(weights)), n_threads)
    return out, ok


def packed_stderr(upper: np.ndarray, active: np.ndarray, n_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Standard errors ``[P, K]`` from the upper triangles ``upper [P, K (K + 1) / 2]`` of
    symmetric information matrices (row by row, as ``torch.triu_indices``), over the ``active
    [P, K]`` entries (NaN elsewhere), and whether each restricted matrix was positive definite
    ``[P]`` (rows where not are left NaN for the caller)."""
    k = active.shape[1]
    where, pos = _packing(k)
    if upper.shape != (active.shape[0], pos):
        raise ValueError(f"packed information {upper.shape} does not match {active.shape[0]} matrices of {k}")
    out = np.empty(active.shape, dtype=upper.dtype)
    ok = np.empty(active.shape[0], dtype=np.bool_)
    _ranges(active.shape[0], lambda lo, hi: _packed_stderr(upper, active, where, lo, hi, out, ok, _rel(upper)),
            n_threads)
    return out, ok
