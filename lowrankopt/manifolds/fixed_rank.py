"""The manifold of m × n matrices of rank exactly r, embedded in ℝ^{m×n}."""

from __future__ import annotations

import torch

from .._checks import as_positive_int
from ..formats.delta_lowrank import DeltaLowRank, MatrixFamily
from ..formats.lowrank import LowRankMatrix
from .base import LowRankManifold, check_full_rank, naming_non_finite
from .tangent import TangentVector


class FixedRankMatrices(LowRankManifold):
    """Matrices of shape ``(m, n)`` and rank ``rank``; points are :class:`LowRankMatrix` objects.

    Tangent vectors at ``x = U S Vᵀ`` (``U``, ``V`` orthonormal, computed once per point and cached)
    are ``ξ = A Vᵀ + U Bᵀ`` with ``A: (m, r)`` free and ``B: (n, r)``, ``Vᵀ B = 0``. In Manopt's
    terms ``M = Uᵀ A``, ``Up = A − U M``, ``Vp = B``. ``dim = (m + n − r) r``.
    """

    def __init__(self, m: int, n: int, rank: int):
        m, n, rank = as_positive_int("m", m), as_positive_int("n", n), as_positive_int("rank", rank)
        if rank > min(m, n):
            raise ValueError(f"rank must be <= min(m, n) = {min(m, n)}, got {rank}")
        self.m, self.n, self.rank = m, n, rank

    point_type = LowRankMatrix

    def _dims(self):
        return (self.m, self.n, self.rank)

    @property
    def ambient_shape(self) -> tuple[int, int]:
        return (self.m, self.n)

    def __repr__(self) -> str:
        return f"FixedRankMatrices(m={self.m}, n={self.n}, rank={self.rank})"

    @property
    def dim(self) -> int:
        return (self.m + self.n - self.rank) * self.rank

    # ------------------------------------------------------------------ points
    def _check_point(self, x, name: str = "x") -> None:
        if not isinstance(x, LowRankMatrix):
            raise TypeError(f"{name} must be a LowRankMatrix, got {type(x).__name__}")
        if x.shape != (self.m, self.n) or x.rank != self.rank:
            raise ValueError(
                f"{name} must have shape ({self.m}, {self.n}) and rank {self.rank}, "
                f"got shape {x.shape} and rank {x.rank}"
            )

    def frames(self, x):
        """``(U, S, V)`` with orthonormal U, V and ``x = U S Vᵀ``; cached on x. Cost ``O((m + n) r²)``."""
        self._check_point(x)
        if "frames" not in x._cache:
            with torch.no_grad():
                Qu, Ru = torch.linalg.qr(x.U.detach())
                Qv, Rv = torch.linalg.qr(x.V.detach())
                S = Ru @ x.S.detach() @ Rv.T
                x._cache["frames"] = (Qu, S, Qv)
                x._cache["US"] = Qu @ S
        return x._cache["frames"]

    def _point_from_frames(self, U, S, V) -> LowRankMatrix:
        """The point ``U S Vᵀ`` with orthonormal ``U``, ``V`` taken as its frames as they are (no QR,
        so tangent coordinates refer to exactly these frames). Cost ``O(m r²)``."""
        x = LowRankMatrix._trusted(U, S, V)
        x._cache["frames"] = (U, S, V)
        x._cache["US"] = U @ S
        return x

    def random_point(self, *, dtype=torch.float64, device=None, generator=None) -> LowRankMatrix:
        """See :meth:`LowRankMatrix.random`. Cost ``O((m + n) r²)``."""
        return LowRankMatrix.random(self.m, self.n, self.rank, dtype=dtype, device=device, generator=generator)

    # ------------------------------------------------------------------ tangent space
    def _coord_shapes(self, x):
        return [(self.m, self.rank), (self.n, self.rank)]

    def _gauge(self, x, coords):
        _, _, V = self.frames(x)
        A, B = coords
        return [A, B - V @ (V.T @ B)]

    def _linearization(self, x, deltas):
        U, _, V = self.frames(x)
        return DeltaLowRank(x.shape, [MatrixFamily(P=V, Q=U, A0=x._cache["US"], deltas=tuple(deltas))])

    def _second_fundamental(self, x, xi, deltas):
        # Chart φ(A, B) = (US + A)(V + B S⁻ᵀ)ᵀ: D²φ[ξ, η] = A_η S⁻¹ B_ξᵀ + A_ξ S⁻¹ B_ηᵀ.
        _, _, V = self.frames(x)
        Sinv = self._core_inverse(x)
        A, B = (c.detach() for c in xi.coords)
        P, Q = B @ Sinv.T, A @ Sinv
        curv = MatrixFamily(P=P, Q=Q, deltas=tuple(deltas))
        point = MatrixFamily(P=V, Q=None, A0=x._cache["US"])  # the constant term x
        return DeltaLowRank(x.shape, [point, curv]), DeltaLowRank(x.shape, [curv])

    def _core_inverse(self, x) -> torch.Tensor:
        """``S⁻¹`` of x's frames, once x is checked to have rank r exactly; cached on x, so the Hessian-vector products
        at x (many per trust-region step) take no SVD, no solve and no host read. Cost ``O(r³)`` once per point."""
        if "Sinv" not in x._cache:
            S = self.frames(x)[1].detach()
            check_full_rank(x, lambda: [("", torch.linalg.svdvals(S))], f"rank {self.rank}")
            x._cache["Sinv"] = torch.linalg.inv(S)
        return x._cache["Sinv"]

    def proj(self, x, z) -> TangentVector:
        """Orthogonal projection onto T_x (see :meth:`LowRankManifold.proj`). A LowRankMatrix
        ``z = Z_U Z_S Z_Vᵀ`` of rank ``r_z`` is projected in closed form: ``A = Z_U Z_S (Z_Vᵀ V)``,
        ``B = (I − V Vᵀ) Z_V Z_Sᵀ (Z_Uᵀ U)``, cost ``O((m + n) r r_z)``."""
        if not isinstance(z, LowRankMatrix) or isinstance(z, DeltaLowRank):
            return super().proj(x, z)
        self._check_point(x)
        self._check_ambient(x, z)
        U, _, V = self.frames(x)
        A = z.U @ (z.S @ (z.V.T @ V))
        B = z.V @ (z.S.T @ (z.U.T @ U))
        return TangentVector(self, x, self._gauge(x, [A.detach(), B.detach()]))

    def to_ambient(self, x, v: TangentVector) -> LowRankMatrix:
        """``ξ = [A U] [V B]ᵀ`` as a rank-2r LowRankMatrix. Cost ``O((m + n) r)``."""
        self._check_tangent(x, v)
        U, _, V = self.frames(x)
        A, B = v.coords
        eye = torch.eye(2 * self.rank, dtype=A.dtype, device=A.device)
        return LowRankMatrix._trusted(torch.cat([A, U], 1), eye, torch.cat([V, B], 1))

    def retr(self, x, v: TangentVector) -> LowRankMatrix:
        """Metric projection retraction: the best rank-r approximation of ``x + ξ``.

        ``x + ξ = [US + A, U] [V, B]ᵀ``; thin QRs of both ``(·, 2r)`` factors and the SVD of the
        ``2r × 2r`` core give it in ``O((m + n) r² + r³)``. Second order. The result has orthonormal
        factors and a diagonal, non-increasing S. NaN/Inf coordinates of ``v`` raise ``ValueError`` naming them (found
        where the SVD fails on them: nothing is checked before).
        """
        self._check_tangent(x, v)
        U, S, V = self.frames(x)
        A, B = v.coords
        with naming_non_finite(v):
            Ql, Rl = torch.linalg.qr(torch.cat([U @ S + A, U], 1))
            Qr, Rr = torch.linalg.qr(torch.cat([V, B], 1))
            Uk, s, Vkh = torch.linalg.svd(Rl @ Rr.T)
        r = self.rank
        return LowRankMatrix._trusted(Ql @ Uk[:, :r], torch.diag(s[:r]), Qr @ Vkh[:r].T)
