"""mapstorch against numbers computed by XRF-Maps itself (see tests/golden/README.md)."""

from __future__ import annotations

import gzip
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import GOLDEN

from mapstorch.io.override import read_override
from mapstorch.parameters import ParameterSet
from mapstorch.physics.lines import build_line_table
from mapstorch.physics.model import FitWindow, SpectrumModel
from mapstorch.physics.snip import snip_background


def load(name):
    with gzip.open(GOLDEN / "xrfmaps" / name, "rt") as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def golden_lines():
    return load("lines.json.gz")


@pytest.fixture(scope="module")
def golden_model():
    return load("model.json.gz")


@pytest.mark.parametrize("detector", ["Si", "Ge"])
def test_line_tables_equal_xrfmaps(detector, golden_lines, csv_source, override_2ide):
    """Energies, ratios and mu_fraction of 53 families and 5 pile-ups, to 1e-6 relative."""
    ov = read_override(override_2ide)
    entries = golden_lines["detectors"][detector]
    names = [e["name"] for e in entries]
    table = build_line_table(names, source=csv_source, detector=detector, branching=ov.branching_factors())
    checked = 0
    for entry in entries:
        ref = entry["lines"]
        keep = [i for i, r in enumerate(ref["ratio"]) if r != 0.0]  # zero-ratio lines are dropped here
        got = table.lines_of(entry["name"])
        assert len(got["energy_kev"]) == len(keep), entry["name"]
        for j, i in enumerate(keep):
            assert got["energy_kev"][j] == pytest.approx(ref["energy"][i], rel=1e-6), entry["name"]
            assert got["ratio"][j] == pytest.approx(ref["ratio"][i], rel=1e-6), entry["name"]
            if ref["mu_fraction"][i] is not None:  # null: XRF-Maps reads uninitialised memory there
                assert got["mu_fraction"][j] == pytest.approx(ref["mu_fraction"][i], rel=1e-12), entry["name"]
            checked += 1
        # excitation at 10 and 16 keV, as XRF-Maps' check_binding_energy decides it
        for e0 in ("10.0", "16.0"):
            want = [entry["check_binding_energy"][e0][i] for i in keep]
            assert list(got["gate_edge_kev"] < float(e0)) == want, (entry["name"], e0)
    assert checked >= 300


def _case_model(case, csv_source, override_2ide):
    ov = read_override(override_2ide)
    names = list(case["log10_amplitudes"])
    table = build_line_table(names, source=csv_source, branching=ov.branching_factors())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. ENERGY_QUADRATIC beyond our default bounds
        ps = ParameterSet.default(names).with_maps_values(case["params"])
    rng = case["energy_range"]
    model = SpectrumModel(table, FitWindow(rng["min"], rng["max"]), dtype=torch.float64)
    return model, ps


@pytest.mark.parametrize("index", [0, 1, 2])
def test_model_spectra_equal_xrfmaps(index, golden_model, csv_source, override_2ide):
    """Every element, elastic and Compton spectrum to 1e-7 of its peak; the sum without escape
    likewise. (XRF-Maps stores branching factors as float32, 1.7 -> 1.70000005, and truncates
    sqrt(2 pi) to 2.506628275: a few 1e-9 relative. Without adjustments the agreement is 1e-9.)"""
    case = golden_model["cases"][index]
    model, ps = _case_model(case, csv_source, override_2ide)
    parts = {k: v.numpy() for k, v in model.components(ps.shape_values(), ps.amplitudes()).items()}
    assert np.allclose(model.energies(ps.shape_values()).numpy(), case["ev"] if "ev" in case else
                       model.energies(ps.shape_values()).numpy())
    for name, ref in case["elements"].items():
        ref = np.asarray(ref)
        if ref.max() == 0:
            assert parts[name].max() == 0, name  # not excited (Pb_L at 10 keV)
            continue
        tol = 1e-9 if name in ("Pb_L", "Au_M", "Si_Cl") else 1e-7  # no adjustment for these three
        assert np.abs(parts[name] - ref).max() / ref.max() < tol, name
    for ours, theirs in (("Elastic", "elastic_peak"), ("Compton", "compton_peak")):
        ref = np.asarray(case[theirs])
        assert np.abs(parts[ours] - ref).max() / ref.max() < 1e-9, ours
    no_escape = np.asarray(case["model_spectrum"]) - np.asarray(case["escape"])
    assert np.abs(parts["Total"] - parts.get("Escape", 0.0) - no_escape).max() / no_escape.max() < 1e-7


def test_escape_differs_only_by_design(golden_model, csv_source, override_2ide):
    """XRF-Maps shifts the summed model by round(1.73998 keV / first channel width) channels; we
    shift each peak by 1.73998 keV and only above the Si K edge. With this case's quadratic
    calibration XRF-Maps' 182-channel shift is 1.80 keV near channel 900, so its escape peaks sit
    about 6 channels lower than ours; the totals agree to a few per cent."""
    case = golden_model["cases"][1]
    model, ps = _case_model(case, csv_source, override_2ide)
    ours = model.components(ps.shape_values(), ps.amplitudes())["Escape"].numpy()
    theirs = np.asarray(case["escape"])
    assert ours.sum() == pytest.approx(theirs.sum(), rel=0.05)
    assert 0 <= int(ours.argmax()) - int(theirs.argmax()) <= 8


def test_snip_equals_xrfmaps_on_synthetic_spectrum():
    case = load("snip.json.gz")["cases"][0]
    a = case["args"]
    got = snip_background(
        torch.tensor(case["spectrum"], dtype=torch.float64), a["energy_offset"], a["energy_linear"],
        a["energy_quadratic"], a["width"], (int(a["xmin"]), int(a["xmax"])),
    ).numpy()
    assert np.allclose(got, case["background"], rtol=1e-12, atol=1e-12)


def _golden_array(entry):
    return np.asarray(entry["values"], np.float64).reshape(entry["shape"])


@pytest.fixture(scope="module", params=["2xfm_0010", "2xfm_0011"])
def xrfmaps_2ide_maps(request, tmp_path_factory):
    """``mapstorch map <scan>.mda --detector each`` with XRF-Maps' line tables: our files.
    ``2xfm_0010`` is a step scan (spectra in the MDA file), ``2xfm_0011`` a fly scan (the MDA
    file holds the scalers; the spectra are found in ``flyXRF.h5/``, as XRF-Maps finds them)."""
    import h5py
    from conftest import require_shared

    from mapstorch.cli.main import main

    folder = require_shared("xrfmaps-2ide")
    ref = require_shared("xrfmaps-reference")
    scan = request.param
    out = tmp_path_factory.mktemp("nnls") / f"{scan}.mda.h5"
    assert main(["map", str(folder / "mda" / f"{scan}.mda"), "--out", str(out), "--detector", "each",
                 "--library", str(ref / "xrf_library.csv"), "--henke", str(ref / "henke.xdr"), "--no-progress"]) == 0
    maps = {}
    for suffix in ("", "0", "1", "2", "3"):
        with h5py.File(f"{out}{suffix}", "r") as f:
            group = f["MAPS/XRF_Analyzed/NNLS"]
            roi = f["MAPS/XRF_Analyzed/ROI"]
            maps[suffix] = {"names": [n.decode() for n in group["Channel_Names"][()]],
                            "cps": group["Counts_Per_Sec"][()].astype(np.float64),
                            "live": f["MAPS/Spectra/Elapsed_Livetime"][()].astype(np.float64),
                            "fitted_integrated": group["Fitted_Integrated_Spectra"][()].astype(np.float64),
                            "background_integrated": group["FIT_Integrated_Background"][()].astype(np.float64),
                            "roi_names": [n.decode() for n in roi["Channel_Names"][()]],
                            "roi": roi["Counts_Per_Sec"][()].astype(np.float64)}
    return scan, maps


MAJOR = ("Ar", "Ca", "Fe", "Cu", "COMPTON_AMPLITUDE", "Total_Fluorescence_Yield")


@pytest.mark.parametrize("suffix", ["0", "1", "2", "3", ""])
def test_nnls_maps_of_2ide_scans_equal_xrfmaps(suffix, xrfmaps_2ide_maps):
    """XRF-Maps' own NNLS maps of two 2-ID-E scans, each detector element (``.h50`` .. ``.h53``)
    and their average (``.h5``): the same live times and the same counts/s in every pixel, to
    the convergence of the two NNLS solvers. Fit_Residual and Num_Iter are the solvers' own;
    Sum_Elastic_Inelastic we divide by the live time (XRF-Maps does not): see docs/maps.md. For
    the fly scan XRF-Maps sizes its maps from the MDA file (11 x 11) and fills the 9 columns the
    fly scan recorded: its last two columns are left out."""
    scan, ours_all = xrfmaps_2ide_maps
    golden = load(f"nnls_{scan}.json.gz")
    ours = ours_all[suffix]
    rows, cols = ours["live"].shape

    def crop(entry):
        return _golden_array(entry)[..., :rows, :cols]

    theirs = golden["average"] if suffix == "" else golden["detectors"][suffix]
    live = crop(theirs["live_time"])
    np.testing.assert_allclose(ours["live"], live, rtol=1e-6)  # realtime x OCR / ICR, as XRF-Maps
    cps = crop(theirs["counts_per_sec"])
    compared = majors = 0
    for i, name in enumerate(theirs["channel_names"]):
        if name in ("Fit_Residual", "Num_Iter"):
            continue
        got = ours["cps"][ours["names"].index(name)]
        want = cps[i] if name != "Sum_Elastic_Inelastic" else cps[i] / (live if suffix else 1.0)
        if name == "Sum_Elastic_Inelastic" and not suffix:  # the mean of each element's sum / live time
            parts = [golden["detectors"][d] for d in "0123"]
            want = np.mean([crop(p["counts_per_sec"])[i] / crop(p["live_time"]) for p in parts], 0)
        scale = np.abs(want).max()
        err = np.abs(got - want)
        assert err.max() <= 0.02 * scale + 1e-3, (name, err.max(), scale)  # the worst pixel
        assert np.median(err) <= 1e-3 * scale + 1e-4, (name, np.median(err), scale)
        if name in MAJOR:  # every pixel with at least 20 cts/s and a tenth of the map's maximum
            big = (np.abs(want) > 0.1 * scale) & (np.abs(want) > 20.0)
            rel = err[big] / np.abs(want[big])
            assert rel.size == 0 or rel.max() < 2e-3, (name, rel.max())
            majors += int(rel.size > 0)
        compared += 1
    assert compared == 19 and majors >= 3


@pytest.mark.parametrize("suffix", ["0", "1", "2", "3", ""])
def test_roi_maps_of_2ide_scans_equal_xrfmaps(suffix, xrfmaps_2ide_maps):
    """XRF-Maps' ROI maps (raw counts in a window around each element's main line, per second):
    the same windows, so the same numbers to float32 rounding, for every element of both scans,
    each detector element and the average. (XRF-Maps' ROI group also carries zeros, or stray
    values in one pixel of element 3, in its scatter and fit-statistics channels: not compared.)"""
    scan, ours_all = xrfmaps_2ide_maps
    golden = load(f"nnls_{scan}.json.gz")
    theirs = (golden["average"] if suffix == "" else golden["detectors"][suffix])["roi"]
    ours = ours_all[suffix]
    rows, cols = ours["live"].shape
    cps = _golden_array(theirs["counts_per_sec"])[..., :rows, :cols]
    skip = {"Sum_Elastic_Inelastic", "Fit_Residual", "COHERENT_SCT_AMPLITUDE", "Num_Iter", "COMPTON_AMPLITUDE"}
    compared = 0
    for i, name in enumerate(theirs["channel_names"]):
        if name in skip:
            continue
        got = ours["roi"][ours["roi_names"].index(name)]
        np.testing.assert_allclose(got, cps[i], rtol=2e-6, atol=1e-6 * np.abs(cps[i]).max(), err_msg=name)
        compared += 1
    assert compared == 16  # 15 elements and the total yield


@pytest.mark.parametrize("xrfmaps_2ide_maps", ["2xfm_0010"], indirect=True)
@pytest.mark.parametrize("suffix", ["0", "1", "2", "3", ""])
def test_integrated_fit_and_background_of_2ide_scans_equal_xrfmaps(suffix, xrfmaps_2ide_maps):
    """NNLS's Fitted_Integrated_Spectra and FIT_Integrated_Background (the model and the SNIP
    background summed over the pixels; for the average file the elements' sums added, as
    XRF-Maps adds them): XRF-Maps' within 1e-3 of their maxima, over the fit window. XRF-Maps pads
    the MDA scan's 2000 channels to 2048; for the fly scan it sums 11 x 11 pixels, two columns of
    which the scan never recorded, so only the step scan is compared there."""
    scan, ours_all = xrfmaps_2ide_maps
    golden = load(f"nnls_{scan}.json.gz")
    theirs = golden["average"] if suffix == "" else golden["detectors"][suffix]
    ours = ours_all[suffix]
    for key in ("fitted_integrated", "background_integrated"):
        want = _golden_array(theirs[key])
        got = ours[key]
        n = min(len(want), len(got))
        outside = np.r_[0:105, 1157:n]  # zero outside the fit window, in both
        assert not got[outside].any() and not want[outside].any(), key
        assert np.abs(got[:n] - want[:n]).max() <= 1e-3 * np.abs(want).max(), key
        assert abs(got.sum() - want.sum()) <= 1e-3 * abs(want).sum() + 1e-3, key
