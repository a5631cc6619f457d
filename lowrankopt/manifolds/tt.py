"""The manifold of d-dimensional tensors of fixed TT-ranks, embedded in ℝ^{n_1×⋯×n_d}."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._checks import as_rank_list, as_shape
from ..formats.delta_tt import Chain, DeltaTT, TTFamily
from ..formats.tt import TensorTrain, left_orthogonalize, truncate_right_to_left
from .base import LowRankManifold, ShapeAndRanks, naming_non_finite, polar, qr_positive
from .tangent import TangentVector


class FixedTTRank(ShapeAndRanks, LowRankManifold):
    """Tensors of shape ``shape`` with TT-ranks exactly ``ranks`` (the d − 1 inner ranks).

    Points are :class:`TensorTrain` objects. At a point with right-orthogonal form
    ``x = C_1 V_2 ⋯ V_d`` and left-orthogonal cores ``U_1..U_{d-1}`` (computed once, cached;
    ``O(d n r³)``), a tangent vector is ``ξ = Σ_k U_{<k} δ_k V_{>k}`` with the right gauge
    ``δ_k^R (V_k^R)ᵀ = 0`` for k ≥ 2 (R: right unfolding ``(r_{k-1}, n_k r_k)``); δ_1 is free.
    For d = 2 this is exactly :class:`FixedRankMatrices`' parameterization. Packed (flat) points are the
    right-orthogonal cores ``[C_1 | V_2 | ... | V_d]``, of the coordinates' shapes.
    ``dim = Σ_k r_{k-1} n_k r_k − Σ_{k=1}^{d-1} r_k²``.
    """

    point_type = TensorTrain
    scales_by_first_part = True  # [C_1 | V_2 | ...]: frames from positive-diagonal QRs, unchanged by c > 0

    def __init__(self, shape: Sequence[int], ranks: int | Sequence[int]) -> None:
        shape = list(as_shape("shape", shape))
        d = len(shape)
        if d < 2:
            raise ValueError(f"shape must have at least 2 modes (a 1-mode tensor is a plain vector), got {shape!r}")
        ranks = as_rank_list("ranks", ranks, d)
        full = [1] + ranks + [1]
        for k in range(1, d):
            lo, hi = math.prod(shape[:k]), math.prod(shape[k:])
            if full[k] > full[k - 1] * shape[k - 1] or full[k] > shape[k] * full[k + 1]:
                raise ValueError(
                    f"ranks[{k - 1}] = {full[k]} is not attainable: need r_k <= r_(k-1) n_k = "
                    f"{full[k - 1] * shape[k - 1]} and r_k <= n_(k+1) r_(k+1) = {shape[k] * full[k + 1]} "
                    f"(and r_k <= min({lo}, {hi}))"
                )
        self.shape, self.ranks = tuple(shape), tuple(ranks)

    @classmethod
    def of(cls, x: TensorTrain) -> FixedTTRank:
        """The manifold of ``x``'s shape and TT-ranks."""
        return cls(x.shape, list(x.ranks))

    @property
    def dim(self) -> int:
        full = [1, *self.ranks, 1]
        return sum(full[k] * n * full[k + 1] for k, n in enumerate(self.shape)) - sum(r * r for r in self.ranks)

    @property
    def coord_shapes(self) -> tuple[tuple[int, int, int], ...]:
        full = [1, *self.ranks, 1]
        return tuple((full[k], n, full[k + 1]) for k, n in enumerate(self.shape))

    # ------------------------------------------------------------------ points
    def check_point(self, x: object, name: str = "x") -> None:
        if not isinstance(x, TensorTrain):
            raise TypeError(f"{name} must be a TensorTrain, got {type(x).__name__}")
        if x.shape != self.shape or x.ranks != self.ranks:
            raise ValueError(
                f"{name} must have shape {self.shape} and ranks {self.ranks}, got shape {x.shape} and ranks {x.ranks}"
            )

    def frames(self, x: TensorTrain) -> dict:
        """Cached canonical forms of x: ``C`` (first core of the right-orthogonal form), ``V[k]``
        (right-orthogonal cores, k ≥ 1), ``U[k]`` (left-orthogonal cores, k ≤ d − 2) and the bond
        factors ``R[k]`` with ``X_{<k} = U_{<k} R[k]`` (k ≥ 1) and their inverses. Cost ``O(d n r³)`` once per point."""
        self.check_point(x)
        if "frames" not in x._cache:
            with torch.no_grad():
                x._cache["frames"] = _frames_from_right(self._right_cores(x))
        return x._cache["frames"]

    def _right_cores(self, x: TensorTrain) -> list[torch.Tensor]:
        """The right-orthogonal cores of x (what the gauge needs; the left sweep of :meth:`frames` is not), cached.
        Cost ``O(d n r³)`` once per point, ``O(1)`` for a point from :meth:`point_from_parts`."""
        if "right" not in x._cache:
            x._cache["right"] = _right_orthogonal([c.detach() for c in x.cores])
        return x._cache["right"]

    def from_frames(self, frames: dict) -> TensorTrain:
        """The point ``C V_2 ⋯ V_d`` of a :meth:`frames` dict, taken as it is. ``O(d)``."""
        x = TensorTrain._trusted([frames["C"], *frames["V"][1:]])
        x._cache["frames"] = frames
        x._cache["right"] = list(x.cores)
        return x

    def random_point(
        self,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> TensorTrain:
        """A Gaussian TT (see :meth:`TensorTrain.random`) in right-orthogonal form, scaled to unit
        norm. Cost ``O(d n r³)``."""
        x = TensorTrain.random(self.shape, list(self.ranks), dtype=dtype, device=device, generator=generator)
        cores = _right_orthogonal(x.cores)
        cores[0] = cores[0] / torch.linalg.vector_norm(cores[0])
        return TensorTrain._trusted(cores)

    def regauge(self, x: TensorTrain, seed: int = 0) -> TensorTrain:
        """``G_k → Q_{k-1}ᵀ G_k Q_k`` with random orthogonal ``Q_k`` (float64 draws from ``seed``). ``O(d n r³)``."""
        g = torch.Generator().manual_seed(seed)
        cores, q_prev = [], None
        for k, c in enumerate(x.cores):
            if q_prev is not None:
                c = torch.tensordot(q_prev.T, c, dims=1)
            if k < len(x.cores) - 1:
                q = torch.linalg.qr(torch.randn(c.shape[2], c.shape[2], dtype=torch.float64, generator=g))[0]
                q_prev = q.to(dtype=x.dtype, device=x.device)
                c = torch.tensordot(c, q_prev, dims=1)
            cores.append(c)
        return TensorTrain._trusted(cores)

    def rank_defect(self, x: TensorTrain) -> str | None:
        """``" at bond k"`` for the first bond whose ``|diag R_k|`` has its smallest entry ≤ largest · r_k · eps."""
        fr = self.frames(x)
        for k in range(1, len(self.shape)):
            s = fr["R"][k].diagonal().detach().abs()
            if float(s.min()) <= float(s.max()) * s.numel() * torch.finfo(s.dtype).eps:
                return f" at bond {k}"
        return None

    # ------------------------------------------------------------------ gauge and chart
    def gauge(self, x: TensorTrain, coords: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``δ_k ↦ δ_k − (δ_k V_kᵀ) V_k`` in right unfoldings, k ≥ 2. Cost ``O(d n r³)``."""
        V = self._right_cores(x)
        out = [coords[0]]
        for k in range(1, len(coords)):
            a, n, b = coords[k].shape
            D, W = coords[k].reshape(a, n * b), V[k].reshape(a, n * b)
            out.append((D - (D @ W.T) @ W).reshape(a, n, b))
        return out

    def _family(self, x: TensorTrain, deltas, offset: bool) -> TTFamily:
        """``Σ_k U_{<k} δ_k V_{>k}`` (+ x itself, as the offset C_1 at k = 1, if ``offset``)."""
        fr = self.frames(x)
        offsets = ((fr["C"] if offset else None),) + (None,) * (len(self.shape) - 1)
        return TTFamily(fr["left_chain"], fr["right_chain"], offsets, tuple(deltas))

    def linearization(self, x: TensorTrain, deltas: Sequence[torch.Tensor]) -> DeltaTT:
        """``x + Σ_k U_{<k} δ_k V_{>k}`` with detached frames. ``O(1)`` (a lazy object) after the frames."""
        return DeltaTT(self.shape, [self._family(x, deltas, offset=True)])

    def second_fundamental(
        self, x: TensorTrain, xi: TangentVector, deltas: Sequence[torch.Tensor]
    ) -> tuple[DeltaTT, DeltaTT]:
        """Chart ``φ(W) = TT(C_1 + W_1, V_2 + W_2, ..., V_d + W_d)`` with ``W_k = R_k⁻¹ δ_k``, so that
        ``Dφ[W(δ)] = T_x(δ)``: ``D²φ[W(ξ), W(η)] = Σ_{j<k} U_{<j} ξ_j V_{j+1:k-1} R_k⁻¹ η_k V_{>k}`` (family 1: η at
        the later slot) + the same with ξ and η swapped (family 2). Cost ``O(d n r³)``."""
        fr = self.frames(x)
        V, Rinv, d = fr["V"], fr["Rinv"], len(self.shape)
        self.check_full_rank(x, f"TT-ranks {self.ranks}")  # R_k⁻¹ appears below
        xi_c = [c.detach() for c in xi.coords]
        none = (None,) * d
        # family 1: left state p_k = Σ_{j<k} U_{<j} ξ_j V_{j+1:k-1}, entering η_k through R_k⁻¹
        p_chain = Chain("left", (None, *V[1 : d - 1]), parent=fr["left_chain"], B=tuple(xi_c[: d - 1]))
        fam1 = TTFamily(p_chain, fr["right_chain"], none, tuple(deltas), E=(None, *Rinv[1:]))
        # family 2: right state q_k = Σ_{j>k} V_{k+1:j-1} R_j⁻¹ ξ_j V_{>j}
        Rx = [None] + [torch.tensordot(Rinv[k], xi_c[k], dims=1) for k in range(1, d)]
        q_chain = Chain("right", (None, *V[1 : d - 1], None), parent=fr["right_chain"], B=tuple(Rx))
        fam2 = TTFamily(fr["left_chain"], q_chain, none, tuple(deltas))
        point = TTFamily(fr["left_chain"], fr["right_chain"], (fr["C"],) + none[1:])  # the constant term x
        return DeltaTT(self.shape, [point, fam1, fam2]), DeltaTT(self.shape, [fam1, fam2])

    # ------------------------------------------------------------------ steps
    def to_ambient(self, x: TensorTrain, v: TangentVector) -> TensorTrain:
        """ξ as a rank-2r TensorTrain with cores ``[U_1 δ_1]``, ``[[U_k δ_k], [0 V_k]]``, ``[δ_d; V_d]``.
        Cost ``O(d n r²)``."""
        self.check_tangent(x, v)
        return DeltaTT(self.shape, [self._family(x, v.coords, offset=False)], zero=False).materialize()

    def retr(self, x: TensorTrain, v: TangentVector) -> TensorTrain:
        """TT-SVD retraction: ``x + ξ`` is formed as a rank-2r TT in δ layout (first core ``C_1 + δ_1``)
        and rounded back to ``ranks`` (left QR sweep, right-to-left truncated SVDs). Quasi-optimal
        (within √(d−1) of the metric projection), second order. The result is right-orthogonal.
        Cost ``O(d n r³)``. NaN/Inf coordinates of ``v`` raise ``ValueError`` naming them (found where an SVD of the
        sweep fails on them: nothing is checked before)."""
        self.check_tangent(x, v)
        y = DeltaTT(self.shape, [self._family(x, v.coords, offset=True)], zero=False).materialize()
        with naming_non_finite(v):
            cores = truncate_right_to_left(left_orthogonalize(y.cores), list(self.ranks), None)
        return TensorTrain._trusted(cores)

    # ------------------------------------------------------------------ flat parameters
    def point_parts(self, x: TensorTrain, like: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The right-orthogonal cores ``[C_1, V_2, ..., V_d]`` (QRs with positive diagonals); with ``like``, each bond
        rotated (``W_k → Qᵀ W_k Q'``, polar factors, right to left) so that every ``V_k`` is closest to ``like``'s.
        Cost ``O(d n r³)``."""
        self.check_point(x)
        cores = x._cache.get("parts")
        if cores is None:
            with torch.no_grad():
                cores = _right_orthogonal([c.detach() for c in x.cores])
        cores = [c.detach() for c in cores]
        if like is None:
            return cores
        Q = None
        for k in range(len(cores) - 1, 0, -1):
            W = cores[k] if Q is None else torch.tensordot(cores[k], Q, dims=1)
            a, n, b = W.shape
            Wr = W.reshape(a, n * b)
            Q = polar(Wr @ like[k].reshape(a, n * b).T)
            cores[k] = (Q.T @ Wr).reshape(a, n, b)
        cores[0] = torch.tensordot(cores[0], Q, dims=1)
        return cores

    def canonical_parts(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The right-orthogonal sweep (QRs with positive diagonals) of any cores. ``O(d n r³)``."""
        return _right_orthogonal(parts)

    def point_from_parts(self, parts: Sequence[torch.Tensor]) -> TensorTrain:
        """The TT with right-orthogonal cores ``parts`` taken as they are (its frames are built lazily). ``O(d)``."""
        x = TensorTrain._trusted(list(parts))
        x._cache["right"] = list(parts)
        x._cache["parts"] = tuple(parts)
        return x


def _right_orthogonal(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """QR sweep right to left with positive diagonals (unique; idempotent on right-orthogonal cores, up to
    rounding): cores 2..d get orthonormal right unfoldings, the first carries the norm. Batched over leading
    dimensions. Cost ``O(d n r³)``."""
    cores = list(cores)
    for k in range(len(cores) - 1, 0, -1):
        a, n, b = cores[k].shape[-3:]
        Q, R = qr_positive(cores[k].reshape(*cores[k].shape[:-3], a, n * b).mT)
        cores[k] = Q.mT.reshape(*cores[k].shape[:-3], Q.shape[-1], n, b)
        c = cores[k - 1]
        cores[k - 1] = (c.reshape(*c.shape[:-3], -1, a) @ R.mT).reshape(*c.shape[:-1], R.shape[-2])
    return cores


def _frames_from_right(right: Sequence[torch.Tensor]) -> dict:
    """The :meth:`FixedTTRank.frames` dict from right-orthogonal cores (cores 2..d taken as they are): a left QR sweep
    with positive diagonals. Cost ``O(d n r³)``."""
    right = list(right)
    d = len(right)
    U, R, Rinv, Y = [], [None], [None], right[0]
    for k in range(d - 1):
        a, n, b = Y.shape
        Q, Rk = qr_positive(Y.reshape(a * n, b))
        U.append(Q.reshape(a, n, b))
        R.append(Rk)
        Rinv.append(torch.linalg.solve_triangular(Rk, torch.eye(b, dtype=Rk.dtype, device=Rk.device), upper=True))
        Y = torch.tensordot(Rk, right[k + 1], dims=1)
    V = [None] + right[1:]
    return {
        "C": right[0],
        "V": V,
        "U": U,
        "R": R,
        "Rinv": Rinv,
        "left_chain": Chain("left", tuple(U)),
        "right_chain": Chain("right", tuple(V)),
    }
