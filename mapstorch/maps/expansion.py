"""Per-pixel refits of shape parameters on a quadratic expansion of the design matrix.

Evaluating the MAPS model (every line with its step and tails) for each pixel and each trial
of a nonlinear fit costs about a millisecond per pixel; a map has millions. The free shape
parameters (energy offset and slope, detector noise, ...) of a map vary little from pixel to
pixel, so the design matrix is expanded around the reference parameters instead:

* the space of the ``n`` free parameters is cut into **cells** of half-widths ``h [n]``; inside a
  cell with centre ``c`` a pixel's parameters are ``theta = c + u * h`` with ``|u_k| <= 1``;
* per cell, the design ``D(theta) [C, K]`` and the counts per unit amplitude ``U(theta) [K]``
  are replaced by the quadratic through the exact values at ``c``, ``c +- h_k`` and
  ``c + (+-h_k, +-h_l)``: ``D(u) = sum_q q(u) G_q`` with the monomials
  ``q(u) = [1, u_1 .. u_n, u_k u_l (k <= l)]`` (``Q = 1 + n + n (n + 1) / 2`` terms);
* ``h`` is chosen per parameter so that this quadratic is within ``tol`` (relative to each
  column's peak) of the exact design inside a cell, by probing the model (the error of such an
  interpolation grows as ``h^3``).

A pixel's model is then one matrix product ``m = E z + b`` with ``E = [G_0 .. G_Q-1]`` ``[C, Q K]``
and ``z = q(u) (x) a`` ``[Q K]``, and its gradient one product with ``E^T``: large matrix
products over all pixels of a cell instead of model evaluations. :func:`refit` runs a bounded
Levenberg-Marquardt on the Poisson deviance over these; a pixel whose parameters leave its cell
moves to the cell it reached, whose expansion is computed once (cached for the map) and refitted
from where it stopped.
"""

from __future__ import annotations

import functools
import itertools
import logging

import torch
from torch import Tensor

from mapstorch.maps.solvers import deviance_rows as _deviance
from mapstorch.maps.solvers import inverse_diagonal, lm_trials, pair_blocks, weighted_pairs

log = logging.getLogger(__name__)

__all__ = ["DesignExpansion", "refit"]

#: a pixel moves to another cell once a ``|u_k|`` exceeds this (a little over 1: no ping-pong)
_LEAVE = 1.1
#: while a cell is being fitted its quadratic is trusted up to this ``|u_k|``
_REACH = 2.5


@functools.lru_cache(maxsize=32)
def _monomial_tables(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(r, c, eye[:, r], eye[:, c], [0 | eye])`` for :func:`monomials` (the pairs ``r <= c``)."""
    r, c = torch.triu_indices(n, n, device=device)  # the pairs k <= l, row by row
    eye = torch.eye(n, dtype=dtype, device=device)
    lead = torch.cat([torch.zeros(n, 1, dtype=dtype, device=device), eye], 1)  # d[1, u]/du
    return r, c, eye[:, r].contiguous(), eye[:, c].contiguous(), lead


def monomials(u: Tensor) -> tuple[Tensor, Tensor]:
    """``q(u) [P, Q]`` and ``dq/du [P, n, Q]`` for ``u [P, n]``: ``[1, u_1..u_n, u_k u_l (k <= l)]``."""
    p, n = u.shape
    r, c, eye_r, eye_c, lead = _monomial_tables(n, u.dtype, u.device)
    ur, uc = u.index_select(1, r), u.index_select(1, c)
    q = torch.cat([torch.ones(p, 1, dtype=u.dtype, device=u.device), u, ur * uc], 1)
    # d(u_r u_c)/du_k = [k == r] u_c + [k == c] u_r (2 u_k when r == c == k)
    quad = eye_r * uc[:, None, :] + eye_c * ur[:, None, :]  # [P, n, T]
    dq = torch.cat([lead.expand(p, n, n + 1), quad], 2)
    return q, dq


class DesignExpansion:
    """Quadratic expansions of a :class:`~mapstorch.physics.model.SpectrumModel`'s design
    matrix in the free shape parameters, one per cell of parameter space (see the module).

    model : the spectrum model; theta0 : ``[N]`` reference shape parameters (the cell grid is
    centred on them); free : ``[n]`` indices of the refitted parameters with ``lower``/``upper``
    ``[n]``; ``with_escape``: escape peaks in the design (counts per unit never count them);
    ``tol``: relative accuracy of the quadratic inside a cell. The expansions are computed in
    float64 from the model's values and kept in ``dtype`` on ``device``.
    """

    def __init__(self, model, theta0: Tensor, free: Tensor, lower: Tensor, upper: Tensor, with_escape: bool = True,
                 tol: float = 1e-4, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.model = model
        self.theta0 = theta0.detach().to("cpu", torch.float64)
        self.free = [int(i) for i in free.tolist()]
        self.lower = lower.detach().to("cpu", torch.float64)
        self.upper = upper.detach().to("cpu", torch.float64)
        self.with_escape = with_escape
        self.tol = float(tol)
        self.dtype, self.device = dtype, torch.device(device)
        self.n = len(self.free)
        self.q_count = 1 + self.n + self.n * (self.n + 1) // 2
        self._cells: dict[tuple[int, ...], tuple[Tensor, Tensor, Tensor]] = {}
        self.half = self._half_widths()  # [n] float64

    # -- exact model -------------------------------------------------------------------------
    def _exact(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Exact ``(D [B, C, K], U [B, K])`` at ``points [B, n]`` of the free parameters, as
        float64; evaluated in float32 unless the maps are float64 (the differences taken of them
        are ~1e-3 of the values, so float32's 1e-7 leaves them accurate to ~1e-4 of themselves)."""
        theta = self.theta0.expand(points.shape[0], -1).clone()
        theta[:, self.free] = points
        work = torch.float64 if self.dtype == torch.float64 else torch.float32
        theta = theta.to(self.device, work)
        with torch.no_grad():
            cols, esc = self.model.columns(theta, with_escape=self.with_escape)
        unit = cols.sum(-1)
        if esc is not None:
            cols = cols + esc
        return cols.transpose(-1, -2).to("cpu", torch.float64), unit.to("cpu", torch.float64)

    def _half_widths(self) -> Tensor:
        """Cell half-widths: per parameter, the step whose quadratic interpolation through
        ``-h, 0, +h`` misses the exact design at ``h / 2`` by ``tol`` of a column's peak."""
        x0 = self.theta0[self.free]
        span = torch.where(torch.isfinite(self.upper - self.lower), self.upper - self.lower,
                           x0.abs() * 10 + 1e-3)
        h = 1e-3 * span
        d0 = self._exact(x0[None])[0][0]
        peak = d0.abs().amax(0)
        live = peak > 0
        for k in range(self.n):
            for _ in range(8):
                pts = x0.expand(4, -1).clone()
                pts[:, k] += torch.tensor([-1.0, -0.5, 0.5, 1.0], dtype=torch.float64) * h[k]
                d = self._exact(pts)[0]
                # the quadratic through -h, 0, h at -h/2 and at h/2
                miss = torch.stack([d[1] - (0.375 * d[0] + 0.75 * d0 - 0.125 * d[3]),
                                    d[2] - (-0.125 * d[0] + 0.75 * d0 + 0.375 * d[3])])
                err = float((miss.abs().amax((0, 1))[live] / peak[live]).max()) if bool(live.any()) else 0.0
                ratio = 10.0 if err <= 0 else min(10.0, max(0.1, (self.tol / err) ** (1.0 / 3.0)))
                if 1.0 <= ratio < 1.12 or (ratio >= 1.0 and float(h[k]) >= 0.25 * float(span[k])):
                    break  # within tol and no more than 30 % below it (or as wide as allowed)
                h[k] = min(float(h[k] * ratio * 0.98), 0.25 * float(span[k]))
        log.debug("expansion cells: half-widths %s", h.tolist())
        return h

    # -- cells --------------------------------------------------------------------------------
    def cell_of(self, x: Tensor) -> Tensor:
        """Integer cell coordinates ``[P, n]`` of free-parameter values ``x [P, n]``."""
        x0 = self.theta0[self.free].to(x.device, x.dtype)
        return torch.round((x - x0) / (2 * self.half.to(x.device, x.dtype))).to(torch.long)

    def center(self, cell: tuple[int, ...]) -> Tensor:
        """Centre ``[n]`` (float64) of a cell."""
        return self.theta0[self.free] + 2 * self.half * torch.tensor(cell, dtype=torch.float64)

    def terms(self, cell: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """``(E [C, Q K], W [Q, K], centre [n])`` of a cell: the design is ``E (q(u) (x) a)``
        and the counts per unit amplitude ``q(u) W``; computed once per cell."""
        got = self._cells.get(cell)
        if got is not None:
            return got
        n, c = self.n, self.center(cell)
        pts = [c.clone()]
        for k in range(n):
            for s in (1.0, -1.0):
                p = c.clone()
                p[k] += s * self.half[k]
                pts.append(p)
        pair_at = {}
        for k, m in itertools.combinations(range(n), 2):
            pair_at[(k, m)] = len(pts)
            for sk, sm in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
                p = c.clone()
                p[k] += sk * self.half[k]
                p[m] += sm * self.half[m]
                pts.append(p)
        d, unit = self._exact(torch.stack(pts))
        gd, gu = [d[0]], [unit[0]]
        for k in range(n):  # coefficient of u_k: (f(+) - f(-)) / 2
            gd.append((d[1 + 2 * k] - d[2 + 2 * k]) / 2)
            gu.append((unit[1 + 2 * k] - unit[2 + 2 * k]) / 2)
        for k in range(n):
            for m in range(k, n):
                if k == m:  # coefficient of u_k^2: (f(+) - 2 f(0) + f(-)) / 2
                    gd.append((d[1 + 2 * k] - 2 * d[0] + d[2 + 2 * k]) / 2)
                    gu.append((unit[1 + 2 * k] - 2 * unit[0] + unit[2 + 2 * k]) / 2)
                else:  # coefficient of u_k u_m: (f(++) - f(+-) - f(-+) + f(--)) / 4
                    i = pair_at[(k, m)]
                    gd.append((d[i] - d[i + 1] - d[i + 2] + d[i + 3]) / 4)
                    gu.append((unit[i] - unit[i + 1] - unit[i + 2] + unit[i + 3]) / 4)
        e = torch.cat(gd, 1).to(self.device, self.dtype).contiguous()  # [C, Q K], q-major
        w = torch.stack(gu).to(self.device, self.dtype)  # [Q, K]
        got = (e, w, c)
        self._cells[cell] = got
        return got

    @property
    def cells_computed(self) -> int:
        return len(self._cells)

    def to(self, device: torch.device | str) -> DesignExpansion:
        """The same expansion with its cached cells on ``device`` (e.g. for CPU workers)."""
        other = object.__new__(DesignExpansion)
        other.__dict__.update(self.__dict__)
        other.device = torch.device(device)
        other._cells = {k: (e.to(device), w.to(device), c) for k, (e, w, c) in self._cells.items()}
        return other


def refit(exp: DesignExpansion, counts: Tensor, background: Tensor, amplitudes: Tensor, max_iter: int = 30,
          tol: float = 0.01, max_moves: int = 6) -> dict[str, Tensor]:
    """Refit the free shape parameters together with the amplitudes of every pixel.

    counts, background : ``[P, C]``; amplitudes : ``[P, K]`` start (e.g. NNLS). Per pixel a
    bounded Levenberg-Marquardt on the Poisson deviance of ``m = D(theta) a + b`` with
    ``a >= 0`` and the parameters within their bounds, on the expansion of the pixel's cell
    (scoring Hessian ``J^T diag(1 / max(m, 1)) J`` with ``J`` taken at the cell's centre for the
    amplitudes, refreshed every third iteration); converged when a step lowers the deviance by
    less than ``tol`` inside the cell. A pixel that converges outside its cell moves to the cell
    it reached (at most ``max_moves`` times).

    Returns a dict of ``theta [P, n]`` (free parameters), ``a [P, K]``, ``unit [P, K]`` (counts per
    unit amplitude at each pixel's parameters), ``model [P, C]`` (with the background),
    ``stderr [P, n + K]`` (parameters then amplitudes; NaN at a bound or a zero amplitude),
    ``iterations [P]``, ``converged [P]``.
    """
    p_count, k = amplitudes.shape
    n = exp.n
    dtype, device = counts.dtype, counts.device
    counts, background = counts.contiguous(), background.contiguous()  # pixel-major rows for the products
    x = exp.theta0[exp.free].to(device, dtype).expand(p_count, -1).clone()
    a = amplitudes.to(dtype).clamp(min=0.0).clone()
    iters = torch.zeros(p_count, dtype=torch.long, device=device)
    done = torch.zeros(p_count, dtype=torch.bool, device=device)
    settled = torch.zeros(p_count, dtype=torch.bool, device=device)
    out_model: Tensor | None = None  # allocated unless the first cell keeps every pixel
    out_unit = torch.empty_like(a)
    out_err = torch.full((p_count, n + k), float("nan"), dtype=dtype, device=device)
    todo = torch.arange(p_count, device=device)
    for move in range(max_moves + 1):
        if todo.numel() == 0:
            break
        cells = exp.cell_of(x[todo])
        if bool((cells == cells[:1]).all()):  # one cell (the usual first round): no sort
            keys, inverse = cells[:1], torch.zeros(len(cells), dtype=torch.long, device=cells.device)
        else:
            keys, inverse = torch.unique(cells, dim=0, return_inverse=True)
        again = []
        for g in range(keys.shape[0]):
            idx = todo[inverse == g]
            whole = idx.numel() == p_count  # every pixel (the first cell): no copies of [P, C] rows
            cell = tuple(int(v) for v in keys[g].tolist())
            e, w, center = exp.terms(cell)
            res = _fit_cell(e, w, center.to(device, dtype), exp.half.to(device, dtype),
                            exp.lower.to(device, dtype), exp.upper.to(device, dtype),
                            counts if whole else counts[idx], background if whole else background[idx], x[idx],
                            a[idx], max_iter, tol, final=move == max_moves)
            x[idx], a[idx] = res["x"], res["a"]
            iters[idx] += res["iterations"]
            inside = res["inside"]
            ok = res["converged"] & inside
            keep = inside | (move == max_moves)
            done[idx] = ok
            settled[idx] = keep
            if whole and bool(keep.all()):
                out_model = res["model"]
                out_unit[idx] = res["unit"]
                out_err[idx] = res["stderr"]
            elif bool(keep.any()):
                sel = idx[keep]
                if out_model is None:
                    out_model = torch.empty_like(counts)
                out_model[sel] = res["model"][keep]
                out_unit[sel] = res["unit"][keep]
                out_err[sel] = res["stderr"][keep]
            if bool((~keep).any()):
                again.append(idx[~keep])
        todo = torch.cat(again) if again else todo[:0]
    if out_model is None:
        out_model = torch.empty_like(counts)
    return {"theta": x, "a": a, "unit": out_unit, "model": out_model, "stderr": out_err, "iterations": iters,
            "converged": done & settled}


def _fit_cell(e: Tensor, wq: Tensor, center: Tensor, half: Tensor, lower: Tensor, upper: Tensor, y: Tensor,
              b: Tensor, x: Tensor, a: Tensor, max_iter: int, tol: float, final: bool) -> dict[str, Tensor]:
    """Levenberg-Marquardt of the pixels ``y [P, C]`` (background ``b``) of one cell, from the
    free parameters ``x [P, n]`` and amplitudes ``a [P, K]`` (see :func:`refit`)."""
    p, k = a.shape
    n = x.shape[1]
    q_count = e.shape[1] // k
    tiny = torch.finfo(y.dtype).tiny
    u = (x - center) / half
    # parameter bounds in cell units, and how far the quadratic is trusted
    u_lo = torch.clamp((lower - center) / half, min=-_REACH)
    u_hi = torch.clamp((upper - center) / half, max=_REACH)
    u = torch.minimum(torch.maximum(u, u_lo), u_hi)
    pairs = list(zip(*torch.triu_indices(n, n).tolist()))  # the quadratic monomials' order
    g0 = e[:, :k]  # [C, K] design at the centre
    iu = torch.triu_indices(k, k, device=y.device)
    pairs0 = g0[:, iu[0]] * g0[:, iu[1]]  # [C, K (K + 1) / 2]
    plan = pair_blocks(pairs0)
    eye = torch.eye(n + k, dtype=y.dtype, device=y.device)

    def forward(uu: Tensor, aa: Tensor, bb: Tensor) -> Tensor:
        q, _ = monomials(uu)
        z = (q[:, :, None] * aa[:, None, :]).reshape(len(aa), q_count * k)
        return torch.addmm(bb, z, e.T).clamp_(min=tiny)

    def hessian(uu: Tensor, aa: Tensor, m: Tensor, exact: bool = False) -> Tensor:
        """Scoring matrix ``[P, n + K, n + K]``: the amplitude columns at the centre; the
        parameter columns ``d m / d u_k = sum_q dq_qk G_q a`` at ``u`` (``exact``) or at the
        centre, ``G_k a`` (while iterating: a third of the work)."""
        pp = len(aa)
        wgt = m.clamp(min=1.0).reciprocal()
        if exact:  # d m / d u_k from the terms with u_k in them: u_k, u_k u_l (l = 1..n)
            _, dq = monomials(uu)
            ju = m.new_empty(pp, n, m.shape[1])
            for j in range(n):
                terms = [1 + j] + [1 + n + t for t, (r, c) in enumerate(pairs) if j in (r, c)]
                cols = torch.cat([e[:, q * k:(q + 1) * k] for q in terms], 1)  # [C, (1 + n) K]
                coef = (dq[:, j, terms, None] * aa[:, None, :]).reshape(pp, len(terms) * k)
                ju[:, j] = coef @ cols.T
        else:
            ju = torch.stack([aa @ e[:, (1 + j) * k:(2 + j) * k].T for j in range(n)], 1)
        h = m.new_zeros(pp, n + k, n + k)
        upper_t = weighted_pairs(wgt, pairs0, plan)
        h[:, n + iu[0], n + iu[1]] = upper_t
        h[:, n + iu[1], n + iu[0]] = upper_t
        jw = ju * wgt[:, None, :]
        h[:, :n, :n] = jw @ ju.transpose(1, 2)
        cross = jw @ g0  # [P, n, K]
        h[:, :n, n:] = cross
        h[:, n:, :n] = cross.transpose(1, 2)
        return h

    def gradient(uu: Tensor, aa: Tensor, m: Tensor, yy: Tensor) -> Tensor:
        r = 1.0 - yy / m  # half the deviance's derivative in m
        big = (r @ e).reshape(len(aa), q_count, k)  # G_q^T r
        q, dq = monomials(uu)
        ga = (q[:, :, None] * big).sum(1)
        gu = ((dq @ big) * aa[:, None, :]).sum(-1)
        return torch.cat([gu, ga], 1)

    m = forward(u, a, b)
    y_pos = y.clamp(min=tiny)
    dev = _deviance(y, m, y_pos)
    lam = torch.full((p,), 1e-3, dtype=y.dtype, device=y.device)
    iters = torch.zeros(p, dtype=torch.long, device=y.device)
    done = torch.zeros(p, dtype=torch.bool, device=y.device)
    h = y.new_zeros(p, n + k, n + k)
    act = torch.arange(p, device=y.device)  # pixels still iterating: only they are computed
    for it in range(max_iter):
        if act.numel() == 0:
            break
        full = act.numel() == p  # every pixel still iterating: work on the tensors themselves
        ua, aa, ma, ya, ba, deva, lama, ha, ypa = ((t if full else t[act]) for t in (u, a, m, y, b, dev, lam, h, y_pos))
        if it % 3 == 0:
            ha = hessian(ua, aa, ma)
            if full:
                h = ha
            else:
                h[act] = ha
        grad = gradient(ua, aa, ma, ya)

        def evaluate(trial: Tensor, step: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
            u_new = torch.minimum(torch.maximum(ua[trial] + step[:, :n], u_lo), u_hi)
            a_new = (aa[trial] + step[:, n:]).clamp(min=0.0)
            everyone = trial.numel() == len(act)  # the first trial: no copies of [P, C] rows
            m_new = forward(u_new, a_new, ba if everyone else ba[trial])
            return _deviance(ya if everyone else ya[trial], m_new, ypa if everyone else ypa[trial]), (u_new, a_new, m_new)

        def accept(trial: Tensor, ok: Tensor, new: tuple[Tensor, Tensor, Tensor]) -> None:
            nonlocal ma
            acc = trial[ok]
            ua[acc], aa[acc] = new[0][ok], new[1][ok]
            if trial.numel() == len(act) and bool(ok.all()):
                ma = new[2]
            else:
                ma[acc] = new[2][ok]

        improved, small = lm_trials(ha, grad, lama, deva, tol, evaluate, accept, predict=it > 0)
        if full:
            m = ma
        else:
            u[act], a[act], m[act], dev[act], lam[act] = ua, aa, ma, deva, lama
        iters[act] = it + 1
        # converged: a step lowered the deviance by less than tol, or nothing lowers it any more
        stop = small | ~improved
        done[act[stop]] = True
        act = act[~stop]
    inside = (u.abs() <= _LEAVE).all(1) | final
    q, _ = monomials(u)
    unit = q @ wq
    # standard errors from the scoring matrix at the solution (bounds and zero amplitudes out)
    h = hessian(u, a, m, exact=True)
    x_new = center + u * half
    # a parameter is estimated where it is inside its bounds and the data say something about it
    # (an empty pixel has no information: NaN, not 0)
    informed = torch.diagonal(h, dim1=1, dim2=2)[:, :n] > 0
    active = torch.cat([(x_new > lower) & (x_new < upper) & informed, a > 0], 1)
    mask = active[:, :, None] & active[:, None, :]
    hm = torch.where(mask, h, eye.expand_as(h))
    s = 1.0 / torch.sqrt(torch.diagonal(hm, dim1=1, dim2=2).clamp(min=tiny))
    scaled = hm * s[:, :, None] * s[:, None, :]
    err = torch.sqrt((inverse_diagonal(scaled) * s * s).clamp(min=0.0))
    scale = torch.cat([half.expand(p, -1), torch.ones_like(a)], 1)  # u -> parameter units
    err = torch.where(active, err * scale, torch.full_like(err, float("nan")))
    return {"x": x_new, "a": a, "model": m, "unit": unit, "stderr": err, "iterations": iters, "converged": done,
            "inside": inside}
