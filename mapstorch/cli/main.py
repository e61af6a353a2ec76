"""The ``mapstorch`` command: argument parsing and error reporting for every subcommand.

Errors the user can fix (bad file, bad element, bad option) print one line,
``mapstorch: error: <what, where, how to fix>``, and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from mapstorch.errors import MapstorchError

__all__ = ["main", "build_parser"]

log = logging.getLogger("mapstorch")


def _cmd_demo(args: argparse.Namespace) -> int:
    from mapstorch.cli.demo import run_demo

    out = run_demo(args.out, seed=args.seed)
    sys.stdout.write((out / "summary.txt").read_text(encoding="utf-8"))
    sys.stdout.write(f"\nDemo outputs written to {out.resolve()}\n")
    return 0


def _cmd_lines(args: argparse.Namespace) -> int:
    from mapstorch.physics.lines import build_line_table, xrfmaps_source

    source = None
    if args.library or args.henke:
        if not (args.library and args.henke):
            raise MapstorchError("--library and --henke go together (xrf_library.csv and henke.xdr)")
        source = xrfmaps_source(args.library, args.henke)
    table = build_line_table(args.components, source=source, detector=args.detector)
    rows = [f"{'component':<10} {'line':<8} {'energy keV':>11} {'ratio':>9} {'mu_fraction':>12} {'edge keV':>9}"]
    for name in table.names:
        d = table.lines_of(name)
        for i in range(len(d["line"])):
            excited = "" if args.incident_energy is None or d["gate_edge_kev"][i] < args.incident_energy else "  (not excited)"
            rows.append(
                f"{name:<10} {d['line'][i]:<8} {d['energy_kev'][i]:11.4f} {d['ratio'][i]:9.5f} "
                f"{d['mu_fraction'][i]:12.4f} {d['gate_edge_kev'][i]:9.4f}{excited}"
            )
    sys.stdout.write("\n".join(rows) + f"\n\nsource: {table.source}, detector: {table.detector}\n")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from mapstorch.io.open import open_dataset

    with open_dataset(args.file, format=args.format, override=args.override or "auto",
                      channel_axis=args.channel_axis) as ds:
        spectra = ds.integrated(None)  # (detectors, channels), one pass over the file
        info = ds.summary(integrated=spectra)
        lines = [
            f"file        {ds.path}",
            f"format      {ds.format}",
            f"size        {ds.rows} rows x {ds.cols} cols x {ds.detectors} detectors x {ds.channels} channels",
        ]
        for d, (name, cal, counts) in enumerate(zip(ds.detector_names, ds.calibration, info["total_counts"])):
            lines.append(f"detector {d}  {name:<28} E = {cal[0]:.6g} + {cal[1]:.6g} c + {cal[2]:.3g} c^2 keV"
                         f"   {counts:.6g} counts")
        lt = info["live_time_range"]
        lines.append("live time   " + (f"{lt[0]:.4g} - {lt[1]:.4g} s per pixel" if lt else "not recorded"))
        lines.append(f"incident    {ds.incident_energy:.4g} keV" if ds.incident_energy else "incident    not recorded")
        roles = ", ".join(f"{r}={n}" for r, n in ds.scaler_roles.items())
        lines.append(f"scalers     {len(ds.scalers)}" + (f" ({roles})" if roles else ""))
        for note in ds.notes:
            lines.append(f"note        {note}")
        if args.plot:
            from mapstorch.plotting import plot_spectrum

            comps = {name: spectra[i] for i, name in enumerate(ds.detector_names)} if ds.detectors > 1 else {}
            plot_spectrum(args.plot, ds.energy(0), spectra.sum(0), comps,
                          data_label="sum of detectors" if ds.detectors > 1 else ds.detector_names[0],
                          title=f"{Path(ds.path).name}: integrated spectra ({ds.rows} x {ds.cols} pixels)")
            lines.append(f"plot        {args.plot}")
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        _write_json(args.json, info)
    return 0


def _write_json(path: str, payload: dict) -> None:
    import json

    from mapstorch.io.override import atomic_write_text

    atomic_write_text(Path(path), json.dumps(payload, indent=2) + "\n")


def _cmd_convert(args: argparse.Namespace) -> int:
    from mapstorch.io.hdf5 import write_xrfmaps_h5
    from mapstorch.io.open import open_dataset, override_beside
    from mapstorch.io.override import read_override

    found = args.override or override_beside(args.file)
    override = read_override(found) if found else None
    lines = [f"override    {found}" + ("" if args.override else " (found beside the data)")] if found else []
    with open_dataset(args.file, format=args.format, override=override, channel_axis=args.channel_axis) as ds:
        per = []
        if found and args.per_detector:  # maps_fit_parameters_override.txt<N> beside it, as XRF-Maps
            base = Path(found)
            per = [read_override(f"{base}{d}") if Path(f"{base}{d}").is_file() else None for d in range(ds.detectors)]
            lines += [f"override    {base}{d} (detector {d})" for d, o in enumerate(per) if o is not None]
        written = write_xrfmaps_h5(args.output, ds, override=override, per_detector=args.per_detector,
                                   detector_overrides=per if any(o is not None for o in per) else None)
        lines += [f"note        {n}" for n in ds.notes]
    lines += [f"wrote       {path}" for path in written]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mapstorch import __version__

    parser = argparse.ArgumentParser(
        prog="mapstorch",
        description="Fit X-ray fluorescence spectra with a differentiable MAPS model in PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"mapstorch {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="simulate data with known truth, run every capability, write plots")
    p.add_argument("--out", default="mapstorch-demo", help="output folder (default: ./mapstorch-demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulation")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("info", help="explore a data file: format, sizes, calibration, counts, scalers")
    p.add_argument("file", help="XRF-Maps HDF5, fly-scan HDF5, EPICS MDA, GSE MCA, .npy or text")
    p.add_argument("--json", help="also write the facts as JSON to this file")
    p.add_argument("--plot", help="write the integrated spectra as a PNG to this file")
    _data_options(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("convert", help="convert MDA / fly scan / MCA / NumPy into the XRF-Maps HDF5 layout")
    p.add_argument("file", help="input data file")
    p.add_argument("-o", "--output", required=True, help="output .h5 file (written atomically)")
    p.add_argument("--per-detector", action="store_true",
                   help="also write one file per detector element (.h50, .h51, ...) as XRF-Maps does")
    _data_options(p)
    p.set_defaults(func=_cmd_convert)

    from mapstorch.cli.fit import add_fit_parser

    add_fit_parser(sub, _data_options)

    from mapstorch.cli.guess import add_guess_parser

    add_guess_parser(sub, _data_options)

    from mapstorch.cli.map import add_map_parser

    add_map_parser(sub, _data_options)

    from mapstorch.cli.quantify import add_quantify_parser

    add_quantify_parser(sub, _data_options)

    from mapstorch.cli.app import add_app_parser

    add_app_parser(sub)

    p = sub.add_parser("lines", help="show the emission lines of components, e.g. 'Fe Pb_L Au_M Si_Cl'")
    p.add_argument("components", nargs="+", help="component names: Fe, Fe_L, Au_M, Si_Cl, ...")
    p.add_argument("--detector", choices=("Si", "Ge"), default="Si", help="detector material (mu_fraction)")
    p.add_argument("--library", help="XRF-Maps xrf_library.csv (default: xraylib)")
    p.add_argument("--henke", help="XRF-Maps henke.xdr (with --library)")
    p.add_argument("--incident-energy", type=float, help="mark lines this energy (keV) cannot excite")
    p.set_defaults(func=_cmd_lines)
    return parser


def _data_options(p: argparse.ArgumentParser) -> None:
    from mapstorch.io.open import FORMATS

    p.add_argument("--override", help="maps_fit_parameters_override.txt: scaler roles, calibration "
                   "(default: the one in the data file's folder or its parent, if any)")
    p.add_argument("--format", choices=FORMATS, help="skip format detection")
    p.add_argument("--channel-axis", type=int, help="for .npy / text arrays: the axis that holds channels")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from mapstorch.allocator import tune_allocator
    from mapstorch.openmp import tune_openmp

    tune_openmp()  # before anything imports torch: OpenMP's threads spin less (mapstorch.openmp)

    tune_allocator()  # large arrays from the heap, reused: fewer page faults (mapstorch.allocator)
    try:
        return int(args.func(args) or 0)
    except MapstorchError as exc:
        sys.stderr.write(f"mapstorch: error: {exc}\n")
        return 2
    except OSError as exc:  # e.g. an output folder that cannot be created
        sys.stderr.write(f"mapstorch: error: {exc.strerror or exc}: {exc.filename or ''}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("mapstorch: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
