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

__all__ = ["constant_start", "matrix_start", "spectral_start", "tt_ranks", "zero_message", "zero_point"]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def spectral_start(
    indices: torch.Tensor,
    values: torch.Tensor,
    shape: Sequence[int],
    rank: int,
    generator: torch.Generator | None,
    oversample: int = 10,
    power_iters: int = 4,
    reduce: Callable = _identity,
) -> LowRankMatrix:
    """Rank-``rank`` truncated SVD of the zero-filled sparse matrix, by a randomized range finder with
    power iterations (Halko–Martinsson–Tropp). Cost ``O((N + (m + n) q) q · power_iters)``, q = rank +
    oversample; never forms the dense matrix. ``reduce`` sums each sparse product over the processes that hold
    the other shards of the entries (identity in one process)."""
    m, n = shape
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the kernels used here are stable
        warnings.simplefilter("ignore", UserWarning)
        # a repeated position enters with the mean of its observations (coalesce sums them: divide by the count)
        A = torch.sparse_coo_tensor(indices.T, values, (m, n), check_invariants=False).coalesce()
        counts = torch.sparse_coo_tensor(indices.T, torch.ones_like(values), (m, n), check_invariants=False)
        A = torch.sparse_coo_tensor(A.indices(), A.values() / counts.coalesce().values(), (m, n)).coalesce()
        At = A.t().coalesce().to_sparse_csr()
        A = A.to_sparse_csr()
    q = min(rank + oversample, m, n)
    gdev = generator.device if generator is not None else values.device
    omega = torch.randn(n, q, dtype=values.dtype, device=gdev, generator=generator).to(values.device)
    Q = torch.linalg.qr(reduce(A @ omega))[0]
    for _ in range(power_iters):
        Q = torch.linalg.qr(reduce(A @ torch.linalg.qr(reduce(At @ Q))[0]))[0]
    B = reduce(At @ Q).T  # Qᵀ A, shape (q, n)
    Ub, s, Vh = torch.linalg.svd(B, full_matrices=False)
    return LowRankMatrix._trusted(Q @ Ub[:, :rank], torch.diag(s[:rank]), Vh[:rank].T)


def matrix_start(
    problem: CompletionProblem, rank: int, x0: LowRankMatrix | None, generator: torch.Generator | None
) -> LowRankMatrix:
    """``x0``, checked against the manifold of rank ``rank`` (which checks ``rank``), or the spectral start of the
    problem's entries (all processes' entries: its products are summed by the problem's ``run``)."""
    M = FixedRankMatrices(problem.shape[0], problem.shape[1], rank)  # validates rank
    if x0 is None:
        run = problem.run
        x0 = spectral_start(problem.indices, problem.values, problem.shape, rank, generator, reduce=run.reduce)
    M.check_point(x0, "x0")
    return x0


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
