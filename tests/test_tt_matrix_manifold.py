"""The manifold of TT-matrices: what is particular to it (its geometry and autodiff are checked with the other
manifolds in test_manifolds.py and test_autodiff.py, against dense references there): the packed layout shared with
TT, TTLinear's weight as a point of it trained through the generic geoopt bridge, the rank-r product node on the
linearization, optimization end to end, and bad input."""

import geoopt
import pytest
import torch
from reference import rel, tt_matrix_full

from lowrankopt import (
    FixedTTMatrixRank,
    FixedTTRank,
    TensorTrain,
    TTMatrix,
    manifold_of,
    minimize,
    riemannian_grad,
)
from lowrankopt.formats.delta_tt_matrix import DeltaTTMatrix
from lowrankopt.manifolds.geoopt import GeooptFixedTTMatrixRank, GeooptFixedTTRank
from lowrankopt.nn import TTLinear

DT = torch.float64
ROWS, COLS, RANKS = (2, 3, 2), (3, 2, 2), (3, 4)


@pytest.fixture
def g():
    return torch.Generator().manual_seed(5)


def test_is_the_tt_manifold_of_the_merged_modes(g):
    """Same dimension, coordinates and packed layout as FixedTTRank of shape (m_k n_k); the dense matrix of a point
    is the permuted dense merged tensor."""
    M = FixedTTMatrixRank(ROWS, COLS, RANKS)
    T = FixedTTRank([m * n for m, n in zip(ROWS, COLS)], RANKS)
    assert M.dim == T.dim and M.coord_shapes == T.coord_shapes
    assert manifold_of(M.random_point(generator=g, dtype=DT)) == M
    x = TTMatrix.random(ROWS, COLS, list(RANKS), generator=g, dtype=DT)
    assert torch.equal(M.pack_point(x), T.pack_point(x.merged()))
    assert rel(x.full(), tt_matrix_full(x.cores)) < 1e-14
    assert GeooptFixedTTMatrixRank(ROWS, COLS, RANKS).numel == GeooptFixedTTRank(T.shape, RANKS).numel
    v = M.random_tangent(x, generator=g)
    assert rel(M.to_ambient(x, v).full(), tt_matrix_full(M.to_ambient(x, v).cores)) < 1e-14


def test_matvec_on_the_linearization_runs_at_rank_r(g):
    """The gradient of a matvec loss goes through the δ-product node: the rank-2r block cores are never built, and
    the gradient equals the one through them (the straight-through materialized object)."""
    M = FixedTTMatrixRank(ROWS, COLS, RANKS)
    x = M.random_point(generator=g, dtype=DT)
    X, Y = torch.randn(7, 12, dtype=DT, generator=g), torch.randn(7, 12, dtype=DT, generator=g)
    seen = []

    def f(W):
        seen.append(W)
        return 0.5 * ((W.matvec(X) - Y) ** 2).sum()

    _, grad = riemannian_grad(f, x)
    (W,) = seen
    assert isinstance(W, DeltaTTMatrix) and W.delta._cores is None  # never materialized
    deltas = M.zero_deltas(x, requires_grad=True)
    loss = 0.5 * ((M.linearization(x, deltas).materialize().matvec(X) - Y) ** 2).sum()
    ref = M.gauge(x, torch.autograd.grad(loss, deltas))
    assert rel(M.join(grad.coords), M.join(ref)) < 1e-13  # (δ_3 = 0: V_3 is square, the gauge leaves nothing)


def test_tt_linear_weight_is_a_point_and_trains_with_geoopt(g):
    """TTLinear's weight lives on GeooptFixedTTMatrixRank (the generic bridge); its .grad is the Riemannian gradient
    of the loss as a function of the weight; RiemannianAdam lowers the loss and keeps the weight on the manifold."""
    layer = TTLinear(12, 12, 3, in_factors=COLS, out_factors=ROWS, dtype=DT, generator=g)
    M = layer.manifold
    assert isinstance(M, GeooptFixedTTMatrixRank) and isinstance(M.base, FixedTTMatrixRank)
    W = layer.weight_matrix()
    M.base.check_point(W)
    X = torch.randn(16, 12, dtype=DT, generator=g)
    T = torch.randn(16, 12, dtype=DT, generator=g)
    loss = ((layer(X) - T) ** 2).mean()
    loss.backward()
    _, grad = riemannian_grad(lambda A: ((A.matvec(X) + layer.bias.detach() - T) ** 2).mean(), W)
    assert rel(M.egrad2rgrad(layer.weight.detach(), layer.weight.grad), M.pack_tangent(grad)) < 1e-12
    opt = geoopt.optim.RiemannianAdam(layer.parameters(), lr=1e-2)
    first = float(loss.detach())
    for _ in range(30):
        opt.zero_grad()
        loss = ((layer(X) - T) ** 2).mean()
        loss.backward()
        opt.step()
    assert float(loss) < 0.8 * first
    ok, reason = M._check_point_on_manifold(layer.weight.detach())
    assert ok, reason
    assert layer.weight_matrix().ranks == M.ranks


def test_minimize_recovers_a_planted_operator_from_products(g):
    """The least-squares fit of A from products A b_i (fewer than A's entries) recovers a planted TT-matrix."""
    M = FixedTTMatrixRank((2, 2, 2), (2, 2, 2), (2, 2))
    A = M.random_point(generator=g, dtype=DT)
    B = torch.randn(5, 8, dtype=DT, generator=g)  # 40 products' entries, 64 entries of A, dim M = 28
    C = A.matvec(B)
    x0 = M.random_point(generator=torch.Generator().manual_seed(11), dtype=DT)
    res = minimize(lambda W: 0.5 * ((W.matvec(B) - C) ** 2).sum(), x0, gtol=1e-12, max_iter=200)
    assert res.success
    assert rel(res.x.full(), A.full()) < 1e-8


def test_bad_input_names_the_argument(g):
    with pytest.raises(ValueError, match="one entry per mode"):
        FixedTTMatrixRank((2, 3), (2, 3, 2), 2)
    with pytest.raises(ValueError, match=r"ranks\[0\] = 5 is not attainable"):
        FixedTTMatrixRank((2, 1), (2, 3), 5)
    with pytest.raises(ValueError, match="positive int"):
        FixedTTMatrixRank((2, 0), (2, 3), 1)
    M = FixedTTMatrixRank(ROWS, COLS, RANKS)
    with pytest.raises(TypeError, match="x must be a TTMatrix"):
        M.random_tangent(TensorTrain.random((6, 6, 4), 2, generator=g))
    other = TTMatrix.random((3, 2, 2), (2, 3, 2), list(RANKS), generator=g, dtype=DT)  # same (M, N), other modes
    with pytest.raises(ValueError, match=r"x has row_shape \(3, 2, 2\).*manifold's modes"):
        M.zero_tangent(other)
    with pytest.raises(ValueError, match="TT-ranks"):
        M.zero_tangent(TTMatrix.random(ROWS, COLS, 2, generator=g, dtype=DT))
    x = M.random_point(generator=g, dtype=DT)
    with pytest.raises(ValueError, match="mode mismatch"):
        M.proj(x, other)  # a TT-matrix of the ambient shape but other modes
    with pytest.raises(ValueError, match="mode mismatch"):
        x.inner(other)
    with pytest.raises(ValueError, match="z must have shape"):
        M.proj(x, torch.zeros(12, 11, dtype=DT))
    with pytest.raises(ValueError, match=r"X must have shape \(B, 12\)"):
        riemannian_grad(lambda W: W.matvec(torch.zeros(3, 11, dtype=DT)).sum(), x)
    with pytest.raises(TypeError, match="tt must be a TensorTrain"):
        TTMatrix.from_merged(x, ROWS, COLS)
    with pytest.raises(ValueError, match="not merged from"):
        TTMatrix.from_merged(TensorTrain.random((6, 6, 3), 2, generator=g), ROWS, COLS)


def test_two_mode_splits_of_one_merged_train_have_their_own_operator_forms(g):
    """Review: the product node's operator cores were cached on the merged TT, which two TT-matrices of different
    mode splits can share: the second got the first's cores (gradient off by 3e-2). Each is checked against the
    gradient through the materialized block cores."""
    Ma, Mb = FixedTTMatrixRank((2, 3), (3, 2), 3), FixedTTMatrixRank((3, 2), (2, 3), 3)
    xa = Ma.random_point(generator=g, dtype=DT)
    xb = TTMatrix.from_merged(xa.merged(), (3, 2), (2, 3))
    X = torch.randn(4, 6, dtype=DT, generator=g)
    for M, x in ((Ma, xa), (Mb, xb)):
        _, grad = riemannian_grad(lambda W: (W.matvec(X) ** 2).sum(), x)
        deltas = M.zero_deltas(x, requires_grad=True)
        loss = (M.linearization(x, deltas).materialize().matvec(X) ** 2).sum()
        ref = M.gauge(x, torch.autograd.grad(loss, deltas))
        assert rel(M.join(grad.coords), M.join(ref)) < 1e-13
