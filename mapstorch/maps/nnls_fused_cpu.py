"""The NNLS fit of a map's chunk on the CPU, a group of pixels at a time while its spectra are
in the cache (numba kernels of :mod:`snip_cpu`, :mod:`nnls_cpu` and :mod:`chi2_cpu`).

Done step by step over a whole chunk, the fit writes the chunk's SNIP background and its
window's counts channel-major (two ``[Cw, P]`` arrays, 4 kB per pixel each for a 1000-channel
window), then reads both back for the chi-square and the Fisher information, and once more for
the integrated background: memory traffic that cost about a third of the SNIP's time on a map
larger than the caches. Here each thread takes a group of :data:`GROUP` pixels through every
step: the spectra's total counts, the SNIP and the projections of the net counts (a cache-sized
chunk of spectra at a time, into the group's own background and counts arrays, reused from
group to group, so they stay in the caches), the NNLS iterations, the chi-square and standard
errors, the group's share of the integrated background, and the group's columns of the float32
maps (:func:`_finish`, what ``fit._nnls_output`` makes of the same arrays). Only per-pixel
results leave the group.

The numbers are those of the step-by-step path (:func:`mapstorch.maps.fit._fit_chunk`) with
the same kernels, except the NNLS start, the unconstrained solution clipped at 0, whose sums
run here in index order (a BLAS product rounds differently in the last bits), and the integrated
background, summed here in float64: amplitudes agree to the solver's tolerance.
"""

from __future__ import annotations

import os

import numba
import numpy as np

from mapstorch import simd
from mapstorch.errors import InputError
from mapstorch.maps import chi2_cpu, nnls_cpu, spd_cpu
from mapstorch.parallel import run_chunks
from mapstorch.physics.snip_cpu import SnipPlan, nonzeros_by_row

__all__ = ["GROUP", "NnlsTables", "fit_nnls_cpu"]

GROUP = 512  # pixels per group: the Fisher information's block (spd_cpu._FISHER_PIXELS)
_TAIL_GROUPS, _TAIL_SPLIT = 2, 4  # the last two groups' pixels go out as groups a quarter the size


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _start(proj, norms, inverse, b, x, scale, p0, n):  # pragma: no cover - compiled
    """For pixels ``p0 .. p0 + n - 1`` (column ``j`` of the group's projections ``proj [K, >= n]``
    is pixel ``p0 + j``): ``b = proj.T / norms`` (the normalised right-hand side), ``scale =
    ||b||`` and the start ``x = max(b @ inverse, 0)`` (NaN kept, as torch's clamp). Each pixel's
    sums run in index order; the loops run over the pixels innermost (SIMD)."""
    k = norms.shape[0]
    zero = b.dtype.type(0)
    bt = np.empty((k, n), dtype=b.dtype)  # b, component-major
    acc = np.empty(n, dtype=b.dtype)
    for j in range(n):
        acc[j] = zero
    for c in range(k):
        src, dst, norm = proj[c], bt[c], norms[c]
        for j in range(n):
            v = src[j] / norm
            dst[j] = v
            acc[j] += v * v
    for j in range(n):
        scale[p0 + j] = np.sqrt(acc[j])
        for c in range(k):
            b[p0 + j, c] = bt[c, j]
    for c in range(k):
        for j in range(n):
            acc[j] = zero
        for r in range(k):
            row, coef = bt[r], inverse[r, c]
            for j in range(n):
                acc[j] += row[j] * coef
        for j in range(n):
            s = acc[j]
            x[p0 + j, c] = zero if s < zero else s


@numba.njit(nogil=True, cache=True, error_model="numpy", fastmath={"reassoc"})
def _finite_sums(bg, n, a, chi, p0, out):  # pragma: no cover - compiled
    """``out[c] = sum_j bg[c, j]`` (float64) over the group's pixels ``j < n`` whose amplitudes
    ``a[p0 + j]`` and chi-square ``chi[p0 + j]`` are finite (what the integrated background
    counts; the background itself is always finite). The additions may be reordered (numba's
    ``reassoc`` flag, this function only): LLVM then sums in SIMD lanes, 3x faster than eight
    chains of scalar additions. The order is fixed by the compiled code, so the sums do not
    depend on the threads."""
    k = a.shape[1]
    keep = np.zeros(n, dtype=np.float64)
    for j in range(n):
        ok = np.isfinite(chi[p0 + j])
        for c in range(k):
            ok = ok and np.isfinite(a[p0 + j, c])
        keep[j] = 1.0 if ok else 0.0
    for c in range(bg.shape[0]):
        row = bg[c]
        s = 0.0
        for j in range(n):
            s += np.float64(row[j]) * keep[j]
        out[c] = s


@numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
def _spectrum_sums(x, p0, n, out):  # pragma: no cover - compiled
    """``out[j] = sum_c x[p0 + j, c]`` (summed in float64, stored as float32) for the pixel-major
    spectra ``x [P, C]``, ``j < n``: each pixel's total counts. The additions may be reordered
    (numba's ``reassoc``, this function only, so that LLVM sums in SIMD lanes); the order is
    fixed by the compiled code. Counts that are integers sum exactly in any order."""
    for j in range(n):
        row = x[p0 + j]
        s = 0.0
        for c in range(row.shape[0]):
            s += np.float64(row[c])
        out[j] = np.float32(s)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _spectrum_sums_cm(xc, p0, n, out):  # pragma: no cover - compiled
    """:func:`_spectrum_sums` for channel-major spectra ``xc [C, P]``: the float64 sums channel
    after channel, the loop over the pixels innermost (SIMD)."""
    acc = np.zeros(n, dtype=np.float64)
    for c in range(xc.shape[0]):
        row = xc[c, p0:p0 + n]
        for j in range(n):
            acc[j] += np.float64(row[j])
    for j in range(n):
        out[j] = np.float32(acc[j])


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _finish(a, se, chi, done, per_unit, n_w, p0, n, amps, amps_err, cnt, cnt_err, rchi2, status,
            a_sum):  # pragma: no cover - compiled
    """The per-pixel results of pixels ``p0 .. p0 + n - 1``, as ``fit._nnls_output`` makes them
    from the same arrays (the same operations in the same dtype, so the same numbers): the
    reduced chi-square ``chi / max(Cw - active, 1)`` in ``a``'s dtype, the status (0 converged,
    1 not, 2 not finite), the amplitudes (0 where not finite) and their errors, both also times
    ``per_unit``, into the float32 maps ``[K, P]`` and ``[P]``; ``a_sum[c] +=`` the amplitudes
    kept (float64, pixel after pixel)."""
    k = a.shape[1]
    zero = a.dtype.type(0)
    keep = np.empty(n, dtype=np.bool_)
    for j in range(n):
        p = p0 + j
        used = 0
        fin = True
        for c in range(k):
            v = a[p, c]
            if v > zero:
                used += 1
            if not np.isfinite(v):
                fin = False
        dof = n_w - used
        r = a.dtype.type(chi[p]) / a.dtype.type(dof if dof > 1 else 1)
        fin = fin and np.isfinite(r)
        keep[j] = fin
        rchi2[p] = np.float32(r)
        status[p] = (0 if done[p] else 1) if fin else 2
    for c in range(k):  # a map's row at a time: contiguous writes
        pu = per_unit[c]
        row_a, row_ae, row_c, row_ce = amps[c], amps_err[c], cnt[c], cnt_err[c]
        total = 0.0
        for j in range(n):
            p = p0 + j
            v = a[p, c] if keep[j] else zero
            e = se[p, c]
            row_a[p] = np.float32(v)
            row_c[p] = np.float32(v * pu)
            row_ae[p] = np.float32(e)
            row_ce[p] = np.float32(e * pu)
            total += np.float64(v)
        a_sum[c] += total


def _group_spans(n_pix: int, group: int) -> list[tuple[int, int]]:
    """The groups ``(first pixel, pixels)`` of ``n_pix`` pixels: ``group`` pixels each, except that
    the pixels of the last :data:`_TAIL_GROUPS` full-size groups go out in groups
    :data:`_TAIL_SPLIT` times smaller, so that the threads finish the chunk together (a thread
    that took the last full group kept the other waiting up to a whole group's time). The same
    groups on any number of threads."""
    tail = min(n_pix, _TAIL_GROUPS * group)
    head = n_pix - tail
    small = max(1, group // _TAIL_SPLIT)
    return ([(g0, min(group, head - g0)) for g0 in range(0, head, group)]
            + [(g0, min(small, n_pix - g0)) for g0 in range(head, n_pix, small)])


def _read_rows(fd: int, offset: int, out: np.ndarray, path: str) -> None:
    """``out`` (C-contiguous) filled from the file's bytes at ``offset`` (``pread``, which
    releases the GIL); a file that ends short is an InputError (it was cut while mapped)."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise InputError(f"{path} ends at byte {offset + done}, short of the {len(view) - done} bytes of spectra "
                             "still to read: was the file cut or rewritten while the map was being fitted?")
        done += got


class NnlsTables:
    """What :func:`fit_nnls_cpu` derives from the design and the SNIP alone, once per map.

    plan : the SNIP's (:func:`mapstorch.physics.snip.compiled_plan`), projecting the net counts
    on ``design [Cw, K]``; pairs : the products of the design's columns ``[Cw, K (K + 1) / 2]``
    (as ``torch.triu_indices``); ``norms, gram, lip, inverse``: :func:`solvers.nnls_setup`'s;
    per_unit : ``[K]`` or None, each column's counts per unit amplitude (with it
    :func:`fit_nnls_cpu` also makes the maps).
    """

    def __init__(self, plan: SnipPlan, design: np.ndarray, pairs: np.ndarray, norms: np.ndarray, gram: np.ndarray,
                 lip: float, inverse: np.ndarray, per_unit: np.ndarray | None = None) -> None:
        if not plan.project or plan.n_k != design.shape[1]:
            raise ValueError("NnlsTables: the SNIP plan must project the net counts on the design's columns")
        dtype = plan.dtype
        self.plan, self.dtype = plan, dtype
        self.design = np.ascontiguousarray(design, dtype=dtype)
        self.model = nonzeros_by_row(self.design, dtype)  # (dptr, dval, dcol)
        self.quads = spd_cpu.quad_table(np.ascontiguousarray(pairs, dtype=dtype))  # (qptr, qpair, qcoef)
        self.where, _ = spd_cpu._packing(design.shape[1])
        self.norms, self.gram, self.inverse = (np.ascontiguousarray(v, dtype=dtype) for v in (norms, gram, inverse))
        self.lip = dtype.type(lip)
        self.rel = spd_cpu._rel(self.design)
        if per_unit is not None and np.shape(per_unit) != (design.shape[1],):
            raise ValueError(f"NnlsTables: per_unit must be [K] = [{design.shape[1]}], got {np.shape(per_unit)}")
        self.per_unit = None if per_unit is None else np.ascontiguousarray(per_unit, dtype=dtype)


def fit_nnls_cpu(x: np.ndarray, tables: NnlsTables, tol: float, max_iter: int, n_threads: int = 1,
                 source: tuple[str, int] | None = None) -> dict[str, object]:
    """XRF-Maps' NNLS map fit of the spectra ``x`` (``[P, C]``, or ``[C, P]`` with the plan's
    ``channel_major``; C-contiguous, the plan's dtype) on up to ``n_threads`` threads, with the
    design, SNIP and solver of ``tables``.

    Returns ``a [P, K]`` (amplitudes of the design's columns; not iterated, not converged, NaN
    where a pixel's counts are not finite), ``iterations [P]``, ``converged [P]``, ``chi2 [P]``
    (Pearson's, float64, with the weights ``1 / max(m, 1)``), ``stderr [P, K]`` and ``ok [P]``
    (:func:`chi2_cpu.model_chi2_stderr`'s), ``roi [R, P]`` where the plan sums ROI windows,
    ``background_sum [Cw]`` (float64, over the pixels whose ``a`` and ``chi2`` are finite) and
    ``failed`` ``{pixel: its background [Cw]}`` for the pixels whose information is not positive
    definite (``ok`` False; their errors are left to the caller), ``total [P]`` (float32, each
    spectrum's counts over all its channels, summed in float64 by the threads). With the tables' ``per_unit``
    also ``maps``: ``fit._nnls_output``'s float32 ``amplitudes``, ``amplitudes_stderr``,
    ``counts``, ``stderr`` ``[K, P]``, ``rchi2 [P]``, ``status [P]`` (int8) and the kept
    amplitudes summed over the pixels, ``amplitude_sum [K]`` (float64), made by each thread for
    its groups (:func:`_finish`; the errors of ``failed`` pixels still to be set).

    ``source``: ``(file, byte offset)`` of pixel-major ``x`` where it is a memory-mapped block
    (:func:`mapstorch.io.h5chunks.file_bytes`): each thread then reads its groups' spectra with
    ``pread`` into a buffer of its own, which leaves the mapping's pages untouched (no page
    faults, nothing to unmap). Not for channel-major spectra, nor where ROI windows outside the
    crop read ``x`` again at the end.
    """
    plan, dtype = tables.plan, tables.dtype
    n_w, k = tables.design.shape
    if not (isinstance(x, np.ndarray) and x.ndim == 2 and x.dtype == dtype and x.flags.c_contiguous
            and x.shape[0 if plan.channel_major else 1] == plan.n):
        layout = "[C, P]" if plan.channel_major else "[P, C]"
        raise ValueError(f"fit_nnls_cpu: spectra must be C-contiguous {dtype} {layout} with C = {plan.n}, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    n_pix = x.shape[1] if plan.channel_major else x.shape[0]
    dptr, dval, dcol = tables.model
    qptr, qpair, qcoef = tables.quads
    where, norms, gram, inverse, rel = tables.where, tables.norms, tables.gram, tables.inverse, tables.rel
    step, limit = tables.lip, dtype.type(tol)
    b = np.empty((n_pix, k), dtype=dtype)
    a = np.empty((n_pix, k), dtype=dtype)
    scale = np.empty(n_pix, dtype=dtype)
    iters = np.zeros(n_pix, dtype=np.int64)
    done = np.zeros(n_pix, dtype=np.bool_)
    chi = np.empty(n_pix, dtype=np.float64)
    se = np.empty((n_pix, k), dtype=dtype)
    ok = np.empty(n_pix, dtype=np.bool_)
    active = np.empty((n_pix, k), dtype=np.bool_)
    roi_in = np.empty((plan.in_lo.size, n_pix), dtype=np.float32) if plan.roi else None
    spans = _group_spans(n_pix, GROUP)
    n_groups = len(spans)
    sums = np.zeros((n_groups, n_w), dtype=np.float64)
    failed: dict[int, np.ndarray] = {}
    totals = np.empty(n_pix, dtype=np.float32)
    per_unit = tables.per_unit
    if plan.channel_major or (plan.roi and not plan.inside.all()) or not hasattr(os, "preadv"):
        source = None
    fd = None
    if source is not None:
        try:
            fd = os.open(source[0], os.O_RDONLY)
        except OSError:  # (the file was moved or removed since it was mapped: the mapping is read instead)
            source = None
    row_bytes = x.strides[0]
    if per_unit is not None:
        maps = {key: np.empty((k, n_pix), dtype=np.float32) for key in ("amplitudes", "amplitudes_stderr", "counts",
                                                                        "stderr")}
        maps.update(rchi2=np.empty(n_pix, dtype=np.float32), status=np.empty(n_pix, dtype=np.int8))
        a_sums = np.zeros((n_groups, k), dtype=np.float64)

    def work(groups):
        t, slab = plan.scratch()  # this thread's work arrays, reused from group to group
        bg = simd.empty((n_w, GROUP), dtype)  # (vectors of their rows on cache lines: simd.empty)
        counts = simd.empty((n_w, GROUP), dtype)  # the window's counts, channel-major and contiguous
        proj = simd.empty((k, GROUP), dtype)
        amp_t = simd.empty((k, GROUP), dtype)  # the group's amplitudes, component-major
        # a SNIP chunk's spectra read into the thread's own buffer (128 spectra of 2048 float32
        # channels: 1 MB, a core's L2 cache) just before they are summed and loaded
        own = simd.empty((plan.chunk, x.shape[1]), dtype) if fd is not None else None
        sum_rows = _spectrum_sums_cm if plan.channel_major else _spectrum_sums
        for g in groups:
            g0, n = spans[g]
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                for q0 in range(0, n, plan.chunk):
                    nb = min(plan.chunk, n - q0)
                    if own is not None:
                        _read_rows(fd, source[1] + (g0 + q0) * row_bytes, own[:nb], source[0])
                        xs, r0 = own, 0
                    else:
                        xs, r0 = x, g0 + q0
                    sum_rows(xs, r0, nb, totals[g0 + q0:g0 + q0 + nb])
                    plan.chunk_work(xs, r0, nb, t, slab, bg, q0, counts, proj,
                                    None if roi_in is None else roi_in[:, g0:g0 + n])
            _start(proj, norms, inverse, b, a, scale, g0, n)
            nnls_cpu._fista(gram, b, a, scale, step, limit, int(max_iter), g0, g0 + n, iters, done)
            amp = a[g0:g0 + n]
            amp /= norms
            act = active[g0:g0 + n]
            np.greater(amp, 0, out=act)
            amp_t[:, :n] = amp.T
            chi2_cpu._pass_stderr(dval, dcol, dptr, amp_t, bg, counts, qptr, qpair, qcoef, act,
                                  where, 0, n, chi[g0:g0 + n], se[g0:g0 + n], ok[g0:g0 + n], rel)
            _finite_sums(bg, n, a, chi, g0, sums[g])
            if per_unit is not None:
                _finish(a, se, chi, done, per_unit, n_w, g0, n, maps["amplitudes"], maps["amplitudes_stderr"],
                        maps["counts"], maps["stderr"], maps["rchi2"], maps["status"], a_sums[g])
            for j in np.flatnonzero(~ok[g0:g0 + n]):  # rare: collinear columns; the caller's pseudo-inverse
                failed[g0 + int(j)] = bg[:, j].copy()

    try:
        run_chunks(work, n_groups, n_threads, name="mapstorch-nnls-map")
    finally:
        if fd is not None:
            os.close(fd)
    out: dict[str, object] = {"a": a, "iterations": iters, "converged": done, "chi2": chi, "stderr": se, "ok": ok,
                              "background_sum": sums.sum(0), "failed": failed, "total": totals}
    if plan.roi:
        out["roi"] = plan.roi_outside(x, roi_in)
    if per_unit is not None:
        out["maps"] = maps
        out["amplitude_sum"] = a_sums.sum(0)
    return out
