"""PyMca5's fast linear map fit (``FastXRFLinearFit``) of a stack of spectra: the baseline of ``maps.py``.

Runs inside ``bench/.venv-pymca`` (``PyMca5``, ``h5py``; see ``_venv.py``), never in the project's
environment. PyMca is called at run time; nothing of it is copied here.

The fit configuration is built in code from PyMca's own defaults
(``ClassMcaTheory.McaTheory().getConfiguration()``), then:

* peaks: one family per component in our names (``Fe`` -> Fe K, ``Ba_L`` -> Ba L, ``Au_M`` -> Au M;
  pile-ups such as ``Si_Cl`` are skipped: PyMca models pile-up differently);
* detector: linear energy calibration ``zero``/``gain`` (PyMca has no quadratic term: a non-zero
  one is reported in the JSON and otherwise ignored), ``noise``/``fano`` from ``--noise``/``--fano``;
* incident energy with its scatter peaks (elastic and Compton) fitted;
* Gaussian peaks only (``hypermetflag = 1``), no escape, no pile-up, no continuum polynomial;
* fit range ``xmin``/``xmax`` = ``--fit-window`` (channels);
* background: ``stripflag = 1``, ``stripalgorithm = 1`` (SNIP), ``snipwidth = --snip-width``
  (channels), ``stripfilterwidth = --filter-width`` (Savitzky-Golay smoothing before SNIP).
  ``FastXRFLinearFit`` then computes and subtracts this SNIP background for *every pixel*
  (``_fitBkgSubtract`` is called on every chunk whenever ``stripflag`` is set; the strip
  algorithm must be SNIP, the iterative strip is refused);
* ``fitMultipleSpectra(y=stack, weight=0, refit=True, concentrations=False)``: unweighted linear
  least squares (SVD) of the background-subtracted spectra; pixels with negative areas are
  refitted with those peaks removed (PyMca's way of keeping areas non-negative).

Only ``fitMultipleSpectra`` is timed (imports, file loading and a one-row warm-up are not).

Usage (normally from ``maps.py``)::

    bench/.venv-pymca/bin/python bench/_pymca_fast.py --spectra map.h5 --calibration -0.0042,0.00952,0 \\
        --elements Fe,Ca,Zn,Ba_L --incident-energy 10 --snip-width 56 --fit-window 105,1156 --threads 2

LAST line printed: JSON ``{"impl": "pymca5", "version": ..., "pixels": n, "seconds": s,
"pixels_per_second": ..., "cpu_seconds": process CPU time of the fit, "names": [...], "pymca_names": [...], "mean_counts": {name: mean area}}``
(``names`` in our convention: ``Fe``, ``Ba_L``, ``Elastic``, ``Compton``; areas are PyMca's peak
group areas, i.e. all lines of the family, not restricted to the fit window).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

log = logging.getLogger("pymca-bench")


def _floats(text: str, n: int) -> list[float]:
    vals = [float(v) for v in text.split(",")]
    if len(vals) != n:
        raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}")
    return vals


def _peaks(elements: list[str]) -> tuple[dict[str, list[str]], dict[str, str], list[str]]:
    """PyMca ``peaks`` config, {PyMca group name: our name}, skipped names."""
    peaks: dict[str, list[str]] = {}
    ours: dict[str, str] = {}
    skipped = []
    for name in elements:
        parts = name.strip().split("_")
        if len(parts) == 1:
            sym, fam = parts[0], "K"
        elif len(parts) == 2 and parts[1].upper() in ("K", "L", "M"):
            sym, fam = parts[0], parts[1].upper()
        else:  # a pile-up pair (Si_Cl): not a PyMca peak family
            skipped.append(name)
            continue
        sym = sym[:1].upper() + sym[1:].lower()
        peaks.setdefault(sym, [])
        if fam not in peaks[sym]:
            peaks[sym].append(fam)
        ours[f"{sym} {fam}"] = name if fam != "K" else sym
    return peaks, ours, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spectra", required=True, help="HDF5 file with dataset /spectra (rows, cols, channels)")
    ap.add_argument("--dataset", default="/spectra")
    ap.add_argument("--calibration", required=True, help="OFFSET,SLOPE,QUADRATIC (keV, keV/ch, keV/ch^2)")
    ap.add_argument("--elements", required=True, help="comma-separated, our names (Fe, Ba_L, Au_M, ...)")
    ap.add_argument("--incident-energy", type=float, required=True, help="keV")
    ap.add_argument("--snip-width", type=int, default=30, help="PyMca snipwidth, channels")
    ap.add_argument("--filter-width", type=int, default=5, help="PyMca stripfilterwidth (smoothing), channels")
    ap.add_argument("--fit-window", required=True, help="FIRST,LAST channel (inclusive)")
    ap.add_argument("--noise", type=float, default=0.1, help="PyMca detector noise: FWHM at 0 keV, keV")
    ap.add_argument("--fano", type=float, default=0.114, help="PyMca Fano factor")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-refit", action="store_true", help="do not refit pixels with negative areas")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy is imported

    import h5py
    import numpy as np
    import PyMca5
    from PyMca5.PyMcaPhysics.xrf import ClassMcaTheory
    from PyMca5.PyMcaPhysics.xrf.FastXRFLinearFit import FastXRFLinearFit
    from PyMca5.PyMcaPhysics.xrf.XRFBatchFitOutput import OutputBuffer

    offset, slope, quad = _floats(args.calibration, 3)
    first, last = (int(v) for v in _floats(args.fit_window, 2))
    peaks, ours, skipped = _peaks([e for e in args.elements.split(",") if e.strip()])
    if skipped:
        log.info("pymca: skipping %s (pile-ups)", ", ".join(skipped))

    with h5py.File(args.spectra, "r") as f:
        data = np.asarray(f[args.dataset][()], dtype=np.float32)
    if data.ndim != 3:
        raise SystemExit(f"{args.spectra}{args.dataset}: expected (rows, cols, channels), got {data.shape}")
    rows, cols, chans = data.shape

    config = ClassMcaTheory.McaTheory().getConfiguration()  # PyMca's defaults, a copy
    config["peaks"] = peaks
    fit = config["fit"]
    fit.update({
        "xmin": first, "xmax": last, "use_limit": 1,
        "stripflag": 1, "stripalgorithm": 1, "snipwidth": int(args.snip_width),
        "stripfilterwidth": int(args.filter_width), "stripanchorsflag": 0,
        "linearfitflag": 1, "fitweight": 0, "continuum": 0,
        "hypermetflag": 1, "escapeflag": 0, "sumflag": 0, "strategyflag": 0,
        "energy": [float(args.incident_energy)], "energyweight": [1.0], "energyflag": [1], "energyscatter": [1],
        "scatterflag": 1,
    })
    det = config["detector"]
    det.update({"zero": offset, "gain": slope, "noise": float(args.noise), "fano": float(args.fano),
                "fixedzero": 1, "fixedgain": 1, "fixednoise": 1, "fixedfano": 1, "fixedsum": 1, "detele": "Si"})
    for att in config["attenuators"].values():
        att[0] = 0  # no attenuators, no matrix: plain emission rates

    fast = FastXRFLinearFit()
    fast.setFitConfiguration(config)
    kwargs = {"weight": 0, "refit": not args.no_refit, "concentrations": False, "save": False}

    # warm-up on the first row (caches in fisx / PyMca's element tables), not timed
    fast.fitMultipleSpectra(y=np.ascontiguousarray(data[:1]), outbuffer=OutputBuffer(), **kwargs)

    t0, c0 = time.perf_counter(), time.process_time()
    out = fast.fitMultipleSpectra(y=data, outbuffer=OutputBuffer(), **kwargs)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0

    labels = list(out.labels("parameters"))
    params = np.asarray(out["parameters"])  # (n_free, rows, cols)
    names, mean = [], {}
    for label, plane in zip(labels, params):
        label = str(label)
        if label == "Scatter Peak000":  # the one incident energy's elastic and Compton peaks
            name = "Elastic"
        elif label == "Scatter Compton000":
            name = "Compton"
        else:
            name = ours.get(label, label)
        names.append(name)
        mean[name] = float(np.mean(plane, dtype=np.float64))
    pixels = rows * cols
    log.info("pymca5 %s: %d pixels (%d channels, window %d-%d, %d peaks) in %.2f s = %.0f pixels/s",
             PyMca5.version(), pixels, chans, first, last, len(labels), seconds, pixels / seconds)
    result = {"impl": "pymca5", "version": PyMca5.version(), "pixels": pixels, "seconds": seconds,
              "pixels_per_second": pixels / seconds, "cpu_seconds": cpu_seconds, "names": names, "pymca_names": [str(x) for x in labels],
              "mean_counts": mean, "skipped": skipped, "snip_width": int(args.snip_width),
              "filter_width": int(args.filter_width), "refit": not args.no_refit, "weight": 0,
              "ignored_quadratic": quad if quad != 0 else None, "threads": args.threads}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
