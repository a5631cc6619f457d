"""complete(starts=k): runs of the TT rank continuation that stall at the target rank are followed by fresh ones, and
the best is returned."""

from __future__ import annotations

import pytest
import torch
from reference import rel

from lowrankopt import TensorTrain
from lowrankopt.completion import complete, completion_loss, sample_indices
from lowrankopt.completion.continuation import default_growth, rank_one_fit
from lowrankopt.completion.problem import CompletionProblem, SingleProcess

SHAPE = [6, 6, 6, 6]


def data(rank, n_obs, seed=0):
    g = torch.Generator().manual_seed(seed)
    ranks = [1] + [rank] * (len(SHAPE) - 1) + [1]
    A = TensorTrain([torch.rand(a, n, b, generator=g, dtype=torch.float64) for a, n, b in zip(ranks, SHAPE, ranks[1:])])
    idx = sample_indices(SHAPE, n_obs, generator=g)
    return A, idx, A.gather(idx)


def attempt_records(res):
    out = {}
    for rec in res.history:
        out.setdefault(rec["attempt"], []).append(rec)
    return out


def test_stalled_runs_are_restarted_and_the_best_is_returned():
    # a TT-rank-4 target fitted at TT-rank 2: the residual cannot vanish, so every run but the last stalls
    A, idx, vals = data(4, 600)
    res = complete(
        idx, vals, SHAPE, 2, starts=3, max_iter=120, balance=False, generator=torch.Generator().manual_seed(1)
    )
    runs = attempt_records(res)
    assert sorted(runs) == [0, 1, 2]
    for k in (0, 1):  # stopped by the stall test at the target rank: < 10 % progress over the last 50 iterations
        final = [rec for rec in runs[k] if rec["rank"] == 2]
        assert len(final) > 50 and final[-1]["train_error"] > 0.9 * final[-51]["train_error"]
    # the last run is never stopped early: it reaches max_iter at the target rank
    assert len([rec for rec in runs[2] if rec["rank"] == 2]) >= 120
    # the returned run is the one with the lowest final training residual, and res reports it
    finals = {k: recs[-1]["train_error"] for k, recs in runs.items()}
    assert res.attempt == min(finals, key=finals.get)
    assert res.train_error == finals[res.attempt]
    assert res.nit == len(res.history) - 1 == res.history[-1]["iter"]  # every run's iterations, whichever is returned
    # its point: the plain residual recomputed here from res.x
    resid = float(torch.linalg.vector_norm(res.x.gather(idx) - vals) / torch.linalg.vector_norm(vals))
    assert resid == pytest.approx(res.train_error, rel=1e-9)
    # the runs differ (each draws its own growth terms), and the whole call is deterministic given the generator
    assert len({round(v, 12) for v in finals.values()}) > 1
    again = complete(
        idx, vals, SHAPE, 2, starts=3, max_iter=120, balance=False, generator=torch.Generator().manual_seed(1)
    )
    assert [r["fun"] for r in again.history] == [r["fun"] for r in res.history]


@pytest.mark.parametrize("method", ["lbfgs", "sd"])
def test_lbfgs_and_steepest_descent_make_one_run_unless_asked(method):
    # the stalling fit of the test above: CG makes 3 runs with starts=3; these methods one by default (their plateaus
    # outlast the stall test), and as many as asked otherwise
    A, idx, vals = data(4, 600)
    kw = dict(method=method, max_iter=60, balance=False)
    res = complete(idx, vals, SHAPE, 2, generator=torch.Generator().manual_seed(1), **kw)
    assert sorted(attempt_records(res)) == [0] and res.attempt == 0
    res = complete(idx, vals, SHAPE, 2, starts=2, generator=torch.Generator().manual_seed(1), **kw)
    assert sorted(attempt_records(res)) == [0, 1]


@pytest.mark.parametrize("method", ["lbfgs", "sd"])
def test_lbfgs_and_steepest_descent_are_not_balanced_unless_asked(method):
    A, idx, vals = data(2, 400)
    res = complete(idx, vals, SHAPE, 2, method=method, max_iter=5, generator=torch.Generator().manual_seed(1))
    assert not any(rec["balanced"] for rec in res.history)
    res = complete(
        idx, vals, SHAPE, 2, method=method, max_iter=5, balance=True, generator=torch.Generator().manual_seed(1)
    )
    assert res.history[0]["balanced"]


def test_cg_restarts_by_default():
    A, idx, vals = data(4, 600)
    res = complete(idx, vals, SHAPE, 2, max_iter=60, balance=False, generator=torch.Generator().manual_seed(1))
    assert sorted(attempt_records(res)) == [0, 1, 2, 3]


def test_a_run_that_converges_is_not_repeated():
    A, idx, vals = data(2, 800)
    res = complete(idx, vals, SHAPE, 2, starts=5, generator=torch.Generator().manual_seed(0))
    assert res.success and res.train_error <= 1e-12 and res.attempt == 0
    assert {rec["attempt"] for rec in res.history} == {0}
    test = sample_indices(SHAPE, 300, generator=torch.Generator().manual_seed(5))
    err = torch.linalg.vector_norm(res.x.gather(test) - A.gather(test)) / torch.linalg.vector_norm(A.gather(test))
    assert float(err) < 1e-8


def test_bad_starts():
    A, idx, vals = data(2, 300)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="starts"):
            complete(idx, vals, SHAPE, 2, starts=bad)
    with pytest.raises(ValueError, match="starts > 1 applies to tensor trains without x0"):
        complete(idx, vals, SHAPE, 2, starts=2, x0=A)
    m_idx = torch.tensor([[0, 0], [1, 1], [2, 0]])
    with pytest.raises(ValueError, match="starts > 1"):
        complete(m_idx, torch.ones(3, dtype=torch.float64), (3, 3), 1, starts=2)


def test_the_counts_cover_every_run_when_an_earlier_one_is_returned():
    A, idx, vals = data(4, 600)
    res = complete(
        idx, vals, SHAPE, 2, starts=2, max_iter=60, balance=False, growth="random",
        generator=torch.Generator().manual_seed(9),
    )  # fmt: skip
    assert res.attempt == 0  # the first run is the better one here: the second ran on after it
    assert {rec["attempt"] for rec in res.history} == {0, 1}
    assert res.nit == len(res.history) - 1 == res.history[-1]["iter"]
    assert res.nfev >= res.history[-1]["nfev"]


def test_a_returned_stalled_run_is_not_a_success():
    A, idx, vals = data(4, 600)
    one = complete(
        idx, vals, SHAPE, 2, starts=1, max_iter=60, balance=False, generator=torch.Generator().manual_seed(9)
    )
    two = complete(
        idx, vals, SHAPE, 2, starts=2, max_iter=60, balance=False, growth="random",
        generator=torch.Generator().manual_seed(9),
    )  # fmt: skip
    assert not one.success and one.train_error > 1e-3
    assert two.attempt == 0 and not two.success and two.status == 5 and two.message.startswith("stalled")
    assert [r for r in two.history if r["attempt"] == 0][-1]["stalled"]


def test_a_run_that_reaches_tol_where_it_would_also_stall_is_not_repeated():
    A, idx, vals = data(4, 600)
    kw = dict(max_iter=120, balance=False)
    ref = complete(idx, vals, SHAPE, 2, starts=1, tol=0.0, generator=torch.Generator().manual_seed(1), **kw)
    e = [r["train_error"] for r in ref.history if r["rank"] == 2]
    # a tol first reached at a record where the stall rule holds too
    i = next(i for i in range(51, len(e)) if e[i] > 0.9 * e[i - 50] and e[i] < min(e[:i]))
    res = complete(idx, vals, SHAPE, 2, starts=3, tol=e[i], generator=torch.Generator().manual_seed(1), **kw)
    assert {r["attempt"] for r in res.history} == {0} and res.success and res.train_error <= e[i]


def test_a_monitor_that_stops_is_not_reported_as_a_stall():
    A, idx, vals = data(4, 600)

    def monitor(res):
        if res.nit >= 20:
            raise StopIteration

    res = complete(idx, vals, SHAPE, 2, starts=1, monitor=monitor, generator=torch.Generator().manual_seed(1))
    assert "stalled" not in res.message


def test_one_run_at_tt_rank_one():
    A, idx, vals = data(3, 400)
    res = complete(idx, vals, SHAPE, 1, max_iter=120, generator=torch.Generator().manual_seed(0))
    assert {r["attempt"] for r in res.history} == {0}  # no growth terms: further runs would repeat this one


def test_attempt_and_grad_on_every_path():
    A, idx, vals = data(2, 300)
    zero = complete(idx, torch.zeros_like(vals), SHAPE, 2)
    assert zero.attempt == 0 and zero.success
    for balance in (True, False):  # after balancing, the last stage is on the plain problem at the returned point
        res = complete(idx, vals, SHAPE, 2, balance=balance, generator=torch.Generator().manual_seed(0))
        assert res.attempt == 0 and res.grad is not None and res.grad.manifold.ranks == (2, 2, 2)
        assert float(res.grad.norm()) == pytest.approx(res.grad_norm, rel=1e-9)


def _problem(idx, vals):
    return CompletionProblem(idx, vals, SHAPE, completion_loss(idx, vals), curvature=False, run=SingleProcess())


def _rank_one_start(idx, vals, generator):
    return rank_one_fit(_problem(idx, vals), vals, generator)


def _first_points(seen):
    """The first point minimize saw in each run (its start), from monitor's calls."""
    first = {}
    for attempt, x in seen:
        first.setdefault(attempt, x)
    return first


def test_greedy_runs_start_from_the_rank_one_fit_of_the_values():
    """growth="greedy": the run starts at the rank-1 fit of the values (not the constant tensor); "alternate": run 0
    at the constant tensor, run 1 at the rank-1 fit, drawn after run 0's growth terms."""
    A, idx, vals = data(4, 600)
    seen = []
    kw = dict(max_iter=60, balance=False, monitor=lambda r: seen.append((r.history[-1]["attempt"], r.x)))
    complete(idx, vals, SHAPE, 2, starts=1, growth="greedy", generator=torch.Generator().manual_seed(1), **kw)
    expected = _rank_one_start(idx, vals, torch.Generator().manual_seed(1))
    assert rel(_first_points(seen)[0].full(), expected.full()) < 1e-14
    seen.clear()
    complete(idx, vals, SHAPE, 2, starts=2, growth="alternate", generator=torch.Generator().manual_seed(1), **kw)
    first = _first_points(seen)
    assert sorted(first) == [0, 1]
    assert rel(first[0].full(), torch.full(SHAPE, float(vals.mean()), dtype=torch.float64)) < 1e-14
    g = torch.Generator().manual_seed(1)
    complete(idx, vals, SHAPE, 2, starts=1, growth="random", generator=g, max_iter=60, balance=False)  # run 0's draws
    assert rel(first[1].full(), _rank_one_start(idx, vals, g).full()) < 1e-14


def test_the_default_growth_alternates_on_zero_mean_values_only():
    """growth=None: "random" for values of one sign (the constant start explains most of them), "alternate" for
    zero-mean ones (it explains < 1/2 of their energy); res.growth says which, None from x0."""
    A, idx, vals = data(2, 300)  # nonnegative cores
    assert default_growth(_problem(idx, vals)) == "random"
    # v = (1, t, 0): (Σ v)² = ½ N Σ v² at t = 2 − √3; just above it "random", just below "alternate"
    for factor, expected in ((1.001, "random"), (0.999, "alternate")):
        v = torch.tensor([1.0, (2 - 3**0.5) * factor, 0.0], dtype=torch.float64)
        assert default_growth(_problem(idx[:3], v)) == expected
    kw = dict(max_iter=3, starts=1, generator=torch.Generator().manual_seed(0))
    assert complete(idx, vals, SHAPE, 2, **kw).growth == "random"
    assert complete(idx, vals - vals.mean(), SHAPE, 2, **kw).growth == "alternate"
    assert complete(idx, vals, SHAPE, 2, growth="greedy", **kw).growth == "greedy"
    assert complete(idx, vals, SHAPE, 2, x0=A, max_iter=3).growth is None


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_greedy_growth_recovers_a_tensor(dtype, tol):
    A, idx, vals = data(2, 800)
    g = torch.Generator().manual_seed(0)
    res = complete(idx, vals.to(dtype), SHAPE, 2, starts=1, growth="greedy", generator=g)
    assert res.success and res.x.dtype == dtype and res.train_error <= (1e-12 if dtype == torch.float64 else 1e-5)
    test = sample_indices(SHAPE, 300, generator=torch.Generator().manual_seed(5))
    truth = A.gather(test)
    err = torch.linalg.vector_norm(res.x.gather(test).double() - truth) / torch.linalg.vector_norm(truth)
    assert float(err) < tol


def test_bad_growth():
    A, idx, vals = data(2, 300)
    for bad in ("spectral", "", 1, True):
        with pytest.raises(ValueError, match="growth must be None or one of 'alternate', 'random', 'greedy'"):
            complete(idx, vals, SHAPE, 2, growth=bad)
    with pytest.raises(ValueError, match="growth applies to tensor trains without x0"):
        complete(idx, vals, SHAPE, 2, growth="greedy", x0=A)
    m_idx = torch.tensor([[0, 0], [1, 1], [2, 0]])
    with pytest.raises(ValueError, match="growth applies to tensor trains"):
        complete(m_idx, torch.ones(3, dtype=torch.float64), (3, 3), 1, growth="random")
