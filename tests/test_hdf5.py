"""XRF-Maps HDF5: fly-scan reading, v10 writing (layout, atomicity), v10/v9 reading, bad input."""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest
from conftest import REPO, damaged_copy, read_or_clear_error, require_shared
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mapstorch.io.dataset import DataFileError, Dataset
from mapstorch.io.hdf5 import (
    flyscan_mda_path,
    read_flyscan,
    read_xrfmaps_h5,
    read_xrfmaps_h5_detectors,
    read_xrfmaps_results,
    write_xrfmaps_h5,
)
from mapstorch.io.mda import read_mda_scalers


def synthetic(rows=5, cols=4, dets=2, chans=64, seed=0) -> Dataset:
    rng = np.random.default_rng(seed)
    spectra = rng.poisson(4.0, (rows, cols, dets, chans)).astype(np.float32)
    live = rng.uniform(0.9, 1.0, (rows, cols, dets))
    return Dataset(
        path="synthetic", format="npy", rows=rows, cols=cols, detectors=dets, channels=chans,
        calibration=np.array([[0.01 * d, 0.02, 1e-7] for d in range(dets)]), spectra=spectra,
        live_time=live, real_time=live + 0.05, input_counts=live * 1000, output_counts=live * 990,
        scalers={"2xfm:scaler3_cts1.B": rng.uniform(1e4, 2e4, (rows, cols)), "S:SRcurrentAI": np.full((rows, cols), 102.0)},
        scaler_units={"S:SRcurrentAI": "mA"}, scaler_roles={"US_IC": "2xfm:scaler3_cts1.B", "SR_current": "S:SRcurrentAI"},
        x_axis=np.linspace(-1.5, -1.0, cols), y_axis=np.linspace(3.25, 3.75, rows),
        provenance={"scan_name": "2xfm:scan2", "time_stamp": "OCT 28, 2015 18:18:43"},
    )


def test_flyscan_with_mda_scalers():
    h5 = require_shared("xrfmaps-2ide", "flyXRF.h5", "2xfm_0011_2xfm3__0.h5")
    mda = flyscan_mda_path(h5)
    assert mda is not None and mda.name == "2xfm_0011.mda"
    ds = read_flyscan(h5, scalers=read_mda_scalers(mda), calibration=(-0.0042, 0.00952, 0.0))
    assert ds.shape == (11, 9, 4, 2048)
    with h5py.File(h5, "r") as f:
        raw = [f[f"MAPS_RAW/data_{c}"][()].astype(np.float64) for c in "abcd"]
        real, icr, ocr = (f[f"MAPS_RAW/{k}"][()].astype(np.float64) for k in ("realtime", "inputcounts", "ouputcounts"))
    assert np.array_equal(ds.total_counts(), [r.sum() for r in raw])
    assert ds.integrated("sum").sum() == sum(r.sum() for r in raw)
    # XRF-Maps' live time: real x OCR / ICR (the file's livetime column is not used)
    assert np.allclose(ds.live_time, np.transpose(real * ocr / icr, (1, 2, 0)))
    assert ds.scalers and all(v.shape == (11, 9) for v in ds.scalers.values())
    assert any("11 x 11" in n for n in ds.notes)
    # lazy: a block of rows equals the same rows of the raw arrays
    block = ds.read(slice(3, 5), detectors=[2])
    assert np.array_equal(block[:, :, 0], np.transpose(raw[2][:, 3:5, :], (1, 2, 0)))
    ds.close()


def test_round_trip_through_v10(tmp_path):
    ds = synthetic()
    out = write_xrfmaps_h5(tmp_path / "scan.h5", ds, per_detector=True, chunk_rows=2)
    assert [p.name for p in out] == ["scan.h5", "scan.h50", "scan.h51"]
    both = read_xrfmaps_h5_detectors(out[1:])
    assert both.shape == ds.shape and np.array_equal(both.read(), ds.read())
    assert np.allclose(both.calibration, ds.calibration)
    assert np.allclose(both.live_time, ds.live_time, rtol=1e-6) and np.allclose(both.input_counts, ds.input_counts)
    assert np.allclose(both.x_axis, ds.x_axis) and np.allclose(both.y_axis, ds.y_axis)
    summed = read_xrfmaps_h5(out[0])
    assert np.allclose(summed.read()[:, :, 0], ds.read().sum(2))
    # XRF-Maps' average file: spectra summed, times averaged (HDF5_IO::generate_avg) ...
    with h5py.File(out[0], "r") as f:
        assert np.allclose(f["MAPS/Spectra/Elapsed_Livetime"][()], ds.live_time.mean(-1), rtol=1e-6)
    # ... which the reader knows from the element files beside it: the summed spectra's live time
    assert np.allclose(summed.live_time[..., 0], ds.live_time.sum(-1), rtol=1e-6)
    assert any("average file of 2 detector elements" in n for n in summed.notes)
    assert summed.scaler("US_IC").shape == (5, 4) and np.allclose(summed.scaler("SR_current"), 102.0)
    with h5py.File(out[0], "r") as f:
        assert np.allclose(f["MAPS/Spectra/Integrated_Spectra/Spectra"][()], ds.read().sum((0, 1, 2)))
    both.close()
    summed.close()


def test_a_summed_file_without_its_element_files(tmp_path):
    """Ours records how many elements its times average (read back without the element files);
    a file without that record is an average only with its element files beside it, whose mean
    live time is the file's: alone, or beside unrelated files, its live time is read as written."""
    import shutil

    ds = synthetic()
    out = write_xrfmaps_h5(tmp_path / "scan.h5", ds, per_detector=True, chunk_rows=2)
    alone = tmp_path / "alone" / "scan.h5"
    alone.parent.mkdir()
    shutil.copy(out[0], alone)
    with read_xrfmaps_h5(alone) as r:
        assert np.allclose(r.live_time[..., 0], ds.live_time.sum(-1), rtol=1e-6)
        assert any("2 detector elements (as its writer recorded)" in n for n in r.notes)
    with h5py.File(alone, "a") as f:  # as XRF-Maps writes it: no record
        del f["MAPS/Spectra"].attrs["mapstorch_detectors_averaged"]
    with read_xrfmaps_h5(alone) as r:
        assert np.allclose(r.live_time[..., 0], ds.live_time.mean(-1), rtol=1e-6)
        assert not any("average file" in n for n in r.notes)
    shutil.copy(out[1], alone.parent / "scan.h50")  # one element file only: not an average
    with read_xrfmaps_h5(alone) as r:
        assert np.allclose(r.live_time[..., 0], ds.live_time.mean(-1), rtol=1e-6)
    other = write_xrfmaps_h5(tmp_path / "other.h5", synthetic(seed=5), per_detector=True, chunk_rows=2)
    shutil.copy(other[2], alone.parent / "scan.h51")  # live times that do not average to the file's
    with read_xrfmaps_h5(alone) as r:
        assert np.allclose(r.live_time[..., 0], ds.live_time.mean(-1), rtol=1e-6)
    shutil.copy(out[2], alone.parent / "scan.h51")  # its own element files: an average again
    with read_xrfmaps_h5(alone) as r:
        assert np.allclose(r.live_time[..., 0], ds.live_time.sum(-1), rtol=1e-6)
        assert any("scan.h50 .. 1 beside it" in n for n in r.notes)


def test_results_and_override_groups(tmp_path, override_2ide):
    from mapstorch.io.override import read_override

    ds = synthetic(dets=1)
    cps = np.random.default_rng(1).uniform(0, 10, (3, 5, 4))
    res = {"NNLS": {"channel_names": ["Fe", "Ca", "Zn"], "counts_per_sec": cps, "units": ["cts/s"] * 3}}
    ov = read_override(override_2ide)
    (out,) = write_xrfmaps_h5(tmp_path / "r.h5", ds, override=ov, results=res)
    got = read_xrfmaps_results(out)
    assert got["NNLS"]["channel_names"] == ["Fe", "Ca", "Zn"] and np.allclose(got["NNLS"]["counts_per_sec"], cps)
    with h5py.File(out, "r") as f:
        names = [n.decode() for n in f["MAPS/Fit_Parameters_Override/Fit_Parameters_Names"][()]]
        vals = f["MAPS/Fit_Parameters_Override/Fit_Parameters_Values"][()]
        assert vals[names.index("COMPTON_ANGLE")].tolist()[:3] == pytest.approx([87.274598, 70.0, 170.0])
        assert f["MAPS/Spectra/Energy_Calibration"][()] == pytest.approx([-0.0041840752, 0.0095216077, 0.0])
    assert read_xrfmaps_h5(out).incident_energy == pytest.approx(10.0)


def _dump_datasets(path):
    """{dataset path: (dtype, shape)} from one of the layout dumps in shared/docs/formats."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*\[D\] (\S+)\s+shape=\(([^)]*)\) dtype=(\S+)", line)
        if m:
            shape = tuple(int(v) for v in m.group(2).split(",") if v.strip())
            out.setdefault(m.group(1), (m.group(3), shape))
    return out


def test_layout_matches_xrfmaps_v10_dump(tmp_path, override_2ide):
    from mapstorch.io.override import read_override

    dump = _dump_datasets(REPO.parent / "shared" / "docs" / "formats" / "xrfmaps-output-v10-layout.txt")
    if not dump:
        pytest.skip("layout dump not found")
    ds = synthetic(rows=11, cols=11, dets=1, chans=2048)
    res = {"Fitted": {"channel_names": ["Fe"], "counts_per_sec": np.zeros((1, 11, 11))}}
    (out,) = write_xrfmaps_h5(tmp_path / "l.h5", ds, results=res, override=read_override(override_2ide))
    written = {}
    with h5py.File(out, "r") as f:

        def collect(name, obj):
            if isinstance(obj, h5py.Dataset):
                written["/" + name] = (obj.dtype.str, obj.shape)

        f.visititems(collect)  # returns None so that h5py visits everything
        ours = written
    common = [k for k in ours if k in dump]
    assert len(common) >= 25
    for key in common:
        dump_dtype, dump_shape = dump[key]
        our_dtype, our_shape = ours[key]
        assert np.dtype(our_dtype).kind == np.dtype(dump_dtype).kind, key
        assert np.dtype(our_dtype).itemsize == np.dtype(dump_dtype).itemsize, key
        assert len(our_shape) == len(dump_shape), key
        if key.endswith(("mca_arr", "x_axis", "y_axis", "Elapsed_Livetime")):
            assert our_shape == dump_shape, (key, our_shape, dump_shape)
        if key.endswith("Counts_Per_Sec"):  # one plane per fitted channel: only the map size must agree
            assert our_shape[1:] == dump_shape[1:], (key, our_shape, dump_shape)
    # all that the dump has and we do not write: quantification (needs standards) and the
    # routines for which no results were given
    missing = {k for k in dump if k not in ours}
    expected = {k for k in dump if k.startswith(("/MAPS/Quantification/", "/MAPS/XRF_Analyzed/NNLS/",
                                                 "/MAPS/XRF_Analyzed/ROI/", "/MAPS/XRF_Analyzed/SVD/"))}
    assert missing == expected


def _max_channels_as_xrfmaps(spectra: np.ndarray, k: int) -> np.ndarray:
    """XRF-Maps' loop: take the maximum (first index among equals), add it there, zero it; k times."""
    out = np.zeros(spectra.shape[1])
    for spec in spectra.astype(np.float64):
        work = spec.copy()
        for _ in range(k):
            i = int(np.argmax(work))
            out[i] += work[i]
            work[i] = 0.0
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 40), st.integers(0, 6), st.integers(0, 2**31 - 1))
def test_max_channel_sums_match_xrfmaps_loop(n, c, high, seed):
    """The compiled pass (both sums at once, on threads) and the NumPy fallback against
    XRF-Maps' loop, with many ties."""
    from mapstorch.io.max_channels import max_channel_sums, max_channel_sums_numpy

    spectra = np.random.default_rng(seed).integers(0, high + 1, (n, c)).astype(np.float32)  # many ties
    for k in (1, 10):
        assert np.array_equal(max_channel_sums_numpy(spectra, k), _max_channels_as_xrfmaps(spectra, k))
    one, ten = max_channel_sums(spectra, 10, n_threads=2)
    assert np.array_equal(one, _max_channels_as_xrfmaps(spectra, 1))
    assert np.array_equal(ten, _max_channels_as_xrfmaps(spectra, 10))


def test_max_channel_sums_of_many_spectra_on_threads():
    """Spectra shared out to threads in tasks of 2048: the same sums as one pass, as NumPy's."""
    from mapstorch.io.max_channels import max_channel_sums, max_channel_sums_numpy

    spectra = np.random.default_rng(3).poisson(2.0, (5000, 64)).astype(np.float32)
    one, ten = max_channel_sums(spectra, 10, n_threads=2)
    assert np.array_equal(one, max_channel_sums_numpy(spectra, 1))
    assert np.array_equal(ten, max_channel_sums_numpy(spectra, 10))
    assert one.sum() == spectra.max(1).sum()
    # channel-major storage (the transpose of [C, rows, cols], as XRF-Maps files hold spectra)
    cm = np.ascontiguousarray(spectra.reshape(50, 100, 64).transpose(2, 0, 1)).transpose(1, 2, 0)
    assert not cm.flags.c_contiguous
    one_cm, ten_cm = max_channel_sums(cm, 10, n_threads=2)
    assert np.array_equal(one_cm, one) and np.array_equal(ten_cm, ten)


def test_max_channel_sums_same_bits_on_any_thread_count():
    """Spectra whose float64 sums round: each task's sums added in task order, so the thread
    count does not change a bit."""
    from mapstorch.io.max_channels import max_channel_sums

    rng = np.random.default_rng(8)  # a wide range of magnitudes: float64 sums of them round
    spectra = np.exp(rng.normal(0.0, 12.0, (9000, 48))).astype(np.float32)
    want = max_channel_sums(spectra, 10, n_threads=1)
    for threads in (2, 3, 5):
        got = max_channel_sums(spectra, 10, n_threads=threads)
        assert all(np.array_equal(g.view(np.uint64), w.view(np.uint64)) for g, w in zip(got, want)), threads


def test_written_max_channel_spectra(tmp_path):
    ds = synthetic(rows=4, cols=3, dets=2, chans=50)
    out = write_xrfmaps_h5(tmp_path / "m.h5", ds, per_detector=True, chunk_rows=1)
    full = ds.read()
    for i, path in enumerate(out):
        part = full.sum(2) if i == 0 else full[:, :, i - 1]
        with h5py.File(path, "r") as f:
            got1 = f["MAPS/Spectra/Integrated_Spectra/Max_Channels_Integrated_Spectra"][()]
            got10 = f["MAPS/Spectra/Integrated_Spectra/Max_10_Channels_Integrated_Spectra"][()]
        assert np.allclose(got1, _max_channels_as_xrfmaps(part.reshape(-1, 50), 1))
        assert np.allclose(got10, _max_channels_as_xrfmaps(part.reshape(-1, 50), 10))


def test_scan_metadata_amplifiers_and_extra_pvs(tmp_path, override_2ide):
    from mapstorch.io.override import read_override

    ov = read_override(override_2ide)  # US_AMP_SENS_NUM 5 (= 50), UNIT 1 (= nA/V); DS 1 (= 2) nA/V
    ov_text = override_2ide.read_text() + "THETA_PV: 2xfm:m58.VAL\n"
    (tmp_path / "o.txt").write_text(ov_text)
    ov = read_override(tmp_path / "o.txt")
    ds = synthetic(dets=1)
    ds.extra_pvs = {"2xfm:m58.VAL": {"value": 12.5, "unit": "deg", "description": "theta"},
                    "2xfm:userStringCalc10.AA": {"value": "sample A", "unit": "", "description": ""},
                    "array": {"value": np.array([1.0, 2.5]), "unit": "", "description": ""}}
    (out,) = write_xrfmaps_h5(tmp_path / "s.h5", ds, override=ov)
    with h5py.File(out, "r") as f:
        assert f["MAPS/version"][()].tolist() == [10.0]
        assert f["MAPS/Scan/theta"][()].tolist() == [12.5]
        assert f["MAPS/Scan/scan_type"][()].tolist() == [b"XRF_MAPS"]
        assert f["MAPS/Scalers/us_amp"][()].tolist() == [5.0, 1.0, 50.0]
        assert f["MAPS/Scalers/us_amp_num"][()].tolist() == [50.0]
        assert f["MAPS/Scalers/us_amp_unit"][()].tolist() == [b"nA/V"]
        assert f["MAPS/Scalers/ds_amp"][()].tolist() == [1.0, 1.0, 2.0]
    back = read_xrfmaps_h5(out)
    assert back.extra_pvs["2xfm:m58.VAL"] == {"value": "12.5", "unit": "deg", "description": "theta"}
    assert back.extra_pvs["2xfm:userStringCalc10.AA"]["value"] == "sample A"
    assert back.extra_pvs["array"]["value"] == "1,2.5"
    assert back.provenance["scan_name"] == "2xfm:scan2"
    back.close()


def test_v9_layout_reads(tmp_path):
    rng = np.random.default_rng(2)
    mca = rng.poisson(3.0, (128, 3, 4)).astype(np.float32)
    p = tmp_path / "v9.h50"
    with h5py.File(p, "w") as f:
        f["MAPS/mca_arr"] = mca
        f["MAPS/energy_calib"] = np.array([-0.004, 0.0095, 0.0], np.float32)
        f["MAPS/scaler_names"] = np.array([b"US_IC", b"ELT1", b"ERT1"], dtype="|S256")
        f["MAPS/scaler_units"] = np.array([b"", b"seconds", b"seconds"], dtype="|S256")
        f["MAPS/scalers"] = np.stack([np.full((3, 4), 5.0), np.full((3, 4), 0.9), np.full((3, 4), 1.0)]).astype(np.float32)
        f["MAPS/x_axis"] = np.tile(np.arange(4, dtype=np.float32), (3, 1))
        f["MAPS/y_axis"] = np.tile(np.arange(3, dtype=np.float32)[:, None], (1, 4))
        f["MAPS/version"] = np.array([9.0], np.float32)
    ds = read_xrfmaps_h5(p)
    assert ds.format == "xrfmaps-hdf5-v9" and ds.shape == (3, 4, 1, 128)
    assert np.array_equal(ds.read()[:, :, 0], np.transpose(mca, (1, 2, 0)))
    assert ds.calibration[0] == pytest.approx([-0.004, 0.0095, 0.0])
    assert np.allclose(ds.live_time, 0.9) and ds.scaler("US_IC")[0, 0] == 5.0
    ds.close()


def test_interrupted_write_leaves_nothing(tmp_path):
    ds = synthetic(rows=6)
    calls = {"n": 0}
    original = ds.read

    def failing(rows=None, detectors=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk pulled out")
        return original(rows, detectors)

    ds.read = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        write_xrfmaps_h5(tmp_path / "out.h5", ds, per_detector=True, chunk_rows=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make,match", [
    (lambda p: p.write_text("not hdf5\n"), "cannot be opened as HDF5"),
    (lambda p: h5py.File(p, "w").close(), "neither /MAPS/Spectra/mca_arr"),
])
def test_bad_files(tmp_path, make, match):
    p = tmp_path / "bad.h5"
    make(p)
    with pytest.raises(DataFileError, match=match):
        read_xrfmaps_h5(p)


def test_missing_dataset_is_named(tmp_path):
    p = tmp_path / "f.h5"
    with h5py.File(p, "w") as f:
        f.create_group("MAPS_RAW")
    with pytest.raises(DataFileError, match="data_a..data_d"):
        read_flyscan(p)
    with h5py.File(p, "w") as f:
        f["MAPS/XRF_Analyzed/NNLS/Counts_Per_Sec"] = np.zeros((1, 2, 2))
    with pytest.raises(DataFileError, match="MAPS/XRF_Analyzed/NNLS/Channel_Names is missing"):
        read_xrfmaps_results(p)


def test_truncated_and_negative(tmp_path):
    (out,) = write_xrfmaps_h5(tmp_path / "t.h5", synthetic(dets=1), compression=None)
    data = out.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError):
        ds = read_xrfmaps_h5(cut)
        ds.read()
    neg = synthetic(dets=1)
    neg.spectra[2, 1, 0, 5] = -3
    (out2,) = write_xrfmaps_h5(tmp_path / "n.h5", neg)
    with pytest.raises(DataFileError, match=r"-3.0 at .*\(2, 1, 0, 5\)"):
        read_xrfmaps_h5(out2).read()


def test_writer_errors(tmp_path):
    with pytest.raises(DataFileError, match="does not exist"):
        write_xrfmaps_h5(tmp_path / "no" / "x.h5", synthetic())
    with pytest.raises(DataFileError, match="is a folder"):
        write_xrfmaps_h5(tmp_path, synthetic())


@pytest.fixture(scope="module")
def small_h5(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    (out,) = write_xrfmaps_h5(d / "small.h5", synthetic(rows=3, cols=3, dets=1, chans=32), compression=None)
    return out.read_bytes()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_only_data_file_errors(small_h5, tmp_path, data):
    p = damaged_copy(data, small_h5, tmp_path / "fuzz.h5", hot=8192)
    read_or_clear_error(p, read_xrfmaps_h5, read_xrfmaps_results)


def test_per_detector_files_that_do_not_match(tmp_path):
    (a,) = write_xrfmaps_h5(tmp_path / "a.h5", synthetic(rows=5, cols=4, dets=1, chans=64))
    (b,) = write_xrfmaps_h5(tmp_path / "b.h5", synthetic(rows=5, cols=3, dets=1, chans=64))
    with pytest.raises(DataFileError, match=r"do not match .*a.h5: 5x4x64, b.h5: 5x3x64"):
        read_xrfmaps_h5_detectors([a, b])
    with pytest.raises(DataFileError, match="no files given"):
        read_xrfmaps_h5_detectors([])


@pytest.mark.parametrize("damage", ["datatype", "group", "raw-dataset"])
def test_an_object_of_the_wrong_kind_is_a_clear_error(tmp_path, damage):
    """Where a dataset is expected and the file holds a group or a named datatype (or a dataset
    where a group belongs), the error names the path and what is there (hypothesis found a fly
    scan whose data_a had become a named datatype: an AttributeError from deep inside)."""
    p = tmp_path / "2xfm_0099_2xfm3__0.h5"
    with h5py.File(p, "w") as f:
        if damage == "raw-dataset":
            f["MAPS_RAW"] = np.zeros(3)
        else:
            raw = f.create_group("MAPS_RAW")
            raw["data_b"] = np.zeros((16, 2, 3), np.int16)
            if damage == "datatype":
                raw["data_a"] = np.dtype("f4")  # a committed (named) datatype
            else:
                raw.create_group("data_a")
    with pytest.raises(DataFileError, match=r"MAPS_RAW(/data_a)? is an HDF5 (datatype|group|dataset), not a "):
        read_flyscan(p)
