"""minimize(): every method against closed-form optima and dense references written here."""

import math

import pytest
import torch
from reference import Euclidean, matrix_projector, rel, tt_full, tt_projector

from lowrankopt import FixedRankMatrices, FixedTTRank, LowRankMatrix, TensorTrain, riemannian_grad, riemannian_hvp
from lowrankopt.optim import minimize

DT = torch.float64
# Status codes as documented in OptimizeResult (written out here, not imported from the code under test).
GTOL, MAX_ITER, MAX_TIME, FTOL, CALLBACK, NO_PROGRESS, PRECISION, NON_FINITE = 0, 1, 2, 3, 4, 5, 6, -1
DOCUMENTED = {GTOL, MAX_ITER, MAX_TIME, FTOL, CALLBACK, NO_PROGRESS, PRECISION, NON_FINITE}

ALL_METHODS = [("sd", {})] + [("cg", {"beta": b}) for b in ("fr", "pr+", "hs", "hz")] + [("trust-region", {})]
IDS = ["sd", "cg-fr", "cg-pr+", "cg-hs", "cg-hz", "trust-region"]


# ---------------------------------------------------------------------------------------------- problems
MSHAPE, MRANK = (30, 20), 3


def matrix_problem(dtype=DT):
    """½‖X − A‖² over rank-3 matrices: the optimum is the truncated SVD (Eckart–Young), computed densely."""
    A = torch.randn(*MSHAPE, dtype=DT, generator=torch.Generator().manual_seed(0))
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    fstar = 0.5 * float((s[MRANK:] ** 2).sum())
    Xstar = U[:, :MRANK] @ torch.diag(s[:MRANK]) @ Vh[:MRANK]
    x0 = (
        FixedRankMatrices(*MSHAPE, MRANK)
        .random_point(generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        .to(dtype)
    )
    Ad = A.to(dtype)
    return (lambda X: 0.5 * ((X.full() - Ad) ** 2).sum()), x0, A, s, fstar, Xstar


TSHAPE, TRANKS = (4, 5, 4, 3), (2, 3, 2)


def tt_problem(start_seed=1):
    """½‖X − A‖² over TT-ranks (2, 3, 2); A is a TT of exactly these ranks plus dense noise of size 1e-3."""
    g = torch.Generator().manual_seed(0)
    A = tt_full(TensorTrain.random(TSHAPE, list(TRANKS), generator=g, dtype=torch.float64).cores)
    A = A + 1e-3 * torch.randn(TSHAPE, dtype=DT, generator=g)
    x0 = FixedTTRank(TSHAPE, TRANKS).random_point(
        generator=torch.Generator().manual_seed(start_seed), dtype=torch.float64
    )
    return (lambda X: 0.5 * ((X.full() - A) ** 2).sum()), x0, A


def dense_f(A):
    return lambda X: 0.5 * float(((X - A) ** 2).sum())


class Sphere:
    """The unit sphere in ℝⁿ: points are unit vectors, tangent vectors plain tensors orthogonal to x."""

    def __init__(self, n):
        self.n = n

    @property
    def dim(self):
        return self.n - 1

    def retr(self, x, v):
        y = x + v
        return y / torch.linalg.vector_norm(y)

    def transp(self, x, y, v):
        return v - y * (y @ v)

    def inner(self, x, u, v):
        return u @ v

    def norm(self, x, v):
        return torch.linalg.vector_norm(v)


def rayleigh(n=10, seed=0, counts=None):
    """f(x) = xᵀBx on the sphere with its Riemannian gradient and Hessian in closed form."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, dtype=DT, generator=g)
    B = B + B.T
    x0 = torch.randn(n, dtype=DT, generator=g)
    x0 = x0 / torch.linalg.vector_norm(x0)
    counts = {} if counts is None else counts

    def tick(name):
        counts[name] = counts.get(name, 0) + 1

    def f(x):
        tick("f")
        return x @ B @ x

    def grad(x):
        tick("grad")
        return 2 * (B @ x - (x @ B @ x) * x)

    def hvp(x, v):
        tick("hvp")
        w = 2 * (B @ v)
        return w - x * (x @ w) - 2 * (x @ B @ x) * v

    return Sphere(n), B, x0, f, grad, hvp


def ratios(history, lo=1e-13, hi=1e-2):
    g = [h["grad_norm"] for h in history]
    return [(a, b) for a, b in zip(g, g[1:]) if a < hi and b > lo]


# ---------------------------------------------------------------------------------------------- 1. matrices
@pytest.mark.parametrize("method,opts", ALL_METHODS, ids=IDS)
def test_matrix_best_rank_r_approximation(method, opts):
    f, x0, A, _, fstar, Xstar = matrix_problem()
    res = minimize(f, x0, method, gtol=1e-10, **opts)
    # gtol = 1e-10 is near the gradient's rounding noise here: either stop is a converged one.
    assert res.success and res.status in (GTOL, PRECISION), res.message
    assert abs(res.fun - fstar) <= 1e-12 * fstar
    assert res.fun == pytest.approx(dense_f(A)(res.x.full()), rel=1e-13)
    assert rel(res.x.full(), Xstar) < {"sd": 1e-6, "cg": 3e-7, "trust-region": 1e-12}[method]
    if method == "trust-region":
        assert res.status == GTOL and res.grad_norm <= 1e-10
    assert res.method == method and res.nit == res.history[-1]["iter"]
    assert res.fun == res.history[-1]["fun"] and res.grad_norm == res.history[-1]["grad_norm"]


@pytest.mark.parametrize(
    "method,opts",
    [("cg", {"restart_threshold": 0.1}), ("cg", {"initial_step": "secant"}), ("sd", {"initial_step": "secant"})],
)
def test_matrix_line_search_variants(method, opts):
    f, x0, _, _, fstar, Xstar = matrix_problem()
    res = minimize(f, x0, method, gtol=1e-10, max_iter=3000, **opts)
    assert res.success and res.status in (GTOL, PRECISION), res.message
    assert abs(res.fun - fstar) <= 1e-12 * fstar
    assert rel(res.x.full(), Xstar) < 1e-6
    if opts.get("initial_step") == "secant":
        assert res.nhev == 0


def test_matrix_dense_riemannian_gradient_matches_reported_one():
    f, x0, A, _, _, _ = matrix_problem()
    res = minimize(f, x0, "cg", max_iter=5)
    X = res.x.full()
    dense = (matrix_projector(X, MRANK) @ (X - A).reshape(-1)).reshape(X.shape)
    assert res.grad_norm == pytest.approx(float(torch.linalg.vector_norm(dense)), rel=1e-12)
    assert rel(res.grad.to_ambient().full(), dense) < 1e-12


@pytest.mark.parametrize("method", ["sd", "cg", "trust-region"])
def test_start_at_the_optimum_stops_immediately(method):
    f, _, A, *_ = matrix_problem()
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    x0 = LowRankMatrix(U[:, :MRANK], torch.diag(s[:MRANK]), Vh[:MRANK].T)
    res = minimize(f, x0, method, gtol=1e-10)
    assert (res.status, res.success, res.nit) == (GTOL, True, 0)
    assert res.x is x0 and res.nfev == 1 and res.ngev == 1


def test_x0_must_lie_on_the_given_manifold():
    f, x0, *_ = matrix_problem()
    with pytest.raises(ValueError, match="rank"):
        minimize(f, x0, "cg", manifold=FixedRankMatrices(*MSHAPE, MRANK - 1))


# ---------------------------------------------------------------------------------------------- 2. tensor trains
def test_tt_approximation_all_methods_reach_the_same_critical_point():
    f, x0, A = tt_problem()
    f_svd = dense_f(A)(tt_full(TensorTrain.from_dense(A, max_rank=list(TRANKS)).cores))
    values = []
    for method, opts in ALL_METHODS:
        res = minimize(f, x0, method, gtol=1e-9, **opts)
        assert res.success and res.status == GTOL, (method, opts, res.message)
        assert res.grad_norm <= 1e-9 and res.x.ranks == TRANKS
        X = tt_full(res.x.cores)
        assert res.fun == pytest.approx(dense_f(A)(X), rel=1e-12)
        # the dense Riemannian gradient: P_X(X − A) with the projector from a dense Jacobian
        pg = float(torch.linalg.vector_norm(tt_projector(res.x) @ (X - A).reshape(-1)))
        assert pg <= 2e-9
        assert abs(pg - res.grad_norm) <= 1e-13
        assert res.fun <= f_svd  # at least as good as the quasi-optimal TT-SVD truncation
        values.append(res.fun)
    assert max(values) - min(values) <= 1e-8 * min(values)


# ---------------------------------------------------------------------------------------------- 3. local rates
def test_trust_region_converges_quadratically_and_steepest_descent_does_not():
    f, x0, *_ = matrix_problem()
    tr = minimize(f, x0, "trust-region", gtol=1e-13)
    pairs = ratios(tr.history)
    assert len(pairs) >= 2
    assert all(b <= 10 * a * a for a, b in pairs), pairs
    assert tr.history[-1]["grad_norm"] < 1e-12
    sd = minimize(f, x0, "sd", gtol=1e-13, max_iter=400)
    pairs = ratios(sd.history)
    assert len(pairs) >= 20
    assert min(b / a for a, b in pairs) > 0.1  # linear, no better than a contraction by 10 per step


def test_without_curvature_the_rate_is_the_singular_value_ratio():
    """With curvature=False the Hessian of ½‖X − A‖² is the identity on T_X, so trust-region takes the
    step −grad: X⁺ = R(P_X A), a subspace iteration whose rate is σ_{r+1}/σ_r — the curvature term of the
    Riemannian Hessian does not vanish at this critical point (A − X* ≠ 0)."""
    f, x0, _, s, fstar, _ = matrix_problem()
    res = minimize(f, x0, "trust-region", curvature=False, gtol=1e-10)
    assert res.success and abs(res.fun - fstar) <= 1e-12 * fstar
    tail = [b / a for a, b in ratios(res.history, lo=1e-6, hi=1e-3)]
    assert len(tail) >= 10
    expected = float(s[MRANK] / s[MRANK - 1])
    assert all(abs(q - expected) < 1e-3 for q in tail), (expected, tail)


# ---------------------------------------------------------------------------------------------- 4. any manifold
@pytest.mark.parametrize("method,opts", ALL_METHODS, ids=IDS)
def test_rayleigh_quotient_on_a_user_sphere(method, opts):
    M, B, x0, f, grad, hvp = rayleigh()
    lam = float(torch.linalg.eigvalsh(B)[0])
    res = minimize(f, x0, method, manifold=M, grad=grad, hvp=hvp, gtol=1e-11, **opts)
    assert res.success, res.message
    assert abs(res.fun - lam) <= 1e-10 * abs(lam)
    assert abs(float(torch.linalg.vector_norm(res.x)) - 1) < 1e-14
    assert float(torch.linalg.vector_norm(B @ res.x - lam * res.x)) < 1e-5


@pytest.mark.parametrize("method", ["cg", "sd"])
def test_rayleigh_quotient_without_hessian_uses_secant_steps(method):
    M, B, x0, f, grad, _ = rayleigh()
    lam = float(torch.linalg.eigvalsh(B)[0])
    res = minimize(f, x0, method, manifold=M, grad=grad, gtol=1e-11, max_iter=2000)
    assert res.success, res.message
    assert abs(res.fun - lam) <= 1e-10 * abs(lam)
    assert res.nhev == 0


def test_user_manifold_needs_grad_and_trust_region_needs_hvp():
    M, _, x0, f, grad, _ = rayleigh()
    with pytest.raises(TypeError, match="grad="):
        minimize(f, x0, "cg", manifold=M)
    with pytest.raises(TypeError, match="hvp="):
        minimize(f, x0, "trust-region", manifold=M, grad=grad)
    with pytest.raises(TypeError, match="hvp="):
        minimize(f, x0, "cg", manifold=M, grad=grad, initial_step="model")


def test_user_callables_are_counted_exactly():
    """nfev / ngev / nhev against counters inside the user's f, grad and hvp."""
    counts = {}
    M, _, x0, f, grad, hvp = rayleigh(counts=counts)
    for method in ("trust-region", "cg", "sd"):
        counts.clear()
        res = minimize(f, x0, method, manifold=M, grad=grad, hvp=hvp, gtol=1e-11)
        assert (res.nfev, res.ngev, res.nhev) == (counts["f"], counts["grad"], counts["hvp"]), method
        assert res.nhev > 0


# ---------------------------------------------------------------------------------------------- 5. options
def test_unknown_option_and_method():
    f, x0, *_ = matrix_problem()
    with pytest.raises(TypeError, match="bogus"):
        minimize(f, x0, "cg", bogus=1)
    with pytest.raises(TypeError, match="rho_prime"):
        minimize(f, x0, "cg", rho_prime=0.1)  # a trust-region option
    with pytest.raises(TypeError, match="beta"):
        minimize(f, x0, "sd", beta="fr")
    with pytest.raises(TypeError, match="initial_step"):
        minimize(f, x0, "trust-region", initial_step="model")
    with pytest.raises(ValueError, match="newton"):
        minimize(f, x0, "newton")


@pytest.mark.parametrize(
    "method,opts,exc",
    [
        ("cg", {"max_iter": -1}, ValueError),
        ("cg", {"max_iter": 2.5}, ValueError),
        ("sd", {"gtol": -1}, ValueError),
        ("cg", {"ftol": -1e-3}, ValueError),
        ("cg", {"max_time": 0}, ValueError),
        ("cg", {"beta": "xx"}, ValueError),
        ("sd", {"initial_step": "xx"}, ValueError),
        ("cg", {"c1": 0.9}, ValueError),
        ("trust-region", {"rho_prime": 0.5}, ValueError),
        ("trust-region", {"initial_radius": 0.0}, ValueError),
        ("trust-region", {"max_inner": 0}, ValueError),
        ("trust-region", {"gradient_scale": -1.0}, ValueError),
        ("trust-region", {"gradient_scale": "first"}, ValueError),
        ("cg", {"callback": 3}, TypeError),
        ("trust-region", {"callback": "stop"}, TypeError),
    ],
)
def test_bad_option_values(method, opts, exc):
    f, x0, *_ = matrix_problem()
    with pytest.raises(exc, match=next(iter(opts))):
        minimize(f, x0, method, **opts)


def test_initial_step_callable_replaces_hessian_products():
    """For ½‖X − A‖² the Euclidean Hessian is the identity, so ⟨η, P ∇²f P η⟩ = ‖η‖² (closed form)."""
    f, x0, A, s, fstar, Xstar = matrix_problem()
    calls = []

    def curvature_along(x, eta):
        calls.append(1)
        return float(eta.norm() ** 2)

    res = minimize(f, x0, "cg", initial_step=curvature_along, gtol=1e-10, max_iter=500)
    assert res.nhev == 0 and len(calls) >= res.nit > 0
    assert res.fun == pytest.approx(fstar, rel=1e-12)


def test_gradient_scale_makes_trust_region_scale_invariant():
    """Scaling f by c changes nothing in exact arithmetic except Manopt's θ-test ‖r‖ ≤ ‖r₀‖ min(‖r₀‖^θ, κ);
    with gradient_scale="initial" the runs for f and c·f take the same inner iterations (until rounding at
    machine precision sets in), without it they differ."""
    f, x0, *_ = matrix_problem()
    runs = {}
    for scale in (None, "initial"):
        for c in (1.0, 1e4):
            res = minimize(lambda X, c=c: c * f(X), x0, "trust-region", gtol=0.0, max_iter=9, gradient_scale=scale)
            runs[scale, c] = [h.get("inner_iter") for h in res.history]
    assert runs["initial", 1.0] == runs["initial", 1e4]
    assert runs[None, 1.0] != runs[None, 1e4]


@pytest.mark.parametrize("method", ["sd", "cg", "trust-region"])
def test_max_iter(method):
    f, x0, *_ = matrix_problem()
    res = minimize(f, x0, method, max_iter=3)
    assert (res.status, res.success, res.nit) == (MAX_ITER, False, 3)
    assert [h["iter"] for h in res.history] == [0, 1, 2, 3]


@pytest.mark.parametrize("method", ["cg", "trust-region"])
def test_callback_stops_and_can_annotate_history(method):
    f, x0, A, *_ = matrix_problem()
    seen = []

    def callback(r):
        seen.append(r.nit)
        r.history[-1]["dense_f"] = dense_f(A)(r.x.full())
        return r.nit == 4

    res = minimize(f, x0, method, callback=callback)
    assert (res.status, res.success, res.nit) == (CALLBACK, True, 4)
    assert seen == [0, 1, 2, 3, 4]
    assert all(h["dense_f"] == pytest.approx(h["fun"], rel=1e-13) for h in res.history)


def test_callback_raising_stop_iteration():
    f, x0, *_ = matrix_problem()

    def callback(r):
        if r.nit == 2:
            raise StopIteration

    res = minimize(f, x0, "cg", callback=callback)
    assert (res.status, res.success, res.nit) == (CALLBACK, True, 2)


def test_max_time():
    f, x0, *_ = matrix_problem()
    res = minimize(f, x0, "cg", max_time=1e-9)
    assert (res.status, res.success, res.nit) == (MAX_TIME, False, 0)
    assert res.time >= res.history[-1]["time"] >= 0


def test_ftol_stops_on_relative_change():
    f, x0, *_ = matrix_problem()
    res = minimize(f, x0, "cg", ftol=1e-3)
    assert res.status == FTOL and res.success
    prev, last = res.history[-2]["fun"], res.history[-1]["fun"]
    assert abs(prev - last) <= 1e-3 * max(abs(prev), abs(last))
    assert all(
        abs(a["fun"] - b["fun"]) > 1e-3 * max(abs(a["fun"]), abs(b["fun"]))
        for a, b in zip(res.history[:-2], res.history[1:-1])
    )


@pytest.mark.parametrize("method", ["sd", "cg", "trust-region"])
@pytest.mark.parametrize("offset", [1e8, 1e20])
def test_f_with_a_large_constant_still_reaches_gtol(method, offset):
    """f = c + ½‖X − A‖²: the loss's changes vanish in f's last bits (for c = 1e20 f never changes at all), but
    the gradient is exact. Stopping there with success (the old "f stopped changing" stop) was wrong: the
    line search falls back on the derivative along the step and the run reaches gtol."""
    f, x0, _, _, fstar, Xstar = matrix_problem()
    res = minimize(lambda X: offset + f(X), x0, method, gtol=1e-8)
    assert (res.status, res.success) == (GTOL, True), res.message
    assert res.grad_norm <= 1e-8
    assert rel(res.x.full(), Xstar) < 1e-7


@pytest.mark.parametrize("method", ["sd", "cg", "trust-region"])
def test_a_stall_above_the_noise_is_not_a_success(method):
    """A gradient that does not belong to f (here: minus f's gradient, so every step goes uphill) makes the
    method stall at a non-stationary point; that stop is reported as no progress, with success False and why."""
    f, x0, *_ = matrix_problem()
    M = FixedRankMatrices(*MSHAPE, MRANK)

    def grad(x):
        return -riemannian_grad(f, x)[1]

    def hvp(x, v):
        return riemannian_hvp(f, x, v)

    res = minimize(f, x0, method, grad=grad, hvp=hvp, manifold=M, max_iter=500)
    assert (res.status, res.success) == (NO_PROGRESS, False), res.message
    assert "not stationary" in res.message and res.grad_norm > 1.0


@pytest.mark.parametrize("method", ["sd", "cg", "trust-region"])
def test_a_gradient_that_depends_on_the_factorization_is_never_a_converged_floor(method):
    """A user gradient that reads the factors (here: scaled by S's off-diagonal mass, exact at diagonal-S points)
    differs between two factorizations of one point by far more than rounding: the floor test must not take
    that difference for rounding noise and call a non-stationary point converged (it did, for f = 1e8 + loss)."""
    M = FixedRankMatrices(20, 15, 3)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(20, 15, dtype=DT, generator=g)

    def f(X):
        return 1e8 + 0.5 * ((X.full() - A) ** 2).sum()

    def grad(x):
        off = float((x.S - torch.diag(torch.diagonal(x.S))).abs().sum())
        return riemannian_grad(f, x)[1] * (1 + 100 * off)

    res = minimize(
        f,
        M.random_point(generator=g, dtype=torch.float64),
        method,
        grad=grad,
        hvp=lambda x, v: riemannian_hvp(f, x, v),
        manifold=M,
        gtol=1e-8,
        max_iter=300,
    )
    true = float(M.norm(res.x, riemannian_grad(f, res.x)[1]))
    assert not res.success or true <= 1e-8, (res.status, res.message, true)
    if res.status == NO_PROGRESS:
        assert "factorizations" in res.message


def test_no_extra_evaluations_far_from_the_floor():
    """The floor tests measure rounding noise only when f's change looks like rounding: a float64 run that
    reaches gtol = 1e-6 evaluates the gradient once per iterate, plus at most one measurement (one gradient)."""
    f, x0, *_ = matrix_problem()
    for method in ("sd", "cg", "trust-region"):
        res = minimize(f, x0, method)
        assert res.status == GTOL and res.ngev <= res.nit + 2, (method, res.ngev, res.nit)


def _permuted_sum_problem(seed):
    """The float32 problem with f summed in a random order: another rounding of the same f, as another BLAS
    kernel would give."""
    f, x0, A, s, fstar, Xstar = matrix_problem(torch.float32)
    perm = torch.randperm(MSHAPE[0] * MSHAPE[1], generator=torch.Generator().manual_seed(seed))
    A32 = A.to(torch.float32).reshape(-1)[perm]
    return (lambda X: 0.5 * ((X.full().reshape(-1)[perm] - A32) ** 2).sum()), x0, fstar, Xstar


@pytest.mark.parametrize("method", ["sd", "cg", "trust-region"])
def test_status_does_not_depend_on_how_f_rounds(method):
    """Five roundings of one float32 problem: every run ends as a converged one (GTOL or the floor), never as
    "line search failed" or max_iter, and at the same answer to float32 precision."""
    for seed in range(5):
        f, x0, fstar, Xstar = _permuted_sum_problem(seed)
        res = minimize(f, x0, method)
        assert res.success and res.status in (GTOL, PRECISION), (seed, res.message)
        assert abs(res.fun - fstar) <= 1e-6 * fstar and rel(res.x.full().double(), Xstar) < 1e-4


@pytest.mark.parametrize("every", [1, 2])
def test_verbose_table(capsys, every):
    f, x0, *_ = matrix_problem()
    res = minimize(f, x0, "trust-region", max_iter=5, verbose=every)
    lines = capsys.readouterr().out.strip().splitlines()
    assert "iter" in lines[0] and "radius" in lines[0]
    rows = lines[1:-1]
    assert [int(r.split()[0]) for r in rows] == [h["iter"] for h in res.history if h["iter"] % every == 0]
    assert lines[-1].startswith("trust-region") and "max_iter" in lines[-1]


def test_silent_by_default(capsys):
    f, x0, *_ = matrix_problem()
    minimize(f, x0, "cg", max_iter=3)
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------- 6. non-finite
def nan_after(f, n):
    """f that returns NaN from its n-th call on (calls include the optimizer's Hessian passes)."""
    calls = [0]

    def g(X):
        calls[0] += 1
        loss = f(X)
        return loss * float("nan") if calls[0] >= n else loss

    return g


def nan_grad_after(f, n):
    """f whose value stays finite but whose gradient is NaN from its n-th call on (0 · ∞ in backward)."""
    calls = [0]

    def g(X):
        calls[0] += 1
        loss = f(X)
        return loss + 0.0 * torch.sqrt(torch.abs(loss - loss.detach())) if calls[0] >= n else loss

    return g


def check_non_finite_stop(res, f, x0):
    assert (res.status, res.success) == (NON_FINITE, False)
    assert "nan" in res.message.lower()
    assert math.isfinite(res.fun) and math.isfinite(res.grad_norm)
    assert res.fun == res.history[-1]["fun"]
    assert res.fun == pytest.approx(float(f(res.x)), rel=1e-13)  # a fresh, finite f at the returned point


@pytest.mark.parametrize("n", [2, 7, 20])
@pytest.mark.parametrize("method,curvature", [("cg", True), ("sd", True), ("trust-region", False)])
def test_nan_value_stops_at_last_finite_point(method, curvature, n):
    f, x0, *_ = matrix_problem()
    res = minimize(nan_after(f, n), x0, method, curvature=curvature)
    check_non_finite_stop(res, f, x0)
    if n > 2:  # the NaN came after some progress: the last finite iterate is returned, not x0
        assert res.nit >= 1 and res.fun < res.history[0]["fun"]


@pytest.mark.parametrize("n", [2, 4, 10])  # calls of f that fall in the curvature pass of an HVP
def test_nan_in_hessian_products_stops_trust_region(n):
    f, x0, *_ = matrix_problem()
    res = minimize(nan_after(f, n), x0, "trust-region", curvature=True)
    check_non_finite_stop(res, f, x0)


@pytest.mark.parametrize("n", [2, 7])
@pytest.mark.parametrize("method", ["cg", "trust-region"])
def test_nan_gradient_stops_at_last_finite_point(method, n):
    f, x0, *_ = matrix_problem()
    res = minimize(nan_grad_after(f, n), x0, method, curvature=False)
    check_non_finite_stop(res, f, x0)
    assert "grad" in res.message


@pytest.mark.parametrize("method", ["cg", "trust-region", "sd"])
def test_nan_at_the_initial_point(method):
    f, x0, *_ = matrix_problem()
    res = minimize(nan_after(f, 1), x0, method)
    assert (res.status, res.success, res.nit) == (NON_FINITE, False, 0)
    assert res.x is x0 and math.isnan(res.fun)
    assert "initial" in res.message
    assert len(res.history) == 1 and math.isnan(res.history[0]["fun"])  # the start is recorded all the same


def test_nan_on_a_user_manifold_stops_trust_region():
    """On a manifold with plain-tensor tangent vectors NaN Hessian products propagate to the trial point."""
    M, _, x0, f, grad, hvp = rayleigh()
    calls = [0]

    def bad_hvp(x, v):
        calls[0] += 1
        return hvp(x, v) * float("nan") if calls[0] >= 5 else hvp(x, v)

    res = minimize(f, x0, "trust-region", manifold=M, grad=grad, hvp=bad_hvp, gtol=1e-12)
    assert (res.status, res.success) == (NON_FINITE, False)
    assert math.isfinite(res.fun) and res.fun == res.history[-1]["fun"]
    assert res.fun == pytest.approx(float(f(res.x)), rel=1e-14)


# ---------------------------------------------------------------------------------------------- 7. counters
@pytest.mark.parametrize("initial_step", ["model", "secant"])
@pytest.mark.parametrize("method", ["sd", "cg"])
def test_line_search_counters_follow_the_history(method, initial_step):
    f, x0, *_ = matrix_problem()
    # curvature=False: the model curvature ⟨η, P η⟩ > 0, so every first trial is the model step
    res = minimize(f, x0, method, curvature=False, initial_step=initial_step, max_iter=40)
    h = res.history
    assert (h[0]["nfev"], h[0]["ngev"]) == (1, 1)
    backtracked = 0
    for a, b in zip(h, h[1:]):
        k = b["backtracks"]
        backtracked += k > 0
        assert b["ngev"] - a["ngev"] == 1
        # model: the first trial is evaluated with its gradient; secant: value first, gradient after
        assert b["nfev"] - a["nfev"] == (1 if initial_step == "model" and k == 0 else k + 2)
        assert b["nhev"] - a["nhev"] == (1 if initial_step == "model" else 0)
    assert (res.nfev, res.ngev, res.nhev) == (h[-1]["nfev"], h[-1]["ngev"], h[-1]["nhev"])
    if initial_step == "secant":
        assert backtracked > 0  # the k > 0 branch was exercised


def trust_region_hvp_accounting(history):
    """Check each iteration's nhev increment against tCG's cache of Hessian products; return #rejections."""
    cached, rejected = 0, 0
    for a, b in zip(history, history[1:]):
        assert b["ngev"] - a["ngev"] == 1 and b["nfev"] - a["nfev"] == 1
        new = b["nhev"] - a["nhev"]
        assert new == max(0, b["inner_iter"] - cached), (a, b)
        cached = max(cached, b["inner_iter"])
        if b["accepted"]:
            cached = 0
        else:
            rejected += 1
            assert b["fun"] == a["fun"]  # the point stays
    return rejected


def test_trust_region_rejected_steps_reuse_hessian_products():
    f, x0, _ = tt_problem(start_seed=2)
    res = minimize(f, x0, "trust-region", initial_radius=100.0, max_radius=200.0, gtol=1e-9)
    assert res.success
    assert trust_region_hvp_accounting(res.history) >= 2
    assert res.nhev == res.history[-1]["nhev"]


def test_trust_region_rejections_on_the_sphere_are_counted_exactly():
    counts = {}
    M, B, x0, f, grad, hvp = rayleigh(counts=counts)
    res = minimize(f, x0, "trust-region", manifold=M, grad=grad, hvp=hvp, initial_radius=10.0, max_radius=20.0)
    assert res.success and abs(res.fun - float(torch.linalg.eigvalsh(B)[0])) < 1e-10
    assert trust_region_hvp_accounting(res.history) >= 1
    assert counts["hvp"] == res.nhev


# ---------------------------------------------------------------------------------------------- 8. determinism, float32
@pytest.mark.parametrize("method", ["cg", "trust-region"])
def test_identical_runs_give_identical_histories(method):
    f, x0, *_ = matrix_problem()
    a = minimize(f, x0, method, max_iter=30)
    b = minimize(f, x0, method, max_iter=30)
    assert [h["fun"] for h in a.history] == [h["fun"] for h in b.history]
    assert [h["grad_norm"] for h in a.history] == [h["grad_norm"] for h in b.history]
    assert torch.equal(a.x.full(), b.x.full())


@pytest.mark.parametrize("method,opts", ALL_METHODS, ids=IDS)
def test_float32(method, opts):
    """gtol = 1e-6 is below the float32 rounding noise of this gradient (≈ 4e-6): every method must stop at
    the floor as a converged run — on any BLAS (MKL_CBWR=COMPATIBLE used to end sd in "line search failed") —
    with f at f* to float32 precision and X at X* to what the gradient's noise allows."""
    f, x0, _, _, fstar, Xstar = matrix_problem(torch.float32)
    res = minimize(f, x0, method, **opts)
    assert res.x.dtype == torch.float32 and res.success and res.status in (GTOL, PRECISION), res.message
    assert abs(res.fun - fstar) <= 1e-6 * fstar
    assert rel(res.x.full().double(), Xstar) < 1e-4
    assert res.grad_norm <= 1e-4  # 25x the noise: the floor test does not stop far above it


# ---------------------------------------------------------------------------------------------- 9. curvature
@pytest.mark.parametrize("curvature", [True, False])
@pytest.mark.parametrize("method", ["sd", "cg", "trust-region"])
def test_curvature_option(method, curvature):
    f, x0, A = tt_problem()
    res = minimize(f, x0, method, curvature=curvature, gtol=1e-9)
    assert res.success and res.status == GTOL, res.message
    X = tt_full(res.x.cores)
    assert float(torch.linalg.vector_norm(tt_projector(res.x) @ (X - A).reshape(-1))) <= 2e-9


def test_cg_rules_with_exact_steps_reproduce_linear_cg_on_a_quadratic():
    """On ½xᵀAx − bᵀx with exact line searches all four β rules coincide with linear CG (Hestenes–Stiefel
    1952), iterate by iterate: a hand-written CG below is the reference."""
    g = torch.Generator().manual_seed(0)
    n = 30
    Q = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=g))[0]
    A = Q @ torch.diag(torch.logspace(0, 2, n, dtype=DT)) @ Q.T
    b = torch.randn(n, dtype=DT, generator=g)
    f = lambda x: 0.5 * x @ A @ x - b @ x  # noqa: E731
    x, r = torch.zeros(n, dtype=DT), b.clone()
    p, ref = r.clone(), []
    for _ in range(12):
        a = (r @ r) / (p @ A @ p)
        x = x + a * p
        r_new = r - a * (A @ p)
        p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
        ref.append(float(f(x)))
    for beta in ("fr", "pr+", "hs", "hz"):
        res = minimize(
            f,
            torch.zeros(n, dtype=DT),
            "cg",
            manifold=Euclidean(n),
            grad=lambda x: A @ x - b,
            hvp=lambda x, v: A @ v,
            beta=beta,
            gtol=0.0,
            max_iter=12,
        )
        got = [h["fun"] for h in res.history[1:]]
        assert got == pytest.approx(ref, rel=1e-12), beta


def test_user_hvp_is_used_with_autodiff_gradients():
    f, x0, *_ = matrix_problem()
    calls = []

    def hvp(x, v):
        calls.append(1)
        return riemannian_hvp(f, x, v)

    res = minimize(f, x0, "trust-region", hvp=hvp, gtol=1e-10)
    assert res.success and len(calls) == res.nhev > 0
