"""The compiled kernels written as explicit vector code equal the plain loops they replace, bit
for bit: the Fisher information's channel quads (mapstorch.maps.spd_cpu._add_quad), the model
and weights of a channel (chi2_cpu._model_lanes), and the many small Cholesky factorisations and
inverse diagonals (spd_cpu._cholesky, spd_cpu._inverse_diag)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

spd_cpu = pytest.importorskip("mapstorch.maps.spd_cpu")
chi2_cpu = pytest.importorskip("mapstorch.maps.chi2_cpu")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quad_kernel_equals_the_loop(dtype):
    rng = np.random.default_rng(7)
    n_t, n_e, width = 30, 200, 150
    qptr = np.array([0, 70, 70, 200], dtype=np.int64)  # three quads, one without entries
    qpair = rng.integers(0, n_t, n_e).astype(np.int64)  # entries may repeat a row
    qcoef = (rng.random((n_e, 4)) * (rng.random((n_e, 4)) > 0.2)).astype(dtype)
    weights = rng.random((4, width + 5)).astype(dtype)
    weights[1, 3] = np.nan
    for nb in (1, 7, 8, 16, 31, 64, 65, 100, 150):
        start = rng.random((n_t, width)).astype(dtype)
        want, got = start.copy(), start.copy()
        for q in range(3):
            spd_cpu._add_quad_lanes(want, 0, nb, qptr, qpair, qcoef, q, *weights[:, :nb])
            spd_cpu._add_quad(got, nb, qptr, qpair, qcoef, q, *weights[:, :nb])
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
        np.testing.assert_array_equal(got[:, nb:], start[:, nb:])  # pixels past nb untouched
    # weights that are not contiguous: the loop does every pixel
    strided = rng.random((4, 2 * width)).astype(dtype)[:, ::2]
    want, got = np.zeros((n_t, width), dtype), np.zeros((n_t, width), dtype)
    spd_cpu._add_quad_lanes(want, 0, width, qptr, qpair, qcoef, 0, *strided)
    spd_cpu._add_quad(got, width, qptr, qpair, qcoef, 0, *strided)
    np.testing.assert_array_equal(got, want)


def test_quad_table_leaves_out_negligible_products():
    pairs = np.zeros((8, 4), dtype=np.float32)
    pairs[:, 0] = [1.0, 1e-16, 0, 0, 0, 0, 0, 0]  # quad 0: kept (1.0); 1e-16 set to zero within it
    pairs[5, 0] = 1e-14  # quad 1: kept, above 1e-15 of the column's largest
    pairs[6, 1] = 1e-30  # a column of tiny products only: its largest is kept
    pairs[2, 2], pairs[4, 2] = 2.0, 1e-20  # quad 1 of column 2: left out
    pairs[:, 3] = np.nan  # NaN: never left out
    qptr, qpair, qcoef = spd_cpu.quad_table(pairs)
    entries = {(q, int(qpair[e])): qcoef[e].tolist() for q in range(2) for e in range(qptr[q], qptr[q + 1])}
    assert entries[(0, 0)] == [1.0, 0.0, 0.0, 0.0]
    assert entries[(1, 0)][1] == pytest.approx(1e-14)
    assert (1, 1) in entries and (0, 2) in entries and (1, 2) not in entries
    assert (0, 3) in entries and (1, 3) in entries and np.isnan(entries[(1, 3)]).all()
    full = spd_cpu.quad_table(pairs, negligible=0)
    assert full[0][-1] == qptr[-1] + 1  # only (1, 2) more
    # float64: the default threshold scales with the dtype's rounding (1e-20 is kept there)
    wide = spd_cpu.quad_table(pairs.astype(np.float64))
    assert wide[0][-1] == full[0][-1]
    pairs64 = pairs.astype(np.float64)
    pairs64[4, 2] = 1e-25  # below 1.9e-24 of 2.0: left out
    assert spd_cpu.quad_table(pairs64)[0][-1] == qptr[-1]


def test_negligible_products_change_no_error_of_a_map(monkeypatch):
    """The Fisher information without the negligible products gives the same standard errors,
    bit for bit, on a simulated map (majors and traces, float32)."""
    from mapstorch.maps import fit as fit_module
    from mapstorch.maps import fit_map
    from mapstorch.synthetic import map_dataset, simulate_map

    sim = simulate_map(rows=4, cols=64, seed=2)
    ds = map_dataset(sim)
    monkeypatch.setattr(fit_module, "_fused_tables", [])
    default = fit_map(ds, sim.params, method="nnls")
    pairs = fit_module._fused_tables[0][4].numpy()
    assert spd_cpu.quad_table(pairs)[0][-1] < 0.9 * spd_cpu.quad_table(pairs, negligible=0)[0][-1]  # some left out
    monkeypatch.setattr(spd_cpu, "_NEGLIGIBLE", 0.0)
    monkeypatch.setattr(fit_module, "_fused_tables", [])
    every = fit_map(ds, sim.params, method="nnls")
    np.testing.assert_array_equal(default.counts, every.counts)
    np.testing.assert_array_equal(default.counts_stderr, every.counts_stderr)
    np.testing.assert_array_equal(default.reduced_chi2, every.reduced_chi2)
    assert np.isfinite(default.counts_stderr).mean() > 0.9


@functools.cache
def _compiled_model_lanes():
    numba = pytest.importorskip("numba")
    kernel = chi2_cpu._model_lanes

    @numba.njit
    def call(dval, dcol, dptr, a_t, bg, y, c, first, n_vec, w, acc):
        kernel(dval, dcol, dptr, a_t, bg, y, c, first, n_vec, w, acc)

    return call


def _model_lanes(*args):
    """chi2_cpu._model_lanes, an intrinsic, called from compiled code."""
    _compiled_model_lanes()(*args)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_model_kernel_equals_the_loop(dtype):
    """chi2_cpu._model_lanes (whole vectors, four side by side, then one at a time) against
    _model_row pixel range by pixel range: the same weights and float64 sums, NaN, infinity and
    models below 1 included; pixels past the vectors untouched."""
    rng = np.random.default_rng(11)
    n_c, k, width = 9, 6, 230
    design = (rng.random((n_c, k)) * (rng.random((n_c, k)) > 0.4)).astype(dtype)
    design[4] = 0  # a channel without components: the model is the background
    dptr, dval, dcol = chi2_cpu.nonzeros_by_row(design, dtype)
    a_t = (rng.random((k, width)) * 50).astype(dtype)
    a_t[2, 17] = np.nan
    a_t[0, 40] = np.inf
    bg = (rng.random((n_c, width)) * 3).astype(dtype)
    bg[:, 60:70] = 0.0  # models below 1: weight 1
    y = rng.poisson(20, (n_c, width)).astype(dtype)
    lanes = 64 // np.dtype(dtype).itemsize
    for first, n_vec in ((0, 1), (0, 3), (16, 4), (32, 5), (0, width // lanes), (7, 9)):
        for c in range(n_c):
            n = n_vec * lanes
            want_w, got_w = np.full(n + 3, -1, dtype), np.full(n + 3, -1, dtype)
            start = rng.random(n + 3)
            want_acc, got_acc = start.copy(), start.copy()
            chi2_cpu._model_row(dval, dcol, dptr, a_t, bg, y, c, first, n, np.empty(n, dtype), want_w, want_acc)
            _model_lanes(dval, dcol, dptr, a_t, bg, y, c, first, n_vec, got_w, got_acc)
            np.testing.assert_array_equal(got_w.view(np.uint8), want_w.view(np.uint8))
            np.testing.assert_array_equal(got_acc.view(np.uint8), want_acc.view(np.uint8))
            assert (got_w[n:] == -1).all() and (got_acc[n:] == start[n:]).all()


def test_model_weights_chi2_equal_the_loop_on_odd_pixel_counts():
    """model_weights_chi2 (vectors, then the last pixels by the loop) against _model_row over all
    pixels at once, for pixel counts that are and are not whole vectors."""
    rng = np.random.default_rng(12)
    n_c, k = 40, 7
    design = (rng.random((n_c, k)) * (rng.random((n_c, k)) > 0.5)).astype(np.float32)
    dptr, dval, dcol = chi2_cpu.nonzeros_by_row(design, np.float32)
    for p in (1, 15, 16, 17, 100, 2048 + 33):
        a = (rng.random((p, k)) * 30).astype(np.float32)
        bg = (rng.random((n_c, p)) * 5).astype(np.float32)
        y = rng.poisson(10, (n_c, p)).astype(np.float32)
        w, chi = chi2_cpu.model_weights_chi2(design, a, bg, y)
        want_w = np.empty_like(y)
        want_chi = np.zeros(p)
        a_t = np.ascontiguousarray(a.T)
        for c in range(n_c):
            chi2_cpu._model_row(dval, dcol, dptr, a_t, bg, y, c, 0, p, np.empty(p, np.float32), want_w[c], want_chi)
        np.testing.assert_array_equal(w, want_w)
        np.testing.assert_array_equal(chi, want_chi)


@pytest.mark.parametrize("k", [1, 2, 5, 18, 24])
def test_cholesky_and_inverse_diagonal_in_registers_equal_the_loops(k):
    """The left-looking kernels (each entry's sums in registers) against the right-looking loops:
    the same factors, the same failures (indefinite, NaN, zero pivot), the same inverse
    diagonals, bit for bit; and lane counts they do not take go to the loops."""
    rng = np.random.default_rng(k)
    rel = 16 * float(np.finfo(np.float32).eps)
    for nl in (64, 128, 32):
        m = rng.normal(size=(nl, k, k + 2))
        a = m @ m.transpose(0, 2, 1)
        a[1] = np.eye(k)
        a[2, 0, 0] = -1.0  # indefinite
        a[3, k // 2, k // 2] = np.nan
        a[4, k - 1, k - 1] = 0.0  # a zero pivot
        a[5] *= 1e-200
        a = np.ascontiguousarray(a.transpose(1, 2, 0))
        want_low, got_low = np.zeros((k, k, nl)), np.zeros((k, k, nl))
        want_bad, got_bad = np.zeros(nl, bool), np.zeros(nl, bool)
        spd_cpu._cholesky_lanes(a, want_low, want_bad, rel, nl)
        spd_cpu._cholesky(a, got_low, got_bad, rel, nl)
        lower = np.tril(np.ones((k, k), bool))
        np.testing.assert_array_equal(got_low[lower].view(np.int64), want_low[lower].view(np.int64))
        np.testing.assert_array_equal(got_bad, want_bad)
        assert want_bad[2] and want_bad[3] and not want_bad[1] and not want_bad[0]
        want_diag, got_diag = np.zeros((k, nl)), np.zeros((k, nl))
        spd_cpu._inverse_diagonal_lanes(want_low, np.zeros((k, k, nl)), want_diag, nl)
        spd_cpu._inverse_diag(want_low, np.zeros((k, k, nl)), got_diag, nl)
        np.testing.assert_array_equal(got_diag.view(np.int64), want_diag.view(np.int64))
        good = ~want_bad
        np.testing.assert_allclose(want_diag[:, good].T, np.diagonal(np.linalg.inv(a.transpose(2, 0, 1)[good]), 0, 1, 2),
                                   rtol=1e-9)
