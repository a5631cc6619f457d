"""Mode balancing of tensor-train completion (``completion.scaling``): ModeScaling against dense outer products,
balance_modes against slice statistics computed here, and ``complete(balance=...)`` returning points, errors and
monitor points in the caller's coordinates."""

from __future__ import annotations

import math

import pytest
import torch

from lowrankopt import FixedTTRank, TensorTrain
from lowrankopt.completion import complete, sample_indices
from lowrankopt.completion.scaling import ModeScaling, balance_modes

DT = torch.float64


def outer(factors):
    """``W[i] = Π_k D_k[i_k]`` as a dense tensor, by broadcasting (independent of ModeScaling)."""
    d = len(factors)
    W = torch.ones((), dtype=DT)
    for k, D in enumerate(factors):
        W = W * D.reshape([1] * k + [-1] + [1] * (d - k - 1))
    return W


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def slice_mean_squares(idx, y, n, k):
    """Mean square of ``y`` over the observations with ``idx[:, k] == i``, for every i (NaN where none)."""
    out = torch.full((n,), float("nan"), dtype=DT)
    for i in range(n):
        sel = idx[:, k] == i
        if bool(sel.any()):
            out[i] = y[sel].square().mean()
    return out


# ---------------------------------------------------------------------------------------------- ModeScaling
@pytest.mark.parametrize("shape", [(3, 4, 5), (4, 3, 5, 3)])
def test_mode_scaling_is_the_dense_outer_product(shape):
    g = torch.Generator().manual_seed(0)
    x = TensorTrain.random(shape, 2, dtype=DT, generator=g)
    factors = [torch.rand(n, dtype=DT, generator=g) * 3 + 0.1 for n in shape]
    s = ModeScaling(factors)
    W = outer(factors)
    B = s.apply(x)
    assert B.ranks == x.ranks and s.undo(x).ranks == x.ranks
    torch.testing.assert_close(B.full(), x.full() * W, rtol=1e-13, atol=0)
    torch.testing.assert_close(s.undo(x).full(), x.full() / W, rtol=1e-13, atol=0)
    torch.testing.assert_close(s.undo(B).full(), x.full(), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(s.apply(s.undo(x)).full(), x.full(), rtol=1e-13, atol=1e-15)
    idx = sample_indices(shape, 17, generator=g)
    torch.testing.assert_close(s.weights(idx), W[tuple(idx.T)], rtol=1e-14, atol=0)
    # the entries of B at Ω are the weighted entries of A: what complete() hands the solver
    torch.testing.assert_close(B.gather(idx), x.gather(idx) * s.weights(idx), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------- balance_modes
def unbalanced(shape=(4, 5, 3), count=45, seed=0):
    """A positive TT-rank-2 tensor whose mode-0 slices are multiplied by [1, 10, 0.1, 3] (mean squares over 4
    orders of magnitude), observed at ``count`` positions."""
    g = torch.Generator().manual_seed(seed)
    ranks = [1, 2, 2, 1]
    cores = [torch.rand(a, n, b, dtype=DT, generator=g) + 0.2 for a, n, b in zip(ranks, shape, ranks[1:])]
    A = TensorTrain(cores).full() * torch.tensor([1.0, 10.0, 0.1, 3.0], dtype=DT).reshape(-1, 1, 1)
    idx = sample_indices(shape, count, generator=g)
    return A, idx, A[tuple(idx.T)], shape


def test_balance_modes_equalizes_every_slice():
    A, idx, vals, shape = unbalanced()
    before = slice_mean_squares(idx, vals, shape[0], 0)
    assert float(before.max() / before.min()) > 1e3  # the slices start far apart
    s = balance_modes(idx, vals, shape, sweeps=50, max_ratio=1e12)
    y = vals * s.weights(idx)
    for k, n in enumerate(shape):
        ms = slice_mean_squares(idx, y, n, k)
        assert not bool(ms.isnan().any())  # every slice is observed here
        # measured: equal to ~4e-16 after 50 sweeps (the alternating updates converge geometrically)
        torch.testing.assert_close(ms, ms.mean().expand(n), rtol=1e-10, atol=0)
        assert float(torch.log(s.factors[k]).mean()) == pytest.approx(0.0, abs=1e-12)  # geometric mean 1
        assert s.factors[k].dtype == DT and bool((s.factors[k] > 0).all())
    # the weights undo the deliberate mode-0 imbalance: slice 1 (×10) is scaled down against slice 2 (×0.1)
    assert float(s.factors[0][1] / s.factors[0][2]) < 0.1


def test_balance_modes_clips_the_factors():
    A, idx, vals, shape = unbalanced()
    max_ratio = 10.0
    c = max_ratio ** (1 / (2 * len(shape)))
    s = balance_modes(idx, vals, shape, sweeps=20, max_ratio=max_ratio)
    for D in s.factors:
        assert bool((D >= 1 / c).all()) and bool((D <= c).all())
    assert any(bool(torch.isclose(D, torch.tensor(c ** (-1), dtype=DT)).any()) for D in s.factors)  # it binds
    w = s.weights(idx)
    bound = math.sqrt(max_ratio)
    assert bool((w <= bound * (1 + 1e-12)).all()) and bool((w >= (1 - 1e-12) / bound).all())


def test_balance_modes_unobserved_and_zero_slices_keep_their_factor():
    # one sweep from D = 1: mode 0 is updated first, so D_0[i] ∝ 1 / rms_0[i] for observed slices with nonzero
    # values and D_0[i] ∝ 1 (kept) for slice 1 (never observed) and slice 2 (only zeros), then normalized to
    # geometric mean 1 — all computed here from the data
    A, idx, vals, shape = unbalanced(count=60)
    keep = (idx[:, 0] != 1) & ~((idx[:, 0] == 3) & (torch.arange(len(vals)) % 2 == 0))
    idx, vals = idx[keep], vals[keep].clone()
    vals[idx[:, 0] == 2] = 0.0
    # the overall mean square over the slices that can be balanced (slice 2's zeros left out: they cannot reach it)
    overall = float(vals[idx[:, 0] != 2].square().mean())
    ms = slice_mean_squares(idx, vals, shape[0], 0) / overall
    assert math.isnan(float(ms[1])) and float(ms[2]) == 0.0
    raw = torch.where(ms.isnan() | (ms == 0), torch.ones_like(ms), 1 / ms.sqrt())
    expected = raw / torch.exp(torch.log(raw).mean())
    s = balance_modes(idx, vals, shape, sweeps=1, max_ratio=1e30)
    torch.testing.assert_close(s.factors[0], expected, rtol=1e-12, atol=0)


def test_balance_modes_with_an_unobserved_slice_converges():
    # an unobserved slice does not enter the statistics: the observed slices balance exactly, and the factors reach
    # a fixed point (the unobserved slice's factor stops moving with them)
    A, idx, vals, shape = unbalanced(count=60)
    keep = idx[:, 0] != 2
    idx, vals = idx[keep], vals[keep]
    s = balance_modes(idx, vals, shape, sweeps=50, max_ratio=1e12)
    y = vals * s.weights(idx)
    for k, n in enumerate(shape):
        ms = slice_mean_squares(idx, y, n, k)
        ms = ms[~ms.isnan()]
        torch.testing.assert_close(ms, ms.mean().expand(len(ms)), rtol=1e-10, atol=0)
    more = balance_modes(idx, vals, shape, sweeps=60, max_ratio=1e12)
    for D, E in zip(s.factors, more.factors):
        torch.testing.assert_close(D, E, rtol=1e-10, atol=0)
    for D in s.factors:
        assert float(torch.log(D).mean()) == pytest.approx(0.0, abs=1e-12)


def test_balance_modes_with_an_all_zero_slice_converges():
    A, idx, vals, shape = unbalanced(count=60)
    vals = vals.clone()
    vals[idx[:, 0] == 2] = 0.0
    s = balance_modes(idx, vals, shape, sweeps=20, max_ratio=1e12)
    more = balance_modes(idx, vals, shape, sweeps=40, max_ratio=1e12)
    torch.testing.assert_close(s.factors[0], more.factors[0], rtol=1e-8, atol=0)


def test_balance_modes_of_zero_values_is_the_identity():
    _, idx, vals, shape = unbalanced()
    s = balance_modes(idx, torch.zeros_like(vals), shape)
    for D, n in zip(s.factors, shape):
        assert torch.equal(D, torch.ones(n, dtype=DT))


# ---------------------------------------------------------------------------------------------- complete(balance=)
def test_balance_argument_checks():
    g = torch.Generator().manual_seed(0)
    idx = sample_indices((6, 7), 30, generator=g)
    vals = torch.randn(30, dtype=DT, generator=g)
    with pytest.raises(ValueError, match="balance"):
        complete(idx, vals, (6, 7), 2, balance=True)
    idx3 = sample_indices((4, 4, 4), 30, generator=g)
    for bad in (1, "yes", 0.0):
        with pytest.raises(TypeError, match="balance"):
            complete(idx3, vals, (4, 4, 4), 2, balance=bad)


SHAPE, RANK = (6, 6, 6, 6), 2
#: mode-0 slice multipliers: the target's slices differ by 4 orders of magnitude in mean square, so the balanced
#: coordinates are far from the caller's (a point in the wrong ones would fail the checks below)
SLICES = [1.0, 10.0, 0.1, 3.0, 0.3, 1.0]


def tt_problem(seed=1):
    """An exactly TT-rank-2 target (uniform positive cores, mode 0 unbalanced) seen at 10·dim entries, and the
    complement as the held-out set."""
    g = torch.Generator().manual_seed(seed)
    ranks = [1] + [RANK] * (len(SHAPE) - 1) + [1]
    cores = [torch.rand(a, n, b, dtype=DT, generator=g) for a, n, b in zip(ranks, SHAPE, ranks[1:])]
    cores[0] = cores[0] * torch.tensor(SLICES, dtype=DT).reshape(1, -1, 1)
    X = TensorTrain(cores)
    A = X.full()
    idx = sample_indices(SHAPE, 10 * FixedTTRank(SHAPE, RANK).dim, generator=g)
    mask = torch.ones(SHAPE, dtype=torch.bool)
    mask[tuple(idx.T)] = False
    test_idx = mask.nonzero()
    return X, A, idx, A[tuple(idx.T)], (test_idx, A[tuple(test_idx.T)])


def held_out_error(x, test):
    t_idx, t_vals = test
    return rel(x.full()[tuple(t_idx.T)], t_vals)


def test_balanced_completion_returns_the_callers_point_and_errors():
    X, A, idx, vals, test = tt_problem()
    weights = balance_modes(idx, vals, SHAPE).weights(idx)  # what complete() balances with (default options)
    assert float(weights.max() / weights.min()) > 10  # the balancing is far from the identity here
    seen = []

    def monitor(r):
        rec = r.history[-1]
        seen.append((r.x, rec["train_error"], rec["test_error"], rec["balanced"]))

    res = complete(idx, vals, SHAPE, RANK, test=test, monitor=monitor, generator=torch.Generator().manual_seed(2))
    assert res.success and res.x.ranks == (RANK,) * (len(SHAPE) - 1)
    assert rel(res.x.full(), A) < 1e-8
    assert res.test_error == pytest.approx(held_out_error(res.x, test), rel=1e-8, abs=1e-14)
    assert res.test_error < 1e-8
    # the result's train_error is the plain residual of res.x
    assert res.train_error == pytest.approx(rel(res.x.gather(idx), vals), rel=1e-8, abs=1e-14)
    assert res.train_error <= 1e-12
    # monitor sees the caller's point at every iteration: in the balanced stages its weighted residual is the
    # record's train_error, in the final plain stage its plain residual; its held-out error is the record's
    # test_error throughout (a point in balanced coordinates would be off by the weights)
    checked = 0
    for x, train, test_err, balanced in seen:
        if train < 1e-6:  # (the relative comparison is meaningful while the errors are well above rounding)
            continue
        w = weights if balanced else torch.ones_like(weights)
        assert rel(x.gather(idx) * w, vals * w) == pytest.approx(train, rel=1e-9)
        assert held_out_error(x, test) == pytest.approx(test_err, rel=1e-9)
        checked += 1
    assert checked >= 5
    torch.testing.assert_close(seen[-1][0].full(), res.x.full(), rtol=1e-12, atol=1e-14)


def test_balanced_completion_stopped_early_finishes_on_the_plain_problem():
    # at a loose tol the errors are far from rounding: the balanced stages stop on the balanced residual, then the
    # plain stage on the plain one; res.x, train_error and test_error agree exactly
    X, A, idx, vals, test = tt_problem()
    weights = balance_modes(idx, vals, SHAPE).weights(idx)
    res = complete(idx, vals, SHAPE, RANK, test=test, tol=1e-3, generator=torch.Generator().manual_seed(2))
    balanced = [rec for rec in res.history if rec["balanced"]]
    assert balanced and balanced[-1]["train_error"] <= 1e-3
    assert 1e-6 < res.train_error <= 1e-3
    assert res.train_error == pytest.approx(rel(res.x.gather(idx), vals), rel=1e-9)
    assert res.test_error == pytest.approx(held_out_error(res.x, test), rel=1e-9)
    weighted = rel(res.x.gather(idx) * weights, vals * weights)
    assert weighted != pytest.approx(res.train_error, rel=1e-3)  # the two definitions differ here


def test_balanced_and_plain_completion_recover_the_same_target():
    X, A, idx, vals, test = tt_problem()
    for balance in (True, False, None):
        res = complete(idx, vals, SHAPE, RANK, balance=balance, generator=torch.Generator().manual_seed(2))
        assert res.train_error <= 1e-12, balance
        assert rel(res.x.full(), A) < 1e-8, balance


def test_balanced_completion_from_a_given_start():
    # x0 is in the caller's coordinates: complete() balances it, and returns the caller's point
    X, A, idx, vals, test = tt_problem(seed=3)
    g = torch.Generator().manual_seed(4)
    x0 = TensorTrain.from_dense(A + 1e-3 * torch.randn(SHAPE, dtype=DT, generator=g), max_rank=RANK)
    assert rel(x0.full(), A) > 1e-5
    res = complete(idx, vals, SHAPE, RANK, x0=x0, test=test)
    assert {h["rank"] for h in res.history} == {RANK}
    assert res.history[0]["test_error"] == pytest.approx(held_out_error(x0, test), rel=1e-9)  # x0 itself, first
    assert rel(res.x.full(), A) < 1e-8 and res.test_error < 1e-8


def test_a_failed_balanced_run_returns_its_point_in_the_callers_coordinates(monkeypatch):
    # minimize reports a non-finite value (status -1) at the first stage: no plain stage follows, and res.x is that
    # stage's point mapped back (B's cores divided by the scalings)
    from lowrankopt.completion import continuation

    X, A, idx, vals, test = tt_problem()
    real, seen = continuation.minimize, []

    def failing(*args, **kwargs):
        res = real(*args, **{**kwargs, "max_iter": 2})
        res.status, res.success = -1, False
        seen.append(res.x)
        return res

    monkeypatch.setattr(continuation, "minimize", failing)
    res = complete(idx, vals, SHAPE, RANK, generator=torch.Generator().manual_seed(2))
    assert res.status == -1 and len(seen) == 1
    scaling = balance_modes(idx, vals, SHAPE)
    torch.testing.assert_close(scaling.apply(res.x).full(), seen[0].full(), rtol=1e-12, atol=1e-14)
    assert res.train_error == pytest.approx(rel(res.x.gather(idx), vals), rel=1e-9)
