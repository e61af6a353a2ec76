"""What the optimize app computes, as plain functions (tested without a browser).

The app (``mapstorch app optimize``) fits the integrated spectrum of a scan -- the sum of its
detectors or one of them -- with :func:`mapstorch.fit.fit_spectrum`, starting from an override
file or from our defaults, and writes the fitted values into a new override file. Here: the
spectrum to fit, the starting point, the fit itself with a throttled progress report, the rows
of the result tables, and the new override file's text and its (atomic, no-clobber) writing.
Every function raises :class:`~mapstorch.errors.MapstorchError` subclasses with a message fit to
show in the page.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mapstorch.errors import InputError

__all__ = [
    "FITTED_NAME",
    "START_DEFAULTS",
    "START_OVERRIDE",
    "SUM",
    "TABLE_FORMATS",
    "FitProgress",
    "Start",
    "count_rows",
    "default_output_path",
    "load_start",
    "objective_names",
    "optimizer_names",
    "parameter_rows",
    "parse_elements",
    "preset_names",
    "run_fit",
    "spectrum_choices",
    "spectrum_of",
    "stage_rows",
    "status_kind",
]

#: The label of the summed spectrum in the spectrum chooser.
SUM = "sum of detectors"
#: The two starting points.
START_OVERRIDE = "override file"
START_DEFAULTS = "defaults"
#: The file name a written override file gets by default (beside the data; XRF-Maps reads
#: ``maps_fit_parameters_override.txt``, so the fitted one does not replace it unasked).
FITTED_NAME = "maps_fit_parameters_override_fitted.txt"


# ----------------------------------------------------------------------------- choices
def preset_names() -> list[str]:
    """The XRF-Maps fit presets ``fit_spectrum`` takes (``"1"`` ... ``"5"``, ``"all"``)."""
    from mapstorch.parameters.table import PRESETS

    return list(PRESETS)


def optimizer_names() -> list[str]:
    """The optimizers of :func:`~mapstorch.fit.fit_spectrum` (``lm`` first, the default)."""
    from mapstorch.fit import OPTIMIZERS

    return list(OPTIMIZERS)


def objective_names() -> list[str]:
    """The objectives of :func:`~mapstorch.fit.fit_spectrum` (``poisson`` first, the default)."""
    from mapstorch.fit.objectives import OBJECTIVES

    return list(OBJECTIVES)


def spectrum_choices(scan) -> dict[str, str | int]:
    """``{label: "sum" or detector index}`` for a dropdown: the sum, then each detector (when
    the scan has more than one)."""
    choices: dict[str, str | int] = {SUM if scan.detectors > 1 else "spectrum": "sum"}
    if scan.detectors > 1:
        choices.update({f"detector {d}": d for d in range(scan.detectors)})
    return choices


def spectrum_of(scan, detector: str | int = "sum") -> tuple[np.ndarray, np.ndarray]:
    """``(counts [channels], calibration (offset, slope, quadratic))`` of the summed spectrum
    (on detector 0's energy scale) or of detector ``detector``."""
    if detector == "sum":
        return np.asarray(scan.spectrum, dtype=np.float64), np.asarray(scan.calibration[0], dtype=np.float64)
    d = int(detector)
    if not 0 <= d < scan.detectors:
        raise InputError(f"detector {d}: this scan has detectors 0-{scan.detectors - 1}")
    return np.asarray(scan.integrated[d], dtype=np.float64), np.asarray(scan.calibration[d], dtype=np.float64)


def parse_elements(text: str) -> list[str]:
    """Component names from a comma- (or space-) separated list, checked and in MAPS spelling
    (``"fe, pb_l, Si_Cl"`` -> ``["Fe", "Pb_L", "Si_Cl"]``); duplicates dropped."""
    from mapstorch.identify.candidates import parse_candidates

    if not text.replace(";", " ").replace(",", " ").split():
        raise InputError("no elements to fit: list them, e.g. 'Ca, Fe, Zn, Pb_L'")
    return parse_candidates(text.replace(";", ","))


# ----------------------------------------------------------------------------- the starting point
@dataclass
class Start:
    """Where a fit starts: an override file (``None`` = our defaults), its elements and the
    incident energy (keV, ``None`` = found from the elastic peak), with a line saying so."""

    override: object | None
    override_path: str | None
    elements: list[str]
    incident_energy: float | None
    description: str
    values: dict[str, float] = field(default_factory=dict)


def load_start(scan, source: str = START_OVERRIDE, override_path: str | None = None) -> Start:
    """The starting point: ``source`` :data:`START_OVERRIDE` reads ``override_path`` (or the
    scan's own override file when empty); :data:`START_DEFAULTS` starts from our defaults with
    the data file's calibration and incident energy, and the scan's element list."""
    from mapstorch.io import read_override

    if source == START_DEFAULTS:
        return Start(None, None, list(scan.elements), scan.incident_energy,
                     "our defaults, with the data file's energy calibration"
                     + ("" if scan.incident_energy is None else f" and incident energy {scan.incident_energy:.4g} keV"))
    if source != START_OVERRIDE:
        raise InputError(f"unknown starting point {source!r}; choose {START_OVERRIDE!r} or {START_DEFAULTS!r}")
    path = (override_path or "").strip()
    if path:
        path = str(Path(path).expanduser())
        if not Path(path).is_file():
            raise InputError(f"{path}: no such override file")
        ovr = read_override(path)
    elif scan.override is not None:
        ovr, path = scan.override, scan.override_path
    else:
        raise InputError("no override file beside the data: type the path of one, or start from the defaults")
    incident = ovr.parameters.get("COHERENT_SCT_ENERGY", scan.incident_energy)
    return Start(ovr, path, list(ovr.components), None if incident is None else float(incident),
                 f"override file {path}", dict(ovr.parameters))


# ----------------------------------------------------------------------------- the fit
class FitProgress:
    """The ``progress(stage, iteration, loss)`` callback of ``fit_spectrum``: counts the
    iterations, keeps the latest stage and objective, and passes a title and subtitle to
    ``show(title=..., subtitle=...)`` (e.g. a marimo spinner's ``update``) at most every
    ``interval`` seconds, so the page is not flooded."""

    def __init__(self, show: Callable[..., None] | None = None, interval: float = 0.15,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.show = show
        self.interval = interval
        self.clock = clock
        self.t0 = clock()
        self.last_shown = -math.inf
        self.stage = ""
        self.iteration = 0
        self.loss = math.nan
        self.calls = 0
        self.stages: list[str] = []

    def __call__(self, stage: str, iteration: int, loss: float) -> None:
        self.calls += 1
        new_stage = stage != self.stage
        if new_stage:
            self.stages.append(stage)
        self.stage, self.iteration, self.loss = stage, int(iteration), float(loss)
        now = self.clock()
        if self.show is not None and (new_stage or now - self.last_shown >= self.interval):
            self.last_shown = now
            self.show(title=self.title(), subtitle=self.subtitle())

    def title(self) -> str:
        return f"Fitting: stage {len(self.stages)} ({self.stage})" if self.stage else "Fitting"

    def subtitle(self) -> str:
        """``"iteration 3 · objective 1.803e+04 · 1.2 s"``."""
        if not self.calls:
            return "starting"
        return f"iteration {self.iteration} · objective {self.loss:.6g} · {self.clock() - self.t0:.1f} s"


def run_fit(counts, calibration, start: Start, elements: Sequence[str] | None = None, *, preset: str = "2",
            optimizer: str = "lm", objective: str = "poisson", max_iter: int | None = None,
            incident_energy: float | None = None, progress: Callable[[str, int, float], None] | None = None):
    """Fit ``counts`` from ``start`` with :func:`mapstorch.fit.fit_spectrum` (the elements of
    ``start`` unless ``elements``; its incident energy unless ``incident_energy``) and return the
    :class:`~mapstorch.fit.FitResult`. Raises InputError for bad input; a fit that fails
    numerically comes back with its ``status``."""
    from mapstorch.fit import fit_spectrum

    comps = list(elements) if elements else list(start.elements)
    if not comps:
        raise InputError("no elements to fit: list them, e.g. 'Ca, Fe, Zn, Pb_L'")
    e0 = incident_energy if incident_energy else start.incident_energy
    return fit_spectrum(counts, comps, params=start.override, calibration=calibration, incident_energy=e0,
                        preset=str(preset), optimizer=optimizer, objective=objective,
                        max_iter=int(max_iter) if max_iter else None, progress=progress)


def status_kind(result) -> tuple[str, str]:
    """``(callout kind, text)`` of a fit's status: success when converged, warn when it stopped
    early or left free parameters at a bound, danger when the numbers went non-finite."""
    text = f"**{result.status}** ({result.message})" if result.message else f"**{result.status}**"
    if result.status == "non-finite" or not math.isfinite(result.deviance):
        return "danger", text
    if result.status != "converged":
        return "warn", text
    if result.at_bounds:
        return "warn", text + "; at a bound: " + ", ".join(result.at_bounds)
    return "success", text


# ----------------------------------------------------------------------------- tables
#: How the result tables show their numbers (``mo.ui.table(format_mapping=...)``).
TABLE_FORMATS = {"value": "{:.6g}", "start": "{:.6g}", "lower": "{:.6g}", "upper": "{:.6g}", "counts": "{:.6g}",
                 "stderr": "{:.3g}", "rel. error (%)": "{:.3g}", "deviance": "{:.7g}", "seconds": "{:.2f}"}


def _round(v, digits: int = 6) -> float | None:
    """A number to ``digits`` significant digits, ``None`` for missing or non-finite."""
    if v is None or not math.isfinite(float(v)):
        return None
    return float(f"{float(v):.{digits}g}")


def parameter_rows(result, start: dict[str, float] | None = None, fixed: bool = False) -> list[dict]:
    """One row per shape parameter (free ones first, in table order; the fixed ones too when
    ``fixed``): value, stderr, free, at bound, lower and upper bound, and the starting value
    from ``start`` (an override file's) when given."""
    params = result.to_dict()["parameters"]
    rows = []
    for name, p in sorted(params.items(), key=lambda kv: not kv[1]["free"]):
        if not p["free"] and not fixed:
            continue
        row = {"parameter": name, "value": _round(p["value"]), "stderr": _round(p["stderr"], 3),
               "free": p["free"], "at bound": p["at_bound"], "lower": _round(p["lower"]),
               "upper": _round(p["upper"])}
        if start is not None:
            row["start"] = _round(start.get(name))
        rows.append(row)
    return rows


def count_rows(result) -> list[dict]:
    """One row per component (strongest first): counts in the fit window, standard error and
    relative error (%)."""
    rows = []
    for name, c in sorted(result.counts.items(), key=lambda kv: -kv[1]):
        e = result.counts_stderr.get(name, math.nan)
        rel = 100 * e / c if c > 0 and math.isfinite(e) else None
        rows.append({"component": name, "counts": _round(c), "stderr": _round(e, 3),
                     "rel. error (%)": _round(rel, 3)})
    return rows


def stage_rows(result) -> list[dict]:
    """One row per stage of the fit: name, freed parameters, status, iterations, deviance, seconds."""
    return [{"stage": s.name, "free": ", ".join(s.free) or "amplitudes", "status": s.status,
             "iterations": s.iterations, "deviance": _round(s.deviance), "seconds": round(s.seconds, 2)}
            for s in result.stages]


# ----------------------------------------------------------------------------- the new override file
def default_output_path(scan) -> str:
    """``<data folder>/maps_fit_parameters_override_fitted.txt``."""
    return str(Path(scan.path).resolve().parent / FITTED_NAME)
