"""Stages of :func:`~lowrankopt.complete`: :class:`Stages` runs :func:`~lowrankopt.minimize` on the problem at one
rank, and the rank continuation of tensor trains (TT-rank 1, 2, …, each stage grown from the last by a tiny random
rank-1 term)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..formats.tt import TensorTrain
from ..manifolds import manifold_of
from ..optim import OptimizeResult, minimize
from .history import History
from .problem import CompletionProblem, Point

__all__ = ["Stages", "continuation_ranks", "grow_rank"]


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
            # Manopt's defaults assume unit scale; completion points and gradients have the data's scale
            # (‖x‖ ~ ‖A‖ and tiny δ-gradients for large tensors): radius cap ‖x‖, inner test relative to ‖g(x0)‖.
            opts.setdefault("max_radius", max(float(x.norm()), math.sqrt(manifold_of(x).dim)))
            opts.setdefault("gradient_scale", "initial")
        self.history.begin_stage(rank)
        f, opts = self.problem.objective(x, self.method, opts)
        res = minimize(
            f, x, self.method, max_iter=iters, curvature=self.curvature, callback=self.history.callback, **opts
        )
        self.history.end_stage(res)
        return res

    def continuation(
        self, x: TensorTrain, ranks: list[int], *, generator: torch.Generator | None, warmup_iters: int, max_iter: int
    ) -> OptimizeResult:
        """From ``x`` (TT-rank 1) through the stages of :func:`continuation_ranks`: ``warmup_iters`` iterations at
        each rank below ``ranks``, then ``max_iter`` at ``ranks``. A stage that reaches the history's ``tol``, fails
        (negative status) or sees a process fail ends the run with its result (of lower rank, then)."""
        res = None
        for r, stage_ranks in enumerate(continuation_ranks(ranks), start=1):
            if r > 1:
                x = grow_rank(x, stage_ranks, generator)
            final = stage_ranks == ranks
            res = self(x, r, max_iter if final else warmup_iters)
            x = res.x
            if final or res.status < 0 or self.history.failed or self.history.converged:
                break
        return res
