"""``minimize(f, x0, method=...)``: one entry point for the Riemannian optimizers."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..manifolds import LowRankManifold, manifold_of
from .lbfgs import lbfgs
from .line_search import BETA_RULES, line_search_descent
from .objective import Objective
from .result import OptimizeResult
from .run import Run
from .trust_region import FORCING_RULES, trust_region

METHODS = ("sd", "cg", "trust-region", "lbfgs")

_COMMON = {"max_iter": 1000, "gtol": 1e-6, "ftol": 0.0, "max_time": math.inf, "callback": None, "verbose": 0}
_LINE_SEARCH = {"initial_step": "auto", "c1": 1e-4, "contraction": 0.5, "max_backtracks": 25}
_DEFAULTS = {
    "sd": _LINE_SEARCH,
    "cg": {**_LINE_SEARCH, "beta": "pr+", "restart_threshold": None},
    "trust-region": {
        "max_radius": None,
        "initial_radius": None,
        "rho_prime": 0.1,
        "kappa": 0.1,
        "theta": 1.0,
        "min_inner": 1,
        "max_inner": None,
        "rho_regularization": 1e3,
        "gradient_scale": None,
        "forcing": None,
    },
    "lbfgs": {"memory": 10, "c1": 1e-4, "c2": 0.9, "max_linesearch": 25, "initial_step": "auto"},
}
_COLUMNS = {
    "sd": ("step_size",),
    "cg": ("step_size",),
    "trust-region": ("radius", "rho", "inner_iter", "accepted"),
    "lbfgs": ("step_size", "memory", "evaluations"),
}


def minimize(
    f: Callable[[Any], torch.Tensor],
    x0: Any,
    method: str = "trust-region",
    *,
    manifold: Any = None,
    grad: Callable[[Any], Any] | None = None,
    hvp: Callable[[Any, Any], Any] | None = None,
    curvature: bool = True,
    **options: Any,
) -> OptimizeResult:
    """Minimize ``f`` over a manifold of fixed-rank matrices or tensor trains, starting at ``x0``.

    Args:
        f: scalar function of a point (a LowRankMatrix / TensorTrain), written with the formats' ops
            so that autodiff gives its Riemannian gradient and Hessian (see :func:`riemannian_grad`).
        x0: the initial point; its manifold is inferred from its shape and ranks unless ``manifold``
            is given.
        method: ``"trust-region"`` (Riemannian trust-region with truncated CG and the exact Riemannian
            Hessian), ``"cg"`` (nonlinear conjugate gradients), ``"lbfgs"`` (limited-memory BFGS with a
            strong-Wolfe line search; gradients only) or ``"sd"`` (steepest descent).
        manifold: any object with ``retr(x, v)``, ``transp(x, y, v)``, ``inner(x, u, v)``,
            ``norm(x, v)`` and ``dim`` whose tangent vectors support ``+``, ``-`` and scalar ``*``.
            For manifolds other than lowrankopt's, ``grad`` (and ``hvp``) must be given.
        grad: ``grad(x) -> tangent vector``, the Riemannian gradient (default: autodiff).
        hvp: ``hvp(x, v) -> tangent vector``, the Riemannian Hessian applied to v (default: autodiff).
        curvature: with autodiff, use the exact Riemannian Hessian (True) or ``P_x ∇²f P_x`` without
            the curvature term (False; t3f's approximation, cheaper; exact where the Euclidean gradient
            vanishes, e.g. zero-residual least squares at the solution, which keeps local superlinear
            convergence there, but only linear convergence at other critical points).

    Options common to all methods:
        max_iter (1000), gtol (1e-6: stop when the gradient norm is ≤ gtol), ftol (0: off; ``ftol > 0`` stops
        when ``|f_prev − f| ≤ ftol · max(|f_prev|, |f|, 2⁻⁵²)`` after an accepted step), max_time (inf, seconds),
        callback (``callback(intermediate_result) -> bool``; True or ``StopIteration`` stops; it may add
        entries to ``intermediate_result.history[-1]``), verbose (0; k > 0 prints an iteration table
        every k iterations and a final line).

    Options of ``"sd"`` and ``"cg"``: ``initial_step`` (``"model"``: one Hessian quadratic form per
    iteration for ``α = −⟨g, η⟩/⟨η, Hη⟩`` — on fixed-rank matrices by autodiff the second derivative of f along
    a curve (:func:`~lowrankopt.autodiff.riemannian_hessian_form`), elsewhere one Hessian-vector product —
    the exact line search for least squares with ``curvature=False``; ``"secant"``: no Hessian; ``"auto"``: model
    when a Hessian is available; a callable ``(x, η) -> ⟨η, Hη⟩``: the model step with a curvature you supply, no
    Hessian products), ``c1`` (1e-4, Armijo constant), ``contraction`` (0.5), ``max_backtracks`` (25). ``"cg"`` also
    takes ``beta`` (``"pr+"`` default, ``"hz"``, ``"hs"``, ``"fr"``) and ``restart_threshold`` (None;
    Powell restart when ``|⟨g_new, T g⟩| ≥ c‖g_new‖²``). Manopt's default is Hager–Zhang, but its lower
    bound ``−1/(‖η‖ min(0.01, ‖g‖))`` is not scale invariant: on TT completion (gradients ~1e-4) it stalled
    where PR+ converged (docs/benchmarks.md), so PR+ is ours.

    Options of ``"lbfgs"`` (:mod:`~lowrankopt.optim.lbfgs`): ``memory`` (10 pairs (s, y), transported to each new
    point by ``transp``; Manopt's default is 30, but each pair costs two transports per iteration), ``c1`` (1e-4)
    and ``c2`` (0.9), the strong Wolfe constants (``0 < c1 < ½``, ``c1 < c2 < 1``; the derivative along the
    retraction is ``⟨grad f(y), T_{x→y} p⟩``), ``max_linesearch`` (25 evaluations of f and its gradient per
    line search), ``initial_step`` (as for sd/cg, for the first trial along −grad: the first iteration and after
    a reset of the memory; along an L-BFGS direction the first trial is 1). Pairs with
    ``⟨s, y⟩ ≤ √eps ‖s‖ ‖y‖`` are skipped; a direction that is not a descent direction resets the memory.

    Options of ``"trust-region"`` (Manopt's defaults): ``max_radius`` (√dim), ``initial_radius``
    (max_radius / 8), ``rho_prime`` (0.1), ``kappa`` (0.1), ``theta`` (1.0), ``min_inner`` (1),
    ``max_inner`` (dim), ``rho_regularization`` (1e3), ``gradient_scale`` (None: Manopt's inner stopping test
    ``‖r‖ ≤ ‖r₀‖ min(‖r₀‖^θ, κ)``, which depends on the scale of f; a number s, or ``"initial"`` (the gradient
    norm at x0), uses ``(‖r₀‖/s)^θ`` instead — for problems whose gradients are far from unit size),
    ``forcing`` (None: that test; ``"eisenstat-walker"``: ``‖r‖ ≤ η_k ‖r₀‖`` with Eisenstat–Walker's forcing
    term ``η_k = 0.9 (‖g_k‖/‖g_{k−1}‖)²``, safeguarded, η₀ = 0.5 — loose solves while the gradient falls slowly,
    quadratic convergence near a nondegenerate minimum, scale invariant; θ, κ and gradient_scale, which tune
    the θ-test, are refused with it; on TT completion it cut Hessian products 3× against the θ-test).
    ``initial_radius`` may also be ``"cauchy"``: ``‖g‖³/⟨g, Hg⟩`` at x0, the length of the model's minimizer along
    −g (no extra Hessian product), for problems whose scale the default Δ̄/8 misses.

    The floating-point floor: when a change of f is at its rounding level, the method measures the rounding
    noise of f and of the gradient at the current point (f and its gradient at other factorizations of the same
    point: one more gradient and two more values of f, counted in ``ngev`` / ``nfev``, made only there). A
    gradient at that noise ends the run as converged (status 6, ``success=True``: gtol is below what the
    precision resolves). Otherwise the run goes on: the line search checks sufficient decrease on the derivative
    along the step (Hager–Zhang's approximate Wolfe condition), which stays accurate where f's differences are
    rounding (e.g. ``f = 1e8 + loss`` reaches gtol), and the trust region never accepts a step that raises f
    above the run's lowest value by more than rounding. A method that cannot move at a point that is not
    stationary stops with status 5 and ``success=False``, saying why.

    Returns:
        An :class:`OptimizeResult`. If f or its gradient becomes NaN/Inf, the run stops with
        ``success=False``, ``status=-1`` and the last point where both were finite.

    Cost per iteration: sd/cg one gradient (≈ 2–3 f) plus one Hessian quadratic form with model steps,
    one retraction and (cg) one or two transports; lbfgs one gradient and one retraction per line-search trial
    (usually one), ``2·memory`` transports and ``O(memory)`` inner products; trust-region one gradient and one
    Hessian-vector product per inner tCG iteration (the first backward pass is shared by all of them).

    Threads: minimize leaves torch's process-wide thread count alone. Call ``torch.set_num_threads(1)`` (or start
    Python with ``OMP_NUM_THREADS=1``) when other processes share the cores: on 2 cores with one other busy process
    (2026-12-03, torch 2.13), a gradient of the TT completion loss (TT-rank 4, 20¹⁰, 10⁴ entries) took 15 ms to
    1.1 s on torch's default 2 threads and 9–11 ms on one (one thread was 1.2–1.6× slower than two when no other
    process competed; docs/guide.md, performance notes).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    allowed = {**_COMMON, **_DEFAULTS[method]}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for method {method!r}; valid options: {sorted(allowed)}")
    opts = {**allowed, **options}
    ignored = sorted({"theta", "kappa", "gradient_scale"} & set(options)) if options.get("forcing") else []
    if ignored:  # the forcing term replaces the θ-test those options tune
        raise ValueError(
            f"option forcing={options['forcing']!r} replaces the inner test that {ignored} tune: pass one or the other"
        )
    M = manifold_of(x0) if manifold is None else manifold
    obj = Objective(f, M, grad=grad, hvp=hvp, curvature=curvature)
    if isinstance(M, LowRankManifold):
        M.check_point(x0, "x0")
    _validate(method, opts, obj)
    common = {k: opts.pop(k) for k in _COMMON}
    run = Run(method, obj, columns=_COLUMNS[method], **common)
    if method != "trust-region" and opts["initial_step"] == "auto":
        opts["initial_step"] = "model" if obj.has_hessian else "secant"
    if method == "trust-region":
        trust_region(obj, run, x0, **opts)
    elif method == "lbfgs":
        lbfgs(obj, run, x0, **opts)
    else:
        line_search_descent(obj, run, x0, conjugate=method == "cg", **{"beta": "fr", "restart_threshold": None, **opts})
    return run.result()


def _validate(method: str, o: dict, obj: Objective) -> None:
    def number(name, lo=0.0, hi=math.inf, *, open_lo=False, open_hi=False, allow_none=False, integer=False):
        v = o[name]
        if isinstance(v, np.generic):  # numpy scalars as the Python numbers they hold (np.bool_ becomes a bool)
            v = o[name] = v.item()
        if v is None and allow_none:
            return
        ok = not isinstance(v, bool) and isinstance(v, (int,) if integer else (int, float))
        if not ok or not (lo < v if open_lo else lo <= v) or not (v < hi if open_hi else v <= hi):
            kind = "an int" if integer else "a number"
            interval = f"{'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"
            raise ValueError(f"option {name} must be {kind} in {interval}, got {v!r}")

    number("max_iter", integer=True)
    number("gtol")
    number("ftol")
    number("max_time", open_lo=True)
    if o["callback"] is not None and not callable(o["callback"]):
        raise TypeError(f"option callback must be callable or None, got {type(o['callback']).__name__}")
    number("verbose", integer=True)
    if method == "trust-region":
        number("max_radius", open_lo=True, open_hi=True, allow_none=True)
        if o["initial_radius"] != "cauchy":
            number("initial_radius", open_lo=True, open_hi=True, allow_none=True)
        if o["forcing"] not in FORCING_RULES:
            raise ValueError(f"option forcing must be one of {FORCING_RULES}, got {o['forcing']!r}")
        number("rho_prime", hi=0.25)
        number("kappa", open_lo=True, hi=1.0)
        number("theta", open_lo=True)
        number("min_inner", integer=True)
        number("max_inner", 1, integer=True, allow_none=True)
        number("rho_regularization", open_hi=True)
        if o["gradient_scale"] != "initial":
            number("gradient_scale", open_lo=True, allow_none=True)
        if not obj.has_hessian:
            raise TypeError("the trust-region method needs Hessian-vector products: pass hvp=")
        return
    if not callable(o["initial_step"]) and o["initial_step"] not in ("auto", "model", "secant"):
        raise ValueError(
            f"option initial_step must be 'auto', 'model', 'secant' or a callable, got {o['initial_step']!r}"
        )
    if o["initial_step"] == "model" and not obj.has_hessian:
        raise TypeError("initial_step='model' needs Hessian-vector products: pass hvp= or use initial_step='secant'")
    if method == "lbfgs":
        number("memory", 1, integer=True)
        number("c1", open_lo=True, hi=0.5, open_hi=True)
        number("c2", open_lo=True, hi=1.0, open_hi=True)
        if not o["c1"] < o["c2"]:
            raise ValueError(f"options c1 and c2 must satisfy c1 < c2, got c1={o['c1']!r}, c2={o['c2']!r}")
        number("max_linesearch", 1, integer=True)
        return
    number("c1", open_lo=True, hi=0.5)
    number("contraction", open_lo=True, hi=0.999)
    number("max_backtracks", integer=True)
    if method == "cg":
        if o["beta"] not in BETA_RULES:
            raise ValueError(f"option beta must be one of {BETA_RULES}, got {o['beta']!r}")
        number("restart_threshold", open_lo=True, allow_none=True)
