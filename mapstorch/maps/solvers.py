"""Batched amplitude solvers for many pixels sharing one design matrix.

Every pixel ``p`` has counts ``y_p [C]`` and a background ``b_p [C]``; all share the design
matrix ``D [C, K]`` (the shape parameters are fixed). Two estimators:

* :func:`nnls` -- ``min ||D a - t||^2, a >= 0`` with ``t = max(y - b, 0)`` (what XRF-Maps' NNLS
  routine fits), by accelerated projected gradient (FISTA with restarts) on the Gram matrix with
  unit-norm columns, from the clipped unconstrained solution; the optimality (KKT) residual
  decides convergence per pixel;
* :func:`poisson` -- maximum-likelihood ``a >= 0`` for ``y ~ Poisson(D a + b)``, by the EM
  (multiplicative) iteration ``a <- a * D^T(y / m) / D^T 1``, which keeps ``a >= 0`` and never
  raises the likelihood, started from the NNLS solution.

Both work on ``[P, ...]`` tensors on any device and dtype, and report iterations and whether
each pixel converged. :func:`poisson_stderr` gives standard errors from the Fisher information
at the solution.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from mapstorch.maps import spd_lanes

__all__ = ["nnls", "nnls_setup", "NNLS_TOL", "pseudo_inverse_stderr", "poisson", "poisson_stderr", "pair_blocks",
           "weighted_pairs", "inverse_diagonal", "spd_solve", "pearson_chi2", "model_weights_chi2", "model_chi2_stderr",
           "deviance_rows", "lm_trials"]

log = logging.getLogger(__name__)


NNLS_TOL = 1e-6  # nnls's convergence: the projected gradient below this share of its size at zero


def nnls_setup(design: Tensor) -> tuple[Tensor, Tensor, float, Tensor]:
    """What :func:`nnls` derives from the design ``[C, K]`` alone: ``(norms [K], gram [K, K],
    lip, inverse [K, K])``, the columns' norms, the Gram matrix of the normalised columns, its
    largest eigenvalue (a little more: the step is ``1 / lip``) and its pseudo-inverse (the
    start: the unconstrained solution clipped at 0), in the design's dtype."""
    norms = torch.linalg.vector_norm(design, dim=0).clamp(min=torch.finfo(design.dtype).tiny)
    d = design / norms
    gram = d.T @ d  # [K, K]
    lip = float(torch.linalg.eigvalsh(gram.double()).max()) * 1.0001
    return norms, gram, lip, torch.linalg.pinv(gram.double(), hermitian=True).to(design.dtype)


def nnls(design: Tensor, target: Tensor | None, max_iter: int = 2000, tol: float = NNLS_TOL,
         start: Tensor | None = None, engine: str = "auto", rhs: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Non-negative least squares for every pixel: ``(a [P, K], iterations [P], converged [P])``.

    design : ``[C, K]``; target : ``[P, C]``, or None with ``rhs = target @ design [P, K]``
    computed already (e.g. by :func:`mapstorch.physics.snip.snip_window`'s ``project``); the
    target is needed for nothing else. ``tol`` is relative: a pixel has converged when
    its projected gradient is below ``tol`` times ``||D^T t||`` (its size at zero). A pixel
    with a non-finite target is not iterated (0 iterations, not converged, NaN amplitudes).
    ``engine``: ``"compiled"`` runs the iterations pixel by pixel in compiled code
    (:mod:`nnls_cpu`; each pixel stops when it has converged), ``"torch"`` as tensor operations
    on the whole batch; ``"auto"`` (default) the compiled one on the CPU where numba works (no
    gradient, float32/float64), else torch. They agree to rounding.
    """
    if engine not in ("auto", "compiled", "torch"):
        raise ValueError(f"engine must be auto, compiled or torch; got {engine!r}")
    norms, gram, lip, inverse = nnls_setup(design)
    if rhs is not None:
        if rhs.dim() != 2 or rhs.shape[1] != design.shape[1]:
            raise ValueError(f"nnls: rhs must be [P, {design.shape[1]}], got {tuple(rhs.shape)}")
        b = rhs / norms  # = target @ d
    elif target is not None:
        b = target @ (design / norms)  # [P, K]
    else:
        raise ValueError("nnls needs the target or its rhs = target @ design")
    scale = torch.linalg.vector_norm(b, dim=1).clamp(min=torch.finfo(design.dtype).tiny)
    if start is not None:
        x = (start * norms).clamp(min=0.0)
    else:  # the unconstrained least-squares solution, clipped at 0: most pixels need 1-3 steps from it
        x = (b @ inverse).clamp_(min=0.0)
    if engine != "torch" and _engine("compiled" if engine == "compiled" else "auto", b) == "compiled":
        arrays = (v.detach().contiguous().numpy() for v in (gram, b, x, scale))
        xs, iters, done = _nnls_cpu().fista(*arrays, lip, tol, max_iter, torch.get_num_threads())
        return torch.from_numpy(xs) / norms, torch.from_numpy(iters), torch.from_numpy(done)
    y = x.clone()
    t = torch.ones(b.shape[0], 1, dtype=b.dtype, device=b.device)
    iters = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
    stuck = ~torch.isfinite(scale)  # NaN or infinite data: never converges, so not iterated
    done = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
    every = 1 if b.device.type == "cpu" else 8  # how often to ask whether all are done (a GPU sync)
    for it in range(max_iter):
        grad = y @ gram - b
        x_new = (y - grad / lip).clamp(min=0.0)
        # optimality: projected gradient at x_new
        g_new = x_new @ gram - b
        pg = torch.where(x_new > 0, g_new, g_new.clamp(max=0.0))
        now = torch.linalg.vector_norm(pg, dim=1) <= tol * scale
        t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
        momentum = (t - 1.0) / t_new
        y_new = x_new + momentum * (x_new - x)
        # restart the momentum where it points uphill
        uphill = ((y_new - x_new) * g_new).sum(1, keepdim=True) > 0
        t_new = torch.where(uphill, torch.ones_like(t_new), t_new)
        y_new = torch.where(uphill, x_new, y_new)
        frozen = done | stuck
        keep = frozen[:, None]
        x = torch.where(keep, x, x_new)
        y = torch.where(keep, y, y_new)
        t = torch.where(keep, t, t_new)
        iters = torch.where(frozen, iters, torch.full_like(iters, it + 1))
        done = done | (now & ~stuck)
        if (it + 1) % every == 0 and bool((done | stuck).all()):
            break
    return x / norms, iters, done


def deviance_rows(y: Tensor, m: Tensor, y_pos: Tensor | None = None) -> Tensor:
    """Poisson deviance per pixel ``[P]``: ``2 sum (y log(y / m) - (y - m))``, term by term (each
    small: accurate in float32, unlike ``sum m - sum y log m + const``). ``y_pos``: ``y`` with
    zeros raised to the smallest normal number (``0 log 0`` is then 0 without a test)."""
    if y_pos is None:
        y_pos = y.clamp(min=torch.finfo(y.dtype).tiny)
    ratio = torch.div(y_pos, m)
    ratio.log_().mul_(y).sub_(y).add_(m)
    return 2.0 * ratio.sum(-1)


def poisson(design: Tensor, counts: Tensor, background: Tensor | None, start: Tensor, max_iter: int = 100,
            tol: float = 1e-2) -> tuple[Tensor, Tensor, Tensor]:
    """Poisson maximum likelihood ``a >= 0`` for every pixel: ``(a [P, K], iterations, converged)``.

    design : ``[C, K]``; counts, background : ``[P, C]`` (background None: none); start :
    ``[P, K]`` (e.g. the NNLS solution). Per pixel a Levenberg-Marquardt (:func:`lm_trials`) on
    the Poisson deviance of ``m = a D^T + b`` with its exact curvature ``D^T diag(y / m^2) D``
    (3-4 steps from an NNLS start, where the expected ``D^T diag(1 / m) D`` took 5-7), over the
    amplitudes that are free: above zero, or at zero with the deviance falling as they grow (the
    others stay at zero for that step); a step's amplitudes are clipped at zero. Converged when
    a step lowers the deviance, or the quadratic model predicts it would, by less than ``tol``
    (deviance units: a change of ``tol`` in chi-square), or no step lowers it. Only the pixels
    still iterating are computed; pixels with non-finite data are not iterated.
    """
    p, k = start.shape
    dtype, device = design.dtype, design.device
    tiny = torch.finfo(dtype).tiny
    y = counts.to(dtype).contiguous()
    b = None if background is None else background.to(dtype).contiguous()
    a = start.to(dtype).clamp(min=0.0).clone()
    iu = torch.triu_indices(k, k, device=device)
    pairs = design[:, iu[0]] * design[:, iu[1]]  # [C, K (K + 1) / 2]
    plan = pair_blocks(pairs)
    eye = torch.eye(k, dtype=dtype, device=device)
    colsum = design.sum(0)

    def model(aa: Tensor, bb: Tensor | None) -> Tensor:
        return (aa @ design.T if bb is None else torch.addmm(bb, aa, design.T)).clamp_(min=tiny)

    m = model(a, b)
    y_pos = y.clamp(min=tiny)
    dev = deviance_rows(y, m, y_pos)
    lam = torch.full((p,), 1e-3, dtype=dtype, device=device)
    iters = torch.zeros(p, dtype=torch.long, device=device)
    done = torch.zeros(p, dtype=torch.bool, device=device)
    # pixels still iterating; one with NaN or infinite data or start could never converge
    act = torch.nonzero(torch.isfinite(dev) & torch.isfinite(a).all(1)).reshape(-1)
    for it in range(max_iter):
        if act.numel() == 0:
            break
        whole = act.numel() == p
        aa, ma, ya, ba, deva, lama, ypa = ((t if whole or t is None else t[act]) for t in (a, m, y, b, dev, lam, y_pos))
        ratio = ya / ma
        grad = colsum - ratio @ design  # half the deviance's gradient, D^T (1 - y / m)
        upper = weighted_pairs(ratio.div_(ma), pairs, plan)  # the curvature's weights y / m^2
        h = upper.new_empty(len(aa), k, k)
        h[:, iu[0], iu[1]] = upper
        h[:, iu[1], iu[0]] = upper
        free = (aa > 0) | (grad < 0)  # at zero with a positive gradient: stays at zero this step
        h = torch.where(free[:, :, None] & free[:, None, :], h, eye)
        grad = torch.where(free, grad, torch.zeros_like(grad))

        def evaluate(trial: Tensor, step: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            a_new = (aa[trial] + step).clamp(min=0.0)
            everyone = trial.numel() == len(aa)
            m_new = model(a_new, ba if everyone or ba is None else ba[trial])
            return deviance_rows(ya if everyone else ya[trial], m_new, ypa if everyone else ypa[trial]), (a_new, m_new)

        def accept(trial: Tensor, ok: Tensor, new: tuple[Tensor, Tensor]) -> None:
            nonlocal ma
            acc = trial[ok]
            aa[acc] = new[0][ok]
            if trial.numel() == len(aa) and bool(ok.all()):
                ma = new[1]
            else:
                ma[acc] = new[1][ok]

        improved, small = lm_trials(h, grad, lama, deva, tol, evaluate, accept)
        if whole:
            a, m, dev, lam = aa, ma, deva, lama
        else:
            a[act], m[act], dev[act], lam[act] = aa, ma, deva, lama
        iters[act] = it + 1
        stop = small | ~improved  # a small decrease, or nothing lowers the deviance any more
        done[act[stop]] = True
        act = act[~stop]
    return a, iters, done & torch.isfinite(dev)


def lm_trials(h: Tensor, grad: Tensor, lam: Tensor, dev: Tensor, tol: float, evaluate, accept,
              predict: bool = True, attempts: int = 5) -> tuple[Tensor, Tensor]:
    """One Levenberg-Marquardt iteration of a batch of pixels: ``(improved [P], small [P])``.

    h ``[P, n, n]`` (scoring matrix), grad ``[P, n]`` (half the deviance's gradient); ``lam``
    and ``dev`` ``[P]`` are updated in place. Each pixel solves ``(h + lam diag(h)) s = -grad``;
    ``evaluate(trial, s)`` returns the deviance of the pixels ``trial`` after their steps and
    what ``accept(trial, ok, that)`` needs to keep the steps where ``ok`` (the deviance did not
    rise). Pixels whose step was refused try again with ten times the damping (at most
    ``attempts`` times); an accepted step lowers it to 0.3 times. ``small``: the deviance fell by
    at most ``tol``, or (with ``predict``, before the first trial) the quadratic model predicted
    at most ``tol / 2``, in which case the step is not tried."""
    tiny = torch.finfo(h.dtype).tiny
    diag = torch.diagonal(h, dim1=1, dim2=2).clamp(min=tiny)
    improved = torch.zeros(len(h), dtype=torch.bool, device=h.device)
    small = torch.zeros_like(improved)
    trial = torch.arange(len(h), device=h.device)  # pixels still looking for a lower deviance
    for attempt in range(attempts):  # raise the damping of pixels whose step did not lower the deviance
        mat = h[trial] + torch.diag_embed(lam[trial, None] * diag[trial] + tiny)
        step, solved = spd_solve(mat, -grad[trial])
        bad = ~solved
        if bool(bad.any()):
            step[bad] = torch.linalg.lstsq(mat[bad], -grad[trial][bad][..., None]).solution[..., 0]
        if attempt == 0 and predict:
            # the quadratic model's predicted decrease of the deviance; below tol the pixel has
            # converged, and the trial (a model evaluation) is not needed
            hs = (h[trial] @ step[..., None])[..., 0]
            pred = -2.0 * ((grad[trial] * step).sum(1) + 0.5 * (step * hs).sum(1))
            settled = pred <= 0.5 * tol
            if bool(settled.any()):
                small[trial[settled]] = True
                improved[trial[settled]] = True
                keep = ~settled
                trial, step = trial[keep], step[keep]
                if trial.numel() == 0:
                    break
        dev_new, new = evaluate(trial, step)
        ok = dev_new <= dev[trial]
        acc = trial[ok]
        small[acc] = (dev[trial] - dev_new)[ok] <= tol
        dev[acc] = dev_new[ok]
        accept(trial, ok, new)
        improved[acc] = True
        lam[trial] = torch.where(ok, lam[trial] * 0.3, lam[trial] * 10.0)
        trial = trial[~ok]
        if trial.numel() == 0:
            break
    return improved, small


def poisson_stderr(design: Tensor, model: Tensor | None, amplitudes: Tensor, weights: Tensor | None = None,
                   engine: str = "auto") -> Tensor:
    """Standard errors ``[P, K]`` of the amplitudes from the Fisher information
    ``D^T diag(1 / m) D`` over the non-zero amplitudes of each pixel (others: NaN).
    ``weights``: ``1 / max(m, 1)`` when already computed (then ``model`` may be None).
    ``engine``: see :func:`inverse_diagonal`."""
    k = design.shape[1]
    if weights is None and model is None:
        raise ValueError("poisson_stderr needs the model or its weights")
    w = weights if weights is not None else model.clamp(min=1.0).reciprocal_()  # [P, C]
    # matrix products over the K (K + 1) / 2 distinct entries of the symmetric information
    iu = torch.triu_indices(k, k, device=design.device)
    pairs = design[:, iu[0]] * design[:, iu[1]]  # [C, K (K + 1) / 2]
    active = amplitudes > 0
    engine = _engine(engine, w, elsewhere="lanes")  # a whole chunk of pixels: lanes beat LAPACK on a GPU
    if engine == "lanes":  # pixel-last: [K (K + 1) / 2, P] straight from the product
        upper_t = pairs.T @ w.T
        se, ok = spd_lanes.packed_stderr(upper_t, active)
        failed = ~ok
        if bool(failed.any()):  # not positive definite (collinear columns): the pseudo-inverse there
            se[failed] = _stderr_from_upper(upper_t[:, failed].T, active[failed], iu, k, engine)
        return se
    if engine == "lapack":
        return _stderr_from_upper(weighted_pairs(w, pairs), active, iu, k, engine)
    # compiled: each pixel's matrix built, scaled, factorised and inverted in one pass; with
    # channel-major weights (a map fit's) the information is summed there too, never stored
    if w.T.is_contiguous() and w.dtype == pairs.dtype:
        se, ok = _spd_cpu().fisher_stderr(w.T.numpy(), pairs.contiguous().numpy(), active.contiguous().numpy(),
                                          torch.get_num_threads())
        upper = None
    else:
        upper = weighted_pairs(w, pairs)
        se, ok = _spd_cpu().packed_stderr(upper.contiguous().numpy(), active.contiguous().numpy(),
                                          torch.get_num_threads())
    se, failed = torch.from_numpy(se), ~torch.from_numpy(ok)
    if bool(failed.any()):  # not positive definite (collinear columns): the pseudo-inverse there
        part = weighted_pairs(w[failed], pairs) if upper is None else upper[failed]
        se[failed] = _stderr_from_upper(part, active[failed], iu, k, engine)
    return se


def model_chi2_stderr(design: Tensor, amplitudes: Tensor, background: Tensor, counts: Tensor
                      ) -> tuple[Tensor, Tensor]:
    """``(chi2 [P], stderr [P, K])``: :func:`model_weights_chi2`'s chi-square and
    :func:`poisson_stderr`'s errors for the model ``m = amplitudes @ design.T + background``.

    On the CPU (numba usable, no gradient, one float dtype) with channel-major ``background`` and
    ``counts`` (a map fit's): one compiled pass that stores neither the model nor its weights
    (:func:`chi2_cpu.model_chi2_stderr`), the same numbers as the two functions; pixels whose
    information is not positive definite then get the pseudo-inverse's errors, as there (from
    weights recomputed by tensor operations).
    Otherwise the two functions."""
    channel_major = counts.T.is_contiguous() and background.T.is_contiguous()
    same = counts.dtype == background.dtype == amplitudes.dtype == design.dtype
    if not (channel_major and same and _engine("auto", background) == "compiled"
            and not (counts.requires_grad or amplitudes.requires_grad or design.requires_grad)):
        w, chi = model_weights_chi2(design, amplitudes, background, counts)
        return chi, poisson_stderr(design, None, amplitudes, weights=w)
    k = design.shape[1]
    iu = torch.triu_indices(k, k)
    design = design.detach()
    pairs = design[:, iu[0]] * design[:, iu[1]]  # [C, K (K + 1) / 2], as poisson_stderr's
    active = amplitudes > 0
    chi, se, ok = _chi2_cpu().model_chi2_stderr(design.contiguous().numpy(), pairs.contiguous().numpy(),
                                                amplitudes.detach().contiguous().numpy(), active.numpy(),
                                                background.T.numpy(), counts.T.numpy(), torch.get_num_threads())
    se, failed = torch.from_numpy(se), ~torch.from_numpy(ok)
    if bool(failed.any()):  # not positive definite (collinear columns): the pseudo-inverse there
        se[failed] = pseudo_inverse_stderr(design, amplitudes[failed], background[failed], pairs, iu)
    return torch.from_numpy(chi).to(counts.dtype), se


def pseudo_inverse_stderr(design: Tensor, amplitudes: Tensor, background: Tensor, pairs: Tensor, iu: Tensor) -> Tensor:
    """:func:`poisson_stderr`'s errors ``[P, K]`` of pixels whose Fisher information is not
    positive definite (the pseudo-inverse's), with tensor operations: the model ``amplitudes [P,
    K] @ design.T + background [P, C]``, ``pairs [C, T]`` the products of the design's columns
    ``iu`` (``torch.triu_indices``)."""
    m = amplitudes @ design.T + background
    return _stderr_from_upper(weighted_pairs(m.clamp(min=1.0).reciprocal(), pairs), amplitudes > 0, iu,
                              design.shape[1], "compiled")


def _stderr_from_upper(upper: Tensor, active: Tensor, iu: Tensor, k: int, engine: str) -> Tensor:
    """:func:`poisson_stderr` from the packed information ``upper [P, K (K + 1) / 2]``, with
    tensor operations (and the pseudo-inverse where a matrix is singular)."""
    info = upper.new_zeros(upper.shape[0], k, k)
    info[:, iu[0], iu[1]] = upper
    info[:, iu[1], iu[0]] = upper
    eye = torch.eye(k, dtype=upper.dtype, device=upper.device)
    mask = active[:, :, None] & active[:, None, :]
    info = torch.where(mask, info, eye.expand_as(info))
    diag = torch.diagonal(info, dim1=1, dim2=2).clamp(min=torch.finfo(upper.dtype).tiny)
    s = 1.0 / torch.sqrt(diag)
    scaled = info * s[:, :, None] * s[:, None, :]
    var = (inverse_diagonal(scaled, engine) * s * s).clamp(min=0.0)
    return torch.where(active, torch.sqrt(var), torch.full_like(var, float("nan")))


def pair_blocks(pairs: Tensor, blocks: int = 8) -> list[tuple[int, int, Tensor]]:
    """Where the column products ``pairs [C, T]`` are not zero: ``(first, stop, columns)`` for
    ``blocks`` runs of channels. Peaks are evaluated in channel windows, so most products of two
    components are exactly zero over most channels (on the demo design, 28 % of the entries are
    not); skipping exact zeros changes no value."""
    c = pairs.shape[0]
    nonzero = pairs != 0
    edges = [round(i * c / blocks) for i in range(blocks + 1)]
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi > lo:
            cols = torch.nonzero(nonzero[lo:hi].any(0)).flatten()
            if cols.numel():
                out.append((lo, hi, cols))
    return out


def weighted_pairs(weights: Tensor, pairs: Tensor, plan: list[tuple[int, int, Tensor]] | None = None) -> Tensor:
    """``weights [P, C] @ pairs [C, T]``, on the CPU block by block over the non-zero products
    (:func:`pair_blocks`: about a third of the work on a typical design); on a GPU one product."""
    if weights.device.type != "cpu":
        return weights @ pairs
    if plan is None:
        plan = pair_blocks(pairs)
    out = weights.new_zeros(weights.shape[0], pairs.shape[1])
    for lo, hi, cols in plan:
        if cols.numel() == pairs.shape[1]:
            out += weights[:, lo:hi] @ pairs[lo:hi]
        else:
            out.index_add_(1, cols, weights[:, lo:hi] @ pairs[lo:hi, cols])
    return out


@functools.lru_cache(maxsize=1)
def _nnls_cpu():
    """The compiled NNLS iterations (:mod:`nnls_cpu`); called where :func:`_spd_cpu` found numba."""
    from mapstorch.maps import nnls_cpu

    return nnls_cpu


@functools.lru_cache(maxsize=1)
def _chi2_cpu():
    """The compiled model, weights and chi-square pass (:mod:`chi2_cpu`); called where :func:`_spd_cpu` found numba."""
    from mapstorch.maps import chi2_cpu

    return chi2_cpu


@functools.lru_cache(maxsize=1)
def _spd_cpu():
    """The compiled small-matrix kernels (:mod:`spd_cpu`), or None where numba is unusable."""
    try:
        from mapstorch.maps import spd_cpu
    except Exception as exc:  # noqa: BLE001 -- not installed or broken here: LAPACK's batched routines
        log.debug("numba is not usable (%s: %s); small systems go to LAPACK", type(exc).__name__, exc)
        return None
    return spd_cpu


_ENGINES = ("auto", "compiled", "lapack", "lanes")


def _engine(engine: str, data: Tensor, elsewhere: str = "lapack") -> str:
    """The small-matrix routine for ``data``: ``compiled`` (:mod:`spd_cpu`) on the CPU where
    numba works (float32/float64, no gradient), ``elsewhere`` on other devices, LAPACK
    otherwise (and for gradients)."""
    if engine not in _ENGINES:
        raise ValueError(f"engine must be one of {', '.join(_ENGINES)}; got {engine!r}")
    if engine == "compiled" and not (data.device.type == "cpu" and _spd_cpu() is not None):
        raise ValueError("engine='compiled' needs numba and CPU tensors")
    if engine != "auto":
        return engine
    if data.requires_grad or data.dtype not in (torch.float32, torch.float64):
        return "lapack"
    if data.device.type != "cpu":
        return elsewhere
    return "compiled" if _spd_cpu() is not None else "lapack"


def inverse_diagonal(matrices: Tensor, engine: str = "auto") -> Tensor:
    """``diag(inv(A))`` ``[P, K]`` of symmetric positive semi-definite ``A [P, K, K]`` by
    Cholesky: on the CPU compiled (64 matrices side by side, float64; :mod:`spd_cpu`), elsewhere by LAPACK's
    potri (a batched triangular solve can stall badly on the CPU) or, with ``engine="lanes"``,
    :mod:`spd_lanes` (float64; faster on a GPU for a million matrices, slower for a few thousand,
    where its ~K^2 kernel launches dominate); the pseudo-inverse for the matrices that are
    singular (collinear columns). ``engine``: ``auto``, ``compiled``, ``lanes`` or ``lapack``."""
    engine = _engine(engine, matrices)
    if engine == "compiled":
        diag, ok = _spd_cpu().inverse_diagonal(matrices.detach().contiguous().numpy(), torch.get_num_threads())
        var, failed = torch.from_numpy(diag), ~torch.from_numpy(ok)
    elif engine == "lanes":
        diag, ok = spd_lanes.inverse_diagonal(matrices.detach().permute(1, 2, 0))
        var, failed = diag.T.contiguous(), ~ok
    else:
        chol, bad = torch.linalg.cholesky_ex(matrices)
        failed = bad != 0
        if bool(failed.any()):  # potri refuses a zero pivot: invert the identity there instead
            eye = torch.eye(matrices.shape[-1], dtype=matrices.dtype, device=matrices.device)
            chol = torch.where(failed[:, None, None], eye, chol)
        var = torch.diagonal(torch.cholesky_inverse(chol), dim1=1, dim2=2).clone()
    if bool(failed.any()):
        # singular: the pseudo-inverse; not finite (NaN data): NaN (an eigensolver may refuse it)
        bad_ones = matrices[failed]
        finite = torch.isfinite(bad_ones).all(-1).all(-1)
        fill = torch.full(bad_ones.shape[:2], float("nan"), dtype=var.dtype, device=var.device)
        if bool(finite.any()):
            fill[finite] = torch.diagonal(torch.linalg.pinv(bad_ones[finite], hermitian=True), dim1=1, dim2=2)
        var[failed] = fill
    return var


def spd_solve(matrices: Tensor, rhs: Tensor, engine: str = "auto") -> tuple[Tensor, Tensor]:
    """``(inv(A) b [P, K], solved [P])`` for symmetric ``A [P, K, K]`` and ``b [P, K]`` by
    Cholesky (compiled on the CPU, LAPACK otherwise, :mod:`spd_lanes` on request: see
    :func:`inverse_diagonal`). Where ``A`` is not positive definite ``solved`` is False and the
    row is not meaningful: the caller decides (e.g. least squares)."""
    engine = _engine(engine, matrices)
    if engine == "compiled" and rhs.dtype == matrices.dtype:
        x, ok = _spd_cpu().solve(matrices.detach().contiguous().numpy(), rhs.detach().contiguous().numpy(),
                                 torch.get_num_threads())
        return torch.from_numpy(x), torch.from_numpy(ok)
    if engine == "lanes":
        x, ok = spd_lanes.solve(matrices.detach().permute(1, 2, 0), rhs.detach().T)
        return x.T, ok
    chol, info = torch.linalg.cholesky_ex(matrices)
    return torch.cholesky_solve(rhs[..., None], chol)[..., 0], info == 0


def pearson_chi2(counts: Tensor, model: Tensor, weights: Tensor | None = None) -> Tensor:
    """``sum_c (y - m)^2 / max(m, 1)`` per pixel ``[P]`` (``weights``: ``1 / max(m, 1)``)."""
    w = weights if weights is not None else model.clamp(min=1.0).reciprocal_()
    return (counts - model).square_().mul_(w).sum(-1)


def model_weights_chi2(design: Tensor, amplitudes: Tensor, background: Tensor, counts: Tensor
                       ) -> tuple[Tensor, Tensor]:
    """``(w [P, C], chi2 [P])`` for the model ``m = amplitudes @ design.T + background``: the
    Poisson weights ``1 / max(m, 1)`` and :func:`pearson_chi2`.

    On the CPU (numba usable, no gradient, float32/float64) with channel-major ``background`` and
    ``counts`` (``[P, C]`` views of ``[C, P]`` memory, as in a map fit): one compiled pass that
    does not store the model (:mod:`chi2_cpu`; ``w`` channel-major too, the sums in float64).
    Otherwise tensor operations. ``chi2`` has the dtype of the inputs."""
    channel_major = counts.T.is_contiguous() and background.T.is_contiguous()
    same = counts.dtype == background.dtype == amplitudes.dtype == design.dtype
    if channel_major and same and _engine("auto", background) == "compiled" \
            and not (counts.requires_grad or amplitudes.requires_grad or design.requires_grad):
        w, chi = _chi2_cpu().model_weights_chi2(design.detach().contiguous().numpy(),
                                                amplitudes.detach().contiguous().numpy(), background.T.numpy(),
                                                counts.T.numpy(), torch.get_num_threads())
        return torch.from_numpy(w).T, torch.from_numpy(chi).to(counts.dtype)
    m = torch.addmm(background.T, design, amplitudes.T).T if background.T.is_contiguous() \
        else amplitudes @ design.T + background
    w = m.clamp(min=1.0).reciprocal()
    return w, pearson_chi2(counts, m, weights=w)
