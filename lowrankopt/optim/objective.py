"""The function being minimized, with counted evaluations of f, its gradient and Hessian products."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..autodiff import (
    check_scalar_output,
    has_chart_hessian_form,
    riemannian_grad,
    riemannian_grad_and_hessian,
    riemannian_hessian_form,
)
from ..manifolds.base import LowRankManifold


@dataclass
class Local:
    """What the optimizers know at one point: ``f(x)``, the Riemannian gradient, its norm and (when
    asked for) ``hess(v)``, the Riemannian Hessian at x applied to tangent vectors."""

    x: object
    fun: float
    grad: object
    grad_norm: float
    hess: Callable | None = None

    @property
    def finite(self) -> bool:
        return math.isfinite(self.fun) and math.isfinite(self.grad_norm)


class Objective:
    """``f`` on ``manifold`` with counters ``nfev``, ``ngev``, ``nhev``.

    On lowrankopt manifolds the gradient and Hessian products come from autodiff (the δ-trick) unless
    ``grad`` / ``hvp`` are given. On any other manifold (an object with ``retr``, ``transp``, ``inner``,
    ``norm`` and ``dim`` whose tangent vectors support ``+``, ``-`` and scalar ``*``) they must be given:
    ``grad(x)`` returns the Riemannian gradient and ``hvp(x, v)`` the Riemannian Hessian applied to v.
    """

    def __init__(
        self,
        f: Callable[[Any], torch.Tensor],
        manifold: Any,
        *,
        grad: Callable[[Any], Any] | None = None,
        hvp: Callable[[Any, Any], Any] | None = None,
        curvature: bool = True,
    ) -> None:
        if not callable(f):
            raise TypeError(f"f must be callable, got {type(f).__name__}")
        for name, fn in (("grad", grad), ("hvp", hvp)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
        autodiff = isinstance(manifold, LowRankManifold)
        if grad is None and not autodiff:
            raise TypeError(
                f"manifold {manifold!r} is not a lowrankopt manifold, so autodiff cannot give the gradient: "
                "pass grad= (and hvp= for the trust-region method and model steps)"
            )
        self.f, self.manifold, self.curvature = f, manifold, curvature
        self._grad, self._hvp = grad, hvp
        self.has_hessian = hvp is not None or (autodiff and grad is None)
        # ⟨v, Hess f(x)[v]⟩ from a chart curve through x (no Hessian tape at x): autodiff on fixed-rank matrices
        self.form_without_tape = autodiff and grad is None and hvp is None and has_chart_hessian_form(manifold)
        self.nfev = self.ngev = self.nhev = 0

    def value(self, x: Any) -> float:
        """``f(x)`` as a float, without building an autograd tape."""
        self.nfev += 1
        with torch.no_grad():
            return float(check_scalar_output(self.f(x)))

    def local(self, x: Any, *, hessian: bool = False) -> Local:
        """Value and Riemannian gradient at x, and the Hessian operator at x if ``hessian``."""
        hess = None
        if self._grad is not None:
            # the gradient first: a grad that evaluates f in its own pass (the sharded objective of
            # lowrankopt.distributed) keeps the value, and the f that follows returns it without a second pass
            g = self._grad(x)
            fun = self.value(x)
        elif hessian and self._hvp is None:
            self.nfev += 1
            val, g, h = riemannian_grad_and_hessian(self.f, x, curvature=self.curvature, manifold=self.manifold)
            fun, hess = float(val), self._counted(h)
        else:
            self.nfev += 1
            val, g = riemannian_grad(self.f, x, manifold=self.manifold)
            fun = float(val)
        if hessian and self._hvp is not None:
            hess = self._counted(lambda v: self._hvp(x, v))
        self.ngev += 1
        return Local(x, fun, g, float(self.manifold.norm(x, g)), hess)

    def hessian_form(self, loc: Local, v: Any) -> float:
        """``⟨v, Hess f(x)[v]⟩`` at ``loc.x`` (counted in ``nhev``): from ``loc.hess`` when the point was evaluated
        with ``hessian=True``, else (:attr:`form_without_tape`) from the second derivative of f along a chart
        curve (:func:`~lowrankopt.autodiff.riemannian_hessian_form`), which needs no Hessian tape at x."""
        if loc.hess is not None:
            return float(self.manifold.inner(loc.x, v, loc.hess(v)))
        self.nhev += 1
        val = riemannian_hessian_form(self.f, loc.x, v, grad=loc.grad, curvature=self.curvature, manifold=self.manifold)
        return float(val)

    def _counted(self, h: Callable) -> Callable:
        def hess(v):
            self.nhev += 1
            return h(v)

        return hess
