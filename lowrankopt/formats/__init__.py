"""Low-rank data structures and their linear algebra (no optimization logic)."""

from .decompositions import truncate_right_to_left, tt_svd
from .lowrank import LowRankMatrix
from .tr import TensorRing, tr_full, tr_svd
from .tt import TensorTrain, TTMatrix
from .tucker import Tucker

__all__ = [
    "LowRankMatrix",
    "TensorRing",
    "TensorTrain",
    "TTMatrix",
    "Tucker",
    "tr_full",
    "tr_svd",
    "truncate_right_to_left",
    "tt_svd",
]
