"""Low-rank data structures and their linear algebra (no optimization logic)."""

from .lowrank import LowRankMatrix
from .tr import TensorRing
from .tt import TensorTrain, TTMatrix

__all__ = ["LowRankMatrix", "TensorRing", "TensorTrain", "TTMatrix"]
