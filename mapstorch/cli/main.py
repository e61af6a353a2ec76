"""The ``mapstorch`` command: argument parsing and error reporting for every subcommand.

Errors the user can fix (bad file, bad element, bad option) print one line,
``mapstorch: error: <what, where, how to fix>``, and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

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

    p = sub.add_parser("lines", help="show the emission lines of components, e.g. 'Fe Pb_L Au_M Si_Cl'")
    p.add_argument("components", nargs="+", help="component names: Fe, Fe_L, Au_M, Si_Cl, ...")
    p.add_argument("--detector", choices=("Si", "Ge"), default="Si", help="detector material (mu_fraction)")
    p.add_argument("--library", help="XRF-Maps xrf_library.csv (default: xraylib)")
    p.add_argument("--henke", help="XRF-Maps henke.xdr (with --library)")
    p.add_argument("--incident-energy", type=float, help="mark lines this energy (keV) cannot excite")
    p.set_defaults(func=_cmd_lines)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
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
