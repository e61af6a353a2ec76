"""The C allocator's settings for large arrays (glibc on Linux).

Fitting a map allocates and frees arrays of tens of megabytes ``[pixels, channels]`` many times
per chunk. By default glibc serves such blocks with ``mmap`` and returns freed memory at the top
of the heap to the system; the next array of the same size then costs hundreds of thousands of
page faults, each zeroing a fresh page. :func:`tune_allocator` asks glibc to serve large blocks
from the heap and to keep what is freed for reuse (``mallopt(M_MMAP_MAX, 0)`` and a 2 GB
``M_TRIM_THRESHOLD``): on 2 CPU threads the linear map fits about 40 % more pixels per second
and the nonlinear refit about 25 % more (bench/RESULTS.md). The process keeps its peak heap
until it exits, so the ``mapstorch`` command sets it for its own process; a program that calls
:func:`mapstorch.maps.fit_map` may call it too, or set the same through the environment
(``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2000000000``). ``MAPSTORCH_MALLOC=default`` leaves
the allocator alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["tune_allocator"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_BYTES = 2_000_000_000  # mallopt takes an int


def tune_allocator() -> bool:
    """Serve large blocks from the heap and keep freed memory (glibc only; see the module).
    Returns whether the settings were applied."""
    if os.environ.get("MAPSTORCH_MALLOC", "").strip().lower() == "default":
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt  # glibc; musl has none
    except (OSError, AttributeError):
        log.debug("no glibc mallopt here: the allocator keeps its defaults")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES))
    log.debug("glibc allocator: large blocks from the heap, freed memory kept (%s)", "applied" if ok else "refused")
    return ok
