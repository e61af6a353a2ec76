"""``mapstorch guess FILE``: decide which elements the integrated spectrum needs, with evidence.

Reads the file as ``mapstorch fit`` does (sum of detectors or ``--detector N``; override file
beside the data or ``--override``), runs :func:`~mapstorch.identify.guess_elements` and prints the
chosen list (ready to paste as ``ELEMENTS_TO_FIT``) and a table of evidence. Optional outputs,
each written atomically: ``--json``, ``--plot`` (the spectrum with the chosen families' lines
marked) and ``--out-override`` (the override file with that element list; every other line
kept, or a new file from the fitted values when there is no input override file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_guess_parser", "run_guess"]


def add_guess_parser(sub, data_options) -> None:
    p = sub.add_parser("guess", help="decide which elements are present, with the evidence")
    p.add_argument("file", help="XRF-Maps HDF5, fly-scan HDF5, EPICS MDA, GSE MCA, .npy or text")
    p.add_argument("--incident-energy", type=float, help="incident energy in keV (default: override file, "
                   "data file, or the elastic peak)")
    p.add_argument("--candidates", help="comma-separated families to test, e.g. Fe,Ca,As,Pb_L,Pb_M "
                   "(default: every family the incident energy excites inside the fit window)")
    p.add_argument("--significance", type=float, default=5.0,
                   help="threshold on the likelihood-ratio significance, in sigma (default 5)")
    p.add_argument("--rare-significance", type=float, default=7.0,
                   help="threshold for rarely present elements in the default candidate list (default 7)")
    p.add_argument("--no-pileups", action="store_true", help="do not test pile-ups of the strongest elements")
    p.add_argument("--detector", type=int, help="use this detector element only (default: the sum of all)")
    p.add_argument("--preset", default="2", help="shape parameters fitted alongside (XRF-Maps preset, default 2)")
    p.add_argument("--json", help="write the decision and the evidence per candidate as JSON here")
    p.add_argument("--plot", help="write the spectrum with the chosen elements' lines marked as a PNG here")
    p.add_argument("--out-override", help="write an override file with the chosen ELEMENTS_TO_FIT here")
    p.add_argument("--no-progress", action="store_true", help="no progress messages")
    data_options(p)
    p.set_defaults(func=run_guess)


def run_guess(args: argparse.Namespace) -> int:
    from mapstorch.cli.fit import _check_outputs, load_spectrum
    from mapstorch.identify import guess_elements

    _check_outputs(args)  # the same three outputs as `mapstorch fit`: fail before any work
    data = load_spectrum(args)
    show = sys.stderr.isatty() and not args.no_progress
    result = guess_elements(data.spectrum, data.incident_energy, args.candidates, params=data.override,
                            calibration=data.calibration, significance=args.significance,
                            rare_significance=args.rare_significance, preset=args.preset,
                            pileups=not args.no_pileups,
                            progress=(lambda msg: print(f"guess: {msg}", file=sys.stderr)) if show else None)
    lines = data.head + ["", result.summary()]
    if args.json:
        import json

        from mapstorch.io.atomic import atomic_write_text

        payload = result.to_dict()
        payload["input"] = {"file": str(Path(args.file).resolve()),
                            "override": str(data.override_path) if data.override_path else None,
                            "spectrum": data.what}
        atomic_write_text(Path(args.json), json.dumps(payload, indent=2) + "\n")
        lines.append(f"wrote       {args.json}")
    if args.plot:
        from mapstorch.physics.lines import build_line_table
        from mapstorch.plotting import plot_lines

        shown = result.present + [e.name for e in result.candidates if e.decision == "uncertain"]
        marks = {}
        if shown:
            table = build_line_table(shown)
            for k, name in enumerate(table.names):
                sel = table.component == k
                ratios = table.ratio[sel] / max(float(table.ratio[sel].max()), 1e-30)
                marks[name] = list(zip(table.energy_kev[sel].tolist(), ratios.tolist()))
        fit = result.fit
        plot_lines(args.plot, fit.energies, fit.data, fit.model, marks,
                   title=f"{Path(args.file).name} ({data.what}): {len(result.present)} present",
                   uncertain=[n for n in shown if n not in result.present])
        lines.append(f"wrote       {args.plot}")
    if args.out_override:
        result.to_override(data.override).write(args.out_override)
        lines.append(f"wrote       {args.out_override}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
