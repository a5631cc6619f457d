"""The manifold of TT-matrices (TT operators ``(Π n_k) → (Π m_k)``) of fixed TT-ranks, embedded in ℝ^{M×N}."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._checks import as_mode_shapes
from ..formats.delta_tt_matrix import DeltaTTMatrix
from ..formats.tt import TensorTrain, TTMatrix
from .base import LowRankManifold
from .tangent import TangentVector
from .tt import FixedTTRank


class FixedTTMatrixRank(LowRankManifold):
    """``(Π m_k) × (Π n_k)`` matrices that are TT-matrices of modes ``(m_k, n_k)`` with TT-ranks exactly ``ranks``.

    A TT-matrix is the tensor train of its merged modes ``(m_k n_k)`` (:meth:`TTMatrix.merged`: each core
    ``(r_{k-1}, m_k, n_k, r_k)`` read as ``(r_{k-1}, m_k n_k, r_k)``), and the merged modes are a permutation of the
    entries of the ``M × N`` matrix, an isometry. So this manifold *is* :class:`FixedTTRank` of shape ``(m_k n_k)``
    read through that isometry, and every piece of geometry is the TT one (:attr:`tt`), not a copy: the tangent
    vectors ``ξ = Σ_k U_{<k} δ_k V_{>k}`` with the right gauge, coordinates of shapes ``(r_{k-1}, m_k n_k, r_k)``
    (the merged cores: a packed point is ``[C_1 | V_2 | … | V_d]`` as for TT, the layout of :class:`TTLinear`'s
    weight), the TT-SVD retraction, ``dim = Σ_k r_{k-1} m_k n_k r_k − Σ_k r_k²``, and the exact Riemannian Hessian.
    Points are :class:`TTMatrix` objects; the objects autodiff evaluates f on are TT-matrices too
    (``matvec``, ``@``, ``gather``, ``inner``, ``norm``, ``full`` all work on them). Every cost is the TT one with
    ``n = max m_k n_k``.

    Args:
        row_shape: the row modes ``m_1, …, m_d`` (``M = Π m_k``).
        col_shape: the column modes ``n_1, …, n_d`` (``N = Π n_k``), as many as the row modes (d ≥ 2).
        ranks: one int or d − 1 ints, each attainable (``r_k ≤ r_{k-1} m_k n_k`` and ``r_k ≤ m_{k+1} n_{k+1}
            r_{k+1}``).
    """

    point_type = TTMatrix
    scales_by_first_part = True  # as FixedTTRank

    def __init__(self, row_shape: Sequence[int], col_shape: Sequence[int], ranks: int | Sequence[int]) -> None:
        self.row_shape, self.col_shape = as_mode_shapes(row_shape, col_shape)
        self.tt = FixedTTRank([m * n for m, n in zip(self.row_shape, self.col_shape)], ranks)
        self.ranks = self.tt.ranks

    @classmethod
    def of(cls, x: TTMatrix) -> FixedTTMatrixRank:
        """The manifold of ``x``'s modes and TT-ranks."""
        return cls(x.row_shape, x.col_shape, list(x.ranks))

    def _dims(self) -> tuple:
        return (self.row_shape, self.col_shape, self.ranks)

    @property
    def ambient_shape(self) -> tuple[int, int]:
        return (math.prod(self.row_shape), math.prod(self.col_shape))

    def __repr__(self) -> str:
        return f"FixedTTMatrixRank(row_shape={self.row_shape}, col_shape={self.col_shape}, ranks={self.ranks})"

    @property
    def dim(self) -> int:
        return self.tt.dim

    @property
    def coord_shapes(self) -> tuple[tuple[int, int, int], ...]:
        return self.tt.coord_shapes

    # ------------------------------------------------------------------ between TT-matrices and merged TTs
    def _matrix(self, tt: TensorTrain) -> TTMatrix:
        return TTMatrix._trusted_merged(tt, self.row_shape, self.col_shape)  # (a TT of this manifold's merged shape)

    def _vector(self, x: TTMatrix, v: TangentVector) -> tuple[TensorTrain, TangentVector]:
        """``x``'s merged TT and ``v`` as a tangent vector there (the same coordinates), after checking ``v``."""
        self.check_tangent(x, v)
        xm = x.merged()
        return xm, TangentVector(self.tt, xm, v.coords)

    def _delta(self, obj, product=None) -> DeltaTTMatrix:
        return DeltaTTMatrix(obj, self.row_shape, self.col_shape, product)

    # ------------------------------------------------------------------ points
    def check_point(self, x: object, name: str = "x") -> None:
        if not isinstance(x, TTMatrix):
            raise TypeError(f"{name} must be a TTMatrix, got {type(x).__name__}")
        if (x.row_shape, x.col_shape) != (self.row_shape, self.col_shape):
            raise ValueError(
                f"{name} has row_shape {x.row_shape} and col_shape {x.col_shape}, but the manifold's modes are "
                f"row_shape {self.row_shape} and col_shape {self.col_shape}"
            )
        if x.ranks != self.ranks:
            raise ValueError(f"{name} must have TT-ranks {self.ranks}, got {x.ranks}")

    def frames(self, x: TTMatrix) -> dict:
        """The frames of x's merged TT (:meth:`FixedTTRank.frames`; cached on it). ``O(d n r³)`` once per point."""
        self.check_point(x)
        return self.tt.frames(x.merged())

    def from_frames(self, frames: dict) -> TTMatrix:
        """The point ``C V_2 ⋯ V_d`` of a :meth:`frames` dict, taken as it is. ``O(d)``."""
        return self._matrix(self.tt.from_frames(frames))

    def random_point(
        self,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> TTMatrix:
        """A Gaussian TT-matrix in right-orthogonal form of unit Frobenius norm (:meth:`FixedTTRank.random_point`).
        Cost ``O(d n r³)``."""
        return self._matrix(self.tt.random_point(dtype=dtype, device=device, generator=generator))

    def regauge(self, x: TTMatrix, seed: int = 0) -> TTMatrix:
        """Random bond rotations of the cores (:meth:`FixedTTRank.regauge`). ``O(d n r³)``."""
        return self._matrix(self.tt.regauge(x.merged(), seed))

    def rank_defect(self, x: TTMatrix) -> str | None:
        return self.tt.rank_defect(x.merged())

    # ------------------------------------------------------------------ gauge and chart
    def gauge(self, x: TTMatrix, coords: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The TT gauge (:meth:`FixedTTRank.gauge`). Cost ``O(d n r³)``."""
        return self.tt.gauge(x.merged(), coords)

    def linearization(self, x: TTMatrix, deltas: Sequence[torch.Tensor]) -> DeltaTTMatrix:
        """``x + Σ_k U_{<k} δ_k V_{>k}`` as a TT-matrix with detached frames; its ``matvec`` runs the rank-r
        δ-product node. ``O(d)`` after the frames, plus ``O(d n r³)`` once per point for the left-orthogonal last
        core the node's backward sweep needs."""
        self.check_point(x)
        xm = x.merged()
        fr = self.tt.frames(xm)
        d = len(self.row_shape)
        if "operator_forms" not in x._cache:  # on x, not on its merged TT: the forms depend on the mode split
            last = torch.tensordot(fr["R"][d - 1], fr["V"][d - 1], dims=1)
            right = self._matrix(TensorTrain._trusted([fr["C"], *fr["V"][1:]])).cores
            left = self._matrix(TensorTrain._trusted([*fr["U"][: d - 1], last])).cores
            x._cache["operator_forms"] = (right, left)
        return self._delta(self.tt.linearization(xm, deltas), x._cache["operator_forms"])

    def second_fundamental(
        self, x: TTMatrix, xi: TangentVector, deltas: Sequence[torch.Tensor]
    ) -> tuple[DeltaTTMatrix, DeltaTTMatrix]:
        """The TT second fundamental form (:meth:`FixedTTRank.second_fundamental`) as TT-matrices. ``O(d n r³)``."""
        xm, v = self._vector(x, xi)
        with_point, curvature_only = self.tt.second_fundamental(xm, v, deltas)
        return self._delta(with_point), self._delta(curvature_only)

    # ------------------------------------------------------------------ steps
    def to_ambient(self, x: TTMatrix, v: TangentVector) -> TTMatrix:
        """ξ as a TT-matrix of ranks 2r (:meth:`FixedTTRank.to_ambient`). Cost ``O(d n r²)``."""
        return self._matrix(self.tt.to_ambient(*self._vector(x, v)))

    def retr(self, x: TTMatrix, v: TangentVector) -> TTMatrix:
        """The TT-SVD retraction of ``x + ξ`` (:meth:`FixedTTRank.retr`): quasi-optimal, second order,
        right-orthogonal result. Cost ``O(d n r³)``."""
        return self._matrix(self.tt.retr(*self._vector(x, v)))

    # ------------------------------------------------------------------ flat parameters
    def point_parts(self, x: TTMatrix, like: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The right-orthogonal merged cores (:meth:`FixedTTRank.point_parts`). Cost ``O(d n r³)``."""
        self.check_point(x)
        return self.tt.point_parts(x.merged(), like)

    def canonical_parts(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.tt.canonical_parts(parts)

    def point_from_parts(self, parts: Sequence[torch.Tensor]) -> TTMatrix:
        """The TT-matrix with right-orthogonal merged cores ``parts``, taken as they are. ``O(d)``."""
        return self._matrix(self.tt.point_from_parts(parts))
