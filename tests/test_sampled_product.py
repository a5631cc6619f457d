"""formats.sampled_product (G P as a CSR product, a plan per index tensor) and the δ-gather backward that uses it,
against dense references written here."""

import pytest
import torch
from reference import dense_grad, dense_hvp, matrix_projector, rel

from lowrankopt import FixedRankMatrices, riemannian_grad, riemannian_hvp
from lowrankopt.formats import sampled_product as sp

DT = torch.float64


def dense_sampled(index, g, shape):
    """G = Σ_k g_k e_{i_k} e_{j_k}ᵀ, duplicates summing, by a Python loop."""
    G = torch.zeros(shape, dtype=g.dtype)
    for k, (i, j) in enumerate(index.tolist()):
        G[i, j] += g[k]
    return G


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("axis", [0, 1])
def test_sampled_product_is_the_dense_product_with_duplicates_and_unsorted_indices(axis, dtype):
    gen = torch.Generator().manual_seed(0)
    shape = (7, 5)
    index = torch.tensor([[6, 4], [0, 0], [3, 1], [6, 4], [0, 3], [3, 1], [2, 0], [6, 2]])
    g = torch.randn(len(index), generator=gen, dtype=DT).to(dtype)
    P = torch.randn(shape[1 - axis], 3, generator=gen, dtype=DT).to(dtype)
    G = dense_sampled(index, g.double(), shape)
    G = G if axis == 0 else G.T
    out = sp.sampled_product(g, P, sp.plan_for(index, axis, shape))
    assert out.dtype == dtype and out.shape == (shape[axis], 3)
    assert rel(out.double(), G @ P.double()) < (1e-14 if dtype == DT else 1e-6)


def test_sampled_product_derivatives_to_second_order():
    gen = torch.Generator().manual_seed(1)
    index = torch.tensor([[1, 2], [0, 0], [1, 2], [3, 1]])
    P = torch.randn(3, 2, generator=gen, dtype=DT)
    plan = sp.plan_for(index, 0, (4, 3))
    g = torch.randn(4, generator=gen, dtype=DT, requires_grad=True)
    torch.autograd.gradcheck(lambda g: sp.sampled_product(g, P, plan), (g,))
    torch.autograd.gradgradcheck(lambda g: sp.sampled_product(g * g, P, plan), (g,))


def test_an_index_modified_in_place_gets_a_new_plan():
    gen = torch.Generator().manual_seed(2)
    shape = (4, 3)
    index = torch.tensor([[0, 1], [3, 2], [1, 0]])
    g = torch.randn(3, generator=gen, dtype=DT)
    P = torch.randn(3, 2, generator=gen, dtype=DT)
    first = sp.plan_for(index, 0, shape)
    assert sp.plan_for(index, 0, shape) is first  # kept while the tensor is unchanged
    index[0, 0] = 2  # in place
    assert sp.plan_for(index, 0, shape) is not first
    assert rel(sp.sampled_product(g, P, sp.plan_for(index, 0, shape)), dense_sampled(index, g, shape) @ P) < 1e-14
    stale = sp.plan_for(index, 1, shape)
    view = index[1:]
    view[0, 1] = 0  # through a view
    assert sp.plan_for(index, 1, shape) is not stale
    Q = torch.randn(4, 2, generator=gen, dtype=DT)
    assert rel(sp.sampled_product(g, Q, sp.plan_for(index, 1, shape)), dense_sampled(index, g, shape).T @ Q) < 1e-14
    empty = torch.zeros(0, 2, dtype=torch.int64)
    assert sp.sampled_product(g[:0], P, sp.plan_for(empty, 0, shape)).abs().sum() == 0


@pytest.mark.parametrize("curvature", [True, False])
def test_delta_gather_gradient_and_hvp_after_the_index_changes_in_place(curvature):
    """The δ-gather's backward (CSR products) gives the dense projected gradient and Hessian, also after the index
    tensor is modified in place between calls (a stale plan would give the old pattern's values)."""
    gen = torch.Generator().manual_seed(3)
    m, n, r, N = 8, 6, 2, 50
    M = FixedRankMatrices(m, n, r)
    x = M.random_point(generator=gen, dtype=DT)
    index = torch.stack([torch.randint(0, m, (N,), generator=gen), torch.randint(0, n, (N,), generator=gen)], 1)
    vals = torch.randn(N, generator=gen, dtype=DT)

    def f(X):
        return 0.5 * ((X.gather(index) - vals) ** 2).sum() + (X.gather(index) ** 4).sum()

    def f_dense(X):
        y = X[index[:, 0], index[:, 1]]
        return 0.5 * ((y - vals) ** 2).sum() + (y**4).sum()

    xi = M.random_tangent(x, generator=gen)
    X, Xi, P = x.full(), xi.to_ambient().full(), matrix_projector(x.full(), r)
    for _ in range(2):
        _, grad = riemannian_grad(f, x)
        assert rel(grad.to_ambient().full().reshape(-1), P @ dense_grad(f_dense, X).reshape(-1)) < 1e-12
        if not curvature:
            h = riemannian_hvp(f, x, xi, curvature=False)
            assert rel(h.to_ambient().full().reshape(-1), P @ dense_hvp(f_dense, X, Xi).reshape(-1)) < 1e-11
        else:  # the Riemannian Hessian P_x D(grad f)[ξ]: central differences of the dense projected gradient
            h = riemannian_hvp(f, x, xi)
            t = 1e-4
            ends = [M.retr(x, xi * s).full() for s in (t, -t)]
            rg = [matrix_projector(Y, r) @ dense_grad(f_dense, Y).reshape(-1) for Y in ends]
            assert rel(h.to_ambient().full().reshape(-1), P @ (rg[0] - rg[1]) / (2 * t)) < 1e-6
        index[::3, 0] = (index[::3, 0] + 1) % m  # in place, between calls
