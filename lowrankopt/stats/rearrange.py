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
    return _swap_middle("S", S, p, q, inverse=False)


def rearrange_inverse(R: torch.Tensor, p: int, q: int) -> torch.Tensor:
    """``R⁻¹``: ``(..., p², q²) → (..., pq, pq)``, the inverse (and adjoint) of :func:`rearrange`. Cost O(p²q²)."""
    return _swap_middle("R", R, p, q, inverse=True)


def _swap_middle(name: str, T: torch.Tensor, p: int, q: int, *, inverse: bool) -> torch.Tensor:
    """The permutation behind both directions: split the last two axes of ``T`` as ``(a, b)`` and ``(c, e)``, swap
    the ``b`` and ``c`` axes and merge back to ``(a c, b e)``; ``(a, b, c, e) = (p, q, p, q)`` is R and
    ``(p, p, q, q)`` its inverse. Checks ``p``, ``q`` and the shape of ``T`` (named ``name`` in errors)."""
    p, q = as_positive_int("p", p), as_positive_int("q", q)
    T = check_tensor(name, T, finite=False)
    a, b, c, e = (p, p, q, q) if inverse else (p, q, p, q)
    if T.dim() < 2 or T.shape[-2:] != (a * b, c * e):
        raise ValueError(f"{name} must have shape (..., {a * b}, {c * e}) for p = {p}, q = {q}, got {tuple(T.shape)}")
    batch = T.shape[:-2]
    return T.reshape(*batch, a, b, c, e).transpose(-3, -2).reshape(*batch, a * c, b * e)
