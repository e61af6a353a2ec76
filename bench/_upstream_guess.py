"""Identify the elements in one spectrum the way upstream MapsTorch does (run inside bench/.venv-upstream).

Upstream ``mapstorch==0.0.2`` ships no element-identification function; its documented workflow
is the marimo app ``apps/guess_elements.py`` (README: "Element selection decision support",
``marimo run guess_elements.py``; the app is in the GitHub repository, not in the wheel). This
script repeats the app's automatic part with the installed package:

1. "Start guessing!": one ``mapstorch.opt.fit_spec`` call with every candidate and otherwise
   fit_spec's defaults, exactly as the app calls it: Adam, MSE loss, ``l1_lambda=0`` (no sparsity
   penalty -- upstream's optional L1 term on ``10**logA`` is off in the app and by default),
   amplitudes are log10 values initialised from the spectrum (``init_amp``), shape and calibration
   parameters tuned, SNIP background. Without ``--candidates`` the candidates are the app's:
   ``mapstorch.default.default_fitting_elems`` (35 K, 3 pile-ups, 45 L, 8 M lines, plus the two
   scatter peaks). The app runs ``n_iter = 1000``.
2. Ranking: the app sorts ``{p: fitted_tensors[p].item() for p in default_fitting_elems}``, i.e.
   the fitted log10 amplitudes, scatter peaks included, and plots them as a bar chart. ``score``
   here is that fitted log10 amplitude.
3. Decision rule: the app pre-selects the last ``elem_selection_slider.value`` entries of that
   ascending list, i.e. the top N (slider default N = 12 when the data file carries no element
   list), then appends COHERENT_SCT_AMPLITUDE / COMPTON_AMPLITUDE if they are not among them. So
   ``present`` = the components among the 12 highest fitted log10 amplitudes, scatter peaks
   counting towards the 12 but not reported. The app has no amplitude threshold. (The app then
   shows a periodic table where the user can edit the choice; the table turns each picked
   component into its element symbol and checks all of that element's supported line families
   (``supported_elements_mapping``) plus ``Si_Si`` -- reported as ``app_lines``, for reference.)

Only the first ("guess") fit is run; the app's "Evaluate" refit of the chosen list does not change
the choice. The fit window is ``round((MIN/MAX_ENERGY_TO_FIT - ENERGY_OFFSET) / ENERGY_SLOPE)``
from the starting calibration, as in ``_upstream_fit.py`` (the app's slider defaults to channels
50-1450). Starting values: upstream's ``default_param_vals``, then ``COHERENT_SCT_ENERGY`` =
``--incident-energy`` (what the app's incident-energy slider sets), then the values in
``--params`` (which win; a mismatch with ``--incident-energy`` is reported on stderr).

Iterations: the app's 1000 (``--n-iter``), but the fit stops early once ``--max-seconds``
(default 170 s, 0 = no limit) of fitting have passed, so one run stays under about 3 minutes.
fit_spec has no schedule that depends on ``n_iter``, so stopping after k iterations gives exactly
the fit of ``n_iter = k``; the JSON's ``n_iter`` is the number of iterations done (and
``stopped_by_time_limit`` says whether the limit cut the app's count). With all 93 default
components upstream needs about 0.6-0.7 s per iteration on one free core (about 270 iterations
in 170 s); with 24 candidates (26 components) about 0.09 s (1000 iterations in 90 s). For a count that does not
depend on the machine, pass ``--n-iter N --max-seconds 0``. Beware of oversubscription: upstream
runs thousands of tiny torch ops per iteration, and with ``--threads 2`` on a 2-core machine that
is busy with other work, OpenMP's spin-waiting made one iteration take 30 s instead of 0.6 s
(``--threads 1`` or ``OMP_WAIT_POLICY=PASSIVE`` avoid it). The early stop works by raising from
fit_spec's ``status_updator`` and reading the live tensors, which this script obtains by wrapping
``mapstorch.opt.create_tensors`` (and ``_calculate_loss``, for the loss values) at runtime.

Names are this project's: K family bare (``Fe``; ``Fe_K`` accepted), ``Pb_L``, ``Au_M``, pile-ups
``Si_Cl``. Pile-ups beyond upstream's three are built with its ``define_constants``; candidates
upstream cannot model are dropped (stderr warning, ``dropped`` in the JSON). Upstream's prints
go to stderr; the LAST stdout line is the JSON. ``seconds`` is the wall time of the guessing fit
plus the ranking.
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

import mapstorch.opt as upstream_opt
import numpy as np
import torch
from _upstream_names import fit_window, map_components
from mapstorch.default import (
    default_elem_info,
    default_energy_consts,
    default_fitting_elems,
    default_param_vals,
    default_pileups,
    supported_elements_mapping,
)

SCATTER = {"COHERENT_SCT_AMPLITUDE": "Elastic", "COMPTON_AMPLITUDE": "Compton"}
REPORTED_PARAMS = ("ENERGY_OFFSET", "ENERGY_SLOPE", "ENERGY_QUADRATIC", "FWHM_OFFSET", "FWHM_FANOPRIME",
                   "COHERENT_SCT_ENERGY", "COMPTON_ANGLE")  # fmt: skip
APP_N_ITER = 1000  # apps/guess_elements.py: n_iter = 1000
APP_TOP_N = 12  # apps/guess_elements.py: elem_selection_slider value 12 (no element list in the file)

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--spectrum", required=True, help="1-D .npy, counts per channel")
ap.add_argument("--params", required=True, help="JSON {MAPS parameter: starting value}")
ap.add_argument("--incident-energy", type=float, default=None, help="keV; starting COHERENT_SCT_ENERGY")
ap.add_argument("--candidates", default=None, help="comma-separated (Fe, Pb_L, Au_M, Si_Cl); default: upstream's list")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--n-iter", type=int, default=APP_N_ITER, help="iterations (the app's 1000)")
ap.add_argument("--max-seconds", type=float, default=170.0, help="stop the fit after this long (0: never)")
ap.add_argument("--top-n", type=int, default=APP_TOP_N, help="the app's selection slider (scatter peaks count)")
args = ap.parse_args()
torch.set_num_threads(args.threads)


def warn(msg):
    print(f"_upstream_guess: {msg}", file=sys.stderr)


def lines_of(symbol):
    """Upstream's line-family names of one element, as the app's periodic table checks them."""
    return [symbol if f == "K" else f"{symbol}_{f}" for f in supported_elements_mapping.get(symbol, [])]


t_start = time.perf_counter()
spectrum = np.asarray(np.load(args.spectrum), dtype=np.float64).reshape(-1)
given = json.loads(Path(args.params).read_text())
start = {k: float(v) for k, v in given.items() if k in default_param_vals}
ignored_params = sorted(k for k in given if k not in default_param_vals)
init = {k: float(v) for k, v in default_param_vals.items()}
if args.incident_energy is not None:
    init["COHERENT_SCT_ENERGY"] = float(args.incident_energy)
    if "COHERENT_SCT_ENERGY" in start and abs(start["COHERENT_SCT_ENERGY"] - args.incident_energy) > 0.05:
        warn(
            f"--params COHERENT_SCT_ENERGY={start['COHERENT_SCT_ENERGY']} overrides --incident-energy={args.incident_energy}"
        )
init.update(start)

# Candidates: ours -> upstream's names.
e_consts = default_energy_consts
if args.candidates:
    ours = list(dict.fromkeys(e.strip() for e in args.candidates.split(",") if e.strip()))
    e_consts, mapping, dropped = map_components(ours, e_consts, default_elem_info, default_pileups, warn,
                                               skip=("Elastic", "Compton", *SCATTER))
else:  # the app's candidates; upstream's names are already ours (Fe, Pb_L, Au_M, Si_Cl)
    mapping = {e: e for e in default_fitting_elems if e not in SCATTER and e in e_consts}
    dropped = [e for e in default_fitting_elems if e not in SCATTER and e not in e_consts]
back = {u: o for o, u in mapping.items()}
elements = list(mapping.values()) + list(SCATTER)

first, last = energy_range = fit_window(spectrum, init, warn)


class TimeUp(Exception):
    """Raised from fit_spec's status_updator to end the fit at the time limit."""


class Progress:
    """fit_spec calls ``status_updator.update()`` after every iteration (the app passes a progress bar)."""

    def __init__(self, total, limit, every=50):
        self.total, self.limit, self.every = total, limit, every
        self.t0 = time.perf_counter()
        self.done = 0

    def update(self):
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        if self.done % self.every == 0 or self.done == self.total:
            warn(f"iteration {self.done}/{self.total}, {elapsed:.0f} s")
        if self.limit > 0 and elapsed > self.limit and self.done < self.total:
            warn(f"time limit {self.limit:.0f} s reached after {self.done} iterations; stopping")
            raise TimeUp


# Keep hold of fit_spec's tensors and loss values (so that an early stop loses nothing).
captured = {"tensors": None, "losses": []}
_create_tensors, _calculate_loss = upstream_opt.create_tensors, upstream_opt._calculate_loss


def create_tensors(*a, **k):
    out = _create_tensors(*a, **k)
    captured["tensors"] = out[0]
    return out


def calculate_loss(*a, **k):
    out = _calculate_loss(*a, **k)
    captured["losses"].append(float(out[0].detach()))
    return out


upstream_opt.create_tensors, upstream_opt._calculate_loss = create_tensors, calculate_loss

warn(f"fitting {len(elements)} components (channels {first}-{last}), {args.n_iter} iterations")
clock = Progress(args.n_iter, args.max_seconds)
stopped = False
t0 = time.perf_counter()
with contextlib.redirect_stdout(sys.stderr):
    try:
        upstream_opt.fit_spec(
            spectrum,
            energy_range,
            elements_to_fit=elements,
            init_param_vals=dict(init),
            n_iter=args.n_iter,
            progress_bar=False,
            status_updator=clock,
            e_consts=e_consts,
            elem_info=default_elem_info,
        )
    except TimeUp:
        stopped = True
fit_seconds = time.perf_counter() - t0
tensors, losses = captured["tensors"], captured["losses"]

# The app's ranking and pre-selection.
amps = {p: float(tensors[p].item()) for p in elements if p in tensors}
ascending = sorted(amps, key=lambda p: amps[p])
top = ascending[-args.top_n :] if args.top_n > 0 else []
present = [back[p] for p in reversed(top) if p not in SCATTER]
seconds = time.perf_counter() - t0

symbols = dict.fromkeys(p.split("_")[0] for p in reversed(top) if p not in SCATTER)
app_lines = list(dict.fromkeys(["Si_Si", *(line for s in symbols for line in lines_of(s))]))

result = {
    "impl": "upstream-mapstorch-0.0.2",
    "present": present,
    "ranking": [[back[p], amps[p]] for p in reversed(ascending) if p not in SCATTER],
    "rule": (
        f"top {args.top_n} fitted log10 amplitudes (scatter peaks count towards the {args.top_n}, not reported) "
        f"after one fit of all candidates, no L1 penalty -- the default pre-selection of upstream's "
        f"apps/guess_elements.py (slider value {APP_TOP_N}); no amplitude threshold"
    ),
    "seconds": seconds,
    "dropped": dropped,
    "score": "fitted log10 amplitude (upstream's tensor value)",
    "scatter_scores": {SCATTER[p]: amps[p] for p in SCATTER if p in amps},
    "scatter_in_top": [SCATTER[p] for p in top if p in SCATTER],
    "app_lines": app_lines,
    "n_iter": clock.done,
    "n_iter_requested": args.n_iter,
    "n_iter_app_default": APP_N_ITER,
    "stopped_by_time_limit": stopped,
    "max_seconds": args.max_seconds,
    "fit_seconds": fit_seconds,
    "seconds_per_iter": fit_seconds / max(clock.done, 1),
    "total_seconds": time.perf_counter() - t_start,
    "loss_first": losses[0] if losses else None,
    "loss_final": losses[-1] if losses else None,  # at the parameters before the last step
    "first": first,
    "last": last,
    "n_candidates": len(mapping),
    "parameters": {p: float(tensors[p]) for p in REPORTED_PARAMS if p in tensors},
    "ignored_params": ignored_params,
    "threads": args.threads,
    "upstream_version": importlib.metadata.version("mapstorch"),
    "torch": torch.__version__,
}
print(json.dumps(result))
