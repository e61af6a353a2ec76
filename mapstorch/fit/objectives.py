"""Fit objectives: Poisson deviance, weighted least squares, plain MSE.

Each objective is a sum over channels of a per-channel loss ``rho(m, y)`` of model ``m`` and data
``y`` (both ``[..., C]``). The solvers need three things per channel:

* ``value``    — ``rho`` itself;
* ``slope``    — ``d rho / d m`` (the gradient is ``J^T slope``);
* ``weight``   — the Gauss-Newton / Fisher-scoring curvature ``E[d^2 rho / d m^2]`` (the
  approximate Hessian is ``J^T diag(weight) J``);
* ``spread``   — ``E[(d rho / d m)^2]`` under Poisson counts with mean ``m`` (for the sandwich
  covariance ``H^-1 (J^T diag(spread) J) H^-1``, which for the Poisson deviance and for weighted
  least squares is the inverse Fisher information, and for MSE is the right covariance of a
  least-squares fit to Poisson data).

======================  ================================  ===================  ==================
objective               rho                               slope                weight
======================  ================================  ===================  ==================
``poisson`` (default)   ``2 (m - y + y log(y / m))``      ``2 (1 - y / m)``    ``2 / m``
``wls``                 ``(y - m)^2 / max(y, 1)``          ``-2 (y - m) w``     ``2 w``
``mse``                 ``(y - m)^2``                      ``-2 (y - m)``       ``2``
======================  ================================  ===================  ==================

The model is floored at :data:`MODEL_FLOOR` inside the Poisson terms so that a channel whose model
is zero gives a large but finite loss. The Poisson deviance is also what every fit reports,
whatever it optimised, so that fits with different objectives can be compared.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mapstorch.errors import InputError

__all__ = ["Objective", "OBJECTIVES", "MODEL_FLOOR", "check_objective", "poisson_deviance", "objective_terms",
           "pearson_chi2"]

Objective = Literal["poisson", "wls", "mse"]
OBJECTIVES: tuple[str, ...] = ("poisson", "wls", "mse")

#: Smallest model value (counts per channel) inside logarithms and Poisson weights.
MODEL_FLOOR = 1e-6


def check_objective(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    key = {"deviance": "poisson", "poisson_deviance": "poisson", "least_squares": "wls", "chi2": "wls"}.get(key, key)
    if key not in OBJECTIVES:
        raise InputError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
    return key


def _xlogy_ratio(y: Tensor, m: Tensor) -> Tensor:
    """``y log(y / m)`` with ``0 log 0 = 0``."""
    return torch.where(y > 0, y * (torch.log(torch.clamp(y, min=MODEL_FLOOR)) - torch.log(m)), torch.zeros_like(y))


def poisson_deviance(model: Tensor, data: Tensor) -> Tensor:
    """Poisson deviance ``2 sum(m - y + y log(y / m))`` over the last axis: ``[...]``."""
    m = torch.clamp(model, min=MODEL_FLOOR)
    return 2.0 * (m - data + _xlogy_ratio(data, m)).sum(-1)


def pearson_chi2(model: Tensor, data: Tensor) -> Tensor:
    """Pearson chi-square ``sum((y - m)^2 / m)`` over the last axis (model floored at 1 count,
    so empty channels do not dominate): ``[...]``."""
    return ((data - model) ** 2 / torch.clamp(model, min=1.0)).sum(-1)


def objective_terms(objective: str, model: Tensor, data: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(value [...], slope [..., C], weight [..., C], spread [..., C])`` (see module docstring)."""
    if objective == "poisson":
        m = torch.clamp(model, min=MODEL_FLOOR)
        value = 2.0 * (m - data + _xlogy_ratio(data, m)).sum(-1)
        slope = 2.0 * (1.0 - data / m)
        weight = 2.0 / m
        return value, slope, weight, 4.0 / m
    r = data - model
    if objective == "wls":
        w = 1.0 / torch.clamp(data, min=1.0)
    elif objective == "mse":
        w = torch.ones_like(data)
    else:
        raise InputError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    value = (w * r * r).sum(-1)
    spread = 4.0 * w * w * torch.clamp(model, min=MODEL_FLOOR)
    return value, -2.0 * w * r, 2.0 * w, spread
