"""The MAPS spectrum as batched tensor functions of (channels, line table, shape parameters).

Shapes: ``...`` is any batch of parameter sets (one per spectrum or pixel), ``C`` channels of the
fit window, ``L`` lines, ``K`` components. Scalar parameters arrive as ``[...]`` tensors.

Per line ``l`` (MODEL.md section 4)::

    sigma_l  = sigma(E_l)
    f_step_l = |mu_l (F_STEP_OFFSET + F_STEP_LINEAR E_l)|
    f_tail_l = |F_TAIL_OFFSET + F_TAIL_LINEAR mu_l|        (K alpha and L lines)
             = |KB_F_TAIL_OFFSET + KB_F_TAIL_LINEAR mu_l|  (K beta lines)
             = 0                                           (M lines)
    gamma_l  = |GAMMA_OFFSET + GAMMA_LINEAR E_l| * width_multiplier
    weight_l = ratio_l [edge_l < E0] / (1 + f_tail_l + f_step_l)   (K and L lines; M: no division)
    line_l   = weight_l (gauss + f_step_l step + f_tail_l tail)

A component's column of the design matrix is the sum of its lines; the model is
``D(theta) @ amplitudes``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mapstorch.parameters.set import index_of
from mapstorch.physics.lines import TorchLines
from mapstorch.physics.shapes import FANO_EPSILON_XRFMAPS, detector_sigma

__all__ = [
    "P",
    "channel_energies",
    "compton_energy",
    "line_weights",
    "ESCAPE_ENERGY_KEV",
    "ESCAPE_EDGE_KEV",
]


class P:
    """Columns of the shape-parameter vector (``ParameterSet.shape_values()``) used here."""

    ENERGY_OFFSET = index_of("ENERGY_OFFSET")
    ENERGY_SLOPE = index_of("ENERGY_SLOPE")
    ENERGY_QUADRATIC = index_of("ENERGY_QUADRATIC")
    FWHM_OFFSET = index_of("FWHM_OFFSET")
    FWHM_FANOPRIME = index_of("FWHM_FANOPRIME")
    COHERENT_SCT_ENERGY = index_of("COHERENT_SCT_ENERGY")
    COMPTON_ANGLE = index_of("COMPTON_ANGLE")
    COMPTON_FWHM_CORR = index_of("COMPTON_FWHM_CORR")
    COMPTON_F_STEP = index_of("COMPTON_F_STEP")
    COMPTON_F_TAIL = index_of("COMPTON_F_TAIL")
    COMPTON_GAMMA = index_of("COMPTON_GAMMA")
    COMPTON_HI_F_TAIL = index_of("COMPTON_HI_F_TAIL")
    COMPTON_HI_GAMMA = index_of("COMPTON_HI_GAMMA")
    SNIP_WIDTH = index_of("SNIP_WIDTH")
    F_STEP_OFFSET = index_of("F_STEP_OFFSET")
    F_STEP_LINEAR = index_of("F_STEP_LINEAR")
    F_TAIL_OFFSET = index_of("F_TAIL_OFFSET")
    F_TAIL_LINEAR = index_of("F_TAIL_LINEAR")
    KB_F_TAIL_OFFSET = index_of("KB_F_TAIL_OFFSET")
    KB_F_TAIL_LINEAR = index_of("KB_F_TAIL_LINEAR")
    GAMMA_OFFSET = index_of("GAMMA_OFFSET")
    GAMMA_LINEAR = index_of("GAMMA_LINEAR")
    SI_ESCAPE = index_of("SI_ESCAPE")
    GE_ESCAPE = index_of("GE_ESCAPE")


#: Energy lost to an escaping detector K-alpha photon (XRF-Maps uses 1.73998 keV for Si).
ESCAPE_ENERGY_KEV = {"Si": 1.73998, "Ge": 9.886}
#: Only photons above the detector's K edge can create an escape peak.
ESCAPE_EDGE_KEV = {"Si": 1.8389, "Ge": 11.1031}


def channel_energies(channels: Tensor, theta: Tensor) -> Tensor:
    """Energy (keV) of each channel: ``offset + slope c + quadratic c^2``; ``[..., C]``.

    channels : (C,) absolute channel indices (float); theta : ``[..., N_SHAPE]``.
    """
    off = theta[..., P.ENERGY_OFFSET, None]
    slope = theta[..., P.ENERGY_SLOPE, None]
    quad = theta[..., P.ENERGY_QUADRATIC, None]
    return off + channels * (slope + quad * channels)


def compton_energy(theta: Tensor) -> Tensor:
    """Compton-scattered energy ``E0 / (1 + E0/511 (1 - cos angle))``; ``[...]``."""
    e0 = theta[..., P.COHERENT_SCT_ENERGY]
    angle = theta[..., P.COMPTON_ANGLE] * (math.pi / 180.0)
    return e0 / (1.0 + (e0 / 511.0) * (1.0 - torch.cos(angle)))


def line_weights(lines: TorchLines, theta: Tensor, fano_epsilon: float = FANO_EPSILON_XRFMAPS):
    """Per-line width, tail width, step and tail fractions and weights, each ``[..., L]``.

    Returns ``(sigma, gamma, f_step, f_tail, weight)``; ``weight`` includes the ratio, the
    incident-energy gate and the MAPS normalisation ``1 / (1 + f_tail + f_step)``.
    """
    t = theta[..., None]  # [..., N_SHAPE, 1] so that t[..., i, :] is [..., 1] against [L]
    e, mu = lines.energy, lines.mu
    sigma = detector_sigma(e, t[..., P.FWHM_OFFSET, :], t[..., P.FWHM_FANOPRIME, :], fano_epsilon)
    f_step = torch.abs(mu * (t[..., P.F_STEP_OFFSET, :] + t[..., P.F_STEP_LINEAR, :] * e))
    f_tail_a = torch.abs(t[..., P.F_TAIL_OFFSET, :] + t[..., P.F_TAIL_LINEAR, :] * mu)
    f_tail_b = torch.abs(t[..., P.KB_F_TAIL_OFFSET, :] + t[..., P.KB_F_TAIL_LINEAR, :] * mu)
    f_tail = lines.is_k_alpha_or_l * f_tail_a + lines.is_k_beta * f_tail_b
    gamma = torch.abs(t[..., P.GAMMA_OFFSET, :] + t[..., P.GAMMA_LINEAR, :] * e) * lines.width_multiplier
    gate = (lines.gate_edge < t[..., P.COHERENT_SCT_ENERGY, :]).to(theta.dtype)
    norm = 1.0 + f_tail + (1.0 - lines.is_m) * f_step
    weight = lines.ratio * gate / norm
    return sigma, gamma, f_step, f_tail, weight
