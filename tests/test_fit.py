"""Spectrum fitting: objectives, Jacobians, the bounded LM solver, recovery of known truth,
uncertainties (coverage over noise draws), optimizers, failure reporting and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mapstorch.errors import InputError
from mapstorch.fit import fit_spectrum
from mapstorch.fit.guess import check_incident_energy, guess_start, residual_peaks
from mapstorch.fit.objectives import objective_terms, poisson_deviance
from mapstorch.fit.problem import shape_jacobian
from mapstorch.fit.solvers import levenberg_marquardt
from mapstorch.parameters.set import index_of
from mapstorch.parameters.table import preset_free_names
from mapstorch.physics.model import SpectrumModel
from mapstorch.synthetic import simulate_spectrum

# the synthetic continuum is smooth and wide: a wide SNIP window follows it (as users set it per data set)
WIDE_SNIP = {"SNIP_WIDTH": 2.0}
PRESET_2_AND_SNIP = list(preset_free_names("2")) + ["SNIP_WIDTH"]
PRESET_3_AND_SNIP = list(preset_free_names("3")) + ["SNIP_WIDTH"]


def _errors(result, truth):
    return {n: (result.counts[n] - t) / t for n, t in truth.items() if t > 0}


def _calibration_error_channels(result, sim):
    """Largest calibration difference over the window, in channels."""
    c = np.array([result.window.first, result.window.last], dtype=float)
    fit = result.values["ENERGY_OFFSET"] + result.values["ENERGY_SLOPE"] * c
    true = float(sim.params["ENERGY_OFFSET"]) + float(sim.params["ENERGY_SLOPE"]) * c
    return float(np.abs(fit - true).max() / float(sim.params["ENERGY_SLOPE"]))


# ----------------------------------------------------------------------------- objectives
@pytest.mark.parametrize("objective", ["poisson", "wls", "mse"])
def test_objective_slope_is_the_derivative(objective):
    rng = np.random.default_rng(1)
    y = torch.as_tensor(rng.poisson(20.0, 50).astype(float))
    m = torch.as_tensor(rng.uniform(5.0, 40.0, 50)).requires_grad_(True)
    value, slope, weight, spread = objective_terms(objective, m, y)
    (grad,) = torch.autograd.grad(value, m)
    torch.testing.assert_close(grad, slope.detach())
    assert bool((weight > 0).all()) and bool((spread > 0).all())


def test_poisson_deviance_golden_values():
    # 2 * (m - y + y log(y/m)): y=4, m=2 -> 2*(2 - 4 + 4 ln 2) = 7.0904; y=0, m=3 -> 6
    dev = poisson_deviance(torch.tensor([2.0, 3.0], dtype=torch.float64), torch.tensor([4.0, 0.0], dtype=torch.float64))
    assert float(dev) == pytest.approx(2 * (2 - 4 + 4 * math.log(2)) + 6.0, rel=1e-12)


def test_shape_jacobian_matches_finite_differences():
    sim = simulate_spectrum(seed=0)
    model = SpectrumModel(sim.lines, sim.window, dtype=torch.float64)
    theta, amps = sim.params.shape_values(), sim.params.amplitudes()
    names = ["ENERGY_OFFSET", "FWHM_OFFSET", "COMPTON_ANGLE", "COMPTON_F_TAIL", "F_TAIL_OFFSET", "GAMMA_OFFSET"]
    idx = torch.tensor([index_of(n) for n in names])
    out, jac = shape_jacobian(lambda th: model(th, amps.expand(th.shape[0], -1)), theta, idx)
    torch.testing.assert_close(out, model(theta, amps))
    for j, i in enumerate(idx.tolist()):
        h = 1e-6 * max(1.0, abs(float(theta[i])))
        up, down = theta.clone(), theta.clone()
        up[i] += h
        down[i] -= h
        fd = (model(up, amps) - model(down, amps)) / (2 * h)
        assert float((fd - jac[:, j]).abs().max()) <= 1e-5 * float(fd.abs().max()) + 1e-9, names[j]


def test_levenberg_marquardt_respects_bounds_and_finds_the_optimum():
    # Poisson counts of a Gaussian peak on a flat level; fit centre, width, height, level
    x = torch.arange(100, dtype=torch.float64)

    def mean(p):
        return p[3] + p[2] * torch.exp(-0.5 * ((x - p[0]) / p[1]) ** 2)

    rng = np.random.default_rng(3)
    truth = torch.tensor([47.3, 6.0, 500.0, 10.0], dtype=torch.float64)
    y = torch.as_tensor(rng.poisson(mean(truth).numpy()).astype(float))

    def evaluate(p, jac):
        if not jac:
            return mean(p)
        return mean(p), torch.autograd.functional.jacobian(mean, p)

    lower = torch.tensor([0.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    upper = torch.tensor([100.0, 50.0, 1e5, 1e5], dtype=torch.float64)
    p, info = levenberg_marquardt(evaluate, torch.tensor([40.0, 10.0, 100.0, 1.0], dtype=torch.float64),
                                  lower, upper, y, "poisson")
    assert info.status == "converged"
    assert abs(float(p[0]) - 47.3) < 0.3 and abs(float(p[1]) - 6.0) < 0.3
    # an upper bound below the optimum holds the parameter on it
    upper_tight = upper.clone()
    upper_tight[2] = 300.0
    p2, info2 = levenberg_marquardt(evaluate, torch.tensor([40.0, 10.0, 100.0, 1.0], dtype=torch.float64),
                                    lower, upper_tight, y, "poisson")
    assert float(p2[2]) == pytest.approx(300.0) and info2.status == "converged"


# ----------------------------------------------------------------------------- recovery of the truth
def test_fit_from_truth_recovers_counts_and_calibration():
    sim = simulate_spectrum(seed=0, params=WIDE_SNIP)
    r = fit_spectrum(sim.counts, sim.lines.names, params=sim.params, free=PRESET_2_AND_SNIP)
    assert r.status == "converged", r.message
    err = _errors(r, sim.truth_counts)
    elements = {n: t for n, t in sim.truth_counts.items() if n in sim.lines.names}
    majors = [n for n, t in elements.items() if t >= 1e5]
    minors = [n for n, t in elements.items() if 1e4 <= t < 1e5]
    assert max(abs(err[n]) for n in majors) < 0.01, {n: err[n] for n in majors}
    assert max(abs(err[n]) for n in minors) < 0.05, {n: err[n] for n in minors}
    assert _calibration_error_channels(r, sim) < 0.1
    assert 0.8 < r.reduced_chi2 < 1.5


@pytest.mark.parametrize(
    "case",
    [
        # K and L lines, As K / Pb L overlap, at 15 keV, 1e7 counts
        dict(counts={"S": 2e5, "Ca": 1e6, "Fe": 3e6, "Zn": 5e5, "As": 4e5, "Pb_L": 6e5, "Br": 2e5, "Mo_L": 5e4,
                     "Pb_M": 8e4}, e0=15.0, scale=1.0),
        # S K / Mo L / Pb M at 8 keV (Pb L not excited), low counts
        dict(counts={"S": 3e4, "Mo_L": 2e4, "Pb_M": 2e4, "Cl": 1e4, "K": 4e4, "Ca": 8e4, "Fe": 1e5}, e0=8.0,
             scale=1.0),
        # 20 keV, very high counts
        dict(counts={"Ca": 2e7, "Fe": 5e7, "Cu": 1e7, "Zn": 2e7, "Br": 5e6, "Sr": 1e7, "Zr": 4e6}, e0=20.0,
             scale=1.0),
    ],
    ids=["15keV-As-PbL", "8keV-S-MoL-PbM", "20keV-1e8"],
)
def test_fit_from_defaults_with_automatic_start(case):
    e0 = case["e0"]
    # parameters that preset 3 keeps fixed are at our defaults (a fit cannot recover them)
    truth_params = {"COHERENT_SCT_ENERGY": e0, "MAX_ENERGY_TO_FIT": e0 + 1.0, "ENERGY_SLOPE": 0.0102,
                    "ENERGY_OFFSET": 0.012, "COMPTON_ANGLE": 95.0, "COMPTON_HI_F_TAIL": 0.013,
                    "COMPTON_HI_GAMMA": 1.0, "GAMMA_OFFSET": 2.2, **WIDE_SNIP}
    sim = simulate_spectrum(case["counts"], params=truth_params, elastic_counts=0.1 * sum(case["counts"].values()),
                            compton_counts=0.4 * sum(case["counts"].values()), seed=2, scale=case["scale"])
    r = fit_spectrum(sim.counts, sim.lines.names, params={**WIDE_SNIP, "MAX_ENERGY_TO_FIT": e0 + 1.0},
                     incident_energy=e0, free=PRESET_3_AND_SNIP)
    assert r.status == "converged", r.message
    assert any("fluorescence peaks" in n for n in r.notes)  # the calibration came from the guess
    assert _calibration_error_channels(r, sim) < 0.5
    err = _errors(r, sim.truth_counts)
    total = sum(case["counts"].values())
    assert total > 0
    for name, t in case["counts"].items():
        z = (r.counts[name] - t) / r.counts_stderr[name]
        if t >= 1e5 and t >= 0.05 * total:  # majors
            assert abs(err[name]) < 0.01 or abs(z) < 3, (name, err[name], z)
        else:
            assert abs(err[name]) < 0.05 or abs(z) < 3, (name, err[name], z)
    assert r.reduced_chi2 < 2.0


def test_incident_energy_from_the_elastic_peak():
    sim = simulate_spectrum(seed=4, params={**WIDE_SNIP, "COHERENT_SCT_ENERGY": 12.0, "MAX_ENERGY_TO_FIT": 13.0})
    g = guess_start(sim.counts, sim.lines, 0.0, 0.0098, 0.0, None, 90.0, fwhm=(0.0972, 0.000224))
    assert abs(g.incident_energy - 12.0) < 0.1
    assert any("incident energy" in n for n in g.notes)


# ----------------------------------------------------------------------------- uncertainties
def test_standard_errors_agree_with_the_scatter_over_noise_draws():
    base = simulate_spectrum(seed=0, scale=0.05, params=WIDE_SNIP)
    names = ["Ca", "Fe", "Zn", "K", "Cu", "Mn"]
    z = {n: [] for n in names}
    z_cal = []
    rng = np.random.default_rng(7)
    for _ in range(12):
        counts = rng.poisson(base.expected).astype(float)
        r = fit_spectrum(counts, base.lines.names, params=base.params, background=base.background)
        assert r.status == "converged"
        for n in names:
            z[n].append((r.counts[n] - base.truth_counts[n]) / r.counts_stderr[n])
        z_cal.append((r.values["ENERGY_SLOPE"] - float(base.params["ENERGY_SLOPE"])) / r.stderr["ENERGY_SLOPE"])
    pooled = np.concatenate([np.asarray(v) for v in z.values()])
    assert 0.6 < float(np.sqrt(np.mean(pooled**2))) < 1.5, z
    assert abs(float(np.mean(pooled))) < 0.6
    assert float(np.sqrt(np.mean(np.square(z_cal)))) < 2.0


# ----------------------------------------------------------------------------- optimizers and options
def test_optimizers_agree_and_report():
    sim = simulate_spectrum(seed=1, scale=0.1, params=WIDE_SNIP)
    lm = fit_spectrum(sim.counts, sim.lines.names, params=sim.params)
    vp = fit_spectrum(sim.counts, sim.lines.names, params=sim.params, optimizer="varpro")
    assert vp.status == "converged"
    assert vp.deviance == pytest.approx(lm.deviance, rel=1e-3, abs=0.5)
    assert vp.counts["Fe"] == pytest.approx(lm.counts["Fe"], rel=2e-3)
    adam = fit_spectrum(sim.counts, sim.lines.names, params=sim.params, optimizer="adam", max_iter=20)
    assert adam.status == "max-iterations" and adam.iterations == 20 and math.isfinite(adam.deviance)
    lb = fit_spectrum(sim.counts, sim.lines.names, params=sim.params, optimizer="lbfgs", max_iter=5)
    assert lb.status in ("converged", "max-iterations") and lb.deviance < 1.5 * lm.deviance + 100


@pytest.mark.parametrize("objective", ["wls", "mse"])
def test_other_objectives_fit_too(objective):
    sim = simulate_spectrum(seed=1, params=WIDE_SNIP)
    r = fit_spectrum(sim.counts, sim.lines.names, params=sim.params, objective=objective)
    assert r.status == "converged"
    assert abs(_errors(r, sim.truth_counts)["Fe"]) < 0.02
    assert r.objective == objective


def test_sparsity_penalty_removes_an_absent_element():
    sim = simulate_spectrum({"Ca": 2e5, "Fe": 5e5, "Zn": 1e5}, params=WIDE_SNIP, seed=3)
    plain = fit_spectrum(sim.counts, ["Ca", "Fe", "Zn", "Co", "Se"], params=WIDE_SNIP, calibration=(
        float(sim.params["ENERGY_OFFSET"]), float(sim.params["ENERGY_SLOPE"]), 0.0), incident_energy=10.0)
    sparse = fit_spectrum(sim.counts, ["Ca", "Fe", "Zn", "Co", "Se"], params=WIDE_SNIP, calibration=(
        float(sim.params["ENERGY_OFFSET"]), float(sim.params["ENERGY_SLOPE"]), 0.0), incident_energy=10.0,
        sparsity=0.01)
    assert sparse.counts["Co"] + sparse.counts["Se"] <= plain.counts["Co"] + plain.counts["Se"]
    assert sparse.counts["Fe"] == pytest.approx(plain.counts["Fe"], rel=0.01)


def test_fitted_snip_width():
    sim = simulate_spectrum(seed=0, params={"SNIP_WIDTH": 0.5})
    fixed = fit_spectrum(sim.counts, sim.lines.names, params=sim.params)
    free = fit_spectrum(sim.counts, sim.lines.names, params=sim.params,
                        free=["ENERGY_OFFSET", "ENERGY_SLOPE", "FWHM_OFFSET", "FWHM_FANOPRIME", "SNIP_WIDTH"])
    assert "SNIP_WIDTH" in free.free and free.values["SNIP_WIDTH"] > 0.5
    assert free.deviance < fixed.deviance
    assert abs(_errors(free, sim.truth_counts)["Ca"]) < abs(_errors(fixed, sim.truth_counts)["Ca"])


def test_result_parts():
    sim = simulate_spectrum(seed=0, scale=0.1, params=WIDE_SNIP)
    r = fit_spectrum(sim.counts, sim.lines.names, params=sim.params)
    comps = r.components
    for key in ("Fe", "Elastic", "Compton", "Background", "Total"):
        assert comps[key].shape == r.data.shape
    parts = sum(v for k, v in comps.items() if k != "Total")
    np.testing.assert_allclose(parts, comps["Total"], rtol=1e-9, atol=1e-9)
    d = r.to_dict()
    assert set(d["elements"]["Fe"]) == {"counts", "counts_stderr"}
    assert d["parameters"]["ENERGY_SLOPE"]["stderr"] > 0 and d["status"] == "converged"
    assert "reduced chi2" in r.summary()
    # the fitted ParameterSet holds log10 amplitudes that reproduce the counts
    model = SpectrumModel(sim.lines, r.window, dtype=torch.float64)
    counts = model.counts(r.params.shape_values(), r.params.amplitudes())
    assert float(counts[sim.lines.names.index("Fe")]) == pytest.approx(r.counts["Fe"], rel=1e-9)


# ----------------------------------------------------------------------------- failures and bad input
def test_numerical_failure_is_a_status_not_an_exception(monkeypatch):
    sim = simulate_spectrum(seed=0, scale=0.1)
    original = SpectrumModel.__call__

    def broken(self, theta, amps, background=None):
        return original(self, theta, amps, background) * torch.nan

    monkeypatch.setattr(SpectrumModel, "__call__", broken)
    r = fit_spectrum(sim.counts, sim.lines.names, params=sim.params)
    assert r.status == "non-finite"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(counts=np.ones((4, 100))), "one spectrum"),
        (dict(counts=np.full(100, -1.0)), "negative"),
        (dict(counts=np.r_[np.ones(99), np.nan]), "non-finite"),
        (dict(counts=np.ones(10)), "channels"),
        (dict(optimizer="newton"), "optimizer"),
        (dict(objective="l7"), "objective"),
        (dict(elements=[]), "no elements"),
        (dict(elements=["Xx"]), "Xx"),
        (dict(free=["NOT_A_PARAMETER"]), "NOT_A_PARAMETER"),
        (dict(incident_energy=-3.0), "incident energy"),
        (dict(background=np.ones(5)), "background"),
        (dict(sparsity=-1.0), "sparsity"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message):
    from mapstorch.errors import MapstorchError

    args = {"counts": np.random.default_rng(0).poisson(50, 1024).astype(float), "elements": ["Fe"]}
    args.update(kwargs)
    counts, elements = args.pop("counts"), args.pop("elements")
    with pytest.raises(MapstorchError, match=message):
        fit_spectrum(counts, elements, **args)
    assert issubclass(InputError, MapstorchError)


# ----------------------------------------------------------------------------- command line
def test_cli_fit_writes_json_plot_and_override(tmp_path):
    import json

    from mapstorch.cli.main import main
    from mapstorch.io.override import read_override

    sim = simulate_spectrum(seed=5, scale=0.2, params=WIDE_SNIP)
    np.save(tmp_path / "spec.npy", sim.counts)
    args = [str(tmp_path / "spec.npy"), "--elements", ",".join(sim.lines.names), "--incident-energy", "10",
            "--json", str(tmp_path / "fit.json"), "--plot", str(tmp_path / "fit.png"),
            "--out-override", str(tmp_path / "maps_fit_parameters_override.txt"), "--no-progress"]
    assert main(["fit", *args]) == 0
    payload = json.loads((tmp_path / "fit.json").read_text())
    assert payload["status"] == "converged"
    fe = payload["elements"]["Fe"]
    assert abs(fe["counts"] - sim.truth_counts["Fe"]) < 4 * fe["counts_stderr"] + 0.01 * sim.truth_counts["Fe"]
    assert payload["parameters"]["ENERGY_SLOPE"]["stderr"] > 0
    assert (tmp_path / "fit.png").stat().st_size > 10_000
    back = read_override(tmp_path / "maps_fit_parameters_override.txt")
    assert back.components == list(sim.lines.names)
    assert back.parameters["ENERGY_SLOPE"] == pytest.approx(payload["parameters"]["ENERGY_SLOPE"]["value"], rel=1e-6)


def test_cli_fit_bad_output_folder_fails_before_fitting(tmp_path, capsys):
    from mapstorch.cli.main import main

    np.save(tmp_path / "spec.npy", simulate_spectrum(seed=5, scale=0.1).counts)
    code = main(["fit", str(tmp_path / "spec.npy"), "--elements", "Fe", "--json", str(tmp_path / "no" / "x.json")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_fit_2ide_summed_spectrum_with_the_beamline_override(tmp_path):
    from conftest import require_shared

    from mapstorch.cli.main import main
    from mapstorch.io import open_dataset
    from mapstorch.io.override import read_override

    folder = require_shared("xrfmaps-2ide")
    override = read_override(folder / "maps_fit_parameters_override.txt")
    with open_dataset(folder / "mda" / "2xfm_0010.mda", override=override) as ds:
        spectrum = ds.integrated("sum")
    r = fit_spectrum(spectrum, params=override)
    assert r.status == "converged", r.message
    # the major peaks are modelled without structure: Pearson residuals near each major line stay small
    resid = (r.data - r.model) / np.sqrt(np.maximum(r.model, 1.0))
    for name in ("Ar", "Ca", "Fe", "Cu"):
        peak = int(np.argmax(r.components[name]))
        assert np.abs(resid[max(peak - 5, 0):peak + 6]).max() < 8, name
    out = tmp_path / "maps_fit_parameters_override.txt"
    assert main(["fit", str(folder / "mda" / "2xfm_0010.mda"), "--override", str(folder / "maps_fit_parameters_override.txt"),
                 "--out-override", str(out), "--no-progress"]) == 0
    back = read_override(out)
    assert back.parameters["ENERGY_SLOPE"] == pytest.approx(r.values["ENERGY_SLOPE"], rel=1e-6)
    assert back.parameters["FWHM_OFFSET"] == pytest.approx(r.values["FWHM_OFFSET"], rel=1e-6)
    # every line the fit does not change is kept
    original = (folder / "maps_fit_parameters_override.txt").read_text().splitlines()
    kept = set(out.read_text().splitlines())
    unchanged = [line for line in original if line.startswith(("ELEMENTS_TO_FIT", "US_IC", "DETECTOR_ELEMENTS"))]
    assert unchanged and all(line in kept for line in unchanged)


def test_short_staging_from_a_given_start_matches_the_full_plan():
    sim = simulate_spectrum(seed=3, params=WIDE_SNIP)
    short = fit_spectrum(sim.counts, sim.lines.names, params=sim.params)
    full = fit_spectrum(sim.counts, sim.lines.names, params=sim.params, staged=True)
    assert [s.name for s in short.stages] == ["calibration", "all"]
    assert len(full.stages) > 2 and short.status == full.status == "converged"
    assert short.deviance == pytest.approx(full.deviance, rel=1e-4)
    for name in ("Fe", "Ca", "Zn"):
        assert short.counts[name] == pytest.approx(full.counts[name], rel=1e-3)


def test_a_missing_element_is_reported_as_an_unexplained_peak():
    sim = simulate_spectrum(seed=1, params=WIDE_SNIP)
    complete = fit_spectrum(sim.counts, sim.lines.names, params=sim.params)
    assert not any("unexplained" in n for n in complete.notes), complete.notes
    without_zn = [n for n in sim.lines.names if n != "Zn"]
    r = fit_spectrum(sim.counts, without_zn, params=sim.params)
    note = next(n for n in r.notes if "unexplained" in n)
    energies = [float(part.split(" keV")[0].split()[-1]) for part in note.split("(+")[:-1]]
    assert any(abs(e - 8.63) < 0.1 for e in energies), note  # Zn Ka


def test_residual_peaks_golden():
    e = np.linspace(1.0, 11.0, 1001)
    model = np.full(e.shape, 100.0)
    data = model + 400.0 * np.exp(-0.5 * ((e - 6.0) / 0.05) ** 2) + 400.0 * np.exp(-0.5 * ((e - 9.8) / 0.05) ** 2)
    found = residual_peaks(data, model, e, fwhm=0.12)
    assert sorted(round(f[0], 1) for f in found) == [6.0, 9.8]
    # the excess summed over one FWHM (12 channels) of a Gaussian of 400 x 5 channels sigma x sqrt(2 pi)
    assert found[0][1] == pytest.approx(400 * 5 * math.sqrt(2 * math.pi) * 0.7699, rel=0.05)
    assert residual_peaks(data, model, e, fwhm=0.12, exclude=(9.0, 10.0))[0][0] == pytest.approx(6.0, abs=0.02)
    assert residual_peaks(model, model, e) == []


def test_stale_incident_energy_from_the_data_file_is_caught():
    sim = simulate_spectrum(seed=0)
    off, slope, quad = (float(sim.params[n]) for n in ("ENERGY_OFFSET", "ENERGY_SLOPE", "ENERGY_QUADRATIC"))
    top = off + slope * (len(sim.counts) - 1)
    e0, note = check_incident_energy(sim.counts, 10.0, off, slope, quad)
    assert e0 == 10.0 and note is None
    e0, note = check_incident_energy(sim.counts, top + 5.0, off, slope, quad)
    assert e0 == pytest.approx(10.0, abs=0.05) and "lies above the spectrum" in note


# element lists from the files' own ROI labels (xrf_spectra.mca: Sc and Pt_L for the peaks its
# labels miss; its "Au La" peak is Pt: Au L3 cannot be excited at 11.8 keV)
GSE_CASES = {
    "srm1832.mca": ("Cl,Ar,Ca,V,Mn,Co,Cu", 12.56, 1.3e3),
    "xrf_spectra.mca": ("Ca,Sc,Ti,V,Cr,Mn,Fe,Ni,Cu,Zn,Pt_L", 11.8, 10.0),
    "axorf4_21kev_i050.xrf": ("P,S,K,Ca,Cr,Mn,Fe,Cu,Zn,Hg_L,Pb_L,Br,Sr", 21.0, 1.0e3),
}


@pytest.mark.parametrize("name", sorted(GSE_CASES))
def test_gse_mca_spectra_fit(name, tmp_path):
    from conftest import require_shared

    from mapstorch.cli.main import main

    path = require_shared("gse-mca") / name
    elements, e0, rchi2_max = GSE_CASES[name]
    out = tmp_path / "fit.json"
    assert main(["fit", str(path), "--elements", elements, "--json", str(out), "--no-progress"]) == 0
    import json

    r = json.loads(out.read_text())
    assert r["status"] == "converged"
    p = r["parameters"]
    assert p["COHERENT_SCT_ENERGY"]["value"] == pytest.approx(e0, rel=0.01)
    fwhm_6kev = 2.3548 * math.sqrt((p["FWHM_OFFSET"]["value"] / 2.3548) ** 2 + 3.58 * 6.0 * p["FWHM_FANOPRIME"]["value"])
    assert 0.08 < fwhm_6kev < 0.4
    assert r["reduced_chi2"] < rchi2_max
    assert all(math.isfinite(v["counts"]) and v["counts"] >= 0 for v in r["elements"].values())


def test_detector_calibrations_that_disagree_are_noted(capsys):
    from conftest import require_shared

    from mapstorch.cli.main import main
    from mapstorch.io.dataset import calibration_spread

    assert calibration_spread([[0.0, 0.01, 0.0]], 2048) == 0.0
    assert calibration_spread([[0.0, 0.01, 0.0], [0.005, 0.01, 0.0]], 2048) == pytest.approx(0.5)
    path = require_shared("gse-mca") / "srm1832.mca"  # four elements, offsets 8-11 eV apart, slopes 0.2 % apart
    assert main(["fit", str(path), "--elements", "Ar,Ca,V,Mn,Co,Cu", "--no-progress"]) == 0
    assert "calibrations differ by up to" in capsys.readouterr().out


def test_cli_choices_match_the_library():
    from mapstorch.cli.fit import OBJECTIVE_CHOICES, OPTIMIZER_CHOICES
    from mapstorch.fit.objectives import OBJECTIVES
    from mapstorch.fit.spectrum import OPTIMIZERS

    assert OPTIMIZER_CHOICES == OPTIMIZERS and OBJECTIVE_CHOICES == OBJECTIVES


def test_aligned_sum_keeps_counts_and_peak_positions():
    from mapstorch.io.dataset import aligned_sum

    c = np.arange(1024, dtype=np.float64)
    cal = np.array([[0.0, 0.01, 0.0], [0.03, 0.01, 0.0]])  # detector 1 reads 3 channels higher in energy
    peak = lambda e: 1000.0 * np.exp(-0.5 * ((e - 6.4) / 0.06) ** 2)  # noqa: E731
    spectra = np.stack([peak(cal[k, 0] + cal[k, 1] * c) for k in range(2)])
    total = aligned_sum(spectra, cal)
    assert total.sum() == pytest.approx(spectra.sum(), rel=1e-6)
    assert np.argmax(total) == np.argmax(spectra[0])  # on detector 0's scale
    raw = spectra.sum(0)
    def width(y):
        mean = (c * y).sum() / y.sum()
        return math.sqrt(((c - mean) ** 2 * y).sum() / y.sum())

    assert width(total) == pytest.approx(width(spectra[0]), rel=1e-6)
    assert width(raw) > width(total) * 1.02  # the raw sum is broadened by the 3-channel shift
