"""The guess app: its logic (mapstorch.apps.guessing), its cells, and the page in Chromium."""

from __future__ import annotations

import dataclasses
import math
import shutil
from types import SimpleNamespace

import pytest
from conftest import load_app, require_shared, screenshot

from mapstorch.apps import figures, guessing, session
from mapstorch.errors import ElementError, InputError
from mapstorch.identify import DECISIONS, Evidence
from mapstorch.io import read_override
from mapstorch.synthetic import DEMO_SAMPLE

#: A short candidate list: quick to test (a few seconds), with one family the demo lacks.
SHORT_LIST = "Fe, Ca, K, Zn, Pb_L"
#: Families 10 keV excites that the demo sample lacks, under its lines (Co K under Fe Kb, Mo L
#: and Pb M under S K). The logic tests use the demo's families plus these,
#: without pile-ups: the default list (every family, tested in tests/test_guess.py) takes
#: minutes on a busy machine.
DECOYS = ["Co", "Pb_M", "Mo_L"]


@pytest.fixture
def demo_copy(demo_scan, tmp_path):
    """The demo scan and its override file, copied where a test may write beside them."""
    folder = tmp_path / "scan"
    folder.mkdir()
    shutil.copy(demo_scan, folder / demo_scan.name)
    shutil.copy(demo_scan.parent / guessing.STANDARD_NAME, folder / guessing.STANDARD_NAME)
    return folder / demo_scan.name


@pytest.fixture(scope="module")
def demo_guess(demo_scan):
    """``(scan, result, progress)``: the demo's families and decoys, tested on the demo scan."""
    scan = session.open_scan(demo_scan)
    progress = guessing.GuessProgress()
    candidates = [n for n in DEMO_SAMPLE if n != "Si_Cl"] + DECOYS
    result = guessing.run_guess(scan, scan.incident_energy, candidates, pileups=False, progress=progress)
    return scan, result, progress


def _html(outputs) -> str:
    return " ".join(str(getattr(o, "text", o)) for o in outputs if o is not None)


# ----------------------------------------------------------------------------- logic
def test_starting_energy_and_candidates(demo_scan, tmp_path):
    scan = session.open_scan(demo_scan)
    assert guessing.starting_energy(scan) == (pytest.approx(10.0), "from the override file")
    # without the files' value: the elastic peak of the simulated 10 keV spectrum
    energy, where = guessing.starting_energy(dataclasses.replace(scan, incident_energy=None, override=None))
    assert energy == pytest.approx(10.0, abs=0.05) and "elastic peak" in where
    assert guessing.fit_range(scan) == (pytest.approx(1.0), pytest.approx(11.0))
    assert guessing.candidate_names(guessing.EVERY_FAMILY, "anything", 10.0, scan) is None
    assert 30 < guessing.default_family_count(10.0, scan) < 150
    assert guessing.candidate_names(guessing.MY_LIST, "Fe, ca; Pb_L ,Fe_K", 10.0, scan) == ["Fe", "Ca", "Pb_L"]
    with pytest.raises(InputError, match="empty"):
        guessing.candidate_names(guessing.MY_LIST, "  ", 10.0, scan)
    with pytest.raises(ElementError, match="Xx"):
        guessing.candidate_names(guessing.MY_LIST, "Fe, Xx", 10.0, scan)
    with pytest.raises(InputError, match="incident energy"):
        guessing.candidate_names(guessing.EVERY_FAMILY, "", None, scan)
    with pytest.raises(InputError, match="incident energy"):
        guessing.run_guess(scan, -1.0, ["Fe"])
    with pytest.raises(InputError, match="significance"):
        guessing.run_guess(scan, 10.0, ["Fe"], significance=0.0)


def test_family_symbols():
    assert [guessing.family_symbol(n) for n in ("Fe", "Fe_K", "Pb_L", "Au_M", "Si_Cl")] == ["Fe", "Fe", "Pb", "Au", "Si"]
    with pytest.raises(ElementError):
        guessing.family_symbol("Xx_L")
    # every decision guess_elements makes has a colour on the table
    assert set(guessing.CATEGORY) == set(DECISIONS)
    assert set(guessing.CATEGORY.values()) <= set(figures.DECISION_COLORS)


def test_table_takes_the_strongest_family_per_element():
    def ev(name, decision, sig):
        return Evidence(name, decision == "present", decision, 1000.0, 30.0, sig, sig * sig, f"because {name}")

    result = SimpleNamespace(candidates=[
        ev("Pb_M", "absent", 0.5), ev("Pb_L", "present", 40.0), ev("As", "uncertain", 4.0), ev("Ca", "absent", 1.0),
        ev("Si", "absent", 0.0), ev("Si_Cl", "present", 9.0), ev("Cl", "present", 30.0)])
    status, hover = guessing.element_table(result)
    assert status == {"Pb": "present", "As": "uncertain", "Ca": "absent", "Si": "absent", "Cl": "present"}
    assert "Pb L: present, 40.0 σ, 1000 ± 30 counts" in hover["Pb"] and "Pb M: absent" in hover["Pb"]
    assert "because Pb_L" in hover["Pb"]
    # a pile-up decides neither element but shows in both hovers
    assert "Si+Cl pile-up: present" in hover["Si"] and "Si+Cl pile-up" in hover["Cl"]
    fig = figures.periodic_table_figure(status, hover)
    present = next(t for t in fig.data if t.name == "present")
    assert set(present.text) == {"Pb", "Cl"}


def test_warnings_flag_a_doubtful_fit():
    fit = SimpleNamespace(reduced_chi2=2e12, values={"COHERENT_SCT_ENERGY": 10.4}, at_bounds=("FWHM_OFFSET",))
    warnings = guessing.result_warnings(SimpleNamespace(fit=fit, incident_energy=10.0))
    assert len(warnings) == 3
    assert "poor" in warnings[0] and "10.4 keV" in warnings[1] and "FWHM_OFFSET" in warnings[2]
    fit = SimpleNamespace(reduced_chi2=1.2, values={"COHERENT_SCT_ENERGY": 10.01}, at_bounds=())
    assert guessing.result_warnings(SimpleNamespace(fit=fit, incident_energy=10.0)) == []


def test_guess_finds_the_demo_majors(demo_guess):
    _, result, progress = demo_guess
    truth = {n for n in DEMO_SAMPLE if "_" not in n or n.endswith(("_L", "_M"))}
    assert {"Fe", "Ca", "K", "Zn", "Cu", "Ar", "S"} <= set(result.present)
    assert set(result.elements) <= truth, f"false positives: {set(result.elements) - truth}"
    assert result.incident_energy == pytest.approx(10.0)
    # the progress callback saw every step, the bar ends full
    assert len(progress.messages) == progress.total == len(guessing.STEPS) - 1 and progress.step == progress.total
    assert progress.messages[-1].startswith("final fit")
    status, hover = guessing.element_table(result)
    assert status["Fe"] == status["Ca"] == status["Ba"] == "present"
    assert not set(DECOYS) & set(result.present)
    assert status["Pb"] in ("absent", "uncertain") and status["Co"] in ("absent", "uncertain")
    assert "σ" in hover["Fe"] and "counts" in hover["Fe"] and "needed given the others" in hover["Fe"]
    rows = guessing.evidence_rows(result)
    assert len(rows) == len(result.candidates) and rows[0]["decision"] == "present"
    fe = next(r for r in rows if r["family"] == "Fe")
    assert fe["element"] == "Fe" and fe["significance"] > 100 and fe["stderr"] != "-"
    assert guessing.result_warnings(result) == []
    options, chosen = guessing.chosen_options(result)
    assert chosen == result.present and set(chosen) <= set(options)
    fig = figures.fit_figure(result.fit.energies, result.fit.data, result.fit.components)
    assert "Fe" in {t.name for t in fig.data}


def test_accepted_list_round_trips_through_the_override_file(demo_copy, demo_guess):
    _, result, _ = demo_guess
    scan = session.open_scan(demo_copy)
    in_use = demo_copy.parent / guessing.STANDARD_NAME
    before = in_use.read_text()
    out = guessing.default_output_path(scan)
    assert out == str(demo_copy.parent.resolve() / guessing.GUESS_NAME)  # the one in use exists
    written = session.write_override_file(guessing.accepted_override(result, scan.override, ["Fe", "ca", "Si_Cl"]), out)
    back = read_override(written)
    assert (back.elements, back.pileups) == (["Fe", "Ca"], ["Si_Cl"])
    assert back.parameters == scan.override.parameters
    changed = [(a, b) for a, b in zip(scan.override.lines, back.lines) if a != b]
    assert len(back.lines) == len(scan.override.lines) and len(changed) == 1  # the pile-up line was Si_Cl
    assert all(a.startswith(("ELEMENTS_TO_FIT", "ELEMENTS_WITH_PILEUP")) for a, _ in changed)
    # no silent overwriting: not the written file, not the one in use
    again = guessing.accepted_override(result, scan.override, result.present)
    with pytest.raises(InputError, match="exists"):
        session.write_override_file(again, out)
    with pytest.raises(InputError, match="exists"):
        session.write_override_file(again, in_use)
    assert in_use.read_text() == before
    assert read_override(session.write_override_file(again, out, overwrite=True)).elements == result.elements
    with pytest.raises(InputError, match="empty"):
        guessing.accepted_override(result, scan.override, [])
    with pytest.raises(InputError, match="folder"):
        session.write_override_file(again, demo_copy.parent)
    with pytest.raises(InputError, match="no such folder"):
        session.write_override_file(again, demo_copy.parent / "missing" / "x.txt")


def test_accepted_list_without_an_override_file(demo_copy, demo_guess):
    _, result, _ = demo_guess
    (demo_copy.parent / guessing.STANDARD_NAME).unlink()
    scan = session.open_scan(demo_copy)
    assert scan.override is None
    out = guessing.default_output_path(scan)
    assert out.endswith("/" + guessing.STANDARD_NAME)  # none there: the file XRF-Maps reads
    written = session.write_override_file(guessing.accepted_override(result, None, result.present), out)
    back = read_override(written)
    assert back.elements == result.elements and back.pileups == result.pileups
    assert back.parameters["COHERENT_SCT_ENERGY"] == pytest.approx(10.0, abs=0.01)
    assert back.parameters["ENERGY_SLOPE"] == pytest.approx(result.fit.values["ENERGY_SLOPE"], rel=1e-8)
    # the next scan opened there finds it
    assert session.open_scan(demo_copy).elements == result.elements + result.pileups


def test_guess_on_the_2ide_mda(tmp_path):
    mda = require_shared("xrfmaps-2ide", "mda", "2xfm_0010.mda")
    scan = session.open_scan(mda)
    assert guessing.starting_energy(scan) == (pytest.approx(10.0), "from the override file")
    assert guessing.fit_range(scan) == (pytest.approx(1.0), pytest.approx(11.0))
    result = guessing.run_guess(scan, 10.0, guessing.candidate_names(guessing.MY_LIST, "Ca, Fe, Cu, Pb_L", 10.0, scan),
                                pileups=False)
    assert {"Fe", "Cu"} <= set(result.present) and "Pb_L" not in result.present
    status, _ = guessing.element_table(result)
    assert status["Fe"] == "present"
    # the real override file: only the two list lines change
    out = session.write_override_file(guessing.accepted_override(result, scan.override, result.present),
                                  tmp_path / guessing.GUESS_NAME)
    back = read_override(out)
    assert back.elements == result.elements and back.pileups == []
    assert sum(a != b for a, b in zip(scan.override.lines, back.lines)) <= 2
    assert back.parameters == scan.override.parameters and back.scaler_pvs == scan.override.scaler_pvs


def test_no_nan_in_the_evidence_rows(demo_guess):
    _, result, _ = demo_guess
    for row in guessing.evidence_rows(result):
        assert not (isinstance(row["significance"], float) and math.isnan(row["significance"]))
        assert "nan" not in row["counts"] and "nan" not in row["stderr"]


# ----------------------------------------------------------------------------- cells
def test_guess_cells_wait_for_the_button(demo_scan):
    outputs, defs = load_app("guess").run(defs={"path": str(demo_scan)})
    assert defs["scan"].rows == 16 and defs["candidates"] is None
    html = _html(outputs)
    assert "Integrated spectrum" in html and "to run the guess" in html
    assert "result" not in defs


def test_guess_cells_run_and_accept(demo_copy):
    app = load_app("guess")
    short = guessing.candidate_names(guessing.MY_LIST, SHORT_LIST, 10.0, None)
    outputs, defs = app.run(defs={"path": str(demo_copy), "candidates": short, "candidates_error": None,
                                  "run_now": True, "accept_now": True})
    result = defs["result"]
    assert {"Fe", "Ca", "K", "Zn"} <= set(result.present) and "Pb_L" not in result.present
    html = _html(outputs)
    assert "Present:" in html and "Evidence per candidate" in html and "Accept the list" in html
    written = defs["written"]
    assert written.name == guessing.GUESS_NAME and str(written) in html.replace("&#92;", "\\")
    assert read_override(written).elements == result.elements


def test_guess_cells_report_a_bad_file(tmp_path):
    bad = tmp_path / "nothing.mda"
    bad.write_bytes(b"\x00" * 10)
    outputs, defs = load_app("guess").run(defs={"path": str(bad), "run_now": True})
    assert defs.get("scan") is None and "result" not in defs
    assert "Cannot open this file" in _html(outputs)


def test_guess_cells_report_a_failed_guess(demo_scan):
    outputs, defs = load_app("guess").run(defs={"path": str(demo_scan), "candidates": [], "candidates_error": None,
                                                "run_now": True})
    assert defs.get("result") is None
    assert "The guess failed" in _html(outputs) and "empty" in _html(outputs)


# ----------------------------------------------------------------------------- browser
@pytest.mark.browser
def test_guess_in_chromium(browser, serve_app, demo_copy):
    url = serve_app("guess", demo_copy)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(url)
        page.get_by_text("Integrated spectrum").first.wait_for(timeout=60_000)
        # the candidate choice: a short list of my own (quick), then run
        page.get_by_text(guessing.MY_LIST, exact=True).first.click()
        box = page.get_by_role("textbox", name="my list")
        box.fill(SHORT_LIST)
        box.press("Enter")
        page.get_by_text("Testing 5 families").first.wait_for(timeout=30_000)
        page.get_by_role("button", name="Guess the elements").click()
        present = page.get_by_text("Present:").first
        present.wait_for(timeout=60_000)
        line = present.locator("xpath=..").inner_text()
        assert "Fe" in line and "Pb_L" not in line
        # the periodic table: Fe's square, hovered, shows its evidence
        table = page.locator(".js-plotly-plot").filter(has_text="hover for the evidence").first
        table.wait_for(timeout=30_000)
        table.scroll_into_view_if_needed()
        box = table.locator("g.textpoint text", has_text="Fe").first.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)  # plotly hovers by position
        label = page.locator("g.hovertext").filter(has_text="Fe: present").first
        label.wait_for(timeout=10_000)
        assert "needed given the others" in label.text_content()
        screenshot(page, "guess")
        page.get_by_role("button", name="Accept the list").click()
        done = page.get_by_text("Wrote").first
        done.wait_for(timeout=30_000)
        written = demo_copy.parent / guessing.GUESS_NAME
        assert str(written.resolve()) in done.locator("xpath=..").inner_text()
        assert "Fe" in read_override(written).elements
        screenshot(page, "guess-accepted")
    finally:
        page.close()

