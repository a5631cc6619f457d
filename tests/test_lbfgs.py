"""minimize(method="lbfgs"): Riemannian L-BFGS against dense references written here (truncated SVD, eigh, TT
projectors from dense Jacobians), and its Wolfe line search checked on f along the retraction, recomputed here."""

import math

import pytest
import torch
from reference import Euclidean, rel, tt_full, tt_projector
from test_optim import nan_after
from test_optim import rayleigh as optim_rayleigh

from lowrankopt import FixedRankMatrices, FixedTTRank, TensorTrain, riemannian_grad
from lowrankopt.completion import complete, sample_indices
from lowrankopt.optim import minimize

DT = torch.float64
# Status codes as documented in OptimizeResult (written out here, not imported from the code under test).
GTOL, MAX_ITER, MAX_TIME, FTOL, CALLBACK, NO_PROGRESS, PRECISION, NON_FINITE = 0, 1, 2, 3, 4, 5, 6, -1


# ---------------------------------------------------------------------------------------------- problems
SHAPE, RANK = (30, 20), 3


def best_rank_r(dtype=DT):
    """½‖X − A‖² over rank-3 matrices: the optimum is the truncated SVD of A (Eckart–Young), computed densely."""
    A = torch.randn(*SHAPE, dtype=DT, generator=torch.Generator().manual_seed(0))
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    Xstar = U[:, :RANK] @ torch.diag(s[:RANK]) @ Vh[:RANK]
    fstar = 0.5 * float((s[RANK:] ** 2).sum())
    x0 = FixedRankMatrices(*SHAPE, RANK).random_point(generator=torch.Generator().manual_seed(1), dtype=DT)
    Ad = A.to(dtype)
    return (lambda X: 0.5 * ((X.full() - Ad) ** 2).sum()), x0.to(dtype), Xstar, fstar, A


def rayleigh(n=12, counts=None):
    """xᵀBx on the sphere with its Riemannian gradient and Hessian in closed form, counting the calls
    (test_optim's problem)."""
    return optim_rayleigh(n, 0, counts)


def rosenbrock(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def autograd_grad(f):
    def grad(x):
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(f(x), x)[0]

    return grad


def rosenbrock_start(n):
    x0 = torch.full((n,), -1.2, dtype=DT)
    x0[1::2] = 1.0
    return x0


def record_points(store):
    def callback(r):
        store.append(r.x)

    return callback


# ---------------------------------------------------------------------------------------------- (a) best rank-r
def test_best_rank_r_approximation_is_the_truncated_svd_in_few_iterations():
    f, x0, Xstar, fstar, A = best_rank_r()
    res = minimize(f, x0, "lbfgs", gtol=1e-10)
    assert (res.status, res.success) == (GTOL, True), res.message
    assert res.grad_norm <= 1e-10 and res.method == "lbfgs"
    assert abs(res.fun - fstar) <= 1e-12 * fstar
    assert rel(res.x.full(), Xstar) < 1e-8
    # the dense residual at the returned point agrees with the reported f
    assert res.fun == pytest.approx(0.5 * float(((res.x.full() - A) ** 2).sum()), rel=1e-13)
    # steepest descent with three times the iterations is still short of gtol (it needs about 270)
    sd = minimize(f, x0, "sd", gtol=1e-10, max_iter=3 * res.nit)
    assert sd.status == MAX_ITER
    h = res.history
    assert res.nit == h[-1]["iter"] and (res.nfev, res.ngev, res.nhev) == (h[-1]["nfev"], h[-1]["ngev"], h[-1]["nhev"])
    assert res.nhev == 1  # one Hessian quadratic form: the model step of the first iteration
    assert max(rec["memory"] for rec in h[1:]) == 10 and [rec["memory"] for rec in h[1:4]] == [0, 1, 2]
    assert all(rec["evaluations"] >= 1 and rec["step_size"] > 0 and rec["wolfe"] for rec in h[1:])
    # near the end f's changes are rounding: the zoom then interpolates φ' alone and stays short (it took 25 trials
    # when it fitted a cubic to the rounding of f)
    assert max(rec["evaluations"] for rec in h[1:]) <= 3


def test_large_constant_in_f_still_reaches_gtol():
    """f = 1e8 + ½‖X − A‖²: f's changes are rounding near the end; the derivative-based tests carry on."""
    f, x0, Xstar, *_ = best_rank_r()
    res = minimize(lambda X: 1e8 + f(X), x0, "lbfgs", gtol=1e-8)
    assert (res.status, res.success) == (GTOL, True), res.message
    assert rel(res.x.full(), Xstar) < 1e-7
    assert max(rec["evaluations"] for rec in res.history[1:]) <= 3


@pytest.mark.parametrize("memory", [1, 3])
def test_memory_is_capped(memory):
    f, x0, Xstar, fstar, A = best_rank_r()
    res = minimize(f, x0, "lbfgs", gtol=1e-9, memory=memory, max_iter=500)
    assert res.success and rel(res.x.full(), Xstar) < 1e-7
    assert max(rec["memory"] for rec in res.history[1:]) == memory


# ---------------------------------------------------------------------------------------------- (b), (c) completion, TT
def test_matrix_completion_reaches_the_planted_matrix():
    g = torch.Generator().manual_seed(0)
    (m, n), r = (60, 50), 3
    A = torch.randn(m, r, dtype=DT, generator=g) @ torch.randn(r, n, dtype=DT, generator=g)
    idx = sample_indices((m, n), 5 * r * (m + n - r), generator=g)
    tidx = sample_indices((m, n), 500, generator=g)
    test = (tidx, A[tidx[:, 0], tidx[:, 1]])
    res = complete(idx, A[idx[:, 0], idx[:, 1]], (m, n), r, method="lbfgs", test=test, generator=g)
    assert res.success, res.message
    assert res.test_error <= 1e-8 and rel(res.x.full(), A) <= 1e-8
    X = res.x.full()
    assert res.test_error == pytest.approx(rel(X[tidx[:, 0], tidx[:, 1]], test[1]), rel=1e-6, abs=1e-15)


def test_tt_approximation_reaches_a_critical_point():
    g = torch.Generator().manual_seed(0)
    shape, ranks = (4, 5, 4, 3), (2, 3, 2)
    A = tt_full(TensorTrain.random(shape, list(ranks), generator=g, dtype=DT).cores)
    A = A + 1e-3 * torch.randn(shape, dtype=DT, generator=g)
    x0 = FixedTTRank(shape, ranks).random_point(generator=torch.Generator().manual_seed(1), dtype=DT)
    res = minimize(lambda X: 0.5 * ((X.full() - A) ** 2).sum(), x0, "lbfgs", gtol=1e-9)
    assert (res.status, res.success) == (GTOL, True), res.message
    X = tt_full(res.x.cores)
    assert res.fun == pytest.approx(0.5 * float(((X - A) ** 2).sum()), rel=1e-12)
    # the Riemannian gradient from a dense projector (Jacobian of the cores → full tensor)
    assert float(torch.linalg.vector_norm(tt_projector(res.x) @ (X - A).reshape(-1))) <= 2e-9
    svd = tt_full(TensorTrain.from_dense(A, max_rank=list(ranks)).cores)
    assert res.fun <= 0.5 * float(((svd - A) ** 2).sum())  # at least as good as the quasi-optimal TT-SVD


def test_tt_completion_reaches_the_planted_tensor():
    g = torch.Generator().manual_seed(0)
    shape, r = (6, 6, 6, 6), 2
    truth = TensorTrain.random(shape, [r] * 3, generator=g, dtype=DT)
    A = tt_full(truth.cores)
    idx = sample_indices(shape, 6 * FixedTTRank(shape, r).dim, generator=g)
    x0 = TensorTrain.from_dense(A + 1e-2 * torch.randn(shape, dtype=DT, generator=g), max_rank=r)
    res = complete(idx, A[tuple(idx.T)], shape, r, method="lbfgs", x0=x0)
    assert res.success, res.message
    assert rel(tt_full(res.x.cores), A) <= 1e-8


# ---------------------------------------------------------------------------------------------- (d) Wolfe conditions
def sufficient_decrease(f0, f1, slope0, slope1, c1):
    """Armijo's condition, or where f's change is rounding (8 ulps) the documented approximate Wolfe condition
    φ'(α) ≤ (2 c1 − 1) φ'(0) (Hager–Zhang)."""
    rounding = abs(f1 - f0) <= 8 * torch.finfo(DT).eps * max(abs(f0), abs(f1))
    return f1 <= f0 + c1 * slope0 or (rounding and slope1 <= (2 * c1 - 1) * slope0)


@pytest.mark.parametrize("c1,c2", [(1e-4, 0.9), (0.3, 0.4)])
def test_accepted_steps_satisfy_the_strong_wolfe_conditions_euclidean(c1, c2):
    """On ℝⁿ the step is s = x_new − x_old, so both conditions are recomputed here from f and its autograd gradient."""
    n = 10
    grad = autograd_grad(rosenbrock)
    x0 = rosenbrock_start(n)
    points = [x0]
    res = minimize(
        rosenbrock, x0, "lbfgs", manifold=Euclidean(n), grad=grad, gtol=1e-8, c1=c1, c2=c2,
        callback=record_points(points), max_iter=500,
    )  # fmt: skip
    assert res.success and float(torch.linalg.vector_norm(res.x - 1)) < 1e-6
    # x0, then the callback's points: x0 again (iteration 0) and every iterate but the last (the gtol stop comes first)
    points = points[1:] + [res.x]
    assert len(points) == res.nit + 1
    for old, new, rec in zip(points, points[1:], res.history[1:]):
        s = new - old
        slope0, slope1 = float(grad(old) @ s), float(grad(new) @ s)
        assert slope0 < 0
        assert sufficient_decrease(float(rosenbrock(old)), float(rosenbrock(new)), slope0, slope1, c1)
        assert abs(slope1) <= c2 * abs(slope0) * (1 + 1e-10)
        assert rec["wolfe"] is True
    # the bracketing and zoom phases were exercised (more than one trial in some iterations)
    assert max(rec["evaluations"] for rec in res.history[1:]) >= 2


def test_accepted_steps_satisfy_the_wolfe_conditions_along_the_retraction_on_the_sphere():
    """y = (x + v)/‖x + v‖ with v ⊥ x gives v = y/(x·y) − x: the step is recovered from the iterates, and the
    conditions are checked on f(R_x(v)) and on the documented derivative ⟨grad f(y), P_y v⟩ (computed here)."""
    M, B, x0, f, grad, _ = rayleigh()
    points = [x0]
    res = minimize(f, x0, "lbfgs", manifold=M, grad=grad, gtol=1e-10, callback=record_points(points))
    assert res.success
    points = points[1:] + [res.x]
    assert len(points) == res.nit + 1
    for x, y in zip(points, points[1:]):
        v = y / (x @ y) - x
        assert abs(float(x @ v)) < 1e-12 and float(torch.linalg.vector_norm(M.retr(x, v) - y)) < 1e-13
        gx, gy = 2 * (B @ x - (x @ B @ x) * x), 2 * (B @ y - (y @ B @ y) * y)
        slope0, slope1 = float(gx @ v), float(gy @ (v - y * (y @ v)))
        assert slope0 < 0
        assert sufficient_decrease(float(x @ B @ x), float(y @ B @ y), slope0, slope1, 1e-4)
        assert abs(slope1) <= 0.9 * abs(slope0) * (1 + 1e-10)


# ---------------------------------------------------------------------------------------------- (e) any manifold
def test_rayleigh_quotient_on_a_user_sphere_with_user_gradient():
    counts = {}
    M, B, x0, f, grad, _ = rayleigh(counts=counts)
    evals, vecs = torch.linalg.eigh(B)
    res = minimize(f, x0, "lbfgs", manifold=M, grad=grad, gtol=1e-11)
    assert (res.status, res.success) == (GTOL, True), res.message
    assert abs(res.fun - float(evals[0])) <= 1e-12 * abs(float(evals[0]))
    assert abs(abs(float(res.x @ vecs[:, 0])) - 1) < 1e-12
    assert (res.nfev, res.ngev, res.nhev) == (counts["f"], counts["grad"], 0)


def test_user_hvp_gives_the_first_model_step_and_is_counted():
    counts = {}
    M, B, x0, f, grad, hvp = rayleigh(counts=counts)
    res = minimize(f, x0, "lbfgs", manifold=M, grad=grad, hvp=hvp, gtol=1e-11)
    assert res.success and abs(res.fun - float(torch.linalg.eigvalsh(B)[0])) < 1e-10
    assert res.nhev == counts["hvp"] >= 1 and (res.nfev, res.ngev) == (counts["f"], counts["grad"])


# ---------------------------------------------------------------------------------------------- stops
def test_stop_reasons():
    f, x0, *_ = best_rank_r()
    res = minimize(f, x0, "lbfgs", max_iter=3)
    assert (res.status, res.success, res.nit) == (MAX_ITER, False, 3)
    assert [h["iter"] for h in res.history] == [0, 1, 2, 3]
    res = minimize(f, x0, "lbfgs", callback=lambda r: r.nit == 4)
    assert (res.status, res.success, res.nit) == (CALLBACK, True, 4)
    res = minimize(f, x0, "lbfgs", max_time=1e-9)
    assert (res.status, res.success, res.nit) == (MAX_TIME, False, 0)
    res = minimize(f, x0, "lbfgs", ftol=1e-3)
    prev, last = res.history[-2]["fun"], res.history[-1]["fun"]
    assert res.status == FTOL and abs(prev - last) <= 1e-3 * max(abs(prev), abs(last))


def test_line_search_failure_is_no_progress():
    """A gradient that is minus f's: every direction goes uphill, the line search fails along −grad as well."""
    f, x0, *_ = best_rank_r()
    M = FixedRankMatrices(*SHAPE, RANK)
    res = minimize(f, x0, "lbfgs", grad=lambda x: -riemannian_grad(f, x)[1], manifold=M)
    assert (res.status, res.success) == (NO_PROGRESS, False)
    assert "line search failed" in res.message and "not stationary" in res.message
    assert res.x is x0 and res.nit == 0


def test_float32_stops_converged():
    f, x0, Xstar, fstar, A = best_rank_r(torch.float32)
    res = minimize(f, x0, "lbfgs")
    assert res.x.dtype == torch.float32 and res.success and res.status in (GTOL, PRECISION), res.message
    assert abs(res.fun - fstar) <= 1e-6 * fstar and rel(res.x.full().double(), Xstar) < 1e-4


# ---------------------------------------------------------------------------------------------- (f) non-finite


@pytest.mark.parametrize("n", [1, 2, 9])
def test_non_finite_f_stops_at_the_last_finite_point(n):
    f, x0, *_ = best_rank_r()
    res = minimize(nan_after(f, n), x0, "lbfgs")
    assert (res.status, res.success) == (NON_FINITE, False)
    assert "nan" in res.message.lower()
    if n == 1:
        assert res.x is x0 and res.nit == 0 and math.isnan(res.fun)
        return
    assert math.isfinite(res.fun) and res.fun == res.history[-1]["fun"]
    assert res.fun == pytest.approx(float(f(res.x)), rel=1e-13)  # f recomputed at the returned point
    if n > 2:
        assert res.nit >= 1 and res.fun < res.history[0]["fun"]


def test_non_finite_gradient_stops_at_the_last_finite_point():
    M, _, x0, f, grad, _ = rayleigh()
    calls = [0]

    def bad_grad(x):
        calls[0] += 1
        return grad(x) * float("nan") if calls[0] >= 6 else grad(x)

    res = minimize(f, x0, "lbfgs", manifold=M, grad=bad_grad)
    assert (res.status, res.success, res.nit) == (NON_FINITE, False, 4)
    assert "grad" in res.message and res.fun == pytest.approx(float(f(res.x)), rel=1e-14)


# ---------------------------------------------------------------------------------------------- (g) options
@pytest.mark.parametrize(
    "opts,exc",
    [
        ({"memory": 0}, ValueError),
        ({"memory": 2.5}, ValueError),
        ({"memory": True}, ValueError),
        ({"c1": 0.0}, ValueError),
        ({"c1": 0.5}, ValueError),
        ({"c2": 1.0}, ValueError),
        ({"c2": 1e-5}, ValueError),  # below c1 = 1e-4
        ({"max_linesearch": 0}, ValueError),
        ({"max_linesearch": 3.0}, ValueError),
        ({"initial_step": "xx"}, ValueError),
        ({"beta": "pr+"}, TypeError),  # a CG option
        ({"contraction": 0.5}, TypeError),  # a backtracking option
    ],
)
def test_bad_options_raise_naming_the_option(opts, exc):
    f, x0, *_ = best_rank_r()
    with pytest.raises(exc, match=next(iter(opts))):
        minimize(f, x0, "lbfgs", **opts)


def test_model_step_needs_a_hessian():
    M, _, x0, f, grad, _ = rayleigh()
    with pytest.raises(TypeError, match="hvp="):
        minimize(f, x0, "lbfgs", manifold=M, grad=grad, initial_step="model")


# ---------------------------------------------------------------------------------------------- (h) determinism
def test_identical_runs_give_identical_histories():
    f, x0, *_ = best_rank_r()
    a, b = (minimize(f, x0, "lbfgs", max_iter=25) for _ in range(2))
    keys = ("fun", "grad_norm", "step_size", "memory", "evaluations")
    assert [[h.get(k) for k in keys] for h in a.history] == [[h.get(k) for k in keys] for h in b.history]
    assert torch.equal(a.x.full(), b.x.full())


def test_verbose_table(capsys):
    f, x0, *_ = best_rank_r()
    minimize(f, x0, "lbfgs", max_iter=3, verbose=1)
    lines = capsys.readouterr().out.strip().splitlines()
    assert "memory" in lines[0] and "evaluations" in lines[0] and len(lines) == 6
    assert lines[-1].startswith("lbfgs") and "max_iter" in lines[-1]
