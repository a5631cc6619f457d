"""Built-in demo problems for ``lowrankopt demo``: synthetic completion solved by :func:`lowrankopt.complete`.

- ``tt-completion``: the ground truth is a random nonnegative tensor of TT-rank r and shape ``n^d`` (i.i.d.
  uniform cores), observed on a random set Ω of entries; Riemannian CG (RTTC) with rank continuation from
  the best constant tensor on the balanced problem (``complete``'s ``balance``), restarted (up to 4 runs) when a run
  stalls at the target rank; the best run's point is mapped back and finished by one more stage at the target rank on
  the plain problem (no iteration where the balanced run already fitted the data to ``tol``).
- ``matrix-completion``: an m × n matrix ``L Rᵀ`` of rank r with Gaussian factors observed on
  ``oversampling · r (m + n − r)`` entries (LRGeomCG's setup); Riemannian CG (LRGeomCG) from the rank-r
  truncated SVD of the zero-filled observations.

Both report the relative error on held-out entries. Progress goes to ``log`` every ``print_every``
iterations (and when a new run of the rank continuation or the plain stage starts), or to a tqdm progress bar with
``progress=True`` (which shows the run from the second on). The training errors of the balanced stages are the
balanced problem's (see :func:`lowrankopt.complete`); the final one is the plain residual.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from ._checks import as_int, as_tolerance
from .completion import complete, sample_indices
from .formats.tt import TensorTrain
from .manifolds.fixed_rank import FixedRankMatrices
from .manifolds.tt import FixedTTRank

__all__ = ["PROBLEMS", "run_matrix_completion", "run_tt_completion"]

_DEFAULT_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def _random_truth(shape: list[int], rank: int, dtype: torch.dtype, generator: torch.Generator) -> TensorTrain:
    """A TT with i.i.d. uniform [0, 2/r_{k-1}) core entries: nonnegative, mean entry 1, TT-ranks ``rank``."""
    d = len(shape)
    ranks = [1] + [rank] * (d - 1) + [1]
    cores = [
        torch.rand(ranks[k], n, ranks[k + 1], dtype=torch.float64, generator=generator) * (2 / ranks[k])
        for k, n in enumerate(shape)
    ]
    return TensorTrain([c.to(dtype) for c in cores])


def _check_common(dtype, test_samples, print_every, iters) -> None:
    if dtype not in _DEFAULT_TOL:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    as_int("test_samples", test_samples)
    as_int("print_every", print_every)
    as_int("iters", iters, 0)


def _prepare(dim, total, *, samples, oversampling, test_samples, tol, dtype, seed, log):
    """Sample counts (capped at the ``total`` number of entries), tolerance, log function and generator."""
    if samples is None:
        if not as_tolerance("oversampling", oversampling) > 0:
            raise ValueError(f"oversampling must be a positive finite number, got {oversampling!r}")
        samples = math.ceil(oversampling * dim)
    samples = as_int("samples", samples)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    tol = _DEFAULT_TOL[dtype] if tol is None else tol
    emit = log if log is not None else (lambda _msg: None)
    return min(samples, total), min(test_samples, total), tol, emit, torch.Generator().manual_seed(seed)


class Stage(NamedTuple):
    """Consecutive iterations of one run at one rank, on the balanced problem or on the caller's plain one."""

    rank: int
    iterations: int
    balanced: bool


def _runs(history: list[dict]) -> list[tuple[int, list[Stage]]]:
    """``(attempt, stages)`` per run of the rank continuation (``complete``'s ``starts``), in the order they started;
    ``stages`` holds a :class:`Stage` per group of consecutive records of the run with one ``(rank, balanced)``.
    Record 0 is the start point; record k ≥ 1 is iteration k, made at ``record["rank"]`` in run
    ``record["attempt"]`` (a later run's start point has no record: its first record is its first iteration). With
    ``complete``'s ``balance`` the runs solve the balanced problem and the last records (if any) are the final stage
    on the plain problem (``balanced`` False): they carry the returned run's attempt, which may be an earlier run's,
    and join that run as its last stage. Without iterations: one run without stages."""
    runs: dict[int, list[Stage]] = {history[0].get("attempt", 0): []}
    for rec in history[1:]:
        stages = runs.setdefault(rec.get("attempt", 0), [])
        balanced = bool(rec.get("balanced", False))
        if stages and (stages[-1].rank, stages[-1].balanced) == (rec["rank"], balanced):
            stages[-1] = stages[-1]._replace(iterations=stages[-1].iterations + 1)
        else:
            stages.append(Stage(rec["rank"], 1, balanced))
    return list(runs.items())


def _numbers_text(word: str, numbers: list[int]) -> str:
    """``("rank", [1, 2, 3])`` → ``"ranks 1-3"``, ``[2]`` → ``"rank 2"``, ``[1, 3]`` → ``"ranks 1, 3"``."""
    if len(numbers) == 1:
        return f"{word} {numbers[0]}"
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{word}s {numbers[0]}-{numbers[-1]}"
    return f"{word}s " + ", ".join(map(str, numbers))


def _ranks_text(ranks: list[int]) -> str:
    """``[1, 2, 3]`` → ``"ranks 1-3"``, ``[2]`` → ``"rank 2"``, ``[1, 3]`` → ``"ranks 1, 3"``."""
    return _numbers_text("rank", ranks)


def _split(stages: list[Stage]) -> tuple[list[Stage], Stage | None, Stage | None]:
    """A run's stages as ``(lower, final, plain)``: the rank-continuation stages, the last stage of the rank
    continuation (at the target rank unless a lower rank already reached ``tol``; None without iterations) and the
    final stage on the plain problem after balanced ones (None if it made no iteration, or without balancing)."""
    plain = None
    if len(stages) > 1 and not stages[-1].balanced and stages[-2].balanced:
        stages, plain = stages[:-1], stages[-1]
    return stages[:-1], (stages[-1] if stages else None), plain


def _final_rank(stages: list[Stage], history: list[dict]) -> int:
    """The rank at which a run's rank continuation ended: its last stage's but for a final stage on the plain problem
    (the start's rank if it made no iteration)."""
    final = _split(stages)[1]
    return final.rank if final is not None else history[0]["rank"]


def _returned(res, runs: list[tuple[int, list[Stage]]]) -> tuple[int, list[Stage]]:
    """The returned run's ``(attempt, stages)``: ``res.attempt`` (set by ``complete`` for TT rank continuation), else
    the only run."""
    attempt = getattr(res, "attempt", None)
    return next(run for run in runs if run[0] == attempt) if attempt is not None else runs[-1]


def _summary(res, runs: list[tuple[int, list[Stage]]], *, iters: int, converged: bool) -> str:
    """The final line: iterations in all (every run: ``len(res.history) − 1``), the returned run's split into the
    rank-continuation stages, the final rank and (with ``complete``'s ``balance``, if it made any iteration) the final
    stage on the plain problem, and why it stopped (``iters`` is the limit of each stage at the final rank, as
    ``complete``'s ``max_iter``: "reached iters" names the stage that hit it). With several runs it also says which
    stalled and were restarted, how the last ended if it is not the returned one, and which is returned (runs
    numbered from 1: run k is ``attempt`` k − 1)."""
    returned, stages = _returned(res, runs)
    lower, final, plain = _split(stages)
    final_rank = _final_rank(stages, res.history)
    split = f"{final.iterations if final is not None else 0} at rank {final_rank}"
    if plain is not None:
        split += f" (balanced), {plain.iterations} at rank {plain.rank} on the plain problem"
    if lower:
        ranks = _ranks_text([s.rank for s in lower])
        split = f"{sum(s.iterations for s in lower)} in rank-continuation stages at {ranks}, {split}"
    reason = res.message
    # res is the last stage's result: the plain one if it made iterations, else the rank continuation's last
    last = plain if plain is not None else final
    if not converged and last is not None and last.iterations == iters and res.message.startswith("reached max_iter"):
        where = " on the plain problem" if last is plain else ""
        reason = f"reached iters = {iters} at rank {last.rank}{where}"
    if len(runs) > 1:
        # complete() follows a run by another only when it stalled at the target rank
        stalled = _numbers_text("run", [a + 1 for a, _ in runs[:-1]])
        at = _ranks_text(sorted({_final_rank(st, res.history) for _, st in runs[:-1]}))
        were = "were" if len(runs) > 2 else "was"
        parts = [f"{len(runs)} runs of the rank continuation: {stalled} stalled at {at} and {were} restarted"]
        ending, last_stages = runs[-1]
        if ending != returned:
            parts.append(
                f"run {ending + 1} ended at rank {_final_rank(last_stages, res.history)} "
                "with a higher training residual"
            )
        split = "; ".join(parts) + f"; run {returned + 1} returned: {split}"
    outcome = "converged" if converged else "stopped"
    return f"{outcome} after {len(res.history) - 1} iterations in {res.time:.2f}s ({split}; {reason})"


def _solve(idx, vals, test, shape, rank, *, method, tol, iters, warmup_iters, generator, print_every, emit, progress):
    """``complete`` with progress lines (or a tqdm bar) and the final summary; returns the result dict."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"{method}, rank ≤ {rank}", unit="it", dynamic_ncols=True, mininterval=0.2)
    last, seen = [0], {"attempt": None, "rank": None, "balanced": False, "runs": 0}  # the last record seen: its run
    # and rank, whether it was balanced, and how many runs started

    def monitor(res):
        rec = res.history[-1]
        attempt, balanced = rec.get("attempt", 0), bool(rec.get("balanced", False))
        # complete(balance): after the balanced runs, one stage on the plain problem (records of the returned run)
        plain = seen["balanced"] and not balanced
        restart = not plain and seen["attempt"] is not None and attempt != seen["attempt"]
        if restart and bar is None:  # a run stalled at the target rank; complete() starts the next from TT-rank 1
            emit(
                f"run {attempt + 1}: restarting the rank continuation from rank {res.history[0]['rank']} "
                f"(run {seen['attempt'] + 1} stalled at rank {seen['rank']})"
            )
        if plain and bar is None:
            point = f"run {attempt + 1}'s point" if seen["runs"] > 1 else "the balanced run's point"
            # (the monitor sees the plain stage's start point, which repeats the last iteration's number)
            emit(
                f"finishing on the plain problem at rank {rec['rank']} from {point}, mapped back (next line: its start)"
            )
        if bar is not None:
            # the start's rank is known now: say whether rank continuation climbs (again, in a new run)
            run = f"run {attempt + 1}: " if seen["runs"] > 1 or attempt else ""
            if seen["attempt"] is None or restart:
                start = res.history[0]["rank"]
                grows = f"rank {start}→{rank}, growing" if start < rank else f"rank {rank}"
                bar.set_description(f"{method} ({run}{grows})", refresh=False)
            elif plain:
                bar.set_description(f"{method} ({run}plain problem, rank {rec['rank']})", refresh=False)
            postfix = {"run": attempt + 1} if attempt else {}
            bar.set_postfix(
                **postfix, rank=rec["rank"], train=f"{rec['train_error']:.2e}", test=f"{rec['test_error']:.2e}",
                refresh=False,
            )  # fmt: skip
            bar.update(rec["iter"] - bar.n)  # redraws at most every mininterval
        elif rec["iter"] - last[0] >= print_every or rec["iter"] == 0 or restart or plain:
            last[0] = rec["iter"]
            emit(
                f"iter {rec['iter']:4d}  rank {rec['rank']}  train {rec['train_error']:.3e}  "
                f"test {rec['test_error']:.3e}  |grad| {rec['grad_norm']:.3e}  {rec['solve_time']:6.2f}s"
            )
        seen.update(attempt=attempt, rank=rec["rank"], balanced=balanced, runs=max(seen["runs"], attempt + 1))

    try:
        res = complete(
            idx, vals, shape, rank, method=method, test=test, tol=tol, max_iter=iters, warmup_iters=warmup_iters,
            generator=generator, monitor=monitor,
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    converged = res.train_error <= tol
    runs = _runs(res.history)
    returned, stages = _returned(res, runs)
    emit(_summary(res, runs, iters=iters, converged=converged))
    emit(f"final test relative error: {res.test_error:.1e}")
    return {
        "train_error": res.train_error,
        "test_error": res.test_error,
        # every run's iterations and the plain stage's
        "iterations": len(res.history) - 1,
        "stages": [stage._asdict() for stage in stages],
        "attempt": returned,
        "runs": [
            {
                "attempt": a,
                "stages": [stage._asdict() for stage in st],
                "iterations": sum(stage.iterations for stage in st),
                "stalled": i < len(runs) - 1,
            }
            for i, (a, st) in enumerate(runs)
        ],
        "converged": converged,
        "time": res.time,
        "history": [
            {
                k: rec.get(k)
                for k in ("iter", "attempt", "rank", "balanced", "train_error", "test_error", "grad_norm", "solve_time")
            }
            for rec in res.history
        ],
    }


def run_tt_completion(
    *,
    d: int = 10,
    n: int = 20,
    rank: int = 4,
    samples: int | None = None,
    oversampling: float = 20.0,
    test_samples: int = 10_000,
    iters: int = 300,
    warmup_iters: int = 8,
    method: str = "cg",
    tol: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    print_every: int = 10,
    progress: bool = False,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Complete a random TT-rank-``rank`` tensor of shape ``(n,) * d`` from ``samples`` random entries.

    Args:
        d, n, rank: order, mode size and (uniform) TT-rank of the ground truth and of the final iterate.
        samples: number of observed (training) entries; ``None`` means ``oversampling × dim`` where
            ``dim`` is the dimension of the TT-rank-``rank`` manifold.
        oversampling: used when ``samples`` is ``None``.
        test_samples: number of held-out entries on which the test error is measured.
        iters: the iteration limit of each stage at the target rank (``complete``'s ``max_iter``): the balanced
            one of each run and the final one on the plain problem; the rank-continuation stages below it run
            ``warmup_iters`` each on top, so one run of the rank continuation makes at most
            ``iters + warmup_iters · (rank − 1)`` iterations. ``complete`` makes up to ``starts`` = 4 runs (a run
            that stalls at the target rank is stopped and followed by a fresh one from TT-rank 1; the one with the
            lowest training residual is returned) and then the plain stage, so the demo makes at most
            ``4 · (iters + warmup_iters · (rank − 1)) + iters`` iterations.
        warmup_iters: iterations of each rank-continuation stage (TT-ranks 1, …, ``rank`` − 1).
        method: ``"cg"`` or ``"trust-region"`` (see :func:`lowrankopt.complete`).
        tol: stop once the relative training residual ``‖P_Ω(X − A)‖ / ‖P_Ω A‖`` is below ``tol``
            (default ``1e-12`` for float64, ``1e-5`` for float32).
        seed: seed of the ``torch.Generator`` that draws the ground truth, the sample sets and the
            rank-growth terms; the run is deterministic given the seed.
        dtype: ``torch.float64`` or ``torch.float32``.
        print_every: print a progress line every this many iterations (without ``progress``).
        progress: show a tqdm progress bar instead of progress lines.
        log: where the header, progress lines and summary go (``None``: silent).

    Returns:
        A dict with ``train_error`` and ``test_error`` (final relative errors, of the returned run),
        ``iterations`` (all stages of all runs: ``len(history) − 1``), ``attempt`` (the returned run, from 0),
        ``stages`` (the returned run's ``{"rank", "iterations", "balanced"}`` per stage, in order: the
        rank-continuation stages, the final rank, then the stage on the plain problem, ``balanced`` false, if it made
        any iteration), ``runs`` (every run of the rank continuation, in the order they started: ``{"attempt",
        "stages", "iterations", "stalled"}``, the plain stage in the returned run's; ``stalled`` true for each run
        that stalled at the target rank and was followed by another; the runs' iterations add up to ``iterations``; a
        single run when the first does not stall),
        ``converged`` (tolerance reached), ``time`` (solver seconds over all runs, excluding data generation),
        ``samples``, ``dim``, ``history`` (every run's records; record 0 the start point, record k ≥ 1 iteration k:
        ``iter, attempt, rank, balanced, train_error, test_error, grad_norm, solve_time``, the ``train_error`` of a
        balanced record the balanced problem's; a later run's start point and the plain stage's have no record)
        and ``settings`` (the arguments as used: ``problem``, sizes, ``rank``, ``samples`` and ``test_samples``
        after the defaults and the cap at the number of entries, ``oversampling`` (None when ``samples`` was
        given), ``iters``, ``warmup_iters``, ``method``, ``tol``, ``seed``, ``dtype``).
    """
    _check_common(dtype, test_samples, print_every, iters)
    d, n, rank = as_int("d", d, 2), as_int("n", n), as_int("rank", rank)
    as_int("warmup_iters", warmup_iters, 0)
    shape = [n] * d
    dim = FixedTTRank(shape, rank).dim
    from_oversampling = samples is None
    samples, test_samples, tol, emit, g = _prepare(
        dim, n**d, samples=samples, oversampling=oversampling, test_samples=test_samples, tol=tol, dtype=dtype,
        seed=seed, log=log,
    )  # fmt: skip
    truth = _random_truth(shape, rank, dtype, g)
    idx, test_idx = sample_indices(shape, samples, generator=g), sample_indices(shape, test_samples, generator=g)
    emit(
        f"TT completion: shape {n}^{d}, TT-rank {rank}, manifold dim {dim}, {samples} training / "
        f"{test_samples} test entries, {str(dtype).removeprefix('torch.')}, seed {seed}"
    )
    result = _solve(
        idx, truth.gather(idx), (test_idx, truth.gather(test_idx)), shape, rank, method=method, tol=tol,
        iters=iters, warmup_iters=warmup_iters, generator=g, print_every=print_every, emit=emit, progress=progress,
    )  # fmt: skip
    settings = {
        "problem": "tt-completion", "d": d, "n": n, "rank": rank, "samples": samples, "test_samples": test_samples,
        "oversampling": oversampling if from_oversampling else None, "iters": iters, "warmup_iters": warmup_iters,
        "method": method, "tol": tol, "seed": seed, "dtype": str(dtype).removeprefix("torch."),
    }  # fmt: skip
    return {**result, "samples": samples, "dim": dim, "settings": settings}


def run_matrix_completion(
    *,
    m: int = 2000,
    n: int = 2000,
    rank: int = 10,
    samples: int | None = None,
    oversampling: float = 5.0,
    test_samples: int = 10_000,
    iters: int = 500,
    warmup_iters: int | None = None,
    method: str = "cg",
    tol: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    print_every: int = 10,
    progress: bool = False,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Complete a random rank-``rank`` matrix ``L Rᵀ`` (``L: (m, r)``, ``R: (n, r)`` standard Gaussian)
    from ``samples`` distinct random entries (default ``oversampling · r (m + n − r)``).

    Arguments as :func:`run_tt_completion`; returns the same dict. The start is at the rank the spectral start
    resolves (the full rank for this well-conditioned target), so there is usually no rank continuation;
    ``warmup_iters`` (default ``complete``'s: 4 with CG, 2 with trust-region) is for the stages below ``rank``
    when there is.
    """
    _check_common(dtype, test_samples, print_every, iters)
    if warmup_iters is None:  # complete()'s default for matrices, resolved here so that settings records it
        warmup_iters = 2 if method == "trust-region" else 4
    as_int("warmup_iters", warmup_iters, 0)
    dim = FixedRankMatrices(m, n, rank).dim  # validates m, n, rank
    from_oversampling = samples is None
    samples, test_samples, tol, emit, g = _prepare(
        dim, m * n, samples=samples, oversampling=oversampling, test_samples=test_samples, tol=tol, dtype=dtype,
        seed=seed, log=log,
    )  # fmt: skip
    L = torch.randn(m, rank, dtype=torch.float64, generator=g).to(dtype)
    R = torch.randn(n, rank, dtype=torch.float64, generator=g).to(dtype)
    idx, test_idx = sample_indices((m, n), samples, generator=g), sample_indices((m, n), test_samples, generator=g)

    def entries(i):
        return (L[i[:, 0]] * R[i[:, 1]]).sum(1)

    emit(
        f"matrix completion: {m} x {n}, rank {rank}, manifold dim {dim}, {samples} training / {test_samples} "
        f"test entries, {str(dtype).removeprefix('torch.')}, seed {seed}"
    )
    result = _solve(
        idx, entries(idx), (test_idx, entries(test_idx)), (m, n), rank, method=method, tol=tol, iters=iters,
        warmup_iters=warmup_iters, generator=g, print_every=print_every, emit=emit, progress=progress,
    )  # fmt: skip
    settings = {
        "problem": "matrix-completion", "m": m, "n": n, "rank": rank, "samples": samples,
        "test_samples": test_samples, "oversampling": oversampling if from_oversampling else None, "iters": iters,
        "warmup_iters": warmup_iters, "method": method, "tol": tol, "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
    }  # fmt: skip
    return {**result, "samples": samples, "dim": dim, "settings": settings}


PROBLEMS = {"tt-completion": run_tt_completion, "matrix-completion": run_matrix_completion}
