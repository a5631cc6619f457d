"""Stages of :func:`~lowrankopt.complete`: :class:`Stages` runs :func:`~lowrankopt.minimize` on the problem at one
rank, and the rank continuations: tensor trains climb TT-rank 1, 2, …, each stage grown from the last by a tiny random
rank-1 term (:func:`grow_rank`) or by the greedy rank-one step (:func:`grow_rank_greedy`: the rank-1 fit of the
residual, at the exact line-search step); matrices climb from the rank their spectral start resolves, each stage grown
by the greedy rank-one step (Uschmajew–Vandereycken): the leading singular pair of the gradient's normal part, at the
exact line-search step."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..formats.lowrank import LowRankMatrix
from ..formats.tt import TensorTrain
from ..manifolds import manifold_of
from ..optim import OptimizeResult, minimize
from ..optim.result import MAX_ITER, MAX_TIME
from .history import History
from .problem import CompletionProblem, Point, entries
from .start import constant_start, randomized_svd

__all__ = [
    "Stages",
    "continuation_ranks",
    "default_growth",
    "grow_matrix_rank",
    "grow_rank",
    "grow_rank_greedy",
    "rank_one_fit",
]

#: complete(growth=...): how each run of the TT rank continuation starts and grows
GROWTH = ("alternate", "random", "greedy")


def default_growth(problem: CompletionProblem) -> str:
    """complete()'s ``growth=None``: ``"alternate"`` where the best constant tensor explains less than half of the
    energy of the problem's values (``(Σ v)² < ½ N Σ v²``: zero-mean data, such as tensors with Gaussian cores, where
    the constant start holds almost nothing of the target), ``"random"`` otherwise (data of one sign, where it holds
    most of it). On ``tt-completion-phase``'s data the constant explained 78–99 % of the balanced values of the
    uniform-core targets and at most 1.1 % of the Gaussian-core ones, so the half is far from both. One collective,
    cost O(N)."""
    v = problem.values.to(torch.float64)
    count = torch.tensor(float(len(v)), dtype=torch.float64, device=v.device)
    total, squares, count = problem.run.reduce(torch.stack([v.sum(), v @ v, count])).tolist()
    return "alternate" if total**2 < 0.5 * count * squares else "random"


def continuation_ranks(ranks: list[int]) -> list[list[int]]:
    """The TT-ranks of the stages of the continuation to ``ranks``: ``[min(r, r_k) for r_k in ranks]`` for
    ``r = 1, …, max(ranks)`` (the last is ``ranks``)."""
    return [[min(r, rk) for rk in ranks] for r in range(1, max(ranks) + 1)]


def grow_rank(
    x: TensorTrain, ranks: Sequence[int], generator: torch.Generator | None, eps: float = 1e-4
) -> TensorTrain:
    """``x`` plus a random rank-1 TT of relative norm ``eps``, rounded to TT-ranks ``ranks`` (each one
    more than x's or equal): nearly the same tensor at the next stage's ranks. Cost ``O(d n r³)``."""
    z = TensorTrain.random(x.shape, 1, dtype=torch.float64, device=x.device, generator=generator).to(x.dtype)
    y = x + z * (eps * x.norm() / z.norm())
    return y if list(y.ranks) == list(ranks) else y.round(max_rank=list(ranks))


def rank_one_fit(
    problem: CompletionProblem, w: torch.Tensor, generator: torch.Generator | None, sweeps: int = 10
) -> TensorTrain | None:
    """A rank-1 fit ``α u_1 ∘ ⋯ ∘ u_d`` of the sparse tensor ``W`` with the values ``w (N,)`` at the problem's indices
    Ω (zero elsewhere): ``sweeps`` sweeps of the higher-order power method (De Lathauwer–De Moor–Vandewalle 2000),
    ``u_k ← W ×_{j≠k} u_j / ‖·‖`` for k = 1, …, d, from Gaussian vectors drawn from ``generator``; then
    ``α = ⟨w, z⟩ / ‖z‖²`` with ``z`` the entries of ``u_1 ∘ ⋯ ∘ u_d`` at Ω — the least-squares step along it (with
    ``w`` the residual ``values − P_Ω X``: the exact line search of ``f`` along the term). Every sum over Ω goes
    through ``problem.run.reduce`` (all processes' entries). None where a product ``W ×_{j≠k} u_j`` or ``z``
    vanishes (no rank-1 direction to add). Cost ``O(sweeps · d (N + n))`` and ``O(d N)`` memory (the products of
    the later modes' factors, per entry).

    From sparse samples the leading rank-1 term of the zero-filled tensor is one of its entries: on
    ``tt-completion-phase``'s data (d = 6 and 10, uniform and Gaussian cores, 3–256 × dim) the sweeps ended at one
    observed entry, each ``u_k`` (nearly) a coordinate vector ``±e_{i_k}``: the effective number of entries that
    carry ``z``'s sampled energy, ``(Σ z²)² / Σ z⁴``, was 1–1.5 (docs/benchmarks.md)."""
    idx, run = problem.indices, problem.run
    d, kw = len(problem.shape), dict(dtype=w.dtype, device=w.device)
    gdev = generator.device if generator is not None else w.device
    us = [torch.randn(n, dtype=w.dtype, device=gdev, generator=generator).to(w.device) for n in problem.shape]
    for _ in range(sweeps):
        after = [torch.ones_like(w)]  # after[j]: the product of the factors of modes > d − 1 − j at each entry
        for k in range(d - 1, 0, -1):
            after.append(after[-1] * us[k][idx[:, k]])
        before = w  # w times the product of the (updated) factors of the modes before k
        for k in range(d):
            v = run.reduce(torch.zeros(problem.shape[k], **kw).index_add_(0, idx[:, k], before * after[d - 1 - k]))
            norm = torch.linalg.vector_norm(v)
            if not 0 < float(norm) < float("inf"):
                return None
            us[k] = v / norm
            before = before * us[k][idx[:, k]]
    z = us[0][idx[:, 0]]
    for k in range(1, d):
        z = z * us[k][idx[:, k]]
    a, b = run.reduce(torch.stack([w @ z, z @ z])).tolist()
    if not (b > 0 and math.isfinite(a / b)) or a == 0:
        return None
    cores = [u.reshape(1, -1, 1) for u in us]
    cores[0] = cores[0] * (a / b)
    return TensorTrain._trusted(cores)


def grow_rank_greedy(
    problem: CompletionProblem, x: TensorTrain, ranks: Sequence[int], generator: torch.Generator | None
) -> TensorTrain:
    """``x`` plus the :func:`rank_one_fit` of the residual ``values − P_Ω x`` (the rank-1 term along which ``f``
    falls most, as far as the power method finds it, at its exact line-search step: the greedy rank-one update of
    Uschmajew–Vandereycken for tensor trains), rounded to TT-ranks ``ranks`` (each one more than x's or equal). Where
    the fit is None (a zero residual), the random term of :func:`grow_rank`.
    Cost ``O(d N r² + sweeps · d (N + n) + d n r³)``."""
    with torch.no_grad():
        z = rank_one_fit(problem, problem.values - entries(x, problem.indices), generator)
        if z is None:
            return grow_rank(x, ranks, generator)
        y = x + z
        return y if list(y.ranks) == list(ranks) else y.round(max_rank=list(ranks))


def grow_matrix_rank(
    problem: CompletionProblem,
    x: LowRankMatrix,
    generator: torch.Generator | None,
    block: int = 4,
    power_iters: int = 4,
) -> LowRankMatrix:
    """``X + α u vᵀ`` of rank r + 1: ``(u, v)`` the leading singular pair of the normal part
    ``(I − UUᵀ) G (I − VVᵀ)`` of the Euclidean gradient ``G = P_Ω X − values`` (the rank-one direction in which f
    falls fastest off the manifold), by a randomized range finder of ``block`` columns with ``power_iters`` power
    iterations; ``α > 0`` minimizes f along it (f is quadratic: ``α = −⟨G, u vᵀ⟩ / ‖P_Ω(u vᵀ)‖²``, the sign of v
    chosen to make it positive). If f does not fall along it (G's normal part is 0), ``α`` is 1e-4 ‖X‖.
    The new columns are orthogonal to x's frames, so the result is ``[U u] diag(S, α) [V v]ᵀ`` with no QR.
    Products with G are summed over the processes by ``problem.run``.
    Cost ``O((N + (m + n) r) block · power_iters)``."""
    run, lsq = problem.run, problem.least_squares(x)
    U, S, V = lsq.M.frames(x)
    G, Gt = lsq.euclidean_gradient(x)

    def off(G, A, B, Z):  # (I − A Aᵀ) G (I − B Bᵀ) Z, G's product summed over the processes
        Y = run.reduce(G @ (Z - B @ (B.T @ Z)))
        return Y - A @ (A.T @ Y)

    q = min(block, lsq.M.m - x.rank, lsq.M.n - x.rank)
    left, _, right = randomized_svd(
        lambda Z: off(G, U, V, Z), lambda Y: off(Gt, V, U, Y), V.shape[0], q, generator, power_iters, V
    )
    u, v = left[:, :1], right[:, :1]
    u, v = (w - F @ (F.T @ w) for w, F in ((u, U), (v, V)))  # orthogonal to the frames to rounding
    u, v = u / torch.linalg.vector_norm(u), v / torch.linalg.vector_norm(v)
    a, b = run.reduce(lsq.line_coefficients(x, u, v)).tolist()
    alpha = -a / b if b > 0 else 0.0
    if alpha < 0:
        v, alpha = -v, -alpha
    if not 0 < alpha < float("inf"):
        alpha = 1e-4 * float(torch.linalg.matrix_norm(S))
    r = x.rank
    S1 = torch.zeros(r + 1, r + 1, dtype=S.dtype, device=S.device)
    S1[:r, :r], S1[r, r] = S, alpha
    return LowRankMatrix._trusted(torch.cat([U, u], 1), S1, torch.cat([V, v], 1))


class Stages:
    """Solves ``problem`` stage by stage with ``method`` (see :func:`~lowrankopt.minimize`; ``options`` are passed
    on), every stage's records going to ``history``."""

    def __init__(
        self, problem: CompletionProblem, history: History, *, method: str, curvature: bool, options: dict
    ) -> None:
        self.problem, self.history = problem, history
        self.method, self.curvature, self.options = method, curvature, options

    def __call__(self, x: Point, rank: int, iters: int) -> OptimizeResult:
        """One stage: at most ``iters`` iterations from ``x``, recorded with ``rank``."""
        opts = dict(self.options)
        if self.method == "trust-region":
            # Manopt's defaults assume unit scale; completion points and gradients have the data's scale (‖x‖ ~ ‖A‖
            # and tiny δ-gradients for large tensors). Inner solves to the Eisenstat–Walker forcing term: loose while
            # the gradient falls slowly (far out, where the Gauss–Newton model is poor), tight near the solution.
            # Matrices: the spectral start is not rescaled by 1/p, so it lies far inside the target (‖x₀‖ ≪ ‖A‖): a
            # radius capped at ‖x₀‖ made most outer steps one short gradient step; they start at the Cauchy step's
            # length, uncapped in effect. Tensor trains keep the cap ‖x‖ (measured better there: 37 outer steps
            # against 43 at d = 10, r = 4).
            if not {"theta", "kappa", "gradient_scale"} & set(opts):  # those options ask for the θ-test
                opts.setdefault("forcing", "eisenstat-walker")
            scale = max(float(x.norm()), math.sqrt(manifold_of(x).dim))
            if isinstance(x, LowRankMatrix):
                opts.setdefault("initial_radius", "cauchy")
                opts.setdefault("max_radius", 1e4 * scale)  # (never reached: the radius peaked at 63 ‖x₀‖ at 5000²)
            else:
                opts.setdefault("max_radius", scale)
        self.history.begin_stage(rank)
        f, opts = self.problem.objective(x, self.method, opts)
        res = minimize(
            f, x, self.method, max_iter=iters, curvature=self.curvature, callback=self.history.callback, **opts
        )
        self.history.end_stage(res)
        return res

    def continuation(
        self,
        x: TensorTrain,
        ranks: list[int],
        *,
        generator: torch.Generator | None,
        warmup_iters: int,
        max_iter: int,
        watch_stall: bool = False,
        greedy: bool = False,
    ) -> OptimizeResult:
        """From ``x`` (TT-rank 1) through the stages of :func:`continuation_ranks`, each grown by :func:`grow_rank`
        or, with ``greedy``, by :func:`grow_rank_greedy` (see :meth:`climb`)."""
        stages = continuation_ranks(ranks)
        if greedy:
            grow = lambda x, stage_ranks: grow_rank_greedy(self.problem, x, stage_ranks, generator)  # noqa: E731
        else:
            grow = lambda x, stage_ranks: grow_rank(x, stage_ranks, generator)  # noqa: E731
        return self.climb(x, stages, grow, warmup_iters=warmup_iters, max_iter=max_iter, watch_stall=watch_stall)

    def attempts(
        self,
        ranks: list[int],
        starts: int,
        *,
        growth: str,
        generator: torch.Generator | None,
        warmup_iters: int,
        max_iter: int,
    ) -> tuple[OptimizeResult, int]:
        """Up to ``starts`` runs of :meth:`continuation`, each drawing its own random terms from ``generator`` (so
        each follows its own path). ``growth`` (one of :data:`GROWTH`): ``"random"`` runs start from the best constant
        tensor and grow by tiny random terms; ``"greedy"`` ones start from the :func:`rank_one_fit` of the values and
        grow by :func:`grow_rank_greedy`; ``"alternate"`` makes runs 0, 2, … random and 1, 3, … greedy. Every run but
        the last stops once it stalls at the target rank (see :class:`History`); a run that stalled, or that minimize
        stopped on its own above ``tol`` (floating-point floor, no progress), is followed by another. Returns the run
        with the lowest training residual (its counts ``nit``, ``nfev``, … the totals over every run) and the index of
        its last record in the history."""
        best: tuple[float, OptimizeResult, int] | None = None
        for attempt in range(starts):
            self.history.attempt, self.history.stalled = attempt, False
            greedy = growth == "greedy" or (growth == "alternate" and attempt % 2 == 1)
            x = rank_one_fit(self.problem, self.problem.values, generator) if greedy else None
            res = self.continuation(
                constant_start(self.problem) if x is None else x, ranks, generator=generator,
                warmup_iters=warmup_iters, max_iter=max_iter, watch_stall=attempt < starts - 1, greedy=greedy,
            )  # fmt: skip
            last = len(self.history.records) - 1
            if best is None or self.history.records[last]["train_error"] < best[0]:
                best = (self.history.records[last]["train_error"], res, last)
            # another run after a stall, or after minimize's own stop (floating-point floor, no progress, ftol) at a
            # fit above tol; not after convergence, max_iter, max_time (the time is spent), a failure or NaN
            ended = self.history.converged or res.status in (MAX_ITER, MAX_TIME) or res.status < 0
            if ended or self.history.failed:
                break
        assert best is not None
        res = best[1]
        base = self.history.base  # the counts over every run (an earlier run's res has its own totals only)
        res.nit, res.nfev, res.ngev, res.nhev = base["iter"], base["nfev"], base["ngev"], base["nhev"]
        return res, best[2]

    def matrix_continuation(
        self, x: LowRankMatrix, rank: int, *, generator: torch.Generator | None, warmup_iters: int, max_iter: int
    ) -> OptimizeResult:
        """From ``x`` (of rank below ``rank``) one rank at a time to ``rank``, each stage grown by
        :func:`grow_matrix_rank` (see :meth:`climb`)."""
        grow = lambda x, _: grow_matrix_rank(self.problem, x, generator)  # noqa: E731
        return self.climb(x, list(range(x.rank, rank + 1)), grow, warmup_iters=warmup_iters, max_iter=max_iter)

    def climb(
        self, x: Point, stages: list, grow: Callable, *, warmup_iters: int, max_iter: int, watch_stall: bool = False
    ) -> OptimizeResult:
        """From ``x`` (at ``stages[0]``) through ``stages`` (ranks, or lists of TT-ranks), ``grow(x, stage)`` making
        the next stage's start: ``warmup_iters`` iterations at each stage but the last, then ``max_iter`` (stopped
        early if it stalls, with ``watch_stall``: see :class:`History`). A stage that reaches the history's ``tol``,
        fails (negative status) or sees a process fail ends the run with its result (of lower rank, then)."""
        res = None
        for k, stage in enumerate(stages):
            if k:
                x = grow(x, stage)
            final = k == len(stages) - 1
            self.history.watch_stall = final and watch_stall
            res = self(x, stage if isinstance(stage, int) else max(stage), max_iter if final else warmup_iters)
            x = res.x
            if final or res.status < 0 or self.history.failed or self.history.converged:
                break
        return res
