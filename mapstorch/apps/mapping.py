"""What the maps app computes, as plain functions (tested without a browser).

Two ways in: :func:`run_maps` fits every pixel of a scan with :func:`mapstorch.maps.fit_map`
(and may write the result as ``mapstorch map`` does), :func:`read_maps` opens the maps of a
results file (``/MAPS/XRF_Analyzed/<routine>``). Both return :class:`Maps`: the maps, their
uncertainties and fit-quality maps, and what is needed to rebuild any pixel's model
(:class:`ModelSetup`). :func:`pixel_fit` shows one pixel's spectrum with that model.

Every function raises :class:`~mapstorch.errors.MapstorchError` subclasses with a message fit
to show in the page.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mapstorch.errors import InputError, MapstorchError

__all__ = ["QUANTITIES", "SCATTER", "UNCERTAINTIES", "Maps", "ModelSetup", "PixelFit", "Source", "clicked_pixel",
           "element_maps", "has_results", "inspect_file", "parse_elements", "pixel_fit", "pixel_table", "quality_maps",
           "read_maps", "routine_method", "run_maps", "uncertainty_maps"]

#: Scatter columns: ours (``Elastic``, ``Compton``) and XRF-Maps' names for them.
SCATTER = {"Elastic": "Elastic", "Compton": "Compton", "COHERENT_SCT_AMPLITUDE": "Elastic",
           "COMPTON_AMPLITUDE": "Compton"}
#: What an element map shows: label -> unit.
QUANTITIES = {"counts/s": "cts/s", "counts": "counts"}
#: What an uncertainty map shows.
UNCERTAINTIES = ("standard error", "relative standard error")
#: ``/MAPS/XRF_Analyzed`` routine -> our map method (XRF-Maps' own ``Fitted`` keeps the shape fixed).
_ROUTINE_METHODS = {"NNLS": "nnls", "Poisson": "poisson", "Fitted": "nonlinear"}


# ----------------------------------------------------------------------------- what a file offers
@dataclass
class Source:
    """A file opened for the maps app: its size, override file, and the maps it already holds.

    results : ``{routine: ...}`` from :func:`~mapstorch.io.read_xrfmaps_results` (empty when the
    file holds no maps); has_spectra : whether its spectra can be read (a scan, or a results file
    with ``/MAPS/Spectra/mca_arr``).
    """

    path: str
    format: str
    rows: int
    cols: int
    detectors: int
    channels: int
    override: object | None
    override_path: str | None
    elements: list[str]
    results: dict[str, dict]
    has_spectra: bool
    notes: list[str] = field(default_factory=list)

    @property
    def routines(self) -> list[str]:
        """The file's routines, fits first (XRF-Maps' ROI and SVD maps last)."""
        return sorted(self.results, key=lambda r: r.upper() in ("ROI", "SVD"))

    def facts(self) -> list[tuple[str, str]]:
        """``(label, value)`` rows for a summary table."""
        return [
            ("file", self.path),
            ("format", self.format),
            ("pixels", f"{self.rows} x {self.cols}"),
            ("detectors", str(self.detectors) if self.has_spectra else "no spectra in this file"),
            ("channels", str(self.channels) if self.has_spectra else "-"),
            ("override file", self.override_path or "none found"),
            ("elements to fit", ", ".join(self.elements) or "none given"),
            ("maps in the file", ", ".join(self.routines) or "none"),
        ]


def _checked_path(path) -> str:
    path = str(path or "").strip()
    if not path:
        raise InputError("no file given: type a path or pick a file")
    if not Path(path).exists():
        raise InputError(f"{path}: no such file")
    if Path(path).is_dir():
        raise InputError(f"{path} is a folder; pick a file in it")
    return path


def has_results(path) -> bool:
    """Whether ``path`` is an HDF5 file with maps under ``/MAPS/XRF_Analyzed`` (a cheap check:
    nothing is read but the group's names)."""
    try:
        import h5py

        with h5py.File(str(path), "r") as f:
            group = f.get("MAPS/XRF_Analyzed")
            return group is not None and len(group) > 0
    except Exception:  # noqa: BLE001 -- not HDF5, missing, damaged: no maps to open
        return False


def inspect_file(path) -> Source:
    """Open ``path`` (a scan any reader takes, or a results file) with the override file beside
    it, and say what it offers: size, elements, maps already fitted, spectra."""
    from mapstorch.io import open_dataset, override_beside, read_override, read_xrfmaps_results

    path = _checked_path(path)
    found = override_beside(path)
    ovr = read_override(found) if found else None
    results: dict[str, dict] = {}
    notes: list[str] = []
    if has_results(path):
        try:
            results = read_xrfmaps_results(path)
        except MapstorchError as exc:
            notes.append(f"the maps in this file cannot be read: {exc}")
    try:
        with open_dataset(path, override=ovr) as ds:
            size = (ds.rows, ds.cols, ds.detectors, ds.channels)
            fmt = ds.format
            notes += list(ds.notes)
        has_spectra = True
    except MapstorchError as exc:
        if not results:
            raise exc from None
        first = next(iter(results.values()))["counts_per_sec"]
        size = (first.shape[-2], first.shape[-1], 0, 0)
        fmt, has_spectra = "results only", False
        notes.append(f"the spectra cannot be read ({exc}): maps only, no pixel spectra")
    elements = list(ovr.components) if ovr is not None else []
    return Source(path=path, format=fmt, rows=size[0], cols=size[1], detectors=size[2], channels=size[3],
                  override=ovr, override_path=str(found) if found else None, elements=elements,
                  results=results, has_spectra=has_spectra, notes=notes)


def parse_elements(text: str | Sequence[str] | None) -> list[str]:
    """``"Fe, Ca; Pb_L"`` -> ``["Fe", "Ca", "Pb_L"]`` (a list passes through, blanks dropped)."""
    if text is None:
        return []
    items = text.replace(";", ",").split(",") if isinstance(text, str) else list(text)
    return [str(e).strip() for e in items if str(e).strip()]


# ----------------------------------------------------------------------------- the maps
@dataclass
class ModelSetup:
    """What a pixel's model is rebuilt from: everything the map fit used.

    params : the (unbatched, float64) ParameterSet with the shape parameters of the fit;
    table : its line table; spectra_path : the file with the raw spectra (None: not available,
    ``reason`` says why); detector : ``"sum"`` or an index; chunk_rows : rows per chunk of the
    fit (the Poisson background shape is the SNIP of a chunk's summed spectrum).
    """

    params: object
    table: object
    method: str
    detector: int | str
    spectra_path: str | None
    override: object | None = None
    chunk_rows: int = 1
    reason: str = ""


@dataclass
class Maps:
    """Maps ``[channels, rows, cols]`` (or ``[rows, cols]``) of one map fit, run here or read,
    on the channel axis of ``/MAPS/XRF_Analyzed/<routine>`` (``names``: its ``Channel_Names``).

    counts_per_sec : ``Counts_Per_Sec`` (XRF-Maps: the fitted amplitude per second of live time);
    counts, counts_stderr, counts_per_sec_stderr : the maps ``mapstorch map`` stores beside it
    (counts inside the fit window; NaN on channels that are not components), None in XRF-Maps'
    own files; live_time : ``[rows, cols]`` seconds (None: not recorded); parameters and
    parameters_stderr : ``{shape parameter: [rows, cols]}`` of the nonlinear method.
    """

    origin: str  # "run" or "file"
    path: str
    routine: str
    method: str
    names: tuple[str, ...]
    counts_per_sec: np.ndarray
    counts: np.ndarray | None = None
    counts_stderr: np.ndarray | None = None
    counts_per_sec_stderr: np.ndarray | None = None
    reduced_chi2: np.ndarray | None = None
    iterations: np.ndarray | None = None
    status: np.ndarray | None = None
    parameters: dict[str, np.ndarray] = field(default_factory=dict)
    parameters_stderr: dict[str, np.ndarray] = field(default_factory=dict)
    live_time: np.ndarray | None = None
    quantified: dict[str, np.ndarray] = field(default_factory=dict)  # normaliser -> ug/cm2 [channels, rows, cols]
    quantified_stderr: dict[str, np.ndarray] = field(default_factory=dict)
    setup: ModelSetup | None = None
    seconds: float | None = None
    written: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return int(self.counts_per_sec.shape[-2])

    @property
    def cols(self) -> int:
        return int(self.counts_per_sec.shape[-1])

    @property
    def elements(self) -> list[str]:
        """The fitted elements (and pile-ups): every component that is not scatter or a statistic."""
        return [n for n in self.names if _is_component(n) and n not in SCATTER]

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise InputError(f"no map of {name!r}; the maps are {', '.join(self.names)}") from None

    def facts(self) -> list[tuple[str, str]]:
        """``(label, value)`` rows for a summary table."""
        rows = [("maps", f"{self.routine} ({self.method})" if self.method != self.routine.lower() else self.routine),
                ("from", ("fitted now: " if self.origin == "run" else "read from ") + self.path),
                ("pixels", f"{self.rows} x {self.cols}"),
                ("channels", ", ".join(self.names))]
        if self.seconds is not None:
            rows.append(("time", f"{self.seconds:.2f} s"))
        if self.status is not None:
            from mapstorch.maps import STATUS_CODES

            rows.append(("status", ", ".join(f"{int((self.status == c).sum())} {s}" for c, s in STATUS_CODES.items())))
        if self.reduced_chi2 is not None and np.isfinite(self.reduced_chi2).any():
            chi = self.reduced_chi2
            rows.append(("reduced chi-square", f"median {float(np.nanmedian(chi)):.3g}, max {float(np.nanmax(chi)):.3g}"))
        if self.parameters:
            rows.append(("parameter maps", ", ".join(self.parameters)))
        rows.append(("pixel spectra", "available" if self.setup is not None and self.setup.spectra_path
                     else (self.setup.reason if self.setup is not None else "not available")))
        rows += [("wrote", w) for w in self.written]
        return rows


def _is_component(name: str) -> bool:
    from mapstorch.physics.elements import parse_component

    if name in SCATTER:
        return True
    try:
        parse_component(name)
    except Exception:  # noqa: BLE001 -- XRF-Maps statistics channels (Num_Iter, Fit_Residual, ...)
        return False
    return True


def routine_method(routine: str) -> str:
    """Our map method of a ``/MAPS/XRF_Analyzed`` routine (``NNLS`` -> ``nnls``, ``Poisson`` ->
    ``poisson``, ``Fitted`` -> ``nonlinear``); other routines (ROI, SVD, ...) keep their name."""
    return _ROUTINE_METHODS.get(routine, routine.lower())


def _chunk_rows(cols: int) -> int:
    """Rows per chunk of ``fit_map`` on the CPU (the Poisson background shape is the SNIP of a
    chunk's summed spectrum, so rebuilding it needs the same rows)."""
    from mapstorch.maps.fit import default_chunk_rows

    return default_chunk_rows(cols, "poisson")


def _model_parameters(components: Sequence[str], override=None, stored: Mapping[str, float] | None = None,
                      calibration=None):
    """(ParameterSet, LineTable) as ``fit_map`` builds them (the same function), then updated
    with the ``stored`` MAPS values; the data file's ``calibration`` when neither gives one."""
    import warnings

    from mapstorch.fit.spectrum import _parameter_set

    with warnings.catch_warnings():  # bounds widened to hold a value: harmless, nothing is fitted here
        warnings.simplefilter("ignore")
        ps, table, _ = _parameter_set(list(components), override, "2", None, calibration)
        if stored:
            ps = ps.with_maps_values(dict(stored))
    return ps, table


def _override_for(found, detector: int | str):
    """The override file ``fit_map`` is given, as ``mapstorch map`` picks it: for one detector
    element N, ``maps_fit_parameters_override.txt<N>`` when it exists (as XRF-Maps reads it)."""
    from mapstorch.io import read_override

    if not found:
        return None, None
    if detector != "sum":
        per = Path(f"{found}{int(detector)}")
        if per.is_file():
            return read_override(per), str(per)
    return read_override(found), str(found)


def _maps_from_results(origin: str, path: str, routine: str, res: Mapping[str, object],
                       live_time: np.ndarray | None = None) -> Maps:
    """:class:`Maps` of one routine's results (``{"channel_names", "counts_per_sec", "extra"}``,
    as :func:`~mapstorch.io.read_xrfmaps_results` returns them and ``MapResult.xrfmaps_results``
    makes them)."""
    names = tuple(str(n) for n in res["channel_names"])  # type: ignore[union-attr]
    cps = np.asarray(res["counts_per_sec"], dtype=np.float64)
    if cps.ndim != 3 or cps.shape[0] != len(names):
        raise InputError(f"{path}: {routine} has {len(names)} channel names for Counts_Per_Sec of shape {cps.shape}")
    extra = {k: np.asarray(v) for k, v in dict(res.get("extra") or {}).items()}  # type: ignore[call-overload]

    def get(key: str, ndim: int) -> np.ndarray | None:
        v = extra.get(key)
        if v is None or v.ndim != ndim or v.shape[-2:] != cps.shape[-2:] or (ndim == 3 and v.shape[0] != len(names)):
            return None
        return v  # as stored (float32): a large map is not copied

    params = {k[len("Parameter_"):]: v for k, v in extra.items()
              if k.startswith("Parameter_") and not k.endswith("_Stderr") and v.ndim == 2}
    params_err = {k[len("Parameter_"):-len("_Stderr")]: v for k, v in extra.items()
                  if k.startswith("Parameter_") and k.endswith("_Stderr") and v.ndim == 2}
    status = get("Status", 2)
    iterations = get("Iterations", 2)
    quant = {k[len("Quantified_"):]: get(k, 3) for k in extra if k.startswith("Quantified_") and not k.endswith("_Stderr")}
    quant = {k: v for k, v in quant.items() if v is not None}
    quant_err = {k: get(f"Quantified_{k}_Stderr", 3) for k in quant}
    return Maps(origin=origin, path=path, routine=routine, method=routine_method(routine), names=names,
                counts_per_sec=cps, counts=get("Counts", 3), counts_stderr=get("Counts_Stderr", 3),
                counts_per_sec_stderr=get("Counts_Per_Sec_Stderr", 3), reduced_chi2=get("Reduced_Chi2", 2),
                iterations=None if iterations is None else np.nan_to_num(iterations).astype(np.int64),
                status=None if status is None else np.nan_to_num(status, nan=2).astype(np.int8),
                parameters=params, parameters_stderr=params_err,
                live_time=None if live_time is None else np.asarray(live_time, dtype=np.float64),
                quantified=quant, quantified_stderr={k: v for k, v in quant_err.items() if v is not None})


def run_maps(path, method: str = "nnls", detector: int | str = "sum", elements: str | Sequence[str] | None = None,
             out=None, progress: Callable[[int, int], None] | None = None) -> Maps:
    """Fit every pixel of the scan ``path`` with :func:`~mapstorch.maps.fit_map`, as ``mapstorch
    map`` does: the override file beside the data gives the shape parameters and, unless
    ``elements`` are given, the elements (``maps_fit_parameters_override.txt<N>`` for detector N
    when it exists).

    out : also write the maps (with the spectra) into this ``.h5`` in the XRF-Maps layout, as
    ``mapstorch map FILE --out OUT`` writes them (:func:`~mapstorch.io.write_xrfmaps_h5` with
    ``MapResult.xrfmaps_results()``). progress : ``progress(pixels_done, pixels_total)``. The
    maps shown are those results, so the page shows what the file holds.
    """
    from mapstorch.io import open_dataset, override_beside, read_override, write_xrfmaps_h5
    from mapstorch.io.atomic import check_target
    from mapstorch.maps import fit_map

    path = _checked_path(path)
    if detector != "sum":
        try:
            detector = int(detector)
        except (TypeError, ValueError):
            raise InputError(f"detector must be 'sum' or a detector index, got {detector!r}") from None
    found = override_beside(path)
    wanted = parse_elements(elements)
    ovr, used = _override_for(found, detector)
    if ovr is None and not wanted:
        raise InputError("mapping needs shape parameters and elements: put a maps_fit_parameters_override.txt "
                         "beside the data (or in its parent folder), or type the elements to fit")
    target = None
    if out is not None and str(out).strip():
        target = check_target(str(out).strip(), "output file")
        if target.resolve() == Path(path).resolve():
            raise InputError(f"{target}: that is the scan itself; give another name for the output file")
    base = read_override(found) if found else None
    with open_dataset(path, override=base) as ds:
        result = fit_map(ds, ovr, wanted or None, method=method, detector=detector, progress=progress)
        results = result.xrfmaps_results()
        written = []
        if target is not None:
            # as `mapstorch map`: one detector's maps go with that detector's spectra and override
            source = ds if detector == "sum" else ds.select([int(detector)])
            written = [str(p) for p in write_xrfmaps_h5(target, source, override=ovr if detector != "sum" else base,
                                                        results=results)]
        dets = list(range(ds.detectors)) if detector == "sum" else [int(detector)]
        comps = [n for n in result.names if n not in SCATTER]
        ps, table = _model_parameters(comps, ovr, calibration=ds.calibration[dets[0]])
        live = getattr(result, "live_time", None)
        if live is None and ds.live_time is not None:
            live = ds.live_time[..., dets].sum(-1)
        chunk = _chunk_rows(ds.cols)
    routine = result.routine_name()
    maps = _maps_from_results("run", path, routine, results[routine], live)
    maps.setup = ModelSetup(ps, table, result.method, detector, path, base, chunk)
    maps.seconds, maps.written = result.seconds, written
    maps.notes = ([f"override file for detector {detector}: {used}"] if used and used != str(found) else []) + list(
        result.notes)
    return maps


def _stored_parameters(path: str) -> dict[str, float]:
    """``{MAPS name: value, NAME_MIN, NAME_MAX}`` of a results file's
    ``/MAPS/Fit_Parameters_Override`` (the parameters its maps were written with), or ``{}``."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            names = f["MAPS/Fit_Parameters_Override/Fit_Parameters_Names"][()]
            values = np.asarray(f["MAPS/Fit_Parameters_Override/Fit_Parameters_Values"][()], dtype=np.float64)
    except Exception:  # noqa: BLE001 -- no such group (or unreadable): nothing stored
        return {}
    out: dict[str, float] = {}
    for i, raw in enumerate(np.ravel(names)):
        name = (raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)).rstrip("\x00").strip()
        row = np.ravel(values[i]) if i < len(values) else np.array([])
        if name and row.size and np.isfinite(row[0]):
            out[name] = float(row[0])
            if row.size >= 3 and np.isfinite(row[1]) and np.isfinite(row[2]) and row[1] <= row[2]:
                out[f"{name}_MIN"], out[f"{name}_MAX"] = float(row[1]), float(row[2])
    return out


def read_maps(source: Source, routine: str | None = None) -> Maps:
    """The maps of ``routine`` (default: the first) in the results file ``source``.

    The pixel model is rebuilt from the file's spectra (``/MAPS/Spectra/mca_arr``), the override
    file beside it (line adjustments, detector) and the parameters stored with the maps
    (``/MAPS/Fit_Parameters_Override``).
    """
    from mapstorch.io import open_dataset

    if not source.results:
        raise InputError(f"{source.path} holds no maps (/MAPS/XRF_Analyzed): run a map fit on it instead")
    routine = routine or source.routines[0]
    if routine not in source.results:
        raise InputError(f"{source.path} has no {routine!r} maps; it has {', '.join(source.routines)}")
    maps = _maps_from_results("file", source.path, routine, source.results[routine])
    method = maps.method
    if not source.has_spectra:
        maps.setup = ModelSetup(None, None, method, "sum", None, reason="the file holds no spectra to show")
        return maps
    notes = maps.notes
    with open_dataset(source.path, override=source.override) as ds:
        calibration = ds.calibration[0]
        if ds.live_time is not None:
            maps.live_time = ds.live_time.sum(-1)
        if ds.detectors > 1:
            notes.append("the file has several detector elements; the pixel spectra are their sum")
    if maps.counts is None:
        notes.append("the file stores counts/s only (no counts, no standard errors): the pixel model uses "
                     "counts/s x live time as the amplitudes")
    stored = _stored_parameters(source.path)
    if source.override is None and not stored:
        maps.setup = ModelSetup(None, None, method, "sum", None, reason="no override file beside the results file and "
                                "no parameters stored in it: the pixel model cannot be rebuilt")
        return maps
    if source.override is None:
        notes.append("pixel model: the parameters stored in the file (/MAPS/Fit_Parameters_Override); no override "
                     "file beside it, so its line adjustments (branching ratios, widths) are not applied")
    if method == "poisson":
        notes.append(f"pixel model: the background shape of a chunk of {_chunk_rows(source.cols)} rows, as "
                     "`mapstorch map` fits without --chunk-rows")
    if routine not in _ROUTINE_METHODS:
        notes.append(f"{routine} is not a model fit: the pixel model shown is D a + SNIP with its counts/s")
    comps = [n for n in maps.names if _is_component(n) and n not in SCATTER]
    ps, table = _model_parameters(comps, source.override, stored, calibration)
    maps.setup = ModelSetup(ps, table, method, "sum", source.path, source.override, _chunk_rows(source.cols))
    return maps


# ----------------------------------------------------------------------------- images for the page
def _log10(image: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(image > 0, np.log10(np.where(image > 0, image, 1.0)), np.nan)


def quantities(maps: Maps) -> list[str]:
    """What the maps can show: ``counts/s``, ``counts`` and, for a quantified file (``mapstorch
    quantify``), ``ug/cm2 (<normaliser>)``."""
    out = ["counts/s"] + (["counts"] if maps.counts is not None else [])
    return out + [f"ug/cm2 ({n})" for n in maps.quantified]


def _quantity_data(maps: Maps, quantity: str, stderr: bool = False):
    if quantity.startswith("ug/cm2 (") and quantity.endswith(")"):
        norm = quantity[len("ug/cm2 ("):-1]
        table = maps.quantified_stderr if stderr else maps.quantified
        return table.get(norm), "ug/cm2"
    if quantity not in QUANTITIES:
        raise InputError(f"quantity must be one of {', '.join(QUANTITIES)} or ug/cm2 (<normaliser>), got {quantity!r}")
    if quantity == "counts":
        return (maps.counts_stderr if stderr else maps.counts), QUANTITIES[quantity]
    return (maps.counts_per_sec_stderr if stderr else maps.counts_per_sec), QUANTITIES[quantity]


def element_maps(maps: Maps, names: Sequence[str], quantity: str = "counts/s", log: bool = False
                 ) -> tuple[dict[str, np.ndarray], str]:
    """``({name: image [rows, cols]}, unit)`` of the components ``names`` in ``quantity`` (one of
    :func:`quantities`), log10 of the values when ``log`` (non-positive values blank)."""
    data, unit = _quantity_data(maps, quantity)
    if data is None:
        raise InputError(f"these maps have no {quantity}")
    out = {n: np.asarray(data[maps.index(n)], dtype=np.float64) for n in names}
    if log:
        out = {n: _log10(v) for n, v in out.items()}
        unit = f"log10 {unit}"
    return out, unit


def uncertainty_maps(maps: Maps, names: Sequence[str], kind: str = "standard error", quantity: str = "counts/s"
                     ) -> tuple[dict[str, np.ndarray], str]:
    """``({name: image}, unit)``: the standard error of each map (in ``quantity``), or the
    relative standard error (stderr / value; blank where the value is not positive)."""
    if kind not in UNCERTAINTIES:
        raise InputError(f"uncertainty must be one of {', '.join(UNCERTAINTIES)}, got {kind!r}")
    value, unit = _quantity_data(maps, quantity)
    err, _ = _quantity_data(maps, quantity, stderr=True)
    if err is None or value is None:
        raise InputError("these maps have no standard errors (XRF-Maps' own files store none)")
    out = {}
    for n in names:
        i = maps.index(n)
        e = np.asarray(err[i], dtype=np.float64)
        if kind == "relative standard error":
            v = np.asarray(value[i], dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                e = np.where(v > 0, e / np.where(v > 0, v, 1.0), np.nan)
        out[n] = e
    return out, ("" if kind == "relative standard error" else unit)


def quality_maps(maps: Maps) -> dict[str, np.ndarray]:
    """Fit-quality maps present in ``maps``: reduced chi-square, status (0 converged, 1
    max-iterations, 2 non-finite), iterations, then each parameter map and its standard error."""
    out: dict[str, np.ndarray] = {}
    if maps.reduced_chi2 is not None:
        out["reduced chi-square"] = np.asarray(maps.reduced_chi2, dtype=np.float64)
    if maps.status is not None:
        out["status"] = np.asarray(maps.status, dtype=np.float64)
    if maps.iterations is not None:
        out["iterations"] = np.asarray(maps.iterations, dtype=np.float64)
    for n, v in maps.parameters.items():
        out[n] = np.asarray(v, dtype=np.float64)
        if n in maps.parameters_stderr:
            out[f"{n} stderr"] = np.asarray(maps.parameters_stderr[n], dtype=np.float64)
    return out


def clicked_pixel(points, rows: int, cols: int) -> tuple[int, int] | None:
    """``(row, col)`` of a click on a map (the value of ``mo.ui.plotly`` of a heatmap: a list of
    points ``{"x": col, "y": row, "z", "curveNumber", "pointNumber": [row, col]}``), or None."""
    for p in points or []:
        if not isinstance(p, Mapping):
            continue
        x, y = p.get("x"), p.get("y")
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            r, c = round(float(y)), round(float(x))
        elif isinstance(p.get("pointNumber"), (list, tuple)) and len(p["pointNumber"]) == 2:
            r, c = (int(v) for v in p["pointNumber"])
        else:
            continue
        if 0 <= r < rows and 0 <= c < cols:
            return r, c
    return None


# ----------------------------------------------------------------------------- one pixel's fit
@dataclass
class PixelFit:
    """One pixel's spectrum over the fit window with its model.

    energy, data : ``[C]`` keV and counts; components : ``{name: [C]}`` with ``Background`` and
    ``Total`` (for :func:`~mapstorch.apps.figures.fit_figure`); amplitudes : of each component
    (the model's main line has relative intensity 1); reduced_chi2 : Pearson chi-square
    per degree of freedom, as the map fit computes it; map_reduced_chi2 : what the map holds there.
    """

    row: int
    col: int
    energy: np.ndarray
    data: np.ndarray
    components: dict[str, np.ndarray]
    amplitudes: dict[str, float]
    reduced_chi2: float
    dof: int
    map_reduced_chi2: float | None

    def title(self) -> str:
        text = f"pixel ({self.row}, {self.col}): reduced chi-square {self.reduced_chi2:.3g}"
        if self.map_reduced_chi2 is not None and np.isfinite(self.map_reduced_chi2):
            text += f" (map: {self.map_reduced_chi2:.3g})"
        return text


def _amplitudes(maps: Maps, idx: Sequence[int], row: int, col: int, unit: np.ndarray) -> np.ndarray:
    """The model amplitudes ``[K + 2]`` of the channels ``idx`` at one pixel: ``counts / unit``
    where the counts inside the window are stored (``unit``: counts per unit amplitude, escape
    not counted), else ``Counts_Per_Sec x live time`` (XRF-Maps' counts/s are amplitudes per second)."""
    idx = list(idx)
    if maps.counts is not None and np.all(np.isfinite(maps.counts[idx, row, col])):
        counts = np.asarray(maps.counts[idx, row, col], dtype=np.float64)
        return np.where(unit > 0, counts / np.where(unit > 0, unit, 1.0), 0.0)
    live = 1.0 if maps.live_time is None else float(maps.live_time[row, col])
    return np.nan_to_num(np.asarray(maps.counts_per_sec[idx, row, col], dtype=np.float64) * live)


def pixel_fit(maps: Maps, row: int, col: int) -> PixelFit:
    """The spectrum of pixel ``(row, col)`` and its model, rebuilt from the fitted counts.

    The model is what the map fit found, not a new fit: the design matrix ``D`` of
    :class:`~mapstorch.physics.model.SpectrumModel` over the fit window, with the same shape
    parameters (the pixel's own parameter-map values for the nonlinear method), times the
    amplitudes ``counts / D.sum(0)`` (``mapstorch map`` stores the counts inside the window,
    ``amplitude x D.sum(0)``; for XRF-Maps' own files ``Counts_Per_Sec x live time``), plus the background of the method: the pixel's own SNIP (``nnls``,
    ``nonlinear``), or for ``poisson`` the SNIP of the summed spectrum of the pixel's chunk of rows
    scaled so that model and data hold the same counts (which the Poisson maximum-likelihood
    solution satisfies). Refitting the pixel with ``fit_spectrum`` would give another answer.
    """
    import torch

    from mapstorch.io import open_dataset
    from mapstorch.maps.solvers import pearson_chi2
    from mapstorch.physics.model import SpectrumModel, fit_window
    from mapstorch.physics.snip import snip_window

    setup = maps.setup
    if setup is None or setup.spectra_path is None:
        raise InputError("no pixel spectra: " + (setup.reason if setup is not None and setup.reason
                                                 else "the spectra of these maps are not available"))
    row, col = int(row), int(col)
    if not (0 <= row < maps.rows and 0 <= col < maps.cols):
        raise InputError(f"pixel ({row}, {col}) is outside the {maps.rows} x {maps.cols} map")
    poisson = setup.method == "poisson"
    first_row = (row // setup.chunk_rows) * setup.chunk_rows if poisson else row
    last_row = min(first_row + setup.chunk_rows, maps.rows) if poisson else row + 1
    with open_dataset(setup.spectra_path, override=setup.override) as ds:
        if (ds.rows, ds.cols) != (maps.rows, maps.cols):
            raise InputError(f"{setup.spectra_path} holds {ds.rows} x {ds.cols} spectra, the maps are "
                             f"{maps.rows} x {maps.cols}")
        dets = list(range(ds.detectors)) if setup.detector == "sum" else [int(setup.detector)]
        block = ds.read(slice(first_row, last_row), dets).sum(2, dtype=np.float64)  # [rows, cols, C]
        channels = ds.channels
    ps = setup.params
    theta = ps.shape_values().to(torch.float64).clone()
    free = []
    for name, image in maps.parameters.items():
        i = ps.index(name)
        theta[i] = float(image[row, col])
        free.append(i)
    window = fit_window(channels, ps)
    model = SpectrumModel(setup.table, window, dtype=torch.float64)
    lookup = {SCATTER.get(n, n): i for i, n in enumerate(maps.names) if _is_component(n)}
    missing = [c for c in model.column_names if c not in lookup]
    if missing:
        raise InputError(f"the maps have no {', '.join(missing)}: the pixel model cannot be rebuilt")
    comp_idx = [lookup[c] for c in model.column_names]
    off, slope, quad, width = (float(ps[n]) for n in ("ENERGY_OFFSET", "ENERGY_SLOPE", "ENERGY_QUADRATIC",
                                                          "SNIP_WIDTH"))
    y = torch.from_numpy(block[row - first_row, col])
    yw = y[window.slice()]
    with torch.no_grad():
        # as fit_map: no escape peaks in the nnls design; counts per unit amplitude never count them
        design = model.design_matrix(theta, with_escape=setup.method != "nnls")  # [C, K + 2]
        unit = model.counts(theta, torch.ones(design.shape[1], dtype=torch.float64))
        amps = torch.from_numpy(_amplitudes(maps, comp_idx, row, col, unit.numpy()))
        if poisson:
            summed = torch.from_numpy(block.sum((0, 1)))[None]
            shape = snip_window(summed, off, slope, quad, width, (window.first, window.last))[0]
            shape = shape / shape.sum().clamp(min=1e-300)
            bg = (yw.sum() - (design @ amps).sum()).clamp(min=0.0) * shape
        else:
            bg = snip_window(y[None], off, slope, quad, width, (window.first, window.last))[0]
        parts = model.components(theta, amps, background=bg)
        dof = max(int(window.size - int((amps > 0).sum()) - len(free)), 1)
        chi = float(pearson_chi2(yw, parts["Total"])) / dof
        energy = model.energies(theta).numpy()
    map_chi = None if maps.reduced_chi2 is None else float(maps.reduced_chi2[row, col])
    return PixelFit(row=row, col=col, energy=energy, data=yw.numpy(),
                    components={k: v.numpy() for k, v in parts.items()},
                    amplitudes={maps.names[i]: float(a) for i, a in zip(comp_idx, amps.tolist())}, reduced_chi2=chi, dof=dof,
                    map_reduced_chi2=map_chi)


def pixel_table(maps: Maps, row: int, col: int) -> list[dict[str, str]]:
    """Rows ``{"channel", "counts/s", "stderr (counts/s)", "counts", "stderr (counts)"}`` of one
    pixel, for a table (blank where a value does not apply)."""
    out = []
    def cell(arr: np.ndarray | None, i: int, fmt: str) -> str:
        if arr is None or not np.isfinite(arr[i, row, col]):
            return ""
        return format(float(arr[i, row, col]), fmt)

    for i, n in enumerate(maps.names):
        out.append({"channel": n, "counts/s": cell(maps.counts_per_sec, i, ".5g"),
                    "stderr (counts/s)": cell(maps.counts_per_sec_stderr, i, ".3g"),
                    "counts": cell(maps.counts, i, ".5g"), "stderr (counts)": cell(maps.counts_stderr, i, ".3g")})
    return out

