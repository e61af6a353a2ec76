"""The optimize app: its logic (mapstorch.apps.optimizing), its cells, and the page in Chromium."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import load_app, require_shared, screenshot

from mapstorch.apps import optimizing, session
from mapstorch.errors import InputError, MapstorchError


def _html(outputs) -> str:
    return " ".join(str(getattr(o, "text", o)) for o in outputs if o is not None)


@pytest.fixture(scope="module")
def demo_fit(demo_scan):
    """The demo scan, its start from the override file beside it, the preset-2 fit of its sum
    and what the progress callback showed."""
    scan = session.open_scan(demo_scan)
    start = optimizing.load_start(scan)
    counts, cal = optimizing.spectrum_of(scan, "sum")
    shown = []
    progress = optimizing.FitProgress(lambda **kw: shown.append(kw), interval=0.0)
    result = optimizing.run_fit(counts, cal, start, preset="2", progress=progress)
    return SimpleNamespace(scan=scan, start=start, result=result, progress=progress, shown=shown)


def test_fit_of_the_demo_sum_recovers_the_truth(demo_fit):
    from mapstorch.synthetic import simulate_map

    r = demo_fit.result
    assert r.status == "converged" and optimizing.status_kind(r)[0] == "success"
    truth = {k: float(v.sum()) for k, v in simulate_map(16, 16, seed=0).truth_counts.items()}
    for name in ("Fe", "Ca", "Zn"):
        assert r.counts[name] == pytest.approx(truth[name], rel=0.03), name
    assert r.values["ENERGY_SLOPE"] == pytest.approx(0.00952, rel=2e-3)
    assert math.isfinite(r.reduced_chi2)
    # the progress report saw every stage, in order, and shows stage / iteration / objective
    assert demo_fit.progress.stages == [s.name for s in r.stages]
    assert demo_fit.shown[0]["title"].startswith("Fitting: stage 1") and "objective" in demo_fit.shown[-1]["subtitle"]


def test_result_tables(demo_fit):
    r = demo_fit.result
    rows = optimizing.parameter_rows(r, demo_fit.start.values)
    by_name = {row["parameter"]: row for row in rows}
    assert set(by_name) == set(r.free) and all(row["free"] for row in rows)
    slope = by_name["ENERGY_SLOPE"]
    assert slope["value"] == pytest.approx(r.values["ENERGY_SLOPE"], rel=1e-5)
    assert 0 < slope["stderr"] < 1e-4 and slope["lower"] < slope["value"] < slope["upper"]
    assert slope["start"] == pytest.approx(demo_fit.start.values["ENERGY_SLOPE"])
    everything = optimizing.parameter_rows(r, fixed=True)
    assert len(everything) == len(r.to_dict()["parameters"]) and not everything[-1]["free"]
    counts = optimizing.count_rows(r)
    assert [c["counts"] for c in counts] == sorted((c["counts"] for c in counts), reverse=True)
    fe = next(c for c in counts if c["component"] == "Fe")
    assert fe["counts"] == pytest.approx(r.counts["Fe"], rel=1e-5) and 0 < fe["rel. error (%)"] < 1
    stages = optimizing.stage_rows(r)
    assert [s["stage"] for s in stages] == [s.name for s in r.stages] and stages[0]["iterations"] > 0


def test_new_override_file_round_trips(demo_fit, tmp_path):
    from mapstorch.io import read_override

    r, start = demo_fit.result, demo_fit.start
    text = r.to_override(start.override).to_text()
    out = session.write_override_file(text, tmp_path / "fitted.txt")
    assert out == (tmp_path / "fitted.txt").resolve()
    back = read_override(out)
    for name in ("ENERGY_OFFSET", "ENERGY_SLOPE", "FWHM_OFFSET", "FWHM_FANOPRIME", "COMPTON_ANGLE"):
        assert back.parameters[name] == pytest.approx(r.values[name], rel=1e-5, abs=1e-9), name
    assert back.components == start.override.components
    # every line that is not a fitted value is kept as it was
    original = start.override.lines
    kept = [ln for ln in original if ":" not in ln]
    assert all(ln in back.lines for ln in kept)
    # no clobbering unless asked, and no temporary file left behind
    with pytest.raises(InputError, match="overwrite"):
        session.write_override_file("other\n", out)
    session.write_override_file(text.replace("VERSION", "VERSION"), out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fitted.txt"]
    with pytest.raises(InputError, match="does not exist"):
        session.write_override_file(text, tmp_path / "no" / "such" / "folder.txt")
    with pytest.raises(InputError, match="no output path"):
        session.write_override_file(text, "  ")
    assert optimizing.default_output_path(demo_fit.scan).endswith("/maps_fit_parameters_override_fitted.txt")


def test_override_element_lists_follow_the_fitted_components(demo_fit):
    from dataclasses import replace

    from mapstorch.parameters import ParameterSet

    ovr = demo_fit.start.override

    ps = ParameterSet.default(["Ca", "Fe", "Zn", "Fe_Fe"])
    out = replace(demo_fit.result, params=ps).to_override(ovr)
    assert out.elements == ["Ca", "Fe", "Zn"] and out.pileups == ["Fe_Fe"]
    same = demo_fit.result.to_override(ovr)
    assert same.elements == ovr.elements and same.pileups == ovr.pileups
    fresh = replace(demo_fit.result, params=ps).to_override(None)
    assert fresh.components == ["Ca", "Fe", "Zn", "Fe_Fe"] and "ENERGY_SLOPE" in fresh.parameters


def test_fit_from_the_defaults(demo_fit, tmp_path):
    scan = demo_fit.scan
    start = optimizing.load_start(scan, optimizing.START_DEFAULTS)
    assert start.override is None and start.elements == scan.elements and start.incident_energy == pytest.approx(10)
    counts, cal = optimizing.spectrum_of(scan, 0)
    r = optimizing.run_fit(counts, cal, start, ["Ar", "K", "Ca", "Fe", "Cu", "Zn"], preset="2")
    assert math.isfinite(r.deviance) and r.status in ("converged", "max-iterations", "stalled")
    assert r.values["ENERGY_SLOPE"] == pytest.approx(0.00952, rel=0.01)
    from mapstorch.io import read_override

    text = r.to_override(None).to_text()
    back = read_override(session.write_override_file(text, tmp_path / "maps_fit_parameters_override.txt"))
    assert back.components == ["Ar", "K", "Ca", "Fe", "Cu", "Zn"]
    assert back.parameters["ENERGY_SLOPE"] == pytest.approx(r.values["ENERGY_SLOPE"], rel=1e-5)
    assert back.parameters["COHERENT_SCT_ENERGY"] == pytest.approx(r.values["COHERENT_SCT_ENERGY"], rel=1e-5)


def test_choices_and_inputs(demo_fit, tmp_path):
    from mapstorch.fit import OPTIMIZERS

    assert {"2", "3", "5", "all"} <= set(optimizing.preset_names())
    assert optimizing.optimizer_names() == list(OPTIMIZERS) and optimizing.objective_names()[0] == "poisson"
    scan = demo_fit.scan
    assert optimizing.spectrum_choices(scan) == {"spectrum": "sum"}
    assert optimizing.spectrum_of(scan, "sum")[0].shape == (2048,)
    with pytest.raises(InputError, match="detectors 0-0"):
        optimizing.spectrum_of(scan, 3)
    assert optimizing.parse_elements("fe, pb_l Si_Cl;Fe") == ["Fe", "Pb_L", "Si_Cl"]
    with pytest.raises(InputError, match="Xx"):
        optimizing.parse_elements("Fe, Xx")
    with pytest.raises(InputError, match="no elements"):
        optimizing.parse_elements(" , ")
    with pytest.raises(InputError, match="no such override file"):
        optimizing.load_start(scan, optimizing.START_OVERRIDE, str(tmp_path / "missing.txt"))
    with pytest.raises(InputError, match="unknown starting point"):
        optimizing.load_start(scan, "guess")
    bare = SimpleNamespace(**{**vars(scan), "override": None, "override_path": None})
    with pytest.raises(InputError, match="no override file beside the data"):
        optimizing.load_start(bare)
    junk = tmp_path / "junk_override.txt"
    junk.write_text("ELEMENTS_TO_FIT: Fe\nCAL_SLOPE_[E_LINEAR]: not a number\n")
    with pytest.raises(MapstorchError):
        optimizing.load_start(scan, optimizing.START_OVERRIDE, str(junk))


def test_progress_is_throttled_and_statuses_map_to_callouts():
    now = [0.0]
    shown = []
    p = optimizing.FitProgress(lambda **kw: shown.append(kw), interval=1.0, clock=lambda: now[0])
    assert p.subtitle() == "starting"
    for i in range(10):  # ten iterations in 0.9 s: the first one only
        now[0] = i * 0.1
        p("calibration", i + 1, 100.0 - i)
    assert len(shown) == 1 and "iteration 1" in shown[0]["subtitle"]
    p("all", 1, 50.0)  # a new stage shows at once
    assert shown[-1]["title"] == "Fitting: stage 2 (all)" and "objective 50" in shown[-1]["subtitle"]
    assert p.calls == 11 and p.stages == ["calibration", "all"]

    def fake(status, at_bounds=(), deviance=1.0):
        return SimpleNamespace(status=status, message="why", at_bounds=at_bounds, deviance=deviance)

    assert optimizing.status_kind(fake("converged"))[0] == "success"
    assert optimizing.status_kind(fake("converged", ("FWHM_OFFSET",))) == (
        "warn", "**converged** (why); at a bound: FWHM_OFFSET")
    assert optimizing.status_kind(fake("max-iterations"))[0] == "warn"
    assert optimizing.status_kind(fake("non-finite", deviance=math.nan))[0] == "danger"


def test_fit_of_the_2ide_mda_sum_from_its_override_file():
    mda = require_shared("xrfmaps-2ide", "mda", "2xfm_0010.mda")
    scan = session.open_scan(mda)
    start = optimizing.load_start(scan)
    assert start.override_path.endswith("maps_fit_parameters_override.txt") and "Fe" in start.elements
    assert list(optimizing.spectrum_choices(scan)) == [optimizing.SUM] + [f"detector {d}" for d in range(4)]
    counts, cal = optimizing.spectrum_of(scan, "sum")
    r = optimizing.run_fit(counts, cal, start, preset="2")
    assert r.status == "converged" or math.isfinite(r.deviance)
    assert math.isfinite(r.reduced_chi2) and r.reduced_chi2 > 0
    assert r.counts["Fe"] > 0 and np.isfinite(r.counts_stderr["Fe"])
    assert abs(r.values["ENERGY_SLOPE"] - start.values["ENERGY_SLOPE"]) < 0.05 * start.values["ENERGY_SLOPE"]
    new = r.to_override(start.override)
    assert new.parameters["FWHM_OFFSET"] == pytest.approx(r.values["FWHM_OFFSET"], rel=1e-5)
    assert new.scaler_pvs == start.override.scaler_pvs and new.elements == start.override.elements


# ----------------------------------------------------------------------------- the cells
def test_optimize_cells_fit_and_write(demo_scan, tmp_path):
    app = load_app("optimize")
    out = tmp_path / "fitted_override.txt"
    outputs, defs = app.run(defs={
        "path": str(demo_scan), "run_now": True, "write_now": True,
        "out_box": SimpleNamespace(value=str(out)), "overwrite_box": SimpleNamespace(value=False),
        "write_button": SimpleNamespace(value=True),
    })
    result = defs["result"]
    assert result.status == "converged" and defs["fit_spectrum_name"] == "spectrum"
    html = _html(outputs)
    assert "Fit status" in html and "converged" in html and "ENERGY_SLOPE" in html and "reduced chi2" in html
    assert defs["written"] == out.resolve() and out.read_text() == defs["override_text"]
    from mapstorch.io import read_override

    assert read_override(out).parameters["ENERGY_SLOPE"] == pytest.approx(result.values["ENERGY_SLOPE"], rel=1e-5)
    # a second write to the same path is refused, shown as a message (the fit cell not run again)
    outputs, defs = app.run(defs={
        "path": str(demo_scan), "result": result, "fit_spectrum_name": "spectrum", "write_now": True,
        "out_box": SimpleNamespace(value=str(out)), "overwrite_box": SimpleNamespace(value=False),
        "write_button": SimpleNamespace(value=True),
    })
    assert "Not written" in _html(outputs) and defs.get("written") is None


def test_optimize_cells_wait_for_the_button(demo_scan):
    app = load_app("optimize")
    outputs, defs = app.run(defs={"path": str(demo_scan)})
    assert defs["fit_start"].override is not None and defs.get("result") is None
    assert "Choose the options and press" in _html(outputs)


def test_optimize_cells_report_bad_input(demo_scan, tmp_path):
    app = load_app("optimize")
    bad = tmp_path / "nothing.h5"
    bad.write_bytes(b"not a scan")
    outputs, defs = app.run(defs={"path": str(bad), "run_now": True})
    assert defs.get("scan") is None and "Cannot open this file" in _html(outputs)
    # nothing to fit: a message, not a traceback
    empty = optimizing.Start(None, None, [], None, "nothing")
    outputs, defs = app.run(defs={"path": str(demo_scan), "fit_start": empty, "run_now": True})
    assert defs.get("result") is None and "Cannot fit" in _html(outputs) and "no elements" in _html(outputs)


# ----------------------------------------------------------------------------- the page
@pytest.mark.browser
def test_optimize_in_chromium(browser, serve_app, demo_scan):
    url = serve_app("optimize", demo_scan)
    target = demo_scan.parent / optimizing.FITTED_NAME
    if target.exists():
        target.unlink()
    page = browser.new_page(viewport={"width": 1400, "height": 3000})  # tall: the whole app in one screenshot
    try:
        page.goto(url)
        page.get_by_text("Starting from override file").first.wait_for(timeout=60_000)
        page.get_by_role("button", name="Fit").first.click()
        page.get_by_text("Fit status").first.wait_for(timeout=60_000)
        assert page.get_by_text("converged").count() > 0
        page.get_by_text("ENERGY_SLOPE").first.wait_for(timeout=10_000)
        assert page.get_by_text("reduced chi2").count() > 0
        page.get_by_role("button", name="Write").first.click()
        page.get_by_text(f"Wrote {target}").first.wait_for(timeout=20_000)
        from mapstorch.io import read_override

        assert "CAL_SLOPE_[E_LINEAR]" in target.read_text()  # file keys, as XRF-Maps reads them
        slope = read_override(target).parameters["ENERGY_SLOPE"]
        assert slope == pytest.approx(0.00952, rel=2e-3)
        assert page.get_by_text(f"{slope:.6g}", exact=True).count() > 0  # the table shows what was written
        screenshot(page, "optimize")
    finally:
        page.close()
