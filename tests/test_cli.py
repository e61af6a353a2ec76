"""The command line: demo, lines, and clear errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mapstorch.cli.main import main


def test_lines_command(capsys):
    assert main(["lines", "Fe", "Pb_L", "--incident-energy", "12"]) == 0
    out = capsys.readouterr().out
    assert "Ka1" in out and "Lb3" in out and "(not excited)" in out


def test_lines_with_xrfmaps_tables(capsys, xrfmaps_reference):
    argv = ["lines", "Fe", "--library", str(xrfmaps_reference / "xrf_library.csv"),
            "--henke", str(xrfmaps_reference / "henke.xdr")]
    assert main(argv) == 0
    assert "xrf_library.csv" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,msg",
    [(["lines", "Xx"], "unknown element"), (["lines", "Fe", "--library", "/nonexistent.csv"], "--henke"),
     (["lines", "Fe", "--library", "/nonexistent.csv", "--henke", "/x.xdr"], "not found"),
     # a missing data file is named as such, not reported as a missing override file
     (["map", "/nonexistent/scan.mda"], "data file not found: /nonexistent/scan.mda")],
)
def test_errors_exit_2_without_traceback(capsys, argv, msg):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mapstorch: error:") and msg in err and "Traceback" not in err


def test_demo_writes_plots_and_summary(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "mapstorch.cli.main", "demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("spectrum.png", "model_components.png", "maps.png", "summary.txt"):
        assert (out / name).stat().st_size > 1000, name
    summary = (out / "summary.txt").read_text()
    assert "median |error|" in summary and "reduced chi-square" in summary
    # the linear structure recovers the truth when the continuum is known
    line = next(l for l in summary.splitlines() if "median |error|" in l)
    assert float(line.split(":")[1].split("%")[0]) < 0.5
    # step 5: the map in the XRF-Maps layout, read back identical
    assert "read it back as 'xrfmaps-hdf5-v10': spectra identical, calibration kept, US_IC kept" in summary
    from mapstorch.io import open_dataset

    with open_dataset(out / "demo_map.h5") as ds:
        assert ds.shape == (16, 16, 1, 2048) and ds.integrated("sum").sum() > 1e6


def test_demo_into_unwritable_place(capsys, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["demo", "--out", str(target / "sub")]) == 2
    assert "mapstorch: error:" in capsys.readouterr().err
