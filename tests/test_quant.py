"""Quantification: standards, the standard's measurement, the calibration and quantified maps."""

from __future__ import annotations

import json

import pytest
from conftest import require_shared

from mapstorch.errors import InputError
from mapstorch.quant.standards import read_standards


def test_read_xrfmaps_standardinfo():
    path = require_shared("xrfmaps-2ide", "maps_standardinfo.txt")
    (std,) = read_standards(path)
    assert std.weights == {"Ca": 1.931, "Fe": 0.504, "Cu": 0.284}
    assert std.file.endswith("mda/axo_std.mda")  # XRF-Maps keeps raw files in mda/


def test_read_our_json_with_units_and_uncertainty(tmp_path):
    (tmp_path / "std.mda").write_bytes(b"")
    path = tmp_path / "std.json"
    path.write_text(json.dumps({"name": "film", "file": "std.mda", "units": "ng/mm2",
                                "elements": {"Fe": 5.04, "pb_l": 10.0}, "uncertainty": {"Fe": 0.2}}))
    (std,) = read_standards(path)
    # 1 ng/mm2 = 0.1 ug/cm2; Pb measured by its L lines keeps XRF-Maps' family name
    assert std.weights == pytest.approx({"Fe": 0.504, "Pb_L": 1.0})
    assert std.uncertainty == pytest.approx({"Fe": 0.02})
    assert std.file == str(tmp_path / "std.mda")


@pytest.mark.parametrize("text, match", [
    ("FILENAME: a.mda\nELEMENTS_IN_STANDARD: Ca, Fe\nWEIGHT: 1.0\n", "2 element"),
    ("FILENAME: a.mda\nELEMENTS_IN_STANDARD: Ca, Xx\nWEIGHT: 1.0, 2.0\n", "Xx"),
    ("FILENAME: a.mda\nELEMENTS_IN_STANDARD: Ca\nWEIGHT: -1\n", "positive"),
    ("FILENAME: a.mda\nELEMENTS_IN_STANDARD: Si_Cl\nWEIGHT: 1\n", "pile-up"),
    ("FILENAME: a.mda\nWEIGHT: 1\n", "ELEMENTS_IN_STANDARD"),
    ("ELEMENTS_IN_STANDARD: Ca\n", "FILENAME"),
    ("nothing here\n", "FILENAME"),
])
def test_bad_standardinfo_is_a_clear_error(tmp_path, text, match):
    path = tmp_path / "maps_standardinfo.txt"
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        read_standards(path)


def test_bad_json_is_a_clear_error(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('{"file": "a.mda", "elements": {"Fe": 1}, "units": "furlongs"}')
    with pytest.raises(InputError, match="units"):
        read_standards(path)
    path.write_text('{"file": "a.mda", "elements": {"Fe": 1}, "uncertainty": {"Ca": 1}}')
    with pytest.raises(InputError, match="does not list"):
        read_standards(path)
    path.write_text("{not json")
    with pytest.raises(InputError, match="JSON"):
        read_standards(path)
    with pytest.raises(InputError, match="no such"):
        read_standards(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- physics
def test_physics_terms_equal_xraylib_computed_here():
    import math

    import xraylib as xl

    from mapstorch.quant.physics import Geometry, XraylibTables, element_terms, model_value

    g = Geometry(incident_energy=17.0, be_window=8.0, ge_dead_layer=0.0, chip=350.0, air=10000.0, detector="Si")
    t = element_terms(XraylibTables(), 26, "K", g)
    e = xl.LineEnergy(26, xl.KA1_LINE)
    jk = xl.JumpFactor(26, xl.K_SHELL)
    assert t["absorption"] == pytest.approx(1 - math.exp(-xl.CS_Photo(26, 17.1) * 1e-5 * (jk - 1) / jk), rel=1e-9)
    assert t["yield"] == pytest.approx(xl.FluorYield(26, xl.K_SHELL), rel=1e-9)
    assert t["transmission_Be"] == pytest.approx(math.exp(-xl.CS_Photo(4, e) * 1.848 * 8e-4), rel=1e-9)
    assert t["transmission_through_Si_detector"] == pytest.approx(math.exp(-xl.CS_Photo(14, e) * 2.33 * 0.035),
                                                                  rel=1e-9)
    w = {7: 0.7808 * xl.AtomicWeight(7), 8: 0.2095 * xl.AtomicWeight(8), 18: 0.0093 * xl.AtomicWeight(18)}
    mu_air = sum(m / sum(w.values()) * xl.CS_Photo(z, e) for z, m in w.items())
    assert t["transmission_through_air"] == pytest.approx(math.exp(-mu_air * 1.2047e-3 * 1.0), rel=1e-9)
    assert model_value(t) == pytest.approx(t["absorption"] * t["transmission_Be"] * t["yield"]
                                           * (1 - t["transmission_through_Si_detector"]) * t["transmission_through_air"])
    # L shell of Pb at 17 keV, above its L3, L2 and L1 edges (13.0, 15.2, 15.9 keV): divided by both jumps
    tl = element_terms(XraylibTables(), 82, "L", g)
    j3, j2, j1 = (xl.JumpFactor(82, s) for s in (xl.L3_SHELL, xl.L2_SHELL, xl.L1_SHELL))
    sf = (j3 - 1) / j3 / (j2 * (j1 if 17.0 > xl.EdgeEnergy(82, xl.L1_SHELL) else 1.0))
    assert tl["absorption"] == pytest.approx(1 - math.exp(-xl.CS_Photo(82, 17.1) * 1e-5 * sf), rel=1e-9)
    assert tl["yield"] == pytest.approx(xl.FluorYield(82, xl.L3_SHELL) * xl.RadRate(82, xl.LA1_LINE), rel=1e-9)
    # K shell not excited below its edge
    assert element_terms(XraylibTables(), 40, "K", g)["absorption"] == 0.0  # Zr K edge 18.0 keV


def test_physics_with_xrfmaps_tables_equals_xrfmaps_output():
    """XRF-Maps' Element_Info for the AXO standard (shared/docs/formats dump): absorption Ca
    8.042910e-4, Fe 1.4515764e-3, Cu 1.8366507e-3 and the K/L/M sums of its NNLS/US_IC curve
    (0.039676, 0.048694, 0.0020 at scale 7.1894392) -- with XRF-Maps' own tables."""
    from mapstorch.io import read_override
    from mapstorch.quant.physics import Geometry, XrfMapsTables, curve_values, element_terms

    ref = require_shared("xrfmaps-reference")
    ovr = read_override(require_shared("xrfmaps-2ide", "maps_fit_parameters_override.txt"))
    tables = XrfMapsTables(ref / "xrf_library.csv", ref / "henke.xdr")
    g = Geometry.from_override(ovr)
    for z, value in ((20, 8.042910165361183e-4), (26, 1.4515764164285683e-3), (29, 1.8366506785263415e-3)):
        assert element_terms(tables, z, "K", g)["absorption"] == pytest.approx(value, rel=2e-4)  # atomic weights
    curve = curve_values(tables, g) * 7.1894392
    assert curve.sum(1) == pytest.approx([0.039676, 0.048694, 0.0020], rel=2e-3, abs=5e-5)


# ----------------------------------------------------------------------------- calibration
@pytest.fixture(scope="module")
def axo_calibration():
    from mapstorch.io import read_override
    from mapstorch.physics.lines import xrfmaps_source
    from mapstorch.quant.calibrate import calibrate
    from mapstorch.quant.measure import measure_standard
    from mapstorch.quant.physics import Geometry, XrfMapsTables

    (std,) = read_standards(require_shared("xrfmaps-2ide", "maps_standardinfo.txt"))
    ovr = read_override(require_shared("xrfmaps-2ide", "maps_fit_parameters_override.txt"))
    ref = require_shared("xrfmaps-reference")
    # XRF-Maps' own tables, for the fit of the standard and for the physics: parity
    m = measure_standard(std, ovr, detector=0, line_source=xrfmaps_source(ref / "xrf_library.csv", ref / "henke.xdr"))
    return calibrate(m, Geometry.from_override(ovr), XrfMapsTables(ref / "xrf_library.csv", ref / "henke.xdr"))


def test_calibration_of_the_axo_standard_is_xrfmaps_within_a_percent(axo_calibration):
    """XRF-Maps' NNLS calibration of this standard (detector 0): e_cal_ratio against US_IC
    Ca 1.14962e-3, Fe 3.14887e-3; calib_curve_val Ca 9.75392e-4, Fe 3.70034e-3; scale 7.18944."""
    c = axo_calibration["US_IC"]
    assert c.standard_value == pytest.approx(312814.944, rel=1e-6)  # mean US_IC per pixel
    e = dict(zip(c.elements, c.info[:, 8]))
    curve = dict(zip(c.elements, c.info[:, 9]))
    assert e["Ca"] == pytest.approx(1.14962e-3, rel=0.01) and e["Fe"] == pytest.approx(3.14887e-3, rel=0.01)
    assert curve["Ca"] == pytest.approx(9.75392e-4, rel=0.01) and curve["Fe"] == pytest.approx(3.70034e-3, rel=0.01)
    assert c.scale == pytest.approx(7.18944, rel=0.02)
    assert c.factor("Fe") == pytest.approx(curve["Fe"])  # the curve at Z = 26, K shell
    sr = axo_calibration["SR_Current"]
    assert dict(zip(sr.elements, sr.info[:, 8]))["Ca"] == pytest.approx(3.5227347, rel=0.01)


def test_the_standard_quantified_returns_its_certificate_within_the_uncertainty(axo_calibration):
    c = axo_calibration["US_IC"]
    certified = {"Ca": 1.931, "Fe": 0.504, "Cu": 0.284}
    for el, (value, err) in c.recovered().items():
        assert abs(value - certified[el]) <= 1.5 * err, (el, value, err)
        assert err / value < 0.3
    # the one-scale curve misses the three elements by about 17 %: that is in the uncertainty
    assert 0.05 < c.misfit < 0.3


def test_quantify_cli_writes_the_xrfmaps_quantification(tmp_path):
    import h5py
    import numpy as np

    from mapstorch.cli.main import main

    folder = require_shared("xrfmaps-2ide")
    maps = tmp_path / "2xfm_0010.h5"
    assert main(["map", str(folder / "mda" / "2xfm_0010.mda"), "--detector", "0", "--out", str(maps),
                 "--no-progress"]) == 0
    out = tmp_path / "q.h5"
    plot = tmp_path / "cal.png"
    assert main(["quantify", str(maps), "--standard-info", str(folder / "maps_standardinfo.txt"), "--detector", "0",
                 "--out", str(out), "--calibration-plot", str(plot), "--override",
                 str(folder / "maps_fit_parameters_override.txt")]) == 0
    assert plot.stat().st_size > 10_000
    with h5py.File(out) as f:
        q = f["MAPS/Quantification"]
        assert q["Number_Of_Standards"][0] == 1
        assert [n.decode() for n in q["Standard0/Element_Weights_Names"][()]] == ["Ca", "Fe", "Cu"]
        cal = q["Calibration/NNLS"]
        assert cal["Calibration_Curve_US_IC"].shape == (3, 100)
        assert cal["US_IC_Element_Info_Values"].shape == (3, 10)
        g = f["MAPS/XRF_Analyzed/NNLS"]
        names = [n.decode().strip() for n in g["Channel_Names"][()]]
        quant = g["Quantified_US_IC"][()]
        assert g["Quantified_US_IC"].attrs["units"] == "ug/cm2"
        fe = names.index("Fe")
        us_ic = f["MAPS/Scalers/Values"][()][[n.decode().strip() for n in f["MAPS/Scalers/Names"][()]].index("US_IC")]
        curve_fe = cal["Calibration_Curve_US_IC"][0, 25]
        np.testing.assert_allclose(quant[fe], g["Counts_Per_Sec"][fe] / (curve_fe * us_ic), rtol=1e-5)
        assert np.isnan(quant[names.index("Num_Iter")]).all()
    # the maps file itself is unchanged, and bad input is a clear error
    with h5py.File(maps) as f:
        assert "Quantification" not in f["MAPS"]
    assert main(["quantify", str(maps), "--standard-info", str(tmp_path / "none.txt")]) == 2
    assert main(["quantify", str(maps), "--standard-info", str(folder / "maps_standardinfo.txt"),
                 "--routine", "SVD"]) == 2


def test_map_with_a_standard_quantifies_in_one_go(tmp_path):
    import h5py

    from mapstorch.cli.main import main

    folder = require_shared("xrfmaps-2ide")
    out = tmp_path / "m.h5"
    assert main(["map", str(folder / "mda" / "2xfm_0010.mda"), "--detector", "1", "--out", str(out), "--no-progress",
                 "--standard-info", str(folder / "maps_standardinfo.txt"), "--normalize", "DS_IC"]) == 0
    with h5py.File(out) as f:
        assert "Quantified_DS_IC" in f["MAPS/XRF_Analyzed/NNLS"]
        assert "Calibration_Curve_DS_IC" in f["MAPS/Quantification/Calibration/NNLS"]
    assert not list(tmp_path.glob("*.tmp"))
    # a bad standard description stops the run before the fit
    assert main(["map", str(folder / "mda" / "2xfm_0010.mda"), "--out", str(tmp_path / "x.h5"), "--no-progress",
                 "--standard-info", str(tmp_path / "missing.txt")]) == 2
    assert not (tmp_path / "x.h5").exists()


def test_the_standards_own_map_quantifies_to_its_certificate(tmp_path):
    """The issue's check: the AXO standard's map, quantified with its own calibration, gives its
    certified areal densities within the stated uncertainty (per pixel, median over the map)."""
    import h5py
    import numpy as np

    from mapstorch.cli.main import main

    folder = require_shared("xrfmaps-2ide")
    out = tmp_path / "axo.h5"
    assert main(["map", str(folder / "mda" / "axo_std.mda"), "--detector", "0", "--out", str(out), "--no-progress",
                 "--standard-info", str(folder / "maps_standardinfo.txt")]) == 0
    with h5py.File(out) as f:
        g = f["MAPS/XRF_Analyzed/NNLS"]
        names = [n.decode().strip() for n in g["Channel_Names"][()]]
        quant, err = g["Quantified_US_IC"][()], g["Quantified_US_IC_Stderr"][()]
    for el, certified in {"Ca": 1.931, "Fe": 0.504, "Cu": 0.284}.items():
        i = names.index(el)
        value, sigma = float(np.nanmedian(quant[i])), float(np.nanmedian(err[i]))
        assert abs(value - certified) <= 1.5 * sigma, (el, value, sigma)


def test_the_maps_app_shows_quantified_maps(tmp_path):
    import h5py
    import numpy as np

    from mapstorch.apps import mapping
    from mapstorch.cli.main import main

    folder = require_shared("xrfmaps-2ide")
    out = tmp_path / "q.h5"
    assert main(["map", str(folder / "mda" / "2xfm_0010.mda"), "--detector", "0", "--out", str(out), "--no-progress",
                 "--standard-info", str(folder / "maps_standardinfo.txt")]) == 0
    maps = mapping.read_maps(mapping.inspect_file(out))
    assert "ug/cm2 (US_IC)" in mapping.quantities(maps)
    images, unit = mapping.element_maps(maps, ["Fe"], "ug/cm2 (US_IC)")
    errors, _ = mapping.uncertainty_maps(maps, ["Fe"], "relative standard error", "ug/cm2 (US_IC)")
    with h5py.File(out) as f:
        g = f["MAPS/XRF_Analyzed/NNLS"]
        names = [n.decode().strip() for n in g["Channel_Names"][()]]
        np.testing.assert_allclose(images["Fe"], g["Quantified_US_IC"][names.index("Fe")], rtol=1e-6)
    assert unit == "ug/cm2" and np.nanmedian(errors["Fe"]) > 0.1  # the curve's 17 % misfit is in it


def test_several_standards_average_each_elements_factor(tmp_path):
    """As XRF-Maps: an element's factor is the mean over the standards that hold it. Two
    descriptions of the same AXO measurement, sharing Fe, calibrate exactly as the one."""
    import shutil

    import h5py
    import numpy as np

    from mapstorch.quant.apply import quantify_file

    folder = require_shared("xrfmaps-2ide")
    (tmp_path / "mda").mkdir()
    shutil.copy(folder / "mda" / "axo_std.mda", tmp_path / "mda" / "axo_std.mda")
    shutil.copy(folder / "maps_fit_parameters_override.txt", tmp_path / "maps_fit_parameters_override.txt")
    two = tmp_path / "two.txt"
    two.write_text("FILENAME: axo_std.mda\nELEMENTS_IN_STANDARD: Ca, Fe\nWEIGHT: 1.931, 0.504\n"
                   "FILENAME: axo_std.mda\nELEMENTS_IN_STANDARD: Fe, Cu\nWEIGHT: 0.504, 0.284\n")
    one = tmp_path / "one.txt"
    one.write_text("FILENAME: axo_std.mda\nELEMENTS_IN_STANDARD: Ca, Fe, Cu\nWEIGHT: 1.931, 0.504, 0.284\n")
    from mapstorch.cli.main import main

    maps = tmp_path / "m.h5"
    assert main(["map", str(folder / "mda" / "2xfm_0010.mda"), "--detector", "0", "--out", str(maps),
                 "--no-progress"]) == 0
    a = quantify_file(maps, one, None, detector=0, override=tmp_path / "maps_fit_parameters_override.txt")
    b = quantify_file(maps, two, tmp_path / "q.h5", detector=0, override=tmp_path / "maps_fit_parameters_override.txt")
    ca, cb = a.calibration["US_IC"], b.calibration["US_IC"]
    assert cb.elements == ["Ca", "Fe", "Cu"]
    np.testing.assert_allclose(cb.info[:, 8], ca.info[:, 8], rtol=1e-12)
    assert cb.scale == pytest.approx(ca.scale, rel=1e-12)
    with h5py.File(tmp_path / "q.h5") as f:
        assert f["MAPS/Quantification/Number_Of_Standards"][0] == 2
        assert "Standard1" in f["MAPS/Quantification"]


def test_an_l_family_in_the_standard_is_calibrated_on_the_l_curve():
    """A standard element measured by its L lines (``Pb_L``) is fitted as ``Pb_L`` and sits on
    the L curve; at 10 keV the Pb K shell is not excited at all."""
    from mapstorch.quant.calibrate import calibrate
    from mapstorch.quant.measure import StandardMeasurement
    from mapstorch.quant.physics import Geometry
    from mapstorch.quant.standards import Standard

    std = Standard("film", "x.mda", {"Fe": 0.5, "Pb_L": 1.0})
    m = StandardMeasurement(std, "nnls", "sum", {"Fe": 500.0, "Pb_L": 300.0}, {"Fe": 1.0, "Pb_L": 1.0},
                            {"US_IC": 1e5}, 100.0, 121)
    c = calibrate(m, Geometry(incident_energy=15.0))["US_IC"]
    assert c.elements == ["Fe", "Pb_L"] and all(c.info[:, 9] > 0)  # both on the curve, both in the fit
    assert c.factor("Pb_L") == pytest.approx(c.curve[1, 81]) and c.factor("Pb") == c.curve[0, 81] == 0.0
