"""The result of a cross and its interpolation formula: :class:`CrossInfo` records the fibers :func:`tt_cross`
read, and :func:`cross_forward` rebuilds the TT from the values of a (possibly new, differentiable) function on just
those fibers — the differentiable cross of C-PIC (Usvyatsov et al., ICCV 2021)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .._checks import FLOAT_DTYPES
from ..formats.tt import TensorTrain
from .evaluator import _values
from .fibers import _left_core, _left_matrix, _right_core, _right_matrix, fiber_index

__all__ = ["CrossInfo", "cross_forward"]


@dataclass
class CrossInfo:
    """What :func:`tt_cross` did, and the fibers its result is built from.

    Attributes:
        shape: the tensor shape.
        evaluations: entries of f computed (each distinct entry once, with the cache).
        cache_hits: entries requested again and served by the cache.
        sweeps: completed sweeps (one sweep = a left-to-right and a right-to-left pass).
        ranks: the TT ranks of the result.
        stop: why it stopped: ``"budget"``, ``"eps"`` (relative change between sweeps), ``"validation"``,
            ``"sweeps"`` or ``"converged"`` (a whole sweep found every entry in the cache: nothing new to learn).
        changes: relative change ``‖Y_s − Y_{s−1}‖ / ‖Y_s‖`` after each sweep.
        validation_errors: relative error on the validation set after each sweep, and of the result at a budget stop
            (when a validation set is given).
        seconds: wall time.
        fibers: per core, ``(I_{<k}, J_{>k})`` as int64 tensors ``(a, k)`` and ``(b, d − k − 1)``: the fiber block the
            core was built from.
        selected: per core, the rows of its fiber matrix that the core interpolates at (None for the pivot).
        pivot: the core that holds fiber values; cores before it are left interpolation cores
            (``(a n_k, b)`` matrix, rows selected), cores after it right ones (``(a, n_k b)``, columns selected).
        domain: the coordinate grids when :func:`tt_cross` was called with ``domain=``.
        cut: how the fibers were cut to the numerical ranks of their matrices after the sweeps
            (:mod:`lowrankopt.cross.truncation`): ``"ranks"`` (index sets and ranks), ``"columns"`` (the columns
            only: a budget stop, or the new entries would not fit the budget), ``"off"`` (``rank_tol=0``) or
            ``"kept"`` (a validation stop whose cut result missed ``validation_tol``: the uncut result is returned).
    """

    shape: tuple[int, ...]
    evaluations: int = 0
    cache_hits: int = 0
    sweeps: int = 0
    ranks: tuple[int, ...] = ()
    stop: str = ""
    changes: list[float] = field(default_factory=list)
    validation_errors: list[float] = field(default_factory=list)
    seconds: float = 0.0
    fibers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    selected: list[torch.Tensor | None] = field(default_factory=list, repr=False)
    pivot: int = 0
    domain: list[torch.Tensor] | None = field(default=None, repr=False)
    cut: str = ""

    @property
    def fiber_entries(self) -> int:
        """How many entries one :func:`cross_forward` evaluates: ``Σ_k |I_{<k}| n_k |J_{>k}|``."""
        return sum(left.shape[0] * n * right.shape[0] for (left, right), n in zip(self.fibers, self.shape))


def _singular(R: torch.Tensor) -> bool:
    """Is the triangular factor R numerically singular (relative to its largest diagonal entry)?"""
    diag = R.detach().diagonal().abs()
    return bool((diag <= torch.finfo(R.dtype).eps * R.shape[-1] * diag.max()).any())


def _interpolation_core(M: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``X = Q Q[rows]⁺`` for an orthonormal basis Q of the fiber matrix M, with ``X[rows] = I``: the coefficients
    ``M = X M[rows]`` that :func:`tt_cross` computes (equal to ``M M[rows]⁺`` when M has full column rank, and
    bounded when it does not, since ``Q[rows]`` is a maxvol submatrix). Differentiable through the two QRs."""
    if len(rows) == M.shape[0]:  # every row is selected, maybe in another order: the permutation with X[rows] = I
        eye = torch.eye(len(rows), dtype=M.dtype, device=M.device)
        return eye[torch.argsort(rows.to(M.device))]
    Q, R = torch.linalg.qr(M)
    if M.requires_grad and _singular(R):  # QR's derivative divides by R's diagonal
        raise ValueError(
            "a fiber matrix is numerically rank-deficient, so the cross has no derivative there: f has lower "
            "rank than these fibers; refresh them with tt_cross on this f (it cuts the fibers to their numerical "
            "ranks unless rank_tol=0; info.cut says what it did)"
        )
    Qs, Rs = torch.linalg.qr(Q[rows])
    if _singular(Rs):
        raise ValueError(
            "the selected rows of a fiber matrix are singular for this f (they were picked for another one): "
            "refresh the fibers with tt_cross(f, ..., init=...)"
        )
    X = torch.linalg.solve_triangular(Rs, Q, upper=True, left=False) @ Qs.T
    eye = torch.eye(len(rows), dtype=M.dtype, device=M.device)
    return X.index_put((rows.to(M.device),), eye)


def cross_forward(info: CrossInfo, f: Callable[[torch.Tensor], torch.Tensor]) -> TensorTrain:
    """The cross interpolation of f on the fibers of ``info`` (differentiable cross, C-PIC).

    Evaluates f once, batched, on the ``info.fiber_entries`` entries of the stored fiber blocks ``I_{<k} × [n_k] ×
    J_{>k}`` and builds each core by the interpolation formula: left of the pivot ``G_k = M_k M_k[S_k]⁺`` (with
    ``G_k[S_k] = I``) for the fiber matrix ``M_k (a n_k, b)`` and selected rows ``S_k``, right of it the mirror
    image, and the fiber block itself at the pivot. For the f that :func:`tt_cross` saw this is its result (up to
    roundoff); for a new f (say a network with new weights) it is the cross approximation on the same fibers, and
    autograd carries gradients into f's parameters through the values of just these entries. Refresh the fibers
    now and then by running :func:`tt_cross` again (``init=`` the current result).

    Args:
        info: from :func:`tt_cross`; its ``domain`` (if any) is used.
        f: as for :func:`tt_cross`; its values keep their dtype and device (and autograd graph).

    Cost: one call of f on ``info.fiber_entries`` entries, and O(d n r³) for the small QRs and solves.
    """
    if not isinstance(info, CrossInfo) or not info.fibers:
        raise TypeError("info must be the CrossInfo returned by tt_cross")
    blocks = [fiber_index(left, n, right) for (left, right), n in zip(info.fibers, info.shape)]
    index = torch.cat(blocks)
    y = _values(f, index, info.domain)
    if y.dtype not in FLOAT_DTYPES:
        raise TypeError(f"f must return a float32 or float64 tensor (it carries the gradient), got {y.dtype}")
    if not bool(torch.isfinite(y.detach()).all()):
        raise ValueError("f returned a non-finite value on the fibers")
    cores = []
    for k, (V, ((left, right), n)) in enumerate(zip(y.split([len(b) for b in blocks]), zip(info.fibers, info.shape))):
        a, b = left.shape[0], right.shape[0]
        rows = info.selected[k]
        if k == info.pivot:
            cores.append(V.reshape(a, n, b))
        elif k < info.pivot:
            cores.append(_left_core(_interpolation_core(_left_matrix(V.reshape(a, n, b)), rows), a, n))
        else:
            cores.append(_right_core(_interpolation_core(_right_matrix(V.reshape(a, n, b)), rows), n, b))
    return TensorTrain(cores)
