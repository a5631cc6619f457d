"""Manifolds of fixed-rank matrices and fixed-TT-rank tensors."""

from .fixed_rank import FixedRankMatrices
from .tangent import TangentVector
from .tt import FixedTTRank

__all__ = ["FixedRankMatrices", "FixedTTRank", "TangentVector"]
