import pytest
import torch

from lowrankopt import LowRankMatrix

DT = torch.float64


@pytest.fixture
def g():
    return torch.Generator().manual_seed(0)


def test_from_dense_is_best_approximation(g):
    A = torch.randn(9, 7, dtype=DT, generator=g)
    X = LowRankMatrix.from_dense(A, 3)
    s = torch.linalg.svdvals(A)
    # Eckart–Young: the error is the tail of the singular values
    assert torch.isclose(torch.linalg.matrix_norm(A - X.full()), s[3:].norm(), rtol=1e-12)
    assert torch.allclose(X.U.T @ X.U, torch.eye(3, dtype=DT), atol=1e-13)
    assert torch.allclose(X.V.T @ X.V, torch.eye(3, dtype=DT), atol=1e-13)


def test_random_has_exact_rank_and_is_reproducible():
    X1 = LowRankMatrix.random(8, 6, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    X2 = LowRankMatrix.random(8, 6, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(X1.full(), X2.full())
    assert torch.linalg.matrix_rank(X1.full()) == 3
    assert X1.shape == (8, 6) and X1.rank == 3


def test_operations_match_dense(g):
    X = LowRankMatrix(
        torch.randn(8, 3, dtype=DT, generator=g),
        torch.randn(3, 3, dtype=DT, generator=g),
        torch.randn(6, 3, dtype=DT, generator=g),
    )
    Y = LowRankMatrix(
        torch.randn(8, 2, dtype=DT, generator=g),
        torch.randn(2, dtype=DT, generator=g),
        torch.randn(6, 2, dtype=DT, generator=g),
    )
    Xd, Yd = X.full(), Y.full()
    assert torch.allclose(Xd, X.U @ X.S @ X.V.T)
    rows, cols = torch.randint(0, 8, (20,), generator=g), torch.randint(0, 6, (20,), generator=g)
    assert torch.allclose(X.gather(rows, cols), Xd[rows, cols], atol=1e-14)
    B, v = torch.randn(6, 4, dtype=DT, generator=g), torch.randn(6, dtype=DT, generator=g)
    C, w = torch.randn(5, 8, dtype=DT, generator=g), torch.randn(8, dtype=DT, generator=g)
    assert torch.allclose(X @ B, Xd @ B, atol=1e-13) and torch.allclose(X @ v, Xd @ v, atol=1e-13)
    assert torch.allclose(C @ X, C @ Xd, atol=1e-13) and torch.allclose(w @ X, w @ Xd, atol=1e-13)
    assert torch.isclose(X.inner(Y), (Xd * Yd).sum(), rtol=1e-12)
    assert torch.isclose(X.inner(Yd), (Xd * Yd).sum(), rtol=1e-12)
    assert torch.isclose(X.norm(), torch.linalg.matrix_norm(Xd), rtol=1e-12)
    assert torch.allclose((X + Y).full(), Xd + Yd, atol=1e-13)
    assert torch.allclose((X - Y).full(), Xd - Yd, atol=1e-13)
    assert torch.allclose((2.5 * X).full(), 2.5 * Xd) and torch.allclose((X / 4).full(), Xd / 4)
    assert torch.allclose(X.T.full(), Xd.T)
    assert (X + Y).rank == 5


def test_to_changes_dtype(g):
    X = LowRankMatrix.random(5, 4, 2, generator=g, dtype=torch.float64)
    assert X.to(torch.float32).dtype == torch.float32
    assert torch.allclose(X.to(torch.float32).full().double(), X.full(), atol=1e-6)


def test_bad_input_raises(g):
    U, S, V = torch.randn(5, 2, dtype=DT), torch.eye(2, dtype=DT), torch.randn(4, 2, dtype=DT)
    with pytest.raises(ValueError, match="S must have shape"):
        LowRankMatrix(U, torch.eye(3, dtype=DT), V)
    with pytest.raises(ValueError, match="U contains NaN"):
        LowRankMatrix(U.clone().fill_(float("nan")), S, V)
    with pytest.raises(TypeError, match="U must be float32 or float64"):
        LowRankMatrix(U.long(), S, V)
    with pytest.raises(TypeError, match="mix dtypes"):
        LowRankMatrix(U.float(), S, V)
    with pytest.raises(ValueError, match="rank must be"):
        LowRankMatrix.from_dense(torch.randn(3, 4, dtype=DT), 4)
    X = LowRankMatrix(U, S, V)
    with pytest.raises(ValueError, match="outside the shape"):
        X.gather(torch.tensor([5]), torch.tensor([0]))
    with pytest.raises(TypeError, match="integer"):
        X.gather(torch.tensor([0.0]), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="B must have shape"):
        X @ torch.randn(5, dtype=DT)
    with pytest.raises(ValueError, match="shape mismatch"):
        X + LowRankMatrix.random(4, 5, 2)
    with pytest.raises(ValueError, match="alpha must be finite"):
        X * float("inf")


def test_gather_takes_an_n_by_2_index_and_rows_cols_forward_to_it(g):
    X = LowRankMatrix.random(8, 6, 3, generator=g, dtype=torch.float64)
    Xd = X.U @ X.S @ X.V.T  # dense, from the factors
    index = torch.stack([torch.randint(0, 8, (30,), generator=g), torch.randint(0, 6, (30,), generator=g)], 1)
    want = Xd[index[:, 0], index[:, 1]]
    assert torch.allclose(X.gather(index), want, atol=1e-14)
    assert torch.equal(X.gather(index[:, 0], index[:, 1]), X.gather(index))  # one code path
    assert torch.equal(X.gather(index.int()), X.gather(index)) and torch.equal(
        X.gather(index.tolist()), X.gather(index)
    )
    assert X.gather([]).shape == (0,) and X.gather(index[:0]).shape == (0,)
    U = X.U.clone().requires_grad_(True)  # differentiable in the factors
    w = torch.randn(30, dtype=DT, generator=g)
    (grad,) = torch.autograd.grad((LowRankMatrix(U, X.S, X.V).gather(index) * w).sum(), U)
    (ref,) = torch.autograd.grad(((U @ X.S @ X.V.T)[index[:, 0], index[:, 1]] * w).sum(), U)
    assert torch.allclose(grad, ref, atol=1e-14)
    with pytest.raises(ValueError, match=r"index must have shape \(N, 2\)"):
        X.gather(index[:, 0])  # rows alone
    with pytest.raises(ValueError, match=r"index must have shape \(N, 2\)"):
        X.gather(torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="index has entries outside the shape"):
        X.gather(torch.tensor([[0, 6]]))
    with pytest.raises(TypeError, match="index must be an integer tensor"):
        X.gather(index.double())
