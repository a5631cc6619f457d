"""Layers whose weights live on low-rank manifolds (trained with geoopt's Riemannian optimizers)."""

from .lowrank import LowRankLinear, TTLinear

__all__ = ["LowRankLinear", "TTLinear"]
