import math

import pytest
import torch
from reference import tt_full

from lowrankopt import TensorTrain, TTMatrix
from lowrankopt.formats import truncate_right_to_left, tt_svd
from lowrankopt.formats.tt import _svd_truncate_right_to_left, left_orthogonalize

DT = torch.float64


@pytest.fixture
def g():
    return torch.Generator().manual_seed(0)


def unfolding_tail(A: torch.Tensor, k: int, r: int) -> float:
    """Best rank-r approximation error of the k-th unfolding (dense SVD)."""
    s = torch.linalg.svdvals(A.reshape(math.prod(A.shape[:k]), -1))
    return float(s[r:].norm())


def random_tt(shape, ranks, g):
    return TensorTrain.random(shape, ranks, generator=g, dtype=torch.float64)


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
    A = TTMatrix.random([2, 3, 2], [3, 2, 4], [2, 3], generator=g, dtype=torch.float64)
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


@pytest.mark.parametrize(
    "rows,cols,ranks",
    [
        ([2, 3, 2], [3, 2, 4], [2, 3]),
        ([4, 2, 2], [2, 2, 4], [3, 4]),
        ([5], [7], []),
        ([3, 1, 2, 2], [2, 2, 1, 3], [2, 3, 4]),
    ],
)
@pytest.mark.parametrize("order", ["left", "right", "full", None])
@pytest.mark.parametrize("batch", [0, 1, 6])
def test_ttmatrix_matvec_orders_and_gradients(g, rows, cols, ranks, order, batch):
    A = TTMatrix.random(rows, cols, ranks, generator=g, dtype=DT)
    cores = [c.clone().requires_grad_() for c in A.cores]
    X = torch.randn(batch, A.shape[1], dtype=DT, generator=g, requires_grad=True)
    W = torch.randn(batch, A.shape[0], dtype=DT, generator=g)
    Y = TTMatrix(cores).matvec(X, order)
    # an independent reference: the dense operator by one einsum over the operator cores
    ref_cores = [c.detach().clone().requires_grad_() for c in A.cores]
    Xr = X.detach().clone().requires_grad_()
    letters = "abcdefgh"
    terms = [f"{letters[k]}{'ABCDEFG'[k]}{'OPQRSTU'[k]}{letters[k + 1]}" for k in range(len(rows))]
    spec = ",".join(terms) + "->" + "ABCDEFG"[: len(rows)] + "OPQRSTU"[: len(rows)]
    dense = torch.einsum(spec, *ref_cores).reshape(A.shape)
    ref = Xr @ dense.T
    assert Y.shape == (batch, A.shape[0])
    assert torch.allclose(Y, ref, atol=1e-12, rtol=0)
    (Y * W).sum().backward()
    (ref * W).sum().backward()
    assert torch.allclose(X.grad, Xr.grad, atol=1e-12, rtol=0)
    for c, rc in zip(cores, ref_cores, strict=True):
        assert torch.allclose(c.grad, rc.grad, atol=1e-11, rtol=0)


def test_ttmatrix_matvec_cost_model_picks_the_cheapest_order(g):
    A = TTMatrix.random([16, 8, 8], [8, 8, 16], [8, 8], generator=g)
    costs = {o: A.matvec_cost(256, o) for o in ("left", "right", "full")}
    assert costs == {"left": 335544320, "right": 100663296, "full": 8 * 16384 * 64 + 8 * 8 * 8192 + 256 * 1024 * 1024}
    with pytest.raises(ValueError, match="order"):
        A.matvec(torch.zeros(1, 1024), "middle")
    with pytest.raises(ValueError, match="order"):
        A.matvec_cost(1, "middle")


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


# ----------------------------------------------------------------------------------------------------- tt_svd


def _left_orthonormal(c, tol=1e-13):
    L = c.reshape(-1, c.shape[2])
    return torch.allclose(L.T @ L, torch.eye(L.shape[1], dtype=c.dtype), atol=tol)


def _right_orthonormal(c, tol=1e-13):
    R = c.reshape(c.shape[0], -1)
    return torch.allclose(R @ R.T, torch.eye(R.shape[0], dtype=c.dtype), atol=tol)


@pytest.mark.parametrize("center", [0, 1, 2, 3, -1, -3])
def test_tt_svd_is_mixed_canonical_at_every_center_and_meets_its_bounds(g, center):
    A = torch.randn(3, 4, 5, 2, dtype=DT, generator=g)
    c = center % 4
    cores = tt_svd(A, center=center)
    assert [k.shape[2] for k in cores[:-1]] == [3, 10, 2]  # the full unfolding ranks min(Π left, Π right)
    assert torch.allclose(tt_full(cores), A, atol=1e-13)
    assert all(_left_orthonormal(k) for k in cores[:c]) and all(_right_orthonormal(k) for k in cores[c + 1 :])
    assert float(torch.linalg.vector_norm(cores[c])) == pytest.approx(float(A.norm()), rel=1e-13)  # the norm
    for eps in (0.4, 0.1):
        X = tt_full(tt_svd(A, eps=eps, center=center))
        assert float((A - X).norm()) <= eps * float(A.norm()) * (1 + 1e-12)
    r = [2, 3, 2]
    cores = tt_svd(A, max_rank=r, center=center)
    assert [k.shape[2] for k in cores[:-1]] == r
    err = float((A - tt_full(cores)).norm())
    tails = [unfolding_tail(A, k + 1, rk) for k, rk in enumerate(r)]
    assert max(tails) * (1 - 1e-10) <= err <= math.sqrt(sum(t * t for t in tails)) * (1 + 1e-10)
    # the default center is the classical TT-SVD of TensorTrain.from_dense; left and right sweeps agree in value
    assert all(torch.equal(a, b) for a, b in zip(tt_svd(A, eps=0.1), TensorTrain.from_dense(A, eps=0.1).cores))


def test_tt_svd_exact_ranks_complete_with_orthonormal_vectors_and_zeros(g):
    # a rank-1 tensor: every unfolding has one nonzero singular value, and (4, 2) gives two singular vectors only
    a, b, c = (torch.randn(n, dtype=DT, generator=g) for n in (4, 3, 2))
    A = torch.einsum("i,j,k->ijk", a, b, c)
    assert [k.shape[2] for k in tt_svd(A, eps=1e-12)[:-1]] == [1, 1]  # truncated: rank 1
    for center, ranks in ((2, [3, 2]), (0, [2, 2]), (1, [4, 2])):
        cores = tt_svd(A, [ranks[0], ranks[1]], exact=True, center=center)
        assert [k.shape[2] for k in cores[:-1]] == ranks
        assert torch.allclose(tt_full(cores), A, atol=1e-13)  # the padding does not change the tensor
        assert all(_left_orthonormal(k) for k in cores[:center])
        assert all(_right_orthonormal(k) for k in cores[center + 1 :])
    # (4, 2): the first unfolding has two singular vectors; the rank-3 core is completed to orthonormal columns
    B = torch.randn(4, 2, dtype=DT, generator=g)
    first, last = tt_svd(B, 3, exact=True)
    assert first.shape == (1, 4, 3) and _left_orthonormal(first) and torch.allclose(tt_full([first, last]), B)
    assert torch.equal(last[2], torch.zeros_like(last[2]))  # the completion meets zero rows
    first, last = tt_svd(B.T.contiguous(), 3, exact=True, center=0)  # the mirror: right-orthonormal rows
    assert last.shape == (3, 4, 1) and _right_orthonormal(last) and torch.allclose(tt_full([first, last]), B.T)
    with pytest.raises(ValueError, match=r"max_rank\[0\] = 5 exceeds 4"):
        tt_svd(B, 5, exact=True)
    with pytest.raises(ValueError, match="exact=True needs max_rank"):
        tt_svd(B, exact=True)
    with pytest.raises(ValueError, match="exact=True needs max_rank"):
        tt_svd(B, 2, eps=0.1, exact=True)


def test_tt_svd_float32_gradients_and_bad_input(g):
    A = torch.randn(3, 4, 5, dtype=DT, generator=g)
    cores = tt_svd(A.float(), max_rank=2)
    assert all(c.dtype == torch.float32 for c in cores)
    assert float((tt_full(cores).double() - tt_full(tt_svd(A, max_rank=2))).norm()) < 1e-5 * float(A.norm())
    X = A.clone().requires_grad_(True)  # differentiable: at full rank the reconstruction is the identity map
    W = torch.randn(3, 4, 5, dtype=DT, generator=g)
    (grad,) = torch.autograd.grad((tt_full(tt_svd(X)) * W).sum(), X)
    assert torch.allclose(grad, W, atol=1e-10)
    with pytest.raises(TypeError, match="A must be a torch.Tensor"):
        tt_svd([[1.0, 2.0]])
    with pytest.raises(ValueError, match="A contains NaN"):
        tt_svd(torch.full((2, 2), math.nan, dtype=DT))
    with pytest.raises(ValueError, match="center must be an int in"):
        tt_svd(A, center=3)
    with pytest.raises(ValueError, match="max_rank"):
        tt_svd(A, max_rank=[2])
    with pytest.raises(ValueError, match="eps"):
        tt_svd(A, eps=math.inf)
    with pytest.raises(TypeError, match="exact must be a bool"):
        tt_svd(A, 2, exact=1)


def test_truncate_right_to_left_is_the_rounding_sweep(g):
    x = random_tt([3, 4, 3, 4], [3, 4, 3], g) + random_tt([3, 4, 3, 4], [2, 2, 2], g)
    X = tt_full(x.cores)
    left = left_orthogonalize(x.cores)
    before = [c.clone() for c in left]
    cores = truncate_right_to_left(left, [2, 3, 2])
    assert all(torch.equal(a, b) for a, b in zip(left, before))  # the input list and cores are not modified
    assert [c.shape[2] for c in cores[:-1]] == [2, 3, 2] and all(_right_orthonormal(c) for c in cores[1:])
    bound = math.sqrt(sum(unfolding_tail(X, k + 1, rk) ** 2 for k, rk in enumerate([2, 3, 2])))
    assert float((X - tt_full(cores)).norm()) <= bound * (1 + 1e-10)
    cores = truncate_right_to_left(left, eps=0.2)
    assert float((X - tt_full(cores)).norm()) <= 0.2 * float(X.norm()) * (1 + 1e-12)
    assert all(torch.equal(a, b) for a, b in zip(truncate_right_to_left(left, 2), x.round(max_rank=2).cores))
    assert _svd_truncate_right_to_left is truncate_right_to_left  # the former private name
    with pytest.raises(ValueError, match="give max_rank, eps or both"):
        truncate_right_to_left(left)
    with pytest.raises(ValueError, match="max_rank"):
        truncate_right_to_left(left, [2, 2])


def test_ttmatrix_gather_takes_row_column_pairs(g):
    A = TTMatrix.random([2, 3, 2], [3, 2, 4], [2, 3], generator=g, dtype=torch.float64)
    D = A.full()
    index = torch.stack([torch.randint(0, 12, (40,), generator=g), torch.randint(0, 24, (40,), generator=g)], 1)
    assert torch.allclose(A.gather(index), D[index[:, 0], index[:, 1]], atol=1e-13)
    assert torch.allclose(A.gather(index.int()), D[index[:, 0], index[:, 1]], atol=1e-13)
    assert A.gather([]).shape == (0,)
    with pytest.raises(ValueError, match=r"index must have shape \(N, 2\)"):
        A.gather(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="index has entries outside the shape"):
        A.gather(torch.tensor([[12, 0]]))
    with pytest.raises(TypeError, match="index must be an integer tensor"):
        A.gather(torch.zeros(3, 2))
