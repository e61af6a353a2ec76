"""What a spectrum fit returns: :class:`FitResult`, its JSON form and its one-screen summary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mapstorch.parameters.set import N_SHAPE, ParameterSet
from mapstorch.physics.model import FitWindow

__all__ = ["FitResult", "StageReport"]


@dataclass
class StageReport:
    """One stage of a staged fit: its name, the shape parameters it freed and how it ended."""

    name: str
    free: tuple[str, ...]
    status: str
    iterations: int
    deviance: float
    seconds: float


def _num(v: float) -> float | None:
    """JSON-safe number (``None`` for NaN / inf)."""
    return float(v) if math.isfinite(v) else None


@dataclass
class FitResult:
    """The outcome of :func:`~mapstorch.fit.fit_spectrum` (one spectrum).

    status : ``converged``, ``max-iterations``, ``stalled`` or ``non-finite`` (see ``message``).
    params : the fitted :class:`ParameterSet` (log10 amplitudes, as in MAPS).
    values, stderr : ``{shape parameter: value}`` and the standard error of every free one (NaN
        for fixed parameters and for free ones held at a bound).
    counts, counts_stderr : modelled counts inside the fit window per component, ``Elastic`` and
        ``Compton`` (every line of the family; XRF-Maps' maps hold amplitudes instead, see
        ``docs/maps.md``), with standard errors from the inverse Fisher
        information (delta method, shape-parameter uncertainty included).
    components : per-component spectra over the window (each component, ``Elastic``,
        ``Compton``, ``Escape`` when on, ``Background``, ``Total``).
    energies, data : window channel energies (keV) and counts.
    covariance, covariance_names : covariance of the free parameters (shape parameters in their
        units, then linear amplitudes).
    deviance : Poisson deviance of the final model (whatever the objective); pearson_chi2, dof,
        reduced_chi2 = pearson_chi2 / dof.
    """

    status: str
    message: str
    optimizer: str
    objective: str
    params: ParameterSet
    free: tuple[str, ...]
    values: dict[str, float]
    stderr: dict[str, float]
    at_bounds: tuple[str, ...]
    counts: dict[str, float]
    counts_stderr: dict[str, float]
    components: dict[str, np.ndarray]
    energies: np.ndarray
    data: np.ndarray
    window: FitWindow
    covariance: np.ndarray
    covariance_names: tuple[str, ...]
    deviance: float
    pearson_chi2: float
    dof: int
    iterations: int
    evaluations: int
    seconds: float
    stages: list[StageReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return self.status == "converged"

    @property
    def reduced_chi2(self) -> float:
        return self.pearson_chi2 / self.dof if self.dof > 0 else math.nan

    @property
    def model(self) -> np.ndarray:
        """The fitted model including background, over the window."""
        return self.components["Total"]

    @property
    def background(self) -> np.ndarray:
        return self.components["Background"]

    @property
    def elements(self) -> tuple[str, ...]:
        """The fitted components (elements and pile-ups), without Elastic and Compton."""
        return self.params.components

    def to_override(self, override=None):
        """The fit as an override file (what ``mapstorch fit --out-override`` writes): the input
        ``override`` (an :class:`~mapstorch.io.override.OverrideFile`) with the fitted values and
        bounds and every other line kept -- its element lists rewritten only when the fitted
        components differ -- or, without one, a new file of the fitted parameters."""
        from mapstorch.io.override import new_override
        from mapstorch.physics.elements import parse_component

        if override is None:
            return new_override(self.params)
        comps = list(self.elements)
        if comps == list(override.components):
            return override.with_values(self.params, bounds=True)
        return override.with_values(self.params, bounds=True,
                                    elements=[c for c in comps if parse_component(c).partner is None],
                                    pileups=[c for c in comps if parse_component(c).partner is not None])

    def to_dict(self) -> dict:
        """JSON-ready summary (no per-channel arrays): elements, parameters, fit statistics."""
        shape = self.params.names[:N_SHAPE]
        return {
            "status": self.status,
            "message": self.message,
            "optimizer": self.optimizer,
            "objective": self.objective,
            "elements": {n: {"counts": _num(self.counts[n]), "counts_stderr": _num(self.counts_stderr[n])}
                         for n in self.counts},
            "parameters": {
                n: {"value": _num(self.values[n]), "stderr": _num(self.stderr.get(n, math.nan)),
                    "free": n in self.free, "at_bound": n in self.at_bounds,
                    "lower": _num(float(self.params.lower[i])), "upper": _num(float(self.params.upper[i]))}
                for i, n in enumerate(shape)
            },
            "deviance": _num(self.deviance),
            "pearson_chi2": _num(self.pearson_chi2),
            "dof": self.dof,
            "reduced_chi2": _num(self.reduced_chi2),
            "iterations": self.iterations,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "window": {"first_channel": self.window.first, "last_channel": self.window.last},
            "stages": [{"name": s.name, "free": list(s.free), "status": s.status, "iterations": s.iterations,
                        "deviance": _num(s.deviance), "seconds": s.seconds} for s in self.stages],
            "notes": list(self.notes),
        }

    def summary(self, max_rows: int = 40) -> str:
        """A one-screen table: status, statistics, free parameters and counts with errors."""
        out = [
            f"status      {self.status} ({self.message})",
            f"fit         {self.optimizer} / {self.objective}, {self.iterations} iterations, "
            f"{self.evaluations} model evaluations, {self.seconds:.2f} s",
            f"window      channels {self.window.first}-{self.window.last} "
            f"({self.energies[0]:.3f}-{self.energies[-1]:.3f} keV)",
            f"deviance    {self.deviance:.6g}   reduced chi2 {self.reduced_chi2:.4g}  (dof {self.dof})",
            "",
            f"{'parameter':<22} {'value':>13} {'stderr':>11}",
        ]
        for n in self.free:
            flag = "  at bound" if n in self.at_bounds else ""
            out.append(f"{n:<22} {self.values[n]:13.6g} {_fmt_err(self.stderr.get(n, math.nan)):>11}{flag}")
        out += ["", f"{'component':<12} {'counts':>12} {'stderr':>11} {'rel':>8}"]
        ranked = sorted(self.counts, key=lambda k: -self.counts[k])
        for n in ranked[:max_rows]:
            c, e = self.counts[n], self.counts_stderr[n]
            rel = f"{100 * e / c:7.2f}%" if c > 0 and math.isfinite(e) else "     -  "
            out.append(f"{n:<12} {c:12.5g} {_fmt_err(e):>11} {rel:>8}")
        if len(ranked) > max_rows:
            out.append(f"... and {len(ranked) - max_rows} more (see --json)")
        for note in self.notes:
            out.append(f"note        {note}")
        return "\n".join(out)


def _fmt_err(e: float) -> str:
    return f"{e:.3g}" if math.isfinite(e) else "-"
