"""The Fisher information's channel-quad kernel (mapstorch.maps.spd_cpu._add_quad): its explicit
vector code equals the plain loop bit for bit, whole vectors and the lanes after them."""

from __future__ import annotations

import numpy as np
import pytest

spd_cpu = pytest.importorskip("mapstorch.maps.spd_cpu")


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
