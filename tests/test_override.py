"""Reading maps_fit_parameters_override.txt files."""

from __future__ import annotations

import pytest
from conftest import require_shared

from mapstorch.errors import OverrideFileError
from mapstorch.io.override import read_override


def test_2ide_override(override_2ide):
    ov = read_override(override_2ide)
    assert ov.elements == ["Si", "P", "S", "Cl", "Ar", "K", "Ca", "Ti", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn"]
    assert ov.pileups == []
    assert ov.detector == "Si"
    assert ov.parameters["ENERGY_OFFSET"] == -0.0041840752
    assert ov.parameters["ENERGY_SLOPE"] == 0.0095216077
    assert ov.upper["COMPTON_ANGLE"] == 170.0 and ov.lower["COMPTON_ANGLE"] == 70.0
    assert ov.parameters["COHERENT_SCT_ENERGY"] == 10.0
    assert len(ov.branching["ratio_k"]) == 19 and len(ov.branching["family_l"]) == 4
    assert ov.get("US_IC")[0].value.strip() == "2xfm:scaler3_cts1.B"
    ps = ov.parameter_set()
    assert float(ps["COMPTON_FWHM_CORR"]) == pytest.approx(1.5730172)
    table = ov.line_table()
    assert table.names == tuple(ov.elements)


@pytest.mark.parametrize("name", ["2ide", "8bmb", "9idb"])
def test_reference_override_files(name):
    path = require_shared("xrfmaps-reference", "override_parameters", f"{name}-maps_fit_parameters_override.txt")
    ov = read_override(path)
    assert ov.elements and "ENERGY_SLOPE" in ov.parameters
    ov.line_table()
    ov.parameter_set()


def test_bad_number_names_the_line(tmp_path):
    p = tmp_path / "maps_fit_parameters_override.txt"
    p.write_text("VERSION: 5.0\nELEMENTS_TO_FIT: Fe, Ca\nFWHM_OFFSET: 0.1x\n")
    with pytest.raises(OverrideFileError, match=r"line 3: FWHM_OFFSET: '0.1x' is not a number"):
        read_override(p)


def test_unknown_element_and_missing_file(tmp_path):
    p = tmp_path / "o.txt"
    p.write_text("ELEMENTS_TO_FIT: Fe, Xy\n")
    with pytest.raises(OverrideFileError, match="line 1.*Xy"):
        read_override(p)
    with pytest.raises(OverrideFileError, match="not found"):
        read_override(tmp_path / "missing.txt")
    with pytest.raises(OverrideFileError, match="is a folder"):
        read_override(tmp_path)


# ----------------------------------------------------------------------------- writing


ALL_FILES = [("xrfmaps-2ide", "maps_fit_parameters_override.txt")] + [
    ("xrfmaps-reference", "override_parameters", f"{n}-maps_fit_parameters_override.txt") for n in ("2ide", "8bmb", "9idb")
]


@pytest.mark.parametrize("parts", ALL_FILES, ids=lambda p: p[-1])
def test_read_write_is_byte_identical(parts, tmp_path):
    src = require_shared(*parts)
    out = read_override(src).write(tmp_path / "copy.txt")
    assert out.read_bytes() == src.read_bytes()


def test_windows_line_endings_survive(tmp_path, override_2ide):
    crlf = override_2ide.read_bytes().replace(b"\n", b"\r\n")
    src = tmp_path / "crlf.txt"
    src.write_bytes(crlf)
    ov = read_override(src)
    assert ov.write(tmp_path / "copy.txt").read_bytes() == crlf
    changed = ov.with_values({"COMPTON_ANGLE": 90.5}).write(tmp_path / "changed.txt").read_bytes()
    assert b"COMPTON_ANGLE: 90.5\r\n" in changed and b"\n" not in changed.replace(b"\r\n", b"")
    assert read_override(tmp_path / "changed.txt").parameters["COMPTON_ANGLE"] == 90.5


@pytest.mark.parametrize("parts", ALL_FILES, ids=lambda p: p[-1])
def test_changed_values_are_updated_in_place(parts, tmp_path):
    src = require_shared(*parts)
    ov = read_override(src)
    ps = ov.parameter_set().with_values(ENERGY_SLOPE=0.0101, COMPTON_ANGLE=101.5, SNIP_WIDTH=0.75)
    new = ov.with_values(ps, elements=ov.elements + ["Pb_L"])
    path = new.write(tmp_path / "new.txt")
    old_lines, new_lines = src.read_text().splitlines(), path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(old_lines, new_lines) if a != b]
    assert len(new_lines) == len(old_lines)  # all keys existed: nothing added
    assert {a.split(":")[0] for a, _ in changed} <= {"CAL_SLOPE_[E_LINEAR]", "COMPTON_ANGLE", "SNIP_WIDTH", "ELEMENTS_TO_FIT"}
    again = read_override(path)
    assert again.parameters["ENERGY_SLOPE"] == 0.0101 and again.parameters["COMPTON_ANGLE"] == 101.5
    assert again.elements[-1] == "Pb_L"
    assert {k: v for k, v in again.parameters.items() if k not in ("ENERGY_SLOPE", "COMPTON_ANGLE", "SNIP_WIDTH")} == \
        {k: v for k, v in ov.parameters.items() if k not in ("ENERGY_SLOPE", "COMPTON_ANGLE", "SNIP_WIDTH")}
    assert again.lines[: 5] == ov.lines[: 5] and again.scaler_pvs == ov.scaler_pvs


def test_new_keys_and_bounds_are_added(tmp_path, override_2ide):
    ov = read_override(override_2ide)
    ps = ov.parameter_set(preset=2).with_values(SI_ESCAPE=0.01)
    new = ov.with_values(ps, bounds=True)
    text = new.to_text()
    assert "FWHM_OFFSET_MIN: 0.005" in text and "FWHM_OFFSET_MAX: 0.5" in text
    assert read_override(new.write(tmp_path / "o.txt")).parameters["SI_ESCAPE"] == 0.01
    p = tmp_path / "bare.txt"
    p.write_text("VERSION: 5.0\nELEMENTS_TO_FIT: Fe\n")
    added = read_override(p).with_values({"FWHM_OFFSET": 0.1, "CAL_SLOPE_[E_LINEAR]": 0.01})
    assert added.lines[-2:] == ["FWHM_OFFSET: 0.1", "CAL_SLOPE_[E_LINEAR]: 0.01"]
    with pytest.raises(OverrideFileError):
        read_override(p).with_values({"NOT_A_KEY": 1.0})


def test_write_is_atomic(tmp_path, override_2ide, monkeypatch):
    import os

    target = tmp_path / "maps_fit_parameters_override.txt"
    target.write_text("original\n")
    ov = read_override(override_2ide)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        ov.write(target)
    assert target.read_text() == "original\n"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    monkeypatch.undo()
    with pytest.raises(OverrideFileError, match="does not exist"):
        ov.write(tmp_path / "missing" / "o.txt")


def test_typed_settings_and_scalers(override_2ide):
    ov = read_override(override_2ide)
    assert ov.scaler_pvs["US_IC"] == "2xfm:scaler3_cts1.B" and ov.scaler_pvs["ELT1"] == "dxpXMAP2xfm3:mca4.ELTM"
    assert ov.settings["DETECTOR_MATERIAL"] == 1.0 and ov.settings["US_AMP_SENS_NUM"] == 5.0
    assert ov.text["DATE"].startswith("2015-11-04")
    nine = read_override(require_shared("xrfmaps-reference", "override_parameters", "9idb-maps_fit_parameters_override.txt"))
    assert ("DS_IC", ["CFG_2", "CFG_3", "CFG_4", "CFG_5"]) in nine.summed_scalers
    assert nine.time_normalized_scalers[0] == ("CFG_2", "21:D3:scaler1:mca2.VAL")


def test_per_detector_files_fall_back(tmp_path):
    from mapstorch.io.override import find_override

    base = tmp_path / "maps_fit_parameters_override.txt"
    base.write_text("VERSION: 5.0\n")
    (tmp_path / "maps_fit_parameters_override.txt2").write_text("VERSION: 5.0\n")
    assert find_override(tmp_path, 2).name.endswith("txt2")
    assert find_override(tmp_path, 1) == base
    assert find_override(tmp_path) == base
    with pytest.raises(OverrideFileError, match="no override file"):
        find_override(tmp_path / "nowhere", 0)
