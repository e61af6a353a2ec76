"""The nonlinear map method's quadratic expansion of the design matrix: the expansion against the
exact model inside its cells, and the expansion's per-pixel refit against the exact per-pixel
Levenberg-Marquardt (which evaluates the full model at every trial)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mapstorch.maps import solvers
from mapstorch.maps.expansion import DesignExpansion, monomials, refit
from mapstorch.physics.model import SpectrumModel
from mapstorch.physics.snip import snip_window
from mapstorch.synthetic import DEMO_SAMPLE, simulate_spectrum

FREE = ("ENERGY_OFFSET", "ENERGY_SLOPE", "FWHM_OFFSET")


@pytest.fixture(scope="module")
def setup():
    base = simulate_spectrum(seed=0)
    ps, window = base.params, base.window
    model = SpectrumModel(base.lines, window, dtype=torch.float32)
    theta = ps.shape_values().float()
    idx = [ps.index(n) for n in FREE]
    exp = DesignExpansion(model, theta, torch.tensor(idx), ps.lower[idx].float(), ps.upper[idx].float())
    return base, model, theta, idx, exp


def test_monomials_and_their_derivatives():
    u = torch.tensor([[0.3, -0.7, 0.2], [1.0, 0.5, -1.0]], dtype=torch.float64)
    q, dq = monomials(u)
    assert q.shape == (2, 10)
    np.testing.assert_allclose(q[0].numpy(), [1, 0.3, -0.7, 0.2, 0.09, -0.21, 0.06, 0.49, -0.14, 0.04], atol=1e-12)
    for p in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: monomials(v[None])[0][0], u[p])  # [Q, n]
        torch.testing.assert_close(dq[p], jac.T)


def test_expansion_reproduces_the_exact_design_inside_its_cells(setup):
    _, model, theta, idx, exp = setup
    assert exp.half[0] > 1e-3 and exp.half[1] > 1e-6  # cells of a few eV, not a grid of thousands
    gen = torch.Generator().manual_seed(3)
    axis = torch.eye(3, dtype=torch.float64) * torch.tensor([[0.58], [-0.5], [0.7]], dtype=torch.float64)
    for cell in ((0, 0, 0), (2, -1, 1)):
        e, w, centre = exp.terms(cell)
        k = w.shape[1]
        # one parameter away from the centre: within tol of each column's peak (the half-widths'
        # definition); several at once: the errors add up, within 10 tol
        for points, bound in ((axis, 1.5 * exp.tol), (torch.rand(6, 3, generator=gen, dtype=torch.float64) * 2 - 1,
                                                        10 * exp.tol)):
            q, _ = monomials(points)
            approx = torch.einsum("pq,cqk->pck", q.float(), e.reshape(e.shape[0], -1, k))
            th = theta.double().expand(len(points), -1).clone()
            th[:, idx] = centre + points * exp.half
            exact = model.design_matrix(th)
            cols, _ = model.columns(th, with_escape=False)
            peak = exact.abs().amax(1, keepdim=True).clamp(min=1e-30)
            rel = ((approx.double() - exact).abs() / peak).amax()
            assert rel < bound, (cell, float(rel))
            unit = q.float() @ w
            torch.testing.assert_close(unit.double(), cols.sum(-1), rtol=bound, atol=1e-6)
    # a bad cell guess would show: the centre cell's quadratic is far off two cells away
    e, _, _ = exp.terms((0, 0, 0))
    th = theta.double().clone()
    th[idx[0]] += 4 * exp.half[0]
    q, _ = monomials(torch.tensor([[4.0, 0.0, 0.0]], dtype=torch.float64))
    far = torch.einsum("q,cqk->ck", q[0].float(), e.reshape(e.shape[0], -1, e.shape[1] // 10))
    exact = model.design_matrix(th)
    assert float(((far.double() - exact).abs() / exact.abs().amax(0)).amax()) > 20 * exp.tol


def _pixels(base, offsets, scale=0.05):
    counts = {k: v * scale for k, v in DEMO_SAMPLE.items()}
    ys = [simulate_spectrum(counts=counts, params={"ENERGY_OFFSET": off}, seed=i, elastic_counts=1e4,
                            compton_counts=6e4, continuum_level=1.5).counts for i, off in enumerate(offsets)]
    y = torch.tensor(np.array(ys), dtype=torch.float32)
    ps, window = base.params, base.window
    off, slope, quad, width = (float(ps[n]) for n in ("ENERGY_OFFSET", "ENERGY_SLOPE", "ENERGY_QUADRATIC",
                                                          "SNIP_WIDTH"))
    bg, yw = snip_window(y, off, slope, quad, width, (window.first, window.last), with_window=True)
    return yw.contiguous(), bg.contiguous()


def _reference_fit(model, theta, idx, y, b, a0, scale):
    """An independent per-pixel fit: L-BFGS-B (SciPy) on the exact model's Poisson deviance,
    float64, gradients by autograd; returns ``(free parameters, amplitudes, deviance)``."""
    from scipy.optimize import minimize

    y, b, th0 = y.double(), b.double(), theta.double()
    start = a0.double().numpy()
    sc = np.concatenate([scale, np.maximum(start, 1.0)])

    def deviance(x):
        z = torch.tensor(x * sc, requires_grad=True)
        th = th0.clone()
        th[idx] = th0[idx] + z[:3]
        m = (model(th, z[3:]) + b).clamp(min=1e-12)
        d = 2 * (torch.xlogy(y, y) - y * torch.log(m) - (y - m)).sum()
        d.backward()
        return float(d.detach()), z.grad.numpy() * sc

    x0 = np.concatenate([np.zeros(3), start]) / sc
    bounds = [(-20, 20)] * 3 + [(0, None)] * len(start)
    r = minimize(deviance, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                 options={"maxiter": 3000, "ftol": 1e-15, "gtol": 1e-9})
    z = r.x * sc
    return th0[idx].numpy() + z[:3], z[3:], r.fun


def test_refit_finds_the_exact_models_optimum(setup):
    base, model, theta, idx, exp = setup
    offsets = [-0.0042 + d for d in (-0.012, 0.0, 0.014)]
    yw, bg = _pixels(base, offsets)
    a0, _, _ = solvers.nnls(model.design_matrix(theta), (yw - bg).clamp(min=0.0))
    got = refit(exp, yw, bg, a0)
    assert bool(got["converged"].all())
    assert exp.cells_computed >= 2  # +-12 eV leaves the centre cell
    np.testing.assert_allclose(got["theta"][:, 0].numpy(), offsets, atol=0.003)
    for p in range(len(offsets)):
        ref_x, ref_a, ref_dev = _reference_fit(model, theta, idx, yw[p], bg[p], a0[p], exp.half.numpy())
        full = theta.double().clone()
        full[idx] = got["theta"][p].double()
        m = model(full, got["a"][p].double()) + bg[p].double()
        y = yw[p].double()
        dev = float(2 * (torch.xlogy(y, y / m) - (y - m)).sum())
        # at least as good as the reference under the exact model, and the same point: within
        # a quarter of a standard error
        assert dev <= ref_dev + 0.3, (p, dev, ref_dev)
        z = (got["theta"][p].numpy() - ref_x) / got["stderr"][p, :3].numpy()
        assert np.abs(z).max() < 0.25, (p, z)
        big = ref_a > 0.05 * ref_a.max()
        np.testing.assert_allclose(got["a"][p].numpy()[big], ref_a[big], rtol=0.01)
        # the expansion's model is the exact model at its solution
        assert float((got["model"][p].double() - m).abs().max() / m.max()) < 1e-3
        # standard errors: the inverse Fisher information of the exact model (autograd Jacobian)
        a = got["a"][p].double()

        def pixel_model(v):
            th = full.clone()
            th[idx] = v[:3]
            return model(th, v[3:]) + bg[p].double()

        jac = torch.autograd.functional.jacobian(pixel_model, torch.cat([full[idx], a]))  # [C, 3 + K]
        active = torch.cat([torch.ones(3, dtype=torch.bool), a > 0])
        j = jac[:, active]
        info = j.T @ (j / m.clamp(min=1.0)[:, None])
        se = torch.sqrt(torch.diagonal(torch.linalg.inv(info)))
        np.testing.assert_allclose(got["stderr"][p][active].numpy(), se.numpy(), rtol=0.05)


def test_refit_moves_far_pixels_through_several_cells(setup):
    base, model, theta, idx, exp = setup
    offsets = [-0.0042 + 0.045, -0.0042 - 0.04]  # about 7 cells away
    yw, bg = _pixels(base, offsets, scale=0.2)
    a0, _, _ = solvers.nnls(model.design_matrix(theta), (yw - bg).clamp(min=0.0))
    got = refit(exp, yw, bg, a0)
    assert bool(got["converged"].all())
    np.testing.assert_allclose(got["theta"][:, 0].numpy(), offsets, atol=0.003)
    centre = exp.cell_of(got["theta"])
    u = (got["theta"] - torch.stack([exp.center(tuple(c.tolist())) for c in centre]).float()) / exp.half.float()
    assert float(u.abs().max()) <= 1.1  # each pixel ends inside the cell whose expansion it used


def test_empty_and_faint_pixels_and_a_parameter_without_effect():
    from mapstorch.maps import fit_map
    from mapstorch.synthetic import map_dataset, simulate_map

    sim = simulate_map(2, 4, seed=0)
    sim.counts[0, 0] = 0.0  # nothing measured
    sim.counts[0, 1] *= 0.001  # a few counts
    r = fit_map(map_dataset(sim), sim.params, method="nonlinear",
                parameter_maps=("ENERGY_OFFSET", "FWHM_OFFSET", "COMPTON_ANGLE"))
    assert (r.status == 0).all()
    # an empty pixel says nothing about its parameters: NaN errors, not 0
    assert np.isnan(r.parameters_stderr[:, 0, 0]).all()
    assert np.isfinite(r.parameters[:, 0, 0]).all()
    assert (r.parameters_stderr[:, 0, 1] > r.parameters_stderr[:, 1, 1]).all()  # faint: larger errors
    assert np.abs(r.parameters[0, 1] - float(sim.params["ENERGY_OFFSET"])).max() < 0.005


def test_inverse_diagonal_of_singular_matrices():
    a = torch.randn(4, 6, 3, dtype=torch.float64)
    m = a.transpose(1, 2) @ a
    m[1, 2, :] = m[1, :, 2] = 0.0  # a zero row: singular
    got = solvers.inverse_diagonal(m)
    torch.testing.assert_close(got[0], torch.diagonal(torch.linalg.inv(m[0])))
    torch.testing.assert_close(got[1], torch.diagonal(torch.linalg.pinv(m[1], hermitian=True)))
