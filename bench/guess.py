"""Benchmark: which elements are present? mapstorch ``guess_elements`` vs upstream MapsTorch vs NNLS.

Synthetic spectra from our model (``simulate_spectrum``) with known truth: per spectrum an incident
energy in 8-20 keV, 3-12 families drawn from those it excites inside the window (K, L and M; at
least one of the hard overlap groups As K / Pb L, S K / Mo L / Pb M, Ti K / V K, Mn K / Fe K,
K K / Cd L / In L is drawn with both or all members, or with one member alone), counts per family
log-uniform from 10^2.5 to 10^6.3 (trace to major), a smooth continuum, Poisson noise.

**What "present" means.** A simulated family is *detectable* when its expected (Asimov)
significance is at least 7: the deviance between the noise-free spectrum and the best
non-negative fit of it by the other simulated families (true shape, true background) is at least
49. Detectable families must be found (else a false negative); families that were not simulated
must not be reported (else a false positive); simulated families below that level are not
scored either way. Precision, recall and F1 are pooled over all spectra.

Methods, each from the true shape parameters (as an override file would give them) and the same
candidate list (our default: every family the incident energy excites in the window):

* mapstorch ``guess_elements`` with its defaults (significance 5);
* an NNLS-threshold baseline (the approach PyXRF uses): non-negative least squares of
  ``max(S - SNIP, 0)`` on every candidate at the true shape, SNIP width 0.5 (beamline override
  value); a family is reported when its fitted counts exceed 3 x the square root of the data
  counts within one FWHM of its main line;
* upstream MapsTorch ``mapstorch==0.0.2`` (``bench/.venv-upstream``) by its documented workflow
  (``_upstream_guess.py``: its app's fit of every candidate, then the top 12 of the ranking). One
  upstream run costs ~0.6 s per Adam iteration with ~90 candidates on one core, so it runs on the
  first ``--upstream-spectra`` spectra with ``--upstream-iters`` iterations (defaults 6 and 200;
  its app uses 1000), and mapstorch's F1 on the same subset is reported next to it.

Usage::

    .venv/bin/python bench/guess.py [--spectra 50] [--seed 0] [--upstream-spectra 6] [--upstream-iters 200]

LAST line: JSON ``{"metric": "element_id_f1", "ours": f1, "baseline": f1_upstream, ...}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _venv import BENCH, ensure_venv, run_json  # noqa: E402

from mapstorch.identify.candidates import default_candidates, main_line  # noqa: E402
from mapstorch.identify.decide import _Linear, guess_elements  # noqa: E402
from mapstorch.parameters.table import SHAPE_PARAMETER_NAMES  # noqa: E402
from mapstorch.physics.elements import parse_component  # noqa: E402
from mapstorch.physics.lines import build_line_table  # noqa: E402
from mapstorch.physics.model import SpectrumModel  # noqa: E402
from mapstorch.physics.snip import snip_background  # noqa: E402
from mapstorch.synthetic import simulate_spectrum  # noqa: E402

log = logging.getLogger("bench")

OVERLAPS = (("As", "Pb_L"), ("S", "Mo_L", "Pb_M"), ("Ti", "V"), ("Mn", "Fe"), ("K", "Cd_L", "In_L"))
DETECTABLE = 7.0


def draw(rng: np.random.Generator, index: int) -> dict:
    """One random sample: incident energy, families and their counts, shape parameters."""
    e0 = float(rng.uniform(8.0, 20.0))
    slope = max(0.00952, (e0 + 2.5) / 2048)
    params = {"COHERENT_SCT_ENERGY": e0, "ENERGY_SLOPE": slope, "MAX_ENERGY_TO_FIT": e0 + 1.0,
              "COMPTON_ANGLE": float(rng.uniform(80.0, 100.0)), "SNIP_WIDTH": 0.5}
    pool = default_candidates(e0, 1.0, e0 + 1.0)
    n = int(rng.integers(3, 13))
    groups = [g for g in OVERLAPS if all(m in pool for m in g)]
    chosen: list[str] = []
    if groups:
        g = groups[int(rng.integers(len(groups)))]
        chosen = list(g) if rng.random() < 0.6 else [g[int(rng.integers(len(g)))]]
    rest = [p for p in pool if p not in chosen]
    chosen += list(rng.choice(rest, size=max(n - len(chosen), 0), replace=False))
    counts = {c: float(10 ** rng.uniform(2.5, 6.3)) for c in chosen}
    scale = float(10 ** rng.uniform(-0.5, 0.5))
    return {"index": index, "e0": e0, "params": params, "counts": counts, "scale": scale,
            "seed": int(rng.integers(2**31))}


def simulate(sample: dict):
    return simulate_spectrum(counts=sample["counts"], params=sample["params"], seed=sample["seed"],
                             elastic_counts=2e5 * sample["scale"], compton_counts=1e6 * sample["scale"],
                             continuum_level=30.0 * sample["scale"])


def expected_significance(sim) -> dict[str, float]:
    """Asimov significance of each simulated family given the others (true shape and background)."""
    theta = sim.params.shape_values()
    model = SpectrumModel(sim.lines, sim.window, dtype=torch.float64)
    with torch.no_grad():
        d = model.design_matrix(theta)
    sl = sim.window.slice()
    lin = _Linear(d, torch.as_tensor(sim.background[sl]), torch.as_tensor(sim.expected[sl]), sim.lines.names)
    names = list(sim.lines.names)
    full = list(range(len(names)))
    dev_full, amps = lin.fit(full)
    return {n: math.sqrt(max(lin.fit([j for j in full if j != i], amps)[0] - dev_full, 0.0)) for i, n in enumerate(names)}


def nnls_baseline(sim, candidates: list[str]) -> list[str]:
    from scipy.optimize import nnls

    ps = sim.params
    theta = ps.shape_values()
    table = build_line_table(candidates)
    model = SpectrumModel(table, sim.window, dtype=torch.float64)
    with torch.no_grad():
        d = model.design_matrix(theta).numpy()
    y = torch.as_tensor(sim.counts)
    bg = snip_background(y, float(ps["ENERGY_OFFSET"]), float(ps["ENERGY_SLOPE"]), float(ps["ENERGY_QUADRATIC"]),
                         0.5, (sim.window.first, sim.window.last)).numpy()
    sl = sim.window.slice()
    target = np.maximum(sim.counts[sl] - bg[sl], 0.0)
    a, _ = nnls(d, target, maxiter=20 * d.shape[1])
    counts = a * d.sum(0)
    energies = model.energies(theta).numpy()
    fwhm = 2.3548 * math.sqrt((float(ps["FWHM_OFFSET"]) / 2.3548) ** 2 + 3.58 * 5.0 * float(ps["FWHM_FANOPRIME"]))
    out = []
    for k, name in enumerate(table.names):
        comp = parse_component(name)
        line = main_line(comp.z, comp.shell)
        if line is None:
            continue
        near = np.abs(energies - line[0]) <= fwhm
        if counts[k] > 3.0 * math.sqrt(max(float(sim.counts[sl][near].sum()), 1.0)):
            out.append(name)
    return out


def score(results: list[dict], key: str) -> dict:
    tp = fp = fn = overlap_fp = 0
    for r in results:
        called = set(r[key])
        simulated = set(r["simulated"])
        detectable = set(r["detectable"])
        tp += len(called & detectable)
        fn += len(detectable - called)
        wrong = called - simulated
        fp += len(wrong)
        for g in OVERLAPS:
            if any(m in simulated for m in g):
                overlap_fp += len(wrong & set(g))
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": round(f1, 4), "precision": round(precision, 4), "recall": round(recall, 4), "tp": tp, "fp": fp,
            "fn": fn, "overlap_false_positives": overlap_fp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spectra", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--upstream-spectra", type=int, default=6)
    ap.add_argument("--upstream-iters", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--out", type=Path, default=None, help="write every spectrum's truth and calls here (JSON)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    samples = [draw(rng, i) for i in range(args.spectra)]
    python = ensure_venv("upstream", ["mapstorch==0.0.2"]) if args.upstream_spectra > 0 else None
    results, ours_seconds, up_seconds = [], [], []
    for s in samples:
        sim = simulate(s)
        z = expected_significance(sim)
        simulated = [n for n in sim.lines.names]
        candidates = default_candidates(s["e0"], 1.0, s["e0"] + 1.0)
        start = {n: float(v) for n, v in sim.params.to_dict().items() if n in SHAPE_PARAMETER_NAMES}
        t0 = time.perf_counter()
        g = guess_elements(sim.counts, params=start, candidates=candidates, pileups=False)
        ours_seconds.append(time.perf_counter() - t0)
        row = {"index": s["index"], "e0": round(s["e0"], 2), "simulated": simulated,
               "detectable": [n for n in simulated if z[n] >= DETECTABLE],
               "significance_expected": {n: round(v, 1) for n, v in z.items()},
               "ours": g.present, "nnls": nnls_baseline(sim, candidates)}
        if python is not None and s["index"] < args.upstream_spectra:
            with tempfile.TemporaryDirectory() as tmp:
                spec, params = Path(tmp) / "spectrum.npy", Path(tmp) / "params.json"
                np.save(spec, sim.counts)
                params.write_text(json.dumps(start))
                up = run_json(python, BENCH / "_upstream_guess.py",
                              ["--spectrum", str(spec), "--params", str(params), "--incident-energy", str(s["e0"]),
                               "--candidates", ",".join(candidates), "--n-iter", str(args.upstream_iters),
                               "--max-seconds", "0", "--threads", "1"], timeout=args.timeout, threads=1)
            row["upstream"] = up["present"]
            up_seconds.append(up["seconds"])
        results.append(row)
        log.info("%2d  E0 %5.2f  detectable %-40s ours %-40s missed %s extra %s", s["index"], s["e0"],
                 ",".join(sorted(row["detectable"])), ",".join(sorted(g.present)),
                 sorted(set(row["detectable"]) - set(g.present)), sorted(set(g.present) - set(simulated)))
    ours = score(results, "ours")
    nnls_s = score(results, "nnls")
    sub = [r for r in results if "upstream" in r]
    up = score(sub, "upstream") if sub else None
    ours_sub = score(sub, "ours") if sub else None
    out = {"metric": "element_id_f1", "ours": ours["f1"], "baseline": up["f1"] if up else None,
           "nnls_baseline": nnls_s["f1"], "spectra": len(results),
           "ours_detail": ours, "nnls_detail": nnls_s,
           "baseline_detail": up, "ours_on_baseline_subset": ours_sub, "baseline_spectra": len(sub),
           "baseline_iterations": args.upstream_iters,
           "ours_seconds_median": round(float(np.median(ours_seconds)), 2),
           "baseline_seconds_median": round(float(np.median(up_seconds)), 1) if up_seconds else None,
           "criterion": f"detectable = expected significance >= {DETECTABLE:g}; non-simulated = must be absent"}
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
