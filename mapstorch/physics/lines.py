"""The line table: every emission line of every fit component, as flat arrays.

:func:`build_line_table` turns a list of component names (``Fe``, ``Pb_L``, ``Au_M``, ``Si_Cl``)
into a :class:`LineTable` from a line-library source (xraylib by default, or XRF-Maps'
``xrf_library.csv`` + ``henke.xdr``), applying the override file's branching adjustments the way
XRF-Maps does:

* ``BRANCHING_RATIO_ADJUSTMENT_K/L/M: El, f1, f2, ...`` multiply the ratios of the family's lines
  in :data:`~mapstorch.physics.library.base.LINE_NAMES` order (4 / 12 / 4 factors);
* ``BRANCHING_FAMILY_ADJUSTMENT_L: El_L, fL1, fL2, fL3`` multiplies the L1 group (Lb3, Lb4, Lg2,
  Lg3, Lg4), the L2 group (Lb1, Lg1, Ln) and the L3 group (La1, La2, Lb2, Ll);
* several lines for one element multiply together; La1 and Ma1 keep ratio 1 (XRF-Maps ignores
  their factor), while Ka1 takes its factor.

Pile-up ``A_B`` follows XRF-Maps: peaks at Ka1+Ka1', Ka1+Kb1', Kb1+Kb1' and (if A != B)
Kb1+Ka1', with products of the Kb1/Ka1 ratios; all gated by ``Ka1 + Ka1' < incident energy``.

Per-line gating edges follow XRF-Maps too: the K edge for K lines, the vacancy subshell edge
(L1, L2, L3) for L lines, and the M1 edge for all M lines. (XRF-Maps picks the L subshell by the
line's position after dropping lines of zero energy, which shifts the subshell for a few light
elements; we always use the line's own subshell. The two agree except for incident energies
between that element's L edges.)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mapstorch.errors import ElementError, InputError
from mapstorch.physics.elements import Component, atomic_number, parse_component
from mapstorch.physics.library.base import (
    DETECTOR_MATERIALS,
    LINE_NAMES,
    LINE_SUBSHELL,
    LineSource,
    MuConvention,
)

__all__ = [
    "KIND_K_ALPHA",
    "KIND_K_BETA",
    "KIND_L",
    "KIND_M",
    "LineTable",
    "TorchLines",
    "build_line_table",
    "branching_factors",
    "default_source",
    "xrfmaps_source",
]

#: Line kinds: which tail fraction a line uses and whether its amplitude is normalised.
KIND_K_ALPHA, KIND_K_BETA, KIND_L, KIND_M = 0, 1, 2, 3
_FAMILY_SIZE = {"K": 4, "L": 12, "M": 4}
_L_GROUPS = {0: (4, 5, 7, 8, 9), 1: (2, 6, 11), 2: (0, 1, 3, 10)}  # L1, L2, L3 by line index


@functools.lru_cache(maxsize=1)
def default_source() -> LineSource:
    """The xraylib-backed source (built once)."""
    from mapstorch.physics.library.xraylib_source import XraylibSource

    return XraylibSource()


def xrfmaps_source(csv_path: str | os.PathLike[str], henke_path: str | os.PathLike[str]) -> LineSource:
    """A source reading XRF-Maps' ``xrf_library.csv`` and ``henke.xdr`` (for exact XRF-Maps parity)."""
    from mapstorch.physics.library.xrfmaps_csv import XrfMapsCsvSource

    return XrfMapsCsvSource(csv_path, henke_path)


def branching_factors(
    ratio_k: Iterable[tuple[str, Sequence[float]]] = (),
    ratio_l: Iterable[tuple[str, Sequence[float]]] = (),
    ratio_m: Iterable[tuple[str, Sequence[float]]] = (),
    family_l: Iterable[tuple[str, Sequence[float]]] = (),
) -> dict[str, np.ndarray]:
    """Combine override-file branching adjustments into per-component ratio factors.

    Each argument is a sequence of ``(component name, factors)`` as they appear in the file
    (``("Fe", (1, 1, 1.2, 1))``, ``("Pt_L", (0, 1, 1))``). Returns ``{name: factors}`` with 4, 12
    or 4 multipliers per name, combined multiplicatively as XRF-Maps does.
    """
    out: dict[str, np.ndarray] = {}

    def factors_for(name: str, shell: str) -> np.ndarray:
        comp = parse_component(name)
        if comp.shell != shell and not (shell == "K" and comp.is_pileup):
            raise InputError(f"branching adjustment for {name!r} is listed under the {shell} family")
        return out.setdefault(comp.name, np.ones(_FAMILY_SIZE[shell]))

    for shell, entries in (("K", ratio_k), ("L", ratio_l), ("M", ratio_m)):
        for name, values in entries:
            vals = np.asarray(values, dtype=np.float64)
            if vals.shape != (_FAMILY_SIZE[shell],) or not np.all(np.isfinite(vals)):
                raise InputError(
                    f"BRANCHING_RATIO_ADJUSTMENT_{shell} for {name!r} needs {_FAMILY_SIZE[shell]} "
                    f"finite factors, got {list(values)!r}"
                )
            factors_for(name, shell)[:] *= vals
    for name, values in family_l:
        vals = np.asarray(values, dtype=np.float64)
        if vals.shape != (3,) or not np.all(np.isfinite(vals)):
            raise InputError(f"BRANCHING_FAMILY_ADJUSTMENT_L for {name!r} needs 3 finite factors (L1, L2, L3)")
        f = factors_for(name, "L")
        for group, idx in _L_GROUPS.items():
            f[list(idx)] *= vals[group]
    return out


@dataclass(frozen=True)
class TorchLines:
    """A :class:`LineTable` as tensors on one device and dtype (all shaped ``[L]``).

    kind and component are int64; gate_edge is the incident-energy threshold of each line.
    """

    energy: Tensor
    ratio: Tensor
    mu: Tensor
    gate_edge: Tensor
    width_multiplier: Tensor
    kind: Tensor
    component: Tensor
    is_k_alpha_or_l: Tensor  # float 0/1: uses F_TAIL, amplitude normalised
    is_k_beta: Tensor  # float 0/1: uses KB_F_TAIL, amplitude normalised
    is_m: Tensor  # float 0/1: no tail, no normalisation

    def select(self, index: Tensor) -> "TorchLines":
        """The lines at ``index`` (a 1-D index tensor)."""
        return TorchLines(*(getattr(self, f).index_select(0, index) for f in self.__dataclass_fields__))


@dataclass(frozen=True, eq=False)
class LineTable:
    """All lines of a set of components (``L`` lines, ``K`` components).

    components : the parsed components, in fit order.
    energy_kev, ratio, mu_fraction, gate_edge_kev, width_multiplier : (L,) float64.
    kind, component : (L,) int64; ``component[l]`` indexes ``components``.
    line_names : (L,) e.g. ``"Ka1"``, ``"Lb3"``, ``"Ka1+Kb1"`` for a pile-up.
    source, detector, mu_convention : where the numbers came from.
    """

    components: tuple[Component, ...]
    energy_kev: np.ndarray
    ratio: np.ndarray
    mu_fraction: np.ndarray
    gate_edge_kev: np.ndarray
    width_multiplier: np.ndarray
    kind: np.ndarray
    component: np.ndarray
    line_names: tuple[str, ...]
    source: str
    detector: str
    mu_convention: str

    @property
    def names(self) -> tuple[str, ...]:
        """Component names in fit order (``Fe``, ``Pb_L``, ``Si_Cl``, ...)."""
        return tuple(c.name for c in self.components)

    @property
    def n_lines(self) -> int:
        return int(self.energy_kev.shape[0])

    def lines_of(self, name: str) -> dict[str, np.ndarray]:
        """The lines of one component as a dict of arrays (for display and tests)."""
        try:
            k = self.names.index(parse_component(name).name)
        except ValueError:
            raise ElementError(f"{name!r} is not in this line table ({', '.join(self.names)})") from None
        sel = self.component == k
        return {
            "line": np.array(self.line_names, dtype=object)[sel],
            "energy_kev": self.energy_kev[sel],
            "ratio": self.ratio[sel],
            "mu_fraction": self.mu_fraction[sel],
            "gate_edge_kev": self.gate_edge_kev[sel],
        }

    def to_torch(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> TorchLines:
        """Tensors of this table on ``device`` in ``dtype`` (cached per dtype/device)."""
        return _to_torch(self, dtype, torch.device(device) if device is not None else torch.device("cpu"))


@functools.lru_cache(maxsize=64)
def _to_torch(table: LineTable, dtype: torch.dtype, device: torch.device) -> TorchLines:
    def f(a: np.ndarray) -> Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.float64), device=device).to(dtype)

    kind = torch.as_tensor(table.kind, device=device, dtype=torch.int64)
    return TorchLines(
        energy=f(table.energy_kev),
        ratio=f(table.ratio),
        mu=f(table.mu_fraction),
        gate_edge=f(table.gate_edge_kev),
        width_multiplier=f(table.width_multiplier),
        kind=kind,
        component=torch.as_tensor(table.component, device=device, dtype=torch.int64),
        is_k_alpha_or_l=((kind == KIND_K_ALPHA) | (kind == KIND_L)).to(dtype),
        is_k_beta=(kind == KIND_K_BETA).to(dtype),
        is_m=(kind == KIND_M).to(dtype),
    )


def _family_rows(comp: Component, source: LineSource, factors: np.ndarray | None) -> list[tuple]:
    """(line name, energy, ratio, kind, gate edge) rows of one plain K/L/M family."""
    fam = source.family(comp.z, comp.shell)
    names = LINE_NAMES[comp.shell]
    ratios = fam.ratios.astype(np.float64).copy()
    if factors is not None:
        if comp.shell == "K":
            ratios = ratios * factors
        else:  # La1 / Ma1 stay at 1 in XRF-Maps whatever their factor
            ratios[1:] = ratios[1:] * factors[1:]
    rows = []
    for i, line in enumerate(names):
        sub = LINE_SUBSHELL[line]
        gate_sub = "M1" if comp.shell == "M" else sub
        if comp.shell == "K":
            kind = KIND_K_ALPHA if line.startswith("Ka") else KIND_K_BETA
        else:
            kind = KIND_L if comp.shell == "L" else KIND_M
        rows.append((line, fam.energies_kev[i], ratios[i], kind, source.edge_kev(comp.z, gate_sub)))
    return rows


def _pileup_rows(comp: Component, source: LineSource, factors: np.ndarray | None) -> list[tuple]:
    """XRF-Maps' K+K pile-up lines of ``comp`` (see module docstring)."""
    assert comp.partner is not None
    a = source.family(comp.z, "K")
    b = source.family(atomic_number(comp.partner), "K")
    ka_a, kb_a, rb_a = a.energies_kev[0], a.energies_kev[2], a.ratios[2]
    ka_b, kb_b, rb_b = b.energies_kev[0], b.energies_kev[2], b.ratios[2]
    m = factors if factors is not None else np.ones(4)
    center = ka_a + ka_b
    rows = [
        ("Ka1+Ka1", ka_a + ka_b, 1.0 * m[0], KIND_K_ALPHA, center),
        ("Ka1+Kb1", ka_a + kb_b, rb_b * m[1], KIND_K_BETA, center),
        ("Kb1+Kb1", kb_a + kb_b, rb_a * rb_b * m[2], KIND_K_BETA, center),
    ]
    if comp.element != comp.partner:
        rows.append(("Kb1+Ka1", kb_a + ka_b, rb_a * m[3], KIND_K_BETA, center))
    return rows


def build_line_table(
    components: Iterable[str],
    source: LineSource | None = None,
    detector: str = "Si",
    branching: Mapping[str, Sequence[float]] | None = None,
    width_multipliers: Mapping[str, float] | None = None,
    mu_convention: MuConvention = "maps",
) -> LineTable:
    """Build the :class:`LineTable` of ``components`` (e.g. ``["Fe", "Pb_L", "Si_Cl"]``).

    source : line data (default xraylib; :func:`xrfmaps_source` for XRF-Maps' own tables).
    detector : ``"Si"`` or ``"Ge"``, the detector material for ``mu_fraction``.
    branching : ``{component: factors}`` as from :func:`branching_factors`; entries for
        components not in the list are ignored (override files list many elements).
    width_multipliers : ``{component: factor}`` scaling the tail width gamma (``WIDTH_MULTIPLIER``).
    mu_convention : see :data:`~mapstorch.physics.library.base.MuConvention`.

    Lines of zero energy or zero ratio are dropped. Raises :class:`ElementError` for unknown
    names or families the source lacks, and :class:`InputError` for duplicates or bad options.
    """
    if detector not in DETECTOR_MATERIALS:
        raise InputError(f"detector must be one of {DETECTOR_MATERIALS}, got {detector!r}")
    if mu_convention not in ("maps", "physical"):
        raise InputError(f"mu_convention must be 'maps' or 'physical', got {mu_convention!r}")
    if isinstance(components, str):
        components = [c for c in components.split(",") if c.strip()]
    comps = tuple(parse_component(c) for c in components)
    if not comps:
        raise InputError("no components given; pass element names such as ['Fe', 'Ca', 'Pb_L']")
    seen: set[str] = set()
    for c in comps:
        if c.name in seen:
            raise InputError(f"component {c.name!r} is listed twice")
        seen.add(c.name)
    src = source if source is not None else default_source()
    factors = {parse_component(k).name: np.asarray(v, dtype=np.float64) for k, v in (branching or {}).items()}
    widths = {parse_component(k).name: float(v) for k, v in (width_multipliers or {}).items()}
    for name, w in widths.items():
        if not (np.isfinite(w) and w > 0):
            raise InputError(f"WIDTH_MULTIPLIER for {name!r} must be positive, got {w}")

    cols: dict[str, list] = {k: [] for k in ("name", "energy", "ratio", "kind", "edge", "comp", "mu", "width")}
    for k, comp in enumerate(comps):
        f = factors.get(comp.name)
        if f is not None and f.shape != (_FAMILY_SIZE[comp.shell],):
            raise InputError(f"branching factors for {comp.name!r} need {_FAMILY_SIZE[comp.shell]} values")
        rows = _pileup_rows(comp, src, f) if comp.is_pileup else _family_rows(comp, src, f)
        rows = [r for r in rows if r[1] > 0.0 and r[2] != 0.0 and np.isfinite(r[2])]
        energies = np.array([r[1] for r in rows], dtype=np.float64)
        mu = src.mu_fraction(detector, energies, comp.z, mu_convention) if rows else energies
        for r, m in zip(rows, mu):
            cols["name"].append(r[0])
            cols["energy"].append(r[1])
            cols["ratio"].append(r[2])
            cols["kind"].append(r[3])
            cols["edge"].append(r[4])
            cols["comp"].append(k)
            cols["mu"].append(m)
            cols["width"].append(widths.get(comp.name, 1.0))
    return LineTable(
        components=comps,
        energy_kev=np.array(cols["energy"], dtype=np.float64),
        ratio=np.array(cols["ratio"], dtype=np.float64),
        mu_fraction=np.array(cols["mu"], dtype=np.float64),
        gate_edge_kev=np.array(cols["edge"], dtype=np.float64),
        width_multiplier=np.array(cols["width"], dtype=np.float64),
        kind=np.array(cols["kind"], dtype=np.int64),
        component=np.array(cols["comp"], dtype=np.int64),
        line_names=tuple(cols["name"]),
        source=src.name,
        detector=detector,
        mu_convention=mu_convention,
    )
