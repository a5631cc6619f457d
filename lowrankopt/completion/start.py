"""Start points of :func:`~lowrankopt.complete`: the spectral start for matrices, the best constant tensor for tensor
trains (the first stage of the rank continuation), and the zero tensor when all values are zero."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from .._checks import as_rank_list
from ..formats.lowrank import LowRankMatrix
from ..formats.tt import TensorTrain
from ..manifolds.fixed_rank import FixedRankMatrices
from ..manifolds.tt import FixedTTRank
from .problem import CompletionProblem, Point

__all__ = [
    "constant_start",
    "matrix_start",
    "randomized_svd",
    "signal_rank",
    "spectral_factors",
    "spectral_start",
    "tt_ranks",
    "zero_message",
    "zero_point",
]


#: extra columns of the spectral start's range finder beyond the rank (what its accuracy and signal_rank need)
OVERSAMPLE = 10


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def spectral_start(
    indices: torch.Tensor,
    values: torch.Tensor,
    shape: Sequence[int],
    rank: int,
    generator: torch.Generator | None,
    oversample: int = OVERSAMPLE,
    power_iters: int = 4,
    reduce: Callable = _identity,
) -> LowRankMatrix:
    """Rank-``rank`` truncated SVD of the zero-filled sparse matrix, by a randomized range finder with
    power iterations (Halko–Martinsson–Tropp). Cost ``O((N + (m + n) q) q · power_iters)``, q = rank +
    oversample; never forms the dense matrix. ``reduce`` sums each sparse product over the processes that hold
    the other shards of the entries (identity in one process)."""
    U, s, V = spectral_factors(indices, values, shape, rank + oversample, generator, power_iters, reduce)
    return LowRankMatrix._trusted(U[:, :rank], torch.diag(s[:rank]), V[:, :rank])


def spectral_factors(
    indices: torch.Tensor,
    values: torch.Tensor,
    shape: Sequence[int],
    q: int,
    generator: torch.Generator | None,
    power_iters: int = 4,
    reduce: Callable = _identity,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``min(q, m, n)`` singular triplets ``(U (m, q), s (q,), V (n, q))`` of the zero-filled sparse
    matrix of the entries (a repeated position with the mean of its observations), by a randomized range finder
    with ``power_iters`` power iterations. Cost ``O((N + (m + n) q) q · power_iters)``."""
    m, n = shape
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the kernels used here are stable
        warnings.simplefilter("ignore", UserWarning)
        # a repeated position enters with the mean of its observations (coalesce sums them: divide by the count)
        A = torch.sparse_coo_tensor(indices.T, values, (m, n), check_invariants=False).coalesce()
        counts = torch.sparse_coo_tensor(indices.T, torch.ones_like(values), (m, n), check_invariants=False)
        A = torch.sparse_coo_tensor(A.indices(), A.values() / counts.coalesce().values(), (m, n)).coalesce()
        At = A.t().coalesce().to_sparse_csr()
        A = A.to_sparse_csr()
    return randomized_svd(
        lambda Z: reduce(A @ Z), lambda Y: reduce(At @ Y), n, min(q, m, n), generator, power_iters, values
    )


def randomized_svd(
    apply: Callable[[torch.Tensor], torch.Tensor],
    apply_t: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    q: int,
    generator: torch.Generator | None,
    power_iters: int,
    like: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``q`` singular triplets ``(U (m, q), s (q,), V (n, q))`` of an ``m × n`` operator A given by its
    products ``apply(Z) = A Z`` and ``apply_t(Y) = Aᵀ Y``, by a randomized range finder with ``power_iters`` power
    iterations (Halko–Martinsson–Tropp) from a Gaussian ``(n, q)`` sketch drawn from ``generator``, in ``like``'s
    dtype and on its device. Cost ``2 power_iters + 2`` products with q columns, plus ``O((m + n) q²)``."""
    gdev = generator.device if generator is not None else like.device
    omega = torch.randn(n, q, dtype=like.dtype, device=gdev, generator=generator).to(like.device)
    Q = torch.linalg.qr(apply(omega))[0]
    for _ in range(power_iters):
        Q = torch.linalg.qr(apply(torch.linalg.qr(apply_t(Q))[0]))[0]
    Ub, s, Vh = torch.linalg.svd(apply_t(Q).T, full_matrices=False)  # Qᵀ A = Ub diag(s) Vh
    return Q @ Ub, s, Vh.T


def signal_rank(s: torch.Tensor, rank: int, margin: float = 1.3, start_margin: float = 2.0) -> int:
    """The rank to start the completion of a rank-``rank`` target at, from the spectral start's singular values
    ``s`` (at least ``rank + 1`` of them; ``rank`` otherwise): ``rank`` when all of ``s[:rank]`` exceed
    ``margin · s[rank]``, else the count of those above ``start_margin · s[rank]`` (at least 1).

    For a rank-``rank`` target observed on a uniform sample, the singular values of the zero-filled matrix past the
    rank-th are the noise of the sampling (σ_{rank+1}(P_Ω A) ≈ ‖P_Ω A − p A‖, the edge of a continuous noise
    spectrum). A component of A near or below it is not resolved by the start: its direction is mixed with noise,
    and a solver started there stalls at a wrong fit (measured in docs/benchmarks.md, matrix completion with
    κ ≥ 10, also when started at a rank whose last value stands only 1.3× above σ_{rank+1}). Such targets start
    from the components well above the noise and climb one rank at a time."""
    if s.numel() <= rank:
        return rank
    if bool((s[:rank] > margin * s[rank]).all()):
        return rank
    return max(1, int((s[:rank] > start_margin * s[rank]).sum()))


def matrix_start(
    problem: CompletionProblem,
    rank: int,
    x0: LowRankMatrix | None,
    generator: torch.Generator | None,
    continuation: bool | None = False,
) -> LowRankMatrix:
    """``x0``, checked against the manifold of rank ``rank`` (which checks ``rank``), or the spectral start of the
    problem's entries (all processes' entries: its products are summed by the problem's ``run``): at rank ``rank``
    (``continuation=False``), 1 (True), or the :func:`signal_rank` of its singular values (None), where a rank
    continuation to ``rank`` then starts."""
    M = FixedRankMatrices(problem.shape[0], problem.shape[1], rank)  # validates rank
    if x0 is not None:
        M.check_point(x0, "x0")
        return x0
    U, s, V = spectral_factors(
        problem.indices, problem.values, problem.shape, rank + OVERSAMPLE, generator, reduce=problem.run.reduce
    )
    start = rank if continuation is False else 1 if continuation else signal_rank(s, rank)
    return LowRankMatrix._trusted(U[:, :start], torch.diag(s[:start]), V[:, :start])


def tt_ranks(shape: Sequence[int], rank: int | Sequence[int], x0: TensorTrain | None) -> list[int]:
    """The ``d − 1`` TT-ranks ``rank`` stands for (checked attainable for ``shape``), and ``x0`` checked on them."""
    ranks = as_rank_list("rank", rank, len(shape))
    M = FixedTTRank(shape, ranks)  # validates attainability
    if x0 is not None:
        M.check_point(x0, "x0")
    return ranks


def constant_start(problem: CompletionProblem) -> TensorTrain:
    """The best constant tensor (TT-rank 1): the mean of all processes' values, in every entry. One collective."""
    values = problem.values
    x = TensorTrain([torch.ones(1, n, 1, dtype=values.dtype, device=values.device) for n in problem.shape])
    count = torch.tensor(float(len(values)), dtype=torch.float64, device=values.device)
    total = problem.run.reduce(torch.stack([values.sum().to(torch.float64), count]))  # on the data's device
    return x * (total[0] / total[1]).to(values.dtype)


def zero_point(
    shape: Sequence[int], rank: int | Sequence[int], values: torch.Tensor, x0: Point | None, distributed: bool
) -> Point:
    """The zero matrix / tensor in the format of rank ``rank``, with orthonormal frames (matrices ``U = I[:, :r]``,
    ``S = 0``, ``V = I[:, :r]``; TT: right-orthogonal cores ``I[:r_{k-1}, :n_k r_k]`` after a zero first core), on
    values' dtype and device: the least-squares fit of all-zero values. Checks ``rank`` and ``x0`` (then unused)."""
    if not distributed and bool(values.any()):  # (with distributed, the processes could disagree on this)
        raise ValueError(
            f"values are nonzero but their squares underflow to 0 in {values.dtype}: rescale them or use float64"
        )
    kw = dict(dtype=values.dtype, device=values.device)
    if len(shape) == 2:
        M = FixedRankMatrices(shape[0], shape[1], rank)
        r = M.rank
        x = LowRankMatrix._trusted(torch.eye(M.m, r, **kw), torch.zeros(r, r, **kw), torch.eye(M.n, r, **kw))
    else:
        M = FixedTTRank(shape, as_rank_list("rank", rank, len(shape)))
        full = [1, *M.ranks, 1]
        cores = [torch.eye(a, n * b, **kw).reshape(a, n, b) for a, n, b in zip(full, shape, full[1:])]
        cores[0] = torch.zeros_like(cores[0])
        x = TensorTrain._trusted(cores)
    if x0 is not None:
        M.check_point(x0, "x0")
    return x


def zero_message(d: int) -> str:
    """The start of the message of a completion of all-zero values (see :func:`zero_point`)."""
    return (
        "all observed values are zero, so the completion is the zero tensor: rank 0, returned in the format of the "
        f"requested rank with a zero {'S' if d == 2 else 'first core'} (not a point of the fixed-rank manifold); "
    )
