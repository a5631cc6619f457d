"""Riemannian optimizers: :func:`minimize` with steepest descent, nonlinear CG and trust-region, and the stochastic
``torch.optim`` optimizers :class:`RiemannianSGD`, :class:`RiemannianAdam` and :class:`Riemannion` for training."""

from .minimize import METHODS, minimize
from .result import OptimizeResult
from .stochastic import RiemannianAdam, RiemannianSGD, Riemannion

__all__ = ["METHODS", "OptimizeResult", "RiemannianAdam", "RiemannianSGD", "Riemannion", "minimize"]
