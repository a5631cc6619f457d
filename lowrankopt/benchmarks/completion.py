"""Benchmarks ``matrix-completion`` and ``tt-completion``: time to a test error of 1e-8, ours vs the peers.

``matrix-completion`` (float64, CPU for the peers): m = n, rank k, |Ω| = OS·k(2n − k) entries sampled without
repetition (LRGeomCG's data, Vandereycken 2013: 1000², k = 40, OS = 3 is its ``small_example``; 1000²,
k = 10, OS = 5 is Manopt's ``low_rank_matrix_completion``; 20000², k = 10, OS = 5 its ``big_example``).
Data, test set Γ and start point (the rank-k truncated SVD of the zero-filled ``P_Ω A``) come from
:func:`.peers.pymanopt_completion.make_problem` and are shared by every solver. The peers are pymanopt's
``ConjugateGradient`` on ``FixedRankEmbedded`` with its PyTorch autodiff, the cost written on the observed
entries (``sparse``) and densely (``dense``), with a hand-written NumPy gradient (the fastest of the three at
1000²),
and ``TrustRegions`` (recorded as an error if it raises).

``tt-completion``: d = 10, n = 20, TT-rank r, |Ω| = |Γ| = 10·d·n·r² (RTTC's setup, Steinlechner 2016); the
truth has i.i.d. uniform [0, 2/r) cores; lowrankopt starts from the best constant tensor with rank
continuation (``complete``'s default). There is no Python peer for Riemannian TT completion (t3f is
TensorFlow and has no completion solver; TTeMPS is MATLAB).

Cases with ``kappa`` (``-kappa1``, ``-kappa1e2``, ``-kappa1e4``): the target has geometric singular values with
condition number κ (:func:`.peers.pymanopt_completion.make_problem`), and lowrankopt starts from its own spectral
start with the automatic rank continuation (``complete``'s default: the ranks the start resolves above the sampling
noise, then one rank at a time; the time of the start counts in its clock), while pymanopt starts from LRGeomCG's
start as in the other cases (its computation not counted). lowrankopt's rows with ``rank_continuation=False`` show
plain CG / trust-region / L-BFGS from the same spectral start, at the full rank.

Reported per solver: the time and the iterations until the relative test error ``‖P_Γ(X − A)‖/‖P_Γ A‖``
first reaches 1e-8 (the solver's own time; test-error evaluation excluded; with ``repeats`` > 1 the median over
that many runs of every solver, not interleaved), the final test error, and the ratio of each solver's time to
lowrankopt CG's (a ratio of medians). Convergence plots: test error vs time and vs iterations.
"""

from __future__ import annotations

import statistics

import numpy as np
import torch

from ..completion import complete, sample_indices
from ..demo import _random_truth
from ..formats.lowrank import LowRankMatrix
from .peers import PeerUnavailable
from .peers.pymanopt_completion import make_problem, run_pymanopt
from .registry import Benchmark, Case
from .runner import Context

TARGET = 1e-8
OURS = ("cg", "trust-region", "lbfgs")
# pymanopt 2.2.1's FixedRankEmbedded.projection/transport evaluate U @ S @ V.T @ Z left to right: two dense
# m × n temporaries per transport whatever the cost function; beyond this many entries we do not run it.
PYMANOPT_MAX_ENTRIES = 5e7


def _first_below(history: list[dict]) -> tuple[float | None, int | None]:
    for rec in history:
        if rec.get("test_error") is not None and rec["test_error"] <= TARGET:
            return rec["time"], rec["iter"]
    return None, None


def _row(variant: str, runs: list[dict], status: str, failed: bool = False) -> dict:
    """A result row from one or more runs of a solver (times: time to target, median/min/max over the runs)."""
    times = [r["time_to_target"] for r in runs]
    first = runs[0]
    reached = all(t is not None for t in times)
    row = {
        "variant": variant,
        "time": statistics.median(times) if reached else None,
        "time_min": min(times) if reached else None,
        "time_max": max(times) if reached else None,
        "repeats": len(runs),
        "figures": {
            "iterations to 1e-8": first["iters_to_target"],
            "final test error": first["final_test_error"],
        },
        "status": status,
    }
    if not reached and not failed and first["history"]:
        row["status"] = f"{status}; 1e-8 not reached in {first['history'][-1]['time']:.3g} s"
    return row


def _ours(ctx: Context, method: str, idx, vals, shape, rank, test, x0, continuation=None) -> tuple[dict, dict]:
    def once(max_iter=100_000):
        return complete(
            idx,
            vals,
            shape,
            rank,
            method=method,
            test=test,
            x0=x0,
            max_iter=max_iter,
            max_time=ctx.max_time,
            generator=ctx.generator(),
            rank_continuation=continuation,
        )

    ctx.status(f"lowrankopt {method}: warm-up")
    once(max_iter=2)
    runs = []
    for k in range(ctx.repeats):
        ctx.status(f"lowrankopt {method}: run {k + 1}/{ctx.repeats}")
        res = once()
        hist = [{"iter": h["iter"], "time": h["solve_time"], "test_error": h.get("test_error")} for h in res.history]
        t, it = _first_below(hist)
        runs.append({"time_to_target": t, "iters_to_target": it, "final_test_error": res.test_error, "history": hist})
    label = f"lowrankopt {method}" + (", no rank continuation" if continuation is False else "")
    row = _row(label, runs, res.message)
    row["figures"]["start rank"] = res.history[0]["rank"]
    return row, _curve(label, runs[0]["history"])


def _ours_both(ctx: Context, *problem, continuation: tuple = (None,)) -> tuple[list[dict], list[dict]]:
    """Rows and curves of lowrankopt's CG, trust-region and L-BFGS on one problem (for each ``rank_continuation``
    setting)."""
    runs = [_ours(ctx, method, *problem, c) for c in continuation for method in OURS]
    return [row for row, _ in runs], [curve for _, curve in runs]


def _curve(label: str, history: list[dict]) -> dict:
    pts = [h for h in history if h.get("test_error") is not None]
    return {
        "label": label,
        "time": [h["time"] for h in pts],
        "iter": [h["iter"] for h in pts],
        "error": [h["test_error"] for h in pts],
    }


def _pymanopt(ctx: Context, P: dict, cost: str, optimizer: str, backend: str = "pytorch") -> tuple[dict, dict | None]:
    label = f"pymanopt {optimizer} ({cost} cost" + (", hand-written NumPy gradient)" if backend == "numpy" else ")")
    ctx.status(label)
    keys = ("m", "n", "k", "rows", "cols", "vals", "test_rows", "test_cols", "test_vals", "U0", "s0", "Vt0")
    runs = []
    for k in range(ctx.repeats):  # as many runs as ours (pymanopt's own setup does its warm-up)
        ctx.status(f"{label}: run {k + 1}/{ctx.repeats}")
        try:
            out = run_pymanopt(
                *(P[key] for key in keys),
                cost=cost,
                backend=backend,
                optimizer=optimizer,
                max_time=ctx.max_time,
                max_iterations=100_000,
                target_test_error=TARGET,
            )
        except PeerUnavailable as exc:
            return {"variant": label, "skipped": f"skipped: {exc}"}, None
        runs.append(out)
        if out["error"]:
            break  # a crash repeats identically
    first = runs[0]
    status = first["error"] or first["stopping_criterion"] or first["status"]
    row = _row(label, runs, f"pymanopt {first['version']}: {status}", failed=bool(first["error"]))
    return row, _curve(label, first["history"]) if first["history"] else None


def _with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's time divided by lowrankopt CG's (the baseline)."""
    base = next(r.get("time") for r in rows if r["variant"] == "lowrankopt cg")
    for r in rows:
        if base and r.get("time") is not None:
            r["ratio"] = r["time"] / base
    return rows


def _result(rows: list[dict], curves: list[dict], **extra) -> dict:
    return {
        "rows": _with_ratios(rows),
        "curves": curves,
        "target": TARGET,
        "error_label": "relative test error",
        "time_label": "time to test error 1e-8 (s)",
        **extra,
    }


def run_matrix(case: Case, ctx: Context) -> dict:
    p = case.params
    ctx.status("generating data")
    P = make_problem(p["n"], p["n"], p["k"], p["os"], ctx.seed, kappa=p.get("kappa"))
    dev = ctx.device
    idx = torch.from_numpy(np.stack([P["rows"], P["cols"]], 1)).to(dev)
    vals = torch.from_numpy(P["vals"]).to(dev)
    test = (
        torch.from_numpy(np.stack([P["test_rows"], P["test_cols"]], 1)).to(dev),
        torch.from_numpy(P["test_vals"]).to(dev),
    )
    x0 = LowRankMatrix(torch.from_numpy(P["U0"]), torch.from_numpy(P["s0"]), torch.from_numpy(P["Vt0"].T.copy()))
    if p.get("kappa") is None:
        rows, curves = _ours_both(ctx, idx, vals, (p["n"], p["n"]), p["k"], test, x0.to(dev))
    else:  # lowrankopt's own start and default rank continuation, and the plain methods from that start
        rows, curves = _ours_both(ctx, idx, vals, (p["n"], p["n"]), p["k"], test, None, continuation=(None, False))
    if p["n"] * p["n"] > PYMANOPT_MAX_ENTRIES:
        reason = "not run: pymanopt's FixedRankEmbedded transport forms dense m×n matrices (GBs at this size)"
        rows.append({"variant": "pymanopt cg", "skipped": reason})
    else:
        for args in (("sparse", "cg"), ("dense", "cg"), ("dense", "cg", "numpy"), ("sparse", "trust-regions")):
            row, curve = _pymanopt(ctx, P, *args)
            rows.append(row)
            curves += [curve] if curve else []
    return _result(rows, curves, samples=len(P["vals"]))


def run_tt(case: Case, ctx: Context) -> dict:
    d, n, r = (case.params[k] for k in ("d", "n", "r"))
    g = ctx.generator()
    shape = [n] * d
    truth = _random_truth(shape, r, torch.float64, g)
    N = 10 * d * n * r * r
    idx, tidx = sample_indices(shape, N, generator=g), sample_indices(shape, N, generator=g)
    vals, tvals = truth.gather(idx), truth.gather(tidx)
    dev = ctx.device
    rows, curves = _ours_both(ctx, idx.to(dev), vals.to(dev), shape, r, (tidx.to(dev), tvals.to(dev)), None)
    rows.append({"variant": "t3f / TTeMPS", "skipped": "skipped: no Python peer for Riemannian TT completion"})
    return _result(rows, curves)


def _completion_benchmark(name: str, summary: str, **kwargs) -> Benchmark:
    return Benchmark(
        name=name,
        summary=f"{summary}: time to relative test error 1e-8, lowrankopt CG, trust-region and L-BFGS"
        f"{kwargs.pop('vs', '')}",
        baseline="time to 1e-8 of the row / time to 1e-8 of lowrankopt CG (> 1: slower than lowrankopt CG)",
        figures=("time to 1e-8 (s)", "iterations to 1e-8", "final test error", "start rank"),
        **kwargs,
    )


BENCHMARKS = (
    _completion_benchmark(
        "matrix-completion",
        "Matrix completion (LRGeomCG data)",
        vs=" vs pymanopt (sparse, dense, NumPy-gradient costs)",
        quick=(Case("n500-k10-os5", dict(n=500, k=10, os=5.0)), Case("n1000-k10-os5", dict(n=1000, k=10, os=5.0))),
        full=(
            Case("n1000-k10-os5", dict(n=1000, k=10, os=5.0)),
            Case("n1000-k40-os3", dict(n=1000, k=40, os=3.0)),
            Case("n5000-k10-os5", dict(n=5000, k=10, os=5.0)),
            Case("n20000-k10-os5", dict(n=20000, k=10, os=5.0)),
            Case("n1000-k10-os5-kappa1", dict(n=1000, k=10, os=5.0, kappa=1.0)),
            Case("n1000-k10-os5-kappa1e2", dict(n=1000, k=10, os=5.0, kappa=1e2)),
            Case("n1000-k10-os5-kappa1e4", dict(n=1000, k=10, os=5.0, kappa=1e4)),
        ),
        run=run_matrix,
        scaling=("n",),
        peers=("pymanopt",),
    ),
    _completion_benchmark(
        "tt-completion",
        "TT completion (RTTC setup, d = 10, n = 20)",
        quick=(Case("d10-n20-r2", dict(d=10, n=20, r=2)), Case("d10-n20-r4", dict(d=10, n=20, r=4))),
        full=tuple(Case(f"d10-n20-r{r}", dict(d=10, n=20, r=r)) for r in (4, 6, 8)),
        run=run_tt,
        scaling=("r",),
        peers=("t3f",),
    ),
)
