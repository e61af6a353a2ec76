"""Which line families could appear in a spectrum: the default candidate list of ``guess_elements``.

A family (``Fe`` = Fe K, ``Pb_L``, ``Au_M``) is a candidate when its main line (Ka1, La1, Ma1)
lies inside the fit window and below the incident energy, and the incident energy is above the
edge that feeds that line (K, L3, M5). Elements that do not occur in samples are left out:
the noble gases other than argon (argon is in the air path), technetium, promethium and
polonium-actinium. Pile-ups are K+K pairs of the strongest elements (see :func:`pileup_candidates`).
"""

from __future__ import annotations

from collections.abc import Sequence

from mapstorch.errors import ElementError, InputError
from mapstorch.physics.elements import SYMBOLS, parse_component
from mapstorch.physics.library.base import LineSource

__all__ = ["default_candidates", "pileup_candidates", "parse_candidates", "main_line", "EXCLUDED_ELEMENTS",
           "RARE_ELEMENTS"]

#: Never proposed by default (users may still name them).
EXCLUDED_ELEMENTS = ("He", "Ne", "Kr", "Xe", "Rn", "Tc", "Pm", "Po", "At", "Fr", "Ra", "Ac")

#: Seldom present at levels XRF detects in the samples beamlines see: the default candidate list
#: asks stronger evidence for them (a prior; see ``guess_elements(rare_significance=...)``).
RARE_ELEMENTS = frozenset((
    "Sc", "Ga", "Ge", "Nb", "Ru", "Rh", "Pd", "In", "Te", "Cs", "Pr", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho",
    "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "Re", "Os", "Ir", "Tl", "Th", "Pa",
))

_MAIN_EDGE = {"K": "K", "L": "L3", "M": "M5"}


def _source(source: LineSource | None) -> LineSource:
    if source is None:
        from mapstorch.physics.lines import default_source

        return default_source()
    return source


def main_line(z: int, shell: str, source: LineSource | None = None) -> tuple[float, float] | None:
    """``(main line energy, feeding edge)`` in keV of element ``z``'s ``shell`` family, or
    ``None`` when the source has no such family."""
    src = _source(source)
    try:
        fam = src.family(z, shell)
    except ElementError:
        return None
    ratios = fam.ratios * (fam.energies_kev > 0)
    if not (ratios > 0).any():
        return None
    energy = float(fam.energies_kev[int(ratios.argmax())])
    return energy, float(src.edge_kev(z, _MAIN_EDGE[shell]))


def default_candidates(incident_energy: float, e_min: float = 1.0, e_max: float | None = None,
                       source: LineSource | None = None, z_range: tuple[int, int] = (11, 92)) -> list[str]:
    """Every family the incident energy (keV) can excite whose main line lies in
    ``[e_min, min(e_max, incident_energy))`` keV, in order of main-line energy (module docstring)."""
    if not (incident_energy > 0):
        raise InputError(f"the incident energy must be a positive number of keV, got {incident_energy!r}")
    top = min(float(e_max), incident_energy) if e_max is not None else incident_energy
    found: list[tuple[float, str]] = []
    for z in range(z_range[0], z_range[1] + 1):
        sym = SYMBOLS[z - 1]
        if sym in EXCLUDED_ELEMENTS:
            continue
        for shell in ("K", "L", "M"):
            line = main_line(z, shell, source)
            if line is None:
                continue
            energy, edge = line
            if e_min <= energy < top and 0 < edge < incident_energy:
                found.append((energy, sym if shell == "K" else f"{sym}_{shell}"))
    return [name for _, name in sorted(found)]


def pileup_candidates(strong: Sequence[str], incident_energy: float, e_min: float = 1.0,
                      e_max: float | None = None, source: LineSource | None = None) -> list[str]:
    """K+K pile-up pairs (``Si_Cl``, ``Fe_Fe``) of the ``strong`` K families whose Ka1 + Ka1'
    lies inside the window and below the incident energy."""
    ks = []
    for name in strong:
        comp = parse_component(name)
        if comp.shell == "K" and not comp.is_pileup:
            line = main_line(comp.z, "K", source)
            if line is not None:
                ks.append((comp.z, comp.element, line[0]))
    top = min(float(e_max), incident_energy) if e_max is not None else incident_energy
    out = []
    for i, (z1, s1, e1) in enumerate(sorted(ks)):
        for z2, s2, e2 in sorted(ks)[i:]:
            if not e_min <= e1 + e2 < top:
                continue
            if s2 == "K":  # "Ar_K" would read as argon's K family: name potassium first
                if s1 == "K":
                    continue  # "K_K" reads as potassium's K family: a K+K pile-up has no MAPS name
                s1, s2 = s2, s1
            out.append(f"{s1}_{s2}")
    return out


def parse_candidates(names: Sequence[str] | str) -> list[str]:
    """Canonical, de-duplicated component names from a list or a comma-separated string."""
    if isinstance(names, str):
        names = [n for n in names.replace(" ", ",").split(",") if n.strip()]
    out: list[str] = []
    for n in names:
        name = parse_component(n).name
        if name not in out:
            out.append(name)
    if not out:
        raise InputError("the candidate list is empty; give names such as Fe,Ca,Pb_L or leave it out for the default")
    return out


