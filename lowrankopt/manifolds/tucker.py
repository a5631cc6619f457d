"""The manifold of d-dimensional tensors of fixed multilinear rank (Tucker), embedded in ℝ^{n_1×⋯×n_d}."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._checks import as_shape
from ..formats.delta_tucker import DeltaTucker
from ..formats.tucker import Tucker, as_multilinear_ranks, mode_product, multi_mode_product, unfold
from .base import LowRankManifold, ShapeAndRanks, naming_non_finite, polar, qr_positive
from .tangent import TangentVector


def fold(M: torch.Tensor, k: int, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`~lowrankopt.formats.tucker.unfold`: ``M: (n_k, Π_{j≠k} n_j)`` as a tensor of ``shape``."""
    rest = [n for j, n in enumerate(shape) if j != k]
    return M.reshape(shape[k], *rest).movedim(0, k)


class FixedTuckerRank(ShapeAndRanks, LowRankManifold):
    """Tensors of shape ``shape`` with multilinear ranks exactly ``ranks`` (Koch–Lubich 2010; Kressner, Steinlechner,
    Vandereycken 2014).

    Points are :class:`~lowrankopt.formats.Tucker` tensors ``x = G ×_1 U_1 ⋯ ×_d U_d``; their frames (computed once,
    cached) have orthonormal factors ``U_k`` (positive-diagonal QRs of the given factors, absorbed into the core). A
    tangent vector is

        ``ξ = Ġ ×_k U_k + Σ_k G ×_k U̇_k ×_{j≠k} U_j``,  ``U_kᵀ U̇_k = 0``  (the standard gauge),

    and its **orthonormal coordinates** are ``(Ġ, δ_1, …, δ_d)`` with ``δ_k = U̇_k R_kᵀ``, where ``G_(k)ᵀ = Q_k R_k``
    (QR of the core's transposed unfolding): then ``G ×_k U̇_k = Q̃_k ×_k δ_k`` with ``Q̃_k = G ×_k R_k⁻ᵀ`` the core
    whose mode-k unfolding has orthonormal rows, so the d + 1 terms are mutually orthogonal and ``‖ξ‖² = ‖Ġ‖² +
    Σ‖δ_k‖²``; the gauge is ``δ_k ↦ (I − U_k U_kᵀ) δ_k``. The linearization ``x + T_x(δ)`` has no inverse in it
    (the δ-trick, autodiff's gradient); only the curvature term of the exact Hessian uses ``R_k⁻¹``, as it must.

    ``dim = Π_k r_k + Σ_k (n_k r_k − r_k²)``. Retraction: the HOSVD of ``x + ξ`` (a Tucker tensor of ranks 2r: QRs
    of ``[U_k | δ_k]``, then the SVDs of the ``(2r)^d`` core's unfoldings), quasi-optimal (within √d of the metric
    projection). Packed points are ``[G | U_1 | … | U_d]``, of the coordinates' shapes.

    Args:
        shape: the mode sizes ``n_1, …, n_d`` (d ≥ 2).
        ranks: one int or d ints with ``r_k ≤ n_k`` and ``r_k ≤ Π_{j≠k} r_j`` (else no core has full multilinear
            rank).
    """

    point_type = Tucker
    scales_by_first_part = True  # [G | U_1 | ...]: G scales, the orthonormal factors stay

    def __init__(self, shape: Sequence[int], ranks: int | Sequence[int]) -> None:
        shape = as_shape("shape", shape)
        if len(shape) < 2:
            raise ValueError(f"shape must have at least 2 modes, got {list(shape)}")
        ranks = as_multilinear_ranks("ranks", ranks, shape)
        for k, r in enumerate(ranks):
            others = math.prod(ranks) // r
            if r > others:
                raise ValueError(
                    f"ranks[{k}] = {r} is not attainable: need r_k <= the product of the other ranks = {others} "
                    "(else no core has full multilinear rank)"
                )
        self.shape, self.ranks = tuple(shape), tuple(ranks)

    @classmethod
    def of(cls, x: Tucker) -> FixedTuckerRank:
        """The manifold of ``x``'s shape and multilinear ranks (of its representation)."""
        return cls(x.shape, list(x.ranks))

    @property
    def dim(self) -> int:
        return math.prod(self.ranks) + sum(n * r - r * r for n, r in zip(self.shape, self.ranks))

    @property
    def coord_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (self.ranks, *((n, r) for n, r in zip(self.shape, self.ranks)))

    # ------------------------------------------------------------------ points
    def check_point(self, x: object, name: str = "x") -> None:
        if not isinstance(x, Tucker):
            raise TypeError(f"{name} must be a Tucker tensor, got {type(x).__name__}")
        if x.shape != self.shape or x.ranks != self.ranks:
            raise ValueError(
                f"{name} must have shape {self.shape} and multilinear ranks {self.ranks}, got shape {x.shape} and "
                f"ranks {x.ranks}"
            )

    def frames(self, x: Tucker) -> dict:
        """Cached canonical data of x: ``U[k]`` (orthonormal factors), ``G`` (the core in those factors), ``R[k]``,
        ``Rinv[k]`` (``G_(k)ᵀ = Q_k R_k``) and ``Qt[k] = G ×_k R_k⁻ᵀ``. Factors of a point built from frames or parts
        are taken as they are; others are orthonormalized (positive-diagonal QRs). Cost ``O(d n r² + d r^{d+1})``
        once per point."""
        self.check_point(x)
        if "frames" not in x._cache:
            with torch.no_grad():
                parts = [x.core.detach(), *(U.detach() for U in x.factors)]
                if not x._cache.get("orthonormal"):
                    parts = self.canonical_parts(parts)
                x._cache["frames"] = _frames(parts[0], parts[1:])
        return x._cache["frames"]

    def from_frames(self, frames: dict) -> Tucker:
        """The point ``G ×_k U_k`` of a :meth:`frames` dict, taken as it is. ``O(1)``."""
        x = Tucker._trusted(frames["G"], frames["U"])
        x._cache["frames"] = frames
        x._cache["orthonormal"] = True
        return x

    def random_point(
        self,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tucker:
        """Orthonormal factors and a Gaussian core (:meth:`Tucker.random`), scaled to unit norm. Cost
        ``O(d n r² + r^d)``."""
        x = Tucker.random(self.shape, self.ranks, dtype=dtype, device=device, generator=generator)
        return self.point_from_parts([x.core / torch.linalg.vector_norm(x.core), *x.factors])

    def regauge(self, x: Tucker, seed: int = 0) -> Tucker:
        """``U_k → U_k O_k``, ``G → G ×_k O_kᵀ`` with random orthogonal ``O_k`` (float64 draws from ``seed``).
        ``O(d n r² + d r^{d+1})``."""
        g = torch.Generator().manual_seed(seed)
        Os = [
            torch.linalg.qr(torch.randn(r, r, dtype=torch.float64, generator=g))[0].to(x.dtype).to(x.device)
            for r in x.ranks
        ]
        return Tucker._trusted(multi_mode_product(x.core, [O.T for O in Os]), [U @ O for U, O in zip(x.factors, Os)])

    def rank_defect(self, x: Tucker) -> str | None:
        """``" in mode k"`` for the first mode whose core unfolding (in orthonormal factors) has ``|diag R_k|``'s
        smallest entry ≤ largest · r_k · eps."""
        fr = self.frames(x)
        for k, R in enumerate(fr["R"]):
            s = R.diagonal().abs()
            if float(s.min()) <= float(s.max()) * s.numel() * torch.finfo(s.dtype).eps:
                return f" in mode {k}"
        return None

    # ------------------------------------------------------------------ gauge and chart
    def gauge(self, x: Tucker, coords: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``Ġ`` free, ``δ_k ↦ δ_k − U_k (U_kᵀ δ_k)``. Cost ``O(d n r²)``."""
        U = self.frames(x)["U"]
        return [coords[0], *(D - Uk @ (Uk.T @ D) for Uk, D in zip(U, coords[1:]))]

    def _terms(self, x: Tucker, deltas: Sequence[torch.Tensor], offset: bool) -> list:
        """``(G + Ġ) ×_k U_k`` (Ġ alone without ``offset``) and ``Q̃_k ×_k δ_k ×_{j≠k} U_j`` as Tucker terms."""
        fr = self.frames(x)
        U = tuple(fr["U"])
        terms = [((fr["G"] + deltas[0]) if offset else deltas[0], U)]
        for k, (Qt, D) in enumerate(zip(fr["Qt"], deltas[1:])):
            terms.append((Qt, U[:k] + (D,) + U[k + 1 :]))
        return terms

    def linearization(self, x: Tucker, deltas: Sequence[torch.Tensor]) -> DeltaTucker:
        """``x + T_x(δ) = (G + Ġ) ×_k U_k + Σ_k Q̃_k ×_k δ_k ×_{j≠k} U_j`` with detached frames (d + 1 rank-r terms).
        ``O(1)`` after the frames."""
        return DeltaTucker(self._terms(x, deltas, offset=True))

    def second_fundamental(
        self, x: Tucker, xi: TangentVector, deltas: Sequence[torch.Tensor]
    ) -> tuple[DeltaTucker, DeltaTucker]:
        """Chart ``φ(Ġ, W) = (G + Ġ) ×_k (U_k + W_k)`` with ``W_k = δ_k R_k⁻ᵀ`` (so ``Dφ = T_x``):
        ``D²φ[ξ, η] = Σ_k (Ġ^ξ ×_k R_k⁻ᵀ) ×_k η_k ×_{≠k} U + Σ_k Ġ^η ×_k W_k^ξ ×_{≠k} U
        + Σ_{j≠k} Q̃_k ×_k η_k ×_j W_j^ξ ×_{others} U`` — d (d + 1) rank-r terms, linear in η. Cost
        ``O(d n r² + d r^{d+1})`` to build."""
        fr = self.frames(x)
        self.check_full_rank(x, f"multilinear ranks {self.ranks}")  # R_k⁻¹ appears below
        U, Rinv, d = tuple(fr["U"]), fr["Rinv"], len(self.shape)
        Gxi, *xs = (c.detach() for c in xi.coords)
        W = [xk @ Ri.T for xk, Ri in zip(xs, Rinv)]  # W_k^ξ = ξ_k R_k⁻ᵀ
        Geta, etas = deltas[0], deltas[1:]
        terms = []
        for k in range(d):
            at_k = U[:k] + (etas[k],) + U[k + 1 :]
            terms.append((mode_product(Gxi, Rinv[k].T, k), at_k))
            terms.append((Geta, U[:k] + (W[k],) + U[k + 1 :]))
            for j in range(d):
                if j != k:
                    terms.append((fr["Qt"][k], at_k[:j] + (W[j],) + at_k[j + 1 :]))
        return DeltaTucker([(fr["G"], U), *terms]), DeltaTucker(terms)

    # ------------------------------------------------------------------ steps
    def to_ambient(self, x: Tucker, v: TangentVector) -> Tucker:
        """ξ as a Tucker tensor of ranks 2r (factors ``[U_k | δ_k]``, a block core). Cost ``O(d n r + (2r)^d)``."""
        self.check_tangent(x, v)
        return DeltaTucker(self._terms(x, v.coords, offset=False)).materialize()

    def retr(self, x: Tucker, v: TangentVector) -> Tucker:
        """HOSVD retraction: ``x + ξ`` as a Tucker tensor of ranks 2r, truncated to ``ranks`` (:meth:`Tucker.round`:
        QRs of the factors ``[U_k | δ_k]``, SVDs of the ``(2r)^d`` core's unfoldings). Quasi-optimal; orthonormal
        factors. Cost ``O(d n r² + d (2r)^{d+1})``. NaN/Inf coordinates of ``v`` raise ``ValueError`` naming them."""
        self.check_tangent(x, v)
        y = DeltaTucker(self._terms(x, v.coords, offset=True)).materialize()
        with naming_non_finite(v):
            z = y.round(self.ranks)
        z._cache["orthonormal"] = True
        return z

    # ------------------------------------------------------------------ flat parameters
    def point_parts(self, x: Tucker, like: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """``[G, U_1, …, U_d]`` of the frames (orthonormal factors); with ``like``, each factor rotated
        (``U_k → U_k O_k``, ``G → G ×_k O_kᵀ``, ``O_k`` the polar factor of ``U_kᵀ like_k``) to be closest to
        ``like``'s. Cost ``O(d n r² + d r^{d+1})``."""
        fr = self.frames(x)
        core, factors = fr["G"].detach(), [U.detach() for U in fr["U"]]
        if like is None:
            return [core, *factors]
        Os = [polar(U.T @ L) for U, L in zip(factors, like[1:])]
        return [multi_mode_product(core, [O.T for O in Os]), *(U @ O for U, O in zip(factors, Os))]

    def canonical_parts(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Orthonormal factors (positive-diagonal QRs, idempotent on orthonormal ones up to rounding) with the
        triangular factors absorbed into the core. ``O(d n r² + d r^{d+1})``."""
        Qs, Rs = zip(*(qr_positive(U) for U in parts[1:]))
        return [multi_mode_product(parts[0], Rs), *Qs]

    def point_from_parts(self, parts: Sequence[torch.Tensor]) -> Tucker:
        """The Tucker tensor with core and orthonormal factors ``parts`` taken as they are (frames built lazily).
        ``O(1)``."""
        x = Tucker._trusted(parts[0], list(parts[1:]))
        x._cache["orthonormal"] = True
        return x


def _frames(core: torch.Tensor, factors: list[torch.Tensor]) -> dict:
    """The :meth:`FixedTuckerRank.frames` dict of a core and orthonormal factors."""
    R, Rinv, Qt = [], [], []
    for k in range(core.dim()):
        Qk, Rk = qr_positive(unfold(core, k).T)  # G_(k)ᵀ = Q_k R_k
        eye = torch.eye(Rk.shape[0], dtype=Rk.dtype, device=Rk.device)
        R.append(Rk)
        Rinv.append(torch.linalg.solve_triangular(Rk, eye, upper=True))
        Qt.append(fold(Qk.T, k, core.shape))
    return {"U": factors, "G": core, "R": R, "Rinv": Rinv, "Qt": Qt}
