"""Demo: tensor-train completion by Riemannian conjugate gradients on :class:`FixedTTRank`.

A random ground-truth tensor ``A`` of TT-rank ``r`` and shape ``n^d`` is observed on a random set Ω of
entries; we minimize ``f(X) = ½ ‖P_Ω(X − A)‖²`` over TT-rank-r tensors with Polak–Ribière+ nonlinear
CG (vector transport by projection, exact step size for the linearized quadratic loss) and measure the
relative error on held-out entries.
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


def _sample_indices(shape: tuple[int, ...], count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` uniformly random multi-indices, shape ``(count, len(shape))``, int64."""
    cols = [torch.randint(0, n, (count,), generator=generator) for n in shape]
    return torch.stack(cols, dim=1)


def _grow_rank(x: TensorTrain, generator: torch.Generator, eps: float = 1e-4) -> TensorTrain:
    """``x`` plus a random rank-1 TT of relative norm ``eps``: the same tensor up to ``eps``, TT-ranks + 1."""
    z = TensorTrain.random(x.shape, 1, dtype=x.dtype, generator=generator)
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
    warmup_iters: int = 10,
    tol: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    print_every: int = 10,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Complete a random TT-rank-``rank`` tensor of shape ``(n,) * d`` from ``samples`` random entries.

    Rank continuation: CG runs ``warmup_iters`` iterations at TT-rank 1, 2, ..., ``rank − 1`` (each time
    the iterate is grown by a tiny random rank-1 term), then at TT-rank ``rank`` until convergence.

    Args:
        d, n, rank: order, mode size and (uniform) TT-rank of the ground truth and of the iterates.
        samples: number of observed (training) entries; ``None`` means ``oversampling × dim`` where
            ``dim`` is the dimension of the fixed-TT-rank manifold.
        oversampling: used when ``samples`` is ``None``.
        test_samples: number of held-out entries on which the test error is measured.
        iters: maximum total number of CG iterations.
        warmup_iters: CG iterations at each rank below ``rank`` (0: start at ``rank`` from a random point).
        tol: stop once the relative training residual ``‖P_Ω(X − A)‖ / ‖P_Ω A‖`` is below ``tol``
            (default ``1e-12`` for float64, ``1e-5`` for float32).
        seed: seed of the ``torch.Generator`` that draws the data, the sample sets and the initial point.
        dtype: ``torch.float64`` or ``torch.float32``.
        print_every: print a progress line every this many iterations.
        log: where progress lines go (``None``: silent).

    Returns:
        A dict with ``train_error`` and ``test_error`` (final relative errors), ``iterations``,
        ``converged`` (tolerance reached), ``time`` (seconds), ``samples`` and ``dim``.
    """
    if dtype not in _DEFAULT_TOL:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    tol = _DEFAULT_TOL[dtype] if tol is None else tol
    emit = log if log is not None else (lambda _msg: None)

    g = torch.Generator().manual_seed(seed)
    M = FixedTTRank([n] * d, [rank] * (d - 1))
    if samples is None:
        samples = math.ceil(oversampling * M.dim)
    truth = TensorTrain.random(M.shape, list(M.ranks), dtype=dtype, generator=g)
    idx = _sample_indices(M.shape, samples, g)
    test_idx = _sample_indices(M.shape, test_samples, g)
    vals, test_vals = truth.gather(idx), truth.gather(test_idx)
    vals_norm, test_norm = torch.linalg.vector_norm(vals), torch.linalg.vector_norm(test_vals)

    def loss(Y: TensorTrain) -> torch.Tensor:
        return 0.5 * ((Y.gather(idx) - vals) ** 2).sum()

    def test_error(Y: TensorTrain) -> float:
        return float(torch.linalg.vector_norm(Y.gather(test_idx) - test_vals) / test_norm)

    emit(
        f"TT completion: shape {n}^{d}, TT-rank {rank}, manifold dim {M.dim}, {samples} training / "
        f"{test_samples} test entries, {str(dtype).replace('torch.', '')}, seed {seed}"
    )
    start = time.perf_counter()
    # Initial point: random, scaled to the norm of A estimated from the samples.
    r0 = 1 if warmup_iters > 0 else rank
    x = FixedTTRank(M.shape, r0).random_point(dtype=dtype, generator=g)
    x = x * (vals_norm * math.sqrt(math.prod(M.shape) / samples))
    it, converged, train_err = 0, False, float("nan")
    for r in range(r0, rank + 1):
        if r > r0:
            x = _grow_rank(x, g)
        Mr = FixedTTRank(M.shape, r)
        budget = iters - it if r == rank else min(warmup_iters, iters - it)
        val, grad = riemannian_grad(loss, x, manifold=Mr)
        eta = -grad
        for step in range(budget + 1):
            train_err = float(torch.sqrt(2 * val) / vals_norm)
            converged = train_err < tol
            last = converged or step == budget
            if it % print_every == 0 or (last and r == rank):
                emit(
                    f"iter {it:4d}  rank {r}  train {train_err:.3e}  test {test_error(x):.3e}  "
                    f"|grad| {float(grad.norm()):.3e}  {time.perf_counter() - start:6.2f}s"
                )
            if last:
                break
            # Exact minimizer of the quadratic loss along the line x + α η (before retraction).
            alpha = -grad.inner(eta) / (eta.to_ambient().gather(idx) ** 2).sum()
            x_new = Mr.retr(x, eta * alpha)
            val, grad_new = riemannian_grad(loss, x_new, manifold=Mr)
            # Polak–Ribière+ with transport by projection; <g_new, P(g_old)> = <g_new, g_old> in the ambient space.
            cross = grad_new.to_ambient().inner(grad.to_ambient())
            beta = torch.clamp((grad_new.inner(grad_new) - cross) / grad.inner(grad), min=0)
            eta = -grad_new + Mr.transp(x, x_new, eta) * beta
            if float(grad_new.inner(eta)) >= 0:  # not a descent direction: restart
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
        "dim": M.dim,
    }
    emit(f"{'converged' if converged else 'stopped'} after {it} iterations in {elapsed:.2f}s")
    emit(f"final test relative error: {result['test_error']:.1e}")
    return result
