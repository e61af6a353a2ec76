"""The nnls map fit in one pass per group of pixels (mapstorch.maps.nnls_fused_cpu) against the
step-by-step path (SNIP of the whole chunk, NNLS, chi-square and errors, each over the chunk):
the same maps to the solver's tolerance, the same ROI counts, the same bits on any thread count."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import mapstorch.maps.fit as fit_module
from mapstorch.errors import InputError
from mapstorch.maps import fit_map, nnls_fused_cpu
from mapstorch.synthetic import map_dataset, simulate_map

pytest.importorskip("numba")


def _chunk_args(rows=4, cols=200, dtype=torch.float32):
    """The arguments ``fit_map`` gives ``_fit_chunk`` for a whole synthetic map (one chunk)."""
    sim = simulate_map(rows=rows, cols=cols, seed=5)
    seen = []
    real = fit_module._fit_chunk

    def record(*args, **kwargs):
        seen.append((args, kwargs))
        return real(*args, **kwargs)

    fit_module._fit_chunk = record
    try:
        fit_map(map_dataset(sim), sim.params, method="nnls", chunk_rows=rows, dtype=dtype)
    finally:
        fit_module._fit_chunk = real
    (args, kwargs), = seen
    return list(args), kwargs


def _both(args, kwargs, monkeypatch):
    monkeypatch.setattr(fit_module, "_fused_usable", lambda *a: False)
    steps = fit_module._fit_chunk(*args, **kwargs)
    monkeypatch.undo()
    assert fit_module._fused_usable(args[0], args[1])
    return fit_module._fit_chunk(*args, **kwargs), steps


def _assert_close(fused, steps, rtol):
    assert set(fused) == set(steps)
    np.testing.assert_array_equal(fused["status"], steps["status"])
    np.testing.assert_array_equal(fused["roi"], steps["roi"])
    np.testing.assert_array_equal(fused["total_counts"], steps["total_counts"])
    ok = steps["status"] == 0
    for key in ("counts", "amplitudes"):  # the solver stops within its tolerance of the optimum
        scale = np.abs(steps[key][:, ok]).max(1, keepdims=True)
        np.testing.assert_allclose(fused[key][:, ok], steps[key][:, ok], rtol=0, atol=1e-4 * float(scale.max()))
    np.testing.assert_allclose(fused["rchi2"][ok], steps["rchi2"][ok], rtol=rtol)
    for key in ("stderr", "amplitudes_stderr"):
        both = np.isfinite(steps[key]) & np.isfinite(fused[key])
        assert (np.isfinite(steps[key]) == np.isfinite(fused[key])).mean() > 0.99
        np.testing.assert_allclose(fused[key][both], steps[key][both], rtol=rtol)
    for key in ("integrated_fit", "integrated_background"):
        np.testing.assert_allclose(fused[key], steps[key], rtol=1e-4, atol=1e-6 * float(np.abs(steps[key]).max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["pixel-major", "channel-major"])
def test_fused_equals_step_by_step(monkeypatch, dtype, layout):
    # 4 x 200 pixels: a group of 512 and a part group; one damaged pixel (NaN) and an empty one
    args, kwargs = _chunk_args(dtype=dtype)
    y = args[0].clone()
    y[7, 500] = float("nan")
    y[9] = 0.0
    if layout == "channel-major":
        y = y.T.contiguous().T
    args[0] = y
    fused, steps = _both(args, kwargs, monkeypatch)
    assert fused["status"][7] == 2 and steps["status"][7] == 2  # non-finite: reported, 0 in the maps
    assert fused["counts"][:, 7].tolist() == [0.0] * fused["counts"].shape[0]
    assert (fused["counts"][:, 9] == 0).all() and (fused["status"] != 2).sum() == y.shape[0] - 1
    _assert_close(fused, steps, rtol=1e-3 if dtype == torch.float32 else 1e-6)


def test_fused_same_bits_on_any_thread_count_and_group_size(monkeypatch):
    args, kwargs = _chunk_args(rows=5, cols=220)
    runs = []
    for threads, group in ((1, 512), (2, 512), (2, 128)):
        monkeypatch.setattr(nnls_fused_cpu, "GROUP", group)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            runs.append(fit_module._fit_chunk(*args, **kwargs))
        finally:
            torch.set_num_threads(before)
    for other in runs[1:]:
        for key, value in runs[0].items():
            if key == "integrated_background" or key == "integrated_fit":  # per-group float64 sums
                np.testing.assert_allclose(other[key], value, rtol=1e-12)
            else:
                np.testing.assert_array_equal(other[key], value, err_msg=key)


def test_fused_collinear_columns_get_the_pseudo_inverse_errors(monkeypatch):
    """Two identical design columns: no pixel's information is positive definite where both are
    in use; the errors there come from the pseudo-inverse, as on the step-by-step path."""
    args, kwargs = _chunk_args(rows=2, cols=64)
    design = args[1]
    args[1] = torch.cat([design, design[:, -1:]], 1)
    args[2] = torch.cat([args[2], args[2][-1:]])
    fused, steps = _both(args, kwargs, monkeypatch)
    seen = []
    real = nnls_fused_cpu.fit_nnls_cpu
    monkeypatch.setattr(nnls_fused_cpu, "fit_nnls_cpu", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    fit_module._fit_chunk(*args, **kwargs)
    assert seen[0]["failed"] and not seen[0]["ok"].all()
    _assert_close(fused, steps, rtol=1e-3)


def test_a_failing_fused_pass_falls_back_to_the_steps_once(monkeypatch, caplog):
    args, kwargs = _chunk_args(rows=2, cols=64)
    monkeypatch.setattr(fit_module, "_fused_usable", lambda *a: False)
    want = fit_module._fit_chunk(*args, **kwargs)
    monkeypatch.undo()
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("numba could not compile this here")

    monkeypatch.setattr(nnls_fused_cpu, "fit_nnls_cpu", broken)
    monkeypatch.setattr(fit_module, "_fused_failure", None)
    with caplog.at_level("WARNING", logger="mapstorch.maps.fit"):
        got = fit_module._fit_chunk(*args, **kwargs)
        again = fit_module._fit_chunk(*args, **kwargs)
    assert calls == [1]  # not tried again
    assert sum("compiled nnls pass failed" in r.message for r in caplog.records) == 1
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
        np.testing.assert_array_equal(again[key], want[key])


def test_tables_are_built_once_per_map(monkeypatch):
    sim = simulate_map(rows=6, cols=40, seed=2)
    built = []
    real = nnls_fused_cpu.NnlsTables

    def counting(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(nnls_fused_cpu, "NnlsTables", counting)
    monkeypatch.setattr(fit_module, "_fused_tables", [])
    one = fit_map(map_dataset(sim), sim.params, method="nnls", chunk_rows=2)  # three chunks
    assert len(built) == 1
    two = fit_map(map_dataset(sim), sim.params, method="nnls", chunk_rows=3)  # a new map: its own design
    assert len(built) == 2
    np.testing.assert_array_equal(one.counts, two.counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finish_makes_the_maps_nnls_output_makes(dtype):
    """The fused pass's per-group finishing (``_finish``) against ``fit._nnls_output`` on the same
    amplitudes, errors and chi-squares, bit for bit: NaN and infinite amplitudes, a NaN and an
    overflowing chi-square, unconverged pixels, every column in use (degrees of freedom clamped)."""
    rng = np.random.default_rng(11)
    p, k, n_w = 37, 5, 6
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    a = (rng.random((p, k)) * 50 * (rng.random((p, k)) > 0.3)).astype(np_dtype)
    a[3, 1], a[4, 0], a[5] = np.nan, np.inf, 0.0
    a[6] = 1.0  # all 5 columns used: 6 - 5 = 1 degree of freedom
    se = (rng.random((p, k)) * 3).astype(np_dtype)
    se[7, 2] = np.nan
    chi = rng.random(p) * 1e4
    chi[8], chi[9] = np.nan, 1e300  # the latter is infinite in float32
    done = rng.random(p) > 0.2
    per_unit = (rng.random(k) * 2 + 0.5).astype(np_dtype)
    design = torch.from_numpy(rng.random((n_w, k)).astype(np_dtype))
    y = torch.from_numpy(rng.random((p, 10)).astype(np_dtype))
    want = fit_module._nnls_output(y, design, torch.from_numpy(per_unit), torch.from_numpy(a), torch.from_numpy(se),
                                   torch.from_numpy(chi).to(dtype), torch.zeros(p, dtype=torch.int64),
                                   torch.from_numpy(done), torch.zeros(n_w, dtype=torch.float64), None)
    got = {key: np.full((k, p), -1.0, np.float32) for key in ("amplitudes", "amplitudes_stderr", "counts", "stderr")}
    got.update(rchi2=np.full(p, -1.0, np.float32), status=np.full(p, -1, np.int8))
    a_sum = np.zeros(k)
    for p0, n in ((0, 16), (16, 21)):  # two groups
        nnls_fused_cpu._finish(a, se, chi, done, per_unit, n_w, p0, n, got["amplitudes"], got["amplitudes_stderr"],
                               got["counts"], got["stderr"], got["rchi2"], got["status"], a_sum)
    for key, value in got.items():
        np.testing.assert_array_equal(value.view(np.uint8), np.ascontiguousarray(want[key]).view(np.uint8), err_msg=key)
    assert list(want["status"][[3, 4, 8]]) == [2, 2, 2] and want["status"][6] in (0, 1)
    assert want["status"][9] == (2 if dtype == torch.float32 else 1 - int(done[9]))  # 1e300: finite in float64
    np.testing.assert_allclose(design.double().numpy() @ a_sum, want["integrated_fit"], rtol=1e-12)


def test_start_sums_each_pixel_in_index_order():
    """``_start`` (its loops over the pixels innermost) against plain per-pixel float32 sums in
    index order, bit for bit, NaN and negative starts included."""
    rng = np.random.default_rng(4)
    k, n, p0 = 6, 37, 5
    proj = rng.normal(size=(k, n)).astype(np.float32)
    proj[2, 3] = np.nan
    norms = (rng.random(k) + 0.5).astype(np.float32)
    inverse = rng.normal(size=(k, k)).astype(np.float32)
    b, x = np.full((p0 + n, k), -7, np.float32), np.full((p0 + n, k), -7, np.float32)
    scale = np.full(p0 + n, -7, np.float32)
    nnls_fused_cpu._start(proj, norms, inverse, b, x, scale, p0, n)
    for j in range(n):
        bj = proj[:, j] / norms
        np.testing.assert_array_equal(b[p0 + j], bj)
        acc = np.float32(0)
        for v in bj:
            acc = np.float32(acc + v * v)
        np.testing.assert_array_equal(scale[p0 + j], np.sqrt(acc))
        for c in range(k):
            s = np.float32(0)
            for r in range(k):
                s = np.float32(s + bj[r] * inverse[r, c])
            np.testing.assert_array_equal(x[p0 + j, c], s if not s < 0 else np.float32(0))
    assert (b[:p0] == -7).all() and np.isnan(x[p0 + 3]).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_spectrum_sums_are_float64_sums_in_both_layouts(dtype):
    """Each pixel's total counts, summed in float64 by the pass's threads: the float64 sum
    rounded to float32 (NaN kept), for pixel-major and channel-major spectra; counts too large
    for a float32 running sum (2^24 and up) still come out right."""
    rng = np.random.default_rng(4)
    x = (rng.random((300, 1000)) * 3e4).astype(dtype)  # not integers; totals about 1.5e7
    x[5, 17] = np.nan
    x[6] = 0.0
    x[7] = dtype(2.0 ** 24)  # 1000 x 2^24: every float32 running sum past the first rounds
    want = x.astype(np.float64).sum(1).astype(np.float32)
    got, got_cm = np.empty(300, np.float32), np.empty(300, np.float32)
    for p0 in (0, 128, 256):
        n = min(128, 300 - p0)
        nnls_fused_cpu._spectrum_sums(x, p0, n, got[p0:p0 + n])
        nnls_fused_cpu._spectrum_sums_cm(np.ascontiguousarray(x.T), p0, n, got_cm[p0:p0 + n])
    np.testing.assert_array_equal(got_cm, want)
    np.testing.assert_allclose(got, want, rtol=1e-7)  # (the float64 sums in another order)
    assert np.isnan(got[5]) and got[6] == 0.0 and got[7] == np.float32(1000 * 2.0 ** 24)


def test_mapped_blocks_are_read_by_the_threads_with_the_same_maps(tmp_path, monkeypatch):
    """A pixel-major map in an uncompressed HDF5 file is memory-mapped a chunk at a time; the
    fused pass's threads read each group's spectra from the file themselves (pread) instead of
    touching the mapping: the maps are those of the same spectra in memory, bit for bit."""
    import h5py

    from mapstorch.io import Dataset
    from mapstorch.io.h5chunks import read_block

    sim = simulate_map(rows=6, cols=200, seed=3)
    mem = map_dataset(sim)
    path = tmp_path / "map.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("spectra", data=sim.counts.astype(np.float32))  # [rows, cols, C], contiguous
    reads = []
    real = nnls_fused_cpu._read_rows
    monkeypatch.setattr(nnls_fused_cpu, "_read_rows", lambda *a: reads.append(a[1]) or real(*a))
    with h5py.File(path, "r") as f:
        d = f["spectra"]
        disk = Dataset(path=str(path), format="hdf5-test", rows=6, cols=200, detectors=1, channels=d.shape[2],
                       calibration=mem.calibration, read_block=lambda a, b, dets: read_block(
                           d, (slice(a, b), slice(None), slice(None)))[:, :, None, :], live_time=mem.live_time)
        assert disk.read(slice(0, 3)).flags.writeable is False  # mapped (3 rows: 4.9 MB)
        got = fit_map(disk, sim.params, method="nnls", chunk_rows=3)
    want = fit_map(mem, sim.params, method="nnls", chunk_rows=3)
    assert len(reads) == 2 * 5  # two chunks of 600 pixels, each in groups of 128, 128, 128, 128 and 88
    for key in ("counts", "counts_stderr", "reduced_chi2", "iterations", "status", "total_counts", "fitted_integrated",
                "background_integrated", "roi_counts"):
        np.testing.assert_array_equal(getattr(got, key), getattr(want, key), err_msg=key)


def test_a_file_cut_while_its_block_is_read_is_a_clear_error(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(np.arange(100, dtype=np.float32).tobytes())
    out = np.empty((4, 10), np.float32)
    fd = os.open(path, os.O_RDONLY)
    try:
        nnls_fused_cpu._read_rows(fd, 0, out[:2], str(path))
        np.testing.assert_array_equal(out[:2].ravel(), np.arange(20))
        with pytest.raises(InputError, match="ends at byte 400, short of the 40 bytes"):  # 120 of 160 there
            nnls_fused_cpu._read_rows(fd, 280, out, str(path))
    finally:
        os.close(fd)


def test_a_mapped_file_moved_away_is_read_through_its_mapping(tmp_path, monkeypatch):
    """Where the mapped file can no longer be opened by name (moved or removed after it was
    mapped, which Linux allows), the threads read the spectra in memory instead: the fused pass
    still runs, with the same maps."""
    from mapstorch.io import h5chunks

    args, kwargs = _chunk_args(rows=2, cols=100)
    want = fit_module._fit_chunk(*args, **kwargs)
    monkeypatch.setattr(fit_module, "_fused_failure", None)  # (restored after the test)
    monkeypatch.setattr(h5chunks, "file_bytes", lambda array: (str(tmp_path / "gone.h5"), 0))
    got = fit_module._fit_chunk(*args, **kwargs)
    assert fit_module._fused_failure is None  # not given up for the step-by-step path
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
