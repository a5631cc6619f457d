"""lowrankopt: Riemannian optimization on low-rank matrix and tensor-train manifolds, in PyTorch."""

from .allocator import tune_cpu_allocator
from .autodiff import (
    manifold_of,
    riemannian_grad,
    riemannian_grad_and_hessian,
    riemannian_grad_and_hvp,
    riemannian_hvp,
)
from .completion import complete, completion_loss, sample_indices
from .formats import LowRankMatrix, TensorRing, TensorTrain, TTMatrix
from .manifolds import FixedRankMatrices, FixedTTRank, TangentVector
from .manifolds.geoopt import GeooptFixedRank, GeooptFixedTTRank
from .optim import OptimizeResult, minimize

__version__ = "0.1.0"

__all__ = [
    "FixedRankMatrices",
    "FixedTTRank",
    "GeooptFixedRank",
    "GeooptFixedTTRank",
    "LowRankMatrix",
    "OptimizeResult",
    "TTMatrix",
    "TangentVector",
    "TensorRing",
    "TensorTrain",
    "complete",
    "completion_loss",
    "manifold_of",
    "minimize",
    "riemannian_grad",
    "riemannian_grad_and_hessian",
    "riemannian_grad_and_hvp",
    "riemannian_hvp",
    "sample_indices",
    "tune_cpu_allocator",
]
