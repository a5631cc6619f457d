"""Manifolds of fixed-rank matrices, fixed-TT-rank tensors and TT-matrices, and the protocol they implement."""

from .base import LowRankManifold, manifold_of
from .fixed_rank import FixedRankMatrices
from .tangent import TangentVector
from .tt import FixedTTRank
from .tt_matrix import FixedTTMatrixRank

__all__ = ["FixedRankMatrices", "FixedTTMatrixRank", "FixedTTRank", "LowRankManifold", "TangentVector", "manifold_of"]
