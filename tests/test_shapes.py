"""Peak shapes against hand-derived values and a high-precision direct evaluation (mpmath)."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from mapstorch.physics.shapes import detector_sigma, gaussian, step, tail

mpmath.mp.dps = 40


def _t(v, dtype=torch.float64):
    return torch.tensor(v, dtype=dtype)


def tail_mp(d: float, s: float, gamma: float, gain: float) -> float:
    """MODEL.md section 3, evaluated literally with 40 significant digits."""
    d, s, g, gain = mpmath.mpf(d), mpmath.mpf(s), mpmath.mpf(gamma), mpmath.mpf(gain)
    val = gain / (2 * g * s * mpmath.exp(-1 / (2 * g * g))) * mpmath.erfc(d / (mpmath.sqrt(2) * s) + 1 / (mpmath.sqrt(2) * g))
    if d < 0:
        val *= mpmath.exp(d / (g * s))
    return float(val)


def test_sigma_hand_values():
    # FWHM_OFFSET 0.2354800 keV gives sigma0 = 0.1 keV; eps E fano = 3.58 * 10 * 1e-3 = 0.0358
    s = detector_sigma(_t(10.0), _t(0.23548), _t(1e-3))
    assert float(s) == pytest.approx(math.sqrt(0.01 + 0.0358), rel=1e-14)
    s2 = detector_sigma(_t(10.0), _t(0.23548), _t(1e-3), fano_epsilon=2.96)
    assert float(s2) == pytest.approx(math.sqrt(0.01 + 0.0296), rel=1e-14)


def test_gaussian_hand_values():
    g, s = 0.01, 0.1
    peak = g / (s * math.sqrt(2 * math.pi))
    vals = gaussian(_t([0.0, 0.1, -0.2]), _t(s), _t(g))
    assert vals.tolist() == pytest.approx([peak, peak * math.exp(-0.5), peak * math.exp(-2.0)], rel=1e-14)
    # sums to ~1 over channels of width g
    d = torch.arange(-200, 201, dtype=torch.float64) * g
    assert float(gaussian(d, _t(s), _t(g)).sum()) == pytest.approx(1.0, rel=1e-12)


def test_step_hand_values():
    g, s, e = 0.01, 0.1, 5.0
    vals = step(_t([0.0, -10.0, 10.0]), _t(s), _t(g), _t(e))
    assert vals.tolist() == pytest.approx([g / (2 * e), g / e, 0.0], abs=1e-18)


@pytest.mark.parametrize("gamma", [0.1, 0.5, 1.0, 2.21, 3.0, 10.0])
def test_tail_matches_literal_formula(gamma):
    g, s = 0.0095, 0.07
    ds = [-3.0, -1.0, -0.3, -0.07, -0.01, 0.0, 0.01, 0.07, 0.2, 0.5]
    got = tail(_t(ds), _t(s), _t(gamma), _t(g))
    want = [tail_mp(d, s, gamma, g) for d in ds]
    for a, b in zip(got.tolist(), want):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-300)


def test_tail_hand_value_at_center():
    # d = 0: gain / (2 gamma s) * exp(1/(2 gamma^2)) * erfc(1/(sqrt2 gamma))
    g, s, gamma = 0.01, 0.05, 2.0
    want = g / (2 * gamma * s) * math.exp(1 / (2 * gamma**2)) * math.erfc(1 / (math.sqrt(2) * gamma))
    assert float(tail(_t(0.0), _t(s), _t(gamma), _t(g))) == pytest.approx(want, rel=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [1e-3, 0.02, 0.05, 0.1, 1.0, 10.0, 100.0])
def test_tail_finite_values_and_gradients_everywhere(dtype, gamma):
    """The literal formula overflows for small gamma; the stable form must not."""
    d = torch.linspace(-20.0, 20.0, 4001, dtype=dtype).requires_grad_(True)
    s = torch.tensor(0.08, dtype=dtype, requires_grad=True)
    gm = torch.tensor(gamma, dtype=dtype, requires_grad=True)
    val = tail(d, s, gm, torch.tensor(0.01, dtype=dtype))
    assert torch.isfinite(val).all()
    assert (val >= 0).all()
    val.sum().backward()
    for grad in (d.grad, s.grad, gm.grad):
        assert torch.isfinite(grad).all()


def test_tail_small_gamma_against_mpmath():
    g, s = 0.01, 0.08
    for gamma in (0.02, 0.05):
        for d in (-0.05, -0.01, 0.0, 0.01, 0.03):
            got = float(tail(_t(d), _t(s), _t(gamma), _t(g)))
            assert got == pytest.approx(tail_mp(d, s, gamma, g), rel=1e-10, abs=1e-280)


def test_shapes_gradcheck():
    # the tail has a kink at d = 0 (exp(d / gamma s) only below the line): keep d = 0 off the grid
    d = torch.linspace(-0.5, 0.3, 17, dtype=torch.float64).add(0.013).requires_grad_(True)
    s = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    gm = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    g = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
    e = torch.tensor(6.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: tail(*a), (d, s, gm, g))
    assert torch.autograd.gradcheck(lambda *a: gaussian(*a), (d, s, g))
    assert torch.autograd.gradcheck(lambda *a: step(*a), (d, s, g, e))
