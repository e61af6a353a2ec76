"""``guess_elements``: decide which line families a spectrum needs, by likelihood-ratio tests.

1. **Shape.** The calibration, widths and scatter are fitted (:func:`~mapstorch.fit.fit_spectrum`,
   preset 2 by default) with the candidates that carry signal at the starting shape (a
   non-negative amplitude-only fit of every candidate first).
2. **Selection at that shape.** With the shape fixed the model is linear, ``m = D a + b`` (SNIP
   background ``b``), so every sub-model is a non-negative Poisson fit of amplitudes. Stepwise
   selection on the deviance: starting from every candidate with a non-zero amplitude, the
   family whose removal raises the deviance least is dropped while that rise is below
   ``significance**2`` (in units of the dispersion, below), then any family whose addition
   lowers it by more than that is added back, until nothing changes. Overlapping families (As K /
   Pb L, S K / Mo L / Pb M, ...) are thereby tested *given the others*: the one the data need
   stays, the other is "explained by" it.
3. **Dispersion.** Real spectra are not exactly Poisson around any model (imperfect line
   shapes); deviance differences are divided by ``phi = max(1, Pearson chi2 / dof)`` of the
   model with every candidate (a quasi-likelihood test), so that misfit does not become
   evidence for spurious families.
4. **Secondary lines.** For each selected family, its main line group (the strongest line and
   those within one FWHM) and its other lines get separate amplitudes; their ratio should be 1
   (the tabulated branching). A ratio far outside ``[0.5, 2]`` (by more than three standard
   errors) marks the family ``uncertain`` and takes it out of the list: its main line is more
   likely something else.
5. **Pile-ups.** K+K pairs of the three strongest selected K families are then offered as
   candidates and pass the same test.
6. The chosen list is fitted once more with the shape free, for the counts and their errors.

``significance`` is the signed-root likelihood ratio, ``sqrt(delta deviance / phi)``: 5 by
default. Decisions: ``present``; ``absent``; ``uncertain`` (secondary lines inconsistent, or
absent with a significance between 3 and the threshold).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from mapstorch.errors import InputError
from mapstorch.fit.guess import elastic_energy
from mapstorch.fit.objectives import poisson_deviance
from mapstorch.fit.result import FitResult
from mapstorch.fit.solvers import levenberg_marquardt
from mapstorch.fit.spectrum import _scaled_inverse
from mapstorch.identify.candidates import (
    RARE_ELEMENTS,
    default_candidates,
    parse_candidates,
    pileup_candidates,
)
from mapstorch.parameters.table import SHAPE_PARAMETER_NAMES, preset_free_names
from mapstorch.physics.elements import parse_component
from mapstorch.physics.lines import LineTable, build_line_table
from mapstorch.physics.model import SpectrumModel
from mapstorch.physics.shapes import FWHM_PER_SIGMA, detector_sigma

__all__ = ["guess_elements", "ElementGuess", "Evidence", "DECISIONS"]

DECISIONS = ("present", "absent", "uncertain")
_UNCERTAIN_FROM = 3.0  # absent families at least this significant are "uncertain"
_RATIO_RANGE = (0.5, 2.0)
_RATIO_FREEDOM = 0.25  # majors' secondary-line ratios may differ from the tables by this much
_NUISANCE_STEP_KEV = 0.005  # position / width corrections of the majors: in steps of 5 eV,
_NUISANCE_STEPS = 4.0  # at most 4 steps either way
_MAJOR_SIGNIFICANCE = 30.0  # families this significant get a free secondary-line ratio
_SPLINE_KEV = 0.75  # knot spacing of the background corrections (at least 5 FWHM)
#: Found in nearly every synchrotron spectrum; used to place the calibration when nothing gives one.
_COMMON = ("Ar", "K", "Ca", "Ti", "Mn", "Fe", "Cu", "Zn")


@dataclass
class Evidence:
    """What the data say about one candidate family."""

    name: str
    present: bool
    decision: str
    counts: float
    counts_stderr: float
    significance: float
    delta_deviance: float
    reason: str
    explained_by: str | None = None
    secondary_ratio: float | None = None
    secondary_ratio_stderr: float | None = None

    def to_dict(self) -> dict:
        def num(v):
            return float(v) if v is not None and math.isfinite(v) else None

        return {"name": self.name, "present": self.present, "decision": self.decision,
                "counts": num(self.counts), "counts_stderr": num(self.counts_stderr),
                "significance": num(self.significance), "delta_deviance": num(self.delta_deviance),
                "reason": self.reason, "explained_by": self.explained_by,
                "secondary_ratio": num(self.secondary_ratio),
                "secondary_ratio_stderr": num(self.secondary_ratio_stderr)}


@dataclass
class ElementGuess:
    """The outcome of :func:`guess_elements`.

    present : the chosen families (elements, then pile-ups), strongest first.
    candidates : evidence for every candidate, present ones first (by significance).
    fit : the final spectrum fit with the chosen list (shape free), for counts and plots.
    dispersion : ``phi`` the deviance differences were divided by.
    """

    present: list[str]
    candidates: list[Evidence]
    incident_energy: float
    threshold: float
    dispersion: float
    fit: FitResult
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def elements(self) -> list[str]:
        """The chosen families without pile-ups (``ELEMENTS_TO_FIT``)."""
        return [n for n in self.present if not parse_component(n).is_pileup]

    @property
    def pileups(self) -> list[str]:
        """The chosen pile-ups (``ELEMENTS_WITH_PILEUP``)."""
        return [n for n in self.present if parse_component(n).is_pileup]

    def to_override(self, override=None, chosen: Sequence[str] | None = None):
        """An override file listing ``chosen`` (default the present families) as
        ``ELEMENTS_TO_FIT`` / ``ELEMENTS_WITH_PILEUP``: a copy of ``override`` with those two lines
        changed (every other line kept), or, without one, a new file of the guess's fit."""
        from mapstorch.io.override import new_override

        names = [parse_component(n).name for n in (self.present if chosen is None else chosen)]
        if not names:
            raise InputError("the list is empty: choose at least one family to fit")
        base = override if override is not None else new_override(self.fit.params)
        return base.with_values(None, elements=[n for n in names if not parse_component(n).is_pileup],
                                pileups=[n for n in names if parse_component(n).is_pileup])

    def elements_to_fit(self) -> str:
        """The list as an override file's ``ELEMENTS_TO_FIT`` value."""
        return ", ".join(self.elements)

    def evidence(self, name: str) -> Evidence:
        key = parse_component(name).name
        for e in self.candidates:
            if e.name == key:
                return e
        raise KeyError(f"{name!r} was not a candidate")

    def to_dict(self) -> dict:
        return {"present": list(self.present), "elements_to_fit": self.elements_to_fit(),
                "pileups": self.pileups, "incident_energy": self.incident_energy,
                "significance_threshold": self.threshold, "dispersion": self.dispersion,
                "seconds": self.seconds, "notes": list(self.notes),
                "candidates": [e.to_dict() for e in self.candidates],
                "fit": {"status": self.fit.status, "reduced_chi2": self.fit.reduced_chi2,
                        "deviance": self.fit.deviance}}

    def summary(self, max_rows: int = 30) -> str:
        out = [f"present     {', '.join(self.present) or '(none)'}",
               f"ELEMENTS_TO_FIT: {self.elements_to_fit()}"]
        if self.pileups:
            out.append(f"ELEMENTS_WITH_PILEUP: {', '.join(self.pileups)}")
        out += [f"test        significance >= {self.threshold:g} (signed-root likelihood ratio, "
                f"dispersion {self.dispersion:.3g}); incident energy {self.incident_energy:.4g} keV; "
                f"{self.seconds:.1f} s",
                "", f"{'candidate':<10} {'decision':<10} {'counts':>11} {'stderr':>9} {'signif':>7}  reason"]
        shown = [e for e in self.candidates if e.decision != "absent" or e.significance >= 2.0]
        for e in shown[:max_rows]:
            err = f"{e.counts_stderr:.3g}" if math.isfinite(e.counts_stderr) else "-"
            out.append(f"{e.name:<10} {e.decision:<10} {e.counts:11.4g} {err:>9} {e.significance:7.1f}  {e.reason}")
        rest = len(self.candidates) - min(len(shown), max_rows)
        if rest:
            out.append(f"... and {rest} more absent candidates without signal (see --json)")
        out += [f"note        {n}" for n in self.notes]
        return "\n".join(out)


# ----------------------------------------------------------------------------- linear sub-models
class _Linear:
    """Non-negative Poisson fits of amplitude subsets at fixed shape: ``m = D[:, S] a + b``.

    Columns: the candidates (``names``), Elastic, Compton, then smooth non-negative background
    corrections (always in the model, see :func:`_background_splines`)."""

    def __init__(self, design: Tensor, background: Tensor, data: Tensor, names: Sequence[str],
                 corrections: Tensor | None = None, corrections_lower: Tensor | None = None,
                 corrections_upper: Tensor | None = None) -> None:
        k = len(names)
        extra = corrections if corrections is not None else design.new_zeros(design.shape[0], 0)
        self.d = torch.cat([design, extra], 1)
        self.b, self.y = background, data
        self.names = list(names)
        self.scatter = [k, k + 1]
        self.always = self.scatter + list(range(k + 2, self.d.shape[1]))
        self.lower = torch.zeros(self.d.shape[1], dtype=self.d.dtype)
        self.upper = torch.full((self.d.shape[1],), torch.inf, dtype=self.d.dtype)
        if corrections_lower is not None:
            self.lower[k + 2:] = corrections_lower
        if corrections_upper is not None:
            self.upper[k + 2:] = corrections_upper
        self.splines: list[int] = []  # which of the always-in columns are background corrections
        self.secondary_of: dict[int, int] = {}  # major family -> column of its secondary-ratio correction
        self.nuisance: list[int] = []  # majors' position / width corrections and the escape peaks
        self._cache: dict[frozenset[int], tuple[float, Tensor]] = {}

    def fit(self, subset: Sequence[int], start: Tensor | None = None) -> tuple[float, Tensor]:
        """``(deviance, amplitudes [all columns] with zeros outside the subset)``."""
        key = frozenset(subset)
        if key in self._cache:
            return self._cache[key]
        cols = sorted(key | set(self.always))
        d = self.d[:, cols]
        lo = self.lower[cols]
        hi = self.upper[cols]
        signed = lo < 0
        a0 = torch.minimum(torch.maximum(start[cols], lo), hi) if start is not None else torch.zeros(len(cols), dtype=d.dtype)
        if start is None or not bool((a0 > 0).any()):
            a0 = self._start(d, signed, lo, hi)

        def evaluate(a: Tensor, jac: bool):
            m = d @ a + self.b
            return (m, d) if jac else m

        a, _ = levenberg_marquardt(evaluate, a0, lo, hi, self.y, "poisson", tol=1e-3, max_iter=100)
        full = torch.zeros(self.d.shape[1], dtype=d.dtype)
        full[cols] = a
        dev = float(poisson_deviance(d @ a + self.b, self.y))
        self._cache[key] = (dev, full)
        return dev, full

    def model(self, amps: Tensor) -> Tensor:
        return self.d @ amps + self.b

    def _start(self, d: Tensor, signed: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """A start near the optimum: the non-negative weighted least-squares amplitudes
        (weights ``1 / max(y, 1)``) of the non-negative columns, the signed ones at zero. A flat
        start can leave many overlapping columns far from the optimum after the iterations."""
        from mapstorch.maps.solvers import nnls

        w = torch.rsqrt(torch.clamp(self.y, min=1.0))
        keep = ~signed
        a0 = torch.zeros(d.shape[1], dtype=d.dtype)
        if bool(keep.any()):
            sol, _, _ = nnls(d[:, keep] * w[:, None], ((self.y - self.b) * w)[None, :], max_iter=3000, tol=1e-8)
            a0[keep] = sol[0]
        return torch.minimum(torch.maximum(a0, lo), hi)


def _background_splines(energies: Tensor, spacing: float) -> Tensor:
    """Cubic B-splines ``[C, n]`` on a uniform grid of ``spacing`` keV over ``energies``, scaled
    to a peak of 1 count per channel: smooth corrections to the SNIP background, too broad to
    stand in for a peak."""
    e = energies.to(torch.float64)
    lo, hi = float(e[0]), float(e[-1])
    n = max(int(math.ceil((hi - lo) / spacing)), 1)
    h = (hi - lo) / n
    cols = []
    for j in range(-1, n + 2):
        x = (e - (lo + j * h)) / h
        ax = x.abs()
        b = torch.where(ax < 1, 2.0 / 3.0 - ax**2 + ax**3 / 2.0, torch.where(ax < 2, (2.0 - ax) ** 3 / 6.0, 0.0))
        cols.append(b * 1.5)
    return torch.stack(cols, 1)


def _wald(lin: _Linear, amps: Tensor, idx: Sequence[int]) -> dict[int, float]:
    """``{column: amplitude / standard error}`` (Fisher information of the Poisson fit) for the
    non-zero amplitudes among ``idx`` (0 for the others)."""
    live = [i for i in idx if float(amps[i]) > 0] + [i for i in lin.scatter if float(amps[i]) > 0]
    out = {i: 0.0 for i in idx}
    if not live:
        return out
    d = lin.d[:, live]
    m = torch.clamp(lin.model(amps), min=1e-9)
    h = d.T @ ((lin.y / (m * m))[:, None] * d)
    cov = _scaled_inverse(h)
    err = torch.sqrt(torch.clamp(torch.diagonal(cov), min=1e-300))
    for j, i in enumerate(live):
        if i in out:
            out[i] = float(amps[i] / err[j])
    return out


def _counts_stderr(lin: _Linear, amps: Tensor, subset: Sequence[int], i: int) -> float:
    """Standard error of column ``i``'s amplitude in the fit of ``subset`` (Fisher information,
    its amplitude freed even at zero: what adding it could give)."""
    cols = sorted(set(subset) | set(lin.always))
    d = lin.d[:, cols]
    m = torch.clamp(lin.model(amps), min=1e-9)
    h = d.T @ ((lin.y / (m * m))[:, None] * d)
    try:
        cov = _scaled_inverse(h)
    except RuntimeError:
        return math.nan
    v = float(cov[cols.index(i), cols.index(i)])
    return math.sqrt(v) if v > 0 else math.nan


def _weighted_cosine(d: Tensor, w: Tensor, i: int, j: int) -> float:
    a, b = d[:, i], d[:, j]
    num = float((w * a * b).sum())
    den = math.sqrt(float((w * a * a).sum()) * float((w * b * b).sum()))
    return num / den if den > 0 else 0.0


# ----------------------------------------------------------------------------- main entry
def guess_elements(
    counts,
    incident_energy: float | None = None,
    candidates: Sequence[str] | str | None = None,
    *,
    params=None,
    calibration: Sequence[float] | None = None,
    significance: float = 5.0,
    rare_significance: float = 7.0,
    preset: str | int = "2",
    pileups: bool = True,
    fit_background: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ElementGuess:
    """Decide which of ``candidates`` a spectrum ``[C]`` needs (module docstring).

    incident_energy : keV; default from ``params``, else from the elastic peak.
    candidates : families to test (``Fe``, ``Pb_L``, ``Au_M``, ``Si_Cl``); default every family
        the incident energy excites inside the fit window
        (:func:`~mapstorch.identify.candidates.default_candidates`).
    params : override file, ParameterSet or ``{MAPS name: value}`` (calibration, widths, window).
    calibration : ``(offset, slope, quadratic)`` of the data file when ``params`` has none.
    significance : threshold on the signed-root likelihood ratio (default 5).
    rare_significance : threshold for elements seldom found in samples
        (:data:`~mapstorch.identify.candidates.RARE_ELEMENTS`) when the default candidate list is
        used: prior odds against them, so that a misfit near a major line is not reported as,
        say, a lanthanide (default 7; set it equal to ``significance`` to treat all alike).
    preset : which shape parameters the fits free (XRF-Maps preset, default 2).
    pileups : also test K+K pile-ups of the strongest families.
    fit_background : let ``SNIP_WIDTH`` grow beyond the given width when the data prefer it
        (default): a SNIP background that clips into peak clusters leaves structured residuals
        that look like extra families. It never shrinks (a narrow SNIP hides weak peaks).
    progress : called with a short message at each step.
    """
    from mapstorch.fit import fit_spectrum
    from mapstorch.fit.spectrum import _has_e0, _has_key, _spectrum

    t0 = time.perf_counter()
    say = progress or (lambda msg: None)
    y = _spectrum(counts)
    if not (significance > 0 and math.isfinite(significance)):
        raise InputError(f"significance must be a positive number (standard deviations), got {significance!r}")
    notes: list[str] = []
    cal = _calibration(params, calibration)
    # incident energy
    if incident_energy is None and _has_e0(params):
        incident_energy = _param(params, "COHERENT_SCT_ENERGY")
    if incident_energy is None:
        if cal is None:
            raise InputError("guessing elements needs the incident energy or an energy calibration: give "
                             "--incident-energy, an override file, or a data file with a calibration")
        found = elastic_energy(y, *cal)
        if found is None:
            raise InputError("no elastic peak found to take the incident energy from; give --incident-energy")
        incident_energy = found[0]
        notes.append(f"incident energy {incident_energy:.4g} keV from the elastic peak")
    if not (incident_energy > 0 and math.isfinite(incident_energy)):
        raise InputError(f"the incident energy must be a positive number of keV, got {incident_energy!r}")
    fit_kw: dict = dict(params=params, calibration=calibration, incident_energy=incident_energy, preset=preset)
    if cal is None:  # place the calibration with common elements first
        say("calibration")
        first = fit_spectrum(y, [e for e in _COMMON if _excitable(e, incident_energy)], guess=True, **fit_kw)
        fit_kw["calibration"] = tuple(first.values[n] for n in ("ENERGY_OFFSET", "ENERGY_SLOPE", "ENERGY_QUADRATIC"))
        notes += [n for n in first.notes if n.startswith("start:")]
    # the candidate list
    e_min = _param(params, "MIN_ENERGY_TO_FIT") if _has_key(params, "MIN_ENERGY_TO_FIT") else 1.0
    e_max = _param(params, "MAX_ENERGY_TO_FIT") if _has_key(params, "MAX_ENERGY_TO_FIT") else None
    if candidates is None:
        names = default_candidates(incident_energy, e_min, e_max)
    else:
        names = parse_candidates(candidates)
    if not (rare_significance > 0 and math.isfinite(rare_significance)):
        raise InputError(f"rare_significance must be a positive number, got {rare_significance!r}")
    if not names:
        raise InputError(f"no candidate family has lines between {e_min:g} keV and the incident energy "
                         f"{incident_energy:g} keV")
    level_of = (lambda n: rare_significance if candidates is None and parse_component(n).element in RARE_ELEMENTS
                else significance)
    # 1. shape: amplitudes of every candidate at the starting shape (linear), then the shape
    #    (with the SNIP width, for a background that does not bias the tests) with those carrying signal
    say(f"{len(names)} candidates at the starting shape")
    probe = fit_spectrum(y, names[:1], free=[], guess=False, **fit_kw)
    table = _line_table(names, params)
    lin, excited = _linear(table, probe)
    all_idx = [i for i in range(len(names)) if excited[i]]
    _, amps0 = lin.fit(all_idx)
    z0 = _wald(lin, amps0, all_idx)
    carrying = [names[i] for i in all_idx if z0[i] > 2.0] or [names[all_idx[0]] if all_idx else names[0]]
    say(f"shape with {len(carrying)} candidates carrying signal")
    fit_kw["free"] = list(preset_free_names(str(preset)))
    shaped = None
    if fit_background:  # a wider SNIP width than given, if the data prefer it (never narrower: a
        # narrow SNIP hugs weak peaks and hides them)
        shaped = fit_spectrum(y, carrying, guess=False, **{**fit_kw, "free": fit_kw["free"] + ["SNIP_WIDTH"]})
        if shaped.values["SNIP_WIDTH"] > probe.values["SNIP_WIDTH"]:
            fit_kw["free"] = fit_kw["free"] + ["SNIP_WIDTH"]
        else:
            shaped = None
    if shaped is None:
        shaped = fit_spectrum(y, carrying, guess=False, **fit_kw)
    # 2. selection at that shape
    lin, excited = _linear(table, shaped)
    levels = _levels(names, level_of, lin)
    phi, phi_global = _dispersion(lin, [i for i in range(len(names)) if excited[i]])
    thr = levels**2 * phi
    say("likelihood-ratio selection")
    pool = [i for i in range(len(names)) if excited[i]]
    chosen = _stepwise(lin, pool, thr)
    # the shape again, with the chosen families only, and the selection again at that shape
    say(f"shape with the {len(chosen)} chosen families")
    dev_c, amps_c = lin.fit(chosen)
    majors = [i for i in chosen if not table.components[i].is_pileup
              and lin.fit([j for j in chosen if j != i], amps_c)[0] - dev_c >= (_MAJOR_SIGNIFICANCE**2) * float(phi[i])]
    shaped = fit_spectrum(y, [names[i] for i in chosen] or carrying, guess=False, **fit_kw)
    major_amps = [float(amps_c[i]) for i in majors]
    lin, excited = _linear(table, shaped, majors, major_amps)
    levels = _levels(names, level_of, lin)
    pool = [i for i in range(len(names)) if excited[i]]
    phi, phi_global = _dispersion(lin, pool)
    thr = levels**2 * phi
    chosen = _stepwise(lin, [i for i in chosen if excited[i]], thr, pool=pool)
    # 3. pile-ups of the strongest K families
    if pileups:
        _, amps = lin.fit(chosen)
        per_unit = lin.d.sum(0)
        strong = sorted(chosen, key=lambda i: -float(amps[i] * per_unit[i]))
        k_fams = [names[i] for i in strong if parse_component(names[i]).shell == "K"
                  and not parse_component(names[i]).is_pileup][:3]
        extra = [p for p in pileup_candidates(k_fams, incident_energy, e_min, e_max) if p not in names]
        if extra:
            names = names + extra
            table = _line_table(names, params)
            lin, excited = _linear(table, shaped, majors, major_amps)
            levels = _levels(names, level_of, lin)
            phi, phi_global = _dispersion(lin, [i for i in range(len(names)) if excited[i]])
            thr = levels**2 * phi
            new = [i for i in range(len(names) - len(extra), len(names)) if excited[i]]
            pool = pool + new
            chosen = _stepwise(lin, chosen + new, thr, pool=pool)
    # 4. secondary lines of the chosen families
    say("secondary lines")
    ratios = {i: _secondary_ratio(names, params, shaped, lin, chosen, i, majors) for i in chosen
              if not table.components[i].is_pileup and i not in majors}
    doubtful = [i for i, r in ratios.items() if r is not None and _inconsistent(*r)]
    if doubtful:
        chosen = _stepwise(lin, [i for i in chosen if i not in doubtful], thr, banned=set(doubtful), pool=pool)
    # 5. evidence
    say("evidence")
    dev_chosen, amps_chosen = lin.fit(chosen)
    w = 1.0 / torch.clamp(lin.model(amps_chosen), min=1.0)
    chosen_set = set(chosen)
    per_unit = lin.d.sum(0)
    evidence: list[Evidence] = []
    for i, name in enumerate(names):
        if not excited[i]:
            evidence.append(Evidence(name, False, "absent", 0.0, math.nan, 0.0, 0.0,
                                     "no line excited inside the fit window"))
            continue
        if i in chosen_set:
            rest = [j for j in chosen if j != i]
            delta = lin.fit(rest, amps_chosen)[0] - dev_chosen
        else:
            rest = chosen + [i]
            dev_with, amps_with = lin.fit(rest, amps_chosen)
            delta = dev_chosen - dev_with
        sig = math.sqrt(max(delta, 0.0) / float(phi[i]))
        level = float(levels[i])
        ratio = ratios.get(i)
        if i in chosen_set:
            reason = f"needed given the others (delta deviance {delta:.4g})"
            if ratio is not None:
                reason += f"; {_line_word(table, i)} consistent (ratio {ratio[0]:.2f} +- {ratio[1]:.2f})"
            elif i in lin.secondary_of:
                ratio = (1.0 + float(amps_chosen[lin.secondary_of[i]]), math.nan)
                reason += (f"; {_line_word(table, i)} ratio {ratio[0]:.2f} (a major: free within "
                           f"+-{100 * _RATIO_FREEDOM:.0f} %)")
            evidence.append(Evidence(name, True, "present", float(amps_chosen[i] * per_unit[i]), math.nan, sig,
                                     delta, reason, None, *(ratio or (None, None))))
            continue
        amps_with = lin.fit(chosen + [i], amps_chosen)[1]
        cts = float(amps_with[i] * per_unit[i])
        cts_err = _counts_stderr(lin, amps_with, chosen + [i], i) * float(per_unit[i])
        partner = _explained_by(lin, w, chosen, i, thr)
        if i in doubtful and ratio is not None:
            reason = (f"{_line_word(table, i)} inconsistent with its main line (ratio {ratio[0]:.2f} +- "
                      f"{ratio[1]:.2f} of the tabulated value)")
            decision = "uncertain"
        elif partner is not None:
            reason, decision = f"explained by {names[partner]}", "absent"
        elif sig >= level:
            reason, decision = "significant, but its lines overlap the chosen ones", "uncertain"
        elif sig >= _UNCERTAIN_FROM:
            reason = "weak signal, below the threshold" + (f" for a rare element ({level:g})" if level > significance
                                                           else "")
            decision = "uncertain"
        else:
            reason, decision = "no significant signal", "absent"
        evidence.append(Evidence(name, False, decision, cts, cts_err, sig, delta, reason,
                                 names[partner] if partner is not None else None, *(ratio or (None, None))))
    # 6. final fit with the chosen list, shape free
    present = [names[i] for i in chosen]
    say(f"final fit with {len(present)} families")
    final = fit_spectrum(y, present or carrying[:1] or names[:1], guess=False, **fit_kw)
    for e in evidence:
        if e.present:
            e.counts, e.counts_stderr = final.counts[e.name], final.counts_stderr[e.name]
    order = {"present": 0, "uncertain": 1, "absent": 2}
    evidence.sort(key=lambda e: (order[e.decision], -e.significance))
    present.sort(key=lambda n: (parse_component(n).is_pileup, -final.counts[n]))
    if phi_global > 1.0:
        notes.append(f"the data scatter {phi_global:.3g}x more than Poisson around the model with every candidate "
                     f"(under some families' lines up to {float(phi.max()):.3g}x): each family's deviance change "
                     "is scaled down by the scatter under its lines")
    return ElementGuess(present, evidence, float(incident_energy), float(significance), float(phi_global), final,
                        time.perf_counter() - t0, notes)


# ----------------------------------------------------------------------------- steps
def _stepwise(lin: _Linear, start: Sequence[int], thr: Tensor, banned: set[int] | None = None,
              pool: Sequence[int] | None = None) -> list[int]:
    """Backward elimination then forward additions on the deviance, until stable; ``thr[i]`` is
    the deviance change that column ``i`` must make.

    Exact refits decide; Wald statistics (backward) and score statistics (forward) only choose
    which refits to try first, so the result is that of testing every family exactly."""
    banned = banned or set()
    pool = list(start) if pool is None else list(pool)
    _, amps_all = lin.fit(start)
    current = [i for i in start if float(amps_all[i]) > 0 and i not in banned]
    for _ in range(4 * len(pool) + 4):
        dev, amps = lin.fit(current, amps_all)
        # backward: the least needed family, if its removal costs less than its threshold
        if current:
            wald = _wald(lin, amps, current)
            order = sorted(current, key=lambda i: wald[i] ** 2 / float(thr[i]))
            cost = {i: (lin.fit([j for j in current if j != i], amps)[0] - dev) / float(thr[i]) for i in order[:3]}
            if min(cost.values()) >= 1.0:  # confirm with every family before stopping
                cost.update({i: (lin.fit([j for j in current if j != i], amps)[0] - dev) / float(thr[i])
                             for i in order[3:]})
            worst = min(cost, key=cost.get)
            if cost[worst] < 1.0:
                current = [j for j in current if j != worst]
                continue
        # forward: the most helpful family left out, if it gains more than its threshold
        out = [i for i in pool if i not in current and i not in banned]
        if not out:
            break
        score = _score(lin, amps, out)
        hopeful = sorted((i for i in out if score[i] >= 0.25 * float(thr[i])), key=lambda i: -score[i] / float(thr[i]))
        gains = {i: (dev - lin.fit(current + [i], amps)[0]) / float(thr[i]) for i in hopeful[:3]}
        if not gains:
            break
        best = max(gains, key=gains.get)
        if gains[best] < 1.0:
            break
        current = current + [best]
    return sorted(current)


def _score(lin: _Linear, amps: Tensor, idx: Sequence[int]) -> dict[int, float]:
    """Score statistics ``g^2 / I`` for adding each column of ``idx`` (0 when adding it cannot
    lower the deviance): about the deviance gain of adding it alone."""
    m = torch.clamp(lin.model(amps), min=1e-9)
    d = lin.d[:, list(idx)]
    g = d.T @ (1.0 - lin.y / m)  # half the deviance gradient
    info = (d * d).T @ (lin.y / (m * m))
    stat = torch.where(g < 0, 2.0 * g * g / torch.clamp(info, min=1e-300), torch.zeros_like(g))
    return {i: float(v) for i, v in zip(idx, stat)}


def _levels(names: Sequence[str], level_of: Callable[[str], float], lin: _Linear) -> Tensor:
    """Significance threshold per design column (candidates, then the always-in columns)."""
    out = torch.full((lin.d.shape[1],), 1.0, dtype=lin.d.dtype)
    out[:len(names)] = torch.tensor([level_of(n) for n in names], dtype=lin.d.dtype)
    return out


def _dispersion(lin: _Linear, all_idx: Sequence[int]) -> tuple[Tensor, float]:
    """Over-dispersion of the data around the model with every candidate: per column, the mean
    squared Pearson residual under that column's profile (at least 1), and over the window."""
    _, amps = lin.fit(all_idx)
    m = torch.clamp(lin.model(amps), min=1e-9)
    r2 = (lin.y - m) ** 2 / m
    dof = max(int(lin.y.numel()) - len(all_idx) - len(lin.always), 1)
    overall = max(1.0, float(r2.sum()) / dof)
    w = lin.d.clamp(min=0.0)
    local = (w * r2[:, None]).sum(0) / torch.clamp(w.sum(0), min=1e-300)
    # a few parameters are fitted under each profile: residuals there are a little below Poisson
    return torch.clamp(local * lin.y.numel() / dof, min=1.0), overall


def _explained_by(lin: _Linear, w: Tensor, chosen: Sequence[int], i: int, thr: Tensor) -> int | None:
    """The chosen family that takes candidate ``i``'s place: overlapping it, and without which
    ``i`` would be significant."""
    best, best_cos = None, 0.3
    for j in chosen:
        c = _weighted_cosine(lin.d, w, i, j)
        if c > best_cos:
            best, best_cos = j, c
    if best is None:
        return None
    without = [j for j in chosen if j != best]
    dev_without = lin.fit(without)[0]
    return best if dev_without - lin.fit(without + [i])[0] >= float(thr[i]) else None


def _linear(table: LineTable, shaped: FitResult, majors: Sequence[int] = (),
            major_amps: Sequence[float] = ()) -> tuple[_Linear, list[bool]]:
    """The linear model at ``shaped``'s shape parameters. The ``majors`` (with amplitudes
    ``major_amps`` from an earlier fit) get bounded nuisance freedom: their secondary lines'
    ratio may move by 25 %, their position and width by 20 eV and their low-energy tail fraction
    by up to 10 % (first-order correction columns, always in the model; and their escape peaks
    when the parameters leave escape off): tabulated ratios and line shapes are not exact, and a strong
    family's misfit must not become evidence for a weak family next to it."""
    theta = torch.tensor([shaped.values[n] for n in SHAPE_PARAMETER_NAMES], dtype=torch.float64)
    k = len(table.components)
    model = SpectrumModel(table, shaped.window, dtype=torch.float64)
    with torch.no_grad():
        d = model.design_matrix(theta)
    extra, lower, upper = [], [], []
    if majors:
        full, owners = _split_design(table, shaped, majors)
        scale = torch.tensor(list(major_amps), dtype=d.dtype)
        amp_of = dict(zip(majors, major_amps))
        # coefficient = relative change of the secondary lines' ratio, bounded
        extra.append(full[:, k:k + len(owners)] * torch.tensor([amp_of[o] for o in owners], dtype=d.dtype))
        lower.append(torch.full((len(owners),), -_RATIO_FREEDOM, dtype=d.dtype))
        upper.append(torch.full((len(owners),), _RATIO_FREEDOM, dtype=d.dtype))
        for name in ("ENERGY_OFFSET", "FWHM_OFFSET"):
            i = SHAPE_PARAMETER_NAMES.index(name)
            up, down = theta.clone(), theta.clone()
            up[i] += _NUISANCE_STEP_KEV
            down[i] -= _NUISANCE_STEP_KEV
            with torch.no_grad():
                deriv = 0.5 * (model.design_matrix(up) - model.design_matrix(down))[:, list(majors)]
            # coefficient = the major's shift (or width change) in steps, bounded to a few steps
            extra.append(deriv * scale)
            lower.append(torch.full((len(majors),), -_NUISANCE_STEPS, dtype=d.dtype))
            upper.append(torch.full((len(majors),), _NUISANCE_STEPS, dtype=d.dtype))
        # a low-energy tail: coefficient = added tail fraction in percent, from -(current) to +10 %
        i = SHAPE_PARAMETER_NAMES.index("F_TAIL_OFFSET")
        up = theta.clone()
        up[i] += 0.01
        with torch.no_grad():
            deriv = (model.design_matrix(up) - model.design_matrix(theta))[:, list(majors)]
        extra.append(deriv * scale)
        lower.append(torch.full((len(majors),), -100.0 * max(float(theta[i]), 0.0), dtype=d.dtype))
        upper.append(torch.full((len(majors),), 10.0, dtype=d.dtype))
    bg = torch.as_tensor(shaped.components["Background"], dtype=torch.float64)
    data = torch.as_tensor(shaped.data, dtype=torch.float64)
    excited = [bool(d[:, j].sum() > 1e-6) for j in range(k)]
    e_mid = float(shaped.energies[len(shaped.energies) // 2])
    fwhm = FWHM_PER_SIGMA * float(detector_sigma(torch.tensor(e_mid), theta[SHAPE_PARAMETER_NAMES.index("FWHM_OFFSET")],
                                                 theta[SHAPE_PARAMETER_NAMES.index("FWHM_FANOPRIME")]))
    splines = _background_splines(torch.as_tensor(shaped.energies), max(_SPLINE_KEV, 5.0 * fwhm))
    n_fixed = sum(int(x.shape[1]) for x in extra)  # secondary-ratio and position/width columns so far
    escape_col = _escape_column(model, theta, table, majors, major_amps)
    if escape_col is not None:
        extra.append(escape_col[:, None])
        lower.append(torch.zeros(1, dtype=d.dtype))
        upper.append(torch.full((1,), 0.2, dtype=d.dtype))
    extra.append(splines)
    lower.append(torch.zeros(splines.shape[1], dtype=d.dtype))
    upper.append(torch.full((splines.shape[1],), torch.inf, dtype=d.dtype))
    lin = _Linear(d, bg, data, table.names, torch.cat(extra, 1), torch.cat(lower), torch.cat(upper))
    lin.splines = list(range(lin.d.shape[1] - splines.shape[1], lin.d.shape[1]))
    if majors:
        lin.secondary_of = {o: k + 2 + j for j, o in enumerate(owners)}
        n_sec = len(owners)
        lin.nuisance = list(range(k + 2 + n_sec, k + 2 + n_fixed)) + ([k + 2 + n_fixed] if escape_col is not None else [])
    return lin, excited


def _escape_column(model: SpectrumModel, theta: Tensor, table: LineTable, majors: Sequence[int],
                   major_amps: Sequence[float]) -> Tensor | None:
    """Detector escape peaks of the majors (at their fitted amplitudes) per unit escape factor,
    when the parameters leave escape off: an escape peak of a strong line (Ar Ka - 1.74 keV in a
    Si detector) must not pass for an element."""
    if not majors:
        return None
    i = SHAPE_PARAMETER_NAMES.index("SI_ESCAPE" if table.detector == "Si" else "GE_ESCAPE")
    if float(theta[i]) != 0.0:
        return None
    on = theta.clone()
    on[i] = 1.0
    with torch.no_grad():
        esc = model.design_matrix(on)[:, list(majors)] - model.design_matrix(theta)[:, list(majors)]
    col = esc @ torch.tensor(list(major_amps), dtype=esc.dtype)
    return col if float(col.sum()) > 0 else None


def _primary_lines(table: LineTable, kk: int, shaped: FitResult) -> np.ndarray | None:
    """Mask over ``table``'s lines: component ``kk``'s main line group (its strongest excited line
    in the window and those within one FWHM of it); ``None`` when fewer than two of its lines
    are excited inside the window."""
    sel = np.nonzero(table.component == kk)[0]
    e0 = shaped.values["COHERENT_SCT_ENERGY"]
    e_lo, e_hi = float(shaped.energies[0]), float(shaped.energies[-1])
    energies, ratios = table.energy_kev[sel], table.ratio[sel]
    live = (table.gate_edge_kev[sel] < e0) & (energies >= e_lo) & (energies <= e_hi)
    if live.sum() < 2:
        return None
    main = sel[live][int(np.argmax(ratios[live]))]
    fwhm = FWHM_PER_SIGMA * float(detector_sigma(torch.tensor(float(table.energy_kev[main])),
                                                 torch.tensor(shaped.values["FWHM_OFFSET"]),
                                                 torch.tensor(shaped.values["FWHM_FANOPRIME"])))
    return (table.component == kk) & (np.abs(table.energy_kev - table.energy_kev[main]) <= fwhm)


def _split_design(table: LineTable, shaped: FitResult, split: Sequence[int]) -> tuple[Tensor, list[int]]:
    """Design matrix ``[C, K + len(split) + 2]`` of ``table`` where each component of ``split``
    keeps only its main line group and its other lines form an extra column (appended after the
    components, before Elastic and Compton); also the extra columns' owners."""
    from dataclasses import replace

    comp = table.component.copy()
    owners = []
    for kk in split:
        primary = _primary_lines(table, kk, shaped)
        if primary is None:
            continue
        comp[(table.component == kk) & ~primary] = len(table.components) + len(owners)
        owners.append(kk)
    t2 = replace(table, components=table.components + tuple(table.components[kk] for kk in owners), component=comp)
    theta = torch.tensor([shaped.values[n] for n in SHAPE_PARAMETER_NAMES], dtype=torch.float64)
    with torch.no_grad():
        d = SpectrumModel(t2, shaped.window, dtype=torch.float64).design_matrix(theta)
    return d, owners


def _secondary_ratio(names: Sequence[str], params, shaped: FitResult, lin: _Linear, chosen: Sequence[int],
                     k: int, majors: Sequence[int] = ()) -> tuple[float, float] | None:
    """(ratio, standard error) of the amplitude of family ``k``'s secondary lines to its main
    line group (1 = the tabulated branching), fitted together with the other chosen families
    (the majors with their own free ratios); ``None`` when the secondary lines carry too little
    of the family inside the window."""
    chosen = sorted(set(chosen) | {k})
    table = _line_table([names[i] for i in chosen], params)
    kk = chosen.index(k)
    if _primary_lines(table, kk, shaped) is None:
        return None
    split = [kk] + [chosen.index(j) for j in majors if j in chosen and j != k]
    d, owners = _split_design(table, shaped, split)
    if kk not in owners:
        return None
    n = len(table.components)
    sec = n + owners.index(kk)
    if float(d[:, sec].sum()) < 0.05 * float(d[:, kk].sum() + d[:, sec].sum()):
        return None
    # columns: chosen families (main lines where split), secondary parts, Elastic, Compton, the
    # majors' position / width corrections and escape peaks, splines
    more = lin.nuisance + lin.splines
    d = torch.cat([d, lin.d[:, more]], 1)

    def evaluate(a: Tensor, jac: bool):
        m = d @ a + lin.b
        return (m, d) if jac else m

    _, a_full = lin.fit(list(chosen))
    n_main = d.shape[1] - len(more)
    lo = torch.cat([torch.zeros(n_main, dtype=d.dtype), lin.lower[more]])
    hi = torch.cat([torch.full((n_main,), torch.inf, dtype=d.dtype), lin.upper[more]])
    a0 = torch.cat([(torch.cat([a_full[chosen], a_full[[chosen[o] for o in owners]], a_full[lin.scatter]])
                     .clamp(min=0.0) + 1e-9), a_full[more]])
    a, _ = levenberg_marquardt(evaluate, a0, lo, hi, lin.y, "poisson", tol=1e-4, max_iter=100)
    m = torch.clamp(d @ a + lin.b, min=1e-9)
    h = d.T @ ((lin.y / (m * m))[:, None] * d)
    try:
        cov = _scaled_inverse(h)  # columns span many decades: invert at unit diagonal
    except RuntimeError:
        return None
    a_p, a_s = float(a[kk]), float(a[sec])
    if a_p <= 0:
        return None
    r = a_s / a_p
    var = (float(cov[sec, sec]) - 2 * r * float(cov[kk, sec]) + r * r * float(cov[kk, kk])) / (a_p * a_p)
    return r, math.sqrt(max(var, 0.0))


def _inconsistent(ratio: float, stderr: float) -> bool:
    lo, hi = _RATIO_RANGE
    return (ratio + 3.0 * stderr < lo) or (ratio - 3.0 * stderr > hi)


def _line_word(table: LineTable, k: int) -> str:
    return {"K": "Kb", "L": "Lb/Lg", "M": "Mb/Mg"}[table.components[k].shell]


# ----------------------------------------------------------------------------- inputs
def _line_table(names: Sequence[str], params) -> LineTable:
    from mapstorch.io.override import OverrideFile

    if isinstance(params, OverrideFile):
        return build_line_table(names, detector=params.detector, branching=params.branching_factors(),
                                width_multipliers=params.width_multipliers)
    return build_line_table(names)


def _param(params, name: str) -> float:
    from mapstorch.parameters.set import ParameterSet

    if isinstance(params, ParameterSet):
        return float(params[name])
    values = getattr(params, "parameters", params)
    return float(values[name])


def _calibration(params, calibration) -> tuple[float, float, float] | None:
    from mapstorch.fit.spectrum import _has_key

    if _has_key(params, "ENERGY_SLOPE"):
        names = ("ENERGY_OFFSET", "ENERGY_SLOPE", "ENERGY_QUADRATIC")
        return tuple(_param(params, n) if _has_key(params, n) else 0.0 for n in names)  # type: ignore[return-value]
    if calibration is not None:
        cal = tuple(float(v) for v in calibration)
        if len(cal) != 3 or not all(math.isfinite(v) for v in cal) or cal[1] <= 0:
            raise InputError(f"calibration must be (offset, slope > 0, quadratic) in keV, got {calibration!r}")
        return cal  # type: ignore[return-value]
    return None


def _excitable(name: str, incident_energy: float) -> bool:
    from mapstorch.identify.candidates import main_line

    line = main_line(parse_component(name).z, parse_component(name).shell)
    return line is not None and line[1] < incident_energy and line[0] < incident_energy


def _finite(v: float) -> float:
    return v if math.isfinite(v) else 0.0
