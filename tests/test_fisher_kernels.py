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
