"""Sharded gradients across 2 gloo processes on localhost equal the single-process gradient (float64)."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowrankopt import LowRankMatrix, TensorTrain, complete, completion_loss, riemannian_grad, sample_indices
from lowrankopt.distributed import all_reduce_tangent, check_identical, shard, sharded_grad

D = torch.float64


def _init(rank, world, init_file):
    """Join the test's gloo group; a peer that never arrives fails the test in 2 minutes, not gloo's 30."""
    import datetime

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    torch.set_num_threads(1)


def _shutdown():
    """End a worker's process group cleanly: wait for every process first, then destroy. (Destroying while a peer
    still uses the gloo connections — or with a DDP wrapper's reducer alive — aborted ~1 run in 6 with SIGABRT
    "terminate called without an active exception" at teardown.)"""
    import gc

    gc.collect()  # DDP reducers hold the group's communication threads until collected
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _problems():
    g = torch.Generator().manual_seed(0)
    T = TensorTrain.random((6, 5, 7, 4), 3, generator=g, dtype=torch.float64)
    x_tt = TensorTrain.random((6, 5, 7, 4), 2, generator=g, dtype=torch.float64)
    idx_tt = torch.stack([torch.randint(0, n, (300,), generator=g) for n in (6, 5, 7, 4)], 1)
    X = LowRankMatrix.random(9, 8, 3, generator=g, dtype=torch.float64)
    idx_m = torch.stack([torch.randint(0, 9, (40,), generator=g), torch.randint(0, 8, (40,), generator=g)], 1)
    A = torch.randn(9, 8, dtype=D, generator=g)
    return [("tt", x_tt, idx_tt, T.gather(idx_tt)), ("matrix", X, idx_m, A[idx_m[:, 0], idx_m[:, 1]])]


def _worker(rank, world, init_file, out_dir):
    _init(rank, world, init_file)
    try:
        for name, x, idx, vals in _problems():
            part = shard(len(vals), rank, world)
            val, grad = sharded_grad(completion_loss(idx[part], vals[part]), x)
            check_identical(x)
            twice = all_reduce_tangent(grad)  # the sum of identical vectors: world × grad
            torch.save(
                {"val": val, "grad": [c for c in grad.coords], "twice": list(twice.coords)},
                os.path.join(out_dir, f"{name}-{rank}.pt"),
            )
        # a rank that drifts is caught
        x = _problems()[0][1]
        if rank == 1:
            x = TensorTrain([c + 1e-12 for c in x.cores])
        try:
            check_identical(x)
            caught = False
        except RuntimeError:
            caught = True
        torch.save(caught, os.path.join(out_dir, f"caught-{rank}.pt"))
    finally:
        _shutdown()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_give_the_single_process_gradient():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        for name, x, idx, vals in _problems():
            val, grad = riemannian_grad(completion_loss(idx, vals), x)
            for rank in range(2):
                out = torch.load(os.path.join(tmp, f"{name}-{rank}.pt"))
                assert out["val"] == pytest.approx(float(val), rel=1e-12)
                for a, b, c in zip(out["grad"], grad.coords, out["twice"]):
                    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
                    assert torch.allclose(c, 2 * b, rtol=1e-10, atol=1e-12)
        assert all(torch.load(os.path.join(tmp, f"caught-{r}.pt")) for r in range(2))


def test_shard_covers_every_entry_once():
    for n, w in ((10, 3), (2, 4), (0, 2), (7, 1)):
        parts = [range(n)[shard(n, r, w)] for r in range(w)]
        assert [i for p in parts for i in p] == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard(5, 2, 2)


def _completion_problems():
    g = torch.Generator().manual_seed(3)
    T = TensorTrain.random((8, 7, 8, 6), 2, generator=g, dtype=torch.float64)
    idx = sample_indices(T.shape, 1500, generator=g)
    A = LowRankMatrix.random(30, 25, 3, generator=g, dtype=torch.float64)
    idx_m = sample_indices((30, 25), 400, generator=g)
    return [
        ("tt", idx, T.gather(idx), T.shape, 2, {}),
        ("tt-greedy", idx, T.gather(idx), T.shape, 2, {"growth": "greedy"}),  # rank-1 fits summed over the shards
        ("matrix", idx_m, A.gather(idx_m[:, 0], idx_m[:, 1]), (30, 25), 3, {}),
    ]


def _complete_worker(rank, world, init_file, out_dir):
    _init(rank, world, init_file)
    try:
        for name, idx, vals, shape, r, kw in _completion_problems():
            part = shard(len(vals), rank, world)
            res = complete(
                idx[part],
                vals[part],
                shape,
                r,
                distributed=True,
                max_iter=300,
                generator=torch.Generator().manual_seed(5),
                **kw,
            )
            cores = [res.x.U, res.x.S, res.x.V] if name == "matrix" else list(res.x.cores)
            torch.save(
                {"cores": cores, "nit": res.nit, "err": res.train_error}, os.path.join(out_dir, f"{name}-{rank}.pt")
            )
    finally:
        _shutdown()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sharded_completion_on_two_gloo_processes_equals_the_single_process_run():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_complete_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        for name, idx, vals, shape, r, kw in _completion_problems():
            single = complete(idx, vals, shape, r, max_iter=300, generator=torch.Generator().manual_seed(5), **kw)
            full = single.x.full()
            outs = [torch.load(os.path.join(tmp, f"{name}-{k}.pt")) for k in range(2)]
            for a, b in zip(outs[0]["cores"], outs[1]["cores"]):
                assert torch.equal(a, b)  # both ranks hold one point
            x = LowRankMatrix(*outs[0]["cores"]) if name == "matrix" else TensorTrain(outs[0]["cores"])
            assert outs[0]["err"] <= 1e-12 and single.train_error <= 1e-12
            assert float((x.full() - full).norm() / full.norm()) < 1e-10


def test_distributed_without_a_process_group_is_refused():
    idx, vals, shape, r = _completion_problems()[0][1:5]
    with pytest.raises(RuntimeError, match="init_process_group"):
        complete(idx, vals, shape, r, distributed=True)


def _ddp_data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(16, 12, dtype=D, generator=g), torch.randn(16, 6, dtype=D, generator=g)


def _train(model, X, y, steps=5):
    import geoopt

    opt = geoopt.optim.RiemannianSGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), y).backward()
        opt.step()


def _layers():
    from lowrankopt.nn import LowRankLinear, TTLinear

    return {
        "tt": TTLinear(12, 6, 2, dtype=D, generator=torch.Generator().manual_seed(8)),
        "lowrank": LowRankLinear(12, 6, 2, dtype=D, generator=torch.Generator().manual_seed(9)),
    }


def _ddp_worker(rank, world, init_file, out_dir):
    _init(rank, world, init_file)
    try:
        X, y = _ddp_data()
        part = shard(len(X), rank, world)  # equal halves: the mean of the two means is the full-batch mean
        for name, layer in _layers().items():
            ddp = torch.nn.parallel.DistributedDataParallel(layer)
            _train(ddp, X[part], y[part])
            del ddp  # release the reducer (and its hooks on the group) before the group goes
            state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
            torch.save(state, os.path.join(out_dir, f"ddp-{name}-{rank}.pt"))
    finally:
        _shutdown()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_training_of_manifold_layers_with_a_geoopt_optimizer_equals_the_single_process_run():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        for name, layer in _layers().items():
            start = {k: v.detach().clone() for k, v in layer.state_dict().items()}
            _train(layer, *_ddp_data())
            for rank in range(2):
                state = torch.load(os.path.join(tmp, f"ddp-{name}-{rank}.pt"))
                for key, value in layer.state_dict().items():
                    assert torch.allclose(state[key], value, rtol=1e-10, atol=1e-12), (name, key)
            assert not torch.allclose(layer.state_dict()["weight"], start["weight"])  # the steps moved it


def _mismatch_worker(rank, world, init_file, out_dir):
    _init(rank, world, init_file)
    try:
        name, idx, vals, shape, r, _ = _completion_problems()[0]
        part = shard(len(vals), rank, world)
        outcomes = []
        cases = [
            {"test": (idx[:10], vals[:10])} if rank == 0 else {},  # a test set on one process only
            {"indices": idx[part] + (100 if rank == 1 else 0)},  # one process's indices out of range
            {"max_iter": 5 + rank},  # different options
            {"growth": "greedy"} if rank == 1 else {},  # different growth of the rank continuation
        ]
        for case in cases:
            kwargs = {"indices": idx[part], "max_iter": 5, **case}
            try:
                complete(
                    kwargs.pop("indices"),
                    vals[part],
                    shape,
                    r,
                    distributed=True,
                    generator=torch.Generator().manual_seed(0),
                    **kwargs,
                )
                outcomes.append("ran")
            except ValueError:
                outcomes.append("refused")
        torch.save(outcomes, os.path.join(out_dir, f"mismatch-{rank}.pt"))
    finally:
        _shutdown()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_process_that_rejects_its_input_stops_all_of_them():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_mismatch_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        for rank in range(2):
            assert torch.load(os.path.join(tmp, f"mismatch-{rank}.pt")) == ["refused"] * 4


class _Boom(Exception):
    pass


# (problem, where rank 1 fails, at which call): a user's monitor, each shard-local computation of the matrix path
# (the value at the start point and later, the gradient, the line-search curvature) and of the TT path (the
# shard's loss; a monitor in a rank-continuation warm-up stage).
FAILURES = [
    ("matrix", "monitor", 4),
    ("matrix", "value", 1),
    ("matrix", "value", 3),
    ("matrix", "grad", 2),
    ("matrix", "curvature_along", 2),
    ("tt", "loss", 4),
    ("tt", "monitor", 2),
]


def _count_then_raise(fn, at):
    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            raise _Boom(f"failed at call {at} on rank 1")
        return fn(*args, **kwargs)

    return failing


def _failing_worker(rank, world, init_file, out_dir):
    """For each case, rank 1 raises once — and stays alive — at the given call."""
    from lowrankopt import completion

    _init(rank, world, init_file)
    try:
        problems = {p[0]: p for p in _completion_problems()}
        outcomes = []
        for kind, where, at in FAILURES:
            _, idx, vals, shape, r, _ = problems[kind]
            part = shard(len(vals), rank, world)
            seen = []

            def monitor(res, seen=seen, where=where, at=at):
                seen.append(res.history[-1]["iter"])
                if where == "monitor" and rank == 1 and len(seen) == at:
                    raise _Boom("monitor failed on rank 1")

            saved = completion._MatrixLeastSquares.__dict__.copy(), completion.completion_loss
            if rank == 1 and where in ("value", "grad", "curvature_along"):
                setattr(completion._MatrixLeastSquares, where, _count_then_raise(saved[0][where], at))
            if rank == 1 and where == "loss":
                completion.completion_loss = lambda *a, at=at, make=saved[1]: _count_then_raise(make(*a), at)
            try:
                complete(
                    idx[part],
                    vals[part],
                    shape,
                    r,
                    distributed=True,
                    max_iter=50,
                    monitor=monitor,
                    generator=torch.Generator().manual_seed(5),
                )
                outcome = "returned"
            except _Boom:
                outcome = "own error"
            except RuntimeError as exc:
                outcome = "peer error" if "process 1 raised _Boom" in str(exc) else f"other: {exc}"
            finally:
                for name in ("value", "grad", "curvature_along"):
                    setattr(completion._MatrixLeastSquares, name, saved[0][name])
                completion.completion_loss = saved[1]
            outcomes.append({"outcome": outcome, "seen": seen})
        torch.save(outcomes, os.path.join(out_dir, f"fail-{rank}.pt"))
    finally:
        _shutdown()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_an_exception_on_one_process_is_raised_on_every_process_within_one_iteration():
    """Before: rank 1 left complete() with its exception and rank 0 waited in the next all-reduce until the
    process group's timeout (30 minutes with gloo's default; 2 minutes here, then the test failed)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_failing_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        out = [torch.load(os.path.join(tmp, f"fail-{k}.pt")) for k in range(2)]
        for case, peer, own in zip(FAILURES, out[0], out[1]):
            assert (own["outcome"], peer["outcome"]) == ("own error", "peer error"), (case, own, peer)
            # both stopped within one iteration (a failed process no longer calls its own monitor)
            assert peer["seen"][: len(own["seen"])] == own["seen"] and len(peer["seen"]) - len(own["seen"]) <= 1, case
            if case[1] == "monitor":
                assert len(own["seen"]) == case[2], case
