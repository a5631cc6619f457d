"""lowrankopt: Riemannian optimization on low-rank matrix and tensor-train manifolds, in PyTorch."""

from .allocator import tune_cpu_allocator
from .autodiff import manifold_of, riemannian_grad, riemannian_grad_and_hvp, riemannian_hvp
from .formats import LowRankMatrix, TensorTrain, TTMatrix
from .manifolds import FixedRankMatrices, FixedTTRank, TangentVector

__version__ = "0.1.0"

__all__ = [
    "FixedRankMatrices",
    "FixedTTRank",
    "LowRankMatrix",
    "TTMatrix",
    "TangentVector",
    "TensorTrain",
    "manifold_of",
    "riemannian_grad",
    "riemannian_grad_and_hvp",
    "riemannian_hvp",
    "tune_cpu_allocator",
]
