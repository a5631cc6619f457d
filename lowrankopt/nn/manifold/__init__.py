"""Manifold-constrained layers: the weight is one point of a fixed-rank or fixed-TT-rank manifold, stored as a packed
``geoopt.ManifoldParameter`` and trained by geoopt's Riemannian optimizers (``RiemannianSGD``, ``RiemannianAdam``):
:class:`LowRankLinear` (``W = C Vᵀ`` of rank r) and :class:`TTLinear` (a TT-matrix of fixed TT-ranks)."""

from .lowrank import LowRankLinear, TTLinear

__all__ = ["LowRankLinear", "TTLinear"]
