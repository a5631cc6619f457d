"""Group-and-Shuffle matrices: application vs dense, projection (Algorithm 1), density, orthogonal GS."""

import geoopt
import pytest
import torch

from lowrankopt.nn import GSMatrix, GSOrthogonal, gs_matmul, gs_project
from lowrankopt.nn.orthogonal.gs import block_shuffle_index, blockdiag_matmul, shuffle_index

D = torch.float64


def dense_perm(idx):
    """The permutation matrix with ``(P x)_i = x[idx[i]]`` (how explicit ``perms`` / ``P`` act)."""
    return torch.eye(len(idx), dtype=D)[idx]


def paper_shuffle(k, n, shuffle="paper"):
    """The paper's ``P_(k, n)`` as a dense matrix, from Definition 5.2 and the paper's matrix convention (a 1 at
    ``(σ(i), i)``, Prop. 1), ``σ(i) = (i mod k)·n/k + ⌊i/k⌋``: ``(P x)_{σ(i)} = x_i``. ``"legacy"``: its transpose,
    ``(P x)_i = x_{σ(i)}`` (lowrankopt's default before issue 23). Built here, not from the library."""
    P = torch.zeros(n, n, dtype=D)
    for i in range(n):
        P[(i % k) * (n // k) + i // k, i] = 1.0
    return P if shuffle == "paper" else P.T


def default_between(k_prev, k_next, n, shuffle="paper"):
    """The documented default P between a factor with ``k_prev`` blocks and the next, with ``k_next`` blocks: the
    paper's ``P_(k_next, n)``; legacy: the transpose of ``P_(k_prev, n)`` (gather by σ over the previous blocks)."""
    return paper_shuffle(k_next, n) if shuffle == "paper" else paper_shuffle(k_prev, n, "legacy")


def test_shuffle_index_formula():
    k, n = 3, 12
    sigma = shuffle_index(k, n)
    assert sigma.tolist() == [(i % k) * (n // k) + i // k for i in range(n)]
    with pytest.raises(ValueError, match="divisor"):
        shuffle_index(5, 12)
    for shuffle in ("paper", "legacy"):
        assert torch.equal(dense_perm(block_shuffle_index(k, n, shuffle)), paper_shuffle(k, n, shuffle))
    assert not torch.equal(paper_shuffle(k, n), paper_shuffle(k, n, "legacy"))  # 3 ≠ 12 / 3


@pytest.mark.parametrize("shuffle", ["paper", "legacy"])
def test_order2_and_higher_order_match_dense_products(shuffle):
    """The default ``P`` between factors is the paper's ``P_(k, n)`` over the next factor's k blocks
    (``shuffle="legacy"``: the transpose of ``P_(k, n)`` over the previous factor's); explicit permutations are
    gather index maps."""
    g = torch.Generator().manual_seed(0)
    L = torch.randn(2, 3, 4, dtype=D, generator=g)  # 6 × 8
    R = torch.randn(2, 4, 5, dtype=D, generator=g)  # 8 × 10
    P_L = torch.randperm(6, generator=g)
    P_R = torch.randperm(10, generator=g)
    kw = {} if shuffle == "paper" else {"shuffle": shuffle}
    A = GSMatrix.order2(L, R, P_L=P_L, P_R=P_R, **kw)
    ref = (
        dense_perm(P_L)
        @ torch.block_diag(*L)
        @ default_between(2, 2, 8, shuffle)  # R and L have 2 blocks (L's of width 4)
        @ torch.block_diag(*R)
        @ dense_perm(P_R)
    )
    assert A.shape == (6, 10) and torch.allclose(A.to_dense(), ref, atol=1e-13)
    other = "legacy" if shuffle == "paper" else "paper"  # the two defaults differ here: the test can fail
    assert (GSMatrix.order2(L, R, P_L=P_L, P_R=P_R, shuffle=other).to_dense() - ref).abs().max() > 1e-3
    x = torch.randn(4, 10, dtype=D, generator=g)
    assert torch.allclose(A @ x, x @ ref.T, atol=1e-13)
    P = torch.randperm(8, generator=g)  # an explicit P means what it always meant, whatever shuffle says
    for s in ("paper", "legacy"):
        got = GSMatrix.order2(L, R, P, shuffle=s).to_dense()
        assert torch.allclose(got, torch.block_diag(*L) @ dense_perm(P) @ torch.block_diag(*R), atol=1e-13)
    B3 = torch.randn(3, 3, 2, dtype=D, generator=g)  # a third factor: 6 → 9
    A3 = GSMatrix([R, L, B3], **kw)
    ref3 = (
        torch.block_diag(*B3)
        @ default_between(2, 3, 6, shuffle)  # L has 2 blocks, B3 3 (of width 2)
        @ torch.block_diag(*L)
        @ default_between(2, 2, 8, shuffle)
        @ torch.block_diag(*R)
    )
    assert torch.allclose(A3.to_dense(), ref3, atol=1e-13)
    assert A3.numel() == R.numel() + L.numel() + B3.numel()
    assert torch.allclose(gs_matmul(x, [R, L, B3], **kw), x @ ref3.T, atol=1e-13)
    perms = [P_R, torch.randperm(8, generator=g), torch.randperm(6, generator=g), None]
    ref_explicit = (
        torch.block_diag(*B3)
        @ dense_perm(perms[2])
        @ torch.block_diag(*L)
        @ dense_perm(perms[1])
        @ torch.block_diag(*R)
        @ dense_perm(perms[0])
    )
    assert torch.allclose(gs_matmul(x, [R, L, B3], perms, **kw), x @ ref_explicit.T, atol=1e-13)


@pytest.mark.parametrize("L_shape, R_shape", [((3, 4, 2), (2, 3, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 3, 6), (3, 4, 2))])
def test_default_order2_is_the_monarch_kernel(L_shape, R_shape):
    """The default ``L P R`` is what the authors' kernel for rectangular blocks computes (Monarch's
    ``blockdiag_butterfly_multiply_reference``, version 3, which gsoft_demo calls as ``(x, R, L)``: ``R x``, then
    ``'b (r l) -> b (l r)'`` with ``l`` = L's number of blocks, then ``L ·``), re-implemented here with reshapes."""
    g = torch.Generator().manual_seed(7)
    L = torch.randn(*L_shape, dtype=D, generator=g)
    R = torch.randn(*R_shape, dtype=D, generator=g)
    x = torch.randn(5, R_shape[0] * R_shape[2], dtype=D, generator=g)
    l, r = L_shape[0], L_shape[2]
    u = x @ torch.block_diag(*R).T
    u = u.reshape(5, r, l).transpose(1, 2).reshape(5, l * r)  # 'b (r l) -> b (l r)'
    want = u @ torch.block_diag(*L).T
    assert torch.allclose(GSMatrix.order2(L, R) @ x, want, atol=1e-12)


def test_bad_gs_input():
    with pytest.raises(ValueError, match="outputs"):
        GSMatrix([torch.zeros(2, 3, 4), torch.zeros(2, 2, 2)])
    with pytest.raises(ValueError, match="permutation"):
        GSMatrix([torch.zeros(2, 3, 4)], [torch.zeros(8, dtype=torch.int64), None])
    with pytest.raises(ValueError, match="last dim"):
        blockdiag_matmul(torch.zeros(5), torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match="shuffle"):
        GSMatrix([torch.zeros(2, 3, 4)], shuffle="transpose")
    with pytest.raises(ValueError, match="shuffle"):
        GSMatrix.order2(torch.zeros(2, 2, 2), torch.zeros(2, 2, 2), shuffle="Paper")
    with pytest.raises(ValueError, match="shuffle"):
        gs_project(torch.zeros(4, 4), (2, 2, 2), (2, 2, 2), shuffle=None)
    with pytest.raises(ValueError, match="permutation"):
        gs_project(torch.zeros(4, 4), (2, 2, 2), (2, 2, 2), P=torch.zeros(4, dtype=torch.int64))


def _projection_case(P_kind, L_shape, R_shape, g):
    """The keyword arguments for gs_project and the dense inner permutation they mean, built here."""
    kR, b1R, _ = R_shape
    inner = kR * b1R
    if P_kind == "explicit":
        idx = torch.randperm(inner, generator=g)
        return {"P": idx}, dense_perm(idx)
    return ({} if P_kind == "paper" else {"shuffle": P_kind}), default_between(kR, L_shape[0], inner, P_kind)


# the last pair: 4 blocks of width 2 on both sides — the paper's P joins R-block k2 to L-blocks 2k2, 2k2 + 1
# (mod 4), the legacy one L-block k1 to R-blocks 2k1, 2k1 + 1 (mod 4): the block-low-rank structure depends on P
SHAPES = [((3, 4, 2), (2, 3, 5)), ((2, 2, 3), (3, 2, 2)), ((2, 3, 4), (2, 4, 3)), ((4, 3, 2), (4, 2, 3))]


@pytest.mark.parametrize("P_kind", ["paper", "legacy", "explicit"])
@pytest.mark.parametrize("L_shape, R_shape", SHAPES)
def test_projection_is_exact_on_gs_matrices_and_optimal(P_kind, L_shape, R_shape):
    """Algorithm 1 against references built here: exact on ``L P R``; on a random M its error is the Eckart–Young
    value of Prop. 1's block-low-rank structure (block (k1, k2) of rank ≤ the number of P's ones joining L-block k1
    to R-block k2, counted on the dense P); and no nearby ``L P R`` is closer."""
    g = torch.Generator().manual_seed(1)
    kL, b1L, b2L = L_shape
    kR, b1R, b2R = R_shape
    kw, P = _projection_case(P_kind, L_shape, R_shape, g)
    L = torch.randn(*L_shape, dtype=D, generator=g)
    R = torch.randn(*R_shape, dtype=D, generator=g)
    A = torch.block_diag(*L) @ P @ torch.block_diag(*R)
    proj = gs_project(A, L_shape, R_shape, **kw)
    assert torch.allclose(proj.to_dense(), A, atol=1e-12)
    M = torch.randn(kL * b1L, kR * b2R, dtype=D, generator=g)
    proj = gs_project(M, L_shape, R_shape, **kw)
    R0, L0 = proj.blocks
    assert torch.allclose(proj.to_dense(), torch.block_diag(*L0) @ P @ torch.block_diag(*R0), atol=1e-13)
    best2 = 0.0
    for k1 in range(kL):
        for k2 in range(kR):
            count = int(P[k1 * b2L : (k1 + 1) * b2L, k2 * b1R : (k2 + 1) * b1R].sum())
            s = torch.linalg.svdvals(M[k1 * b1L : (k1 + 1) * b1L, k2 * b2R : (k2 + 1) * b2R])
            best2 += float((s[count:] ** 2).sum())
    best = (proj.to_dense() - M).norm()
    assert abs(best.item() - best2**0.5) < 1e-10
    for _ in range(20):  # no nearby GS matrix is closer (the projection is a global optimum)
        dL = 1e-3 * torch.randn(*L_shape, dtype=D, generator=g)
        dR = 1e-3 * torch.randn(*R_shape, dtype=D, generator=g)
        near = torch.block_diag(*(L0 + dL)) @ P @ torch.block_diag(*(R0 + dR))
        assert (near - M).norm() >= best - 1e-12


def test_projection_error_depends_on_the_shuffle():
    """For 4 blocks of width 2 on both sides the paper's and the legacy P join different block pairs, so the
    nearest ``L P R`` differs: the default must be the paper's."""
    g = torch.Generator().manual_seed(4)
    M = torch.randn(12, 12, dtype=D, generator=g)
    shapes = (4, 3, 2), (4, 2, 3)
    paper = (gs_project(M, *shapes).to_dense() - M).norm()
    legacy = (gs_project(M, *shapes, shuffle="legacy").to_dense() - M).norm()
    explicit = (gs_project(M, *shapes, P=block_shuffle_index(4, 8)).to_dense() - M).norm()
    assert abs(paper - legacy) > 1e-3 and abs(paper - explicit) < 1e-12


def _jacobian_rank(L_shape, R_shape, shuffle):
    g = torch.Generator().manual_seed(2)
    L = torch.randn(*L_shape, dtype=D, generator=g)
    R = torch.randn(*R_shape, dtype=D, generator=g)
    J = torch.autograd.functional.jacobian(
        lambda a, b: GSMatrix.order2(a, b, shuffle=shuffle).to_dense().reshape(-1), (L, R)
    )
    return torch.linalg.matrix_rank(torch.cat([j.reshape(j.shape[0], -1) for j in J], dim=1)).item()


@pytest.mark.parametrize("shuffle", ["paper", "legacy"])
def test_density_two_factors_with_wide_inner_blocks_span_all_matrices(shuffle):
    # 4 × 4 from L: 2 blocks 2 × 4 and R: 2 blocks 4 × 2 (inner size 8): every block of L P R gets two
    # rank-one terms, so the image of (L, R) ↦ L P R is open in R^{4×4}: its differential has rank 16
    assert _jacobian_rank((2, 2, 4), (2, 4, 2), shuffle) == 16
    # square 2 × 2 blocks (inner size 4): every block of L P R has rank one — not dense
    assert _jacobian_rank((2, 2, 2), (2, 2, 2), shuffle) < 16


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
    P = paper_shuffle(8, 32)  # the paper's P_(r, br), r = 8 blocks of size b = 4
    assert torch.allclose(M, P.T @ torch.block_diag(*L) @ P @ torch.block_diag(*R), atol=1e-13)
    Q_legacy = GSOrthogonal(32, 4, map=map, dtype=D, shuffle="legacy")
    with torch.no_grad():  # the same parameters, the other permutation (not through load_state_dict: it may check it)
        Q_legacy.L.copy_(Q.L)
        Q_legacy.R.copy_(Q.R)
    P = paper_shuffle(8, 32, "legacy")  # the legacy shuffle: its transpose
    assert torch.allclose(Q_legacy.matrix(), P.T @ torch.block_diag(*L) @ P @ torch.block_diag(*R), atol=1e-13)


@pytest.mark.parametrize("shuffle", ["paper", "legacy"])
@pytest.mark.parametrize("n, b", [(24, 4), (24, 6), (16, 4), (8, 8)])
def test_gs_matrix_of_gs_orthogonal_is_its_q(shuffle, n, b):
    """``GSOrthogonal.gs_matrix()`` is the layer's Q for either shuffle, Q = Pᵀ L P R with P built here, and its
    middle permutation is GSMatrix's default for the same shuffle (one meaning of P_(k, n) in the module)."""
    g = torch.Generator().manual_seed(n + b)
    q = GSOrthogonal(n, b, dtype=D, shuffle=shuffle)
    with torch.no_grad():
        q.L.copy_(torch.randn(q.L.shape, dtype=D, generator=g))
        q.R.copy_(torch.randn(q.R.shape, dtype=D, generator=g))
    L, R = q.blocks()
    P = paper_shuffle(n // b, n, shuffle)
    Q = P.T @ torch.block_diag(*L) @ P @ torch.block_diag(*R)
    A = q.gs_matrix()
    assert isinstance(A, GSMatrix) and torch.allclose(A.to_dense(), Q, atol=1e-13)
    x = torch.randn(5, n, dtype=D, generator=g)
    assert torch.allclose(q(x), x @ Q.T, atol=1e-13) and torch.allclose(A @ x, q(x), atol=1e-13)
    assert torch.equal(A.perms[1], GSMatrix([R, L], shuffle=shuffle).perms[1])
    assert torch.allclose(GSMatrix.order2(L, R, P_L=q.inverse_perm, shuffle=shuffle).to_dense(), Q, atol=1e-13)


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
