"""Riemannian trust-region method with truncated CG (Absil, Baker, Gallivan 2007; Manopt's
``trustregions`` and ``trs_tCG_cached``).

At x the model ``m(η) = f + ⟨g, η⟩ + ½⟨η, Hess f(x)[η]⟩`` is minimized over ``‖η‖ ≤ Δ`` by
Steihaug–Toint truncated CG, which stops on negative curvature or at the boundary (stepping to it), on
an increase of the model, or once ``‖r‖ ≤ ‖r₀‖ min(‖r₀‖^θ, κ)`` (superlinear local convergence for
θ > 0). The candidate ``R_x(η)`` is accepted if ``ρ = (f(x) − f(R_x η)) / (m(0) − m(η)) > ρ′``
(both regularized by ``max(1, |f|)·eps·rho_regularization``); Δ shrinks 4× when ρ < ¼ and doubles (up
to Δ̄) when ρ > ¾ and tCG reached the boundary.

Inner stopping (``forcing="eisenstat-walker"``): the test above is Manopt's; the alternative is an inexact-Newton
forcing term ``‖r‖ ≤ η_k ‖r₀‖`` with Eisenstat and Walker's (1996) choice 2, ``η_k = γ (‖g_k‖ / ‖g_{k−1}‖)^α``
(γ = 0.9, α = 2, η₀ = 0.5, at most 0.9, safeguarded by ``η_k ≥ γ η_{k−1}^α`` while that exceeds 0.1). It asks
for an accurate model step only when the gradient falls fast (where the model is good: quadratic local
convergence), loosely otherwise (far from the solution, where solving a poor model to 10 % wastes Hessian
products), and it is invariant to the scale of f. Initial radius ``"cauchy"``: Δ₀ = ``‖g‖³ / ⟨g, H g⟩``, the
length of the model's minimizer along −g (the Hessian product is tCG's first, so it costs nothing).

Caching: tCG is deterministic given (x, g, Δ) and Δ only changes its boundary test, so the Hessian
products of the inner iterations are kept for the current x. After a rejected step (Δ smaller, x the
same) tCG replays them and makes no new Hessian-vector products until it goes past the cached ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from . import result as st
from .objective import Objective
from .precision import Floor, eps_of
from .run import Run

_NEG_CURVATURE, _EXCEEDED, _LINEAR, _SUPERLINEAR, _MAX_INNER, _MODEL_INCREASED, _NON_FINITE, _FORCING = (
    "negative curvature",
    "exceeded trust region",
    "linear convergence",
    "superlinear convergence",
    "max inner iterations",
    "model increased",
    "non-finite Hessian product",
    "forcing term",
)
FORCING_RULES = (None, "eisenstat-walker")


def truncated_cg(
    M: Any,
    x: Any,
    grad: Any,
    hess: Callable[[int, Any], Any],
    radius: float,
    *,
    kappa: float,
    theta: float,
    min_inner: int,
    max_inner: int,
    gradient_scale: float = 1.0,
    forcing: float | None = None,
) -> tuple[Any, Any, int, str]:
    """Steihaug–Toint tCG for ``min ⟨g, η⟩ + ½⟨η, Hη⟩, ‖η‖ ≤ radius`` (no preconditioner).

    ``hess(j, δ)`` gives H δ at inner iteration j (so that callers can cache). The residual test is
    ``‖r‖ ≤ ‖r₀‖ min((‖r₀‖ / gradient_scale)^θ, κ)``, or ``‖r‖ ≤ forcing · ‖r₀‖`` when ``forcing`` is given
    (θ, κ and gradient_scale then unused). Returns ``(η, Hη, inner_iterations, stop_reason)``.
    Cost: one Hessian product (``hess``) and O(1) inner products per inner iteration.
    """
    eta = grad * 0.0
    Heta = eta
    r = grad
    r_r = float(M.inner(x, r, r))
    r0_norm = math.sqrt(r_r)
    delta = -r
    e_Pe, e_Pd, d_Pd = 0.0, 0.0, r_r
    model = 0.0
    try:
        target = (r0_norm / gradient_scale) ** theta
    except OverflowError:  # a huge θ: the superlinear test never binds, κ decides
        target = math.inf
    for j in range(1, max_inner + 1):
        Hdelta = hess(j - 1, delta)
        d_Hd = float(M.inner(x, delta, Hdelta))
        if not math.isfinite(d_Hd):
            return eta, Heta, j, _NON_FINITE
        alpha = r_r / d_Hd if d_Hd != 0 else math.inf
        e_Pe_new = e_Pe + 2.0 * alpha * e_Pd + alpha**2 * d_Pd
        if d_Hd <= 0 or e_Pe_new >= radius**2:
            tau = (-e_Pd + math.sqrt(max(e_Pd**2 + d_Pd * (radius**2 - e_Pe), 0.0))) / d_Pd
            return eta + delta * tau, Heta + Hdelta * tau, j, (_NEG_CURVATURE if d_Hd <= 0 else _EXCEEDED)
        new_eta, new_Heta = eta + delta * alpha, Heta + Hdelta * alpha
        new_model = float(M.inner(x, new_eta, grad)) + 0.5 * float(M.inner(x, new_eta, new_Heta))
        if new_model >= model:
            return eta, Heta, j, _MODEL_INCREASED
        eta, Heta, e_Pe, model = new_eta, new_Heta, e_Pe_new, new_model
        r = r + Hdelta * alpha
        r_r_old, r_r = r_r, float(M.inner(x, r, r))
        r_norm = math.sqrt(r_r)
        if forcing is not None:
            if j >= min_inner and r_norm <= r0_norm * forcing:
                return eta, Heta, j, _FORCING
        elif j >= min_inner and r_norm <= r0_norm * min(target, kappa):
            return eta, Heta, j, (_LINEAR if kappa < target else _SUPERLINEAR)
        beta = r_r / r_r_old
        delta = -r + delta * beta
        e_Pd = beta * (e_Pd + alpha * d_Pd)
        d_Pd = r_r + beta**2 * d_Pd
    return eta, Heta, max_inner, _MAX_INNER


def eisenstat_walker(
    previous: float, grad_norm: float, previous_grad_norm: float, *, gamma: float = 0.9, alpha: float = 2.0
) -> float:
    """Eisenstat–Walker choice 2: ``η = γ (‖g_k‖ / ‖g_{k−1}‖)^α``, at least ``γ η_{k−1}^α`` while that exceeds
    0.1 (so that η does not drop after one lucky step), at most 0.9. Cost O(1)."""
    eta = gamma * (grad_norm / previous_grad_norm) ** alpha if previous_grad_norm > 0 else 0.0
    safeguard = gamma * previous**alpha
    if safeguard > 0.1:
        eta = max(eta, safeguard)
    return min(eta, 0.9) if math.isfinite(eta) else 0.9


def trust_region(
    obj: Objective,
    run: Run,
    x: Any,
    *,
    max_radius: float | None,
    initial_radius: float | str | None,
    rho_prime: float,
    kappa: float,
    theta: float,
    min_inner: int,
    max_inner: int | None,
    rho_regularization: float,
    gradient_scale: float | str | None,
    forcing: str | None = None,
) -> None:
    """Riemannian trust-region from x (defaults as Manopt: Δ̄ = √dim, Δ₀ = Δ̄/8, ρ′ = 0.1, κ = 0.1, θ = 1).

    ``gradient_scale``: the θ-test of tCG compares ``‖g‖^θ`` with κ, which is not scale invariant (Manopt's
    convention, ``None``: scale 1). A number, or ``"initial"`` (the gradient norm at x0), divides ‖g‖ first,
    so the inner solves tighten only once the gradient is small relative to that scale.
    ``forcing="eisenstat-walker"`` replaces that test by the forcing term of the module doc; ``initial_radius=
    "cauchy"`` takes Δ₀ = ‖g‖³ / ⟨g, H g⟩ at x0 (at most Δ̄; Δ̄/8 if ⟨g, H g⟩ ≤ 0).
    """
    M = obj.manifold
    dim = int(M.dim)
    max_radius = math.sqrt(dim) if max_radius is None else max_radius
    cauchy = initial_radius == "cauchy"
    radius = max_radius / 8 if initial_radius is None or cauchy else float(initial_radius)
    max_inner = dim if max_inner is None else max_inner
    loc = obj.local(x, hessian=True)
    if run.start(loc):
        return
    if gradient_scale == "initial":
        gradient_scale = loc.grad_norm
    scale = 1.0 if gradient_scale is None else float(gradient_scale)
    cache: list = []
    floor = Floor(obj)
    eta_k = 0.5 if forcing == "eisenstat-walker" else None
    if cauchy:
        # tCG's first direction is −g: its Hessian product goes to the cache, so this costs no extra product
        cache.append(loc.hess(-loc.grad))
        g_Hg = -float(M.inner(x, loc.grad, cache[0]))  # cache[0] = H(−g)
        if g_Hg > 0 and math.isfinite(g_Hg):
            radius = min(loc.grad_norm**3 / g_Hg, max_radius)

    def cached_hess(j, delta):
        if j == len(cache):
            cache.append(loc.hess(delta))
        return cache[j]

    while True:
        eta, Heta, inner, why = truncated_cg(
            M,
            x,
            loc.grad,
            cached_hess,
            radius,
            kappa=kappa,
            theta=theta,
            min_inner=min_inner,
            max_inner=max_inner,
            gradient_scale=scale,
            forcing=eta_k,
        )
        if why == _NON_FINITE:
            run.stop(
                st.NON_FINITE,
                f"a Hessian-vector product is NaN/Inf at iteration {run.nit + 1}; returning "
                "the last point where f and its gradient were finite",
            )
            return
        y = M.retr(x, eta)
        # The trial gets value, gradient and Hessian tape at once. Rejections are rare (3 of 47 steps on TT
        # completion, r = 4); evaluating f alone first would cost one more f on every accepted step instead.
        new = obj.local(y, hessian=True)
        if not math.isfinite(new.fun):
            run.non_finite_trial(new.fun)
            return
        # Manopt's regularization of ρ (both terms at the rounding level of f make ρ ≈ 1), in x's precision.
        reg = max(1.0, abs(loc.fun)) * eps_of(x) * rho_regularization
        model_decrease = -(float(M.inner(x, eta, loc.grad)) + 0.5 * float(M.inner(x, eta, Heta)))
        # Near the floating-point floor f's change is rounding and ρ says nothing: stop there if the gradient is
        # at its own rounding noise (measured once per point, only when the change looks like rounding).
        if floor.suspect(loc, new.fun, predicted=model_decrease) and floor.reached(loc):
            run.stop_at_floor(floor.noise(loc))
            return
        rho_num = loc.fun - new.fun + reg
        rho_den = model_decrease + reg
        model_decreased = rho_den >= 0
        rho = rho_num / rho_den if rho_den != 0 else math.nan
        # The regularization makes ρ ≈ 1 for any step whose changes are below reg, uphill ones included: a step
        # that increases f by more than its rounding (over the run's lowest f) is rejected whatever ρ says.
        uphill = floor.rises(loc, new.fun)
        step_radius = radius
        if rho < 0.25 or not model_decreased or math.isnan(rho) or uphill:
            radius /= 4
        elif rho > 0.75 and why in (_NEG_CURVATURE, _EXCEEDED):
            radius = min(2 * radius, max_radius)
        info = dict(radius=step_radius, rho=rho, inner_iter=inner, tcg_stop=why)
        if model_decreased and rho > rho_prime and not uphill:
            if run.accept(new, accepted=True, **info):
                return
            if eta_k is not None:
                eta_k = eisenstat_walker(eta_k, new.grad_norm, loc.grad_norm)
            x, loc, cache = y, new, []
        else:
            if run.reject(accepted=False, **info):
                return
            if radius < max_radius * eps_of(x):
                run.stop_no_progress(
                    floor.noise(loc),
                    f"the trust-region radius {radius:.3e} fell below machine precision",
                    f_resolved=not floor.unresolved(loc, new.fun),
                    inconsistent=floor.inconsistent,
                )
                return
