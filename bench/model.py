"""Benchmark: forward + backward of the full MAPS candidate set, mapstorch vs upstream MapsTorch.

In one run, on the same machine and thread count:

* upstream MapsTorch (``mapstorch==0.0.2`` from PyPI, installed into ``bench/.venv-upstream`` by
  this script and run in its own process): ``mapstorch.map.model_spec`` on its default 93
  components (35 K, 3 pile-up, 2 scatter, 45 L, 8 M) over channels 50-1450 (1401 channels),
  gradients for the parameters it fits by default and every amplitude;
* mapstorch: ``SpectrumModel`` on the same components (91 families + elastic + Compton), the same
  parameter values (upstream's ``default_param_vals``), the same channels, float32, gradients for
  every parameter and amplitude.

Timing: one warm-up, then the median of ``--repeats`` runs (fresh parameter tensors each time for
upstream, as it builds its graph per call). Also reported: batched throughput of mapstorch for
``--batch`` parameter sets at once (forward, and forward + backward), and upstream's for a
smaller batch. The LAST line printed is one JSON object:
``{"metric": "model_fwd_bwd_seconds", "ours": x, "baseline": y, "ratio": y/x, ...}``.

Usage: ``.venv/bin/python bench/model.py [--repeats 30] [--batch 1024] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# upstream MapsTorch's default candidate list (mapstorch 0.0.2, mapstorch/default.py)
K_LINES = "Ag Al Ar As Br Ca Cd Cl Co Cr Cu Fe Ga Ge Hf I K Mg Mn Mo Ni P Pb Pd Rb S Sc Se Si Sr Ti V Y Zn Zr".split()
PILEUPS = ["Si_Si", "Si_Cl", "Cl_Cl"]
L_LINES = [f"{e}_L" for e in (
    "Ag As Au Ba Bi Br Cd Ce Cs Dy Er Eu Gd Hf Hg Ho I Kr La Lu Mo Nd Os Pa Pb Pm Pr Pt Rb Se Sm Sn Sr Ta Tb Th Tl "
    "Tm U W Xe Y Yb Zn Zr").split()]
M_LINES = [f"{e}_M" for e in "Au Hf Hg Os Pt Th U W".split()]
COMPONENTS = K_LINES + PILEUPS + L_LINES + M_LINES
# upstream MapsTorch's default_param_vals (the values its fit starts from)
UPSTREAM_DEFAULTS = {
    "COMPTON_F_TAIL": 0.783374011516571, "COMPTON_ANGLE": 109.85600280761719, "COHERENT_SCT_ENERGY": 12.270400047302246,
    "F_TAIL_OFFSET": 0.03593109920620918, "FWHM_OFFSET": 0.08414760231971741, "ENERGY_QUADRATIC": -2.2838600344243787e-08,
    "COMPTON_FWHM_CORR": 2.7478699684143066, "FWHM_FANOPRIME": 0.00017760999617166817, "COMPTON_HI_GAMMA": 3.0,
    "ENERGY_OFFSET": -0.0020250400993973017, "KB_F_TAIL_OFFSET": 0.16684700548648834, "ENERGY_SLOPE": 0.011979999952018261,
    "COMPTON_GAMMA": 3.0, "COMPTON_HI_F_TAIL": 0.08728790283203125, "F_TAIL_LINEAR": 1.6940699334764354e-21,
    "GAMMA_OFFSET": 2.2101199626922607, "MAX_ENERGY_TO_FIT": 14.800000190734863, "MIN_ENERGY_TO_FIT": 1.0,
    "SNIP_WIDTH": 0.5, "COMPTON_F_STEP": 0.0,
}  # fmt: skip
FIRST, LAST = 50, 1450
LOG_AMPLITUDE = 3.0


def time_ours(repeats: int, batch: int) -> dict:
    import torch

    from mapstorch.parameters import ParameterSet
    from mapstorch.physics.lines import build_line_table
    from mapstorch.physics.model import FitWindow, SpectrumModel

    t0 = time.perf_counter()
    lines = build_line_table(COMPONENTS)
    build_s = time.perf_counter() - t0
    ps = ParameterSet.default(COMPONENTS).with_maps_values(UPSTREAM_DEFAULTS)
    ps = ps.with_values({c: LOG_AMPLITUDE for c in COMPONENTS}).to(dtype=torch.float32)
    model = SpectrumModel(lines, FitWindow(FIRST, LAST), dtype=torch.float32)

    def once(theta0, amps0):
        theta = theta0.clone().requires_grad_(True)
        amps = amps0.clone().requires_grad_(True)
        t = time.perf_counter()
        model(theta, amps).sum().backward()
        return time.perf_counter() - t

    theta, amps = ps.shape_values(), ps.amplitudes()
    once(theta, amps)
    times = [once(theta, amps) for _ in range(repeats)]
    out = {
        "median_s": statistics.median(times), "min_s": min(times), "repeats": repeats,
        "lines": lines.n_lines, "components": len(COMPONENTS) + 2, "channels": LAST - FIRST + 1,
        "line_table_build_s": build_s,
    }
    if batch:
        g = torch.Generator().manual_seed(0)
        thetas = theta.expand(batch, -1).clone()
        thetas[:, ps.index("ENERGY_OFFSET")] += 0.01 * torch.randn(batch, generator=g)
        thetas[:, ps.index("FWHM_OFFSET")] *= 1.0 + 0.05 * torch.rand(batch, generator=g)
        ampss = amps.expand(batch, -1) * (0.5 + torch.rand(batch, amps.shape[-1], generator=g))
        with torch.no_grad():
            model(thetas[:2], ampss[:2])
            fwd_times = []
            for _ in range(3):
                t = time.perf_counter()
                model(thetas, ampss)
                fwd_times.append(time.perf_counter() - t)
        fwd = statistics.median(fwd_times)
        bwd = statistics.median([once(thetas, ampss) for _ in range(3)])
        out.update(batch=batch, batch_forward_spectra_per_s=batch / fwd, batch_fwd_bwd_spectra_per_s=batch / bwd)
    return out


def time_upstream(repeats: int, batch: int, threads: int) -> dict:
    from _venv import ensure_venv, run_json

    python = ensure_venv("upstream", ["mapstorch==0.0.2"])
    script = HERE / "_upstream_model.py"
    res = run_json(python, script, ["--repeats", str(repeats), "--threads", str(threads),
                                    "--first", str(FIRST), "--last", str(LAST)], timeout=1800, threads=threads)
    if batch:
        b = run_json(python, script, ["--repeats", "2", "--threads", str(threads), "--batch", str(batch),
                                      "--first", str(FIRST), "--last", str(LAST)], timeout=1800, threads=threads)
        res.update(batch=batch, batch_fwd_bwd_spectra_per_s=b["spectra_per_s"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=100, help="timed runs of ours (median reported)")
    ap.add_argument("--baseline-repeats", type=int, default=5, help="timed runs of upstream")
    ap.add_argument("--batch", type=int, default=1024, help="batched throughput: parameter sets at once")
    ap.add_argument("--baseline-batch", type=int, default=16, help="upstream batch size (it is slow)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    ours = time_ours(args.repeats, args.batch)
    logging.info("mapstorch: %s", json.dumps(ours))
    base = time_upstream(args.baseline_repeats, args.baseline_batch, args.threads)
    logging.info("upstream:  %s", json.dumps(base))
    print(json.dumps({
        "metric": "model_fwd_bwd_seconds",
        "ours": ours["median_s"],
        "baseline": base["median_s"],
        "ratio": base["median_s"] / ours["median_s"],
        "ours_min": ours["min_s"],
        "baseline_min": base["min_s"],
        "components": ours["components"],
        "lines": ours["lines"],
        "channels": ours["channels"],
        "ours_batch": ours.get("batch"),
        "ours_batch_forward_spectra_per_s": ours.get("batch_forward_spectra_per_s"),
        "ours_batch_fwd_bwd_spectra_per_s": ours.get("batch_fwd_bwd_spectra_per_s"),
        "baseline_batch": base.get("batch"),
        "baseline_batch_fwd_bwd_spectra_per_s": base.get("batch_fwd_bwd_spectra_per_s"),
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
