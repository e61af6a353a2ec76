"""Element symbols and the MAPS names of fit components.

A component name is what XRF-Maps writes in ``ELEMENTS_TO_FIT`` / ``ELEMENTS_WITH_PILEUP``:
``Fe`` (K lines), ``Fe_L``, ``Au_M``, or a pile-up pair of K families such as ``Si_Si`` or
``Si_Cl``. :func:`parse_component` turns a name into a :class:`Component` and rejects anything
else with a message that says what would be accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mapstorch.errors import ElementError

__all__ = ["SYMBOLS", "atomic_number", "symbol", "Component", "parse_component", "Shell"]

Shell = Literal["K", "L", "M"]

# fmt: off
SYMBOLS: tuple[str, ...] = (
    "H", "He", "Li", "Be", "B", "C", "N", "O", "F", "Ne", "Na", "Mg", "Al", "Si", "P", "S", "Cl",
    "Ar", "K", "Ca", "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga", "Ge", "As",
    "Se", "Br", "Kr", "Rb", "Sr", "Y", "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd", "In",
    "Sn", "Sb", "Te", "I", "Xe", "Cs", "Ba", "La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd", "Tb",
    "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W", "Re", "Os", "Ir", "Pt", "Au", "Hg", "Tl",
    "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac", "Th", "Pa", "U", "Np", "Pu", "Am", "Cm", "Bk",
    "Cf", "Es", "Fm", "Md", "No", "Lr",
)
# fmt: on
_Z_OF = {s: i + 1 for i, s in enumerate(SYMBOLS)}
_Z_OF_LOWER = {s.lower(): z for s, z in _Z_OF.items()}


def atomic_number(sym: str) -> int:
    """Atomic number of an element symbol (case-insensitive), or :class:`ElementError`."""
    z = _Z_OF.get(sym) or _Z_OF_LOWER.get(sym.strip().lower())
    if z is None:
        raise ElementError(f"unknown element symbol {sym!r}; expected a symbol such as 'Fe' or 'Pb'")
    return z


def symbol(z: int) -> str:
    """Element symbol of atomic number ``z`` (1-103)."""
    if not 1 <= int(z) <= len(SYMBOLS):
        raise ElementError(f"atomic number {z} is outside 1-{len(SYMBOLS)}")
    return SYMBOLS[int(z) - 1]


@dataclass(frozen=True)
class Component:
    """One fit component: an element's K, L or M family, or a K+K pile-up pair.

    ``name`` is the canonical MAPS spelling (``Fe``, ``Pb_L``, ``Au_M``, ``Si_Cl``).
    For a pile-up, ``partner`` is the second element's symbol and ``shell`` is ``"K"``.
    """

    name: str
    element: str
    shell: Shell
    partner: str | None = None

    @property
    def z(self) -> int:
        return atomic_number(self.element)

    @property
    def is_pileup(self) -> bool:
        return self.partner is not None


def _canonical_symbol(sym: str, whole: str) -> str:
    try:
        return symbol(atomic_number(sym))
    except ElementError:
        raise ElementError(
            f"unknown element {sym!r} in component {whole!r}; use names such as 'Fe', 'Fe_L', "
            "'Au_M' or a pile-up pair such as 'Si_Cl'"
        ) from None


def parse_component(name: str) -> Component:
    """Parse a MAPS component name (``Fe``, ``Fe_K``, ``Pb_L``, ``Au_M``, ``Si_Cl``).

    Raises :class:`ElementError` for unknown elements, unknown shells and pile-ups that involve
    L or M families (XRF-Maps only builds K+K pile-ups; it silently treats others as plain L/M).
    """
    if not isinstance(name, str) or not name.strip():
        raise ElementError(f"component name must be a non-empty string, got {name!r}")
    whole = name.strip()
    parts = whole.split("_")
    if len(parts) == 1:
        return Component(_canonical_symbol(parts[0], whole), _canonical_symbol(parts[0], whole), "K")
    if len(parts) == 2:
        head, tail = parts
        el = _canonical_symbol(head, whole)
        if tail.upper() in ("K", "L", "M"):
            shell = tail.upper()
            return Component(el if shell == "K" else f"{el}_{shell}", el, shell)  # type: ignore[arg-type]
        if tail.upper() in ("N", "O"):
            raise ElementError(f"{whole!r}: only K, L and M line families are modelled")
        partner = _canonical_symbol(tail, whole)
        return Component(f"{el}_{partner}", el, "K", partner)
    if len(parts) in (3, 4) and any(p.upper() in ("L", "M") for p in parts[1:]):
        raise ElementError(
            f"pile-up {whole!r} involves an L or M family; only K+K pile-ups (e.g. 'Si_Cl') are supported"
        )
    raise ElementError(
        f"cannot parse component {whole!r}; use 'Fe', 'Fe_L', 'Au_M' or a pile-up pair such as 'Si_Cl'"
    )
