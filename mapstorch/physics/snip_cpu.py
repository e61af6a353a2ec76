"""XRF-Maps' sequential SNIP sweeps compiled for the CPU (numba), for maps on the CPU.

:func:`mapstorch.physics.snip.snip_window`'s ``"compiled"`` engine. The same steps as its
``"blocked"`` NumPy engine, with the same float operations in the same order, so the same
numbers bit for bit, done a chunk of spectra at a time so that the chunk's channel-major slab
``[Cw, chunk]`` stays in the core's cache from the first step to the last:

1. compiled: the chunk's crop of pixel-major spectra ``[P, C]`` transposed in 16 x 16 tiles,
   XRF-Maps' 5-channel boxcar ``((((x0 + x1) + x2) + x3) + x4) * 0.2`` (0 at the two channels at
   each end of the spectrum) and ``+ 1`` over the window channels, and, if asked, the window's
   counts written channel-major (channel-major spectra ``[C, P]``, the layout of XRF-Maps files,
   are read in place: no transposition, no copy of the counts);
2. NumPy: ``log``, ``+ 1``, ``log`` (numba's scalar ``log``/``exp`` round differently from
   NumPy's SIMD ones in the last bit, so the transcendental functions stay in NumPy);
3. compiled: every pass of the clipping ``v[c] = min(v[c], 0.5 * (v[lo] + v[hi]))``, channel
   after channel in XRF-Maps' order, the innermost loop over the chunk's spectra (SIMD: whole
   64-byte vectors written as LLVM vector code, :func:`_clip_steps`, the last lanes as a loop);
   three passes at a time interleaved, each trailing the one before it by what it reads
   (:func:`_wavefront`), so that they work on the same rows while these are in the L1 cache;
4. ``exp(exp(v) - 1)``: for float32 compiled (:mod:`lls_cpu`: one pass, within 1.01 units in
   the last place per ``exp``; the blocked engine uses it too), for float64 NumPy's ``exp``,
   ``- 1``, ``exp``; compiled: ``- 1``, non-finite values to 0, and the chunk
   written into the channel-major result; if asked, the net counts ``max(y - bg, 0)`` replace
   the slab's rows and are projected on the columns of a matrix, column after column (the
   right-hand side of the NNLS).

Chunks are shared out to ``n_threads`` Python threads (the compiled functions and NumPy's
ufuncs release the GIL). Importing this module compiles nothing; the functions compile on their
first call, or load from numba's on-disk cache.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from mapstorch import simd
from mapstorch.errors import InputError
from mapstorch.parallel import run_chunks
from mapstorch.physics.lls_cpu import EXP_EXP, transform_flat

__all__ = ["SnipPlan", "chunk_size", "nonzeros_by_row", "snip_window_cpu", "sweep_steps"]

_TILE = 16  # the transpose's tile: 16 x 16 values
_SLAB_BYTES = 9 << 16  # a chunk's [Cw, chunk] slab: at most 576 KiB, about half of a core's L2 cache


def chunk_size(n_window: int, itemsize: int) -> int:
    """Spectra per chunk: the largest multiple of the 16-spectrum tile whose ``[n_window, chunk]``
    slab of ``itemsize``-byte values fits in 576 KiB, from 16 to 256 spectra (128 float32 spectra
    of a 1000-channel window; measured fastest on a 1 MiB-L2 core)."""
    fit = _SLAB_BYTES // max(1, n_window * itemsize)
    return int(min(256, max(_TILE, fit // _TILE * _TILE)))


@intrinsic
def _tile_transpose(typingctx, x, row, col, t, t_row, t_col):
    """``t[t_row + i, t_col + j] = x[row + j, col + i]`` for ``i, j < L``, the lanes of a 64-byte
    vector (16 float32, 8 float64): ``L`` rows of ``x`` loaded as vectors, transposed in
    ``log2(L)`` rounds of shuffles (round ``b`` swaps bit ``b`` of the row and column indices
    between pairs of rows), stored as ``L`` rows of ``t``. Both arrays C-contiguous, one dtype;
    the caller keeps the tile inside both. The loop LLVM made of the element-by-element copy
    took 0.36 against 0.23 us per spectrum of 1056 channels."""
    if not (all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" for a in (x, t))
            and x.dtype == t.dtype and x.dtype in (types.float32, types.float64)):
        return None
    sig = types.void(x, row, col, t, t_row, t_col)

    def codegen(context, builder, signature, args):
        xt, rt, ct, tt, trt, tct = signature.args
        src = context.make_array(xt)(context, builder, value=args[0])
        dst = context.make_array(tt)(context, builder, value=args[3])
        vec, lanes = simd.vector_type(context, xt.dtype)
        i64 = ir.IntType(64)
        r0, c0, tr0, tc0 = (simd.int64(context, builder, args[i], signature.args[i]) for i in (1, 2, 4, 5))

        def pointer(arr, r, c):
            base = simd.row_pointer(builder, arr.data, r, builder.extract_value(arr.strides, 0), vec)
            return builder.bitcast(builder.gep(builder.bitcast(base, vec.element.as_pointer()), [c]), vec.as_pointer())

        rows = [builder.load(pointer(src, builder.add(r0, ir.Constant(i64, i)), c0), align=4) for i in range(lanes)]
        bit = 1
        while bit < lanes:
            low = ir.Constant(ir.VectorType(ir.IntType(32), lanes),
                              [c if not c & bit else lanes + c - bit for c in range(lanes)])
            high = ir.Constant(ir.VectorType(ir.IntType(32), lanes),
                               [c + bit if not c & bit else lanes + c for c in range(lanes)])
            out = list(rows)
            for r in range(lanes):
                if not r & bit:
                    out[r] = builder.shuffle_vector(rows[r], rows[r | bit], low)
                    out[r | bit] = builder.shuffle_vector(rows[r], rows[r | bit], high)
            rows = out
            bit *= 2
        for i in range(lanes):
            builder.store(rows[i], pointer(dst, builder.add(tr0, ir.Constant(i64, i)), tc0), align=4)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(nogil=True, cache=True, fastmath=False)
def _load_chunk(x, p0, nb, first, last, fifth, one, t, v, counts, q0):  # pragma: no cover - compiled
    """Spectra ``p0 .. p0 + nb - 1`` of ``x [P, C]``: their crop ``first - 2 .. last + 2``
    transposed into the scratch ``t [>= n_x, >= nb]``, ``boxcar + 1`` of the window channels into
    ``v [Cw, >= nb]``, and (when ``counts`` has rows) the window's counts into
    ``counts[:, q0:q0 + nb]``."""
    n = x.shape[1]
    xa = max(first - 2, 0)
    n_x = min(last + 3, n) - xa
    n_w = last - first + 1
    tile = _TILE
    nb_full = nb - nb % tile
    nx_full = n_x - n_x % tile
    lanes = simd.VECTOR_BYTES // x.itemsize  # the vector tile: 16 float32 or 8 float64
    for j0 in range(0, nb_full, tile):  # full tiles, as vector tiles of shuffles
        for c0 in range(0, nx_full, tile):
            for a in range(0, tile, lanes):
                for b in range(0, tile, lanes):
                    _tile_transpose(x, p0 + j0 + a, xa + c0 + b, t, c0 + b, j0 + a)
        for c in range(nx_full, n_x):
            row = t[c, j0:j0 + tile]
            for j in range(tile):
                row[j] = x[p0 + j0 + j, xa + c]
    for j in range(nb_full, nb):
        src = x[p0 + j, xa:xa + n_x]
        for c in range(n_x):
            t[c, j] = src[c]
    with_counts = counts.shape[0] > 0
    for c in range(n_w):
        k = first + c  # spectrum channel; crop row r
        r = k - xa
        out = v[c, :nb]
        if k >= 2 and k <= n - 3:
            t0 = t[r - 2, :nb]
            t1 = t[r - 1, :nb]
            t2 = t[r, :nb]
            t3 = t[r + 1, :nb]
            t4 = t[r + 2, :nb]
            for j in range(nb):
                out[j] = ((((t0[j] + t1[j]) + t2[j]) + t3[j]) + t4[j]) * fifth + one
        else:
            for j in range(nb):
                out[j] = one  # boxcar 0, plus 1
        if with_counts:
            src_row = t[r, :nb]
            dst_row = counts[c, q0:q0 + nb]
            for j in range(nb):
                dst_row[j] = src_row[j]


@numba.njit(nogil=True, cache=True, fastmath=False)
def _load_chunk_cm(xc, p0, nb, first, last, fifth, one, v, counts, q0):  # pragma: no cover - compiled
    """:func:`_load_chunk` for channel-major spectra ``xc [C, P]``: ``boxcar + 1`` of the window
    channels of spectra ``p0 .. p0 + nb - 1`` into ``v [Cw, >= nb]``, read straight from the
    channel rows (no transposition), with the same float operations; (when ``counts`` has rows)
    the window's counts into ``counts[:, q0:q0 + nb]``."""
    n = xc.shape[0]
    with_counts = counts.shape[0] > 0
    for c in range(last - first + 1):
        k = first + c
        out = v[c, :nb]
        if k >= 2 and k <= n - 3:
            t0 = xc[k - 2, p0:p0 + nb]
            t1 = xc[k - 1, p0:p0 + nb]
            t2 = xc[k, p0:p0 + nb]
            t3 = xc[k + 1, p0:p0 + nb]
            t4 = xc[k + 2, p0:p0 + nb]
            for j in range(nb):
                out[j] = ((((t0[j] + t1[j]) + t2[j]) + t3[j]) + t4[j]) * fifth + one
        else:
            for j in range(nb):
                out[j] = one
        if with_counts:
            src_row = xc[k, p0:p0 + nb]
            dst_row = counts[c, q0:q0 + nb]
            for j in range(nb):
                dst_row[j] = src_row[j]


@numba.njit(nogil=True, cache=True, fastmath=False)
def _sweep_lanes(v, nb, chan, lo, hi, half):  # pragma: no cover - compiled
    """The clipping steps in order on the first ``nb`` spectra of ``v [Cw, >= nb]``, in place
    (a loop LLVM vectorises; :func:`_sweep_chunk` uses it for the lanes after the last full
    SIMD register).

    Each step is ``v[c] = min(v[c], 0.5 * (v[lo] + v[hi]))``, as ``np.minimum`` (NaN when either is
    NaN), written as two selects (a few per cent faster than the test it replaced; LLVM still
    stores through a mask, only where the value changes). A step that reads its own channel
    (``lo == c`` or ``hi == c``: the window's ends, and most channels of the narrow last passes)
    reads it once, through the row it writes: LLVM then vectorises the loop without a run-time
    overlap check, which two views of one row would fail (sending the loop to its scalar
    version)."""
    for k in range(chan.shape[0]):
        c = chan[k]
        a = lo[k]
        b = hi[k]
        row = v[c, :nb]
        if a != c and b != c:
            left = v[a, :nb]
            right = v[b, :nb]
            for j in range(nb):
                m = half * (left[j] + right[j])
                cur = row[j]
                row[j] = (m if m < cur else cur) if m == m else m
        elif b == c:
            left = v[a, :nb]
            for j in range(nb):
                cur = row[j]
                m = half * (left[j] + cur)
                row[j] = (m if m < cur else cur) if m == m else m
        else:
            right = v[b, :nb]
            for j in range(nb):
                cur = row[j]
                m = half * (cur + right[j])
                row[j] = (m if m < cur else cur) if m == m else m


@intrinsic
def _clip_steps(typingctx, v, nvec, chan, lo, hi, half):
    """``v[c, :n] = min(v[c, :n], half * (v[lo, :n] + v[hi, :n]))`` for the steps ``(chan, lo,
    hi)`` in order, over the first ``n = nvec * lanes`` spectra of the C-contiguous ``v [Cw, P]``,
    written as LLVM vector code (:mod:`mapstorch.simd`: 64-byte vectors), NaN kept as
    ``np.minimum`` keeps it, the same float operations as :func:`_sweep_lanes` (so the same
    numbers bit for bit). LLVM's loop vectoriser, given the loop of :func:`_sweep_lanes`, checks
    at run time that the three rows do not overlap and branches on whether a row is read twice,
    once per step; here loads and stores are explicit, a step costs its vectors and three
    indices (1.3-1.4x faster on a 1000-channel window, 128 spectra)."""
    if not (isinstance(v, types.Array) and v.ndim == 2 and v.layout == "C"
            and v.dtype in (types.float32, types.float64)):
        return None
    sig = types.void(v, nvec, chan, lo, hi, half)

    def codegen(context, builder, signature, args):
        vt, nt, ct, lt, ht, hft = signature.args
        arr = context.make_array(vt)(context, builder, value=args[0])
        steps = [context.make_array(t)(context, builder, value=a) for t, a in zip((ct, lt, ht), args[2:5])]
        vec, _ = simd.vector_type(context, vt.dtype)
        half_vec = simd.splat(builder, vec, context.cast(builder, args[5], hft, vt.dtype))
        row_bytes = builder.extract_value(arr.strides, 0)
        with cgutils.for_range(builder, builder.extract_value(steps[0].shape, 0)) as step:
            row, left, right = (
                simd.row_pointer(builder, arr.data, simd.int64(context, builder, builder.load(
                    builder.gep(a.data, [step.index])), ct.dtype), row_bytes, vec) for a in steps)
            with cgutils.for_range(builder, simd.int64(context, builder, args[1], nt)) as j:
                target = builder.gep(row, [j.index])
                a_ = builder.load(builder.gep(left, [j.index]), align=4)
                b_ = builder.load(builder.gep(right, [j.index]), align=4)
                cur = builder.load(target, align=4)
                m = builder.fmul(half_vec, builder.fadd(a_, b_))
                low = builder.select(builder.fcmp_ordered("<", m, cur), m, cur)
                builder.store(builder.select(builder.fcmp_unordered("uno", m, m), m, low), target, align=4)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(nogil=True, cache=True, fastmath=False)
def _sweep_chunk(v, nb, chan, lo, hi, half):  # pragma: no cover - compiled
    """The clipping steps in order on the first ``nb`` spectra of the C-contiguous ``v [Cw, >= nb]``,
    in place: whole vectors by :func:`_clip_steps`, the rest by :func:`_sweep_lanes`."""
    lanes = simd.VECTOR_BYTES // v.itemsize
    full = nb // lanes
    if full > 0:
        _clip_steps(v, full, chan, lo, hi, half)
    if nb > full * lanes:
        _sweep_lanes(v[:, full * lanes:], nb - full * lanes, chan, lo, hi, half)


@numba.njit(nogil=True, cache=True, fastmath=False)
def _store_chunk(v, nb, one, out, p0, t, r0, t0, net):  # pragma: no cover - compiled
    """``out[:, p0:p0 + nb] = v - 1`` with non-finite values 0; ``v [Cw, >= nb]``. Where
    ``net[c]`` (the channels a projection reads), ``v``'s row ``c`` is then overwritten with the
    net counts ``max(counts - background, 0)`` (NaN kept, as torch's clamp); the counts of window
    channel ``c`` are ``t[r0 + c, t0:t0 + nb]`` (the transposed crop, or channel-major spectra)."""
    zero = one - one
    for c in range(v.shape[0]):
        src = v[c, :nb]
        dst = out[c, p0:p0 + nb]
        for j in range(nb):
            e = src[j] - one
            dst[j] = e if e - e == zero else zero
        if net[c]:
            cnt = t[r0 + c, t0:t0 + nb]
            for j in range(nb):
                d = cnt[j] - dst[j]
                src[j] = zero if d < zero else d


@numba.njit(nogil=True, cache=True, fastmath=False)
def _project_loop(v, j0, nb, cptr, cval, crow, proj, p0):  # pragma: no cover - compiled
    """``proj[k, p0 + j] = sum_e cval[e] v[crow[e], j]`` for the spectra ``j0 <= j < nb`` over
    column ``k``'s non-zeros ``cptr[k] .. cptr[k + 1] - 1`` (in channel order), summed in ``v``'s
    dtype channel after channel (as a matrix product would). Four channels per pass over the
    lanes, the partial sum kept in a register between them (the same roundings, in the same
    order, as four passes)."""
    zero = v.dtype.type(0)
    for k in range(proj.shape[0]):
        acc = proj[k, p0:p0 + nb]
        for j in range(j0, nb):
            acc[j] = zero
        e = cptr[k]
        end = cptr[k + 1]
        while e + 4 <= end:  # (LLVM still vectorises four rows read with one written; eight it does not)
            r1 = v[crow[e], :nb]
            r2 = v[crow[e + 1], :nb]
            r3 = v[crow[e + 2], :nb]
            r4 = v[crow[e + 3], :nb]
            c1 = cval[e]
            c2 = cval[e + 1]
            c3 = cval[e + 2]
            c4 = cval[e + 3]
            for j in range(j0, nb):
                acc[j] = (((acc[j] + c1 * r1[j]) + c2 * r2[j]) + c3 * r3[j]) + c4 * r4[j]
            e += 4
        while e < end:
            r1 = v[crow[e], :nb]
            c1 = cval[e]
            for j in range(j0, nb):
                acc[j] = acc[j] + c1 * r1[j]
            e += 1


_PROJECT_BLOCK = 8  # vectors of spectra whose projections are summed side by side, in registers


@intrinsic
def _project_lanes(typingctx, v, nvec, cptr, cval, crow, proj, p0):
    """:func:`_project_loop` for the first ``nvec`` whole vectors of spectra, written as LLVM
    vector code (:mod:`mapstorch.simd`): each column's sums stay in registers,
    :data:`_PROJECT_BLOCK` vectors side by side, from the first non-zero to the last (the loop
    loaded and stored them every four); the same float operations in the same order, so the
    same bits. Both arrays C-contiguous, of one dtype."""
    if not (all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" for a in (v, proj))
            and v.dtype == proj.dtype == cval.dtype and v.dtype in (types.float32, types.float64)):
        return None
    sig = types.void(v, nvec, cptr, cval, crow, proj, p0)

    def codegen(context, builder, signature, args):
        vt, nt, pt, ct, rt, qt, p0t = signature.args
        slab = context.make_array(vt)(context, builder, value=args[0])
        ptr, val, row_of = (context.make_array(t)(context, builder, value=a) for t, a in zip((pt, ct, rt), args[2:5]))
        out = context.make_array(qt)(context, builder, value=args[5])
        vec, lanes = simd.vector_type(context, vt.dtype)
        i64 = ir.IntType(64)
        n_vec = simd.int64(context, builder, args[1], nt)
        first = simd.int64(context, builder, args[6], p0t)
        slab_bytes = builder.extract_value(slab.strides, 0)
        out_bytes = builder.extract_value(out.strides, 0)
        zero = ir.Constant(vec, [0.0] * lanes)
        sums = [cgutils.alloca_once(builder, vec) for _ in range(_PROJECT_BLOCK)]

        def index(arr, i, typ):
            return simd.int64(context, builder, builder.load(builder.gep(arr.data, [i])), typ.dtype)

        def columns(v0, width):
            with cgutils.for_range(builder, builder.extract_value(out.shape, 0)) as col:
                k = col.index
                for u in range(width):
                    builder.store(zero, sums[u])
                e0 = index(ptr, k, pt)
                e1 = index(ptr, builder.add(k, ir.Constant(i64, 1)), pt)
                with cgutils.for_range_slice(builder, e0, e1, ir.Constant(i64, 1), i64) as (e, _):
                    coef = simd.splat(builder, vec, builder.load(builder.gep(val.data, [e])))
                    src = simd.row_pointer(builder, slab.data, index(row_of, e, rt), slab_bytes, vec)
                    for u in range(width):
                        x = builder.load(builder.gep(src, [builder.add(v0, ir.Constant(i64, u))]), align=4)
                        builder.store(builder.fadd(builder.load(sums[u]), builder.fmul(coef, x)), sums[u])
                dst = builder.bitcast(simd.row_pointer(builder, out.data, k, out_bytes, vec), vec.element.as_pointer())
                dst = builder.bitcast(builder.gep(dst, [first]), vec.as_pointer())
                for u in range(width):
                    builder.store(builder.load(sums[u]), builder.gep(dst, [builder.add(v0, ir.Constant(i64, u))]),
                                  align=4)

        simd.in_blocks(builder, n_vec, _PROJECT_BLOCK, columns)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(nogil=True, cache=True, fastmath=False)
def _project_chunk(v, nb, cptr, cval, crow, proj, p0):  # pragma: no cover - compiled
    """``proj[k, p0:p0 + nb] = sum_e cval[e] v[crow[e], :nb]`` over column ``k``'s non-zeros
    (:func:`_project_loop`'s numbers): whole vectors of spectra by :func:`_project_lanes`, the
    lanes after them by the loop."""
    lanes = simd.VECTOR_BYTES // v.itemsize
    full = nb // lanes
    if full > 0:
        _project_lanes(v, full, cptr, cval, crow, proj, p0)
    if nb > full * lanes:
        _project_loop(v, full * lanes, nb, cptr, cval, crow, proj, p0)


@numba.njit(nogil=True, cache=True)
def _roi_chunk(src, row0, col0, nb, lo, hi, out, p0):  # pragma: no cover - compiled
    """``out[k, p0:p0 + nb]``: the sum of ``src``'s rows ``lo[k] - row0 .. hi[k] - row0``, columns
    ``col0 .. col0 + nb - 1`` (a chunk's spectra, channel-major), in float64 channel after
    channel: XRF-Maps' ROI counts, while the chunk is in the cache."""
    acc = np.empty(nb, dtype=np.float64)
    for k in range(lo.shape[0]):
        for j in range(nb):
            acc[j] = 0.0
        for c in range(lo[k], hi[k] + 1):
            row = src[c - row0]
            for j in range(nb):
                acc[j] += row[col0 + j]
        for j in range(nb):
            out[k, p0 + j] = acc[j]


def nonzeros_by_row(matrix: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-zero entries of ``matrix [R, K]`` row by row: ``(ptr [R + 1], values, columns)``,
    row ``r``'s entries at ``ptr[r] .. ptr[r + 1] - 1`` in column order (values as ``dtype``,
    columns and pointers int64): how the compiled kernels walk a design matrix whose components
    are zero over most channels."""
    rows, cols = np.nonzero(matrix)  # row-major order
    ptr = np.zeros(matrix.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=matrix.shape[0]), out=ptr[1:])
    return ptr, np.ascontiguousarray(matrix[rows, cols], dtype=dtype), cols.astype(np.int64)


def sweep_steps(plans: list[tuple[np.ndarray, np.ndarray]], lo_limit: int, up_limit: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The clipping steps ``(channel, lo, hi)``, int64 ``[steps]``, of the passes in sweep order,
    in window channels (``0`` is channel ``lo_limit`` of the plans).

    plans : per pass ``(lo, hi)``, the channels each channel reads, int ``[C]``
    (:func:`mapstorch.physics.snip._sweep_plan`). Steps that cannot change a value (a channel
    reading only itself: ``min(v, 0.5 * (v + v)) == v``) are left out.
    """
    ch, lo, hi = [], [], []
    c = np.arange(lo_limit, up_limit + 1)
    for plan_lo, plan_hi in plans:
        pl = np.asarray(plan_lo[lo_limit:up_limit + 1], dtype=np.int64)
        ph = np.asarray(plan_hi[lo_limit:up_limit + 1], dtype=np.int64)
        if pl.shape != c.shape or ph.shape != c.shape:
            raise InputError(f"SNIP sweep plan of {len(plan_lo)} channels does not cover the window "
                             f"{lo_limit}..{up_limit}")
        if min(pl.min(), ph.min()) < lo_limit or max(pl.max(), ph.max()) > up_limit:
            raise InputError(f"SNIP sweep reads channels outside the window {lo_limit}..{up_limit} "
                             "(a negative SNIP width?)")
        keep = (pl != c) | (ph != c)
        ch.append(c[keep] - lo_limit)
        lo.append(pl[keep] - lo_limit)
        hi.append(ph[keep] - lo_limit)
    if not ch:
        return tuple(np.zeros(0, dtype=np.int64) for _ in range(3))
    passes = list(zip(ch, lo, hi))
    groups = [_wavefront(passes[g:g + _WAVE_PASSES]) for g in range(0, len(passes), _WAVE_PASSES)]
    return tuple(np.ascontiguousarray(np.concatenate([grp[i] for grp in groups])) for i in range(3))


_WAVE_PASSES = 3  # passes interleaved as one wavefront (2: 8 % faster sweeps, 3: 9 %, 6: 8 %, 18: 2 %)


def _wavefront(passes: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """The steps ``(channel, lo, hi)`` of consecutive passes interleaved, each pass trailing the
    one before it, so that every step reads the values it reads in pass order.

    In pass order a chunk's slab (half a megabyte) streams through the core's L1 cache once per
    pass; interleaved, a few passes work on the same rows while they are in L1, and the steps,
    the same float operations on the same values, give the same numbers bit for bit. A step of
    pass ``q`` runs once each earlier pass ``p`` of the group has made every step that writes a
    channel it reads (read after write: all of ``p``'s steps up to its largest channel read, as
    ``p``'s channels ascend) and every step that reads the channel it writes (write after read).
    The earliest pass never waits, so the interleaving always completes."""
    if len(passes) == 1:
        return passes[0]
    k = len(passes)
    need = {}
    for q in range(1, k):
        cq, lq, hq = passes[q]
        top = np.maximum(np.maximum(lq, cq), hq)
        for p in range(q):
            cp, lp, hp = passes[p]
            width = int(max(top.max(initial=0), cp.max(initial=0), lp.max(initial=0), hp.max(initial=0))) + 1
            last_read = np.zeros(width, dtype=np.int64)  # 1 + the last step of p reading each channel
            steps = np.arange(1, cp.size + 1)
            for reads in (lp, cp, hp):
                np.maximum.at(last_read, reads, steps)
            raw = np.searchsorted(cp, top, side="right")  # p's channels ascend
            need[p, q] = np.maximum(raw, last_read[cq]).tolist()
    size = np.array([len(t[0]) for t in passes], dtype=np.int64)
    table = np.zeros((k, k, int(size.max())), dtype=np.int64)  # table[p, q, i]: pass q's step i waits for p
    for (p, q), values in need.items():
        table[p, q, :len(values)] = values
    order = _interleave(table, size)
    return tuple(np.concatenate([t[i] for t in passes])[order] for i in range(3))


@numba.njit(cache=True)
def _interleave(need, size):  # pragma: no cover - compiled
    """:func:`_wavefront`'s order: indices into the passes' steps laid end to end, pass 0 a step
    at a time, each later pass as far as ``need[p, q, i] <= done[p]`` lets it after each."""
    k = size.shape[0]
    start = np.zeros(k, dtype=np.int64)
    for q in range(1, k):
        start[q] = start[q - 1] + size[q - 1]
    done = np.zeros(k, dtype=np.int64)
    order = np.empty(size.sum(), dtype=np.int64)
    n = 0
    while n < order.shape[0]:
        if done[0] < size[0]:
            order[n] = done[0]
            n += 1
            done[0] += 1
        for q in range(1, k):
            while done[q] < size[q]:
                ready = True
                for p in range(q):
                    if need[p, q, done[q]] > done[p]:
                        ready = False
                        break
                if not ready:
                    break
                order[n] = start[q] + done[q]
                n += 1
                done[q] += 1
    return order


_NO_INDEX = np.zeros(0, dtype=np.int64)
_NO_ROI = np.zeros((0, 0), dtype=np.float32)


@numba.njit(nogil=True, cache=True, fastmath=False)
def _load_chunk_roi(x, p0, nb, first, last, fifth, one, t, v, counts, q0, channel_major, roi_lo, roi_hi, roi_in,
                    xa):  # pragma: no cover - compiled
    """:func:`_load_chunk` (or :func:`_load_chunk_cm`) and :func:`_roi_chunk` of the ROI windows
    ``roi_lo .. roi_hi`` (none: empty) in one call: a compiled function's call from Python costs
    about half a microsecond per array it is given."""
    if channel_major:
        _load_chunk_cm(x, p0, nb, first, last, fifth, one, v, counts, q0)
        if roi_lo.shape[0] > 0:
            _roi_chunk(x, 0, p0, nb, roi_lo, roi_hi, roi_in, q0)
    else:
        _load_chunk(x, p0, nb, first, last, fifth, one, t, v, counts, q0)
        if roi_lo.shape[0] > 0:
            _roi_chunk(t, xa, 0, nb, roi_lo, roi_hi, roi_in, q0)


@numba.njit(nogil=True, cache=True, fastmath=False)
def _store_and_project(v, nb, one, out, q0, src, r0, t0, net, project, cptr, cval, crow,
                       proj):  # pragma: no cover - compiled
    """:func:`_store_chunk`, then (``project``) :func:`_project_chunk`, in one call."""
    _store_chunk(v, nb, one, out, q0, src, r0, t0, net)
    if project:
        _project_chunk(v, nb, cptr, cval, crow, proj, q0)


@numba.njit(nogil=True, cache=True, fastmath=False)
def _sweep_to_projections(chan, lo, hi, half, v, nb, one, out, q0, src, r0, t0, net, project, cptr, cval, crow,
                          proj):  # pragma: no cover - compiled
    """For float32: :func:`_sweep_chunk`, the inverse transform ``exp(exp(v) - 1)`` in place
    (:mod:`lls_cpu`) and :func:`_store_and_project`, in one call."""
    _sweep_chunk(v, nb, chan, lo, hi, half)
    transform_flat(v.reshape(-1), EXP_EXP)
    _store_and_project(v, nb, one, out, q0, src, r0, t0, net, project, cptr, cval, crow, proj)


class SnipPlan:
    """The validated constants of a compiled SNIP over the window ``first..last`` of spectra
    with ``n`` channels (``channel_major``: stored ``[C, P]``), and its work on one chunk of
    spectra (:meth:`chunk_work`), which :func:`snip_window_cpu` and the map fit's fused pass
    (:mod:`mapstorch.maps.nnls_fused_cpu`) share out to threads.

    steps : the clipping steps ``(channel, lo, hi)`` in window channels (:func:`sweep_steps`);
    project : ``[Cw, K]`` or None, the matrix the net counts are projected on; roi : the ROI
    windows ``(first, last)`` (channel arrays) or None.
    """

    def __init__(self, n: int, first: int, last: int, steps, dtype, channel_major: bool = False,
                 project: np.ndarray | None = None, roi: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        if not 0 <= first <= last < n:
            raise InputError(f"SNIP window ({first}, {last}) lies outside the {n} channels")
        self.n, self.first, self.last, self.channel_major = n, first, last, channel_major
        self.n_w = n_w = last - first + 1
        chan, lo, hi = (np.ascontiguousarray(s, dtype=np.int64) for s in steps)
        if not chan.shape == lo.shape == hi.shape or chan.ndim != 1:
            raise InputError(f"SNIP sweep steps must be three int arrays [steps] of one length, got shapes "
                             f"{chan.shape}, {lo.shape}, {hi.shape}")
        if chan.size and (min(chan.min(), lo.min(), hi.min()) < 0 or max(chan.max(), lo.max(), hi.max()) >= n_w):
            raise InputError(f"SNIP sweep steps reach outside the {n_w}-channel window")
        self.steps = (chan, lo, hi)
        self.dtype = np.dtype(dtype)
        kind = self.dtype.type
        self.fifth, self.one, self.half = kind(0.2), kind(1.0), kind(0.5)
        self.xa = xa = max(first - 2, 0)  # the crop of pixel-major spectra: the window and the smoothing's reach
        self.n_x = min(last + 3, n) - xa
        self.r0 = first - xa  # the crop row of window channel 0
        self.chunk = chunk_size(n_w, self.dtype.itemsize)
        self.n_k = 0
        self.net = np.zeros(n_w, dtype=np.bool_)
        if project is not None:
            project = np.asarray(project)
            if project.ndim != 2 or project.shape[0] != n_w:
                raise InputError(f"the matrix to project the net counts on must be [{n_w}, K] (window channels "
                                 f"first), got {project.shape}")
            self.cptr, self.cval, self.crow = nonzeros_by_row(np.ascontiguousarray(project.T), self.dtype)  # by column
            self.net = np.asarray((project != 0).any(1))  # the channels the projections read
            self.n_k = project.shape[1]
        self.project = project is not None
        self.roi = roi is not None
        if roi is not None:
            r_lo, r_hi = (np.ascontiguousarray(v, dtype=np.int64) for v in roi)
            if r_lo.shape != r_hi.shape or r_lo.ndim != 1 or (r_lo.size and (r_lo.min() < 0 or r_hi.max() >= n
                                                                              or (r_lo > r_hi).any())):
                raise InputError(f"ROI windows must be (first, last) channel arrays of one length within the {n} "
                                 f"channels, first <= last; got {r_lo.tolist()}, {r_hi.tolist()}")
            self.r_lo, self.r_hi = r_lo, r_hi
            # windows the chunk's crop holds are summed with it; others (pixel-major) from the spectra
            self.inside = np.ones(r_lo.size, dtype=bool) if channel_major else (r_lo >= xa) & (r_hi < xa + self.n_x)
            self.in_lo, self.in_hi = r_lo[self.inside], r_hi[self.inside]

    def scratch(self) -> tuple[np.ndarray, np.ndarray]:
        """A thread's work arrays: the transposed crop ``t [n_x, chunk]`` (none for channel-major
        spectra) and the slab ``[Cw, chunk]``."""
        return (simd.empty((0 if self.channel_major else self.n_x, self.chunk), self.dtype),
                simd.empty((self.n_w, self.chunk), self.dtype))

    def chunk_work(self, x: np.ndarray, p0: int, nb: int, t: np.ndarray, slab: np.ndarray, out: np.ndarray, q0: int,
                   counts: np.ndarray, proj: np.ndarray | None, roi_in: np.ndarray | None) -> np.ndarray:
        """Spectra ``p0 .. p0 + nb - 1`` of ``x``: their background into ``out[:, q0:q0 + nb]``
        (channel-major), the window's counts into ``counts[:, q0:q0 + nb]`` (when it has rows),
        the projections into ``proj[:, q0:q0 + nb]`` and the ROI counts into
        ``roi_in[:, q0:q0 + nb]`` where the plan has them. Returns the slab used, which holds the
        net counts ``max(counts - background, 0)`` in the rows the projections read (else
        ``background + 1``). Call within ``np.errstate(over="ignore", invalid="ignore",
        divide="ignore")``."""
        first, last, one = self.first, self.last, self.one
        chan, lo, hi = self.steps
        # NumPy's ufuncs on whole C-contiguous arrays, as in the blocked engine
        v = slab if nb == slab.shape[1] else simd.empty((self.n_w, nb), self.dtype)
        rois = self.roi and self.in_lo.size
        _load_chunk_roi(x, p0, nb, first, last, self.fifth, one, t, v, counts, q0, self.channel_major,
                        self.in_lo if rois else _NO_INDEX, self.in_hi if rois else _NO_INDEX,
                        roi_in if rois else _NO_ROI, self.xa)
        np.log(v, out=v)
        v += one
        np.log(v, out=v)
        src, r0, t0 = (x, first, p0) if self.channel_major else (t, self.r0, 0)  # the counts, channel-major
        project = self.project and proj is not None
        args = (v, nb, one, out, q0, src, r0, t0, self.net, project, self.cptr if project else _NO_INDEX,
                self.cval if project else v[:0, 0], self.crow if project else _NO_INDEX,
                proj if project else v[:0, :0])
        if v.dtype == np.float32:  # the inverse transform compiled too (lls_cpu): one call for the rest
            _sweep_to_projections(chan, lo, hi, self.half, *args)
        else:
            _sweep_chunk(v, nb, chan, lo, hi, self.half)
            np.exp(v, out=v)
            v -= one
            np.exp(v, out=v)
            _store_and_project(*args)
        return v

    def roi_outside(self, x: np.ndarray, roi_in: np.ndarray) -> np.ndarray:
        """All ROI counts ``[R, P]`` float32: ``roi_in`` (the windows :meth:`chunk_work` summed)
        and, for pixel-major spectra, the windows outside the crop summed from ``x``."""
        roi_out = np.empty((self.r_lo.size, roi_in.shape[1]), dtype=np.float32)
        roi_out[self.inside] = roi_in
        for k in np.flatnonzero(~self.inside):
            roi_out[k] = x[:, self.r_lo[k]:self.r_hi[k] + 1].sum(1, dtype=np.float64)
        return roi_out


def _check_spectra(x, channel_major: bool) -> None:
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype not in (np.float32, np.float64) \
            or not x.flags.c_contiguous:
        raise InputError(f"the compiled SNIP needs C-contiguous float32/float64 spectra {'[C, P]' if channel_major else '[P, C]'}, "
                         f"got {getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")


def snip_window_cpu(x: np.ndarray, first: int, last: int, steps: tuple[np.ndarray, np.ndarray, np.ndarray],
                    with_counts: bool = False, n_threads: int = 1, project: np.ndarray | None = None,
                    channel_major: bool = False, roi: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> tuple:
    """XRF-Maps' SNIP background of pixel-major spectra ``x [P, C]`` (C-contiguous float32 or
    float64; with ``channel_major``, ``x [C, P]``: the spectra's transpose, as XRF-Maps files
    store them) over the window channels ``first..last``, channel-major: ``[Cw, P]``. Both
    layouts give the same numbers bit for bit.

    steps : the clipping steps ``(channel, lo, hi)`` in window channels (:func:`sweep_steps`).
    With ``with_counts`` also returns the window's counts ``[Cw, P]``, C-contiguous (else None):
    a copy of ``x[:, first:last + 1].T``, or with ``channel_major`` the view ``x[first:last + 1]``.
    With ``project`` (``[Cw, K]``) third the net counts ``max(counts - background, 0)``
    projected on its columns, ``[K, P]``: the right-hand side of a least-squares fit of the net
    counts, computed while each chunk of spectra is in the cache (the net counts themselves are
    not stored), over the matrix's non-zero entries, summed channel after channel in ``x``'s
    dtype. With ``roi`` (``(first, last)`` channel arrays ``[K]``, any channels of the spectrum) last
    the raw counts in each window, ``[K, P]`` float32, summed in float64 channel after channel while
    each chunk is in the cache (windows outside the SNIP's crop of pixel-major spectra are summed
    from the spectra afterwards). Runs on up to ``n_threads`` threads.
    """
    _check_spectra(x, channel_major)
    n, n_pix = x.shape if channel_major else x.shape[::-1]
    plan = SnipPlan(n, first, last, steps, x.dtype, channel_major, project, roi)
    n_w, chunk = plan.n_w, plan.chunk
    out = simd.empty((n_w, n_pix), x.dtype)
    # the window's counts (channel-major spectra: a view of them, made at the end)
    counts = simd.empty((n_w, n_pix) if with_counts and not channel_major else (0, 0), x.dtype)
    proj = simd.empty((plan.n_k, n_pix), x.dtype) if project is not None else None
    roi_in = np.empty((plan.in_lo.size, n_pix), dtype=np.float32) if roi is not None else None

    def work(chunks):
        t, slab = plan.scratch()  # this thread's
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for i in chunks:
                p0 = i * chunk
                plan.chunk_work(x, p0, min(chunk, n_pix - p0), t, slab, out, p0, counts, proj, roi_in)

    run_chunks(work, -(-n_pix // chunk), n_threads, name="mapstorch-snip")
    if channel_major and with_counts:
        counts = x[first:last + 1]
    result = (out, counts if with_counts else None) + ((proj,) if project is not None else ())
    if roi is None:
        return result
    return result + (plan.roi_outside(x, roi_in),)
