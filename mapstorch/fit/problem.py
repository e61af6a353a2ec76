"""One spectrum's fit problem: data, background, model and which parameters move.

:class:`SpectrumProblem` connects the physics to the solvers. Its variables are

* ``x`` ``[n_shape_free]``: free shape parameters in natural units (calibration, widths, ...),
* ``A`` ``[K + 2]``: linear amplitudes of the components, the elastic and the Compton peak,

and it evaluates ``m = D(theta) A + background`` over the fit window, with the Jacobian with
respect to ``x`` from automatic differentiation (batched reverse-over-reverse, see
:func:`shape_jacobian`) and with respect to ``A`` exactly (the design matrix ``D``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mapstorch.fit.objectives import objective_terms
from mapstorch.physics.model import SpectrumModel

__all__ = ["SpectrumProblem", "shape_jacobian"]


def shape_jacobian(fn: Callable[[Tensor], Tensor], theta: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """``(f(theta) [C], J [C, n])`` with ``J[:, j] = d f / d theta[index[j]]``.

    ``fn`` maps a batch of parameter sets ``[B, P]`` to ``[B, C]``. The Jacobian columns are
    Jacobian-vector products, each obtained as the derivative of a vector-Jacobian product with
    respect to its (dummy) cotangent; all ``n`` of them in one batched pass, so custom autograd
    functions only need a differentiable backward.
    """
    n = int(index.numel())
    if n == 0:
        with torch.no_grad():
            out = fn(theta[None])[0]
        return out, out.new_zeros(out.shape[-1], 0)
    th = theta.detach().expand(n, -1).clone().requires_grad_(True)
    with torch.enable_grad():
        out = fn(th)
        u = torch.zeros_like(out, requires_grad=True)
        (vjp,) = torch.autograd.grad(out, th, u, create_graph=True)
        tangents = torch.zeros_like(th)
        tangents[torch.arange(n), index] = 1.0
        (jac,) = torch.autograd.grad((vjp * tangents).sum(), u)
    return out[0].detach(), jac.T.contiguous()


class SpectrumProblem:
    """Data, background and model of one spectrum's fit (see module docstring).

    model : the :class:`SpectrumModel` over the fit window; data : ``[C]`` counts in the window.
    theta : ``[N_SHAPE]`` all shape parameters (the fixed ones keep these values).
    free_index : ``[n]`` indices (into theta) of the free shape parameters.
    background : a fixed ``[C]`` tensor, or a function ``theta [B, N_SHAPE] -> [B, C]`` when it
        depends on fitted parameters (fitted SNIP width).
    """

    def __init__(self, model: SpectrumModel, data: Tensor, theta: Tensor, free_index: Tensor,
                 background: Tensor | Callable[[Tensor], Tensor]) -> None:
        self.model = model
        self.data = data
        self.theta0 = theta.detach().clone()
        self.free_index = free_index.to(torch.long)
        self.background = background

    @property
    def n_shape(self) -> int:
        return int(self.free_index.numel())

    def theta(self, x: Tensor) -> Tensor:
        """All shape parameters ``[N_SHAPE]`` with the free ones from ``x``."""
        th = self.theta0.clone()
        th[self.free_index] = x.to(th.dtype)
        return th

    def background_of(self, theta: Tensor) -> Tensor:
        """Background ``[C]`` at shape parameters ``theta [N_SHAPE]``."""
        return self.background(theta[None])[0] if callable(self.background) else self.background

    def design(self, theta: Tensor) -> Tensor:
        """Design matrix ``[C, K + 2]`` at ``theta``."""
        return self.model.design_matrix(theta)

    def mean(self, theta: Tensor, amps: Tensor) -> Tensor:
        """Model including background ``[C]``."""
        with torch.no_grad():
            return self.model(theta, amps) + self.background_of(theta)

    def shape_jacobian(self, theta: Tensor, amps: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(m [C], dm/dtheta[index] [C, n])`` with amplitudes held."""
        index = self.free_index if index is None else index

        def fn(th: Tensor) -> Tensor:
            out = self.model(th, amps.expand(th.shape[0], -1))
            bg = self.background(th) if callable(self.background) else self.background
            return out + bg

        return shape_jacobian(fn, theta, index)

    # ------------------------------------------------------------ joint variables p = [x, A]
    def joint(self, p: Tensor, jacobian: bool) -> Tensor | tuple[Tensor, Tensor]:
        """``m`` (and ``[dm/dx, D]``) at joint variables ``p = [x, A]``."""
        n = self.n_shape
        theta, amps = self.theta(p[:n]), p[n:]
        if not jacobian:
            return self.mean(theta, amps)
        m, jx = self.shape_jacobian(theta, amps)
        with torch.no_grad():
            d = self.design(theta)
        return m, torch.cat([jx, d], dim=1)

    # ------------------------------------------------------------ inner linear problem
    def amplitudes(self, theta: Tensor, start: Tensor, objective: str, penalty: Tensor | None = None,
                   tol: float = 1e-6, max_iter: int = 200) -> tuple[Tensor, Tensor]:
        """Non-negative amplitudes ``A [K + 2]`` minimising the objective at fixed ``theta``, and ``D``."""
        from mapstorch.fit.solvers import levenberg_marquardt

        with torch.no_grad():
            d = self.design(theta)
            bg = self.background_of(theta)

            def evaluate(a: Tensor, jac: bool):
                m = d @ a + bg
                return (m, d) if jac else m

            zero = torch.zeros_like(start)
            amps, _ = levenberg_marquardt(evaluate, torch.clamp(start, min=0.0), zero, zero + torch.inf, self.data,
                                          objective, penalty=penalty, tol=tol, max_iter=max_iter)
        return amps, d

    def reduced_jacobian(self, theta: Tensor, amps: Tensor, d: Tensor, objective: str) -> tuple[Tensor, Tensor]:
        """Variable projection: ``(m, J_red)`` where ``J_red`` is ``dm/dx`` with the part the
        (active, non-zero) amplitudes could absorb projected out, in the objective's metric."""
        m, jx = self.shape_jacobian(theta, amps)
        active = amps > 0
        if self.n_shape == 0 or not bool(active.any()):
            return m, jx
        w = objective_terms(objective, m, self.data)[2]
        da = d[:, active]
        gram = da.T @ (w[:, None] * da)
        gram = gram + 1e-12 * torch.diagonal(gram).max() * torch.eye(gram.shape[0], dtype=gram.dtype)
        coef = torch.linalg.solve(gram, da.T @ (w[:, None] * jx))
        return m, jx - da @ coef
