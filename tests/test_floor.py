"""Runs that end at the floating-point floor: converged ones are reported as converged, on any rounding.

The reported defect: ``complete()`` on rank-5 data with 1e-3 noise returned ``success=False`` ("line search
failed") at an error already at the noise level, depending on which BLAS kernel rounded. Every problem here is
solved under several roundings of the same problem — the data scaled by a factor that is not a power of two (every
product and sum then rounds differently; the solution scales exactly) and the observed entries in another order —
and the status must be a converged one every time, at the same answer to the precision the noise allows.
"""

import pytest
import torch

import lowrankopt as lro

CONVERGED = {0, 4, 6}  # gtol, the callback (complete's tol), the floating-point floor — as documented


def noisy_matrix(dtype, seed=0, shape=(120, 100), rank=5, frac=0.3, noise=1e-3):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    A = torch.randn(m, rank, dtype=torch.float64, generator=g) @ torch.randn(rank, n, dtype=torch.float64, generator=g)
    idx = lro.sample_indices(shape, int(frac * m * n), generator=g)
    eps = noise * torch.randn(len(idx), dtype=torch.float64, generator=g)
    vals = A[idx[:, 0], idx[:, 1]] + eps
    return idx, vals.to(dtype), A, float(torch.linalg.vector_norm(eps) / torch.linalg.vector_norm(vals))


def noisy_tt(seed=0, shape=(6, 6, 6, 6), rank=2, count=700, noise=1e-3):
    g = torch.Generator().manual_seed(seed)
    A = lro.FixedTTRank(list(shape), rank).random_point(generator=g, dtype=torch.float64)
    idx = lro.sample_indices(list(shape), count, generator=g)
    eps = noise * torch.randn(count, dtype=torch.float64, generator=g)
    vals = A.gather(idx) + eps
    return idx, vals, A, float(torch.linalg.vector_norm(eps) / torch.linalg.vector_norm(vals))


SCALES = (1.0, 3.0, 1 / 7)


def rounded_differently(idx, vals, k):
    """The k-th rounding of one problem: entries permuted, values scaled by ``SCALES[k]`` (undo with 1/scale)."""
    perm = torch.randperm(len(vals), generator=torch.Generator().manual_seed(100 + k))
    return idx[perm], vals[perm] * SCALES[k], SCALES[k]


@pytest.mark.parametrize("method", ["cg", "sd", "trust-region"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_noisy_matrix_completion_converges_on_every_rounding(method, dtype):
    idx, vals, A, noise_level = noisy_matrix(dtype)
    xs = []
    fits = []
    for k in range(len(SCALES)):
        i, v, scale = rounded_differently(idx, vals, k)
        res = lro.complete(i, v, A.shape, 5, method=method, generator=torch.Generator().manual_seed(1))
        assert res.success and res.status in CONVERGED, (k, res.status, res.message)
        # The truth is feasible, so a minimizer fits the data at least as well as the truth does; X is A up to
        # the noise (and to float32 rounding).
        assert res.train_error <= noise_level * (1 + 1e-6 if dtype == torch.float64 else 1.01)
        X = res.x.full().double() / scale
        err = float(torch.linalg.vector_norm(X - A) / torch.linalg.vector_norm(A))
        assert err < 20 * noise_level
        xs.append(X)
        fits.append(res.fun / scale**2)
    assert len(set(fits)) == len(fits)  # the roundings really differ (f is not bit-identical up to the scale)
    tol = 1e-8 if dtype == torch.float64 else 1e-3
    assert all(float(torch.linalg.vector_norm(x - xs[0]) / torch.linalg.vector_norm(xs[0])) < tol for x in xs)


@pytest.mark.parametrize("method", ["cg", "trust-region"])
def test_noisy_tt_completion_converges_on_every_rounding(method):
    idx, vals, A, noise_level = noisy_tt()
    for k in range(len(SCALES)):
        i, v, _ = rounded_differently(idx, vals, k)
        res = lro.complete(i, v, A.shape, 2, method=method, generator=torch.Generator().manual_seed(1))
        assert res.success and res.status in CONVERGED, (k, res.status, res.message)
        assert res.train_error <= noise_level * (1 + 1e-6)
