"""Derivative checks: is a gradient (a Hessian) the derivative of f? Taylor residuals along a retraction curve.

Along the curve ``c(t) = R_x(t v)`` (``v`` a tangent vector at x, ``R`` the manifold's retraction)

    f(c(t)) = f(x) + t ⟨grad f(x), v⟩ + t²/2 ⟨v, Hess f(x)[v]⟩ + O(t³)

(the t² term as written needs a second-order retraction, ``c''(0) = 0``; any retraction gives the t term). With a
candidate gradient ``g`` the first-order residual ``E₁(t) = |f(c(t)) − f(x) − t ⟨g, v⟩|`` decays as ``t²`` exactly
when ``⟨g, v⟩`` is the directional derivative, and as ``t`` otherwise; with a candidate Hessian ``H`` the
second-order residual ``E₂(t) = |E₁(t) − t²/2 ⟨v, H v⟩|`` (signed) decays as ``t³`` exactly when ``⟨v, H v⟩`` is
right. :func:`check_gradient` and :func:`check_hessian` sample these residuals over log-spaced steps and fit their
slope in log-log scale (the method of Manopt's ``checkgradient`` / ``checkhessian`` and pymanopt's
``diagnostics``; Boumal, *An introduction to optimization on smooth manifolds*, 2023, §4.8 and §6.8).

**Which slope.** At small t the residual sinks into rounding; at large t higher-order terms (or the manifold's
global shape) take over. The checks therefore fit only *resolved* steps, those with
``E(t) > ROUNDING · max(eps · S(t), noise)``, ``S(t)`` the sum of the magnitudes of the terms subtracted
(``|f(c(t))| + |f(x)| + |t ⟨g, v⟩| + |t²/2 ⟨v, H v⟩|``: their rounding is part of a residual at rounding level),
``eps`` the machine epsilon of f's dtype, ``ROUNDING = 10``, and ``noise`` the rounding of f along the curve
*measured*: the largest residual at ``τ = 0`` and at two steps a thousand times below the smallest (where the
Taylor remainder is far below rounding) — the retraction's own rounding (its QRs and SVDs) moves
f by more than ``eps · |f|``, often ten times more, and a residual within a few times of it gives slopes off by
0.1 and more. Among the windows of ``window`` consecutive resolved steps, the one with
the **smallest steps** among those that follow a power law (the root-mean-square deviation of ``log₁₀ E`` from its
least-squares line at most ``STRAIGHT = 0.05``) is fitted: the smallest steps show the asymptotic order, so a small
error in the derivative (slope 1, resp. 2, at small t) is not hidden by the slope of larger steps. Windows whose
residual is ``CLEAN = 100`` times above rounding are preferred (rounding then moves the slope by less than 0.01);
only where there are none (float32, mostly the Hessian check) are those 10 times above fitted, and the reason says
the slope is rough. If no window is straight, the straightest one is fitted and the reason says so. The verdict is
``slope ≥ expected − slope_tol`` (expected 2, resp. 3; ``slope_tol = 0.1``). A larger slope passes (f may lack the
next Taylor term along the curve).

**Exact models.** If no step is resolved (the residual is at rounding level for every t: f is linear, resp.
quadratic, along the curve), a slope means nothing; the check passes with that reason (as Manopt does).

**Tangency, linearity, symmetry** are relative residuals compared with ``sqrt(eps)`` (1.5e-8 in float64, 3.5e-4 in
float32): a gradient (a Hessian-vector product) must be a tangent vector, and the Hessian must be a linear,
self-adjoint map of the tangent space.

**Conclusive or not.** A slope fitted where the residual is less than ``CLEAN`` times above rounding, or on no
straight window, is rough: the result says ``conclusive=False`` (and "inconclusive" in its summary), and its
verdict only asks ``slope ≥ expected − ROUGH_TOL`` (``ROUGH_TOL = 0.5``), so that a wrong order (a wrong gradient's
slope 1, a Hessian without its curvature term's slope 2) still fails while rounding alone does not fail a correct
derivative. Re-check such cases in float64. f that is not finite on at least ``window`` steps fails.

**What a check can see.** An error ``δ`` in the directional derivative ``⟨g, v⟩`` (``g`` the candidate) shows as
slope 1 only at steps ``t < |δ| / |c₂|`` (``c₂`` the second-order coefficient along the curve), which must lie above
rounding: in float64 relative errors down to about 1e-5 of ``|⟨g, v⟩|`` are caught, 1e-6 usually are not; in
float32 about 1e-2. Likewise for ``⟨v, H v⟩`` one order up. Smaller errors need a higher precision or an exact
comparison.

**float32.** Rounding leaves the gradient check about two decades of steps above rounding, which is enough; the
Hessian's ``t³`` rises above rounding only about one decade before higher-order terms take over, so a float32
Hessian check is always rough (inconclusive, see above): check second derivatives in float64 (the formulas do not
depend on the dtype).

**Steps.** By default 51 steps log-spaced from ``sqrt(eps)`` to 1 (Manopt's 1e-8 to 1 in float64; 3.5e-4 to 1 in
float32, where smaller steps only show rounding) along a unit-norm random tangent vector; a ``direction`` is used
as given (not normalized), so t is in its units.

**Manifolds.** On lowrankopt's manifolds (:class:`~lowrankopt.manifolds.LowRankManifold`) ``grad=None`` /
``hvp=None`` mean autodiff (:func:`~lowrankopt.autodiff.riemannian_grad`,
:func:`~lowrankopt.autodiff.riemannian_grad_and_hessian`), and user derivatives must return
:class:`~lowrankopt.manifolds.TangentVector` objects at x. Any other manifold (as in :func:`~lowrankopt.minimize`)
needs ``retr(x, v)``, ``inner(x, u, v)`` and ``norm(x, v)``, tangent vectors that support ``+`` and scalar ``*``,
and ``grad`` (and ``hvp``) given; random directions come from ``manifold.random_tangent(x, generator)`` if it has
one, else from ``manifold.proj(x, z)`` of a Gaussian ``z`` shaped like x (x a tensor), else ``direction=`` must be
given. Tangency is measured with ``manifold.proj`` where it exists (``‖proj(x, g) − g‖ / ‖g‖``), else not checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .autodiff import check_scalar_output, riemannian_grad, riemannian_grad_and_hessian
from .manifolds.base import LowRankManifold, manifold_of

__all__ = ["GradientCheck", "HessianCheck", "TaylorCheck", "check_gradient", "check_hessian"]

ROUNDING = 10.0  # a residual counts as resolved above ROUNDING · eps · (magnitude of the terms subtracted)
CLEAN = 100.0  # windows this far above rounding are fitted first (the noise biases their slope by < 0.01)
STRAIGHT = 0.05  # a window follows a power law if log10 E deviates from its fitted line by at most this (RMS)
ROUGH_TOL = 0.5  # the slope tolerance where the fit is rough (inconclusive): only a wrong order fails
NUM_STEPS = 51
WINDOW = 10


@dataclass(repr=False, kw_only=True)
class TaylorCheck:
    """What a derivative check found (the common part of :class:`GradientCheck` and :class:`HessianCheck`).

    Attributes:
        ok: the verdict (also the object's truth value).
        reason: why it passed or failed, in words.
        slope: the fitted log-log slope of the Taylor residual (NaN when the model is exact to rounding).
        expected_slope: 2 for the gradient, 3 for the Hessian; ``ok`` needs ``slope ≥ expected_slope − slope_tol``.
        slope_tol: the slope tolerance.
        t: the steps (float64, on the CPU).
        E: the Taylor residual at each step (NaN where f was not finite).
        floor: the rounding level ``ROUNDING · eps · S(t)`` at each step (see the module docstring).
        window: ``(i, j)``: the slope was fitted on ``t[i:j]`` (None when there was no window to fit).
        tangency: relative distance of the checked vector from the tangent space (None when not measurable).
        tol: the tolerance of tangency (and of linearity, symmetry): ``sqrt(eps)``.
        dtype: f's dtype, whose eps sets the tolerances.
        figure: the :class:`matplotlib.figure.Figure` of the residual with ``plot=True``, else None.
        conclusive: False when the slope could only be fitted where the residual is less than ``CLEAN`` times above
            rounding, or on no straight window (float32 Hessian checks, mostly): the verdict then uses the lenient
            ``slope ≥ expected − ROUGH_TOL`` (a missing term's slope 1 below still fails) and should be re-checked in
            float64.
    """

    ok: bool
    reason: str
    slope: float
    expected_slope: float
    slope_tol: float
    t: torch.Tensor
    E: torch.Tensor
    floor: torch.Tensor
    window: tuple[int, int] | None
    tangency: float | None
    tol: float
    dtype: torch.dtype
    figure: Any = None
    conclusive: bool = True

    def __bool__(self) -> bool:
        return self.ok

    def _fields(self) -> list[str]:
        at = "" if self.window is None else f" on t in [{self.t[self.window[0]]:.1e}, {self.t[self.window[1] - 1]:.1e}]"
        tangency = "not checked" if self.tangency is None else f"{self.tangency:.1e}"
        return [
            f"slope={self.slope:.3f} (expected >= {self.expected_slope - self.slope_tol:g}){at}",
            f"tangency={tangency} (tol {self.tol:.1e})",
        ]

    def summary(self) -> str:
        """A readable multi-line summary: verdict, slope and its window, residuals, the reason."""
        verdict = ("ok" if self.ok else "FAILED") + ("" if self.conclusive else ", inconclusive")
        lines = [f"{type(self).__name__}: {verdict} ({self.dtype})"]
        lines += [f"  {line}" for line in self._fields()]
        return "\n".join([*lines, f"  reason: {self.reason}"])

    __repr__ = summary


@dataclass(repr=False, kw_only=True)
class GradientCheck(TaylorCheck):
    """The result of :func:`check_gradient` (see :class:`TaylorCheck` for the attributes); ``tangency`` is that of
    the gradient."""


@dataclass(repr=False, kw_only=True)
class HessianCheck(TaylorCheck):
    """The result of :func:`check_hessian`; ``tangency`` is that of ``H v``, and

    Attributes:
        linearity: ``‖H(a u + b w) − a H u − b H w‖ / (|a| ‖H u‖ + |b| ‖H w‖)`` for random u, w, a, b.
        symmetry: ``|⟨u, H w⟩ − ⟨H u, w⟩| / (‖u‖ ‖H w‖ + ‖H u‖ ‖w‖)``.
    """

    linearity: float = field(default=math.nan)
    symmetry: float = field(default=math.nan)

    def _fields(self) -> list[str]:
        return [
            *super()._fields(),
            f"linearity={self.linearity:.1e}, symmetry={self.symmetry:.1e} (tol {self.tol:.1e})",
        ]


# ---------------------------------------------------------------------------------------------- the manifold side
class _Space:
    """The operations a check needs, for a lowrankopt manifold or any object with retr/inner/norm."""

    def __init__(self, f: object, x: Any, manifold: Any, derivatives_given: bool, what: str) -> None:
        if not callable(f):
            raise TypeError(f"f must be callable, got {type(f).__name__}")
        if manifold is None:
            manifold = manifold_of(x)  # TypeError naming x unless x is a lowrankopt point
        self.M, self.x = manifold, x
        self.ours = isinstance(manifold, LowRankManifold)
        if self.ours:
            manifold.check_point(x)
            return
        missing = [m for m in ("retr", "inner", "norm") if not callable(getattr(manifold, m, None))]
        if missing:
            raise TypeError(
                f"manifold must be a lowrankopt manifold or have retr(x, v), inner(x, u, v) and norm(x, v); "
                f"{manifold!r} has no {', '.join(missing)}"
            )
        if not derivatives_given:
            raise TypeError(
                f"manifold {manifold!r} is not a lowrankopt manifold, so autodiff cannot give the derivatives: "
                f"pass {what}"
            )

    def check_vector(self, v: Any, name: str, like: Any = None) -> None:
        """``v`` is a tangent vector at x the space can work with (lowrankopt: a TangentVector at x of the coordinate
        shapes; elsewhere: something ``inner`` pairs with itself and with the tangent vector ``like`` into finite
        scalars)."""
        if self.ours:
            self.M.check_tangent(self.x, v, name)
            shapes = [tuple(c.shape) for c in v.coords]
            if shapes != [tuple(s) for s in self.M.coord_shapes]:
                raise ValueError(f"{name} has coordinates of shapes {shapes}, expected {list(self.M.coord_shapes)}")
            if not all(bool(torch.isfinite(c).all()) for c in v.coords):
                raise ValueError(f"{name} has NaN or Inf entries")
            return
        if v is None:
            raise TypeError(f"{name} is None: it must return a tangent vector at x")
        try:
            values = [float(self.M.inner(self.x, v, v))]
            if like is not None:
                values.append(float(self.M.inner(self.x, v, like)))
        except Exception as err:  # a wrong shape or type: say which argument, keep the cause
            raise ValueError(f"{name} is not a tangent vector at x that manifold.inner can take: {err}") from err
        if not all(math.isfinite(value) for value in values):
            raise ValueError(f"{name} has NaN or Inf entries, or its inner products overflow")

    def inner(self, u: Any, v: Any) -> float:
        return float(self.M.inner(self.x, u, v))

    def norm(self, v: Any) -> float:
        return float(self.M.norm(self.x, v))

    def retr(self, v: Any) -> Any:
        return self.M.retr(self.x, v)

    def tangency(self, v: Any) -> float | None:
        """``‖v − P_x v‖ / ‖v‖`` (0 for v = 0); None where the space has no projection."""
        if self.ours:
            coords = [c.detach() for c in v.coords]
            off = [c - p for c, p in zip(coords, self.M.gauge(self.x, coords))]
            num = math.sqrt(sum(float((c * c).sum()) for c in off))
            den = math.sqrt(sum(float((c * c).sum()) for c in coords))
        elif callable(getattr(self.M, "proj", None)):
            p = self.M.proj(self.x, v)
            num, den = self.norm(v - p), self.norm(v)
        else:
            return None
        return num / den if den > 0 else 0.0

    def sampler(self) -> Callable[[torch.Generator | None], Any] | None:
        """Draws a unit-norm tangent vector at x from a generator; None where the space cannot."""
        if self.ours:
            return lambda gen: self.M.random_tangent(self.x, gen)
        if callable(getattr(self.M, "random_tangent", None)):
            draw = lambda gen: self.M.random_tangent(self.x, gen)  # noqa: E731
        elif callable(getattr(self.M, "proj", None)) and isinstance(self.x, torch.Tensor):
            x = self.x

            def draw(gen):
                z = torch.randn(x.shape, dtype=x.dtype, generator=gen, device=x.device if gen is None else gen.device)
                return self.M.proj(x, z.to(x.device))
        else:
            return None
        return lambda gen: self._unit(draw(gen), "manifold's random tangent vector")

    def _unit(self, v: Any, name: str) -> Any:
        n = self.norm(v)
        if not n > 0:
            raise ValueError(f"the {name} has norm {n}")
        return v * (1.0 / n)


# ---------------------------------------------------------------------------------------------- the slope
def _fit(lt: torch.Tensor, le: torch.Tensor) -> tuple[float, float, float]:
    """Least-squares line of ``le`` against ``lt``: ``(slope, intercept, RMS deviation)``."""
    mt, me = lt.mean(), le.mean()
    slope = float(((lt - mt) * (le - me)).sum() / ((lt - mt) ** 2).sum())
    intercept = float(me - slope * mt)
    rms = float(((le - (intercept + slope * lt)) ** 2).mean().sqrt())
    return slope, intercept, rms


def _power_law(t: torch.Tensor, E: torch.Tensor, eps_S: torch.Tensor, window: int):
    """``(i, j, slope, straight, clean)`` of the fitted window (module docstring: the smallest-step window among the
    straight ones, else the straightest; windows resolved ``CLEAN`` times above rounding first), or None if no
    ``window`` consecutive steps are resolved."""
    lt, le = t.log10(), E.clamp_min(1e-300).log10()
    for level in (CLEAN, ROUNDING):
        resolved = torch.isfinite(E) & (E > level * eps_S)
        fits = []
        for i in range(len(t) - window + 1):
            if bool(resolved[i : i + window].all()):
                slope, _, rms = _fit(lt[i : i + window], le[i : i + window])
                fits.append((i, slope, rms))
        straight = [f for f in fits if f[2] <= STRAIGHT]
        if straight or (fits and level == ROUNDING):
            i, slope, _ = straight[0] if straight else min(fits, key=lambda f: f[2])
            return i, i + window, slope, bool(straight), level == CLEAN
    return None


def _steps(steps: Sequence[float] | torch.Tensor | None, eps: float) -> torch.Tensor:
    if steps is None:
        return torch.logspace(0.5 * math.log10(eps), 0.0, NUM_STEPS, dtype=torch.float64)
    t = torch.as_tensor(steps, dtype=torch.float64).flatten().cpu()
    if t.numel() < 2 or not bool((t > 0).all()) or not bool(torch.isfinite(t).all()):
        raise ValueError("steps must be at least two positive finite step sizes")
    return t.sort().values


def _residuals(space: _Space, f: Callable, f0: float, v: Any, t: torch.Tensor, terms: Callable[[float], list[float]]):
    """``(E, S)``: the Taylor residual ``|f(R_x(t v)) − f(x) − Σ terms(t)|`` and the sum of the magnitudes of the
    terms it subtracts."""
    E = torch.full_like(t, math.nan)
    S = torch.zeros_like(t)
    for k, tk in enumerate(t.tolist()):
        with torch.no_grad():
            fk = float(check_scalar_output(f(space.retr(v * tk))))
        model = terms(tk)
        E[k] = abs(fk - f0 - sum(model))
        S[k] = abs(fk) + abs(f0) + sum(abs(m) for m in model) if math.isfinite(fk) else math.nan
    return E, S


def _noise(space: _Space, f: Callable, f0: float, v: Any, t: torch.Tensor, terms: Callable) -> float:
    """The rounding of f along the curve, measured: the largest residual ``|f(R_x(τ v)) − f(x) − Σ terms(τ)|`` over
    ``τ = 0`` and two steps a thousand times below the smallest ``t`` (three evaluations of f and retractions)."""
    E, _ = _residuals(space, f, f0, v, torch.tensor([0.0, 1e-3, 2e-3], dtype=torch.float64) * float(t.min()), terms)
    E = E[torch.isfinite(E)]
    return float(E.max()) if E.numel() else 0.0


def _verdict(
    t, E, floor, window: int, expected: float, slope_tol: float, order: str, explain: Callable, hint: str, rough=""
):
    """``(slope_ok, slope, window, reason, conclusive)`` of the residual; ``hint`` is added where the slope is
    unsure; ``rough`` (a reason) makes every fit rough."""
    finite = torch.isfinite(E)
    if int(finite.sum()) < window:
        reason = (
            f"f is not finite along the curve: only {int(finite.sum())} of {len(t)} steps give a finite value "
            f"(fewer than window={window})"
        )
        return False, math.nan, None, reason, False
    if not bool((finite & (E > floor)).any()):
        reason = (
            f"the residual is at rounding level for every step: the {order} model is exact along this curve "
            f"(f is a polynomial of degree <= {int(expected) - 1} along it), so the slope means nothing"
        )
        return True, math.nan, None, reason, True
    fit = _power_law(t, E, floor / ROUNDING, window)
    if fit is None:
        reason = (
            f"inconclusive: fewer than window={window} consecutive steps have a residual above rounding; "
            f"try another point, direction or steps{hint}"
        )
        return False, math.nan, None, reason, False
    i, j, slope, straight, clean = fit
    where = f"on t in [{t[i]:.1e}, {t[j - 1]:.1e}]"
    conclusive = straight and clean and not rough
    shape = "" if clean else f" (less than {CLEAN:g} eps above rounding: the slope is rough{hint})"
    if rough and clean:
        shape = f" ({rough}: the slope is rough{hint})"
    if not straight:
        shape = f" (no window follows a clean power law: the straightest one is fitted, the verdict is unsure{hint})"
    tol = slope_tol if conclusive else max(slope_tol, ROUGH_TOL)
    if slope >= expected - tol:
        reason = f"the residual decays as t^{slope:.2f} {where} (expected {expected:g}){shape}"
        return True, slope, (i, j), reason, conclusive
    reason = f"the residual decays as t^{slope:.2f} {where}, not t^{expected:g}{shape}"
    if straight:
        reason += f": {explain(slope, t[i].item(), E[i].item())}"
    return False, slope, (i, j), reason, conclusive


def _draw(space: _Space, generator: torch.Generator | None, direction: Any, count: int) -> list:
    """``direction`` (if given) or a random one, then ``count − 1`` more random directions (None where the space
    cannot draw them)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    draw = space.sampler()
    if direction is None:
        if draw is None:
            raise TypeError(
                f"manifold {space.M!r} has neither random_tangent(x, generator) nor proj(x, z) (with x a tensor): "
                "pass direction= (a tangent vector at x)"
            )
        direction = draw(generator)
    else:
        space.check_vector(direction, "direction")
    return [direction] + [None if draw is None else draw(generator) for _ in range(count - 1)]


def _value(f: Callable, x: Any) -> tuple[float, torch.dtype]:
    with torch.no_grad():
        val = check_scalar_output(f(x))
    if val.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"f must return a float32 or float64 scalar, got {val.dtype}")
    f0 = float(val)
    if not math.isfinite(f0):
        raise ValueError(f"f(x) is {f0}: the checks need a finite value at x")
    return f0, val.dtype


def _callable_or_none(name: str, fn: object) -> None:
    if fn is not None and not callable(fn):
        raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")


def _options(window: int, slope_tol: float, t: torch.Tensor) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 3:
        raise ValueError(f"window must be an int >= 3, got {window!r}")
    if window > len(t):
        raise ValueError(f"window={window} is larger than the number of steps ({len(t)}): pass more steps")
    if not (isinstance(slope_tol, (int, float)) and 0 <= slope_tol < 1):
        raise ValueError(f"slope_tol must be a number in [0, 1), got {slope_tol!r}")


# ---------------------------------------------------------------------------------------------- the checks
def check_gradient(
    f: Callable[[Any], torch.Tensor],
    x: Any,
    grad: Callable[[Any], Any] | None = None,
    *,
    manifold: Any = None,
    direction: Any = None,
    generator: torch.Generator | None = None,
    steps: Sequence[float] | torch.Tensor | None = None,
    window: int = WINDOW,
    slope_tol: float = 0.1,
    plot: bool = False,
) -> GradientCheck:
    """Check that ``grad`` is the Riemannian gradient of ``f`` at ``x``: the first-order Taylor residual
    ``E(t) = |f(R_x(t v)) − f(x) − t ⟨grad(x), v⟩|`` must decay as ``t²``, and ``grad(x)`` must be tangent.

    The slope is fitted on the smallest steps whose residual is above rounding and follows a power law; the check
    passes if it is at least ``2 − slope_tol``, or if the residual is at rounding level for every step (f linear
    along the curve), and the gradient's distance from the tangent space is at most ``sqrt(eps)`` relative (see
    :mod:`lowrankopt.diagnostics` for the rules and the steps).

    Args:
        f: the scalar function (as for :func:`~lowrankopt.minimize`).
        x: the point.
        grad: ``grad(x)`` returns the Riemannian gradient (a TangentVector at x on lowrankopt's manifolds); None:
            lowrankopt autodiff (:func:`~lowrankopt.autodiff.riemannian_grad`; lowrankopt's manifolds only).
        manifold: the manifold (default: inferred from x, for lowrankopt points); any other manifold needs
            ``retr``, ``inner``, ``norm`` and ``grad`` (see the module docstring).
        direction: the tangent vector v at x (used as given); default a unit-norm random one.
        generator: the ``torch.Generator`` the random direction is drawn from (reproducible checks).
        steps: the step sizes t (default 51 log-spaced from ``sqrt(eps)`` to 1).
        window: how many consecutive steps the slope is fitted on.
        slope_tol: the slope may fall this far below 2.
        plot: draw the residual in log-log scale with the reference slope (needs matplotlib), in ``.figure``.

    Returns:
        A :class:`GradientCheck` (truthy when ok; printing it shows a summary).

    Cost: one gradient, and ``len(steps) + 4`` evaluations of f and ``len(steps) + 3`` retractions.
    """
    _callable_or_none("grad", grad)
    space = _Space(f, x, manifold, grad is not None, "grad=")
    f0, dtype = _value(f, x)
    (v,) = _draw(space, generator, direction, 1)
    g = riemannian_grad(f, x, manifold=space.M)[1] if grad is None else grad(x)
    space.check_vector(g, "grad(x)", v)
    d = space.inner(g, v)

    def explain(slope: float, t0: float, e0: float) -> str:
        if slope < 1.5:
            return (
                f"grad is not the gradient of f: <grad(x), v> = {d:.6g} misses the directional derivative by about "
                f"{e0 / t0:.2g}"
            )
        return "grad is close to the gradient of f but not equal to it (or f is not smooth along the curve)"

    fields = _taylor(space, f, f0, v, dtype, steps, window, slope_tol, [d], "first-order", explain)
    _tangency(space, g, "grad(x)", fields)
    return _result(GradientCheck, "Gradient check", plot, fields)


def check_hessian(
    f: Callable[[Any], torch.Tensor],
    x: Any,
    hvp: Callable[[Any, Any], Any] | None = None,
    *,
    grad: Callable[[Any], Any] | None = None,
    manifold: Any = None,
    direction: Any = None,
    generator: torch.Generator | None = None,
    steps: Sequence[float] | torch.Tensor | None = None,
    window: int = WINDOW,
    slope_tol: float = 0.1,
    plot: bool = False,
) -> HessianCheck:
    """Check that ``hvp`` applies the Riemannian Hessian of ``f`` at ``x``: the second-order Taylor residual
    ``E(t) = |f(R_x(t v)) − f(x) − t ⟨g, v⟩ − t²/2 ⟨v, H v⟩|`` must decay as ``t³``, and H must map tangent vectors
    to tangent vectors, linearly and self-adjointly.

    The t³ decay holds when the retraction is second order (``R_x(t v)`` has no acceleration at t = 0), as the
    retractions of :class:`~lowrankopt.FixedRankMatrices` (the metric projection) and :class:`~lowrankopt.FixedTTRank`
    (TT-SVD rounding) are, or at a critical point of f. With a first-order retraction a correct Hessian can show
    slope 2 (Manopt notes the same). A gradient that is wrong shows slope 1: check it first with
    :func:`check_gradient`. Tolerances: slope at least ``3 − slope_tol``; tangency of ``H v``, linearity and symmetry
    at most ``sqrt(eps)`` relative (see :mod:`lowrankopt.diagnostics`).

    Args:
        f: the scalar function.
        x: the point.
        hvp: ``hvp(x, v)`` returns the Riemannian Hessian at x applied to the tangent vector v; None: lowrankopt
            autodiff (:func:`~lowrankopt.autodiff.riemannian_grad_and_hessian`, with the curvature term).
        grad: ``grad(x)``, the gradient in the model; None: lowrankopt autodiff.
        manifold: as in :func:`check_gradient`.
        direction: the tangent vector v of the Taylor residual, as in :func:`check_gradient`. The linearity and
            symmetry checks use two more random tangent vectors u, w (where the manifold cannot draw them: u = v and
            w = H v / ‖H v‖) and random coefficients.
        generator: the ``torch.Generator`` all random directions and coefficients are drawn from.
        steps: as in :func:`check_gradient`.
        window: as in :func:`check_gradient`.
        plot: as in :func:`check_gradient` (reference slope 3).
        slope_tol: the slope may fall this far below 3.

    Returns:
        A :class:`HessianCheck`.

    Cost: one gradient, four Hessian-vector products, ``len(steps) + 4`` evaluations of f and ``len(steps) + 3``
    retractions.
    """
    _callable_or_none("hvp", hvp)
    _callable_or_none("grad", grad)
    space = _Space(f, x, manifold, grad is not None and hvp is not None, "grad= and hvp=")
    f0, dtype = _value(f, x)
    v, u, w = _draw(space, generator, direction, 3)
    if hvp is None:
        _, g_ad, hess = riemannian_grad_and_hessian(f, x, manifold=space.M)
        g = g_ad if grad is None else grad(x)
    else:
        g = riemannian_grad(f, x, manifold=space.M)[1] if grad is None else grad(x)
        hess = lambda vec: hvp(x, vec)  # noqa: E731
    space.check_vector(g, "grad(x)", v)

    def H(vec: Any) -> Any:
        out = hess(vec)
        space.check_vector(out, "hvp(x, v)", vec)
        return out

    Hv = H(v)
    d, q = space.inner(g, v), space.inner(v, Hv)
    if u is None:  # the manifold cannot draw: v and the (normalized) H v span the pair
        u, n = v, space.norm(Hv)
        w = Hv * (1.0 / n) if n > 0 else v
    gen_scalars = torch.randn(2, dtype=torch.float64, generator=generator, device=_gen_device(generator)).tolist()
    a, b = gen_scalars
    Hu, Hw = H(u), H(w)
    Hab = H(u * a + w * b)
    lin_den = abs(a) * space.norm(Hu) + abs(b) * space.norm(Hw)
    linearity = space.norm(Hab - (Hu * a + Hw * b)) / lin_den if lin_den > 0 else 0.0
    sym_den = space.norm(u) * space.norm(Hw) + space.norm(Hu) * space.norm(w)
    symmetry = abs(space.inner(u, Hw) - space.inner(Hu, w)) / sym_den if sym_den > 0 else 0.0

    def explain(slope: float, t0: float, e0: float) -> str:
        if slope < 1.5:
            return "the gradient in the model is wrong (run check_gradient)"
        return (
            f"<v, H v> = {q:.6g} misses the second derivative along the curve by about {2 * e0 / t0**2:.2g} "
            "(a wrong Hessian, a Hessian without the curvature term away from a critical point, or a retraction "
            "that is not second order)"
        )

    # in float32 t³ rises above rounding for about one decade before higher-order terms take over: always rough
    rough = "float32: the t³ term is resolved over about one decade of steps" if dtype == torch.float32 else ""
    fields = _taylor(space, f, f0, v, dtype, steps, window, slope_tol, [d, q], "second-order", explain, rough)
    _tangency(space, Hv, "hvp(x, v)", fields)
    for what, value in (("linear in v", linearity), ("symmetric", symmetry)):
        if value > fields["tol"]:
            fields["ok"] = False
            fields["reason"] += f"; hvp is not {what}: relative residual {value:.1e} > {fields['tol']:.1e}"
    return _result(HessianCheck, "Hessian check", plot, fields, linearity=linearity, symmetry=symmetry)


def _taylor(space, f, f0, v, dtype, steps, window, slope_tol, derivatives, order, explain, rough="") -> dict:
    """The Taylor residual of the model ``f(x) + Σ_k t^k/k! · derivatives[k−1]`` along ``R_x(t v)``, its floor and
    the slope verdict (the expected slope is ``len(derivatives) + 1``), as the fields of a :class:`TaylorCheck`."""
    eps = torch.finfo(dtype).eps
    t = _steps(steps, eps)
    _options(window, slope_tol, t)

    def model(tk: float) -> list[float]:
        return [tk**k / math.factorial(k) * dk for k, dk in enumerate(derivatives, 1)]

    E, S = _residuals(space, f, f0, v, t, model)
    floor = ROUNDING * torch.clamp(eps * S, min=_noise(space, f, f0, v, t, model))
    expected = float(len(derivatives) + 1)
    ok, slope, win, reason, conclusive = _verdict(
        t, E, floor, window, expected, slope_tol, order, explain, _hint(dtype), rough
    )
    return dict(
        ok=ok,
        reason=reason,
        slope=slope,
        expected_slope=expected,
        slope_tol=float(slope_tol),
        t=t,
        E=E,
        floor=floor,
        window=win,
        tol=math.sqrt(eps),
        dtype=dtype,
        conclusive=conclusive,
    )


def _tangency(space: _Space, vec: Any, name: str, fields: dict) -> None:
    """Add ``vec``'s tangency (relative distance from the tangent space) to ``fields``; fail beyond ``tol``."""
    fields["tangency"] = tangency = space.tangency(vec)
    if tangency is None:
        fields["reason"] += "; tangency not checked (the manifold has no proj)"
    elif tangency > fields["tol"]:
        fields["ok"] = False
        fields["reason"] += f"; {name} is not a tangent vector: relative distance {tangency:.1e} > {fields['tol']:.1e}"


def _result(cls: type, title: str, plot: bool, fields: dict, **extra: Any) -> Any:
    res = cls(**fields, **extra)
    if plot:
        res.figure = _plot(res, title)
    return res


def _hint(dtype: torch.dtype) -> str:
    return "; float32 leaves a short range of steps above rounding: check in float64" if dtype == torch.float32 else ""


def _gen_device(generator: torch.Generator | None) -> torch.device | None:
    return None if generator is None else generator.device


# ---------------------------------------------------------------------------------------------- the plot
def _plot(res: TaylorCheck, title: str) -> Any:
    """A log-log figure of the residual, the rounding floor, the fitted window and a reference line of the expected
    slope (matplotlib's object API: no pyplot, no display)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plot=True needs matplotlib: pip install matplotlib") from err
    t, E, floor = res.t, res.E, res.floor
    fig = Figure(figsize=(6.0, 4.2))
    ax = fig.add_subplot()
    shown = torch.isfinite(E) & (E > 0)
    ax.loglog(t[shown].numpy(), E[shown].numpy(), ".-", label="Taylor residual E(t)")
    ok_floor = torch.isfinite(floor) & (floor > 0)
    ax.loglog(t[ok_floor].numpy(), floor[ok_floor].numpy(), ":", color="gray", label="rounding level")
    p = res.expected_slope
    if res.window is not None:
        i, j = res.window
        ax.loglog(t[i:j].numpy(), E[i:j].numpy(), "-", linewidth=4, alpha=0.5, label=f"fit: slope {res.slope:.2f}")
        anchor_t, anchor_E = float(t[i]), float(E[i])
    else:
        k = len(t) // 2
        anchor_t, anchor_E = float(t[k]), float(floor[k]) if bool(ok_floor[k]) else 1.0
    ax.loglog(t.numpy(), (anchor_E * (t / anchor_t) ** p).numpy(), "--", color="k", label=f"slope {p:g}")
    ax.set_xlabel("step t")
    ax.set_ylabel("residual")
    ax.set_title(f"{title}: {'ok' if res.ok else 'FAILED'}")
    if shown.any():
        lo = float(E[shown].min())
        ax.set_ylim(lo / 10, float(E[shown].max()) * 10)
    ax.legend(loc="best", fontsize="small")
    return fig
