"""Benchmark ``distributed-completion``: sharded TT completion on 1 and 2 processes (gloo on this machine).

A random TT of shape ``(n,) * d`` and TT-rank r is completed from |Ω| random entries with
``complete(..., distributed=True)`` (``max_iter`` iterations at the target rank, rank continuation before; every
process one torch thread). Rows:

- one process without ``distributed`` (the baseline);
- strong scaling: the same |Ω| split over 1 and over 2 processes;
- weak scaling: |Ω| / 2 entries per process, on 1 and 2 processes.

Figures: time per iteration (``solve_time / nit`` of rank 0; the median over ``repeats`` interleaved rounds, each
round running every row once; the ratio is the median over the rounds of the per-round ratio to the plain run),
iterations, bytes all-reduced per iteration by one process and all-reduce calls per iteration. The bytes are the
δ-coordinates, O(d n r²): equal for every |Ω|.
"""

from __future__ import annotations

import os
import statistics
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..completion import complete, sample_indices
from ..distributed import shard
from ..formats.tt import TensorTrain
from .registry import Benchmark, Case
from .runner import Context, Timing, timing_row


def _problem(params: dict, entries: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape, r = (params["n"],) * params["d"], params["r"]
    T = TensorTrain.random(shape, r, generator=g, dtype=torch.float64)
    idx = sample_indices(shape, entries, generator=g)
    return idx, T.gather(idx), shape, r


def _solve(idx, vals, shape, r, params, seed, distributed):
    return complete(
        idx,
        vals,
        shape,
        r,
        max_iter=params["max_iter"],
        tol=0.0,
        distributed=distributed,
        generator=torch.Generator().manual_seed(seed + 1),
    )


def _worker(rank: int, world: int, init_file: str, out: str, params: dict, entries: int, seed: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        idx, vals, shape, r = _problem(params, entries, seed)
        part = shard(len(vals), rank, world)
        res = _solve(idx[part], vals[part], shape, r, params, seed, True)
        if rank == 0:
            torch.save({"time": res.time, "nit": res.nit, "comm": res.communication, "err": res.train_error}, out)
    finally:
        dist.destroy_process_group()


def _spawned(world: int, params: dict, entries: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), out, params, entries, seed), nprocs=world)
        return torch.load(out)


def run(case: Case, ctx: Context) -> dict:
    if not dist.is_available():
        return {"rows": [{"variant": "sharded completion", "skipped": "torch.distributed is not available"}]}
    p, entries, seed = case.params, case.params["entries"], ctx.seed
    runs = [
        (f"1 process, plain complete(), {entries} entries", 0, entries),
        (f"strong: 1 process, {entries} entries", 1, entries),
        (f"strong: 2 processes, {entries} entries ({entries // 2} each)", 2, entries),
        (f"weak: 1 process, {entries // 2} entries", 1, entries // 2),
        (f"weak: 2 processes, {entries} entries ({entries // 2} each)", 2, entries),
    ]
    # Interleaved rounds (every run once per round), so that a slow spell of a shared machine hits a round alike;
    # the ratio of a run is the median over the rounds of its time over the plain run's time in that round.
    times: list[list[float]] = [[] for _ in runs]
    last: list[dict] = [{} for _ in runs]
    for k in range(ctx.repeats):
        for i, (label, world, n_entries) in enumerate(runs):
            ctx.status(f"round {k + 1}/{ctx.repeats}: {label}")
            last[i] = _plain(p, n_entries, seed) if world == 0 else _spawned(world, p, n_entries, seed)
            times[i].append(last[i]["time"] / last[i]["nit"])
    rows = []
    for (label, world, _), out, t in zip(runs, last, times):
        figures = {"iterations": out["nit"], "train error": out["err"]}
        if world:
            figures["bytes / iteration"] = out["comm"]["bytes"] / out["nit"]
            figures["all-reduces / iteration"] = out["comm"]["calls"] / out["nit"]
        status = "time: per iteration" + (" (rank 0)" if world else "")
        row = timing_row(label, Timing.of(t), figures=figures, status=status)
        row["ratio"] = statistics.median(a / b for a, b in zip(t, times[0]))
        rows.append(row)
    return {"rows": rows}


def _plain(params: dict, entries: int, seed: int) -> dict:
    """The baseline: plain ``complete()`` in this process, one torch thread."""
    with _threads(1):
        res = _solve(*_problem(params, entries, seed), params, seed, False)
    return {"time": res.time, "nit": res.nit, "err": res.train_error}


class _threads:
    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


BENCHMARK = Benchmark(
    name="distributed-completion",
    summary="sharded TT completion with torch.distributed (gloo): strong and weak scaling on 1 and 2 processes",
    baseline="time per iteration of plain complete() in one process on the full |Ω|",
    figures=("time per iteration", "bytes all-reduced per iteration", "all-reduces per iteration"),
    quick=(Case("d6-n20-r4", dict(d=6, n=20, r=4, entries=40_000, max_iter=15)),),
    full=(Case("d8-n20-r5", dict(d=8, n=20, r=5, entries=200_000, max_iter=20)),),
    run=run,
    repeats={"quick": 1, "full": 3},
)
