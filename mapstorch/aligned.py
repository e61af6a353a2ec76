"""Arrays whose data start on a cache line, for the compiled kernels' vector loads and stores
(NumPy only: the readers use it without numba)."""

from __future__ import annotations

import numpy as np

__all__ = ["VECTOR_BYTES", "empty"]

VECTOR_BYTES = 64  # one AVX-512 register, two AVX2 ones: 16 float32 or 8 float64; one cache line


def empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a :data:`VECTOR_BYTES` boundary.

    NumPy's large arrays start 16 bytes past one (malloc's header), so each 64-byte vector
    load or store of their rows spans two cache lines: the SNIP's sweep took 2.47 against 1.79
    us per spectrum on such a slab (bench/RESULTS.md, tenth session)."""
    dtype = np.dtype(dtype)
    shape = tuple(int(n) for n in (shape if isinstance(shape, tuple | list) else (shape,)))
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + VECTOR_BYTES, dtype=np.uint8)
    start = -raw.ctypes.data % VECTOR_BYTES
    return raw[start:start + nbytes].view(dtype).reshape(shape)
