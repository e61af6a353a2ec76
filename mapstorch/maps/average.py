"""The average of the detector elements' maps, as XRF-Maps writes it in ``<scan>.h5``.

XRF-Maps fits each element of a multi-element detector on its own (``<scan>.h50``, ``.h51``,
...) and then, with ``--generate-avg-h5``, writes ``<scan>.h5`` whose ``Counts_Per_Sec`` is the
plain per-pixel mean of the elements' ``Counts_Per_Sec`` (every channel of it, the statistics
channels included), whose ``Fitted_Integrated_Spectra`` and ``FIT_Integrated_Background`` are
the elements' sums, and whose live and real times and count rates are the elements' means
(``HDF5_IO::generate_avg``). That is not the fit of the summed spectra (``--detector sum``):
where the elements see different spectra (different calibrations, a shadowed element) the two
differ, for minor elements by tens of per cent on the 2-ID-E scan ``2xfm_0010``.

:func:`average_maps` builds that average from the elements' :class:`MapResult`. Our own maps
beside XRF-Maps' follow the same rule: means, except standard errors (those of the mean of
independent fits, ``sqrt(sum se^2) / n``) and the status (the worst of the elements', so a
pixel is "converged" only where every element's fit converged).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from mapstorch.errors import InputError
from mapstorch.maps.fit import MapResult

__all__ = ["average_maps"]


def _combine(arrays: Sequence[np.ndarray], kind: str) -> np.ndarray:
    """Per-pixel ``mean``, ``stderr`` (of the mean: ``sqrt(sum a^2) / n``), ``max`` or ``sum``
    of arrays of one shape, as float32 (NaN where any input is NaN, as XRF-Maps' mean)."""
    stack = np.stack([np.asarray(a, dtype=np.float64) for a in arrays])
    if kind == "mean":
        out = stack.mean(0)
    elif kind == "stderr":
        out = np.sqrt((stack * stack).sum(0)) / len(arrays)
    elif kind == "max":
        out = stack.max(0)
    elif kind == "sum":
        out = stack.sum(0)
    else:  # pragma: no cover - internal
        raise ValueError(kind)
    return out.astype(np.float32)


def _extra_kind(name: str) -> str:
    """How one of our own maps is averaged over elements (see the module docstring)."""
    if name.endswith("Stderr"):
        return "stderr"
    return "max" if name == "Status" else "mean"


def _by_name(names: Sequence[str], values: np.ndarray, wanted: Sequence[str]) -> list[np.ndarray | None]:
    index = {n: i for i, n in enumerate(names)}
    return [values[index[n]] if n in index else None for n in wanted]


def _stack_named(parts: Sequence[tuple[Sequence[str], np.ndarray]], wanted: Sequence[str], kind: str,
                 shape: tuple[int, ...]) -> np.ndarray:
    """``[len(wanted), *shape]``: per name, :func:`_combine` over the inputs that have it."""
    rows = []
    for name in wanted:
        found = [v for names, values in parts if (v := _by_name(names, values, [name])[0]) is not None]
        rows.append(_combine(found, kind) if found else np.full(shape, np.nan, np.float32))
    return np.stack(rows) if rows else np.zeros((0, *shape), np.float32)


def _union(lists: Sequence[Sequence[str]]) -> list[str]:
    out: list[str] = []
    for names in lists:
        out += [n for n in names if n not in out]
    return out


def _average_xrfmaps(per_element: Sequence[dict]) -> dict:
    """XRF-Maps' average of ``MapResult.xrfmaps_results()`` dictionaries, routine by routine."""
    out = {}
    for routine in _union([list(r) for r in per_element]):
        out.update(_average_routine(routine, [r[routine] for r in per_element if routine in r]))
    return out


def _average_routine(routine: str, groups: Sequence[dict]) -> dict:
    """XRF-Maps' average of one routine's results of each element."""
    names = _union([g["channel_names"] for g in groups])
    shape = np.shape(groups[0]["counts_per_sec"])[1:]
    units = {}
    for g in groups:
        for n, u in zip(g["channel_names"], g["units"]):
            units.setdefault(n, u)
    parts = [(g["channel_names"], np.asarray(g["counts_per_sec"])) for g in groups]
    cps = _stack_named(parts, names, "mean", shape)

    def summed(key: str) -> np.ndarray | None:
        if any(g.get(key) is None for g in groups):
            return None
        arrays = [np.asarray(g[key], dtype=np.float64) for g in groups]
        out = np.zeros(max(a.shape[0] for a in arrays))
        for a in arrays:
            out[:a.shape[0]] += a
        return out.astype(np.float32)

    extra = {}
    for key in _union([list(g.get("extra") or {}) for g in groups]):
        have = [(g["channel_names"], np.asarray(g["extra"][key])) for g in groups if key in (g.get("extra") or {})]
        if have[0][1].ndim == len(shape) + 1:  # on the channel axis
            extra[key] = _stack_named(have, names, _extra_kind(key), shape)
        else:
            extra[key] = _combine([v for _, v in have], _extra_kind(key))
    return {routine: {"channel_names": names, "units": [units[n] for n in names], "counts_per_sec": cps,
                      "Fitted_Integrated_Spectra": summed("Fitted_Integrated_Spectra"),
                      "FIT_Integrated_Background": summed("FIT_Integrated_Background"), "extra": extra,
                      "integrated": all(g.get("integrated", True) for g in groups)}}


def average_maps(results: Sequence[MapResult]) -> MapResult:
    """XRF-Maps' average (``<scan>.h5``) of the maps of each detector element (``<scan>.h5<N>``).

    results : one :class:`MapResult` per element, all of one method and map size (each fitted
        with ``detector=N``). Components that only some elements fitted (their own override
        files) are averaged over the elements that have them.

    The result's arrays are the per-pixel means (counts, counts/s, amplitudes, reduced
    chi-square, iterations, parameter maps), standard errors of those means, the worst status,
    live time the mean and total counts the sum of the elements'; its
    :meth:`~MapResult.xrfmaps_results` is XRF-Maps' average of the elements' own, channel by
    channel (so ``Total_Fluorescence_Yield`` is the mean of each element's counts/s, as in
    XRF-Maps, not the summed counts over the mean live time).
    """
    results = list(results)
    if not results:
        raise InputError("average_maps needs the maps of at least one detector element")
    first = results[0]
    if any(r.method != first.method for r in results):
        raise InputError("average_maps: the elements' maps come from different methods "
                         f"({', '.join(sorted({r.method for r in results}))}); fit them all with one")
    if any(r.counts.shape[1:] != first.counts.shape[1:] for r in results):
        raise InputError("average_maps: the elements' maps differ in size "
                         f"({', '.join(str(r.counts.shape[1:]) for r in results)})")
    shape = first.counts.shape[1:]
    names = _union([r.names for r in results])

    def comps(attr: str, kind: str) -> np.ndarray | None:
        parts = [(r.names, getattr(r, attr)) for r in results if getattr(r, attr) is not None]
        return _stack_named(parts, names, kind, shape) if parts else None

    def pixels(attr: str, kind: str) -> np.ndarray | None:
        arrays = [getattr(r, attr) for r in results]
        return None if any(a is None for a in arrays) else _combine(arrays, kind)

    par_names = first.parameter_names
    same_pars = all(r.parameter_names == par_names for r in results) and par_names
    seconds = sum(r.seconds for r in results)
    fitted = sum(r.pixels_per_second * r.seconds for r in results)
    notes = [f"detector {r.detector}: {n}" for r in results for n in r.notes]
    average = replace(
        first,
        names=tuple(names),
        counts=comps("counts", "mean"),
        counts_stderr=comps("counts_stderr", "stderr"),
        counts_per_sec=comps("counts_per_sec", "mean"),
        amplitudes=comps("amplitudes", "mean"),
        amplitudes_stderr=comps("amplitudes_stderr", "stderr"),
        reduced_chi2=_combine([r.reduced_chi2 for r in results], "mean"),
        iterations=_combine([r.iterations for r in results], "mean"),
        status=np.stack([r.status for r in results]).max(0),
        detector="average of " + ", ".join(str(r.detector) for r in results),
        seconds=seconds,
        pixels_per_second=fitted / seconds if seconds > 0 else 0.0,
        chunks_reused=sum(r.chunks_reused for r in results),
        notes=notes,
        parameter_names=par_names if same_pars else (),
        parameters=pixels("parameters", "mean") if same_pars else None,
        parameters_stderr=pixels("parameters_stderr", "stderr") if same_pars else None,
        roi_names=tuple(_union([r.roi_names for r in results])),
        roi_counts=_stack_named([(r.roi_names, r.roi_counts) for r in results if r.roi_counts is not None],
                                _union([r.roi_names for r in results]), "mean", shape)
        if any(r.roi_counts is not None for r in results) else None,
        total_counts=pixels("total_counts", "sum"),
        live_time=pixels("live_time", "mean"),
        window=(0, max(r.channels for r in results) - 1),
        channels=max(r.channels for r in results),
        fitted_integrated=None,
        background_integrated=None,
        xrfmaps=_average_xrfmaps([r.xrfmaps_results() for r in results]),
    )
    group = average.xrfmaps[first.routine_name()]
    average.fitted_integrated = group["Fitted_Integrated_Spectra"]
    average.background_integrated = group["FIT_Integrated_Background"]
    if par_names and not same_pars:
        average.notes.append("the elements mapped different parameters: no average parameter maps")
    return average
