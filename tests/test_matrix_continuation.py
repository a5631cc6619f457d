"""The rank continuation of matrix completion: the greedy rank-one step against a dense reference, the start rank
read from the spectral start, and completion of ill-conditioned targets (issue 21, item 1)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowrankopt.completion import complete, sample_indices
from lowrankopt.completion.continuation import grow_matrix_rank
from lowrankopt.completion.problem import CompletionProblem, SingleProcess, completion_loss
from lowrankopt.completion.start import signal_rank
from lowrankopt.formats.lowrank import LowRankMatrix

DT = torch.float64


def _conditioned(m, n, r, kappa, g):
    """A rank-r matrix with orthonormal factors and singular values geometric from 1 to 1/kappa."""
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=DT))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=DT))[0]
    s = kappa ** -(torch.arange(r, dtype=DT) / max(r - 1, 1))
    return (U * s) @ V.T


def _dense(x: LowRankMatrix) -> torch.Tensor:
    return x.U @ x.S @ x.V.T


def test_grow_matrix_rank_is_the_greedy_rank_one_step_of_a_dense_reference():
    g = torch.Generator().manual_seed(0)
    m, n = 14, 11
    A = torch.randn(m, 4, generator=g, dtype=DT) @ torch.randn(4, n, generator=g, dtype=DT)
    idx = sample_indices((m, n), 90, generator=g)
    idx = torch.cat([idx, idx[:7]])  # repeated observations count with their multiplicity
    vals = A[idx[:, 0], idx[:, 1]] + 0.01 * torch.randn(len(idx), generator=g, dtype=DT)
    problem = CompletionProblem(idx, vals, (m, n), completion_loss(idx, vals), curvature=False, run=SingleProcess())
    x = LowRankMatrix.random(m, n, 2, dtype=DT, generator=g)
    y = grow_matrix_rank(problem, x, torch.Generator().manual_seed(1), block=n)  # a full block: the exact pair

    # reference: f(Z) = ½ Σ_t (Z[i_t, j_t] − v_t)², G its dense gradient, the top pair of G's normal part
    def f(Z):
        return 0.5 * ((Z[idx[:, 0], idx[:, 1]] - vals) ** 2).sum()

    X = _dense(x)
    G = torch.zeros(m, n, dtype=DT).index_put_((idx[:, 0], idx[:, 1]), X[idx[:, 0], idx[:, 1]] - vals, accumulate=True)
    Qu, Qv = torch.linalg.qr(x.U)[0], torch.linalg.qr(x.V)[0]
    N = (G - Qu @ (Qu.T @ G)) - (G - Qu @ (Qu.T @ G)) @ Qv @ Qv.T
    u, _, vh = torch.linalg.svd(N)
    D = torch.outer(u[:, 0], vh[0])
    a = (G * D).sum()
    b = (D[idx[:, 0], idx[:, 1]] ** 2).sum()
    Y = X - (a / b) * D  # the minimizer of the quadratic t ↦ f(X + t D)
    assert y.rank == 3
    torch.testing.assert_close(_dense(y), Y, rtol=0, atol=1e-12 * float(Y.abs().max()))
    torch.testing.assert_close(f(_dense(y)), f(X) - a**2 / (2 * b), rtol=1e-12, atol=0)
    assert float(y.S[2, 2]) > 0  # the new component enters with a positive weight
    for F in (y.U, y.V):  # orthonormal frames: the new column is orthogonal to x's
        torch.testing.assert_close(F.T @ F, torch.eye(3, dtype=DT), rtol=0, atol=1e-13)


def test_signal_rank_starts_at_the_rank_or_at_the_values_well_above_the_noise():
    assert signal_rank(torch.tensor([10.0, 9.0, 3.0, 2.0, 1.9]), 3) == 3  # all above 1.3 · 2: no continuation
    assert signal_rank(torch.tensor([10.0, 4.5, 2.5, 2.0, 1.9]), 3) == 2  # 2.5 < 2.6: climb from the two above 4
    assert signal_rank(torch.tensor([10.0, 3.9, 2.5, 2.0, 1.9]), 3) == 1
    assert signal_rank(torch.tensor([2.1, 2.05, 2.0, 2.0]), 3) == 1  # nothing resolved: still one
    assert signal_rank(torch.tensor([3.0, 2.0]), 2) == 2  # no value past the rank: no evidence of noise


def test_an_ill_conditioned_matrix_is_completed_by_the_default_rank_continuation():
    g = torch.Generator().manual_seed(0)
    m = n = 1000
    r = 10
    A = _conditioned(m, n, r, 1e4, g)
    idx = sample_indices((m, n), 5 * r * (m + n - r), generator=g)
    tidx = sample_indices((m, n), 20000, generator=g)
    test = (tidx, A[tidx[:, 0], tidx[:, 1]])
    res = complete(idx, A[idx[:, 0], idx[:, 1]], (m, n), r, test=test, generator=torch.Generator().manual_seed(1))
    ranks = [h["rank"] for h in res.history]
    assert ranks[0] < r and ranks == sorted(ranks) and set(ranks) == set(range(ranks[0], r + 1))
    assert res.x.rank == r and res.test_error < 1e-9


def test_rank_continuation_true_climbs_from_one_and_false_starts_at_the_rank():
    g = torch.Generator().manual_seed(2)
    m, n, r = 40, 30, 3
    A = _conditioned(m, n, r, 10.0, g)
    idx = sample_indices((m, n), 700, generator=g)
    vals = A[idx[:, 0], idx[:, 1]]
    climb = complete(idx, vals, (m, n), r, generator=torch.Generator().manual_seed(0), rank_continuation=True)
    assert [h["rank"] for h in climb.history][0] == 1 and climb.x.rank == r and climb.train_error < 1e-10
    again = complete(idx, vals, (m, n), r, generator=torch.Generator().manual_seed(0), rank_continuation=True)
    assert torch.equal(_dense(again.x), _dense(climb.x))  # deterministic given the generator
    plain = complete(idx, vals, (m, n), r, generator=torch.Generator().manual_seed(0), rank_continuation=False)
    assert {h["rank"] for h in plain.history} == {r}


def test_rank_continuation_rejects_what_it_cannot_do():
    g = torch.Generator().manual_seed(0)
    idx = sample_indices((8, 7), 40, generator=g)
    vals = torch.randn(40, generator=g, dtype=DT)
    for flag in ("auto", 1, 0.0):  # 1 == True, but not a flag
        with pytest.raises(TypeError, match="rank_continuation"):
            complete(idx, vals, (8, 7), 2, rank_continuation=flag)
    x0 = LowRankMatrix.random(8, 7, 2, dtype=DT, generator=g)
    with pytest.raises(ValueError, match="rank_continuation=True needs the spectral start"):
        complete(idx, vals, (8, 7), 2, x0=x0, rank_continuation=True)
    tidx = sample_indices((4, 4, 4), 30, generator=g)
    with pytest.raises(ValueError, match="rank_continuation applies to matrices"):
        complete(tidx, torch.randn(30, generator=g, dtype=DT), (4, 4, 4), 2, rank_continuation=False)


def _continuation_problem():
    g = torch.Generator().manual_seed(4)
    m, n, r = 40, 30, 3
    A = _conditioned(m, n, r, 10.0, g)
    idx = sample_indices((m, n), 700, generator=g)
    return idx, A[idx[:, 0], idx[:, 1]], (m, n), r


def _continuation_worker(rank, world, init_file, out_dir):
    from test_distributed import _init, _shutdown

    _init(rank, world, init_file)
    try:
        idx, vals, shape, r = _continuation_problem()
        part = torch.arange(rank, len(vals), world)
        res = complete(
            idx[part], vals[part], shape, r, distributed=True, rank_continuation=True, max_iter=300,
            generator=torch.Generator().manual_seed(5),
        )  # fmt: skip
        torch.save({"x": _dense(res.x), "ranks": [h["rank"] for h in res.history]}, f"{out_dir}/{rank}.pt")
    finally:
        _shutdown()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_the_sharded_rank_continuation_equals_the_single_process_one():
    idx, vals, shape, r = _continuation_problem()
    single = complete(
        idx, vals, shape, r, rank_continuation=True, max_iter=300, generator=torch.Generator().manual_seed(5)
    )
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_continuation_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        outs = [torch.load(os.path.join(tmp, f"{k}.pt")) for k in range(2)]
    assert torch.equal(outs[0]["x"], outs[1]["x"])  # both processes hold one point
    assert outs[0]["ranks"] == [h["rank"] for h in single.history]  # the same stages
    X = _dense(single.x)
    assert float((outs[0]["x"] - X).norm() / X.norm()) < 1e-10


def test_trust_region_stages_honour_the_inner_test_options():
    """Completion's trust-region stages default to the Eisenstat–Walker forcing term, unless the caller tunes the
    θ-test it replaces: then that test runs (its "linear/superlinear convergence" stops appear in the history)."""
    g = torch.Generator().manual_seed(3)
    m, n, r = 30, 25, 2
    A = torch.randn(m, r, generator=g, dtype=DT) @ torch.randn(r, n, generator=g, dtype=DT)
    idx = sample_indices((m, n), 400, generator=g)
    vals = A[idx[:, 0], idx[:, 1]]
    stops = lambda res: {h.get("tcg_stop") for h in res.history} - {None}  # noqa: E731
    default = complete(idx, vals, (m, n), r, method="trust-region", generator=torch.Generator().manual_seed(0))
    tuned = complete(idx, vals, (m, n), r, method="trust-region", theta=0.5, generator=torch.Generator().manual_seed(0))
    assert "forcing term" in stops(default) and "forcing term" not in stops(tuned)
    assert stops(tuned) & {"linear convergence", "superlinear convergence"}
