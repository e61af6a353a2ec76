"""Benchmark: NNLS maps, mapstorch against XRF-Maps itself, on the same file, side by side.

XRF-Maps (AdvancedPhotonSource/XRF-Maps) is a C++ program, not on PyPI: build it yourself (see
``tests/golden/README.md`` for a build on Debian 12) and pass the executable with
``--xrfmaps-bin``; its ``reference/`` folder must sit beside ``bin/``, as in its source tree.

One synthetic map (``mapstorch.synthetic.simulate_map``, the demo sample at 10 keV, default
256 x 256 pixels x 2048 channels, the same map ``bench/maps.py`` fits) is written as a data set
folder in XRF-Maps' own layout: ``img.dat/synth.mda.h50`` (v10, gzip, written by our
``write_xrfmaps_h5``) and ``maps_fit_parameters_override.txt`` (the simulation's parameters).
Then, each with ``--threads`` threads (2):

* XRF-Maps: ``xrf_maps --dir DIR --files synth.mda --fit nnls --detectors 0 --nthreads 2``. It
  loads the spectra from ``img.dat/synth.mda.h50`` (as it reloads a data set it analysed before),
  fits every pixel (per-pixel SNIP, NNLS) and writes the maps into the same file. Its log's
  ``Fitting [ NNLS ] elapsed time`` is the fit alone (spectra in memory): ``baseline``. The whole
  run (load, fit, save) is ``baseline_total_seconds``.
* mapstorch: ``open_dataset`` + ``fit_map(method="nnls")`` with XRF-Maps' line tables (the
  ``reference/`` folder's ``xrf_library.csv``, ``henke.xdr``), reading the spectra from the same
  file included (after an untimed warm-up on one row): ``ours``, the best of ``--repeats`` (3).
  ``mapstorch map`` on the file (a fresh process: start-up, reading, fitting, writing the output
  file) is ``ours_total_seconds``.

The two maps are compared (``max_rel_diff``: per component, the largest difference over the
map's maximum). LAST line printed::

    {"metric": "nnls_map_pixels_per_second_vs_xrfmaps", "ours": x, "baseline": y, "ratio": x/y, ...}

Usage::

    .venv/bin/python bench/xrfmaps.py --xrfmaps-bin /path/to/XRF-Maps/bin/xrf_maps [--rows 256]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "2")
from mapstorch.openmp import tune_openmp  # noqa: E402 -- before torch, as the mapstorch command does

tune_openmp()

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mapstorch.allocator import tune_allocator  # noqa: E402
from mapstorch.io import open_dataset  # noqa: E402
from mapstorch.io.dataset import Dataset  # noqa: E402
from mapstorch.io.hdf5 import write_xrfmaps_h5  # noqa: E402
from mapstorch.io.override import new_override, read_override  # noqa: E402
from mapstorch.maps import fit_map  # noqa: E402
from mapstorch.physics.lines import xrfmaps_source  # noqa: E402
from mapstorch.synthetic import simulate_map  # noqa: E402

log = logging.getLogger("bench")
_FIT_TIME = re.compile(r"Fitting \[ NNLS \] elapsed time: ([0-9.eE+-]+)s")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _write_dataset(folder: Path, rows: int, cols: int, seed: int) -> Path:
    """The synthetic map as an XRF-Maps data set folder; returns the override file."""
    sim = simulate_map(rows, cols, seed=seed)
    ps = sim.params
    cal = np.array([[float(ps[n]) for n in ("ENERGY_OFFSET", "ENERGY_SLOPE", "ENERGY_QUADRATIC")]])
    counts = sim.counts.astype(np.float32)[:, :, None, :]
    ones = np.ones((rows, cols, 1))
    ds = Dataset(path="synth", format="npy", rows=rows, cols=cols, detectors=1, channels=counts.shape[-1],
                 calibration=cal, spectra=counts, live_time=ones, real_time=ones)
    override = folder / "maps_fit_parameters_override.txt"
    ov = new_override(ps)
    ov.write(override)
    (folder / "img.dat").mkdir()
    write_xrfmaps_h5(folder / "img.dat" / "synth.mda.h5", ds, override=ov, per_detector=True)
    return override


def _xrfmaps_maps(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        group = f["MAPS/XRF_Analyzed/NNLS"]
        names = [n.decode() for n in group["Channel_Names"][()]]
        return dict(zip(names, group["Counts_Per_Sec"][()].astype(np.float64)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--xrfmaps-bin", required=True, help="the xrf_maps executable (its reference/ beside bin/)")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=3600.0, help="for XRF-Maps' run, seconds")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    exe = Path(args.xrfmaps_bin).resolve()
    reference = exe.parent.parent / "reference"
    if not exe.is_file() or not os.access(exe, os.X_OK):
        raise SystemExit(f"--xrfmaps-bin {exe}: not an executable file")
    if not (reference / "xrf_library.csv").is_file() or not (reference / "henke.xdr").is_file():
        raise SystemExit(f"{reference}: XRF-Maps' reference folder (xrf_library.csv, henke.xdr) is not beside {exe.parent}")
    torch.set_num_threads(args.threads)
    tune_allocator()
    pixels = args.rows * args.cols
    with tempfile.TemporaryDirectory(prefix="mapstorch-xrfmaps-bench-") as tmp:
        folder = Path(tmp) / "synth"
        folder.mkdir()
        override = _write_dataset(folder, args.rows, args.cols, args.seed)
        data = folder / "img.dat" / "synth.mda.h50"
        ours_input = Path(tmp) / "synth_input.h50"  # XRF-Maps writes its maps into its input file
        ours_input.write_bytes(data.read_bytes())
        log.info("map %d x %d x 2048 written (%.0f MB gzip); XRF-Maps fitting...", args.rows, args.cols,
                 data.stat().st_size / 1e6)

        t0 = time.perf_counter()
        run = subprocess.run([str(exe), "--dir", str(folder), "--files", "synth.mda", "--fit", "nnls",
                              "--detectors", "0", "--nthreads", str(args.threads)], capture_output=True, text=True,
                             timeout=args.timeout)
        xrfmaps_total = time.perf_counter() - t0
        text = _ANSI.sub("", run.stdout + run.stderr)
        found = _FIT_TIME.search(text)
        if run.returncode != 0 or found is None:
            raise SystemExit(f"XRF-Maps failed (exit {run.returncode}); the end of its log:\n{text[-3000:]}")
        xrfmaps_fit = float(found.group(1))
        theirs = _xrfmaps_maps(data)

        ov = read_override(override)
        source = xrfmaps_source(reference / "xrf_library.csv", reference / "henke.xdr")
        with open_dataset(ours_input, override=ov) as ds:
            warm = Dataset(path="<warm-up>", format="npy", rows=1, cols=ds.cols, detectors=1, channels=ds.channels,
                           calibration=ds.calibration, spectra=ds.read(slice(0, 1)), live_time=ds.live_time[:1])
            fit_map(warm, ov, method="nnls", line_source=source)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                result = fit_map(ds, ov, method="nnls", line_source=source)
                times.append(time.perf_counter() - t0)
        ours_seconds = min(times)
        maps = result.xrfmaps_results()["NNLS"]
        ours = dict(zip(maps["channel_names"], maps["counts_per_sec"].astype(np.float64)))
        diffs = {n: float(np.abs(ours[n] - theirs[n]).max() / max(np.abs(theirs[n]).max(), 1e-30))
                 for n in theirs if n in ours and n not in ("Fit_Residual", "Num_Iter", "Sum_Elastic_Inelastic")}

        out = Path(tmp) / "ours_maps.h5"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mapstorch", "map", str(ours_input), "--override", str(override),
                        "--library", str(reference / "xrf_library.csv"), "--henke", str(reference / "henke.xdr"),
                        "--out", str(out), "--no-progress"], check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        ours_total = time.perf_counter() - t0

    ours_pps, theirs_pps = pixels / ours_seconds, pixels / xrfmaps_fit
    log.info("mapstorch %.0f pixels/s (reading included), XRF-Maps %.0f pixels/s (fit alone): %.1fx; whole runs "
             "%.1f s and %.1f s", ours_pps, theirs_pps, ours_pps / theirs_pps, ours_total, xrfmaps_total)
    log.info("largest difference over the map's maximum: %s", ", ".join(f"{n} {v:.1e}" for n, v in diffs.items()))
    print(json.dumps({
        "metric": "nnls_map_pixels_per_second_vs_xrfmaps", "ours": ours_pps, "baseline": theirs_pps,
        "ratio": ours_pps / theirs_pps, "pixels": pixels, "ours_seconds": ours_seconds,
        "ours_all_seconds": times, "baseline_seconds": xrfmaps_fit, "ours_total_seconds": ours_total,
        "baseline_total_seconds": xrfmaps_total, "total_ratio": xrfmaps_total / ours_total,
        "max_rel_diff": diffs, "threads": args.threads, "xrfmaps_bin": str(exe), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
