"""Benchmark ``rank-r-approximation``: the best rank-r approximation of a dense matrix by lowrankopt's optimizers.

``f(X) = ½‖X − A‖²`` over m × n matrices of rank r (float64, f written with ``X.full()``: gradient, Hessian forms
and Hessian products by autodiff), with ``A = U diag(σ) Vᵀ`` for random orthonormal U, V and ``σ_k = 1/k``
(k = 1 … min(m, n)): the gap ``σ_r / σ_{r+1} = (r + 1)/r`` makes the Riemannian Hessian at the optimum
ill-conditioned as r grows (its curvature term scales with the residual ``A − X*``). The optimum is the truncated
SVD (Eckart–Young): ``f* = ½ Σ_{k>r} σ_k²`` and ``X* = U_r diag(σ_{≤r}) V_rᵀ``, known in closed form.

Every solver — CG (PR+, model steps), trust-region (exact Hessian), L-BFGS and steepest descent — starts from the
same random point of unit norm and runs until the relative excess ``(f − f*)/f*`` first falls to 1e-12 (read from
each iteration's f: no extra evaluations; the run stops there through its callback), or for at most the context's
``max_time``. Reported: the time and iterations to that target, the relative distance ``‖X − X*‖/‖X*‖`` of the
last iterate, the evaluations of f, of the gradient and of Hessian products (forms), and each solver's time over
CG's (a ratio of medians over ``repeats`` runs).
"""

from __future__ import annotations

import math
import statistics

import torch

from .. import FixedRankMatrices, LowRankMatrix, minimize
from .registry import Benchmark, Case
from .runner import Context

TARGET = 1e-12
METHODS = ("cg", "trust-region", "lbfgs", "sd")


def _problem(p: dict, ctx: Context):
    """``(f, x0, f*, X*)`` of the case (A from QR of Gaussian matrices drawn with the context's generator)."""
    m, n, r = p["m"], p["n"], p["r"]
    g, dev = ctx.generator(), ctx.device
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=g))[0]
    sigma = 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
    A = ((U * sigma) @ V.T).to(dev)
    fstar = 0.5 * float((sigma[r:] ** 2).sum())
    Xstar = LowRankMatrix(U[:, :r], sigma[:r], V[:, :r]).to(dev)
    x0 = FixedRankMatrices(m, n, r).random_point(generator=g, dtype=torch.float64).to(dev)
    return (lambda X: 0.5 * ((X.full() - A) ** 2).sum()), x0, fstar, Xstar


def _solve(method: str, f, x0, fstar: float, Xstar: LowRankMatrix, ctx: Context) -> dict:
    def reached(res) -> bool:
        return (res.fun - fstar) / fstar <= TARGET

    res = minimize(f, x0, method, gtol=0.0, max_iter=100_000, max_time=ctx.max_time, callback=reached)
    hit = next((h for h in res.history if (h["fun"] - fstar) / fstar <= TARGET), None)
    # densely: the Gram form of ‖X − X*‖ cancels to rounding noise (or 0) between nearby points
    dense = Xstar.full()
    dist = float(torch.linalg.matrix_norm(res.x.full() - dense) / torch.linalg.matrix_norm(dense))
    return {"time": None if hit is None else hit["time"], "iters": None if hit is None else hit["iter"], "res": res,
            "dist": dist}  # fmt: skip


def run(case: Case, ctx: Context) -> dict:
    f, x0, fstar, Xstar = _problem(dict(case.params), ctx)
    rows, curves = [], []
    for method in METHODS:
        ctx.status(f"lowrankopt {method}: warm-up")
        minimize(f, x0, method, max_iter=2)
        runs = []
        for k in range(ctx.repeats):
            ctx.status(f"lowrankopt {method}: run {k + 1}/{ctx.repeats}")
            runs.append(_solve(method, f, x0, fstar, Xstar, ctx))
        first, times = runs[0], [r["time"] for r in runs]
        res = first["res"]
        reached = all(t is not None for t in times)
        status = res.message if reached else f"{res.message}; {TARGET:g} not reached in {res.time:.3g} s"
        rows.append(
            {
                "variant": f"lowrankopt {method}",
                "time": statistics.median(times) if reached else None,
                "time_min": min(times) if reached else None,
                "time_max": max(times) if reached else None,
                "repeats": len(runs),
                "figures": {
                    f"iterations to {TARGET:g}": first["iters"],
                    "final ‖X − X*‖/‖X*‖": first["dist"],
                    "f / grad / Hessian evaluations": f"{res.nfev} / {res.ngev} / {res.nhev}",
                },
                "status": status,
            }
        )
        pts = [h for h in res.history if h["fun"] > fstar]  # (f ≤ f* is the target reached to rounding)
        curves.append(
            {
                "label": f"lowrankopt {method}",
                "time": [h["time"] for h in pts],
                "iter": [h["iter"] for h in pts],
                "error": [(h["fun"] - fstar) / fstar for h in pts],
            }
        )
    base = rows[0]["time"]  # CG's
    for row in rows:
        if base and row["time"] is not None and math.isfinite(row["time"]):
            row["ratio"] = row["time"] / base
    return {
        "rows": rows,
        "curves": curves,
        "target": TARGET,
        "error_label": "relative excess (f − f*)/f*",
        "time_label": f"time to (f − f*)/f* ≤ {TARGET:g} (s)",
    }


BENCHMARK = Benchmark(
    name="rank-r-approximation",
    summary="Best rank-r approximation of a dense matrix (σ_k = 1/k): time to (f − f*)/f* ≤ 1e-12, lowrankopt CG, "
    "trust-region, L-BFGS and steepest descent against the truncated SVD",
    baseline="time to the target of the row / time to the target of lowrankopt CG (> 1: slower than CG)",
    figures=("time to (f − f*)/f* ≤ 1e-12 (s)", "iterations to the target", "final ‖X − X*‖/‖X*‖", "evaluations"),
    quick=(Case("m300-n200-r5", dict(m=300, n=200, r=5)),),
    full=(
        Case("m1000-n800-r10", dict(m=1000, n=800, r=10)),
        Case("m2000-n1500-r20", dict(m=2000, n=1500, r=20)),
    ),
    run=run,
)
