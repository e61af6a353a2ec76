"""GSE MCA text files and NumPy / text arrays."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import damaged_copy, read_or_clear_error, require_shared
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mapstorch.io.arrays import read_array
from mapstorch.io.dataset import DataFileError
from mapstorch.io.mca import read_gse_mca


def simple_parse(path):
    """Header values and the DATA columns, parsed independently of the reader."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("DATA:"))
    head = {line.split(":", 1)[0]: line.split(":", 1)[1].split() for line in lines[:start] if ":" in line}
    data = np.loadtxt(lines[start + 1:], ndmin=2)
    return head, data


@pytest.mark.parametrize(
    "name,elements,energy",
    [("srm1832.mca", 4, 35.0), ("axorf4_21kev_i050.xrf", 4, 20.99969892), ("xrf_spectra.mca", 1, 11.80005313)],
)
def test_gse_files(name, elements, energy):
    path = require_shared("gse-mca", name)
    ds = read_gse_mca(path)
    head, data = simple_parse(path)
    assert ds.shape == (1, 1, elements, 2048)
    assert np.allclose(ds.calibration[:, 0], [float(v) for v in head["CAL_OFFSET"]])
    assert np.allclose(ds.calibration[:, 1], [float(v) for v in head["CAL_SLOPE"]])
    assert np.allclose(ds.live_time.ravel(), [float(v) for v in head["LIVE_TIME"]])
    assert np.allclose(ds.real_time.ravel(), [float(v) for v in head["REAL_TIME"]])
    assert np.array_equal(ds.total_counts(), data.sum(0))
    assert ds.incident_energy == pytest.approx(energy)


def _broken(tmp_path, name, edit):
    text = require_shared("gse-mca", name).read_text().splitlines()
    p = tmp_path / "broken.mca"
    p.write_text("\n".join(edit(text)) + "\n")
    return p


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda t: t[:60], "no DATA"),  # truncated inside the header
        (lambda t: t[:-100], "CHANNELS says 2048"),  # truncated inside DATA
        (lambda t: [l.replace("0 0 0 2", "0 x 0 2") for l in t], "line .*not a row of numbers"),
        (lambda t: ["CAL_SLOPE: 1.4e-02" if l.startswith("CAL_SLOPE") else l for l in t], "line 8: CAL_SLOPE has 1"),
        (lambda t: [l if not l.startswith(" 0 0 0 2") else " 0 0 2" for l in t], "line .*3 columns, expected 4"),
        (lambda t: [l if not l.startswith(" 0 0 0 2") else " 0 0 0 -2" for l in t], "count -2"),
    ],
)
def test_gse_bad_input(tmp_path, edit, match):
    with pytest.raises(DataFileError, match=match):
        read_gse_mca(_broken(tmp_path, "srm1832.mca", edit))


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n\x00\x00", b"hello\n"])
def test_gse_not_mca(tmp_path, content):
    p = tmp_path / "x.mca"
    p.write_bytes(content)
    with pytest.raises(DataFileError):
        read_gse_mca(p)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_gse_fuzz_only_data_file_errors(tmp_path, data):
    raw = require_shared("gse-mca", "xrf_spectra.mca").read_bytes()
    p = damaged_copy(data, raw, tmp_path / "fuzz.mca", hot=2048)
    read_or_clear_error(p, read_gse_mca)


# ----------------------------------------------------------------------------- arrays


@pytest.mark.parametrize("shape,expected", [
    ((100,), (1, 1, 1, 100)), ((3, 100), (1, 1, 3, 100)), ((4, 5, 100), (4, 5, 1, 100)), ((4, 5, 2, 100), (4, 5, 2, 100)),
])
def test_npy_shapes(tmp_path, shape, expected):
    a = np.random.default_rng(1).poisson(3.0, shape).astype(np.int32)
    np.save(tmp_path / "a.npy", a)
    ds = read_array(tmp_path / "a.npy", calibration=(0.1, 0.02, 0.0))
    assert ds.shape == expected and ds.format == "npy"
    assert np.array_equal(ds.read().reshape(a.shape), a)
    assert ds.calibration.tolist() == [[0.1, 0.02, 0.0]] * expected[2]
    moved = np.moveaxis(a, -1, 0)
    np.save(tmp_path / "b.npy", moved)
    assert np.array_equal(read_array(tmp_path / "b.npy", channel_axis=0).read(), ds.read())


def test_text_columns_are_detectors(tmp_path):
    a = np.random.default_rng(2).poisson(3.0, (100, 3))
    np.savetxt(tmp_path / "s.txt", a, fmt="%d")
    ds = read_array(tmp_path / "s.txt")
    assert ds.shape == (1, 1, 3, 100) and ds.format == "text"
    assert np.array_equal(ds.read()[0, 0], a.T)
    np.savetxt(tmp_path / "one.txt", a[:, 0], fmt="%d")
    assert read_array(tmp_path / "one.txt").shape == (1, 1, 1, 100)


def test_memory_mapped_rows_are_read_lazily(tmp_path, monkeypatch):
    import mapstorch.io.arrays as arrays

    monkeypatch.setattr(arrays, "_IN_MEMORY_BYTES", 1000)  # force memory mapping
    a = np.random.default_rng(3).poisson(3.0, (6, 4, 1, 64)).astype(np.float32)
    np.save(tmp_path / "m.npy", a)
    ds = read_array(tmp_path / "m.npy")
    assert ds.spectra is None and ds.read_block is not None
    assert np.array_equal(ds.read(slice(2, 4)), a[2:4])
    bad = a.copy()
    bad[5, 1, 0, 7] = -1
    np.save(tmp_path / "bad.npy", bad)
    lazy = read_array(tmp_path / "bad.npy")
    lazy.read(slice(0, 5))  # rows before the bad one read fine
    with pytest.raises(DataFileError, match=r"\(5, 1, 0, 7\)"):
        lazy.read(slice(4, 6))


@pytest.mark.parametrize("make,match", [
    (lambda p: np.save(p, np.array(["a", "b"])), "spectra must be"),
    (lambda p: np.save(p, np.zeros((2, 3, 4, 5, 6))), "5-D"),
    (lambda p: np.save(p, np.zeros(4)), "only 4 channels"),
    (lambda p: np.save(p, np.full(20, np.nan)), "finite"),
    (lambda p: p.write_bytes(b"\x93NUMPY\x01\x00garbage"), "not a readable .npy"),
    (lambda p: p.write_text("1 2 3\n4 5\n"), "line 2: 2 columns"),
    (lambda p: p.write_text("1 2 a\n"), "line 1"),
    (lambda p: p.write_text(""), "no numbers"),
])
def test_array_errors(tmp_path, make, match):
    p = tmp_path / "x.npy"
    make(p)
    with pytest.raises(DataFileError, match=match):
        read_array(p)


def test_channel_axis_out_of_range(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 50)))
    with pytest.raises(DataFileError, match="channel_axis 5"):
        read_array(tmp_path / "a.npy", channel_axis=5)
