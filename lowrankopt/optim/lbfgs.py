"""Riemannian limited-memory BFGS with a strong-Wolfe line search along the retraction.

Direction: ``p = −H g`` with H the L-BFGS inverse-Hessian approximation of the two-loop recursion (Nocedal &
Wright, Algorithm 7.4; on manifolds Huang, Gallivan & Absil 2015 and Manopt's ``rlbfgs``), built from the last
``memory`` pairs ``s_i = T(α_i p_i)`` (the accepted step, transported to its end point) and
``y_i = grad f(x_{i+1}) − T grad f(x_i)``, with ``H₀ = γ I``, ``γ = ⟨s, y⟩ / ⟨y, y⟩`` of the newest pair.

Transport: every pair is held in the tangent space of the current point. After each accepted step the stored
``s_i`` and ``y_i`` are transported to the new point with the manifold's ``transp`` (projection onto the new
tangent space on lowrankopt's manifolds). ``ρ_i = 1/⟨s_i, y_i⟩`` is computed once, where the pair is formed (there
the secant equation ``H y = s`` holds), and kept, as in Manopt and Huang et al.: the two-loop operator is positive
definite for any ρ_i > 0 (each BFGS update ``Vᵀ H V + ρ s sᵀ``, ``V = I − ρ y sᵀ``, is), although projection
transport, which is not isometric, changes ``⟨s_i, y_i⟩``. Recomputing ρ from the transported pairs (dropping
those whose curvature vanished) was measured too: on TT completion (d = 10, n = 20, r = 4, two data sets) it took
208 and 313 iterations against 174 and 211 with ρ kept. Cost: ``2·memory`` transports per iteration
(2·(memory − 1) for the old pairs, one for the gradient and one for the direction, which the line search has
already made), and about ``4·memory`` inner products and linear combinations of tangent vectors in the two-loop
recursion. Storage: ``2·memory`` tangent vectors. (The alternative of keeping each pair at its own point and
carrying it through the chain of transports when used costs more transports, not fewer.) On tensor trains a
transport (a projection: one backward pass through the tangent-space parametrization) took 3.5 ms against 26 ms
for the gradient of a completion loss (d = 10, n = 20, r = 4, 32 000 samples): with ``memory = 10`` the
transports take about twice as long as the gradient.

Curvature condition (cautious update): a new pair is stored only if ``⟨s, y⟩ > √ε ‖s‖ ‖y‖`` (ε the machine
epsilon of the point's dtype: about 1.5e-8 in float64). Positive curvature keeps H positive definite; the
margin √ε asks that the sign of ``⟨s, y⟩`` be resolved above the rounding of an inner product (~ε ‖s‖ ‖y‖).
The test is invariant to the scale of f and of the variables, unlike Manopt's ``⟨s, y⟩/‖s‖² ≥ 10⁻⁴ ‖g‖`` (Li &
Fukushima), whose sides scale differently when the variables are rescaled (``x → t x``: the left by 1/t², the
right by 1/t) — completion points have the data's scale (‖x‖ ~ ‖A‖).

Memory (``memory``, default 10; Manopt's is 30): L-BFGS gains little beyond 5–20 pairs on smooth problems
(Liu & Nocedal 1989; SciPy's L-BFGS-B takes 10), while each pair costs two transports per iteration — on
lowrankopt's manifolds a projection, ``O((m + n) r²)`` for matrices and ``O(d n r³)`` for tensor trains, so
30 pairs (60 projections) would cost more than the gradient of a completion loss with few samples.

Descent safeguard: if ``⟨g, p⟩ ≥ 0`` (or is not finite) the memory is cleared and ``p = −g``. A line search
that finds no sufficient decrease along an L-BFGS direction is retried once along ``−g`` with an empty memory;
along ``−g`` it ends the run (status 5, or 6 at the floating-point floor).

Line search: along the curve ``φ(α) = f(R_x(α p))``, the derivative at a trial point ``y = R_x(α p)`` is taken
as ``φ'(α) ≈ ⟨grad f(y), T_{x→y} p⟩`` (the direction transported to y, as in Ring & Wirth 2012 and Manopt): exact
for the Euclidean retraction, and for a retraction whose differential at αp maps p onto its projection (first
order in α in general). A step is accepted under the strong Wolfe conditions

    φ(α) ≤ φ(0) + c1 α φ'(0),      |φ'(α)| ≤ c2 |φ'(0)|      (0 < c1 < ½, c1 < c2 < 1),

found by Nocedal & Wright's Algorithms 3.5 (bracketing, trial steps growing 2–10× by cubic extrapolation) and
3.6 (zoom, safeguarded cubic interpolation of the values and derivatives at the bracket's ends; where the two
values differ only by rounding, the secant of the derivatives, which needs no value). Every trial
point gets its value and gradient at once (one gradient evaluation: the gradient is needed for the curvature
condition, and the first trial is nearly always accepted). The first trial step is 1 whenever the direction
comes from the memory (H₀ = γ I gives it its scale). Along ``−g`` (the first iteration, after a reset) it follows
``initial_step`` as :func:`~lowrankopt.optim.line_search.line_search_descent` does: the model step
``−⟨g, p⟩ / ⟨p, H p⟩`` (``"model"``; at later resets only where the curvature needs no Hessian tape, i.e. a user
``hvp`` or autodiff on fixed-rank matrices, else the secant rule), a callable curvature, or the secant rule
``2 (f_prev − f) / (−⟨g, p⟩)`` and ``1/‖g‖`` at the first iteration. If ``max_linesearch`` evaluations find no
Wolfe point, the trial with the lowest f among those with sufficient decrease is taken (recorded with
``wolfe=False``; its pair then faces the curvature test like any other).

Floating-point floor (see :mod:`~lowrankopt.optim.precision`): where f's change is at its rounding level, the
sufficient decrease is checked on the derivative, ``φ'(α) ≤ (2 c1 − 1) φ'(0)`` (Hager & Zhang's approximate Wolfe
condition), values within rounding of each other count as equal in the bracketing, and a gradient at its rounding
noise ends the run as converged (status 6).

Cost per iteration: one gradient per line-search trial (usually one trial), ``2·memory`` transports and
``O(memory)`` inner products; one Hessian quadratic form at the first iteration with ``initial_step="model"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .objective import Local, Objective
from .precision import Floor, eps_of, f_tolerance
from .run import Run

# interpolated steps keep this fraction of the bracket's width from its ends (Nocedal & Wright's safeguard)
_MARGIN = 0.1
# extrapolated steps of the bracketing phase grow by a factor in [_GROW_MIN, _GROW_MAX]
_GROW_MIN, _GROW_MAX = 2.0, 10.0


class _Stopped(Exception):
    """The run was stopped inside the line search (non-finite trial, floor reached): ``run`` holds why."""


@dataclass
class _Trial:
    """A point of the line search: step α, the evaluated point (None at α = 0: the current one), φ(α), φ'(α) and
    the direction transported to the point (reused as the step s of the new pair)."""

    alpha: float
    loc: Local | None
    fun: float
    slope: float
    Tp: Any = None


@dataclass
class _Pair:
    """A stored (s, y) pair in the current tangent space, with ``rho = 1/⟨s, y⟩`` and ``yy = ⟨y, y⟩`` from the point
    where it was formed."""

    s: Any
    y: Any
    rho: float
    yy: float


def _pair(M: Any, x: Any, s: Any, y: Any, margin: float) -> _Pair | None:
    """The pair (s, y) at x if it passes the curvature test ``⟨s, y⟩ > margin ‖s‖ ‖y‖``, else None. Cost: 3 inner
    products."""
    sy, ss, yy = (float(M.inner(x, a, b)) for a, b in ((s, y), (s, s), (y, y)))
    if not (sy > margin * math.sqrt(ss * yy) and math.isfinite(sy) and yy > 0):
        return None
    return _Pair(s, y, 1.0 / sy, yy)


def two_loop(M: Any, x: Any, g: Any, pairs: list) -> Any:
    """``H g`` by the L-BFGS two-loop recursion over ``pairs`` (oldest first; :class:`_Pair` at x), ``H₀ = γ I``
    with ``γ = ⟨s, y⟩ / ⟨y, y⟩`` of the newest pair. Cost: 4·len(pairs) inner products and as many axpys."""
    q = g
    coef = []
    for p in reversed(pairs):
        a = p.rho * float(M.inner(x, p.s, q))
        coef.append(a)
        q = q - p.y * a
    newest = pairs[-1]
    r = q * (1.0 / (newest.rho * newest.yy))
    for p, a in zip(pairs, reversed(coef)):
        b = p.rho * float(M.inner(x, p.y, r))
        r = r + p.s * (a - b)
    return r


def _cubic_min(a: _Trial, b: _Trial) -> float:
    """The minimizer of the cubic through φ and φ' at a and b (Nocedal & Wright (3.59)); NaN where it has none."""
    if a.alpha == b.alpha:
        return math.nan
    d1 = a.slope + b.slope - 3.0 * (a.fun - b.fun) / (a.alpha - b.alpha)
    disc = d1 * d1 - a.slope * b.slope
    if not disc >= 0:
        return math.nan
    d2 = math.copysign(math.sqrt(disc), b.alpha - a.alpha)
    den = b.slope - a.slope + 2.0 * d2
    if den == 0:
        return math.nan
    return b.alpha - (b.alpha - a.alpha) * (b.slope + d2 - d1) / den


def _secant_min(a: _Trial, b: _Trial) -> float:
    """The zero of the line through φ' at a and b (the minimizer of the quadratic with those slopes; needs no φ);
    NaN where the slopes are equal."""
    if a.slope == b.slope:
        return math.nan
    return a.alpha - a.slope * (b.alpha - a.alpha) / (b.slope - a.slope)


class _WolfeSearch:
    """One strong-Wolfe line search from ``loc`` along ``p`` (φ'(0) = ``slope`` < 0); see the module doc."""

    def __init__(self, obj: Objective, run: Run, floor: Floor, loc: Local, p: Any, slope: float, **opts: Any):
        self.obj, self.run, self.floor, self.loc, self.p, self.slope = obj, run, floor, loc, p, slope
        self.c1, self.c2, self.max_evals = opts["c1"], opts["c2"], opts["max_linesearch"]
        self.p_norm = float(obj.manifold.norm(loc.x, p))
        self.evals = 0
        self.best: _Trial | None = None  # the lowest trial with sufficient decrease
        self.rose = False  # whether a trial's f rose above the run's lowest f by more than rounding

    def __call__(self, alpha: float) -> tuple[_Trial | None, bool]:
        """``(trial, wolfe)``: the accepted trial and whether it satisfies the strong Wolfe conditions; ``(None,
        False)`` when no trial gave sufficient decrease. Raises :class:`_Stopped` when the run stopped."""
        prev = _Trial(0.0, None, self.loc.fun, self.slope)
        while self.evals < self.max_evals:
            if not math.isfinite(alpha * self.p_norm) or alpha <= 0:
                break  # the step overflows (a tiny direction with a huge step): no further growth
            t = self._evaluate(alpha)
            ok = self._sufficient(t)
            if not ok or (prev.loc is not None and self._higher(t, prev)):
                return self._zoom(prev, t)
            if self._curvature(t):
                return t, True
            if t.slope >= 0:
                return self._zoom(t, prev)
            grow = self._model_min(prev, t)
            grow = grow / t.alpha if math.isfinite(grow) else _GROW_MAX
            prev, alpha = t, t.alpha * min(max(grow, _GROW_MIN), _GROW_MAX)
        return self.best, False

    def _zoom(self, lo: _Trial, hi: _Trial) -> tuple[_Trial | None, bool]:
        """Algorithm 3.6: ``lo`` has sufficient decrease (or α = 0) and the lowest f so far, and the interval
        between ``lo`` and ``hi`` contains a strong-Wolfe step."""
        while self.evals < self.max_evals:
            left, right = sorted((lo.alpha, hi.alpha))
            width = right - left
            if width <= eps_of(self.loc.x) * right:
                break  # the bracket is at the resolution of α
            a = self._model_min(lo, hi)
            if not math.isfinite(a):
                a = 0.5 * (left + right)
            a = min(max(a, left + _MARGIN * width), right - _MARGIN * width)
            t = self._evaluate(a)
            if not self._sufficient(t) or self._higher(t, lo):
                hi = t
            else:
                if self._curvature(t):
                    return t, True
                if t.slope * (hi.alpha - lo.alpha) >= 0:
                    hi = lo
                lo = t
        return self.best, False

    def _model_min(self, a: _Trial, b: _Trial) -> float:
        """The minimizer of the cubic through φ and φ' at a and b; where φ(a) and φ(b) differ only by rounding (near
        the floor), of the quadratic through φ' alone (the cubic would fit the rounding of φ)."""
        if self._higher(a, b) or self._higher(b, a):
            return _cubic_min(a, b)
        return _secant_min(a, b)

    def _evaluate(self, alpha: float) -> _Trial:
        """f, the gradient and φ'(α) = ⟨grad f(y), T_{x→y} p⟩ at ``y = R_x(α p)`` (one gradient evaluation)."""
        M, x = self.obj.manifold, self.loc.x
        self.evals += 1
        y = M.retr(x, self.p * alpha)
        new = self.obj.local(y)
        if not math.isfinite(new.fun):
            self.run.non_finite_trial(new.fun)
            raise _Stopped
        if not new.finite:
            self.run.accept(new)  # a NaN/Inf gradient: stops with the non-finite status and keeps x
            raise _Stopped
        Tp = M.transp(x, y, self.p)
        return _Trial(alpha, new, new.fun, float(M.inner(y, new.grad, Tp)), Tp)

    def _sufficient(self, t: _Trial) -> bool:
        """Armijo's condition; where f's change is rounding, Hager–Zhang's approximate form on φ'."""
        loc, floor = self.loc, self.floor
        decrease = loc.fun - t.fun
        ok = decrease > 0 and decrease >= -self.c1 * t.alpha * self.slope
        if floor.suspect(loc, t.fun, predicted=-0.5 * t.alpha * self.slope):
            if floor.reached(loc):
                self.run.stop_at_floor(floor.noise(loc))
                raise _Stopped
            # (not once f was seen to rise along p: the zoom then shrinks the step to where f's change is rounding,
            # and a derivative that says "descent" there would take steps that f contradicts)
            if not ok and not self.rose and floor.unresolved(loc, t.fun):
                ok = t.slope <= (2 * self.c1 - 1) * self.slope
        self.rose = self.rose or floor.rises(loc, t.fun)
        if ok and (self.best is None or t.fun < self.best.fun):
            self.best = t
        return ok

    def _curvature(self, t: _Trial) -> bool:
        return abs(t.slope) <= -self.c2 * self.slope

    def _higher(self, t: _Trial, ref: _Trial) -> bool:
        """φ at t above φ at ref by more than rounding (equal values near the floor leave the choice to φ')."""
        tol = f_tolerance(self.loc.x, t.fun, ref.fun, f_noise=self.floor.f_noise)
        return t.fun - ref.fun > tol


def _steepest_step(
    obj: Objective,
    loc: Local,
    p: Any,
    slope: float,
    *,
    curvature_along: Callable | None,
    model: bool,
    f_prev: float | None,
    last: tuple[float, float] | None,
) -> float:
    """The first trial step along ``p = −g`` (see the module doc)."""
    x = loc.x
    curv = None
    if curvature_along is not None:
        curv = float(curvature_along(x, p))
    elif model and (loc.hess is not None or obj.form_without_tape):
        curv = obj.hessian_form(loc, p)
    if curv is not None and curv > 0 and math.isfinite(curv):
        return -slope / curv
    if f_prev is not None and f_prev - loc.fun > f_tolerance(x, f_prev, loc.fun):
        return 2 * (f_prev - loc.fun) / -slope  # the step that repeats the last decrease (N&W (3.60))
    if last is not None:
        return last[0] * last[1] / slope  # the last step's decrease along the slope (N&W (3.59))
    return 1.0 / float(obj.manifold.norm(x, p))


def lbfgs(
    obj: Objective,
    run: Run,
    x: Any,
    *,
    memory: int,
    c1: float,
    c2: float,
    max_linesearch: int,
    initial_step: str | Callable[[Any, Any], float | torch.Tensor],
) -> None:
    """Riemannian L-BFGS from x (see the module doc); reports to ``run``."""
    M = obj.manifold
    curvature_along = initial_step if callable(initial_step) else None
    model = initial_step == "model"
    # x0's Hessian tape only where the model step's curvature needs one (see Objective.hessian_form)
    loc = obj.local(x, hessian=model and not obj.form_without_tape)
    if run.start(loc):
        return
    floor = Floor(obj)
    margin = math.sqrt(eps_of(x))
    pairs: list[_Pair] = []
    f_prev: float | None = None
    last: tuple[float, float] | None = None  # (α, φ'(0)) of the last accepted step
    while True:
        used = len(pairs)
        p = -two_loop(M, x, loc.grad, pairs) if used else -loc.grad
        slope = float(M.inner(x, loc.grad, p)) if used else -(loc.grad_norm**2)
        if not slope < 0:  # not a descent direction (or NaN): forget the memory, steepest descent
            pairs, used, p, slope = [], 0, -loc.grad, -(loc.grad_norm**2)
        if used:
            alpha = 1.0
        else:
            alpha = _steepest_step(
                obj, loc, p, slope, curvature_along=curvature_along, model=model, f_prev=f_prev, last=last
            )
        search = _WolfeSearch(obj, run, floor, loc, p, slope, c1=c1, c2=c2, max_linesearch=max_linesearch)
        try:
            t, wolfe = search(alpha)
        except _Stopped:
            return
        if t is None:
            if used:  # retry along −g with an empty memory
                pairs = []
                continue
            run.stop_no_progress(
                floor.noise(loc),
                f"line search failed: no sufficient decrease in {search.evals} evaluations along −grad",
                f_resolved=search.rose,
                inconsistent=floor.inconsistent,
            )
            return
        new, y = t.loc, t.loc.x
        info = dict(step_size=t.alpha * search.p_norm, alpha=t.alpha, memory=used, evaluations=search.evals)
        if run.accept(new, wolfe=wolfe, **info):
            return
        # the new pair, and the old ones transported to y (the oldest is dropped first if the memory is full)
        s, yv = t.Tp * t.alpha, new.grad - M.transp(x, y, loc.grad)
        newest = _pair(M, y, s, yv, margin)
        if newest is not None and len(pairs) >= memory:
            pairs = pairs[len(pairs) - memory + 1 :]
        # (ρ and ⟨y, y⟩ stay those of the pair's own point: see the module doc)
        pairs = [_Pair(M.transp(x, y, q.s), M.transp(x, y, q.y), q.rho, q.yy) for q in pairs]
        pairs += [newest] if newest is not None else []
        x, f_prev, last, loc = y, loc.fun, (t.alpha, slope), new
