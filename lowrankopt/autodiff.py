"""Riemannian gradients and Hessian-vector products by automatic differentiation.

Method: Novikov, Rakhuba, Oseledets, "Automatic differentiation for Riemannian optimization on
low-rank matrix and tensor-train manifolds", SISC 44(2), 2022 — the δ-trick. ``f`` is evaluated on
``x + T_x(δ)`` with the frames of x detached; the gradient in δ at δ = 0, gauge-projected, is the
δ-coordinate vector of ``P_x ∇f(x)``. Nothing on the autograd tape is an SVD or a QR.

Exact Riemannian Hessian (``curvature=True``): with the chart ``φ(W)`` (matrices
``(US + A)(V + B S⁻ᵀ)ᵀ``; TT ``TT(C_1 + W_1, V_2 + W_2, ...)``, ``W_k = R_k⁻¹ δ_k``) whose
differential at 0 is ``T_x``, the Gauss formula gives

    <Hess f(x)[ξ], η> = <∇²f(x) ξ, η> + <P_x^⊥ ∇f(x), D²φ[W(ξ), W(η)]>.

The second term (Weingarten, the "curvature term") is the δ-gradient in η of
``f(x + Y(η)) − <P_x ∇f(x), Y(η)>`` with ``Y(η) = D²φ[W(ξ), W(η)]`` linear in η — one more backward
pass through f. For matrices it equals Manopt's ``ehess2rhess`` terms ``(I − UUᵀ) ∇f Vp S⁻¹`` and
``(I − VVᵀ) ∇fᵀ Up S⁻ᵀ``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .formats.shared_work import CURVATURE_FOLLOWS, memo, shared_work
from .manifolds.base import LowRankManifold, manifold_of
from .manifolds.tangent import TangentVector

__all__ = [
    "check_scalar_output",
    "delta_grad",
    "grad_or_zeros",
    "manifold_of",
    "riemannian_grad",
    "riemannian_grad_and_hessian",
    "riemannian_grad_and_hvp",
    "riemannian_hvp",
    "riemannian_hessian_form",
]


def grad_or_zeros(
    out: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    create_graph: bool = False,
    grad_outputs: torch.Tensor | None = None,
    retain_graph: bool | None = None,
) -> list[torch.Tensor]:
    """torch.autograd.grad that returns zeros for inputs ``out`` does not depend on."""
    if out.requires_grad:
        grads = torch.autograd.grad(
            out,
            inputs,
            grad_outputs=grad_outputs,
            create_graph=create_graph,
            retain_graph=retain_graph,
            allow_unused=True,
        )
    else:
        grads = [None] * len(inputs)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


def check_scalar_output(val: object) -> torch.Tensor:
    """``val`` as a 0-dim tensor; ``TypeError`` unless it is a one-element tensor (what f must return)."""
    if not isinstance(val, torch.Tensor) or val.numel() != 1:
        raise TypeError(
            f"f must return a scalar tensor, got {type(val).__name__}"
            + (f" of shape {tuple(val.shape)}" if isinstance(val, torch.Tensor) else "")
        )
    return val.reshape(())


def delta_grad(
    M: LowRankManifold, x: Any, f: Callable[[Any], torch.Tensor], create_graph: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The δ-trick: ``(f(x), ∂f(x + T_x(δ))/∂δ at δ = 0, δ)`` — the raw (un-gauged) δ-gradient, from one evaluation
    of f on ``M.linearization(x, δ)`` and one backward pass (kept on the tape with ``create_graph``)."""
    deltas = M.zero_deltas(x, requires_grad=True)
    with torch.enable_grad():
        val = check_scalar_output(f(M.linearization(x, deltas)))
        grads = grad_or_zeros(val, deltas, create_graph=create_graph)
    return val, grads, deltas


def _resolve(x, manifold) -> LowRankManifold:
    M = manifold_of(x) if manifold is None else manifold
    M.check_point(x)
    return M


def _check_invariance(M: LowRankManifold, f, x, val: torch.Tensor) -> None:
    rtol = math.sqrt(torch.finfo(x.dtype).eps)
    others = [("x as given", x)]
    y = M.regauge(x)
    if y is not None:
        others.append(("a re-gauged representation of x", y))
    with torch.no_grad():
        for name, y in others:
            other = check_scalar_output(f(y)).detach()
            if not torch.isclose(other, val.detach(), rtol=rtol, atol=rtol * 1e-3):
                raise ValueError(
                    f"f is not a function of the tensor alone: f at {name} is {float(other)!r} but f at the "
                    f"linearized representation is {float(val)!r}. f must use the format's operations "
                    "(gather, inner, norm, full, ...) rather than read factors or cores directly."
                )


def riemannian_grad(
    f: Callable[[Any], torch.Tensor], x: Any, *, manifold: LowRankManifold | None = None, check_invariance: bool = False
) -> tuple[torch.Tensor, TangentVector]:
    """Value and Riemannian gradient of ``f`` at ``x``.

    Args:
        f: a scalar function of a LowRankMatrix / TensorTrain written with the format's ops
            (differentiable torch code).
        x: the point (its manifold is inferred from its shape and ranks unless ``manifold`` is given).
        check_invariance: evaluate f also at x and at a re-gauged representation of x and raise
            ``ValueError`` if the values differ (f reads raw factors/cores). Costs two more
            evaluations of f.

    Returns:
        ``(f(x), grad)``: a detached 0-dim tensor and a :class:`TangentVector` (``P_x ∇f(x)``).

    Cost: one evaluation of f and one backward pass on the linearized object (for ``gather``:
    about three rank-r sweeps over the indices), plus ``O((m + n) r²)`` / ``O(d n r³)`` for the
    frames of x (cached on x).
    """
    M = _resolve(x, manifold)
    val, grads, _ = delta_grad(M, x, f)
    if check_invariance:
        _check_invariance(M, f, x, val)
    return val.detach(), TangentVector(M, x, M.gauge(x, [g.detach() for g in grads]))


def _weingarten(M: LowRankManifold, f: Callable, x, xi: TangentVector, grad: TangentVector) -> list[torch.Tensor]:
    """δ-coordinates of the curvature term W_x(ξ, P^⊥∇f(x)) (see the module docstring)."""
    g_amb = M.to_ambient(x, grad)
    etas = M.zero_deltas(x, requires_grad=True)
    with_point, curvature_only = M.second_fundamental(x, xi, etas)
    with torch.enable_grad():
        s = check_scalar_output(f(with_point)) - M.ambient_inner(curvature_only, g_amb)
        w = grad_or_zeros(s, etas)
    return M.gauge(x, [t.detach() for t in w])


def riemannian_grad_and_hessian(
    f: Callable[[Any], torch.Tensor], x: Any, *, curvature: bool = True, manifold: LowRankManifold | None = None
) -> tuple[torch.Tensor, TangentVector, Callable[[TangentVector], TangentVector]]:
    """``(f(x), grad f(x), hess)`` where ``hess(v)`` applies the Riemannian Hessian at x to tangent vectors.

    The forward pass and the first backward pass (kept on the autograd tape) are shared by every call of
    ``hess``, so each Hessian-vector product costs only the second backward pass (plus the curvature
    pass if ``curvature``). This is what the trust-region method uses: many HVPs at one point. The tape
    lives as long as ``hess`` does. See :func:`riemannian_hvp` for the math and the costs.
    """
    M = _resolve(x, manifold)
    store: dict = {}
    with shared_work(store):  # the curvature passes reuse index plans, frame interfaces and f's value
        if curvature:  # so the first pass takes the paths whose work they share (see formats.delta_tt)
            memo(CURVATURE_FOLLOWS, (), lambda: True)
        val, g, deltas = delta_grad(M, x, f, create_graph=True)
    grad = TangentVector(M, x, M.gauge(x, [gi.detach() for gi in g]))
    live = [(gi, i) for i, gi in enumerate(g) if gi.requires_grad]

    def hess(v: TangentVector) -> TangentVector:
        M.check_tangent(x, v)
        # A copy of the memo: what this product adds (its own curvature-pass intermediates) is dropped after.
        with shared_work(dict(store)):
            if live:
                with torch.enable_grad():
                    s = sum((gi * v.coords[i]).sum() for gi, i in live)
                hv = grad_or_zeros(s, deltas, retain_graph=True)
            else:
                hv = [torch.zeros_like(t) for t in deltas]
            coords = M.gauge(x, [h.detach() for h in hv])
            if curvature:
                coords = [a + b for a, b in zip(coords, _weingarten(M, f, x, v, grad))]
        return TangentVector(M, x, coords)

    return val.detach(), grad, hess


def riemannian_grad_and_hvp(
    f: Callable[[Any], torch.Tensor],
    x: Any,
    v: TangentVector,
    *,
    curvature: bool = True,
    manifold: LowRankManifold | None = None,
) -> tuple[torch.Tensor, TangentVector, TangentVector]:
    """``(f(x), grad f(x), Hess f(x)[v])`` from one forward and a double backward pass; see
    :func:`riemannian_hvp`."""
    if manifold is None and isinstance(v, TangentVector):
        manifold = v.manifold
    val, grad, hess = riemannian_grad_and_hessian(f, x, curvature=curvature, manifold=manifold)
    return val, grad, hess(v)


def riemannian_hvp(
    f: Callable[[Any], torch.Tensor],
    x: Any,
    v: TangentVector,
    *,
    curvature: bool = True,
    manifold: LowRankManifold | None = None,
) -> TangentVector:
    """Riemannian Hessian of ``f`` at ``x`` applied to the tangent vector ``v``.

    ``curvature=True`` (default) gives the exact Riemannian Hessian ``P_x ∇²f(x) P_x v`` plus the
    Weingarten (curvature) term; ``curvature=False`` gives ``P_x ∇²f(x) P_x v`` alone (t3f's
    approximation; equal to the exact Hessian where the Euclidean gradient ∇f(x) vanishes, not at every
    Riemannian critical point).

    Cost: a double backward pass through f on the linearized object (for ``gather``: about 4–6 × f,
    see docs/benchmarks.md). The curvature term adds one evaluation and backward pass of f on a
    δ-structured object (materialized for generic ops as rank 7r for TT, 3r for matrices; native and
    sharing the first pass's work for ``gather``: about 2–4 × f more), plus ``O(d n r³)`` for the frames
    and ``R_k⁻¹`` (the term involves inverse singular values, as it must).
    """
    return riemannian_grad_and_hvp(f, x, v, curvature=curvature, manifold=manifold)[2]


def has_chart_hessian_form(manifold: object) -> bool:
    """Whether :func:`riemannian_hessian_form` takes the chart-curve path on ``manifold`` (it implements
    :meth:`~lowrankopt.manifolds.LowRankManifold.chart_curve`: fixed-rank matrices) rather than a Hessian-vector
    product."""
    return isinstance(manifold, LowRankManifold) and type(manifold).chart_curve is not LowRankManifold.chart_curve


def riemannian_hessian_form(
    f: Callable[[Any], torch.Tensor],
    x: Any,
    v: TangentVector,
    *,
    grad: TangentVector | None = None,
    curvature: bool = True,
    manifold: LowRankManifold | None = None,
) -> torch.Tensor:
    """The quadratic form ``⟨v, Hess f(x)[v]⟩`` (a detached 0-dim tensor): the curvature a line search needs.

    On a manifold with a chart curve (:meth:`~lowrankopt.manifolds.LowRankManifold.chart_curve`; fixed-rank
    matrices): the second derivative in one scalar t of f on a curve c through x with velocity v,

    - ``curvature=True``: a chart curve; ``(f∘c)''(0) = ⟨∇²f(x) v, v⟩ + ⟨∇f(x), c''(0)⟩``, and the Gauss formula of
      the module docstring gives ``⟨v, Hess f(x)[v]⟩ = (f∘c)''(0) − ⟨P_x ∇f(x), c''(0)⟩`` (the last term from
      ``grad``'s coordinates, by the manifold);
    - ``curvature=False``: the line ``x + t v``, ``⟨v, P_x ∇²f(x) P_x v⟩``.

    The value equals ``M.inner(x, v, hess(v))`` of :func:`riemannian_grad_and_hessian` in exact arithmetic, but needs
    no tape at x: one evaluation of f on the curve and a double backward pass in the scalar t (for ``gather`` on
    matrices: two row gathers, then two scatters and two gathers per pass), instead of a first backward kept on the
    tape, a double backward in the δ-coordinates and (``curvature=True``) the curvature pass. Nothing on the tape is
    an SVD or a QR (frames and inverses are computed once per point, detached). Other manifolds: one Hessian-vector
    product. ``grad`` (``P_x ∇f(x)``) is computed when not given and ``curvature=True``.
    """
    M = _resolve(x, manifold)
    if not has_chart_hessian_form(M):
        return M.inner(x, v, riemannian_grad_and_hvp(f, x, v, curvature=curvature, manifold=M)[2]).detach()
    t = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=True)
    with torch.enable_grad():
        curve, tangential = M.chart_curve(x, v, t, curvature)
        d1 = grad_or_zeros(check_scalar_output(f(curve)), [t], create_graph=True)[0]
    d2 = grad_or_zeros(d1, [t])[0].detach()
    if not curvature:
        return d2
    if grad is None:
        grad = riemannian_grad(f, x, manifold=M)[1]
    return d2 - tangential(grad)
