"""Benchmark ``autodiff``: the cost of the Riemannian gradient and Hessian-vector product relative to f.

For completion losses ``f(X) = ½‖P_Ω(X − A)‖²`` on tensor trains and fixed-rank matrices (float64, and one
float32 case): ``f(x)``, ``riemannian_grad(f, x)``, ``riemannian_hvp(f, x, ξ, curvature=False)`` (t3f's
``P ∇²f P``) and ``curvature=True`` (the exact Riemannian Hessian). The ratios to t_f are the figure of merit of the
autodiff Riemannian calculus (Novikov–Rakhuba–Oseledets 2022: "at about the cost of evaluating f");
targets grad/f ≤ 3 and hvp/f ≤ 8. Scaling plots: time vs d, n and r around the published TT size
(d = 10, n = 20, r = 10, |Ω| = 10⁵).

The column ``time / GEMM`` measures every row against the machine's arithmetic peak: the time of a dense square
matrix product ``(m × m) @ (m × m)`` in the case's dtype, timed in the same interleaved rounds, with ``m³`` the
*naive* multiply-add count of evaluating the entries sample by sample — ``N d r²`` for a tensor train (d products
of an r-vector with an r × r core slice per entry), ``N r`` for a matrix (one length-r dot product per entry).
``m = round(count^(1/3))``. Goals (issue 21): f within 4× and the gradient within 8× of that GEMM.

Case ``cg-iteration`` (issue 21 item 1): the generic path end to end — ``minimize(f, x0, "cg")`` on a user-written
gather loss (autodiff gradient and model step) against the closed form ``complete()`` on the same data, both per
CG iteration (a fixed number of iterations, ``gtol=0``); goal: the generic iteration within 2× of the closed form.
"""

from __future__ import annotations

import torch

from .. import FixedRankMatrices, FixedTTRank, LowRankMatrix, minimize, riemannian_grad, riemannian_hvp
from ..autodiff import riemannian_hessian_form
from .registry import Benchmark, Case
from .runner import Context, ratio, timing_row
from .timing import Timing

TARGETS = {"grad": 3.0, "hvp": 8.0, "cg": 2.0}
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _tt_cases(base: dict, values: dict[str, tuple[int, ...]]) -> tuple[Case, ...]:
    """The base TT case and, for each parameter, the cases that vary it alone (names like ``tt-d20``)."""
    cases = {"tt": dict(kind="tt", **base)}
    for param, vals in values.items():
        for v in vals:
            if v != base[param]:
                cases[f"tt-{param}{v}"] = dict(kind="tt", **{**base, param: v})
    return tuple(Case(name, params) for name, params in cases.items())


QUICK = _tt_cases(dict(d=6, n=10, r=4, N=20_000), {"d": (4, 6, 10), "n": (5, 10, 20), "r": (2, 4, 8)}) + (
    Case("tt-float32", dict(kind="tt", d=6, n=10, r=4, N=20_000, dtype="float32")),
    Case("matrix", dict(kind="matrix", m=1000, n=800, r=10, N=100_000)),
    Case("cg-iteration", dict(kind="cg-iteration", m=600, n=500, r=6, oversampling=4, iters=10)),
)
FULL = _tt_cases(dict(d=10, n=20, r=10, N=100_000), {"d": (5, 10, 20, 40), "n": (10, 20, 40), "r": (5, 10, 20, 40)}) + (
    Case("tt-float32", dict(kind="tt", d=10, n=20, r=10, N=100_000, dtype="float32")),
    Case("matrix", dict(kind="matrix", m=5000, n=5000, r=20, N=1_000_000)),
    Case("cg-iteration", dict(kind="cg-iteration", m=600, n=500, r=6, oversampling=4, iters=30)),
)


def naive_madds(p: dict) -> int:
    """Multiply-adds of evaluating the N entries one by one: ``N d r²`` (TT), ``N r`` (matrix)."""
    return p["N"] * p["d"] * p["r"] ** 2 if p["kind"] == "tt" else p["N"] * p["r"]


def _gemm(p: dict, ctx: Context):
    """A square matrix product with :func:`naive_madds` multiply-adds, in the case's dtype and device."""
    m = max(1, round(naive_madds(p) ** (1 / 3)))
    a = torch.randn(m, m, generator=ctx.generator(1), dtype=DTYPES[p.get("dtype", "float64")]).to(ctx.device)
    return lambda: a @ a


def _problem(p: dict, ctx: Context):
    """``(f, x, ξ)``: a completion loss with its data, a random point and a random tangent vector at it."""
    g, dev = ctx.generator(), ctx.device
    dtype = DTYPES[p.get("dtype", "float64")]
    if p["kind"] == "tt":
        d, n = p["d"], p["n"]
        # ranks capped at what each bond allows (r_k <= n^k, n^(d-k))
        M = FixedTTRank([n] * d, [min(p["r"], n ** min(k, d - k)) for k in range(1, d)])
        A, x = (M.random_point(dtype=dtype, device=dev, generator=g) for _ in range(2))
        idx = torch.randint(0, n, (p["N"], d), generator=g).to(dev)
        vals = A.gather(idx)
        f = lambda Y: 0.5 * ((Y.gather(idx) - vals) ** 2).sum()  # noqa: E731
    else:
        M = FixedRankMatrices(p["m"], p["n"], p["r"])
        A, x = (M.random_point(dtype=dtype, device=dev, generator=g) for _ in range(2))
        rows = torch.randint(0, p["m"], (p["N"],), generator=g)
        cols = torch.randint(0, p["n"], (p["N"],), generator=g)
        idx = torch.stack([rows, cols], 1).to(dev)  # the (N, 2) index of every format's gather
        vals = A.gather(idx)
        f = lambda Y: 0.5 * ((Y.gather(idx) - vals) ** 2).sum()  # noqa: E731
    return f, x, M.random_tangent(x, generator=g)


def _per_iteration(t: Timing, iters: int) -> Timing:
    return Timing.of([s / iters for s in t.rounds])


def _run_cg_iteration(p: dict, ctx: Context) -> dict:
    """``minimize(f, x0, "cg")`` on ``f = ½‖P_Ω(X) − a‖²`` written with ``gather`` vs ``complete()``, per iteration."""
    from ..completion import complete, sample_indices

    g, dev = ctx.generator(), ctx.device
    m, n, r, k = p["m"], p["n"], p["r"], p["iters"]
    A = LowRankMatrix.random(m, n, r, dtype=torch.float64, generator=g).to(dev)
    idx = sample_indices((m, n), p["oversampling"] * (m + n - r) * r, generator=g).to(dev)
    vals = A.gather(idx)
    x0 = LowRankMatrix.random(m, n, r, dtype=torch.float64, generator=g).to(dev)

    def f(X):
        return 0.5 * ((X.gather(idx) - vals) ** 2).sum()

    M = FixedRankMatrices(m, n, r)
    eta = M.random_tangent(x0, generator=g)
    nit = {}  # the iterations a run made (a solver may stop before max_iter even with gtol = 0: rounding floor)

    def counted(key, solve):
        def go():
            nit[key] = max(solve().nit, 1)

        return go

    t = ctx.time(
        {
            "f": lambda: f(x0),
            "grad": lambda: riemannian_grad(f, x0),
            "form": lambda: riemannian_hessian_form(f, x0, eta),
            "cg": counted("cg", lambda: minimize(f, x0, "cg", max_iter=k, gtol=0)),
            "complete": counted("complete", lambda: complete(idx, vals, (m, n), r, x0=x0, max_iter=k, tol=0)),
            "gemm": _gemm(dict(kind="matrix", N=idx.shape[0], r=r), ctx),
        }
    )
    t["cg"], t["complete"] = _per_iteration(t["cg"], nit["cg"]), _per_iteration(t["complete"], nit["complete"])

    def per_gemm(key: str) -> dict:
        return {"figures": {"time / GEMM": ratio(t[key], t["gemm"])}}

    # the split of an iteration: f, the gradient, the model step's ⟨η, Hess f η⟩ (ratios to f)
    rows = [timing_row("f(x)", t["f"], status="baseline", **per_gemm("f"))]
    rows.append(timing_row("riemannian_grad", t["grad"], ratio=ratio(t["grad"], t["f"]), **per_gemm("grad")))
    label = "riemannian_hessian_form (the model step's curvature)"
    rows.append(timing_row(label, t["form"], ratio=ratio(t["form"], t["f"]), **per_gemm("form")))
    # then the iterations (ratio to the closed form)
    rows.append(timing_row("complete() (closed form), per CG iteration", t["complete"], **per_gemm("complete")))
    rt = ratio(t["cg"], t["complete"])
    status = f"ratio to complete(), target ≤ {TARGETS['cg']:g}: " + ("met" if rt <= TARGETS["cg"] else "MISSED")
    label = 'minimize(f, x0, "cg"), generic gather loss, per iteration'
    rows.append(timing_row(label, t["cg"], ratio=rt, status=status, **per_gemm("cg")))
    return {"rows": rows}


def run(case: Case, ctx: Context) -> dict:
    if case.params["kind"] == "cg-iteration":
        return _run_cg_iteration(dict(case.params), ctx)
    f, x, xi = _problem(dict(case.params), ctx)
    t = ctx.time(
        {
            "f": lambda: f(x),
            "grad": lambda: riemannian_grad(f, x),
            "hvp": lambda: riemannian_hvp(f, x, xi, curvature=False),
            "hvp_curv": lambda: riemannian_hvp(f, x, xi, curvature=True),
            "gemm": _gemm(dict(case.params), ctx),
        }
    )
    labels = {
        "f": "f(x)",
        "grad": "riemannian_grad",
        "hvp": "riemannian_hvp, curvature=False",
        "hvp_curv": "riemannian_hvp, curvature=True",
    }

    def per_gemm(key: str) -> dict:
        return {"figures": {"time / GEMM": ratio(t[key], t["gemm"])}}

    rows = [timing_row(labels["f"], t["f"], status="baseline", **per_gemm("f"))]
    for key in ("grad", "hvp", "hvp_curv"):
        r = ratio(t[key], t["f"])
        target = TARGETS.get(key)
        status = "" if target is None else (f"target ≤ {target:g}: " + ("met" if r <= target else "MISSED"))
        rows.append(timing_row(labels[key], t[key], ratio=r, status=status, **per_gemm(key)))
    m3 = naive_madds(dict(case.params))
    gemm_label = f"dense GEMM, {m3:.2g} multiply-adds"
    rows.append(timing_row(gemm_label, t["gemm"], status="peak reference", **per_gemm("gemm")))
    return {"rows": rows}


BENCHMARK = Benchmark(
    name="autodiff",
    summary="Riemannian gradient and HVP by autodiff vs evaluating f (TT and matrix completion losses, float64 and "
    "one float32 case), and each against a dense GEMM of the naive multiply-add count",
    baseline="time of the row / time of f(x), median of per-round ratios (targets: grad ≤ 3, hvp ≤ 8); "
    "time / GEMM: the row over a square GEMM of N d r² (TT) or N r (matrix) multiply-adds, same rounds",
    figures=(
        "median, min and max seconds of f, grad, hvp, hvp with curvature and the GEMM",
        "ratios to f",
        "ratios to the GEMM",
    ),
    quick=QUICK,
    full=FULL,
    run=run,
    scaling=("d", "n", "r"),
    repeats={"quick": 5, "full": 9},
)
