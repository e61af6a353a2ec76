"""``mapstorch fit FILE``: fit the integrated spectrum of a data file and report it.

Reads any format :func:`~mapstorch.io.open.open_dataset` takes, sums the map (all detectors, or
``--detector N``), fits it with :func:`~mapstorch.fit.fit_spectrum` and prints a one-screen
summary. Optional outputs (each written atomically): ``--json`` (counts and parameters with
standard errors, fit statistics), ``--plot`` (PNG: data, model, background, components,
residuals) and ``--out-override`` (an override file XRF-Maps can read, with the fitted values
and every other line of the input override file unchanged).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mapstorch.errors import InputError

__all__ = ["add_fit_parser", "run_fit", "load_spectrum", "Loaded"]


#: The choices of --optimizer and --objective (mapstorch.fit's OPTIMIZERS and OBJECTIVES, spelled
#: out here so that building the parser does not import PyTorch; a test keeps them equal).
OPTIMIZER_CHOICES = ("lm", "varpro", "lbfgs", "adam")
OBJECTIVE_CHOICES = ("poisson", "wls", "mse")


def add_fit_parser(sub, data_options) -> None:
    from mapstorch.parameters.table import PRESETS

    OPTIMIZERS, OBJECTIVES = OPTIMIZER_CHOICES, OBJECTIVE_CHOICES

    p = sub.add_parser("fit", help="fit the integrated spectrum: all parameters and amplitudes, with errors")
    p.add_argument("file", help="XRF-Maps HDF5, fly-scan HDF5, EPICS MDA, GSE MCA, .npy or text")
    p.add_argument("--elements", help="components to fit, e.g. Fe,Ca,Pb_L,Si_Cl (default: the override file's)")
    p.add_argument("--incident-energy", type=float, help="incident energy in keV (default: override file, "
                   "data file, or the elastic peak)")
    p.add_argument("--detector", type=int, help="fit this detector element only (default: the sum of all)")
    p.add_argument("--preset", default="2", help=f"XRF-Maps fit preset: {', '.join(PRESETS)} (default 2)")
    p.add_argument("--free", help="comma-separated shape parameters to fit instead of the preset's")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="lm", help="default: lm (Levenberg-Marquardt)")
    p.add_argument("--objective", choices=OBJECTIVES, default="poisson", help="default: poisson (deviance)")
    p.add_argument("--sparsity", type=float, default=0.0, help="L1 penalty per element count (default 0)")
    p.add_argument("--guess", choices=("auto", "yes", "no"), default="auto",
                   help="automatic starting calibration (default: when no override file gives one)")
    p.add_argument("--max-iter", type=int, help="iterations per stage (default 100; L-BFGS 50, Adam 500)")
    p.add_argument("--out-override", help="write the fitted values into an override file here")
    p.add_argument("--plot", help="write data, model, components and residuals as a PNG here")
    p.add_argument("--json", help="write counts, parameters, errors and statistics as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    data_options(p)
    p.set_defaults(func=run_fit)


def _check_outputs(args: argparse.Namespace) -> None:
    """Fail before fitting if an output cannot be written (missing folder, a folder in the way)."""
    from mapstorch.io.atomic import check_target

    for opt in ("out_override", "plot", "json"):
        path = getattr(args, opt)
        if path:
            check_target(Path(path), f"--{opt.replace('_', '-')}")


class Loaded:
    """The integrated spectrum a command works on, with what it came with."""

    def __init__(self, spectrum, calibration, what: str, incident_energy, override, override_path, head: list[str]):
        self.spectrum, self.calibration, self.what = spectrum, calibration, what
        self.incident_energy, self.override, self.override_path, self.head = (incident_energy, override,
                                                                             override_path, head)


def load_spectrum(args: argparse.Namespace) -> Loaded:
    """Open ``args.file`` (with its override file), sum the map (``args.detector`` or all
    detectors), and settle the incident energy (``--incident-energy``, else the override file's,
    else the data file's when the spectrum agrees, see ``check_incident_energy``)."""
    from mapstorch.io.open import open_dataset, override_beside
    from mapstorch.io.override import read_override

    found = args.override or override_beside(args.file)
    override = read_override(found) if found else None
    head = [f"override    {found}" + ("" if args.override else " (found beside the data)")] if found else []
    with open_dataset(args.file, format=args.format, override=override, channel_axis=args.channel_axis) as ds:
        if args.detector is not None:
            if not 0 <= args.detector < ds.detectors:
                raise InputError(f"--detector {args.detector}: {ds.path} has detectors 0-{ds.detectors - 1}")
            spectrum, cal, what = ds.integrated(args.detector), ds.calibration[args.detector], f"detector {args.detector}"
        else:
            spectrum, cal = ds.integrated("sum"), ds.calibration[0]
            what = "sum of detectors" if ds.detectors > 1 else ds.detector_names[0] if ds.detector_names else "spectrum"
            from mapstorch.io.dataset import aligned_sum, calibration_spread

            spread = calibration_spread(ds.calibration, ds.channels)
            if spread > 0.5:  # sum on detector 0's energy scale, or the peaks broaden
                spectrum = aligned_sum(ds.integrated(None), ds.calibration)
                head.append(f"note        the detector elements' calibrations differ by up to {spread:.1f} channels: "
                            "their spectra are summed on detector 0's energy scale")
        incident, e0_note = args.incident_energy, None
        if incident is None and ds.incident_energy and not (override and "COHERENT_SCT_ENERGY" in override.parameters):
            from mapstorch.fit.guess import check_incident_energy

            incident, e0_note = check_incident_energy(spectrum, ds.incident_energy, *cal)
        head += [f"data        {ds.path}: {ds.rows} x {ds.cols} pixels, {what}, {ds.channels} channels, "
                 f"{spectrum.sum():.4g} counts"]
        head += [f"note        {n}" for n in ds.notes] + ([f"note        {e0_note}"] if e0_note else [])
    return Loaded(spectrum, cal, what, incident, override, found, head)


def run_fit(args: argparse.Namespace) -> int:
    from mapstorch.fit import fit_spectrum

    _check_outputs(args)
    data = load_spectrum(args)
    spectrum, cal, what, incident = data.spectrum, data.calibration, data.what, data.incident_energy
    override, found, head = data.override, data.override_path, data.head
    elements = [e.strip() for e in args.elements.split(",") if e.strip()] if args.elements else None
    free = [n.strip() for n in args.free.split(",") if n.strip()] if args.free else None
    guess = {"auto": None, "yes": True, "no": False}[args.guess]
    bar = _progress(disabled=args.no_progress)
    try:
        result = fit_spectrum(spectrum, elements, params=override, calibration=cal, incident_energy=incident,
                              preset=args.preset, free=free, optimizer=args.optimizer, objective=args.objective,
                              sparsity=args.sparsity, guess=guess, max_iter=args.max_iter,
                              progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    lines = head + ["", result.summary()]
    if args.json:
        import json

        from mapstorch.io.atomic import atomic_write_text

        payload = result.to_dict()
        payload["input"] = {"file": str(Path(args.file).resolve()), "override": str(found) if found else None,
                            "spectrum": what}
        atomic_write_text(Path(args.json), json.dumps(payload, indent=2) + "\n")
        lines.append(f"wrote       {args.json}")
    if args.plot:
        from mapstorch.plotting import plot_spectrum

        comps = {k: v for k, v in result.components.items()}
        plot_spectrum(args.plot, result.energies, result.data, comps, residual_model=result.model,
                      title=f"{Path(args.file).name} ({what}): {result.status}, reduced chi2 {result.reduced_chi2:.3g}")
        lines.append(f"wrote       {args.plot}")
    if args.out_override:
        result.to_override(override).write(args.out_override)  # every other line of the input stays
        lines.append(f"wrote       {args.out_override}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0 if result.status != "non-finite" else 1


class _Bar:
    """A tqdm progress line on stderr: stage, iteration and objective."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=None, desc="fitting", unit="it", file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(self, stage: str, iteration: int, loss: float) -> None:
        self.bar.set_description(f"fitting [{stage}]", refresh=False)
        self.bar.set_postfix_str(f"objective {loss:.6g}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _progress(disabled: bool) -> _Bar | None:
    if disabled or not sys.stderr.isatty():
        return None
    return _Bar()
