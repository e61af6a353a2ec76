"""The line library: xraylib and XRF-Maps csv sources, adjustments, pile-ups, errors."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import xraylib

from mapstorch.errors import ElementError, InputError, LibraryError
from mapstorch.io.override import read_override
from mapstorch.physics.elements import parse_component
from mapstorch.physics.lines import (
    KIND_K_ALPHA,
    KIND_K_BETA,
    KIND_L,
    KIND_M,
    branching_factors,
    build_line_table,
    xrfmaps_source,
)

# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name,canon,shell,partner",
    [("Fe", "Fe", "K", None), ("fe_k", "Fe", "K", None), ("Pb_L", "Pb_L", "L", None),
     ("Au_M", "Au_M", "M", None), ("Si_Cl", "Si_Cl", "K", "Cl"), ("Si_Si", "Si_Si", "K", "Si")],
)
def test_parse_component(name, canon, shell, partner):
    c = parse_component(name)
    assert (c.name, c.shell, c.partner) == (canon, shell, partner)


@pytest.mark.parametrize("bad", ["", "Xx", "Fe_Q", "Fe_N", "Pb_L_Fe", "Si_Cl_Ca", "Pb_L_Au_M"])
def test_parse_component_rejects(bad):
    with pytest.raises(ElementError):
        parse_component(bad)


# ----------------------------------------------------------------------------- xraylib source


def test_xraylib_known_energies():
    t = build_line_table(["Fe", "Cu", "Pb_L", "Au_M"])
    assert t.lines_of("Fe")["energy_kev"][0] == pytest.approx(6.404, abs=2e-3)  # Fe Ka1
    assert t.lines_of("Cu")["energy_kev"][0] == pytest.approx(8.048, abs=2e-3)  # Cu Ka1
    assert t.lines_of("Pb_L")["energy_kev"][0] == pytest.approx(10.551, abs=2e-3)  # Pb La1
    assert t.lines_of("Au_M")["energy_kev"][0] == pytest.approx(2.123, abs=3e-3)  # Au Ma1


def test_xraylib_ratios_follow_maps_convention():
    """K: rate / rate(K-L3); L: rate / sum(listed rates of the subshell), relative to La1."""
    z = 82
    k = build_line_table(["Pb"]).lines_of("Pb")
    rate = lambda line: xraylib.RadRate(z, line)  # noqa: E731
    kl3 = rate(xraylib.KL3_LINE)
    assert k["ratio"][1] == pytest.approx(rate(xraylib.KL2_LINE) / kl3, rel=1e-12)
    assert k["ratio"][2] == pytest.approx((rate(xraylib.KM2_LINE) + rate(xraylib.KM3_LINE)) / kl3, rel=1e-12)
    assert k["energy_kev"][2] == pytest.approx(xraylib.LineEnergy(z, xraylib.KM3_LINE), rel=1e-12)
    lines = build_line_table(["Pb_L"]).lines_of("Pb_L")
    l3 = sum(rate(getattr(xraylib, f"{t}_LINE")) for t in ("L3M5", "L3M4", "L3N5", "L3M1"))
    l1 = sum(rate(getattr(xraylib, f"{t}_LINE")) for t in ("L1M3", "L1M2", "L1N2", "L1N3", "L1O3"))
    la1 = rate(xraylib.L3M5_LINE) / l3
    names = list(lines["line"])
    assert lines["ratio"][names.index("Lb3")] == pytest.approx(rate(xraylib.L1M3_LINE) / l1 / la1, rel=1e-12)
    m = build_line_table(["Pb_M"]).lines_of("Pb_M")
    assert np.all(m["ratio"] == 1.0)


def test_every_element_with_lines_in_range_builds():
    """Any element whose reference line lies in 0.5-100 keV has a K, L or M family."""
    built = 0
    for z in range(11, 99):
        sym = xraylib.AtomicNumberToSymbol(z)
        for shell, line in (("K", xraylib.KL3_LINE), ("L", xraylib.L3M5_LINE), ("M", xraylib.M5N7_LINE)):
            try:
                e = xraylib.LineEnergy(z, line)
            except ValueError:
                continue
            if 0.5 <= e <= 100.0:
                name = sym if shell == "K" else f"{sym}_{shell}"
                t = build_line_table([name])
                assert t.n_lines >= 1 and np.all(t.energy_kev > 0) and np.all(np.isfinite(t.mu_fraction))
                built += 1
    assert built > 180


def test_line_kinds_and_gating_edges():
    t = build_line_table(["Fe", "Pb_L", "Au_M"])
    fe = t.component == 0
    assert set(t.kind[fe].tolist()) == {KIND_K_ALPHA, KIND_K_BETA}
    assert np.all(t.gate_edge_kev[fe] == pytest.approx(xraylib.EdgeEnergy(26, xraylib.K_SHELL)))
    pb = t.lines_of("Pb_L")
    names = list(pb["line"])
    assert pb["gate_edge_kev"][names.index("La1")] == pytest.approx(xraylib.EdgeEnergy(82, xraylib.L3_SHELL))
    assert pb["gate_edge_kev"][names.index("Lb1")] == pytest.approx(xraylib.EdgeEnergy(82, xraylib.L2_SHELL))
    assert pb["gate_edge_kev"][names.index("Lb3")] == pytest.approx(xraylib.EdgeEnergy(82, xraylib.L1_SHELL))
    assert np.all(t.kind[t.component == 1] == KIND_L) and np.all(t.kind[t.component == 2] == KIND_M)
    assert np.all(t.lines_of("Au_M")["gate_edge_kev"] == pytest.approx(xraylib.EdgeEnergy(79, xraylib.M1_SHELL)))


def test_pileup_lines():
    t = build_line_table(["Si", "Cl", "Si_Cl", "Si_Si"])
    si, cl = t.lines_of("Si"), t.lines_of("Cl")
    pu = t.lines_of("Si_Cl")
    assert list(pu["line"]) == ["Ka1+Ka1", "Ka1+Kb1", "Kb1+Kb1", "Kb1+Ka1"]
    assert pu["energy_kev"][0] == pytest.approx(si["energy_kev"][0] + cl["energy_kev"][0])
    assert pu["ratio"][2] == pytest.approx(si["ratio"][2] * cl["ratio"][2])
    assert np.all(pu["gate_edge_kev"] == pytest.approx(si["energy_kev"][0] + cl["energy_kev"][0]))
    assert len(t.lines_of("Si_Si")["line"]) == 3  # the Kb1+Ka1 line is the Ka1+Kb1 line for A == B


def test_mu_fraction_conventions():
    maps = build_line_table(["Fe"]).lines_of("Fe")["mu_fraction"][0]
    phys = build_line_table(["Fe"], mu_convention="physical").lines_of("Fe")["mu_fraction"][0]
    e = build_line_table(["Fe"]).lines_of("Fe")["energy_kev"][0]
    assert phys == pytest.approx(xraylib.CS_Photo(14, e), rel=1e-12)
    assert maps == pytest.approx(phys * xraylib.AtomicWeight(14) / xraylib.AtomicWeight(26), rel=1e-12)
    ge = build_line_table(["Fe"], detector="Ge", mu_convention="physical").lines_of("Fe")["mu_fraction"][0]
    assert ge == pytest.approx(xraylib.CS_Photo(32, e), rel=1e-12)


def test_build_errors():
    with pytest.raises(InputError, match="twice"):
        build_line_table(["Fe", "Fe_K"])
    with pytest.raises(InputError, match="detector"):
        build_line_table(["Fe"], detector="CdTe")
    with pytest.raises(ElementError):
        build_line_table(["Ca_M"])  # no M lines inside 0.5-100 keV
    with pytest.raises(InputError):
        build_line_table([])
    with pytest.raises(InputError, match="WIDTH_MULTIPLIER"):
        build_line_table(["Fe"], width_multipliers={"Fe": -1.0})


def test_branching_factors_combine_like_xrfmaps():
    f = branching_factors(
        ratio_l=[("Gd_L", (1, 0.48, 0.59, 0.98, 0.31, 0.08, 0.636, 1, 0.3, 1, 1, 1))],
        family_l=[("Gd_L", (0.5, 2.0, 3.0))],
        ratio_k=[("Fe", (1, 1, 1.2, 1)), ("Fe", (1, 2, 1, 1))],
    )
    assert f["Fe"].tolist() == [1, 2, 1.2, 1]
    gd = f["Gd_L"]
    ratio = np.array([1, 0.48, 0.59, 0.98, 0.31, 0.08, 0.636, 1, 0.3, 1, 1, 1])
    family = np.ones(12)
    family[[4, 5, 7, 8, 9]] = 0.5
    family[[2, 6, 11]] = 2.0
    family[[0, 1, 3, 10]] = 3.0
    assert gd == pytest.approx(ratio * family)
    with pytest.raises(InputError):
        branching_factors(ratio_k=[("Fe", (1, 1, 1))])
    with pytest.raises(InputError):
        branching_factors(ratio_k=[("Pb_L", (1, 1, 1, 1))])


def test_branching_applied_la1_and_ma1_stay_one():
    t0 = build_line_table(["Fe", "Pb_L", "Au_M"])
    f = {"Fe": [2.0, 1.0, 1.5, 1.0], "Pb_L": [5.0] + [2.0] * 11, "Au_M": [7.0, 3.0, 1.0, 1.0]}
    t1 = build_line_table(["Fe", "Pb_L", "Au_M"], branching=f)
    assert t1.lines_of("Fe")["ratio"][0] == pytest.approx(2.0)  # Ka1 takes its factor (XRF-Maps)
    assert t1.lines_of("Fe")["ratio"][2] == pytest.approx(1.5 * t0.lines_of("Fe")["ratio"][2])
    assert t1.lines_of("Pb_L")["ratio"][0] == 1.0
    assert t1.lines_of("Pb_L")["ratio"][1:] == pytest.approx(2.0 * t0.lines_of("Pb_L")["ratio"][1:])
    assert t1.lines_of("Au_M")["ratio"][:2].tolist() == [1.0, 3.0]


# ----------------------------------------------------------------------------- XRF-Maps csv source


def _csv_rows(path):
    out = {}
    with open(path, newline="") as fh:
        for row in csv.reader(fh):
            if row and row[0].strip()[:1].isdigit():
                out[row[1].strip()] = row
    return out


K_NAMES = ["Ka1", "Ka2", "Kb1", "Kb2"]
L_NAMES = ["La1", "La2", "Lb1", "Lb2", "Lb3", "Lb4", "Lg1", "Lg2", "Lg3", "Lg4", "Ll", "Ln"]


def _expected_from_csv(row, shell, factors):
    """XRF-Maps' energy_ratios for one family, straight from the csv columns (independent code)."""
    col = {"K": 2, "L": 6, "M": 18}[shell]
    n = {"K": 4, "L": 12, "M": 4}[shell]
    energies = [float(v) for v in row[col:col + n]]
    yields = [float(v) for v in row[col + 25:col + 25 + n]]
    f = list(factors) if factors is not None else [1.0] * n
    out = []
    for i in range(n):
        if shell == "K":
            ratio = (1.0 if i == 0 else yields[i] / yields[0]) * f[i]
        elif shell == "L":
            ratio = 1.0 if i == 0 else yields[i] / yields[0] * f[i]
        else:
            ratio = 1.0 if i == 0 else (f[i] if yields[i] == 0 else yields[i] / yields[0] * f[i])
        if energies[i] != 0.0 and ratio != 0.0:
            out.append((energies[i], ratio))
    return out


def test_csv_tables_with_2ide_override_equal_xrfmaps(csv_source, xrfmaps_reference, override_2ide):
    """Line energies and ratios from the MAPS csv + the 2-ID-E adjustments, to 1e-6 relative."""
    ov = read_override(override_2ide)
    extra = ["Na", "Mg", "Al", "I_L", "Gd_L", "Sn_L", "Pt_L", "Pb_L", "Au_M", "Ba_L", "U_M"]
    comps = ov.components + [e for e in extra if e not in ov.components]
    table = build_line_table(comps, source=csv_source, branching=ov.branching_factors())
    rows = _csv_rows(xrfmaps_reference / "xrf_library.csv")
    factors = ov.branching_factors()
    for name in comps:
        comp = parse_component(name)
        got = table.lines_of(name)
        want = _expected_from_csv(rows[comp.element], comp.shell, factors.get(comp.name))
        assert len(got["energy_kev"]) == len(want), name
        for e, r, (we, wr) in zip(got["energy_kev"], got["ratio"], want):
            assert e == pytest.approx(we, rel=1e-6), name
            assert r == pytest.approx(wr, rel=1e-6), name
    # the adjustments really apply: Sn_L keeps only La1, Fe Kb1 is scaled by 1.2
    assert list(table.lines_of("Sn_L")["line"]) == ["La1"]
    fe = table.lines_of("Fe")
    raw = _expected_from_csv(rows["Fe"], "K", None)
    assert fe["ratio"][2] == pytest.approx(1.2 * raw[2][1], rel=1e-12)


def test_csv_mu_fraction_is_henke_photoabsorption(csv_source):
    """XRF-Maps' mu_fraction = 2 r_e lambda N_A f2 / A(element): check it against xraylib (Si)."""
    t = build_line_table(["Fe", "Ca", "Zn"], source=csv_source, mu_convention="physical")
    for name in ("Fe", "Ca", "Zn"):
        d = t.lines_of(name)
        for e, mu in zip(d["energy_kev"], d["mu_fraction"]):
            assert mu == pytest.approx(xraylib.CS_Photo(14, e), rel=0.05)  # Henke vs xraylib data


def test_csv_source_errors(tmp_path, xrfmaps_reference):
    with pytest.raises(LibraryError, match="not found"):
        xrfmaps_source(tmp_path / "missing.csv", xrfmaps_reference / "henke.xdr")
    bad = tmp_path / "bad.csv"
    bad.write_text("26,Fe,6.4,oops\n")
    with pytest.raises(LibraryError, match="line 1"):
        xrfmaps_source(bad, xrfmaps_reference / "henke.xdr")
    truncated = tmp_path / "henke.xdr"
    truncated.write_bytes((xrfmaps_reference / "henke.xdr").read_bytes()[:5000])
    with pytest.raises(LibraryError, match="truncated"):
        xrfmaps_source(xrfmaps_reference / "xrf_library.csv", truncated)
    with pytest.raises(ElementError):
        build_line_table(["Li"], source=xrfmaps_source(xrfmaps_reference / "xrf_library.csv",
                                                      xrfmaps_reference / "henke.xdr"))


# Largest differences between the xraylib-built table and XRF-Maps' csv, per family, over the
# elements both offer (Z = 11..92): over all common lines ("all": absolute energy and ratio
# differences) and over the lines that matter in practice ("strong": ratio >= 0.05, energy
# <= 30 keV; relative ratio difference). Pinned about 5 % above the measured values so that a
# change of either source is noticed; the numbers are documented in docs/line-library.md.
PINNED = {
    "K": {"all_de": 0.107, "all_dr": 0.079, "strong_de": 0.0046, "strong_rel": 1.08},
    "L": {"all_de": 0.036, "all_dr": 0.58, "strong_de": 0.017, "strong_rel": 0.60},
    "M": {"all_de": 0.0107, "all_dr": 0.0, "strong_de": 0.0107, "strong_rel": 0.0},
}


def family_differences(csv_source):
    out = {s: {k: (0.0, "") for k in PINNED[s]} for s in PINNED}

    def bump(shell, key, value, where):
        if value > out[shell][key][0]:
            out[shell][key] = (float(value), where)

    for z in range(11, 93):
        sym = xraylib.AtomicNumberToSymbol(z)
        for shell in PINNED:
            name = sym if shell == "K" else f"{sym}_{shell}"
            try:
                a = build_line_table([name]).lines_of(name)
                b = build_line_table([name], source=csv_source).lines_of(name)
            except ElementError:
                continue
            for line in sorted(set(a["line"]) & set(b["line"])):
                ia, ib = list(a["line"]).index(line), list(b["line"]).index(line)
                de = abs(a["energy_kev"][ia] - b["energy_kev"][ib])
                dr = abs(a["ratio"][ia] - b["ratio"][ib])
                where = f"{name} {line}"
                bump(shell, "all_de", de, where)
                bump(shell, "all_dr", dr, where)
                if b["energy_kev"][ib] <= 30.0 and b["ratio"][ib] >= 0.05:
                    bump(shell, "strong_de", de, where)
                    bump(shell, "strong_rel", dr / b["ratio"][ib], where)
    return out


def test_xraylib_vs_xrfmaps_csv_differences_are_pinned(csv_source):
    diffs = family_differences(csv_source)
    for shell, d in diffs.items():
        print(shell, {k: (round(v, 4), w) for k, (v, w) in d.items()})
        for key, (value, where) in d.items():
            assert value <= PINNED[shell][key] + 1e-12, (shell, key, value, where)
            assert value >= 0.9 * PINNED[shell][key] - 1e-12, (shell, key, value, "pinned value is stale")
