"""The manifold of d-dimensional tensors of fixed TT-ranks, embedded in ℝ^{n_1×⋯×n_d}."""

from __future__ import annotations

import math

import torch

from .._checks import check_tensor
from ..formats.delta import DeltaTT, TTFamily
from ..formats.tt import TensorTrain, _svd_truncate_right_to_left, left_orthogonalize, right_orthogonalize
from .base import LowRankManifold
from .tangent import TangentVector


class FixedTTRank(LowRankManifold):
    """Tensors of shape ``shape`` with TT-ranks exactly ``ranks`` (the d − 1 inner ranks).

    Points are :class:`TensorTrain` objects. At a point with right-orthogonal form
    ``x = C_1 V_2 ⋯ V_d`` and left-orthogonal cores ``U_1..U_{d-1}`` (computed once, cached;
    ``O(d n r³)``), a tangent vector is ``ξ = Σ_k U_{<k} δ_k V_{>k}`` with the right gauge
    ``δ_k^R (V_k^R)ᵀ = 0`` for k ≥ 2 (R: right unfolding ``(r_{k-1}, n_k r_k)``); δ_1 is free.
    For d = 2 this is exactly :class:`FixedRankMatrices`' parameterization.
    ``dim = Σ_k r_{k-1} n_k r_k − Σ_{k=1}^{d-1} r_k²``.
    """

    def __init__(self, shape, ranks):
        shape = list(shape)
        if not shape or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
            raise ValueError(f"shape must be a non-empty sequence of positive ints, got {shape!r}")
        d = len(shape)
        if isinstance(ranks, int) and not isinstance(ranks, bool):
            ranks = [ranks] * (d - 1)
        ranks = list(ranks)
        if len(ranks) != d - 1 or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
            raise ValueError(f"ranks must be {d - 1} positive ints (the inner TT ranks), got {ranks!r}")
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

    def _dims(self):
        return (self.shape, self.ranks)

    def __repr__(self) -> str:
        return f"FixedTTRank(shape={self.shape}, ranks={self.ranks})"

    @property
    def dim(self) -> int:
        full = [1, *self.ranks, 1]
        return sum(full[k] * n * full[k + 1] for k, n in enumerate(self.shape)) - sum(r * r for r in self.ranks)

    # ------------------------------------------------------------------ points
    def _check_point(self, x, name: str = "x") -> None:
        if not isinstance(x, TensorTrain):
            raise TypeError(f"{name} must be a TensorTrain, got {type(x).__name__}")
        if x.shape != self.shape or x.ranks != self.ranks:
            raise ValueError(
                f"{name} must have shape {self.shape} and ranks {self.ranks}, got shape {x.shape} and ranks {x.ranks}"
            )

    def _check_ambient(self, z) -> None:
        if isinstance(z, TensorTrain):
            shape = z.shape
        elif isinstance(z, torch.Tensor):
            check_tensor("z", z)
            shape = tuple(z.shape)
        else:
            raise TypeError(f"z must be a tensor, TensorTrain or TangentVector, got {type(z).__name__}")
        if shape != self.shape:
            raise ValueError(f"z must have shape {self.shape}, got {shape}")

    def frames(self, x) -> dict:
        """Cached canonical forms of x: ``C`` (first core of the right-orthogonal form), ``V[k]``
        (right-orthogonal cores, k ≥ 1), ``U[k]`` (left-orthogonal cores, k ≤ d − 2) and the bond
        factors ``R[k]`` with ``X_{<k} = U_{<k} R[k]`` (k ≥ 1) and their inverses. Cost ``O(d n r³)``."""
        self._check_point(x)
        if "frames" not in x._cache:
            with torch.no_grad():
                right = right_orthogonalize([c.detach() for c in x.cores])
                d = len(right)
                U, R, Rinv, Y = [], [None], [None], right[0]
                for k in range(d - 1):
                    a, n, b = Y.shape
                    Q, Rk = torch.linalg.qr(Y.reshape(a * n, b))
                    U.append(Q.reshape(a, n, b))
                    R.append(Rk)
                    Rinv.append(
                        torch.linalg.solve_triangular(Rk, torch.eye(b, dtype=Rk.dtype, device=Rk.device), upper=True)
                    )
                    Y = torch.tensordot(Rk, right[k + 1], dims=1)
                x._cache["frames"] = {"C": right[0], "V": [None] + right[1:], "U": U, "R": R, "Rinv": Rinv}
        return x._cache["frames"]

    def random_point(self, *, dtype=torch.float64, device=None, generator=None) -> TensorTrain:
        """A Gaussian TT (see :meth:`TensorTrain.random`) in right-orthogonal form, scaled to unit
        norm. Cost ``O(d n r³)``."""
        x = TensorTrain.random(self.shape, list(self.ranks), dtype=dtype, device=device, generator=generator)
        cores = right_orthogonalize(x.cores)
        cores[0] = cores[0] / torch.linalg.vector_norm(cores[0])
        return TensorTrain._trusted(cores)

    # ------------------------------------------------------------------ tangent space
    def _coord_shapes(self, x):
        full = [1, *self.ranks, 1]
        return [(full[k], n, full[k + 1]) for k, n in enumerate(self.shape)]

    def _gauge(self, x, coords):
        V = self.frames(x)["V"]
        out = [coords[0]]
        for k in range(1, len(coords)):
            a, n, b = coords[k].shape
            D, W = coords[k].reshape(a, n * b), V[k].reshape(a, n * b)
            out.append((D - (D @ W.T) @ W).reshape(a, n, b))
        return out

    def _family(self, x, offset: bool) -> TTFamily:
        fr = self.frames(x)
        d = len(self.shape)
        offsets = (fr["C"] if offset else None,) + (None,) * (d - 1)
        return TTFamily(left=tuple(fr["U"]), right=tuple(fr["V"]), E=(None,) * d, F=(None,) * d, offsets=offsets)

    def _linearization(self, x, deltas):
        return DeltaTT(deltas, [self._family(x, offset=True)])

    def _second_fundamental(self, x, xi, deltas):
        # Chart φ(W) = TT(C_1 + W_1, V_2 + W_2, ..., V_d + W_d) with W_k = R_k⁻¹ δ_k, so that
        # Dφ[W(δ)] = T_x(δ). D²φ[W(ξ), W(η)] = Σ_{j<k} U_{<j} ξ_j V_{j+1:k-1} R_k⁻¹ η_k V_{>k}
        # (family 1: η at the later slot) + the same with ξ and η swapped (family 2).
        fr = self.frames(x)
        U, V, Rinv = fr["U"], fr["V"], fr["Rinv"]
        xi_c = [c.detach() for c in xi.coords]
        d = len(xi_c)
        none = (None,) * d

        def block(a, b, c):  # [[a, b], [0, c]] along (left rank, right rank)
            top = torch.cat([a, b], 2)
            return torch.cat([top, torch.cat([torch.zeros_like(c[:, :, : a.shape[2]]), c], 2)], 0)

        # family 1: left chain states (u: U-prefix, p: prefix holding one ξ_j), enters η_k from p via R_k⁻¹.
        left1 = [torch.cat([U[0], xi_c[0]], 2)] + [block(U[k], xi_c[k], V[k]) for k in range(1, d - 1)]
        E1 = [torch.zeros(1, 1, dtype=x.dtype, device=x.device)]
        E1 += [torch.cat([torch.zeros_like(Rinv[k]), Rinv[k]], 0) for k in range(1, d)]
        fam1 = TTFamily(left=tuple(left1), right=tuple(V), E=tuple(E1), F=none, offsets=none)
        # family 2: right chain states (q: one R_j⁻¹ ξ_j still to come, done), η_k exits into q.
        Rx = [None] + [torch.tensordot(Rinv[k], xi_c[k], dims=1) for k in range(1, d)]
        right2 = [None] + [block(V[k], Rx[k], V[k]) for k in range(1, d - 1)]
        right2.append(torch.cat([Rx[d - 1], V[d - 1]], 0))
        F2 = []
        for k in range(d - 1):  # select the q block of the (q, done) interface
            eye = torch.eye(self.ranks[k], dtype=x.dtype, device=x.device)
            F2.append(torch.cat([eye, torch.zeros_like(eye)], 0))
        F2.append(torch.zeros(1, 1, dtype=x.dtype, device=x.device))
        fam2 = TTFamily(left=tuple(U), right=tuple(right2), E=none, F=tuple(F2), offsets=none)
        return DeltaTT(deltas, [fam1, fam2], base=x), DeltaTT(deltas, [fam1, fam2])

    def to_ambient(self, x, v: TangentVector) -> TensorTrain:
        """ξ as a rank-2r TensorTrain with cores ``[δ_1 U_1]``, ``[[V_k 0], [δ_k U_k]]``, ``[V_d; δ_d]``
        (block order as stored). Cost ``O(d n r²)``."""
        self._check_tangent(x, v)
        return DeltaTT(v.coords, [self._family(x, offset=False)], zero=False).materialize()

    def retr(self, x, v: TangentVector) -> TensorTrain:
        """TT-SVD retraction: ``x + ξ`` is formed as a rank-2r TT in δ layout (first core ``C_1 + δ_1``)
        and rounded back to ``ranks`` (left QR sweep, right-to-left truncated SVDs). Quasi-optimal
        (within √(d−1) of the metric projection), second order. The result is right-orthogonal.
        Cost ``O(d n r³)``."""
        self._check_tangent(x, v)
        y = DeltaTT(v.coords, [self._family(x, offset=True)], zero=False).materialize()
        cores = left_orthogonalize(y.cores)
        return TensorTrain._trusted(_svd_truncate_right_to_left(cores, list(self.ranks), None))
