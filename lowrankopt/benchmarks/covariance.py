"""Benchmarks of Kronecker-sum covariance estimation: ``kronecker-covariance`` and ``kronecker-covariance-scale``.

- ``kronecker-covariance``: Σ = A₁ ⊗ B₁ + 0.5 · I ⊗ C with AR(1) factors (ρ = 0.7, 0.5, −0.3), p = q = 15 (d = 225),
  Gaussian samples, n ∈ {25, 100, 400, 800}, 20 repetitions (quick: 3 sizes, 5). Relative Frobenius error
  ``‖Σ̂ − Σ‖_F / ‖Σ‖_F`` (mean over repetitions) of the sample covariance, PRLS with the plug-in and the
  cross-validated penalty, PRLS with the oracle λ = 2‖R(Ŝ − Σ)‖_op (needs Σ: a reference, not an estimator), the
  best 2-term Kronecker truncation and the flip-flop MLE (one term: misspecified here). Also each estimator's
  log-log slope of error vs n, over all n and over the last two (the rate; n^{-1/2} predicted once the
  threshold keeps both terms) and its median fit time at the largest n. Plot:
  error vs n. The ratio column is the error over the sample covariance's at the largest n.
- ``kronecker-covariance-scale``: PRLS (fixed λ = the plug-in value, computed first and timed apart) at
  p = q ∈ {30, 60, 100} (d up to 10⁴: Ŝ would be 800 MB), n = 200, matrix-free against the dense path (Ŝ, R(Ŝ),
  full SVD) where it fits. Each fit runs in a fresh subprocess: its wall time and its peak resident memory
  (``wait4``), and the same for a subprocess that only imports and generates the data (the baseline subtracted).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

from ..stats import KroneckerCovariance, rearrange
from .registry import Benchmark, Case
from .runner import Context, Timing, timing_row


def _ar1(n: int, rho: float) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    return rho ** (i[:, None] - i[None]).abs()


def _samples(p: int, q: int, n: int, g: torch.Generator) -> torch.Tensor:
    """n Gaussian samples ``(n, p, q)`` of Σ = A₁ ⊗ B₁ + 0.5 I ⊗ C, drawn as ``L_A Z L_Bᵀ + √0.5 Z' L_Cᵀ`` (Σ is never
    formed)."""
    La, Lb, Lc = (torch.linalg.cholesky(M) for M in (_ar1(p, 0.7), _ar1(q, 0.5), _ar1(q, -0.3)))
    Z1 = torch.randn(n, p, q, dtype=torch.float64, generator=g)
    Z2 = torch.randn(n, p, q, dtype=torch.float64, generator=g)
    return La @ Z1 @ Lb.T + math.sqrt(0.5) * Z2 @ Lc.T


def _sigma(p: int, q: int) -> torch.Tensor:
    return torch.kron(_ar1(p, 0.7), _ar1(q, 0.5)) + 0.5 * torch.kron(torch.eye(p, dtype=torch.float64), _ar1(q, -0.3))


ESTIMATORS = (
    "sample covariance",
    "PRLS, plug-in λ",
    "PRLS, cross-validated λ",
    "PRLS, oracle λ = 2‖R(Ŝ − Σ)‖ (reference)",
    "2-term truncation",
    "flip-flop MLE (1 term)",
)


def run_errors(case: Case, ctx: Context) -> dict:
    p = q = case.params["p"]
    sizes, reps = case.params["n"], case.params["reps"]
    Sigma = _sigma(p, q).to(ctx.device)
    norm = float(Sigma.norm())
    errors = {e: {n: [] for n in sizes} for e in ESTIMATORS}
    times = {e: [] for e in ESTIMATORS}
    for n in sizes:
        for rep in range(reps):
            ctx.status(f"n={n}: repetition {rep + 1}/{reps}")
            g = ctx.generator(1000 * n + rep)
            X = _samples(p, q, n, g).to(ctx.device)
            t0 = time.perf_counter()
            Xc = (X - X.mean(0)).reshape(n, -1)
            S = Xc.T @ Xc / n
            ctx.sync()
            times[ESTIMATORS[0]].append((n, time.perf_counter() - t0))
            errors[ESTIMATORS[0]][n].append(float((S - Sigma).norm()) / norm)
            oracle = 2 * float(torch.linalg.matrix_norm(rearrange(S - Sigma, p, q), 2))
            estimators = {
                ESTIMATORS[1]: KroneckerCovariance(p, q, generator=ctx.generator(rep)),
                ESTIMATORS[2]: KroneckerCovariance(p, q, penalty="cv", generator=ctx.generator(rep)),
                ESTIMATORS[3]: KroneckerCovariance(p, q, penalty=oracle),
                ESTIMATORS[4]: KroneckerCovariance(p, q, "truncated", n_terms=2),
                ESTIMATORS[5]: KroneckerCovariance(p, q, "flip-flop", tol=1e-8),
            }
            for name, est in estimators.items():
                ctx.sync()
                t0 = time.perf_counter()
                est.fit(X)
                ctx.sync()
                times[name].append((n, time.perf_counter() - t0))
                errors[name][n].append(est.error_norm(Sigma) / norm)
    mean = {e: [statistics.fmean(errors[e][n]) for n in sizes] for e in ESTIMATORS}
    logn = [math.log(n) for n in sizes]
    rows = []
    for e in ESTIMATORS:
        slope = statistics.linear_regression(logn, [math.log(v) for v in mean[e]]).slope
        figures = {f"error n={n:>4}": v for n, v in zip(sizes, mean[e], strict=True)}  # padded: columns sort by n
        figures["slope (log error / log n)"] = slope
        figures["slope, last two n"] = math.log(mean[e][-1] / mean[e][-2]) / (logn[-1] - logn[-2])
        last = [t for n, t in times[e] if n == sizes[-1]]
        row = timing_row(e, Timing.of(last), figures=figures, status=f"time: one fit at n = {sizes[-1]}")
        row["ratio"] = mean[e][-1] / mean[ESTIMATORS[0]][-1]
        rows.append(row)
    return {
        "rows": rows,
        "xy": [
            {
                "title": f"Σ = A⊗B + 0.5 I⊗C, p = q = {p}: relative Frobenius error (mean of {reps})",
                "xlabel": "n (samples)",
                "ylabel": "‖Σ̂ − Σ‖_F / ‖Σ‖_F",
                "xlog": True,
                "ylog": True,
                "series": [{"label": e, "x": list(sizes), "y": mean[e]} for e in ESTIMATORS],
            }
        ],
    }


_CHILD = r"""
import json, os, sys, time, torch
from lowrankopt.benchmarks.covariance import _samples
from lowrankopt.stats import KroneckerCovariance
p, n, solver, seed, threads = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
X = _samples(p, p, n, torch.Generator().manual_seed(seed))
out = {}
if solver != "none":
    t0 = time.perf_counter()
    lam = 2 * KroneckerCovariance(p, p, generator=torch.Generator().manual_seed(seed)).noise_norm(X - X.mean(0))
    out["plugin_time"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    est = KroneckerCovariance(p, p, penalty=lam, solver=solver, generator=torch.Generator().manual_seed(seed)).fit(X)
    out.update(time=time.perf_counter() - t0, n_terms=est.n_terms_, penalty=lam)
print(json.dumps(out))
"""


def _child(p: int, n: int, solver: str, seed: int) -> tuple[dict, float]:
    """Run one fit in a fresh interpreter: (its JSON output, its peak RSS in MB)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, "-c", _CHILD, str(p), str(n), solver, str(seed), str(torch.get_num_threads())]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"the {solver} fit at p = {p} failed: {err.strip().splitlines()[-1] if err else ''}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1024


def run_scale(case: Case, ctx: Context) -> dict:
    p, n, dense_max = case.params["p"], case.params["n"], case.params["dense_max"]
    ctx.status(f"p={p}: baseline process")
    _, base = _child(p, n, "none", ctx.seed)
    rows = []
    for solver in ("matrix-free", "dense"):
        if solver == "dense" and p > dense_max:
            gb = 2 * 8 * p**4 / 1e9
            rows.append({"variant": "dense (Ŝ, R(Ŝ), full SVD)", "skipped": f"not run: Ŝ and R(Ŝ) take {gb:.1f} GB and "
                         f"the SVD of a {p * p} × {p * p} matrix O(p⁶) = {p**6:.0e} flops"})  # fmt: skip
            continue
        ctx.status(f"p={p}: {solver}")
        out, peak = _child(p, n, solver, ctx.seed)
        rows.append(
            timing_row(
                "matrix-free (subspace iteration)" if solver == "matrix-free" else "dense (Ŝ, R(Ŝ), full SVD)",
                Timing.of([out["time"]]),
                figures={
                    "peak RSS (MB)": peak,
                    "peak − baseline (MB)": peak - base,
                    "plug-in λ time (s)": out["plugin_time"],
                    "terms": out["n_terms"],
                },
                status=f"d = {p * p}, n = {n}; baseline process {base:.0f} MB",
            )
        )
    if len(rows) == 2 and "time" in rows[1]:
        rows[0]["ratio"] = rows[0]["time"] / rows[1]["time"]
        rows[1]["ratio"] = 1.0
    return {"rows": rows}


ERRORS = Benchmark(
    name="kronecker-covariance",
    summary="Kronecker-sum covariance: error vs n of PRLS (plug-in, CV, oracle λ), truncation, flip-flop, sample",
    baseline="errors: the sample covariance's in the same run (ratio = error / its error at the largest n)",
    figures=("relative Frobenius error per n", "log-log slope", "fit time"),
    quick=(Case("p15", dict(p=15, n=(25, 100, 400), reps=5)),),
    full=(Case("p15", dict(p=15, n=(25, 100, 400, 800), reps=20)),),
    run=run_errors,
)

SCALE = Benchmark(
    name="kronecker-covariance-scale",
    summary="matrix-free PRLS at p = q up to 100 (d = 10⁴) vs the dense path: time and peak memory per fit",
    baseline="the dense path (Ŝ, R(Ŝ), full SVD) in a fresh process at the same p, where it fits",
    figures=("fit time", "peak RSS", "plug-in λ time"),
    quick=(Case("p30", dict(p=30, n=200, dense_max=30)),),
    full=tuple(Case(f"p{p}", dict(p=p, n=200, dense_max=60)) for p in (30, 60, 100)),
    run=run_scale,
    scaling=("p",),
)

BENCHMARKS = (ERRORS, SCALE)
