"""Reading maps_fit_parameters_override.txt files."""

from __future__ import annotations

import pytest

from mapstorch.errors import OverrideFileError
from mapstorch.io.override import read_override

from conftest import require_shared


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
    with pytest.raises(OverrideFileError, match="directory"):
        read_override(tmp_path)
