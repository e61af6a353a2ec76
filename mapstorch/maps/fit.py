"""``fit_map``: elemental maps of every pixel, batched and streamed by rows, resumable.

The shape parameters are fixed (from an override file, a spectrum fit or a ParameterSet), so
every pixel shares the design matrix ``D [C, K + 2]`` over the fit window. Rows are read in
chunks; for each chunk the per-pixel SNIP background is computed as tensor operations and the
amplitudes of all its pixels are solved together (:mod:`mapstorch.maps.solvers`):

* ``nnls``: non-negative least squares of ``max(S - SNIP, 0)``, as XRF-Maps' NNLS routine;
* ``poisson``: non-negative Poisson maximum likelihood with the background in the model: the
  SNIP background of the chunk's summed spectrum (smooth even where a pixel has a few counts)
  with a fitted amplitude per pixel; started from the NNLS solution. Better for low-count
  pixels, where a per-pixel SNIP of the noisy spectrum is poor.

Per pixel: counts inside the fit window per component (``Elastic``, ``Compton`` included),
their standard errors (Fisher information at the solution), counts per second (divided by the
live time), reduced chi-square, iterations and a status code (0 converged, 1 max-iterations,
2 non-finite).

With ``work_dir`` every finished chunk is stored there (``chunk_<first>_<last>.npz``, written
atomically, with the settings and the input file's identity in ``settings.json``); a rerun with
the same settings skips the chunks already there, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mapstorch.errors import InputError
from mapstorch.io.dataset import Dataset, calibration_spread
from mapstorch.maps import solvers
from mapstorch.maps.expansion import DesignExpansion, refit
from mapstorch.maps.roi import roi_windows
from mapstorch.physics.model import SpectrumModel, fit_window
from mapstorch.physics.snip import snip_window

__all__ = ["fit_map", "MapResult", "METHODS", "STATUS_CODES", "DEFAULT_PARAMETER_MAPS", "default_chunk_rows"]

METHODS = ("nnls", "poisson", "nonlinear")
#: Shape parameters the nonlinear method refits per pixel unless told otherwise.
DEFAULT_PARAMETER_MAPS = ("ENERGY_OFFSET", "ENERGY_SLOPE", "FWHM_OFFSET")
STATUS_CODES = {0: "converged", 1: "max-iterations", 2: "non-finite"}

#: ``progress(pixels_done, pixels_total)``
Progress = Callable[[int, int], None]

log = logging.getLogger(__name__)


def default_chunk_rows(cols: int, method: str = "nnls", device: str | torch.device = "cpu") -> int:
    """Rows per chunk when none are given: about 16384 pixels for ``nnls``, 8192 for ``poisson``
    and 4096 for ``nonlinear`` on the CPU; 131072 (``nonlinear``: 65536) on a GPU. The Poisson
    method's background shape is per chunk, so whoever rebuilds a pixel's model needs the same
    rows. (The nnls fit's fixed costs per chunk, the threads' last groups and the block's
    unmapping, cost about 3 % more at 8192 pixels.)"""
    if torch.device(device).type == "cuda":
        per_chunk = (4096 if method == "nonlinear" else 8192) * 16
    else:
        per_chunk = {"nnls": 16384, "nonlinear": 4096}.get(method, 8192)
    return max(1, per_chunk // max(cols, 1))


@dataclass
class MapResult:
    """Maps of one fit: arrays ``[components, rows, cols]`` or ``[rows, cols]``.

    names : components (elements, pile-ups, then ``Elastic``, ``Compton``).
    amplitudes, amplitudes_stderr : the fitted amplitude of each component's model spectrum,
        whose main line (Ka1, La1, Ma1) has relative intensity 1 -- what XRF-Maps stores.
    counts_per_sec : amplitudes / live time, XRF-Maps' ``Counts_Per_Sec`` (for the sum of the
        detectors: divided by the sum of their live times, so it is on one detector's scale).
    counts, counts_stderr : all counts of each component inside the fit window (every line, the
        definition of our spectrum fits); ``counts / amplitudes`` is a constant per component.
    reduced_chi2, iterations, status : per pixel (status codes in :data:`STATUS_CODES`).
    total_counts : counts of each pixel's whole spectrum.
    fitted_integrated, background_integrated : model (with background) and background summed
        over all pixels, ``[window channels]`` (window = ``window``, first and last channel),
        leaving out the pixels whose fit is not finite (status 2).
    """

    method: str
    names: tuple[str, ...]
    counts: np.ndarray
    counts_stderr: np.ndarray
    counts_per_sec: np.ndarray
    reduced_chi2: np.ndarray
    iterations: np.ndarray
    status: np.ndarray
    detector: str
    seconds: float
    pixels_per_second: float
    chunks_reused: int = 0
    notes: list[str] = field(default_factory=list)
    parameter_names: tuple[str, ...] = ()
    parameters: np.ndarray | None = None  # [n, rows, cols] (nonlinear method)
    parameters_stderr: np.ndarray | None = None
    amplitudes: np.ndarray | None = None
    amplitudes_stderr: np.ndarray | None = None
    total_counts: np.ndarray | None = None
    live_time: np.ndarray | None = None
    window: tuple[int, int] = (0, 0)
    channels: int = 0
    fitted_integrated: np.ndarray | None = None
    background_integrated: np.ndarray | None = None
    #: XRF-Maps' ROI maps: each component's raw counts in a window around its main line
    #: (:mod:`mapstorch.maps.roi`), ``[len(roi_names), rows, cols]``
    roi_names: tuple[str, ...] = ()
    roi_counts: np.ndarray | None = None
    #: XRF-Maps' results of an average of detector elements (:func:`~mapstorch.maps.average.average_maps`),
    #: averaged channel by channel as XRF-Maps does; None for a fit
    xrfmaps: dict | None = field(default=None, repr=False)

    def element(self, name: str) -> np.ndarray:
        return self.counts[self.names.index(name)]

    def routine_name(self) -> str:
        """The ``/MAPS/XRF_Analyzed`` group: XRF-Maps' ``NNLS`` for nnls, ``Poisson`` for ours."""
        return {"nnls": "NNLS", "poisson": "Poisson", "nonlinear": "Fitted"}[self.method]

    def xrfmaps_results(self) -> dict[str, dict[str, object]]:
        """``results`` for :func:`~mapstorch.io.hdf5.write_xrfmaps_h5`, as XRF-Maps writes them.

        ``Channel_Names``: the elements (K families by atomic number, then L, then M, then
        pile-ups), ``Sum_Elastic_Inelastic``, ``Total_Fluorescence_Yield``, ``Fit_Residual``,
        ``COHERENT_SCT_AMPLITUDE``, ``Num_Iter``, ``COMPTON_AMPLITUDE``; ``Counts_Per_Sec`` holds
        amplitude / live time for the components, the elastic + Compton sum and the spectrum's
        total counts per second, our reduced chi-square as ``Fit_Residual`` and the iterations
        as ``Num_Iter``. ``Fitted_Integrated_Spectra`` / ``FIT_Integrated_Background``: the model
        and background summed over the pixels (zero outside the fit window). Maps of our own
        beside them, on the same channel axis (NaN where they do not apply): ``Counts`` (every
        count of a component inside the window), ``Counts_Stderr``, ``Counts_Per_Sec_Stderr``;
        and ``Reduced_Chi2``, ``Iterations``, ``Status``, ``Parameter_<NAME>[_Stderr]``. Also
        XRF-Maps' ``ROI`` group (:mod:`mapstorch.maps.roi`). For an average of detector elements:
        the elements' own, averaged as XRF-Maps averages them.
        """
        if self.xrfmaps is not None:
            return self.xrfmaps
        from mapstorch.physics.elements import parse_component

        idx = {n: i for i, n in enumerate(self.names)}
        comps = [n for n in self.names if n not in ("Elastic", "Compton")]

        def order(name: str) -> tuple:
            c = parse_component(name)
            return (3 if c.is_pileup else "KLM".index(c.shell), c.z, name)

        comps.sort(key=order)
        shape = self.counts.shape[1:]
        nan = np.full(shape, np.nan, np.float32)
        live = self.live_time if self.live_time is not None else np.ones(shape, np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            per_sec = np.where(live > 0, 1.0 / live, np.nan).astype(np.float32)
        amps = self.amplitudes if self.amplitudes is not None else self.counts
        amps_err = self.amplitudes_stderr if self.amplitudes_stderr is not None else self.counts_stderr

        def comp(name: str, source: np.ndarray) -> np.ndarray:
            return source[idx[name]]

        scatter = [n for n in ("Elastic", "Compton") if n in idx]
        el_co = sum(comp(n, amps) for n in scatter) if scatter else np.zeros(shape, np.float32)
        total = self.total_counts if self.total_counts is not None else nan
        channels = [(n, comp(n, self.counts_per_sec), n, "cts/s") for n in comps] + [
            ("Sum_Elastic_Inelastic", el_co * per_sec, None, "cts/s"),
            ("Total_Fluorescence_Yield", total * per_sec, None, "cts/s"),
            ("Fit_Residual", self.reduced_chi2, None, ""),
            ("COHERENT_SCT_AMPLITUDE", comp("Elastic", self.counts_per_sec) if "Elastic" in idx else nan, "Elastic",
             "cts/s"),
            ("Num_Iter", self.iterations.astype(np.float32), None, ""),
            ("COMPTON_AMPLITUDE", comp("Compton", self.counts_per_sec) if "Compton" in idx else nan, "Compton",
             "cts/s"),
        ]

        def aligned(source: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
            return np.stack([nan if c is None else source[idx[c]] * (1 if scale is None else scale)
                             for _, _, c, _ in channels]).astype(np.float32)

        def full(window_values: np.ndarray | None) -> np.ndarray:
            out = np.zeros(max(self.channels, self.window[1] + 1), np.float32)
            if window_values is not None:
                out[self.window[0]:self.window[1] + 1] = window_values
            return out

        extra = {
            "Counts": aligned(self.counts),
            "Counts_Stderr": aligned(self.counts_stderr),
            "Counts_Per_Sec_Stderr": aligned(amps_err, per_sec),
            "Reduced_Chi2": self.reduced_chi2,
            "Iterations": self.iterations.astype(np.float32),
            "Status": self.status.astype(np.float32),
        }
        if self.parameters is not None:
            extra.update({f"Parameter_{n}": self.parameters[i] for i, n in enumerate(self.parameter_names)})
            extra.update({f"Parameter_{n}_Stderr": self.parameters_stderr[i]
                          for i, n in enumerate(self.parameter_names)})
        out = {self.routine_name(): {
            "channel_names": [c[0] for c in channels],
            "units": [c[3] for c in channels],
            "counts_per_sec": np.stack([c[1] for c in channels]).astype(np.float32),
            "Fitted_Integrated_Spectra": full(self.fitted_integrated),
            "FIT_Integrated_Background": full(self.background_integrated),
            "extra": extra,
        }}
        if self.roi_counts is not None and self.roi_names:
            # XRF-Maps' ROI group: the same channels, the windows' counts per second, the total
            # yield, zeros where a fit quantity has no ROI meaning (as XRF-Maps writes them)
            zero = np.zeros(shape, np.float32)
            roi_index = {n: i for i, n in enumerate(self.roi_names)}
            values = {n: self.roi_counts[roi_index[n]] * per_sec for n in comps if n in roi_index}
            values["Total_Fluorescence_Yield"] = total * per_sec
            out["ROI"] = {"channel_names": [c[0] for c in channels], "units": [c[3] for c in channels],
                          "counts_per_sec": np.stack([values.get(c[0], zero) for c in channels]).astype(np.float32),
                          "integrated": False}
        return out


def _settings_key(settings: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_identity(path: str) -> dict[str, object]:
    try:
        st = os.stat(path)
    except OSError:
        return {"path": str(path)}
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fit_map(
    dataset: Dataset,
    params=None,
    elements: Sequence[str] | str | None = None,
    *,
    method: str = "nnls",
    detector: int | str = "sum",
    chunk_rows: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    max_iter: int | None = None,
    parameter_maps: Sequence[str] | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    dask=None,
    progress: Progress | None = None,
    line_source=None,
) -> MapResult:
    """Fit every pixel of ``dataset`` with the shape parameters fixed (module docstring).

    params : an override file, a ParameterSet (e.g. a spectrum fit's ``result.params``) or
        ``{MAPS name: value}``; elements : components (default: the override file's).
    detector : ``"sum"`` (all detector elements added) or a detector index.
    chunk_rows : rows per chunk (default: about 16384 pixels for ``nnls``, 8192 for ``poisson``,
        4096 for ``nonlinear``; on a GPU about 131072 and 65536, enough to keep it busy).
    parameter_maps : shape parameters the ``nonlinear`` method refits per pixel (default
        :data:`DEFAULT_PARAMETER_MAPS`: energy offset and slope, detector width).
    line_source : the line library (default xraylib); ``mapstorch.physics.lines.xrfmaps_source(
        "xrf_library.csv", "henke.xdr")`` uses XRF-Maps' own tables, for its exact numbers.
    dask : a ``distributed.Client`` (or a scheduler address) to fit the chunks on: each task
        opens the input file itself and returns its chunk; this process stores and assembles
        them (the dataset must come from a file).
    """
    from mapstorch.fit.spectrum import _parameter_set

    t0 = time.perf_counter()
    method = str(method).lower()
    if method not in METHODS:
        raise InputError(f"unknown map method {method!r}; choose one of {', '.join(METHODS)}")
    if detector != "sum":
        try:
            detector = int(detector)
        except (TypeError, ValueError):
            raise InputError(f"detector must be 'sum' or a detector index, got {detector!r}") from None
        if not 0 <= detector < dataset.detectors:
            raise InputError(f"detector {detector}: {dataset.path} has detectors 0-{dataset.detectors - 1}")
    dets = list(range(dataset.detectors)) if detector == "sum" else [int(detector)]
    cal = dataset.calibration[dets[0]]
    ps, table, _ = _parameter_set(elements, params, "2", None, cal, source=line_source)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available on this machine")
    window = fit_window(dataset.channels, ps)
    model = SpectrumModel(table, window, dtype=dtype, device=device)
    theta = ps.shape_values().to(device=device, dtype=dtype)
    with torch.no_grad():
        # XRF-Maps' NNLS fit matrix has no escape peaks (it adds them to the displayed model
        # only); our Poisson and nonlinear methods model them
        design = model.design_matrix(theta, with_escape=method != "nnls")  # [Cw, K + 2]
        # counts inside the window per unit amplitude (every line, escape not counted)
        per_unit = model.counts(theta, torch.ones(design.shape[1], dtype=dtype, device=device))
    names = tuple(model.column_names)
    n_comp = len(names)
    off, slope, quad, width = (float(ps[n]) for n in ("ENERGY_OFFSET", "ENERGY_SLOPE", "ENERGY_QUADRATIC",
                                                          "SNIP_WIDTH"))
    rows, cols = dataset.rows, dataset.cols
    free_names: tuple[str, ...] = ()
    nl = None
    if method == "nonlinear":
        free_names = tuple(parameter_maps or DEFAULT_PARAMETER_MAPS)
        try:
            idx = [ps.index(n) for n in free_names]
        except Exception as exc:  # noqa: BLE001 -- an unknown name
            raise InputError(f"parameter maps: {exc}") from None
        # only shape parameters that change the model's spectrum can be mapped: amplitudes are
        # always refitted, the SNIP width and the energy range are fixed before the fit
        fixed = ("SNIP_WIDTH", "MIN_ENERGY_TO_FIT", "MAX_ENERGY_TO_FIT")
        bad = [n for n, i in zip(free_names, idx) if i >= theta.numel() or n in fixed]
        if bad:
            raise InputError(f"parameter maps: {', '.join(bad)} cannot be refitted per pixel (amplitudes are "
                             f"always fitted; {', '.join(fixed)} are set before the fit); choose shape "
                             f"parameters such as {', '.join(DEFAULT_PARAMETER_MAPS)}")
        if len(set(free_names)) != len(free_names):
            raise InputError(f"parameter maps: {', '.join(free_names)} names a parameter twice")
        lo = ps.lower[idx].to(device=device, dtype=dtype)
        hi = ps.upper[idx].to(device=device, dtype=dtype)
        nl = {"expansion": DesignExpansion(model, theta, torch.tensor(idx), lo, hi, with_escape=True, dtype=dtype,
                                           device=device)}
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(cols, method, device)
    if chunk_rows < 1:
        raise InputError(f"chunk_rows must be at least 1, got {chunk_rows}")
    live = None
    if dataset.live_time is not None:
        # the sum of the detectors is divided by the sum of their live times (XRF-Maps' fit of
        # summed spectra): counts/s on one detector's scale, comparable to each detector's map
        live = dataset.live_time[..., dets].sum(-1) if detector == "sum" else dataset.live_time[..., dets[0]]
    # XRF-Maps' ROI maps come with every method (raw counts in a window around each main line)
    roi_names = tuple(n for n in names if n not in ("Elastic", "Compton"))
    roi = tuple(roi_windows(table, roi_names, off, slope, dataset.channels, getattr(params, "width_multipliers", None)))
    settings = {"method": method, "detector": str(detector), "names": list(names), "window": [window.first, window.last],
                "roi": [list(w) for w in roi],
                "parameter_maps": list(free_names), "solver": "expansion" if method == "nonlinear" else method,
                "theta": [round(float(v), 12) for v in theta.double().tolist()], "dtype": str(dtype),
                "max_iter": max_iter, "input": _file_identity(dataset.path), "rows": rows, "cols": cols,
                "lines": table.source}
    store = _ChunkStore(work_dir, settings) if work_dir is not None else None

    n_par = len(free_names)
    pars = np.full((n_par, rows, cols), np.nan, np.float32)
    pars_err = np.full((n_par, rows, cols), np.nan, np.float32)
    counts = np.zeros((n_comp, rows, cols), np.float32)
    stderr = np.full((n_comp, rows, cols), np.nan, np.float32)
    amps = np.zeros((n_comp, rows, cols), np.float32)
    amps_err = np.full((n_comp, rows, cols), np.nan, np.float32)
    total = np.zeros((rows, cols), np.float32)
    roi_counts = np.zeros((len(roi), rows, cols), np.float32)
    integrated = {"integrated_fit": np.zeros(window.last - window.first + 1),
                  "integrated_background": np.zeros(window.last - window.first + 1)}
    rchi2 = np.full((rows, cols), np.nan, np.float32)
    iters = np.zeros((rows, cols), np.int32)
    status = np.zeros((rows, cols), np.int8)
    reused = 0
    fitted_pixels = 0

    def place(start: int, stop: int, part: Mapping[str, np.ndarray]) -> None:
        counts[:, start:stop] = part["counts"]
        stderr[:, start:stop] = part["stderr"]
        amps[:, start:stop] = part["amplitudes"]
        amps_err[:, start:stop] = part["amplitudes_stderr"]
        total[start:stop] = part["total_counts"]
        if roi:
            roi_counts[:, start:stop] = part["roi"]
        for key in integrated:
            integrated[key] += part[key]
        rchi2[start:stop] = part["rchi2"]
        iters[start:stop] = part["iterations"]
        status[start:stop] = part["status"]
        if n_par:
            pars[:, start:stop] = part["parameters"]
            pars_err[:, start:stop] = part["parameters_stderr"]

    spans = [(start, min(start + chunk_rows, rows)) for start in range(0, rows, chunk_rows)]
    todo = []
    done_pixels = 0
    for start, stop in spans:
        part = store.load(start, stop) if store is not None else None
        if part is None:
            todo.append((start, stop))
            continue
        reused += 1
        place(start, stop, part)
        done_pixels += (stop - start) * cols
    job = _Job(design, per_unit, (off, slope, quad, width), (window.first, window.last), method, max_iter, nl,
               dets, cols, dataset.channels, device, dtype, roi=roi)
    ts = time.perf_counter()
    if dask is None:
        results = _local(job, dataset, dets, todo)
    else:
        results = _distributed(dask, job, dataset, todo)
    for start, stop, part in results:
        if store is not None:
            store.save(start, stop, part)
        place(start, stop, part)
        fitted_pixels += (stop - start) * cols
        done_pixels += (stop - start) * cols
        if progress is not None:
            progress(done_pixels, rows * cols)
    t_fit = time.perf_counter() - ts
    if live is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            cps = np.where(live > 0, amps / live[None], np.nan).astype(np.float32)
    else:
        cps = amps.copy()
    notes = []
    spread = calibration_spread(dataset.calibration, dataset.channels) if detector == "sum" else 0.0
    if spread > 0.5:
        notes.append(f"the detector elements' calibrations differ by up to {spread:.1f} channels; the sum is fitted "
                     "with detector 0's (--detector each maps every element with its own)")
    if live is None:
        notes.append("the file records no live time: Counts_Per_Sec holds counts")
    if reused:
        notes.append(f"{reused} chunk(s) reused from {work_dir}")
    n_max, n_bad = int((status == 1).sum()), int((status == 2).sum())
    if n_max or n_bad:
        notes.append(f"{n_max + n_bad} pixel(s) did not converge: {n_max} stopped at the iteration limit, {n_bad} "
                     "non-finite (Status map codes 1 and 2)")
    seconds = time.perf_counter() - t0
    return MapResult(method, names, counts, stderr, cps, rchi2, iters, status, str(detector), seconds,
                     fitted_pixels / t_fit if t_fit > 0 else math.nan, reused, notes, free_names,
                     pars if n_par else None, pars_err if n_par else None, amps, amps_err, total,
                     None if live is None else live.astype(np.float32), (window.first, window.last),
                     dataset.channels, integrated["integrated_fit"].astype(np.float32),
                     integrated["integrated_background"].astype(np.float32), roi_names=roi_names,
                     roi_counts=roi_counts)


@dataclass
class _Job:
    """Everything a chunk fit needs besides the spectra (picklable, for Dask workers)."""

    design: torch.Tensor
    per_unit: torch.Tensor
    cal: tuple[float, float, float, float]
    window: tuple[int, int]
    method: str
    max_iter: int | None
    nl: dict | None
    dets: list[int]
    cols: int
    channels: int
    device: torch.device
    dtype: torch.dtype
    rows_that_fit: int | None = None  # set once the device ran out of memory on a whole chunk
    roi: tuple[tuple[int, int], ...] = ()  # XRF-Maps' ROI windows, (first, last) channel

    def run_in_parts(self, block: np.ndarray, n_rows: int) -> dict[str, np.ndarray]:
        """:meth:`run`, split into parts of rows where the device runs out of memory: the rows
        that fit are remembered, so that later chunks are split before they fail."""
        step = self.rows_that_fit or n_rows
        if step < n_rows:
            return _join_parts([self.run_in_parts(block[a:a + step], min(step, n_rows - a))
                                for a in range(0, n_rows, step)])
        try:
            return self.run(block, n_rows)
        except torch.cuda.OutOfMemoryError as exc:  # torch >= 2.5 raises it for the CPU too (one class)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # out of the except block: its traceback no longer holds the failed fit's tensors
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if n_rows < 2:
            raise InputError(f"{self.device} ran out of memory fitting one row of {block.shape[1]} pixels "
                             f"({reason}); free memory on it, or fit on the CPU (--device cpu)") from None
        self.rows_that_fit = half = n_rows // 2
        log.warning("%s ran out of memory on a chunk of %d rows: fitting %d rows at a time from now on "
                    "(--chunk-rows %d, or chunk_rows=%d, starts there)%s", self.device, n_rows, half, half, half,
                    "; the poisson method's background shape then comes from each part" if self.method == "poisson"
                    else "")
        return self.run_in_parts(block, n_rows)

    def run(self, block: np.ndarray, n_rows: int) -> dict[str, np.ndarray]:
        """Fit one block of spectra ``[rows, cols, detectors, C]``; arrays shaped by rows and cols."""
        from mapstorch.physics.model import FitWindow

        block = block[:, :, 0] if block.shape[2] == 1 else block.sum(2)  # one detector: no copy
        flat = block.reshape(-1, self.channels)  # a view where rows and columns are adjacent in memory
        if not (flat.flags.c_contiguous or flat.T.flags.c_contiguous):
            flat = np.ascontiguousarray(flat)
        # channel-major blocks (XRF-Maps and raw fly-scan files store [C, rows, cols]) stay so: the
        # SNIP reads them in place; a transposing copy cost more than the whole fit
        with warnings.catch_warnings():  # a memory-mapped block is read-only; nothing here writes into it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            y = torch.from_numpy(flat).to(self.device).to(self.dtype)
        part = _fit_chunk(y, self.design, self.per_unit, self.cal, FitWindow(*self.window), self.method,
                          self.max_iter, self.nl, self.roi)
        return {k: v if k.startswith("integrated_") else  # sums over the chunk's pixels, [window channels]
                v.reshape((v.shape[0], n_rows, self.cols) if v.ndim == 2 else (n_rows, self.cols))
                for k, v in part.items()}


def _join_parts(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The results of consecutive row ranges of one chunk as one: maps ``[K, rows, cols]`` and
    per-pixel ``[rows, cols]`` joined along the rows, the ``integrated_*`` sums added."""
    out = {}
    for key in parts[0]:
        values = [part[key] for part in parts]
        if key.startswith("integrated_"):
            out[key] = np.sum(values, axis=0)
        else:
            out[key] = np.concatenate(values, axis=1 if values[0].ndim == 3 else 0)
    return out


_READ_WAITS = 0.3  # a read that keeps its thread busy less than this share of its time waits on the storage


def _spare_core(device: torch.device) -> bool:
    """Whether a core is free for reading ahead while a chunk is fitted: the fit runs on a GPU,
    or PyTorch uses fewer threads than this process may run on."""
    if device.type != "cpu":
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return torch.get_num_threads() < cores


def _timed_read(dataset: Dataset, rows: slice, dets: list[int]) -> tuple[np.ndarray, float]:
    """``dataset.read(rows, dets)`` and the share of its time the reading thread was busy (CPU
    time over wall time: about 1 for a copy from the page cache, near 0 while it waits on a disk
    or a network)."""
    w0, c0 = time.perf_counter(), time.thread_time()
    block = dataset.read(rows, dets)
    return block, (time.thread_time() - c0) / max(time.perf_counter() - w0, 1e-9)


def _local(job: _Job, dataset: Dataset, dets: list[int], todo: Sequence[tuple[int, int]]):
    """Fit the chunks ``todo`` here; yield ``(start, stop, part)``.

    The next chunk is read in a thread while one is fitted where that costs the fit nothing: a
    core is spare (:func:`_spare_core`), or the last read mostly waited on the storage. Otherwise
    it is read between fits: a read that copies from the page cache needs a core, and taking one
    from PyTorch's threads stalls every parallel step of the fit (on 2 cores the fit ran at 70 k
    pixels/s with the reading thread, 50 k in a bad run, against 74 k reading in turn)."""
    from concurrent.futures import ThreadPoolExecutor

    if not todo:
        return
    spare = _spare_core(job.device)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mapstorch-read") as pool:
        pending = None
        for i, (start, stop) in enumerate(todo):
            block, busy = pending.result() if pending is not None else _timed_read(dataset, slice(start, stop), dets)
            pending = None
            if i + 1 < len(todo) and (spare or busy < _READ_WAITS):
                pending = pool.submit(_timed_read, dataset, slice(*todo[i + 1]), dets)
            yield start, stop, job.run_in_parts(block, stop - start)
            del block


def _remote_chunk(job: _Job, path: str, fmt: str, start: int, stop: int) -> tuple[int, int, dict]:
    """A Dask task: open the input file here, read rows ``start:stop``, fit them."""
    from mapstorch.io.h5chunks import read_threads
    from mapstorch.io.open import open_dataset

    torch.set_num_threads(1)
    with open_dataset(path, format=fmt) as ds, read_threads(1):  # the workers already share the cores
        block = ds.read(slice(start, stop), job.dets)
    return start, stop, job.run(block, stop - start)


def _distributed(client, job: _Job, dataset: Dataset, todo: Sequence[tuple[int, int]]):
    """Fit the chunks ``todo`` on a Dask cluster; yield ``(start, stop, part)`` as they finish."""
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise InputError("distributing over Dask needs the 'distributed' package: pip install 'dask[distributed]'"
                         ) from None
    if not Path(dataset.path).exists():
        raise InputError(f"distributing over Dask needs the data in a file each worker can open; {dataset.path!r} "
                         "is not one")
    own = None
    if isinstance(client, str):
        own = client = Client(client)
    try:
        cpu_job = job
        if job.device.type != "cpu":  # workers fit on their own CPUs
            cpu_job = _Job(**{**job.__dict__, "device": torch.device("cpu"), "design": job.design.cpu(),
                              "per_unit": job.per_unit.cpu()})
        if cpu_job.nl is not None:
            cpu_job.nl = {k: (v.to("cpu") if isinstance(v, (torch.Tensor, DesignExpansion)) else v)
                          for k, v in cpu_job.nl.items()}
        scattered = client.scatter(cpu_job, broadcast=True)
        futures = [client.submit(_remote_chunk, scattered, str(Path(dataset.path).resolve()), dataset.format, a, b,
                                 pure=False) for a, b in todo]
        for fut in as_completed(futures):
            yield fut.result()
    finally:
        if own is not None:
            own.close()


def _fit_chunk(y: torch.Tensor, design: torch.Tensor, per_unit: torch.Tensor, cal: tuple[float, float, float, float],
               window, method: str, max_iter: int | None, nl: dict | None = None,
               roi: Sequence[tuple[int, int]] = ()) -> dict[str, np.ndarray]:
    """Fit the pixels ``y [P, C]`` of one chunk; numpy arrays ``counts``/``stderr`` ``[K, P]`` and
    ``rchi2``/``iterations``/``status`` ``[P]`` (and ``roi [R, P]``: the counts in the ``roi``
    windows)."""
    off, slope, quad, width = cal
    if method == "nnls" and _fused_usable(y, design):
        try:
            return _fit_chunk_nnls_fused(y, design, per_unit, cal, window, max_iter, roi)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 -- the compiled pass failed here: the step-by-step path
            _give_up_fused(exc)
    with torch.no_grad():
        # channel-major [Cw, P] in memory throughout (the SNIP works that way): element-wise steps
        # on one memory layout, matrix products by transposed views
        # the NNLS needs the net counts max(y - bg, 0) only through their projections on the design
        # (and XRF-Maps' ROI counts, summed while each chunk of spectra is in the cache)
        bg, yw, rhs, *roi_counts = snip_window(y, off, slope, quad, width, (window.first, window.last),
                                               with_window=True, project=design, roi=roi or None)
        bg = bg.T.contiguous().T
        yw = yw.T.contiguous().T
        a, it, ok = solvers.nnls(design, None, max_iter=max_iter or 2000, rhs=rhs)
        if method == "poisson":
            # the background is a shape (SNIP of the chunk's summed spectrum: smooth even where a
            # pixel has few counts) with a fitted non-negative amplitude per pixel; the sum leaves
            # out spectra with a NaN or infinite channel, which would make the whole shape NaN
            shape = snip_window(_finite_rows(y).sum(0, keepdim=True), off, slope, quad, width,
                                (window.first, window.last))[0]
            shape = shape / shape.sum().clamp(min=torch.finfo(shape.dtype).tiny)
            aug = torch.cat([design, shape[:, None]], 1)
            yp = yw.contiguous()  # pixel-major: the solver's products read rows of pixels
            start = torch.cat([a, _background_start(design, shape, a, yp)[:, None]], 1)
            full, it2, ok = solvers.poisson(aug, yp, None, start, max_iter=max_iter or 100)
            a, bg = full[:, :-1], full[:, -1:] * shape[None, :]
            it = it + it2
        if method == "nonlinear" and nl is not None:
            part = _fit_chunk_nonlinear(y, yw, bg, a, it, nl, max_iter)
            if roi_counts:
                part["roi"] = roi_counts[0].T.float().cpu().numpy()
            return part
        if not bg.T.is_contiguous():  # the poisson method's background: channel-major like the rest
            bg = bg.T.contiguous().T
        # the model m = a D^T + bg and its weights 1 / max(m, 1) are not stored: the chi-square and
        # the standard errors (Fisher information) are summed as they are computed
        chi, se = solvers.model_chi2_stderr(design, a, bg, yw)
        finite = torch.isfinite(a).all(1) & torch.isfinite(chi)
        bg_sum = _finite_rows(bg, finite).sum(0).double()
        return _nnls_output(y, design, per_unit, a, se, chi, it, ok, bg_sum, roi_counts[0].T if roi_counts else None)


def _nnls_output(y, design, per_unit, a, se, chi, it, ok, bg_sum, roi) -> dict[str, np.ndarray]:
    """:func:`_chunk_output` of a chunk's fit with the background fixed (nnls, poisson): ``chi``
    the chi-square (divided here by the degrees of freedom), ``bg_sum`` the background summed over
    the pixels whose fit is finite, ``roi [R, P]`` or None."""
    dof = design.shape[0] - (a > 0).sum(1)  # window channels less the amplitudes in use
    chi = chi / dof.clamp(min=1)
    finite = torch.isfinite(a).all(1) & torch.isfinite(chi)
    code = torch.where(finite, torch.where(ok, 0, 1), 2).to(torch.int8)
    a = torch.where(finite[:, None], a, torch.zeros_like(a))  # non-finite: 0, as XRF-Maps
    model_sum = bg_sum + design.double() @ a.double().sum(0)  # the model a D^T + bg, summed
    return _chunk_output(y, a, se, a * per_unit, se * per_unit, chi, it, code, model_sum, bg_sum,
                         **({"roi": roi} if roi is not None else {}))


_fused_failure: str | None = None  # why the fused pass failed here, if it did (it is not tried again)


def _give_up_fused(exc: Exception) -> None:
    """Remember that the fused nnls pass failed in this process, and say so once."""
    global _fused_failure
    _fused_failure = f"{type(exc).__name__}: {exc}"
    log.warning("the compiled nnls pass failed (%s); fitting step by step from now on (the same maps, slower)",
                _fused_failure, exc_info=True)


def _fused_usable(y: torch.Tensor, design: torch.Tensor) -> bool:
    """Whether the nnls fit of a chunk can go through :mod:`nnls_fused_cpu` (CPU spectra of the
    design's float dtype, pixel- or channel-major in memory, no gradient, numba working)."""
    from mapstorch.physics import snip

    if y.device.type != "cpu" or y.dtype not in (torch.float32, torch.float64) or y.dtype != design.dtype \
            or y.requires_grad or design.requires_grad or y.dim() != 2 or y.shape[0] < 1:
        return False
    if not (y.is_contiguous() or y.T.is_contiguous()):
        return False
    return (_fused_failure is None and snip._compiled_unusable() is None
            and solvers._engine("auto", y) == "compiled")


_fused_tables: list = []  # the last map's (key, design, per_unit, tables, pairs, iu): built once, not per chunk


def _fit_chunk_nnls_fused(y: torch.Tensor, design: torch.Tensor, per_unit: torch.Tensor, cal, window,
                          max_iter: int | None, roi: Sequence[tuple[int, int]]) -> dict[str, np.ndarray]:
    """:func:`_fit_chunk`'s nnls method in one pass per group of pixels (:mod:`nnls_fused_cpu`):
    the same SNIP, projections, solver and chi-square kernels, the background and the window's
    counts never written out for the whole chunk."""
    from mapstorch.io import h5chunks
    from mapstorch.maps import nnls_fused_cpu
    from mapstorch.physics.snip import compiled_plan

    channel_major = y.shape[0] > 1 and y.T.is_contiguous()
    x = (y.T if channel_major else y).numpy()
    key = (y.shape[1], tuple(cal), window.first, window.last, y.dtype, channel_major, tuple(map(tuple, roi)),
           design._version)
    cached = _fused_tables[0] if _fused_tables else None
    if cached is not None and cached[0] == key and cached[1] is design and cached[2] is per_unit:
        tables, pairs, iu = cached[3:]
    else:
        off, slope, quad, width = cal
        plan = compiled_plan(y.shape[1], off, slope, quad, width, (window.first, window.last), y.dtype, channel_major,
                             project=design, roi=roi or None)
        norms, gram, lip, inverse = solvers.nnls_setup(design)
        k = design.shape[1]
        iu = torch.triu_indices(k, k)
        pairs = design[:, iu[0]] * design[:, iu[1]]  # as solvers.model_chi2_stderr's
        tables = nnls_fused_cpu.NnlsTables(plan, design.numpy(), pairs.numpy(), norms.numpy(), gram.numpy(), lip,
                                           inverse.numpy(), per_unit.detach().cpu().to(design.dtype).numpy())
        _fused_tables[:] = [(key, design, per_unit, tables, pairs, iu)]
    source = None if channel_major else h5chunks.file_bytes(x)  # a mapped block: read by the threads instead
    res = nnls_fused_cpu.fit_nnls_cpu(x, tables, solvers.NNLS_TOL, max_iter or 2000, torch.get_num_threads(),
                                      source=source)
    out = res["maps"]  # _nnls_output's maps, made by the pass's threads
    if res["failed"]:  # not positive definite (collinear columns): the pseudo-inverse's errors, as there
        rows = torch.tensor(sorted(res["failed"]))
        bg = torch.from_numpy(np.stack([res["failed"][int(p)] for p in rows]))
        se = solvers.pseudo_inverse_stderr(design, torch.from_numpy(res["a"])[rows], bg, pairs, iu)
        out["amplitudes_stderr"][:, rows] = se.T.float().numpy()
        out["stderr"][:, rows] = (se * per_unit).T.float().numpy()
    bg_sum = res["background_sum"]
    out.update(total_counts=res["total"], iterations=res["iterations"].astype(np.int32),
               integrated_fit=bg_sum + design.double().numpy() @ res["amplitude_sum"], integrated_background=bg_sum)
    if "roi" in res:
        out["roi"] = res["roi"]  # [R, P] float32
    return out


def _background_start(design: torch.Tensor, shape: torch.Tensor, a: torch.Tensor, counts: torch.Tensor,
                      steps: int = 4) -> torch.Tensor:
    """The poisson method's start for the background's amplitude ``t [P]`` (its shape ``[C]``),
    the amplitudes ``a [P, K]`` held: Newton steps of the Poisson deviance in ``log t`` (each
    at most a factor 10), from the counts the model ``a D^T`` leaves unexplained. The SNIP
    background's own sum was up to four times the likelihood's amplitude, and the unexplained
    counts up to 400 times too little; from either the joint solver took two to three times
    the steps (in ``t`` itself Newton creeps up from below: the curvature falls as ``1 / m^2``)."""
    m_el = a @ design.T  # [P, C]
    tiny = torch.finfo(m_el.dtype).tiny
    total = counts.sum(1, keepdim=True)
    s1, s2 = shape.sum(), shape * shape
    rest = (total - m_el.sum(1, keepdim=True)).clamp(min=0.0) / s1.clamp(min=tiny)
    t = torch.maximum(rest, 1e-3 * total.clamp(min=1.0))  # > 0: the steps are in log t
    for _ in range(steps):
        m = torch.addcmul(m_el, t, shape[None, :]).clamp_(min=tiny)
        ratio = torch.div(counts, m)
        d1 = t * (s1 - ratio @ shape)[:, None]  # d/d(log t)
        d2 = d1 + t * t * (ratio.div_(m) @ s2)[:, None]
        step = torch.where(d2 > 0, -d1 / d2.clamp(min=tiny), -torch.sign(d1) * 2.3)
        t = t * torch.exp(step.clamp(min=-2.3, max=2.3))
    return t[:, 0]


def _finite_rows(x: torch.Tensor, finite: torch.Tensor | None = None) -> torch.Tensor:
    """The rows (pixels) of ``x [P, C]`` that are ``finite`` (default: whose values all are),
    ``x`` itself when all are: what the chunk's sums over pixels (the poisson method's
    background shape, the integrated fit and background) add up, so that one damaged pixel
    leaves them finite."""
    if finite is None:
        finite = torch.isfinite(x).all(1)
    return x if bool(finite.all()) else x[finite]


def _chunk_output(y, a, a_err, counts, counts_err, chi, iters, code, model_sum, bg_sum, **more
                  ) -> dict[str, np.ndarray]:
    """A chunk's results as numpy arrays: ``[K, P]`` maps, ``[P]`` per-pixel values, and the
    model and background summed over the chunk's pixels whose fit is finite (``integrated_*``,
    ``[window channels]``, given as float64 tensors)."""
    floats = {"amplitudes": a.T, "amplitudes_stderr": a_err.T, "counts": counts.T, "stderr": counts_err.T,
              "rchi2": chi, "total_counts": y.sum(1), **more}
    out = _to_host({k: v.float() for k, v in floats.items()})
    out.update(iterations=iters.int().cpu().numpy(), status=code.cpu().numpy(),
               integrated_fit=model_sum.cpu().numpy(), integrated_background=bg_sum.cpu().numpy())
    return out


def _to_host(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """float32 tensors as numpy arrays. From a GPU all in one copy into page-locked memory: on an
    H200 host a pageable copy of a 1 M-pixel chunk's maps (288 MB) took 180-240 ms, a page-locked
    one 5.5 ms (12 ms with the gathering; bench/RESULTS.md, GPU section)."""
    first = next(iter(tensors.values()))
    if first.device.type != "cuda":
        return {k: v.cpu().numpy() for k, v in tensors.items()}
    flat = torch.cat([v.reshape(-1) for v in tensors.values()])
    try:
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)  # cached by PyTorch between chunks
    except RuntimeError as exc:  # page-locked memory refused (limits, drivers): a pageable copy
        log.debug("page-locked host memory unavailable (%s); copying to pageable memory", exc)
        host = torch.empty(flat.shape, dtype=flat.dtype)
    host.copy_(flat)
    out, at = {}, 0
    whole = host.numpy()
    for k, v in tensors.items():
        out[k] = whole[at:at + v.numel()].reshape(v.shape)
        at += v.numel()
    return out


def _fit_chunk_nonlinear(y, yw, bg, a0, it0, nl: dict, max_iter: int | None) -> dict[str, np.ndarray]:
    """Per-pixel refit of the free shape parameters with the amplitudes, on the
    quadratic expansion of the design matrix ``nl["expansion"]`` (:mod:`expansion`)."""
    exp: DesignExpansion = nl["expansion"]
    if exp.device != yw.device:
        exp = nl["expansion"] = exp.to(yw.device)
    n = exp.n
    with torch.no_grad():
        # pixel-major from here on: the refit's products and the chi-square read rows of pixels
        # (against the channel-major counts the chi-square took 4 us per pixel instead of 1)
        yw, bg = yw.contiguous(), bg.contiguous()
        res = refit(exp, yw, bg, a0, max_iter=max_iter or 30)
        a, err, m, th = res["a"], res["stderr"], res["model"], res["theta"]
        dof = (yw.shape[1] - (a > 0).sum(1) - n).clamp(min=1)
        chi = solvers.pearson_chi2(yw, m) / dof
        finite = torch.isfinite(a).all(1) & torch.isfinite(chi) & torch.isfinite(th).all(1)
        code = torch.where(finite, torch.where(res["converged"], 0, 1), 2).to(torch.int8)
        a = torch.where(finite[:, None], a, torch.zeros_like(a))
    return _chunk_output(y, a, err[:, n:], a * res["unit"], err[:, n:] * res["unit"], chi, it0 + res["iterations"],
                         code, _finite_rows(m, finite).sum(0).double(), _finite_rows(bg, finite).sum(0).double(),
                         parameters=th.T, parameters_stderr=err[:, :n].T)


class _ChunkStore:
    """Finished chunks on disk, keyed by the settings: resume support."""

    def __init__(self, folder, settings: Mapping[str, object]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        key = _settings_key(settings)
        meta = self.folder / "settings.json"
        if meta.exists():
            old = json.loads(meta.read_text())
            if old.get("key") != key:  # other settings or another input: start afresh
                for f in self.folder.glob("chunk_*.npz"):
                    f.unlink()
        tmp = meta.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "settings": settings}, indent=1, default=str))
        os.replace(tmp, meta)

    def _path(self, start: int, stop: int) -> Path:
        return self.folder / f"chunk_{start:07d}_{stop:07d}.npz"

    def load(self, start: int, stop: int) -> dict[str, np.ndarray] | None:
        path = self._path(start, stop)
        if not path.exists():
            return None
        try:
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError):  # a damaged chunk is fitted again
            return None

    def save(self, start: int, stop: int, part: Mapping[str, np.ndarray]) -> None:
        path = self._path(start, stop)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **part)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @staticmethod
    def discard(folder) -> None:
        """Remove a finished run's chunk folder (only the files this store writes)."""
        folder = Path(folder)
        if not folder.is_dir():
            return
        for f in list(folder.glob("chunk_*.npz")) + list(folder.glob("*.tmp")) + [folder / "settings.json"]:
            if f.exists():
                f.unlink()
        try:
            folder.rmdir()
        except OSError:  # something else was put there: leave it
            pass
