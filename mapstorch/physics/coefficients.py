"""Per-line widths and prefactors from the shape parameters, with an analytic gradient.

For every line ``l`` of a :class:`~mapstorch.physics.lines.TorchLines` table and parameter set
``theta [..., N_SHAPE]`` (MODEL.md section 4)::

    sigma  = sqrt((FWHM_OFFSET / 2.3548)^2 + eps E FWHM_FANOPRIME)
    f_step = |mu (F_STEP_OFFSET + F_STEP_LINEAR E)|
    f_tail = |F_TAIL_OFFSET + F_TAIL_LINEAR mu| (K alpha, L), |KB_F_TAIL_OFFSET + KB_F_TAIL_LINEAR mu|
             (K beta), 0 (M)
    gamma  = |GAMMA_OFFSET + GAMMA_LINEAR E| width_multiplier
    w      = ratio [edge < E0] / (1 + f_tail + f_step)      (M lines: ratio [edge < E0])
    a = w g / (sigma sqrt(2 pi)),  b = w f_step g / (2 E),  c = w f_tail g / (2 gamma sigma)

with ``g = ENERGY_SLOPE``: the prefactors of the Gaussian, step and tail in
:mod:`mapstorch.physics.profiles`. These are a few dozen small tensor operations per call; done
by autograd they would cost more than the peaks themselves, so :class:`_LineCoefficients` does
them in one node with a hand-written backward (checked by ``gradcheck`` in the tests).
:func:`line_coefficients_reference` is the same computation with plain autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mapstorch.physics.lines import TorchLines
from mapstorch.physics.spectrum import P

__all__ = ["line_coefficients", "line_coefficients_reference"]

_SQRT_2PI = math.sqrt(2.0 * math.pi)
_FWHM = 2.3548
_VAR_FLOOR = 1e-12


def _sgn(x: Tensor) -> Tensor:
    return torch.sign(x)


class _LineCoefficients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, energy, mu, ratio, edge, wmult, is_a, is_b, is_m, eps: float):
        t = theta[..., None]
        g = t[..., P.ENERGY_SLOPE, :]
        fo, fp = t[..., P.FWHM_OFFSET, :], t[..., P.FWHM_FANOPRIME, :]
        var = (fo / _FWHM) ** 2 + eps * energy * fp
        sigma = torch.sqrt(torch.clamp(var, min=_VAR_FLOOR))
        fs_raw = mu * (t[..., P.F_STEP_OFFSET, :] + t[..., P.F_STEP_LINEAR, :] * energy)
        fa_raw = t[..., P.F_TAIL_OFFSET, :] + t[..., P.F_TAIL_LINEAR, :] * mu
        fb_raw = t[..., P.KB_F_TAIL_OFFSET, :] + t[..., P.KB_F_TAIL_LINEAR, :] * mu
        gr = t[..., P.GAMMA_OFFSET, :] + t[..., P.GAMMA_LINEAR, :] * energy
        fs = fs_raw.abs()
        ft = is_a * fa_raw.abs() + is_b * fb_raw.abs()
        gamma = gr.abs() * wmult
        gate = (edge < t[..., P.COHERENT_SCT_ENERGY, :]).to(theta.dtype)
        norm = 1.0 + ft + (1.0 - is_m) * fs
        w = ratio * gate / norm
        ka = g / (sigma * _SQRT_2PI)  # a / w
        kb = fs * g / (2.0 * energy)  # b / w
        kc = ft * g / (2.0 * gamma * sigma)  # c / w
        a, b, c = w * ka, w * kb, w * kc
        ctx.eps = eps
        ctx.save_for_backward(theta, energy, mu, is_a, is_b, is_m, wmult, var, sigma, fs_raw, fa_raw, fb_raw,
                              gr, gamma, norm, w, ka, kb, kc, a, b, c)
        return sigma, gamma, a, b, c

    @staticmethod
    def backward(ctx, g_sigma, g_gamma, g_a, g_b, g_c):
        (theta, energy, mu, is_a, is_b, is_m, wmult, var, sigma, fs_raw, fa_raw, fb_raw,
         gr, gamma, norm, w, ka, kb, kc, a, b, c) = ctx.saved_tensors
        zero = torch.zeros_like(sigma)
        g_sigma = zero if g_sigma is None else g_sigma
        g_gamma = zero if g_gamma is None else g_gamma
        g_a = zero if g_a is None else g_a
        g_b = zero if g_b is None else g_b
        g_c = zero if g_c is None else g_c
        t = theta[..., None]
        g = t[..., P.ENERGY_SLOPE, :]
        # through w = ratio gate / norm, norm = 1 + f_tail + (1 - is_m) f_step
        g_w = g_a * ka + g_b * kb + g_c * kc
        g_norm = -g_w * w / norm
        g_ft = g_c * w * g / (2.0 * gamma * sigma) + g_norm
        g_fs = g_b * w * g / (2.0 * energy) + g_norm * (1.0 - is_m)
        g_sig = g_sigma - (g_a * a + g_c * c) / sigma
        g_gam = g_gamma - g_c * c / gamma
        g_g = (g_a * a + g_b * b + g_c * c) / g
        # sigma = sqrt(clamp(var)): d var / d FO = 2 FO / 2.3548^2, d var / d FP = eps E
        d_var = torch.where(var > _VAR_FLOOR, g_sig / (2.0 * sigma), zero)
        fo = t[..., P.FWHM_OFFSET, :]
        s_fs, s_fa, s_fb, s_gr = _sgn(fs_raw), _sgn(fa_raw), _sgn(fb_raw), _sgn(gr)
        g_fs_raw = g_fs * s_fs * mu
        g_fa = g_ft * is_a * s_fa
        g_fb = g_ft * is_b * s_fb
        g_gr = g_gam * s_gr * wmult
        grad = torch.zeros_like(theta)
        cols = {
            P.ENERGY_SLOPE: g_g,
            P.FWHM_OFFSET: d_var * (2.0 * fo / _FWHM**2),
            P.FWHM_FANOPRIME: d_var * (ctx.eps * energy),
            P.F_STEP_OFFSET: g_fs_raw,
            P.F_STEP_LINEAR: g_fs_raw * energy,
            P.F_TAIL_OFFSET: g_fa,
            P.F_TAIL_LINEAR: g_fa * mu,
            P.KB_F_TAIL_OFFSET: g_fb,
            P.KB_F_TAIL_LINEAR: g_fb * mu,
            P.GAMMA_OFFSET: g_gr,
            P.GAMMA_LINEAR: g_gr * energy,
        }
        idx = torch.tensor(list(cols), device=theta.device)
        sums = torch.stack([v.sum(-1) if v.dim() else v for v in cols.values()], -1)
        grad = grad.index_add(-1, idx, sums.expand(*grad.shape[:-1], len(cols)))
        return (grad,) + (None,) * 9


def line_coefficients(lines: TorchLines, theta: Tensor, fano_epsilon: float):
    """``(sigma, gamma, a, b, c)`` of every line, each ``[..., L]`` (see module docstring)."""
    return _LineCoefficients.apply(theta, lines.energy, lines.mu, lines.ratio, lines.gate_edge,
                                   lines.width_multiplier, lines.is_k_alpha_or_l, lines.is_k_beta, lines.is_m,
                                   float(fano_epsilon))


def line_coefficients_reference(lines: TorchLines, theta: Tensor, fano_epsilon: float):
    """The same as :func:`line_coefficients`, with plain autograd (for tests)."""
    from mapstorch.physics.spectrum import line_weights

    sigma, gamma, f_step, f_tail, weight = line_weights(lines, theta, fano_epsilon)
    gain = theta[..., P.ENERGY_SLOPE, None]
    a = weight * gain / (sigma * _SQRT_2PI)
    b = weight * f_step * gain / (2.0 * lines.energy)
    c = weight * f_tail * gain / (2.0 * gamma * sigma)
    return sigma, gamma, a, b, c
