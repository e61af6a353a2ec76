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


def snip_literal(spec, off, slope, quad, width, xmin, xmax, sequential=True):
    """XRF-Maps' snip_background written out channel by channel (reference). ``sequential=False``
    makes every sweep read the values from before the sweep (not XRF-Maps: a foil for tests)."""
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
        src = v if sequential else v.copy()
        for k in range(n):
            lo = min(max(int(k - cw[k]), lo_l), up_l)
            hi = min(int(k + cw[k]), up_l)
            t = (src[lo] + src[hi]) / 2.0
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


# --- the compiled CPU engine (numba): bit for bit the blocked NumPy engine -----------------------

CAL = (-0.01, 0.0125, 1e-7, 0.7)


def peaked_spectra(shape, dtype, seed=0):
    """Poisson counts ``[..., C]`` over a falling continuum with a few peaks (the clipping matters)."""
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    c = torch.arange(n, dtype=torch.float64)
    mean = 30 * torch.exp(-c / (0.6 * n)) + 2
    for amp, cen, wid in ((400, 0.25, 4), (2000, 0.5, 6), (150, 0.8, 5)):
        mean = mean + amp * torch.exp(-0.5 * ((c - cen * n) / wid) ** 2)
    scale = torch.rand(*shape[:-1], 1, generator=gen, dtype=torch.float64) + 0.5
    return torch.poisson(mean * scale, generator=gen).to(dtype)


def assert_same_bits(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,window", [
    ((1, 400), (30, 380)),
    ((400,), (0, 399)),            # no batch dimension; the window is the whole spectrum
    ((37, 400), (2, 397)),          # fewer spectra than a chunk
    ((300, 400), (1, 398)),         # a chunk of 256 (float32) / 176 (float64) spectra and a part chunk
    ((2, 3, 5, 400), (120, 399)),   # leading dimensions; window at the spectrum's last channel
    ((300, 1100), (0, 1099)),       # chunks of 128 (float32) / 64 (float64) spectra and a part chunk
    ((33, 1100), (600, 600)),       # a one-channel window
])
def test_compiled_engine_equals_blocked_bit_for_bit(shape, window, dtype):
    y = peaked_spectra(shape, dtype)
    want, want_counts = snip_window(y, *CAL, window, engine="blocked", with_window=True)
    got, got_counts = snip_window(y, *CAL, window, engine="compiled", with_window=True)
    assert_same_bits(got, want)
    assert_same_bits(got_counts, want_counts)
    assert torch.equal(got_counts, y[..., window[0]:window[1] + 1])
    assert_same_bits(snip_window(y, *CAL, window, engine="compiled"), want)
    # channel-major memory, as the blocked engine's (the map fit works on [Cw, P])
    flat = got.reshape(-1, got.shape[-1])
    assert flat.T.is_contiguous() and got_counts.reshape(-1, got.shape[-1]).T.is_contiguous()
    # the net counts projected on a matrix's columns (the NNLS's right-hand side), summed by the
    # compiled engine's last step over the matrix's non-zeros: the product's numbers to rounding
    n_w = window[1] - window[0] + 1
    gen = torch.Generator().manual_seed(1)
    mat = torch.rand(n_w, 5, generator=gen, dtype=dtype) * (torch.rand(n_w, 5, generator=gen) > 0.5)
    _, _, proj = snip_window(y, *CAL, window, engine="compiled", with_window=True, project=mat)
    _, _, want_proj = snip_window(y, *CAL, window, engine="blocked", with_window=True, project=mat)
    ref = (want_counts - want).clamp(min=0.0).double() @ mat.double()
    assert proj.shape == want_proj.shape == (*y.shape[:-1], 5) and proj.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(proj.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    torch.testing.assert_close(want_proj.double(), ref, rtol=tol * 10, atol=tol * 10 * float(ref.abs().max()))
    # and bit for bit the sums in the data's dtype, channel after channel, of the rounded products
    net = (want_counts - want).clamp(min=0.0).reshape(-1, n_w).numpy()
    seq = np.zeros((net.shape[0], 5), dtype=net.dtype)
    for c in range(n_w):
        seq += net[:, c:c + 1] * mat[c].numpy()
    assert_same_bits(proj.reshape(-1, 5), torch.from_numpy(seq))
    # channel-major spectra ([..., C] views of [C, P] memory, as XRF-Maps files hold them): read
    # in place, the same numbers; the window's counts are a view of the spectra, not a copy
    flat_cm = y.reshape(-1, y.shape[-1]).T.contiguous().T
    if flat_cm.shape[0] > 1:
        y_cm = flat_cm.reshape(y.shape)
        bg_cm, counts_cm, proj_cm = snip_window(y_cm, *CAL, window, engine="compiled", with_window=True,
                                                project=mat)
        assert_same_bits(bg_cm, want)
        assert_same_bits(counts_cm, want_counts)
        assert_same_bits(proj_cm, proj)
        assert counts_cm.data_ptr() == flat_cm[:, window[0]].data_ptr()


def test_projected_net_counts_keep_nan_and_check_their_input():
    y = peaked_spectra((5, 400), torch.float32)
    y[2, 200] = float("nan")
    mat = torch.ones(351, 2)
    mat[150:, 1] = 0.0  # column 1 does not see window channel 170 (spectrum channel 200)
    bg, counts, proj = snip_window(y, *CAL, (30, 380), engine="compiled", with_window=True, project=mat)
    assert bool(torch.isnan(proj[2, 0])) and bool(torch.isfinite(proj[2, 1]))
    assert bool(torch.isfinite(proj[[0, 1, 3, 4]]).all())
    with pytest.raises(InputError, match="with_window"):
        snip_window(y, *CAL, (30, 380), project=mat)
    with pytest.raises(InputError, match="window channels"):
        snip_window(y, *CAL, (30, 380), with_window=True, project=mat[:-1])
    with pytest.raises(InputError, match="must be a tensor"):
        snip_window(y, *CAL, (30, 380), with_window=True, project=mat.numpy())


def test_compiled_engine_odd_inputs_match_blocked():
    """Non-contiguous and integer spectra, and counts that make the log transform non-finite
    (NaN, infinity, below -1): the same numbers as the blocked engine."""
    y = peaked_spectra((50, 600), torch.float64)
    wide = torch.cat([y, y], dim=1)[:, 100:700]  # rows 1200 apart: not contiguous
    window = (40, 560)
    assert_same_bits(snip_window(wide, *CAL, window, engine="compiled"),
                     snip_window(wide, *CAL, window, engine="blocked"))
    ints = y.to(torch.int64)
    assert_same_bits(snip_window(ints, *CAL, window, engine="compiled"),
                     snip_window(ints, *CAL, window, engine="blocked"))
    bad = y.float().clone()
    bad[0, 300] = float("nan")
    bad[1, 200] = float("inf")
    bad[2, 100:110] = -5.0
    bad[3, 50] = -0.75
    with np.errstate(invalid="ignore", divide="ignore"):
        want = snip_window(bad, *CAL, window, engine="blocked")
    got = snip_window(bad, *CAL, window, engine="compiled")
    assert_same_bits(got, want)
    assert bool(torch.isfinite(got).all())


def test_compiled_engine_is_sequential_like_xrfmaps():
    """XRF-Maps' sweep is in place: channel c reads the already-clipped values to its left. A
    sweep that reads the old values everywhere gives different numbers; the compiled engine gives
    XRF-Maps' (the literal loop) and the blocked engine's, exactly."""
    spec = synthetic()
    window = (105, 1150)
    off, slope, quad, width = -0.0042, 0.00952, 0.0, 0.5
    seq = snip_literal(spec, off, slope, quad, width, *window)[window[0]:window[1] + 1]
    jacobi = snip_literal(spec, off, slope, quad, width, *window, sequential=False)[window[0]:window[1] + 1]
    assert np.abs(seq - jacobi).max() > 1.0  # the order matters here
    y = torch.tensor(spec)
    got = snip_window(y, off, slope, quad, width, window, engine="compiled")
    assert np.allclose(got.numpy(), seq, rtol=1e-12, atol=1e-10)
    assert not np.allclose(got.numpy(), jacobi, rtol=1e-6, atol=1e-3)
    assert_same_bits(got, snip_window(y, off, slope, quad, width, window, engine="blocked"))


def test_compiled_engine_same_bits_on_any_thread_count():
    from mapstorch.physics import snip as snip_mod
    from mapstorch.physics import snip_cpu

    y = peaked_spectra((700, 500), torch.float32, seed=4)
    window = (10, 480)
    ref = snip_window(y, *CAL, window, engine="blocked")
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert_same_bits(snip_window(y, *CAL, window, engine="compiled"), ref)
    finally:
        torch.set_num_threads(before)
    # the module's own entry point, with more threads than chunks
    w = snip_widths(500, *CAL, dtype=torch.float32).reshape(-1)
    assert snip_cpu.chunk_size(471, 4) == 256
    a, b = 8, 483
    widths = [w[a:b]] * 2
    wp, top = w[a:b], float(w.max())
    while top >= 0.5:
        widths.append(wp)
        wp, top = wp / math.sqrt(2.0), top / math.sqrt(2.0)
    steps = snip_mod._cpu_schedule(tuple(snip_mod._w_key(v) for v in widths), b - a, window[0] - a, window[1] - a)
    out, counts = snip_cpu.snip_window_cpu(np.ascontiguousarray(y.numpy()), *window, steps, True, 8)
    assert np.array_equal(out.T, ref.numpy()) and np.array_equal(counts.T, y[:, 10:481].numpy())


def test_auto_engine_uses_compiled_on_the_cpu(monkeypatch):
    pytest.importorskip("numba", reason="numba is a core dependency; without it auto uses the blocked engine")
    from mapstorch.physics import snip as snip_mod

    calls = []
    real = snip_mod._snip_window_compiled
    monkeypatch.setattr(snip_mod, "_snip_window_compiled", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = peaked_spectra((20, 300), torch.float32)
    got = snip_window(y, *CAL, (20, 280))
    assert calls == [1]
    assert_same_bits(got, snip_window(y, *CAL, (20, 280), engine="blocked"))
    # a spectrum that needs a gradient stays off the compiled engine under auto
    snip_window(y.double().requires_grad_(), *CAL, (20, 280), engine="pointer")
    assert calls == [1]


def test_auto_engine_without_numba_uses_blocked(monkeypatch):
    from mapstorch.physics import snip as snip_mod

    monkeypatch.setattr(snip_mod, "_snip_cpu", lambda: "ImportError: No module named 'numba'")
    monkeypatch.setattr(snip_mod, "_snip_window_compiled", lambda *a, **k: pytest.fail("compiled engine used"))
    y = peaked_spectra((4, 300), torch.float64)
    snip_window(y, *CAL, (20, 280))
    with pytest.raises(InputError, match="numba"):
        snip_window(y, *CAL, (20, 280), engine="compiled")


def test_auto_engine_falls_back_when_compiled_fails(monkeypatch, caplog):
    from mapstorch.physics import snip as snip_mod

    monkeypatch.setattr(snip_mod, "_compiled_failure", None)
    if snip_mod._compiled_unusable() is not None:
        pytest.skip("numba is not usable here")

    def broken(*args, **kwargs):
        raise RuntimeError("LLVM ERROR: no target")

    monkeypatch.setattr(snip_mod, "_snip_window_compiled", broken)
    y = peaked_spectra((4, 300), torch.float64)
    with caplog.at_level("WARNING", logger="mapstorch.physics.snip"):
        got = snip_window(y, *CAL, (20, 280))
    assert "LLVM ERROR" in caplog.text and "blocked" in caplog.text
    assert_same_bits(got, snip_window(y, *CAL, (20, 280), engine="blocked"))
    assert snip_mod._compiled_unusable() is not None  # auto no longer tries it
    with pytest.raises(RuntimeError, match="LLVM"):  # asked for by name: the error surfaces
        snip_window(y, *CAL, (20, 280), engine="compiled")


def test_mapstorch_works_when_numba_cannot_import():
    code = ("import sys; sys.modules['numba'] = None\n"
            "import torch\n"
            "from mapstorch.physics.snip import snip_window\n"
            "y = torch.poisson(torch.full((3, 200), 20.0))\n"
            "a = snip_window(y, -0.01, 0.0125, 0.0, 0.7, (10, 190))\n"
            "b = snip_window(y, -0.01, 0.0125, 0.0, 0.7, (10, 190), engine='blocked')\n"
            "assert torch.equal(a, b)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_compiled_engine_bad_input():
    from mapstorch.physics import snip_cpu

    y = peaked_spectra((3, 300), torch.float32)
    with pytest.raises(InputError, match="float32/float64"):
        snip_window(y.half(), *CAL, (20, 280), engine="compiled")
    with pytest.raises(InputError, match="width"):
        snip_window(y, -0.01, 0.0125, 0.0, -0.5, (20, 280), engine="compiled")
    with pytest.raises(InputError, match="engine must be one of auto, compiled, blocked"):
        snip_window(y, *CAL, (20, 280), engine="numba")
    x = y.numpy()
    steps = (np.array([0]), np.array([0]), np.array([1]))
    with pytest.raises(InputError, match="C-contiguous"):
        snip_cpu.snip_window_cpu(x[:, ::2], 10, 100, steps)
    with pytest.raises(InputError, match="outside"):
        snip_cpu.snip_window_cpu(x, 10, 300, steps)
    with pytest.raises(InputError, match="outside the 91-channel window"):
        snip_cpu.snip_window_cpu(x, 10, 100, (np.array([0]), np.array([0]), np.array([91])))
    with pytest.raises(InputError, match="outside the window"):
        snip_cpu.sweep_steps([(np.arange(20) - 5, np.arange(20))], 0, 19)


def test_gpu_without_triton_is_said_once(caplog):
    from mapstorch.physics import snip

    snip._warn_pointer_fallback.cache_clear()
    with caplog.at_level("WARNING", logger=snip._log.name):
        snip._warn_pointer_fallback("cuda:7")
        snip._warn_pointer_fallback("cuda:7")
    said = [r for r in caplog.records if "pointer jumping" in r.getMessage()]
    assert len(said) == 1 and "cuda:7" in said[0].getMessage() and "pip install triton" in said[0].getMessage()


@pytest.mark.parametrize("layout", ["pixel-major", "channel-major"])
def test_roi_counts_summed_with_the_snip_equal_direct_sums(layout):
    """XRF-Maps' ROI counts summed while each chunk is in the cache (windows inside and outside
    the SNIP's crop, one channel wide, at the spectrum's ends) equal the windows' sums, with the
    compiled engine and with the blocked one; the background and projections unchanged."""
    rng = np.random.default_rng(7)
    y = torch.from_numpy(rng.poisson(5.0, (300, 400)).astype(np.float32))
    if layout == "channel-major":
        y = y.T.contiguous().T
    window = (60, 320)
    windows = [(100, 120), (58, 60), (0, 3), (330, 398), (200, 200), (399, 399)]
    design = torch.from_numpy(rng.random((261, 5)).astype(np.float32))
    want = np.stack([y.numpy()[:, a:b + 1].sum(1, dtype=np.float64) for a, b in windows], 1).astype(np.float32)
    got = {}
    for engine in ("compiled", "blocked"):
        bg, yw, proj, roi = snip_window(y, 0.0, 0.01, 0.0, 0.5, window, engine=engine, with_window=True,
                                        project=design, roi=windows)
        assert roi.shape == (300, len(windows)) and roi.dtype == torch.float32
        np.testing.assert_array_equal(roi.numpy(), want)
        got[engine] = (bg, proj)
        plain = snip_window(y, 0.0, 0.01, 0.0, 0.5, window, engine=engine, with_window=True, project=design)
        assert torch.equal(plain[0], bg) and torch.equal(plain[2], proj)
    assert torch.equal(got["compiled"][0], got["blocked"][0])
    bg, yw, roi = snip_window(y, 0.0, 0.01, 0.0, 0.5, window, with_window=True, roi=windows)  # no projection
    np.testing.assert_array_equal(roi.numpy(), want)
    with pytest.raises(InputError, match="needs with_window"):
        snip_window(y, 0.0, 0.01, 0.0, 0.5, window, roi=windows)
    with pytest.raises(InputError, match="within the 400 channels"):
        snip_window(y, 0.0, 0.01, 0.0, 0.5, window, with_window=True, roi=[(10, 400)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_explicit_vector_sweep_equals_the_vectorised_loop(dtype):
    """The sweep's explicit vector kernel (whole 64-byte vectors) and its lane loop (the rest):
    the loop's numbers bit for bit, for random steps that read their own row on either side,
    NaN on either side, and any number of spectra."""
    snip_cpu = pytest.importorskip("mapstorch.physics.snip_cpu")
    rng = np.random.default_rng(3)
    rows, n_steps = 60, 4000
    chan = rng.integers(0, rows, n_steps)
    lo = np.where(rng.random(n_steps) < 0.2, chan, rng.integers(0, rows, n_steps))
    hi = np.where(rng.random(n_steps) < 0.2, chan, rng.integers(0, rows, n_steps))
    half = dtype(0.5)
    for nb in (1, 7, 8, 16, 17, 40, 64, 130):
        v = (rng.random((rows, nb + 3)) * 10).astype(dtype)  # wider than nb: lanes past nb stay as they are
        v[rng.random(v.shape) < 0.01] = np.nan
        want, got = v.copy(), v.copy()
        snip_cpu._sweep_lanes(want, nb, chan, lo, hi, half)
        snip_cpu._sweep_chunk(got, nb, chan, lo, hi, half)
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
        np.testing.assert_array_equal(got[:, nb:].view(np.uint8), v[:, nb:].view(np.uint8))
        assert not np.array_equal(np.nan_to_num(got[:, :nb]), np.nan_to_num(v[:, :nb]))  # the steps did clip


def test_interleaved_passes_give_the_sequential_numbers():
    """The compiled engine's steps are several passes interleaved (snip_cpu._wavefront): on
    random passes (widths that jump, channels that read only themselves left out, reads that go
    backwards) the interleaved order keeps each pass's own order and gives the numbers of the
    passes one after another, bit for bit."""
    from mapstorch.physics import snip_cpu

    rng = np.random.default_rng(8)
    n = 300
    for trial in range(6):
        plans = []
        for _ in range(int(rng.integers(2, 8))):
            w = rng.integers(0, 25 if trial % 2 else 4, n)
            c = np.arange(n)
            lo = np.clip(c - w, 0, n - 1)
            hi = np.clip(c + rng.integers(0, 25, n) * (rng.random(n) > 0.1), 0, n - 1)
            plans.append((lo, hi))
        steps = snip_cpu.sweep_steps(plans, 0, n - 1)
        sequential = []
        for lo, hi in plans:
            keep = (lo != np.arange(n)) | (hi != np.arange(n))
            sequential.append((np.arange(n)[keep], lo[keep], hi[keep]))
        flat = tuple(np.concatenate([s[i] for s in sequential]) for i in range(3))
        assert sorted(zip(*steps)) == sorted(zip(*flat))
        v = rng.random((n, 40)).astype(np.float32)
        v[rng.random((n, 40)) < 0.01] = np.nan
        want, got = v.copy(), v.copy()
        snip_cpu._sweep_chunk(want, 40, *flat, np.float32(0.5))
        snip_cpu._sweep_chunk(got, 40, *steps, np.float32(0.5))
        np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
        assert not np.array_equal(want, v)
