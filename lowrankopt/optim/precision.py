"""The floating-point floor: how much of f and of its gradient at a point is rounding noise.

A run that can no longer decrease f has either converged as far as the working precision allows, or stalled
at a point that is not stationary (e.g. ``f = 1e8 + loss``: the loss changes vanish in f's last bits while the
gradient is still exact and large). Which one depends on the gradient, not on f: the run is at the floor when
the Riemannian gradient is as small as its own rounding noise. That noise is *measured*, at the point where it
is needed, by evaluating f and its gradient at a second factorization of the same point (every factor rotated
by a fixed orthogonal matrix: ``U S Vᵀ = (UQ)(QᵀSR)(VR)ᵀ``; TT cores ``G_k → Q_{k-1}ᵀ G_k Q_k``). Both
evaluations are equally valid at this precision, so they differ by the rounding error of the whole computation
of f, the gradient and the frames — whatever f is, without a model of its arithmetic. The comparison
``‖g − P_x g'‖`` (``g'`` transported to x by projection) is a sample of √2 times that noise.

Decisions made from it have wide margins (``FLOOR_RATIO``), so that a run classified as converged on one
machine is not classified as stalled on another whose BLAS rounds differently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..manifolds.base import LowRankManifold
from .objective import Local, Objective

# The gradient is rounding noise when ‖g‖ ≤ FLOOR_RATIO · ‖g − P_x g'‖. For pure noise the ratio is about
# 1/√2; 10 leaves room for the sampling error of one comparison and for a gradient a few times its noise,
# which no method can reduce reliably.
FLOOR_RATIO = 10.0
# f differences below this many ulps of |f| (or the measured noise, if larger) are not trusted.
F_ULPS = 8.0


@dataclass(frozen=True)
class Noise:
    """Rounding noise at one point: ``fun`` of f (an absolute value), ``grad`` of the gradient's norm."""

    fun: float
    grad: float


def eps_of(x: object) -> float:
    """Machine epsilon of the point's dtype (float64 for points without one)."""
    dtype = getattr(x, "dtype", torch.float64)
    return torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps


def f_tolerance(x: object, *values: float, f_noise: float = 0.0) -> float:
    """Differences of f below this are rounding: ``F_ULPS`` ulps of the largest |value|, or 4× the measured noise."""
    return max(F_ULPS * eps_of(x) * max([abs(v) for v in values] + [math.ulp(0.0)]), 4 * f_noise)


def measure_noise(obj: Objective, loc: Local) -> Noise | None:
    """The rounding noise of f and of the Riemannian gradient at ``loc.x`` (a :class:`~.objective.Local`).

    f and its gradient at a second factorization x' give the gradient's noise ``‖g − P_x g'‖``; f at a third
    one x'' too, because two values of f can round to the same number by chance: f's noise is the largest of
    the three differences. Cost: two evaluations of f and one of its gradient (counted in ``obj``'s counters),
    two re-factorizations (``O((m + n) r²)`` / ``O(d n r³)``) and one transport. ``None`` on a manifold that is
    not lowrankopt's, or whose points have one factorization only (:meth:`~lowrankopt.manifolds.LowRankManifold.regauge`
    gives None).
    """
    M = obj.manifold
    if not isinstance(M, LowRankManifold):
        return None
    y, z = M.regauge(loc.x, 1), M.regauge(loc.x, 2)
    if y is None:
        return None
    other, f_z = obj.local(y), obj.value(z)
    if not (other.finite and math.isfinite(f_z)):
        return None
    diff = loc.grad - M.transp(y, loc.x, other.grad)
    f_noise = max(abs(loc.fun - other.fun), abs(loc.fun - f_z), abs(other.fun - f_z))
    return Noise(fun=f_noise, grad=float(M.norm(loc.x, diff)))


def at_floor(loc: Local, noise: Noise | None) -> bool:
    """Whether the gradient at ``loc`` is rounding noise (False when the noise could not be measured)."""
    return noise is not None and loc.grad_norm <= FLOOR_RATIO * noise.grad


class Floor:
    """The floor tests of one run. The noise is measured only when a change of f looks like rounding, so runs
    far from the floor pay nothing; it varies slowly along a run, so the last measurement serves as the
    estimate at later points, and a new one is made only to confirm a stop (or at a point's first doubt).
    Each measurement costs two evaluations of f and one of its gradient (see :func:`measure_noise`)."""

    def __init__(self, obj: Objective) -> None:
        self.obj = obj
        self._point = None  # the Local of the last measurement
        self._noise: Noise | None = None
        self._f_noise = 0.0  # the largest noise of f measured in this run (a conservative estimate later on)
        self._best = math.inf  # the lowest f at the points seen: steps "within rounding" must not creep above it
        self._f_max = self._g_max = 0.0  # the largest |f| and gradient norm seen: the scales rounding is relative to
        self.inconsistent: Noise | None = None  # a measurement far above rounding (f or grad reads the factors)

    def noise(self, loc: Local) -> Noise | None:
        """The noise measured at ``loc`` (measures it unless it was measured there already)."""
        if self._point is not loc:
            self._see(loc)
            noise = measure_noise(self.obj, loc)
            if noise is not None and not self._plausible(loc, noise):
                # Two factorizations of one point disagree by more than any rounding: f (or grad=) depends on the
                # factors, not only on the point. No floor can be claimed; the run's stop will say so.
                self.inconsistent, noise = noise, None
            self._point, self._noise = loc, noise
            if noise is not None:
                self._f_noise = max(self._f_noise, noise.fun)
        return self._noise

    def _plausible(self, loc, noise: Noise) -> bool:
        """Rounding stays below √eps of the largest |f| and gradient norm of the run (it is ~eps of them)."""
        root = math.sqrt(eps_of(loc.x))
        return noise.grad <= root * self._g_max and noise.fun <= root * self._f_max

    @property
    def f_noise(self) -> float:
        """The largest noise of f measured so far in this run (0 before the first measurement)."""
        return self._f_noise

    def _estimate(self, loc) -> Noise | None:
        return self._noise if self._point is not None else self.noise(loc)

    def _see(self, loc) -> None:
        self._best = min(self._best, loc.fun)
        self._f_max = max(self._f_max, abs(loc.fun))
        self._g_max = max(self._g_max, loc.grad_norm)

    def suspect(self, loc: Local, f_new: float, predicted: float) -> bool:
        """Whether the change from ``loc.fun`` to ``f_new`` may be rounding: below √eps relative to |f| and off
        the ``predicted`` decrease (of the local model) by more than half of it. Costs nothing."""
        self._see(loc)
        decrease = loc.fun - f_new
        small = abs(decrease) <= math.sqrt(eps_of(loc.x)) * max(abs(loc.fun), abs(f_new))
        return small and not abs(decrease - predicted) <= 0.5 * abs(predicted)

    def reached(self, loc: Local) -> bool:
        """Whether the gradient at ``loc`` is rounding noise, confirmed by a measurement at ``loc``."""
        estimate = self._estimate(loc)
        if estimate is None or loc.grad_norm > 2 * FLOOR_RATIO * estimate.grad:
            return False
        return at_floor(loc, self.noise(loc))

    def unresolved(self, loc: Local, f_new: float) -> bool:
        """Whether ``loc.fun`` and ``f_new`` are equal up to rounding (and ``f_new`` is not above the lowest f
        of the run by more than rounding: many steps within rounding must not add up to a rise)."""
        self._estimate(loc)
        tol = f_tolerance(loc.x, loc.fun, f_new, f_noise=self.f_noise)
        return abs(loc.fun - f_new) <= tol and not self.rises(loc, f_new)

    def rises(self, loc: Local, f_new: float) -> bool:
        """Whether ``f_new`` is above f at ``loc`` (or the lowest f of the run) by more than rounding."""
        self._see(loc)
        return f_new - self._best > f_tolerance(loc.x, loc.fun, f_new, f_noise=self.f_noise)
