"""Index sets and fiber matrices of TT-cross (notation of :mod:`lowrankopt.cross.tt_cross`).

A fiber block ``(a, n, b) = A[I_{<k}, :, J_{>k}]`` is read as the ``(a n, b)`` matrix of a left core or the
``(n b, a)`` matrix of a right core; the rows that rect-maxvol selects in it extend the index set of the next core
(``I_{≤k}`` or ``J_{≥k}``), and its interpolation coefficients B (``M = B M[rows]``) become the core.
"""

from __future__ import annotations

import torch

from .maxvol import _maxvol, _rect_maxvol

_EMPTY = (1, 0)  # the index set of no modes: one empty multi-index


def fiber_index(left: torch.Tensor, n: int, right: torch.Tensor) -> torch.Tensor:
    """The multi-indices ``(a·n·b, d)`` of the fiber block ``I_{<k} × [n] × J_{>k}``, in C order over (a, i, b)."""
    a, b = left.shape[0], right.shape[0]
    i = torch.arange(n, device=left.device)
    return torch.cat(
        [
            left[:, None, None, :].expand(a, n, b, left.shape[1]),
            i[None, :, None, None].expand(a, n, b, 1),
            right[None, None, :, :].expand(a, n, b, right.shape[1]),
        ],
        dim=3,
    ).reshape(a * n * b, -1)


def _select(M: torch.Tensor, tol, dr, max_rank, maxvol_tol, maxvol_iters):
    """Rows of the tall fiber matrix ``M`` and the coefficients B (``M ≈ B M[rows]``): QR, then rect-maxvol."""
    Q = torch.linalg.qr(M).Q
    m, r = Q.shape
    if m <= r:
        return torch.arange(m, device=M.device), torch.eye(m, dtype=M.dtype, device=M.device)
    hi = min(r + dr[1], m, max(max_rank, r))
    if hi == r:
        return _maxvol(Q, maxvol_tol, maxvol_iters, check_rank=False)
    return _rect_maxvol(Q, tol, min(r + dr[0], hi), hi, maxvol_tol, maxvol_iters, check_rank=False)


# Fiber matrices: the block ``(a, n, b)`` as ``(a n, b)`` (rows ``α·n + i``) for a left core and as ``(n b, a)``
# (rows ``i·b + β``) for a right one.
def _left_matrix(Z: torch.Tensor) -> torch.Tensor:
    return Z.reshape(-1, Z.shape[2])


def _left_core(B: torch.Tensor, a: int, n: int) -> torch.Tensor:
    return B.reshape(a, n, -1)


def _grow_left(left: torch.Tensor, n: int, rows: torch.Tensor) -> torch.Tensor:
    """``I_{≤k}``: the chosen rows ``α·n + i`` of ``I_{<k} × [n]``."""
    return torch.cat([left[rows // n], (rows % n)[:, None]], 1)


def _right_matrix(Z: torch.Tensor) -> torch.Tensor:
    return Z.reshape(Z.shape[0], -1).T


def _right_core(B: torch.Tensor, n: int, b: int) -> torch.Tensor:
    return B.T.reshape(-1, n, b)


def _grow_right(right: torch.Tensor, n: int, rows: torch.Tensor) -> torch.Tensor:
    """``J_{≥k}``: the chosen rows ``i·b + β`` of ``[n] × J_{>k}``."""
    rows = rows.to(right.device)
    b = right.shape[0]
    return torch.cat([(rows // b)[:, None], right[rows % b]], 1)
