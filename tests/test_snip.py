"""SNIP background: exact XRF-Maps semantics against a literal sequential implementation."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mapstorch.errors import InputError
from mapstorch.physics.snip import snip_background, snip_widths, snip_window


def snip_literal(spec, off, slope, quad, width, xmin, xmax):
    """XRF-Maps' snip_background written out channel by channel (reference)."""
    n = len(spec)
    c = np.arange(n, dtype=np.float64)
    e = off + c * slope + c * c * quad
    cw = 2.35 * np.sqrt(np.maximum((off / 2.3548) ** 2 + e * 3.58 * slope, 0.0))
    bg = np.zeros(n)
    for i in range(n - 4):
        bg[i + 2] = spec[i:i + 5].sum() / 5.0
    cw = width * cw / slope
    v = np.log(np.log(bg + 1.0) + 1.0)
    lo_l, up_l = max(int(xmin), 0), min(int(xmax), n - 1)

    def sweep():
        for k in range(n):
            lo = min(max(int(k - cw[k]), lo_l), up_l)
            hi = min(int(k + cw[k]), up_l)
            t = (v[lo] + v[hi]) / 2.0
            if v[k] > t:
                v[k] = t

    sweep()
    sweep()
    while cw.max() >= 0.5:
        sweep()
        cw = cw / math.sqrt(2.0)
    out = np.exp(np.exp(v) - 1.0) - 1.0
    out[~np.isfinite(out)] = 0.0
    return out


def synthetic(n=1200, seed=0):
    rng = np.random.default_rng(seed)
    x = np.arange(n)
    mean = 40 * np.exp(-x / 700) + 5
    for amp, cen, wid in [(2e4, 200, 7), (5e3, 420, 9), (8e4, 640, 10), (900, 700, 10), (3e3, 1000, 12)]:
        mean = mean + amp * np.exp(-0.5 * ((x - cen) / wid) ** 2)
    return rng.poisson(mean).astype(np.float64)


CASES = [
    (-0.0042, 0.00952, 0.0, 0.5, 105, 1150),
    (0.0, 0.01, 1e-7, 1.0, 40, 1100),
    (0.05, 0.012, 0.0, 0.25, 0, 1199),
    (-0.1, 0.02, -2e-7, 2.0, 300, 900),
]


@pytest.mark.parametrize("off,slope,quad,width,xmin,xmax", CASES)
def test_exact_mode_equals_literal_sweep(off, slope, quad, width, xmin, xmax):
    spec = synthetic()
    want = snip_literal(spec, off, slope, quad, width, xmin, xmax)
    got = snip_background(torch.tensor(spec), off, slope, quad, width, (xmin, xmax)).numpy()
    assert np.allclose(got, want, rtol=1e-12, atol=1e-10)


def test_batched_spectra_and_calibrations():
    specs = np.stack([synthetic(seed=s) for s in range(3)])
    off = torch.tensor([-0.0042, 0.0, 0.05], dtype=torch.float64)
    slope = torch.tensor([0.00952, 0.01, 0.012], dtype=torch.float64)
    got = snip_background(torch.tensor(specs), off, slope, 0.0, 0.5, (100, 1100)).numpy()
    for i in range(3):
        want = snip_literal(specs[i], float(off[i]), float(slope[i]), 0.0, 0.5, 100, 1100)
        assert np.allclose(got[i], want, rtol=1e-12, atol=1e-10)


def test_smooth_mode_is_differentiable_and_close():
    spec = torch.tensor(synthetic())
    width = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    slope = torch.tensor(0.00952, dtype=torch.float64, requires_grad=True)
    smooth = snip_background(spec, -0.0042, slope, 0.0, width, (105, 1150), mode="smooth")
    exact = snip_background(spec, -0.0042, 0.00952, 0.0, 0.5, (105, 1150))
    inside = slice(105, 1151)
    rel = (smooth.detach() - exact)[inside].abs() / exact[inside].clamp(min=10.0)
    assert float(rel.median()) < 0.05
    smooth[inside].sum().backward()
    assert torch.isfinite(width.grad) and float(width.grad) != 0.0
    assert torch.isfinite(slope.grad) and float(slope.grad) != 0.0


def test_background_below_spectrum_and_flat_spectrum():
    spec = torch.tensor(synthetic())
    bg = snip_background(spec, -0.0042, 0.00952, 0.0, 0.5, (105, 1150))
    smooth = torch.nn.functional.avg_pool1d(spec[None, None], 5, 1, 2)[0, 0]
    assert bool((bg[105:1150] <= smooth[105:1150] * 1.0001 + 1e-9).all())
    flat = torch.full((500,), 30.0, dtype=torch.float64)
    # a flat spectrum is its own background inside the window (the boxcar zeroes 2 channels per end)
    assert torch.allclose(snip_background(flat, 0.0, 0.01, window=(2, 497))[2:-2], flat[2:-2], rtol=1e-12)


def test_widths_formula():
    w = snip_widths(3, -0.0042, 0.00952, 0.0, 0.5)
    e = -0.0042 + 0.00952 * 2
    assert float(w[2]) == pytest.approx(0.5 * 2.35 * math.sqrt((0.0042 / 2.3548) ** 2 + e * 3.58 * 0.00952) / 0.00952)


def test_bad_input():
    with pytest.raises(InputError):
        snip_background(torch.zeros(5), 0.0, 0.01)
    with pytest.raises(InputError, match="slope"):
        snip_background(torch.zeros(100), 0.0, 0.0)
    with pytest.raises(InputError, match="mode"):
        snip_background(torch.zeros(100), 0.0, 0.01, mode="fast")
    with pytest.raises(InputError, match="window"):
        snip_background(torch.zeros(100), 0.0, 0.01, window=(200, 300))


def test_snip_window_equals_the_window_of_the_full_background():
    import torch

    from mapstorch.physics.snip import snip_background, snip_window

    gen = torch.Generator().manual_seed(3)
    y = torch.poisson(torch.rand(6, 1024, generator=gen, dtype=torch.float64) * 40 + 3, generator=gen)
    for window in ((100, 700), (0, 1023), (2, 1021)):
        full = snip_background(y, -0.01, 0.0125, 1e-7, 0.7, window)[:, window[0]:window[1] + 1]
        part = snip_window(y, -0.01, 0.0125, 1e-7, 0.7, window)
        torch.testing.assert_close(part, full, rtol=1e-12, atol=1e-10)


_KERNEL_CHECK = """
import torch
from mapstorch.physics.snip import snip_window
gen = torch.Generator().manual_seed(5)
peaks = 400 * torch.exp(-0.5 * ((torch.arange(160.0) - 80) / 3) ** 2)
for dtype in (torch.float32, torch.float64):
    y = torch.poisson((torch.rand(9, 160, generator=gen) * 30 + peaks + 2).to(dtype), generator=gen)
    ref = snip_window(y, -0.01, 0.0125, 1e-7, 0.7, (12, 150), engine="blocked")
    got = snip_window(y, -0.01, 0.0125, 1e-7, 0.7, (12, 150), engine="kernel")
    tol = 1e-6 if dtype == torch.float32 else 1e-12  # the same operations; log/exp may differ in the last bit
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    for engine in ("kernel", "blocked", "pointer"):
        bg, win = snip_window(y, -0.01, 0.0125, 1e-7, 0.7, (12, 150), engine=engine, with_window=True)
        assert torch.equal(win, y[:, 12:151]) and bg.shape == win.shape
print("ok")
"""


def test_gpu_kernel_gives_the_sequential_sweeps_numbers():
    """The Triton kernel of the GPU path (run by Triton's interpreter on the CPU) reproduces the
    CPU's blocked sequential sweep (a wrong order of the in-place updates would be off by far
    more than rounding)."""
    triton = pytest.importorskip("triton", reason="Triton is not installed here (the dev extra installs it on "
                                 "x86-64 Linux)")
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run the kernel; 3.9 or newer can")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_snip_engines_agree():
    y = torch.poisson(torch.rand(5, 300, dtype=torch.float64) * 50 + 5)
    ref = snip_window(y, -0.01, 0.0125, 1e-7, 0.7, (20, 280), engine="blocked")
    ptr = snip_window(y, -0.01, 0.0125, 1e-7, 0.7, (20, 280), engine="pointer")
    torch.testing.assert_close(ptr, ref, rtol=1e-12, atol=1e-10)
    with pytest.raises(InputError, match="engine"):
        snip_window(y, -0.01, 0.0125, 1e-7, 0.7, (20, 280), engine="fast")
