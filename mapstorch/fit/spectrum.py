"""``fit_spectrum``: fit every free shape parameter and every amplitude of one spectrum together.

The default is a staged, bounded Levenberg-Marquardt fit of the Poisson deviance (see
:mod:`mapstorch.fit.solvers`):

0. starting point: the calibration and incident energy of the override file or data file, or —
   when those are not given — from the elastic, Compton and fluorescence peaks
   (:mod:`mapstorch.fit.guess`); amplitudes solved exactly (non-negative, same objective) at the
   starting shape;
1. calibration (offset, slope, quadratic) with the amplitudes, on the channels below the scatter
   peaks (a poor starting Compton shape cannot pull the calibration there);
2. + detector widths (FWHM offset and Fano term), same channels;
3. + scatter (incident energy, Compton angle, width and tails), whole window;
4. + everything else the preset frees (tails, steps, escape, ...).

The SNIP background is recomputed with the current calibration before every stage and held
fixed inside it (as XRF-Maps does), or — when ``SNIP_WIDTH`` is free — computed in the smooth,
differentiable mode inside the fit. Optimizers: ``lm`` (joint LM), ``varpro`` (LM on the shape
parameters with the amplitudes solved non-negatively inside), ``lbfgs`` and ``adam`` (on
unconstrained variables with log10 amplitudes, as upstream MapsTorch; unstaged).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from mapstorch.errors import InputError, ParameterError
from mapstorch.fit.guess import compton_energy_kev, guess_start, residual_peaks
from mapstorch.fit.objectives import check_objective, objective_terms, pearson_chi2, poisson_deviance
from mapstorch.fit.problem import SpectrumProblem, shape_jacobian
from mapstorch.fit.result import FitResult, StageReport
from mapstorch.fit.solvers import SolveInfo, levenberg_marquardt, minimize_torch
from mapstorch.parameters.set import N_SHAPE, ParameterSet, index_of
from mapstorch.parameters.table import AMPLITUDE_BOUNDS, SHAPE_PARAMETER_NAMES, file_key
from mapstorch.physics.lines import LineTable, build_line_table
from mapstorch.physics.model import FitWindow, SpectrumModel, fit_window
from mapstorch.physics.shapes import FWHM_PER_SIGMA, detector_sigma
from mapstorch.physics.snip import snip_background

__all__ = ["fit_spectrum", "OPTIMIZERS", "STAGES", "Progress"]

OPTIMIZERS = ("lm", "varpro", "lbfgs", "adam")

#: Shape parameters each stage adds (intersected with the requested free set; amplitudes always
#: free; an empty tuple frees everything requested), and whether the stage sees only the channels
#: below the scatter peaks (so a poor starting Compton shape cannot pull the calibration).
STAGES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("calibration", ("ENERGY_OFFSET", "ENERGY_SLOPE", "ENERGY_QUADRATIC"), True),
    ("widths", ("FWHM_OFFSET", "FWHM_FANOPRIME"), True),
    ("compton shape", ("COMPTON_FWHM_CORR", "COMPTON_F_TAIL", "COMPTON_GAMMA", "COMPTON_F_STEP",
                       "COMPTON_HI_F_TAIL", "COMPTON_HI_GAMMA"), False),
    ("scatter", ("COHERENT_SCT_ENERGY", "COMPTON_ANGLE"), False),
    ("all", (), False),
)
_AMP_NAMES = ("COHERENT_SCT_AMPLITUDE", "COMPTON_AMPLITUDE")
_AMP_INDEX = tuple(index_of(n) for n in _AMP_NAMES)

#: ``progress(stage_name, iteration, loss)``
Progress = Callable[[str, int, float], None]


# ----------------------------------------------------------------------------- inputs
def _spectrum(counts) -> np.ndarray:
    if isinstance(counts, Tensor):
        counts = counts.detach().cpu().numpy()
    try:
        y = np.asarray(counts, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"the spectrum must be an array of counts, got {type(counts).__name__}") from None
    if y.ndim != 1:
        raise InputError(f"fit_spectrum fits one spectrum [channels]; got shape {y.shape} "
                         "(sum the pixels first, or use the map fitter)")
    if y.size < 64:
        raise InputError(f"the spectrum has {y.size} channels; at least 64 are needed")
    bad = ~np.isfinite(y)
    if bad.any():
        raise InputError(f"the spectrum has {int(bad.sum())} non-finite channels (first: {int(np.argmax(bad))})")
    if (y < 0).any():
        raise InputError(f"the spectrum has negative counts (channel {int(np.argmax(y < 0))}: "
                         f"{y[np.argmax(y < 0)]:g}); fit raw counts, not background-subtracted data")
    if y.sum() <= 0:
        raise InputError("the spectrum is empty (all channels are zero)")
    return y


def _parameter_set(elements, params, preset, free, calibration, source=None
                   ) -> tuple[ParameterSet, LineTable | None, bool]:
    """(parameter set, line table, whether the calibration came from the caller). ``source``:
    the line library (default xraylib; :func:`~mapstorch.physics.lines.xrfmaps_source` for
    XRF-Maps' own tables)."""
    from mapstorch.io.override import OverrideFile

    table = None
    given_cal = False
    if isinstance(elements, str):
        elements = [e.strip() for e in elements.split(",") if e.strip()]
    if isinstance(params, OverrideFile):
        comps = list(elements) if elements else params.components
        if not comps:
            raise InputError(f"{params.path} lists no ELEMENTS_TO_FIT; give the elements to fit")
        ps = ParameterSet.default(comps, preset=preset)
        values = dict(params.parameters)
        values.update({f"{k}_MIN": v for k, v in params.lower.items()})
        values.update({f"{k}_MAX": v for k, v in params.upper.items()})
        ps = ps.with_maps_values(values)
        table = build_line_table(comps, detector=params.detector, branching=params.branching_factors(),
                                 width_multipliers=params.width_multipliers, source=source)
        given_cal = "ENERGY_SLOPE" in params.parameters
    elif isinstance(params, ParameterSet):
        if params.values.dim() != 1:
            raise InputError("fit_spectrum needs an unbatched ParameterSet (one spectrum)")
        ps = params.to(dtype=torch.float64, device="cpu")
        if elements and tuple(elements) != ps.components:
            shape = {n: float(v) for n, v in zip(ps.names[:N_SHAPE], ps.values[:N_SHAPE].tolist())}
            base = ParameterSet.default(list(elements), preset=preset)
            ps = base.with_maps_values(shape)
        given_cal = True
    else:
        if not elements:
            raise InputError("no elements to fit: give elements (e.g. 'Ca,Fe,Zn,Pb_L') or an override file")
        ps = ParameterSet.default(list(elements), preset=preset)
        if params:
            ps = ps.with_maps_values(dict(params), strict=True)
            given_cal = "ENERGY_SLOPE" in params or "CAL_SLOPE_[E_LINEAR]" in params
    if calibration is not None and not given_cal:
        off, sl, qd = (float(c) for c in calibration)
        if sl > 0:
            ps = ps.with_maps_values({"ENERGY_OFFSET": off, "ENERGY_SLOPE": sl, "ENERGY_QUADRATIC": qd})
            given_cal = True
    if free is not None:
        names = [free] if isinstance(free, str) else list(free)
        try:
            idx = [ps.index(n) for n in names]
        except ParameterError as exc:
            raise InputError(str(exc)) from None
        wanted = {ps.names[i] for i in idx} | set(_AMP_NAMES)
        ps = ps.with_free(SHAPE_PARAMETER_NAMES, False).with_free(sorted(wanted))
    else:
        ps = ps.with_preset(preset)
    if table is None:
        table = build_line_table(list(ps.components), source=source)
    return ps, table, given_cal


def _set_within(ps: ParameterSet, name: str, value: float, widen: float = 0.0) -> ParameterSet:
    """Set a value, widening the bounds (by ``widen`` relative margin) when it falls outside."""
    i = ps.index(name)
    lo, hi = float(ps.lower[i]), float(ps.upper[i])
    if not lo <= value <= hi:
        ps = ps.with_bounds(name, min(lo, value * (1 - widen)), max(hi, value * (1 + widen)))
    return ps.with_values({name: value})


# ----------------------------------------------------------------------------- the fit
class _Fit:
    """State shared by the stages of one fit."""

    def __init__(self, y: np.ndarray, ps: ParameterSet, table: LineTable, objective: str, sparsity: float,
                 tol: float, max_iter: int, progress: Progress | None) -> None:
        self.y_full = torch.as_tensor(y, dtype=torch.float64)
        self.ps = ps
        self.table = table
        self.objective = objective
        self.tol = tol
        self.max_iter = max_iter
        self.progress = progress
        self.window = fit_window(len(y), ps)
        if self.window.size < 16:
            raise InputError(f"the fit window (channels {self.window.first}-{self.window.last}) is too small; "
                             "check MIN/MAX_ENERGY_TO_FIT and the calibration")
        free = ps.free
        escape_free = bool(free[index_of("SI_ESCAPE")] or free[index_of("GE_ESCAPE")])
        e0_hi = float(ps.upper[index_of("COHERENT_SCT_ENERGY")])
        self.model = SpectrumModel(table, self.window, escape=True if escape_free else None,
                                   max_incident_energy=e0_hi, dtype=torch.float64)
        self.data = self.y_full[self.window.slice()]
        self.given_background: Tensor | None = None
        self.snip_free = bool(free[index_of("SNIP_WIDTH")])
        self.snip_stderr = math.nan
        self._sub_models: dict[tuple[int, int], SpectrumModel] = {}
        self.theta = ps.shape_values().clone()
        self.amps = ps.amplitudes().clone()
        self.sparsity = sparsity
        self.evaluations = 0
        self.iterations = 0

    # background ---------------------------------------------------------------
    def fixed_background(self, theta: Tensor) -> Tensor:
        """SNIP background ``[C]`` of the data (XRF-Maps' numbers) at ``theta``'s calibration and
        width, or the caller's background."""
        if self.given_background is not None:
            return self.given_background[self.window.slice()]
        p = theta
        bg = snip_background(self.y_full, float(p[0]), float(p[index_of("ENERGY_SLOPE")]),
                             float(p[index_of("ENERGY_QUADRATIC")]), float(p[index_of("SNIP_WIDTH")]),
                             (self.window.first, self.window.last))
        return bg[self.window.slice()]

    def background(self, theta: Tensor) -> Tensor:
        return self.fixed_background(theta)

    def tune_snip_width(self) -> tuple[float, float]:
        """Choose ``SNIP_WIDTH`` by minimising the profiled objective (amplitudes re-solved for each
        width, shape parameters held): a bounded scalar search, since the clipped background is
        piecewise in the width. Returns (width, standard error from the profile's curvature)."""
        from scipy.optimize import minimize_scalar

        i = index_of("SNIP_WIDTH")
        lo, hi = float(self.ps.lower[i]), float(self.ps.upper[i])
        prob = self.problem(())
        cache: dict[float, float] = {}

        def profile(w: float) -> float:
            if w not in cache:
                th = self.theta.clone()
                th[i] = w
                bg = self.fixed_background(th)
                p = SpectrumProblem(self.model, self.data, th, prob.free_index, bg)
                amps, d = p.amplitudes(th, self.amps, self.objective)
                cache[w] = float(objective_terms(self.objective, d @ amps + bg, self.data)[0])
                self.evaluations += 1
            return cache[w]

        res = minimize_scalar(profile, bounds=(lo, hi), method="bounded", options={"xatol": 0.01})
        w = float(res.x)
        self.theta[i] = w
        self.amps, _ = self.problem(()).amplitudes(self.theta, self.amps, self.objective)
        h = 0.02
        curv = (profile(min(w + h, hi)) - 2 * profile(w) + profile(max(w - h, lo))) / h**2
        # deviance = 2 x negative log-likelihood: Fisher information = curvature / 2
        return w, math.sqrt(2.0 / curv) if curv > 0 and self.objective == "poisson" else math.nan

    def problem(self, names: Sequence[str]) -> SpectrumProblem:
        idx = torch.tensor([index_of(n) for n in names], dtype=torch.long)
        return SpectrumProblem(self.model, self.data, self.theta, idx, self.background(self.theta))

    def below_scatter(self, prob: SpectrumProblem) -> SpectrumProblem:
        """The same problem on the channels below the lowest possible Compton energy (minus 3
        detector sigmas); the whole window when that leaves fewer than a quarter of it."""
        th = self.theta
        e0 = float(th[index_of("COHERENT_SCT_ENERGY")])
        e_cut = e0 / (1.0 + 2.0 * e0 / 511.0)
        sigma = math.sqrt((float(th[index_of("FWHM_OFFSET")]) / 2.3548) ** 2
                          + 3.58 * e_cut * float(th[index_of("FWHM_FANOPRIME")]))
        energies = self.model.energies(th)
        n = int((energies < e_cut - 3.0 * sigma).sum())
        first = self.window.first
        if n < max(0.25 * self.window.size, 32) or n >= self.window.size:
            return prob
        window = FitWindow(first, first + n - 1)
        key = (window.first, window.last)
        if key not in self._sub_models:
            self._sub_models[key] = SpectrumModel(self.table, window, escape=self.model.escape,
                                                  max_incident_energy=float(self.ps.upper[index_of("COHERENT_SCT_ENERGY")]),
                                                  dtype=torch.float64)
        bg = prob.background if callable(prob.background) else prob.background[:n]
        return SpectrumProblem(self._sub_models[key], self.data[:n], self.theta, prob.free_index, bg)

    def penalty(self, problem: SpectrumProblem, n_shape: int) -> Tensor | None:
        if self.sparsity <= 0:
            return None
        per_unit = self.model.counts(self.theta, torch.ones_like(self.amps))
        pen = torch.zeros(n_shape + self.amps.numel(), dtype=torch.float64)
        k = self.model.n_components
        pen[n_shape:n_shape + k] = self.sparsity * per_unit[:k]  # elements only, not the scatter peaks
        return pen

    def report(self, stage: str) -> Callable[[int, float], None] | None:
        if self.progress is None:
            return None
        return lambda it, loss: self.progress(stage, it, loss)

    # one LM stage --------------------------------------------------------------
    def stage_lm(self, stage: str, names: Sequence[str], varpro: bool, below_scatter: bool = False) -> SolveInfo:
        prob = self.problem(names)
        if below_scatter:
            prob = self.below_scatter(prob)
        n = prob.n_shape
        pen = self.penalty(prob, n)
        pen_a = None if pen is None else pen[n:]
        # amplitudes the (sub-)window barely sees stay where they are (e.g. the elastic peak
        # below the scatter region): their tails there cannot set them
        seen = prob.model.counts(self.theta, torch.ones_like(self.amps))
        whole = self.model.counts(self.theta, torch.ones_like(self.amps))
        unseen = seen < 1e-3 * whole
        amps, _ = prob.amplitudes(self.theta, self.amps, self.objective, pen_a)
        self.amps = torch.where(unseen, self.amps, amps)
        idx = prob.free_index
        lo, hi = self.ps.lower[idx], self.ps.upper[idx]
        x0 = self.theta[idx].clone()
        if not varpro:
            zero = torch.zeros_like(self.amps)
            hold = torch.cat([torch.zeros(n, dtype=torch.bool), unseen])
            p, info = levenberg_marquardt(
                prob.joint, torch.cat([x0, self.amps]), torch.cat([lo, zero]), torch.cat([hi, zero + torch.inf]),
                prob.data, self.objective, penalty=pen, hold=hold, max_iter=self.max_iter, tol=self.tol,
                callback=self.report(stage))
            self.theta, self.amps = prob.theta(p[:n]), p[n:].clone()
        else:
            state = {"amps": self.amps}

            def evaluate(x: Tensor, jac: bool):
                th = prob.theta(x)
                amps, d = prob.amplitudes(th, state["amps"], self.objective, pen_a)
                state["amps"], state[tuple(x.tolist())] = amps, amps
                if not jac:
                    return d @ amps + prob.background_of(th)
                return prob.reduced_jacobian(th, amps, d, self.objective)

            x, info = levenberg_marquardt(evaluate, x0, lo, hi, prob.data, self.objective, max_iter=self.max_iter,
                                          tol=self.tol, callback=self.report(stage))
            self.theta = prob.theta(x)
            self.amps, _ = prob.amplitudes(self.theta, state["amps"], self.objective, pen_a)
        self.evaluations += info.evaluations
        self.iterations += info.iterations
        return info

    # L-BFGS / Adam --------------------------------------------------------------
    def run_torch(self, method: str, max_iter: int, lr: float | None) -> SolveInfo:
        ps = self.ps
        names = [n for n in ps.free_names if n in SHAPE_PARAMETER_NAMES and n not in _AMP_NAMES + ("SNIP_WIDTH",)]
        prob = self.problem(names)
        pen = self.penalty(prob, 0)
        self.amps, _ = prob.amplitudes(self.theta, self.amps, self.objective, pen)
        lo_a, hi_a = AMPLITUDE_BOUNDS
        log_a = torch.log10(torch.clamp(self.amps, min=10.0**lo_a))
        values = ps.values.clone()
        values[:N_SHAPE] = self.theta
        values[N_SHAPE:] = log_a[:-2]
        values[list(_AMP_INDEX)] = log_a[-2:]
        free = ps.free.clone()
        free[N_SHAPE:] = True
        free[list(_AMP_INDEX)] = True
        start = ParameterSet(ps.names, values, ps.lower, ps.upper, free)
        bg = prob.background
        k = self.model.n_components

        def loss_fn(z: Tensor) -> Tensor:
            cur = start.from_unconstrained(z)
            theta, amps = cur.shape_values(), cur.amplitudes()
            m = self.model(theta, amps) + (bg(theta[None])[0] if callable(bg) else bg)
            value = objective_terms(self.objective, m, self.data)[0]
            if pen is not None:
                value = value + (pen[:k] * amps[:k]).sum()
            return value

        z, info = minimize_torch(loss_fn, start.to_unconstrained(), method, max_iter=max_iter, lr=lr,
                                 tol=self.tol, callback=self.report(method))
        final = start.from_unconstrained(z)
        self.theta, self.amps = final.shape_values().detach().clone(), final.amplitudes().detach().clone()
        self.evaluations += info.evaluations
        self.iterations += info.iterations
        return info


def fit_spectrum(
    counts,
    elements: Sequence[str] | str | None = None,
    *,
    params=None,
    calibration: Sequence[float] | None = None,
    incident_energy: float | None = None,
    preset: str | int = "2",
    free: Sequence[str] | None = None,
    optimizer: str = "lm",
    objective: str = "poisson",
    sparsity: float = 0.0,
    guess: bool | None = None,
    staged: bool | None = None,
    max_iter: int | None = None,
    tol: float = 1e-4,
    learning_rate: float | None = None,
    background=None,
    progress: Progress | None = None,
) -> FitResult:
    """Fit one spectrum: free shape parameters and all amplitudes together (module docstring).

    counts : ``[C]`` counts per channel (the whole spectrum; the fit window comes from
        MIN/MAX_ENERGY_TO_FIT and the calibration).
    elements : components to fit (``"Fe"``, ``"Pb_L"``, ``"Si_Cl"`` pile-up, ...); default the
        override file's ELEMENTS_TO_FIT.
    params : an :class:`~mapstorch.io.override.OverrideFile` (values and ``_MIN``/``_MAX``
        bounds), a :class:`ParameterSet`, or ``{MAPS name: value}``; default our defaults.
    calibration : ``(offset, slope, quadratic)`` of the data file, used when ``params`` has none.
    incident_energy : keV; when not given it comes from ``params`` (or the elastic peak).
    preset : XRF-Maps fit preset (``2`` no tails, ``3`` with tails, ``5``, ``"all"``) unless
        ``free`` lists the shape parameters to fit explicitly.
    optimizer : ``lm`` (default), ``varpro``, ``lbfgs`` or ``adam``.
    objective : ``poisson`` (deviance, default), ``wls`` or ``mse``.
    sparsity : weight of an L1 penalty on element counts (loss units per count; 0 = off).
    guess : automatic starting calibration / incident energy / Compton angle; default on when
        the calibration does not come from ``params`` or ``calibration``.
    staged : LM and VarPro fit in stages: ``True`` all of :data:`STAGES` (calibration, widths,
        Compton shape, scatter, all); ``False`` everything at once; default (``None``) all stages
        after an automatic guess, and from a given start (override file, parameter set) only
        the calibration on the fluorescence channels, then everything.
    max_iter : per stage (LM, VarPro; default 100), or in total (L-BFGS 50 outer iterations, Adam 500).
    tol : convergence threshold in loss units (Newton decrement for LM / VarPro).
    background : a fixed background ``[C]`` (counts per channel, whole spectrum) to use instead
        of SNIP, e.g. a measured blank or a modelled continuum.
    progress : called as ``progress(stage, iteration, loss)``.

    Never raises for a fit that fails numerically: the result's ``status`` says what happened.
    Raises :class:`InputError` for bad input (before any fitting).
    """
    t0 = time.perf_counter()
    y = _spectrum(counts)
    optimizer = str(optimizer).strip().lower()
    if optimizer not in OPTIMIZERS:
        raise InputError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    objective = check_objective(objective)
    if not (sparsity >= 0 and math.isfinite(sparsity)):
        raise InputError(f"sparsity must be a non-negative number, got {sparsity!r}")
    if max_iter is not None and max_iter < 1:
        raise InputError(f"max_iter must be at least 1, got {max_iter}")
    ps, table, given_cal = _parameter_set(elements, params, preset, free, calibration)
    notes: list[str] = []
    if incident_energy is not None:
        if not (incident_energy > 0 and math.isfinite(incident_energy)):
            raise InputError(f"the incident energy must be a positive number of keV, got {incident_energy!r}")
        ps = _set_within(ps, "COHERENT_SCT_ENERGY", float(incident_energy), widen=0.05)
    given_e0 = incident_energy is not None or _has_e0(params)
    if guess is None:
        guess = not given_cal
    if guess:
        i_sl = index_of("ENERGY_SLOPE")
        g = guess_start(y, table, float(ps["ENERGY_OFFSET"]), float(ps["ENERGY_SLOPE"]),
                        float(ps["ENERGY_QUADRATIC"]), float(ps["COHERENT_SCT_ENERGY"]) if given_e0 else None,
                        float(ps["COMPTON_ANGLE"]), slope_bounds=(float(ps.lower[i_sl]), float(ps.upper[i_sl])),
                        offset_bounds=(float(ps.lower[0]), float(ps.upper[0])))
        ps = ps.with_values(ENERGY_OFFSET=g.offset, ENERGY_SLOPE=g.slope)
        ps = _set_within(ps, "COHERENT_SCT_ENERGY", g.incident_energy, widen=0.05)
        if g.compton_angle is not None:
            i = index_of("COMPTON_ANGLE")
            ps = ps.with_values(COMPTON_ANGLE=min(max(g.compton_angle, float(ps.lower[i])), float(ps.upper[i])))
        notes += ["start: " + n for n in g.notes]
    if not _has_key(params, "MAX_ENERGY_TO_FIT"):
        # no fit window was asked for: make it reach past the scatter peaks (within the spectrum)
        e0 = float(ps["COHERENT_SCT_ENERGY"])
        top = float(ps["ENERGY_OFFSET"]) + float(ps["ENERGY_SLOPE"]) * (len(y) - 1)
        want = min(e0 + 1.0, top)
        if want > float(ps["MAX_ENERGY_TO_FIT"]) + 0.05:
            ps = _set_within(ps, "MAX_ENERGY_TO_FIT", want)
            notes.append(f"start: fit window up to {want:.3g} keV (1 keV above the incident energy)")
    ps = _trust_region(ps, params)
    ps, held = _hold_scatter_outside(ps, len(y))
    if held:
        notes.append("the scatter peaks lie above the fit window: " + ", ".join(held) + " held")
    bg_given = None
    if background is not None:
        bg_given = np.asarray(background, dtype=np.float64)
        if bg_given.shape != y.shape or not np.isfinite(bg_given).all() or (bg_given < 0).any():
            raise InputError(f"the background must be finite, non-negative counts of the same shape as the "
                             f"spectrum {y.shape}, got shape {bg_given.shape}")
        if ps.free[index_of("SNIP_WIDTH")]:
            raise InputError("SNIP_WIDTH cannot be fitted when a background is given")
    fit = _Fit(y, ps, table, objective, sparsity, tol,
               max_iter or (100 if optimizer in ("lm", "varpro") else 50 if optimizer == "lbfgs" else 500), progress)
    if bg_given is not None:
        fit.given_background = torch.as_tensor(bg_given)
    shape_free = [n for n in ps.free_names if n in SHAPE_PARAMETER_NAMES and n not in _AMP_NAMES + ("SNIP_WIDTH",)]
    stages: list[StageReport] = []
    status, message = "converged", ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            if optimizer in ("lm", "varpro"):
                short = staged is None and not guess
                plan = (_plan(shape_free, short=short) if staged or staged is None
                        else [("all", tuple(shape_free), False)])
                for number, (name, names, below) in enumerate(plan):
                    ts = time.perf_counter()
                    if number > 0 and fit.snip_free:  # not before the first: its shape may still be poor
                        fit.tune_snip_width()
                    info = fit.stage_lm(name, names, optimizer == "varpro", below_scatter=below)
                    stages.append(StageReport(name, tuple(names), info.status, info.iterations, math.nan,
                                              time.perf_counter() - ts))
                    stages[-1].deviance = _deviance(fit)
                    status, message = info.status, info.message
                    if info.status == "non-finite":
                        break
                if fit.snip_free and status != "non-finite":  # final width, then polish the last stage
                    ts = time.perf_counter()
                    fit.snip_stderr = fit.tune_snip_width()[1]
                    info = fit.stage_lm("polish", plan[-1][1], optimizer == "varpro")
                    stages.append(StageReport("polish", plan[-1][1], info.status, info.iterations, _deviance(fit),
                                              time.perf_counter() - ts))
                    status, message = info.status, info.message
            else:
                ts = time.perf_counter()
                if fit.snip_free:
                    fit.snip_stderr = fit.tune_snip_width()[1]
                info = fit.run_torch(optimizer, fit.max_iter, learning_rate)
                stages.append(StageReport(optimizer, tuple(shape_free), info.status, info.iterations,
                                          _deviance(fit), time.perf_counter() - ts))
                status, message = info.status, info.message
        except (RuntimeError, torch.linalg.LinAlgError) as exc:  # numerical failure: report, don't crash
            status, message = "non-finite", f"numerical failure: {exc}"
    worst = [s for s in stages if s.status != "converged"]
    if worst and status == "converged":
        status, message = worst[-1].status, f"stage {worst[-1].name}: {message or worst[-1].status}"
    return _result(fit, shape_free, optimizer, status, message, stages, notes, time.perf_counter() - t0)


_SCATTER_SHAPE = ("COHERENT_SCT_ENERGY", "COMPTON_ANGLE", "COMPTON_FWHM_CORR", "COMPTON_F_TAIL", "COMPTON_GAMMA",
                  "COMPTON_F_STEP", "COMPTON_HI_F_TAIL", "COMPTON_HI_GAMMA")


def _trust_region(ps: ParameterSet, params) -> ParameterSet:
    """Keep the calibration near its start (slope +-10 %, offset +-0.1 keV) unless ``params`` set
    its bounds: weak spectra cannot pin it, and a wandering calibration gives nonsense."""
    for name, lo, hi in (("ENERGY_SLOPE", 0.9, 1.1), ("ENERGY_OFFSET", None, None)):
        if _has_key(params, f"{name}_MIN") or _has_key(params, f"{file_key(name)}_MIN"):
            continue
        v, i = float(ps[name]), ps.index(name)
        new_lo, new_hi = (v * lo, v * hi) if lo is not None else (v - 0.1, v + 0.1)
        ps = ps.with_bounds(name, max(float(ps.lower[i]), new_lo), min(float(ps.upper[i]), new_hi))
    return ps


def _hold_scatter_outside(ps: ParameterSet, n_channels: int) -> tuple[ParameterSet, list[str]]:
    """Fix the scatter parameters when even the lowest Compton energy lies 3 detector sigmas
    above the fit window (they would only chase tails)."""
    window = fit_window(n_channels, ps)
    e_top = float(ps["ENERGY_OFFSET"]) + float(ps["ENERGY_SLOPE"]) * window.last
    e0 = float(ps["COHERENT_SCT_ENERGY"])
    e_low = e0 / (1.0 + 2.0 * e0 / 511.0)
    sigma = math.sqrt((float(ps["FWHM_OFFSET"]) / 2.3548) ** 2 + 3.58 * e_low * float(ps["FWHM_FANOPRIME"]))
    if e_low - 3.0 * sigma <= e_top:
        return ps, []
    held = [n for n in _SCATTER_SHAPE if bool(ps.free[ps.index(n)])]
    return ps.with_free(held, False), held


def _has_key(params, key: str) -> bool:
    """Whether ``params`` (override file, mapping or parameter set) sets ``key``."""
    if params is None:
        return False
    if isinstance(params, ParameterSet):
        return True
    values = getattr(params, "parameters", params)
    return isinstance(values, Mapping) and key in values


def _has_e0(params) -> bool:
    """Whether ``params`` sets the incident energy."""
    if params is None:
        return False
    if isinstance(params, ParameterSet):
        return True
    values = getattr(params, "parameters", params)  # an OverrideFile's values, or a mapping
    return isinstance(values, Mapping) and "COHERENT_SCT_ENERGY" in values


def _plan(shape_free: Sequence[str], short: bool = False) -> list[tuple[str, tuple[str, ...], bool]]:
    """The stages to run: cumulative free sets, skipping stages that add nothing; ``short``: only
    the first (calibration) stage and the last."""
    plan: list[tuple[str, tuple[str, ...], bool]] = []
    done: set[str] = set()
    for name, names, below in (STAGES[0], STAGES[-1]) if short else STAGES:
        now = set(shape_free) if not names else done | (set(names) & set(shape_free))
        if now != done or not plan and not now:
            plan.append((name, tuple(n for n in shape_free if n in now), below))
            done = now
    if not plan or set(plan[-1][1]) != set(shape_free):
        plan.append(("all", tuple(shape_free), False))
    return plan


def _scaled_inverse(h: Tensor) -> Tensor:
    """Inverse of a symmetric positive semi-definite matrix whose diagonal spans many decades
    (shape parameters and amplitudes): inverted after scaling to a unit diagonal."""
    diag = torch.diagonal(h)
    scale = torch.where(diag > 0, 1.0 / torch.sqrt(torch.clamp(diag, min=1e-300)), torch.zeros_like(diag))
    hs = h * scale[:, None] * scale[None, :]
    return torch.linalg.pinv(hs, hermitian=True, rtol=1e-13) * scale[:, None] * scale[None, :]


def _deviance(fit: _Fit) -> float:
    bg = fit.background(fit.theta)
    bg = bg(fit.theta[None])[0] if callable(bg) else bg
    with torch.no_grad():
        m = fit.model(fit.theta, fit.amps) + bg
    return float(poisson_deviance(m, fit.data))


def _result(fit: _Fit, shape_free: Sequence[str], optimizer: str, status: str, message: str,
            stages: list[StageReport], notes: list[str], seconds: float) -> FitResult:
    theta, amps, model = fit.theta, fit.amps, fit.model
    prob = fit.problem(shape_free)
    bg_fixed = prob.background_of(theta)
    with torch.no_grad():
        comps = model.components(theta, amps, bg_fixed)
        m = comps["Total"]
    dev = float(poisson_deviance(m, fit.data))
    chi2 = float(pearson_chi2(m, fit.data))
    if not math.isfinite(dev) or not bool(torch.isfinite(amps).all()):
        status, message = "non-finite", message or "the fitted model is not finite"
    # covariance of (free shape parameters not at a bound, excited amplitudes)
    idx = prob.free_index
    lo, hi = fit.ps.lower[idx], fit.ps.upper[idx]
    span = torch.where(torch.isfinite(hi - lo), hi - lo, torch.ones_like(lo))
    x = theta[idx]
    at_bound = (x <= lo + 1e-9 * span) | (x >= hi - 1e-9 * span)
    names = [n for n in shape_free]
    use = torch.nonzero(~at_bound).flatten()
    k2 = amps.numel()
    try:
        _, jx = prob.shape_jacobian(theta, amps, idx[use])
        with torch.no_grad():
            d = model.design_matrix(theta)
        per_unit_fn = lambda th: model.columns(th, with_escape=False)[0].sum(-1)  # noqa: E731
        per_unit, dper = shape_jacobian(per_unit_fn, theta, idx[use])
        excited = per_unit > 0
        jac = torch.cat([jx, d[:, excited]], 1)
        _, _, weight, spread = objective_terms(fit.objective, m, fit.data)
        h = jac.T @ (weight[:, None] * jac)
        s = jac.T @ (spread[:, None] * jac)
        h_inv = _scaled_inverse(h)
        cov = h_inv @ s @ h_inv
        n_x = int(use.numel())
        # counts = A_k * per_unit_k(theta): gradient wrt (x_used, A_excited)
        grad = torch.zeros(k2, cov.shape[0], dtype=cov.dtype)
        grad[:, :n_x] = amps[:, None] * dper
        ex_idx = torch.nonzero(excited).flatten()
        grad[ex_idx, n_x + torch.arange(ex_idx.numel())] = per_unit[ex_idx]
        var_counts = torch.einsum("kp,pq,kq->k", grad, cov, grad)
        counts_err = torch.sqrt(torch.clamp(var_counts, min=0.0))
        counts_err = torch.where(excited, counts_err, torch.full_like(counts_err, math.nan))
        cov_np = cov.numpy()
        cov_names = tuple(names[i] for i in use.tolist()) + tuple(
            model.column_names[i] for i in ex_idx.tolist())
        dof = max(int(fit.data.numel()) - int(jac.shape[1]), 1)
    except (RuntimeError, torch.linalg.LinAlgError) as exc:
        per_unit = model.counts(theta, torch.ones_like(amps))
        counts_err = torch.full_like(amps, math.nan)
        cov_np, cov_names, n_x = np.zeros((0, 0)), (), 0
        dof = max(int(fit.data.numel()) - len(names) - k2, 1)
        notes = notes + [f"no uncertainties: {exc}"]
    energies = model.energies(theta).numpy()
    e_mid = float(energies[len(energies) // 2])
    fwhm = FWHM_PER_SIGMA * float(detector_sigma(torch.tensor(e_mid), theta[index_of("FWHM_OFFSET")],
                                                 theta[index_of("FWHM_FANOPRIME")]))
    e0 = float(theta[index_of("COHERENT_SCT_ENERGY")])
    compton = compton_energy_kev(e0, float(theta[index_of("COMPTON_ANGLE")]))
    compton_fwhm = fwhm * max(float(theta[index_of("COMPTON_FWHM_CORR")]), 1.0)
    scatter = (min(compton - 2.0 * compton_fwhm, compton_energy_kev(e0, 180.0) - fwhm), e0 + 1.5 * fwhm)
    unexplained = residual_peaks(fit.data.numpy(), m.numpy(), energies, fwhm=fwhm, exclude=scatter)
    if unexplained:
        notes = notes + ["unexplained peaks at " + ", ".join(f"{e:.2f} keV (+{c:.3g} counts, {z:.0f} sigma)"
                                                            for e, c, z in unexplained)
                         + ": a missing element or pile-up (mapstorch guess), or unfitted tails?"]
    counts = (per_unit * amps).tolist()
    stderr = {n: math.nan for n in SHAPE_PARAMETER_NAMES}
    for j, i in enumerate(use.tolist()[:n_x]):
        stderr[names[i]] = math.sqrt(max(float(cov_np[j, j]), 0.0))
    if fit.snip_free:
        stderr["SNIP_WIDTH"] = fit.snip_stderr
        shape_free = list(shape_free) + ["SNIP_WIDTH"]
    log_a = torch.log10(torch.clamp(amps, min=10.0 ** AMPLITUDE_BOUNDS[0])).clamp(max=AMPLITUDE_BOUNDS[1])
    values = fit.ps.values.clone()
    values[:N_SHAPE] = theta
    values[N_SHAPE:] = log_a[:-2]
    values[list(_AMP_INDEX)] = log_a[-2:]
    params = ParameterSet(fit.ps.names, values, fit.ps.lower, fit.ps.upper, fit.ps.free)
    col = model.column_names
    return FitResult(
        status=status, message=message, optimizer=optimizer, objective=fit.objective, params=params,
        free=tuple(shape_free), values={n: float(v) for n, v in zip(SHAPE_PARAMETER_NAMES, theta.tolist())},
        stderr=stderr, at_bounds=tuple(names[i] for i in torch.nonzero(at_bound).flatten().tolist()),
        counts=dict(zip(col, counts)), counts_stderr=dict(zip(col, counts_err.tolist())),
        components={k: v.numpy() for k, v in comps.items()}, energies=energies,
        data=fit.data.numpy(), window=fit.window, covariance=cov_np, covariance_names=cov_names,
        deviance=dev, pearson_chi2=chi2, dof=dof, iterations=fit.iterations, evaluations=fit.evaluations,
        seconds=seconds, stages=stages, notes=notes,
    )
