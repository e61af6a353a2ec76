"""``mapstorch demo``: simulate data with known truth and run every capability on it.

Steps (each later capability adds its own):

1. simulate a 2048-channel spectrum of a 16-component sample at 10 keV (model + continuum +
   Poisson noise);
2. evaluate the model, its components and its gradient (timed), and the SNIP background;
3. recover the counts of every component from the noisy spectrum with the model's design
   matrix (non-negative least squares on the SNIP-subtracted spectrum, shape parameters known);
4. simulate a 16 x 16 map, evaluate the model for all pixels in one batch, and check that the
   data scatter around it as Poisson noise should (reduced chi-square map near 1);
5. write the map in XRF-Maps' version-10 HDF5 layout and read it back, recognised by content,
   checking that spectra, calibration and scalers survive the round trip;
6. fit the spectrum of step 1 from our default parameters (automatic starting calibration, all
   shape parameters of preset 3 and the SNIP width free) and compare with the truth;
7. decide which elements the spectrum of step 1 contains, from every family 10 keV excites,
   and compare with what was simulated;
8. fit every pixel of the step-4 map (NNLS as XRF-Maps, and Poisson) and show the maps next to
   the truth.

Everything is written into one folder: PNG plots and ``summary.txt``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from mapstorch.physics.model import SpectrumModel
from mapstorch.physics.snip import snip_background
from mapstorch.plotting import plot_maps, plot_spectrum
from mapstorch.synthetic import amplitudes_for_counts, simulate_map, simulate_spectrum

__all__ = ["run_demo"]

log = logging.getLogger(__name__)


def _nnls(design: np.ndarray, data: np.ndarray) -> np.ndarray:
    from scipy.optimize import nnls

    scale = np.linalg.norm(design, axis=0)
    scale[scale == 0] = 1.0
    x, _ = nnls(design / scale, data, maxiter=50 * design.shape[1])
    return x / scale


def _time_model(model: SpectrumModel, theta: torch.Tensor, amps: torch.Tensor, repeats: int = 5) -> float:
    th = theta.detach().clone().requires_grad_(True)
    am = amps.detach().clone().requires_grad_(True)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        model(th, am).sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best


def _write_and_read_back(path: Path, smap) -> tuple[Path, dict]:
    """Write the simulated map as an XRF-Maps v10 file, open it again, compare."""
    from mapstorch.io import open_dataset, write_xrfmaps_h5
    from mapstorch.synthetic import map_dataset

    ds = map_dataset(smap)
    cal = ds.calibration[0]
    (written,) = write_xrfmaps_h5(path, ds)
    with open_dataset(written) as back:
        facts = {
            "format": back.format,
            "identical": bool(np.array_equal(back.read(), ds.read())),
            "calibration": "kept" if np.allclose(back.calibration[0], cal, rtol=1e-6) else "CHANGED",
            "scaler": bool(np.allclose(back.scaler("US_IC"), ds.scaler("US_IC"))),
        }
    return written, facts


def _fit_step(out: Path, sim) -> list[str]:
    """Fit the simulated spectrum from default parameters; report counts against the truth."""
    from mapstorch.fit import fit_spectrum
    from mapstorch.parameters.table import preset_free_names

    free = list(preset_free_names("3")) + ["SNIP_WIDTH"]
    r = fit_spectrum(sim.counts, sim.lines.names, incident_energy=10.0, free=free)
    lines = [
        f"6. Fit of the spectrum from our defaults (automatic start, preset 3 + SNIP width): {r.status} in "
        f"{r.seconds:.2f} s, {r.iterations} iterations, reduced chi-square {r.reduced_chi2:.2f}",
        f"   calibration {r.values['ENERGY_OFFSET']:.5f} + {r.values['ENERGY_SLOPE']:.6f} c keV "
        f"(truth {float(sim.params['ENERGY_OFFSET']):.5f} + {float(sim.params['ENERGY_SLOPE']):.6f} c)",
        f"   {'component':<10} {'truth':>11} {'fitted':>11} {'stderr':>9} {'err %':>7} {'z':>6}",
    ]
    for name, t in sim.truth_counts.items():
        c, e = r.counts[name], r.counts_stderr[name]
        lines.append(f"   {name:<10} {t:11.4g} {c:11.4g} {e:9.3g} {100 * (c - t) / t:7.2f} {(c - t) / e:6.2f}")
    plot_spectrum(out / "fit.png", r.energies, r.data, r.components, residual_model=r.model,
                  title=f"mapstorch fit of the synthetic spectrum: {r.status}, reduced chi2 {r.reduced_chi2:.2f}")
    return lines + [""]


def _guess_step(out: Path, sim) -> list[str]:
    """Decide which elements the simulated spectrum holds; compare with what was simulated."""
    from mapstorch.identify import guess_elements
    from mapstorch.parameters.table import SHAPE_PARAMETER_NAMES
    from mapstorch.physics.elements import parse_component

    start = {n: float(v) for n, v in sim.params.to_dict().items() if n in SHAPE_PARAMETER_NAMES}
    g = guess_elements(sim.counts, params=start)
    simulated = {n for n in sim.lines.names if not parse_component(n).is_pileup}
    found = set(g.elements)
    n_cand = len(g.candidates)
    lines = [
        f"7. Which elements are present? {n_cand} candidate families, likelihood-ratio tests at "
        f"{g.threshold:g} sigma, {g.seconds:.1f} s",
        f"   found {len(found & simulated)} of {len(simulated)} simulated elements; missed: "
        f"{', '.join(sorted(simulated - found)) or 'none'}; spurious: {', '.join(sorted(found - simulated)) or 'none'}",
        f"   ELEMENTS_TO_FIT: {g.elements_to_fit()}",
        "   strongest evidence against a family that overlaps a present one:",
    ]
    explained = [e for e in g.candidates if e.explained_by][:3]
    lines += [f"   {e.name:<6} {e.reason}" for e in explained] or ["   (none)"]
    return lines + [""]


def _map_step(out: Path, smap) -> list[str]:
    """Fit every pixel of the simulated map; maps next to the truth."""
    from mapstorch.io.dataset import Dataset
    from mapstorch.maps import fit_map

    rows, cols, chans = smap.counts.shape
    cal = np.array([[float(smap.params[n]) for n in ("ENERGY_OFFSET", "ENERGY_SLOPE", "ENERGY_QUADRATIC")]])
    ds = Dataset(path="<demo map>", format="npy", rows=rows, cols=cols, detectors=1, channels=chans,
                 calibration=cal, spectra=smap.counts[:, :, None, :].astype(np.float32))
    lines = [f"8. Maps of every pixel ({rows} x {cols}), shape parameters known:"]
    shown = {}
    for method in ("nnls", "poisson"):
        r = fit_map(ds, smap.params, method=method)
        errs = []
        for name in ("Fe", "Ca", "Zn", "Cu", "Mn", "Cr"):
            rel = (r.element(name) - smap.truth_counts[name]) / smap.truth_counts[name]
            errs.append(f"{name} {100 * np.median(rel):+.1f} %")
        lines.append(f"   {method:<8} {r.seconds:.2f} s, median error per pixel: " + ", ".join(errs))
        for name in ("Fe", "Mn"):
            shown[f"{name} {method}"] = r.element(name)
    for name in ("Fe", "Mn"):
        shown[f"{name} truth"] = smap.truth_counts[name]
    plot_maps(out / "fitted_maps.png", shown, title="Fitted maps (NNLS, Poisson) and the truth", ncols=3)
    return lines + ["   fitted_maps.png: Fe and Mn maps fitted both ways next to the truth", ""]


def run_demo(out_dir: str | os.PathLike[str] = "mapstorch-demo", seed: int = 0) -> Path:
    """Run the demo and write its outputs into ``out_dir`` (created if needed); returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: list[str] = ["mapstorch demo", "=" * 60, ""]
    t_start = time.perf_counter()

    # 1. a synthetic spectrum with known truth
    sim = simulate_spectrum(seed=seed)
    lines = sim.lines
    window = sim.window
    report += [
        f"1. Simulated spectrum: {len(sim.counts)} channels, {sim.counts.sum():.3g} counts, "
        f"{len(lines.names)} components ({lines.n_lines} lines from {lines.source}), incident 10 keV",
        f"   fit window: channels {window.first}-{window.last}",
        "",
    ]

    # 2. evaluate model, gradient and SNIP background
    model32 = SpectrumModel(lines, window, dtype=torch.float32)
    ps32 = sim.params.to(dtype=torch.float32)
    seconds = _time_model(model32, ps32.shape_values(), ps32.amplitudes())
    model = SpectrumModel(lines, window, dtype=torch.float64)
    theta, amps = sim.params.shape_values(), sim.params.amplitudes()
    spec = torch.as_tensor(sim.counts)
    snip = snip_background(
        spec, float(theta[0]), float(sim.params["ENERGY_SLOPE"]), float(sim.params["ENERGY_QUADRATIC"]),
        float(sim.params["SNIP_WIDTH"]), (window.first, window.last),
    ).numpy()
    comps = {k: v.numpy() for k, v in model.components(theta, amps).items()}
    report += [
        f"2. Model forward+backward (float32, {lines.n_lines} lines x {window.size} channels): "
        f"{seconds * 1e3:.1f} ms",
        "",
    ]

    # 3. counts from the noisy data by NNLS on the design matrix (shape parameters known)
    design = model.design_matrix(theta).numpy()
    data_w = sim.counts[window.slice()]
    fitted_amps = _nnls(design, np.maximum(data_w - snip[window.slice()], 0.0))
    fitted_counts = design.sum(0) * fitted_amps
    true_bg_counts = design.sum(0) * _nnls(design, data_w - sim.background[window.slice()])
    names = model.column_names
    report.append("3. Counts recovered by NNLS on the design matrix (shape parameters known), with the")
    report.append("   true continuum subtracted (tests the model's linear structure: errors are noise),")
    report.append("   and with the SNIP background subtracted (the XRF-Maps NNLS recipe):")
    report.append(f"   {'component':<10} {'truth':>11} {'true bg':>11} {'err %':>7} {'SNIP bg':>11} {'err %':>7}")
    errors, errors_true = {}, {}
    for n, c, ct in zip(names, fitted_counts, true_bg_counts):
        t = sim.truth_counts[n]
        errors[n] = 100.0 * (c - t) / t if t > 0 else float("nan")
        errors_true[n] = 100.0 * (ct - t) / t if t > 0 else float("nan")
        report.append(f"   {n:<10} {t:11.4g} {ct:11.4g} {errors_true[n]:7.2f} {c:11.4g} {errors[n]:7.2f}")
    major = [n for n in names if sim.truth_counts[n] >= 1e5]
    report.append(
        f"   median |error| of components with >= 1e5 counts: {np.median([abs(errors_true[n]) for n in major]):.2f} % "
        f"(true continuum), {np.median([abs(errors[n]) for n in major]):.2f} % (SNIP)"
    )
    report.append("")
    energies = model.energies(theta).numpy()
    amps_true_bg = _nnls(design, data_w - sim.background[window.slice()])
    fit_model = design @ amps_true_bg + sim.background[window.slice()]
    plot_comps = {n: design[:, i] * amps_true_bg[i] for i, n in enumerate(names)}
    plot_comps["Background"] = sim.background[window.slice()]
    plot_comps["Total"] = fit_model
    plot_comps["SNIP estimate"] = snip[window.slice()]
    spectrum_png = plot_spectrum(
        out / "spectrum.png", energies, data_w, plot_comps,
        title="Synthetic spectrum: data, NNLS components over the true continuum, and the SNIP estimate",
        residual_model=fit_model,
    )
    truth_png = plot_spectrum(
        out / "model_components.png", energies, None, {**comps, "Background": snip[window.slice()]},
        title="Model components at the true parameters",
    )

    # 4. a small map, evaluated in one batch
    smap = simulate_map(rows=16, cols=16, seed=seed + 1)
    mmodel = SpectrumModel(smap.lines, smap.window, dtype=torch.float64)
    th = smap.params.shape_values()
    wanted = torch.tensor(np.stack([smap.truth_counts[n] for n in mmodel.column_names], -1))
    amps = amplitudes_for_counts(mmodel, th, wanted)
    t0 = time.perf_counter()
    expected = mmodel(th, amps).numpy()  # [rows, cols, C]
    t_map = time.perf_counter() - t0
    sl = smap.window.slice()
    mean = expected + smap.background[sl]  # our batched model + the simulator's continuum
    agree = float(np.abs(mean - smap.expected[..., sl]).max() / smap.expected[..., sl].max())
    counted = mean >= 1.0  # Pearson chi-square is meaningful where the mean is at least ~1 count
    chi2 = np.where(counted, (smap.counts[..., sl] - mean) ** 2 / np.maximum(mean, 1.0), 0.0).sum(-1)
    chi2 = chi2 / np.maximum(counted.sum(-1), 1)
    maps = {n: smap.truth_counts[n] for n in list(smap.truth_counts)[:10]}
    maps["total counts"] = smap.counts.sum(-1)
    maps["reduced chi2 (truth)"] = chi2
    units = {n: "counts" for n in maps}
    units["reduced chi2 (truth)"] = ""
    maps_png = plot_maps(out / "maps.png", maps, title="Synthetic 16 x 16 map: truth per component", units=units)
    report += [
        f"4. Map: 16 x 16 pixels x {smap.counts.shape[-1]} channels; batched model for all 256 pixels in "
        f"{t_map * 1e3:.0f} ms; data vs truth reduced chi-square: median {np.median(chi2):.3f}",
        f"   (batched model vs the simulator's expectation: max difference {agree:.1e} of the peak)",
        "",
    ]

    # 5. the map as an XRF-Maps file, and back
    h5_path, facts = _write_and_read_back(out / "demo_map.h5", smap)
    report += [
        f"5. Wrote {h5_path.name} in the XRF-Maps v10 layout and read it back as {facts['format']!r}: spectra "
        f"{'identical' if facts['identical'] else 'DIFFERENT'}, calibration {facts['calibration']}, "
        f"US_IC {'kept' if facts['scaler'] else 'LOST'}",
        f"   (`mapstorch info {h5_path.name}` shows it; the layout is the one XRF-Maps-aware tools read)",
        "",
    ]

    # 6. fit the step-1 spectrum from defaults
    report += _fit_step(out, sim)

    # 7. which elements are present
    report += _guess_step(out, sim)

    # 8. maps of every pixel
    report += _map_step(out, smap)
    report += [
        "Files:",
        f"   {Path(spectrum_png).name}: data, NNLS components, SNIP background and residuals",
        f"   {Path(truth_png).name}: every model component at the true parameters",
        f"   {Path(maps_png).name}: truth maps, total counts and reduced chi-square",
        f"   {h5_path.name}: the simulated map in the XRF-Maps version-10 HDF5 layout",
        "   fit.png: the fit of step 6 (data, model, components, residuals)",
        "",
        f"Total demo time {time.perf_counter() - t_start:.1f} s",
    ]
    (out / "summary.txt").write_text("\n".join(report) + "\n", encoding="utf-8")
    log.info("demo written to %s", out)
    return out
