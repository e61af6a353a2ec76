"""Fast evaluation of many line profiles: channel windows and fused analytic gradients.

Every peak of the model (element lines, pile-ups, the elastic and Compton peaks and their escape
copies) is a sum of three terms on the channels ``c`` with energies ``E_c``:

    prof[l, c] = a_l G + b_l S + c_l T,     x = (E_c - E_l) / sigma_l
    G = exp(-x^2 / 2),  S = erfc(x / sqrt2),  T = exp(E) erfc(u)
    E = min(x, 0) / gamma_l + 1 / (2 gamma_l^2),  u = (x + 1/gamma_l) / sqrt2

(the Gaussian, step and tail of MODEL.md with their prefactors folded into ``a, b, c``), with
``E_c = offset + slope c + quadratic c^2``. The evaluation is fast without changing the numbers
beyond a stated tolerance:

* **Windows.** Above ``x_hi`` (8 in float32, 9 in float64) every term is below 1e-14 of its
  peak, so nothing is evaluated there. Each line has a *core* window ``[-x_c, x_hi]`` where all
  three terms are computed, and below it a *far* window where the Gaussian is gone,
  ``erfc(u) = 2`` and the step is the constant ``2 b``: there ``T = 2 exp(x/gamma + 1/(2 gamma^2))``
  costs one exponential, the step plateau is spread over all lower channels by one cumulative
  sum, and the far window ends where the tail is below ``tol`` (1e-8 in float32, 1e-13 in
  float64) of its coefficient. Window widths are chosen per call from the current widths and
  start on multiples of :data:`BLOCK` channels, so adding them into the spectrum moves whole
  blocks.
* **Energies from the calibration.** Window energies are computed from the three calibration
  coefficients; their gradients are reductions, nothing is gathered.
* **Fused backwards.** :class:`_CoreProfiles` and :class:`_FarTails` compute gradients
  analytically from the saved ``G, S, T`` (``dG/dx = -x G``, ``dS/dx = -sqrt(2/pi) G``,
  ``dT/dx = [x<0] T / gamma - sqrt(2/pi) H`` with ``H = exp(-x^2/2 - relu(x)/gamma)``), which
  costs about one forward pass instead of the many passes of generic autograd.

The tail's direct form ``exp(E) erfc(u)`` is used while every ``gamma`` is comfortably large
(``E <= 1/(2 gamma^2)`` cannot overflow); for smaller ``gamma`` the overflow-free erfcx form of
:func:`mapstorch.physics.shapes.tail` is used. Both give the same values, and the analytic
gradients are finite in either case. Exponent arguments are floored so that no value becomes
subnormal (subnormals are slow and the values are far below tolerance).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["BLOCK", "Peaks", "evaluate_peaks", "expand_to"]

#: Window starts and widths are multiples of this many channels.
BLOCK = 32

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@dataclass(frozen=True)
class _Limits:
    x_hi: float  # above: every term negligible
    u_c: float  # erfc(-u) < tol for u > u_c, i.e. erfc(u) == 2 to tolerance below -u_c
    ln_tol: float  # tail truncated where 2 exp(E) < tol
    gamma_safe: float  # below: overflow-free tail form
    exp_floor: float  # exponent floor keeping values normal


def _limits(dtype: torch.dtype) -> _Limits:
    if dtype == torch.float64:
        return _Limits(9.0, 5.7, 30.0, 0.04, -700.0)
    return _Limits(8.0, 4.1, 18.5, 0.1, -80.0)


@dataclass(frozen=True)
class Peaks:
    """Peaks to evaluate: per-peak tensors ``[..., L]`` and the output row of each (``rows [L]``).

    centers (keV), sigma (keV), gamma, and the prefactors ``a, b, c`` of G, S and T. Peaks whose
    ``c`` is zero still need a positive ``gamma`` (any value). A negative ``sigma`` mirrors the
    peak, ``x = (E_l - E_c) / |sigma|`` (its tail runs upward; such a peak must have ``b = 0``).
    """

    centers: Tensor
    sigma: Tensor
    gamma: Tensor
    a: Tensor
    b: Tensor
    c: Tensor
    rows: Tensor


def _scaled_offset(chan: Tensor, offset: Tensor, slope: Tensor, quad: Tensor | None, centers: Tensor,
                   scale: Tensor) -> Tensor:
    """``scale (E_c - E_l)`` on windows, as one or two fused multiply-adds.

    chan ``[L, W]``; calibration ``[...]``; centers and scale ``[..., L]``. Returns ``[..., L, W]``.
    """
    alpha = (slope[..., None] * scale)[..., None]
    beta = ((offset[..., None] - centers) * scale)[..., None]
    x = torch.addcmul(beta, chan, alpha)
    if quad is not None:
        x = x.addcmul_(chan * chan, (quad[..., None] * scale)[..., None])
    return x


@functools.lru_cache(maxsize=64)
def _powers(width: int, order: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[W, order + 1]`` matrix of ``w^k``."""
    w = torch.arange(width, dtype=torch.float64, device=device)
    return torch.stack([w**k for k in range(order + 1)], -1).to(dtype)


def _window_moments(v: Tensor, chan: Tensor, order: int) -> Tensor:
    """``sum_w v chan^k`` for k = 0..order, per peak: ``[..., L, order + 1]``.

    A window's channels are ``start_l + w``; one matrix product gives ``sum_w v w^k`` and the
    binomial expansion shifts them to ``start_l``.
    """
    m = v @ _powers(chan.shape[-1], order, v.dtype, v.device)  # [..., L, order + 1]
    s = chan[:, 0]
    if order == 0:
        return m
    out = [m[..., 0], s * m[..., 0] + m[..., 1]]
    if order == 2:
        out.append(s * s * m[..., 0] + 2.0 * s * m[..., 1] + m[..., 2])
    return torch.stack(out, -1)


def _calibration_grads(per_peak_scale: Tensor, moments: Tensor, needs: tuple[bool, bool, bool]) -> list:
    """Gradients of offset, slope, quadratic: ``sum_l scale_l sum_w v chan^k`` for k = 0, 1, 2."""
    out: list = [None, None, None]
    for k in range(3):
        if needs[k]:
            out[k] = (per_peak_scale * moments[..., k]).sum(-1)
    return out


def _to_peaks(v: Tensor | None, index: Tensor, n: int) -> Tensor | None:
    """Per-window gradients ``[..., N]`` summed per peak ``[..., n]``."""
    if v is None:
        return None
    return v.new_zeros(*v.shape[:-1], n).index_add_(-1, index, v)


class _CoreProfiles(torch.autograd.Function):
    """``a G + b S + c T`` on core windows with an analytic backward.

    forward(offset, slope, quad, chan [L, W], centers, inv_sigma, a, b, c, inv_gamma, flags)
    with calibration ``[...]`` and per-peak inputs ``[..., L]`` (one batch shape for all);
    flags = (need_step, need_quad, stable). Returns ``[..., L, W]``.
    """

    @staticmethod
    def forward(ctx, offset, slope, quad, chan, centers, inv_sigma, a, b, c, inv_gamma, flags, index=None):
        need_step, need_quad, stable = flags
        lim = _limits(chan.dtype)
        ctx.n_peaks = centers.shape[-1]
        if index is not None:  # several windows per peak: one entry per window
            centers, inv_sigma, a, b, c, inv_gamma = (
                t.index_select(-1, index) for t in (centers, inv_sigma, a, b, c, inv_gamma))
        x = _scaled_offset(chan, offset, slope, quad if need_quad else None, centers, inv_sigma)
        ig = inv_gamma[..., None]
        g = torch.square(x).mul_(-0.5).clamp_(min=lim.exp_floor).exp_()
        out = g * a[..., None]
        s = None
        if need_step:
            s = torch.erfc(x * _INV_SQRT_2)
            out.addcmul_(s, b[..., None])
        u = torch.add(ig * _INV_SQRT_2, x, alpha=_INV_SQRT_2)
        e_arg = torch.addcmul(0.5 * ig * ig, torch.clamp(x, max=0.0), ig).clamp_(min=lim.exp_floor)
        if stable:
            h = g * torch.relu(x).mul_(-ig).clamp_(min=lim.exp_floor).exp_()
            scaled = h * torch.special.erfcx(u.abs())
            t = torch.where(u < 0, 2.0 * torch.exp(torch.clamp(e_arg, max=0.0)) - scaled, scaled)
        else:
            t = e_arg.exp_().mul_(torch.erfc(u))
        out.addcmul_(t, c[..., None])
        ctx.flags = flags
        ctx.index = index
        ctx.save_for_backward(offset, slope, quad, chan, centers, inv_sigma, a, b, c, inv_gamma,
                              x, g, s if s is not None else g, t)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = _CoreProfiles._backward(ctx, grad)
        if ctx.index is not None:  # windows back to peaks
            out[4:10] = [_to_peaks(v, ctx.index, ctx.n_peaks) for v in out[4:10]]
        return tuple(out) + (None,)

    @staticmethod
    def _backward(ctx, grad) -> list:
        offset, slope, quad, chan, centers, inv_sigma, a, b, c, inv_gamma, x, g, s, t = ctx.saved_tensors
        need_step, need_quad, _ = ctx.flags
        needs = ctx.needs_input_grad
        lim = _limits(chan.dtype)
        ig = inv_gamma[..., None]
        cc = c[..., None]
        h = g * torch.relu(x).mul_(-ig).clamp_(min=lim.exp_floor).exp_()
        x_neg = torch.clamp(x, max=0.0)
        # d prof / d x = c/gamma T [x < 0] - a x G - b sqrt(2/pi) G - c sqrt(2/pi) H
        dx = (t * (x_neg < 0)).mul_(cc * ig)
        ax = x * a[..., None]
        if need_step:
            ax.add_((b * _SQRT_2_OVER_PI)[..., None])
        dx.sub_(ax.mul_(g)).addcmul_(h, cc, value=-_SQRT_2_OVER_PI)
        gx = dx.mul_(grad)
        out: list = [None] * 11
        if needs[0] or needs[1] or needs[2] or needs[4]:
            mom = _window_moments(gx, chan, 2 if (needs[2] or need_quad) else 1)  # sum_w gx chan^k
            out[0:3] = _calibration_grads(inv_sigma, mom, needs[0:3])
            if needs[4]:
                out[4] = -inv_sigma * mom[..., 0]
        if needs[5]:
            out[5] = torch.einsum("...w,...w->...", gx, x) / inv_sigma
        if needs[6]:
            out[6] = torch.einsum("...w,...w->...", grad, g)
        if needs[7] and need_step:
            out[7] = torch.einsum("...w,...w->...", grad, s)
        gt = torch.einsum("...w,...w->...", grad, t) if (needs[8] or needs[9]) else None
        if needs[8]:
            out[8] = gt
        if needs[9]:  # d T / d (1/gamma) = (min(x, 0) + 1/gamma) T - sqrt(2/pi) H
            gtx = torch.einsum("...w,...w,...w->...", grad, t, x_neg)
            gh = torch.einsum("...w,...w->...", grad, h)
            out[9] = c * (gtx + inv_gamma * gt - _SQRT_2_OVER_PI * gh)
        return out


class _FarTails(torch.autograd.Function):
    """``2 c exp(k (E_c - E_l) + 1/(2 gamma^2))`` with ``k = 1 / (gamma sigma)`` on far windows.

    forward(offset, slope, quad, chan [L, W], centers, inv_sigma, c, inv_gamma, need_quad). On a
    far window ``x < 0`` by construction, so the tail is a pure exponential in the channel
    energy; the backward needs only the sums ``S_i = sum_w grad T chan^i`` per peak.
    """

    @staticmethod
    def forward(ctx, offset, slope, quad, chan, centers, inv_sigma, c, inv_gamma, need_quad, index=None):
        lim = _limits(chan.dtype)
        ctx.n_peaks, ctx.index = centers.shape[-1], index
        if index is not None:
            centers, inv_sigma, c, inv_gamma = (t.index_select(-1, index) for t in (centers, inv_sigma, c, inv_gamma))
        kappa = inv_sigma * inv_gamma  # [..., L]
        arg = _scaled_offset(chan, offset, slope, quad if need_quad else None, centers, kappa)
        # x < 0 on a far window; the upper clamp only guards windows of peaks far outside the range
        arg = arg.clamp_(max=0.0).add_((0.5 * inv_gamma * inv_gamma)[..., None])
        t = arg.clamp_(min=lim.exp_floor).exp_()
        ctx.need_quad = need_quad
        ctx.save_for_backward(offset, slope, quad, chan, centers, inv_sigma, c, inv_gamma, t)
        return t * (2.0 * c)[..., None]

    @staticmethod
    def backward(ctx, grad):
        offset, slope, quad, chan, centers, inv_sigma, c, inv_gamma, t = ctx.saved_tensors
        needs = ctx.needs_input_grad
        order = 2 if (ctx.need_quad or needs[2]) else 1
        mom = 2.0 * _window_moments(grad * t, chan, order)  # sum_w grad dprof/dc chan^k
        s0, s1 = mom[..., 0], mom[..., 1]
        s2 = mom[..., 2] if order == 2 else None
        kappa = inv_sigma * inv_gamma
        ck = c * kappa  # d(prof)/d(E_c) = c kappa T (per unit T)
        out: list = [None] * 9
        out[0:3] = _calibration_grads(ck, mom, needs[0:3])
        if needs[4]:
            out[4] = -ck * s0
        if needs[5] or needs[7]:
            sum_d = slope[..., None] * s1 + (offset[..., None] - centers) * s0  # sum_w grad 2T d
            if ctx.need_quad:
                sum_d = sum_d + quad[..., None] * s2
            if needs[5]:  # d arg / d inv_sigma = inv_gamma d
                out[5] = c * inv_gamma * sum_d
            if needs[7]:  # d arg / d inv_gamma = inv_sigma d + inv_gamma
                out[7] = c * (inv_sigma * sum_d + inv_gamma * s0)
        if needs[6]:
            out[6] = s0
        if ctx.index is not None:
            out[4:8] = [_to_peaks(v, ctx.index, ctx.n_peaks) for v in out[4:8]]
        return tuple(out) + (None,)


@dataclass(frozen=True)
class _Plan:
    """Where every peak is evaluated, in a buffer of ``n_buf`` channels whose index ``pad`` is the
    first channel of the range. A peak gets one or more core windows of ``core_width`` channels
    (``core_peak[i]`` is the peak of window ``i``, ``core_start[i]`` its first buffer index) and
    zero or more far windows of ``far_width`` channels; its step plateau starts below
    ``step_start``. ``keep`` lists the peaks that can touch the range (``None``: all)."""

    keep: Tensor | None
    pad: int
    n_buf: int
    core_width: int
    core_peak: Tensor | None  # None: window i belongs to peak i
    core_start: Tensor
    far_width: int
    far_peak: Tensor
    far_start: Tensor
    step_start: Tensor


def _pick_width(needs: np.ndarray) -> int:
    """A window width (multiple of BLOCK) that keeps the total evaluated channels small."""
    if needs.size == 0 or needs.max() <= 0:
        return 0
    ordered = np.sort(needs)
    picks = (ordered[int(q * (ordered.size - 1))] for q in (0.5, 0.75, 0.9, 1.0))
    cands = {int(np.ceil(v / BLOCK)) * BLOCK for v in picks}
    cands.discard(0)

    def cost(w: int) -> float:  # channels evaluated, plus the per-window bookkeeping
        pieces = np.ceil(needs / w)
        return float((pieces * w).sum() + 8 * BLOCK * pieces.sum())

    return min(sorted(cands), key=cost)


def _full_plan(n_lines: int, n_pad: int, device) -> _Plan:
    zeros = torch.zeros(n_lines, dtype=torch.int64, device=device)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    return _Plan(None, 0, n_pad, n_pad, None, zeros, 0, empty, empty, zeros)


@torch.no_grad()
def _plan(channels: Tensor, energies: Tensor, centers: Tensor, sigma: Tensor, gamma: Tensor, has_tail: Tensor,
          full: bool) -> _Plan:
    """Windows that cover every batch member (see :class:`_Plan`); planned on the host in numpy.

    A peak with negative ``sigma`` is mirrored (its tail runs upward): its core window reaches
    ``x_hi`` below the centre and ``x_c`` above, and its far windows lie above the core.
    """
    n_ch = channels.shape[0]
    n_pad = (n_ch + BLOCK - 1) // BLOCK * BLOCK
    n_lines = centers.shape[-1]
    device = channels.device
    e = energies.reshape(-1, n_ch).double().cpu().numpy()
    steps = np.diff(e, axis=-1)
    if full or n_ch <= 4 * BLOCK or not (steps > 0).all():
        return _full_plan(n_lines, n_pad, device)
    lim = _limits(channels.dtype)
    gain = float(steps.min())  # narrowest channel (keV)
    sig = sigma.reshape(-1, n_lines).double().cpu().numpy()
    mirrored = (sig < 0).any(0)
    s = np.abs(sig).max(0)
    gm = gamma.reshape(-1, n_lines).double().cpu().numpy().max(0)
    tail = has_tail.cpu().numpy()
    with np.errstate(divide="ignore"):
        x_c = np.where(tail, np.maximum(math.sqrt(2.0) * lim.u_c + 1.0 / gm, lim.x_hi), lim.x_hi)
        x_lo = np.where(tail, np.maximum(x_c, lim.ln_tol * gm + 0.5 / gm), x_c)
    tail_side = np.ceil(x_c * s / gain)  # core channels on the tail side of a centre
    other_side = np.ceil(lim.x_hi * s / gain)
    far_need = np.ceil((x_lo - x_c) * s / gain)
    below = np.where(mirrored, other_side, tail_side)
    above = np.where(mirrored, tail_side, other_side)
    rows = torch.broadcast_shapes(energies.shape[:-1], centers.shape[:-1])
    e_rows = energies.expand(*rows, n_ch).reshape(-1, n_ch).contiguous()
    c_rows = centers.expand(*rows, n_lines).reshape(-1, n_lines).contiguous()
    pos = torch.searchsorted(e_rows, c_rows).cpu().numpy()  # [B, L], one batched search
    c = c_rows.double().cpu().numpy()
    lo = pos.min(0) - below - 1
    hi = pos.max(0) + above + 1
    # a peak wholly outside the range on its clean side adds nothing (positions from searchsorted
    # are clipped to the range, so decide on energies)
    e_first, e_last = float(e[:, 0].min()), float(e[:, -1].max())
    keep_mask = np.where(mirrored, c.min(0) - lim.x_hi * s <= e_last + gain, c.max(0) + lim.x_hi * s >= e_first - gain)
    if not keep_mask.any():
        keep_mask[:] = True
    kept = np.nonzero(keep_mask)[0]
    lo, hi, far_need, mirrored = lo[kept], hi[kept], far_need[kept], mirrored[kept]
    core_need = hi - lo + BLOCK  # room to round each start down to a block
    core_width = _pick_width(core_need)
    far_width = _pick_width(far_need)
    n_core = np.ceil(core_need / core_width).astype(np.int64)
    n_far = np.ceil(far_need / far_width).astype(np.int64) if far_width else np.zeros_like(n_core)
    total = (n_core * core_width).sum() + (n_far * far_width).sum()
    if total >= 0.75 * len(kept) * n_pad:
        return _full_plan(n_lines, n_pad, device)
    pad = int((n_core * core_width + n_far * far_width).max())
    n_buf = pad + n_pad + pad
    first = np.floor((lo + pad) / BLOCK).astype(np.int64) * BLOCK
    core_extent, far_extent = n_core * core_width, n_far * far_width
    first = np.where(mirrored, np.clip(first, 0, n_buf - core_extent - far_extent),
                     np.clip(first, far_extent, n_buf - core_extent))
    core_peak = np.repeat(np.arange(len(kept)), n_core)
    core_start = first[core_peak] + (np.arange(core_peak.size) - np.repeat(np.cumsum(n_core) - n_core, n_core)) * core_width
    far_peak = np.repeat(np.arange(len(kept)), n_far)
    j = np.arange(far_peak.size) - np.repeat(np.cumsum(n_far) - n_far, n_far)
    far_start = np.where(mirrored[far_peak], (first + core_extent)[far_peak] + j * far_width,
                         first[far_peak] - (j + 1) * far_width)

    def t(a: np.ndarray) -> Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.int64, device=device)

    identity = core_peak.size == len(kept)
    return _Plan(
        keep=None if keep_mask.all() else t(kept), pad=pad, n_buf=n_buf, core_width=core_width,
        core_peak=None if identity else t(core_peak), core_start=t(core_start), far_width=far_width,
        far_peak=t(far_peak), far_start=t(far_start), step_start=t(first),
    )


def _block_rows(rows: Tensor, start: Tensor, n_blocks: int, blocks_per_row: int) -> Tensor:
    """Buffer block index of every block of every window: ``[N * n_blocks]``."""
    first = rows * blocks_per_row + torch.div(start, BLOCK, rounding_mode="floor")
    return (first[:, None] + torch.arange(n_blocks, device=rows.device)[None, :]).reshape(-1)


def expand_to(t: Tensor, shape) -> Tensor:
    """``t.expand(shape)``, without an autograd node when nothing changes."""
    return t if tuple(t.shape) == tuple(shape) else t.expand(shape)


def evaluate_peaks(
    calibration: tuple[Tensor, Tensor, Tensor],
    channels: Tensor,
    peaks: Peaks,
    n_out: int,
    full: bool = False,
    max_elements: int = 1 << 23,
) -> Tensor:
    """Sum of peak profiles added into ``n_out`` rows over the channels; ``[..., n_out, C]``.

    calibration : (offset, slope, quadratic) ``[...]``; channels : ``[C]`` absolute channel
    numbers (float); peaks : see :class:`Peaks`. ``full=True`` evaluates every peak on every
    channel (no windows; for checks). A peak much wider than most (a broad Compton peak) is
    covered by several windows. Large batches are evaluated in chunks of about ``max_elements``
    window channels, so memory stays bounded.
    """
    offset, slope, quad = calibration
    per_peak = (peaks.centers, peaks.sigma, peaks.gamma, peaks.a, peaks.b, peaks.c)
    batch = torch.broadcast_shapes(offset.shape, slope.shape, quad.shape, *(t.shape[:-1] for t in per_peak))
    n_ch = channels.shape[0]
    n_lines = peaks.centers.shape[-1]
    rows = peaks.rows
    per_peak = tuple(expand_to(t, (*batch, n_lines)) for t in per_peak)
    cal = (expand_to(offset, batch), expand_to(slope, batch), expand_to(quad, batch))
    if n_lines == 0:
        return cal[0].new_zeros(*batch, n_out, n_ch) + 0.0 * sum(t.sum() for t in cal)
    # peaks that are zero for every batch member (gated off, zero amplitude) are skipped
    with torch.no_grad():
        live = ((per_peak[3] != 0) | (per_peak[4] != 0) | (per_peak[5] != 0)).reshape(-1, n_lines).any(0)
    if not bool(live.all()):
        idx = torch.nonzero(live).flatten()
        per_peak = tuple(t[..., idx] for t in per_peak)
        rows = rows[idx]
        n_lines = int(idx.numel())
    if n_lines == 0:
        zero = sum(t.sum() for t in per_peak) * 0.0
        return cal[0].new_zeros(*batch, n_out, n_ch) + zero
    n_batch = math.prod(batch)
    per_spectrum = n_lines * min(n_ch, 512)
    if n_batch > 1 and n_batch * per_spectrum > max_elements:
        chunk = max(1, max_elements // per_spectrum)
        flat_cal = tuple(t.reshape(n_batch) for t in cal)
        flat_peak = tuple(t.reshape(n_batch, n_lines) for t in per_peak)
        parts = []
        for i in range(0, n_batch, chunk):
            sl = slice(i, i + chunk)
            sub = Peaks(*(t[sl] for t in flat_peak), rows)
            parts.append(evaluate_peaks(tuple(t[sl] for t in flat_cal), channels, sub, n_out, full, max_elements))
        return torch.cat(parts, 0).reshape(*batch, n_out, n_ch)
    energies = cal[0][..., None] + channels * (cal[1][..., None] + cal[2][..., None] * channels)
    return _evaluate_planned(cal, channels, energies, per_peak, rows, n_out, full)


def _evaluate_planned(cal, channels, energies, per_peak, rows, n_out: int, full: bool) -> Tensor:
    """Windows, fused evaluation and accumulation (see evaluate_peaks)."""
    offset, slope, quad = cal
    batch = offset.shape
    n_ch = channels.shape[0]
    centers, sigma, gamma, a, b, c = per_peak
    with torch.no_grad():
        has_tail = (c != 0).reshape(-1, c.shape[-1]).any(0)
    plan = _plan(channels, energies, centers, sigma, gamma, has_tail, full)
    if plan.keep is not None:
        centers, sigma, gamma, a, b, c = (t[..., plan.keep] for t in (centers, sigma, gamma, a, b, c))
        rows = rows[plan.keep]
    lim = _limits(channels.dtype)
    need_step = bool(torch.any(b != 0))  # b = 0 exactly when the step fractions are 0 (zero gradient there too)
    need_quad = bool(quad.requires_grad) or bool(torch.any(quad != 0))
    stable = bool(torch.any(gamma < lim.gamma_safe))
    inv_sigma, inv_gamma = 1.0 / sigma, 1.0 / gamma
    origin = channels[0] - plan.pad  # channel number of buffer index 0
    blocks_per_row = plan.n_buf // BLOCK
    buf = a.new_zeros(*batch, n_out * blocks_per_row, BLOCK)

    cp = plan.core_peak
    offs = torch.arange(plan.core_width, device=channels.device, dtype=channels.dtype)
    chan = origin + plan.core_start.to(channels.dtype)[:, None] + offs[None, :]
    core = _CoreProfiles.apply(offset, slope, quad, chan, centers, inv_sigma, a, b, c, inv_gamma,
                               (need_step, need_quad, stable), cp)
    nb = plan.core_width // BLOCK
    core_rows = rows if cp is None else rows[cp]
    buf = buf.index_add(-2, _block_rows(core_rows, plan.core_start, nb, blocks_per_row),
                        core.reshape(*batch, core_rows.shape[0] * nb, BLOCK))
    if plan.far_width and plan.far_peak.numel():
        fp = plan.far_peak
        offs = torch.arange(plan.far_width, device=channels.device, dtype=channels.dtype)
        chan_far = origin + plan.far_start.to(channels.dtype)[:, None] + offs[None, :]
        far = _FarTails.apply(offset, slope, quad, chan_far, centers, inv_sigma, c, inv_gamma, need_quad, fp)
        nbf = plan.far_width // BLOCK
        buf = buf.index_add(-2, _block_rows(rows[fp], plan.far_start, nbf, blocks_per_row),
                            far.reshape(*batch, fp.shape[0] * nbf, BLOCK))
    out = buf.reshape(*batch, n_out, plan.n_buf)[..., plan.pad : plan.pad + n_ch]
    if need_step and (plan.pad > 0 or bool((plan.step_start > 0).any())):
        # step plateau 2 b below each peak's first core window: mark 2 b at the window start, then
        # a reversed cumulative sum spreads it over every lower channel.
        marks = b.new_zeros(*batch, n_out * (plan.n_buf + 1))
        marks = marks.index_add(-1, rows * (plan.n_buf + 1) + plan.step_start, 2.0 * b)
        marks = marks.reshape(*batch, n_out, plan.n_buf + 1)
        plateau = torch.flip(torch.cumsum(torch.flip(marks, [-1]), -1), [-1])
        out = out + plateau[..., plan.pad + 1 : plan.pad + 1 + n_ch]
    return out
