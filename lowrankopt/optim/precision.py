"""The floating-point floor: how much of f and of its gradient at a point is rounding noise.

A run that can no longer decrease f has either converged as far as the working precision allows, or stalled
at a point that is not stationary (e.g. ``f = 1e8 + loss``: the loss changes vanish in f's last bits while the
gradient is still exact and large). Which one depends on the gradient, not on f: the run is at the floor when
the Riemannian gradient is as small as its own rounding noise. That noise is *measured*, at the point where it
is needed, by evaluating f and its gradient at a second factorization of the same point (every factor rotated
by a fixed orthogonal matrix: ``U S Vᵀ = (UQ)(QᵀSR)(VR)ᵀ``; TT cores ``G_k → Q_{k-1}ᵀ G_k Q_k``). Both
evaluations are equally valid at this precision, so they differ by the rounding error of the whole computation
of f, the gradient and the frames — whatever f is, without a model of its arithmetic. The comparison
``‖g − P_x g'‖`` (``g'`` transported to x by projection) is a sample of twice that noise.

Decisions made from it have wide margins (``FLOOR_RATIO``), so that a run classified as converged on one
machine is not classified as stalled on another whose BLAS rounds differently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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


def eps_of(x) -> float:
    """Machine epsilon of the point's dtype (float64 for points without one)."""
    dtype = getattr(x, "dtype", torch.float64)
    return torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps


def f_tolerance(x, *values: float, f_noise: float = 0.0) -> float:
    """Differences of f below this are rounding: ``F_ULPS`` ulps of the largest |value|, or 4× the measured noise."""
    return max(F_ULPS * eps_of(x) * max([abs(v) for v in values] + [math.ulp(0.0)]), 4 * f_noise)


def _rotation(r: int, dtype, device, seed: int) -> torch.Tensor:
    """A fixed orthogonal ``r × r`` matrix (QR of a seeded Gaussian in float64): deterministic everywhere."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(r, r, dtype=torch.float64, generator=g))
    return Q.to(dtype=dtype, device=device)


def equivalent_point(x, seed: int = 1):
    """Another factorization of the same matrix / tensor train (``None`` for other point types); ``seed``
    picks the rotations.

    Cost ``O((m + n) r²)`` for a LowRankMatrix, ``O(d n r³)`` for a TensorTrain.
    """
    from ..formats.lowrank import LowRankMatrix
    from ..formats.tt import TensorTrain

    with torch.no_grad():
        if type(x) is LowRankMatrix:
            Q, R = (_rotation(x.rank, x.dtype, x.device, 2 * seed + k) for k in (0, 1))
            return LowRankMatrix(x.U @ Q, Q.T @ x.S @ R, x.V @ R)
        if type(x) is TensorTrain:
            cores = [c.detach() for c in x.cores]
            for k in range(len(cores) - 1):
                Q = _rotation(cores[k].shape[-1], x.dtype, x.device, 1000 * seed + k)
                cores[k] = torch.tensordot(cores[k], Q, dims=1)
                cores[k + 1] = torch.tensordot(Q.T, cores[k + 1], dims=1)
            return TensorTrain(cores)
    return None


def measure_noise(obj, loc) -> Noise | None:
    """The rounding noise of f and of the Riemannian gradient at ``loc.x`` (a :class:`~.objective.Local`).

    f and its gradient at a second factorization x' give the gradient's noise ``‖g − P_x g'‖``; f at a third
    one x'' too, because two values of f can round to the same number by chance: f's noise is the largest of
    the three differences. Cost: one evaluation of f and its gradient and one of f (counted in ``obj``'s
    counters), one transport. ``None`` when the points have no second factorization (a user's manifold).
    """
    M = obj.manifold
    y, z = equivalent_point(loc.x, 1), equivalent_point(loc.x, 2)
    if y is None or not hasattr(M, "transp"):
        return None
    other, f_z = obj.local(y), obj.value(z)
    if not (other.finite and math.isfinite(f_z)):
        return None
    diff = loc.grad - M.transp(y, loc.x, other.grad)
    f_noise = max(abs(loc.fun - other.fun), abs(loc.fun - f_z), abs(other.fun - f_z))
    return Noise(fun=f_noise, grad=float(M.norm(loc.x, diff)))


def at_floor(loc, noise: Noise | None) -> bool:
    """Whether the gradient at ``loc`` is rounding noise (False when the noise could not be measured)."""
    return noise is not None and loc.grad_norm <= FLOOR_RATIO * noise.grad


class Floor:
    """The floor tests of one run. The noise is measured only when a change of f looks like rounding, so runs
    far from the floor pay nothing; it varies slowly along a run, so the last measurement serves as the
    estimate at later points, and a new one is made only to confirm a stop (or at a point's first doubt).
    Each measurement costs one evaluation of f and its gradient."""

    def __init__(self, obj):
        self.obj = obj
        self._point = None  # the Local of the last measurement
        self._noise: Noise | None = None
        self._f_noise = 0.0  # the largest noise of f measured in this run (a conservative estimate later on)
        self._best = math.inf  # the lowest f at the points seen: steps "within rounding" must not creep above it

    def noise(self, loc) -> Noise | None:
        """The noise measured at ``loc`` (measures it unless it was measured there already)."""
        if self._point is not loc:
            self._point, self._noise = loc, measure_noise(self.obj, loc)
            if self._noise is not None:
                self._f_noise = max(self._f_noise, self._noise.fun)
        return self._noise

    @property
    def f_noise(self) -> float:
        """The largest noise of f measured so far in this run (0 before the first measurement)."""
        return self._f_noise

    def _estimate(self, loc) -> Noise | None:
        return self._noise if self._point is not None else self.noise(loc)

    def _see(self, loc) -> None:
        self._best = min(self._best, loc.fun)

    def suspect(self, loc, f_new: float, predicted: float) -> bool:
        """Whether the change from ``loc.fun`` to ``f_new`` may be rounding: below √eps relative to |f| and off
        the ``predicted`` decrease (of the local model) by more than half of it. Costs nothing."""
        self._see(loc)
        decrease = loc.fun - f_new
        small = abs(decrease) <= math.sqrt(eps_of(loc.x)) * max(abs(loc.fun), abs(f_new))
        return small and not abs(decrease - predicted) <= 0.5 * abs(predicted)

    def reached(self, loc) -> bool:
        """Whether the gradient at ``loc`` is rounding noise, confirmed by a measurement at ``loc``."""
        estimate = self._estimate(loc)
        if estimate is None or loc.grad_norm > 2 * FLOOR_RATIO * estimate.grad:
            return False
        return at_floor(loc, self.noise(loc))

    def unresolved(self, loc, f_new: float) -> bool:
        """Whether ``loc.fun`` and ``f_new`` are equal up to rounding (and ``f_new`` is not above the lowest f
        of the run by more than rounding: many steps within rounding must not add up to a rise)."""
        self._estimate(loc)
        tol = f_tolerance(loc.x, loc.fun, f_new, f_noise=self.f_noise)
        return abs(loc.fun - f_new) <= tol and not self.rises(loc, f_new)

    def rises(self, loc, f_new: float) -> bool:
        """Whether ``f_new`` is above f at ``loc`` (or the lowest f of the run) by more than rounding."""
        self._see(loc)
        return f_new - self._best > f_tolerance(loc.x, loc.fun, f_new, f_noise=self.f_noise)
