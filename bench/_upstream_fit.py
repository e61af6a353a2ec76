"""Fit one integrated spectrum with upstream MapsTorch (run inside bench/.venv-upstream; see fit.py).

Upstream ``mapstorch==0.0.2``'s ``mapstorch.opt.fit_spec`` with its defaults (Adam, MSE loss,
``n_iter`` = 500, shape parameters tuned, amplitudes initialised from the spectrum, SNIP
background), starting from the given MAPS parameter values (merged over upstream's defaults).
The fit window is ``round((MIN/MAX_ENERGY_TO_FIT - ENERGY_OFFSET) / ENERGY_SLOPE)``, clipped to
the spectrum, from the starting calibration; upstream keeps it fixed while it tunes the
calibration. Components use this project's names (``Fe``, ``Fe_K``, ``Pb_L``, ``Au_M``,
``Si_Cl``); names upstream cannot model are dropped (warning on stderr, listed in the JSON).

``seconds`` is the wall time of the ``fit_spec`` call alone. ``model`` is what upstream's loss
compares to the data (element + scatter model plus SNIP background over ``first..last``),
evaluated at the final parameters; ``counts`` sums each component's fitted spectrum over the
window (``Elastic`` and ``Compton`` for the scatter peaks). upstream prints to stdout, so its
output goes to stderr; the LAST stdout line is the JSON.
"""

import argparse
import contextlib
import importlib.metadata
import json
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.append(str(Path(__file__).resolve().parent))  # for _upstream_names

import numpy as np
import torch
from _upstream_names import fit_window, map_components
from mapstorch.default import (
    default_elem_info,
    default_energy_consts,
    default_fitting_params,
    default_param_vals,
    default_pileups,
)
from mapstorch.map import compton_peak, elastic_peak, model_elem_spec
from mapstorch.opt import _calculate_loss, fit_spec

SCATTER = {"Elastic": "COHERENT_SCT_AMPLITUDE", "Compton": "COMPTON_AMPLITUDE"}

ap = argparse.ArgumentParser()
ap.add_argument("--spectrum", required=True, help="1-D .npy, counts per channel")
ap.add_argument("--params", required=True, help="JSON {MAPS parameter: starting value}")
ap.add_argument("--elements", required=True, help="comma-separated components (Fe, Pb_L, Au_M, Si_Cl)")
ap.add_argument("--n-iter", type=int, default=500)
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()
torch.set_num_threads(args.threads)


def warn(msg):
    print(f"_upstream_fit: {msg}", file=sys.stderr)


spectrum = np.asarray(np.load(args.spectrum), dtype=np.float64).reshape(-1)
given = json.loads(Path(args.params).read_text())
start = {k: float(v) for k, v in given.items() if k in default_param_vals}
ignored_params = sorted(k for k in given if k not in default_param_vals)
init = {**{k: float(v) for k, v in default_param_vals.items()}, **start}

# Pile-ups beyond upstream's default three are built with its own define_constants.
ours = list(dict.fromkeys(e.strip() for e in args.elements.split(",") if e.strip()))
e_consts, mapping, dropped = map_components(ours, default_energy_consts, default_elem_info, default_pileups, warn,
                                           skip=tuple(SCATTER))

first, last = energy_range = fit_window(spectrum, init, warn)
elements = list(mapping.values())


class Clock:
    """fit_spec calls ``status_updator.update()`` after every iteration: note the time."""

    def __init__(self):
        self.times = []

    def update(self):
        self.times.append(time.perf_counter())


clock = Clock()
t0 = time.perf_counter()
with contextlib.redirect_stdout(sys.stderr):
    tensors, _, _, loss_trace = fit_spec(
        spectrum,
        energy_range,
        elements_to_fit=elements,
        init_param_vals=init,
        n_iter=args.n_iter,
        progress_bar=False,
        status_updator=clock,
        e_consts=e_consts,
        elem_info=default_elem_info,
    )
seconds = time.perf_counter() - t0
steps = np.diff([t0, *clock.times])

# fit_spec returns the model of its last loss evaluation, i.e. before the last Adam step;
# evaluate upstream's own loss function at the final parameters instead (same defaults).
all_elements = [e for e in dict.fromkeys(elements + list(SCATTER.values())) if e in e_consts or e in SCATTER.values()]
with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
    full = torch.tensor(spectrum, dtype=torch.float32)
    loss, peaks, bkg = _calculate_loss(
        tensors, full[first : last + 1], full, energy_range, all_elements,
        use_snip=True, indices=None, loss="mse", loss_params={}, l1_lambda=0.0, e_consts=e_consts,
        elem_info=default_elem_info, detector_type="Si", escape_factor=0.0,
    )  # fmt: skip
    ch = torch.arange(first, last + 1, dtype=torch.float32)
    ev = tensors["ENERGY_OFFSET"] + tensors["ENERGY_SLOPE"] * ch + tensors["ENERGY_QUADRATIC"] * ch**2
    gain = tensors["ENERGY_SLOPE"]
    counts = {
        e: float(model_elem_spec(tensors, u, ev, True, True, e_consts=e_consts, elem_info=default_elem_info).sum())
        for e, u in mapping.items()
    }
    counts["Elastic"] = float(elastic_peak(tensors, ev, gain).sum())
    counts["Compton"] = float(compton_peak(tensors, ev, gain, True, True).sum())
model = (peaks + bkg).double().numpy()

result = {
    "impl": "upstream-mapstorch-0.0.2",
    "seconds": seconds,
    "n_iter": args.n_iter,
    "iterations_done": len(loss_trace),
    "seconds_per_iter": seconds / max(len(loss_trace), 1),
    "seconds_first_iter": float(steps[0]) if len(steps) else None,  # includes setup (amplitude guesses)
    "seconds_per_iter_median": float(np.median(steps[1:])) if len(steps) > 1 else None,
    "first": first,
    "last": last,
    "model": model.tolist(),
    "background_counts": float(bkg.sum()),
    "counts": counts,
    "counts_sum_vs_peaks": float(sum(counts.values()) / max(float(peaks.sum()), 1e-30)),
    "parameters": {p: float(tensors[p]) for p in default_fitting_params if p in tensors},
    "loss_final": float(loss),
    "loss_first": loss_trace[0] if loss_trace else None,
    "components": mapping,
    "dropped": dropped,
    "ignored_params": ignored_params,
    "threads": args.threads,
    "upstream_version": importlib.metadata.version("mapstorch"),
    "torch": torch.__version__,
}
print(json.dumps(result))
