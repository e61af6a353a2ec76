"""What the web apps compute, as plain functions (tested without a browser).

The marimo apps (``mapstorch app NAME``) hold only widgets and layout; opening a scan, summing
it, picking a pixel, marking lines, guessing elements, fitting and mapping happen here, through
mapstorch's public API. Every function raises :class:`~mapstorch.errors.MapstorchError`
subclasses with a message fit to show in the page.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mapstorch.errors import InputError

__all__ = ["Scan", "open_scan", "pixel_spectrum", "line_marks", "start_file"]


@dataclass
class Scan:
    """A scan opened for the apps: its facts, its integrated spectra and its images.

    integrated : ``[detectors, channels]`` counts; ``spectrum`` the sum over detectors (on
    detector 0's energy scale when their calibrations differ); ``energy`` detector 0's channel
    energies (keV). total : ``[rows, cols]`` counts per pixel; scalers : ``{name: [rows, cols]}``.
    incident_energy : keV, from the override file, else the data file (checked against the
    elastic peak), else None. elements : the override file's ``ELEMENTS_TO_FIT`` (may be empty).
    """

    path: str
    format: str
    rows: int
    cols: int
    detectors: int
    channels: int
    calibration: np.ndarray
    energy: np.ndarray
    integrated: np.ndarray
    spectrum: np.ndarray
    total: np.ndarray
    scalers: dict[str, np.ndarray]
    live_time: np.ndarray | None
    incident_energy: float | None
    override: object | None
    override_path: str | None
    elements: list[str]
    summary: dict
    notes: list[str] = field(default_factory=list)

    def facts(self) -> list[tuple[str, str]]:
        """``(label, value)`` rows for a summary table."""
        off, slope, quad = self.calibration[0]
        rows = [
            ("file", self.path),
            ("format", self.format),
            ("pixels", f"{self.rows} x {self.cols}"),
            ("detectors", str(self.detectors)),
            ("channels", str(self.channels)),
            ("energy calibration", f"{off:.5g} + {slope:.6g} * ch + {quad:.3g} * ch^2 keV"),
            ("total counts", f"{float(self.total.sum()):.4g}"),
            ("incident energy", "unknown" if self.incident_energy is None else f"{self.incident_energy:.4g} keV"),
            ("override file", self.override_path or "none found"),
            ("elements to fit", ", ".join(self.elements) or "none given"),
            ("scalers", ", ".join(self.scalers) or "none"),
        ]
        if self.live_time is not None:
            rows.append(("live time", f"{np.nanmin(self.live_time):.4g}-{np.nanmax(self.live_time):.4g} s"))
        return rows


def start_file() -> str:
    """The file named on the command line of ``mapstorch app NAME FILE`` (``""`` if none)."""
    try:
        import marimo as mo

        value = mo.cli_args().get("file")
        if value:
            return str(value)
    except Exception:  # noqa: BLE001 -- not under marimo, or no such argument
        pass
    return os.environ.get("MAPSTORCH_APP_FILE", "")


def open_scan(path: str | os.PathLike[str], override: str | os.PathLike[str] | None = None) -> Scan:
    """Open ``path`` (any format ``mapstorch`` reads) with its override file (given, or found
    beside the data), read it once, and return a :class:`Scan`."""
    from mapstorch.fit.guess import check_incident_energy
    from mapstorch.io import open_dataset, override_beside, read_override
    from mapstorch.io.dataset import aligned_sum, calibration_spread

    path = str(path).strip()
    if not path:
        raise InputError("no file given: type a path or pick a file")
    if not Path(path).exists():
        raise InputError(f"{path}: no such file")
    found = override or override_beside(path)
    ovr = read_override(found) if found else None
    with open_dataset(path, override=ovr) as ds:
        integrated = np.zeros((ds.detectors, ds.channels))
        total = np.zeros((ds.rows, ds.cols))
        for rows, block in ds.iter_rows():
            integrated += block.sum(axis=(0, 1), dtype=np.float64)
            total[rows] = block.sum(axis=(2, 3), dtype=np.float64)
        notes = list(ds.notes)
        spectrum = integrated.sum(0)
        spread = calibration_spread(ds.calibration, ds.channels)
        if spread > 0.5:
            spectrum = aligned_sum(integrated, ds.calibration)
            notes.append(f"the detector elements' calibrations differ by up to {spread:.1f} channels: their sum "
                         "is taken on detector 0's energy scale")
        incident = None
        if ovr is not None and "COHERENT_SCT_ENERGY" in ovr.parameters:
            incident = float(ovr.parameters["COHERENT_SCT_ENERGY"])
        elif ds.incident_energy:
            incident, note = check_incident_energy(spectrum, ds.incident_energy, *ds.calibration[0])
            if note:
                notes.append(note)
        elements = list(ovr.elements) + list(ovr.pileups) if ovr is not None else []
        return Scan(path=path, format=ds.format, rows=ds.rows, cols=ds.cols, detectors=ds.detectors,
                    channels=ds.channels, calibration=ds.calibration.copy(), energy=ds.energy(0),
                    integrated=integrated, spectrum=spectrum, total=total, scalers=dict(ds.scalers),
                    live_time=None if ds.live_time is None else ds.live_time.mean(-1),
                    incident_energy=incident, override=ovr, override_path=str(found) if found else None,
                    elements=elements, summary=ds.summary(integrated), notes=notes)


def pixel_spectrum(scan: Scan, row: int, col: int, detector: int | str = "sum") -> np.ndarray:
    """One pixel's spectrum ``[channels]`` (the sum over detectors, or one detector)."""
    from mapstorch.io import open_dataset

    if not (0 <= int(row) < scan.rows and 0 <= int(col) < scan.cols):
        raise InputError(f"pixel ({row}, {col}) is outside the {scan.rows} x {scan.cols} map")
    dets = None if detector == "sum" else int(detector)
    with open_dataset(scan.path, override=scan.override) as ds:
        block = ds.read(slice(int(row), int(row) + 1), dets)[0, int(col)]  # [detectors, channels]
    return block.sum(0).astype(np.float64)


def line_marks(elements, incident_energy: float | None, e_min: float, e_max: float,
               min_ratio: float = 0.02) -> list[dict]:
    """Emission lines of ``elements`` between ``e_min`` and ``e_max`` keV (those the incident
    energy excites, when known), each ``{"element", "line", "energy", "ratio"}``; the main
    lines (relative intensity >= ``min_ratio``) only."""
    from mapstorch.physics.lines import build_line_table

    names = [e for e in elements if e]
    if not names:
        return []
    table = build_line_table(names)
    marks = []
    for name in table.names:
        d = table.lines_of(name)
        for i in range(len(d["line"])):
            e, ratio = float(d["energy_kev"][i]), float(d["ratio"][i])
            if not e_min <= e <= e_max or ratio < min_ratio:
                continue
            if incident_energy is not None and float(d["gate_edge_kev"][i]) >= incident_energy:
                continue
            marks.append({"element": name, "line": str(d["line"][i]), "energy": e, "ratio": ratio})
    return marks


def write_override_file(content, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write an override file (an :class:`~mapstorch.io.override.OverrideFile`, or its text) to
    ``path`` atomically; an existing file (the one in use, above all) is replaced only with
    ``overwrite``. Returns the absolute path written."""
    from mapstorch.io.atomic import atomic_write_text

    raw = str(path).strip()
    if not raw:
        raise InputError("no output path: type where to write the override file")
    target = Path(raw).expanduser().resolve()
    if target.is_dir():
        raise InputError(f"{target} is a folder: give a file name, e.g. {target / 'maps_fit_parameters_override.txt'}")
    if target.exists() and not overwrite:
        raise InputError(f"{target} exists; tick 'overwrite an existing file' to replace it, or choose another name")
    if not target.parent.is_dir():
        raise InputError(f"{target.parent}: no such folder (it does not exist)")
    if isinstance(content, str):
        atomic_write_text(target, content, what="override file")
        return target
    return Path(content.write(target)).resolve()
