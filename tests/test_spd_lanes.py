"""The pixel-last small-matrix routines (the GPU's; run here on the CPU) against NumPy's float64
linear algebra, and their contracts: input untouched unless asked, singular matrices reported."""

import numpy as np
import pytest
import torch

from mapstorch.maps import solvers, spd_lanes
from mapstorch.maps.fit import _to_host


def _spd(p: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(p, k, k + 3))
    return x @ x.transpose(0, 2, 1) + 0.1 * np.eye(k)  # [P, K, K]


def _lanes(a: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(1, 2, 0))).to(dtype)  # [K, K, P]


def test_cholesky_matches_numpy_and_leaves_the_input_alone():
    a = _spd(300, 9, 0)
    t = _lanes(a)
    before = t.clone()
    low, ok = spd_lanes.cholesky(t)
    assert torch.equal(t, before) and bool(ok.all())
    ref = np.linalg.cholesky(a)  # [P, K, K] lower
    got = torch.tril(low.permute(2, 0, 1)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    # in place when asked (and possible): the same factor, no copy
    low2, _ = spd_lanes.cholesky(t, overwrite=True)
    assert low2.data_ptr() == t.data_ptr()
    np.testing.assert_allclose(torch.tril(low2.permute(2, 0, 1)).numpy(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
def test_inverse_diagonal_and_solve_match_numpy(dtype, tol):
    a = _spd(500, 12, 1)
    rng = np.random.default_rng(2)
    b = rng.normal(size=(500, 12))
    inv = np.linalg.inv(a)
    var, ok = spd_lanes.inverse_diagonal(_lanes(a, dtype), work=dtype)
    assert var.dtype == dtype and var.shape == (12, 500) and bool(ok.all())
    np.testing.assert_allclose(var.T.double().numpy(), np.diagonal(inv, axis1=1, axis2=2), rtol=tol)
    x, ok = spd_lanes.solve(_lanes(a, dtype), torch.from_numpy(b.T.copy()).to(dtype), work=dtype)
    ref = np.linalg.solve(a, b[..., None])[..., 0]
    np.testing.assert_allclose(x.T.double().numpy(), ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_singular_and_indefinite_matrices_are_reported():
    a = _spd(6, 5, 3)
    a[1] = 0.0  # zero
    a[2, :, 4] = a[2, :, 3]  # two equal columns and rows: singular
    a[2, 4, :] = a[2, 3, :]
    a[3, 0, 0] = -1.0  # indefinite
    a[4, 2, 2] = np.nan  # not a number
    for dtype in (torch.float64, torch.float32):
        var, ok = spd_lanes.inverse_diagonal(_lanes(a, dtype), work=dtype)
        assert ok.tolist() == [True, False, False, False, False, True]
        assert bool(torch.isfinite(var[:, ok]).all())


def test_packed_stderr_matches_the_full_inverse_on_the_active_block():
    rng = np.random.default_rng(4)
    k, p = 6, 40
    a = _spd(p, k, 5)
    active = rng.random((p, k)) > 0.3
    active[0] = False  # nothing active: all NaN
    iu = np.triu_indices(k)
    upper = torch.from_numpy(a[:, iu[0], iu[1]].T.copy())  # [T, P]
    for work, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        se, ok = spd_lanes.packed_stderr(upper.to(work), torch.from_numpy(active))
        assert se.dtype == work and bool(ok.all())
        for i in range(p):
            idx = np.flatnonzero(active[i])
            expect = np.full(k, np.nan)
            if idx.size:
                expect[idx] = np.sqrt(np.diagonal(np.linalg.inv(a[i][np.ix_(idx, idx)])))
            np.testing.assert_allclose(se[i].double().numpy(), expect, rtol=tol)
    with pytest.raises(ValueError, match="does not match"):
        spd_lanes.packed_stderr(upper[:-1], torch.from_numpy(active))
    with pytest.raises(ValueError, match="square"):
        spd_lanes.cholesky(torch.zeros(3, 4, 5))


def test_engine_choice_is_validated():
    m = torch.eye(3).expand(2, 3, 3).contiguous()
    with pytest.raises(ValueError, match="engine must be one of"):
        solvers.inverse_diagonal(m, engine="magma")
    torch.testing.assert_close(solvers.inverse_diagonal(m, engine="lanes"), torch.ones(2, 3))


def test_results_to_the_host_keep_names_shapes_and_values():
    t = {"a": torch.arange(12.0).reshape(3, 4).T, "b": torch.ones(5)}
    out = _to_host(t)
    assert set(out) == {"a", "b"} and out["a"].shape == (4, 3)
    np.testing.assert_array_equal(out["a"], t["a"].numpy())
    if torch.cuda.is_available():  # one page-locked transfer
        got = _to_host({k: v.cuda() for k, v in t.items()})
        np.testing.assert_array_equal(got["a"], t["a"].numpy())
        np.testing.assert_array_equal(got["b"], t["b"].numpy())
