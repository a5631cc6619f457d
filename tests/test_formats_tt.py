import math

import pytest
import torch
from reference import tt_full

from lowrankopt import TensorTrain, TTMatrix

DT = torch.float64


@pytest.fixture
def g():
    return torch.Generator().manual_seed(0)


def unfolding_tail(A: torch.Tensor, k: int, r: int) -> float:
    """Best rank-r approximation error of the k-th unfolding (dense SVD)."""
    s = torch.linalg.svdvals(A.reshape(math.prod(A.shape[:k]), -1))
    return float(s[r:].norm())


def random_tt(shape, ranks, g):
    return TensorTrain.random(shape, ranks, generator=g)


def test_full_and_gather_match_reference(g):
    x = random_tt([3, 4, 2, 5], [2, 3, 2], g)
    F = tt_full(x.cores)
    assert torch.allclose(x.full(), F, atol=1e-14)
    idx = torch.stack([torch.randint(0, n, (50,), generator=g) for n in x.shape], 1)
    assert torch.allclose(x.gather(idx), F[tuple(idx.T)], atol=1e-14)
    assert x.gather(idx[:0]).shape == (0,)


def test_gather_is_differentiable_in_the_cores(g):
    x = random_tt([3, 4, 5], [2, 3], g)
    cores = [c.clone().requires_grad_(True) for c in x.cores]
    idx = torch.stack([torch.randint(0, n, (30,), generator=g) for n in x.shape], 1)
    w = torch.randn(30, dtype=DT, generator=g)
    grads = torch.autograd.grad((TensorTrain(cores).gather(idx) * w).sum(), cores)
    ref = torch.autograd.grad((tt_full(cores)[tuple(idx.T)] * w).sum(), cores)
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, atol=1e-13)


def test_linear_algebra_matches_dense(g):
    x, y = random_tt([3, 4, 2, 3], [2, 3, 2], g), random_tt([3, 4, 2, 3], [3, 2, 2], g)
    X, Y = tt_full(x.cores), tt_full(y.cores)
    assert torch.isclose(x.inner(y), (X * Y).sum(), rtol=1e-12)
    assert torch.isclose(x.inner(Y), (X * Y).sum(), rtol=1e-12)
    assert torch.isclose(x.norm(), X.norm(), rtol=1e-12)
    assert torch.allclose((x + y).full(), X + Y, atol=1e-13)
    assert torch.allclose((x - y).full(), X - Y, atol=1e-13)
    assert torch.allclose((x * y).full(), X * Y, atol=1e-13)
    assert (x * y).ranks == (6, 6, 4)
    assert torch.allclose((3.0 * x).full(), 3 * X) and torch.allclose((x / 2).full(), X / 2)
    assert torch.allclose((-x).full(), -X)


def test_one_dimensional_tt(g):
    x, y = random_tt([5], [], g), random_tt([5], [], g)
    assert x.ranks == ()
    assert torch.allclose((x + y).full(), x.full() + y.full())


def test_orthogonalize(g):
    x = random_tt([3, 4, 2, 3], [2, 3, 2], g)
    X = tt_full(x.cores)
    left = x.orthogonalize("left")
    right = x.orthogonalize("right")
    assert torch.allclose(left.full(), X, atol=1e-13) and torch.allclose(right.full(), X, atol=1e-13)
    for c in left.cores[:-1]:
        L = c.reshape(-1, c.shape[2])
        assert torch.allclose(L.T @ L, torch.eye(L.shape[1], dtype=DT), atol=1e-13)
    for c in right.cores[1:]:
        R = c.reshape(c.shape[0], -1)
        assert torch.allclose(R @ R.T, torch.eye(R.shape[0], dtype=DT), atol=1e-13)
    with pytest.raises(ValueError, match="direction"):
        x.orthogonalize("up")


def test_tt_svd_meets_its_error_bounds(g):
    A = torch.randn(4, 5, 3, 4, dtype=DT, generator=g)
    assert torch.allclose(TensorTrain.from_dense(A).full(), A, atol=1e-13)  # exact without truncation
    for eps in (0.5, 0.2, 0.05):
        x = TensorTrain.from_dense(A, eps=eps)
        assert torch.linalg.vector_norm(A - x.full()) <= eps * torch.linalg.vector_norm(A) * (1 + 1e-12)
    r = [2, 3, 2]
    x = TensorTrain.from_dense(A, max_rank=r)
    assert list(x.ranks) == r
    bound = math.sqrt(sum(unfolding_tail(A, k + 1, rk) ** 2 for k, rk in enumerate(r)))
    assert float(torch.linalg.vector_norm(A - x.full())) <= bound * (1 + 1e-10)
    assert float(torch.linalg.vector_norm(A - x.full())) >= max(
        unfolding_tail(A, k + 1, rk) for k, rk in enumerate(r)
    ) * (1 - 1e-10)


def test_round_meets_its_error_bounds(g):
    x = random_tt([3, 4, 3, 4], [3, 4, 3], g) + random_tt([3, 4, 3, 4], [2, 2, 2], g)
    X = tt_full(x.cores)
    exact = x.round(eps=1e-13)
    assert torch.allclose(exact.full(), X, atol=1e-12) and max(exact.ranks) <= 6
    for eps in (0.3, 0.1):
        y = x.round(eps=eps)
        assert torch.linalg.vector_norm(X - y.full()) <= eps * torch.linalg.vector_norm(X) * (1 + 1e-12)
    r = [2, 3, 2]
    y = x.round(max_rank=r)
    assert list(y.ranks) == r
    bound = math.sqrt(sum(unfolding_tail(X, k + 1, rk) ** 2 for k, rk in enumerate(r)))
    assert float(torch.linalg.vector_norm(X - y.full())) <= bound * (1 + 1e-10)
    with pytest.raises(ValueError, match="give max_rank"):
        x.round()


def test_ttmatrix(g):
    A = TTMatrix.random([2, 3, 2], [3, 2, 4], [2, 3], generator=g)
    D = A.full()
    assert D.shape == (12, 24) and A.shape == (12, 24)
    # full() against an independent contraction of the operator cores
    ref = A.cores[0]
    for c in A.cores[1:]:
        ref = torch.tensordot(ref, c, dims=([ref.dim() - 1], [0]))
    ref = ref.squeeze(0).squeeze(-1).permute(0, 2, 4, 1, 3, 5).reshape(12, 24)
    assert torch.allclose(D, ref, atol=1e-13)
    X = torch.randn(7, 24, dtype=DT, generator=g)
    assert torch.allclose(A.matvec(X), X @ D.T, atol=1e-13)
    z = random_tt([3, 2, 4], [2, 2], g)
    assert torch.allclose((A @ z).full().reshape(-1), D @ tt_full(z.cores).reshape(-1), atol=1e-13)
    B = TTMatrix.from_dense(D, [2, 3, 2], [3, 2, 4])
    assert torch.allclose(B.full(), D, atol=1e-12)
    C = TTMatrix.from_dense(D, [2, 3, 2], [3, 2, 4], eps=0.3)
    assert torch.linalg.matrix_norm(C.full() - D) <= 0.3 * torch.linalg.matrix_norm(D) * (1 + 1e-12)
    with pytest.raises(ValueError, match="X must have shape"):
        A.matvec(torch.randn(2, 12, dtype=DT))


def test_float32(g):
    x = TensorTrain.random([3, 4, 5], [2, 3], dtype=torch.float32, generator=g)
    assert x.dtype == torch.float32 and x.full().dtype == torch.float32
    x64 = x.to(torch.float64)
    assert torch.allclose(x.norm().double(), x64.norm(), rtol=1e-5)


def test_bad_input_raises(g):
    with pytest.raises(ValueError, match="right rank"):
        TensorTrain([torch.randn(1, 3, 2, dtype=DT), torch.randn(3, 3, 1, dtype=DT)])
    with pytest.raises(ValueError, match=r"cores\[0\] must have shape"):
        TensorTrain([torch.randn(2, 3, 1, dtype=DT)])
    with pytest.raises(ValueError, match=r"cores\[1\] contains NaN"):
        TensorTrain([torch.randn(1, 3, 2, dtype=DT), torch.full((2, 3, 1), float("inf"), dtype=DT)])
    with pytest.raises(TypeError, match="mix dtypes"):
        TensorTrain([torch.randn(1, 3, 2, dtype=DT), torch.randn(2, 3, 1)])
    x = random_tt([3, 4], [2], g)
    with pytest.raises(ValueError, match="index must have shape"):
        x.gather(torch.zeros(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the shape"):
        x.gather(torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="shape mismatch"):
        x + random_tt([4, 3], [2], g)
    with pytest.raises(ValueError, match="max_rank"):
        TensorTrain.from_dense(torch.randn(3, 4, dtype=DT), max_rank=[1, 2])
    with pytest.raises(ValueError, match="eps"):
        TensorTrain.from_dense(torch.randn(3, 4, dtype=DT), eps=-1.0)


def test_tune_cpu_allocator_validates_its_argument():
    from lowrankopt import tune_cpu_allocator

    with pytest.raises(ValueError, match="cache_bytes"):
        tune_cpu_allocator(0)
    assert isinstance(tune_cpu_allocator(), bool)
