"""What the guess app computes, as plain functions (tested without a browser).

The app (``mapstorch app guess``) decides which elements the integrated spectrum of a scan
needs with :func:`mapstorch.identify.guess_elements`, shows the decision per element on a
periodic table with its evidence, and writes the chosen list into an override file
(``ELEMENTS_TO_FIT`` / ``ELEMENTS_WITH_PILEUP``). Here: the starting incident energy, the
candidate list, the guess with a progress report, the table's colours and hover text, the rows
of the evidence table, and the override file (a copy of the scan's with the new list, or a new
one) with its no-clobber writing. Every function raises
:class:`~mapstorch.errors.MapstorchError` subclasses with a message fit to show in the page.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from mapstorch.errors import InputError

__all__ = [
    "CATEGORY",
    "EVERY_FAMILY",
    "GUESS_NAME",
    "MY_LIST",
    "STANDARD_NAME",
    "STEPS",
    "GuessProgress",
    "accepted_override",
    "candidate_names",
    "chosen_options",
    "default_family_count",
    "default_output_path",
    "element_table",
    "evidence_rows",
    "family_symbol",
    "fit_range",
    "result_warnings",
    "run_guess",
    "starting_energy",
]

#: The two candidate choices of the app.
EVERY_FAMILY = "every family the incident energy excites"
MY_LIST = "my list"
#: The file XRF-Maps reads beside the data, and the name the app writes to when that one exists.
STANDARD_NAME = "maps_fit_parameters_override.txt"
GUESS_NAME = "maps_fit_parameters_override_guess.txt"
#: The steps ``guess_elements`` reports (one progress message each; ``calibration`` only when no
#: calibration is known).
STEPS = ("calibration", "candidates", "shape", "selection", "chosen shape", "secondary lines", "evidence",
         "final fit")

#: Table category of each :data:`mapstorch.identify.DECISIONS` value (keys of
#: :data:`mapstorch.apps.figures.DECISION_COLORS`); an element takes the strongest category of
#: its families, in this order.
CATEGORY = {"present": "present", "uncertain": "uncertain", "absent": "absent"}
_RANK = ("present", "uncertain", "absent", "not tested")


# ----------------------------------------------------------------------------- inputs
def starting_energy(scan) -> tuple[float | None, str]:
    """``(incident energy in keV, where it came from)``: the scan's (override file, else data
    file), else the elastic peak of its integrated spectrum; ``(None, why)`` when neither."""
    from mapstorch.fit.guess import elastic_energy

    if scan.incident_energy is not None:
        where = ("from the override file" if scan.override is not None
                 and "COHERENT_SCT_ENERGY" in scan.override.parameters else "from the data file")
        return float(scan.incident_energy), where
    found = elastic_energy(scan.spectrum, *(float(v) for v in scan.calibration[0]))
    if found is None or not math.isfinite(found[0]):
        return None, "unknown: no elastic peak found, type it"
    return round(float(found[0]), 4), "guessed from the elastic peak"


def fit_range(scan) -> tuple[float, float | None]:
    """``(e_min, e_max)`` keV of the fit window: the override file's ``MIN/MAX_ENERGY_TO_FIT``,
    else 1 keV and no upper limit (the incident energy)."""
    values = scan.override.parameters if scan.override is not None else {}
    return float(values.get("MIN_ENERGY_TO_FIT", 1.0)), (float(values["MAX_ENERGY_TO_FIT"])
                                                         if "MAX_ENERGY_TO_FIT" in values else None)


def candidate_names(mode: str, text: str, incident_energy: float | None, scan) -> list[str] | None:
    """The candidates to pass to ``guess_elements``: ``None`` for :data:`EVERY_FAMILY` (its
    default list, with the stronger evidence it asks of rare elements), else the canonical
    names of the comma-separated ``text`` (``"Fe, Ca, Pb_L"``)."""
    from mapstorch.identify.candidates import parse_candidates

    if mode == EVERY_FAMILY:
        if incident_energy is None or not incident_energy > 0:
            raise InputError("the incident energy must be a positive number of keV")
        return None
    if mode != MY_LIST:
        raise InputError(f"unknown candidate choice {mode!r}; choose {EVERY_FAMILY!r} or {MY_LIST!r}")
    if not text.strip():
        raise InputError("the candidate list is empty: type families such as Fe, Ca, Pb_L")
    return parse_candidates(text.replace(";", ","))


def default_family_count(incident_energy: float, scan) -> int:
    """How many families :data:`EVERY_FAMILY` tests at ``incident_energy`` (before pile-ups)."""
    from mapstorch.identify import default_candidates

    return len(default_candidates(incident_energy, *fit_range(scan)))


# ----------------------------------------------------------------------------- the guess
class GuessProgress:
    """A ``progress`` callback for ``guess_elements``: counts its messages and passes each to
    ``report(step, total, message)`` (e.g. a progress bar's update)."""

    def __init__(self, report: Callable[[int, int, str], None] | None = None, total: int = len(STEPS) - 1) -> None:
        self.report = report
        self.total = total
        self.step = 0
        self.messages: list[str] = []

    def __call__(self, message: str) -> None:
        if message == "calibration":
            self.total = len(STEPS)
        self.step = min(self.step + 1, self.total)
        self.messages.append(message)
        if self.report is not None:
            self.report(self.step, self.total, message)


def run_guess(scan, incident_energy: float, candidates: Sequence[str] | None, significance: float = 5.0,
              pileups: bool = True, progress: Callable[[str], None] | None = None):
    """:func:`mapstorch.identify.guess_elements` on the scan's integrated spectrum, with its
    override file as parameters (else the data file's calibration); returns an
    :class:`~mapstorch.identify.ElementGuess`."""
    from mapstorch.identify import guess_elements

    if incident_energy is None or not (incident_energy > 0 and math.isfinite(incident_energy)):
        raise InputError(f"the incident energy must be a positive number of keV, got {incident_energy!r}")
    if not (significance > 0 and math.isfinite(significance)):
        raise InputError(f"the significance must be a positive number of standard deviations, got {significance!r}")
    return guess_elements(scan.spectrum, float(incident_energy), candidates, params=scan.override or None,
                          calibration=tuple(float(v) for v in scan.calibration[0]), significance=float(significance),
                          pileups=bool(pileups), progress=progress)


# ----------------------------------------------------------------------------- results
def family_symbol(name: str) -> str:
    """The element symbol of a family (``Pb_L`` -> ``Pb``, ``Fe`` -> ``Fe``, ``Au_M`` -> ``Au``);
    of a pile-up, its first element (``Si_Cl`` -> ``Si``)."""
    from mapstorch.physics.elements import parse_component

    return parse_component(name).element


def _shell_name(name: str) -> str:
    from mapstorch.physics.elements import parse_component

    comp = parse_component(name)
    return f"{comp.element}+{comp.partner} pile-up" if comp.is_pileup else f"{comp.element} {comp.shell}"


def _number(v: float | None, fmt: str = ".4g") -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, fmt)


def _evidence_line(e) -> str:
    """One line of hover text: family, decision, significance, counts +- stderr, reason."""
    counts = _number(e.counts) + (f" ± {_number(e.counts_stderr, '.2g')}" if math.isfinite(e.counts_stderr) else "")
    return f"{_shell_name(e.name)}: {e.decision}, {e.significance:.1f} σ, {counts} counts<br>  {e.reason}"


def element_table(result) -> tuple[dict[str, str], dict[str, str]]:
    """``(status, hover)`` per element symbol for :func:`~mapstorch.apps.figures.periodic_table_figure`.

    An element takes the strongest decision of its families (present > uncertain > absent:
    ``Pb`` is present when ``Pb_L`` or ``Pb_M`` is); a pile-up adds its evidence to the hover
    text of both its elements but decides neither. Hover text lists every family's evidence."""
    from mapstorch.physics.elements import parse_component

    status: dict[str, str] = {}
    lines: dict[str, list[str]] = {}
    for e in result.candidates:
        comp = parse_component(e.name)
        symbols = [comp.element, comp.partner] if comp.is_pileup else [comp.element]
        for sym in symbols:
            lines.setdefault(sym, []).append(_evidence_line(e))
        if comp.is_pileup:
            continue
        category = CATEGORY.get(e.decision, "not tested")
        old = status.get(comp.element, "not tested")
        status[comp.element] = min(old, category, key=_RANK.index)
    for sym in lines:
        status.setdefault(sym, "not tested")
    hover = {sym: f"<b>{sym}: {status[sym]}</b><br>" + "<br>".join(ls) for sym, ls in lines.items()}
    return status, hover


def evidence_rows(result) -> list[dict]:
    """One row per candidate family (present first, by significance): the evidence table."""
    rows = []
    for e in result.candidates:
        ratio = None
        if e.secondary_ratio is not None:
            ratio = _number(e.secondary_ratio, ".2f") + (f" ± {_number(e.secondary_ratio_stderr, '.2f')}"
                                                         if e.secondary_ratio_stderr is not None
                                                         and math.isfinite(e.secondary_ratio_stderr) else "")
        rows.append({"family": e.name, "element": family_symbol(e.name), "decision": e.decision,
                     "significance": round(float(e.significance), 1), "counts": _number(e.counts),
                     "stderr": _number(e.counts_stderr, ".3g"), "secondary ratio": ratio or "-",
                     "explained by": e.explained_by or "-", "reason": e.reason})
    return rows


def result_warnings(result, max_reduced_chi2: float = 5.0, max_energy_shift: float = 0.02) -> list[str]:
    """What makes the decisions doubtful: a poor final fit (reduced chi2 above
    ``max_reduced_chi2``), an elastic peak fitted away from the incident energy given (by more
    than ``max_energy_shift`` of it), parameters stuck at their bounds."""
    fit = result.fit
    out = []
    chi2 = fit.reduced_chi2
    if not math.isfinite(chi2) or chi2 > max_reduced_chi2:
        out.append(f"the fit of the chosen list is poor (reduced chi2 {chi2:.3g}): the decisions may be wrong; "
                   "check the incident energy, the calibration and the candidates")
    fitted = fit.values.get("COHERENT_SCT_ENERGY", result.incident_energy)
    if abs(fitted - result.incident_energy) > max_energy_shift * result.incident_energy:
        out.append(f"the elastic peak fits at {fitted:.4g} keV, not at the {result.incident_energy:.4g} keV given: "
                   "check the incident energy")
    if fit.at_bounds:
        out.append(f"at their bounds in the final fit: {', '.join(fit.at_bounds)}")
    return out


def chosen_options(result) -> tuple[list[str], list[str]]:
    """``(options, chosen)`` of the list to accept: every family with some signal (present,
    uncertain, or absent but at least 2 sigma), and the present ones."""
    options = [e.name for e in result.candidates if e.decision != "absent" or e.significance >= 2.0]
    return options, [n for n in result.present if n in options]


# ----------------------------------------------------------------------------- the override file
def accepted_override(result, override, chosen: Sequence[str]):
    """The override file with ``chosen`` as its lists (:meth:`ElementGuess.to_override`)."""
    return result.to_override(override, chosen)


def default_output_path(scan) -> str:
    """Where the accepted list goes: ``maps_fit_parameters_override.txt`` beside the data when
    there is none, else ``maps_fit_parameters_override_guess.txt`` there."""
    folder = Path(scan.path).resolve().parent
    return str(folder / (GUESS_NAME if (folder / STANDARD_NAME).exists() else STANDARD_NAME))
