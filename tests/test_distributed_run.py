"""distributed.ShardedRun, the collectives of complete(distributed=True), on 2 gloo processes: the agreement on the
call (options compared by value, callables by qualified name), sums counted in the traffic or not, the norm of a
sharded vector, a failure in one process raised on both, and the periodic check that the processes hold one point."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import _init, _shutdown

from lowrankopt import LowRankMatrix, OptimizeResult
from lowrankopt.distributed import ShardedRun, shard

D = torch.float64


def _one(x):
    return 1.0


def _two(x):
    return 2.0


def _attempt(fn):
    try:
        fn()
        return "ran"
    except ValueError as exc:
        return "own" if "rejected on this process" in str(exc) else "refused"


def _run_worker(rank, world, init_file, out_dir):
    _init(rank, world, init_file)
    try:
        out = {
            "same callable": _attempt(lambda: ShardedRun(None, ("call", 1), {"initial_step": lambda x, v: 1.0})),
            "other callable": _attempt(lambda: ShardedRun(None, ("call", 1), {"f": _one if rank == 0 else _two})),
            "other option": _attempt(lambda: ShardedRun(None, ("call", 1), {"max_iter": 5 + rank})),
            "other call": _attempt(lambda: ShardedRun(None, ("call", rank), {})),
            "one error": _attempt(lambda: ShardedRun(ValueError("bad") if rank == 1 else None, None, {})),
        }
        run = ShardedRun(None, ("call", 1), {"gtol": 0.0}, check_every=3)
        out["sum"] = run.reduce(torch.full((3,), rank + 1.0, dtype=D))
        out["traffic after reduce"] = dict(run.traffic)
        run.quiet(torch.ones(5, dtype=D))
        out["traffic after quiet"] = dict(run.traffic)
        v = torch.arange(1.0, 12.0, dtype=D)
        out["norm"] = run.norm(v[shard(len(v), rank, world)])
        x = LowRankMatrix.random(
            6, 5, 2, generator=torch.Generator().manual_seed(rank), dtype=torch.float64
        )  # differs between ranks
        run.check(x, 4)  # not a multiple of check_every: no comparison
        try:
            run.check(x, 6)
            out["check"] = "passed"
        except RuntimeError:
            out["check"] = "caught"
        same = LowRankMatrix.random(6, 5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        out["shard value"] = float(run.reduce(run.value(lambda x: _fail_on(rank, x))(same)))
        out["stop all"] = run.stop_all()
        try:
            run.finish(OptimizeResult(x=same))
            out["finish"] = "returned"
        except ZeroDivisionError:
            out["finish"] = "own error"
        except RuntimeError as exc:
            out["finish"] = "peer error" if "process 1 raised ZeroDivisionError" in str(exc) else str(exc)
        torch.save(out, os.path.join(out_dir, f"run-{rank}.pt"))
    finally:
        _shutdown()


def _fail_on(rank, x):
    if rank == 1:
        raise ZeroDivisionError("shard 1")
    return x.norm() ** 2


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sharded_run_agrees_sums_and_fails_together():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_run_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        outs = [torch.load(os.path.join(tmp, f"run-{k}.pt")) for k in range(2)]
    for rank, out in enumerate(outs):
        assert out["same callable"] == "ran"  # a lambda at one place of the code is the same option everywhere
        assert out["other callable"] == out["other option"] == out["other call"] == "refused"
        assert out["one error"] == ("own" if rank == 1 else "refused")
        assert torch.equal(out["sum"], torch.full((3,), 3.0, dtype=D))
        assert out["traffic after reduce"] == {"bytes": 3 * 8, "calls": 1} == out["traffic after quiet"]
        assert out["norm"] == pytest.approx(float(torch.linalg.vector_norm(torch.arange(1.0, 12.0, dtype=D))))
        assert out["check"] == "caught"
        assert out["shard value"] != out["shard value"]  # NaN stood in for the failed shard: every process sees it
        assert out["stop all"] is True
    assert (outs[1]["finish"], outs[0]["finish"]) == ("own error", "peer error")


def test_a_sharded_run_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedRun(None, (), {})
