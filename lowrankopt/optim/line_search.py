"""Riemannian steepest descent and nonlinear conjugate gradients with an Armijo backtracking line search.

Initial step (``initial_step="model"``): the minimizer of the quadratic model along the search
direction, ``α = −⟨g, η⟩ / ⟨η, Hess f(x)[η]⟩``, one Hessian quadratic form per iteration (with autodiff on
fixed-rank matrices the second derivative of f along a curve through x, no Hessian tape at x: see
:func:`~lowrankopt.autodiff.riemannian_hessian_form`; otherwise one Hessian-vector product). A callable
``initial_step(x, η)`` returning the curvature ``⟨η, H η⟩`` replaces the Hessian product (e.g.
``‖P_Ω η‖²`` for completion, which needs no autograd tape at all). For a
least-squares loss with ``curvature=False`` this is the exact minimizer of f along the ambient line
``x + αη`` — the step of LRGeomCG (Vandereycken 2013) and RTTC (Steinlechner 2016). When the model has
no positive curvature along η, or with ``initial_step="secant"``, the first trial is
``α = 2 (f_prev − f) / (−⟨g, η⟩)`` (the step that would repeat the last decrease; Nocedal & Wright
(3.60)), and ``1 / ‖η‖`` at the first iteration.

CG directions: ``η_new = −g_new + β T(η)`` with T the manifold's vector transport and β one of

- ``"fr"``  Fletcher–Reeves  ``‖g_new‖² / ‖g‖²``;
- ``"pr+"`` Polak–Ribière+   ``max(0, ⟨g_new, g_new − T g⟩ / ‖g‖²)``;
- ``"hs"``  Hestenes–Stiefel ``max(0, ⟨g_new, y⟩ / ⟨T η, y⟩)``, ``y = g_new − T g``;
- ``"hz"``  Hager–Zhang      ``⟨y − 2 T η ‖y‖² / ⟨T η, y⟩, g_new⟩ / ⟨T η, y⟩``, bounded below by
  ``−1 / (‖T η‖ min(0.01, ‖g‖))`` (Hager & Zhang 2005; Manopt's default; the bound is not scale invariant).

Restarts (β = 0): whenever ``η_new`` is not a descent direction, and — with ``restart_threshold=c`` —
Powell's test ``|⟨g_new, T g⟩| ≥ c ‖g_new‖²`` (RTTC uses c = 0.1).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from . import result as st
from .objective import Objective
from .precision import Floor, f_tolerance
from .run import Run

BETA_RULES = ("fr", "pr+", "hs", "hz")


def _beta(rule: str, M, new, loc, Tg, Teta, threshold) -> float:
    """β of the CG rule; ``Tg``, ``Teta``: the previous gradient and direction transported to the new point."""
    y = new.x
    g2_old, g2_new = loc.grad_norm**2, new.grad_norm**2
    if threshold is not None and abs(float(M.inner(y, new.grad, Tg))) >= threshold * g2_new:
        return 0.0
    if rule == "fr":
        return g2_new / g2_old
    if rule == "pr+":
        return max(0.0, (g2_new - float(M.inner(y, new.grad, Tg))) / g2_old)
    diff = new.grad - Tg
    den = float(M.inner(y, Teta, diff))
    if den == 0.0:
        return 0.0
    num = float(M.inner(y, new.grad, diff))
    if rule == "hs":
        return max(0.0, num / den)
    num -= 2 * float(M.inner(y, diff, diff)) * float(M.inner(y, Teta, new.grad)) / den
    lower = -1.0 / (float(M.norm(y, Teta)) * min(0.01, loc.grad_norm))
    return max(num / den, lower)


def line_search_descent(
    obj: Objective,
    run: Run,
    x: Any,
    *,
    conjugate: bool,
    beta: str,
    restart_threshold: float | None,
    initial_step: str | Callable[[Any, Any], float | torch.Tensor],
    c1: float,
    contraction: float,
    max_backtracks: int,
) -> None:
    """Steepest descent (``conjugate=False``) or nonlinear CG from x; reports to ``run``."""
    M = obj.manifold
    curvature_along = initial_step if callable(initial_step) else None
    model = initial_step == "model"  # the curvature ⟨η, Hη⟩ needed (a callable supplies it itself)
    # a point's Hessian tape only where the curvature comes from a Hessian product (see Objective.hessian_form)
    tape = model and not obj.form_without_tape
    loc = obj.local(x, hessian=tape)
    if run.start(loc):
        return
    eta, f_prev, last_step = -loc.grad, None, None
    floor = Floor(obj)
    while True:
        slope = float(M.inner(x, loc.grad, eta))
        if not slope < 0:  # not a descent direction (or NaN): restart along −grad
            eta, slope = -loc.grad, -(loc.grad_norm**2)
        alpha, from_model = None, False
        if model or curvature_along is not None:
            curv = float(curvature_along(x, eta)) if curvature_along is not None else obj.hessian_form(loc, eta)
            if curv > 0 and math.isfinite(curv):
                alpha, from_model = -slope / curv, True
        if alpha is None:
            if f_prev is not None and f_prev - loc.fun > f_tolerance(x, f_prev, loc.fun):
                alpha = 2 * (f_prev - loc.fun) / -slope
            elif last_step is not None:  # f's last decrease is rounding: repeat the last step's slope decrease
                alpha = last_step[0] * last_step[1] / slope  # (Nocedal & Wright (3.59))
            else:
                alpha = 1.0 / float(M.norm(x, eta))
        # Armijo backtracking. A model step is nearly always accepted, so its trial point gets the full
        # evaluation (value, gradient, Hessian tape) at once; other trials get the value first.
        # Near the floating-point floor the change of f is rounding: there the rounding noise at x is measured
        # (once per point); a gradient at that noise level ends the run as converged, and otherwise the
        # sufficient decrease is checked on the derivative along the step, which is still accurate
        # (Hager & Zhang's approximate Wolfe condition φ'(α) ≤ (2 c1 − 1) φ'(0), exact for quadratics).
        eta_norm, fy = float(M.norm(x, eta)), math.inf
        for k in range(max_backtracks + 1):
            if not math.isfinite(alpha * eta_norm):  # a step too long to represent (a tiny slope): shorten it
                alpha *= contraction
                continue
            y = M.retr(x, eta * alpha)
            new = obj.local(y, hessian=tape) if (from_model and k == 0) else None
            fy = new.fun if new is not None else obj.value(y)
            if not math.isfinite(fy):
                run.non_finite_trial(fy)
                return
            decrease = loc.fun - fy
            sufficient = decrease > 0 and decrease >= -c1 * alpha * slope
            if floor.suspect(loc, fy, predicted=-0.5 * alpha * slope):  # the quadratic model's decrease
                if floor.reached(loc):
                    run.stop_at_floor(floor.noise(loc))
                    return
                if not sufficient and floor.unresolved(loc, fy):
                    new = new or obj.local(y, hessian=tape)
                    if not new.finite:
                        run.accept(new)  # stops with the non-finite status and keeps x
                        return
                    sufficient = float(M.inner(y, new.grad, M.transp(x, y, eta))) <= (2 * c1 - 1) * slope
            if sufficient:
                break
            alpha *= contraction
        else:
            if not math.isfinite(fy):  # every trial step overflowed (a direction of norm ~0 with a huge first step)
                run.stop(st.NO_PROGRESS, f"line search failed: every trial step overflows (|eta| = {eta_norm:.3e})")
                return
            run.stop_no_progress(
                floor.noise(loc),
                f"line search failed: no sufficient decrease after {max_backtracks} backtracks",
                f_resolved=not floor.unresolved(loc, fy),
                inconsistent=floor.inconsistent,
            )
            return
        if new is None:
            new = obj.local(y, hessian=tape)
        if run.accept(new, step_size=alpha * eta_norm, backtracks=k):
            return
        if conjugate:
            Tg = M.transp(x, y, loc.grad) if (beta != "fr" or restart_threshold is not None) else None
            Teta = M.transp(x, y, eta)
            b = _beta(beta, M, new, loc, Tg, Teta, restart_threshold)
            eta = -new.grad + Teta * b if b != 0.0 else -new.grad
        else:
            eta = -new.grad
        x, loc, f_prev, last_step = y, new, loc.fun, (alpha, slope)
