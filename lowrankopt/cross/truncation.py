"""The last step of :func:`~lowrankopt.cross.tt_cross`: fiber sets cut to the numerical ranks of their matrices.

A rank-adaptive cross adds rows on every pass, so its ranks overshoot what the tensor needs (a rank-3 function
ends at rank 7). Its result is still exact — the interpolation ``M = B M[S]`` holds for any basis of the range — but
the fiber matrices are then numerically rank-deficient, and the interpolation has no derivative there: the
coefficients ``M M[S]⁺`` of a new, differentiable f (:func:`~lowrankopt.cross.cross_forward`) would amplify
perturbations by ``1/σ_min(M)``. This pass keeps the fibers *consistent* while it cuts: from the last core to the
second, it reads the fiber block ``A[I_{<k}, :, J'_{>k}]`` on the already cut right set, takes its numerical rank ρ
(singular values above ``rank_tol · σ_max``), keeps ρ of its columns (maxvol on the leading right singular vectors:
a well-conditioned ``M[:, C]``) and ρ rows (maxvol on the leading left ones), and hands the rows on as the next
core's right set ``J'_{≥k}``. Each core is then built by the very formula :func:`cross_forward` uses, so
``cross_forward(info, f)`` rebuilds the result for the f the cross read, and differentiates for a new one.

Cores whose matrix already has full column rank and whose right set did not change are kept as the sweeps left
them (no evaluation): for a cross whose ranks did not overshoot the pass costs one SVD per core and nothing else.

After a budget stop (in mid-sweep, or when the cut blocks would not fit) no entry may be added: :func:`cut_columns`
then keeps every row set and bond, and cuts only the *columns* of each rank-deficient fiber matrix to ρ
well-conditioned ones — ``B = M[:, C] M[S, C]⁺`` still interpolates (``M = B M[S]`` for a matrix of rank ρ) and is
differentiable, but the ranks stay where the sweeps left them (``Y.round()`` recompresses).
"""

from __future__ import annotations

import torch

from .evaluator import _Evaluator
from .fibers import _grow_right, _left_core, _left_matrix, _right_core, _right_matrix, fiber_index
from .interpolation import _interpolation_core, _singular
from .maxvol import _maxvol


def default_rank_tol(dtype: torch.dtype) -> float:
    """The default relative threshold of the numerical rank: 2.2e-14 in float64 (``100 ε``: a margin above the
    rounding noise of the fiber values, which cancellation in f can raise to ``10 ε``) and 1.2e-6 in float32
    (``10 ε``: a float32 cross resolves singular values down to about ``ε``, and cutting at ``100 ε`` would cost it
    two digits)."""
    eps = torch.finfo(dtype).eps
    return (100 if dtype == torch.float64 else 10) * eps


def _numerical_rank(s: torch.Tensor, rank_tol: float) -> int:
    """Singular values above ``rank_tol · σ_max`` (all of them for a zero matrix: nothing to cut)."""
    return max(1, int((s > rank_tol * s[0]).sum())) if s[0] > 0 else len(s)


def _well_conditioned_columns(
    M: torch.Tensor, Vh: torch.Tensor, rho: int, maxvol_tol: float, maxvol_iters: int
) -> tuple[torch.Tensor, int]:
    """ρ' ≤ ρ columns C with ``M[:, C]`` of numerically full column rank (maxvol's columns may lose a factor
    ≲ √(ρ a) of the ρ-th singular value, so ρ drops by one until the QR's derivative is defined)."""
    cols = _columns(Vh, rho, maxvol_tol, maxvol_iters)
    while rho > 1 and _singular(torch.linalg.qr(M[:, cols]).R):
        rho -= 1
        cols = _columns(Vh, rho, maxvol_tol, maxvol_iters)
    return cols, rho


def _columns(Vh: torch.Tensor, rho: int, maxvol_tol: float, maxvol_iters: int) -> torch.Tensor:
    """ρ columns of M with a well-conditioned ``M[:, C]``: maxvol rows of its leading right singular vectors."""
    a = Vh.shape[1]
    if rho == a:
        return torch.arange(a, device=Vh.device)
    return _maxvol(Vh[:rho].T.contiguous(), maxvol_tol, maxvol_iters, check_rank=False)[0]


def truncate_fibers(
    evaluate: _Evaluator,
    blocks: list[torch.Tensor],
    left: list[torch.Tensor],
    right: list[torch.Tensor],
    selected: list[torch.Tensor | None],
    cores: list[torch.Tensor],
    rank_tol: float,
    maxvol_tol: float,
    maxvol_iters: int,
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor | None]]:
    """Cut the fiber sets of a complete sweep (pivot at the first core) to the numerical ranks of their matrices.

    Args:
        evaluate: the cross's evaluator (new fiber entries count against its budget; cached ones are free).
        blocks: per core, the fiber block ``(a, n_k, b)`` of the last sweep.
        left, right: the index sets of the sweeps (``left[k] = I_{<k}``, ``right[k] = J_{≥k}``).
        selected, cores: the rows and cores of the last sweep (kept where nothing changes).
        rank_tol: singular values at most ``rank_tol · σ_max`` of a fiber matrix are dropped.

    Returns ``(cores, fibers, selected)`` for the cut cross. Raises the evaluator's budget exception if a new fiber
    block would exceed the budget (the caller then cuts columns only, :func:`cut_columns`). Cost: an SVD of each
    ``(n_k b, a)`` fiber matrix, O(d n r³), plus f on the new blocks — about ``Σ_k ρ_{k−1} n_k ρ_k`` entries when
    ranks are cut.
    """
    d = len(blocks)
    shape = [Z.shape[1] for Z in blocks]
    cores, selected = list(cores), list(selected)
    fibers = [(left[k], right[k + 1]) for k in range(d)]
    J, changed = right[d], False
    for k in range(d - 1, 0, -1):
        n = shape[k]
        Z = evaluate(fiber_index(left[k], n, J)).reshape(left[k].shape[0], n, -1) if changed else blocks[k]
        M = _right_matrix(Z)
        U, s, Vh = torch.linalg.svd(M, full_matrices=False)
        rho = _numerical_rank(s, rank_tol)
        if rho == M.shape[1] and not changed:
            J = right[k]
            continue
        cols, rho = _well_conditioned_columns(M, Vh, rho, maxvol_tol, maxvol_iters)
        rows = (
            _maxvol(U[:, :rho].contiguous(), maxvol_tol, maxvol_iters, check_rank=False)[0]
            if M.shape[0] > rho
            else torch.arange(rho, device=M.device)
        )
        cores[k] = _right_core(_interpolation_core(M[:, cols], rows), n, Z.shape[2])
        fibers[k] = (left[k][cols.to(left[k].device)], J)
        selected[k] = rows
        J, changed = _grow_right(J, n, rows), True
    if changed:
        cores[0] = evaluate(fiber_index(left[0], shape[0], J)).reshape(1, shape[0], -1)
        fibers[0] = (left[0], J)
    return cores, fibers, selected


def cut_columns(
    blocks: list[torch.Tensor],
    fibers: list[tuple[torch.Tensor, torch.Tensor]],
    selected: list[torch.Tensor | None],
    cores: list[torch.Tensor],
    pivot: int,
    rank_tol: float,
    maxvol_tol: float,
    maxvol_iters: int,
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Cut the columns of each rank-deficient fiber matrix to ρ well-conditioned ones, reading no new entry.

    Left of the pivot the fiber matrix is the ``(a n_k, b)`` left matrix and its columns are ``J_{>k}``; right of it
    the ``(n_k b, a)`` right matrix with columns ``I_{<k}``. Rows, bonds and the pivot stay; each cut core becomes
    ``M[:, C] M[S, C]⁺`` (rows S set to the identity), the formula :func:`cross_forward` applies to the cut fibers.
    Returns ``(cores, fibers)``. Cost: an SVD of each fiber matrix, O(d n r³).
    """
    cores, fibers = list(cores), list(fibers)
    for k, (Z, (left, right), rows) in enumerate(zip(blocks, fibers, selected)):
        if k == pivot:
            continue
        a, n, b = Z.shape
        M = _left_matrix(Z) if k < pivot else _right_matrix(Z)
        _, s, Vh = torch.linalg.svd(M, full_matrices=False)
        rho = _numerical_rank(s, rank_tol)
        if rho == M.shape[1]:
            continue
        cols, _ = _well_conditioned_columns(M, Vh, rho, maxvol_tol, maxvol_iters)
        X = _interpolation_core(M[:, cols], rows)
        if k < pivot:
            cores[k], fibers[k] = _left_core(X, a, n), (left, right[cols.to(right.device)])
        else:
            cores[k], fibers[k] = _right_core(X, n, b), (left[cols.to(left.device)], right)
    return cores, fibers
