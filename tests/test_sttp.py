"""STTP / SVDP layers: orthonormality, degrees of freedom, spectra, conversion, both training routes."""

import math

import geoopt
import pytest
import torch

from lowrankopt import FixedTTRank
from lowrankopt.nn import (
    STTPConv2d,
    STTPLinear,
    SVDPConv2d,
    SVDPLinear,
    convert_to_dense,
    convert_to_sttp,
    count_parameters,
    dopt_penalty,
)
from lowrankopt.nn.orthogonal.householder import (
    _reflectors,
    householder_numel,
    householder_orthonormal,
    householder_params,
)

D = torch.float64


def orth_err(M):
    return (M.T @ M - torch.eye(M.shape[1], dtype=M.dtype)).abs().max().item()


def spectral_norm(W):
    return torch.linalg.svdvals(W.detach().to(D))[0].item()


# ------------------------------------------------------------------------------------------------ Householder


@pytest.mark.parametrize("kind", ["full", "reduced"])
@pytest.mark.parametrize("n,c", [(7, 3), (5, 5), (6, 1), (9, 4)])
def test_householder_map_is_orthonormal_and_invertible(kind, n, c):
    g = torch.Generator().manual_seed(n * 10 + c)
    # closed-form counts: dim St(n, c) and dim Gr(n, c)
    assert householder_numel(n, c, kind) == (n * c - c * (c + 1) // 2 if kind == "full" else (n - c) * c)
    h = torch.randn(3, householder_numel(n, c, kind), dtype=D, generator=g)
    for Q in householder_orthonormal(h, n, c, kind):
        assert orth_err(Q) < 1e-14
    Q, _ = torch.linalg.qr(torch.randn(n, c, dtype=D, generator=g))
    Q[:, 0] *= torch.sign(Q[0, 0]) * -1  # keep the full layout representable without flips (det sign at n = c)
    h, G = householder_params(Q, kind, allow_sign_flips=True)
    assert orth_err(G) < 1e-14
    assert torch.allclose(householder_orthonormal(h[None], n, c, kind)[0], Q @ G, atol=1e-12)
    if kind == "full":  # no gauge: G is a diagonal of signs
        assert torch.equal(G.abs(), torch.eye(c, dtype=D))


def _householder_reference(h, n, c, kind):
    """The dense product ``H_1 ⋯ H_c I_{n×c}`` of the reflectors, one at a time (independent of the WY form)."""
    out = []
    for p in h:
        V = torch.eye(n, c, dtype=p.dtype)
        if kind == "reduced":
            V[c:] += p.reshape(n - c, c)
        else:
            rows, cols = torch.tril_indices(n, c, offset=-1)
            V = V.index_put((rows, cols), p, accumulate=True)
        Q = torch.eye(n, dtype=p.dtype)
        for i in range(c):
            v = V[:, i]
            Q = Q @ (torch.eye(n, dtype=p.dtype) - 2 * torch.outer(v, v) / (v @ v))
        out.append(Q[:, :c])
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["full", "reduced"])
@pytest.mark.parametrize("n,c", [(7, 3), (5, 5), (6, 1), (12, 6)])
@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_householder_wy_form_matches_the_reflector_product_and_its_gradient(kind, n, c, scale):
    g = torch.Generator().manual_seed(n * 10 + c)
    h = scale * torch.randn(2, householder_numel(n, c, kind), dtype=D, generator=g)
    w = torch.randn(2, n, c, dtype=D, generator=g)
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    Q = householder_orthonormal(h1, n, c, kind)
    ref = _householder_reference(h2, n, c, kind)
    assert torch.allclose(Q, ref, atol=1e-12, rtol=0)
    if h.numel():  # (reduced n = c has no parameters)
        (Q * w).sum().backward()
        (ref * w).sum().backward()
        assert torch.allclose(h1.grad, h2.grad, atol=1e-10 * max(1.0, h2.grad.abs().max().item()), rtol=0)
    A = _reflectors(h, n, c, kind)  # and the same Q as LAPACK's orgqr (torch.linalg.householder_product)
    assert torch.allclose(Q, torch.linalg.householder_product(A, 2 / (1 + (A * A).sum(dim=1))), atol=1e-12, rtol=0)


def test_householder_bad_input():
    with pytest.raises(ValueError, match="kind"):
        householder_numel(4, 2, "half")
    with pytest.raises(ValueError, match="params"):
        householder_orthonormal(torch.zeros(1, 3, dtype=D), 4, 2, "full")
    with pytest.raises(ValueError, match="orthonormal"):
        householder_params(torch.ones(4, 2, dtype=D), "full")


# ------------------------------------------------------------------------------------------------ layers


def _tt_dim(layer):
    """Dimension of the fixed-TT-rank manifold of W's TT (U modes, then V modes reversed), by FixedTTRank."""
    modes = list(layer.U.modes) + list(reversed(layer.V.modes))
    ranks = list(layer.U.bonds[1:]) + list(reversed(layer.V.bonds[1:-1]))
    return FixedTTRank(modes, ranks).dim


@pytest.mark.parametrize("spectrum", ["identity", "learned", "learned+dopt"])
@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: STTPLinear(24, 12, 4, bias=False, **kw),
        lambda **kw: STTPLinear(64, 30, 5, bias=False, mode_factorization=([5, 6], [4, 4, 4]), **kw),
        lambda **kw: STTPConv2d(6, 8, 3, rank=4, bias=False, **kw),
        lambda **kw: SVDPLinear(20, 9, 6, bias=False, **kw),
    ],
)
def test_parameter_count_equals_the_dof_formula(make, spectrum):
    layer = make(spectrum=spectrum, dtype=D)
    r = layer.rank
    expected = _tt_dim(layer) - (0 if spectrum != "identity" else r * (r + 1) // 2)
    assert count_parameters(layer) == layer.dof() == expected


def test_svdp_dof_closed_forms():
    m, n, r = 20, 9, 6
    assert count_parameters(SVDPLinear(n, m, r, bias=False, dtype=D)) == r * (m + n) - r * r
    assert (
        count_parameters(SVDPLinear(n, m, r, bias=False, spectrum="identity", dtype=D))
        == r * (m + n) - r * (3 * r + 1) // 2
    )


def test_maximal_ranks_reproduce_svdp():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(24, 12, dtype=D)
    sttp = STTPLinear.from_linear(lin)  # rank 12 = min: every TT rank maximal
    svdp = SVDPLinear.from_linear(lin)
    assert sttp.U.bonds == (1, 2, 4, 12) and count_parameters(sttp) == count_parameters(svdp)
    x = torch.randn(7, 24, dtype=D, generator=g)
    assert torch.allclose(sttp(x), lin(x), atol=1e-12) and torch.allclose(svdp(x), lin(x), atol=1e-12)


@pytest.mark.parametrize("parametrization", ["householder", "stiefel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_the_dense_weight(parametrization, dtype):
    g = torch.Generator().manual_seed(1)
    lin = STTPLinear(30, 10, 3, parametrization=parametrization, dtype=dtype, generator=g)
    x = torch.randn(2, 5, 30, dtype=dtype, generator=g)
    U, s, V = lin.factors()
    W = (U.to(D) * s.to(D)) @ V.to(D).T  # composed here, in float64
    ref = x.to(D) @ W.T + lin.bias.to(D)
    assert lin(x).dtype == dtype and lin(x).shape == (2, 5, 10)
    assert torch.allclose(lin(x).to(D), ref, atol=1e-5 if dtype == torch.float32 else 1e-12)
    conv = STTPConv2d(
        4, 6, (3, 2), stride=2, padding=1, rank=3, parametrization=parametrization, dtype=dtype, generator=g
    )
    xi = torch.randn(2, 4, 9, 8, dtype=dtype, generator=g)
    ref = torch.nn.functional.conv2d(xi.to(D), conv.weight_kernel().to(D), conv.bias.to(D), 2, 1)
    assert torch.allclose(conv(xi).to(D), ref, atol=1e-5 if dtype == torch.float32 else 1e-12)


def test_cores_of_one_shape_are_built_in_one_householder_product(monkeypatch):
    from lowrankopt.nn.orthogonal import orthonormal_tt

    layer = STTPLinear(2**6, 2**5, 4, dtype=D)  # many equally shaped (8, 4) reduced cores
    calls = []
    real = orthonormal_tt.householder_orthonormal
    monkeypatch.setattr(
        orthonormal_tt, "householder_orthonormal", lambda p, *a: calls.append(p.shape[0]) or real(p, *a)
    )
    layer(torch.zeros(1, 64, dtype=D))
    groups = [len(members) for tt in (layer.U, layer.V) for _, members in tt._groups]
    assert sorted(calls) == sorted(groups) and max(groups) >= 3  # one call per distinct shape, batched
    assert sum(groups) == len(layer.U.modes) + len(layer.V.modes) == 11


def _train(layer, opt, steps, x, y):
    for _ in range(steps):
        opt.zero_grad()
        loss = ((layer(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    return loss.item()


@pytest.mark.parametrize("parametrization", ["householder", "stiefel"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_orthonormal_after_1000_training_steps(parametrization, dtype, tol):
    g = torch.Generator().manual_seed(2)
    layer = STTPLinear(16, 8, 3, parametrization=parametrization, dtype=dtype, generator=g)
    x, y = torch.randn(32, 16, dtype=dtype, generator=g), torch.randn(32, 8, dtype=dtype, generator=g)
    params = layer.parameters()
    opt = (
        torch.optim.Adam(params, lr=1e-2)
        if parametrization == "householder"
        else geoopt.optim.RiemannianAdam(params, lr=1e-2)
    )
    first = ((layer(x) - y) ** 2).mean().item()
    last = _train(layer, opt, 1000, x, y)
    U, s, V = layer.factors()
    assert last < first
    assert orth_err(U.detach()) < tol and orth_err(V.detach()) < tol
    assert spectral_norm(layer.weight_matrix()) <= 1 + 10 * tol  # learned spectrum, lipschitz = 1


@pytest.mark.parametrize("lipschitz", [1.0, 0.5])
def test_learned_spectrum_bounds_the_spectral_norm(lipschitz):
    g = torch.Generator().manual_seed(3)
    lin = STTPLinear(12, 10, 4, lipschitz=lipschitz, dtype=D, generator=g)
    conv = STTPConv2d(3, 5, 3, rank=4, lipschitz=lipschitz, dtype=D, generator=g)
    for layer in (lin, conv):
        with torch.no_grad():
            layer.s.copy_(torch.randn(4, dtype=D, generator=g) * 10)
        assert spectral_norm(layer.weight_matrix()) == pytest.approx(lipschitz, rel=1e-12)
    ident = STTPLinear(12, 10, 4, spectrum="identity", dtype=D, generator=g)
    assert torch.allclose(torch.linalg.svdvals(ident.weight_matrix().detach())[:4], torch.ones(4, dtype=D))


def test_dopt_penalty():
    g = torch.Generator().manual_seed(4)
    model = torch.nn.Sequential(
        STTPLinear(8, 6, 3, spectrum="learned+dopt", dtype=D, generator=g),
        STTPLinear(6, 4, 3, spectrum="learned", dtype=D, generator=g),
    )
    assert dopt_penalty(model).item() == 0.0  # s = 1 at initialization
    with torch.no_grad():
        model[0].s.copy_(torch.tensor([2.0, -1.0, 0.5], dtype=D))
        model[1].s.copy_(torch.tensor([3.0, 1.0, 1.0], dtype=D))
    expected = -(math.log(1.0) + math.log(0.5) + math.log(0.25)) / 3
    assert dopt_penalty(model).item() == pytest.approx(expected, rel=1e-14)  # only the +dopt layer
    with pytest.raises(ValueError, match="learned"):
        STTPLinear(8, 6, 3, spectrum="identity", dtype=D).dopt_penalty()


def _small_cnn():
    torch.manual_seed(5)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(6, 8, 3, stride=2, padding=1, padding_mode="reflect"),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 4 * 4, 10),
    ).double()


def test_conversion_at_full_rank_reproduces_outputs_and_back():
    model = _small_cnn()
    x = torch.randn(3, 1, 8, 8, dtype=D, generator=torch.Generator().manual_seed(6))
    ref = model(x)
    converted = convert_to_sttp(model, rank=1000)
    assert sorted(converted) == ["0", "2", "4"]
    assert isinstance(model[2], STTPConv2d) and isinstance(model[4], STTPLinear)
    assert torch.allclose(model(x), ref, atol=1e-12)
    convert_to_dense(model)
    assert type(model[2]) is torch.nn.Conv2d and torch.allclose(model(x), ref, atol=1e-12)


def test_conversion_include_exclude_and_truncation():
    model = _small_cnn()
    converted = convert_to_sttp(model, rank=2, target_modules=["2", "4"], exclude_modules=["4"])
    assert list(converted) == ["2"] and type(model[4]) is torch.nn.Linear and model[2].rank == 2
    dense = _small_cnn()
    svdp = convert_to_sttp(dense, rank=lambda name, m: 3, svdp=True, target_modules=lambda n, m: n == "4")
    assert isinstance(svdp["4"], SVDPLinear) and svdp["4"].rank == 3
    # SVDP at rank 3 from the dense weight is its best rank-3 approximation (Eckart–Young, by a dense SVD here)
    P, S, Qt = torch.linalg.svd(_small_cnn()[4].weight.detach())
    assert torch.allclose(svdp["4"].weight_matrix(), (P[:, :3] * S[:3]) @ Qt[:3], atol=1e-12)
    assert isinstance(SVDPConv2d.from_conv(torch.nn.Conv2d(2, 3, 3).double()), SVDPConv2d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("det", [1.0, -1.0])
def test_identity_spectrum_loads_partial_isometries_of_both_determinants(dtype, det):
    g = torch.Generator().manual_seed(7)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for n, layer in [
        (4, STTPLinear(4, 4, 4, spectrum="identity", dtype=dtype)),
        (6, SVDPLinear(6, 6, spectrum="identity", dtype=dtype)),
    ]:
        W, _ = torch.linalg.qr(torch.randn(n, n, dtype=D, generator=g))
        W[:, 0] *= torch.sign(torch.det(W)) * det  # an orthogonal matrix of determinant det
        layer.load_dense(W)
        assert torch.allclose(layer.weight_matrix().to(D), W, atol=tol)
    U, _ = torch.linalg.qr(torch.randn(16, 8, dtype=D, generator=g))  # a non-square partial isometry
    layer = SVDPLinear(8, 16, spectrum="identity", dtype=dtype)
    layer.load_dense(U)
    assert torch.allclose(layer.weight_matrix().to(D), U, atol=tol)


def _jacobian_rank(layer) -> int:
    """Rank of the Jacobian of the map (trainable parameters) → W, by autograd (exact)."""
    names = [n for n, p in layer.named_parameters()]
    values = [p.detach() for p in layer.parameters()]
    eye = torch.eye(layer.in_features, dtype=D)

    def weight(*tensors):
        return torch.func.functional_call(layer, dict(zip(names, tensors, strict=True)), (eye,)).reshape(-1)

    J = torch.autograd.functional.jacobian(weight, tuple(values))
    return torch.linalg.matrix_rank(torch.cat([j.reshape(j.shape[0], -1) for j in J], dim=1)).item()


@pytest.mark.parametrize("spectrum", ["learned", "identity"])
def test_jacobian_rank_equals_the_dof(spectrum):
    """No redundant parameter: the differential of parameters → W is injective (rank = #parameters = dof)."""
    layer = STTPLinear(12, 8, 3, bias=False, spectrum=spectrum, lipschitz=None, dtype=D)
    if spectrum == "learned":  # distinct singular values (at equal ones the SVD itself has an O(r) freedom)
        with torch.no_grad():
            layer.s.copy_(torch.tensor([1.0, 0.7, 0.4], dtype=D))
    assert count_parameters(layer) == layer.dof() == _jacobian_rank(layer)
    # with a Lipschitz bound the overall scale of s is not identifiable: exactly one direction less
    bounded = STTPLinear(12, 8, 3, bias=False, dtype=D)
    with torch.no_grad():
        bounded.s.copy_(torch.tensor([1.0, 0.7, 0.4], dtype=D))
    assert _jacobian_rank(bounded) == bounded.dof() - 1


def test_householder_without_flips_reaches_one_determinant():
    g = torch.Generator().manual_seed(8)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=D, generator=g))
    for sign in (1.0, -1.0):
        Q[:, 0] *= torch.sign(torch.det(Q)) * sign
        if sign == 1.0:  # det = (−1)^4: inside the image of H_1 ⋯ H_4
            h, G = householder_params(Q, "full")
            assert torch.equal(G, torch.eye(4, dtype=D))
            assert torch.allclose(householder_orthonormal(h[None], 4, 4, "full")[0], Q, atol=1e-12)
        else:
            from lowrankopt.nn.orthogonal.householder import NotRepresentable

            with pytest.raises(NotRepresentable):
                householder_params(Q, "full")
    with pytest.raises(ValueError, match="finite"):
        householder_params(torch.full((4, 2), float("nan"), dtype=D), "full")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(padding=2, dilation=2),
        dict(padding="same"),
        dict(padding="same", padding_mode="circular", dilation=(1, 2)),
        dict(padding=1, padding_mode="replicate", stride=2),
        dict(padding="valid", stride=(2, 1)),
    ],
)
def test_conv_conversion_matches_nn_conv2d(kwargs):
    g = torch.Generator().manual_seed(9)
    torch.manual_seed(9)
    conv = torch.nn.Conv2d(3, 5, (3, 2), **kwargs).double()
    x = torch.randn(2, 3, 9, 8, dtype=D, generator=g)
    assert torch.allclose(STTPConv2d.from_conv(conv)(x), conv(x), atol=1e-12)


def test_shared_modules_are_converted_together_and_failures_change_nothing():
    lin = torch.nn.Linear(6, 6).double()
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), lin)
    converted = convert_to_sttp(model, rank=100)
    assert set(converted) == {"0", "2"} and model[0] is model[2]
    model = torch.nn.Sequential(torch.nn.Linear(6, 6).double(), torch.nn.Linear(6, 6).double())
    with pytest.raises(ValueError, match="rank"):
        convert_to_sttp(model, rank=lambda name, m: 3 if name == "0" else 0)
    assert all(type(m) is torch.nn.Linear for m in model)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        STTPLinear(8, 4, 0)
    with pytest.raises(ValueError, match="spectrum"):
        STTPLinear(8, 4, 2, spectrum="flat")
    with pytest.raises(ValueError, match="parametrization"):
        STTPLinear(8, 4, 2, parametrization="cayley")
    with pytest.raises(ValueError, match="product"):
        STTPLinear(8, 4, 2, mode_factorization=([2, 2], [3, 3]))
    with pytest.raises(ValueError, match="groups"):
        STTPConv2d(4, 4, 3, groups=2, rank=2)
    for bad in (0, True, float("inf")):
        with pytest.raises(ValueError, match="lipschitz"):
            STTPLinear(8, 4, 2, lipschitz=bad)
    with pytest.raises(ValueError, match="padding"):
        STTPConv2d(4, 4, 3, padding="full", rank=2)
    with pytest.raises(ValueError, match="stride"):
        STTPConv2d(4, 4, 3, padding="same", stride=2, rank=2)
    assert STTPLinear(8, 4, 2, mode_factorization=(4, [2, 4])).U.modes == (4,)
    layer = STTPLinear(8, 4, 2, dtype=D)
    with pytest.raises(ValueError, match="shape"):
        layer(torch.zeros(3, 7, dtype=D))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.zeros(3, 8, dtype=torch.float32))
    with pytest.raises(ValueError, match="input"):
        STTPConv2d(3, 4, 3, rank=2, dtype=D)(torch.zeros(1, 2, 5, 5, dtype=D))
    with pytest.raises(TypeError, match="dtype"):
        STTPConv2d(3, 4, 3, rank=2, dtype=D)(torch.zeros(1, 3, 5, 5, dtype=torch.float32))
    bad = torch.nn.Linear(4, 3).double()
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        STTPLinear.from_linear(bad)
