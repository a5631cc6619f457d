"""Demo: tensor-train completion by Riemannian conjugate gradients on :class:`FixedTTRank`.

The ground truth ``A`` is a random nonnegative tensor of TT-rank r and shape ``n^d`` (i.i.d. uniform
cores), observed on a random set Ω of entries. We minimize ``f(X) = ½ ‖P_Ω(X − A)‖²`` over TT-rank-r
tensors with Polak–Ribière+ nonlinear CG (vector transport by projection, exact step size for the
linearized quadratic loss) and report the relative error on held-out entries.

Initialization matters for d ≫ 2: a random rank-r point is almost orthogonal to A and to its tangent
space, so the first gradients are dominated by sampling noise and CG stalls. We start instead from the
best constant tensor (the mean of the observed entries, TT-rank 1) and use rank continuation: a few CG
iterations at TT-rank 1, 2, ..., r − 1, each stage grown by a tiny random rank-1 term, then CG at TT-rank
r until the training residual reaches the tolerance.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from .autodiff import riemannian_grad
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


def _sample_indices(shape: list[int], count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` uniformly random multi-indices, shape ``(count, len(shape))``, int64."""
    return torch.stack([torch.randint(0, n, (count,), generator=generator) for n in shape], dim=1)


def _grow_rank(x: TensorTrain, generator: torch.Generator, eps: float = 1e-4) -> TensorTrain:
    """``x`` plus a random rank-1 TT of relative norm ``eps``: nearly the same tensor, TT-ranks + 1."""
    z = TensorTrain.random(x.shape, 1, dtype=torch.float64, generator=generator).to(x.dtype)
    return x + z * (eps * x.norm() / z.norm())


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
    truth = _random_truth(shape, rank, dtype, g)
    idx, test_idx = _sample_indices(shape, samples, g), _sample_indices(shape, test_samples, g)
    vals, test_vals = truth.gather(idx), truth.gather(test_idx)
    vals_norm, test_norm = torch.linalg.vector_norm(vals), torch.linalg.vector_norm(test_vals)

    def loss(Y: TensorTrain) -> torch.Tensor:
        return 0.5 * ((Y.gather(idx) - vals) ** 2).sum()

    def test_error(Y: TensorTrain) -> float:
        return float(torch.linalg.vector_norm(Y.gather(test_idx) - test_vals) / test_norm)

    emit(
        f"TT completion: shape {n}^{d}, TT-rank {rank}, manifold dim {dim}, {samples} training / "
        f"{test_samples} test entries, {str(dtype).removeprefix('torch.')}, seed {seed}"
    )
    start = time.perf_counter()
    x = TensorTrain([torch.ones(1, n, 1, dtype=dtype) for _ in range(d)]) * vals.mean()
    it, converged, train_err = 0, False, float("nan")
    for r in range(1, rank + 1):
        if r > 1:
            x = _grow_rank(x, g)
        M = FixedTTRank(shape, r)
        budget = iters - it if r == rank else min(warmup_iters, iters - it)
        val, grad = riemannian_grad(loss, x, manifold=M)
        eta = -grad
        for step in range(budget + 1):
            train_err = float(torch.sqrt(2 * val) / vals_norm)
            grad_norm = float(grad.norm())
            converged = train_err < tol
            last = converged or step == budget or grad_norm == 0
            if it % print_every == 0 or (last and r == rank):
                emit(
                    f"iter {it:4d}  rank {r}  train {train_err:.3e}  test {test_error(x):.3e}  "
                    f"|grad| {grad_norm:.3e}  {time.perf_counter() - start:6.2f}s"
                )
            if last:
                break
            # Exact minimizer of the quadratic loss along the line x + α η (before retraction).
            alpha = -grad.inner(eta) / (eta.to_ambient().gather(idx) ** 2).sum()
            x_new = M.retr(x, eta * alpha)
            val, grad_new = riemannian_grad(loss, x_new, manifold=M)
            # Polak–Ribière+, transport by projection; <g_new, P_new g_old> = <g_new, g_old> in ambient space.
            cross = grad_new.to_ambient().inner(grad.to_ambient())
            beta = torch.clamp((grad_new.inner(grad_new) - cross) / grad.inner(grad), min=0)
            eta = -grad_new + M.transp(x, x_new, eta) * beta
            if float(grad_new.inner(eta)) >= 0:  # not a descent direction: restart with steepest descent
                eta = -grad_new
            x, grad = x_new, grad_new
            it += 1
        if converged:
            break
    elapsed = time.perf_counter() - start
    result = {
        "train_error": train_err,
        "test_error": test_error(x),
        "iterations": it,
        "converged": converged,
        "time": elapsed,
        "samples": samples,
        "dim": dim,
    }
    emit(f"{'converged' if converged else 'stopped'} after {it} iterations in {elapsed:.2f}s")
    emit(f"final test relative error: {result['test_error']:.1e}")
    return result
