"""How long PyTorch's OpenMP threads spin between parallel regions, for a process that also runs
mapstorch's compiled kernels.

PyTorch's CPU operations run on OpenMP threads; its CPU wheels use GNU OpenMP, whose idle
threads spin for a while after each parallel region (``GOMP_SPINCOUNT``, 300,000 turns by
default) before they sleep, so that the next operation starts at once. mapstorch's compiled
kernels (the SNIP sweep, the NNLS iterations, the weights and chi-square, the small systems)
run on Python threads of their own. A kernel called right after a PyTorch operation therefore
shares the cores with OpenMP threads still spinning. Measured on 2 cores (bench/RESULTS.md):
the linear map fit took 14-16 us per pixel with the default, 12 with ``GOMP_SPINCOUNT=30000``,
and the nonlinear one was no slower (also faster); ``OMP_WAIT_POLICY=PASSIVE`` (no spinning)
gave the linear fit 11.8 us but cost the nonlinear fit, with its many smaller operations, a
quarter of its speed.

GNU OpenMP reads the setting once, when it is loaded (with ``import torch``). The ``mapstorch``
command therefore sets ``GOMP_SPINCOUNT=30000`` for its own process before anything imports
PyTorch, unless ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` is already set, or
``MAPSTORCH_OPENMP=default``. A program that fits maps through the Python API can call
:func:`tune_openmp` before it imports torch, or set the variable itself. (Builds of PyTorch on
Intel's OpenMP spin for ``KMP_BLOCKTIME`` milliseconds instead, 200 by default; not measured here.)
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["tune_openmp", "SPIN_COUNT"]

log = logging.getLogger(__name__)

SPIN_COUNT = 30000  # measured best of 1,000 / 10,000 / 30,000 / 100,000 / default on 2 cores


def tune_openmp() -> bool:
    """Set ``GOMP_SPINCOUNT`` (see the module) unless the user chose a wait policy, or PyTorch
    (and with it OpenMP) is already loaded, where the setting would have no effect. Returns
    whether it was set."""
    if os.environ.get("MAPSTORCH_OPENMP", "").strip().lower() == "default":
        return False
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    if "torch" in sys.modules:
        log.debug("torch is already imported: its OpenMP threads keep their spin count (GOMP_SPINCOUNT has to be "
                  "set before `import torch`)")
        return False
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True
