"""SNIP background (statistics-sensitive non-linear iterative peak clipping), batched over spectra.

The MAPS / XRF-Maps recipe (MODEL.md section 7), for spectra ``[..., C]``:

1. smooth with a 5-channel boxcar ('valid' part; the two channels at each end become 0);
2. transform ``v = log(log(x + 1) + 1)``;
3. clip ``v[c] <- min(v[c], (v[c - w_c] + v[c + w_c]) / 2)`` with indices clamped to the fit window,
   twice at the full width, then once per width while the largest width is >= 0.5 channel,
   dividing the widths by sqrt(2) after each of these passes;
4. invert the transform (non-finite values become 0).

The width in channels is XRF-Maps' (it uses the calibration offset and slope, not the FWHM
parameters)::

    w_c = SNIP_WIDTH * 2.35 * sqrt(max(0, (offset / 2.3548)^2 + 3.58 * slope * E(c))) / slope

Two clipping modes:

``"xrfmaps"`` (default) reproduces XRF-Maps exactly, including its in-place sweep in which channel
``c`` already sees the clipped values of the channels to its left, and its integer truncation of
``c -/+ w_c``. The sweep is a chain of recurrences ``v'[c] = min(v[c], (v'[lo_c] + v[hi_c]) / 2)``;
each step has the form ``a -> min(a/2 + h, v)``, such maps compose into the same form, and
pointer jumping evaluates every chain in ``log2(length)`` vectorised steps.

``"smooth"`` updates all channels at once and reads ``v(c -/+ w_c)`` by linear interpolation, so
the background is differentiable in ``SNIP_WIDTH`` and the calibration (for fitting them).
It differs slightly from XRF-Maps' numbers.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mapstorch.errors import InputError
from mapstorch.physics import snip_gpu

__all__ = ["snip_background", "snip_window", "snip_widths", "SnipMode"]

SnipMode = Literal["xrfmaps", "smooth"]

_log = logging.getLogger(__name__)
_ENGINES = ("auto", "compiled", "blocked", "kernel", "pointer")


def _as_batched(value: float | Tensor, ref: Tensor) -> Tensor:
    t = torch.as_tensor(value, dtype=ref.dtype, device=ref.device)
    return t[..., None]


def snip_widths(
    n_channels: int, offset: float | Tensor, slope: float | Tensor, quadratic: float | Tensor, width: float | Tensor,
    dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
) -> Tensor:
    """XRF-Maps' SNIP half-window per channel, in channels: ``[..., C]`` (see module docstring)."""
    ref = torch.zeros((), dtype=dtype, device=device)
    off, sl, qd, wd = (_as_batched(v, ref) for v in (offset, slope, quadratic, width))
    c = torch.arange(n_channels, dtype=dtype, device=device)
    energy = off + c * sl + c * c * qd
    var = torch.clamp((off / 2.3548) ** 2 + energy * 3.58 * sl, min=0.0)
    return wd * 2.35 * torch.sqrt(var) / sl


def _boxcar5(x: Tensor) -> Tensor:
    """XRF-Maps' 5-channel moving average: 'valid' part centred, two zero channels at each end."""
    inner = (x[..., :-4] + x[..., 1:-3] + x[..., 2:-2] + x[..., 3:-1] + x[..., 4:]) * 0.2
    zeros = x.new_zeros(*x.shape[:-1], 2)
    return torch.cat([zeros, inner, zeros], dim=-1)


def _trunc_index(x: Tensor) -> Tensor:
    """C++ ``int(x)`` (truncation toward zero) as int64."""
    return torch.trunc(x).to(torch.int64)


def _pass_exact(v: Tensor, w: Tensor, lo_limit: int, up_limit: int) -> Tensor:
    """One XRF-Maps in-place sweep, evaluated by pointer jumping. v, w ``[..., C]``."""
    if w.dim() == 1 or all(s == 1 for s in w.shape[:-1]):
        return _pass_exact_shared(v, w.reshape(-1), lo_limit, up_limit)
    n = v.shape[-1]
    k = torch.arange(n, device=v.device)
    kf = k.to(w.dtype)
    lo = torch.clamp(torch.clamp(_trunc_index(kf - w), min=lo_limit), max=up_limit)
    hi = torch.clamp(_trunc_index(kf + w), max=up_limit)
    lo, hi = torch.broadcast_tensors(lo, hi)
    lo = lo.expand(v.shape).contiguous()
    hi = hi.expand(v.shape).contiguous()
    v_hi = torch.gather(v, -1, hi)
    inside = (k >= lo_limit) & (k <= up_limit)
    # channels below the window only read old values: one parallel update
    below = k < lo_limit
    out = v.clone()
    if bool(below.any()):
        v_lo = torch.gather(v, -1, lo)
        out = torch.where(below, torch.minimum(v, 0.5 * (v_lo + v_hi)), out)
    # window: v'[k] = F_k(v'[lo_k]) with F_k(a) = min(beta a + alpha, delta); roots have lo_k == k
    root = (lo == k) | ~inside
    alpha = torch.where(root, torch.minimum(v, 0.5 * (v + v_hi)), 0.5 * v_hi)
    beta = torch.where(root, torch.zeros_like(v), torch.full_like(v, 0.5))
    delta = torch.where(root, alpha, v)
    ptr = torch.where(root, k.expand(v.shape), lo)
    # every link moves at least one channel left, so log2(window length) doublings reach the roots
    for _ in range(math.ceil(math.log2(max(2, up_limit - lo_limit + 1))) + 1):
        if not bool((beta != 0).any()):
            break
        p_beta = torch.gather(beta, -1, ptr)
        p_alpha = torch.gather(alpha, -1, ptr)
        p_delta = torch.gather(delta, -1, ptr)
        alpha, delta = beta * p_alpha + alpha, torch.minimum(beta * p_delta + alpha, delta)
        beta = beta * p_beta
        ptr = torch.gather(ptr, -1, ptr)
    value = torch.minimum(alpha, delta)
    out = torch.where(inside, value, out)
    # channels above the window read only final window values
    above = k > up_limit
    if bool(above.any()):
        v_lo = torch.gather(out, -1, lo)
        v_top = out[..., up_limit : up_limit + 1]
        out = torch.where(above, torch.minimum(v, 0.5 * (v_lo + v_top)), out)
    return out


def _pass_exact_shared(v: Tensor, w: Tensor, lo_limit: int, up_limit: int) -> Tensor:
    """:func:`_pass_exact` when every spectrum has the same widths ``w [C]`` (one calibration, as
    in a map): the pointer structure is built once, on ``[C]``, and only the values of all
    spectra ``v [..., C]`` are gathered (by a shared index)."""
    n = v.shape[-1]
    k = torch.arange(n, device=v.device)
    kf = k.to(w.dtype)
    lo = torch.clamp(torch.clamp(_trunc_index(kf - w), min=lo_limit), max=up_limit)
    hi = torch.clamp(_trunc_index(kf + w), max=up_limit)
    v_hi = v.index_select(-1, hi)
    inside = (k >= lo_limit) & (k <= up_limit)
    below = k < lo_limit
    out = v.clone()
    if bool(below.any()):
        out = torch.where(below, torch.minimum(v, 0.5 * (v.index_select(-1, lo) + v_hi)), out)
    root = (lo == k) | ~inside
    alpha = torch.where(root, torch.minimum(v, 0.5 * (v + v_hi)), 0.5 * v_hi)
    delta = torch.where(root, alpha, v)
    beta = torch.where(root, 0.0, 0.5).to(v.dtype)  # [C]: the same for every spectrum
    ptr = torch.where(root, k, lo)
    for _ in range(math.ceil(math.log2(max(2, up_limit - lo_limit + 1))) + 1):
        # links weighted below 2^-60 change nothing at double precision (values are O(1))
        if not bool((beta > 2.0**-60).any()):
            break
        p_alpha = alpha.index_select(-1, ptr)
        p_delta = delta.index_select(-1, ptr)
        alpha, delta = beta * p_alpha + alpha, torch.minimum(beta * p_delta + alpha, delta)
        beta = beta * beta.index_select(0, ptr)
        ptr = ptr.index_select(0, ptr)
    out = torch.where(inside, torch.minimum(alpha, delta), out)
    above = k > up_limit
    if bool(above.any()):
        v_top = out[..., up_limit : up_limit + 1]
        out = torch.where(above, torch.minimum(v, 0.5 * (out.index_select(-1, lo) + v_top)), out)
    return out


def _interp(v: Tensor, pos: Tensor) -> Tensor:
    """Linear interpolation of ``v [..., C]`` at fractional channel positions ``pos [..., C]``."""
    n = v.shape[-1]
    i0 = torch.clamp(torch.floor(pos).detach().to(torch.int64), 0, n - 2)
    frac = pos - i0.to(pos.dtype)
    i0 = i0.expand(v.shape)
    frac = frac.expand(v.shape)
    a = torch.gather(v, -1, i0)
    b = torch.gather(v, -1, i0 + 1)
    return a + (b - a) * frac


def _pass_smooth(v: Tensor, w: Tensor, lo_limit: int, up_limit: int) -> Tensor:
    """Jacobi update with interpolated neighbours (differentiable in the widths)."""
    n = v.shape[-1]
    kf = torch.arange(n, device=v.device, dtype=v.dtype)
    lo = torch.clamp(kf - w, min=float(lo_limit), max=float(up_limit))
    hi = torch.clamp(kf + w, min=float(lo_limit), max=float(up_limit))
    return torch.minimum(v, 0.5 * (_interp(v, lo) + _interp(v, hi)))


def snip_background(
    spectra: Tensor,
    offset: float | Tensor,
    slope: float | Tensor,
    quadratic: float | Tensor = 0.0,
    width: float | Tensor = 0.5,
    window: tuple[int, int] | None = None,
    mode: SnipMode = "xrfmaps",
) -> Tensor:
    """SNIP background of ``spectra [..., C]`` (counts per channel); returns ``[..., C]``.

    offset, slope, quadratic : energy calibration (keV); scalars or ``[...]`` tensors.
    width : ``SNIP_WIDTH``. window : ``(first, last)`` channels of the fit window (inclusive)
    that clip indices are clamped to (XRF-Maps' ``xmin``/``xmax``); default the whole spectrum.
    mode : ``"xrfmaps"`` (exact XRF-Maps numbers) or ``"smooth"`` (differentiable in width and
    calibration); see the module docstring.
    """
    if not isinstance(spectra, Tensor) or spectra.dim() < 1:
        raise InputError(f"spectra must be a tensor [..., C], got {type(spectra).__name__}")
    if mode not in ("xrfmaps", "smooth"):
        raise InputError(f"SNIP mode must be 'xrfmaps' or 'smooth', got {mode!r}")
    n = spectra.shape[-1]
    if n < 8:
        raise InputError(f"SNIP needs at least 8 channels, got {n}")
    if not spectra.is_floating_point():
        spectra = spectra.to(torch.get_default_dtype())
    first, last = (0, n - 1) if window is None else (int(window[0]), int(window[1]))
    lo_limit, up_limit = max(first, 0), min(last, n - 1)
    if lo_limit > up_limit:
        raise InputError(f"SNIP window {window} lies outside the {n} channels")
    sl = torch.as_tensor(slope, dtype=spectra.dtype)
    if bool(torch.any(sl <= 0)):
        raise InputError(f"SNIP needs a positive energy slope, got {slope}")
    w = snip_widths(n, offset, slope, quadratic, width, dtype=spectra.dtype, device=spectra.device)
    v = torch.log(torch.log(_boxcar5(spectra) + 1.0) + 1.0)
    one_pass = _pass_exact if mode == "xrfmaps" else _pass_smooth
    for _ in range(2):
        v = one_pass(v, w, lo_limit, up_limit)
    # then one pass per width while (per spectrum) the largest width is >= 0.5 channel
    active = w.amax(-1, keepdim=True) >= 0.5
    while bool(active.any()):
        v = torch.where(active, one_pass(v, w, lo_limit, up_limit), v)
        w = w / math.sqrt(2.0)
        active = w.amax(-1, keepdim=True) >= 0.5
    bg = torch.exp(torch.exp(v) - 1.0) - 1.0
    return torch.where(torch.isfinite(bg), bg, torch.zeros_like(bg))


@functools.lru_cache(maxsize=256)
def _sweep_plan(w_bytes: bytes, n: int, lo_limit: int, up_limit: int) -> tuple[np.ndarray, np.ndarray, tuple]:
    """``(lo, hi, blocks)`` of one sweep: the channels each channel reads, and blocks of window
    channels whose left neighbours all lie before the block (or are the channel itself), so a
    whole block can be updated at once and the sweep stays exactly sequential."""
    w = np.frombuffer(w_bytes, dtype=np.float64)
    k = np.arange(n)
    lo = np.clip(np.clip(np.trunc(k - w).astype(np.int64), lo_limit, None), None, up_limit)
    hi = np.clip(np.trunc(k + w).astype(np.int64), None, up_limit)
    blocks = []
    s = lo_limit
    while s <= up_limit:
        e = s + 1
        while e <= up_limit and (lo[e] < s or lo[e] == e):
            e += 1
        blocks.append((s, e))
        s = e
    return lo, hi, tuple(blocks)


def _w_key(w: Tensor) -> bytes:
    """The widths ``w [C]`` as a cache key (float64 bytes)."""
    return w.detach().double().cpu().numpy().tobytes()


@functools.lru_cache(maxsize=64)
def _gpu_schedule(widths: tuple[bytes, ...], n: int, lo_limit: int, up_limit: int, device: str):
    """The GPU kernel's step tables for passes of the given widths (cached per map)."""
    return snip_gpu.sweep_schedule([_sweep_plan(w, n, lo_limit, up_limit) for w in widths], device)


_compiled_failure: str | None = None  # why the compiled engine failed at run time, if it did (auto then avoids it)


@functools.lru_cache(maxsize=1)
def _snip_cpu():
    """The compiled CPU engine's module (:mod:`snip_cpu`), or the reason numba is unusable (str)."""
    try:
        from mapstorch.physics import snip_cpu
    except Exception as exc:  # noqa: BLE001 -- not installed, or broken here: the NumPy engine does the work
        reason = f"{type(exc).__name__}: {exc}"
        _log.debug("numba is not usable (%s); the CPU SNIP runs on the blocked NumPy engine", reason)
        return reason
    return snip_cpu


_exp_failure: str | None = None  # why the compiled exp kernel failed at run time, if it did


@functools.lru_cache(maxsize=1)
def _exp_kernel():
    """:func:`lls_cpu.exp_exp_minus_one`, or None where numba is unusable."""
    try:
        from mapstorch.physics.lls_cpu import exp_exp_minus_one
    except Exception as exc:  # noqa: BLE001 -- not installed, or broken here: NumPy's exp does the work
        _log.debug("numba is not usable (%s); the blocked SNIP engine uses NumPy's exp", exc)
        return None
    return exp_exp_minus_one


def _exp_exp_minus_one(out: np.ndarray) -> None:
    """``out = exp(exp(out) - 1)`` in place (C-contiguous): for float32 the compiled engine's
    kernel (:mod:`lls_cpu`), so that the blocked and compiled engines give the same numbers;
    NumPy's ``exp`` for float64, and where numba is unusable (then within a few units in the last
    place of the compiled engine's)."""
    global _exp_failure
    kernel = _exp_kernel() if out.dtype == np.float32 and _exp_failure is None else None
    if kernel is not None:
        try:
            kernel(out)
            return
        except Exception as exc:  # noqa: BLE001 -- LLVM or numba broken here: NumPy's exp still works
            _exp_failure = f"{type(exc).__name__}: {exc}"
            _log.warning("the compiled exp kernel failed (%s); the blocked SNIP engine uses NumPy's exp from now on",
                         _exp_failure, exc_info=True)
    np.exp(out, out=out)
    out -= out.dtype.type(1.0)
    np.exp(out, out=out)


def _give_up_compiled(exc: Exception) -> None:
    """Remember that the compiled engine failed here, so that ``engine="auto"`` stops choosing it."""
    global _compiled_failure
    _compiled_failure = f"{type(exc).__name__}: {exc}"
    _log.warning("the compiled SNIP engine failed (%s); the CPU SNIP uses the blocked NumPy engine from now on",
                 _compiled_failure, exc_info=True)


@functools.lru_cache(maxsize=None)
def _warn_pointer_fallback(device: str) -> None:
    """Say once per device that a GPU's SNIP runs by pointer jumping (no Triton): about 40x
    slower than the kernel, the same numbers."""
    _log.warning("Triton is not importable: the SNIP background on %s runs by pointer jumping, about 40x slower "
                 "than the Triton kernel (the same numbers); `pip install triton` (part of PyTorch's CUDA builds) "
                 "for the kernel", device)


def _compiled_unusable() -> str | None:
    """Why the compiled CPU engine cannot run here (numba missing or broken), or None."""
    module = _snip_cpu()
    return module if isinstance(module, str) else _compiled_failure


@functools.lru_cache(maxsize=64)
def _cpu_schedule(widths: tuple[bytes, ...], n: int, lo_limit: int, up_limit: int):
    """The compiled engine's step tables for passes of the given widths (cached per map)."""
    plans = [_sweep_plan(w, n, lo_limit, up_limit)[:2] for w in widths]
    return _snip_cpu().sweep_steps(plans, lo_limit, up_limit)


def _sweep_blocked(v: Tensor, w: Tensor, lo_limit: int, up_limit: int) -> Tensor:
    """One XRF-Maps in-place sweep over the window channels of ``v [C, P]`` (channel-major, all
    spectra sharing the widths ``w [C]``), block by block (see :func:`_sweep_plan`)."""
    lo, hi, blocks = _sweep_plan(_w_key(w), v.shape[0], lo_limit, up_limit)
    if v.device.type == "cpu" and not v.requires_grad and v.is_contiguous():
        # NumPy on the same memory: the per-block call overhead is a few times lower
        a = v.numpy()
        half = a.dtype.type(0.5)
        tmp = np.empty(a.shape[1], dtype=a.dtype)  # one scratch row: no temporaries per channel
        for s, e in blocks:
            if e - s == 1:  # a single channel: row views, no copies
                np.add(a[lo[s]], a[hi[s]], out=tmp)
                tmp *= half
                np.minimum(a[s], tmp, out=a[s])
            else:
                np.minimum(a[s:e], half * (a[lo[s:e]] + a[hi[s:e]]), out=a[s:e])
        return v
    lo_t = torch.as_tensor(lo, device=v.device)
    hi_t = torch.as_tensor(hi, device=v.device)
    for s, e in blocks:
        rhs = 0.5 * (v.index_select(0, lo_t[s:e]) + v.index_select(0, hi_t[s:e]))
        torch.minimum(v[s:e], rhs, out=v[s:e])
    return v


def _snip_window_numpy(spectra: Tensor, widths, a0: int, b0: int, a: int, b: int, lo_limit: int,
                       up_limit: int, with_window: bool = False):
    """:func:`snip_window` on the CPU with every step in place on one channel-major NumPy array
    (the same operations in the same order as the tensor path, so the same numbers). With
    ``with_window`` also the spectra over the window, from the same channel-major copy."""
    lead = spectra.shape[:-1]
    # torch's blocked transpose is several times faster than NumPy's strided copy here
    x = spectra.detach().reshape(-1, spectra.shape[-1])[:, a0:b0].T.contiguous().numpy()  # [Cx, P]
    n_x = x.shape[0]
    box = np.zeros_like(x)
    if n_x > 4:  # XRF-Maps' 5-channel mean, (x0 + x1 + x2 + x3 + x4) * 0.2; two zero channels each end
        inner = box[2:n_x - 2]
        np.add(x[:n_x - 4], x[1:n_x - 3], out=inner)
        inner += x[2:n_x - 2]
        inner += x[3:n_x - 1]
        inner += x[4:]
        inner *= x.dtype.type(0.2)
    window_counts = torch.from_numpy(x[a - a0 + lo_limit:a - a0 + up_limit + 1]).T if with_window else None
    del x
    v = box[a - a0:b - a0]  # [C, P], contiguous rows
    one = v.dtype.type(1.0)
    v += one
    np.log(v, out=v)
    v += one
    np.log(v, out=v)
    vt = torch.from_numpy(v)
    for wp in widths:
        _sweep_blocked(vt, wp, lo_limit, up_limit)
    out = v[lo_limit:up_limit + 1]
    with np.errstate(over="ignore", invalid="ignore"):
        _exp_exp_minus_one(out)
        out -= one
    out[~np.isfinite(out)] = 0.0
    bg = torch.from_numpy(out).T.reshape(*lead, out.shape[0])  # explicit sizes: no spectra is fine too
    return (bg, window_counts.reshape(*lead, out.shape[0])) if with_window else bg


def _snip_window_compiled(spectra: Tensor, widths, a: int, b: int, first: int, last: int, lo_limit: int,
                          up_limit: int, with_window: bool = False, project: Tensor | None = None,
                          roi: tuple[np.ndarray, np.ndarray] | None = None):
    """:func:`snip_window` with the compiled CPU engine (:mod:`snip_cpu`): the same numbers as
    :func:`_snip_window_numpy`, read from pixel-major spectra or in place from channel-major ones
    (``[..., C]`` views of ``[C, ...]`` memory), returned channel-major in memory (transposed
    views) as the blocked engine's, on up to ``torch.get_num_threads()`` threads."""
    lead, n = spectra.shape[:-1], spectra.shape[-1]
    flat = spectra.detach().reshape(-1, n)
    channel_major = flat.shape[0] > 1 and flat.T.is_contiguous()  # a view of [C, P] memory (XRF-Maps files)
    x = (flat.T if channel_major else flat.contiguous()).numpy()  # [C, P] or [P, C]
    steps = _cpu_schedule(tuple(_w_key(wp) for wp in widths), b - a, lo_limit, up_limit)
    mat = None if project is None else project.detach().to(device="cpu", dtype=spectra.dtype).numpy()
    bg, counts, *more = _snip_cpu().snip_window_cpu(x, first, last, steps, with_window, torch.get_num_threads(),
                                                    project=mat, channel_major=channel_major, roi=roi)
    # [Cw, P]; [Cw, P] or None; [K, P] projections, [R, P] ROI sums where asked
    out = tuple(torch.from_numpy(v).T.reshape(*lead, v.shape[0]) for v in (bg, counts, *more) if v is not None)
    return out if with_window or roi is not None else out[0]


def snip_window(
    spectra: Tensor,
    offset: float,
    slope: float,
    quadratic: float,
    width: float,
    window: tuple[int, int],
    engine: str = "auto",
    with_window: bool = False,
    project: Tensor | None = None,
    roi: Sequence[tuple[int, int]] | None = None,
):
    """The XRF-Maps SNIP background over the fit window only: ``[..., last - first + 1]``.

    The same numbers as ``snip_background(...)[..., first:last + 1]`` (window channels only read
    window channels, and the 5-channel smoothing two more on each side), for a fraction of the
    work when the window is a part of the spectrum; one calibration for all spectra (a map).

    Engines (``engine``; default ``"auto"``), all with the same numbers, XRF-Maps' sequential
    sweeps (the compiled and the blocked engines bit for bit the same):

    - ``"compiled"``: float32/float64 on the CPU, the boxcar and the sweeps compiled with numba,
      a cache-sized chunk of spectra at a time, chunks on up to ``torch.get_num_threads()``
      threads (:mod:`snip_cpu`); several times faster than ``"blocked"``; no gradient;
    - ``"blocked"``: on the CPU with NumPy, the sweeps block by block over channel-major data;
    - ``"kernel"``: on CUDA with Triton, one kernel, a thread per spectrum (:mod:`snip_gpu`);
    - ``"pointer"``: anywhere, by pointer jumping (every channel in parallel).

    ``"auto"`` picks the kernel on CUDA with Triton; on the CPU the compiled engine when numba
    imports (and the spectra need no gradient), else the blocked one (also if the compiled one
    ever fails to compile or run: a warning says why); the pointer jumping elsewhere.
    ``with_window=True`` returns ``(background, spectra over the window)``, both ``[..., Cw]`` and
    channel-major in memory where the engine works that way (transposed views). With ``project``
    (a tensor ``[Cw, K]``; needs ``with_window``) as well a third, ``[..., K]``: the net counts
    ``max(spectra - background, 0)`` over the window (what XRF-Maps' NNLS fits) projected on the
    columns of ``project``, the right-hand side of a least-squares fit of the net counts. The
    compiled engine sums them while each chunk of spectra is in the cache, over the non-zero
    entries of ``project``, channel after channel (the net counts are never stored); the other
    engines compute ``net @ project``. Both sum in the spectra's dtype. With ``roi`` (``(first,
    last)`` channel pairs, inclusive, anywhere in the spectrum; needs ``with_window``) last the raw
    counts in each window, ``[..., R]`` float32 (XRF-Maps' ROI counts, :mod:`mapstorch.maps.roi`),
    summed in float64: by the compiled engine while each chunk of spectra is in the cache.
    """
    if roi is not None and not with_window:
        raise InputError("snip_window: roi= needs with_window=True (it returns background, window, ..., ROI sums)")
    if project is not None:
        if not isinstance(project, Tensor):
            raise InputError(f"snip_window: project must be a tensor [window channels, K], got {type(project).__name__}")
        if not with_window:
            raise InputError("snip_window: project= needs with_window=True (it returns background, window, "
                             "projections)")
        if project.dim() != 2 or project.shape[0] != int(window[1]) - int(window[0]) + 1:
            raise InputError(f"snip_window: project must be [window channels, K] = [{int(window[1]) - int(window[0]) + 1}"
                             f", K], got {tuple(project.shape)}")
    pairs = None
    if roi is not None:
        pairs = _roi_pairs(roi)
        n = spectra.shape[-1]
        if pairs[0].size and (pairs[0].min() < 0 or pairs[1].max() >= n or (pairs[0] > pairs[1]).any()):
            raise InputError(f"snip_window: ROI windows {list(roi)} must be (first, last) pairs within the {n} channels")
    out = _snip_window(spectra, offset, slope, quadratic, width, window, engine, with_window, project, pairs)
    if not with_window:  # the background alone
        return out
    expected = 2 + (project is not None) + (roi is not None)
    if len(out) == expected:  # the compiled engine did everything
        return out
    bg, counts = out[:2]
    out = (bg, counts)
    if project is not None:  # engines other than the compiled one
        out += ((counts - bg).clamp(min=0.0) @ project.to(device=bg.device, dtype=bg.dtype),)
    if roi is not None:
        sums = [spectra[..., a:b + 1].sum(-1, dtype=torch.float64) for a, b in zip(*pairs)]
        out += ((torch.stack(sums, -1) if sums else spectra.new_zeros((*spectra.shape[:-1], 0), dtype=torch.float64)
                 ).float(),)
    return out


def _checked(n: int, window: tuple[int, int], slope: float, width: float) -> tuple[int, int]:
    """The window's first and last channel, once the window, slope and width make a SNIP."""
    first, last = int(window[0]), int(window[1])
    if not 0 <= first <= last < n:
        raise InputError(f"SNIP window {window} lies outside the {n} channels")
    if not slope > 0:
        raise InputError(f"SNIP needs a positive energy slope, got {slope}")
    if not width >= 0:
        raise InputError(f"SNIP width must be >= 0, got {width}")
    return first, last


def _passes(n: int, offset: float, slope: float, quadratic: float, width: float, first: int, last: int,
            dtype: torch.dtype, device) -> tuple[int, int, list[Tensor], int, int]:
    """The sweeps of a SNIP over the window ``first..last`` of ``n`` channels: ``(a, b, widths,
    lo_limit, up_limit)``, the crop ``a..b - 1`` (the window and the smoothing's reach), each
    pass's widths over the crop, and the window's first and last channel in the crop."""
    a, b = max(first - 2, 0), min(last + 3, n)
    w_full = snip_widths(n, offset, slope, quadratic, width, dtype=dtype, device=device).reshape(-1)
    w = w_full[a:b]
    widths = [w, w]  # two passes at the full width, then one per width while the widest is >= 0.5
    top = float(w_full.max())  # the number of passes follows the whole spectrum's widest window
    while top >= 0.5:
        widths.append(w)
        w = w / math.sqrt(2.0)
        top = top / math.sqrt(2.0)
    return a, b, widths, first - a, last - a


def compiled_plan(n: int, offset: float, slope: float, quadratic: float, width: float, window: tuple[int, int],
                  dtype: torch.dtype, channel_major: bool = False, project: Tensor | None = None,
                  roi: Sequence[tuple[int, int]] | None = None):
    """The compiled CPU engine's :class:`snip_cpu.SnipPlan` for spectra of ``n`` channels
    (float32 or float64; ``channel_major``: stored ``[C, P]``): XRF-Maps' SNIP over ``window``
    with this calibration and width, the net counts projected on ``project [Cw, K]``, the ROI
    windows ``roi`` summed. For fits that work through a chunk of spectra at a time themselves
    (:mod:`mapstorch.maps.nnls_fused_cpu`); :func:`snip_window` otherwise."""
    first, last = _checked(n, window, slope, width)
    a, b, widths, lo_limit, up_limit = _passes(n, offset, slope, quadratic, width, first, last, dtype, "cpu")
    steps = _cpu_schedule(tuple(_w_key(wp) for wp in widths), b - a, lo_limit, up_limit)
    mat = None if project is None else project.detach().to(device="cpu", dtype=dtype).numpy()
    pairs = None if roi is None else _roi_pairs(roi)
    return _snip_cpu().SnipPlan(n, first, last, steps, torch.empty(0, dtype=dtype).numpy().dtype, channel_major,
                                mat, pairs)


def _roi_pairs(roi: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """ROI windows ``[(first, last), ...]`` as two int64 arrays (firsts, lasts)."""
    return (np.array([int(w[0]) for w in roi], dtype=np.int64), np.array([int(w[1]) for w in roi], dtype=np.int64))


def _snip_window(spectra: Tensor, offset: float, slope: float, quadratic: float, width: float,
                 window: tuple[int, int], engine: str, with_window: bool, project: Tensor | None,
                 roi: tuple[np.ndarray, np.ndarray] | None = None):
    """:func:`snip_window`'s work; the compiled engine adds the projections of the net counts
    (the others leave them to the caller)."""
    if engine not in _ENGINES:
        raise InputError(f"SNIP engine must be one of {', '.join(_ENGINES)}; got {engine!r}")
    n = spectra.shape[-1]
    first, last = _checked(n, window, slope, width)
    if not spectra.is_floating_point():
        spectra = spectra.to(torch.get_default_dtype())
    cpu_compiled = spectra.device.type == "cpu" and spectra.dtype in (torch.float32, torch.float64)
    if engine == "compiled":
        if not cpu_compiled:
            raise InputError(f"the compiled SNIP engine runs on float32/float64 CPU tensors, got {spectra.dtype} "
                             f"on {spectra.device}; use engine='auto'")
        if isinstance(_snip_cpu(), str):
            raise InputError(f"the compiled SNIP engine needs numba ({_snip_cpu()}); `pip install numba`, "
                             "or use engine='blocked'")
    chosen = engine == "auto"
    if chosen:
        engine = ("kernel" if snip_gpu.available(spectra.device) else
                  "compiled" if cpu_compiled and not spectra.requires_grad and _compiled_unusable() is None
                  else "blocked" if spectra.device.type == "cpu" else "pointer")
        if engine == "pointer" and spectra.device.type == "cuda":
            _warn_pointer_fallback(str(spectra.device))
    a, b, widths, lo_limit, up_limit = _passes(n, offset, slope, quadratic, width, first, last, spectra.dtype,
                                               spectra.device)
    a0, b0 = max(a - 2, 0), min(b + 2, n)
    lead = spectra.shape[:-1]
    if engine == "kernel":  # one kernel, a thread per spectrum, over channel-major data
        x = spectra[..., a0:b0].reshape(-1, b0 - a0).T.contiguous()  # [C, P]
        sched = _gpu_schedule(tuple(_w_key(wp) for wp in widths), b - a, lo_limit, up_limit, str(x.device))
        out = snip_gpu.snip(x, a - a0, b - a, lo_limit, up_limit, sched).T.reshape(*lead, -1)
        if with_window:
            return out, x[a - a0 + lo_limit:a - a0 + up_limit + 1].T.reshape(*lead, -1)
        return out
    if engine == "compiled":
        try:
            return _snip_window_compiled(spectra, widths, a, b, first, last, lo_limit, up_limit, with_window,
                                         project=project, roi=roi)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 -- numba failed to compile or run here
            if not chosen:
                raise
            _give_up_compiled(exc)
            engine = "blocked"
    if engine == "blocked" and spectra.device.type == "cpu" and not spectra.requires_grad:
        return _snip_window_numpy(spectra, widths, a0, b0, a, b, lo_limit, up_limit, with_window)
    v = _boxcar5(spectra[..., a0:b0])[..., a - a0:b - a0]
    v = torch.log(torch.log(v + 1.0) + 1.0)
    if engine == "blocked":
        v = v.reshape(-1, v.shape[-1]).T.contiguous()  # [C, P]
        for wp in widths:
            v = _sweep_blocked(v, wp, lo_limit, up_limit)
        v = v.T.reshape(*lead, -1)
    else:
        for wp in widths:
            v = _pass_exact_shared(v, wp, lo_limit, up_limit)
    bg = torch.exp(torch.exp(v) - 1.0) - 1.0
    bg = torch.where(torch.isfinite(bg), bg, torch.zeros_like(bg))[..., lo_limit:up_limit + 1]
    return (bg, spectra[..., first:last + 1]) if with_window else bg
