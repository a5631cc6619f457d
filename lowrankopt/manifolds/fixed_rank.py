"""The manifold of m × n matrices of rank exactly r, embedded in ℝ^{m×n}."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._checks import as_positive_int
from ..formats.curve_lowrank import CurveLowRank
from ..formats.delta_lowrank import DeltaLowRank, MatrixFamily
from ..formats.lowrank import LowRankMatrix
from . import fixed_rank_kernels as kernels
from .base import LowRankManifold, naming_non_finite, polar, qr_positive
from .tangent import TangentVector


class FixedRankMatrices(LowRankManifold):
    """Matrices of shape ``(m, n)`` and rank ``rank``; points are :class:`LowRankMatrix` objects.

    Frames: ``x = U S Vᵀ`` with ``U``, ``V`` orthonormal (computed once per point and cached). Tangent vectors are
    ``ξ = A Vᵀ + U Bᵀ`` with coordinates ``A: (m, r)`` free and ``B: (n, r)``, ``Vᵀ B = 0`` (the gauge); in
    Manopt's terms ``M = Uᵀ A``, ``Up = A − U M``, ``Vp = B``. ``dim = (m + n − r) r``. Packed (flat) points are
    the right-orthogonal form ``[C | V]`` with ``C = U S: (m, r)`` and ``V: (n, r)`` orthonormal — the same shapes
    as the coordinates ``[A | B]`` (this is :class:`~lowrankopt.manifolds.tt.FixedTTRank` with d = 2).
    """

    point_type = LowRankMatrix
    scales_by_first_part = True  # [C | V]: C scales, V stays

    def __init__(self, m: int, n: int, rank: int) -> None:
        m, n, rank = as_positive_int("m", m), as_positive_int("n", n), as_positive_int("rank", rank)
        if rank > min(m, n):
            raise ValueError(f"rank must be <= min(m, n) = {min(m, n)}, got {rank}")
        self.m, self.n, self.rank = m, n, rank

    @classmethod
    def of(cls, x: LowRankMatrix) -> FixedRankMatrices:
        """The manifold of ``x``'s shape and rank."""
        return cls(x.shape[0], x.shape[1], x.rank)

    def _dims(self) -> tuple:
        return (self.m, self.n, self.rank)

    @property
    def ambient_shape(self) -> tuple[int, int]:
        return (self.m, self.n)

    def __repr__(self) -> str:
        return f"FixedRankMatrices(m={self.m}, n={self.n}, rank={self.rank})"

    @property
    def dim(self) -> int:
        return (self.m + self.n - self.rank) * self.rank

    @property
    def coord_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return ((self.m, self.rank), (self.n, self.rank))

    # ------------------------------------------------------------------ points
    def check_point(self, x: object, name: str = "x") -> None:
        if not isinstance(x, LowRankMatrix):
            raise TypeError(f"{name} must be a LowRankMatrix, got {type(x).__name__}")
        if x.shape != (self.m, self.n) or x.rank != self.rank:
            raise ValueError(
                f"{name} must have shape ({self.m}, {self.n}) and rank {self.rank}, "
                f"got shape {x.shape} and rank {x.rank}"
            )

    def frames(self, x: LowRankMatrix) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, S, V)`` with orthonormal U, V and ``x = U S Vᵀ`` (QRs with positive diagonals); cached on x.
        Cost ``O((m + n) r²)`` once per point."""
        self.check_point(x)
        if "frames" not in x._cache:
            with torch.no_grad():
                Qu, Ru = qr_positive(x.U.detach())
                Qv, Rv = qr_positive(x.V.detach())
                S = Ru @ x.S.detach() @ Rv.T
                x._cache["frames"] = (Qu, S, Qv)
                x._cache["US"] = Qu @ S
        return x._cache["frames"]

    def from_frames(self, frames: Sequence[torch.Tensor], US: torch.Tensor | None = None) -> LowRankMatrix:
        """The point ``U S Vᵀ`` with orthonormal ``U``, ``V`` taken as its frames as they are (no QR, so tangent
        coordinates refer to exactly these frames); ``US`` (default ``U @ S``) is the product as the linearization
        uses it. Cost ``O(m r²)``."""
        U, S, V = frames
        x = LowRankMatrix._trusted(U, S, V)
        x._cache["frames"] = (U, S, V)
        x._cache["US"] = U @ S if US is None else US
        return x

    def random_point(
        self,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> LowRankMatrix:
        """See :meth:`LowRankMatrix.random`. Cost ``O((m + n) r²)``."""
        return LowRankMatrix.random(self.m, self.n, self.rank, dtype=dtype, device=device, generator=generator)

    def regauge(self, x: LowRankMatrix, seed: int = 0) -> LowRankMatrix:
        """``(U Q₁)(Q₁ᵀ S Q₂)(V Q₂)ᵀ`` with random orthogonal ``Q₁``, ``Q₂`` (float64 draws from ``seed``).
        Cost ``O((m + n) r²)``."""
        g = torch.Generator().manual_seed(seed)
        q1, q2 = (_random_orthogonal(x.rank, g, x) for _ in range(2))
        return LowRankMatrix._trusted(x.U @ q1, q1.T @ x.S @ q2, x.V @ q2)

    def rank_defect(self, x: LowRankMatrix) -> str | None:
        """``""`` (a reason) when S's smallest singular value is ≤ its largest · r · eps. ``O(r³)``."""
        s = torch.linalg.svdvals(self.frames(x)[1].detach())
        return "" if float(s.min()) <= float(s.max()) * s.numel() * torch.finfo(s.dtype).eps else None

    # ------------------------------------------------------------------ gauge and chart
    def gauge(self, x: LowRankMatrix, coords: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``(A, B) ↦ (A, (I − V Vᵀ) B)``. Cost ``O(n r²)``."""
        _, _, V = self.frames(x)
        A, B = coords
        return [A, kernels.gauge(V, B)]

    def linearization(self, x: LowRankMatrix, deltas: Sequence[torch.Tensor]) -> DeltaLowRank:
        """``(U S + A) Vᵀ + U Bᵀ`` with detached frames. ``O(1)`` (a lazy object)."""
        U, _, V = self.frames(x)
        return DeltaLowRank(x.shape, [MatrixFamily(P=V, Q=U, A0=x._cache["US"], deltas=tuple(deltas))])

    def second_fundamental(
        self, x: LowRankMatrix, xi: TangentVector, deltas: Sequence[torch.Tensor]
    ) -> tuple[DeltaLowRank, DeltaLowRank]:
        """Chart ``φ(A, B) = (US + A)(V + B S⁻ᵀ)ᵀ``: ``D²φ[ξ, η] = A_η S⁻¹ B_ξᵀ + A_ξ S⁻¹ B_ηᵀ``.
        Cost ``O((m + n) r²)`` (and ``O(r³)`` once per point for ``S⁻¹``)."""
        _, _, V = self.frames(x)
        Sinv = self._core_inverse(x)
        A, B = (c.detach() for c in xi.coords)
        curv = MatrixFamily(P=B @ Sinv.T, Q=A @ Sinv, deltas=tuple(deltas))
        point = MatrixFamily(P=V, Q=None, A0=x._cache["US"])  # the constant term x
        return DeltaLowRank(x.shape, [point, curv]), DeltaLowRank(x.shape, [curv])

    def chart_curve(
        self, x: LowRankMatrix, v: TangentVector, t: torch.Tensor, curvature: bool
    ) -> tuple[CurveLowRank, Callable[[TangentVector], torch.Tensor] | None]:
        """The curve of :meth:`LowRankManifold.chart_curve` (rank r, no SVD or QR on the tape):

        - ``curvature=True``: the chart curve ``c(t) = (US + tA)(V + tB S⁻ᵀ)ᵀ``, ``c'(0) = v``, ``c''(0) =
          2 A S⁻¹ Bᵀ``, and ``⟨A_g Vᵀ + U B_gᵀ, 2 A S⁻¹ Bᵀ⟩ = 2 tr(A_gᵀ A S⁻¹ · Bᵀ V) + 2 tr(Uᵀ A S⁻¹ · Bᵀ B_g)``
          from a gradient's coordinates in ``O((m + n) r²)``;
        - ``curvature=False``: the line ``x + t v = [US + tA, U][V, tB]ᵀ`` (rank 2r).

        ``gather`` on the curve uses its terms (:class:`~lowrankopt.formats.curve_lowrank.CurveLowRank`)."""
        self.check_tangent(x, v)
        U, _, V = self.frames(x)
        US, r = x._cache["US"], self.rank
        A, B = (c.detach() for c in v.coords)
        if not curvature:
            eye = torch.eye(2 * r, dtype=US.dtype, device=US.device)
            terms = [(0, US, V), (1, A, V), (1, U, B)]
            return CurveLowRank.of(torch.cat([US + t * A, U], 1), eye, torch.cat([V, t * B], 1), t, terms), None
        Sinv = self._core_inverse(x)
        BS = B @ Sinv.T
        eye = torch.eye(r, dtype=US.dtype, device=US.device)
        terms = [(0, US, V), (1, A, V), (1, US, BS), (2, A, BS)]
        ASinv, VB = A @ Sinv, V.T @ B

        def tangential(grad: TangentVector) -> torch.Tensor:
            Ag, Bg = (c.detach() for c in grad.coords)
            return 2 * ((Ag.T @ ASinv * VB).sum() + (U.T @ ASinv * (Bg.T @ B)).sum())

        return CurveLowRank.of(US + t * A, eye, V + t * BS, t, terms), tangential

    def _core_inverse(self, x: LowRankMatrix) -> torch.Tensor:
        """``S⁻¹`` of x's frames, once x is checked to have rank r exactly; cached on x, so the Hessian-vector products
        at x (many per trust-region step) take no SVD, no solve and no host read. Cost ``O(r³)`` once per point."""
        if "Sinv" not in x._cache:
            S = self.frames(x)[1].detach()
            self.check_full_rank(x, f"rank {self.rank}")
            x._cache["Sinv"] = torch.linalg.inv(S)
        return x._cache["Sinv"]

    # ------------------------------------------------------------------ steps
    def proj(self, x: LowRankMatrix, z: Any) -> TangentVector:
        """Orthogonal projection onto T_x (see :meth:`LowRankManifold.proj`). A LowRankMatrix
        ``z = Z_U Z_S Z_Vᵀ`` of rank ``r_z`` is projected in closed form: ``A = Z_U Z_S (Z_Vᵀ V)``,
        ``B = (I − V Vᵀ) Z_V Z_Sᵀ (Z_Uᵀ U)``, cost ``O((m + n) r r_z)`` (the kernel
        :func:`~lowrankopt.manifolds.fixed_rank_kernels.project`; with ``z = to_ambient(ξ)``, the transport)."""
        if not isinstance(z, LowRankMatrix) or isinstance(z, DeltaLowRank):
            return super().proj(x, z)
        self.check_point(x)
        self._check_ambient(x, z)
        U, _, V = self.frames(x)
        A, B = kernels.project(z.U, z.V, U, V, S=z.S)
        return TangentVector(self, x, [A.detach(), B.detach()])

    def to_ambient(self, x: LowRankMatrix, v: TangentVector) -> LowRankMatrix:
        """``ξ = [A U] [V B]ᵀ`` as a rank-2r LowRankMatrix. Cost ``O((m + n) r)``."""
        self.check_tangent(x, v)
        U, _, V = self.frames(x)
        A, B = v.coords
        eye = torch.eye(2 * self.rank, dtype=A.dtype, device=A.device)
        return LowRankMatrix._trusted(torch.cat([A, U], 1), eye, torch.cat([V, B], 1))

    def retr(self, x: LowRankMatrix, v: TangentVector) -> LowRankMatrix:
        """Metric projection retraction: the best rank-r approximation of ``x + ξ``.

        ``x + ξ = [US + A, U] [V, B]ᵀ``; thin QRs of both ``(·, 2r)`` factors and the SVD of the
        ``2r × 2r`` core give it in ``O((m + n) r² + r³)`` (the batched kernel
        :func:`~lowrankopt.manifolds.fixed_rank_kernels.retract`, shared with the stochastic optimizers). Second
        order. The result has orthonormal factors and a diagonal, non-increasing S. NaN/Inf coordinates of ``v`` raise
        ``ValueError`` naming them (found where the SVD fails on them: nothing is checked before).
        """
        self.check_tangent(x, v)
        U, S, V = self.frames(x)
        A, B = v.coords
        with naming_non_finite(v):
            Uk, s, Vk = kernels.retract(U @ S, U, V, A, B, self.rank)
        return LowRankMatrix._trusted(Uk, torch.diag(s), Vk)

    # ------------------------------------------------------------------ flat parameters
    def point_parts(self, x: LowRankMatrix, like: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """``[C, V]``: ``x = C Vᵀ`` with ``V`` orthonormal (QR with a positive diagonal), or rotated by the polar
        factor ``Q`` of ``Vᵀ V_like`` to ``[C Q, V Q]``, the representation closest to ``like``. ``O((m + n) r²)``."""
        self.check_point(x)
        parts = x._cache.get("parts")
        if parts is None:
            with torch.no_grad():
                Qv, Rv = qr_positive(x.V.detach())
                parts = (x.U.detach() @ (x.S.detach() @ Rv.T), Qv)
        C, V = parts
        if like is not None:
            Q = polar(V.T @ like[1])
            C, V = C @ Q, V @ Q
        return [C.detach(), V.detach()]

    def canonical_parts(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[C, V] ↦ [C Rᵀ, Q]`` with ``V = Q R`` (QR with a positive diagonal): the same ``C Vᵀ``.
        Cost ``O((m + n) r²)``."""
        C, V = parts
        Q, R = qr_positive(V)
        return [C @ R.mT, Q]

    def point_from_parts(self, parts: Sequence[torch.Tensor]) -> LowRankMatrix:
        """The point ``C Vᵀ`` with frames ``U, S = qr(C)`` (positive diagonal) and ``V`` as given. ``O(m r²)``."""
        C, V = parts
        U, S = qr_positive(C)
        x = self.from_frames((U, S, V), US=C)
        x._cache["parts"] = (C, V)
        return x


def _random_orthogonal(r: int, g: torch.Generator, like) -> torch.Tensor:
    q = torch.linalg.qr(torch.randn(r, r, dtype=torch.float64, generator=g))[0]
    return q.to(dtype=like.dtype, device=like.device)
