"""The maps app: its logic (mapstorch.apps.mapping), reading results files back, its cells, and
the page in Chromium."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import load_app, require_shared, screenshot

from mapstorch.apps import mapping
from mapstorch.errors import InputError, MapstorchError


def _page_text(outputs) -> str:
    return " ".join(str(getattr(o, "text", o)) for o in outputs if o is not None)


@pytest.fixture(scope="module")
def demo_nnls(demo_scan):
    """The demo scan's NNLS maps, fitted by the app's logic, with the progress reports."""
    calls = []
    maps = mapping.run_maps(demo_scan, "nnls", progress=lambda done, total: calls.append((done, total)))
    return maps, calls


@pytest.fixture(scope="module")
def cli_results(demo_scan, tmp_path_factory):
    """A results file written by ``mapstorch map`` (in a folder without an override file)."""
    out = tmp_path_factory.mktemp("cli-maps") / "demo_maps.h5"
    proc = subprocess.run([sys.executable, "-m", "mapstorch", "map", str(demo_scan), "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


# ----------------------------------------------------------------------------- logic
def test_nnls_map_of_the_demo_scan_recovers_the_truth(demo_nnls):
    from mapstorch.synthetic import simulate_map

    maps, calls = demo_nnls
    truth = simulate_map(16, 16, seed=0).truth_counts
    assert (maps.rows, maps.cols, maps.method, maps.routine) == (16, 16, "nnls", "NNLS")
    assert calls and calls[-1] == (256, 256)
    fe = maps.counts[maps.index("Fe")]
    ratio = fe / truth["Fe"]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.02)
    assert np.all(np.abs(ratio - 1.0) < 0.06)  # every pixel within a few %
    assert fe.mean() == pytest.approx(truth["Fe"].mean(), rel=0.01)
    assert "Fe" in maps.elements and "Elastic" not in maps.elements
    assert int((maps.status == 0).sum()) == 256
    # what the page shows: element, uncertainty and quality maps
    images, unit = mapping.element_maps(maps, ["Fe", "Ca"], "counts/s")
    assert unit == "cts/s" and images["Fe"].shape == (16, 16)
    logged, unit = mapping.element_maps(maps, ["Fe"], "counts", log=True)
    assert unit == "log10 counts" and np.allclose(10 ** logged["Fe"], fe, rtol=1e-5)
    err, _ = mapping.uncertainty_maps(maps, ["Fe"], "standard error", "counts")
    rel, unit = mapping.uncertainty_maps(maps, ["Fe"], "relative standard error", "counts")
    assert unit == "" and np.allclose(rel["Fe"], err["Fe"] / fe, rtol=1e-5)
    assert 0.001 < np.median(rel["Fe"]) < 0.05  # Poisson-like: about 1/sqrt(counts) and overlaps
    assert list(mapping.quality_maps(maps)) == ["reduced chi-square", "status", "iterations"]
    facts = dict(maps.facts())
    assert facts["status"].startswith("256 converged") and facts["pixel spectra"] == "available"
    with pytest.raises(InputError, match="no map of 'Xx'"):
        mapping.element_maps(maps, ["Xx"])


def test_pixel_model_is_the_map_fit(demo_nnls):
    maps, _ = demo_nnls
    fit = mapping.pixel_fit(maps, 3, 5)
    # the model rebuilt from the fitted counts is what the map fit found there ...
    assert fit.reduced_chi2 == pytest.approx(float(maps.reduced_chi2[3, 5]), rel=1e-3)
    # ... and equals the data within the noise
    assert 0.7 < fit.reduced_chi2 < 1.3
    assert fit.data.shape == fit.energy.shape == fit.components["Total"].shape
    assert {"Fe", "Ca", "Background", "Total"} <= set(fit.components)
    assert fit.energy[0] == pytest.approx(1.0, abs=0.02) and fit.energy[-1] == pytest.approx(11.0, abs=0.02)
    total_counts = float(fit.components["Total"].sum())
    assert total_counts == pytest.approx(float(fit.data.sum()), rel=0.02)
    assert "pixel (3, 5)" in fit.title()
    rows = mapping.pixel_table(maps, 3, 5)
    assert [r["channel"] for r in rows] == list(maps.names)
    assert rows[maps.index("Fe")]["counts"] == f"{float(maps.counts[maps.index('Fe'), 3, 5]):.5g}"
    with pytest.raises(InputError, match="outside"):
        mapping.pixel_fit(maps, 16, 0)


def test_poisson_pixel_model_is_the_map_fit(tmp_path):
    from mapstorch.synthetic import simulate_map, write_map_file

    small = write_map_file(tmp_path / "small.h5", simulate_map(4, 6, seed=3))
    maps = mapping.run_maps(small, "poisson")
    assert maps.method == "poisson" and maps.routine == "Poisson"
    for row, col in ((0, 0), (3, 4)):
        fit = mapping.pixel_fit(maps, row, col)
        # background: the chunk's SNIP shape scaled to the counts the Poisson solution balances
        assert fit.reduced_chi2 == pytest.approx(float(maps.reduced_chi2[row, col]), rel=2e-3)


def test_results_file_of_the_cli_reads_back(cli_results, demo_nnls, demo_scan, tmp_path):
    from mapstorch.io import read_xrfmaps_results

    raw = read_xrfmaps_results(cli_results)["NNLS"]
    assert {"channel_names", "units", "counts_per_sec"} <= set(raw)  # the keys callers had stay
    assert {"Counts", "Counts_Stderr", "Counts_Per_Sec_Stderr", "Reduced_Chi2", "Iterations", "Status"} <= set(
        raw["extra"])
    assert "Fitted_Integrated_Spectra" not in raw["extra"]  # integrated spectra are not maps
    source = mapping.inspect_file(cli_results)
    assert source.routines == ["NNLS", "ROI"] and source.has_spectra and mapping.has_results(cli_results)  # fits first
    maps = mapping.read_maps(source)
    ours, _ = demo_nnls
    assert maps.names == ours.names and maps.method == "nnls"
    np.testing.assert_allclose(maps.counts, ours.counts, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(maps.counts_per_sec_stderr, ours.counts_per_sec_stderr, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(maps.status, ours.status)
    # no override file beside it: the parameters stored in the file rebuild the pixel model
    assert any("stored in the file" in n for n in maps.notes)
    fit = mapping.pixel_fit(maps, 3, 5)
    assert fit.reduced_chi2 == pytest.approx(float(maps.reduced_chi2[3, 5]), rel=1e-3)
    # with the override file beside it, the same
    folder = tmp_path / "with-override"
    folder.mkdir()
    shutil.copy(cli_results, folder / "demo_maps.h5")
    shutil.copy(demo_scan.parent / "maps_fit_parameters_override.txt", folder)
    beside = mapping.read_maps(mapping.inspect_file(folder / "demo_maps.h5"), "NNLS")
    assert not any("stored in the file" in n for n in beside.notes)
    assert mapping.pixel_fit(beside, 3, 5).reduced_chi2 == pytest.approx(fit.reduced_chi2, rel=1e-4)
    with pytest.raises(InputError, match="no 'Fitted' maps"):
        mapping.read_maps(source, "Fitted")


def test_results_without_our_extra_maps(tmp_path):
    """Parameter maps are read back; a file with counts/s only (as XRF-Maps writes) still shows."""
    from mapstorch.io import read_xrfmaps_results, write_xrfmaps_h5
    from mapstorch.maps import MapResult
    from mapstorch.synthetic import map_dataset, simulate_map

    ds = map_dataset(simulate_map(2, 3, seed=2))
    names = ("Fe", "Elastic", "Compton")
    cps = np.arange(18, dtype=np.float32).reshape(3, 2, 3) + 1
    res = MapResult("nonlinear", names, cps, cps * 0.1, cps, np.ones((2, 3), np.float32), np.full((2, 3), 7),
                    np.zeros((2, 3), np.int8), "sum", 1.0, 6.0, parameter_names=("ENERGY_SLOPE",),
                    parameters=np.full((1, 2, 3), 0.0095, np.float32),
                    parameters_stderr=np.full((1, 2, 3), 1e-6, np.float32))
    (ours,) = write_xrfmaps_h5(tmp_path / "ours.h5", ds, results=res.xrfmaps_results())
    extra = read_xrfmaps_results(ours)["Fitted"]["extra"]
    assert np.allclose(extra["Parameter_ENERGY_SLOPE"], 0.0095) and extra["Iterations"].shape == (2, 3)
    maps = mapping.read_maps(mapping.inspect_file(ours))
    assert maps.method == "nonlinear" and list(maps.parameters) == ["ENERGY_SLOPE"]
    assert list(mapping.quality_maps(maps))[3:] == ["ENERGY_SLOPE", "ENERGY_SLOPE stderr"]
    # no override beside it and none stored: maps, but no pixel model
    assert maps.setup.spectra_path is None
    with pytest.raises(InputError, match="no override file"):
        mapping.pixel_fit(maps, 0, 0)
    # counts/s only
    plain = {"NNLS": {"channel_names": list(names), "counts_per_sec": cps}}
    (theirs,) = write_xrfmaps_h5(tmp_path / "theirs.h5", ds, results=plain)
    assert read_xrfmaps_results(theirs)["NNLS"]["extra"] == {}
    maps = mapping.read_maps(mapping.inspect_file(theirs))
    assert maps.counts is None and any("counts/s only" in n for n in maps.notes)
    assert maps.live_time is not None and mapping.quality_maps(maps) == {}
    with pytest.raises(InputError, match="no counts"):
        mapping.element_maps(maps, ["Fe"], "counts")
    with pytest.raises(InputError, match="no standard errors"):
        mapping.uncertainty_maps(maps, ["Fe"])


def test_clicked_pixel_reads_plotly_clicks():
    # what mo.ui.plotly reports for a click on a heatmap: x = column, y = row
    assert mapping.clicked_pixel([{"x": 5, "y": 3, "z": 1.0, "curveNumber": 10, "pointNumber": [3, 5]}], 16, 16) == (3, 5)
    assert mapping.clicked_pixel([{"pointNumber": [2, 7], "curveNumber": 0}], 16, 16) == (2, 7)
    assert mapping.clicked_pixel([], 16, 16) is None
    assert mapping.clicked_pixel(None, 16, 16) is None
    assert mapping.clicked_pixel([{"x": 40, "y": 3}], 16, 16) is None
    assert mapping.parse_elements(" Fe, Ca;Pb_L ,") == ["Fe", "Ca", "Pb_L"]


def test_bad_input_gives_clear_errors(demo_scan, tmp_path):
    with pytest.raises(InputError, match="no file given"):
        mapping.inspect_file("  ")
    with pytest.raises(InputError, match="no such file"):
        mapping.inspect_file(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not a scan at all")
    with pytest.raises(MapstorchError):
        mapping.inspect_file(junk)
    assert not mapping.has_results(junk)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(demo_scan, alone / "scan.h5")  # no override file beside it
    with pytest.raises(InputError, match="needs shape parameters and elements"):
        mapping.run_maps(alone / "scan.h5")
    with pytest.raises(InputError, match="does not exist"):
        mapping.run_maps(demo_scan, out=tmp_path / "no" / "out.h5")
    with pytest.raises(InputError, match="the scan itself"):
        mapping.run_maps(demo_scan, out=demo_scan)
    with pytest.raises(InputError, match="unknown map method"):
        mapping.run_maps(demo_scan, method="magic")
    with pytest.raises(InputError, match="holds no maps"):
        mapping.read_maps(mapping.inspect_file(demo_scan))


def test_2ide_mda_nnls_map_of_detector_0():
    mda = require_shared("xrfmaps-2ide", "mda", "2xfm_0010.mda")
    source = mapping.inspect_file(mda)
    assert (source.rows, source.cols, source.detectors) == (11, 11, 4) and source.override_path
    maps = mapping.run_maps(mda, "nnls", "0")
    assert (maps.rows, maps.cols) == (11, 11) and {"Fe", "Ca"} <= set(maps.names)
    fitted = [maps.index(n) for n in maps.elements]
    assert bool(np.isfinite(maps.counts_per_sec).all()) and bool(np.isfinite(maps.counts[fitted]).all())
    assert np.all(maps.counts[maps.index("Fe")] > 0) and np.all(maps.status == 0)
    fit = mapping.pixel_fit(maps, 5, 5)
    assert fit.reduced_chi2 == pytest.approx(float(maps.reduced_chi2[5, 5]), rel=1e-3)


# ----------------------------------------------------------------------------- the cells
def test_maps_cells_run_a_fit_and_write_it(demo_scan, tmp_path):
    from mapstorch.io import read_xrfmaps_results

    out = tmp_path / "app_maps.h5"
    outputs, defs = load_app("maps").run(defs={"path": str(demo_scan), "way": "run", "run_now": True,
                                                "out_path": str(out)})
    maps = defs["maps"]
    assert maps.rows == 16 and maps.method == "nnls" and maps.written == [str(out)]
    html = _page_text(outputs)
    assert "Element maps" in html and "pixel (8, 8)" in html and "Fit quality" in html
    # written as `mapstorch map --out` writes it: the same maps read back
    written = read_xrfmaps_results(out)["NNLS"]
    assert tuple(written["channel_names"]) == maps.names
    np.testing.assert_allclose(written["counts_per_sec"], maps.counts_per_sec, rtol=1e-6)


def test_maps_cells_wait_for_the_run_button(demo_scan):
    outputs, defs = load_app("maps").run(defs={"path": str(demo_scan), "way": "run"})
    assert defs.get("maps") is None
    assert "press" in _page_text(outputs)


def test_maps_cells_open_a_results_file(cli_results):
    outputs, defs = load_app("maps").run(defs={"path": str(cli_results), "way": "open", "pixel": (3, 5)})
    assert defs["maps"].routine == "NNLS" and defs["maps"].origin == "file"
    html = _page_text(outputs)
    assert "pixel (3, 5)" in html and "Element maps" in html


def test_maps_cells_report_a_bad_file(tmp_path):
    bad = tmp_path / "nothing.mda"
    bad.write_bytes(b"\x00" * 10)
    outputs, defs = load_app("maps").run(defs={"path": str(bad)})
    assert defs.get("source") is None and defs.get("maps") is None
    assert "Cannot open this file" in _page_text(outputs)


# ----------------------------------------------------------------------------- the page
@pytest.mark.browser
def test_maps_in_chromium(browser, serve_app, demo_scan):
    url = serve_app("maps", demo_scan)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(url)
        run = page.get_by_role("button", name="Run the map fit")
        run.wait_for(timeout=60_000)
        run.click()
        grid = page.locator(".js-plotly-plot").first
        grid.locator("text.annotation-text", has_text="Fe").first.wait_for(timeout=60_000)
        page.get_by_text("pixel (8, 8)").first.wait_for(timeout=30_000)
        assert page.get_by_text("256 converged").count() > 0
        # click pixel (row 3, column 5) of the Fe map: its heatmap fills the subplot's drag box
        titles = grid.locator("text.annotation-text")
        fe = next(i for i in range(titles.count()) if titles.nth(i).text_content() == "Fe")
        box = grid.locator(".nsewdrag").nth(fe)
        box.scroll_into_view_if_needed()
        page.wait_for_timeout(300)
        screenshot(page, "maps-grid")
        b = box.bounding_box()
        page.mouse.move(b["x"] + b["width"] * 5.5 / 16, b["y"] + b["height"] * 3.5 / 16)
        page.mouse.click(b["x"] + b["width"] * 5.5 / 16, b["y"] + b["height"] * 3.5 / 16)
        page.get_by_text("pixel (3, 5)").first.wait_for(timeout=30_000)
        title = page.locator("text.gtitle").filter(has_text="pixel (3, 5)").first
        title.wait_for(timeout=30_000)
        assert "reduced chi-square" in title.text_content(), page.locator("text.gtitle").all_text_contents()
        assert page.get_by_text("residual (sigma)").count() > 0
        title.scroll_into_view_if_needed()
        screenshot(page, "maps-pixel")
    finally:
        page.close()
