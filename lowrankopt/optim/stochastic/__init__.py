"""Stochastic Riemannian optimizers as ``torch.optim.Optimizer`` s, for ordinary training loops and torch LR schedulers:
:class:`RiemannianSGD`, :class:`RiemannianAdam` and :class:`Riemannion` (Muon-like orthogonalized momentum on the
fixed-rank manifold, from RiemannLoRA, arXiv 2507.12142).

They step a parameter on its manifold when it has one — the packed weights of :class:`~lowrankopt.nn.LowRankLinear`
and :class:`~lowrankopt.nn.TTLinear`, or any ``manifold_parameter`` on a
:class:`~lowrankopt.manifolds.geoopt.GeooptManifold` — and by the Euclidean rule of the same method otherwise, with
weight decay done on the manifold (the point is scaled; orthonormal frames are never shrunk). Same-shape fixed-rank
parameters are stepped with batched kernels. See :class:`RiemannianOptimizer` for the shared behaviour.
"""

from .adam import RiemannianAdam
from .base import RiemannianOptimizer
from .riemannion import Riemannion
from .sgd import RiemannianSGD

__all__ = ["RiemannianAdam", "RiemannianOptimizer", "RiemannianSGD", "Riemannion"]
