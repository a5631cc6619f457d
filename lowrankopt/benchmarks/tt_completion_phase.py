"""Benchmark ``tt-completion-phase``: where random tensor trains become recoverable from their entries (issue 24 §2).

For each case (target kind, order d, mode size n, TT-rank r) and each level ``|Ω|/dim`` of a ladder
(``dim = FixedTTRank(shape, r).dim``, the manifold's exact dimension; ``|Ω|/(d n r²)`` is reported too), every
solver of :data:`SOLVERS` is run on ``seeds`` problems and a run counts as a *success* when the relative test error
``‖P_Γ(X − A)‖ / ‖P_Γ A‖`` of its answer is below ``1e-6`` (:data:`SUCCESS`).

Targets (float64): ``"gaussian"``, :meth:`FixedTTRank.random_point` (Gaussian cores, right-orthogonalized, unit
Frobenius norm: the family of Manopt's ``TTeMPS_randn``) scaled by ``√(Π shape)`` to a unit RMS entry; ``"uniform"``,
i.i.d. uniform ``[0, 2/r_{k−1})`` cores (the demo's and ``tt-completion``'s target: nonnegative, mean entry 1; up to a
scalar the family of TTeMPS's ``TTeMPS_rand``, i.i.d. uniform ``[0, 1]`` cores, which is the target *and* the start
of the RTTC paper's comparison script ``ex_completion_compare_als_riemann.m``; Manopt's copy of TTeMPS drew Gaussian
cores there for two days in January 2021 and went back to uniform ones on Steinlechner's word, adding
``TTeMPS_randn``).

Per seed and level: one target (the same at every level of a seed), Ω of ``|Ω| = round(level · dim)`` distinct
entries and a disjoint test set Γ of 1000 entries (fewer when the tensor has too few; :data:`TEST_SAMPLES`), drawn
together by :func:`sample_indices`; and one random start ``x0`` of the target's ranks, the same at every level of a
seed, scaled to the RMS of the observed values and shared by the solvers that take a start. The case parameter
``start`` (:data:`STARTS`) says how ``x0`` is drawn: ``"gaussian"`` (the default), a ``random_point`` — a start
with no sign bias, as teneva's ``teneva.rand`` (uniform ``[−1, 1]`` cores) draws; ``"uniform"``, the ``"uniform"``
target's family — RTTC's ``TTeMPS_rand`` start, nonnegative like that target, so that its inner product with a
nonnegative target is far from 0 (on the uniform target teneva's ALS then needed 3–12 × dim and plain CG 6–96 ×,
from a Gaussian start 8 to more than 256 ×: docs/benchmarks.md, 2026-12-04). The ``--full`` cases start the
solvers as RTTC's script does: from a draw of the target's own family. :func:`complete` ignores ``x0`` (it starts
from the best constant tensor, or from a rank-1 fit of the values: its ``growth``).

Solvers (:data:`SOLVERS`, ``name -> solver(problem) -> TensorTrain``; add entries to compare more):

- ``complete-cg`` / ``complete-tr``: :func:`complete` with ``method="cg"`` / ``"trust-region"`` and its defaults
  (mode balancing, up to 4 runs of the rank continuation — on zero-mean data random and greedy runs alternate),
  ``max_iter`` iterations at the target rank;
- ``complete-cg-1run``: ``complete(method="cg", balance=False, starts=1)``, the solver before issue 24 (one run of
  the continuation, no balancing): what the defaults gained;
- ``minimize-cg``: plain :func:`minimize` ``method="cg"`` (its defaults: the exact-Hessian step model) on
  :func:`completion_loss` from the shared random ``x0``, stopped once the relative training residual is ≤ 1e-12
  (``complete``'s default ``tol``) or after ``max_iter`` iterations;
- ``teneva-als``: teneva's TT-ALS (``teneva.als``) from the same ``x0``, at most ``als_sweeps`` sweeps, plain least
  squares per slice (``lamb=None``: its default Tikhonov term ``lamb=1e-3`` biases the fit far above 1e-6),
  ``allow_skip_cores=True`` (a slice without samples keeps its start value instead of raising); skipped with a
  message when teneva is not installed.

The ladder (:data:`LADDER`): ``|Ω|/dim`` = 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, and on to 192 and 256 for
r = 2 (:data:`LADDER_R2`: there complete-cg recovered the Gaussian target, d = 6, n = 10, on 0/3 seeds up to 128·dim).
The ``--quick`` run is a smoke run of the pipeline (Gaussian, d = 6, n = 10, r ∈ {2, 4}, 3 seeds, levels 4, 16, 64,
100 iterations, 10 ALS sweeps, a 35 s budget per case): its counts are not the transition.

Caps per run: ``max_iter`` (500 in the ``--full`` cases, 100 in ``--quick``; ALS: ``als_sweeps``, 100 / 10) and a
wall-clock cap, the runner's ``--max-time`` (``ctx.max_time``: 60 s in quick mode, 300 s in full mode). A run that stops
at a cap is a failure like any other and is counted in the ``capped`` figure (so slowness can be told from convergence
to a wrong point). Optionally ``budget`` seconds bound a whole case: once spent, the remaining cells are recorded as not
run (checked before each run, so a case overruns it by at most one run). The ``--full`` cases have a budget of one hour
each: unbounded, they were estimated (2026-12-03, 1 thread, from per-iteration costs, for the ladder up to 64) at about
1–1.5 h (d = 6, n = 10) up to about 7 h (d = 10, n = 20, r = 6; most failed runs at the 300 s cap, a teneva ALS sweep
alone ≈ 20 s at ``|Ω|/dim = 8``) per case.

Search (to keep ``--full`` affordable): success is taken to be monotone in ``|Ω|``, and each solver's transition
points are found by bisection over the ladder — the ≥ 9/10 point first (from the middle level), then the ≥ 5/10 point
below it, bracketed by the levels already decided (when no level reached 9/10, the top level is asked first: if it
fails ≥ 5/10 too, no level passes) — so a solver runs about 4–6 of the 13 levels; the others are
shown as ``—`` (not measured). At a level the seeds run in order (0, 1, …) only until the question asked there is
decided: "≥ 9 of 10 succeed" is settled by the 9th success or the 2nd failure, "≥ 5 of 10" by the 5th success or the
6th failure (a level first asked the one question runs on where the other needs more seeds), so a level where every
run fails costs 2 runs for the ≥ 9/10 search (6 for ≥ 5/10), not 10; a cell ``k/m`` reports the m seeds run. Every
solver sees the same problems at a level (the same Ω, Γ, target and start).

Reported per case and solver: the success count ``k/m`` (of the m seeds run) at each measured level with the median time
of the successful runs, and the transition points ``transition ≥9/10`` (and ``≥5/10``): the smallest ladder level whose
success rate is ≥ 0.9 (≥ 0.5), found by the bisection; None when not even the largest level qualifies. The plot: success
rate against ``|Ω|/dim`` (log axis), one line per solver (measured levels only). Deterministic given ``--seed``."""

from __future__ import annotations

import importlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..completion import complete, completion_loss, sample_indices
from ..formats.tt import TensorTrain
from ..manifolds import FixedTTRank
from ..optim import minimize
from .peers import PeerUnavailable
from .registry import Benchmark, Case
from .runner import Context

SUCCESS = 1e-6  # a run succeeds when its relative test error is below this
TEST_SAMPLES = 1000
TRAIN_TOL = 1e-12  # relative training residual at which minimize-cg stops (complete()'s default tol in float64)
# (measured 2026-12-03, gaussian target, d = 6, n = 10, 3 seeds, max_iter 1000: complete-cg recovered r = 4 on 2/3
# seeds at 32·dim and 3/3 at 48·dim, but r = 2 on 0/3 up to 128·dim and 2/3 at 256·dim: the r = 2 cases climb higher)
LADDER = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 96.0, 128.0)
LADDER_R2 = (*LADDER, 192.0, 256.0)
TARGETS = ("gaussian", "uniform")
STARTS = TARGETS  # the families x0 can be drawn from (make_target's kinds)


@dataclass
class Problem:
    """One completion problem as a solver gets it.

    Attributes:
        indices: ``(N, d)`` int64 observed positions Ω; ``values``: ``(N,)`` float64 observed entries.
        shape: the tensor's shape; ``rank``: its TT-rank (int).
        x0: the shared random start (TT-rank ``rank``, scaled to the RMS of ``values``).
        generator: a CPU generator for the solver's own randomness (seeded per seed and level).
        max_iter: iteration cap (``als_sweeps`` for ALS); ``max_time``: wall-clock cap in seconds;
            ``als_sweeps``: sweep cap of ALS solvers.
        info: the solver may record ``iterations`` (int), ``capped`` (bool: stopped by a cap) and ``message``.
    """

    indices: torch.Tensor
    values: torch.Tensor
    shape: list[int]
    rank: int
    x0: TensorTrain
    generator: torch.Generator
    max_iter: int
    max_time: float
    als_sweeps: int = 100
    info: dict = field(default_factory=dict)


def _complete(method: str, **options) -> Callable[[Problem], TensorTrain]:
    def solve(p: Problem) -> TensorTrain:
        res = complete(
            p.indices, p.values, p.shape, p.rank, method=method, generator=p.generator, max_iter=p.max_iter,
            max_time=p.max_time, **options,
        )  # fmt: skip
        p.info.update(iterations=res.nit, capped=not res.success, message=res.message)
        return res.x

    return solve


def _minimize_cg(p: Problem) -> TensorTrain:
    norm = float(torch.linalg.vector_norm(p.values))

    def converged(res) -> bool:  # complete()'s stopping rule: the relative training residual reaches TRAIN_TOL
        return math.sqrt(2 * max(res.fun, 0.0)) <= TRAIN_TOL * norm

    res = minimize(
        completion_loss(p.indices, p.values), p.x0, method="cg", max_iter=p.max_iter, max_time=p.max_time, gtol=0.0,
        callback=converged,
    )  # fmt: skip
    p.info.update(iterations=res.nit, capped=not res.success, message=res.message)
    return res.x


def _teneva_als(p: Problem) -> TensorTrain:
    try:
        teneva = importlib.import_module("teneva")
    except ImportError as exc:
        raise PeerUnavailable("teneva is not installed (pip install teneva)") from exc
    t0 = time.perf_counter()
    state = {"over": False}

    def out_of_time(Y, info, opts) -> bool:
        state["over"] = time.perf_counter() - t0 > p.max_time
        return state["over"]

    info: dict = {}
    cores = teneva.als(
        p.indices.cpu().numpy(), p.values.cpu().numpy(), [c.cpu().numpy() for c in p.x0.cores], nswp=p.als_sweeps,
        info=info, lamb=None, allow_skip_cores=True, cb=out_of_time,
    )  # fmt: skip
    # stopped by the sweep cap or the time cap (teneva's own stop on e: the cores stopped changing)
    p.info.update(iterations=info.get("nswp"), capped=info.get("stop") in ("nswp", "cb"), message=str(info.get("stop")))
    return TensorTrain([torch.from_numpy(c).to(p.values) for c in cores])


#: The compared solvers, ``name -> solver(problem) -> TensorTrain`` (a solver may raise ``PeerUnavailable``: its row
#: is then skipped with the message). Add entries to compare other solvers or options on the same problems.
SOLVERS: dict[str, Callable[[Problem], TensorTrain]] = {
    "complete-cg": _complete("cg"),
    "complete-tr": _complete("trust-region"),
    # complete() before issue 24: no mode balancing, one run of the continuation
    "complete-cg-1run": _complete("cg", balance=False, starts=1),
    "minimize-cg": _minimize_cg,
    "teneva-als": _teneva_als,
}


def make_target(kind: str, shape: list[int], r: int, g: torch.Generator) -> TensorTrain:
    """The target of ``kind`` (``"gaussian"``: unit RMS entry; ``"uniform"``: mean entry 1), float64, TT-rank r."""
    if kind == "gaussian":
        x = FixedTTRank(shape, r).random_point(generator=g, dtype=torch.float64)  # unit Frobenius norm
        return x * math.sqrt(math.prod(shape))
    if kind == "uniform":  # as lowrankopt.demo's target: i.i.d. uniform [0, 2/r_{k-1}) cores
        ranks = [1] + [r] * (len(shape) - 1) + [1]
        return TensorTrain(
            [torch.rand(ranks[k], n, ranks[k + 1], dtype=torch.float64, generator=g) * (2 / ranks[k])
             for k, n in enumerate(shape)]
        )  # fmt: skip
    raise ValueError(f"target must be one of {TARGETS}, got {kind!r}")


def _relative_test_error(x: TensorTrain, tidx: torch.Tensor, tvals: torch.Tensor) -> float:
    err = float(torch.linalg.vector_norm(x.gather(tidx) - tvals) / torch.linalg.vector_norm(tvals))
    return err if math.isfinite(err) else math.inf


def _seed_data(
    kind: str, shape: list[int], r: int, ctx: Context, s: int, start: str = "gaussian"
) -> tuple[TensorTrain, TensorTrain]:
    """The target and the random start of seed ``s`` (the same at every level), the start of unit norm."""
    g = ctx.generator(s)
    target = make_target(kind, shape, r, g)
    if start == "gaussian":  # (drawn from g after the target: the starts measured before ``start`` existed)
        x0 = FixedTTRank(shape, r).random_point(generator=g, dtype=torch.float64)
    else:
        x0 = make_target(start, shape, r, g)
        x0 = x0 * (1.0 / float(x0.norm()))
    return target, x0


def _problem(target, x0_unit, shape, r, level_index: int, N: int, s: int, ctx: Context, caps: dict):
    """Ω, Γ (disjoint) and the scaled start of seed ``s`` at ladder level ``level_index``."""
    g = ctx.generator(1_000_003 * (level_index + 1) + s)  # independent of the other levels and seeds
    T = min(TEST_SAMPLES, math.prod(shape) - N)
    both = sample_indices(shape, N + T, generator=g)
    idx, tidx = both[:N], both[N:]
    vals, tvals = target.gather(idx), target.gather(tidx)
    rms = float(torch.linalg.vector_norm(vals)) / math.sqrt(N)
    x0 = x0_unit * (rms * math.sqrt(math.prod(shape)))  # x0_unit has unit norm: its RMS entry becomes rms
    dev = ctx.device
    p = Problem(idx.to(dev), vals.to(dev), list(shape), r, x0.to(dev), g, **caps)
    return p, (tidx.to(dev), tvals.to(dev))


def run(case: Case, ctx: Context) -> dict:
    p = case.params
    kind, d, n, r, seeds = p["target"], p["d"], p["n"], p["r"], p["seeds"]
    start = p.get("start", "gaussian")
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    levels = [float(x) for x in p.get("levels", LADDER)]
    solvers = {name: SOLVERS[name] for name in p.get("solvers", SOLVERS)}
    caps = dict(max_iter=p.get("max_iter", 500), max_time=ctx.max_time, als_sweeps=p.get("als_sweeps", 100))
    budget = p.get("budget")
    shape = [n] * d
    dim = FixedTTRank(shape, r).dim
    counts = [round(level * dim) for level in levels]
    if counts[-1] + 1 > math.prod(shape):
        raise ValueError(f"level {levels[-1]} asks for {counts[-1]} of the {math.prod(shape)} entries (and a test set)")
    ctx.status("generating data")
    per_seed = [_seed_data(kind, shape, r, ctx, s, start) for s in range(seeds)]
    t_case = time.perf_counter()

    cache: dict[int, list] = {}  # the problems of a level: the same samples and starts for every solver

    def problems_at(li: int) -> list:
        if li not in cache:
            cache[li] = [_problem(*per_seed[s], shape, r, li, counts[li], s, ctx, caps) for s in range(seeds)]
        return cache[li]

    cells: dict[str, dict[int, dict]] = {name: {} for name in solvers}
    transitions: dict[str, dict[float, float | None]] = {}
    skipped: dict[str, str] = {}
    need = {0.9: math.ceil(0.9 * seeds - 1e-9), 0.5: math.ceil(0.5 * seeds - 1e-9)}  # successes for each rate
    for name, solve in solvers.items():
        measured = cells[name]

        def passes(li: int, rate: float, name=name, solve=solve, measured=measured) -> bool:
            """Whether level ``li`` has ≥ ``rate`` successes: seeds run in order until the answer is decided."""
            cell = measured.setdefault(li, {"level": levels[li], "samples": counts[li], "runs": []})
            runs = cell["runs"]
            try:
                while _decision(runs, need[rate], seeds) is None:  # seeds 0, 1, ... in order
                    s = len(runs)
                    if budget is not None and time.perf_counter() - t_case > budget:
                        raise _OutOfBudget
                    prob, (tidx, tvals) = problems_at(li)[s]
                    ctx.status(f"{name}: |Ω|/dim = {levels[li]:g}, seed {s + 1}/{seeds}")
                    prob.info = {}
                    prob.generator = ctx.generator(1_000_003 * (li + 1) + s + 7 * seeds)  # the same for every solver
                    t0 = time.perf_counter()
                    x = solve(prob)  # (PeerUnavailable: the row is skipped)
                    elapsed = time.perf_counter() - t0
                    err = _relative_test_error(x, tidx, tvals)
                    capped = bool(prob.info.get("capped")) or elapsed > caps["max_time"]
                    runs.append({"seed": s, "test_error": err, "time": elapsed, "success": err < SUCCESS,
                                 "capped": capped, "iterations": prob.info.get("iterations"),
                                 "message": prob.info.get("message")})  # fmt: skip
            finally:  # (also when the budget runs out mid-level: the runs done are reported)
                _summarize(cell)
            return bool(_decision(runs, need[rate], seeds))

        def decided(li: int, rate: float, measured=measured) -> bool | None:
            return _decision(measured[li]["runs"], need[rate], seeds)

        found: dict[float, float | None] = {0.9: None, 0.5: None}
        try:
            hi = _bisect(lambda li: passes(li, 0.9), -1, len(levels))
            found[0.9] = levels[hi] if hi < len(levels) else None
            # the ≥ 5/10 point lies at or below it: bracket it with what is decided already, then bisect; when no
            # level reached 9/10, the top level first (no level at all may pass: then it settles the search)
            if hi < len(levels) or passes(hi - 1, 0.5):
                lo = max((li for li in measured if li < hi and decided(li, 0.5) is False), default=-1)
                top = min((li for li in measured if lo < li < hi and decided(li, 0.5)), default=hi)
                hi5 = _bisect(lambda li: passes(li, 0.5), lo, top)
                found[0.5] = levels[hi5] if hi5 < len(levels) else None
        except PeerUnavailable as exc:
            skipped[name] = f"skipped: {exc}"
        except _OutOfBudget:
            found["budget"] = True  # type: ignore[index]
        transitions[name] = found
    ordered = {
        name: [by_level[li] for li in sorted(by_level) if by_level[li]["runs"]] for name, by_level in cells.items()
    }
    return _result(levels, counts, ordered, transitions, skipped, seeds, d, n, r, dim, case, caps, budget)


def _decision(runs: list[dict], need: int, seeds: int) -> bool | None:
    """Whether ``need`` of ``seeds`` runs succeed, from the ``runs`` done so far; None while undecided."""
    wins = sum(run_["success"] for run_ in runs)
    return True if wins >= need else False if len(runs) - wins > seeds - need else None


def _summarize(cell: dict) -> None:
    wins = [run_ for run_ in cell["runs"] if run_["success"]]
    cell.update(
        successes=len(wins), capped=sum(run_["capped"] for run_ in cell["runs"]),
        median_success_time=statistics.median(run_["time"] for run_ in wins) if wins else None,
    )  # fmt: skip


class _OutOfBudget(Exception):
    """The case's time budget is spent: the search stops where it is."""


def _bisect(passes: Callable[[int], bool], lo: int, hi: int) -> int:
    """The smallest ladder index in ``(lo, hi]`` that ``passes``, by bisection: success is taken to be monotone in
    ``|Ω|``, index ``lo`` failing and ``hi`` passing (``hi`` may be one past the ladder: no level passes). Measures
    about ``log2(hi − lo)`` levels."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _cell_text(cell: dict) -> str:
    t = cell["median_success_time"]
    return f"{cell['successes']}/{len(cell['runs'])}" + ("" if t is None else f" · {t:.2g} s")


def _key(level: float) -> str:
    # the report sorts figure names as strings: pad the level so that " 8" sorts before "12"; no "|" (a table cell)
    return f"#Ω/dim={level:>3g}"


def _result(levels, counts, cells, transitions, skipped, seeds, d, n, r, dim, case, caps, budget) -> dict:
    rows = [{
        "variant": "#Ω (#Ω/(d·n·r²))",
        "figures": {_key(lv): f"{N} ({N / (d * n * r * r):.2g})" for lv, N in zip(levels, counts, strict=True)},
        "status": f"manifold dimension {dim}; d·n·r² = {d * n * r * r}; {seeds} seeds per cell",
    }]  # fmt: skip
    series = []
    for name, row_cells in cells.items():
        if name in skipped:
            rows.append({"variant": name, "skipped": skipped[name]})
            continue
        wins = [run_["time"] for c in row_cells for run_ in c.get("runs", []) if run_["success"]]
        t9, t5 = transitions[name][0.9], transitions[name][0.5]
        capped = sum(c.get("capped", 0) for c in row_cells)
        notes = [f"{capped} run(s) stopped at a cap", "levels not measured: —"]
        if transitions[name].get("budget"):
            notes.append("search stopped: case time budget spent")
        figures = {_key(lv): "—" for lv in levels}
        figures.update({_key(c["level"]): _cell_text(c) for c in row_cells})
        figures["transition ≥5/10 (#Ω/dim)"] = t5
        figures["transition ≥9/10 (#Ω/dim)"] = t9
        rows.append({
            "variant": name, "time": statistics.median(wins) if wins else None,
            "time_min": min(wins) if wins else None, "time_max": max(wins) if wins else None, "repeats": seeds,
            "figures": figures, "status": "; ".join(notes), "cells": row_cells,
        })  # fmt: skip
        if row_cells:  # (every cell has a run: run() drops the levels the budget stopped before their first)
            series.append({"label": name, "x": [c["level"] for c in row_cells],
                           "y": [c["successes"] / len(c["runs"]) for c in row_cells]})  # fmt: skip
    p = case.params
    start = p.get("start", "gaussian")
    title = f"tt-completion-phase: {p['target']} target, {start} start, d={d}, n={n}, r={r} ({seeds} seeds)"
    return {
        "rows": rows,
        "xy": [
            {
                "title": title,
                "xlabel": "|Ω| / dim",
                "ylabel": f"success rate (test error < {SUCCESS:g})",
                "xlog": True,
                "series": series,
            }
        ]
        if series
        else [],  # fmt: skip
        "levels": levels,
        "samples": counts,
        "dimension": dim,
        "caps": {**caps, "budget": budget, "success": SUCCESS, "test_samples": TEST_SAMPLES},
    }


def _case(target: str, d: int, n: int, r: int, **extra) -> Case:
    """The case ``<target>-d<d>-n<n>-r<r>``, with ``-<start>-start`` appended when ``start`` is not Gaussian."""
    start = extra.get("start", "gaussian")
    suffix = "" if start == "gaussian" else f"-{start}-start"
    return Case(f"{target}-d{d}-n{n}-r{r}{suffix}", dict(target=target, d=d, n=n, r=r, **extra))


BENCHMARK = Benchmark(
    name="tt-completion-phase",
    summary="Phase transition of TT completion: success rate (test error < 1e-6) vs |Ω|/dim, "
    "complete() CG / trust-region, minimize from a random start, teneva ALS",
    baseline="no ratios; time column: median time of the successful runs (all levels); cells: successes/seeds run · "
    "median time of the successful runs at that level",
    figures=("successes per #Ω/dim level", "transition ≥9/10 (#Ω/dim)", "transition ≥5/10 (#Ω/dim)"),
    # quick: a smoke run of the pipeline with small caps (a failed run at 1000 iterations costs 10-60 s here)
    quick=tuple(
        _case("gaussian", 6, 10, r, seeds=3, levels=(4.0, 16.0, 64.0), max_iter=100, als_sweeps=10, budget=35.0)
        for r in (2, 4)
    ),
    full=tuple(
        _case(target, d, n, r, seeds=10, budget=3600.0, levels=LADDER_R2 if r == 2 else LADDER, start=target)
        for target in TARGETS
        for d in (6, 10)
        for n in (10, 20)
        for r in (2, 4, 6)
    ),
    run=run,
    peers=("teneva",),
)
