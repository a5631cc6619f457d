"""Low-rank matrix and tensor-train completion: ``complete(indices, values, shape, rank)``.

Minimizes ``f(X) = ½ ‖P_Ω(X) − values‖²`` over matrices of rank r (:class:`FixedRankMatrices`) or
tensors of TT-rank r (:class:`FixedTTRank`) with :func:`minimize`. ``method="cg"`` is LRGeomCG
(Vandereycken 2013) for matrices and RTTC (Steinlechner 2016) for tensor trains: nonlinear CG, vector
transport by projection, and the exact line search of the linearized problem (the quadratic-model step
with ``curvature=False``), the default. ``method="trust-region"`` solves trust-region subproblems with the
same Hessian (Gauss–Newton); ``curvature=True`` uses the exact Riemannian Hessian.

Start points: matrices start from the rank-r truncated SVD of the zero-filled ``P_Ω A`` (LRGeomCG's
``make_start_x``, computed matrix-free by a randomized range finder on the sparse matrix); tensor trains
from the best constant tensor with rank continuation (a few iterations at TT-rank 1, 2, …, each stage
grown by a tiny random rank-1 term), or from a rank-1 fit of the values, each stage grown by the rank-1 fit of
the residual (``growth``; for zero-mean data runs of both kinds alternate), because for d ≫ 2 a random TT-rank-r start
is almost orthogonal to the target and its tangent space. With CG and trust-region, tensor trains are solved in
balanced coordinates (``scaling``: a positive scaling of each mode's slices, undone on return) and a continuation
that stalls at the target rank is run again (``starts``); all three lower the sampling at which tensors with
Gaussian cores are recovered (docs/benchmarks.md, ``tt-completion-phase``).

:func:`complete` composes named pieces: ``checks.check_arguments`` (the argument checks);
``problem.CompletionProblem`` (minimize's objective at each stage: the closed forms of
``problem.MatrixLeastSquares`` for matrices, δ-trick autodiff of :func:`completion_loss` otherwise) and
``problem.HeldOut`` (the test error); ``start`` (``matrix_start`` / ``spectral_start``, ``constant_start``,
``zero_point``); ``scaling`` (``balance_modes``, ``ModeScaling``); ``continuation.Stages`` (one stage, the rank
continuation, or several runs of it); ``history.History`` (minimize's
callback and one history across the stages). Sums over processes go through a ``problem.Collectives``:
``problem.SingleProcess``, or :class:`lowrankopt.distributed.ShardedRun` with ``distributed=True`` (which also holds
the processes' agreement on the call).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist  # (loaded by torch already; lowrankopt.distributed is loaded by the first use)

from ..formats.lowrank import LowRankMatrix
from ..formats.tt import TensorTrain
from ..optim import OptimizeResult
from .checks import Arguments, check_arguments
from .continuation import Stages, default_growth
from .history import History
from .problem import Collectives, CompletionProblem, HeldOut, MatrixLeastSquares, SingleProcess, completion_loss
from .sampling import sample_indices
from .scaling import balance_modes
from .start import matrix_start, spectral_start, tt_ranks, zero_message, zero_point

__all__ = ["complete", "sample_indices", "completion_loss"]

# the methods that complete(balance=None, starts=None) balances and restarts after a stall (measured there)
_BALANCED_AND_RESTARTED = ("cg", "trust-region")

# earlier private names of the pieces (tests reach them)
_MatrixLeastSquares = MatrixLeastSquares
_spectral_start = spectral_start


def complete(
    indices: torch.Tensor,
    values: torch.Tensor,
    shape: Sequence[int],
    rank: int | Sequence[int],
    *,
    method: str = "cg",
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    x0: LowRankMatrix | TensorTrain | None = None,
    tol: float | None = None,
    max_iter: int = 1000,
    warmup_iters: int | None = None,
    curvature: bool = False,
    generator: torch.Generator | None = None,
    monitor: Callable | None = None,
    distributed: bool = False,
    group: dist.ProcessGroup | None = None,
    check_every: int = 10,
    rank_continuation: bool | None = None,
    balance: bool | None = None,
    starts: int | None = None,
    growth: str | None = None,
    **options: Any,
) -> OptimizeResult:
    """Complete a matrix (``len(shape) == 2``) or a tensor (tensor train) of rank ``rank`` from its
    entries ``values`` at ``indices``.

    Args:
        indices: ``(N, d)`` integer tensor of observed positions (Ω; use :func:`sample_indices`). A position given
            k times is k observations: each counts in the least-squares loss.
        values: ``(N,)`` float32/float64 observed entries.
        shape: the shape of the full matrix / tensor.
        rank: matrix rank, or TT-ranks (an int or the d − 1 inner ranks).
        method: ``"cg"`` (default; LRGeomCG / RTTC: PR+ CG with the exact linearized line search),
            ``"trust-region"`` (Riemannian Gauss–Newton in a trust region, or the exact Hessian with
            ``curvature=True``), ``"lbfgs"`` (Riemannian L-BFGS with a Wolfe line search) or ``"sd"`` — see
            :func:`minimize`. In docs/benchmarks.md (2026-12-03)
            trust-region was the faster on matrices up to 5000² and at κ = 10⁴ (0.67–0.90× CG), 1.18× CG at
            20000², and within 5 % of CG on tensor trains.
        test: optional ``(indices, values)`` of held-out entries Γ; the relative test error
            ``‖P_Γ(X − A)‖ / ‖P_Γ A‖`` is recorded in the history (its cost is not counted in ``time``).
        x0: start point (LowRankMatrix / TensorTrain of the target rank); default as in the module doc.
        tol: stop when the relative training residual ``‖P_Ω X − values‖ / ‖values‖ ≤ tol`` (default 1e-12 in
            float64, 1e-5 in float32; the balanced stages of ``balance`` test their own residual).
        max_iter: iterations at the target rank (the rank-continuation stages take ``warmup_iters``
            each on top).
        warmup_iters: iterations of each rank-continuation stage below the target rank (default 8 for tensor
            trains; for matrices, whose stages start from the greedy rank-one step, 4 with CG and 2 with
            trust-region).
        rank_continuation: matrices only (a ValueError for tensors, which always climb from TT-rank 1 without
            ``x0``), and only without ``x0``. None (default): start at the rank the spectral start resolves above
            the sampling noise (``completion.start.signal_rank``; the full rank for a
            well-conditioned target) and climb one rank at a time from there, each stage grown by the greedy
            rank-one step (``completion.continuation.grow_matrix_rank``). Started at the full rank
            from the spectral start, CG stalls at a wrong fit once the target's condition number κ reaches about 10
            (docs/benchmarks.md, ``matrix-completion``, the κ cases). True: climb from rank 1; False: no
            continuation.
        balance: tensor trains only (a ValueError for matrices if True). True, or None (the default) with CG and
            trust-region: first solve for
            the balanced tensor ``B = A ×_1 diag(D_1) ⋯ ×_d diag(D_d)``, the positive mode scalings ``D_k`` chosen so
            that every slice has the same mean square over its observed entries (``completion.scaling.balance_modes``;
            the TT-ranks are those of A), then map the result back (the cores divided by the scalings) and finish
            on the plain problem: one more stage of at most ``max_iter`` iterations at the target rank (a single one
            where the balanced run has fitted exact data). So the answer minimizes the plain least squares; the
            balancing only chose where to look. At d = 6, n = 10, TT-rank 4, Gaussian cores, it raised the success
            rate at ``|Ω| = 20 dim`` from 0 to 3 of 4 seeds (with the restarts); on nonnegative cores the
            transition stayed at 3 dim (docs/benchmarks.md, ``tt-completion-phase``). The records of the
            balanced stages have ``balanced`` True: their ``fun``, ``grad_norm`` and ``train_error`` are the
            balanced problem's (``‖w ∘ (P_Ω X − values)‖ / ‖w ∘ values‖``, ``w`` the product of the scalings at Ω),
            and ``tol`` stops them on it; test errors and ``monitor``'s ``x`` are in the caller's coordinates
            throughout (``monitor`` sees ``grad`` None there). False, or None with L-BFGS and steepest descent: no
            scaling (see ``starts``).
        starts: tensor trains without ``x0`` (a ValueError otherwise, if above 1); None (default) means 4 with CG
            and trust-region, 1 with L-BFGS and steepest descent: their plateaus outlast the stall test, and on
            ``tt-completion`` (d = 10, n = 20, TT-ranks 4 / 6 / 8, one seed, 2026-12-04) L-BFGS with balancing and
            restarts missed r = 8 (a run cut on a 70-iteration plateau), with balancing and one run r = 6, without
            balancing and with restarts r = 6, while without either (its defaults) it reached all three. Up to this
            many runs of the rank continuation, each with its own random draws from ``generator`` (its start and
            growth as ``growth`` says). A run that stalls at the target rank (training residual down by less than
            10 % in 50 iterations; its last record has ``stalled``) or that minimize stops on its own above
            ``tol`` is followed by the next (the last is never stopped early), and the run with the lowest training
            residual is returned (``res.attempt``; the records carry ``attempt``); a returned run that stalled is not
            a success (status 5, the message says so). At TT-rank 1 there is one run (no growth terms to differ).
            Near the sampling limit the runs' outcomes differ: at d = 6, n = 10, Gaussian cores, 2 random runs in 16
            recovered the tensor at TT-rank 4 from 15 × dim entries, 7 in 16 at TT-rank 2 from 64 × dim
            (docs/benchmarks.md). A run that converges is not repeated, so this costs time only where the first run
            fails.
        growth: tensor trains without ``x0`` (a ValueError otherwise): how each run of the rank continuation starts
            and grows. ``"random"``: from the best constant tensor, each stage grown by a tiny random rank-1 term
            (``completion.continuation.grow_rank``). ``"greedy"``: from a rank-1 fit of the values
            (``completion.continuation.rank_one_fit``: the higher-order power method on the zero-filled tensor, then
            the least-squares scale), each stage grown by the same fit of the residual at the exact line-search step
            (``grow_rank_greedy``: the greedy rank-one update of Uschmajew–Vandereycken, for tensor trains; one
            rank-1 fit costs ``O(10 d (N + n))``). From samples as sparse as ``tt-completion-phase``'s the fit is a
            single observed entry (a spike), so a greedy run starts at one large sample and grows by one more; at
            d = 10 those runs do not move off it (docs/benchmarks.md). ``"alternate"``: runs 0, 2, … random and
            1, 3, … greedy (see ``starts``). None (default): ``"alternate"`` where the best constant tensor
            explains less than half of the values' energy (zero-mean data, such as Gaussian cores), ``"random"``
            otherwise (``completion.continuation.default_growth``; ``res.growth`` says which). Measured on
            ``tt-completion-phase`` (docs/benchmarks.md): on Gaussian cores at d = 6, n = 10, TT-rank 2 the
            alternating runs lowered the 9/10 point from 128 to 64 × dim with CG and from 96 to 48 × with
            trust-region; on nonnegative cores near 2–3 × dim the data's rank-1 fit is spiky, greedy runs fail
            where random ones succeed, and alternating raised trust-region's 9/10 point at d = 6, n = 10, TT-rank 2
            from 3 to 4 × dim — hence the default.
        curvature: Hessian used by the quadratic-model steps and the trust-region method (see
            :func:`minimize`); the default False gives the exact line search of LRGeomCG / RTTC.
        generator: for the randomized start (deterministic given it).
        monitor: ``monitor(intermediate_result)`` after every iteration, once ``history[-1]`` has the
            errors (e.g. to print progress); its time is not counted in ``solve_time``.
        distributed: each process of ``group`` (default: the default process group of ``torch.distributed``)
            passes its own shard of the observed entries (and of ``test``); f, its gradient, Hessian products and
            the line-search scalar are sums over the shards, all-reduced in δ-coordinates (``O((m + n) r)`` or
            ``O(d n r²)`` numbers per reduction, independent of the number of entries). Every process gets the same
            result; give every process the same ``generator`` seed and ``x0``.
            An exception on one process (in ``monitor``, or in its shard's loss) stops every process at the same
            iteration and is raised on all of them: the original where it happened, a ``RuntimeError`` naming that
            process elsewhere (one all-reduce of ``world_size`` integers per iteration agrees on it).
        group: the process group (``distributed=True``).
        check_every: with ``distributed``, compare a checksum of the point across processes every this many
            iterations (``RuntimeError`` if they differ).
        **options: passed to :func:`minimize` (``gtol`` defaults to 0 here: ``tol`` decides).

    Returns:
        The :class:`OptimizeResult` of the final stage of the returned run, with ``train_error`` and ``test_error``
        (its final relative errors; test only with ``test``), ``attempt`` (tensor trains without ``x0``: which run
        of ``starts`` it is, from 0), ``growth`` (tensor trains: the runs' kind, see ``growth``; None from ``x0``),
        and ``history`` covering all stages of all runs; each record has ``rank``, ``attempt``, ``balanced``,
        ``train_error`` (of the balanced problem in its stages), ``test_error`` (+inf when the held-out values are all
        zero and X is not there) and ``solve_time`` (seconds since the call, including the start-point computation,
        without the time spent on test errors and ``monitor``). With ``distributed``, ``communication`` holds the
        ``bytes`` all-reduced by this process and the number of ``calls``. If a rank-continuation stage already reaches
        ``tol``, its point — of lower TT-rank — is returned (check ``res.x.ranks``): the data are explained by fewer
        parameters. If all ``values`` are zero, the answer is the zero tensor, returned at once (``nit == 0``, success,
        the message says so) in the format of rank ``rank`` with a zero ``S`` / first core: it has rank 0, so it is not
        a point of the fixed-rank manifold (its exact Hessian is undefined); ``x0`` is then only checked.
    """
    error, args = None, None
    try:  # with distributed, a process that rejects its input must not leave the others waiting in a collective
        args = check_arguments(
            indices, values, shape, test=test, x0=x0, tol=tol, warmup_iters=warmup_iters, check_every=check_every,
            generator=generator, monitor=monitor, distributed=distributed, options=options,
            rank_continuation=rank_continuation, balance=balance, starts=starts, growth=growth,
        )  # fmt: skip
    except (TypeError, ValueError) as exc:
        if not distributed:
            raise
        error = exc
    run = SingleProcess()
    if distributed:  # the processes agree on the call (or all raise), then sum over their shards
        settings = (
            str(rank),
            method,
            max_iter,
            warmup_iters,
            curvature,
            check_every,
            x0 is not None,
            rank_continuation,
            balance,
            starts,
            growth,
        )
        run = _sharded_run(error, args, values, settings, group=group, check_every=check_every)
    indices, shape, test, tol, options = args
    scaling, solved = None, values  # (balance: the solver's values are B's, w ∘ values)
    if len(shape) > 2 and (balance or (balance is None and method in _BALANCED_AND_RESTARTED)):
        scaling = balance_modes(indices, values, shape, reduce=run.reduce)
        solved = (values.to(torch.float64) * scaling.weights(indices)).to(values.dtype)
    undo = None if scaling is None else scaling.undo
    held_out = None if test is None else HeldOut(*test, run, point=undo)
    problem = CompletionProblem(indices, solved, shape, completion_loss(indices, solved), curvature=curvature, run=run)
    if problem.norm == 0:  # the fit is the zero tensor: start there, where f and its gradient vanish (x0 only checked)
        x0 = zero_point(shape, rank, values, x0, distributed)
    history = History(norm=problem.norm, tol=tol, held_out=held_out, run=run, monitor=monitor, point=undo)
    stages = Stages(problem, history, method=method, curvature=curvature, options=options)
    last = -1  # the record of the returned point (the last, but for the best of several attempts)
    if len(shape) == 2:
        x = matrix_start(problem, rank, x0, generator, rank_continuation)
        if x.rank < rank:
            # (a trust-region stage reaches the stage's stationary point in 2–3 steps; CG needs about 4)
            warmup = (2 if method == "trust-region" else 4) if warmup_iters is None else warmup_iters
            res = stages.matrix_continuation(x, rank, generator=generator, warmup_iters=warmup, max_iter=max_iter)
        else:
            res = stages(x, rank, max_iter)
    else:
        ranks = tt_ranks(shape, rank, x0)
        if x0 is not None:
            res = stages(x0 if scaling is None else scaling.apply(x0), max(ranks), max_iter)
            res.attempt = 0
        else:
            warmup = 8 if warmup_iters is None else warmup_iters
            # (at TT-rank 1 there are no growth terms: every run would repeat the first)
            runs = (
                1
                if max(ranks) == 1
                else starts
                if starts is not None
                else 4
                if method in _BALANCED_AND_RESTARTED
                else 1
            )
            growth = growth or default_growth(problem)
            res, last = stages.attempts(
                ranks, runs, growth=growth, generator=generator, warmup_iters=warmup, max_iter=max_iter
            )
            res.attempt = history.records[last]["attempt"]
        if scaling is not None and problem.norm > 0 and res.status >= 0 and not history.failed:
            # back to the caller's problem: balancing only chose where to look; the answer minimizes the plain
            # least squares (the same point where the data are exact, the plain estimator where they are noisy)
            attempt = res.attempt
            problem = CompletionProblem(indices, values, shape, completion_loss(indices, values), curvature=curvature,
                                        run=run)  # fmt: skip
            history.plain(problem.norm)
            history.attempt = attempt  # (its records continue the returned run)
            res = Stages(problem, history, method=method, curvature=curvature, options=options)(
                scaling.undo(res.x), max(ranks), max_iter
            )
            res.attempt, last = attempt, -1
        elif scaling is not None:  # (a failed or empty run: its point, in the caller's coordinates)
            res.x, res.grad = scaling.undo(res.x), None
    run.finish(res)  # with distributed: raises on every process or on none, checks that they hold one point
    # after balancing, the last record may be a balanced one (the plain stage stops at its start where the balanced
    # run has fitted exact data, and a start makes no record): the plain residual of res.x, one gather
    last_balanced = scaling is not None and problem.norm > 0 and history.records[-1]["balanced"]
    plain = HeldOut(indices, values, run).error(res.x) if last_balanced else None
    history.finish(res, last, train_error=plain)
    if len(shape) > 2:
        res.growth = growth  # (None from x0)
    if problem.norm == 0:
        res.message = zero_message(len(shape)) + res.message
    return res


def _sharded_run(
    error: Exception | None,
    args: Arguments | None,
    values: torch.Tensor,
    settings: tuple,
    *,
    group: dist.ProcessGroup | None,
    check_every: int,
) -> Collectives:
    """The :class:`~lowrankopt.distributed.ShardedRun` of a call with ``distributed``, once every process agrees on
    the call (``settings``, the sizes and ``args.options``) or all have raised (``args`` is None where this
    process's checks raised ``error``). One more collective: the number of entries over every process."""
    from ..distributed import ShardedRun

    call = None  # (with an error, every process raises in the agreement, whatever the calls)
    if args is not None:
        call = (*settings, args.test is not None, str(values.dtype), tuple(int(n) for n in args.shape), args.tol)
    run = ShardedRun(error, call, {} if args is None else args.options, group=group, check_every=check_every)
    if int(run.quiet(torch.tensor([len(values)], device=values.device))) == 0:
        raise ValueError("values is empty on every process: nothing to complete from")
    return run
