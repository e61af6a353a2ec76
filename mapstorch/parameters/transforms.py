"""Maps between bounded parameters and unconstrained optimisation variables.

For a parameter with bounds ``[lo, hi]`` the optimiser works on ``z`` with
``p = lo + (hi - lo) * sigmoid(z)``: smooth, monotonic, and never outside the bounds. One-sided
bounds use ``lo + softplus(z)`` / ``hi - softplus(z)``; no bounds is the identity. All functions
are elementwise over tensors whose last axis runs over parameters (``[..., P]``), with
per-parameter bounds of shape ``[P]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["to_bounded", "to_unbounded"]

def _edge(dtype: torch.dtype) -> float:
    """Relative distance from a bound at which inverse transforms are evaluated."""
    return max(1e-12, 8.0 * torch.finfo(dtype).eps)


def _softplus_inv(y: Tensor) -> Tensor:
    # log(exp(y) - 1), stable for large y
    return y + torch.log(-torch.expm1(-y))


def to_bounded(z: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """Parameter values ``p`` (within ``[lower, upper]``) from unconstrained ``z``; ``[..., P]``."""
    lo_fin, hi_fin = torch.isfinite(lower), torch.isfinite(upper)
    lo = torch.where(lo_fin, lower, torch.zeros_like(lower))
    hi = torch.where(hi_fin, upper, torch.zeros_like(upper))
    both = lo + (hi - lo) * torch.sigmoid(z)
    only_lo = lo + torch.nn.functional.softplus(z)
    only_hi = hi - torch.nn.functional.softplus(-z)
    return torch.where(lo_fin & hi_fin, both, torch.where(lo_fin, only_lo, torch.where(hi_fin, only_hi, z)))


def to_unbounded(p: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """Inverse of :func:`to_bounded`; values on or beyond a bound map to just inside it."""
    lo_fin, hi_fin = torch.isfinite(lower), torch.isfinite(upper)
    lo = torch.where(lo_fin, lower, torch.zeros_like(lower))
    hi = torch.where(hi_fin, upper, torch.zeros_like(upper))
    span = torch.where(lo_fin & hi_fin & (hi > lo), hi - lo, torch.ones_like(hi))
    edge = _edge(p.dtype)
    frac = torch.clamp((p - lo) / span, edge, 1.0 - edge)
    both = torch.log(frac) - torch.log1p(-frac)
    tiny = torch.as_tensor(edge, dtype=p.dtype, device=p.device)
    only_lo = _softplus_inv(torch.clamp(p - lo, min=tiny))
    only_hi = -_softplus_inv(torch.clamp(hi - p, min=tiny))
    return torch.where(lo_fin & hi_fin, both, torch.where(lo_fin, only_lo, torch.where(hi_fin, only_hi, p)))
