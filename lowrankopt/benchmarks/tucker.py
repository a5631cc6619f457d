"""Benchmark ``tucker-completion``: the Tucker manifold against the TT manifold on the same 3-D and 4-D completion
problems.

The truth is a random tensor of multilinear ranks ``(r, …, r)`` (orthonormal factors, Gaussian core, scaled to
unit RMS entry); its TT-ranks are ``r_k = min(r^k, r^{d−k})`` — ``(r, r)`` in 3-D, ``(r, r², r)`` in 4-D — so both
manifolds hold it exactly, the TT one with more parameters in 4-D. ``|Ω| = os · dim`` entries of the *larger* of the
two manifolds (so that both problems are well determined), a test set Γ of the same size, both sampled without
repetition. Both start from the truncation (HOSVD / TT-SVD) of the zero-filled, rescaled data ``P_Ω A / p`` and run
``minimize(f, x0, method)`` on ``f = ½‖P_Ω X − a‖²`` written with ``gather`` (autodiff: the δ-trick gradient and
the exact Hessian), with trust-region and CG; and lowrankopt's TT completion solver ``complete()`` (rank
continuation from the best constant tensor, its default), which the spectral start does not need in 3-D but does in
4-D (from the TT-SVD of sparse data the plain runs stall in a poor local minimum there).

Reported per row: the time and iterations until the relative test error ``‖P_Γ(X − A)‖/‖P_Γ A‖`` first reaches 1e-8
(the solver's time, the start's computation included, the test-error evaluations in the callback subtracted;
every row after one warm-up run), the final test error, the
manifold's dimension; ratio: time to 1e-8 over the Tucker trust-region row's. There is no Python peer with a Tucker
manifold and autodiff (Manopt's ``fixedrankfactory_tucker_preconditioned`` and tucker_riemopt are MATLAB / JAX).
"""

from __future__ import annotations

import math
import time

import torch

from ..completion import complete, sample_indices
from ..formats.tt import TensorTrain
from ..formats.tucker import Tucker
from ..manifolds import FixedTTRank, FixedTuckerRank
from ..optim import minimize
from .completion import TARGET, _curve, _first_below, _row
from .registry import Benchmark, Case
from .runner import Context

METHODS = ("trust-region", "cg")


def _tt_ranks(d: int, r: int) -> list[int]:
    return [min(r**k, r ** (d - k)) for k in range(1, d)]


def _truth(shape: list[int], r: int, g: torch.Generator) -> Tucker:
    x = Tucker.random(shape, r, dtype=torch.float64, generator=g)
    return x * (math.sqrt(math.prod(shape)) / float(x.norm()))


def _solve(ctx: Context, M, x0, start_time: float, idx, vals, test, method: str) -> dict:
    tidx, tvals = test
    tnorm = float(torch.linalg.vector_norm(tvals))
    spent = [0.0]  # seconds spent in the callback so far (not the solver's)
    hist: list[dict] = []

    def callback(res) -> bool:
        t0 = time.perf_counter()
        err = float(torch.linalg.vector_norm(res.x.gather(tidx) - tvals)) / tnorm
        hist.append({"iter": res.nit, "time": start_time + res.history[-1]["time"] - spent[0], "test_error": err})
        spent[0] += time.perf_counter() - t0
        return err <= TARGET / 10  # a decade below the target: the curve shows the target crossed

    def f(X):
        return 0.5 * ((X.gather(idx) - vals) ** 2).sum()

    minimize(f, x0, method, manifold=M, max_iter=2, gtol=0.0)  # warm-up (allocator, index plans)
    res = minimize(f, x0, method, manifold=M, gtol=1e-14, max_iter=10_000, max_time=ctx.max_time, callback=callback)
    t, it = _first_below(hist)
    return {
        "time_to_target": t,
        "iters_to_target": it,
        "final_test_error": hist[-1]["test_error"] if hist else None,
        "history": hist,
        "message": res.message,
    }


def run(case: Case, ctx: Context) -> dict:
    d, n, r, os_ = (case.params[k] for k in ("d", "n", "r", "os"))
    shape = [n] * d
    g = ctx.generator()
    ctx.status("generating data")
    truth = _truth(shape, r, g)
    manifolds = {"Tucker": FixedTuckerRank(shape, r), "TT": FixedTTRank(shape, _tt_ranks(d, r))}
    N = int(os_ * max(M.dim for M in manifolds.values()))
    both = sample_indices(shape, 2 * N, generator=g)  # without repetition: Ω and Γ disjoint
    idx, tidx = both[:N], both[N:]
    vals, tvals = truth.gather(idx), truth.gather(tidx)

    def spectral_start(name: str):  # the truncation of the zero-filled, rescaled data (its time counts)
        t0 = time.perf_counter()
        zero_filled = torch.zeros(shape, dtype=torch.float64, device=vals.device)
        zero_filled[tuple(idx.T)] = vals * (math.prod(shape) / N)
        x0 = Tucker.from_dense(zero_filled, r) if name == "Tucker" else TensorTrain.from_dense(zero_filled, tt_ranks)
        return x0, time.perf_counter() - t0

    tt_ranks = _tt_ranks(d, r)
    for name in manifolds:  # warm-up
        spectral_start(name)
    dev = ctx.device
    idx, vals, test = idx.to(dev), vals.to(dev), (tidx.to(dev), tvals.to(dev))
    rows, curves = [], []
    for name, M in manifolds.items():
        for method in METHODS:
            label = f"{name} {method}"
            ctx.status(label)
            x0, t_start = spectral_start(name)
            run_ = _solve(ctx, M, x0.to(dev), t_start, idx, vals, test, method)
            row = _row(label, [run_], run_["message"])
            row["figures"]["manifold dimension"] = M.dim
            rows.append(row)
            curves.append(_curve(label, run_["history"]))
    label = "TT complete() (rank continuation from the constant tensor)"  # lowrankopt's TT completion solver
    ctx.status(label)
    complete(idx, vals, shape, tt_ranks, max_iter=2, generator=ctx.generator(1))  # warm-up, as the other rows'
    res = complete(idx, vals, shape, tt_ranks, test=test, max_time=ctx.max_time, generator=g)
    hist = [{"iter": h["iter"], "time": h["solve_time"], "test_error": h.get("test_error")} for h in res.history]
    t, it = _first_below(hist)
    run_ = {"time_to_target": t, "iters_to_target": it, "final_test_error": res.test_error, "history": hist}
    row = _row(label, [run_], res.message)
    row["figures"]["manifold dimension"] = manifolds["TT"].dim
    rows.append(row)
    curves.append(_curve(label, hist))
    base = rows[0]["time"]
    for row in rows:
        if base and row.get("time") is not None:
            row["ratio"] = row["time"] / base
    rows.append({"variant": "Manopt / tucker_riemopt", "skipped": "skipped: no Python peer (MATLAB / JAX)"})
    return {
        "rows": rows,
        "curves": curves,
        "target": TARGET,
        "error_label": "relative test error",
        "time_label": "time to test error 1e-8 (s)",
        "samples": N,
    }


BENCHMARK = Benchmark(
    name="tucker-completion",
    summary="Tucker vs TT manifold on the same 3-D and 4-D completion problems: time to test error 1e-8",
    baseline="time to 1e-8 of the row / time to 1e-8 of the Tucker trust-region row",
    figures=("time to 1e-8 (s)", "iterations to 1e-8", "final test error", "manifold dimension"),
    quick=(Case("d3-n20-r3", dict(d=3, n=20, r=3, os=4.0)), Case("d4-n10-r2", dict(d=4, n=10, r=2, os=4.0))),
    full=(
        Case("d3-n50-r5", dict(d=3, n=50, r=5, os=4.0)),
        Case("d3-n100-r8", dict(d=3, n=100, r=8, os=4.0)),
        Case("d4-n20-r3", dict(d=4, n=20, r=3, os=4.0)),
        Case("d4-n30-r4", dict(d=4, n=30, r=4, os=4.0)),
    ),
    run=run,
    scaling=("n", "r"),
)
