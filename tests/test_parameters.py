"""Parameters as data: the table, presets, file names, transforms and ParameterSet."""

from __future__ import annotations

import pytest
import torch

from mapstorch.errors import ParameterError
from mapstorch.parameters import (
    PARAMETERS,
    PRESETS,
    ParameterSet,
    file_key,
    name_from_file_key,
    preset_free_names,
    spec,
    to_bounded,
    to_unbounded,
)


def test_every_maps_parameter_is_in_the_table():
    names = {p.name for p in PARAMETERS}
    model_md = (
        "ENERGY_OFFSET ENERGY_SLOPE ENERGY_QUADRATIC FWHM_OFFSET FWHM_FANOPRIME COHERENT_SCT_ENERGY "
        "COHERENT_SCT_AMPLITUDE COMPTON_ANGLE COMPTON_FWHM_CORR COMPTON_AMPLITUDE COMPTON_F_STEP COMPTON_F_TAIL "
        "COMPTON_GAMMA COMPTON_HI_F_TAIL COMPTON_HI_GAMMA SNIP_WIDTH F_STEP_OFFSET F_STEP_LINEAR F_TAIL_OFFSET "
        "F_TAIL_LINEAR KB_F_TAIL_OFFSET KB_F_TAIL_LINEAR GAMMA_OFFSET GAMMA_LINEAR SI_ESCAPE GE_ESCAPE "
        "MIN_ENERGY_TO_FIT MAX_ENERGY_TO_FIT"
    ).split()
    assert set(model_md) <= names
    for p in PARAMETERS:
        assert p.lower <= p.value <= p.upper, p.name


def test_model_md_bounds():
    assert (spec("ENERGY_OFFSET").lower, spec("ENERGY_OFFSET").upper) == (-0.2, 0.2)
    assert (spec("FWHM_OFFSET").lower, spec("FWHM_OFFSET").upper) == (0.005, 0.5)
    assert (spec("FWHM_FANOPRIME").lower, spec("FWHM_FANOPRIME").upper) == (1e-6, 0.05)
    assert (spec("COMPTON_FWHM_CORR").lower, spec("COMPTON_FWHM_CORR").upper) == (1.0, 4.0)
    assert (spec("SNIP_WIDTH").lower, spec("SNIP_WIDTH").upper) == (0.1, 2.828427)


@pytest.mark.parametrize(
    "key,name",
    [("CAL_OFFSET_[E_OFFSET]", "ENERGY_OFFSET"), ("CAL_SLOPE_[E_LINEAR]", "ENERGY_SLOPE"),
     ("CAL_QUAD_[E_QUADRATIC]", "ENERGY_QUADRATIC"), ("COMPTON_STEP", "COMPTON_F_STEP"),
     ("STEP_OFFSET", "F_STEP_OFFSET"), ("STEP_LINEAR", "F_STEP_LINEAR"), ("SI_ESCAPE_FACTOR", "SI_ESCAPE"),
     ("GE_ESCAPE_FACTOR", "GE_ESCAPE"), ("FWHM_OFFSET", "FWHM_OFFSET")],
)
def test_file_key_round_trip(key, name):
    assert name_from_file_key(key) == name
    assert file_key(name) == key


def test_presets_match_xrfmaps():
    two = {"ENERGY_OFFSET", "ENERGY_SLOPE", "FWHM_OFFSET", "FWHM_FANOPRIME", "COHERENT_SCT_ENERGY",
           "COMPTON_ANGLE", "COMPTON_FWHM_CORR", "COMPTON_F_TAIL", "COHERENT_SCT_AMPLITUDE", "COMPTON_AMPLITUDE"}
    assert set(preset_free_names(2)) == two
    assert set(preset_free_names("3")) == two | {"COMPTON_GAMMA", "F_TAIL_OFFSET", "F_TAIL_LINEAR",
                                                 "KB_F_TAIL_OFFSET", "KB_F_TAIL_LINEAR"}
    assert set(preset_free_names(5)) == two | {"ENERGY_QUADRATIC"}
    assert set(preset_free_names("no-tails")) == two
    assert "MIN_ENERGY_TO_FIT" not in PRESETS["all"] and "F_STEP_OFFSET" in PRESETS["all"]
    with pytest.raises(ParameterError, match="preset"):
        preset_free_names(7)


def test_transforms_round_trip_and_respect_bounds():
    lo = torch.tensor([-0.2, 0.0, 1.0, float("-inf"), float("-inf")], dtype=torch.float64)
    hi = torch.tensor([0.2, float("inf"), 4.0, 3.0, float("inf")], dtype=torch.float64)
    p = torch.tensor([0.05, 2.5, 3.99, -1.0, 7.0], dtype=torch.float64)
    z = to_unbounded(p, lo, hi)
    assert torch.allclose(to_bounded(z, lo, hi), p, rtol=1e-10)
    far = to_bounded(torch.tensor([50.0, -50.0, 50.0, 50.0, -50.0], dtype=torch.float64), lo, hi)
    assert bool(((far >= lo) & (far <= hi)).all())
    at_bound = to_unbounded(lo.clone().nan_to_num(neginf=-5.0), lo, hi)
    assert torch.isfinite(at_bound).all()


def test_parameter_set_values_bounds_and_free():
    ps = ParameterSet.default(["Fe", "Ca", "Pb_L"], preset=2)
    assert ps.components == ("Fe", "Ca", "Pb_L")
    assert set(ps.free_names) == set(preset_free_names(2)) | {"Fe", "Ca", "Pb_L"}
    ps2 = ps.with_values({"CAL_SLOPE_[E_LINEAR]": 0.0095, "Fe": 6.0})
    assert float(ps2["ENERGY_SLOPE"]) == 0.0095 and float(ps2["Fe"]) == 6.0
    with pytest.raises(ParameterError, match="outside"):
        ps.with_values(FWHM_OFFSET=1.0)
    with pytest.raises(ParameterError, match="unknown parameter"):
        ps.with_values(NOT_A_PARAMETER=1.0)
    with pytest.raises(ParameterError, match="finite"):
        ps.with_values(FWHM_OFFSET=float("nan"))
    amps = ps2.amplitudes()
    assert amps.shape == (5,) and float(amps[0]) == pytest.approx(1e6)
    z = ps2.to_unconstrained()
    back = ps2.from_unconstrained(z)
    assert torch.allclose(back.values, ps2.values, rtol=1e-9, atol=1e-12)
    batch = ps2.expand(4)
    assert batch.values.shape == (4, len(ps2.names))
    with pytest.raises(ParameterError):
        ps.with_bounds("FWHM_OFFSET", 0.3, 0.2)


def test_maps_values_from_file_keys_set_bounds_and_warn():
    ps = ParameterSet.default(["Fe"]).with_maps_values(
        {"COHERENT_SCT_ENERGY": 10.0, "COHERENT_SCT_ENERGY_MIN": 9.7, "COHERENT_SCT_ENERGY_MAX": 10.6,
         "UNKNOWN_KEY": 3.0}
    )
    i = ps.index("COHERENT_SCT_ENERGY")
    assert (float(ps.lower[i]), float(ps.upper[i]), float(ps.values[i])) == (9.7, 10.6, 10.0)
    with pytest.warns(UserWarning, match="widening"):
        ps.with_maps_values({"FWHM_OFFSET": 0.7})
    with pytest.raises(ParameterError, match="_MIN"):
        ps.with_maps_values({"FWHM_OFFSET_MIN": 0.3, "FWHM_OFFSET_MAX": 0.2})
