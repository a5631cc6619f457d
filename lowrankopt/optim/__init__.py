"""Riemannian optimizers: :func:`minimize` with steepest descent, nonlinear CG and trust-region."""

from .minimize import METHODS, minimize
from .result import OptimizeResult

__all__ = ["METHODS", "OptimizeResult", "minimize"]
