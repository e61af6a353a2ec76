"""Element identification: candidate lists, likelihood-ratio selection with overlaps, evidence, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mapstorch.errors import InputError
from mapstorch.identify import default_candidates, guess_elements, pileup_candidates
from mapstorch.identify.decide import _inconsistent
from mapstorch.parameters.table import SHAPE_PARAMETER_NAMES
from mapstorch.synthetic import simulate_spectrum


def _start(sim) -> dict[str, float]:
    """The true shape parameters, as an override file would give them."""
    return {n: float(v) for n, v in sim.params.to_dict().items() if n in SHAPE_PARAMETER_NAMES}


def _sim(counts, e0, seed=0, **kw):
    params = {"COHERENT_SCT_ENERGY": e0, "MAX_ENERGY_TO_FIT": e0 + 1.0,
              "ENERGY_SLOPE": max(0.00952, (e0 + 2.5) / 2048)}
    return simulate_spectrum(counts=counts, params=params, seed=seed, **kw)


# ----------------------------------------------------------------------------- candidates
def test_default_candidates_follow_the_edges_and_the_window():
    import xraylib

    c10 = default_candidates(10.0, 1.0, 11.0)
    # K lines need the K edge below the incident energy: Zn (9.66 keV) yes, Ge (11.10 keV) no
    assert xraylib.EdgeEnergy(30, xraylib.K_SHELL) < 10.0 < xraylib.EdgeEnergy(32, xraylib.K_SHELL)
    assert "Zn" in c10 and "Ge" not in c10
    # L lines need the L3 edge: Pb L3 is at 13.04 keV
    assert "Pb_L" not in c10 and "Pb_M" in c10 and "Pb_L" in default_candidates(15.0, 1.0, 16.0)
    # never proposed: noble gases but argon, technetium, promethium
    assert "Ar" in c10 and not {"Kr", "Tc_L", "Pm_L", "Xe_L"} & set(c10)
    # the window: Na Ka (1.04 keV) inside from 1.0 keV, not from 1.2 keV
    assert "Na" in c10 and "Na" not in default_candidates(10.0, 1.2, 11.0)
    with pytest.raises(InputError):
        default_candidates(-1.0)


def test_pileup_candidates_are_pairs_of_strong_k_families_inside_the_window():
    pairs = pileup_candidates(["Fe", "Ca", "Pb_L"], 10.0, 1.0, 11.0)
    assert pairs == ["Ca_Ca"]  # Ca+Fe = 10.1 keV and Fe+Fe = 12.8 keV lie above the incident energy
    assert set(pileup_candidates(["Fe", "Ca"], 20.0, 1.0, 21.0)) == {"Ca_Ca", "Ca_Fe", "Fe_Fe"}
    # potassium's symbol is also a shell name: its pairs are named with K first, so that every
    # name reads back as the pile-up it is; K + K has no MAPS name and is left out
    from mapstorch.physics.elements import parse_component

    pairs = pileup_candidates(["Ar", "K", "Ca"], 10.0, 1.0, 11.0)
    assert "K_Ar" in pairs and "K_Ca" in pairs and "K_K" not in pairs and "Ar_K" not in pairs
    assert all(parse_component(n).is_pileup and parse_component(n).name == n for n in pairs)


# ----------------------------------------------------------------------------- decisions
def test_a_user_list_with_decoys_keeps_the_true_families():
    """A list with several absent families whose lines overlap the others' (Co, V, Pb M, Mo L)
    once drove the all-candidates linear fit off its optimum (flat start, capped iterations):
    the dispersion exploded and majors were dropped. The fits now start from the weighted
    least-squares amplitudes."""
    sim = simulate_spectrum(seed=0)
    truth = [n for n in sim.lines.names if "_" not in n or n.endswith("_L")]
    g = guess_elements(sim.counts, params=_start(sim), candidates=truth + ["Co", "V", "Pb_M", "Mo_L"],
                       pileups=False)
    assert set(g.present) == set(truth), sorted(g.present)
    assert g.dispersion < 10


def test_demo_spectrum_elements_are_found_exactly():
    sim = simulate_spectrum(seed=0)
    g = guess_elements(sim.counts, params=_start(sim))
    truth = {n for n in sim.lines.names if "_" not in n or n.endswith("_L")}  # its Si_Cl pile-up is tiny
    assert set(g.present) == truth, (sorted(g.present), sorted(truth))
    fe = g.evidence("Fe")
    assert fe.present and fe.decision == "present" and fe.significance > 100
    assert 0.9 < fe.secondary_ratio < 1.1  # Kb as tabulated (free within 25 % for a major)
    assert fe.counts == pytest.approx(sim.truth_counts["Fe"], rel=0.02)
    co = g.evidence("Co")  # absent: what adding it would give, with its standard error
    assert not co.present and math.isfinite(co.counts_stderr) and co.counts_stderr > 0
    assert abs(co.counts) < 5 * co.counts_stderr
    d = g.to_dict()
    assert d["present"] == g.present and {c["name"] for c in d["candidates"]} >= truth
    json.dumps(d)  # JSON-ready


@pytest.mark.parametrize("present, absent", [
    (["Pb_L"], "As"),   # As Ka 10.54 keV under Pb La 10.55 keV
    (["As"], "Pb_L"),
    (["Mo_L"], "S"),    # S Ka 2.31 / Mo La 2.29 / Pb Ma 2.35 keV
    (["S"], "Mo_L"),
])
def test_overlapping_families_are_told_apart(present, absent):
    counts = {**{p: 3e5 for p in present}, "Fe": 2e5, "Ca": 1e5}
    sim = _sim(counts, 15.0, seed=4)
    cands = ["As", "Pb_L", "Pb_M", "S", "Mo_L", "Fe", "Ca", "Zn"]
    g = guess_elements(sim.counts, params=_start(sim), candidates=cands, pileups=False)
    assert set(present) <= set(g.present) and absent not in g.present, g.summary()
    assert g.evidence(absent).decision in ("absent", "uncertain")


def test_weak_neighbour_of_a_major_is_found():
    # V Ka (4.95 keV) sits on Ti Kb (4.93 keV); Fe Ka (6.40) next to Mn Kb (6.49)
    sim = _sim({"Ti": 6e5, "V": 2e4, "Mn": 5e5, "Fe": 3e4, "Ca": 1e5}, 12.0, seed=2)
    g = guess_elements(sim.counts, params=_start(sim), pileups=False)
    assert {"Ti", "V", "Mn", "Fe", "Ca"} <= set(g.present), g.summary()


def test_threshold_controls_the_decision():
    # a trace element with an expected significance of about 6
    sim = _sim({"Fe": 5e5, "Ca": 2e5, "Cu": 600}, 10.0, seed=5)
    cands = ["Fe", "Ca", "Cu", "Zn", "Ni"]
    loose = guess_elements(sim.counts, params=_start(sim), candidates=cands, significance=3.0, pileups=False)
    strict = guess_elements(sim.counts, params=_start(sim), candidates=cands, significance=20.0, pileups=False)
    assert "Cu" in loose.present and "Cu" not in strict.present
    assert strict.evidence("Cu").decision in ("absent", "uncertain")
    assert math.isclose(loose.evidence("Cu").significance, strict.evidence("Cu").significance, rel_tol=0.2)


def test_secondary_ratio_rule():
    assert not _inconsistent(1.0, 0.05)
    assert _inconsistent(0.1, 0.05)  # Kb missing
    assert not _inconsistent(0.1, 0.5)  # too uncertain to say
    assert _inconsistent(3.0, 0.2)


def test_bad_input_is_a_clear_error():
    sim = simulate_spectrum(seed=0)
    with pytest.raises(InputError, match="significance"):
        guess_elements(sim.counts, params=_start(sim), significance=0.0)
    from mapstorch.errors import ElementError

    with pytest.raises(ElementError, match="Xx"):
        guess_elements(sim.counts, params=_start(sim), candidates="Fe,Xx")
    with pytest.raises(InputError, match="incident energy or an energy calibration"):
        guess_elements(sim.counts)


# ----------------------------------------------------------------------------- CLI
def test_cli_guess_writes_json_plot_and_override(tmp_path):
    from mapstorch.cli.main import main
    from mapstorch.io.override import new_override, read_override

    sim = simulate_spectrum(seed=1)
    np.save(tmp_path / "spectrum.npy", sim.counts)
    new_override(sim.params).write(tmp_path / "maps_fit_parameters_override.txt")
    out = tmp_path / "out"
    out.mkdir()
    code = main(["guess", str(tmp_path / "spectrum.npy"), "--override", str(tmp_path / "maps_fit_parameters_override.txt"),
                 "--json", str(out / "g.json"), "--plot", str(out / "g.png"),
                 "--out-override", str(out / "maps_fit_parameters_override.txt"), "--no-progress"])
    assert code == 0
    d = json.loads((out / "g.json").read_text())
    assert {"Fe", "Ca", "Zn"} <= set(d["present"])
    fe = next(c for c in d["candidates"] if c["name"] == "Fe")
    assert fe["present"] and fe["counts"] > 0 and fe["significance"] > 10
    assert (out / "g.png").stat().st_size > 10_000
    back = read_override(out / "maps_fit_parameters_override.txt")
    assert [c for c in back.components if "_" not in c or c.endswith(("_L", "_M"))] == d["present"]


def test_cli_guess_bad_output_folder_fails_before_work(tmp_path, capsys):
    from mapstorch.cli.main import main

    np.save(tmp_path / "s.npy", simulate_spectrum(seed=0).counts)
    code = main(["guess", str(tmp_path / "s.npy"), "--incident-energy", "10", "--json", str(tmp_path / "no" / "x.json")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_guess_2ide_spectrum_agrees_with_the_beamline_list(tmp_path):
    from conftest import require_shared

    from mapstorch.io import open_dataset
    from mapstorch.io.override import read_override

    folder = require_shared("xrfmaps-2ide")
    override = read_override(folder / "maps_fit_parameters_override.txt")
    with open_dataset(folder / "mda" / "2xfm_0010.mda", override=override) as ds:
        spectrum = ds.integrated("sum")
    g = guess_elements(spectrum, params=override)
    # the beamline's strong elements are all found
    assert {"Si", "Ar", "Ca", "Fe", "Cu"} <= set(g.present), g.summary()
    # and the La L lines its list lacks (peaks at 4.65 and 5.04 keV) are reported
    assert "La_L" in g.present
    assert len(g.present) <= 15
