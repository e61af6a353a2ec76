"""``mapstorch quantify``: areal densities (ug/cm2) of a maps file from a measured standard."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from mapstorch.errors import InputError

__all__ = ["add_quantify_parser", "run_quantify", "add_standard_options", "quantify_after"]


def add_standard_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--standard-info", required=required, metavar="FILE",
                   help="the standard's description: XRF-Maps maps_standardinfo.txt (or .json / .yaml)")
    p.add_argument("--standard", metavar="DATA", help="the standard's measured data file (default: the FILENAME in "
                   "the description, beside it or in its mda/ folder)")
    p.add_argument("--normalize", default="US_IC", choices=("US_IC", "DS_IC", "SR_Current", "SR_current"),
                   help="normaliser of the quantified maps (default US_IC)")
    p.add_argument("--direct", action="store_true", help="the standard's own elements use their own measured factor "
                   "instead of the fitted curve")
    p.add_argument("--calibration-plot", metavar="PNG", help="write the calibration curve with the standard's points")


def add_quantify_parser(sub, data_options) -> None:
    p = sub.add_parser("quantify", help="areal densities (ug/cm2) of a maps file from a measured standard",
                       description="Fit the standard as the maps were fitted, calibrate against each normaliser "
                       "(a physics curve over Z with one fitted scale, as XRF-Maps), and write the maps file again "
                       "with /MAPS/Quantification and the quantified maps (ug/cm2) with their errors.")
    p.add_argument("maps", help="a maps file (.h5 written by `mapstorch map` or XRF-Maps)")
    add_standard_options(p, required=True)
    p.add_argument("--routine", help="which /MAPS/XRF_Analyzed group (default NNLS, else Fitted, else Poisson)")
    p.add_argument("--detector", default="sum", help="the standard's detector: 'sum' (default) or an index; match "
                   "the maps' --detector")
    p.add_argument("--out", help="output .h5 (default: <maps stem>_quantified.h5 beside the maps file)")
    p.add_argument("--override", help="override file (default: beside the maps file, else beside the standard)")
    p.add_argument("--library", help="XRF-Maps xrf_library.csv: its line and absorption tables (with --henke) for "
                   "XRF-Maps' exact calibration")
    p.add_argument("--henke", help="XRF-Maps henke.xdr (with --library)")
    p.set_defaults(func=run_quantify)


def _tables(args):
    if not (args.library or args.henke):
        return None, None
    if not (args.library and args.henke):
        raise InputError("--library and --henke go together (XRF-Maps' xrf_library.csv and henke.xdr)")
    from mapstorch.physics.lines import xrfmaps_source
    from mapstorch.quant.physics import XrfMapsTables

    return XrfMapsTables(args.library, args.henke), xrfmaps_source(args.library, args.henke)


def quantify_after(args, maps_path, out, detector, routine=None, replace: bool = False) -> list[str]:
    """Quantify ``maps_path`` into ``out`` with the standard options of ``args``; report lines."""
    from mapstorch.plotting import plot_calibration
    from mapstorch.quant.apply import quantify_file
    from mapstorch.quant.calibrate import shell_of

    tables, source = _tables(args)
    r = quantify_file(maps_path, args.standard_info, out, standard_file=args.standard,
                      normaliser=args.normalize, routine=routine, override=getattr(args, "override", None),
                      detector=detector, tables=tables, line_source=source, direct=args.direct, replace=replace)
    cal = r.calibration[r.normaliser]
    stds = [ms.standard for ms in r.calibration.measurements]
    lines = [f"standard    {', '.join(st.file for st in stds)} ({r.routine}, detector {detector}, lines from "
             f"{r.calibration.tables})",
             f"calibration against {r.normaliser}: scale {cal.scale:.6g} +- {cal.scale_stderr:.2g}, physics misfit "
             f"{100 * cal.misfit:.1f} % (relative error of the curve {100 * cal.relative_error():.1f} %)",
             f"{'element':<8} {'certified':>10} {'recovered':>10} {'+-':>8}   (the standard quantified with the curve)"]
    for el, (value, err) in cal.recovered().items():
        w = next(st.weights[el] for st in stds if el in st.weights)
        lines.append(f"{el:<8} {w:10.4g} {value:10.4g} {err:8.2g}")
    lines.append(f"{'channel':<8} {'median ug/cm2':>14} {'median stderr':>14}")
    for name, (value, err) in r.maps.items():
        med = float(np.nanmedian(value)) if np.isfinite(value).any() else math.nan
        lines.append(f"{name:<8} {med:14.4g} {float(np.nanmedian(err)) if np.isfinite(err).any() else math.nan:14.3g}")
    lines += [f"note        {n}" for n in r.notes]
    if r.written is not None:
        lines.append(f"wrote       {r.written}")
    if args.calibration_plot:
        points = {}
        for i, el in enumerate(cal.elements):
            z, shell = shell_of(el)
            points[el] = (z, shell, float(cal.info[i, 8]), float(cal.measured_stderr[i]))
        plot_calibration(args.calibration_plot, cal.curve, points,
                         title=f"calibration against {r.normaliser} ({r.routine})",
                         units=f"cts/s per ug/cm2 per {r.normaliser}")
        lines.append(f"wrote       {args.calibration_plot}")
    return lines


def run_quantify(args: argparse.Namespace) -> int:
    maps = Path(args.maps)
    if not maps.is_file():
        raise InputError(f"{maps}: no such maps file")
    out = Path(args.out) if args.out else maps.with_name(f"{maps.name.split('.')[0]}_quantified.h5")
    try:
        detector = args.detector if args.detector == "sum" else int(args.detector)
    except ValueError:
        raise InputError(f"--detector {args.detector}: give 'sum' or a detector index") from None
    sys.stdout.write("\n".join(quantify_after(args, maps, out, detector, args.routine)) + "\n")
    return 0
