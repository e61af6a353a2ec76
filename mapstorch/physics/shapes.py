"""Peak shapes of the MAPS model as pure, broadcasting tensor functions.

All energies are in keV. ``delta`` is ``E - E_line``; ``sigma`` is the Gaussian width at the line;
``gain`` is the energy width of one channel (``ENERGY_SLOPE``), so that each shape sums to about
one over channels. Every function broadcasts its arguments, so a ``[L, 1]`` column of per-line
values against a ``[1, C]`` row of channel energies gives a ``[L, C]`` grid, and extra leading
batch dimensions pass through.

The tail (Van Espen's low-energy exponential tail) is evaluated in a form that never overflows
and keeps finite gradients for every ``gamma > 0``:

    tail = gain / (2 gamma sigma) * exp(E) * erfc(u),
    E = [d < 0] * x / gamma + 1 / (2 gamma^2),    u = x / sqrt(2) + 1 / (sqrt(2) gamma),  x = d / sigma

With ``erfc(u) = exp(-u^2) erfcx(u)`` and ``E - u^2 = -x^2/2 - relu(x)/gamma`` this becomes

    exp(E) erfc(u) = sgn(u) exp(-x^2/2 - relu(x)/gamma) erfcx(|u|) + 2 [u < 0] exp(E),

where ``E < 0`` whenever ``u < 0``: no term can overflow, whatever ``gamma`` and ``d`` are.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "FWHM_PER_SIGMA",
    "FANO_EPSILON_XRFMAPS",
    "detector_sigma",
    "gaussian",
    "step",
    "tail",
]

#: ``FWHM = 2.3548 sigma`` for a Gaussian, with the digits XRF-Maps uses.
FWHM_PER_SIGMA = 2.3548
#: Energy per electron-hole pair factor in ``sigma^2 = (FWHM_OFFSET/2.3548)^2 + eps E FANOPRIME``
#: as XRF-Maps and its override files assume it (upstream MapsTorch uses 2.96).
FANO_EPSILON_XRFMAPS = 3.58

_SQRT_2PI = math.sqrt(2.0 * math.pi)
_SQRT_2 = math.sqrt(2.0)


def detector_sigma(
    energy_kev: Tensor,
    fwhm_offset: Tensor,
    fwhm_fanoprime: Tensor,
    fano_epsilon: float = FANO_EPSILON_XRFMAPS,
) -> Tensor:
    """Gaussian width (keV) of the detector response at ``energy_kev``.

    ``sigma = sqrt((FWHM_OFFSET / 2.3548)^2 + fano_epsilon * E * FWHM_FANOPRIME)``; all arguments
    broadcast. The radicand is clamped at a tiny positive value so that a negative energy (a line
    below zero after a bad calibration) still gives a finite width and gradient.
    """
    var = (fwhm_offset / FWHM_PER_SIGMA) ** 2 + fano_epsilon * energy_kev * fwhm_fanoprime
    return torch.sqrt(torch.clamp(var, min=1e-12))


def gaussian(delta: Tensor, sigma: Tensor, gain: Tensor) -> Tensor:
    """Area-normalised Gaussian sampled on channels: ``gain / (sigma sqrt(2 pi)) exp(-d^2 / 2 sigma^2)``."""
    x = delta / sigma
    return gain / (sigma * _SQRT_2PI) * torch.exp(-0.5 * x * x)


def step(delta: Tensor, sigma: Tensor, gain: Tensor, line_energy: Tensor) -> Tensor:
    """Incomplete-charge step below a line: ``gain / (2 E_line) * erfc(d / (sqrt(2) sigma))``."""
    return gain / (2.0 * line_energy) * torch.erfc(delta / (_SQRT_2 * sigma))


def tail(delta: Tensor, sigma: Tensor, gamma: Tensor, gain: Tensor) -> Tensor:
    """Low-energy exponential tail of a line (MAPS / Van Espen), overflow-free for any ``gamma > 0``.

    ``gain / (2 gamma sigma exp(-1/(2 gamma^2))) * erfc(d/(sqrt2 sigma) + 1/(sqrt2 gamma))``, times
    ``exp(d / (gamma sigma))`` for ``d < 0``. See the module docstring for the stable form.
    """
    x = delta / sigma
    inv_gamma = 1.0 / gamma
    u = (x + inv_gamma) / _SQRT_2
    neg_u = u < 0
    # exp(-x^2/2 - relu(x)/gamma) * erfcx(|u|), signed like u.
    scaled = torch.exp(-0.5 * x * x - torch.relu(x) * inv_gamma) * torch.special.erfcx(u.abs())
    # 2 exp(E) for u < 0, where E = x/gamma + 1/(2 gamma^2) < 0; clamped so the unused branch of
    # torch.where cannot overflow (an inf there would poison the gradient with 0 * inf).
    e_arg = torch.clamp(x * inv_gamma + 0.5 * inv_gamma * inv_gamma, max=0.0)
    core = torch.where(neg_u, 2.0 * torch.exp(e_arg) - scaled, scaled)
    return gain * inv_gamma / (2.0 * sigma) * core
