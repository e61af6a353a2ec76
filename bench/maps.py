"""Benchmark: map fitting speed, mapstorch ``fit_map(method="nnls")`` vs PyMca5's ``FastXRFLinearFit`` (and nonlinear vs ``McaAdvancedFitBatch``).

One synthetic map (``mapstorch.synthetic.simulate_map``: the demo sample's 16 components at
10 keV, default 256 x 256 pixels x 2048 channels, Poisson noise, known per-pixel truth) is written
as an uncompressed HDF5 file (dataset ``/spectra``, float32, ``(rows, cols, channels)``) and
fitted by both, each with 2 threads, with the same shape parameters (the simulation's), energy
calibration, components, fit window and incident energy:

* mapstorch: ``fit_map(ds, sim.params, method="nnls")`` (what ``mapstorch map --method nnls``
  runs): per-pixel SNIP background (XRF-Maps' recipe, ``SNIP_WIDTH`` of the parameters), then
  non-negative least squares of every pixel on the fixed design matrix. The Dataset reads the
  HDF5 file lazily, a block of rows at a time, so the timing includes reading the spectra (from
  the page cache; ``mapstorch.io.h5chunks`` memory-maps a contiguous dataset's block of rows,
  and the fit's threads read their groups of spectra from the file with ``pread``). A one-row
  warm-up fit runs first, untimed. The best of ``--linear-repeats`` whole runs (3 by default;
  all of them in ``ours_all_pixels_per_second``): one run lasts 0.3 s, and this machine's
  speed wanders by 10-20 % from one to the next.
* PyMca5 (``bench/.venv-pymca``, script ``_pymca_fast.py``): ``FastXRFLinearFit.fitMultipleSpectra``
  with SNIP background (``stripflag = 1``, ``stripalgorithm = 1``), which FastXRFLinearFit computes
  and subtracts for every pixel, then an unweighted linear least-squares fit with PyMca's refit of
  pixels with negative areas. Its SNIP width (a constant, in channels) is our XRF-Maps width
  averaged over the fit window; the detector noise/Fano come from ``FWHM_OFFSET``/``FWHM_FANOPRIME``;
  Gaussian peaks only (PyMca's tails are parameterised differently). PyMca loads the whole stack
  into memory first, untimed, and is warmed up on one row. The best of ``--linear-repeats``
  runs, each in a fresh process, as ours (all of them in ``baseline_all_pixels_per_second``).

Our process uses the process settings of the ``mapstorch`` command (``mapstorch.allocator``:
large arrays from the heap, freed memory kept for reuse; ``mapstorch.openmp``: PyTorch's OpenMP
threads spin 30,000 turns, not 300,000, after each operation); PyMca's run with their defaults.

Wall-clock timings need an otherwise idle machine (the CPUs' idle fraction over 3 s before the
run, and the CPU seconds other processes used during it, are reported, with a warning where they
compete; process CPU seconds of both fits are reported too). Both timings cover the
whole map fit: building the model (design matrix / derivatives), the
background of every pixel, the solves. Ours is also scored: the median relative error of Fe and
Ca counts per pixel against the truth (counts inside the fit window). PyMca's mean peak areas are
reported next to the truth's mean counts, not scored: PyMca's area of a family counts all its lines,
not only the counts inside the fit window, and its peak shapes differ.

Nonlinear fits (parameter maps), each with 2 threads:

* mapstorch: ``fit_map(sub, sim.params, method="nonlinear")`` on the first ``--nonlinear-rows``
  rows (64 by default: 16,384 pixels, four default chunks, so that the cells' expansions, made
  once per map, weigh as little as on a real map): per pixel, a bounded Levenberg-Marquardt
  on the Poisson deviance of the amplitudes together with the shape parameters
  ``DEFAULT_PARAMETER_MAPS`` (``ENERGY_OFFSET``, ``ENERGY_SLOPE``, ``FWHM_OFFSET``), batched over
  pixels, on the quadratic expansion of the design matrix in those parameters
  (``mapstorch.maps.expansion``); the timing is the whole ``fit_map`` call (model, expansion
  cells, SNIP background, NNLS start, the refit) on those rows, already in memory, after an
  untimed warm-up fit of 16 pixels (``ours_nonlinear_pixels_per_second``: the best of
  ``--nonlinear-repeats`` runs, 3 by default; all of them in ``ours_nonlinear_all_pixels_per_second``). Also reported: its
  Fe/Ca median errors against the truth and its median parameters.
* PyMca5 (script ``_pymca_batch.py``): ``McaAdvancedFitBatch``, PyMca's batch fitter of maps, on
  the first two rows of the same map (its speed per pixel does not depend on how many it fits),
  i.e. per pixel ``McaTheory.setData`` (the SNIP background of that spectrum), ``estimate()`` and
  ``startfit()`` (``Gefit.LeastSquaresFit``, Levenberg-Marquardt), with the configuration of
  ``_pymca_fast.py`` (same peaks, calibration start, SNIP width, incident energy, fit window,
  Gaussian peaks) but ``linearfitflag = 0`` and the detector's ``zero``, ``gain``, ``noise`` and
  ``fano`` free (``fixedzero = fixedgain = fixednoise = fixedfano = 0``; ``--pymca-free`` to
  change), within PyMca's default ranges around the start, statistical weighting (``fitweight =
  1``), PyMca's default ``maxiter = 10``. Only its fitting loop (``processList``) is timed, after
  an untimed warm-up fit of one spectrum; the best of ``--nonlinear-repeats`` runs, each in a fresh
  process (all in ``baseline_nonlinear_all_pixels_per_second``). ``--nonlinear-pixels N`` fits only the first N pixels
  (for a slow machine); ``baseline_nonlinear_pixels`` says how many were fitted, and
  ``nonlinear_ratio`` = ours / PyMca in pixels per second. The median fitted detector parameters,
  iterations, fits at ``maxiter`` and failed fits of PyMca are reported (``baseline_nonlinear_*``).

The poisson method (``fit_map(sub, sim.params, method="poisson")``, maximum likelihood with the
background shape in the model) is timed once on the same rows as the nonlinear method, after an
untimed warm-up (``ours_poisson_pixels_per_second``; no baseline: PyMca has no such fit).

The same map in ``mapstorch map``'s own input format, XRF-Maps' v10 layout (``mca_arr``
``(channels, rows, cols)``, a row of pixels per chunk), once uncompressed and once gzip-compressed
as beamline files are: ``open_dataset`` + ``fit_map(method="nnls")``, reading included, the maps
checked equal to the main run's (``ours_xrfmaps_layout_pixels_per_second``; ``--no-xrfmaps-layout``
skips it).

Peak memory: a fresh process maps the same file with ``fit_map`` (reading a chunk of rows at a
time) and reports its peak resident set size next to the file size and the chunk size
(``ours_peak_rss_mb``, ``file_mb``, ``chunk_mb``): memory stays bounded by the chunk, not the file.

Usage::

    .venv/bin/python bench/maps.py [--rows 256] [--cols 256] [--seed 0] [--threads 2] [--linear-repeats 3] [--nonlinear-pixels N]
    .venv/bin/python bench/maps.py --rows 32 --cols 32     # a quick run

The LAST line printed is JSON::

    {"metric": "map_pixels_per_second", "ours": x, "baseline": y, "ratio": x/y, "ours_method": "nnls",
     "pixels": n, "ours_seconds": ..., "baseline_seconds": ..., "ours_median_rel_error": {"Fe": ..., "Ca": ...},
     "ours_nonlinear_pixels_per_second": u, "baseline_nonlinear_pixels_per_second": v, "nonlinear_ratio": u/v,
     "baseline_nonlinear_pixels": m, ...}
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "2")
from mapstorch.openmp import tune_openmp  # noqa: E402 -- before torch, as the mapstorch command does

_OPENMP_TUNED = tune_openmp()
_OURS_ONLY = ("GOMP_SPINCOUNT",) if _OPENMP_TUNED else ()  # PyMca runs with its defaults

import h5py
import numpy as np
import torch

from mapstorch.io.h5chunks import read_block as read_selection  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _venv import BENCH, ensure_venv, run_json

from mapstorch.allocator import tune_allocator
from mapstorch.io.dataset import Dataset
from mapstorch.maps import fit_map
from mapstorch.physics.elements import parse_component
from mapstorch.physics.shapes import FANO_EPSILON_XRFMAPS
from mapstorch.physics.snip import snip_widths
from mapstorch.synthetic import simulate_map

log = logging.getLogger("bench")

PYMCA_EPSILON = 0.00385  # keV per electron-hole pair in PyMca's FWHM^2 = noise^2 + 2.3548^2 eps fano E


def _cpu_idle(seconds: float = 3.0) -> float | None:
    """Fraction of CPU time idle over ``seconds`` (Linux ``/proc/stat``), None where unknown."""
    def sample() -> list[int]:
        with open("/proc/stat") as fh:
            return [int(v) for v in fh.readline().split()[1:9]]

    try:
        a = sample()
        time.sleep(seconds)
        b = sample()
    except (OSError, ValueError):
        return None
    d = [y - x for x, y in zip(a, b)]
    return d[3] / sum(d) if sum(d) > 0 else None


def _busy_seconds() -> float | None:
    """CPU seconds all processes on this machine have used so far (``/proc/stat``), None where unknown."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:9]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _peak_rss(path: Path, calibration: np.ndarray, ps, threads: int) -> tuple[float, float]:
    """Peak resident memory (MB) of a fresh process that maps the file with ``fit_map`` (reading
    it a chunk of rows at a time), and the size of one chunk of spectra (MB)."""
    import subprocess

    from mapstorch.io.override import new_override

    ovr = path.with_name("params_override.txt")
    new_override(ps).write(ovr)
    code = (
        "import sys, numpy as np, torch\n"
        f"sys.path.insert(0, {str(BENCH)!r})\n"
        f"torch.set_num_threads({threads})\n"
        "from maps import _h5_dataset\n"
        "from mapstorch.io.override import read_override\n"
        "from mapstorch.maps import fit_map\n"
        "from mapstorch.allocator import tune_allocator\n"
        "tune_allocator()\n"  # as the mapstorch command does (the OpenMP setting comes with the environment)
        f"ds = _h5_dataset({str(path)!r}, np.array({calibration.tolist()!r}))\n"
        f"fit_map(ds, read_override({str(ovr)!r}), method='nnls')\n"
        # VmHWM (this process's own peak; ru_maxrss would keep the forking parent's peak across exec)
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rss_kb = float(out.stdout.strip().splitlines()[-1])
    with h5py.File(path, "r") as f:
        rows, cols, chans = f["spectra"].shape
    from mapstorch.maps.fit import default_chunk_rows

    chunk_rows = default_chunk_rows(cols)
    return rss_kb / 1024.0, chunk_rows * cols * chans * 4 / 1e6


def _h5_dataset(path: Path, calibration: np.ndarray) -> Dataset:
    """A Dataset that reads ``/spectra`` of ``path`` a block of rows at a time."""
    f = h5py.File(path, "r")
    d = f["spectra"]
    rows, cols, chans = d.shape

    def read_block(start: int, stop: int, dets) -> np.ndarray:  # as mapstorch's HDF5 readers read blocks
        return read_selection(d, (slice(start, stop), slice(None), slice(None)))[:, :, None, :]

    return Dataset(path=str(path), format="hdf5-bench", rows=rows, cols=cols, detectors=1, channels=chans,
                   calibration=calibration, read_block=read_block, close_fn=f.close)


def _xrfmaps_layout(path: Path, calibration: np.ndarray, ps, tmp: Path, ref) -> dict:
    """``mapstorch map``'s own input: the same spectra in XRF-Maps' v10 layout (``mca_arr``
    ``(channels, rows, cols)``, one row of pixels per chunk, as ``write_xrfmaps_h5`` writes), once
    uncompressed and once gzip-compressed (as XRF-Maps and the fly-scan writers store them), each
    opened with ``open_dataset`` and fitted with ``fit_map(method="nnls")``, timed as the main run
    (reading included). The maps must equal the main run's."""
    from mapstorch.io.hdf5 import write_xrfmaps_h5
    from mapstorch.io.open import open_dataset

    out = {}
    src = _h5_dataset(path, calibration)
    try:  # untimed warm-up, as the main run's: the kernels that read channel-major blocks in place
        warm = Dataset(path="<warm-up>", format="npy", rows=1, cols=src.cols, detectors=1, channels=src.channels,
                       calibration=calibration, spectra=src.read(slice(0, 1)))
    finally:
        src.close_fn()
    write_xrfmaps_h5(tmp / "xrfmaps_warm.h5", warm, compression="gzip")
    with open_dataset(tmp / "xrfmaps_warm.h5") as ds:
        fit_map(ds, ps, method="nnls")
    for comp in (None, "gzip"):
        target = tmp / f"xrfmaps_{comp or 'raw'}.h5"
        src = _h5_dataset(path, calibration)
        try:
            write_xrfmaps_h5(target, src, compression=comp)
        finally:
            src.close_fn()
        with open_dataset(target) as ds:
            ts = time.perf_counter()
            rv = fit_map(ds, ps, method="nnls")
            seconds = time.perf_counter() - ts
        if not np.array_equal(rv.counts, ref.counts):
            raise SystemExit(f"the XRF-Maps-layout ({comp or 'uncompressed'}) maps differ from the main run's")
        pps = rv.counts[0].size / seconds
        log.info("mapstorch nnls on an XRF-Maps v10 file (%s, %.0f MB): %.0f pixels/s (the same maps)",
                 comp or "uncompressed", target.stat().st_size / 1e6, pps)
        out[comp or "uncompressed"] = round(pps, 1)
        target.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600.0, help="for PyMca's run, seconds")
    ap.add_argument("--no-baseline", action="store_true", help="time mapstorch only")
    ap.add_argument("--nonlinear-rows", type=int, default=64,
                    help="rows of the map our nonlinear method fits (default 64: 16384 pixels, 4 chunks, of a 256-column map)")
    ap.add_argument("--linear-repeats", type=int, default=3,
                    help="linear timings: the best of this many whole runs, for both (default 3)")
    ap.add_argument("--nonlinear-repeats", type=int, default=3,
                    help="nonlinear timings: the best of this many runs, for both (default 3)")
    ap.add_argument("--nonlinear-pixels", type=int, default=None,
                    help="PyMca's nonlinear fit: only the first N pixels of the first two rows (default: all)")
    ap.add_argument("--no-xrfmaps-layout", dest="xrfmaps_layout", action="store_false",
                    help="skip the fits of the same map stored in XRF-Maps' layout (uncompressed and gzip)")
    ap.add_argument("--pymca-free", default="zero,gain,noise,fano",
                    help="detector parameters PyMca's nonlinear fit frees (of zero,gain,noise,fano)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    # the allocator settings of the mapstorch command (mapstorch.allocator); PyMca runs in its own
    # processes with its defaults
    log.info("glibc allocator tuned: %s; OpenMP spin count %s (%s)", tune_allocator(),
             os.environ.get("GOMP_SPINCOUNT", "default"), "set here" if _OPENMP_TUNED else "from the environment")

    idle0 = _cpu_idle()
    if idle0 is not None and idle0 < 0.9:
        log.warning("the CPUs were only %.0f%% idle before the run: other processes compete for them, timings "
                    "will be low", 100 * idle0)
    busy0, own0 = _busy_seconds(), _own_seconds()
    t0 = time.perf_counter()
    sim = simulate_map(args.rows, args.cols, seed=args.seed)
    ps, window, names = sim.params, sim.window, list(sim.lines.names)
    truth = sim.truth_counts
    off, slope, quad = (float(ps[n]) for n in ("ENERGY_OFFSET", "ENERGY_SLOPE", "ENERGY_QUADRATIC"))
    calibration = np.array([[off, slope, quad]])
    rows, cols, chans = sim.counts.shape
    pixels = rows * cols
    log.info("simulated %d x %d x %d in %.1f s; components %s; window %d-%d", rows, cols, chans,
             time.perf_counter() - t0, ",".join(names), window.first, window.last)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "map.h5"
        with h5py.File(path, "w") as f:  # contiguous, uncompressed
            f.create_dataset("spectra", data=sim.counts.astype(np.float32))
        del sim  # the counts live in the file from here on
        log.info("wrote %s (%.0f MB)", path, path.stat().st_size / 1e6)

        # ---- mapstorch
        ds = _h5_dataset(path, calibration)
        try:
            warm = Dataset(path="<warm-up>", format="npy", rows=1, cols=cols, detectors=1, channels=chans,
                           calibration=calibration, spectra=ds.read(slice(0, 1)))
            fit_map(warm, ps, method="nnls")  # untimed: first-call costs of torch kernels
            runs = []
            for _ in range(args.linear_repeats):  # the best of a few whole runs, as PyMca's below
                ts, cs = time.perf_counter(), time.process_time()
                r = fit_map(ds, ps, method="nnls")
                runs.append((time.perf_counter() - ts, time.process_time() - cs))
        finally:
            ds.close_fn()
        ours_seconds, ours_cpu = min(runs)
        ours_pps = pixels / ours_seconds
        rel = {}
        for n in ("Fe", "Ca"):
            err = (r.element(n) - truth[n]) / truth[n]
            rel[n] = {"median_abs": float(np.median(np.abs(err))), "median": float(np.median(err))}
        log.info("mapstorch nnls: %d pixels in %.2f s = %.0f pixels/s (fit loop %.0f pixels/s); status != 0: %d; "
                 "Fe median |rel err| %.4f, Ca %.4f", pixels, ours_seconds, ours_pps, r.pixels_per_second,
                 int((r.status != 0).sum()), rel["Fe"]["median_abs"], rel["Ca"]["median_abs"])
        ours_mean = {n: float(r.counts[i].mean(dtype=np.float64)) for i, n in enumerate(r.names)}
        # the nonlinear method (parameter maps) on the first rows (64 by default: four chunks)
        nl_rows = min(args.nonlinear_rows, rows)
        ds2 = _h5_dataset(path, calibration)
        try:
            sub = Dataset(path=f"<rows 0-{nl_rows - 1}>", format="npy", rows=nl_rows, cols=cols, detectors=1,
                          channels=chans, calibration=calibration, spectra=ds2.read(slice(0, nl_rows)))
        finally:
            ds2.close_fn()
        warm_nl = Dataset(path="<warm-up>", format="npy", rows=1, cols=min(cols, 16), detectors=1, channels=chans,
                          calibration=calibration, spectra=sub.spectra[:1, :16])
        fit_map(warm_nl, ps, method="nonlinear")  # untimed: first-call costs
        nl_times = []
        for _ in range(args.nonlinear_repeats):  # the best of a few runs (as PyMca's below)
            ts = time.perf_counter()
            rn = fit_map(sub, ps, method="nonlinear")
            nl_times.append(time.perf_counter() - ts)
        nonlinear_pps = nl_rows * cols / min(nl_times)
        rel_nl = {n: float(np.median(np.abs(rn.element(n) - truth[n][:nl_rows]) / truth[n][:nl_rows]))
                  for n in ("Fe", "Ca")}
        log.info("mapstorch nonlinear (%s): %d pixels at %.1f pixels/s; status != 0: %d; Fe median |rel err| %.4f; "
                 "median parameters %s", ",".join(rn.parameter_names), nl_rows * cols, nonlinear_pps,
                 int((rn.status != 0).sum()), rel_nl["Fe"],
                 {n: round(float(np.nanmedian(v)), 6) for n, v in zip(rn.parameter_names, rn.parameters)})
        # the poisson method (background shape in the model, maximum likelihood) on the same rows
        fit_map(warm_nl, ps, method="poisson")  # untimed: first-call costs
        ts = time.perf_counter()
        rp = fit_map(sub, ps, method="poisson")
        poisson_pps = nl_rows * cols / (time.perf_counter() - ts)
        rel_p = {n: float(np.median(np.abs(rp.element(n) - truth[n][:nl_rows]) / truth[n][:nl_rows]))
                 for n in ("Fe", "Ca")}
        log.info("mapstorch poisson: %d pixels at %.0f pixels/s; status != 0: %d; Fe median |rel err| %.4f, Ca %.4f",
                 nl_rows * cols, poisson_pps, int((rp.status != 0).sum()), rel_p["Fe"], rel_p["Ca"])
        v10 = _xrfmaps_layout(path, calibration, ps, Path(tmp), r) if args.xrfmaps_layout else {}
        peak_rss_mb, chunk_mb = _peak_rss(path, calibration, ps, args.threads)
        file_mb = path.stat().st_size / 1e6
        log.info("mapstorch nnls in a fresh process: peak RSS %.0f MB for a %.0f MB file (chunk of spectra %.0f MB)",
                 peak_rss_mb, path.stat().st_size / 1e6, chunk_mb)
        truth_mean = {n: float(np.mean(v)) for n, v in truth.items()}

        # ---- PyMca5
        base = base_nl = None
        if not args.no_baseline:
            python = ensure_venv("pymca", ["PyMca5", "h5py"])
            widths = snip_widths(chans, off, slope, quad, float(ps["SNIP_WIDTH"]))[window.first:window.last + 1]
            snip = max(1, round(float(widths.mean())))
            noise = float(ps["FWHM_OFFSET"])
            fano = FANO_EPSILON_XRFMAPS * float(ps["FWHM_FANOPRIME"]) / PYMCA_EPSILON
            elements = [n for n in names if parse_component(n).partner is None]
            cmd = ["--spectra", str(path), f"--calibration={off!r},{slope!r},{quad!r}",
                   "--elements", ",".join(elements), "--incident-energy", repr(float(ps["COHERENT_SCT_ENERGY"])),
                   "--snip-width", str(snip), f"--fit-window={window.first},{window.last}",
                   "--noise", repr(noise), "--fano", repr(fano), "--threads", str(args.threads)]
            log.info("pymca: %s %s", BENCH / "_pymca_fast.py", " ".join(cmd))
            runs_fast = [run_json(python, BENCH / "_pymca_fast.py", cmd, timeout=args.timeout, threads=args.threads,
                                  unset=_OURS_ONLY)
                         for _ in range(args.linear_repeats)]
            base = max(runs_fast, key=lambda r: r["pixels_per_second"])
            base["all_pixels_per_second"] = [round(r["pixels_per_second"], 1) for r in runs_fast]
            log.info("pymca5 %s: %d pixels in %.2f s = %.0f pixels/s", base["version"], base["pixels"],
                     base["seconds"], base["pixels_per_second"])
            # the nonlinear baseline: PyMca's per-pixel fit (McaAdvancedFitBatch) of the first two rows
            nl_pixels = 2 * cols if args.nonlinear_pixels is None else min(args.nonlinear_pixels, 2 * cols)
            cmd_nl = cmd[:-2] + [  # cmd without its trailing "--threads N"
                "--rows", "2", "--pixels", str(nl_pixels), "--free", args.pymca_free, "--threads", str(args.threads)]
            log.info("pymca nonlinear: %s %s", BENCH / "_pymca_batch.py", " ".join(cmd_nl))
            runs_nl = [run_json(python, BENCH / "_pymca_batch.py", cmd_nl, timeout=args.timeout, threads=args.threads,
                                unset=_OURS_ONLY)
                       for _ in range(args.nonlinear_repeats)]
            base_nl = max(runs_nl, key=lambda r: r["pixels_per_second"])
            base_nl["all_pixels_per_second"] = [round(r["pixels_per_second"], 2) for r in runs_nl]
            log.info("pymca5 %s McaAdvancedFitBatch (free %s): %d pixels in %.2f s = %.1f pixels/s; median "
                     "iterations %s, at maxiter %s, failed %d", base_nl["version"], ",".join(base_nl["free"]),
                     base_nl["pixels"], base_nl["seconds"], base_nl["pixels_per_second"],
                     base_nl["iterations_median"], base_nl["at_maxiter"], base_nl["failed"])

    busy1, own1 = _busy_seconds(), _own_seconds()
    others = None if busy0 is None or busy1 is None else max(busy1 - busy0 - (own1 - own0), 0.0)
    if others is not None and others > 0.05 * (time.perf_counter() - t0):
        log.warning("other processes used %.0f CPU seconds during this %.0f s run: timings are not clean", others,
                    time.perf_counter() - t0)
    result = {
        "metric": "map_pixels_per_second",
        "ours": round(ours_pps, 1),
        "baseline": round(base["pixels_per_second"], 1) if base else None,
        "ratio": round(ours_pps / base["pixels_per_second"], 2) if base else None,
        "ours_method": "nnls",
        "linear_repeats": args.linear_repeats,
        "ours_all_pixels_per_second": [round(pixels / sec, 1) for sec, _ in runs],
        "baseline_all_pixels_per_second": base["all_pixels_per_second"] if base else None,
        "ours_peak_rss_mb": round(peak_rss_mb),
        "ours_xrfmaps_layout_pixels_per_second": v10 or None,
        "ours_poisson_pixels_per_second": round(poisson_pps, 1),
        "ours_poisson_median_rel_error": {n: round(v, 5) for n, v in rel_p.items()},
        "ours_nonlinear_pixels_per_second": round(nonlinear_pps, 1),
        "ours_nonlinear_pixels": nl_rows * cols,
        "ours_nonlinear_free": list(rn.parameter_names),
        "ours_nonlinear_nonconverged": int((rn.status != 0).sum()),
        "ours_nonlinear_median_rel_error": {n: round(v, 5) for n, v in rel_nl.items()},
        "ours_nonlinear_parameters_median": {n: round(float(np.nanmedian(v)), 7)
                                             for n, v in zip(rn.parameter_names, rn.parameters)},
        "baseline_nonlinear_pixels_per_second": round(base_nl["pixels_per_second"], 2) if base_nl else None,
        "nonlinear_repeats": args.nonlinear_repeats,
        "ours_nonlinear_all_pixels_per_second": [round(nl_rows * cols / t, 1) for t in nl_times],
        "baseline_nonlinear_all_pixels_per_second": base_nl["all_pixels_per_second"] if base_nl else None,
        "nonlinear_ratio": round(nonlinear_pps / base_nl["pixels_per_second"], 2) if base_nl else None,
        "baseline_nonlinear_pixels": base_nl["pixels"] if base_nl else None,
        "baseline_nonlinear_impl": f"PyMca5 {base_nl['version']} McaAdvancedFitBatch" if base_nl else None,
        "baseline_nonlinear_free": base_nl["free"] if base_nl else None,
        "baseline_nonlinear_seconds": round(base_nl["seconds"], 3) if base_nl else None,
        "baseline_nonlinear_cpu_seconds": round(base_nl["cpu_seconds"], 3) if base_nl else None,
        "baseline_nonlinear_iterations_median": base_nl["iterations_median"] if base_nl else None,
        "baseline_nonlinear_at_maxiter": base_nl["at_maxiter"] if base_nl else None,
        "baseline_nonlinear_failed": base_nl["failed"] if base_nl else None,
        "baseline_nonlinear_fitted_median": ({k: round(v, 6) for k, v in base_nl["fitted_median"].items()}
                                             if base_nl else None),
        "file_mb": round(file_mb),
        "chunk_mb": round(chunk_mb, 1),
        "pixels": pixels,
        "shape": [rows, cols, chans],
        "window": [window.first, window.last],
        "threads": args.threads,
        "ours_seconds": round(ours_seconds, 3),
        "ours_fit_loop_pixels_per_second": round(r.pixels_per_second, 1),
        "ours_cpu_seconds": round(ours_cpu, 3),
        "baseline_cpu_seconds": round(base["cpu_seconds"], 3) if base else None,
        "cpu_idle_before": None if idle0 is None else round(idle0, 3),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "default"),
        "other_processes_cpu_seconds": None if others is None else round(others, 1),
        "ours_nonconverged": int((r.status != 0).sum()),
        "ours_median_rel_error": {n: round(v["median_abs"], 5) for n, v in rel.items()},
        "ours_median_signed_rel_error": {n: round(v["median"], 5) for n, v in rel.items()},
        "baseline_impl": f"PyMca5 {base['version']} FastXRFLinearFit" if base else None,
        "baseline_seconds": round(base["seconds"], 3) if base else None,
        "baseline_snip_width_channels": base["snip_width"] if base else None,
        "truth_mean_counts": {n: round(v, 1) for n, v in truth_mean.items()},
        "ours_mean_counts": {n: round(v, 1) for n, v in ours_mean.items()},
        "baseline_mean_areas": {n: round(v, 1) for n, v in base["mean_counts"].items()} if base else None,
        "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
