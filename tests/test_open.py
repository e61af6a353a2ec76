"""Opening any file by content, override-file scaler labels, and `mapstorch info` / `convert`."""

from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pytest
from conftest import damaged_copy, read_or_clear_error, require_shared
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mapstorch.cli.main import main
from mapstorch.io.dataset import DataFileError, Dataset
from mapstorch.io.hdf5 import read_xrfmaps_h5, read_xrfmaps_h5_detectors
from mapstorch.io.mda import read_mda, read_mda_scalers
from mapstorch.io.open import detect_format, open_dataset, override_beside
from mapstorch.io.override import read_override
from mapstorch.io.scalers import apply_override_scalers

FLY = ("xrfmaps-2ide", "flyXRF.h5", "2xfm_0011_2xfm3__0.h5")

SHARED_FILES = [
    (("xrfmaps-2ide", "mda", "2xfm_0010.mda"), "mda", (11, 11, 4, 2000)),
    (("xrfmaps-2ide", "mda", "axo_std.mda"), "mda", (11, 11, 4, 2000)),
    (FLY, "flyscan-hdf5", (11, 9, 4, 2048)),
    (("gse-mca", "axorf4_21kev_i050.xrf"), "gse-mca", (1, 1, 4, 2048)),
    (("gse-mca", "srm1832.mca"), "gse-mca", (1, 1, 4, 2048)),
    (("gse-mca", "xrf_spectra.mca"), "gse-mca", (1, 1, 1, 2048)),
]


@pytest.mark.parametrize("parts,fmt,shape", SHARED_FILES, ids=lambda v: v[-1] if isinstance(v, tuple) else None)
def test_every_shared_data_file_opens(parts, fmt, shape, tmp_path):
    path = require_shared(*parts)
    assert detect_format(path) == fmt
    # detection is by content: the same bytes under a misleading name open the same way
    disguised = tmp_path / "renamed.dat"
    shutil.copyfile(path, disguised)
    if fmt == "flyscan-hdf5":  # (its MDA file is found by name, so keep the name for this one)
        disguised = path
    with open_dataset(path) as ds, open_dataset(disguised) as again:
        assert ds.format == fmt and ds.shape == shape
        assert again.shape == shape and np.array_equal(again.read(), ds.read())
        integ = ds.integrated(None)
        assert integ.shape == (shape[2], shape[3]) and np.all(integ >= 0)
        assert np.allclose(ds.total_counts(), integ.sum(1))


def test_the_mda_of_a_fly_scan_opens_its_spectra_as_xrfmaps_finds_them():
    """``<dir>/mda/<scan>.mda`` of a fly scan holds scalers only; like XRF-Maps we take the
    spectra from ``<dir>/flyXRF.h5/<scan>_..._0.h5`` and the scalers from the MDA file."""
    path = require_shared("xrfmaps-2ide", "mda", "2xfm_0011.mda")
    assert detect_format(path) == "mda"
    with open_dataset(path) as ds, open_dataset(require_shared(*FLY)) as fly:
        assert ds.format == "flyscan-hdf5" and ds.shape == fly.shape == (11, 9, 4, 2048)
        assert np.array_equal(ds.read(), fly.read()) and np.array_equal(ds.live_time, fly.live_time)
        assert ds.scalers and set(ds.scalers) == set(fly.scalers)
        assert any("holds no spectra" in n and "flyXRF.h5" in n for n in ds.notes)


def test_the_mda_of_a_fly_scan_without_its_spectra(tmp_path):
    """No fly-scan file where XRF-Maps looks: the error says where we looked; two candidate
    files: the error names them."""
    mda = tmp_path / "mda" / "2xfm_0011.mda"
    mda.parent.mkdir()
    shutil.copyfile(require_shared("xrfmaps-2ide", "mda", "2xfm_0011.mda"), mda)
    with pytest.raises(DataFileError, match=r"holds no spectra.*no fly-scan file .*flyXRF\.h5"):
        open_dataset(mda)
    fly = tmp_path / "flyXRF.h5"
    fly.mkdir()
    for name in ("2xfm_0011_2xfm3__0.h5", "2xfm_0011_other__0.h5", "2xfm_0012_2xfm3__0.h5"):
        shutil.copyfile(require_shared(*FLY), fly / name)
    with pytest.raises(DataFileError, match="2 fly-scan files of this scan"):
        open_dataset(mda)
    (fly / "2xfm_0011_other__0.h5").unlink()
    with open_dataset(mda) as ds:
        assert ds.shape == (11, 9, 4, 2048) and ds.path.endswith("2xfm_0011_2xfm3__0.h5")


def test_live_time_is_xrfmaps_real_time_times_ocr_over_icr():
    """Spectra::recalc_elapsed_livetime: real x OCR / ICR, the real time where a rate is 0;
    the fly scan's own livetime column is not used (it differs by up to 1.6 % here)."""
    from mapstorch.io.dataset import xrfmaps_live_time

    got = xrfmaps_live_time(np.array([1.0, 2.0, 3.0, 4.0]), np.array([100.0, 0.0, 50.0, 80.0]),
                            np.array([80.0, 10.0, 0.0, 80.0]))
    assert got.tolist() == [0.8, 2.0, 3.0, 4.0]
    import h5py

    with open_dataset(require_shared(*FLY)) as ds, h5py.File(require_shared(*FLY), "r") as f:
        raw = {k: np.transpose(f[f"MAPS_RAW/{k}"][()].astype(np.float64), (1, 2, 0)) for k in ("livetime", "realtime", "inputcounts",
                                                                            "ouputcounts")}
    np.testing.assert_allclose(ds.live_time, raw["realtime"] * raw["ouputcounts"] / raw["inputcounts"], rtol=1e-12)
    assert not np.allclose(ds.live_time, raw["livetime"], rtol=1e-3)


def test_override_beside_the_data(tmp_path):
    fly = require_shared(*FLY)
    found = override_beside(fly)  # flyXRF.h5/ sits in the dataset folder that holds the override
    assert found is not None and found.name == "maps_fit_parameters_override.txt"
    with open_dataset(fly, override="auto") as ds:
        assert ds.calibration[0] == pytest.approx([-0.0041840752, 0.0095216077, 0.0])
        assert any("found beside the data" in n for n in ds.notes)
    lone = tmp_path / "a" / "b.npy"
    lone.parent.mkdir()
    np.save(lone, np.ones((3, 16)))
    assert override_beside(lone) is None
    with open_dataset(lone, override="auto") as ds:
        assert "override_file" not in ds.provenance


def test_time_normalized_fly_scan_scalers():
    """XRF-Maps divides the fly-scan counters by (time counter / clock) and labels them."""
    ov = read_override(require_shared("xrfmaps-reference", "override_parameters",
                                      "2ide-maps_fit_parameters_override.txt"))
    raw = read_mda_scalers(require_shared("xrfmaps-2ide", "mda", "2xfm_0011.mda")).scalers
    with open_dataset(require_shared(*FLY), override=ov) as ds:
        seconds = raw["2xfm:mcs:mca1.VAL"][:, :9] / 25e6
        assert np.allclose(ds.scaler("US_IC"), raw["2xfm:mcs:mca2.VAL"][:, :9] / seconds)
        assert np.allclose(ds.scaler("CFG_9"), raw["2xfm:mcs:mca18.VAL"][:, :9] / seconds)
        assert ds.scaler_units["US_IC"] == "cts/s"
        assert 1e5 < float(np.median(ds.scaler("US_IC"))) < 1e6  # a plausible ion-chamber rate


def _dataset_with_scalers(**scalers) -> Dataset:
    return Dataset(path="mem", format="npy", rows=2, cols=3, detectors=1, channels=8,
                   calibration=(0.0, 0.01, 0.0), spectra=np.ones((2, 3, 1, 8), np.float32),
                   scalers={k: np.asarray(v, dtype=np.float64) for k, v in scalers.items()})


def test_summed_scalers_and_missing_time_counter(tmp_path):
    ov = read_override(require_shared("xrfmaps-reference", "override_parameters",
                                      "9idb-maps_fit_parameters_override.txt"))
    # 9-ID-B: CFG_2..5 are step-scan scalers; DS_IC is their sum; US_IC is 21:D3:scaler1_cts2.B
    vals = {pv: np.full((2, 3), float(i + 1)) for i, pv in enumerate(
        ["21:D3:scaler1_cts1.B", "21:D3:scaler1_cts1.C", "21:D3:scaler1_cts1.D", "21:D3:scaler1_cts2.A",
         "21:D3:scaler1_cts2.B"])}
    ds = _dataset_with_scalers(**vals)
    apply_override_scalers(ds, ov)
    assert ds.scaler_roles["CFG_2"] == "21:D3:scaler1_cts1.B" and ds.scaler_roles["US_IC"] == "21:D3:scaler1_cts2.B"
    assert np.all(ds.scaler("DS_IC") == 1 + 2 + 3 + 4)
    assert any("TIME_SCALER_PV 21:D3:scaler1:mca1.VAL was not recorded" in n for n in ds.notes)
    # the same mapping, written as XRF-Maps labels, survives a trip through the v10 layout
    from mapstorch.io.hdf5 import write_xrfmaps_h5

    (out,) = write_xrfmaps_h5(tmp_path / "s.h5", ds)
    with read_xrfmaps_h5(out) as back:
        assert np.all(back.scaler("DS_IC") == 10) and np.all(back.scaler("US_IC") == 5)
        assert np.all(back.scaler("CFG_3") == 2)


# ---------------------------------------------------------------------- CLI: info


def _ok(capsys, argv) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_info_json_and_plot(capsys, tmp_path):
    path = require_shared("xrfmaps-2ide", "mda", "2xfm_0010.mda")
    out = _ok(capsys, ["info", str(path), "--json", str(tmp_path / "i.json"), "--plot", str(tmp_path / "i.png")])
    assert "11 rows x 11 cols x 4 detectors x 2000 channels" in out and "US_IC=2xfm:scaler3_cts1.B" in out
    info = json.loads((tmp_path / "i.json").read_text())
    raw = read_mda(path)
    per_det = [sum(float(mca.detectors[d].data.sum(dtype=np.float64)) for row in raw.scan.sub_scans
                   for mca in row.sub_scans) for d in range(4)]
    assert (info["format"], info["rows"], info["cols"], info["detectors"], info["channels"]) == ("mda", 11, 11, 4, 2000)
    assert info["total_counts"] == pytest.approx(per_det)
    assert np.array(info["energy_calibration"]).shape == (4, 3)
    assert info["energy_calibration"][0] == pytest.approx([0.05, 0.0094, 0.0])
    assert len(info["scalers"]) == 69 and "2xfm:scaler3_cts1.B" in info["scalers"]
    assert 0.49 < info["live_time_range"][0] < info["live_time_range"][1] < 0.51
    assert (tmp_path / "i.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.json", "i.png"]  # no temporaries left


def test_info_of_a_gse_file(capsys, tmp_path):
    path = require_shared("gse-mca", "srm1832.mca")
    _ok(capsys, ["info", str(path), "--json", str(tmp_path / "g.json")])
    info = json.loads((tmp_path / "g.json").read_text())
    assert info["detectors"] == 4 and info["channels"] == 2048 and info["incident_energy"] == pytest.approx(35.0)


# ---------------------------------------------------------------------- CLI: convert and round trips


def test_convert_mda_round_trip(capsys, tmp_path):
    path = require_shared("xrfmaps-2ide", "mda", "2xfm_0010.mda")
    out = _ok(capsys, ["convert", str(path), "-o", str(tmp_path / "scan.h5"), "--per-detector"])
    assert "found beside the data" in out
    ov = read_override(require_shared("xrfmaps-2ide", "maps_fit_parameters_override.txt"))
    with open_dataset(path, override=ov) as src, \
            read_xrfmaps_h5_detectors([tmp_path / f"scan.h5{d}" for d in range(4)]) as back, \
            read_xrfmaps_h5(tmp_path / "scan.h5") as summed:
        spectra = src.read()
        assert back.shape == src.shape and np.array_equal(back.read(), spectra)
        assert np.array_equal(summed.read()[:, :, 0], spectra.sum(2))
        # the calibration written is the override's, as XRF-Maps fits with it
        expected = [ov.parameters["ENERGY_OFFSET"], ov.parameters["ENERGY_SLOPE"], ov.parameters["ENERGY_QUADRATIC"]]
        assert np.allclose(back.calibration, expected, rtol=1e-6) and np.allclose(summed.calibration[0], expected)
        assert np.allclose(back.live_time, src.live_time, rtol=1e-6)
        assert np.allclose(summed.scaler("US_IC"), src.scaler("US_IC"), rtol=1e-6)
        assert np.allclose(back.x_axis, src.x_axis, rtol=1e-6) and np.allclose(back.y_axis, src.y_axis, rtol=1e-6)
        assert back.extra_pvs.keys() == src.extra_pvs.keys()


@pytest.mark.parametrize("parts", [FLY, ("gse-mca", "axorf4_21kev_i050.xrf")], ids=["flyscan", "gse"])
def test_convert_round_trip_keeps_spectra_and_calibration(capsys, tmp_path, parts):
    path = require_shared(*parts)
    _ok(capsys, ["convert", str(path), "-o", str(tmp_path / "c.h5"), "--per-detector"])
    with open_dataset(path, override="auto") as src:
        files = [tmp_path / f"c.h5{d}" for d in range(src.detectors)]
        with read_xrfmaps_h5_detectors(files) as back:
            assert np.array_equal(back.read(), src.read())
            assert np.allclose(back.calibration, src.calibration, rtol=1e-6, atol=1e-9)
            assert np.allclose(back.live_time, src.live_time, rtol=1e-6)


def test_convert_numpy_volume_with_channel_axis(capsys, tmp_path):
    rng = np.random.default_rng(3)
    vol = rng.poisson(2.0, (300, 4, 5)).astype(np.float32)  # channels first, as in mca_arr
    np.save(tmp_path / "v.npy", vol)
    ov = require_shared("xrfmaps-2ide", "maps_fit_parameters_override.txt")
    _ok(capsys, ["convert", str(tmp_path / "v.npy"), "--channel-axis", "0", "--override", str(ov),
                 "-o", str(tmp_path / "v.h5")])
    with read_xrfmaps_h5(tmp_path / "v.h5") as back:
        assert back.shape == (4, 5, 1, 300)
        assert np.array_equal(back.read()[:, :, 0], np.transpose(vol, (1, 2, 0)))
        assert back.calibration[0] == pytest.approx([-0.0041840752, 0.0095216077, 0.0])
    with h5py.File(tmp_path / "v.h5", "r") as f:
        assert f["MAPS/Spectra/mca_arr"].shape == (300, 4, 5)  # channels first, like XRF-Maps


# ---------------------------------------------------------------------- bad input


def _bad_override(tmp_path, old, new):
    text = require_shared("xrfmaps-2ide", "maps_fit_parameters_override.txt").read_text()
    assert old in text
    p = tmp_path / f"override_{len(list(tmp_path.iterdir()))}.txt"
    p.write_text(text.replace(old, new, 1))
    return str(p)


@pytest.mark.parametrize("case,message", [
    ("missing", "file not found"),
    ("folder", "is a folder"),
    ("empty", "is empty"),
    ("binary", "unknown binary format"),
    ("override-as-data", "pass it with --override"),
    ("truncated-mda", "2xfm_0010.mda"),
    ("corrupt-hdf5", "HDF5"),
    ("wrong-forced-format", "its content looks like 'mda'"),
    ("bad-number", "line 20"),
    ("unknown-element", "Xx"),
    ("no-output-folder", "does not exist"),
    ("bad-plot-suffix", "cannot write a plot"),
])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, case, message):
    mda = require_shared("xrfmaps-2ide", "mda", "2xfm_0010.mda")
    gse = require_shared("gse-mca", "srm1832.mca")
    argv = {
        "missing": ["info", str(tmp_path / "nope.h5")],
        "folder": ["info", str(tmp_path)],
        "empty": ["info", str(tmp_path / "empty.mda")],
        "binary": ["info", str(tmp_path / "noise.bin")],
        "override-as-data": ["info", str(require_shared("xrfmaps-2ide", "maps_fit_parameters_override.txt"))],
        "truncated-mda": ["info", str(tmp_path / "2xfm_0010.mda")],
        "corrupt-hdf5": ["info", str(tmp_path / "c.h5")],
        "wrong-forced-format": ["info", str(mda), "--format", "gse-mca"],
        "bad-number": ["convert", str(gse), "-o", str(tmp_path / "o.h5"),
                       "--override", _bad_override(tmp_path, "CAL_SLOPE_[E_LINEAR]: 0.0095216077",
                                                    "CAL_SLOPE_[E_LINEAR]: 0.0095216O77")],
        "unknown-element": ["convert", str(gse), "-o", str(tmp_path / "o.h5"),
                            "--override", _bad_override(tmp_path, "ELEMENTS_TO_FIT: ", "ELEMENTS_TO_FIT: Xx, ")],
        "no-output-folder": ["convert", str(gse), "-o", str(tmp_path / "no" / "o.h5")],
        "bad-plot-suffix": ["info", str(gse), "--plot", str(tmp_path / "p.xyz")],
    }[case]
    (tmp_path / "empty.mda").write_bytes(b"")
    (tmp_path / "noise.bin").write_bytes(bytes(range(256)) * 4)
    data = mda.read_bytes()
    (tmp_path / "2xfm_0010.mda").write_bytes(data[:200])
    (tmp_path / "c.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(2000))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mapstorch: error:") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporaries


# ---------------------------------------------------------------------- fuzzing real files


@pytest.fixture(scope="module")
def fly_bytes():
    return require_shared(*FLY).read_bytes()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_real_fly_scan(fly_bytes, tmp_path, data):
    """Bit flips (mostly in the metadata at the start) and truncation give a clear error or a
    readable dataset, never another exception, a crash or a hang."""
    p = damaged_copy(data, fly_bytes, tmp_path / "2xfm_0099_2xfm3__0.h5", hot=20_000)
    read_or_clear_error(p, open_dataset)


def test_reading_files_does_not_import_torch(tmp_path):
    """`mapstorch info` / `convert` start in a fraction of a second: PyTorch is not needed to read."""
    import subprocess
    import sys

    path = require_shared("xrfmaps-2ide", "mda", "2xfm_0010.mda")
    code = ("import sys; from mapstorch.cli.main import main; "
            f"main(['info', {str(path)!r}]); main(['convert', {str(path)!r}, '-o', {str(tmp_path / 'o.h5')!r}]); "
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_convert_uses_per_detector_override_files(capsys, tmp_path):
    """maps_fit_parameters_override.txt2 serves detector 2, the others fall back to the plain file."""
    src = require_shared("gse-mca", "srm1832.mca")
    text = require_shared("xrfmaps-2ide", "maps_fit_parameters_override.txt").read_text()
    (tmp_path / "maps_fit_parameters_override.txt").write_text(text)
    (tmp_path / "maps_fit_parameters_override.txt2").write_text(
        text.replace("CAL_SLOPE_[E_LINEAR]: 0.0095216077", "CAL_SLOPE_[E_LINEAR]: 0.0146"))
    shutil.copyfile(src, tmp_path / "srm1832.mca")
    out = _ok(capsys, ["convert", str(tmp_path / "srm1832.mca"), "-o", str(tmp_path / "s.h5"), "--per-detector"])
    assert "override.txt2 (detector 2)" in out
    slopes = []
    for d in range(4):
        with read_xrfmaps_h5(tmp_path / f"s.h5{d}") as ds:
            slopes.append(ds.calibration[0][1])
    assert slopes == pytest.approx([0.0095216077, 0.0095216077, 0.0146, 0.0095216077])
