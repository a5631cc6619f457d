"""The TT-SVD and the sweeps over tensor-train cores that the formats and the ``nn`` layers share.

Cores are ``G_k: (r_{k-1}, n_k, r_k)``; in costs ``n = max n_k``, ``r = max r_k`` and ``N = Π n_k``. A core is
*left-orthonormal* when its left unfolding ``(r_{k-1} n_k, r_k)`` has orthonormal columns, *right-orthonormal* when its
right unfolding ``(r_{k-1}, n_k r_k)`` has orthonormal rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._checks import as_rank_list, as_tolerance, check_tensor

__all__ = ["left_orthogonalize", "right_orthogonalize", "truncate_right_to_left", "tt_svd"]


def _trunc_rank(s: torch.Tensor, delta: float, max_rank: int | None) -> int:
    """Smallest rank whose discarded tail of singular values ``s`` has 2-norm <= delta."""
    tail = torch.flip(torch.cumsum(torch.flip(s**2, [0]), 0), [0])  # tail[j] = sum_{i >= j} s_i^2
    keep = int((tail > delta**2).sum())  # tail is non-increasing
    keep = max(keep, 1)
    if max_rank is not None:
        keep = min(keep, max_rank)
    return min(keep, s.numel())


def left_orthogonalize(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """QR sweep left to right: cores 1..d-1 get orthonormal left unfoldings (``(r_{k-1} n_k, r_k)``
    with orthonormal columns); the last core carries the norm. Cost ``O(d n r³)``."""
    cores = list(cores)
    for k in range(len(cores) - 1):
        a, n, b = cores[k].shape
        Q, R = torch.linalg.qr(cores[k].reshape(a * n, b))
        cores[k] = Q.reshape(a, n, Q.shape[1])
        cores[k + 1] = torch.tensordot(R, cores[k + 1], dims=1)
    return cores


def right_orthogonalize(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """QR sweep right to left: cores 2..d get orthonormal right unfoldings (``(r_{k-1}, n_k r_k)``
    with orthonormal rows); the first core carries the norm. Cost ``O(d n r³)``."""
    cores = list(cores)
    for k in range(len(cores) - 1, 0, -1):
        a, n, b = cores[k].shape
        Q, R = torch.linalg.qr(cores[k].reshape(a, n * b).T)
        cores[k] = Q.T.reshape(Q.shape[1], n, b)
        cores[k - 1] = torch.tensordot(cores[k - 1], R.T, dims=1)
    return cores


def truncate_right_to_left(
    cores: Sequence[torch.Tensor], max_rank: int | Sequence[int] | None = None, eps: float | None = None
) -> list[torch.Tensor]:
    """The truncation sweep of TT-rounding: a truncated SVD of every bond, right to left, over **left-orthogonal**
    cores (cores 1..d-1 with orthonormal left unfoldings, e.g. from :func:`left_orthogonalize`); returns
    right-orthogonal cores (cores 2..d with orthonormal right unfoldings) of the truncated tensor.

    Args:
        cores: the d cores ``(r_{k-1}, n_k, r_k)``, left-orthogonal (the accuracy statement below and the meaning
            of ``eps`` rely on it: the last core then carries ``‖X‖``). Not modified.
        max_rank: an int or d − 1 ints capping the ranks, or None.
        eps: relative accuracy. With ``delta = eps ‖X‖ / sqrt(d − 1)`` per bond the result satisfies
            ``‖X − X̃‖ <= eps ‖X‖`` when no ``max_rank`` binds (Oseledets 2011, Thm 2.2); ``eps = 0`` drops only
            zero singular values. None keeps exactly ``max_rank`` (as far as the core sizes allow; then
            ``max_rank`` is required).

    Differentiable (SVDs and products). Cost ``O(d n R³)`` for input rank R (one SVD per core).
    """
    cores = list(cores)
    d = len(cores)
    if eps is None and max_rank is None:
        raise ValueError("give max_rank, eps or both")
    max_ranks = None if max_rank is None else as_rank_list("max_rank", max_rank, d)
    if eps is not None:
        eps = as_tolerance("eps", eps)
        delta = eps * float(torch.linalg.vector_norm(cores[-1].detach())) / math.sqrt(max(d - 1, 1))
    for k in range(d - 1, 0, -1):
        a, n, b = cores[k].shape
        U, s, Vh = torch.linalg.svd(cores[k].reshape(a, n * b), full_matrices=False)
        if eps is None:
            r = min(max_ranks[k - 1], s.numel())
        else:
            r = _trunc_rank(s, delta, None if max_ranks is None else max_ranks[k - 1])
        cores[k] = Vh[:r].reshape(r, n, b)
        cores[k - 1] = torch.tensordot(cores[k - 1], U[:, :r] * s[:r], dims=1)
    return cores


def tt_svd(
    A: torch.Tensor,
    max_rank: int | Sequence[int] | None = None,
    eps: float | None = None,
    *,
    exact: bool = False,
    center: int = -1,
) -> list[torch.Tensor]:
    """TT-SVD (Oseledets 2011): the cores ``(r_{k-1}, n_k, r_k)`` of the dense tensor ``A (n_1, ..., n_d)``.

    One truncated SVD per bond, of an unfolding of what is left to decompose: left to right up to core ``center``
    (each core keeps the left singular vectors, its cores have orthonormal left unfoldings ``(r_{k-1} n_k, r_k)``),
    then right to left down to it (each core keeps the right singular vectors: orthonormal right unfoldings
    ``(r_{k-1}, n_k r_k)``). Core ``center`` carries the singular values, hence the norm: the result is in
    mixed-canonical form. ``center = -1`` (the default) is the classical left-to-right TT-SVD.

    Args:
        A: dense float32/float64 tensor, at least one dimension.
        max_rank: an int or d − 1 ints capping the ranks, or None.
        eps: relative accuracy: ``‖A − X‖ <= eps ‖A‖`` when ``max_rank`` does not bind (each bond truncated at
            ``eps ‖A‖ / sqrt(d − 1)``). None (with ``max_rank`` None) keeps every nonzero singular value: exact up
            to roundoff.
        exact: every rank is exactly ``max_rank`` (required; ``eps`` must be None). Where an unfolding has fewer
            singular vectors than the rank, the orthonormal core is completed by an orthonormal complement and the
            norm-carrying part by zeros (the tensor is unchanged); a rank above the size of the core's orthonormal
            side (``r_{k-1} n_k`` left of ``center``, ``n_k r_k`` right of it) is a ValueError.
        center: the index of the core that carries the norm (negative values count from the end).

    Returns:
        The d cores, one list, in ``A``'s dtype and on its device. Differentiable (SVDs and products).

    Cost: d − 1 SVDs; the first, of an ``(n_1, N / n_1)`` unfolding (``N = Π n_k``; of an ``(N / n_d, n_d)`` one when
    ``center = 0``), dominates: ``O(N min(n_1, N / n_1))``, ``O(n^{d+1})`` for equal modes.
    """
    check_tensor("A", A)
    if A.dim() < 1:
        raise ValueError("A must have at least one dimension")
    d = A.dim()
    max_ranks = None if max_rank is None else as_rank_list("max_rank", max_rank, d)
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be a bool, got {type(exact).__name__}")
    if exact and (max_ranks is None or eps is not None):
        raise ValueError("exact=True needs max_rank and no eps (it keeps exactly max_rank)")
    if isinstance(center, bool) or not isinstance(center, int) or not -d <= center < d:
        raise ValueError(f"center must be an int in [-{d}, {d - 1}] (a core of the {d}-mode tensor), got {center!r}")
    eps = 0.0 if eps is None else as_tolerance("eps", eps)
    if exact:
        delta = None
    elif eps == 0.0 and max_ranks is None:
        delta = -1.0  # keep every nonzero singular value
    else:
        delta = eps * float(torch.linalg.vector_norm(A)) / math.sqrt(max(d - 1, 1))
    return _tt_svd(A, max_ranks, delta, center % d)


def _tt_svd(A: torch.Tensor, max_ranks: list[int] | None, delta: float | None, center: int) -> list[torch.Tensor]:
    """The sweeps of :func:`tt_svd` (arguments checked) with an absolute per-bond threshold ``delta``: ``None``
    keeps exactly ``max_ranks`` (padding), a negative value every nonzero singular value (capped by ``max_ranks``)."""
    shape, d = tuple(A.shape), A.dim()

    def rank(s: torch.Tensor, bond: int, limit: int) -> int:
        cap = None if max_ranks is None else max_ranks[bond]
        if delta is None:  # exact
            if cap > limit:
                raise ValueError(
                    f"max_rank[{bond}] = {cap} exceeds {limit}, the most orthonormal vectors core "
                    f"{bond if bond < center else bond + 1} can hold (exact=True)"
                )
            return cap
        if delta < 0:
            r = max(int((s > 0).sum()), 1)
            return r if cap is None else min(r, cap)
        return _trunc_rank(s, delta, cap)

    cores: list[torch.Tensor | None] = [None] * d
    C, left, right = A, 1, 1
    for k in range(center):  # left to right: core k keeps U
        M = C.reshape(left * shape[k], -1)
        U, s, Vh = torch.linalg.svd(M, full_matrices=False)
        r = rank(s, k, M.shape[0])
        m = min(r, s.numel())
        cores[k] = _complete_columns(U[:, :m], r).reshape(left, shape[k], r)
        C = s[:m, None] * Vh[:m]
        if m < r:
            C = torch.cat([C, C.new_zeros(r - m, C.shape[1])])
        left = r
    for k in range(d - 1, center, -1):  # right to left: core k keeps Vh
        M = C.reshape(-1, shape[k] * right)
        U, s, Vh = torch.linalg.svd(M, full_matrices=False)
        r = rank(s, k - 1, M.shape[1])
        m = min(r, s.numel())
        cores[k] = _complete_columns(Vh[:m].T, r).T.reshape(r, shape[k], right)
        C = U[:, :m] * s[:m]
        if m < r:
            C = torch.cat([C, C.new_zeros(C.shape[0], r - m)], 1)
        right = r
    cores[center] = C.reshape(left, shape[center], right)
    return cores


def _complete_columns(U: torch.Tensor, r: int) -> torch.Tensor:
    """``U (m, c)`` with orthonormal columns, completed to ``r`` orthonormal columns (``c <= r <= m``) by an
    orthonormal complement (a complete QR of U); U itself when ``c = r``."""
    if U.shape[1] >= r:
        return U
    Q = torch.linalg.qr(U, mode="complete").Q  # its first c columns span U's range; the rest, the complement
    return torch.cat([U, Q[:, U.shape[1] : r]], dim=1)
