"""The Van Loan–Pitsianis rearrangement, which turns Kronecker products into rank-one matrices."""

from __future__ import annotations

import torch

from .._checks import as_positive_int, check_tensor

__all__ = ["rearrange", "rearrange_inverse"]


def rearrange(S: torch.Tensor, p: int, q: int) -> torch.Tensor:
    """``R(S)``: ``(..., pq, pq) → (..., p², q²)`` with ``R(A ⊗ B) = vec(A) vec(B)ᵀ`` (row-major vec).

    Row ``(i, j)`` of ``R(S)`` is the vectorized ``q × q`` block ``S[iq:(i+1)q, jq:(j+1)q]``. R permutes entries, so
    it is an isometry for the Frobenius norm and its inverse is its adjoint; the number of Kronecker terms of S
    is ``rank R(S)`` (Van Loan & Pitsianis 1993). Cost O(p²q²) (a copy).
    """
    p, q = as_positive_int("p", p), as_positive_int("q", q)
    S = check_tensor("S", S, finite=False)
    if S.dim() < 2 or S.shape[-2:] != (p * q, p * q):
        raise ValueError(f"S must have shape (..., {p * q}, {p * q}) for p = {p}, q = {q}, got {tuple(S.shape)}")
    batch = S.shape[:-2]
    return S.reshape(*batch, p, q, p, q).transpose(-3, -2).reshape(*batch, p * p, q * q)


def rearrange_inverse(R: torch.Tensor, p: int, q: int) -> torch.Tensor:
    """``R⁻¹``: ``(..., p², q²) → (..., pq, pq)``, the inverse (and adjoint) of :func:`rearrange`. Cost O(p²q²)."""
    p, q = as_positive_int("p", p), as_positive_int("q", q)
    R = check_tensor("R", R, finite=False)
    if R.dim() < 2 or R.shape[-2:] != (p * p, q * q):
        raise ValueError(f"R must have shape (..., {p * p}, {q * q}) for p = {p}, q = {q}, got {tuple(R.shape)}")
    batch = R.shape[:-2]
    return R.reshape(*batch, p, p, q, q).transpose(-3, -2).reshape(*batch, p * q, p * q)
