"""PyMca5's per-pixel nonlinear fit (``McaAdvancedFitBatch``) of the first rows of a stack: the nonlinear baseline of ``maps.py``.

Runs inside ``bench/.venv-pymca`` (``PyMca5``, ``h5py``; see ``_venv.py``), never in the project's
environment. PyMca is called at run time; nothing of it is copied here.

``PyMca5.PyMcaPhysics.xrf.McaAdvancedFitBatch`` is PyMca's batch fitter of maps (what PyMca's GUI
"batch fitting" and ``PyMca5.PyMcaPhysics.xrf.McaAdvancedFitBatch`` on the command line run): for
every pixel it loads the spectrum into one ``ClassMcaTheory.McaTheory`` (``setData``, which also
computes that spectrum's SNIP background), then ``estimate()`` and ``startfit()`` (a
Levenberg-Marquardt fit, ``Gefit.LeastSquaresFit``, of the areas together with the free nonlinear
parameters). The in-memory stack is handed to it as a one-element file list (PyMca wraps an array in
its ``NumpyStack``); the fit configuration is written to a temporary ``.cfg`` file, as McaTheory
reads its configuration from a file. Nothing is saved (``nosave``, no ``.fit`` files): only the
peak areas are kept in PyMca's in-memory output buffer (``imagingDigestResult``, as the batch does
when it fits images).

The configuration is the one of ``_pymca_fast.py`` (PyMca's defaults, then the same peaks, linear
energy calibration, incident energy with elastic and Compton peaks, Gaussian peaks only, no
escape, no pile-up, no continuum polynomial, fit window ``xmin``/``xmax``, SNIP background with
``snipwidth``/``stripfilterwidth``), except:

* ``linearfitflag = 0``: a nonlinear fit;
* the detector parameters in ``--free`` (default ``zero,gain,noise,fano``) are fitted per pixel
  (``fixedzero = 0`` ...; the others ``fixed... = 1``), within PyMca's default ranges around the
  start (``deltazero`` 0.1 keV, ``deltagain`` 0.001 keV/ch, ``deltanoise`` 0.05 keV,
  ``deltafano`` 0.114), from the start values given (``--calibration``, ``--noise``, ``--fano``);
  ``sum`` (pile-up) stays fixed, there is no pile-up peak;
* ``fitweight = --weight`` (default 1: PyMca's statistical weighting by the counts, its Poisson
  approximation; ``_pymca_fast.py`` fits unweighted);
* ``maxiter = --maxiter`` (default 10, PyMca's default), ``deltachi`` PyMca's default (0.001).

Timed: ``processList()`` of a batch built beforehand (its McaTheory configured, untimed), i.e. the
per-pixel loop: setData (background), estimate, startfit, digest of the areas. Before it, an
untimed warm-up batch fits one spectrum (the first). Per pixel, the fitted detector parameters,
iterations and reduced chi-square are read from the McaTheory after each fit (``onMca``, the
batch's per-spectrum hook) and summarised in the JSON.

Usage (normally from ``maps.py``)::

    bench/.venv-pymca/bin/python bench/_pymca_batch.py --spectra map.h5 --rows 2 \\
        --calibration -0.0042,0.00952,0 --elements Fe,Ca,Zn,Ba_L --incident-energy 10 \\
        --snip-width 56 --fit-window 105,1156 --noise 0.1 --fano 0.114 --threads 2 [--pixels 64]

LAST line printed: JSON ``{"impl": "pymca5-mcatheory", "version": ..., "pixels": n, "seconds": s,
"pixels_per_second": ..., "cpu_seconds": ..., "free": [...], "fitted_median": {zero, gain, noise,
fano}, "start": {...}, "iterations_median": ..., "at_maxiter": ..., "failed": ..., "mean_areas": {...}}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _pymca_fast import _floats, _peaks  # our helpers, no PyMca code

log = logging.getLogger("pymca-bench")

DETECTOR = ("zero", "gain", "noise", "fano")  # McaTheory's first parameters: Zero, Gain, Noise, Fano, Sum


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spectra", required=True, help="HDF5 file with dataset /spectra (rows, cols, channels)")
    ap.add_argument("--dataset", default="/spectra")
    ap.add_argument("--rows", type=int, default=None, help="fit only the first ROWS rows (default: all)")
    ap.add_argument("--pixels", type=int, default=None,
                    help="fit only the first PIXELS pixels (row-major) of those rows")
    ap.add_argument("--calibration", required=True, help="OFFSET,SLOPE,QUADRATIC (keV, keV/ch, keV/ch^2)")
    ap.add_argument("--elements", required=True, help="comma-separated, our names (Fe, Ba_L, Au_M, ...)")
    ap.add_argument("--incident-energy", type=float, required=True, help="keV")
    ap.add_argument("--snip-width", type=int, default=30, help="PyMca snipwidth, channels")
    ap.add_argument("--filter-width", type=int, default=5, help="PyMca stripfilterwidth (smoothing), channels")
    ap.add_argument("--fit-window", required=True, help="FIRST,LAST channel (inclusive)")
    ap.add_argument("--noise", type=float, default=0.1, help="PyMca detector noise: FWHM at 0 keV, keV (start)")
    ap.add_argument("--fano", type=float, default=0.114, help="PyMca Fano factor (start)")
    ap.add_argument("--free", default=",".join(DETECTOR), help="detector parameters fitted per pixel: "
                    "comma-separated subset of zero,gain,noise,fano")
    ap.add_argument("--weight", type=int, default=1, choices=(0, 1), help="PyMca fitweight (1: statistical)")
    ap.add_argument("--maxiter", type=int, default=10, help="PyMca maxiter")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy is imported

    import h5py
    import numpy as np
    import PyMca5
    from PyMca5.PyMcaIO import ConfigDict
    from PyMca5.PyMcaPhysics.xrf import ClassMcaTheory
    from PyMca5.PyMcaPhysics.xrf.McaAdvancedFitBatch import McaAdvancedFitBatch
    from PyMca5.PyMcaPhysics.xrf.XRFBatchFitOutput import OutputBuffer

    offset, slope, quad = _floats(args.calibration, 3)
    first, last = (int(v) for v in _floats(args.fit_window, 2))
    peaks, ours, skipped = _peaks([e for e in args.elements.split(",") if e.strip()])
    if skipped:
        log.info("pymca: skipping %s (pile-ups)", ", ".join(skipped))
    free = [p.strip().lower() for p in args.free.split(",") if p.strip()]
    if set(free) - set(DETECTOR):
        raise SystemExit(f"--free: unknown {sorted(set(free) - set(DETECTOR))}; choose from {DETECTOR}")

    with h5py.File(args.spectra, "r") as f:
        d = f[args.dataset]
        if d.ndim != 3:
            raise SystemExit(f"{args.spectra}{args.dataset}: expected (rows, cols, channels), got {d.shape}")
        n_rows = d.shape[0] if args.rows is None else min(args.rows, d.shape[0])
        data = np.asarray(d[:n_rows], dtype=np.float64)
    rows, cols, chans = data.shape
    if args.pixels is not None and args.pixels < rows * cols:
        data = data.reshape(1, rows * cols, chans)[:, :args.pixels]  # one "row" of the first pixels
    data = np.ascontiguousarray(data)
    pixels = data.shape[0] * data.shape[1]

    config = ClassMcaTheory.McaTheory().getConfiguration()  # PyMca's defaults, a copy
    config["peaks"] = peaks
    fit = config["fit"]
    fit.update({
        "xmin": first, "xmax": last, "use_limit": 1,
        "stripflag": 1, "stripalgorithm": 1, "snipwidth": int(args.snip_width),
        "stripfilterwidth": int(args.filter_width), "stripanchorsflag": 0,
        "linearfitflag": 0, "fitweight": int(args.weight), "continuum": 0, "maxiter": int(args.maxiter),
        "hypermetflag": 1, "escapeflag": 0, "sumflag": 0, "strategyflag": 0,
        "energy": [float(args.incident_energy)], "energyweight": [1.0], "energyflag": [1], "energyscatter": [1],
        "scatterflag": 1,
    })
    det = config["detector"]
    det.update({"zero": offset, "gain": slope, "noise": float(args.noise), "fano": float(args.fano),
                "fixedsum": 1, "detele": "Si"})
    for p in DETECTOR:
        det["fixed" + p] = 0 if p in free else 1
    for att in config["attenuators"].values():
        att[0] = 0  # no attenuators, no matrix: plain emission rates

    class Batch(McaAdvancedFitBatch):
        """PyMca's batch, with its per-spectrum hook recording the fitted detector parameters."""

        def __init__(self, *a, **kw):
            self.record = []  # (zero, gain, noise, fano, iterations, chisq) per fitted spectrum
            super().__init__(*a, **kw)

        def onMca(self, imca, nmca, filename=None, key=None, info=None):
            mf = self.mcafit
            par = getattr(mf, "fittedpar", None)
            if par is None:
                self.record.append(None)
            else:
                self.record.append((*[float(v) for v in par[:4]], int(getattr(mf, "_McaTheory__niter", -1)),
                                    float(mf.chisq)))
                mf.fittedpar = None  # so that a failed next fit is not counted with these values

    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "fit.cfg")
        ConfigDict.ConfigDict(config).write(cfg)

        def batch(stack):
            return Batch(cfg, filelist=[stack], outputdir=tmp, fitfiles=0, fitimages=1, concentrations=0,
                         nosave=True, quiet=True, outbuffer=OutputBuffer(outputDir=tmp, nosave=True, h5=False))

        # PyMca prints "WARNING: Needed N iterations" on stdout: keep stdout for the JSON
        with contextlib.redirect_stdout(sys.stderr):
            warm = batch(np.ascontiguousarray(data[:1, :1]))  # untimed warm-up on the first spectrum
            warm.processList()
            if not warm.record or warm.record[0] is None:
                raise SystemExit("pymca: the warm-up fit of the first spectrum failed")
            b = batch(data)  # McaTheory configured here, untimed
            t0, c0 = time.perf_counter(), time.process_time()
            b.processList()
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0

        out = b.outbuffer
        labels = [str(x) for x in out.labels("parameters")]
        areas = np.asarray(out["parameters"])  # (groups, rows, cols)

    ok = [r for r in b.record if r is not None]
    failed = pixels - len(ok)
    rec = np.array(ok, dtype=np.float64).reshape(-1, 6)
    start = {"zero": offset, "gain": slope, "noise": float(args.noise), "fano": float(args.fano)}
    fitted = {p: float(np.median(rec[:, i])) for i, p in enumerate(DETECTOR)} if len(ok) else {}
    moved = {p: int(np.sum(rec[:, i] != start[p])) for i, p in enumerate(DETECTOR)} if len(ok) else {}
    mean = {}
    for label, plane in zip(labels, areas):
        if label == "Scatter Peak000":
            name = "Elastic"
        elif label == "Scatter Compton000":
            name = "Compton"
        else:
            name = ours.get(label, label)
        mean[name] = float(np.mean(plane, dtype=np.float64))
    log.info("pymca5 %s McaAdvancedFitBatch (nonlinear, free %s, fitweight %d): %d pixels (%d channels, window "
             "%d-%d, %d groups) in %.2f s = %.2f pixels/s; failed %d; median fitted %s (start %s)",
             PyMca5.version(), ",".join(free), args.weight, pixels, chans, first, last, len(labels), seconds,
             pixels / seconds, failed, fitted, start)
    result = {
        "impl": "pymca5-mcatheory", "version": PyMca5.version(), "driver": "McaAdvancedFitBatch",
        "pixels": pixels, "seconds": seconds, "pixels_per_second": pixels / seconds, "cpu_seconds": cpu_seconds,
        "free": free, "fitweight": int(args.weight), "maxiter": int(args.maxiter),
        "start": start, "fitted_median": fitted, "pixels_moved_from_start": moved,
        "iterations_median": float(np.median(rec[:, 4])) if len(ok) else None,
        "at_maxiter": int(np.sum(rec[:, 4] >= args.maxiter)) if len(ok) else None,
        "reduced_chisq_median": float(np.median(rec[:, 5])) if len(ok) else None,
        "failed": failed, "groups": labels, "mean_areas": mean, "skipped": skipped,
        "snip_width": int(args.snip_width), "filter_width": int(args.filter_width),
        "ignored_quadratic": quad if quad != 0 else None, "threads": args.threads,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
