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

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BLOCK", "Peaks", "evaluate_peaks"]

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


def _energy_offset(chan: Tensor, offset: Tensor, slope: Tensor, quad: Tensor | None, centers: Tensor) -> Tensor:
    """``E_c - E_l`` on windows: chan ``[L, W]``; calibration ``[...]``; centers ``[..., L]``."""
    d = chan * slope[..., None, None] + (offset[..., None] - centers)[..., None]
    if quad is not None:
        d = d + (chan * chan) * quad[..., None, None]
    return d


def _calibration_grads(gd: Tensor, chan: Tensor, needs: tuple[bool, bool, bool]) -> list:
    """Gradients of offset, slope, quadratic from ``gd = dL/dE_c`` on windows ``[..., L, W]``."""
    out = [None, None, None]
    if needs[0]:
        out[0] = gd.sum((-1, -2))
    if needs[1] or needs[2]:
        gdc = gd * chan
        out[1] = gdc.sum((-1, -2)) if needs[1] else None
        if needs[2]:
            out[2] = (gdc * chan).sum((-1, -2))
    return out


class _CoreProfiles(torch.autograd.Function):
    """``a G + b S + c T`` on core windows with an analytic backward.

    forward(offset, slope, quad, chan [L, W], centers, inv_sigma, a, b, c, inv_gamma, flags)
    with calibration ``[...]`` and per-peak inputs ``[..., L]`` (one batch shape for all);
    flags = (need_step, need_quad, stable). Returns ``[..., L, W]``.
    """

    @staticmethod
    def forward(ctx, offset, slope, quad, chan, centers, inv_sigma, a, b, c, inv_gamma, flags):
        need_step, need_quad, stable = flags
        lim = _limits(chan.dtype)
        d = _energy_offset(chan, offset, slope, quad if need_quad else None, centers)
        isg = inv_sigma[..., None]
        x = d * isg
        ig = inv_gamma[..., None]
        g = torch.exp(torch.clamp((x * x) * -0.5, min=lim.exp_floor))
        out = a[..., None] * g
        s = None
        if need_step:
            s = torch.erfc(x * _INV_SQRT_2)
            out = out + b[..., None] * s
        u = (x + ig) * _INV_SQRT_2
        e_arg = torch.clamp(torch.clamp(x, max=0.0) * ig + (0.5 * ig * ig), min=lim.exp_floor)
        if stable:
            h = g * torch.exp(torch.clamp(torch.relu(x) * -ig, min=lim.exp_floor))
            scaled = h * torch.special.erfcx(u.abs())
            t = torch.where(u < 0, 2.0 * torch.exp(torch.clamp(e_arg, max=0.0)) - scaled, scaled)
        else:
            t = torch.exp(e_arg) * torch.erfc(u)
        out = out + c[..., None] * t
        ctx.flags = flags
        ctx.save_for_backward(offset, slope, quad, chan, centers, inv_sigma, a, b, c, inv_gamma,
                              g, s if s is not None else g, t)
        return out

    @staticmethod
    def backward(ctx, grad):
        offset, slope, quad, chan, centers, inv_sigma, a, b, c, inv_gamma, g, s, t = ctx.saved_tensors
        need_step, need_quad, _ = ctx.flags
        needs = ctx.needs_input_grad
        lim = _limits(chan.dtype)
        d = _energy_offset(chan, offset, slope, quad if need_quad else None, centers)
        isg = inv_sigma[..., None]
        x = d * isg
        ig = inv_gamma[..., None]
        h = g * torch.exp(torch.clamp(torch.relu(x) * -ig, min=lim.exp_floor))
        cc = c[..., None]
        neg = (x < 0).to(x.dtype)
        dx = (cc * ig) * (t * neg) - (a[..., None] * x) * g - (cc * _SQRT_2_OVER_PI) * h  # d prof / d x
        if need_step:
            dx = dx - (b[..., None] * _SQRT_2_OVER_PI) * g
        gx = grad * dx
        out: list = [None] * 11
        if needs[0] or needs[1] or needs[2] or needs[4]:
            gd = gx * isg  # d loss / d E_c
            out[0:3] = _calibration_grads(gd, chan, needs[0:3])
            if needs[4]:
                out[4] = -gd.sum(-1)
        if needs[5]:
            out[5] = (gx * d).sum(-1)
        if needs[6]:
            out[6] = (grad * g).sum(-1)
        if needs[7] and need_step:
            out[7] = (grad * s).sum(-1)
        if needs[8]:
            out[8] = (grad * t).sum(-1)
        if needs[9]:
            dt_dig = (torch.clamp(x, max=0.0) + ig) * t - _SQRT_2_OVER_PI * h
            out[9] = (grad * cc * dt_dig).sum(-1)
        return tuple(out)


class _FarTails(torch.autograd.Function):
    """``2 c exp(k (E_c - E_l) + 1/(2 gamma^2))`` with ``k = 1 / (gamma sigma)`` on far windows.

    forward(offset, slope, quad, chan [L, W], centers, inv_sigma, c, inv_gamma, need_quad). On a
    far window ``x < 0`` by construction, so the tail is a pure exponential in the channel
    energy; the backward needs only the sums ``S_i = sum_w grad T chan^i`` per peak.
    """

    @staticmethod
    def forward(ctx, offset, slope, quad, chan, centers, inv_sigma, c, inv_gamma, need_quad):
        lim = _limits(chan.dtype)
        kappa = inv_sigma * inv_gamma  # [..., L]
        const = (offset[..., None] - centers) * kappa + 0.5 * inv_gamma * inv_gamma
        arg = chan * (slope[..., None] * kappa)[..., None] + const[..., None]
        if need_quad:
            arg = arg + (chan * chan) * (quad[..., None] * kappa)[..., None]
        t = torch.exp(torch.clamp(arg, min=lim.exp_floor))
        ctx.need_quad = need_quad
        ctx.save_for_backward(offset, slope, quad, chan, centers, inv_sigma, c, inv_gamma, t)
        return (2.0 * c)[..., None] * t

    @staticmethod
    def backward(ctx, grad):
        offset, slope, quad, chan, centers, inv_sigma, c, inv_gamma, t = ctx.saved_tensors
        needs = ctx.needs_input_grad
        gt = grad * t
        s0 = 2.0 * gt.sum(-1)  # [..., L]: sum_w grad dT/dc
        gtc = gt * chan
        s1 = 2.0 * gtc.sum(-1)
        s2 = 2.0 * (gtc * chan).sum(-1) if (ctx.need_quad or needs[2]) else None
        kappa = inv_sigma * inv_gamma
        ck = c * kappa  # d(prof)/d(E_c) = c kappa T (per unit T)
        out: list = [None] * 9
        if needs[0]:
            out[0] = (ck * s0).sum(-1)
        if needs[1]:
            out[1] = (ck * s1).sum(-1)
        if needs[2]:
            out[2] = (ck * s2).sum(-1)
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
        return tuple(out)


@dataclass(frozen=True)
class _Plan:
    keep: Tensor | None  # peaks that can touch the channel range (None: all)
    pad: int  # buffer channels below the first window channel (and above the last)
    n_buf: int  # buffer length (multiple of BLOCK)
    core_start: Tensor  # [L'] buffer index of each core window
    far_start: Tensor  # [L'] buffer index of each far window (below the core; above it if mirrored)
    core_width: int
    far_width: int


@torch.no_grad()
def _plan(channels: Tensor, energies: Tensor, centers: Tensor, sigma: Tensor, gamma: Tensor, has_tail: Tensor,
          full: bool) -> _Plan:
    """Windows that cover every batch member: widths from the widest peak, starts per peak.

    A peak with negative ``sigma`` is mirrored (its tail runs upward): its core window reaches
    ``x_hi`` below the centre and ``x_c`` above, and its far window lies above the core.
    """
    n_ch = channels.shape[0]
    n_pad = (n_ch + BLOCK - 1) // BLOCK * BLOCK
    n_lines = centers.shape[-1]
    device = channels.device
    flat_e = energies.reshape(-1, n_ch)
    steps = torch.diff(flat_e, dim=-1)
    rows_b = torch.broadcast_shapes(energies.shape[:-1], centers.shape[:-1])
    if full or n_ch <= 4 * BLOCK or not bool((steps > 0).all()):
        start = torch.zeros(n_lines, dtype=torch.int64, device=device)
        return _Plan(None, 0, n_pad, start, start, n_pad, 0)
    lim = _limits(channels.dtype)
    gain = steps.min()  # narrowest channel (keV)
    gm = gamma.reshape(-1, n_lines)
    s = sigma.reshape(-1, n_lines)
    mirrored = (s < 0).any(0)
    s = s.abs()
    x_c = torch.clamp(math.sqrt(2.0) * lim.u_c + 1.0 / gm, min=lim.x_hi)  # core reaches x_c into the tail
    x_lo = torch.maximum(x_c, lim.ln_tol * gm + 0.5 / gm)  # far window reaches x_lo into the tail
    x_c = torch.where(has_tail, x_c, torch.full_like(x_c, lim.x_hi))  # no tail: Gaussian and step only
    x_lo = torch.where(has_tail, x_lo, x_c)
    tail_side = torch.ceil((x_c * s).amax(0) / gain)  # core channels on the tail side of a centre
    other_side = torch.ceil((lim.x_hi * s).amax(0) / gain)
    far = torch.ceil(((x_lo - x_c) * s).amax(0) / gain)
    below = torch.where(mirrored, other_side, tail_side)
    above = torch.where(mirrored, tail_side, other_side)
    c_flat = centers.expand(*rows_b, n_lines).reshape(-1, n_lines).contiguous()
    e_flat = energies.expand(*rows_b, n_ch).reshape(-1, n_ch).contiguous()
    pos = torch.searchsorted(e_flat, c_flat).to(channels.dtype)  # [B, L]
    lo = pos.amin(0) - below - 1
    hi = pos.amax(0) + above + 1
    # a peak entirely below the range (or, mirrored, entirely above it) adds nothing there
    keep_mask = torch.where(mirrored, lo <= n_ch, hi >= 0)
    if not bool(keep_mask.any()):
        keep_mask[:] = True
    core_width = int(((hi - lo)[keep_mask].max().item()) + 2 * BLOCK - 1) // BLOCK * BLOCK
    far_width = int(far[keep_mask].max().item() + BLOCK - 1) // BLOCK * BLOCK
    if core_width + far_width >= 0.75 * n_pad:
        start = torch.zeros(n_lines, dtype=torch.int64, device=device)
        return _Plan(None, 0, n_pad, start, start, n_pad, 0)
    pad = core_width + far_width
    n_buf = pad + n_pad + pad
    lo_block = torch.div(lo.to(torch.int64) + pad, BLOCK, rounding_mode="floor") * BLOCK
    core_start = torch.where(
        mirrored,
        torch.clamp(lo_block, min=0, max=n_buf - core_width - far_width),
        torch.clamp(lo_block, min=far_width, max=n_buf - core_width),
    )
    far_start = torch.where(mirrored, core_start + core_width, core_start - far_width)
    keep = None
    if not bool(keep_mask.all()):
        keep = torch.nonzero(keep_mask).flatten()
        core_start, far_start = core_start[keep], far_start[keep]
    return _Plan(keep, pad, n_buf, core_start, far_start, core_width, far_width)


def _block_rows(rows: Tensor, start: Tensor, n_blocks: int, blocks_per_row: int) -> Tensor:
    """Buffer block index of every block of every window: ``[L * n_blocks]``."""
    first = rows * blocks_per_row + torch.div(start, BLOCK, rounding_mode="floor")
    return (first[:, None] + torch.arange(n_blocks, device=rows.device)[None, :]).reshape(-1)


def evaluate_peaks(
    calibration: tuple[Tensor, Tensor, Tensor],
    channels: Tensor,
    peaks: Peaks,
    n_out: int,
    full: bool = False,
    max_elements: int = 1 << 22,
) -> Tensor:
    """Sum of peak profiles added into ``n_out`` rows over the channels; ``[..., n_out, C]``.

    calibration : (offset, slope, quadratic) ``[...]``; channels : ``[C]`` absolute channel
    numbers (float); peaks : see :class:`Peaks`. ``full=True`` evaluates every peak on every
    channel (no windows; for a few peaks, and for checks). Windows have one width for all peaks,
    so evaluate peaks of very different widths (lines and a broad Compton peak) in separate
    calls. Large batches are evaluated in chunks of about ``max_elements`` window channels, so
    memory stays bounded.
    """
    offset, slope, quad = calibration
    per_peak = (peaks.centers, peaks.sigma, peaks.gamma, peaks.a, peaks.b, peaks.c)
    batch = torch.broadcast_shapes(offset.shape, slope.shape, quad.shape, *(t.shape[:-1] for t in per_peak))
    n_ch = channels.shape[0]
    n_lines = peaks.centers.shape[-1]
    rows = peaks.rows
    per_peak = tuple(t.expand(*batch, n_lines) for t in per_peak)
    cal = (offset.expand(batch), slope.expand(batch), quad.expand(batch))
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
    return _evaluate_group(cal, channels, energies, per_peak, rows, n_out, full)


def _evaluate_group(cal, channels, energies, per_peak, rows, n_out: int, full: bool) -> Tensor:
    """Windows, fused evaluation and accumulation of one group of peaks (see evaluate_peaks)."""
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
    n_kept = rows.shape[0]
    lim = _limits(channels.dtype)
    need_step = bool(torch.any(b != 0))  # b = 0 exactly when the step fractions are 0 (zero gradient there too)
    need_quad = bool(quad.requires_grad) or bool(torch.any(quad != 0))
    stable = bool(torch.any(gamma < lim.gamma_safe))
    inv_sigma, inv_gamma = 1.0 / sigma, 1.0 / gamma
    origin = channels[0] - plan.pad  # channel number of buffer index 0
    offs = torch.arange(plan.core_width, device=channels.device, dtype=channels.dtype)
    chan = origin + plan.core_start.to(channels.dtype)[:, None] + offs[None, :]
    core = _CoreProfiles.apply(offset, slope, quad, chan, centers, inv_sigma, a, b, c, inv_gamma,
                               (need_step, need_quad, stable))
    blocks_per_row = plan.n_buf // BLOCK
    buf = core.new_zeros(*batch, n_out * blocks_per_row, BLOCK)
    nb = plan.core_width // BLOCK
    buf = buf.index_add(-2, _block_rows(rows, plan.core_start, nb, blocks_per_row),
                        core.reshape(*batch, n_kept * nb, BLOCK))
    if plan.far_width:
        offs = torch.arange(plan.far_width, device=channels.device, dtype=channels.dtype)
        chan_far = origin + plan.far_start.to(channels.dtype)[:, None] + offs[None, :]
        far = _FarTails.apply(offset, slope, quad, chan_far, centers, inv_sigma, c, inv_gamma, need_quad)
        nbf = plan.far_width // BLOCK
        buf = buf.index_add(-2, _block_rows(rows, plan.far_start, nbf, blocks_per_row),
                            far.reshape(*batch, n_kept * nbf, BLOCK))
    out = buf.reshape(*batch, n_out, plan.n_buf)[..., plan.pad : plan.pad + n_ch]
    if need_step and (plan.pad > 0 or bool((plan.core_start > 0).any())):
        # step plateau 2 b below each core window: mark 2 b at the window start, then a reversed
        # cumulative sum spreads it over every lower channel.
        marks = b.new_zeros(*batch, n_out * (plan.n_buf + 1))
        marks = marks.index_add(-1, rows * (plan.n_buf + 1) + plan.core_start, 2.0 * b)
        marks = marks.reshape(*batch, n_out, plan.n_buf + 1)
        plateau = torch.flip(torch.cumsum(torch.flip(marks, [-1]), -1), [-1])
        out = out + plateau[..., plan.pad + 1 : plan.pad + 1 + n_ch]
    return out
