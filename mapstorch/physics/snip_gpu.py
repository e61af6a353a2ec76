"""XRF-Maps' sequential SNIP sweeps as one GPU kernel (Triton), for maps on CUDA.

Every pass of the XRF-Maps clipping is an in-place sweep over the window channels in order
(:mod:`mapstorch.physics.snip`), so channel ``c`` reads the already-clipped value of its left
neighbour. On a GPU the natural parallelism is over spectra: one kernel runs *all* passes,
channel after channel, with each thread owning one spectrum of a channel-major block ``v [C, P]``
(neighbouring threads read neighbouring memory); the smoothing and the log-log transform
before, and the inverse transform after, run in the same kernel. The schedule of the passes, the channel and its
two neighbours at every step, is built once on the host and shared by all spectra.

This gives exactly the numbers of the sequential sweep (the same operations in the same order), in
``passes x channels`` dependent steps per spectrum instead of the pointer jumping's
``passes x log2(C)`` full-tensor gathers. It is used when Triton is importable and the data are
on a CUDA device; :func:`available` says so.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

__all__ = ["available", "sweep_schedule", "snip"]


@functools.lru_cache(maxsize=1)
def _triton():
    try:
        import triton
        import triton.language as tl
    except Exception:  # noqa: BLE001 -- not installed, or broken on this machine: use the fallback
        return None

    @triton.jit
    def _sweeps(x_ptr, v_ptr, out_ptr, ch_ptr, lo_ptr, hi_ptr, stride_ptr, n_steps, n_pix, n_x, n_v, shift, lo_limit,
                up_limit, BLOCK: tl.constexpr):
        stride = tl.load(stride_ptr)  # n_pix as int64: row offsets exceed 2^31 for large chunks
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_pix
        # 1. 5-channel boxcar of the raw crop x [n_x, P] (zero at its two edge channels each
        #    side), then v = log(log(s + 1) + 1), for the n_v work channels (x channel j + shift)
        for j in range(n_v):
            jx = j + shift
            if (jx >= 2) & (jx <= n_x - 3):
                base = x_ptr + (jx - 2) * stride + offs
                s = tl.load(base, mask=mask, other=0.0)
                s += tl.load(base + stride, mask=mask, other=0.0)
                s += tl.load(base + 2 * stride, mask=mask, other=0.0)
                s += tl.load(base + 3 * stride, mask=mask, other=0.0)
                s += tl.load(base + 4 * stride, mask=mask, other=0.0)
                s = s * 0.2
            else:
                s = tl.zeros([BLOCK], dtype=v_ptr.dtype.element_ty)
            tl.store(v_ptr + j * stride + offs, tl.log(tl.log(s + 1.0) + 1.0), mask=mask)
        # 2. every pass of the clipping, channel after channel, in place
        for k in range(n_steps):
            c = tl.load(ch_ptr + k) * stride
            a = tl.load(v_ptr + tl.load(lo_ptr + k) * stride + offs, mask=mask, other=0.0)
            b = tl.load(v_ptr + tl.load(hi_ptr + k) * stride + offs, mask=mask, other=0.0)
            cur = tl.load(v_ptr + c + offs, mask=mask, other=0.0)
            tl.store(v_ptr + c + offs, tl.minimum(cur, (a + b) * 0.5), mask=mask)
        # 3. back to counts over the window channels (non-finite values: 0)
        for j in range(lo_limit, up_limit + 1):
            v = tl.load(v_ptr + j * stride + offs, mask=mask, other=0.0)
            bg = tl.exp(tl.exp(v) - 1.0) - 1.0
            bg = tl.where((bg == bg) & (tl.abs(bg) < float("inf")), bg, 0.0)
            tl.store(out_ptr + (j - lo_limit) * stride + offs, bg, mask=mask)

    return _sweeps


def available(device: torch.device | str) -> bool:
    """True where the kernel runs: a CUDA device and an importable Triton."""
    return torch.device(device).type == "cuda" and _triton() is not None


def sweep_schedule(plans: list[tuple[np.ndarray, np.ndarray, tuple]], device) -> tuple[Tensor, Tensor, Tensor]:
    """Flatten the passes' ``(lo, hi, blocks)`` plans (:func:`mapstorch.physics.snip._sweep_plan`)
    into the kernel's step tables ``(channel, lo, hi)``, int32 ``[steps]``, in sweep order."""
    ch, lo, hi = [], [], []
    for plan_lo, plan_hi, blocks in plans:
        first, last = blocks[0][0], blocks[-1][1]
        c = np.arange(first, last)
        ch.append(c)
        lo.append(plan_lo[first:last])
        hi.append(plan_hi[first:last])
    return tuple(torch.as_tensor(np.concatenate(x).astype(np.int32), device=device) for x in (ch, lo, hi))


def snip(x: Tensor, shift: int, n_v: int, lo_limit: int, up_limit: int, schedule: tuple[Tensor, Tensor, Tensor],
         block: int = 128) -> Tensor:
    """The SNIP background of channel-major raw counts ``x [n_x, P]`` (a crop of the spectra):
    work channel ``j`` (``0 <= j < n_v``) is crop channel ``j + shift``; the passes of
    ``schedule`` run over the work channels; returns the background of work channels
    ``lo_limit..up_limit``, ``[up_limit - lo_limit + 1, P]``."""
    kernel = _triton()
    if kernel is None:
        from mapstorch.errors import InputError

        raise InputError("the SNIP kernel needs Triton (`pip install triton`, part of PyTorch's CUDA builds); "
                         "use engine='auto'")
    ch, lo, hi = schedule
    n_x, n_pix = x.shape
    v = torch.empty((n_v, n_pix), dtype=x.dtype, device=x.device)
    out = torch.empty((up_limit - lo_limit + 1, n_pix), dtype=x.dtype, device=x.device)
    grid = ((n_pix + block - 1) // block,)
    stride = torch.tensor([n_pix], dtype=torch.int64, device=x.device)
    kernel[grid](x, v, out, ch, lo, hi, stride, int(ch.numel()), n_pix, n_x, n_v, shift, lo_limit, up_limit, BLOCK=block)
    return out
