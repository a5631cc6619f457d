"""The Tucker format and the manifold of fixed multilinear rank, against dense references written here (the
manifold's geometry and autodiff are also checked with the other manifolds in test_manifolds.py and
test_autodiff.py): HOSVD, entries and linear algebra of the format; Tucker completion and approximation solved to
their dense optimality conditions; the geoopt bridge; bad input."""

import math

import geoopt
import pytest
import torch
from reference import rel, tucker_full, tucker_projector

from lowrankopt import FixedTuckerRank, TensorTrain, Tucker, manifold_of, minimize, riemannian_grad, riemannian_hvp
from lowrankopt.manifolds.geoopt import GeooptManifold

DT = torch.float64


@pytest.fixture
def g():
    return torch.Generator().manual_seed(2)


def unfolding(A, k):
    return A.movedim(k, 0).reshape(A.shape[k], -1)


def planted(shape, ranks, g):
    """A random tensor of exact multilinear ranks (non-orthonormal factors)."""
    factors = [torch.randn(n, r, dtype=DT, generator=g) for n, r in zip(shape, ranks)]
    return Tucker(torch.randn(ranks, dtype=DT, generator=g), factors)


# ---------------------------------------------------------------------- the format
def test_from_dense_is_the_hosvd(g):
    """Orthonormal factors spanning the leading eigenvectors of A_(k) A_(k)ᵀ; the error within the HOSVD bound
    ``‖A − X‖² ≤ Σ_k Σ_{i > r_k} σ_i(A_(k))²``; exact for a tensor of those multilinear ranks."""
    A = torch.randn(5, 4, 6, dtype=DT, generator=g)
    ranks = (3, 2, 4)
    X = Tucker.from_dense(A, ranks)
    tail = 0.0
    for k, (U, r) in enumerate(zip(X.factors, ranks)):
        assert torch.allclose(U.T @ U, torch.eye(r, dtype=DT), atol=1e-13)
        w, V = torch.linalg.eigh(unfolding(A, k) @ unfolding(A, k).T)
        top = V[:, -r:]
        assert rel(U @ U.T, top @ top.T) < 1e-10
        tail += float(w[:-r].clamp_min(0).sum())
    assert float(((X.full() - A) ** 2).sum()) <= tail * (1 + 1e-12)
    B = planted((5, 4, 6), ranks, g).full()
    assert rel(Tucker.from_dense(B, ranks).full(), B) < 1e-12


def test_entries_and_linear_algebra_against_dense(g):
    X, Y = planted((4, 3, 5), (2, 3, 2), g), planted((4, 3, 5), (3, 1, 2), g)
    Xd, Yd = tucker_full([X.core, *X.factors]), tucker_full([Y.core, *Y.factors])
    assert rel(X.full(), Xd) < 1e-14
    idx = torch.stack([torch.randint(0, n, (30,), generator=g) for n in X.shape], 1)
    assert rel(X.gather(idx), Xd[tuple(idx.T)]) < 1e-14
    assert torch.isclose(X.inner(Y), (Xd * Yd).sum(), rtol=1e-13)
    assert torch.isclose(X.inner(Yd), (Xd * Yd).sum(), rtol=1e-13)
    assert torch.isclose(X.norm(), torch.linalg.vector_norm(Xd), rtol=1e-13)
    assert rel((X + Y).full(), Xd + Yd) < 1e-14 and (X + Y).ranks == (5, 4, 4)
    assert rel((X - 2.5 * Y).full(), Xd - 2.5 * Yd) < 1e-14
    assert rel((X / 4).full(), Xd / 4) < 1e-14
    Z = (X + X).round(X.ranks)  # a rank-(4, 6, 4) representation of a rank-(2, 3, 2) tensor
    assert Z.ranks == X.ranks and rel(Z.full(), 2 * Xd) < 1e-12
    assert rel(X.to(torch.float32).full().double(), Xd) < 1e-6


@pytest.mark.parametrize("N", [1, 7, 20, 60, 2000])  # tables over 0, 0, 1, 2, 3 modes
def test_gather_by_tables_and_by_rows_against_dense(N, g):
    """Every contraction order of tucker_entries (no table for few samples, tables over the first 1, 2, 3 modes as
    the samples grow) gives the dense entries, and the gradients of the dense reference."""
    shape, ranks = (5, 4, 6, 3), (2, 3, 2, 3)
    X = planted(shape, ranks, g)
    idx = torch.stack([torch.randint(0, n, (N,), generator=g) for n in shape], 1)
    w = torch.randn(N, dtype=DT, generator=g)
    core = X.core.clone().requires_grad_()
    factors = [U.clone().requires_grad_() for U in X.factors]
    (Tucker(core, factors).gather(idx) * w).sum().backward()
    core_d = X.core.clone().requires_grad_()
    factors_d = [U.clone().requires_grad_() for U in X.factors]
    dense = tucker_full([core_d, *factors_d])
    (dense[tuple(idx.T)] * w).sum().backward()
    assert rel(Tucker(core, factors).gather(idx), dense[tuple(idx.T)]) < 1e-13
    for a, b in zip([core, *factors], [core_d, *factors_d]):
        assert rel(a.grad, b.grad) < 1e-12


def test_format_bad_input(g):
    with pytest.raises(ValueError, match=r"factors\[1\] has 2 columns but the core's mode 1 has size 3"):
        Tucker(torch.zeros(2, 3, dtype=DT), [torch.zeros(4, 2, dtype=DT), torch.zeros(5, 2, dtype=DT)])
    with pytest.raises(ValueError, match="one matrix per mode"):
        Tucker(torch.zeros(2, 3, dtype=DT), [torch.zeros(4, 2, dtype=DT)])
    with pytest.raises(ValueError, match="core contains NaN"):
        Tucker(torch.full((2, 2), float("nan"), dtype=DT), [torch.zeros(3, 2, dtype=DT)] * 2)
    with pytest.raises(TypeError, match="mix dtypes"):
        Tucker(torch.zeros(2, 2), [torch.zeros(3, 2, dtype=DT)] * 2)
    with pytest.raises(ValueError, match=r"ranks\[1\] = 5 exceeds what mode 1 .* can have"):
        Tucker.from_dense(torch.zeros(3, 4, dtype=DT), (2, 5))
    with pytest.raises(ValueError, match=r"ranks\[0\] = 5 exceeds what mode 0 of a tensor of shape \(6, 2, 2\)"):
        Tucker.from_dense(torch.zeros(6, 2, 2, dtype=DT), (5, 2, 2))  # was: silently ranks (4, 2, 2)
    with pytest.raises(ValueError, match="3 positive ints"):
        Tucker.random((3, 4, 5), (2, 2), generator=g)
    X = planted((4, 3, 5), (2, 3, 2), g)
    with pytest.raises(ValueError, match="shape mismatch"):
        X.inner(planted((4, 3, 4), (2, 3, 2), g))
    with pytest.raises(TypeError, match="other must be a Tucker tensor or a tensor"):
        X.inner(TensorTrain.random((4, 3, 5), 2, generator=g, dtype=DT))
    with pytest.raises(ValueError, match="index"):
        X.gather(torch.tensor([[4, 0, 0]]))


# ---------------------------------------------------------------------- the manifold
def test_manifold_bad_input(g):
    with pytest.raises(ValueError, match=r"ranks\[0\] = 5 exceeds what mode 0 .* can have .* = 4\)"):
        FixedTuckerRank((4, 6, 6), (5, 5, 5))
    with pytest.raises(ValueError, match=r"ranks\[0\] = 5 is not attainable.*other ranks = 4"):
        FixedTuckerRank((6, 6, 6), (5, 2, 2))  # no core (5, 2, 2) has full multilinear rank
    with pytest.raises(ValueError, match="at least 2 modes"):
        FixedTuckerRank((6,), 2)
    M = FixedTuckerRank((4, 3, 5), (2, 3, 2))
    with pytest.raises(TypeError, match="x must be a Tucker tensor"):
        M.random_tangent(TensorTrain.random((4, 3, 5), 2, generator=g, dtype=DT))
    with pytest.raises(ValueError, match=r"multilinear ranks \(2, 3, 2\)"):
        M.zero_tangent(planted((4, 3, 5), (2, 2, 2), g))
    x = planted((4, 3, 5), (2, 3, 2), g)
    core = x.core.clone()
    core[1] = core[0]  # mode-0 unfolding of rank 1: a point of lower multilinear rank
    y = Tucker(core, x.factors)
    assert M.rank_defect(y) == " in mode 0"
    v = M.random_tangent(y, generator=g)
    with pytest.raises(ValueError, match="rank-deficient in mode 0"):
        riemannian_hvp(lambda X: X.norm() ** 4, y, v)


def test_non_orthonormal_factors_are_frames_of_the_same_point(g):
    """A point given with non-orthonormal factors: its frames are orthonormal and represent the same tensor;
    its packed parts round-trip; canonical_parts is idempotent."""
    M = FixedTuckerRank((4, 3, 5), (2, 3, 2))
    x = planted((4, 3, 5), (2, 3, 2), g)
    fr = M.frames(x)
    for U in fr["U"]:
        assert torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=DT), atol=1e-13)
    assert rel(M.from_frames(fr).full(), x.full()) < 1e-13
    p = M.pack_point(x)
    assert rel(M.unpack_point(p).full(), x.full()) < 1e-13
    parts = M.split(p)
    assert max(rel(a, b) for a, b in zip(M.canonical_parts(parts), parts)) < 1e-13
    assert manifold_of(x) == M


@pytest.mark.parametrize("shape,ranks", [((6, 7, 5), (2, 3, 2)), ((5, 4, 6, 4), (2, 2, 3, 2))])
def test_tucker_completion_recovers_the_planted_tensor(shape, ranks, g):
    """Trust-region on ½‖P_Ω(X − A)‖² from a perturbation of the planted tensor: the held-out error reaches 1e-9."""
    M = FixedTuckerRank(shape, ranks)
    A = planted(shape, ranks, g)
    n = math.prod(shape)
    perm = torch.randperm(n, generator=g)
    train, test = perm[: int(0.6 * n)], perm[int(0.6 * n) :]

    def idx(flat):
        return torch.stack(torch.unravel_index(flat, shape), 1)

    Itr, Ite = idx(train), idx(test)
    Ad = A.full()
    vals, test_vals = Ad[tuple(Itr.T)], Ad[tuple(Ite.T)]
    Z = torch.randn(shape, dtype=DT, generator=g)
    x0 = Tucker.from_dense(Ad + 0.1 * Z * Ad.abs().max(), ranks)
    res = minimize(lambda X: 0.5 * ((X.gather(Itr) - vals) ** 2).sum(), x0, manifold=M, gtol=1e-11, max_iter=100)
    assert res.success, res.message
    assert rel(res.x.gather(Ite), test_vals) < 1e-9


def test_tucker_approximation_meets_the_dense_optimality_condition(g):
    """min ½‖X − A‖² over the manifold from the HOSVD: the result has P_X(X − A) = 0 (dense projector) and an error
    no larger than the HOSVD's (which is quasi-optimal, not optimal)."""
    A = torch.randn(5, 4, 6, dtype=DT, generator=g)
    ranks = (2, 3, 2)
    x0 = Tucker.from_dense(A, ranks)
    half = 0.5 * float((A**2).sum())
    res = minimize(lambda X: 0.5 * X.norm() ** 2 - X.inner(A) + half, x0, gtol=1e-10, max_iter=200)
    assert res.success, res.message
    X = res.x.full()
    P = tucker_projector(res.x)
    assert float(torch.linalg.vector_norm(P @ (X - A).reshape(-1))) < 1e-9 * float(torch.linalg.vector_norm(A))
    assert float(((X - A) ** 2).sum()) <= float(((x0.full() - A) ** 2).sum()) + 1e-12


def test_geoopt_bridge_trains_a_tucker_parameter(g):
    """Any protocol manifold plugs into geoopt: a packed Tucker parameter fitted by RiemannianAdam through
    straight_through stays canonical (orthonormal factors) and lowers the loss."""
    M = GeooptManifold(FixedTuckerRank((4, 3, 5), (2, 2, 2)))
    target = planted((4, 3, 5), (2, 2, 2), g).full()
    p = geoopt.ManifoldParameter(M.random(dtype=DT, generator=g), manifold=M)
    opt = geoopt.optim.RiemannianAdam([p], lr=0.05)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = ((M.straight_through(p).full() - target) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    ok, reason = M._check_point_on_manifold(p.detach())
    assert ok, reason


@pytest.mark.parametrize(
    "shape,ranks",
    [((5, 4), (2, 2)), ((3, 3, 3), (3, 3, 3)), ((4, 2, 5), (2, 2, 4)), ((6, 1, 5), (1, 1, 1))],
    ids=["d2", "full-rank", "r-is-product-of-others", "mode-of-size-1"],
)
def test_edge_shapes_gradient_dimension_and_retraction(shape, ranks, g):
    """d = 2 (a matrix: r_1 = r_2), ranks equal to the modes, r_k = Π_(j≠k) r_j with n_k < 2 r_k in the
    retraction's QR, a mode of size 1: the dimension is the dense tangent space's, the gradient the dense projected
    one, the retraction keeps the ranks; an empty gather is empty."""
    M = FixedTuckerRank(shape, ranks)
    x = planted(shape, ranks, g)
    P = tucker_projector(x)
    assert M.dim == round(float(torch.trace(P)))
    A = torch.randn(shape, dtype=DT, generator=g)
    _, grad = riemannian_grad(lambda X: torch.sin(X.inner(A)) + X.norm() ** 3, x)
    Xd = x.full().clone().requires_grad_()
    (G,) = torch.autograd.grad(torch.sin((Xd * A).sum()) + ((Xd**2).sum()) ** 1.5, Xd)
    assert rel(grad.to_ambient().full().reshape(-1), P @ G.reshape(-1)) < 1e-12
    y = M.retr(x, grad * 0.1)
    assert y.ranks == M.ranks and M.rank_defect(y) is None
    assert x.gather(torch.zeros(0, len(shape), dtype=torch.long)).shape == (0,)
