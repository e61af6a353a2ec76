"""The fused per-line coefficients equal the plain-autograd computation, values and gradients."""

from __future__ import annotations

import pytest
import torch

from mapstorch.parameters import ParameterSet
from mapstorch.physics.coefficients import line_coefficients, line_coefficients_reference
from mapstorch.physics.lines import build_line_table

VALUES = {
    "FWHM_OFFSET": 0.11, "FWHM_FANOPRIME": 0.00018, "COHERENT_SCT_ENERGY": 15.0, "F_STEP_OFFSET": 0.02,
    "F_STEP_LINEAR": 0.001, "F_TAIL_OFFSET": 0.01, "F_TAIL_LINEAR": 0.002, "KB_F_TAIL_OFFSET": 0.06,
    "KB_F_TAIL_LINEAR": 0.001, "GAMMA_OFFSET": 2.0, "GAMMA_LINEAR": 0.05, "ENERGY_SLOPE": 0.0096,
}  # fmt: skip


@pytest.mark.parametrize("batch", [(), (3,)])
def test_fused_coefficients_match_autograd(batch):
    comps = ["Ca", "Fe", "Pb_L", "Au_M", "Si_Cl", "Zr"]
    lines = build_line_table(comps, width_multipliers={"Fe": 1.3}).to_torch(torch.float64)
    theta0 = ParameterSet.default(comps).with_maps_values(VALUES).shape_values()
    theta0 = theta0.expand(*batch, theta0.shape[-1]).clone()
    if batch:
        theta0[..., 3] *= torch.linspace(0.9, 1.1, batch[0], dtype=torch.float64)
    weights = [torch.randn(*batch, lines.energy.shape[0], dtype=torch.float64,
                           generator=torch.Generator().manual_seed(i)) for i in range(5)]
    results = []
    for fn in (line_coefficients, line_coefficients_reference):
        theta = theta0.clone().requires_grad_(True)
        outs = fn(lines, theta, 3.58)
        sum(((o * w).sum() for o, w in zip(outs, weights))).backward()
        results.append((outs, theta.grad))
    (fast, g_fast), (ref, g_ref) = results
    for a, b in zip(fast, ref):
        assert torch.allclose(a, b, rtol=1e-13, atol=0)
    assert torch.allclose(g_fast, g_ref, rtol=1e-10, atol=1e-12 * float(g_ref.abs().max()))
    assert (g_fast != 0).sum() >= 11  # every parameter the lines depend on gets a gradient


def test_fused_coefficients_gradcheck():
    comps = ["Fe", "Pb_L", "Au_M"]
    lines = build_line_table(comps).to_torch(torch.float64)
    theta = ParameterSet.default(comps).with_maps_values(VALUES).shape_values().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: line_coefficients(lines, t, 3.58), (theta,), eps=1e-7, atol=1e-6)
