"""The forward model against a direct, slow, obviously-correct evaluation of MODEL.md, plus
linear structure, batching, dtypes, gradients and finiteness over the parameter bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mapstorch.errors import InputError
from mapstorch.parameters import PARAMETERS, SHAPE_PARAMETER_NAMES, ParameterSet
from mapstorch.physics.lines import build_line_table
from mapstorch.physics.model import FitWindow, SpectrumModel, fit_window

COMPONENTS = ["Si", "Ca", "Fe", "Zn", "Pb_L", "Au_M", "Si_Cl"]
RICH = {  # every term switched on
    "ENERGY_OFFSET": -0.012, "ENERGY_SLOPE": 0.0096, "ENERGY_QUADRATIC": 2e-8, "FWHM_OFFSET": 0.11,
    "FWHM_FANOPRIME": 0.00018, "COHERENT_SCT_ENERGY": 15.0, "COMPTON_ANGLE": 95.0, "COMPTON_FWHM_CORR": 1.6,
    "COMPTON_F_STEP": 0.03, "COMPTON_F_TAIL": 0.15, "COMPTON_GAMMA": 3.5, "COMPTON_HI_F_TAIL": 0.02,
    "COMPTON_HI_GAMMA": 2.0, "F_STEP_OFFSET": 0.02, "F_STEP_LINEAR": 0.001, "F_TAIL_OFFSET": 0.01,
    "F_TAIL_LINEAR": 0.002, "KB_F_TAIL_OFFSET": 0.06, "KB_F_TAIL_LINEAR": 0.001, "GAMMA_OFFSET": 2.0,
    "GAMMA_LINEAR": 0.05, "SI_ESCAPE": 0.01, "MIN_ENERGY_TO_FIT": 0.8, "MAX_ENERGY_TO_FIT": 16.5,
}  # fmt: skip


def params(components=COMPONENTS, values=RICH, dtype=torch.float64):
    ps = ParameterSet.default(components).with_maps_values(values)
    amps = {c: 3.0 + 0.5 * i for i, c in enumerate(components)}
    return ps.with_values(amps, COHERENT_SCT_AMPLITUDE=5.5, COMPTON_AMPLITUDE=6.0).to(dtype=dtype)


# ----------------------------------------------------------------------------- direct reference


def reference_spectrum(lines, p: dict, amps: dict, channels: np.ndarray, detector="Si"):
    """MODEL.md sections 1-6, one line and one channel at a time (float64, Python loops)."""
    gain = p["ENERGY_SLOPE"]

    def energy(c):
        return p["ENERGY_OFFSET"] + gain * c + p["ENERGY_QUADRATIC"] * c * c

    def sigma(e):
        return math.sqrt((p["FWHM_OFFSET"] / 2.3548) ** 2 + 3.58 * e * p["FWHM_FANOPRIME"])

    def gauss(d, s):
        return gain / (s * math.sqrt(2 * math.pi)) * math.exp(-d * d / (2 * s * s))

    def step(d, s, e):
        return gain / (2 * e) * math.erfc(d / (math.sqrt(2) * s))

    def tail(d, s, y):
        v = gain / (2 * y * s * math.exp(-1 / (2 * y * y))) * math.erfc(d / (math.sqrt(2) * s) + 1 / (math.sqrt(2) * y))
        return v * math.exp(d / (y * s)) if d < 0 else v

    e0 = p["COHERENT_SCT_ENERGY"]
    esc_e, esc_edge, esc_f = 1.73998, 1.8389, p["SI_ESCAPE"]
    out = np.zeros(len(channels))
    for i, c in enumerate(channels):
        E = energy(c)
        total = 0.0
        for shift, factor in ((0.0, 1.0), (esc_e, esc_f)):
            if factor == 0.0:
                continue
            x = E + shift  # escape copy: the line shape moved down by shift
            for l in range(lines.n_lines):
                el, mu, r = lines.energy_kev[l], lines.mu_fraction[l], lines.ratio[l]
                if lines.gate_edge_kev[l] >= e0 or (shift and el <= esc_edge):
                    continue
                kind = lines.kind[l]
                name = lines.components[lines.component[l]].name
                s = sigma(el)
                f_step = abs(mu * (p["F_STEP_OFFSET"] + p["F_STEP_LINEAR"] * el))
                if kind in (0, 2):
                    f_tail = abs(p["F_TAIL_OFFSET"] + p["F_TAIL_LINEAR"] * mu)
                elif kind == 1:
                    f_tail = abs(p["KB_F_TAIL_OFFSET"] + p["KB_F_TAIL_LINEAR"] * mu)
                else:
                    f_tail = 0.0
                g = abs(p["GAMMA_OFFSET"] + p["GAMMA_LINEAR"] * el) * lines.width_multiplier[l]
                k = r * 10 ** amps[name] / ((1 + f_tail + f_step) if kind != 3 else 1.0)
                d = x - el
                total += factor * k * (gauss(d, s) + f_step * step(d, s, el) + f_tail * tail(d, s, g))
            if shift and e0 <= esc_edge:
                continue
            s0 = sigma(e0)
            total += factor * 10 ** p["COHERENT_SCT_AMPLITUDE"] * gauss(x - e0, s0)
            ec = e0 / (1 + e0 / 511 * (1 - math.cos(math.radians(p["COMPTON_ANGLE"]))))
            sc = sigma(ec)
            fs, ft, fh = p["COMPTON_F_STEP"], p["COMPTON_F_TAIL"], p["COMPTON_HI_F_TAIL"]
            kc = 10 ** p["COMPTON_AMPLITUDE"] / (1 + fs + ft + fh)
            d = x - ec
            total += factor * kc * (gauss(d, sc * p["COMPTON_FWHM_CORR"]) + fs * step(d, sc, ec)
                                    + ft * tail(d, sc, p["COMPTON_GAMMA"]) + fh * tail(-d, sc, p["COMPTON_HI_GAMMA"]))
        out[i] = total
    return out


def test_model_equals_direct_reference():
    ps = params()
    lines = build_line_table(COMPONENTS)
    window = fit_window(2048, ps)
    model = SpectrumModel(lines, window, dtype=torch.float64)
    got = model(ps.shape_values(), ps.amplitudes()).numpy()
    channels = np.arange(window.first, window.last + 1)[::7]  # every 7th channel keeps it quick
    p = dict(zip(SHAPE_PARAMETER_NAMES, ps.shape_values().tolist()))
    amps = {c: float(ps[c]) for c in COMPONENTS}
    want = reference_spectrum(lines, p, amps, channels)
    sel = got[channels - window.first]
    assert np.max(np.abs(sel - want)) / np.max(want) < 1e-11
    # also where the spectrum is small (tails, steps): relative to the local value
    big = want > 1e-6 * want.max()
    assert np.max(np.abs(sel - want)[big] / want[big]) < 1e-6


def test_linear_structure_components_and_counts():
    ps = params()
    lines = build_line_table(COMPONENTS)
    window = fit_window(2048, ps)
    model = SpectrumModel(lines, window, dtype=torch.float64)
    theta, amps = ps.shape_values(), ps.amplitudes()
    total = model(theta, amps)
    D = model.design_matrix(theta)
    assert D.shape == (window.size, len(COMPONENTS) + 2)
    assert torch.allclose(D @ amps, total, rtol=1e-12, atol=1e-9)
    comps = model.components(theta, amps)
    assert set(comps) == set(model.column_names) | {"Escape", "Total"}
    assert torch.allclose(sum(comps[n] for n in model.column_names) + comps["Escape"], total, rtol=1e-12)
    counts = model.counts(theta, amps)
    assert torch.allclose(counts, torch.stack([comps[n].sum() for n in model.column_names]), rtol=1e-12)
    # escape folded into D; it scales linearly with SI_ESCAPE
    theta2 = theta.clone()
    theta2[ps.index("SI_ESCAPE")] *= 2
    assert torch.allclose(model(theta2, amps) - total, comps["Escape"], rtol=1e-9, atol=1e-9)


def test_gating_by_incident_energy():
    ps = params().with_values(COHERENT_SCT_ENERGY=12.0)  # Pb L3 edge 13.04 keV: Pb_L off
    model = SpectrumModel(build_line_table(COMPONENTS), fit_window(2048, ps), dtype=torch.float64)
    comps = model.components(ps.shape_values(), ps.amplitudes())
    assert float(comps["Pb_L"].abs().max()) == 0.0
    assert float(comps["Zn"].max()) > 0
    ps14 = ps.with_values(COHERENT_SCT_ENERGY=14.0)  # above L3, below L2 (15.2): only L3 lines
    c14 = model.components(ps14.shape_values(), ps14.amplitudes())["Pb_L"]
    e = model.energies(ps14.shape_values())
    assert float(c14[(e > 12.4) & (e < 12.8)].max()) < 0.2 * float(c14[(e > 10.4) & (e < 10.7)].max())


def test_compton_energy_and_elastic_position():
    ps = params(["Fe"]).with_values(COMPTON_ANGLE=90.0, COHERENT_SCT_ENERGY=10.0)
    model = SpectrumModel(build_line_table(["Fe"]), fit_window(2048, ps), dtype=torch.float64)
    comps = model.components(ps.shape_values(), ps.amplitudes())
    e = model.energies(ps.shape_values())
    assert float(e[comps["Elastic"].argmax()]) == pytest.approx(10.0, abs=0.01)
    compton_e = 10.0 / (1 + 10.0 / 511.0)
    # the Compton peak's maximum sits near E_C (its low tail shifts it a little)
    assert float(e[comps["Compton"].argmax()]) == pytest.approx(compton_e, abs=0.03)


@pytest.mark.parametrize("detector,shift", [("Si", 1.73998), ("Ge", 9.886)])
def test_escape_peaks(detector, shift):
    key = "SI_ESCAPE" if detector == "Si" else "GE_ESCAPE"
    vals = {**RICH, "SI_ESCAPE": 0.0, key: 0.05, "COHERENT_SCT_ENERGY": 20.0, "MAX_ENERGY_TO_FIT": 19.5,
            "F_STEP_OFFSET": 0.0, "F_STEP_LINEAR": 0.0,  # no step plateau running off the window
            "ENERGY_QUADRATIC": 0.0}  # MAPS normalises shapes by ENERGY_SLOPE, exact only for a linear scale
    ps = params(["Zr"], vals)  # Zr Ka 15.77 keV, above both K edges
    model = SpectrumModel(build_line_table(["Zr"], detector=detector), fit_window(2048, ps), dtype=torch.float64)
    theta, amps = ps.shape_values(), ps.amplitudes()
    comps = model.components(theta, amps)
    e = model.energies(theta)
    peak = float(e[comps["Zr"].argmax()])
    esc = comps["Escape"]
    near = (e > peak - shift - 0.2) & (e < peak - shift + 0.2)
    assert float(e[near][esc[near].argmax()]) == pytest.approx(peak - shift, abs=0.02)
    # total escape of Zr = factor x Zr counts (wholly inside the window here)
    zr_only = model.components(theta, amps * torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert float(zr_only["Escape"].sum()) == pytest.approx(0.05 * float(zr_only["Zr"].sum()), rel=2e-3)
    # differentiable in the escape factor: d model / d factor = escape spectrum / factor
    th = theta.clone().requires_grad_(True)
    model(th, amps).sum().backward()
    assert float(th.grad[ps.index(key)]) == pytest.approx(float(esc.sum()) / 0.05, rel=1e-9)


def test_batched_parameter_sets_equal_single_evaluations():
    ps = params()
    lines = build_line_table(COMPONENTS)
    model = SpectrumModel(lines, fit_window(2048, ps), dtype=torch.float64)
    b = 4
    theta = ps.shape_values().expand(b, -1).clone()
    theta[:, ps.index("ENERGY_OFFSET")] += torch.linspace(-0.01, 0.01, b, dtype=torch.float64)
    theta[:, ps.index("FWHM_OFFSET")] *= torch.linspace(0.9, 1.1, b, dtype=torch.float64)
    amps = ps.amplitudes().expand(b, -1) * torch.linspace(0.5, 2.0, b, dtype=torch.float64)[:, None]
    batched = model(theta, amps)
    for i in range(b):
        assert torch.allclose(batched[i], model(theta[i], amps[i]), rtol=1e-12, atol=1e-9)
    # shared shape parameters with many amplitude vectors (maps): same result through D @ A
    many = model(ps.shape_values(), amps)
    for i in range(b):
        assert torch.allclose(many[i], model(ps.shape_values(), amps[i]), rtol=1e-12, atol=1e-9)


def test_float32_matches_float64():
    ps = params()
    lines = build_line_table(COMPONENTS)
    window = fit_window(2048, ps)
    m64 = SpectrumModel(lines, window, dtype=torch.float64)(ps.shape_values(), ps.amplitudes())
    p32 = ps.to(dtype=torch.float32)
    m32 = SpectrumModel(lines, window, dtype=torch.float32)(p32.shape_values(), p32.amplitudes())
    assert float((m32.double() - m64).abs().max() / m64.abs().max()) < 2e-5


def test_windowed_equals_full_evaluation():
    ps = params()
    lines = build_line_table(COMPONENTS)
    window = fit_window(2048, ps)
    fast = SpectrumModel(lines, window, dtype=torch.float64)
    full = SpectrumModel(lines, window, dtype=torch.float64, windowed=False)
    a = fast(ps.shape_values(), ps.amplitudes())
    b = full(ps.shape_values(), ps.amplitudes())
    assert float((a - b).abs().max() / b.abs().max()) < 1e-12


# ----------------------------------------------------------------------------- gradients

# per-parameter step scales for gradcheck: gradcheck perturbs by eps in *these* units
_SCALE = {
    "ENERGY_OFFSET": 1e-3, "ENERGY_SLOPE": 1e-5, "ENERGY_QUADRATIC": 1e-9, "FWHM_OFFSET": 1e-3,
    "FWHM_FANOPRIME": 1e-5, "COHERENT_SCT_ENERGY": 1e-2, "COMPTON_ANGLE": 0.1,
}  # fmt: skip
_UNUSED = {"COHERENT_SCT_AMPLITUDE", "COMPTON_AMPLITUDE", "SNIP_WIDTH", "MIN_ENERGY_TO_FIT", "MAX_ENERGY_TO_FIT",
           "F_STEP_QUADRATIC", "F_TAIL_QUADRATIC", "KB_F_TAIL_QUADRATIC", "GAMMA_QUADRATIC", "GE_ESCAPE"}


def test_gradcheck_every_parameter_and_amplitude():
    ps = params()
    lines = build_line_table(COMPONENTS)
    model = SpectrumModel(lines, fit_window(2048, ps), dtype=torch.float64)
    theta0, amps0 = ps.shape_values(), ps.amplitudes()
    free = [i for i, n in enumerate(SHAPE_PARAMETER_NAMES) if n not in _UNUSED]
    scale = torch.tensor([_SCALE.get(SHAPE_PARAMETER_NAMES[i], 1e-2) for i in free], dtype=torch.float64)
    weights = torch.rand(model.window.size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def f(z, log_amps):
        theta = theta0.clone()
        theta[free] = theta0[free] + scale * z
        return (model(theta, amps0 * 10**log_amps) * weights).sum(-1, keepdim=True) / 1e4

    z = torch.zeros(len(free), dtype=torch.float64, requires_grad=True)
    la = torch.zeros_like(amps0, requires_grad=True)
    assert torch.autograd.gradcheck(f, (z, la), eps=1e-6, atol=1e-7, rtol=1e-4)
    # and every one of those gradients is non-zero (each parameter really enters the model)
    f(z, la).sum().backward()
    dead = [SHAPE_PARAMETER_NAMES[free[i]] for i in range(len(free)) if z.grad[i] == 0]
    assert not dead, dead


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_values_and_gradients_over_bound_range(dtype):
    """Every parameter at its lower bound, its upper bound and mid-range (others at RICH)."""
    lines = build_line_table(COMPONENTS)
    base = params(dtype=dtype)
    window = fit_window(2048, base)
    model = SpectrumModel(lines, window, dtype=dtype, escape=True)
    for spec in PARAMETERS:
        if spec.name in ("MIN_ENERGY_TO_FIT", "MAX_ENERGY_TO_FIT"):
            continue
        lo, hi = spec.lower, spec.upper
        for v in (lo, hi, 0.5 * (lo + hi)):
            theta = base.shape_values().clone()
            theta[base.index(spec.name)] = v
            theta.requires_grad_(True)
            amps = base.amplitudes().clone().requires_grad_(True)
            out = model(theta, amps)
            assert torch.isfinite(out).all(), (spec.name, v)
            out.sum().backward()
            assert torch.isfinite(theta.grad).all(), (spec.name, v, theta.grad)
            assert torch.isfinite(amps.grad).all(), (spec.name, v)


def test_bad_inputs_raise_clear_errors():
    ps = params()
    model = SpectrumModel(build_line_table(COMPONENTS), fit_window(2048, ps), dtype=torch.float64)
    with pytest.raises(InputError, match=r"\[\.\.\., 32\]"):
        model(ps.shape_values()[:5], ps.amplitudes())
    with pytest.raises(InputError, match="amplitudes"):
        model(ps.shape_values(), ps.amplitudes()[:3])
    with pytest.raises(InputError, match="float32"):
        model(ps.shape_values(), ps.amplitudes().float())
    # the dtype (and device) follow the inputs
    out32 = model(ps.shape_values().float(), ps.amplitudes().float())
    assert out32.dtype == torch.float32
    with pytest.raises(InputError):
        FitWindow(10, 5)


def test_fit_window_follows_xrfmaps_rounding():
    ps = ParameterSet.default([]).with_maps_values(
        {"ENERGY_OFFSET": -0.0041840752, "ENERGY_SLOPE": 0.0095216077, "MIN_ENERGY_TO_FIT": 1.0, "MAX_ENERGY_TO_FIT": 11.0}
    )
    w = fit_window(2000, ps)
    assert (w.first, w.last) == (round((1.0 + 0.0041840752) / 0.0095216077), round((11.0 + 0.0041840752) / 0.0095216077))
    assert fit_window(1000, ps).last == 999  # beyond the spectrum: clipped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    ps = params(dtype=torch.float32)
    lines = build_line_table(COMPONENTS)
    window = fit_window(2048, ps)
    cpu = SpectrumModel(lines, window, dtype=torch.float32)(ps.shape_values(), ps.amplitudes())
    gpu_model = SpectrumModel(lines, window, dtype=torch.float32, device="cuda")
    psg = ps.to(device="cuda")
    theta = psg.shape_values().clone().requires_grad_(True)
    out = gpu_model(theta, psg.amplitudes())
    out.sum().backward()
    assert torch.isfinite(theta.grad).all()
    assert float((out.cpu() - cpu).abs().max() / cpu.abs().max()) < 1e-5
