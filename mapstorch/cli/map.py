"""``mapstorch map FILE``: elemental maps of every pixel into an XRF-Maps HDF5 file.

Fits every pixel with the shape parameters of the override file (``--override``, or the one
beside the data) or of a spectrum fit (``--params fitted_override.txt``), by ``--method nnls``
(XRF-Maps' NNLS: SNIP-subtracted, non-negative least squares), ``poisson`` (non-negative
Poisson maximum likelihood with the background in the model) or ``nonlinear`` (parameter maps:
``--parameter-maps`` shape parameters refitted per pixel with the amplitudes). Rows are streamed in chunks
(``--chunk-rows``); each finished chunk is kept in ``OUT.partial/``, so an interrupted run
started again resumes where it stopped; the output file is written (atomically) only when every
chunk is done, and the partial folder is removed then.

The output holds the data in the XRF-Maps version-10 layout and
``/MAPS/XRF_Analyzed/<NNLS|Poisson>/Counts_Per_Sec`` with ``Channel_Names``, plus our own maps
beside them: ``Counts``, ``Counts_Stderr``, ``Counts_Per_Sec_Stderr``, ``Reduced_Chi2``,
``Iterations``, ``Status``; and XRF-Maps' ``ROI`` maps. ``--png DIR`` writes a grid of the maps
with colour bars.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mapstorch.errors import InputError

__all__ = ["add_map_parser", "run_map"]

METHOD_CHOICES = ("nnls", "poisson", "nonlinear")  # mapstorch.maps.METHODS, spelled out so the parser does not import torch


def add_map_parser(sub, data_options) -> None:
    p = sub.add_parser("map", help="elemental maps of every pixel (NNLS or Poisson), streamed and resumable")
    p.add_argument("file", help="XRF-Maps HDF5, fly-scan HDF5, EPICS MDA, GSE MCA, .npy or text")
    p.add_argument("--method", choices=METHOD_CHOICES, default="nnls", help="default: nnls (as XRF-Maps)")
    p.add_argument("--parameter-maps", help="shape parameters --method nonlinear refits per pixel (default "
                   "ENERGY_OFFSET,ENERGY_SLOPE,FWHM_OFFSET)")
    p.add_argument("--params", help="an override file with the shape parameters to use (e.g. from `mapstorch fit "
                   "--out-override`); default: --override / the one beside the data")
    p.add_argument("--elements", help="components to fit (default: the override file's ELEMENTS_TO_FIT)")
    p.add_argument("--detector", default="sum", help="'sum' (default: the fit of the summed spectra), a detector "
                   "index, or 'each' (every element in OUT0, OUT1, ... and their average in OUT, as XRF-Maps "
                   "writes them)")
    p.add_argument("--out", help="output .h5 (default: <file stem>_maps.h5 in the current folder)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--chunk-rows", type=int, help="rows per chunk (default: about 16384 pixels for nnls, 8192 for poisson, "
                   "4096 for nonlinear; on a GPU 131072, nonlinear 65536)")
    p.add_argument("--png", help="write map images (PNG) into this folder")
    p.add_argument("--dask", metavar="ADDRESS", help="fit the chunks on this Dask scheduler (tcp://host:8786)")
    p.add_argument("--dask-local", type=int, metavar="N", help="fit the chunks on a local Dask cluster of N workers")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--library", help="XRF-Maps xrf_library.csv: use XRF-Maps' line tables (with --henke) instead "
                   "of xraylib, for XRF-Maps' exact numbers")
    p.add_argument("--henke", help="XRF-Maps henke.xdr (with --library)")
    from mapstorch.cli.quantify import add_standard_options

    add_standard_options(p, required=False)
    data_options(p)
    p.set_defaults(func=run_map)


def run_map(args: argparse.Namespace) -> int:
    import torch

    from mapstorch.io.atomic import check_target
    from mapstorch.io.files import read_bytes
    from mapstorch.io.hdf5 import write_xrfmaps_h5
    from mapstorch.io.open import open_dataset, override_beside
    from mapstorch.io.override import read_override
    from mapstorch.maps import STATUS_CODES, fit_map
    from mapstorch.maps.average import average_maps
    from mapstorch.maps.fit import _ChunkStore

    read_bytes(args.file, "data file", limit=1)  # a missing file is named before the override is looked for
    out = Path(args.out) if args.out else Path.cwd() / f"{Path(args.file).name.split('.')[0]}_maps.h5"
    check_target(out, "--out")
    if args.png:
        png = Path(args.png)
        if png.exists() and not png.is_dir():
            raise InputError(f"--png {png}: exists and is not a folder")
        if not png.parent.exists():
            raise InputError(f"--png {png}: the folder {png.parent} does not exist")
    if args.standard_info:
        from mapstorch.quant.standards import read_standards

        read_standards(args.standard_info)  # a bad description fails now, not after the fit
    found = args.override or override_beside(args.file)
    override = read_override(found) if found else None
    params = read_override(args.params) if args.params else override
    if params is None and not args.elements:
        raise InputError("mapping needs shape parameters and elements: give --override / --params (an override "
                         "file, e.g. from `mapstorch fit --out-override`) or put one beside the data")
    elements = [e.strip() for e in args.elements.split(",") if e.strip()] if args.elements else None
    line_source = None
    if args.library or args.henke:
        if not (args.library and args.henke):
            raise InputError("--library and --henke go together (XRF-Maps' xrf_library.csv and henke.xdr)")
        from mapstorch.physics.lines import xrfmaps_source

        line_source = xrfmaps_source(args.library, args.henke)

    def params_for(det):
        """XRF-Maps reads maps_fit_parameters_override.txt<N> for detector N when it exists."""
        if args.params or det == "sum" or not found:
            return params, None
        per = Path(f"{found}{int(det)}")
        if per.is_file():
            return read_override(per), per
        return params, None
    work = out.with_name(out.name + ".partial")
    lines = [f"override    {found}" + ("" if args.override else " (found beside the data)")] if found else []
    if args.params:
        lines.append(f"parameters  {args.params}")
    dtype = torch.float32 if args.dtype == "float32" else torch.float64
    if args.dask and args.dask_local:
        raise InputError("give --dask ADDRESS or --dask-local N, not both")
    if args.dask_local is not None and args.dask_local < 1:
        raise InputError(f"--dask-local needs at least 1 worker, got {args.dask_local}")
    cluster = client = None
    if args.dask or args.dask_local:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise InputError("--dask needs the 'distributed' package: pip install 'dask[distributed]'") from None
        import logging

        if not getattr(args, "verbose", 0):  # the cluster's start-up chatter, unless -v
            for name in ("distributed", "dask"):
                logging.getLogger(name).setLevel(logging.WARNING)
        if args.dask_local:
            cluster = LocalCluster(n_workers=args.dask_local, threads_per_worker=1, host="127.0.0.1",
                                   dashboard_address=None)
            client = Client(cluster)
        else:
            client = Client(args.dask)
        lines.append(f"dask        {client.scheduler.address} ({len(client.scheduler_info()['workers'])} workers)")
    with open_dataset(args.file, format=args.format, override=override, channel_axis=args.channel_axis) as ds:
        bar = None
        if not args.no_progress and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=ds.rows * ds.cols, unit="px", desc="mapping", file=sys.stderr, leave=False)

        def progress(done: int, total: int) -> None:
            if bar is not None:
                bar.update(done - bar.n)

        each = str(args.detector).lower() == "each"
        targets = list(range(ds.detectors)) if each else [args.detector]
        runs = []
        try:
            for det in targets:
                det_params, per_file = params_for(det)
                if per_file is not None:
                    lines.append(f"override    {per_file} (detector {det})")
                runs.append(fit_map(ds, det_params, elements, method=args.method, detector=det, dask=client,
                                    line_source=line_source,
                                    chunk_rows=args.chunk_rows, device=args.device, dtype=dtype,
                                    work_dir=work / f"detector_{det}" if each else work,
                                    parameter_maps=[n.strip() for n in args.parameter_maps.split(",") if n.strip()]
                                    if args.parameter_maps else None, progress=progress))
                if bar is not None:
                    bar.reset()
        except KeyboardInterrupt:
            kept = sum(1 for _ in work.rglob("chunk_*.npz")) if work.is_dir() else 0
            if kept:  # say how to go on (mapstorch's main then reports the interruption)
                sys.stderr.write(f"mapstorch: {kept} finished chunk(s) kept in {work}: the same command resumes "
                                 "from them\n")
            raise
        finally:
            if bar is not None:
                bar.close()
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()
        # each element: OUT holds XRF-Maps' average of the elements' maps (its --generate-avg-h5)
        result = average_maps(runs) if each else runs[0]
        # one detector's maps go with that detector's spectra and times (as XRF-Maps' <scan>.h5<N>)
        single = not each and str(args.detector) != "sum"
        source = ds.select([int(args.detector)]) if single else ds
        used = det_params if single and per_file is not None else override
        written = write_xrfmaps_h5(out, source, override=used, results=result.xrfmaps_results(), per_detector=each,
                                   detector_results=[r.xrfmaps_results() for r in runs] if each else None)
        lines.append(f"data        {ds.path}: {ds.rows} x {ds.cols} pixels, detector {args.detector}, "
                     f"{ds.channels} channels")
    if each:
        for det in targets:
            _ChunkStore.discard(work / f"detector_{det}")
    _ChunkStore.discard(work)
    counts = {s: int((result.status == c).sum()) for c, s in STATUS_CODES.items()}
    lines += [
        f"method      {result.method}: {len(result.names)} components, {result.seconds:.1f} s, "
        f"{result.pixels_per_second:.4g} pixels/s fitted",
        "status      " + ", ".join(f"{n} {s}" for s, n in counts.items()),
        f"{'component':<12} {'mean counts':>12} {'median cps':>12} {'median stderr/counts':>21}",
    ]
    import numpy as np

    for i, name in enumerate(result.names):
        c, e = result.counts[i], result.counts_stderr[i]
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(c > 0, e / c, np.nan)
        rel = float(np.nanmedian(ratio)) if np.isfinite(ratio).any() else float("nan")
        lines.append(f"{name:<12} {float(np.mean(c)):12.5g} {float(np.nanmedian(result.counts_per_sec[i])):12.5g} "
                     f"{rel:21.3g}")
    for i, name in enumerate(result.parameter_names):
        v = result.parameters[i]
        lines.append(f"parameter   {name}: median {float(np.nanmedian(v)):.6g}, range {float(np.nanmin(v)):.6g} - "
                     f"{float(np.nanmax(v)):.6g}")
    lines += [f"note        {n}" for n in result.notes]
    if args.png:
        from mapstorch.plotting import plot_maps

        png = Path(args.png)
        png.mkdir(exist_ok=True)
        maps = {n: result.counts_per_sec[i] for i, n in enumerate(result.names)}
        plot_maps(png / "counts_per_sec.png", maps, title=f"{Path(args.file).name}: counts/s ({result.method})",
                  units="cts/s")
        quality = {"reduced chi2": result.reduced_chi2, "iterations": result.iterations.astype(float)}
        quality.update({n: result.parameters[i] for i, n in enumerate(result.parameter_names)})
        plot_maps(png / "quality.png", quality, title="fit quality and parameter maps per pixel",
                  units={n: "" for n in quality})
        lines.append(f"wrote       {png / 'counts_per_sec.png'}, {png / 'quality.png'}")
    lines += [f"wrote       {path}" for path in written]
    if args.standard_info:  # quantify the (summed) maps file in one go
        from mapstorch.cli.quantify import quantify_after

        detector = "sum" if each or str(args.detector) == "sum" else int(args.detector)
        lines += quantify_after(args, out, out, detector, routine=result.routine_name(), replace=True)
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
