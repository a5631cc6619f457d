"""Tensor kernels of the fixed-rank geometry, batched over leading dimensions.

One place for the linear algebra of :class:`~lowrankopt.manifolds.fixed_rank.FixedRankMatrices` (which calls these
on single points) and of the stochastic optimizers of :mod:`lowrankopt.optim.stochastic` (which call them once for a
whole stack of same-shape parameters, so that the QRs and SVDs run as one batched call). Every argument may carry
leading batch dimensions ``(..., m, r)``; every function is written with ``.mT`` and ``@``. No host reads, no
checks: callers validate.

Notation (the library's δ-coordinates): a point is ``x = U S Vᵀ = C Vᵀ`` with ``U: (m, r)``, ``V: (n, r)``
orthonormal and ``C = U S``; a tangent vector is ``ξ = A Vᵀ + U Bᵀ`` with ``A: (m, r)`` free and ``B: (n, r)``,
``Vᵀ B = 0`` (the gauge), so ``ξ = [A, U] [V, B]ᵀ`` has rank at most ``2r``.
"""

from __future__ import annotations

import torch

from .base import polar, qr_positive

__all__ = ["aligned_parts", "gauge", "left_frame", "ortho", "project", "retract"]


def left_frame(C: torch.Tensor) -> torch.Tensor:
    """``U``, the orthonormal factor of ``C = U S`` (QR with a non-negative diagonal): the frame the packed tangent
    coordinates refer to (what :meth:`FixedRankMatrices.point_from_parts` and the straight-through layers use).
    Cost ``O(m r²)``."""
    return qr_positive(C)[0]


def gauge(V: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``(I − V Vᵀ) B``: the gauge projection of the ``B`` coordinates (``A`` is free). Cost ``O(n r²)``."""
    return B - V @ (V.mT @ B)


def project(
    P: torch.Tensor, Q: torch.Tensor, U: torch.Tensor, V: torch.Tensor, S: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The coordinates ``(A, B)`` of ``P_T(Z)``, the orthogonal projection onto ``T_x`` of ``Z = P S Qᵀ``
    (``P: (m, k)``, ``Q: (n, k)``, ``S: (k, k)``, default the identity), never forming Z:

        ``P_T(Z) = U Uᵀ Z + Z V Vᵀ − U Uᵀ Z V Vᵀ``,  ``A = Z V = P S (Qᵀ V)``,  ``B = (I − V Vᵀ) Zᵀ U``.

    Used as the vector transport (``Z`` a tangent vector at another point, ``k = 2r``: ``P = [A', U']``,
    ``Q = [V', B']``) and to re-project :func:`ortho`'s output. Cost ``O((m + n) r k)``."""
    QtV, PtU = Q.mT @ V, P.mT @ U
    if S is not None:
        QtV, PtU = S @ QtV, S.mT @ PtU
    return P @ QtV, gauge(V, Q @ PtU)


def retract(
    C: torch.Tensor, U: torch.Tensor, V: torch.Tensor, A: torch.Tensor, B: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Metric-projection retraction: the rank-``rank`` truncated SVD ``(U', s', V')`` of

        ``C Vᵀ + A Vᵀ + U Bᵀ = [C + A, U] [V, B]ᵀ``

    (the point ``x = C Vᵀ`` moved by the tangent vector with coordinates ``(A, B)``; a point scaled by c is passed as
    ``c C`` with the frames of ``C``). Thin QRs of both ``(·, 2r)`` factors and the SVD of the ``2r × 2r`` core:
    ``O((m + n) r² + r³)``. ``U'``, ``V'`` orthonormal, ``s'`` non-increasing. Second order."""
    Ql, Rl = torch.linalg.qr(torch.cat([C + A, U], -1))
    Qr, Rr = torch.linalg.qr(torch.cat([V, B], -1))
    Uk, s, Vkh = torch.linalg.svd(Rl @ Rr.mT, full_matrices=False)
    return Ql @ Uk[..., :rank], s[..., :rank], Qr @ Vkh[..., :rank, :].mT


def aligned_parts(
    U: torch.Tensor, s: torch.Tensor, V: torch.Tensor, V_like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed factors ``[C, V]`` of ``U diag(s) Vᵀ`` rotated by the polar factor ``W`` of ``Vᵀ V_like``:
    ``(U diag(s) W, V W)``, the factorization whose ``V`` is closest to ``V_like`` (so that coordinates of consecutive
    iterates stay comparable, as :meth:`FixedRankMatrices.point_parts` with ``like``). Cost ``O((m + n) r² + r³)``."""
    W = polar(V.mT @ V_like)
    return (U * s[..., None, :]) @ W, V @ W


def ortho(
    A: torch.Tensor, B: torch.Tensor, U: torch.Tensor, V: torch.Tensor, rtol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(P, Q)`` (``(m, 2r)``, ``(n, 2r)``) of ``Ortho_r(ξ) = P Qᵀ``: the tangent vector ``ξ = [A, U] [V, B]ᵀ``
    (rank ≤ 2r) with its nonzero singular values mapped to 1 (the polar factor on its range).

    QR ``[A, U] = Q_L T_L`` and ``[V, B] = Q_R T_R``; SVD of the core ``T_L T_Rᵀ = W Σ Zᵀ``; ``Ortho_r(ξ) = (Q_L W
    D)(Q_R Z)ᵀ`` with ``D = diag(σ_i > rtol · σ_max)``: singular values at the rounding level of a rank-deficient ξ
    (a gradient of rank < 2r: a small batch) are dropped, not inflated to 1; ``ξ = 0`` gives 0. Not tangent in
    general: :func:`project` it. Cost ``O((m + n) r² + r³)``."""
    Ql, Tl = torch.linalg.qr(torch.cat([A, U], -1))
    Qr, Tr = torch.linalg.qr(torch.cat([V, B], -1))
    W, sig, Zh = torch.linalg.svd(Tl @ Tr.mT, full_matrices=False)  # thin: the core is not square when m or n < 2r
    keep = (sig > rtol * sig[..., :1]).to(sig.dtype)
    return Ql @ (W * keep[..., None, :]), Qr @ Zh.mT
