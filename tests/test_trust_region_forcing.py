"""The trust-region's Eisenstat–Walker forcing term and Cauchy initial radius, against independent references:
a hand-written linear CG on a dense SPD quadratic (whose exact minimizer ``−H⁻¹g`` is a dense solve) and the
formulas of Eisenstat and Walker (1996) evaluated by hand."""

import math

import pytest
import torch
from reference import Euclidean

from lowrankopt.optim import minimize
from lowrankopt.optim.trust_region import eisenstat_walker, truncated_cg

DT = torch.float64


def _quadratic(n=40, cond=1e3, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=g))[0]
    H = Q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=DT)) @ Q.T
    return H, torch.randn(n, dtype=DT, generator=g)


def _linear_cg_residuals(H, grad, iters):
    """Textbook CG on H η = −g from 0: the iterates η_k and residual norms ‖g + H η_k‖, k = 0..iters."""
    eta, r = torch.zeros_like(grad), grad.clone()
    p, out = -r, [(eta, float(torch.linalg.vector_norm(r)))]
    for _ in range(iters):
        a = (r @ r) / (p @ H @ p)
        eta, r_new = eta + a * p, r + a * (H @ p)
        p, r = -r_new + (r_new @ r_new) / (r @ r) * p, r_new
        out.append((eta, float(torch.linalg.vector_norm(r))))
    return out


@pytest.mark.parametrize("forcing", [0.5, 0.1, 1e-3])
def test_forcing_stops_at_the_first_cg_iterate_below_the_forcing_term(forcing):
    H, grad = _quadratic(cond=1e2)
    ref = _linear_cg_residuals(H, grad, 40)
    r0 = ref[0][1]
    k = next(k for k in range(1, len(ref)) if ref[k][1] <= forcing * r0)
    eta, Heta, inner, why = truncated_cg(
        Euclidean(40), None, grad, lambda j, d: H @ d, 1e30, kappa=0.1, theta=1.0, min_inner=1, max_inner=40,
        forcing=forcing,
    )  # fmt: skip
    assert why == "forcing term" and inner == k
    # the same Krylov iterate up to rounding, which CG amplifies with k (7e-6 after ~30 steps here)
    assert float(torch.linalg.vector_norm(eta - ref[k][0]) / torch.linalg.vector_norm(ref[k][0])) < 1e-4
    assert float(torch.linalg.vector_norm(Heta - H @ eta) / torch.linalg.vector_norm(Heta)) < 1e-9
    assert float(torch.linalg.vector_norm(grad + H @ eta)) <= forcing * r0 * (1 + 1e-9)


def test_tiny_forcing_solves_the_model_exactly():
    H, grad = _quadratic(n=20, cond=1e2)
    eta, _, inner, why = truncated_cg(
        Euclidean(20), None, grad, lambda j, d: H @ d, 1e30, kappa=0.1, theta=1.0, min_inner=1, max_inner=200,
        forcing=1e-10,
    )  # fmt: skip
    exact = -torch.linalg.solve(H, grad)
    assert float(torch.linalg.vector_norm(eta - exact) / torch.linalg.vector_norm(exact)) < 1e-8, (inner, why)


def test_forcing_still_stops_at_the_boundary():
    H, grad = _quadratic()
    radius = 0.1 * float(torch.linalg.vector_norm(torch.linalg.solve(H, grad)))
    eta, _, _, why = truncated_cg(
        Euclidean(40), None, grad, lambda j, d: H @ d, radius, kappa=0.1, theta=1.0, min_inner=1, max_inner=40,
        forcing=1e-8,
    )  # fmt: skip
    assert why == "exceeded trust region"
    assert abs(float(torch.linalg.vector_norm(eta)) - radius) <= 1e-12 * radius


@pytest.mark.parametrize(
    ("previous", "g", "g_prev", "expected"),
    [
        (0.5, 1.0, 2.0, max(0.9 * 0.25, 0.9 * 0.25)),  # choice 2 and the safeguard 0.9·0.5² = 0.225 agree
        (0.5, 1e-3, 1.0, 0.9 * 0.5**2),  # a fast fall is held back by the safeguard while it exceeds 0.1
        (0.2, 1e-3, 1.0, 0.9e-6),  # safeguard 0.036 <= 0.1: off
        (0.9, 3.0, 1.0, 0.9),  # a rising gradient: capped at 0.9
        (0.3, 0.5, 0.0, 0.9 * 0.09),  # no previous gradient: the safeguard 0.081 <= 0.1 is off, η = 0 ...
    ],
)
def test_eisenstat_walker_choice_2(previous, g, g_prev, expected):
    got = eisenstat_walker(previous, g, g_prev)
    if g_prev == 0:  # ... then η = 0 (a zero forcing term: solve to the end)
        assert got == 0.0
    else:
        assert got == pytest.approx(expected, rel=1e-14)


def _run(H, b, **options):
    f = lambda x: 0.5 * x @ H @ x - b @ x  # noqa: E731
    return minimize(
        f, torch.zeros_like(b), "trust-region", manifold=Euclidean(len(b)), grad=lambda x: H @ x - b,
        hvp=lambda x, v: H @ v, **options,
    )  # fmt: skip


def test_cauchy_initial_radius_is_the_model_minimizer_along_minus_g():
    H, b = _quadratic()
    g = -b  # the gradient at 0
    res = _run(H, b, initial_radius="cauchy", max_radius=1e30, max_iter=1, gtol=0.0)
    expected = float(torch.linalg.vector_norm(g)) ** 3 / float(g @ H @ g)
    assert res.history[1]["radius"] == pytest.approx(expected, rel=1e-12)
    assert res.nhev == res.history[1]["inner_iter"]  # the radius's Hessian product is tCG's first: none extra


def test_forcing_run_converges_and_counts_hessian_products():
    H, b = _quadratic()
    # gtol well above the gradient's rounding floor (~1e-10 here, BLAS-dependent): below it ρ is noise
    res = _run(H, b, forcing="eisenstat-walker", initial_radius="cauchy", max_radius=1e6, gtol=1e-8)
    assert res.success, res.message
    exact = torch.linalg.solve(H, b)
    assert float(torch.linalg.vector_norm(res.x - exact) / torch.linalg.vector_norm(exact)) < 1e-7
    # near the solution η_k falls below what CG resolves in dim steps: "max inner iterations" ends those solves
    stops = {"forcing term", "exceeded trust region", "model increased", "max inner iterations"}
    assert "forcing term" in {h["tcg_stop"] for h in res.history[1:]} <= stops
    assert res.nhev == sum(h["inner_iter"] for h in res.history[1:])  # every step accepted: no replays


@pytest.mark.parametrize(("name", "value"), [("forcing", "ew"), ("forcing", 0.5), ("initial_radius", "cauch")])
def test_invalid_forcing_and_radius_options(name, value):
    H, b = _quadratic(n=5)
    with pytest.raises(ValueError, match=name):
        _run(H, b, **{name: value})


@pytest.mark.parametrize("option", ["theta", "kappa", "gradient_scale"])
def test_forcing_refuses_the_options_of_the_test_it_replaces(option):
    H, b = _quadratic(n=5)
    with pytest.raises(ValueError, match=option):
        _run(H, b, forcing="eisenstat-walker", **{option: 0.5})
