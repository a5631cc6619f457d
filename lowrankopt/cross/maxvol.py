"""Dominant submatrices: maxvol and rectangular maxvol (the row selection behind cross approximation).

For a tall ``A (n, r)`` of full column rank, a set of r rows I is *dominant* with tolerance τ when every entry of
``B = A · A[I]⁻¹`` is at most τ in modulus (``B[I] = I_r``, ``A = B · A[I]``). Then for any other r rows J,
``|det A[J]| ≤ (√r τ)^r |det A[I]|`` (Hadamard's inequality on ``B[J]``): A[I] has near-maximal volume, which is
what makes cross (skeleton) approximations quasi-optimal (Goreinov et al. 2010). Rectangular maxvol (Mikhalev &
Oseledets 2018) adds rows until every row of the coefficient matrix B (``A = B · A[I]``) has norm at most τ.
"""

from __future__ import annotations

import math

import torch

from .._checks import as_positive_int, check_scalar, check_tensor

__all__ = ["maxvol", "rect_maxvol"]


def _check(A: object, tol: float, name: str = "A") -> torch.Tensor:
    A = check_tensor(name, A, ndim=2)
    n, r = A.shape
    if r < 1 or n < r:
        raise ValueError(f"{name} must be tall, (n, r) with n ≥ r ≥ 1, got {tuple(A.shape)}")
    _check_tolerance("tol", tol)
    return A


def _check_tolerance(name: str, value: object) -> None:
    """A finite number ≥ 1 (a dominance or row-norm tolerance), else an error naming ``name``."""
    if not check_scalar(name, value) >= 1:
        raise ValueError(f"{name} must be ≥ 1, got {value}")


def maxvol(A: torch.Tensor, tol: float = 1.05, max_iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """r rows of a tall ``A (n, r)`` forming a dominant (near-maximal-volume) submatrix.

    Start from the pivot rows of an LU factorization with partial pivoting; then, while some ``|B_ij| > tol``
    (``B = A A[I]⁻¹``), swap row i into position j — which multiplies the volume by ``|B_ij| > 1`` — with a rank-one
    update of B (Goreinov, Oseledets, Savostyanov, Tyrtyshnikov & Zamarashkin 2010).

    Args:
        A: ``(n, r)``, n ≥ r, full column rank, float32 or float64, any device.
        tol: the dominance tolerance τ ≥ 1 (1.05: a few swaps beyond LU).
        max_iters: at most this many swaps.

    Returns ``(I, B)``: row indices ``(r,)`` (int64) and ``B = A A[I]⁻¹ (n, r)`` with ``B[I] = I_r`` and, unless
    ``max_iters`` stopped it, ``max |B| ≤ tol``. Cost O(n r²) for the LU and O(n r) per swap.
    """
    A = _check(A, tol)
    return _maxvol(A, tol, as_positive_int("max_iters", max_iters))


def _maxvol(A: torch.Tensor, tol: float, max_iters: int, check_rank: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`maxvol` on checked input. tt_cross calls it with ``check_rank=False`` on orthonormal factors, whose
    pivoted LU cannot break down."""
    n, r = A.shape
    if r == 1:  # the entry of largest modulus; B = A / A[i] is dominant with tol 1
        i = A[:, 0].abs().argmax()
        if A[i, 0].item() == 0:
            raise ValueError("A must have full column rank (it is zero)")
        return i.reshape(1), A / A[i, 0]
    LU, pivots, _ = torch.linalg.lu_factor_ex(A)
    perm = list(range(n))
    for i, p in enumerate((pivots - 1).tolist()):  # LAPACK's sequential row swaps
        perm[i], perm[p] = perm[p], perm[i]
    index = torch.tensor(perm[:r], device=A.device)
    if check_rank and bool((LU.diagonal().abs() <= torch.finfo(A.dtype).eps * A.abs().max() * n).any()):
        raise ValueError("A must have full column rank (its LU factorization has a zero pivot)")
    B = torch.linalg.solve(A[index].T, A.T).T
    for _ in range(max_iters):
        value, flat = B.abs().view(-1).max(0)
        if value.item() <= tol:
            break
        i, j = divmod(flat.item(), r)
        index[j] = i
        row = B[i].clone()
        row[j] -= 1
        B.addr_(B[:, j].clone(), row, alpha=-1 / B[i, j].item())
    return index, B


def rect_maxvol(
    A: torch.Tensor,
    tol: float = 1.1,
    min_rank: int | None = None,
    max_rank: int | None = None,
    *,
    maxvol_tol: float = 1.05,
    maxvol_iters: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k ≥ r rows of a tall ``A (n, r)`` such that ``A = B A[I]`` with every row of B of norm at most ``tol``.

    Start from :func:`maxvol` (``maxvol_tol``, ``maxvol_iters``); then repeatedly add the row with the largest
    ``‖B_i‖``, updating B and the squared row norms by a rank-one formula (Mikhalev & Oseledets 2018), until
    every ``‖B_i‖ ≤ tol`` and at least ``min_rank`` rows are chosen, or ``max_rank`` rows are.

    Args:
        A: ``(n, r)``, n ≥ r, full column rank.
        tol: the row-norm tolerance τ ≥ 1.
        min_rank: at least this many rows (default r).
        max_rank: at most this many rows (default n).

    Returns ``(I, B)``: indices ``(k,)`` and ``B (n, k)`` with ``B[I] = I_k`` and ``A = B A[I]``; outside I, row j of
    B is the minimum-norm vector c with ``cᵀ C[I] = C_j`` in the coordinates ``C = A A[I₀]⁻¹`` of the initial maxvol
    rows I₀ (so ``B = C C[I]⁺`` there). Cost O(n r²) for maxvol plus O(n k) per added row.
    """
    A = _check(A, tol)
    _check_tolerance("maxvol_tol", maxvol_tol)
    n, r = A.shape
    min_rank = r if min_rank is None else as_positive_int("min_rank", min_rank)
    max_rank = n if max_rank is None else as_positive_int("max_rank", max_rank)
    if not r <= min_rank <= max_rank <= n:
        raise ValueError(f"need r = {r} ≤ min_rank = {min_rank} ≤ max_rank = {max_rank} ≤ n = {n}")
    return _rect_maxvol(A, tol, min_rank, max_rank, maxvol_tol, as_positive_int("maxvol_iters", maxvol_iters))


def _rect_maxvol(
    A, tol, min_rank, max_rank, maxvol_tol, maxvol_iters, check_rank: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rect_maxvol` on checked input (``check_rank`` as for :func:`_maxvol`)."""
    index, B = _maxvol(A, maxvol_tol, maxvol_iters, check_rank)
    chosen = index.tolist()
    F = B.square().sum(1)
    F[index] = -math.inf  # never again: a chosen row must not be picked when every other one has F = 0
    while len(chosen) < max_rank:
        value, i = F.max(0)
        if len(chosen) >= min_rank and value.item() <= tol * tol:
            break
        i = i.item()
        v = B @ B[i]
        lam = 1 / (1 + v[i])
        B = torch.cat([B - lam * torch.outer(v, B[i]), (lam * v)[:, None]], dim=1)
        F = F - lam * v.square()
        chosen.append(i)
        F[i] = -math.inf
    index = torch.tensor(chosen, device=A.device)
    B[index] = torch.eye(len(chosen), dtype=A.dtype, device=A.device)  # exact in exact arithmetic; clean roundoff
    return index, B
