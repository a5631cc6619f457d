"""TensorRing against dense references written here (einsum of the cores with a traced ring index)."""

import math

import pytest
import torch

from lowrankopt import TensorRing, TensorTrain
from lowrankopt.formats import tr_full, tr_svd

D = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def dense(cores):
    """Σ over all bond indices of Π_k G_k[a_k, i_k, a_{k+1}] with a_{d+1} = a_1, by one einsum."""
    letters = "abcdefgh"
    modes = "ijklmnop"
    d = len(cores)
    terms = [letters[k] + modes[k] + letters[(k + 1) % d] for k in range(d)]
    return torch.einsum(",".join(terms) + "->" + modes[:d], *cores)


def _ring(shape, ranks, seed):
    g = _gen(seed)
    d = len(shape)
    return [torch.randn(ranks[k], shape[k], ranks[(k + 1) % d], dtype=D, generator=g) for k in range(d)]


@pytest.mark.parametrize("shape,ranks", [((4, 5, 3), (2, 3, 4)), ((3, 3, 4, 2), (3, 1, 2, 2)), ((6, 5), (3, 2))])
def test_full_gather_inner_norm_against_dense(shape, ranks):
    cores = _ring(shape, ranks, 0)
    X = TensorRing(cores)
    A = dense(cores)
    assert X.ranks == ranks and X.shape == shape
    assert torch.allclose(X.full(), A, rtol=1e-13, atol=1e-13)
    index = torch.stack([torch.randint(0, n, (50,), generator=_gen(1)) for n in shape], 1)
    assert torch.allclose(X.gather(index), A[tuple(index.T)], rtol=1e-13, atol=1e-13)
    Y = TensorRing(_ring(shape, tuple(reversed(ranks)), 2))
    B = dense(Y.cores)
    assert X.inner(Y).item() == pytest.approx((A * B).sum().item(), rel=1e-12)
    assert X.inner(B).item() == pytest.approx((A * B).sum().item(), rel=1e-12)
    assert X.norm().item() == pytest.approx(A.norm().item(), rel=1e-12)


def test_a_tensor_train_is_a_ring_of_rank_one_closure():
    T = TensorTrain.random((4, 3, 5), 2, generator=_gen(3), dtype=torch.float64)
    assert torch.allclose(TensorRing(T.cores).full(), T.full(), atol=1e-14)


def test_from_dense_recovers_a_ring_and_meets_its_accuracy():
    cores = _ring((4, 5, 6, 3), (2, 3, 2, 3), 4)
    A = dense(cores)
    X = TensorRing.from_dense(A)
    assert (X.full() - A).norm() / A.norm() < 1e-13
    # a full-rank random tensor: the error bound eps ‖A‖ holds and the ranks shrink as eps grows
    B = torch.randn(5, 6, 4, 5, dtype=D, generator=_gen(5))
    errors, sizes = [], []
    for eps in (0.05, 0.3, 0.6):
        Y = TensorRing.from_dense(B, eps=eps)
        errors.append(float((Y.full() - B).norm() / B.norm()))
        sizes.append(sum(c.numel() for c in Y.cores))
        assert errors[-1] <= eps * (1 + 1e-12)
    assert sizes == sorted(sizes, reverse=True)
    Z = TensorRing.from_dense(B, max_rank=3)
    assert max(Z.ranks) <= 3 and max(c.shape[2] for c in Z.cores) <= 3


def test_float32_and_bad_input():
    X = TensorRing.random((3, 4, 5), 3, dtype=torch.float32, generator=_gen(6))
    assert X.full().dtype == torch.float32
    assert X.norm().item() == pytest.approx(X.full().double().norm().item(), rel=1e-5)
    with pytest.raises(ValueError, match="ring closes"):
        TensorRing([torch.zeros(2, 3, 3, dtype=D), torch.zeros(3, 3, 4, dtype=D)])
    with pytest.raises(ValueError, match="NaN"):
        TensorRing([torch.full((2, 3, 2), math.nan, dtype=D)])
    with pytest.raises(ValueError, match="outside"):
        X.gather(torch.tensor([[3, 0, 0]]))
    with pytest.raises(ValueError, match="shapes differ"):
        X.inner(TensorRing.random((3, 4, 4), 2, dtype=torch.float32))
    with pytest.raises(ValueError, match="max_rank"):
        TensorRing.from_dense(torch.ones(2, 2, dtype=D), max_rank=0)


def test_tr_svd_is_from_dense_and_exact_in_two_dimensions():
    B = torch.randn(5, 6, 4, dtype=D, generator=_gen(7))
    assert all(torch.equal(a, b) for a, b in zip(tr_svd(B, eps=0.2), TensorRing.from_dense(B, eps=0.2).cores))
    M = torch.randn(6, 4, dtype=D, generator=_gen(8))  # d = 2: one split of the first unfolding, no TT-SVD steps
    cores = tr_svd(M)
    assert torch.allclose(dense(cores), M, atol=1e-13)
    assert cores[0].shape[0] == cores[1].shape[2] and cores[0].shape[0] * cores[0].shape[2] == 4
    Y = TensorRing.from_dense(M, max_rank=1)  # R = 1: the best rank-1 approximation (Eckart–Young)
    s = torch.linalg.svdvals(M)
    assert float((Y.full() - M).norm()) == pytest.approx(float(s[1:].norm()), rel=1e-12)


@pytest.mark.parametrize("shape,ranks", [((4, 5, 3), (2, 3, 4)), ((3, 2, 4, 2, 3), (2, 1, 3, 2, 2)), ((5,), (3,))])
def test_tr_full_of_a_batch_of_rings_and_its_gradient_against_dense(shape, ranks):
    g = _gen(9)
    d = len(shape)
    batch = (2, 3)
    cores = [
        torch.randn(*batch, ranks[k], shape[k], ranks[(k + 1) % d], dtype=D, generator=g).requires_grad_(True)
        for k in range(d)
    ]
    got = tr_full(cores)
    assert got.shape == (*batch, *shape)
    want = torch.stack([torch.stack([dense([c[i, j] for c in cores]) for j in range(3)]) for i in range(2)])
    assert torch.allclose(got, want, rtol=1e-13, atol=1e-13)
    W = torch.randn(got.shape, dtype=D, generator=g)
    grads = torch.autograd.grad((got * W).sum(), cores)
    refs = torch.autograd.grad((want * W).sum(), cores)
    for a, b in zip(grads, refs):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-13)
    X = TensorRing([c[1, 2].detach() for c in cores])  # TensorRing.full is the unbatched case
    assert torch.allclose(X.full(), want[1, 2], rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="cores must be a non-empty sequence"):
        tr_full([])
