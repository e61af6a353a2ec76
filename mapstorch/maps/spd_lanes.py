"""Many small symmetric positive definite systems at once, as element-wise tensor operations.

The GPU counterpart of :mod:`spd_cpu`. The matrices are laid out ``[K, K, P]``: the pixel index
last and contiguous, so that each step of the Cholesky factorisation is one element-wise
operation over all pixels' entries (coalesced on a GPU; about ``K^3 / 3`` entries read and
written per pixel, so the cost is memory traffic, and the kernel launches do not depend on
``P``). LAPACK-style batched routines on a GPU factorise one small matrix per thread block and
leave most of the device idle at ``K`` about 20.

The factorisation runs in ``work`` precision (float64 by default, as the CPU kernels). A pivot
below ``rel`` times its diagonal entry counts as zero (rounding of the input: 16 units in the
last place of the input's dtype by default), and the matrix is reported as not positive
definite in ``ok``; its rows of the output are not meaningful and are left to the caller (e.g. a
pseudo-inverse).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cholesky", "inverse_diagonal", "solve", "packed_stderr", "default_rel"]


def default_rel(dtype: torch.dtype) -> float:
    """The pivot floor relative to its diagonal entry: 16 units in the last place of ``dtype``."""
    return 16.0 * float(torch.finfo(dtype).eps)


def cholesky(a: Tensor, rel: float | None = None, work: torch.dtype = torch.float64,
             overwrite: bool = False) -> tuple[Tensor, Tensor]:
    """Lower Cholesky factors ``L [K, K, P]`` (``work`` dtype; the strict upper triangle is left
    as scratch) of ``a [K, K, P]`` (only the lower triangle is read), and ``ok [P]``: positive
    definite. Where not, the pivot was replaced by 1 so that the factor stays finite.
    ``overwrite``: factorise ``a`` in place when it is contiguous and of the ``work`` dtype."""
    k, k2, p = a.shape
    if k != k2:
        raise ValueError(f"matrices must be square: got [K, K, P] = {tuple(a.shape)}")
    rel = default_rel(a.dtype) if rel is None else rel
    if overwrite and a.dtype == work and a.is_contiguous():
        low = a
    else:
        low = torch.empty(a.shape, dtype=work, device=a.device).copy_(a)  # pixel-last, whatever a's strides
    floor = torch.diagonal(low, dim1=0, dim2=1).T.abs() * rel  # [K, P]: the input's diagonal
    ok = torch.ones(p, dtype=torch.bool, device=a.device)
    for j in range(k):
        piv = low[j, j]
        good = piv > floor[j]
        ok &= good
        d = torch.where(good, piv, torch.ones_like(piv)).sqrt_()
        low[j, j] = d
        if j + 1 < k:
            col = low[j + 1:, j] / d  # [K - j - 1, P]
            low[j + 1:, j] = col
            low[j + 1:, j + 1:] -= col[:, None, :] * col[None, :, :]
    return low, ok


def _inverse_factor(low: Tensor) -> Tensor:
    """``L^-1 [K, K, P]`` (lower triangular) of lower triangular ``L``, row by row."""
    k = low.shape[0]
    inv = torch.zeros_like(low)
    for r in range(k):
        rec = low[r, r].reciprocal()
        if r:  # (L^-1)[r, c] = -sum_{t=c}^{r-1} L[r, t] (L^-1)[t, c] / L[r, r]
            inv[r, :r] = (low[r, :r, None, :] * inv[:r, :r]).sum(0) * -rec
        inv[r, r] = rec
    return inv


def inverse_diagonal(a: Tensor, rel: float | None = None, work: torch.dtype = torch.float64,
                     overwrite: bool = False) -> tuple[Tensor, Tensor]:
    """``(diag(inv(a)) [K, P], ok [P])`` for symmetric ``a [K, K, P]``, in ``a``'s dtype
    (``overwrite``: see :func:`cholesky`)."""
    low, ok = cholesky(a, rel, work, overwrite)
    inv = _inverse_factor(low)
    return inv.square_().sum(0).to(a.dtype), ok


def solve(a: Tensor, b: Tensor, rel: float | None = None, work: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """``(inv(a) b [K, P], ok [P])`` for symmetric ``a [K, K, P]`` and ``b [K, P]``."""
    low, ok = cholesky(a, rel, work)
    k = low.shape[0]
    z = torch.empty(b.shape, dtype=work, device=b.device).copy_(b)
    for r in range(k):  # L z = b
        if r:
            z[r] -= (low[r, :r] * z[:r]).sum(0)
        z[r] /= low[r, r]
    for r in range(k - 1, -1, -1):  # L^T x = z
        if r + 1 < k:
            z[r] -= (low[r + 1:, r] * z[r + 1:]).sum(0)
        z[r] /= low[r, r]
    return z.to(b.dtype), ok


def packed_stderr(upper: Tensor, active: Tensor, rel: float | None = None,
                  work: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Standard errors ``[P, K]`` from the packed upper triangles ``upper [K (K + 1) / 2, P]``
    (row by row, as ``torch.triu_indices``; pixel last) of information matrices, restricted to
    the ``active [P, K]`` entries (NaN elsewhere): each matrix is scaled to a unit diagonal,
    factorised and inverted. ``ok [P]``: the restricted matrix was positive definite (rows where
    not are not meaningful).

    ``work`` defaults to ``upper``'s dtype: the entries carry that dtype's rounding already
    (sums over channels), which the condition number amplifies as much as the factorisation's
    own, so a wider dtype buys no accuracy here and costs twice the memory traffic."""
    p, k = active.shape
    if upper.shape != (k * (k + 1) // 2, p):
        raise ValueError(f"packed information {tuple(upper.shape)} does not match {p} matrices of {k}")
    work = upper.dtype if work is None else work
    dev = upper.device
    r, c = torch.triu_indices(k, k, device=dev)
    act = active.T  # [K, P]
    # scaled to a unit diagonal and restricted to the active entries, still packed ([T, P]):
    # the inactive rows and columns become those of the identity
    diag = upper[r == c]  # [K, P]
    s = torch.where(act, diag.clamp(min=torch.finfo(upper.dtype).tiny).rsqrt(), torch.ones_like(diag))
    scaled = upper.to(work) * s[r].to(work) * s[c].to(work)
    scaled = torch.where(act[r] & act[c], scaled, (r == c).to(work)[:, None])
    where = torch.empty(k, k, dtype=torch.long, device=dev)
    pos = torch.arange(r.numel(), device=dev)
    where[r, c] = pos
    where[c, r] = pos
    full = scaled[where.flatten()].view(k, k, p)  # [K, K, P], a new tensor: factorised in place
    var, ok = inverse_diagonal(full, rel, work, overwrite=True)
    se = (var.clamp_(min=0.0).sqrt_() * s).T.to(upper.dtype)
    return torch.where(active, se, torch.full_like(se, float("nan"))), ok
