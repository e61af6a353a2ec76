"""The SNIP's compiled float32 inverse transform (mapstorch.physics.lls_cpu): its exp's accuracy
against float64, special values, subnormal results, every length (whole blocks of vectors, single
vectors, the last values), and the blocked engine's fallback to NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

lls_cpu = pytest.importorskip("mapstorch.physics.lls_cpu")


def _ulps(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|got - exact| in units in the last place of the float32 nearest ``exact`` (finite, normal)."""
    nearest = exact.astype(np.float32)
    return np.abs(got.astype(np.float64) - exact) / np.spacing(np.abs(nearest)).astype(np.float64)


def test_exp_within_one_unit_in_the_last_place():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-87.3, 88.7, 2_000_000), rng.uniform(-1, 3, 1_000_000),
                        rng.normal(0, 1e-4, 100_000)]).astype(np.float32)
    exact = np.exp(x.astype(np.float64))
    got = lls_cpu.exp32(x.copy())
    err = _ulps(got, exact)
    assert err.max() < 1.02
    assert (got == exact.astype(np.float32)).mean() > 0.88  # mostly the nearest float32
    with np.errstate(all="ignore"):
        assert _ulps(np.exp(x), exact).max() > 2.0  # NumPy's float32 exp, for comparison


def test_exp_special_values_and_subnormal_results():
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 88.72, 88.73, 89.0, 100.0, 1e30, -87.3, -100.0, -103.9,
                  -104.5, -200.0, -1e30, 1e-30, -1e-30], np.float32)
    got = lls_cpu.exp32(x.copy())
    with np.errstate(over="ignore"):
        exact = np.exp(x.astype(np.float64))
    assert got[0] == got[1] == 1.0 and np.isnan(got[4]) and got[3] == 0.0
    assert np.isposinf(got[[2, 6, 7, 8, 9]]).all()
    assert got[5] == pytest.approx(exact[5], rel=2e-7) and np.isfinite(got[5])
    # below 2^-126 the result rounds once into the subnormals: within half the smallest step
    tiny = slice(10, 17)
    assert (np.abs(got[tiny].astype(np.float64) - exact[tiny]) <= 2.0 ** -149).all()
    assert got[12] > 0 and got[13] == 0.0 and got[14] == 0.0 and got[15] == 0.0
    assert got[16] == got[17] == 1.0


def test_exp_exp_minus_one_every_length_and_shape():
    """exp(exp(v) - 1), values past the last whole vector included, equals two exp32 passes with
    the subtraction between them, bit for bit, and is within a few units in the last place."""
    rng = np.random.default_rng(1)
    for n in (1, 15, 16, 17, 31, 63, 64, 65, 100, 1000):
        v = rng.uniform(0, 2.6, n).astype(np.float32)
        got = lls_cpu.exp_exp_minus_one(v.copy())
        step = lls_cpu.exp32(v.copy())
        step -= np.float32(1.0)
        want = lls_cpu.exp32(step)
        np.testing.assert_array_equal(got, want)
        exact = np.exp(np.exp(v.astype(np.float64)) - 1.0)
        np.testing.assert_allclose(got, exact, rtol=2e-6)
    block = rng.uniform(0, 2.6, (7, 33)).astype(np.float32)
    np.testing.assert_array_equal(lls_cpu.exp_exp_minus_one(block.copy()),
                                  lls_cpu.exp_exp_minus_one(block.reshape(-1).copy()).reshape(7, 33))


def test_exp_rejects_arrays_it_cannot_work_in_place():
    for bad in (np.zeros(8), np.zeros((4, 8), np.float32)[:, ::2], np.zeros(3, np.int32)):
        with pytest.raises(ValueError, match="C-contiguous float32"):
            lls_cpu.exp_exp_minus_one(bad)
    frozen = np.zeros(4, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        lls_cpu.exp32(frozen)


def test_blocked_engine_without_the_kernel_uses_numpy_and_stays_close(monkeypatch):
    """Where numba is unusable the blocked engine's float32 background comes from NumPy's exp:
    within a few units in the last place of the compiled kernel's; float64 is NumPy's always."""
    from mapstorch.physics import snip

    gen = torch.Generator().manual_seed(3)
    y = (torch.rand(20, 400, generator=gen) * 50 + 200 * torch.exp(-((torch.arange(400) - 180.0) / 6) ** 2)).float()
    cal = (-0.01, 0.0125, 1e-7, 0.7)
    with_kernel = snip.snip_window(y, *cal, (30, 380), engine="blocked")
    monkeypatch.setattr(snip, "_exp_kernel", lambda: None)
    without = snip.snip_window(y, *cal, (30, 380), engine="blocked")
    assert not torch.equal(with_kernel, without)
    torch.testing.assert_close(without, with_kernel, rtol=3e-6, atol=1e-4)
    double = y.double()
    monkeypatch.undo()
    torch.testing.assert_close(snip.snip_window(double, *cal, (30, 380), engine="blocked"),
                               snip.snip_window(double, *cal, (30, 380), engine="compiled"), rtol=0, atol=0)


def test_blocked_engine_survives_a_failing_kernel(monkeypatch, caplog):
    """A kernel that fails at run time (LLVM broken here) is dropped with a warning, once; NumPy's
    exp does the work from then on."""
    from mapstorch.physics import snip

    def broken(out):
        raise RuntimeError("LLVM ERROR: no such intrinsic")

    monkeypatch.setattr(snip, "_exp_kernel", lambda: broken)
    monkeypatch.setattr(snip, "_exp_failure", None)
    v = np.linspace(0, 2, 50, dtype=np.float32).reshape(5, 10)
    want = np.exp(np.exp(v) - np.float32(1.0))
    with caplog.at_level("WARNING"):
        snip._exp_exp_minus_one(v)
    assert "exp kernel failed" in caplog.text and "LLVM ERROR" in caplog.text
    np.testing.assert_array_equal(v, want)
    assert snip._exp_failure is not None
