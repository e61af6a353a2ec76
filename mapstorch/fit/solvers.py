"""Optimisers for one spectrum: bounded Levenberg-Marquardt (Fisher scoring), L-BFGS and Adam.

The solvers know nothing about spectra. :func:`levenberg_marquardt` minimises
``sum(rho(m(p), y)) + penalty . p`` over a box ``lower <= p <= upper`` for a model ``m(p)`` that
returns its Jacobian on request; :func:`minimize_torch` minimises a scalar loss of unconstrained
variables with ``torch.optim.LBFGS`` or ``torch.optim.Adam``. Both report how they ended in a
:class:`SolveInfo` instead of raising when the fit fails.

Levenberg-Marquardt with bounds (projected, active set)
--------------------------------------------------------
Each iteration forms the gradient ``g = J^T slope + penalty`` and the Gauss-Newton / Fisher
matrix ``H = J^T diag(weight) J`` (:mod:`mapstorch.fit.objectives`). Parameters sitting on a bound
with the gradient pushing outward are held for the iteration; the rest take the step
``(H + lambda diag(H)) d = -g``, clipped to the box. A step that lowers the loss is taken and
``lambda`` shrinks by Nielsen's rule; otherwise ``lambda`` grows and the step is retried without a
new Jacobian. The fit has converged when the Newton decrement ``g^T H^-1 g / 2`` — the loss
decrease a full Gauss-Newton step would still give — falls below ``tol`` (in deviance units a
change of 1e-4 moves the parameters by about 1 % of their standard errors).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mapstorch.fit.objectives import objective_terms

__all__ = ["SolveInfo", "levenberg_marquardt", "minimize_torch", "STATUSES"]

#: How a solve can end.
STATUSES = ("converged", "max-iterations", "stalled", "non-finite")

Evaluate = Callable[[Tensor, bool], "Tensor | tuple[Tensor, Tensor]"]


@dataclass
class SolveInfo:
    """How a solve ended: status (one of :data:`STATUSES`), iterations, model evaluations,
    final loss, seconds, and a message for people."""

    status: str
    iterations: int
    evaluations: int
    loss: float
    seconds: float
    message: str = ""


def _loss(objective: str, m: Tensor, y: Tensor, penalty: Tensor | None, p: Tensor) -> float:
    value = objective_terms(objective, m, y)[0]
    if penalty is not None:
        value = value + (penalty * p).sum()
    v = float(value)
    return v if math.isfinite(v) else math.inf


def _solve_spd(h: Tensor, g: Tensor) -> Tensor:
    """Solve ``h x = g`` for a symmetric positive semi-definite ``h`` (Cholesky, else least squares)."""
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        return torch.cholesky_solve(g[:, None], chol)[:, 0]
    return torch.linalg.lstsq(h, g[:, None]).solution[:, 0]


def levenberg_marquardt(
    evaluate: Evaluate,
    p0: Tensor,
    lower: Tensor,
    upper: Tensor,
    data: Tensor,
    objective: str = "poisson",
    *,
    penalty: Tensor | None = None,
    hold: Tensor | None = None,
    max_iter: int = 100,
    tol: float = 1e-4,
    callback: Callable[[int, float], None] | None = None,
) -> tuple[Tensor, SolveInfo]:
    """Minimise ``sum(rho(evaluate(p), data)) + penalty . p`` within ``[lower, upper]``.

    evaluate : ``evaluate(p, True) -> (m [C], J [C, n])`` and ``evaluate(p, False) -> m [C]``.
    p0, lower, upper : ``[n]`` start and bounds (``+-inf`` allowed). data : ``[C]``.
    penalty : optional ``[n]`` linear penalty (e.g. a sparsity weight on amplitudes).
    hold : optional ``[n]`` mask of parameters to keep at their start values.
    tol : convergence threshold on the Newton decrement, in loss units. The fit also ends as
        converged when three accepted steps in a row each lower the loss by less than ``tol / 10``
        (a long, flat valley: further progress is statistically meaningless).
    callback : called as ``callback(iteration, loss)`` after every iteration.
    Returns the best parameters found and a :class:`SolveInfo`.
    """
    t0 = time.perf_counter()
    p = torch.maximum(torch.minimum(p0, upper), lower)
    n = p.numel()
    evals = 1
    m, jac = evaluate(p, True)
    loss = _loss(objective, m, data, penalty, p)
    if not math.isfinite(loss) or not bool(torch.isfinite(jac).all()):
        return p, SolveInfo("non-finite", 0, evals, loss, time.perf_counter() - t0,
                            "the model or its Jacobian is not finite at the starting point")
    if n == 0:
        return p, SolveInfo("converged", 0, evals, loss, time.perf_counter() - t0, "nothing to fit")
    lam, nu = 1e-3, 2.0
    span = torch.where(torch.isfinite(upper - lower), upper - lower, torch.ones_like(p))
    edge = 1e-12 * span
    status, message, it = "max-iterations", f"stopped after {max_iter} iterations", 0
    small = 0
    for it in range(1, max_iter + 1):
        _, slope, weight, _ = objective_terms(objective, m, data)
        g = jac.T @ slope
        if penalty is not None:
            g = g + penalty
        h = jac.T @ (weight[:, None] * jac)
        diag = torch.diagonal(h)
        held = ((p <= lower + edge) & (g > 0)) | ((p >= upper - edge) & (g < 0)) | ~(diag > 0)
        if hold is not None:
            held = held | hold
        free = torch.nonzero(~held).flatten()
        if free.numel() == 0:
            status, message = "converged", "every parameter is held at a bound"
            break
        hf, gf, df = h[free][:, free], g[free], diag[free]
        ridge = torch.diag(1e-10 * df)  # relative to each diagonal: the variables' scales differ by decades
        decrement = 0.5 * float(gf @ _solve_spd(hf + ridge, gf))
        if not math.isfinite(decrement):
            status, message = "non-finite", "the Gauss-Newton system is not finite"
            break
        if decrement < tol:
            status, message = "converged", f"Newton decrement {decrement:.2g} < {tol:g}"
            break
        accepted = False
        for _ in range(30):
            step = _solve_spd(hf + lam * torch.diag(df) + ridge, -gf)
            trial = p.clone()
            trial[free] = trial[free] + step
            trial = torch.maximum(torch.minimum(trial, upper), lower)
            d = trial - p
            predicted = -float(g @ d + 0.5 * d @ (h @ d))
            m_new = evaluate(trial, False)
            evals += 1
            new_loss = _loss(objective, m_new, data, penalty, trial)
            if new_loss < loss:
                rho = (loss - new_loss) / predicted if predicted > 0 else 0.0
                lam = lam * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3) if rho > 0 else lam * nu
                lam, nu = max(lam, 1e-12), 2.0
                small = small + 1 if loss - new_loss < 0.1 * tol else 0
                p, loss, accepted = trial, new_loss, True
                break
            lam, nu = lam * nu, nu * 2.0
            if lam > 1e16:
                break
        if callback is not None:
            callback(it, loss)
        if not accepted:
            status = "converged" if decrement < 100.0 * tol else "stalled"
            message = f"no step lowers the loss further (Newton decrement {decrement:.2g})"
            break
        if small >= 3:
            status, message = "converged", f"the loss changed by less than {0.1 * tol:g} in 3 steps"
            break
        m, jac = evaluate(p, True)
        evals += 1
        if not bool(torch.isfinite(jac).all()) or not bool(torch.isfinite(m).all()):
            status, message = "non-finite", f"the Jacobian became non-finite at iteration {it}"
            break
    return p, SolveInfo(status, it, evals, loss, time.perf_counter() - t0, message)


def minimize_torch(
    loss_fn: Callable[[Tensor], Tensor],
    z0: Tensor,
    method: str = "lbfgs",
    *,
    max_iter: int = 500,
    lr: float | None = None,
    tol: float = 1e-4,
    callback: Callable[[int, float], None] | None = None,
) -> tuple[Tensor, SolveInfo]:
    """Minimise a scalar ``loss_fn(z)`` of unconstrained ``z [n]`` with L-BFGS or Adam.

    L-BFGS (strong-Wolfe line search) stops when an outer iteration lowers the loss by less than
    ``tol``; Adam runs ``max_iter`` steps (learning rate ``lr``, default 0.02) and keeps the best.
    """
    t0 = time.perf_counter()
    z = z0.detach().clone().requires_grad_(True)
    evals = 0
    best_z, best = z.detach().clone(), math.inf

    def closure() -> Tensor:
        nonlocal evals
        opt.zero_grad()
        value = loss_fn(z)
        if torch.isfinite(value):
            value.backward()
        evals += 1
        return value

    status, message, it = "max-iterations", f"stopped after {max_iter} iterations", 0
    if method == "lbfgs":
        opt = torch.optim.LBFGS([z], lr=1.0 if lr is None else lr, max_iter=20, history_size=20,
                                tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")
        previous = math.inf
        for it in range(1, max_iter + 1):
            value = float(opt.step(closure))
            with torch.no_grad():
                current = float(loss_fn(z))
            if not math.isfinite(current):
                status, message = "non-finite", f"the loss became non-finite at iteration {it}"
                break
            if current < best:
                best, best_z = current, z.detach().clone()
            if callback is not None:
                callback(it, current)
            if previous - current < tol and math.isfinite(value):
                status, message = "converged", f"loss changed by {previous - current:.2g} < {tol:g}"
                break
            previous = current
    elif method == "adam":
        opt = torch.optim.Adam([z], lr=0.02 if lr is None else lr)
        for it in range(1, max_iter + 1):
            value = closure()
            current = float(value)
            if not math.isfinite(current):
                status, message = "non-finite", f"the loss became non-finite at iteration {it}"
                break
            if current < best:
                best, best_z = current, z.detach().clone()
            opt.step()
            if callback is not None:
                callback(it, current)
        else:
            status, message = "max-iterations", f"Adam ran its {max_iter} steps"
    else:
        raise ValueError(f"unknown method {method!r}")
    return best_z, SolveInfo(status, it, evals, best, time.perf_counter() - t0, message)
