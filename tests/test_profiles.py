"""The fast peak evaluation: windows change nothing beyond tolerance, analytic gradients are right."""

from __future__ import annotations

import math

import pytest
import torch

from mapstorch.physics.profiles import Peaks, _CoreProfiles, _FarTails, evaluate_peaks
from mapstorch.physics.shapes import gaussian, step, tail


def _peaks(dtype, batch=(), seed=0, gamma_scale=1.0, with_step=True):
    g = torch.Generator().manual_seed(seed)
    n = 40
    centers = 1.0 + 11.0 * torch.rand(*batch, n, generator=g, dtype=dtype)
    sigma = 0.04 + 0.05 * torch.rand(*batch, n, generator=g, dtype=dtype)
    gamma = gamma_scale * (0.5 + 3.0 * torch.rand(*batch, n, generator=g, dtype=dtype))
    a = 10 ** (3 * torch.rand(*batch, n, generator=g, dtype=dtype))
    b = a * 1e-3 * torch.rand(*batch, n, generator=g, dtype=dtype) * with_step
    c = a * 0.05 * torch.rand(*batch, n, generator=g, dtype=dtype)
    rows = torch.randint(0, 5, (n,), generator=g)
    return Peaks(centers, sigma, gamma, a, b, c, rows)


def _direct(cal, channels, p: Peaks, n_out):
    """Every peak on every channel with the plain shape functions (reference)."""
    off, sl, qd = cal
    e = off[..., None] + channels * (sl[..., None] + qd[..., None] * channels)
    d = e[..., None, :] - p.centers[..., :, None]
    s = p.sigma[..., None]
    one = torch.ones((), dtype=e.dtype)
    sq = math.sqrt(2 * math.pi)
    prof = p.a[..., None] * gaussian(d, s, one) * s * sq
    prof = prof + p.b[..., None] * step(d, s, one, one / 2)
    prof = prof + p.c[..., None] * tail(d, s, p.gamma[..., None], one) * 2 * p.gamma[..., None] * s
    out = torch.zeros(*prof.shape[:-2], n_out, prof.shape[-1], dtype=e.dtype)
    return out.index_add(-2, p.rows, prof)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("quad", [0.0, 2e-7])
def test_windows_match_direct_evaluation(dtype, tol, quad):
    channels = torch.arange(50, 1451, dtype=dtype)
    cal = (torch.tensor(-0.01, dtype=dtype), torch.tensor(0.0095, dtype=dtype), torch.tensor(quad, dtype=dtype))
    p = _peaks(dtype)
    fast = evaluate_peaks(cal, channels, p, 5)
    full = evaluate_peaks(cal, channels, p, 5, full=True)
    ref = _direct(tuple(t.double() for t in cal), channels.double(),
                  Peaks(*(t.double() if t.is_floating_point() else t for t in p.__dict__.values())), 5)
    scale = ref.abs().max()
    assert float((full.double() - ref).abs().max() / scale) < tol
    assert float((fast.double() - ref).abs().max() / scale) < tol


def test_batched_calibration_and_peaks():
    dtype = torch.float64
    channels = torch.arange(0, 1200, dtype=dtype)
    off = torch.tensor([-0.02, 0.0, 0.03], dtype=dtype)
    sl = torch.tensor([0.0098, 0.01, 0.0102], dtype=dtype)
    qd = torch.zeros(3, dtype=dtype)
    p = _peaks(dtype, batch=(3,))
    out = evaluate_peaks((off, sl, qd), channels, p, 5)
    for i in range(3):
        pi = Peaks(*(t[i] if (t.is_floating_point()) else t for t in p.__dict__.values()))
        one = evaluate_peaks((off[i], sl[i], qd[i]), channels, pi, 5)
        assert torch.allclose(out[i], one, rtol=1e-12, atol=1e-12 * float(one.abs().max()))


def test_small_gamma_uses_stable_tail_and_stays_finite():
    dtype = torch.float32
    channels = torch.arange(0, 1024, dtype=dtype)
    cal = (torch.tensor(0.0), torch.tensor(0.01), torch.tensor(0.0))
    p = _peaks(dtype, gamma_scale=0.02)  # gamma ~ 0.01-0.07: exp(1/(2 gamma^2)) overflows float32
    ref = _direct(tuple(t.double() for t in cal), channels.double(),
                  Peaks(*(t.double() if t.is_floating_point() else t for t in p.__dict__.values())), 5)
    out = evaluate_peaks(cal, channels, p, 5)
    assert torch.isfinite(out).all()
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < 1e-5


_Q = 1e-6  # the quadratic calibration enters the gradient checks in units of 1e-6 keV/channel^2


def _grad_inputs(dtype=torch.float64, n=6, w=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    off = torch.tensor(0.01, dtype=dtype, requires_grad=True)
    sl = torch.tensor(0.01, dtype=dtype, requires_grad=True)
    qd = torch.tensor(1.0, dtype=dtype, requires_grad=True)  # in units of 1e-6 (see _Q)
    start = torch.randint(100, 400, (n,), generator=g)
    chan = (start[:, None] + torch.arange(w)[None, :]).to(dtype)
    centers = (0.01 + 0.01 * (start + w * 0.7) + 1e-6 * (start + w * 0.7) ** 2).to(dtype).requires_grad_(True)
    isg = (1.0 / (0.03 + 0.02 * torch.rand(n, generator=g, dtype=dtype))).requires_grad_(True)
    a, b, c = (torch.rand(n, generator=g, dtype=dtype).requires_grad_(True) for _ in range(3))
    ig = (1.0 / (0.5 + 2 * torch.rand(n, generator=g, dtype=dtype))).requires_grad_(True)
    return off, sl, qd, chan, centers, isg, a, b, c, ig


@pytest.mark.parametrize("stable", [False, True])
@pytest.mark.parametrize("need_step", [False, True])
def test_core_gradcheck(stable, need_step):
    off, sl, qd, chan, centers, isg, a, b, c, ig = _grad_inputs()

    def f(off, sl, qd, centers, isg, a, b, c, ig):
        return _CoreProfiles.apply(off, sl, qd * _Q, chan, centers, isg, a, b, c, ig, (need_step, True, stable))

    inputs = (off, sl, qd, centers, isg, a, b if need_step else b.detach(), c, ig)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-7, atol=1e-6, rtol=1e-5)


def test_core_gradcheck_with_several_windows_per_peak():
    off, sl, qd, chan, centers, isg, a, b, c, ig = _grad_inputs()
    index = torch.tensor([0, 0, 1, 3, 3, 5])  # windows -> peaks (peaks 2 and 4 have none)

    def f(off, sl, qd, centers, isg, a, b, c, ig):
        return _CoreProfiles.apply(off, sl, qd * _Q, chan, centers, isg, a, b, c, ig, (True, True, False), index)

    assert torch.autograd.gradcheck(f, (off, sl, qd, centers, isg, a, b, c, ig), eps=1e-7, atol=1e-6, rtol=1e-5)

    def g(off, sl, qd, centers, isg, c, ig):
        return _FarTails.apply(off, sl, qd * _Q, chan, centers + 1.5, isg, c, ig, True, index)

    assert torch.autograd.gradcheck(g, (off, sl, qd, centers, isg, c, ig), eps=1e-7, atol=1e-6, rtol=1e-5)


def test_far_tail_gradcheck():
    off, sl, qd, chan, centers, isg, a, b, c, ig = _grad_inputs()
    centers = (centers.detach() + 1.5).requires_grad_(True)  # windows well below the peaks: x < 0

    def f(off, sl, qd, centers, isg, c, ig):
        return _FarTails.apply(off, sl, qd * _Q, chan, centers, isg, c, ig, True)

    assert torch.autograd.gradcheck(f, (off, sl, qd, centers, isg, c, ig), eps=1e-7, atol=1e-6, rtol=1e-5)


def test_far_tail_equals_core_tail_below_the_core():
    off, sl, qd, chan, centers, isg, a, b, c, ig = (t.detach() if isinstance(t, torch.Tensor) else t for t in _grad_inputs())
    centers = centers + 1.5  # x << -8: Gaussian gone, erfc(u) = 2
    zero = torch.zeros_like(a)
    qd = qd * _Q
    core = _CoreProfiles.apply(off, sl, qd, chan, centers, isg, zero, zero, c, ig, (False, True, False))
    far = _FarTails.apply(off, sl, qd, chan, centers, isg, c, ig, True)
    assert torch.allclose(core, far, rtol=1e-13, atol=0)
