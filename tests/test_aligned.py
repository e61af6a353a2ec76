"""Arrays on cache lines (mapstorch.aligned, mapstorch.simd.empty_rows) and the compiled paths'
scratch and read buffers that use them: NumPy starts large arrays 16 bytes past a 64-byte
boundary, which split every vector load of the SNIP's sweep across two cache lines."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from mapstorch import aligned
from mapstorch.io import h5chunks


@pytest.mark.parametrize("shape", [(1052, 128), (3,), 7, (0, 5), (2, 3, 4), (18, 512)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int8])
def test_empty_starts_on_a_cache_line(shape, dtype):
    a = aligned.empty(shape, dtype)
    want = shape if isinstance(shape, tuple) else (shape,)
    assert a.shape == want and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
    if a.size:
        assert a.ctypes.data % aligned.VECTOR_BYTES == 0
    a[...] = 3  # every byte its own: no two arrays share memory
    b = aligned.empty(shape, dtype)
    b[...] = 5
    assert (a == 3).all()


def test_empty_rows_inside_compiled_code():
    simd = pytest.importorskip("mapstorch.simd")
    import numba

    @numba.njit
    def make(rows, cols):
        a = simd.empty_rows(rows, cols, np.float32)
        a[:] = 1.5
        return a

    for rows, cols in ((1, 1), (3, 5), (171, 512), (4, 512)):
        a = make(rows, cols)
        assert a.shape == (rows, cols) and a.flags.c_contiguous and (a == 1.5).all()
        assert a.ctypes.data % 64 == 0


def test_snip_scratch_is_aligned():
    snip_cpu = pytest.importorskip("mapstorch.physics.snip_cpu")
    c = np.arange(40)
    steps = snip_cpu.sweep_steps([(np.clip(c - 1, 1, 38), np.clip(c + 1, 1, 38))], 1, 38)
    for dtype in (np.float32, np.float64):
        plan = snip_cpu.SnipPlan(40, 1, 38, steps, dtype)
        for a in plan.scratch():
            assert a.ctypes.data % 64 == 0 and a.dtype == dtype


@pytest.mark.parametrize("layout", ["contiguous", "chunked"])
def test_reads_land_on_cache_lines(tmp_path, monkeypatch, layout):
    """Byte-range reads of contiguous datasets (memory mapping off) and inflated chunks fill an
    aligned array."""
    path = tmp_path / "c.h5"
    data = np.arange(6 * 5 * 70, dtype=np.float32).reshape(6, 5, 70)
    with h5py.File(path, "w") as f:
        if layout == "contiguous":
            f.create_dataset("x", data=data)
        else:
            f.create_dataset("x", data=data, chunks=(1, 1, 70), compression="gzip")
    monkeypatch.setattr(h5chunks, "_MAP_CONTIGUOUS", False)
    monkeypatch.setattr(h5chunks, "_MIN_BYTES", 0)
    monkeypatch.setattr(h5chunks, "_MIN_CHUNK_BYTES", 0)
    decoded = []
    real = h5chunks._decode
    monkeypatch.setattr(h5chunks, "_decode", lambda *a, **k: decoded.append(1) or real(*a, **k))
    with h5py.File(path, "r") as f:
        got = h5chunks.read_block(f["x"], (slice(1, 5), slice(None), slice(None)))
    np.testing.assert_array_equal(got, data[1:5])
    assert got.ctypes.data % 64 == 0  # (a transposed view of the inflated chunks starts where they do)
    assert bool(decoded) == (layout == "chunked")  # the fast paths ran, not h5py's read
