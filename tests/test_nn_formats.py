"""The nn layers that decompose weights do it with the formats layer (``formats.tt_svd``, ``formats.tr_full``):
their results against dense references written here (projectors from dense SVDs, ring traces by one einsum)."""

import string

import pytest
import torch

from lowrankopt import TensorRing
from lowrankopt.nn import STTPLinear, TBasis, TBasisFactory, TTConv2d

D = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _top_left(M, r):
    return torch.linalg.svd(M, full_matrices=False)[0][:, :r]


def _tt_svd_polar(M, modes, bonds):
    """The d × r matrix M (rows over the modes) through sequential rank-``bonds`` projections of its unfoldings
    (Oseledets' TT-SVD: at bond k the top left singular vectors of what is left), then the polar factor of what
    remains: a matrix with orthonormal columns. Returns that matrix (dense)."""
    r = M.shape[1]
    prefix = torch.ones(1, 1, dtype=M.dtype)  # (n_1 ⋯ n_k, R_k), orthonormal columns
    rest = M.reshape(1, -1)  # (R_k, n_{k+1} ⋯ n_D r)
    for k, n in enumerate(modes[:-1]):
        rest = rest.reshape(bonds[k] * n, -1)
        U = _top_left(rest, bonds[k + 1])
        prefix = (prefix @ U.reshape(bonds[k], -1)).reshape(-1, bonds[k + 1])
        rest = U.T @ rest
    A, _, Bt = torch.linalg.svd(rest.reshape(bonds[-2] * modes[-1], r), full_matrices=False)
    return (prefix @ (A @ Bt).reshape(bonds[-2], -1)).reshape(-1, r)


@pytest.mark.parametrize("rank", [2, 3])
def test_sttp_load_dense_at_truncating_ranks_is_the_tt_svd_of_the_singular_vectors(rank):
    W = torch.randn(8, 12, dtype=D, generator=_gen(0))
    layer = STTPLinear(12, 8, rank, lipschitz=None, dtype=D, generator=_gen(1))
    layer.load_dense(W)
    P, S, Qt = torch.linalg.svd(W, full_matrices=False)
    r = layer.rank
    Uref = _tt_svd_polar(P[:, :r], layer.U.modes, layer.U.bonds)
    Vref = _tt_svd_polar(Qt[:r].T, layer.V.modes, layer.V.bonds)
    torch.testing.assert_close(layer.weight_matrix(), (Uref * S[:r]) @ Vref.T, rtol=0, atol=1e-12)
    best = (P[:, :r] * S[:r]) @ Qt[:r]  # the TT ranks bind: the layer is not the rank-r SVD truncation
    assert float((layer.weight_matrix() - best).norm()) > 1e-2 * float(best.norm())
    U, _, V = layer.factors()
    eye = torch.eye(r, dtype=D)
    torch.testing.assert_close(U.T @ U, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(V.T @ V, eye, rtol=0, atol=1e-12)


@pytest.mark.parametrize("c_out,c_in,k,rank", [(6, 8, 3, 3), (5, 4, 2, 2), (3, 7, 1, 2)])
def test_tt_conv_from_conv_is_the_two_projection_tt_svd(c_out, c_in, k, rank):
    conv = torch.nn.Conv2d(c_in, c_out, k, dtype=D)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, dtype=D, generator=_gen(2)))
    W = conv.weight.detach()
    layer = TTConv2d.from_conv(conv, rank)
    r1, r2 = layer.ranks
    # input channels projected on the top r1 left singular vectors of W[i, (p, q, o)], then output channels on the
    # top r2 right singular vectors of the result's W1[(i, p, q), o]
    U1 = _top_left(W.permute(1, 2, 3, 0).reshape(c_in, -1), r1)
    W1 = torch.einsum("ij,ojpq->oipq", U1 @ U1.T, W)
    V2 = _top_left(W1.reshape(c_out, -1), r2)  # = the right singular vectors of the transposed unfolding
    K = torch.einsum("on,nipq->oipq", V2 @ V2.T, W1)
    torch.testing.assert_close(layer.weight_kernel(), K, rtol=0, atol=1e-12)
    for M, r in ((layer.first, r1), (layer.last, r2)):
        torch.testing.assert_close(M.T @ M, torch.eye(r, dtype=D), rtol=0, atol=1e-12)


def _ring_dense(cores):
    """Σ over all bond indices of Π_k G_k[a_k, i_k, a_{k+1}] with a_{m+1} = a_1: one einsum, a traced ring."""
    m = len(cores)
    bonds, modes = string.ascii_lowercase[:m], string.ascii_uppercase[:m]
    terms = [bonds[k] + modes[k] + bonds[(k + 1) % m] for k in range(m)]
    return torch.einsum(",".join(terms) + "->" + modes, *cores)


def test_tbasis_weights_and_gradients_are_the_ring_traces_of_the_definition():
    basis = TBasis(3, 2, 4, dtype=D, generator=_gen(3))
    factory = TBasisFactory(basis)
    shapes = {"a": (7, 5), "b": (6, 9), "c": (2, 1), "d": (3, 2, 2, 2)}  # 3, 4, 1 and 3 modes
    for i, (key, shape) in enumerate(shapes.items()):
        factory.add(key, shape, std=0.5, generator=_gen(4 + i))
    with torch.no_grad():
        for i, lam in enumerate(factory.log_adapters.values()):
            lam.normal_(0, 0.3, generator=_gen(10 + i))
    params = [basis.basis, *factory.coefficients.values(), *factory.log_adapters.values()]
    weights = {key: factory.weight(key) for key in shapes}
    refs = {}
    for key in shapes:
        plan, alpha, lam = factory.plans[key], factory.coefficients[key], factory.log_adapters[key]
        # C_k = Σ_β α_kβ B_β with ρ_k = diag(exp λ_k) on the left rank index
        cores = [
            lam[k].exp()[:, None, None] * torch.einsum("b,brns->rns", alpha[k], basis.basis) for k in range(plan.modes)
        ]
        refs[key] = plan.to_weight(_ring_dense(cores).reshape(-1))
        assert weights[key].shape == shapes[key]
        torch.testing.assert_close(weights[key], refs[key], rtol=1e-12, atol=1e-14)
        ring = factory.ring(key)  # the layer's ring as a formats.TensorRing
        assert isinstance(ring, TensorRing) and ring.shape == (4,) * plan.modes
        torch.testing.assert_close(plan.to_weight(ring.full().reshape(-1)), refs[key], rtol=1e-12, atol=1e-14)
    probes = {key: torch.randn(shape, dtype=D, generator=_gen(20)) for key, shape in shapes.items()}
    grads = torch.autograd.grad(sum((weights[k] * probes[k]).sum() for k in shapes), params)
    expected = torch.autograd.grad(sum((refs[k] * probes[k]).sum() for k in shapes), params)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)
