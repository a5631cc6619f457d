"""Manifolds of fixed-rank matrices, fixed-TT-rank tensors, TT-matrices and fixed multilinear-rank (Tucker) tensors,
and the protocol they implement."""

from .base import LowRankManifold, manifold_of
from .fixed_rank import FixedRankMatrices
from .tangent import TangentVector
from .tt import FixedTTRank
from .tt_matrix import FixedTTMatrixRank
from .tucker import FixedTuckerRank

__all__ = [
    "FixedRankMatrices",
    "FixedTTMatrixRank",
    "FixedTTRank",
    "FixedTuckerRank",
    "LowRankManifold",
    "TangentVector",
    "manifold_of",
]
