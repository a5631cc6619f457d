"""Where the stochastic optimizers step their parameters: one small class per kind of parameter, each working on a
*stack* of ``k`` parameters (leading dimension ``k``) so that the optimizers' elementwise updates are written once.

* :class:`EuclideanStack` — a plain tensor (``k = 1``): gauge and transport are the identity, the step is ``c x + u``.
* :class:`FixedRankStack` — ``k`` packed fixed-rank points ``[C | V]`` of one ``(m, n, r, dtype, device)``: frames,
  gauge, retraction, transport and ``Ortho_r`` as batched kernels (:mod:`lowrankopt.manifolds.fixed_rank_kernels`),
  so one step over many same-shape layers runs one batched QR/SVD per kernel.
* :class:`ProtocolStack` — one packed point of any other :class:`~lowrankopt.manifolds.LowRankManifold` (TT, ...),
  stepped through the manifold protocol (``gauge``, ``retr``, ``transp``, ``point_parts``).
* :class:`GeooptStack` — one parameter on another ``geoopt`` manifold (``Stiefel``, ...), stepped through geoopt's own
  ``proju`` / ``retr`` / ``transp`` (as geoopt's optimizers do).

A stack is used in this order: ``rgrad`` on the gradients, ``gauge`` / ``ortho`` on tangent vectors at the current
points, ``retract`` once (to ``c x + u``; ``c`` the decay factor ``1 − lr · weight_decay`` of the stack's param group),
then ``transport`` of the tangent vectors to keep.
"""

from __future__ import annotations

from typing import Any

import torch

from ...manifolds import fixed_rank_kernels as kernels
from ...manifolds.base import LowRankManifold
from ...manifolds.fixed_rank import FixedRankMatrices
from ...manifolds.tangent import TangentVector

__all__ = ["EuclideanStack", "FixedRankStack", "GeooptStack", "ProtocolStack", "scalable"]


def scalable(base: LowRankManifold) -> bool:
    """Whether ``c x`` (``c > 0``) is the point with the first packed part scaled by ``c`` and the same frames, so that
    tangent coordinates at x are coordinates at ``c x`` (:attr:`LowRankManifold.scales_by_first_part`)."""
    return base.scales_by_first_part


class EuclideanStack:
    """Plain tensors ``X: (k, *shape)`` (the optimizers stack one at a time)."""

    def __init__(self, X: torch.Tensor) -> None:
        self.x = X

    def gauge(self, t: torch.Tensor) -> torch.Tensor:
        return t

    rgrad = gauge

    def retract(self, u: torch.Tensor, c: float) -> torch.Tensor:
        """``c x + u``."""
        return (self.x if c == 1 else c * self.x) + u

    def transport(self, t: torch.Tensor) -> torch.Tensor:
        return t


class FixedRankStack:
    """``k`` packed fixed-rank points ``X: (k, (m + n) r)`` of ``base`` (a :class:`FixedRankMatrices`).

    The coordinates of a packed tangent vector ``[A | B]`` refer to ``V`` and to ``U = qr₊(C)`` — the frame the
    straight-through layers use, so ``.grad`` is in exactly these coordinates. Frames cost ``O(m r²)`` per point."""

    def __init__(self, base: FixedRankMatrices, X: torch.Tensor) -> None:
        self.base, self.rank = base, base.rank
        self.C, self.V = base.split(X)
        self.U = kernels.left_frame(self.C)
        self.new = None  # (C, V, U) of the retracted points

    def gauge(self, t: torch.Tensor) -> torch.Tensor:
        A, B = self.base.split(t)
        return self.base.join([A, kernels.gauge(self.V, B)])

    rgrad = gauge  # .grad is the δ-gradient (straight-through layers): the Riemannian gradient is its gauge projection

    def ortho(self, t: torch.Tensor, rtol: float) -> torch.Tensor:
        """``P_T(Ortho_r(ξ))`` of tangent vectors (see :func:`~lowrankopt.manifolds.fixed_rank_kernels.ortho`),
        ``O((m + n) r² + r³)`` each, batched."""
        A, B = self.base.split(t)
        P, Q = kernels.ortho(A, B, self.U, self.V, rtol)
        return self.base.join(kernels.project(P, Q, self.U, self.V))

    def retract(self, u: torch.Tensor, c: float) -> torch.Tensor:
        """The packed points ``R(c x + ξ(u))`` (metric projection), their ``V`` rotated closest to
        the current ``V``. ``O((m + n) r² + r³)`` each, batched."""
        A, B = self.base.split(u)
        Uk, s, Vk = kernels.retract(self.C if c == 1 else c * self.C, self.U, self.V, A, B, self.rank)
        C2, V2 = kernels.aligned_parts(Uk, s, Vk, self.V)
        self.new = (C2, V2, kernels.left_frame(C2))
        return self.base.join([C2, V2])

    def transport(self, t: torch.Tensor) -> torch.Tensor:
        """Projection of ``ξ = [A, U][V, B]ᵀ`` onto the tangent spaces at the retracted points. ``O((m + n) r²)``."""
        A, B = self.base.split(t)
        _, V2, U2 = self.new
        return self.base.join(kernels.project(torch.cat([A, self.U], -1), torch.cat([self.V, B], -1), U2, V2))


class ProtocolStack:
    """One packed point ``X: (1, numel)`` of any :class:`LowRankManifold`, through the protocol (frames: the packed
    factors, as the geoopt bridge builds them). Scaling (weight decay) needs :func:`scalable`."""

    def __init__(self, base: LowRankManifold, X: torch.Tensor) -> None:
        self.base = base
        self.parts = base.split(X[0])
        self.x = base.point_from_parts(self.parts)
        self.y = None

    def _vector(self, at: Any, t: torch.Tensor) -> TangentVector:
        return TangentVector(self.base, at, self.base.gauge(at, self.base.split(t[0])))

    def gauge(self, t: torch.Tensor) -> torch.Tensor:
        return self.base.join(self._vector(self.x, t).coords)[None]

    rgrad = gauge

    def retract(self, u: torch.Tensor, c: float) -> torch.Tensor:
        """``R(c x + ξ(u))`` by the manifold's retraction, packed closest to the current factors."""
        x = self.x
        if c != 1:
            x = self.base.point_from_parts([c * self.parts[0], *self.parts[1:]])
        y = self.base.retr(x, self._vector(x, u))
        packed = self.base.join(self.base.point_parts(y, like=self.parts))
        self.y = self.base.point_from_parts(self.base.split(packed))
        return packed[None]

    def transport(self, t: torch.Tensor) -> torch.Tensor:
        return self.base.join(self.base.transp(self.x, self.y, self._vector(self.x, t)).coords)[None]


class GeooptStack:
    """One parameter ``X: (1, *shape)`` on a ``geoopt.Manifold`` (not one of lowrankopt's packed ones), stepped by
    its own ``egrad2rgrad``, ``proju``, ``retr`` and ``transp`` (no scaling: weight decay is refused for these)."""

    def __init__(self, manifold: Any, X: torch.Tensor) -> None:
        self.manifold, self.x, self.y = manifold, X[0], None

    def gauge(self, t: torch.Tensor) -> torch.Tensor:
        return self.manifold.proju(self.x, t[0])[None]

    def rgrad(self, t: torch.Tensor) -> torch.Tensor:
        """The manifold's ``egrad2rgrad`` (its metric may not be the embedded one: geoopt's canonical Stiefel)."""
        return self.manifold.egrad2rgrad(self.x, t[0])[None]

    def retract(self, u: torch.Tensor, c: float) -> torch.Tensor:
        self.y = self.manifold.retr(self.x, u[0])
        return self.y[None]

    def transport(self, t: torch.Tensor) -> torch.Tensor:
        return self.manifold.transp(self.x, self.y, t[0])[None]
