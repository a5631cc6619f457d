"""Sharded gradients across 2 gloo processes on localhost equal the single-process gradient (float64)."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowrankopt import LowRankMatrix, TensorTrain, completion_loss, riemannian_grad
from lowrankopt.distributed import all_reduce_tangent, check_identical, shard, sharded_grad

D = torch.float64


def _problems():
    g = torch.Generator().manual_seed(0)
    T = TensorTrain.random((6, 5, 7, 4), 3, generator=g)
    x_tt = TensorTrain.random((6, 5, 7, 4), 2, generator=g)
    idx_tt = torch.stack([torch.randint(0, n, (300,), generator=g) for n in (6, 5, 7, 4)], 1)
    X = LowRankMatrix.random(9, 8, 3, generator=g)
    idx_m = torch.stack([torch.randint(0, 9, (40,), generator=g), torch.randint(0, 8, (40,), generator=g)], 1)
    A = torch.randn(9, 8, dtype=D, generator=g)
    return [("tt", x_tt, idx_tt, T.gather(idx_tt)), ("matrix", X, idx_m, A[idx_m[:, 0], idx_m[:, 1]])]


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
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
        dist.destroy_process_group()


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
