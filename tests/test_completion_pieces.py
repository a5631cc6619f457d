"""The pieces complete() is composed of, each on its own (float64, against dense references or autodiff): the
problem's objective per stage, the start points, the rank continuation and the history stitched across stages; and
that they use the manifolds' public protocol only."""

import ast
import math
from pathlib import Path

import pytest
import torch
from reference import rel, tt_full

import lowrankopt
from lowrankopt import FixedRankMatrices, LowRankMatrix, TensorTrain, riemannian_grad, riemannian_hvp
from lowrankopt.completion import completion_loss, sample_indices
from lowrankopt.completion.continuation import Stages, continuation_ranks, grow_rank, grow_rank_greedy, rank_one_fit
from lowrankopt.completion.history import History
from lowrankopt.completion.problem import CompletionProblem, HeldOut, SingleProcess
from lowrankopt.completion.start import constant_start, matrix_start

DT = torch.float64


def _problem(idx, vals, shape, curvature=False):
    return CompletionProblem(idx, vals, shape, completion_loss(idx, vals), curvature=curvature, run=SingleProcess())


def _matrix_problem(seed=0, m=11, n=8, N=60, curvature=False):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randint(0, m, (N,), generator=g), torch.randint(0, n, (N,), generator=g)], 1)
    vals = torch.randn(N, dtype=DT, generator=g)
    return _problem(idx, vals, (m, n), curvature), g


# ---------------------------------------------------------------------------------------------- the problem
@pytest.mark.parametrize("method", ["cg", "trust-region"])
def test_the_matrix_objective_is_the_closed_form_of_the_loss(method):
    """Gauss–Newton matrices: f, grad and hvp of the objective equal the δ-trick autodiff of completion_loss (hvp
    without the curvature term); CG also gets the exact line search's ‖P_Ω ξ‖², computed densely here."""
    problem, g = _matrix_problem()
    M = FixedRankMatrices(11, 8, 3)
    x = M.random_point(generator=g, dtype=torch.float64)
    f, opts = problem.objective(x, method, {"gtol": 0.0})
    assert opts["gtol"] == 0.0 and opts["manifold"] == M
    loss = completion_loss(problem.indices, problem.values)
    val, grad = riemannian_grad(loss, x)
    assert float(f(x)) == pytest.approx(float(val), rel=1e-13)
    assert all(rel(a, b) < 1e-12 for a, b in zip(opts["grad"](x).coords, grad.coords))
    v = M.random_tangent(x, generator=g)
    hv = riemannian_hvp(loss, x, v, curvature=False)
    assert all(rel(a, b) < 1e-12 for a, b in zip(opts["hvp"](x, v).coords, hv.coords))
    if method == "trust-region":
        assert "initial_step" not in opts
        return
    xi = M.to_ambient(x, v).full()
    dense = float((xi[problem.indices[:, 0], problem.indices[:, 1]] ** 2).sum())
    assert float(opts["initial_step"](x, v)) == pytest.approx(dense, rel=1e-12)
    mine = lambda x, v: 1.0  # noqa: E731
    assert problem.objective(x, method, {"initial_step": mine})[1]["initial_step"] is mine  # the user's is kept


def test_with_curvature_and_for_tensor_trains_minimize_differentiates_the_loss():
    problem, g = _matrix_problem(curvature=True)
    x = FixedRankMatrices(11, 8, 3).random_point(generator=g, dtype=torch.float64)
    assert problem.objective(x, "cg", {"gtol": 0.0}) == (problem.loss, {"gtol": 0.0})
    idx = sample_indices((4, 5, 3), 30, generator=g)
    tt = _problem(idx, torch.randn(30, dtype=DT, generator=g), (4, 5, 3))
    assert tt.objective(TensorTrain.random((4, 5, 3), 2, generator=g, dtype=torch.float64), "cg", {}) == (tt.loss, {})


def test_the_problem_and_held_out_norms():
    problem, g = _matrix_problem()
    assert problem.norm == pytest.approx(math.sqrt(float((problem.values**2).sum())), rel=1e-14)
    X = LowRankMatrix.random(11, 8, 2, generator=g, dtype=torch.float64)
    idx = sample_indices((11, 8), 20, generator=g)
    A = torch.randn(11, 8, dtype=DT, generator=g)
    held = HeldOut(idx, A[idx[:, 0], idx[:, 1]], SingleProcess())
    full = X.full()
    expected = rel(full[idx[:, 0], idx[:, 1]], A[idx[:, 0], idx[:, 1]])
    assert held.error(X) == pytest.approx(expected, rel=1e-13)
    zero = HeldOut(idx, torch.zeros(20, dtype=DT), SingleProcess())
    assert zero.error(X) == math.inf and zero.error(X * 0.0) == 0.0


# ---------------------------------------------------------------------------------------------- starts
def test_the_constant_start_is_the_mean_of_the_values():
    g = torch.Generator().manual_seed(1)
    shape = (4, 3, 5)
    idx = sample_indices(shape, 25, generator=g)
    vals = torch.rand(25, dtype=DT, generator=g)
    x = constant_start(_problem(idx, vals, shape))
    assert x.ranks == (1, 1) and torch.allclose(tt_full(x.cores), torch.full(shape, float(vals.mean()), dtype=DT))


def test_the_matrix_start_checks_x0_and_the_rank():
    problem, g = _matrix_problem()
    x0 = LowRankMatrix.random(11, 8, 3, generator=g, dtype=torch.float64)
    assert matrix_start(problem, 3, x0, None) is x0
    with pytest.raises(ValueError, match="x0"):
        matrix_start(problem, 2, x0, None)
    with pytest.raises(ValueError, match="rank"):
        matrix_start(problem, 9, None, None)
    x = matrix_start(problem, 3, None, torch.Generator().manual_seed(0))
    assert x.shape == (11, 8) and x.rank == 3


# ---------------------------------------------------------------------------------------------- continuation
@pytest.mark.parametrize("ranks", [[1], [3], [2, 3, 2], [1, 4, 4, 1]])
def test_continuation_ranks_climb_by_one_to_the_target(ranks):
    stages = continuation_ranks(ranks)
    assert len(stages) == max(ranks) and stages[-1] == ranks and stages[0] == [1] * len(ranks)
    for r, (a, b) in enumerate(zip(stages, stages[1:]), start=1):
        assert all(0 <= q - p <= 1 for p, q in zip(a, b)) and max(a) == r
        assert b == [min(r + 1, rk) for rk in ranks]


def test_grow_rank_keeps_the_tensor_and_reaches_the_ranks():
    g = torch.Generator().manual_seed(2)
    x = TensorTrain.random((4, 5, 6, 3), 1, generator=g, dtype=torch.float64)
    y = grow_rank(x, [2, 2, 2], g, eps=1e-4)
    assert y.ranks == (2, 2, 2)
    d = float(torch.linalg.vector_norm(tt_full(y.cores) - tt_full(x.cores)))
    assert 1e-6 < d / float(torch.linalg.vector_norm(tt_full(x.cores))) <= 1e-4 * (1 + 1e-8)


def _dense_hopm(W, vectors, sweeps):
    """The higher-order power method on a dense tensor W, written here with einsum: u_k ← W ×_{j≠k} u_j / ‖·‖."""
    us = [u.clone() for u in vectors]
    letters = "abcdefgh"[: W.dim()]
    for _ in range(sweeps):
        for k in range(W.dim()):
            others = [j for j in range(W.dim()) if j != k]
            spec = f"{letters},{','.join(letters[j] for j in others)}->{letters[k]}"
            v = torch.einsum(spec, W, *[us[j] for j in others])
            us[k] = v / torch.linalg.vector_norm(v)
    return us


def _outer(us):
    out = us[0]
    for u in us[1:]:
        out = torch.tensordot(out, u, dims=0)
    return out


def test_rank_one_fit_is_the_power_method_on_the_zero_filled_tensor_and_its_least_squares_step():
    """Against a dense HOPM from the same Gaussian vectors (a repeated position counts twice, as in the loss), and
    the step α = ⟨w, z_Ω⟩ / ‖z_Ω‖² computed densely."""
    g = torch.Generator().manual_seed(4)
    shape = (4, 5, 3, 6)
    idx = torch.cat([sample_indices(shape, 150, generator=g), sample_indices(shape, 20, generator=g)])  # repeats
    w = torch.randn(len(idx), dtype=DT, generator=g)
    g0 = torch.Generator().manual_seed(9)
    start = [torch.randn(n, dtype=DT, generator=g0) for n in shape]
    z = rank_one_fit(_problem(idx, w, shape), w, torch.Generator().manual_seed(9), sweeps=7)
    W = torch.zeros(shape, dtype=DT).index_put_(tuple(idx.T), w, accumulate=True)
    us = _dense_hopm(W, start, 7)
    Z = _outer(us)
    zo = Z[tuple(idx.T)]
    alpha = float(w @ zo) / float(zo @ zo)
    assert z.ranks == (1, 1, 1) and rel(tt_full(z.cores), alpha * Z) < 1e-12


def test_rank_one_fit_of_a_fully_observed_rank_one_tensor_is_that_tensor():
    g = torch.Generator().manual_seed(5)
    shape = (3, 4, 5)
    T = TensorTrain.random(shape, 1, generator=g, dtype=torch.float64)
    idx = torch.cartesian_prod(*[torch.arange(n) for n in shape])
    z = rank_one_fit(_problem(idx, T.gather(idx), shape), T.gather(idx), g, sweeps=2)
    assert rel(tt_full(z.cores), tt_full(T.cores)) < 1e-13


def test_rank_one_fit_of_zero_values_is_none():
    g = torch.Generator().manual_seed(5)
    idx = sample_indices((3, 4, 5), 20, generator=g)
    assert rank_one_fit(_problem(idx, torch.ones(20, dtype=DT), (3, 4, 5)), torch.zeros(20, dtype=DT), g) is None


def test_the_greedy_growth_adds_the_rank_one_fit_of_the_residual_at_the_exact_line_search_step():
    """Without rounding (TT-ranks 1 → 2): y = x + z with f minimal at t = 1 along x + t z (⟨P_Ω y − values, P_Ω z⟩ = 0,
    dense); with the ranks capped, the result is x + z rounded to them. A zero residual grows by a tiny random term."""
    g = torch.Generator().manual_seed(6)
    shape = (5, 4, 6, 3)
    T = TensorTrain.random(shape, 2, generator=g, dtype=torch.float64)
    idx = sample_indices(shape, 200, generator=g)
    vals = T.gather(idx)
    problem = _problem(idx, vals, shape)
    x = TensorTrain.random(shape, 1, generator=g, dtype=torch.float64)
    y = grow_rank_greedy(problem, x, [2, 2, 2], torch.Generator().manual_seed(1))
    z = rank_one_fit(problem, vals - x.gather(idx), torch.Generator().manual_seed(1))
    assert y.ranks == (2, 2, 2) and rel(tt_full(y.cores), tt_full(x.cores) + tt_full(z.cores)) < 1e-12
    Y, Z = tt_full(y.cores)[tuple(idx.T)], tt_full(z.cores)[tuple(idx.T)]
    assert abs(float((Y - vals) @ Z)) < 1e-12 * float(torch.linalg.vector_norm(Y - vals) * torch.linalg.vector_norm(Z))
    assert float(torch.linalg.vector_norm(Y - vals)) < float(torch.linalg.vector_norm(x.gather(idx) - vals))
    capped = grow_rank_greedy(problem, x, [1, 2, 1], torch.Generator().manual_seed(1))
    assert capped.ranks == (1, 2, 1)
    assert rel(tt_full(capped.cores), tt_full(y.round(max_rank=[1, 2, 1]).cores)) < 1e-12
    exact = _problem(idx, x.gather(idx), shape)
    grown = grow_rank_greedy(exact, x, [2, 2, 2], g)
    assert grown.ranks == (2, 2, 2) and rel(tt_full(grown.cores), tt_full(x.cores)) <= 1e-4 * (1 + 1e-8)


# ---------------------------------------------------------------------------------------------- history
def test_the_history_numbers_the_continuation_stages_as_one_run():
    """Two stages (TT-rank 1 for 3 iterations, then 2 for 4): 1 + 3 + 4 records numbered 0..7, the second stage's
    start record (the grown point, a repeat of the first stage's last iteration) dropped, counts summed."""
    g = torch.Generator().manual_seed(3)
    shape = (5, 4, 6)
    T = TensorTrain.random(shape, 2, generator=g, dtype=torch.float64)
    idx = sample_indices(shape, 80, generator=g)
    vals = T.gather(idx)
    problem = _problem(idx, vals, shape)
    history = History(norm=problem.norm, tol=0.0, held_out=None, run=SingleProcess(), monitor=None)
    stages = Stages(problem, history, method="cg", curvature=False, options={"gtol": 0.0})
    res = stages.continuation(constant_start(problem), [2, 2], generator=g, warmup_iters=3, max_iter=4)
    history.finish(res)
    h = res.history
    assert [rec["iter"] for rec in h] == list(range(8)) and [rec["rank"] for rec in h] == [1] * 4 + [2] * 4
    assert res.nit == 7 and res.x.ranks == (2, 2)
    for key in ("nfev", "ngev"):
        counts = [rec[key] for rec in h]
        assert all(a < b for a, b in zip(counts, counts[1:])) and res[key] >= counts[-1]
    for rec in h:
        assert rec["train_error"] == pytest.approx(math.sqrt(2 * rec["fun"]) / problem.norm, rel=1e-12)
    assert res.train_error == h[-1]["train_error"] and res.test_error is None and res.time == h[-1]["solve_time"]


# ---------------------------------------------------------------------------------------------- protocol
def test_completion_uses_only_public_names_of_other_objects():
    """No private attribute of a manifold, a point or another module (``M._gauge``, ``x._cache``, ...): only
    ``self._…`` of the class itself, and the formats' trusted constructors."""
    allowed = {"_trusted"}
    offenders = []
    for path in sorted((Path(lowrankopt.__file__).parent / "completion").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if not (isinstance(node.value, ast.Name) and node.value.id == "self") and node.attr not in allowed:
                    offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not offenders, offenders
