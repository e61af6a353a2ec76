"""Synthetic spectra and maps from the model itself, with known truth (demo, tests, benchmarks).

A synthetic spectrum is the MAPS model over the whole channel range for given shape parameters
and per-component counts, plus a smooth continuum, drawn with Poisson noise. Truth is reported
as *counts inside the fit window* per component (what mapstorch's fits report), so that a
fit can be compared with it directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mapstorch.errors import InputError
from mapstorch.parameters.set import ParameterSet
from mapstorch.physics.lines import LineTable, build_line_table
from mapstorch.physics.model import FitWindow, SpectrumModel, fit_window

__all__ = ["amplitudes_for_counts", "SyntheticSpectrum", "SyntheticMap", "continuum", "simulate_spectrum", "simulate_map",
           "map_dataset", "write_map_file", "DEMO_SAMPLE"]

#: A biological/environmental sample at 10 keV: counts inside the fit window per component.
DEMO_SAMPLE: dict[str, float] = {
    "Si": 4.0e4, "P": 6.0e4, "S": 1.2e5, "Cl": 9.0e4, "Ar": 2.5e5, "K": 3.0e5, "Ca": 8.0e5,
    "Ti": 2.0e4, "Cr": 8.0e3, "Mn": 3.0e4, "Fe": 1.5e6, "Ni": 1.5e4, "Cu": 2.0e5, "Zn": 4.0e5,
    "Ba_L": 3.0e4, "Si_Cl": 2.0e3,
}  # fmt: skip
_DEMO_PARAMS = {
    "ENERGY_OFFSET": -0.0042, "ENERGY_SLOPE": 0.00952, "FWHM_OFFSET": 0.0972, "FWHM_FANOPRIME": 0.000224,
    "COHERENT_SCT_ENERGY": 10.0, "COMPTON_ANGLE": 87.3, "COMPTON_FWHM_CORR": 1.57, "COMPTON_F_TAIL": 0.133,
    "COMPTON_GAMMA": 3.0, "COMPTON_HI_F_TAIL": 0.004, "COMPTON_HI_GAMMA": 3.0, "F_TAIL_OFFSET": 0.003,
    "F_TAIL_LINEAR": 0.0, "KB_F_TAIL_OFFSET": 0.05, "GAMMA_OFFSET": 2.21, "SNIP_WIDTH": 0.5,
    "MIN_ENERGY_TO_FIT": 1.0, "MAX_ENERGY_TO_FIT": 11.0,
}  # fmt: skip


@dataclass(frozen=True)
class SyntheticSpectrum:
    """A simulated spectrum and its truth.

    counts : (C,) Poisson draw; expected : (C,) its mean; background : (C,) the continuum part;
    components : {name: (C,)} expected spectrum of each column; truth_counts : {name: counts in
    the fit window} (components, Elastic, Compton); params : the shape parameters used.
    """

    counts: np.ndarray
    expected: np.ndarray
    background: np.ndarray
    components: dict[str, np.ndarray]
    truth_counts: dict[str, float]
    params: ParameterSet
    lines: LineTable
    window: FitWindow


@dataclass(frozen=True)
class SyntheticMap:
    """A simulated map: counts (rows, cols, C), its mean, the continuum (C,) inside the mean, and
    per-pixel truth counts inside the fit window (name -> (rows, cols))."""

    counts: np.ndarray
    expected: np.ndarray
    background: np.ndarray
    truth_counts: dict[str, np.ndarray]
    params: ParameterSet
    lines: LineTable
    window: FitWindow


def continuum(energies_kev: np.ndarray, incident_kev: float, level: float) -> np.ndarray:
    """A smooth scatter/bremsstrahlung-like continuum: rises from 1 keV, falls to the incident energy.

    ``level`` is its maximum (counts per channel).
    """
    e = np.asarray(energies_kev, dtype=np.float64)
    x = np.clip(e / incident_kev, 0.0, None)
    shape = (1.0 - np.exp(-((e / 1.5) ** 2))) * np.exp(-2.5 * x) * np.clip(1.15 - x, 0.0, None) ** 0.7
    peak = shape.max()
    return level * shape / peak if peak > 0 else np.zeros_like(e)


def amplitudes_for_counts(model: SpectrumModel, theta: Tensor, wanted: Tensor) -> Tensor:
    """Linear amplitudes that give ``wanted [..., K + 2]`` counts per column inside the fit window
    (zero for a component that has no counts there, e.g. not excited)."""
    per_unit = model.counts(theta, torch.ones(wanted.shape[-1], dtype=wanted.dtype))
    return torch.where(per_unit > 0, wanted / per_unit, torch.zeros_like(wanted))


def simulate_spectrum(
    counts: Mapping[str, float] | None = None,
    params: Mapping[str, float] | ParameterSet | None = None,
    n_channels: int = 2048,
    elastic_counts: float = 2.0e5,
    compton_counts: float = 1.2e6,
    continuum_level: float = 30.0,
    scale: float = 1.0,
    seed: int | None = 0,
    lines: LineTable | None = None,
) -> SyntheticSpectrum:
    """Simulate one spectrum with known truth.

    counts : counts inside the fit window per component (default :data:`DEMO_SAMPLE`).
    params : shape parameters (MAPS names) or a ParameterSet; defaults resemble APS 2-ID-E at 10 keV.
    scale : multiplies every count (sets the total counts, i.e. the noise level).
    """
    counts = dict(DEMO_SAMPLE if counts is None else counts)
    if not counts:
        raise InputError("simulate_spectrum needs at least one component")
    if n_channels < 64:
        raise InputError(f"n_channels must be at least 64, got {n_channels}")
    if lines is None:
        lines = build_line_table(list(counts))
    names = lines.names
    missing = [n for n in counts if n not in names]
    if missing:
        raise InputError(f"counts given for components not in the line table: {missing}")
    if isinstance(params, ParameterSet):
        ps = params.to(dtype=torch.float64)
        if ps.components != names:
            ps = ParameterSet.default(names).with_maps_values(
                {k: float(v) for k, v in zip(ps.names, ps.values.tolist()) if k not in ps.components}
            )
    else:
        ps = ParameterSet.default(names).with_maps_values({**_DEMO_PARAMS, **(params or {})})
    theta = ps.shape_values()
    window = fit_window(n_channels, ps)
    full = SpectrumModel(lines, FitWindow(0, n_channels - 1), dtype=torch.float64)
    inside = SpectrumModel(lines, window, dtype=torch.float64)
    wanted = torch.tensor(
        [counts.get(n, 0.0) * scale for n in names] + [elastic_counts * scale, compton_counts * scale],
        dtype=torch.float64,
    )
    amps = amplitudes_for_counts(inside, theta, wanted)
    comps = {k: v.numpy() for k, v in full.components(theta, amps).items()}
    energies = full.energies(theta).numpy()
    bg = continuum(energies, float(ps["COHERENT_SCT_ENERGY"]), continuum_level * scale)
    expected = comps["Total"] + bg
    rng = np.random.default_rng(seed)
    noisy = rng.poisson(np.clip(expected, 0.0, None)).astype(np.float64)
    log_amps = torch.log10(torch.clamp(amps[: len(names)], min=1e-11))
    ps = ps.with_values(
        {n: float(a) for n, a in zip(names, log_amps.tolist())},
        COHERENT_SCT_AMPLITUDE=float(torch.log10(amps[-2])),
        COMPTON_AMPLITUDE=float(torch.log10(amps[-1])),
    )
    truth = {n: float(w) for n, w in zip(full.column_names, wanted.tolist())}
    return SyntheticSpectrum(noisy, expected, bg, comps, truth, ps, lines, window)


def simulate_map(
    rows: int = 16,
    cols: int = 16,
    counts: Mapping[str, float] | None = None,
    params: Mapping[str, float] | None = None,
    n_channels: int = 2048,
    seed: int | None = 0,
    patterns: Sequence[str] = ("gradient", "disk", "stripes", "blob"),
) -> SyntheticMap:
    """Simulate a small map: each component's counts follow a spatial pattern times its mean.

    counts : mean counts per pixel inside the fit window (default :data:`DEMO_SAMPLE` / 100).
    Patterns cycle over components: a left-right gradient, a disk, stripes and a Gaussian blob,
    each between 0.2x and 1.8x of the mean, so majors, traces and sharp edges all occur.
    """
    if rows < 1 or cols < 1:
        raise InputError(f"map size must be positive, got {rows} x {cols}")
    base = {k: v / 100.0 for k, v in (DEMO_SAMPLE if counts is None else counts).items()}
    lines = build_line_table(list(base))
    names = lines.names
    ps = ParameterSet.default(names).with_maps_values({**_DEMO_PARAMS, **(params or {})})
    window = fit_window(n_channels, ps)
    yy, xx = np.meshgrid(np.linspace(-1, 1, rows), np.linspace(-1, 1, cols), indexing="ij")
    shapes = {
        "gradient": 0.2 + 0.8 * (xx + 1.0),
        "disk": np.where(xx**2 + yy**2 < 0.45, 1.8, 0.2),
        "stripes": np.where(np.sin(3.0 * np.pi * yy) > 0, 1.6, 0.4),
        "blob": 0.2 + 1.6 * np.exp(-((xx - 0.3) ** 2 + (yy + 0.2) ** 2) / 0.3),
    }
    truth = {n: base[n] * shapes[patterns[i % len(patterns)]] for i, n in enumerate(names)}
    truth["Elastic"] = np.full((rows, cols), 2.0e3)
    truth["Compton"] = np.full((rows, cols), 1.2e4) * (0.8 + 0.2 * (yy + 1.0))
    theta = ps.shape_values()
    full = SpectrumModel(lines, FitWindow(0, n_channels - 1), dtype=torch.float64)
    inside = SpectrumModel(lines, window, dtype=torch.float64)
    wanted = torch.tensor(np.stack([truth[n] for n in full.column_names], -1).reshape(rows * cols, -1))
    amps = amplitudes_for_counts(inside, theta, wanted)
    expected = full(theta, amps).numpy()  # one parameter set, one amplitude vector per pixel
    energies = full.energies(theta).numpy()
    bg = continuum(energies, float(ps["COHERENT_SCT_ENERGY"]), 0.3)
    expected = (expected + bg).reshape(rows, cols, n_channels)
    rng = np.random.default_rng(seed)
    noisy = rng.poisson(np.clip(expected, 0.0, None)).astype(np.float64)
    return SyntheticMap(noisy, expected, bg, truth, ps, lines, window)


def map_dataset(smap: SyntheticMap):
    """A simulated map as a :class:`~mapstorch.io.dataset.Dataset` (one detector, live time 1 s,
    real time 1.02 s, an upstream ion chamber ``US_IC`` of 1.5e5 counts per pixel)."""
    from mapstorch.io import Dataset

    rows, cols, channels = smap.counts.shape
    cal = [float(smap.params[k]) for k in ("ENERGY_OFFSET", "ENERGY_SLOPE", "ENERGY_QUADRATIC")]
    return Dataset(
        path="simulated map", format="synthetic", rows=rows, cols=cols, detectors=1, channels=channels,
        calibration=cal, spectra=smap.counts[:, :, None, :].astype(np.float32),
        live_time=np.ones((rows, cols, 1)), real_time=np.full((rows, cols, 1), 1.02),
        scalers={"US_IC": np.full((rows, cols), 1.5e5)}, scaler_roles={"US_IC": "US_IC"},
        incident_energy=float(smap.params["COHERENT_SCT_ENERGY"]),
        provenance={"scan_name": "mapstorch demo", "source": "mapstorch.synthetic.simulate_map"},
    )


def write_map_file(path, smap: SyntheticMap, override: bool = True):
    """Write a simulated map as an XRF-Maps v10 HDF5 file and, with ``override``, the
    parameters it was simulated with as ``maps_fit_parameters_override.txt`` beside it (where
    ``mapstorch`` looks for one). Returns the HDF5 file's path."""
    from pathlib import Path

    from mapstorch.io import write_xrfmaps_h5
    from mapstorch.io.override import new_override

    (written,) = write_xrfmaps_h5(path, map_dataset(smap))
    if override:
        new_override(smap.params).write(Path(written).parent / "maps_fit_parameters_override.txt")
    return Path(written)
