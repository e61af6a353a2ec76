"""A set of parameter values with bounds and free/fixed flags, for one or many spectra.

:class:`ParameterSet` holds every MAPS shape parameter (in :data:`~.table.PARAMETERS` order)
followed by one log10 amplitude per fit component. Values are a tensor ``[..., P]`` (leading
batch axes allowed: one parameter set per spectrum or pixel); bounds and the free mask are shared
``[P]`` tensors. The model reads values by integer index, never by string, so MAPS names only
appear at the edges (files, UI, results).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from mapstorch.errors import ParameterError
from mapstorch.parameters.table import (
    AMPLITUDE_BOUNDS,
    AMPLITUDE_DEFAULT,
    PARAMETERS,
    SHAPE_PARAMETER_NAMES,
    file_key,
    name_from_file_key,
    preset_free_names,
)
from mapstorch.parameters.transforms import to_bounded, to_unbounded
from mapstorch.physics.elements import parse_component

__all__ = ["ParameterSet", "N_SHAPE", "index_of"]

N_SHAPE = len(PARAMETERS)
_SHAPE_INDEX = {n: i for i, n in enumerate(SHAPE_PARAMETER_NAMES)}


def index_of(name: str) -> int:
    """Column of a MAPS shape parameter in ``ParameterSet.values`` (and the model's input)."""
    try:
        return _SHAPE_INDEX[name_from_file_key(name)]
    except KeyError:
        raise ParameterError(f"unknown parameter {name!r}; known: {', '.join(SHAPE_PARAMETER_NAMES)}") from None


@dataclass(frozen=True, eq=False)
class ParameterSet:
    """Values ``[..., P]``, bounds ``[P]`` and free mask ``[P]`` of shape parameters + amplitudes.

    names : the P names: :data:`SHAPE_PARAMETER_NAMES` then the component names (log10 amplitudes).
    """

    names: tuple[str, ...]
    values: Tensor
    lower: Tensor
    upper: Tensor
    free: Tensor

    # ----------------------------------------------------------------- construction
    @classmethod
    def default(
        cls,
        components: Iterable[str] = (),
        preset: str | int = "2",
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> "ParameterSet":
        """MAPS defaults, ``preset``'s parameters free, one free log10 amplitude per component."""
        comps = [parse_component(c).name for c in components]
        if len(set(comps)) != len(comps):
            raise ParameterError(f"duplicate component in {comps}")
        names = SHAPE_PARAMETER_NAMES + tuple(comps)
        vals = [p.value for p in PARAMETERS] + [AMPLITUDE_DEFAULT] * len(comps)
        lo = [p.lower for p in PARAMETERS] + [AMPLITUDE_BOUNDS[0]] * len(comps)
        hi = [p.upper for p in PARAMETERS] + [AMPLITUDE_BOUNDS[1]] * len(comps)
        free_names = set(preset_free_names(preset)) | set(comps)
        kw = {"dtype": dtype, "device": device}
        return cls(
            names=names,
            values=torch.tensor(vals, **kw),
            lower=torch.tensor(lo, **kw),
            upper=torch.tensor(hi, **kw),
            free=torch.tensor([n in free_names for n in names], device=device),
        )

    # ----------------------------------------------------------------- access
    @property
    def components(self) -> tuple[str, ...]:
        return self.names[N_SHAPE:]

    @property
    def batch_shape(self) -> torch.Size:
        return self.values.shape[:-1]

    def index(self, name: str) -> int:
        key = name_from_file_key(name)
        if key in _SHAPE_INDEX:
            return _SHAPE_INDEX[key]
        try:
            return self.names.index(parse_component(key).name)
        except (ValueError, Exception):
            raise ParameterError(
                f"unknown parameter {name!r}; shape parameters are {', '.join(SHAPE_PARAMETER_NAMES)}, "
                f"components are {', '.join(self.components) or '(none)'}"
            ) from None

    def __getitem__(self, name: str) -> Tensor:
        return self.values[..., self.index(name)]

    def shape_values(self) -> Tensor:
        """``[..., N_SHAPE]`` shape-parameter values in :data:`PARAMETERS` order (model input)."""
        return self.values[..., :N_SHAPE]

    def amplitudes(self) -> Tensor:
        """Linear amplitudes ``[..., K + 2]``: the components, then elastic, then Compton."""
        comp = self.values[..., N_SHAPE:]
        scatter = self.values[..., [_SHAPE_INDEX["COHERENT_SCT_AMPLITUDE"], _SHAPE_INDEX["COMPTON_AMPLITUDE"]]]
        return torch.pow(10.0, torch.cat([comp, scatter], dim=-1))

    # ----------------------------------------------------------------- updates (return new sets)
    def with_values(self, values: Mapping[str, float | Tensor] | None = None, **kw: float | Tensor) -> "ParameterSet":
        """A copy with some values replaced (by MAPS name, override key or component name).

        A value outside the parameter's bounds raises :class:`ParameterError`.
        """
        updates = dict(values or {}, **kw)
        new = self.values.clone()
        for name, v in updates.items():
            i = self.index(name)
            t = torch.as_tensor(v, dtype=new.dtype, device=new.device)
            if not torch.all(torch.isfinite(t)):
                raise ParameterError(f"{name} must be finite, got {v!r}")
            lo, hi = float(self.lower[i]), float(self.upper[i])
            if torch.any(t < lo) or torch.any(t > hi):
                raise ParameterError(f"{name}={_fmt(t)} is outside its bounds [{lo:g}, {hi:g}]; widen them first")
            new[..., i] = t
        return replace(self, values=new)

    def with_bounds(self, name: str, lower: float | None = None, upper: float | None = None) -> "ParameterSet":
        """A copy with new bounds for one parameter; the value must lie inside them."""
        i = self.index(name)
        lo = float(self.lower[i]) if lower is None else float(lower)
        hi = float(self.upper[i]) if upper is None else float(upper)
        if math.isnan(lo) or math.isnan(hi) or lo > hi:
            raise ParameterError(f"bounds of {name} must satisfy lower <= upper, got [{lo}, {hi}]")
        v = self.values[..., i]
        if torch.any(v < lo) or torch.any(v > hi):
            raise ParameterError(f"{name}={_fmt(v)} lies outside the new bounds [{lo:g}, {hi:g}]")
        lower_t, upper_t = self.lower.clone(), self.upper.clone()
        lower_t[i], upper_t[i] = lo, hi
        return replace(self, lower=lower_t, upper=upper_t)

    def with_free(self, names: Iterable[str], free: bool = True) -> "ParameterSet":
        """A copy with the named parameters set free (or fixed with ``free=False``)."""
        mask = self.free.clone()
        for n in names:
            mask[self.index(n)] = free
        return replace(self, free=mask)

    def with_preset(self, preset: str | int) -> "ParameterSet":
        """A copy whose free shape parameters are exactly ``preset``'s; amplitudes stay free."""
        free_names = set(preset_free_names(preset))
        mask = torch.tensor(
            [n in free_names for n in SHAPE_PARAMETER_NAMES] + [True] * len(self.components),
            device=self.free.device,
        )
        return replace(self, free=mask)

    def expand(self, *batch: int) -> "ParameterSet":
        """A copy with values broadcast to batch shape ``batch`` (one parameter set per spectrum)."""
        return replace(self, values=self.values.expand(*batch, self.values.shape[-1]).clone())

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "ParameterSet":
        return replace(
            self,
            values=self.values.to(dtype=dtype, device=device),
            lower=self.lower.to(dtype=dtype, device=device),
            upper=self.upper.to(dtype=dtype, device=device),
            free=self.free.to(device=device),
        )

    # ----------------------------------------------------------------- optimisation variables
    @property
    def free_names(self) -> tuple[str, ...]:
        return tuple(n for n, f in zip(self.names, self.free.tolist()) if f)

    def to_unconstrained(self) -> Tensor:
        """Unconstrained variables ``[..., n_free]`` of the free parameters (see transforms)."""
        m = self.free
        return to_unbounded(self.values[..., m], self.lower[m], self.upper[m])

    def from_unconstrained(self, z: Tensor) -> "ParameterSet":
        """A copy whose free values come from unconstrained ``z`` ``[..., n_free]`` (differentiable)."""
        m = self.free
        free_vals = to_bounded(z, self.lower[m], self.upper[m])
        batch = torch.broadcast_shapes(self.values.shape[:-1], free_vals.shape[:-1])
        base = self.values.expand(*batch, self.values.shape[-1])
        idx = torch.nonzero(m).flatten()
        new = base.index_copy(-1, idx, free_vals.expand(*batch, free_vals.shape[-1]).to(base.dtype))
        return replace(self, values=new)

    # ----------------------------------------------------------------- MAPS names
    def to_dict(self, file_keys: bool = False) -> dict[str, float]:
        """``{name: value}`` of an unbatched set; ``file_keys=True`` uses override-file keys."""
        if self.values.dim() != 1:
            raise ParameterError("to_dict() needs an unbatched ParameterSet; index one spectrum first")
        vals = self.values.tolist()
        out = {}
        for n, v in zip(self.names, vals):
            out[file_key(n) if (file_keys and n in _SHAPE_INDEX) else n] = v
        return out

    def with_maps_values(self, values: Mapping[str, float], strict: bool = False) -> "ParameterSet":
        """A copy updated from MAPS names or override keys (``CAL_SLOPE_[E_LINEAR]``, ``Fe``, ...).

        Keys ending in ``_MIN`` / ``_MAX`` set bounds. Unknown keys raise with ``strict=True`` and
        are ignored otherwise. A value outside its (new) bounds widens the bounds to include it,
        with a warning, so that a hand-edited file still loads.
        """
        vals = self.values.clone()
        lower, upper = self.lower.clone(), self.upper.clone()
        touched: set[int] = set()
        for key, v in values.items():
            base, kind = key, ""
            for suffix in ("_MIN", "_MAX"):
                if key.endswith(suffix):
                    base, kind = key[: -len(suffix)], suffix
            try:
                i = self.index(base)
            except ParameterError:
                if strict:
                    raise
                continue
            fv = float(v)
            if not math.isfinite(fv):
                raise ParameterError(f"{key} must be finite, got {v!r}")
            if kind == "_MIN":
                lower[i] = fv
            elif kind == "_MAX":
                upper[i] = fv
            else:
                vals[..., i] = fv
            touched.add(i)
        for i in sorted(touched):
            lo, hi = float(lower[i]), float(upper[i])
            if lo > hi:
                raise ParameterError(f"{self.names[i]}: _MIN ({lo:g}) is larger than _MAX ({hi:g})")
            v = vals[..., i]
            vmin, vmax = float(v.min()), float(v.max())
            if vmin < lo or vmax > hi:
                warnings.warn(
                    f"{self.names[i]}={_fmt(v)} lies outside its bounds [{lo:g}, {hi:g}]; "
                    "widening the bounds to include it",
                    stacklevel=2,
                )
                lower[i], upper[i] = min(lo, vmin), max(hi, vmax)
        return replace(self, values=vals, lower=lower, upper=upper)


def _fmt(t: Tensor) -> str:
    return f"{float(t):g}" if t.numel() == 1 else f"[{float(t.min()):g} .. {float(t.max()):g}]"
