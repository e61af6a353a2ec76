"""Helpers for compiled kernels written as explicit LLVM vector code (numba intrinsics).

LLVM's loop vectoriser turns numba's innermost loops into SIMD code, but where a loop reads and
writes rows of one array it must check at run time that they do not overlap, and it keeps
partial sums in memory; for a loop of a few vectors that repeats millions of times, those checks
and loads cost as much as the arithmetic. A kernel that loads, computes and stores whole 64-byte
vectors itself avoids both (:func:`mapstorch.physics.snip_cpu._clip_steps`,
:func:`mapstorch.maps.spd_cpu._quad_lanes`). These helpers build such code inside a numba
``@intrinsic``; the float operations stay exactly those written (no fused multiply-add unless a
kernel calls ``llvm.fma`` itself, no reassociation), so the numbers are those of the plain loops
they replace, bit for bit.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils

from mapstorch.aligned import VECTOR_BYTES, empty

__all__ = ["VECTOR_BYTES", "empty", "empty_rows", "vector_type", "splat", "row_pointer", "int64", "in_blocks"]


_I8P = ir.IntType(8).as_pointer()
_I32 = ir.IntType(32)


@numba.njit(nogil=True, cache=True)
def empty_rows(rows, cols, dtype):  # pragma: no cover - compiled
    """:func:`empty` ``(rows, cols)`` inside compiled code (numba's own arrays start on 32-byte
    boundaries)."""
    raw = np.empty(rows * cols + VECTOR_BYTES, dtype)
    start = (-raw.ctypes.data % VECTOR_BYTES) // raw.itemsize
    return raw[start:start + rows * cols].reshape((rows, cols))


def vector_type(context, dtype) -> tuple[ir.VectorType, int]:
    """The LLVM vector of :data:`VECTOR_BYTES` bytes of the numba scalar type ``dtype``, and its lanes."""
    scalar = context.get_value_type(dtype)
    lanes = VECTOR_BYTES // context.get_abi_sizeof(scalar)
    return ir.VectorType(scalar, lanes), lanes


def splat(builder, vec: ir.VectorType, value):
    """A vector of type ``vec`` with ``value`` in every lane."""
    out = ir.Constant(vec, ir.Undefined)
    for i in range(vec.count):
        out = builder.insert_element(out, value, ir.Constant(_I32, i))
    return out


def row_pointer(builder, data, index, stride, vec: ir.VectorType):
    """A pointer to vectors ``vec`` at row ``index`` (int64) of an array whose rows are ``stride``
    bytes apart, from its data pointer ``data``."""
    return builder.bitcast(builder.gep(builder.bitcast(data, _I8P), [builder.mul(index, stride)]), vec.as_pointer())


def int64(context, builder, value, numba_type):
    """``value`` of numba type ``numba_type`` as an int64."""
    return context.cast(builder, value, numba_type, types.int64)


def in_blocks(builder, n, width: int, body) -> None:
    """LLVM IR calling ``body(first, width)`` for ``n`` (an int64 value) items in blocks of
    ``width`` (``first``: an int64 value, the block's first item), then ``body(first, 1)`` for
    each item after the last whole block: straight-line code for ``width`` independent items
    at a time (registers, chains of operations in flight), without a per-item loop."""
    i64 = ir.IntType(64)
    blocks = builder.sdiv(n, ir.Constant(i64, width))
    with cgutils.for_range(builder, blocks) as loop:
        body(builder.mul(loop.index, ir.Constant(i64, width)), width)
    done = builder.mul(blocks, ir.Constant(i64, width))
    with cgutils.for_range(builder, builder.sub(n, done)) as loop:
        body(builder.add(done, loop.index), 1)
