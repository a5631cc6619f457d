"""distributed.ShardedObjective on 2 gloo processes (float64): the sums of the shards' value, gradient and
Gauss–Newton Hessian product equal dense references (the Euclidean gradient and ``P_Ω`` projected onto the tangent
space); one pass of the shard's loss and one collective give f and the gradient at a point, a Hessian product adds no
pass of f and one collective; a shard that raises puts NaN into every process's sums."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import _init, _shutdown

from lowrankopt import TensorTrain, completion_loss, sample_indices
from lowrankopt.distributed import Failures, ShardedObjective, shard
from lowrankopt.manifolds import manifold_of
from lowrankopt.optim.objective import Objective

D = torch.float64
SHAPE, RANK = (5, 4, 6, 3), 2


def _problem():
    g = torch.Generator().manual_seed(11)
    T = TensorTrain.random(SHAPE, 3, generator=g, dtype=D)
    idx = sample_indices(SHAPE, 200, generator=g)
    x = TensorTrain.random(SHAPE, RANK, generator=g, dtype=D)
    y = TensorTrain.random(SHAPE, RANK, generator=g, dtype=D)
    v = manifold_of(x).random_tangent(x, generator=g)
    return idx, T.gather(idx), x, y, v


class _Counted:
    """``fn`` with a count of its calls (passes over the shard's entries), failing at call ``fail_at``."""

    def __init__(self, fn, fail_at=None):
        self.fn, self.calls, self.fail_at = fn, 0, fail_at

    def __call__(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise ZeroDivisionError("shard failed")
        return self.fn(x)


def _worker(rank, world, init_file, out_dir):
    _init(rank, world, init_file)
    try:
        idx, vals, x, y, v = _problem()
        part = shard(len(vals), rank, world)
        loss = _Counted(completion_loss(idx[part], vals[part]))
        traffic: dict = {}
        obj = ShardedObjective(loss, curvature=False, traffic=traffic)
        out = {}
        grad = obj.grad(x)
        out["after grad"] = (loss.calls, dict(traffic))
        out["f"] = float(obj.f(x))
        out["after f"] = (loss.calls, dict(traffic))
        hv = obj.hvp(x, v)
        out["after hvp"] = (loss.calls, dict(traffic))
        out["f other"] = float(obj.f(y))  # not a gradient point: a forward pass and a scalar all-reduce
        out["after f other"] = (loss.calls, dict(traffic))
        out["grad"], out["hvp"] = list(grad.coords), list(hv.coords)
        # the optimizer's view: Objective.local asks for the gradient first and gets f from the same pass
        calls = loss.calls
        loc = Objective(obj.f, manifold_of(y), grad=obj.grad, hvp=obj.hvp).local(y, hessian=True)
        loc.hess(manifold_of(y).zero_tangent(y))
        out["local passes"] = loss.calls - calls
        out["local f"] = loc.fun
        # a shard that raises (rank 1, in its gradient pass): NaN in every process's sums, the error kept there
        failing = _Counted(completion_loss(idx[part], vals[part]), fail_at=1 if rank == 1 else None)
        failures = Failures()
        bad = ShardedObjective(failing, curvature=False, failures=failures)
        g_bad = bad.grad(x)
        out["failed"] = (float(bad.f(x)), bool(torch.isnan(g_bad.coords[0]).all()))
        out["failed hvp"] = bool(torch.isnan(bad.hvp(x, v).coords[-1]).all())
        out["error"] = type(failures.error).__name__ if failures.error else None
        torch.save(out, os.path.join(out_dir, f"obj-{rank}.pt"))
    finally:
        _shutdown()


def _dense_references(idx, vals, x, v):
    """f, the Riemannian gradient and the Gauss–Newton Hessian product from dense tensors (no δ-trick on f)."""
    M = manifold_of(x)
    X = x.full()
    residual = X[tuple(idx.T)] - vals
    egrad = torch.zeros_like(X).index_put_(tuple(idx.T), residual, accumulate=True)
    xi = M.to_ambient(x, v).full()
    sampled = torch.zeros_like(X).index_put_(tuple(idx.T), xi[tuple(idx.T)], accumulate=True)
    return 0.5 * float(residual.square().sum()), M.proj(x, egrad), M.proj(x, sampled)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sharded_objective_sums_the_shards_in_one_pass_per_point():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        outs = [torch.load(os.path.join(tmp, f"obj-{k}.pt")) for k in range(2)]
    idx, vals, x, y, v = _problem()
    f_ref, g_ref, h_ref = _dense_references(idx, vals, x, v)
    f_y = 0.5 * float((y.full()[tuple(idx.T)] - vals).square().sum())
    n_coords = sum(c.numel() for c in g_ref.coords)
    for rank, out in enumerate(outs):
        assert out["f"] == pytest.approx(f_ref, rel=1e-12)
        assert out["f other"] == pytest.approx(f_y, rel=1e-12)
        assert out["local f"] == pytest.approx(f_y, rel=1e-12)
        for a, b in zip(out["grad"], g_ref.coords):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for a, b in zip(out["hvp"], h_ref.coords):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        # one pass and one collective of #coordinates + 1 numbers give f and the gradient
        assert out["after grad"] == (1, {"bytes": 8 * (n_coords + 1), "calls": 1})
        assert out["after f"] == out["after grad"]  # f at the gradient point: no pass, no collective
        assert out["after hvp"] == (1, {"bytes": 8 * (2 * n_coords + 1), "calls": 2})  # no pass of f
        assert out["after f other"] == (2, {"bytes": 8 * (2 * n_coords + 2), "calls": 3})
        assert out["local passes"] == 1  # value, gradient and a Hessian product at y: the gradient pass alone
        assert out["failed"][0] != out["failed"][0] and out["failed"][1] and out["failed hvp"]
        assert out["error"] == ("ZeroDivisionError" if rank == 1 else None)
