"""EPICS MDA reader on the real 2-ID-E files, aborted and damaged copies, and fuzzing."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import damaged_copy, read_or_clear_error, require_shared
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mapstorch.io.dataset import DataFileError
from mapstorch.io.mda import read_mda, read_mda_dataset, read_mda_scalers
from mapstorch.io.override import read_override


@pytest.fixture(scope="module")
def map_path():
    return require_shared("xrfmaps-2ide", "mda", "2xfm_0010.mda")


def test_2xfm_0010_map(map_path, override_2ide):
    ov = read_override(override_2ide)
    ds = read_mda_dataset(map_path, roles=ov.scaler_pvs)
    assert ds.shape == (11, 11, 4, 2000)
    raw = read_mda(map_path)
    # summed counts equal the sum of the raw detector arrays of every pixel
    raw_sum = sum(float(mca.detectors[d].data.sum(dtype=np.float64))
                  for row in raw.scan.sub_scans for mca in row.sub_scans for d in range(4))
    assert ds.integrated("sum").sum() == pytest.approx(raw_sum, rel=1e-12)
    assert ds.integrated(0).sum() == pytest.approx(107119.0)  # XRF-Maps' integrated spectrum of mca1
    assert ds.calibration[0] == pytest.approx([0.05, 0.0094, 0.0])  # the MCA record's own calibration
    assert ds.scaler_roles["US_IC"] == "2xfm:scaler3_cts1.B" and ds.scaler_roles["SR_current"] == "S:SRcurrentAI"
    assert ds.scaler("US_IC").shape == (11, 11) and ds.scaler("DS_IC").max() > 0
    lo, hi = ds.live_time_range()
    assert 0.49 < lo <= hi < 0.51  # 0.5 s per pixel, live = real x OCR / ICR as XRF-Maps
    assert ds.real_time.shape == (11, 11, 4) and ds.input_counts.mean() > 500
    assert ds.x_axis.shape == (11,) and ds.y_axis.shape == (11,) and ds.axis_names == ("2xfm:m200.VAL", "2xfm:m13.VAL")
    assert ds.provenance["scan_number"] == 10 and ds.incident_energy is None and ds.notes == []


def test_axo_standard_and_fly_scan_scalers():
    axo = read_mda_dataset(require_shared("xrfmaps-2ide", "mda", "axo_std.mda"))
    assert axo.shape == (11, 11, 4, 2000)
    lo, hi = axo.live_time_range()
    assert 0.95 < lo <= hi < 1.01  # 1.0 s per pixel
    fly = read_mda_scalers(require_shared("xrfmaps-2ide", "mda", "2xfm_0011.mda"))
    assert (fly.rows, fly.cols) == (11, 11) and len(fly.scalers) > 10
    assert all(v.shape == (11, 11) for v in fly.scalers.values())
    with pytest.raises(DataFileError, match="holds no spectra|no detectors|missing"):
        read_mda_dataset(require_shared("xrfmaps-2ide", "mda", "2xfm_0011.mda"))


@pytest.mark.parametrize("fraction", [0.15, 0.5, 0.93])
def test_truncated_scan_loads_the_rows_that_exist(map_path, tmp_path, fraction):
    data = map_path.read_bytes()
    cut = tmp_path / "cut.mda"
    cut.write_bytes(data[: int(len(data) * fraction)])
    ds = read_mda_dataset(cut)
    assert 1 <= ds.rows < 11
    assert any("unreadable" in n or "left out" in n for n in ds.notes)
    full = read_mda_dataset(map_path)
    assert np.array_equal(ds.read(), full.read(slice(0, ds.rows))[:, : ds.cols])


def test_aborted_scan_header(map_path, tmp_path):
    """An aborted map: the outer scan's 'current point' says 7 of 11 rows."""
    data = bytearray(map_path.read_bytes())
    raw = read_mda(map_path)
    off = raw.scan.offset + 8  # rank (4 bytes), requested points (4), then the current point
    data[off:off + 4] = (7).to_bytes(4, "big")
    p = tmp_path / "aborted.mda"
    p.write_bytes(bytes(data))
    ds = read_mda_dataset(p)
    assert ds.rows == 7 and any("7 of 11 rows" in n for n in ds.notes)


@pytest.mark.parametrize("content", [b"", b"hello world, not an mda file\n", b"\x00" * 64])
def test_not_mda(tmp_path, content):
    p = tmp_path / "x.mda"
    p.write_bytes(content)
    with pytest.raises(DataFileError, match="x.mda"):
        read_mda(p)


def test_missing_file(tmp_path):
    with pytest.raises(DataFileError, match="not found"):
        read_mda_dataset(tmp_path / "none.mda")


@pytest.fixture(scope="module")
def small_mda(tmp_path_factory):
    """A small copy (the scalers-only fly-scan MDA, 112 kB) for fuzzing."""
    return require_shared("xrfmaps-2ide", "mda", "2xfm_0011.mda").read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_only_data_file_errors(small_mda, tmp_path, data):
    p = damaged_copy(data, small_mda, tmp_path / "fuzz.mda", hot=4096)
    read_or_clear_error(p, read_mda, read_mda_scalers, read_mda_dataset)


def test_encoder_reproduces_the_real_map(map_path, tmp_path):
    """The test encoder writes what the reader reads: a re-encoded 2xfm_0010 gives the same data."""
    from mda_writer import write_mda

    raw = read_mda(map_path)
    write_mda(tmp_path / "copy.mda", raw.scan, raw.dimensions, raw.extra_pvs, raw.scan_number)
    a, b = read_mda_dataset(map_path), read_mda_dataset(tmp_path / "copy.mda")
    assert np.array_equal(a.read(), b.read()) and np.array_equal(a.calibration, b.calibration)
    assert np.allclose(a.live_time, b.live_time) and a.scalers.keys() == b.scalers.keys()


def test_rank_2_line_and_rank_1_spectrum(map_path, tmp_path):
    """A line of spectra (rank 2) and a single acquisition (rank 1), cut from the real map."""
    from dataclasses import replace

    from mda_writer import write_mda

    raw = read_mda(map_path)
    full = read_mda_dataset(map_path)
    row = raw.scan.sub_scans[3]  # the fourth row as a rank-2 line scan
    write_mda(tmp_path / "line.mda", row, raw.dimensions[1:], raw.extra_pvs)
    line = read_mda_dataset(tmp_path / "line.mda")
    assert line.shape == (1, 11, 4, 2000)
    assert np.array_equal(line.read()[0], full.read()[3])
    assert np.allclose(line.live_time[0], full.live_time[3]) and np.allclose(line.x_axis, full.x_axis)
    assert line.notes == [] and line.calibration[0] == pytest.approx([0.05, 0.0094, 0.0])

    aborted = replace(row, last_point=7)
    write_mda(tmp_path / "aborted_line.mda", aborted, raw.dimensions[1:], raw.extra_pvs)
    part = read_mda_dataset(tmp_path / "aborted_line.mda")
    assert part.shape == (1, 7, 4, 2000) and any("7 of 11" in n for n in part.notes)

    mca = row.sub_scans[5]  # one pixel's MCA scan as a rank-1 file
    write_mda(tmp_path / "one.mda", mca, raw.dimensions[2:], raw.extra_pvs)
    one = read_mda_dataset(tmp_path / "one.mda")
    assert one.shape == (1, 1, 4, 2000) and np.array_equal(one.read()[0, 0], full.read()[3, 5])
    eltm = [raw.extra_pvs[f"dxpXMAP2xfm3:mca{d}.ELTM"]["value"] for d in range(1, 5)]
    assert one.live_time[0, 0] == pytest.approx(eltm) and one.real_time is not None
    assert one.calibration[0] == pytest.approx([0.05, 0.0094, 0.0])


def test_pixels_with_different_detectors_are_refused(map_path, tmp_path):
    from dataclasses import replace

    from mda_writer import write_mda

    raw = read_mda(map_path)
    row = raw.scan.sub_scans[0]
    odd = replace(row.sub_scans[4], detectors=row.sub_scans[4].detectors[:3])  # one element missing
    broken = replace(raw.scan, sub_scans=[replace(row, sub_scans=row.sub_scans[:4] + [odd] + row.sub_scans[5:])]
                     + raw.scan.sub_scans[1:])
    write_mda(tmp_path / "odd.mda", broken, raw.dimensions, raw.extra_pvs)
    with pytest.raises(DataFileError, match=r"pixel \(0, 4\) has 3 detectors x 2000 channels.*do not match"):
        read_mda_dataset(tmp_path / "odd.mda")
