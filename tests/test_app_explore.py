"""The explore app: its logic (mapstorch.apps.session / figures), its cells, and the page in Chromium."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_app, require_shared, screenshot

from mapstorch.apps import figures, session
from mapstorch.errors import InputError


def test_open_scan_of_the_demo_map(demo_scan):
    scan = session.open_scan(demo_scan)
    assert (scan.rows, scan.cols, scan.detectors, scan.channels) == (16, 16, 1, 2048)
    assert scan.override_path is not None and "Fe" in scan.elements
    assert scan.incident_energy == pytest.approx(10.0)
    # the integrated spectrum, the total-counts image and the file agree
    from mapstorch.io import open_dataset

    with open_dataset(demo_scan) as ds:
        spectra = ds.read()
    np.testing.assert_allclose(scan.spectrum, spectra.sum(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(scan.total, spectra.sum(axis=(2, 3)), rtol=1e-6)
    np.testing.assert_allclose(session.pixel_spectrum(scan, 3, 5), spectra[3, 5].sum(0))
    assert dict(scan.facts())["pixels"] == "16 x 16"


def test_line_marks_follow_the_line_library():
    marks = session.line_marks(["Fe", "Pb_L"], 10.0, 1.0, 12.0)
    fe = {m["line"]: m["energy"] for m in marks if m["element"] == "Fe"}
    assert fe["Ka1"] == pytest.approx(6.404, abs=0.002) and fe["Kb1"] == pytest.approx(7.058, abs=0.003)
    # Pb L3 edge 13.04 keV is above 10 keV: not excited, so no Pb L lines
    assert not [m for m in marks if m["element"] == "Pb_L"]
    assert [m for m in session.line_marks(["Pb_L"], 15.0, 1.0, 15.0) if m["line"].startswith("La")]
    with pytest.raises(Exception, match="Xx"):
        session.line_marks(["Xx"], 10.0, 1.0, 12.0)


def test_bad_input_gives_clear_errors(demo_scan, tmp_path):
    with pytest.raises(InputError, match="no file given"):
        session.open_scan("  ")
    with pytest.raises(InputError, match="no such file"):
        session.open_scan(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not a scan at all")
    from mapstorch.errors import MapstorchError

    with pytest.raises(MapstorchError):
        session.open_scan(junk)
    scan = session.open_scan(demo_scan)
    with pytest.raises(InputError, match="outside"):
        session.pixel_spectrum(scan, 16, 0)


def test_open_scan_of_the_2ide_mda():
    mda = require_shared("xrfmaps-2ide", "mda", "2xfm_0010.mda")
    scan = session.open_scan(mda)
    assert (scan.rows, scan.cols, scan.detectors) == (11, 11, 4)
    assert scan.override_path and scan.override_path.endswith("maps_fit_parameters_override.txt")
    assert scan.incident_energy == pytest.approx(10.0)
    assert len(scan.scalers) > 5 and scan.total.shape == (11, 11)
    fig = figures.spectrum_figure(scan.energy, scan.spectrum,
                                  marks=session.line_marks(scan.elements, 10.0, 1.0, 11.0))
    names = {t.name for t in fig.data}
    assert "Fe lines" in names and "Ca lines" in names


def test_figures_are_consistent():
    colors = figures.element_colors(["Fe", "Ca"])
    fig = figures.spectrum_figure(np.linspace(1, 10, 50), np.ones(50),
                                  marks=[{"element": "Fe", "line": "Ka1", "energy": 6.4, "ratio": 1.0}])
    assert fig.data[1].line.color == colors["Fe"]
    grid = figures.image_grid({"a": np.ones((3, 4)), "b": np.zeros((3, 4)), "c": np.eye(3)}, ncols=2)
    assert len(grid.data) == 3
    table = figures.periodic_table_figure({"Fe": "present", "Ca": "absent"}, {"Fe": "Fe: 40 sigma"})
    present = [t for t in table.data if t.name == "present"][0]
    assert list(present.text) == ["Fe"] and "40 sigma" in present.hovertext[0]


def test_explore_cells_run_on_the_demo_map(demo_scan):
    app = load_app("explore")
    outputs, defs = app.run(defs={"path": str(demo_scan)})
    assert defs["scan"].rows == 16
    html = " ".join(str(getattr(o, "text", o)) for o in outputs if o is not None)
    assert "Integrated spectrum" in html


def test_explore_cells_report_a_bad_file(tmp_path):
    app = load_app("explore")
    bad = tmp_path / "nothing.mda"
    bad.write_bytes(b"\x00" * 10)
    outputs, defs = app.run(defs={"path": str(bad)})
    assert "scan" not in defs or defs.get("scan") is None
    html = " ".join(str(getattr(o, "text", o)) for o in outputs if o is not None)
    assert "Cannot open this file" in html


@pytest.mark.browser
def test_explore_in_chromium(browser, serve_app, demo_scan):
    url = serve_app("explore", demo_scan)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(url)
        page.get_by_text("16 x 16").first.wait_for(timeout=60_000)
        page.get_by_text("Integrated spectrum").first.wait_for(timeout=30_000)
        # drive the main control: show a pixel's spectrum
        page.get_by_text("show the pixel's spectrum").first.click()
        page.get_by_text("pixel (8, 8)").first.wait_for(timeout=30_000)
        assert page.get_by_text("total counts").count() > 0
        screenshot(page, "explore")
        # a bad path shows a message in the page
        box = page.get_by_role("textbox").first
        box.fill("/no/such/file.h5")
        box.press("Enter")
        page.get_by_text("Cannot open this file").first.wait_for(timeout=30_000)
        screenshot(page, "explore-error")
    finally:
        page.close()
