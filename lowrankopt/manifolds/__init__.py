"""Manifolds of fixed-rank matrices and fixed-TT-rank tensors, and the protocol they implement."""

from .base import LowRankManifold, manifold_of
from .fixed_rank import FixedRankMatrices
from .tangent import TangentVector
from .tt import FixedTTRank

__all__ = ["FixedRankMatrices", "FixedTTRank", "LowRankManifold", "TangentVector", "manifold_of"]
