"""Demo: tensor-train completion by Riemannian conjugate gradients on :class:`FixedTTRank`.

The ground truth ``A`` is a random nonnegative tensor of TT-rank r and shape ``n^d`` (i.i.d. uniform
cores), observed on a random set Ω of entries. :func:`lowrankopt.complete` minimizes
``f(X) = ½ ‖P_Ω(X − A)‖²`` over TT-rank-r tensors by Riemannian CG (RTTC) with rank continuation from
the best constant tensor, and we report the relative error on held-out entries.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .completion import complete, sample_indices
from .formats.tt import TensorTrain
from .manifolds.tt import FixedTTRank

__all__ = ["run_tt_completion"]

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
    tol: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    print_every: int = 10,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Complete a random TT-rank-``rank`` tensor of shape ``(n,) * d`` from ``samples`` random entries.

    Args:
        d, n, rank: order, mode size and (uniform) TT-rank of the ground truth and of the final iterate.
        samples: number of observed (training) entries; ``None`` means ``oversampling × dim`` where
            ``dim`` is the dimension of the TT-rank-``rank`` manifold.
        oversampling: used when ``samples`` is ``None``.
        test_samples: number of held-out entries on which the test error is measured.
        iters: maximum total number of CG iterations (all ranks together).
        warmup_iters: CG iterations at each TT-rank below ``rank`` (rank continuation).
        tol: stop once the relative training residual ``‖P_Ω(X − A)‖ / ‖P_Ω A‖`` is below ``tol``
            (default ``1e-12`` for float64, ``1e-5`` for float32).
        seed: seed of the ``torch.Generator`` that draws the ground truth, the sample sets and the
            rank-growth terms; the run is deterministic given the seed.
        dtype: ``torch.float64`` or ``torch.float32``.
        print_every: print a progress line every this many iterations (and at the end).
        log: where progress lines go (``None``: silent).

    Returns:
        A dict with ``train_error`` and ``test_error`` (final relative errors), ``iterations``,
        ``converged`` (tolerance reached), ``time`` (seconds, excluding data generation), ``samples``
        and ``dim``.
    """
    if dtype not in _DEFAULT_TOL:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if d < 2:
        raise ValueError(f"d must be >= 2, got {d}")
    for name, value in (("n", n), ("rank", rank), ("test_samples", test_samples), ("print_every", print_every)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if iters < 0 or warmup_iters < 0:
        raise ValueError(f"iters and warmup_iters must be >= 0, got {iters} and {warmup_iters}")
    tol = _DEFAULT_TOL[dtype] if tol is None else tol
    emit = log if log is not None else (lambda _msg: None)

    g = torch.Generator().manual_seed(seed)
    shape = [n] * d
    dim = FixedTTRank(shape, rank).dim
    samples = math.ceil(oversampling * dim) if samples is None else samples
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    samples, test_samples = min(samples, n**d), min(test_samples, n**d)  # distinct entries: at most all of them
    truth = _random_truth(shape, rank, dtype, g)
    idx, test_idx = sample_indices(shape, samples, generator=g), sample_indices(shape, test_samples, generator=g)
    vals, test_vals = truth.gather(idx), truth.gather(test_idx)
    emit(
        f"TT completion: shape {n}^{d}, TT-rank {rank}, manifold dim {dim}, {samples} training / "
        f"{test_samples} test entries, {str(dtype).removeprefix('torch.')}, seed {seed}"
    )
    last = [0]

    def progress(res):
        rec = res.history[-1]
        if rec["iter"] - last[0] >= print_every or rec["iter"] == 0:
            last[0] = rec["iter"]
            emit(
                f"iter {rec['iter']:4d}  rank {rec['rank']}  train {rec['train_error']:.3e}  "
                f"test {rec['test_error']:.3e}  |grad| {rec['grad_norm']:.3e}  {rec['solve_time']:6.2f}s"
            )

    res = complete(
        idx,
        vals,
        shape,
        rank,
        method="cg",
        test=(test_idx, test_vals),
        tol=tol,
        max_iter=iters,
        warmup_iters=warmup_iters,
        generator=g,
        monitor=progress,
    )
    converged = res.train_error <= tol
    result = {
        "train_error": res.train_error,
        "test_error": res.test_error,
        "iterations": res.nit,
        "converged": converged,
        "time": res.time,
        "samples": samples,
        "dim": dim,
    }
    emit(f"{'converged' if converged else 'stopped'} after {res.nit} iterations in {res.time:.2f}s")
    emit(f"final test relative error: {result['test_error']:.1e}")
    return result
