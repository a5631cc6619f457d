"""Group-and-Shuffle matrices: application vs dense, projection (Algorithm 1), density, orthogonal GS."""

import geoopt
import pytest
import torch

from lowrankopt.nn import GSMatrix, GSOrthogonal, gs_matmul, gs_project
from lowrankopt.nn.orthogonal.gs import blockdiag_matmul, shuffle_index

D = torch.float64


def dense_perm(idx):
    """The permutation matrix with ``(P x)_i = x[idx[i]]``."""
    return torch.eye(len(idx), dtype=D)[idx]


def test_shuffle_index_formula():
    k, n = 3, 12
    sigma = shuffle_index(k, n)
    assert sigma.tolist() == [(i % k) * (n // k) + i // k for i in range(n)]
    with pytest.raises(ValueError, match="divisor"):
        shuffle_index(5, 12)


def test_order2_and_higher_order_match_dense_products():
    g = torch.Generator().manual_seed(0)
    L = torch.randn(3, 4, 2, dtype=D, generator=g)  # 12 × 6
    R = torch.randn(2, 3, 5, dtype=D, generator=g)  # 6 × 10
    P_L = torch.randperm(12, generator=g)
    P_R = torch.randperm(10, generator=g)
    A = GSMatrix.order2(L, R, P_L=P_L, P_R=P_R)
    ref = (
        dense_perm(P_L)
        @ torch.block_diag(*L)
        @ dense_perm(shuffle_index(2, 6))
        @ torch.block_diag(*R)
        @ dense_perm(P_R)
    )
    assert A.shape == (12, 10) and torch.allclose(A.to_dense(), ref, atol=1e-13)
    x = torch.randn(4, 10, dtype=D, generator=g)
    assert torch.allclose(A @ x, x @ ref.T, atol=1e-13)
    B3 = torch.randn(4, 2, 3, dtype=D, generator=g)  # a third factor: 12 → 8
    A3 = GSMatrix([R, L, B3])
    ref3 = (
        torch.block_diag(*B3)
        @ dense_perm(shuffle_index(3, 12))
        @ torch.block_diag(*L)
        @ dense_perm(shuffle_index(2, 6))
        @ torch.block_diag(*R)
    )
    assert torch.allclose(A3.to_dense(), ref3, atol=1e-13)
    assert A3.numel() == R.numel() + L.numel() + B3.numel()
    assert torch.allclose(gs_matmul(x, [R, L, B3]), x @ ref3.T, atol=1e-13)


def test_bad_gs_input():
    with pytest.raises(ValueError, match="outputs"):
        GSMatrix([torch.zeros(2, 3, 4), torch.zeros(2, 2, 2)])
    with pytest.raises(ValueError, match="permutation"):
        GSMatrix([torch.zeros(2, 3, 4)], [torch.zeros(8, dtype=torch.int64), None])
    with pytest.raises(ValueError, match="last dim"):
        blockdiag_matmul(torch.zeros(5), torch.zeros(2, 3, 2))


def test_projection_is_exact_on_gs_matrices_and_locally_optimal():
    g = torch.Generator().manual_seed(1)
    L_shape, R_shape = (3, 4, 2), (2, 3, 5)
    A = GSMatrix.order2(torch.randn(*L_shape, dtype=D, generator=g), torch.randn(*R_shape, dtype=D, generator=g))
    assert torch.allclose(gs_project(A.to_dense(), L_shape, R_shape).to_dense(), A.to_dense(), atol=1e-12)
    M = torch.randn(12, 10, dtype=D, generator=g)
    proj = gs_project(M, L_shape, R_shape)
    best = (proj.to_dense() - M).norm()
    R0, L0 = proj.blocks
    for _ in range(20):  # no nearby GS matrix is closer (the projection is a global optimum)
        dL = 1e-3 * torch.randn(*L_shape, dtype=D, generator=g)
        dR = 1e-3 * torch.randn(*R_shape, dtype=D, generator=g)
        assert (GSMatrix.order2(L0 + dL, R0 + dR).to_dense() - M).norm() >= best - 1e-12


def _jacobian_rank(L_shape, R_shape):
    g = torch.Generator().manual_seed(2)
    L = torch.randn(*L_shape, dtype=D, generator=g)
    R = torch.randn(*R_shape, dtype=D, generator=g)
    J = torch.autograd.functional.jacobian(lambda a, b: GSMatrix.order2(a, b).to_dense().reshape(-1), (L, R))
    return torch.linalg.matrix_rank(torch.cat([j.reshape(j.shape[0], -1) for j in J], dim=1)).item()


def test_density_two_factors_with_wide_inner_blocks_span_all_matrices():
    # 4 × 4 from L: 2 blocks 2 × 4 and R: 2 blocks 4 × 2 (inner size 8): every block of L P R gets two
    # rank-one terms, so the image of (L, R) ↦ L P R is open in R^{4×4}: its differential has rank 16
    assert _jacobian_rank((2, 2, 4), (2, 4, 2)) == 16
    # square 2 × 2 blocks (inner size 4): every block of L P R has rank one — not dense
    assert _jacobian_rank((2, 2, 2), (2, 2, 2)) < 16


@pytest.mark.parametrize("map", ["cayley", "exp"])
def test_gs_orthogonal_is_orthogonal_and_identity_at_init(map):
    g = torch.Generator().manual_seed(3)
    Q = GSOrthogonal(32, 4, map=map, dtype=D)  # n = 32, b = 4: the shuffle is not its own inverse
    assert not torch.equal(Q.perm, Q.inverse_perm)
    assert torch.equal(Q.matrix(), torch.eye(32, dtype=D))
    assert sum(p.numel() for p in Q.parameters()) == GSOrthogonal.num_parameters(32, 4) == 32 * 3
    with torch.no_grad():
        Q.L.copy_(torch.randn(Q.L.shape, dtype=D, generator=g))
        Q.R.copy_(torch.randn(Q.R.shape, dtype=D, generator=g))
    M = Q.matrix()
    assert (M.T @ M - torch.eye(32, dtype=D)).abs().max() < 1e-12
    x = torch.randn(3, 32, dtype=D, generator=g)
    assert torch.allclose(Q(x), x @ M.T, atol=1e-13)
    L, R = Q.blocks()
    P = dense_perm(shuffle_index(4, 32))  # the paper's P_(nblocks, n): gathers by shuffle_index(b, n)
    assert torch.allclose(M, P.T @ torch.block_diag(*L) @ P @ torch.block_diag(*R), atol=1e-13)
    Q_legacy = GSOrthogonal(32, 4, map=map, dtype=D, shuffle="legacy")
    Q_legacy.load_state_dict(Q.state_dict())
    P = dense_perm(shuffle_index(8, 32))  # the legacy shuffle: its transpose
    assert torch.allclose(Q_legacy.matrix(), P.T @ torch.block_diag(*L) @ P @ torch.block_diag(*R), atol=1e-13)


def test_neumann_map_converges_to_cayley():
    errs = []
    for terms in (1, 3, 6):
        Q = GSOrthogonal(8, nblocks=2, map="neumann", neumann_terms=terms, dtype=D)
        with torch.no_grad():
            Q.L.copy_(0.1 * torch.randn(Q.L.shape, dtype=D, generator=torch.Generator().manual_seed(5)))
        M = Q.matrix()
        errs.append((M.T @ M - torch.eye(8, dtype=D)).abs().max().item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-6
    Q = GSOrthogonal(8, nblocks=2, map="neumann", dtype=D)
    with torch.no_grad():
        Q.L.fill_(2.0)
    with pytest.raises(ValueError, match="diverges"):
        Q.matrix()


def test_orthogonal_parametrization_trains_with_riemannian_adam():
    g = torch.Generator().manual_seed(6)
    target = GSOrthogonal(12, 3, dtype=D)
    with torch.no_grad():
        target.L.copy_(torch.randn(target.L.shape, dtype=D, generator=g))
    Q = GSOrthogonal(12, 3, parametrization="orthogonal", dtype=D)
    opt = geoopt.optim.RiemannianAdam(Q.parameters(), lr=0.05)
    x = torch.randn(64, 12, dtype=D, generator=g)
    y = target(x).detach()
    first = None
    for _ in range(300):
        opt.zero_grad()
        loss = ((Q(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    M = Q.matrix()
    assert loss.item() < 0.1 * first
    assert (M.T @ M - torch.eye(12, dtype=D)).abs().max() < 1e-12


def test_gs_orthogonal_bad_input():
    with pytest.raises(ValueError, match="exactly one"):
        GSOrthogonal(8)
    with pytest.raises(ValueError, match="divide"):
        GSOrthogonal(8, 3)
    with pytest.raises(ValueError, match="map"):
        GSOrthogonal(8, 2, map="svd")
    with pytest.raises(ValueError, match="parametrization"):
        GSOrthogonal(8, 2, parametrization="stiefel")
