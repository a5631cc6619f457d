"""Benchmarks of cross approximation: ``tt-cross`` (against teneva), ``tt-cross-volume`` and ``cpic``.

- ``tt-cross``: the teneva-bm analytic functions Ackley, Alpine, Dixon, Griewank, Rastrigin, Rosenbrock, Schaffer and
  Schwefel on a uniform grid (d = 7, n = 16, teneva-bm's domains) at evaluation budgets 10³, 10⁴, 10⁵. Both
  libraries start from the same random rank-1 TT (``teneva.rand``, one per seed) and add one rank per core and pass
  (teneva ``dr_min = dr_max = 1``, its defaults otherwise; ours ``rank_increase=1``, its defaults otherwise); teneva
  runs twice, without a cache (its default, as in its demos) and with one (``cache={}``), and gets f written in
  numpy; we get it in torch. Figures: relative error ``‖Y[I] − A[I]‖ / ‖A[I]‖`` on 10⁴ random entries (median over
  seeds), evaluations and sweeps used, and the TT rank after rounding at 10⁻⁸ (neither result is rounded for the
  error); time is one whole call (median over timed rounds and seeds, interleaved with teneva's). The ratio column
  is the median of our time over teneva's for the same function, budget and start (the figure
  ``time / teneva (cache)``: the same against the cached run); teneva's rows are skipped, with the reason, when
  teneva is not installed (``pip install teneva``).
- ``tt-cross-volume``: a float32 volume of side N (512 in ``--full``: 512 MiB) written to a temporary ``.npy`` file
  and read through a memmap by :class:`~lowrankopt.cross.ArraySource`, tensorized by
  :class:`~lowrankopt.cross.Quantization` into 3 log₂ N modes of size 2 (both orders). Figures: fraction of voxels
  read, relative error on 10⁴ random voxels, ranks. Baseline: reading every voxel once (a sum over the memmap).
- ``cpic``: the differentiable-cross worked example of :mod:`lowrankopt.benchmarks.cpic` (encoder + TT +
  classifier trained end to end on generated volumes with or without a small blob): test accuracy and the fraction
  of voxels read. Ablation row: the same with the encoder frozen at its start (only the classifier learns).
  Reference row: a logistic regression on the largest 7-voxel mean of the whole volume, which reads every voxel.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import numpy as np
import torch

from ..cross import ArraySource, Quantization, tt_cross
from ..formats.tt import TensorTrain
from . import cpic
from .registry import Benchmark, Case
from .runner import Context, Timing, ratio, timing_row

# teneva-bm's domains (lower, upper) for each function.
DOMAINS = {
    "Ackley": (-32.768, 32.768),
    "Alpine": (-10.0, 10.0),
    "Dixon": (-10.0, 10.0),
    "Griewank": (-100.0, 100.0),
    "Rastrigin": (-5.12, 5.12),
    "Rosenbrock": (-2.048, 2.048),
    "Schaffer": (-100.0, 100.0),
    "Schwefel": (0.0, 500.0),
}


_Array = TypeVar("_Array", np.ndarray, torch.Tensor)


def benchmark_function(name: str, X: _Array, xp: ModuleType) -> _Array:
    """The function ``name`` at the points ``X (N, d)``, one value per point ``(N,)``; ``xp`` is the array namespace
    of X (numpy or torch)."""
    d = X.shape[1]
    if name == "Ackley":
        return -20 * xp.exp(-0.2 * xp.sqrt((X**2).mean(1))) - xp.exp(xp.cos(2 * math.pi * X).mean(1)) + 20 + math.e
    if name == "Alpine":
        return abs(X * xp.sin(X) + 0.1 * X).sum(1)
    if name == "Dixon":
        i = xp.asarray(list(range(2, d + 1)), dtype=X.dtype)
        return (X[:, 0] - 1) ** 2 + (i * (2 * X[:, 1:] ** 2 - X[:, :-1]) ** 2).sum(1)
    if name == "Griewank":
        i = xp.asarray(list(range(1, d + 1)), dtype=X.dtype)
        return (X**2).sum(1) / 4000 - xp.cos(X / xp.sqrt(i)).prod(1) + 1
    if name == "Rastrigin":
        return 10 * d + (X**2 - 10 * xp.cos(2 * math.pi * X)).sum(1)
    if name == "Rosenbrock":
        return (100 * (X[:, 1:] - X[:, :-1] ** 2) ** 2 + (X[:, :-1] - 1) ** 2).sum(1)
    if name == "Schaffer":
        Z = X[:, :-1] ** 2 + X[:, 1:] ** 2
        return (0.5 + (xp.sin(xp.sqrt(Z)) ** 2 - 0.5) / (1 + 0.001 * Z) ** 2).sum(1)
    if name == "Schwefel":
        return -(X * xp.sin(xp.sqrt(abs(X)))).sum(1) / d
    raise ValueError(f"unknown function {name!r}")


def _teneva():
    try:
        import teneva
    except ImportError:
        return None
    return teneva


def _start(teneva, d: int, n: int, seed: int) -> list[np.ndarray]:
    """The random rank-1 TT both libraries start from (teneva's, when it is installed)."""
    if teneva is not None:
        return teneva.rand([n] * d, 1, seed=seed)
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, n, 1)) for _ in range(d)]


def _ours(name, grid, budget, start):
    t, shape = torch.from_numpy(grid), tuple(c.shape[1] for c in start)
    init = TensorTrain([torch.from_numpy(c) for c in start])

    def f(index):
        return benchmark_function(name, t[index], torch)

    def run():
        return tt_cross(f, shape, budget=budget, init=init)

    return run


def _theirs(teneva, name, grid, budget, start, cache=False):
    def f(index):
        return benchmark_function(name, grid[index], np)

    def run():
        info: dict = {}
        kwargs = {"cache": {}} if cache else {}
        return teneva.cross(f, start, m=budget, dr_min=1, dr_max=1, info=info, **kwargs), info

    return run


def run_tt_cross(case: Case, ctx: Context) -> dict:
    d, n, seeds, budgets = case.params["d"], case.params["n"], case.params["seeds"], case.params["budgets"]
    teneva = _teneva()
    libs = ("lowrankopt", "teneva", "teneva (cache)") if teneva is not None else ("lowrankopt",)
    probe = np.random.default_rng(ctx.seed).integers(0, n, (10_000, d))
    rows, errors = [], {}
    for name, (lo, hi) in DOMAINS.items():
        grid = np.linspace(lo, hi, n)
        truth = benchmark_function(name, grid[probe], np)
        for budget in budgets:
            runs: dict[str, list] = {lib: [] for lib in libs}
            times: dict[str, list[float]] = {lib: [] for lib in libs}
            ratios: dict[str, list[float]] = {"teneva": [], "teneva (cache)": []}
            for seed in range(seeds):
                ctx.status(f"{name}, budget {budget:.0e}, seed {seed}")
                start = _start(teneva, d, n, seed)
                fns = {"lowrankopt": _ours(name, grid, budget, start)}
                if teneva is not None:
                    fns["teneva"] = _theirs(teneva, name, grid, budget, start)
                    fns["teneva (cache)"] = _theirs(teneva, name, grid, budget, start, cache=True)
                timing = ctx.time(fns)
                for lib in libs:
                    times[lib].append(timing[lib].median)
                    Y, info = fns[lib]()
                    if lib == "lowrankopt":
                        at = Y.gather(torch.from_numpy(probe)).numpy()
                        used = (info.evaluations, info.sweeps, max(Y.round(eps=1e-8).ranks))
                    else:
                        at = teneva.get_many(Y, probe)
                        used = (info["m"], info["nswp"], max(teneva.ranks(teneva.truncate(Y, 1e-8))))
                    runs[lib].append((float(np.linalg.norm(at - truth) / np.linalg.norm(truth)), *used))
                if teneva is not None:
                    for peer in ratios:
                        ratios[peer].append(ratio(timing["lowrankopt"], timing[peer]))
            for lib in libs:
                med = [statistics.median(r[j] for r in runs[lib]) for j in range(4)]
                errors[(name, budget, lib)] = med[0]
                figures = {
                    "budget": budget,
                    "error (median)": med[0],
                    "evaluations": med[1],
                    "sweeps": med[2],
                    "rank (rounded 1e-8)": med[3],
                }
                row = timing_row(f"{name}, {budget:.0e}: {lib}", Timing.of(times[lib]), figures=figures)
                if lib == "lowrankopt" and teneva is not None:
                    row["ratio"] = statistics.median(ratios["teneva"])
                    figures["time / teneva (cache)"] = statistics.median(ratios["teneva (cache)"])
                    worse = [
                        sum(a[0] > max(b[0], 1e-12) for a, b in zip(runs["lowrankopt"], runs[peer])) for peer in ratios
                    ]
                    row["status"] = (
                        f"error above teneva's in {worse[0]}, above teneva (cache)'s in {worse[1]} of {seeds}"
                    )
                rows.append(row)
            if teneva is None:
                rows.append({"variant": f"{name}, {budget:.0e}: teneva", "skipped": "teneva is not installed"})
    return {
        "rows": rows,
        "xy": [
            _trajectory(name, d, n, probe, case.params["trajectory"], teneva, ctx)
            for name in ("Ackley", "Schaffer")
            if case.params.get("trajectory")
        ]
        + [
            {
                "title": f"TT-cross, d = {d}, n = {n}: relative error on 10⁴ random entries (median of {seeds} starts)",
                "xlabel": "evaluation budget",
                "ylabel": "relative error",
                "xlog": True,
                "ylog": True,
                "series": [
                    {
                        "label": f"{name} ({lib})",
                        "x": list(budgets),
                        "y": [max(errors[(name, b, lib)], 1e-16) for b in budgets],
                    }
                    for name in ("Ackley", "Schaffer", "Dixon", "Griewank")
                    for lib in libs
                ],
            }
        ],
    }


def _trajectory(name, d, n, probe, budgets, teneva, ctx) -> dict:
    """Error vs budget on a fine grid of budgets, one start (seed 0): where each library is at any budget."""
    grid = np.linspace(*DOMAINS[name], n)
    truth = benchmark_function(name, grid[probe], np)
    start = _start(teneva, d, n, 0)
    series: dict[str, list] = {"lowrankopt": []}
    if teneva is not None:
        series.update({"teneva": [], "teneva (cache)": []})
    for budget in budgets:
        ctx.status(f"{name}: error at budget {budget}")
        Y, _ = _ours(name, grid, budget, start)()
        series["lowrankopt"].append(np.linalg.norm(Y.gather(torch.from_numpy(probe)).numpy() - truth))
        for peer in ("teneva", "teneva (cache)") if teneva is not None else ():
            Y, _ = _theirs(teneva, name, grid, budget, start, cache=peer.endswith("(cache)"))()
            series[peer].append(np.linalg.norm(teneva.get_many(Y, probe) - truth))
    return {
        "title": f"{name} (d = {d}, n = {n}, one start): relative error vs evaluation budget",
        "xlabel": "evaluation budget",
        "ylabel": "relative error on 10⁴ random entries",
        "xlog": True,
        "ylog": True,
        "series": [
            {"label": lib, "x": list(budgets), "y": [max(e / np.linalg.norm(truth), 1e-16) for e in errs]}
            for lib, errs in series.items()
        ],
    }


def _write_volume(path: Path, N: int) -> None:
    """Two Gaussian blobs and a smooth wave on [0, 1]³, written slab by slab (float32)."""
    volume = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(N, N, N))
    x = (np.arange(N) + 0.5) / N
    for i in range(0, N, 32):
        X, Y, Z = x[i : i + 32, None, None], x[None, :, None], x[None, None, :]
        volume[i : i + 32] = volume_field(X, Y, Z)
    volume.flush()


def volume_field(X: np.ndarray, Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """The test volume at the coordinates ``(X, Y, Z)`` (broadcast together): two Gaussian blobs and a smooth wave."""
    blobs = np.exp(-((X - 0.3) ** 2 + (Y - 0.5) ** 2 + (Z - 0.6) ** 2) / 0.02)
    blobs = blobs + 0.5 * np.exp(-((X - 0.7) ** 2 + (Y - 0.3) ** 2 + (Z - 0.4) ** 2) / 0.05)
    return blobs + 0.2 * np.sin(3 * X) * np.cos(2 * Y + Z)


def run_volume(case: Case, ctx: Context) -> dict:
    N = case.params["N"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "volume.npy"
        ctx.status(f"writing a {N}³ float32 volume")
        _write_volume(path, N)
        array = np.load(path, mmap_mode="r")
        ctx.status("reading every voxel")
        t0 = time.perf_counter()
        float(np.sum(array, dtype=np.float64))
        full = time.perf_counter() - t0
        rows.append(timing_row("read every voxel (baseline)", Timing.of([full]), figures={"fraction read": 1.0}))
        rng = np.random.default_rng(ctx.seed)
        probe = rng.integers(0, N, (10_000, 3))
        truth = np.asarray(array[tuple(probe.T)], dtype=np.float64)
        for order in ("sequential", "interleaved"):
            ctx.status(f"cross, {order}")
            source = ArraySource(array)
            q = Quantization((N, N, N), order=order)
            t0 = time.perf_counter()
            Y, info = tt_cross(q.wrap(source), q.shape, eps=1e-5, nswp=case.params["nswp"], generator=ctx.generator())
            seconds = time.perf_counter() - t0
            approx = Y.gather(q.to_tensor(torch.from_numpy(probe))).numpy()
            figures = {
                "fraction read": source.fraction,
                "voxels read": source.reads,
                "error": float(np.linalg.norm(approx - truth) / np.linalg.norm(truth)),
                "max rank": max(info.ranks),
                "sweeps": info.sweeps,
            }
            row = timing_row(f"tt_cross, {order} quantization", Timing.of([seconds]), figures=figures)
            row["ratio"], row["status"] = seconds / full, f"stop: {info.stop}"
            rows.append(row)
    return {"rows": rows}


def run_cpic(case: Case, ctx: Context) -> dict:
    config = cpic.CPICConfig(**case.params)
    rows, losses = [], []
    for variant, params in (
        ("C-PIC: encoder + TT cross + classifier", case.params),
        ("ablation: encoder frozen (only the classifier trains)", {**case.params, "lr": 0.0}),
    ):
        ctx.status(variant)
        result = cpic.train_cpic(cpic.CPICConfig(**params), seed=ctx.seed)
        figures = {
            "test accuracy": result["test_accuracy"],
            "train accuracy": result["train_accuracy"],
            "fraction read (test)": result["test_fraction_read"],
            "fraction read (train)": result["train_fraction_read"],
        }
        rows.append(timing_row(variant, Timing.of([result["seconds"]]), figures=figures))
        losses = losses or result["losses"]  # the end-to-end run's
    ctx.status("dense reference")
    t0 = time.perf_counter()
    accuracy = cpic.dense_reference(config, seed=ctx.seed)
    rows.append(
        timing_row(
            "reference: logistic regression on the largest 7-voxel mean (reads every voxel)",
            Timing.of([time.perf_counter() - t0]),
            figures={"test accuracy": accuracy, "fraction read (test)": 1.0, "fraction read (train)": 1.0},
        )
    )
    steps = list(range(1, len(losses) + 1))
    return {
        "rows": rows,
        "xy": [
            {
                "title": "C-PIC worked example: training loss",
                "xlabel": "Adam step",
                "ylabel": "binary cross-entropy",
                "series": [{"label": "training loss", "x": steps, "y": losses}],
            }
        ],
    }


FUNCTIONS = Benchmark(
    name="tt-cross",
    summary="TT-cross of 8 analytic functions (d = 7, n = 16) at budgets 1e3–1e5: error and time vs teneva",
    baseline="time: teneva.cross on the same function, budget and kind of start, in the same process",
    figures=("relative error on 10⁴ random entries", "time", "evaluations", "sweeps", "rank"),
    quick=(Case("d7n16", dict(d=7, n=16, budgets=(1_000, 10_000), seeds=3, trajectory=())),),
    full=(
        Case(
            "d7n16",
            dict(
                d=7,
                n=16,
                budgets=(1_000, 10_000, 100_000),
                seeds=5,
                trajectory=tuple(int(b) for b in np.geomspace(1_000, 100_000, 31).round()),
            ),
        ),
    ),
    run=run_tt_cross,
    peers=("teneva",),
    repeats={"quick": 3, "full": 3},
)

VOLUME = Benchmark(
    name="tt-cross-volume",
    summary="QTT-cross of a float32 volume on disk (memmap) read entry by entry: fraction read, error, time",
    baseline="reading every voxel once (a sum over the memmap)",
    figures=("fraction of voxels read", "relative error on 10⁴ random voxels", "time"),
    quick=(Case("N256", dict(N=256, nswp=12)),),
    full=(Case("N512", dict(N=512, nswp=12)),),
    run=run_volume,
)

CPIC = Benchmark(
    name="cpic",
    summary="differentiable cross (C-PIC): classify volumes with/without a blob reading a few % of the voxels",
    baseline="accuracy: 0.5 is chance; reference row: a classifier that reads every voxel",
    figures=("test accuracy", "fraction of voxels read", "time"),
    quick=(Case("s32", dict(size=32, train=16, test=32, steps=100)),),
    full=(Case("s32", dict(size=32, train=32, test=64, steps=150)),),
    run=run_cpic,
)

BENCHMARKS = (FUNCTIONS, VOLUME, CPIC)
