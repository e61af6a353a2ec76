"""Time upstream MapsTorch's forward+backward (run inside bench/.venv-upstream; see model.py).

Upstream's default candidate set (``default_fitting_elems``: 35 K, 3 pile-up, 2 scatter, 45 L,
8 M = 93 components) with its default parameter values, every element amplitude at log10 = 3,
``requires_grad`` on the parameters upstream fits by default and on every amplitude, over
channels 50-1450 (1401 channels), loss = sum of the model. Prints one JSON line.
"""

import argparse
import json
import statistics
import time

import torch
from mapstorch.default import default_fitting_elems, default_fitting_params, default_param_vals
from mapstorch.map import model_spec

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--repeats", type=int, default=5)
ap.add_argument("--batch", type=int, default=0)
ap.add_argument("--first", type=int, default=50)
ap.add_argument("--last", type=int, default=1450)
args = ap.parse_args()
torch.set_num_threads(args.threads)

elements = list(default_fitting_elems)
shape = (args.batch, 1) if args.batch else ()  # upstream broadcasts [B, 1] against [B, C]


def make_params():
    params = {}
    for name, value in default_param_vals.items():
        t = torch.full(shape, float(value), dtype=torch.float32)
        params[name] = t.requires_grad_(name in default_fitting_params)
    for e in elements:
        params[e] = torch.full(shape, 3.0, dtype=torch.float32).requires_grad_(True)
    return params


def once():
    params = make_params()
    t0 = time.perf_counter()
    out = model_spec(params, (args.first, args.last), elements)
    out.sum().backward()
    return time.perf_counter() - t0, tuple(out.shape)


once()  # warm-up
times = []
for _ in range(args.repeats):
    dt, shp = once()
    times.append(dt)
result = {
    "impl": "upstream-mapstorch-0.0.2",
    "components": len(elements),
    "channels": args.last - args.first + 1,
    "batch": args.batch,
    "output_shape": list(shp),
    "median_s": statistics.median(times),
    "min_s": min(times),
    "repeats": args.repeats,
    "threads": args.threads,
    "torch": torch.__version__,
}
if args.batch:
    result["spectra_per_s"] = args.batch / statistics.median(times)
print(json.dumps(result))
