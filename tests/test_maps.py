"""Map fitting: batched solvers against independent references, recovery of synthetic maps,
streaming with resume after a SIGKILL, the CLI and its XRF-Maps output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mapstorch.io.dataset import Dataset
from mapstorch.maps import fit_map, solvers
from mapstorch.synthetic import DEMO_SAMPLE, simulate_map


def _dataset(sm, live=None) -> Dataset:
    rows, cols, chans = sm.counts.shape
    cal = np.array([[float(sm.params[n]) for n in ("ENERGY_OFFSET", "ENERGY_SLOPE", "ENERGY_QUADRATIC")]])
    return Dataset(path="<simulated>", format="npy", rows=rows, cols=cols, detectors=1, channels=chans,
                   calibration=cal, spectra=sm.counts[:, :, None, :].astype(np.float32),
                   live_time=None if live is None else np.full((rows, cols, 1), live))


# ----------------------------------------------------------------------------- solvers
def test_batched_nnls_matches_scipy():
    from scipy.optimize import nnls as scipy_nnls

    rng = np.random.default_rng(0)
    d = np.abs(rng.normal(size=(200, 8)))
    d[:, 1] = d[:, 0] * 0.9 + 0.1 * d[:, 1]  # two nearly collinear columns
    truth = np.abs(rng.normal(size=(50, 8))) * (rng.random((50, 8)) > 0.3)
    t = truth @ d.T + rng.normal(scale=0.05, size=(50, 200))
    a, iters, ok = solvers.nnls(torch.tensor(d), torch.tensor(t), max_iter=20000, tol=1e-10)
    assert bool(ok.all())
    for p in range(50):
        ref, _ = scipy_nnls(d, t[p])
        cost = np.sum((d @ a[p].numpy() - t[p]) ** 2)
        assert cost <= np.sum((d @ ref - t[p]) ** 2) * (1 + 1e-8) + 1e-12
        np.testing.assert_allclose(a[p].numpy(), ref, atol=1e-5)


def _nnls_problem(n_pix: int, dtype=torch.float64, seed: int = 4):
    """A design of 12 overlapping peaks on 300 channels and noisy targets, majors and zeros."""
    rng = np.random.default_rng(seed)
    c = np.arange(300)[:, None]
    d = np.exp(-0.5 * ((c - np.linspace(20, 280, 12)[None, :]) / 9.0) ** 2)
    truth = rng.gamma(1.0, 50.0, size=(n_pix, 12)) * (rng.random((n_pix, 12)) > 0.4)
    t = np.clip(truth @ d.T + rng.normal(scale=2.0, size=(n_pix, 300)), 0, None)
    return torch.tensor(d, dtype=dtype), torch.tensor(t, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_nnls_iterations_equal_the_tensor_ones(dtype):
    d, t = _nnls_problem(300, dtype)
    t[7] = float("nan")  # a NaN pixel: not iterated by either engine (it would never converge)
    t[8] = 0.0  # an empty pixel: zero amplitudes
    ref, it_ref, ok_ref = solvers.nnls(d, t, engine="torch")
    got, it_got, ok_got = solvers.nnls(d, t, engine="compiled")
    assert got.dtype == dtype and it_got.dtype == torch.int64
    good = torch.ones(300, dtype=torch.bool)
    good[7] = False
    assert not bool(ok_ref[7]) and not bool(ok_got[7]) and int(it_ref[7]) == int(it_got[7]) == 0
    assert bool(torch.isnan(got[7]).all()) and bool(torch.isnan(ref[7]).all())
    assert bool(ok_got[good].all()) and bool((got[8] == 0).all())
    assert int(it_got.max()) > 3  # some pixels take several steps: the lanes are refilled as others finish
    # the same steps per pixel: the same amplitudes to rounding, the same iteration counts nearly everywhere
    scale = ref[good].abs().amax(1, keepdim=True).clamp(min=1e-30)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert float(((got[good] - ref[good]).abs() / scale).max()) < tol
    assert float((it_got[good] == it_ref[good]).float().mean()) > 0.95


def test_compiled_nnls_does_not_depend_on_threads_or_order(monkeypatch):
    from mapstorch.maps import nnls_cpu

    d, t = _nnls_problem(2500, torch.float32, seed=5)
    a1, it1, ok1 = solvers.nnls(d, t, engine="compiled")
    perm = torch.randperm(2500, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # three threads, chunks in another order
    monkeypatch.setattr(nnls_cpu, "_CHUNK", 700)
    a2, it2, ok2 = solvers.nnls(d, t[perm], engine="compiled")
    assert torch.equal(a2, a1[perm]) and torch.equal(it2, it1[perm]) and torch.equal(ok2, ok1[perm])
    # a low max_iter: pixels stop there, not converged, with the amplitudes reached so far
    a3, it3, ok3 = solvers.nnls(d, t, engine="compiled", max_iter=2)
    ar, itr, okr = solvers.nnls(d, t, engine="torch", max_iter=2)
    assert int(it3.max()) == 2 and not bool(ok3.all()) and torch.equal(ok3, okr) and torch.equal(it3, itr)
    assert float(((a3 - ar).abs() / ar.abs().amax(1, keepdim=True).clamp(min=1e-30)).max()) < 1e-4


def test_model_weights_and_chi2_in_one_pass():
    rng = np.random.default_rng(6)
    c, p, k = 700, 3000, 6
    chan = np.arange(c)[:, None]
    d = np.exp(-0.5 * ((chan - np.linspace(50, 650, k)[None, :]) / 15.0) ** 2)
    d[np.abs(chan - np.linspace(50, 650, k)[None, :]) > 60] = 0.0  # windowed peaks: mostly exact zeros
    a = rng.gamma(1.0, 20.0, size=(p, k)) * (rng.random((p, k)) > 0.3)
    a[5, 0] = np.nan  # a NaN amplitude: NaN model, weights and chi-square where it reaches
    bg = rng.gamma(2.0, 0.4, size=(p, c))  # many channels below one count: weight 1 there
    y = rng.poisson(np.nan_to_num(a) @ d.T + bg).astype(np.float32)
    args = [torch.tensor(v, dtype=torch.float32) for v in (d, a, bg, y)]
    dd, aa, bb, yy = args
    bc, yc = bb.T.contiguous().T, yy.T.contiguous().T  # channel-major, as in a map fit
    w, chi = solvers.model_weights_chi2(dd, aa, bc, yc)
    assert w.T.is_contiguous() and chi.dtype == torch.float32
    m = np.asarray(a) @ d.T + bg  # float64 references
    w_ref = 1.0 / np.maximum(m, 1.0)
    chi_ref = ((y - m) ** 2 * w_ref).sum(1)
    ok = np.arange(p) != 5
    np.testing.assert_allclose(w.double().numpy()[ok], w_ref[ok], rtol=1e-5, atol=0)
    # the NaN reaches the channels its component has (exact zeros of the design are skipped)
    np.testing.assert_array_equal(torch.isnan(w[5]).numpy(), d[:, 0] != 0)
    assert bool(torch.isnan(chi[5]))
    np.testing.assert_allclose(chi.double().numpy()[ok], chi_ref[ok], rtol=2e-5, atol=0)
    # pixel-major input: the tensor formulas, the same numbers to float32 rounding
    w2, chi2 = solvers.model_weights_chi2(dd, aa, bb, yy)
    torch.testing.assert_close(w2[ok], w[ok], rtol=1e-5, atol=0)
    torch.testing.assert_close(chi2, chi, rtol=1e-4, atol=0, equal_nan=True)


def test_batched_poisson_matches_direct_minimisation():
    from scipy.optimize import minimize

    rng = np.random.default_rng(1)
    d = np.abs(rng.normal(size=(120, 4))) + 0.05
    truth = np.array([[50.0, 0.0, 20.0, 5.0], [3.0, 2.0, 0.0, 1.0]])
    b = np.full((2, 120), 2.0)
    y = rng.poisson(truth @ d.T + b).astype(float)
    a, _, ok = solvers.poisson(torch.tensor(d), torch.tensor(y), torch.tensor(b), torch.ones(2, 4), max_iter=20000,
                               tol=1e-10)
    for p in range(2):
        def nll(x):
            m = d @ x + b[p]
            return float(np.sum(m - y[p] * np.log(m)))

        ref = minimize(nll, np.ones(4), bounds=[(0, None)] * 4, method="L-BFGS-B", options={"ftol": 1e-14, "gtol": 1e-10})
        assert nll(a[p].numpy()) <= ref.fun + 1e-6
        np.testing.assert_allclose(a[p].numpy(), ref.x, atol=2e-2 * max(ref.x.max(), 1))


def test_poisson_map_solver_reaches_the_likelihood_optimum_in_a_few_steps():
    # the poisson method's own problem (elements plus a background shape, from the NNLS start
    # and the background start of fit_map): every pixel at the optimum of an independent
    # bounded minimiser (to the solver's deviance tolerance), in a handful of steps
    from scipy.optimize import minimize

    from mapstorch.maps.fit import _background_start
    from mapstorch.physics.model import SpectrumModel
    from mapstorch.physics.snip import snip_window

    sm = simulate_map(4, 6, counts={k: v / 10 for k, v in DEMO_SAMPLE.items()}, seed=3)
    ps, w = sm.params, sm.window
    design = SpectrumModel(sm.lines, w, dtype=torch.float64).design_matrix(ps.shape_values().double()).detach()
    y = torch.as_tensor(sm.counts.reshape(-1, sm.counts.shape[-1]), dtype=torch.float64)
    cal = [float(ps[n]) for n in ("ENERGY_OFFSET", "ENERGY_SLOPE", "ENERGY_QUADRATIC", "SNIP_WIDTH")]
    bg, yw, rhs = snip_window(y, *cal, (w.first, w.last), with_window=True, project=design)
    a0, _, _ = solvers.nnls(design, None, rhs=rhs)
    shape = snip_window(y.sum(0, keepdim=True), *cal, (w.first, w.last))[0]
    shape = shape / shape.sum()
    aug = torch.cat([design, shape[:, None]], 1)
    yp = yw.contiguous()
    start = torch.cat([a0, _background_start(design, shape, a0, yp)[:, None]], 1)
    a, iters, ok = solvers.poisson(aug, yp, None, start)
    assert bool(ok.all()) and int(iters.max()) <= 8, iters
    dev = solvers.deviance_rows(yp, (a @ aug.T).clamp(min=1e-300))
    d, yn = aug.numpy(), yp.numpy()
    for p in range(0, len(yn), 5):
        def nll(x):
            m = np.maximum(d @ x, 1e-300)
            return 2.0 * float(np.sum(m - yn[p] * np.log(m)))

        def grad(x):
            m = np.maximum(d @ x, 1e-300)
            return 2.0 * d.T @ (1.0 - yn[p] / m)

        ref = minimize(nll, start[p].numpy(), jac=grad, bounds=[(0, None)] * d.shape[1], method="L-BFGS-B",
                       options={"ftol": 1e-15, "gtol": 1e-9, "maxiter": 20000})
        const = 2.0 * float(np.sum(yn[p] * np.log(np.maximum(yn[p], 1e-300)) - yn[p]))  # deviance = nll + const
        assert float(dev[p]) <= ref.fun + const + 2e-2, (p, float(dev[p]), ref.fun + const)


def test_poisson_stderr_is_the_inverse_fisher_information():
    d = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=torch.float64)
    a = torch.tensor([[10.0, 20.0]], dtype=torch.float64)
    m = a @ d.T
    info = (d.T * (1 / m[0])) @ d
    expected = torch.sqrt(torch.diagonal(torch.linalg.inv(info)))
    torch.testing.assert_close(solvers.poisson_stderr(d, m, a)[0], expected)
    assert torch.isnan(solvers.poisson_stderr(d, m, torch.tensor([[10.0, 0.0]], dtype=torch.float64))[0, 1])


def test_weighted_pairs_skip_only_exact_zeros():
    from mapstorch.physics.model import SpectrumModel

    sm = simulate_map(2, 2, seed=0)
    for dtype in (torch.float32, torch.float64):
        d = SpectrumModel(sm.lines, sm.window, dtype=dtype).design_matrix(sm.params.shape_values().to(dtype),
                                                                          with_escape=False)
        k = d.shape[1]
        iu = torch.triu_indices(k, k)
        pairs = d[:, iu[0]] * d[:, iu[1]]
        plan = solvers.pair_blocks(pairs)
        if dtype == torch.float32:  # windowed peaks: most products are exactly zero (float64 keeps tiny tails)
            assert sum((hi - lo) * len(cols) for lo, hi, cols in plan) < 0.6 * pairs.numel()
        w = torch.rand(5, d.shape[0], dtype=dtype)
        tol = {"rtol": 1e-5, "atol": 0.0} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 0.0}
        dense = (w.double() @ pairs.double()).to(dtype)
        torch.testing.assert_close(solvers.weighted_pairs(w, pairs, plan), dense, **tol)
        # a channel-major (transposed) weight matrix, as the map fit passes it
        torch.testing.assert_close(solvers.weighted_pairs(w.T.contiguous().T, pairs), dense, **tol)


# ----------------------------------------------------------------------------- recovery
def test_a_nan_pixel_is_flagged_and_leaves_the_others_alone():
    sm = simulate_map(4, 8, seed=2)
    clean = fit_map(_dataset(sm), sm.params, method="nnls")
    ds = _dataset(sm)
    ds.spectra[1, 3, 0, 700] = np.nan  # a damaged channel in one pixel of float data
    r = fit_map(ds, sm.params, method="nnls")
    assert r.status[1, 3] == 2 and r.iterations[1, 3] == 0  # non-finite; not iterated
    assert (r.counts[:, 1, 3] == 0).all()  # XRF-Maps writes 0 where a fit is not finite
    others = np.ones((4, 8), dtype=bool)
    others[1, 3] = False
    assert (r.status[others] == 0).all()
    np.testing.assert_array_equal(r.counts[:, others], clean.counts[:, others])
    np.testing.assert_array_equal(r.reduced_chi2[others], clean.reduced_chi2[others])


@pytest.mark.parametrize("method", ["nnls", "poisson"])
def test_a_nan_pixel_leaves_the_chunk_sums_and_the_background_shape_finite(method):
    # the integrated fit and background, and the poisson method's background shape (from the
    # chunk's summed spectrum), leave the damaged pixel out: the same as a pixel without counts
    sm = simulate_map(4, 8, seed=2)
    ds = _dataset(sm)
    ds.spectra[1, 3, 0, 700] = np.nan
    r = fit_map(ds, sm.params, method=method)
    empty = _dataset(sm)
    empty.spectra[1, 3] = 0.0
    ref = fit_map(empty, sm.params, method=method)
    assert r.status[1, 3] == 2 and (r.counts[:, 1, 3] == 0).all()
    others = np.ones((4, 8), dtype=bool)
    others[1, 3] = False
    assert np.isin(r.status[others], (0, 1)).all()
    assert np.isfinite(r.fitted_integrated).all() and np.isfinite(r.background_integrated).all()
    np.testing.assert_allclose(r.fitted_integrated, ref.fitted_integrated, rtol=1e-5)
    np.testing.assert_allclose(r.background_integrated, ref.background_integrated, rtol=1e-5)
    np.testing.assert_allclose(r.counts[:, others], ref.counts[:, others], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("method", ["nnls", "poisson"])
def test_channel_major_files_fit_in_place_with_the_same_numbers(tmp_path, method):
    # XRF-Maps (and raw fly-scan) files hold [channels, rows, cols]: their blocks reach the fit as
    # channel-major views, which the SNIP reads in place; the maps are those of pixel-major data
    from mapstorch.io.hdf5 import write_xrfmaps_h5
    from mapstorch.io.open import open_dataset

    sm = simulate_map(6, 40, seed=5)
    ds = _dataset(sm)
    path = tmp_path / "map.h5"
    write_xrfmaps_h5(path, ds, compression=None)
    with open_dataset(path) as h5:
        block = h5.read(slice(0, 3))
        flat = block[:, :, 0].reshape(-1, h5.channels)
        assert flat.T.flags.c_contiguous  # the layout this test is about
        got = fit_map(h5, sm.params, method=method, chunk_rows=3)
    ref = fit_map(ds, sm.params, method=method, chunk_rows=3)
    for key in ("counts", "counts_stderr", "reduced_chi2", "iterations", "status", "total_counts", "fitted_integrated",
                "background_integrated"):
        np.testing.assert_array_equal(getattr(got, key), getattr(ref, key), err_msg=key)


def test_nnls_map_recovers_the_majors():
    sm = simulate_map(16, 16, seed=0)
    r = fit_map(_dataset(sm, live=2.0), sm.params, method="nnls")
    assert (r.status == 0).all()
    for name in ("Fe", "Ca"):
        rel = (r.element(name) - sm.truth_counts[name]) / sm.truth_counts[name]
        assert abs(np.median(rel)) < 0.01, (name, np.median(rel))
    # counts per second = amplitude / live time (XRF-Maps); window counts = amplitude x the
    # model's counts per unit amplitude (every line of the element, > 1 for a K family)
    np.testing.assert_allclose(r.counts_per_sec, r.amplitudes / 2.0, rtol=1e-6)
    ratio = r.counts[r.names.index("Fe")] / r.amplitudes[r.names.index("Fe")]
    assert np.ptp(ratio) < 1e-3 * ratio.mean() and 1.05 < ratio.mean() < 2.0
    z = (r.element("Fe") - sm.truth_counts["Fe"]) / r.counts_stderr[r.names.index("Fe")]
    assert 0.7 < np.std(z) < 1.5
    assert 0.7 < np.nanmedian(r.reduced_chi2) < 1.3


def test_poisson_beats_least_squares_at_low_counts():
    sm = simulate_map(16, 16, counts={k: v / 30 for k, v in DEMO_SAMPLE.items()}, seed=1)
    ds = _dataset(sm)
    err = {}
    for method in ("nnls", "poisson"):
        r = fit_map(ds, sm.params, method=method)
        err[method] = {n: np.median(np.abs(r.element(n) - sm.truth_counts[n]) / sm.truth_counts[n])
                       for n in ("Cr", "Ni", "Mn", "Ba_L")}
    assert all(err["poisson"][n] < err["nnls"][n] for n in err["nnls"]), err


def test_nonlinear_method_recovers_an_energy_drift_map():
    from mapstorch.synthetic import simulate_spectrum

    rows, cols = 3, 5
    counts = {k: v / 20 for k, v in DEMO_SAMPLE.items()}
    spectra, truth = [], []
    for r in range(rows):
        for c in range(cols):
            off = -0.0042 + 0.03 * (c / (cols - 1) - 0.5)  # +-15 eV across the map
            s = simulate_spectrum(counts=counts, params={"ENERGY_OFFSET": off}, seed=r * cols + c,
                                  elastic_counts=1e4, compton_counts=6e4, continuum_level=1.5)
            spectra.append(s.counts)
            truth.append(off)
    base = simulate_spectrum(counts=counts, seed=0)
    cal = np.array([[float(base.params[n]) for n in ("ENERGY_OFFSET", "ENERGY_SLOPE", "ENERGY_QUADRATIC")]])
    sp = np.array(spectra, dtype=np.float32).reshape(rows, cols, 1, -1)
    ds = Dataset(path="<drift>", format="npy", rows=rows, cols=cols, detectors=1, channels=sp.shape[-1],
                 calibration=cal, spectra=sp)
    fixed = fit_map(ds, base.params, method="nnls")
    r = fit_map(ds, base.params, method="nonlinear")
    assert (r.status == 0).all()
    assert r.parameter_names == ("ENERGY_OFFSET", "ENERGY_SLOPE", "FWHM_OFFSET")
    err = r.parameters[0] - np.array(truth).reshape(rows, cols)
    assert np.abs(err).max() < 0.003  # 3 eV
    assert np.all(np.abs(err) < 5 * r.parameters_stderr[0] + 1e-4)
    assert np.nanmedian(r.reduced_chi2) < np.nanmedian(fixed.reduced_chi2)
    fe = r.element("Fe") / base.truth_counts["Fe"] - 1
    assert np.abs(np.median(fe)) < 0.01
    out = r.xrfmaps_results()["Fitted"]["extra"]
    assert out["Parameter_ENERGY_OFFSET"].shape == (rows, cols)


def test_chunks_and_dtypes_agree():
    sm = simulate_map(8, 8, seed=2)
    ds = _dataset(sm)
    a = fit_map(ds, sm.params, chunk_rows=3)
    b = fit_map(ds, sm.params, chunk_rows=8, dtype=torch.float64)
    np.testing.assert_allclose(a.counts, b.counts, rtol=2e-3, atol=0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_maps_match_cpu():
    sm = simulate_map(12, 12, seed=4)
    ds = _dataset(sm)
    for method in ("nnls", "poisson", "nonlinear"):
        cpu = fit_map(ds, sm.params, method=method)
        gpu = fit_map(ds, sm.params, method=method, device="cuda")
        for name in ("Fe", "Ca"):
            np.testing.assert_allclose(gpu.element(name), cpu.element(name), rtol=2e-3, atol=0.5, err_msg=method)
        assert (gpu.status == 0).all(), method


def test_bad_input_is_a_clear_error():
    from mapstorch.errors import InputError

    sm = simulate_map(4, 4, seed=0)
    ds = _dataset(sm)
    with pytest.raises(InputError, match="unknown map method"):
        fit_map(ds, sm.params, method="magic")
    with pytest.raises(InputError, match="detector 3"):
        fit_map(ds, sm.params, detector=3)
    with pytest.raises(InputError, match="chunk_rows"):
        fit_map(ds, sm.params, chunk_rows=0)
    with pytest.raises(InputError, match="unknown parameter"):
        fit_map(ds, sm.params, method="nonlinear", parameter_maps=("NOPE",))
    for names in (("Fe",), ("ENERGY_OFFSET", "SNIP_WIDTH")):
        with pytest.raises(InputError, match="cannot be refitted per pixel"):
            fit_map(ds, sm.params, method="nonlinear", parameter_maps=names)
    with pytest.raises(InputError, match="twice"):
        fit_map(ds, sm.params, method="nonlinear", parameter_maps=("ENERGY_OFFSET", "ENERGY_OFFSET"))


# ----------------------------------------------------------------------------- CLI and resume
def _write_inputs(tmp_path: Path, rows: int = 12, cols: int = 12) -> tuple[Path, Path]:
    from mapstorch.io.override import new_override

    sm = simulate_map(rows, cols, seed=3)
    data = tmp_path / "scan.npy"
    np.save(data, sm.counts.astype(np.float32))
    ovr = tmp_path / "maps_fit_parameters_override.txt"
    new_override(sm.params).write(ovr)
    return data, ovr


def test_cli_map_writes_the_xrfmaps_layout(tmp_path):
    import h5py

    from mapstorch.cli.main import main

    data, ovr = _write_inputs(tmp_path)
    out = tmp_path / "maps.h5"
    assert main(["map", str(data), "--override", str(ovr), "--out", str(out), "--png", str(tmp_path / "png"),
                 "--no-progress"]) == 0
    with h5py.File(out) as f:
        g = f["MAPS/XRF_Analyzed/NNLS"]
        names = [n.decode().strip() for n in g["Channel_Names"][()]]
        # XRF-Maps' channels: elements, then its extra channels in its order
        assert "Fe" in names and names[-6:] == ["Sum_Elastic_Inelastic", "Total_Fluorescence_Yield", "Fit_Residual",
                                                "COHERENT_SCT_AMPLITUDE", "Num_Iter", "COMPTON_AMPLITUDE"]
        units = [n.decode().strip() for n in g["Channel_Units"][()]]
        assert units[names.index("Fe")] == "cts/s" and units[names.index("Num_Iter")] == ""
        assert g["Counts_Per_Sec"].shape == (len(names), 12, 12)
        assert {"Counts", "Counts_Stderr", "Counts_Per_Sec_Stderr", "Reduced_Chi2", "Status"} <= set(g)
        assert g["Counts_Stderr"].shape == g["Counts_Per_Sec"].shape
        # the integrated model and background over the fit window (zero outside it)
        fitted, bg = g["Fitted_Integrated_Spectra"][()], g["FIT_Integrated_Background"][()]
        spectra = f["MAPS/Spectra/mca_arr"][()].sum(axis=(1, 2))
        inside = fitted > 0
        assert fitted.shape == spectra.shape and 0 < inside.sum() < len(fitted)
        assert abs(fitted[inside].sum() / spectra[inside].sum() - 1) < 0.02
        assert (bg <= fitted + 1e-3).all()
        # Total_Fluorescence_Yield is each pixel's spectrum total per second (live time 1 s here)
        np.testing.assert_allclose(g["Counts_Per_Sec"][names.index("Total_Fluorescence_Yield")],
                                   f["MAPS/Spectra/mca_arr"][()].sum(0), rtol=1e-4)
        assert f["MAPS/Spectra/mca_arr"].shape[1:] == (12, 12)
    assert (tmp_path / "png" / "counts_per_sec.png").stat().st_size > 10_000
    assert not (tmp_path / "maps.h5.partial").exists()


def _map_run_stopped(tmp_path, sig, after_chunks):
    """A ``mapstorch map`` run over 24 one-row chunks, sent ``sig`` once ``after_chunks`` chunks
    are stored: ``(process, stderr, command, environment, output path, partial folder)``."""
    data, ovr = _write_inputs(tmp_path, rows=24, cols=24)
    out = tmp_path / "maps.h5"
    work = tmp_path / "maps.h5.partial"
    cmd = [sys.executable, "-m", "mapstorch", "map", str(data), "--override", str(ovr), "--out", str(out),
           "--chunk-rows", "1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(work.glob("chunk_*.npz"))) < after_chunks and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc, err, cmd, env, out, work


def test_killed_run_leaves_no_output_and_resumes(tmp_path):
    proc, _, cmd, env, out, work = _map_run_stopped(tmp_path, signal.SIGKILL, 3)
    done_before = sorted(p.name for p in work.glob("chunk_*.npz"))
    assert 3 <= len(done_before) < 24, done_before
    assert not out.exists()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"{len(done_before)} chunk(s) reused" in res.stdout
    assert out.exists() and not work.exists()
    # the resumed result equals an uninterrupted run
    full = tmp_path / "full.h5"
    res2 = subprocess.run(cmd[:-5] + ["--out", str(full), "--chunk-rows", "1", "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert res2.returncode == 0, res2.stderr
    import h5py

    with h5py.File(out) as a, h5py.File(full) as b:
        np.testing.assert_array_equal(a["MAPS/XRF_Analyzed/NNLS/Counts_Per_Sec"][()],
                                      b["MAPS/XRF_Analyzed/NNLS/Counts_Per_Sec"][()])


def test_interrupted_run_says_how_to_resume(tmp_path):
    """Ctrl-C (SIGINT): exit status 130, no output file, and the finished chunks are named."""
    proc, err, _, _, out, work = _map_run_stopped(tmp_path, signal.SIGINT, 2)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.rstrip().endswith("mapstorch: interrupted")
    kept = len(list(work.glob("chunk_*.npz")))
    assert f"{kept} finished chunk(s) kept in {work}: the same command resumes" in err
    assert not out.exists()


def test_map_2ide_nnls_per_detector(tmp_path):
    from conftest import require_shared

    from mapstorch.io import open_dataset
    from mapstorch.io.override import read_override

    folder = require_shared("xrfmaps-2ide")
    override = read_override(folder / "maps_fit_parameters_override.txt")
    with open_dataset(folder / "mda" / "2xfm_0010.mda", override=override) as ds:
        results = [fit_map(ds, override, detector=d) for d in range(ds.detectors)]
        total = fit_map(ds, override, detector="sum")
    for r in results + [total]:
        assert (r.status == 0).all()
        assert np.all(np.isfinite(r.counts))
    # fitting is linear in the data: the detectors' maps add up to the map of their sum
    for name in ("Ar", "Ca", "Fe", "Cu"):
        i = total.names.index(name)
        per_detector = sum(float(r.counts[i].sum()) for r in results)
        assert per_detector == pytest.approx(float(total.counts[i].sum()), rel=0.03), name


def test_nonlinear_map_of_the_2ide_sum_agrees_with_fit_spectrum():
    """Real peaks: the expansion-based refit of detector 0's integrated spectrum (a one-pixel
    map) finds the parameters the exact-model spectrum fit finds, within their errors."""
    from conftest import require_shared

    from mapstorch.fit import fit_spectrum
    from mapstorch.io import open_dataset
    from mapstorch.io.override import read_override
    from mapstorch.maps.fit import DEFAULT_PARAMETER_MAPS

    folder = require_shared("xrfmaps-2ide")
    override = read_override(folder / "maps_fit_parameters_override.txt")
    with open_dataset(folder / "mda" / "2xfm_0010.mda", override=override) as ds:
        spectra = ds.read(slice(0, ds.rows))[:, :, :1, :]
        cal = np.asarray(ds.calibration[:1], dtype=np.float64)
    total = spectra.sum((0, 1), keepdims=True, dtype=np.float64)
    one = Dataset(path="<2xfm_0010 det 0, summed>", format="npy", rows=1, cols=1, detectors=1,
                  channels=total.shape[-1], calibration=cal, spectra=total.astype(np.float32))
    r = fit_map(one, override, method="nonlinear")
    assert r.status[0, 0] == 0
    f = fit_spectrum(total[0, 0, 0], params=override, calibration=cal[0], free=list(DEFAULT_PARAMETER_MAPS))
    for i, name in enumerate(DEFAULT_PARAMETER_MAPS):
        got, err = float(r.parameters[i, 0, 0]), float(r.parameters_stderr[i, 0, 0])
        assert abs(got - f.values[name]) < 3 * max(err, f.stderr[name]), (name, got, f.values[name], err)
    # the data want wider peaks than the override file's 0.097 keV: both methods see it
    assert float(r.parameters[2, 0, 0]) > 0.11


@pytest.mark.parametrize("method", ["nnls", "nonlinear"])
def test_dask_local_cluster_gives_the_same_maps(tmp_path, method):
    pytest.importorskip("distributed")
    import h5py

    from mapstorch.cli.main import main

    data, ovr = _write_inputs(tmp_path, rows=8, cols=8)
    local, dist = tmp_path / "local.h5", tmp_path / "dask.h5"
    common = ["--override", str(ovr), "--chunk-rows", "2", "--method", method, "--no-progress"]
    assert main(["map", str(data), "--out", str(local), *common]) == 0
    assert main(["map", str(data), "--out", str(dist), "--dask-local", "2", *common]) == 0
    group = "MAPS/XRF_Analyzed/" + ("NNLS" if method == "nnls" else "Fitted")
    keys = ["Counts_Per_Sec", "Counts_Stderr", "Reduced_Chi2"]
    with h5py.File(local) as a, h5py.File(dist) as b:
        if method == "nnls":  # identical, bit for bit
            for key in keys:
                np.testing.assert_array_equal(a[f"{group}/{key}"][()], b[f"{group}/{key}"][()])
        else:
            # PyTorch's small matrix products round differently with 1 thread (a worker) and 2 (this
            # process) in the last bit, and the Levenberg-Marquardt batches shrink as pixels converge:
            # equal to float32 rounding, the same status (a convergence test on the edge may take a
            # step more or less)
            keys += ["Parameter_ENERGY_OFFSET", "Parameter_ENERGY_SLOPE", "Parameter_FWHM_OFFSET"]
            for key in keys:
                np.testing.assert_allclose(a[f"{group}/{key}"][()], b[f"{group}/{key}"][()], rtol=2e-5, atol=1e-6)
            np.testing.assert_array_equal(a[f"{group}/Status"][()], b[f"{group}/Status"][()])
            steps = np.abs(a[f"{group}/Iterations"][()] - b[f"{group}/Iterations"][()])
            assert steps.max() <= 1 and (steps > 0).sum() <= 2


def test_cli_map_each_detector_writes_xrfmaps_files(tmp_path):
    import h5py
    from conftest import require_shared

    from mapstorch.cli.main import main

    folder = require_shared("xrfmaps-2ide")
    out = tmp_path / "2xfm_0010.h5"
    assert main(["map", str(folder / "mda" / "2xfm_0010.mda"), "--out", str(out), "--detector", "each",
                 "--no-progress"]) == 0
    files = [out] + [Path(f"{out}{d}") for d in range(4)]
    cps = []
    for f in files:
        with h5py.File(f) as h5:
            cps.append(h5["MAPS/XRF_Analyzed/NNLS/Counts_Per_Sec"][()])
    assert all(c.shape == cps[0].shape for c in cps)
    assert not Path(f"{out}.partial").exists()
    # OUT is XRF-Maps' average file: the per-pixel mean of the elements' maps, every channel
    np.testing.assert_allclose(cps[0], np.mean(cps[1:], axis=0, dtype=np.float64), rtol=1e-6, atol=1e-6)
    with h5py.File(files[0]) as h5:  # and its live times the elements' mean
        live = h5["MAPS/Spectra/Elapsed_Livetime"][()]
    per = []
    for f in files[1:]:
        with h5py.File(f) as h5:
            per.append(h5["MAPS/Spectra/Elapsed_Livetime"][()])
    np.testing.assert_allclose(live, np.mean(per, axis=0), rtol=1e-6)


def test_nnls_of_the_axo_standard_matches_xrfmaps():
    """XRF-Maps' own output for the AXO standard of this data set (detector 0, its integrated
    spectrum, NNLS, /MAPS/Quantification/Standard0 in the XRF-Maps file dumped in
    shared/docs/formats/xrfmaps-output-v10-layout.txt): Ca 694.42, Fe 496.45, Cu 483.28 cts/s.
    With XRF-Maps' line tables, our NNLS of the same spectrum and settings gives the same."""
    from conftest import require_shared

    from mapstorch.io import open_dataset, read_override
    from mapstorch.physics.lines import xrfmaps_source

    folder = require_shared("xrfmaps-2ide")
    ref = require_shared("xrfmaps-reference")
    ovr = read_override(folder / "maps_fit_parameters_override.txt")
    with open_dataset(folder / "mda" / "axo_std.mda", override=ovr) as ds:
        spectrum = ds.integrated(0)
        live = float(ds.live_time[..., 0].sum())
        cal = ds.calibration[0]
    assert live == pytest.approx(118.996, abs=0.01)  # XRF-Maps' Elapsed_Livetime of that spectrum
    one = Dataset(path="<axo integrated>", format="npy", rows=1, cols=1, detectors=1, channels=len(spectrum),
                  calibration=cal, spectra=spectrum[None, None, None, :].astype(np.float32),
                  live_time=np.full((1, 1, 1), live))
    source = xrfmaps_source(ref / "xrf_library.csv", ref / "henke.xdr")
    r = fit_map(one, ovr, method="nnls", line_source=source, dtype=torch.float64)
    xrfmaps = {"Ca": 694.4228688023695, "Fe": 496.44654992225054, "Cu": 483.27722951672735}
    for name, value in xrfmaps.items():
        ours = float(r.counts_per_sec[r.names.index(name)][0, 0])
        assert ours == pytest.approx(value, rel=0.015), (name, ours, value)
    # with xraylib's tables the numbers move by a few per cent (documented in docs/maps.md)
    rx = fit_map(one, ovr, method="nnls", dtype=torch.float64)
    for name, value in xrfmaps.items():
        assert float(rx.counts_per_sec[rx.names.index(name)][0, 0]) == pytest.approx(value, rel=0.05)


def test_map_uses_the_detectors_own_override_file(tmp_path):
    """XRF-Maps fits detector N with maps_fit_parameters_override.txt<N> when it exists."""
    import shutil

    from conftest import require_shared

    from mapstorch.cli.main import main

    folder = require_shared("xrfmaps-2ide")
    shutil.copy(folder / "mda" / "2xfm_0010.mda", tmp_path / "2xfm_0010.mda")
    text = (folder / "maps_fit_parameters_override.txt").read_text()
    (tmp_path / "maps_fit_parameters_override.txt").write_text(text)
    # detector 1's own file fits only three elements
    per = "\n".join("ELEMENTS_TO_FIT: Ca, Fe, Cu" if line.startswith("ELEMENTS_TO_FIT") else line
                     for line in text.splitlines())
    (tmp_path / "maps_fit_parameters_override.txt1").write_text(per + "\n")
    import h5py

    for det, expected in ((0, None), (1, ["Ca", "Fe", "Cu"])):
        out = tmp_path / f"d{det}.h5"
        assert main(["map", str(tmp_path / "2xfm_0010.mda"), "--detector", str(det), "--out", str(out),
                     "--no-progress"]) == 0
        with h5py.File(out) as f:
            names = [n.decode().strip() for n in f["MAPS/XRF_Analyzed/NNLS/Channel_Names"][()]]
        elements = names[:-6]
        if expected is None:
            assert len(elements) > 10
        else:
            assert elements == expected


def test_nnls_leaves_escape_peaks_out_of_its_fit_matrix_as_xrfmaps():
    """XRF-Maps' NNLS fit matrix has no escape peaks; the counts per unit amplitude never count
    them (as SpectrumModel.counts), for every method."""
    from mapstorch.physics.model import SpectrumModel

    sm = simulate_map(6, 6, seed=1, params={"SI_ESCAPE": 0.05})
    ds = _dataset(sm)
    r = fit_map(ds, sm.params, method="nnls")
    model = SpectrumModel(sm.lines, sm.window, dtype=torch.float64)
    theta = sm.params.shape_values()
    with_esc = model.design_matrix(theta)
    without = model.design_matrix(theta, with_escape=False)
    assert float((with_esc - without).abs().max()) > 0  # escape is on in this model
    i = r.names.index("Fe")
    per_unit = float(model.counts(theta, torch.ones(without.shape[1], dtype=torch.float64))[i])
    np.testing.assert_allclose(r.counts[i], r.amplitudes[i] * per_unit, rtol=1e-4)
    rp = fit_map(ds, sm.params, method="poisson")
    np.testing.assert_allclose(rp.counts[i], rp.amplitudes[i] * per_unit, rtol=1e-4)


def test_one_detectors_maps_file_holds_that_detectors_spectra(tmp_path):
    """As XRF-Maps' <scan>.h5<N>: the spectra and live times of detector N, beside its maps."""
    import h5py
    from conftest import require_shared

    from mapstorch.cli.main import main
    from mapstorch.io import open_dataset

    mda = require_shared("xrfmaps-2ide", "mda", "2xfm_0010.mda")
    out = tmp_path / "d2.h5"
    assert main(["map", str(mda), "--detector", "2", "--out", str(out), "--no-progress"]) == 0
    with open_dataset(mda) as ds:
        spectra = ds.read(None, [2])
        live = ds.live_time[..., 2]
    with open_dataset(out) as back:
        assert back.detectors == 1
        np.testing.assert_allclose(back.read(), spectra, rtol=1e-6)
        np.testing.assert_allclose(back.live_time[..., 0], live, rtol=1e-5)
    with h5py.File(out) as f:
        assert f["MAPS/XRF_Analyzed/NNLS/Counts_Per_Sec"].shape[1:] == (11, 11)


@pytest.mark.parametrize("engine", ["compiled", "lapack", "lanes", "no-numba"])
def test_small_spd_systems_every_engine(monkeypatch, engine):
    if engine == "no-numba":  # auto without numba: LAPACK
        monkeypatch.setattr(solvers, "_spd_cpu", lambda: None)
        engine = "auto"
    elif engine == "compiled" and solvers._spd_cpu() is None:
        pytest.fail("numba is a dependency: the compiled kernels must load")
    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
        x = torch.randn(2500, 7, 7, generator=gen, dtype=torch.float64)  # more than one work item
        a = x @ x.transpose(1, 2) + 0.5 * torch.eye(7, dtype=torch.float64)
        a[3] = torch.zeros(7, 7, dtype=torch.float64)  # singular
        a[5, 2, 2] = -1.0  # indefinite
        b = torch.randn(2500, 7, generator=gen, dtype=torch.float64)
        ref_x = torch.linalg.solve(a[6:], b[6:])
        ref_d = torch.diagonal(torch.linalg.pinv(a, hermitian=True), dim1=1, dim2=2)
        got_x, ok = solvers.spd_solve(a.to(dtype), b.to(dtype), engine=engine)
        assert got_x.dtype == dtype and got_x.shape == b.shape
        assert not ok[3] and not ok[5] and bool(ok[6:].all())
        torch.testing.assert_close(got_x[6:].double(), ref_x, rtol=tol, atol=tol * float(ref_x.abs().max()))
        got_d = solvers.inverse_diagonal(a.to(dtype), engine=engine)
        assert got_d.dtype == dtype and got_d.shape == (2500, 7)
        torch.testing.assert_close(got_d[6:].double(), ref_d[6:], rtol=tol, atol=0.0)
        torch.testing.assert_close(got_d[3].double(), ref_d[3], rtol=tol, atol=tol)  # pseudo-inverse there


def test_poisson_stderr_compiled_equals_the_tensor_path(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    d = torch.rand(200, 6, generator=gen, dtype=torch.float64)
    d[:, 5] = d[:, 4]  # two identical columns: singular where both are active
    a = torch.rand(50, 6, generator=gen, dtype=torch.float64) * 100
    a[::3, 2] = 0.0  # inactive amplitudes
    a[1::2, 5] = 0.0  # half the pixels have only one of the twins
    m = a @ d.T + 1.0
    got = solvers.poisson_stderr(d, m, a)
    monkeypatch.setattr(solvers, "_spd_cpu", lambda: None)
    ref = solvers.poisson_stderr(d, m, a)
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    assert bool(torch.isnan(got[::3, 2]).all())
    # where both twins are active the information is singular: LAPACK may factorise the
    # rounding (errors of 1e8), the compiled path counts such a pivot as zero and takes the
    # pseudo-inverse (finite errors)
    twins = (a[:, 4] > 0) & (a[:, 5] > 0)
    assert bool(twins.any()) and bool((got[twins][:, 4:] < 1e3).all())
    fin = torch.isfinite(ref) & ~twins[:, None]
    torch.testing.assert_close(got[fin], ref[fin], rtol=1e-8, atol=0.0)
    # the GPU's pixel-last routine (run here on the CPU): the compiled path's values, the same
    # singular pixels found, in float64 and float32
    monkeypatch.undo()
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        lanes = solvers.poisson_stderr(d.to(dtype), m.to(dtype), a.to(dtype), engine="lanes")
        comp = solvers.poisson_stderr(d.to(dtype), m.to(dtype), a.to(dtype), engine="compiled")
        assert lanes.dtype == dtype and torch.equal(torch.isnan(lanes), torch.isnan(comp))
        fin = torch.isfinite(comp)
        torch.testing.assert_close(lanes[fin].double(), comp[fin].double(), rtol=tol, atol=0.0)


@pytest.mark.parametrize("engine", ["compiled", "lapack"])
def test_a_non_finite_matrix_gives_nan_errors_not_an_exception(engine):
    """A pixel with NaN data has a NaN information matrix: not positive definite, and no
    pseudo-inverse either (an eigensolver may refuse it); its errors are NaN, its neighbours'
    are not touched."""
    m = torch.eye(4, dtype=torch.float32).repeat(3, 1, 1) * 4.0
    m[1, 2, 2] = float("nan")
    m[2, 3, 3] = 0.0  # singular, finite: the pseudo-inverse
    var = solvers.inverse_diagonal(m, engine=engine)
    assert bool(torch.isnan(var[1]).all())
    torch.testing.assert_close(var[0], torch.full((4,), 0.25))
    torch.testing.assert_close(var[2], torch.tensor([0.25, 0.25, 0.25, 0.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fisher_information_summed_in_the_kernel(monkeypatch, dtype):
    """With channel-major weights (a map fit's) the compiled path sums each pixel's information
    itself over the channels where two columns overlap: the errors of the stored product to
    rounding, singular pixels found the same, and each pixel's numbers independent of the
    pixels beside it and of the threads."""
    from mapstorch.maps import spd_cpu

    gen = torch.Generator().manual_seed(3)
    c = torch.arange(300.0)[:, None]
    centres = torch.tensor([30.0, 80.0, 95.0, 150.0, 200.0, 260.0, 260.0])
    d = torch.exp(-0.5 * ((c - centres) / 8.0) ** 2) * ((c - centres).abs() < 40)  # windowed: exact zeros
    d = d.to(dtype)
    p = 1300  # blocks of 512 pixels and a part block, 64-lane sub-blocks and a part one
    a = torch.rand(p, 7, generator=gen, dtype=dtype) * 200
    a[::3, 2] = 0.0  # inactive amplitudes
    a[1::2, 6] = 0.0  # the twin columns 5 and 6: singular where both are active
    m = a @ d.T + 0.5
    w = m.clamp(min=1.0).reciprocal()
    w[7, 100] = float("nan")  # a NaN weight: that pixel's errors are NaN
    w_cm = w.T.contiguous().T
    got = solvers.poisson_stderr(d, None, a, weights=w_cm)  # summed in the kernel
    ref = solvers.poisson_stderr(d, None, a, weights=w.contiguous())  # the stored product
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and bool(torch.isnan(got[7]).all())
    fin = torch.isfinite(ref)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got[fin], ref[fin], rtol=tol, atol=0.0)
    twins = (a[:, 5] > 0) & (a[:, 6] > 0)
    assert bool(twins.any()) and bool(torch.isfinite(got[twins & (torch.arange(p) != 7)][:, 5:]).all())
    # the pixels in another order, on three threads: the same numbers bit for bit (the singular
    # ones, whose pseudo-inverse LAPACK takes in a batch, to rounding)
    perm = torch.randperm(p, generator=gen)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    monkeypatch.setattr(spd_cpu, "_CHUNK", 384)
    again = solvers.poisson_stderr(d, None, a[perm], weights=w[perm].T.contiguous().T)
    regular = ~twins[perm]
    assert torch.equal(torch.nan_to_num(again[regular]), torch.nan_to_num(got[perm][regular]))
    torch.testing.assert_close(again, got[perm], rtol=tol, atol=0.0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_model_chi2_and_stderr_in_one_pass(monkeypatch, dtype):
    """The map fit's last pass (chi-square and errors, the weights never stored) gives the numbers
    of the two steps it replaces bit for bit: model_weights_chi2, then poisson_stderr on the
    weights; singular pixels through the pseudo-inverse to rounding; NaN where an amplitude is;
    each pixel's numbers independent of the others and of the threads; pixel-major input takes
    the two steps."""
    from mapstorch.maps import chi2_cpu

    gen = torch.Generator().manual_seed(4)
    c = torch.arange(301.0)[:, None]  # not a multiple of the 4-channel quads
    centres = torch.tensor([30.0, 80.0, 95.0, 150.0, 200.0, 260.0, 260.0])
    d = (torch.exp(-0.5 * ((c - centres) / 8.0) ** 2) * ((c - centres).abs() < 40)).to(dtype)
    p = 1300  # blocks of 512 pixels and a part block
    a = torch.rand(p, 7, generator=gen, dtype=dtype) * 200
    a[::3, 2] = 0.0  # inactive amplitudes
    a[1::2, 6] = 0.0  # the twin columns 5 and 6: singular where both are active
    a[9, 1] = float("nan")
    bg = (torch.rand(p, 301, generator=gen, dtype=dtype) * 3).T.contiguous().T  # channel-major
    y = torch.poisson((torch.nan_to_num(a) @ d.T + bg).double()).to(dtype).T.contiguous().T
    chi, se = solvers.model_chi2_stderr(d, a, bg, y)
    w, chi_ref = solvers.model_weights_chi2(d, a, bg, y)
    se_ref = solvers.poisson_stderr(d, None, a, weights=w)
    assert chi.dtype == dtype and se.shape == (p, 7)
    assert torch.equal(torch.nan_to_num(chi, 7.0), torch.nan_to_num(chi_ref, 7.0)) and bool(torch.isnan(chi[9]))
    twins = (a[:, 5] > 0) & (a[:, 6] > 0)
    regular = ~twins
    assert bool(twins.any()) and bool(torch.isnan(se[9]).all())
    assert torch.equal(torch.nan_to_num(se[regular], 7.0), torch.nan_to_num(se_ref[regular], 7.0))
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(se, se_ref, rtol=tol, atol=0.0, equal_nan=True)
    # another order of the pixels, on three threads, in smaller blocks: the same numbers
    perm = torch.randperm(p, generator=gen)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    monkeypatch.setattr(chi2_cpu, "_FISHER_PIXELS", 200)
    chi2, se2 = solvers.model_chi2_stderr(d, a[perm], bg[perm].T.contiguous().T, y[perm].T.contiguous().T)
    assert torch.equal(torch.nan_to_num(chi2, 7.0), torch.nan_to_num(chi[perm], 7.0))
    assert torch.equal(torch.nan_to_num(se2[regular[perm]], 7.0), torch.nan_to_num(se[perm][regular[perm]], 7.0))
    # pixel-major input: the two steps' tensor formulas, the same numbers to rounding
    chi3, se3 = solvers.model_chi2_stderr(d, a, bg.contiguous(), y.contiguous())
    torch.testing.assert_close(chi3, chi, rtol=tol, atol=0.0, equal_nan=True)
    torch.testing.assert_close(se3, se, rtol=tol * 10, atol=0.0, equal_nan=True)
    with pytest.raises(ValueError, match="do not match"):
        chi2_cpu.model_chi2_stderr(d.numpy(), d.numpy(), a.numpy(), (a > 0).numpy(), bg.T.numpy(), y.T.numpy())


def test_compiled_packed_stderr_against_each_pixels_own_inverse():
    """The compiled kernel works on 64 pixels side by side: pixels with a zero or NaN diagonal
    entry, or an indefinite active block, are reported without touching their neighbours, and
    every other pixel gets the inverse of its own active block (NumPy, one pixel at a time)."""
    spd_cpu = solvers._spd_cpu()
    assert spd_cpu is not None, "numba is a dependency: the compiled kernels must load"
    rng = np.random.default_rng(7)
    p, k = 200, 9  # three blocks of 64 lanes and a partial one
    x = rng.normal(size=(p, k, 3 * k))
    full = x @ x.transpose(0, 2, 1)
    active = rng.random((p, k)) < 0.8
    full[10, 4, 4] = 0.0  # an active zero diagonal entry
    active[10, 4] = True
    full[70] = np.nan  # non-finite information
    active[70] = True
    full[130, 0, 1] = full[130, 1, 0] = 3.0 * np.sqrt(full[130, 0, 0] * full[130, 1, 1])  # indefinite,
    # with a positive diagonal: found at the second pivot
    active[130, :] = True
    full[131, 2, 2] = 0.0  # a zero diagonal entry where inactive: no harm
    active[131, 2] = False
    iu = np.triu_indices(k)
    upper = np.ascontiguousarray(full[:, iu[0], iu[1]])
    se, ok = spd_cpu.packed_stderr(upper, active, n_threads=2)
    assert not ok[10] and not ok[70] and not ok[130]
    for i in range(p):
        if i in (10, 70, 130):
            assert np.isnan(se[i]).all()
            continue
        assert ok[i]
        on = np.flatnonzero(active[i])
        ref = np.full(k, np.nan)
        ref[on] = np.sqrt(np.diag(np.linalg.inv(full[i][np.ix_(on, on)])))
        np.testing.assert_allclose(se[i], ref, rtol=1e-9, equal_nan=True)


def test_out_of_device_memory_fits_the_chunk_in_parts(monkeypatch, caplog):
    from mapstorch.errors import InputError
    from mapstorch.maps import fit as fit_module

    sm = simulate_map(12, 12, seed=5)
    ds = _dataset(sm)
    whole = {m: fit_map(ds, sm.params, method=m, chunk_rows=8) for m in ("nnls", "nonlinear")}
    real = fit_module._fit_chunk
    calls = []

    def small_device(y, *args, **kw):  # a device that holds at most 50 pixels
        calls.append(y.shape[0])
        if y.shape[0] > 50:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(y, *args, **kw)

    monkeypatch.setattr(fit_module, "_fit_chunk", small_device)
    for method, ref in whole.items():
        calls.clear()
        with caplog.at_level("WARNING", logger=fit_module.log.name):
            got = fit_map(ds, sm.params, method=method, chunk_rows=8)
        # 8 rows of 12 pixels failed once; then 4 rows at a time, the 4-row last chunk not retried
        assert calls == [96, 48, 48, 48], (method, calls)
        assert any("fitting 4 rows at a time" in r.getMessage() for r in caplog.records)
        # the same fits; products over fewer pixels round differently
        np.testing.assert_allclose(got.counts, ref.counts, rtol=1e-4, atol=1e-3)
        np.testing.assert_array_equal(got.status, ref.status)
        np.testing.assert_allclose(got.fitted_integrated, ref.fitted_integrated, rtol=1e-5)
        if method == "nonlinear":
            np.testing.assert_allclose(got.parameters, ref.parameters, rtol=0, atol=1e-6)

    def no_device(y, *args, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(fit_module, "_fit_chunk", no_device)
    with pytest.raises(InputError, match="ran out of memory fitting one row of 12 pixels.*--device cpu"):
        fit_map(ds, sm.params, method="nnls", chunk_rows=8)


@pytest.mark.parametrize("storage, spare, ahead", [("waits", False, True), ("copies", False, False),
                                                   ("copies", True, True)])
def test_next_chunk_is_read_ahead_only_where_it_costs_the_fit_nothing(monkeypatch, storage, spare, ahead):
    """A read that waits on its storage (a sleep here) overlaps the fit; one that keeps a core
    busy (a copy from the page cache; a busy loop here) runs between fits unless a core is spare."""
    import threading

    from mapstorch.maps import fit as fit_module

    sm = simulate_map(8, 6, seed=3)
    ds = _dataset(sm)
    readers = []

    def read_block(start, stop, dets):
        readers.append(threading.current_thread().name)
        if storage == "waits":
            time.sleep(0.03)
        else:
            end = time.thread_time() + 0.03
            while time.thread_time() < end:
                pass
        return ds.spectra[start:stop][:, :, dets]

    slow = Dataset(path="<slow storage>", format="npy", rows=8, cols=6, detectors=1, channels=ds.channels,
                   calibration=ds.calibration, read_block=read_block)
    monkeypatch.setattr(fit_module, "_spare_core", lambda device: spare)
    got = fit_map(slow, sm.params, chunk_rows=2)
    # the first chunk is always read in turn; the other three ahead in the reading thread, or all in turn
    assert readers[0] == threading.current_thread().name and len(readers) == 4
    assert [r.startswith("mapstorch-read") for r in readers[1:]] == [ahead] * 3
    np.testing.assert_array_equal(got.counts, fit_map(ds, sm.params, chunk_rows=2).counts)


def test_spare_core_counts_pytorchs_threads(monkeypatch):
    from mapstorch.maps.fit import _spare_core

    assert _spare_core(torch.device("cuda"))  # a GPU fit leaves the cores to the reader
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert not _spare_core(torch.device("cpu"))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert _spare_core(torch.device("cpu"))


def _fake_result(names, seed, method="nnls", shape=(3, 4), status=0):
    from mapstorch.maps import MapResult

    rng = np.random.default_rng(seed)
    k = len(names)

    def comps():
        return rng.uniform(1, 100, (k, *shape)).astype(np.float32)

    amps = comps()
    live = rng.uniform(0.4, 0.6, shape).astype(np.float32)
    return MapResult(method=method, names=tuple(names), counts=comps(), counts_stderr=comps() / 10,
                     counts_per_sec=amps / live, reduced_chi2=rng.uniform(0.5, 2, shape).astype(np.float32),
                     iterations=rng.integers(1, 30, shape).astype(np.int32),
                     status=np.full(shape, status, np.int8), detector=str(seed), seconds=2.0,
                     pixels_per_second=float(np.prod(shape)) / 2.0, amplitudes=amps,
                     amplitudes_stderr=amps / 20, total_counts=rng.uniform(500, 900, shape).astype(np.float32),
                     live_time=live, window=(2, 9), channels=12,
                     fitted_integrated=np.arange(8, dtype=np.float64), background_integrated=np.ones(8))


def test_average_maps_is_xrfmaps_average_file():
    """XRF-Maps' <scan>.h5: every Counts_Per_Sec channel the plain per-pixel mean of the
    elements' channels (Total_Fluorescence_Yield the mean of each element's counts / live time),
    integrated spectra summed; ours beside them: standard errors of the mean, the worst status."""
    from mapstorch.maps import average_maps

    names = ("Ca", "Fe", "Elastic", "Compton")
    parts = [_fake_result(names, s, status=s % 2) for s in range(3)]
    avg = average_maps(parts)
    np.testing.assert_allclose(avg.counts_per_sec, np.mean([p.counts_per_sec for p in parts], 0), rtol=1e-6)
    np.testing.assert_allclose(avg.counts_stderr, np.sqrt(sum(p.counts_stderr.astype(np.float64) ** 2
                                                              for p in parts)) / 3, rtol=1e-6)
    assert (avg.status == 1).all() and avg.live_time.shape == (3, 4)
    np.testing.assert_allclose(avg.total_counts, sum(p.total_counts.astype(np.float64) for p in parts), rtol=1e-6)
    got = avg.xrfmaps_results()["NNLS"]
    each = [p.xrfmaps_results()["NNLS"] for p in parts]
    assert got["channel_names"] == each[0]["channel_names"]
    np.testing.assert_allclose(got["counts_per_sec"], np.mean([e["counts_per_sec"] for e in each], 0), rtol=1e-6)
    tfy = got["channel_names"].index("Total_Fluorescence_Yield")
    np.testing.assert_allclose(got["counts_per_sec"][tfy],
                               np.mean([p.total_counts / p.live_time for p in parts], 0), rtol=1e-6)
    np.testing.assert_allclose(got["Fitted_Integrated_Spectra"], 3 * each[0]["Fitted_Integrated_Spectra"])
    assert got["Fitted_Integrated_Spectra"][2:10].tolist() == [3.0 * i for i in range(8)]
    np.testing.assert_array_equal(got["extra"]["Status"], np.ones((3, 4), np.float32))
    se = np.sqrt(sum(e["extra"]["Counts_Stderr"].astype(np.float64) ** 2 for e in each)) / 3
    np.testing.assert_allclose(got["extra"]["Counts_Stderr"], se, rtol=1e-6)
    assert avg.detector == "average of 0, 1, 2" and avg.pixels_per_second == pytest.approx(6.0)


def test_average_maps_aligns_components_by_name_and_refuses_mixtures():
    from mapstorch.errors import InputError
    from mapstorch.maps import average_maps

    a = _fake_result(("Ca", "Fe", "Elastic", "Compton"), 1)
    b = _fake_result(("Fe", "Zn", "Elastic", "Compton"), 2)
    avg = average_maps([a, b])
    assert avg.names == ("Ca", "Fe", "Elastic", "Compton", "Zn")
    np.testing.assert_allclose(avg.counts_per_sec[1], (a.counts_per_sec[1] + b.counts_per_sec[0]) / 2, rtol=1e-6)
    np.testing.assert_allclose(avg.counts_per_sec[0], a.counts_per_sec[0])  # Ca: only the element that has it
    with pytest.raises(InputError, match="different methods"):
        average_maps([a, _fake_result(("Ca",), 3, method="poisson")])
    with pytest.raises(InputError, match="differ in size"):
        average_maps([a, _fake_result(("Ca",), 3, shape=(2, 2))])
    with pytest.raises(InputError, match="at least one"):
        average_maps([])


def test_roi_windows_follow_xrfmaps_rules():
    """XRF-Maps' ROI_Fit_Routine: half width int(sqrt(150^2 + (12 E)^2)) / 2000 keV times the
    element's WIDTH_MULTIPLIER around Ka1 / La1 / the pile-up's Ka1 + Ka1, rounded half away from
    zero; a window past the end stops at the last channel but one."""
    from mapstorch.maps.roi import _round_half_away, roi_half_width, roi_windows
    from mapstorch.physics.lines import build_line_table

    assert roi_half_width(6.4039) == 168 / 2000 and roi_half_width(6.4039, 1.5) == pytest.approx(0.126)
    assert [_round_half_away(v) for v in (2.5, 3.5, -2.5, 0.49)] == [3, 4, -3, 0]
    table = build_line_table(["Fe", "Ba_L", "Au_M", "Si_Cl", "Zn"])
    ka1 = float(table.lines_of("Fe")["energy_kev"][0])
    (fe, ba, au, sicl, zn) = roi_windows(table, ["Fe", "Ba_L", "Au_M", "Si_Cl", "Zn"], 0.0, 0.01, 2048,
                                         {"Zn": 2.0})
    w = roi_half_width(ka1)
    assert fe == (round((ka1 - w) / 0.01), round((ka1 + w) / 0.01))
    la1 = float(table.lines_of("Ba_L")["energy_kev"][0])
    assert abs((ba[0] + ba[1]) / 2 * 0.01 - la1) < 0.011
    ma1 = float(table.lines_of("Au_M")["energy_kev"][0])  # ours centred on Ma1 (XRF-Maps: on 0 keV)
    assert abs((au[0] + au[1]) / 2 * 0.01 - ma1) < 0.011
    si_cl = float(table.lines_of("Si_Cl")["energy_kev"][0])
    assert abs((sicl[0] + sicl[1]) / 2 * 0.01 - si_cl) < 0.011 and si_cl > 4.3
    zn_ka1 = float(table.lines_of("Zn")["energy_kev"][0])
    assert zn[1] - zn[0] == pytest.approx(2 * 2 * roi_half_width(zn_ka1) / 0.01, abs=1.01)
    assert roi_windows(table, ["Zn"], 0.0, 0.01, 700) == [(698 - 1, 698)]  # past the end


@pytest.mark.parametrize("method", ["nnls", "poisson"])
def test_every_method_writes_xrfmaps_roi_maps(tmp_path, method):
    """The ROI group comes with every method: raw counts in each window over the live time."""
    sim = simulate_map(4, 6, seed=3)
    ds = Dataset(path="<sim>", format="npy", rows=4, cols=6, detectors=1, channels=sim.counts.shape[-1],
                 calibration=np.array([[float(sim.params[n]) for n in ("ENERGY_OFFSET", "ENERGY_SLOPE",
                                                                      "ENERGY_QUADRATIC")]]),
                 spectra=sim.counts.astype(np.float32)[:, :, None, :], live_time=np.full((4, 6, 1), 0.5))
    r = fit_map(ds, sim.params, method=method)
    assert r.roi_names == tuple(n for n in r.names if n not in ("Elastic", "Compton"))
    res = r.xrfmaps_results()["ROI"]
    assert res["integrated"] is False and res["channel_names"] == r.xrfmaps_results()[r.routine_name()]["channel_names"]
    i = res["channel_names"].index("Fe")
    from mapstorch.maps.roi import roi_windows
    from mapstorch.physics.lines import build_line_table

    table = build_line_table(list(r.roi_names))
    (win,) = roi_windows(table, ["Fe"], float(sim.params["ENERGY_OFFSET"]), float(sim.params["ENERGY_SLOPE"]),
                         ds.channels)
    want = sim.counts.astype(np.float32)[:, :, win[0]:win[1] + 1].sum(-1, dtype=np.float64) / 0.5
    np.testing.assert_allclose(res["counts_per_sec"][i], want, rtol=1e-6)
