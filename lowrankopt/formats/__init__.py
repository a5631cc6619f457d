"""Low-rank data structures and their linear algebra (no optimization logic)."""

from .lowrank import LowRankMatrix
from .tr import TensorRing, tr_full, tr_svd
from .tt import TensorTrain, TTMatrix, truncate_right_to_left, tt_svd

__all__ = [
    "LowRankMatrix",
    "TensorRing",
    "TensorTrain",
    "TTMatrix",
    "tr_full",
    "tr_svd",
    "truncate_right_to_left",
    "tt_svd",
]
