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


# ------------------------------------------------------------------------------------------------ mode factorizations
# Issue 23: the conv layers factor as STTP's eq. 9 by default; the authors' code's layout and lowrankopt's old default
# stay selectable by name. Everything below is derived in the test from the mode sequence of W's TT.


def _primes(n):
    """Prime factors with repetition, non-decreasing (written here, not the library's)."""
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


def _w_tt(c_out, c_in, kernel, name):
    """``(out part, in part)`` of W's TT modes, Σ between them, as each layout is defined: the paper's eq. 9 (C_in k²
    factored into primes, in-modes reversed), the authors' code (spectral_tensors_factory.py: p(C_in), then k² as one
    mode), lowrankopt's old default (k² as one mode next to Σ, then p(C_in) reversed)."""
    K = kernel[0] * kernel[1]
    kk = [K] if K > 1 else []
    ins = {
        "paper": _primes(c_in * K)[::-1],
        "reference": _primes(c_in) + kk,
        "legacy": kk + _primes(c_in)[::-1],
    }[name]
    return _primes(c_out), ins


def _tt_ranks(modes, R):
    return [min(R, math.prod(modes[:k]), math.prod(modes[k:])) for k in range(len(modes) + 1)]


def _count_per_core(out, ins, R):
    """The parameter count as the authors' code adds it up: one Stiefel frame per core — the left unfolding
    ``(R_{k−1} n_k) × R_k`` on the output side, the right one ``(n_k R_k) × R_{k−1}`` on the input side — full
    (``a b − b (b + 1) / 2``) for the two cores next to Σ, reduced (``(a − b) b``) for the others, plus r singular
    values."""
    modes, s = out + ins, len(out)
    ranks = _tt_ranks(modes, R)
    total = ranks[s]
    for i, m in enumerate(modes):
        a, b = (ranks[i] * m, ranks[i + 1]) if i < s else (m * ranks[i + 1], ranks[i])
        total += a * b - b * (b + 1) // 2 if i in (s - 1, s) else (a - b) * b
    return total


PARAMETER_COUNTS = [  # C_out, C_in, rank: paper, reference, legacy (issue 23)
    (64, 64, 8, {"paper": 704, "reference": 648, "legacy": 960}),
    (128, 64, 16, {"paper": 2560, "reference": 2336, "legacy": 3584}),
    (16, 8, 4, {"paper": 128, "reference": 116, "legacy": 192}),
]


@pytest.mark.parametrize("c_out,c_in,rank,counts", PARAMETER_COUNTS)
@pytest.mark.parametrize("name", ["paper", "reference", "legacy"])
def test_named_factorizations_have_the_papers_and_the_references_parameter_counts(c_out, c_in, rank, counts, name):
    out, ins = _w_tt(c_out, c_in, (3, 3), name)
    assert _count_per_core(out, ins, rank) == counts[name]
    layer = STTPConv2d(c_in, c_out, 3, rank=rank, bias=False, mode_factorization=name, dtype=D)
    assert list(layer.U.modes) == out and list(layer.V.modes)[::-1] == ins  # W's TT: U's modes, Σ, V's reversed
    assert count_parameters(layer) == layer.dof() == counts[name]
    if name == "paper":  # the default, also under its old name "auto"
        for default in (STTPConv2d(c_in, c_out, 3, rank=rank, bias=False), STTPConv2d(
            c_in, c_out, 3, rank=rank, bias=False, mode_factorization="auto"
        )):  # fmt: skip
            assert (default.U.modes, default.V.modes) == (layer.U.modes, layer.V.modes)


def test_the_papers_section_8_example():
    """STTP's Sec. 8: a 16 × 8 · 3 · 3 conv at r = 4 — W's TT has R = (1, 2, 4, 4, 4, 4, 4, 4, 2, 1) and
    n = (2, 2, 2, 2, 3, 3, 2, 2, 2), matricized cores {(2×2)², (4×4)², (8×4)³, (12×4)²}; 128 parameters."""
    layer = STTPConv2d(8, 16, 3, rank=4, bias=False, dtype=D)
    n = list(layer.U.modes) + list(layer.V.modes)[::-1]
    R = list(layer.U.bonds) + list(layer.V.bonds)[::-1][1:]
    assert n == [2, 2, 2, 2, 3, 3, 2, 2, 2] and R == [1, 2, 4, 4, 4, 4, 4, 4, 2, 1]
    sizes = sorted((r0 * m, r1) for r0, m, r1 in layer.U.shapes + layer.V.shapes)
    assert sizes == sorted([(2, 2)] * 2 + [(4, 4)] * 2 + [(8, 4)] * 3 + [(12, 4)] * 2)
    assert [tuple(c.shape) for c in layer.V.cores()] == [(1, 2, 2), (2, 2, 4), (4, 2, 4), (4, 3, 4), (4, 3, 4)]
    assert count_parameters(layer) == 128


def _chain(cores):
    """Contract TT cores ``(R_{k−1}, n_k, R_k)`` left to right into a tensor ``(n_1, …, n_D)`` (R_0 = R_D = 1)."""
    T = cores[0]
    for c in cores[1:]:
        T = torch.tensordot(T, c, dims=1)
    return T.reshape(T.shape[1:-1])


@pytest.mark.parametrize("name", ["paper", "reference", "legacy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_weight_is_the_tt_contraction_reshaped_per_the_mode_order(name, dtype):
    g = torch.Generator().manual_seed(11)
    c_in, c_out, kernel = 6, 4, (3, 2)
    layer = STTPConv2d(c_in, c_out, kernel, padding=1, rank=3, mode_factorization=name, dtype=dtype, generator=g)
    with torch.no_grad():
        layer.s.copy_(torch.tensor([1.0, -0.6, 0.3], dtype=dtype))
    # W's TT in float64: U's cores, σ folded into the last one, then V's cores reversed and transposed
    u = [c.detach().to(D) for c in layer.U.cores()]
    u[-1] = u[-1] * layer.singular_values().detach().to(D)
    v = [c.detach().to(D).permute(2, 1, 0) for c in reversed(layer.V.cores())]
    T = _chain(u + v)  # (n_out..., then the in-modes as W's TT orders them)
    d_out_modes, n_in = len(layer.U.modes), len(layer.V.modes)
    if name != "reference":  # the paper's and the old layout: V's rows row-major over V's modes, the reverse of W's TT
        T = T.permute(*range(d_out_modes), *range(d_out_modes + n_in - 1, d_out_modes - 1, -1))
    kernel_ref = T.reshape(c_out, c_in, *kernel)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(layer.weight_kernel().to(D), kernel_ref, atol=tol, rtol=0)
    x = torch.randn(2, c_in, 7, 6, dtype=dtype, generator=g)
    ref = torch.nn.functional.conv2d(x.to(D), kernel_ref, layer.bias.detach().to(D), padding=1)
    assert layer(x).dtype == dtype and torch.allclose(layer(x).to(D), ref, atol=10 * tol, rtol=0)


@pytest.mark.parametrize("name", ["paper", "reference", "legacy"])
def test_named_factorizations_load_dense_weights_exactly(name):
    torch.manual_seed(12)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(6, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(64, 18)
    ).double()
    x = torch.randn(2, 6, 4, 4, dtype=D, generator=torch.Generator().manual_seed(12))
    ref = model(x)
    convert_to_sttp(model, rank=10**6, mode_factorization=name)  # full rank: exact, through both layers
    assert model[0].V.modes == {"paper": (2, 3, 3, 3), "reference": (9, 3, 2), "legacy": (2, 3, 9)}[name]
    assert model[2].V.modes == {"paper": (2, 2, 2, 2, 2, 2), "reference": (2,) * 6, "legacy": (2,) * 6}[name]
    assert torch.allclose(model(x), ref, atol=1e-12)


def test_reference_factorization_of_a_linear_layer():
    """For a linear layer the paper's and the old layout coincide; the authors' code orders the input primes the other
    way along W's TT (increasing away from Σ)."""
    lin = torch.nn.Linear(12, 10).double()
    paper = STTPLinear(12, 10, 3, bias=False, dtype=D)
    reference = STTPLinear(12, 10, 3, bias=False, mode_factorization="reference", dtype=D)
    assert paper.V.modes == (2, 2, 3) and reference.V.modes == (3, 2, 2)
    out, ins = _primes(10), _primes(12)
    assert count_parameters(paper) == _count_per_core(out, ins[::-1], 3)
    assert count_parameters(reference) == _count_per_core(out, ins, 3)
    x = torch.randn(5, 12, dtype=D, generator=torch.Generator().manual_seed(13))
    full = STTPLinear.from_linear(lin, mode_factorization="reference")
    assert torch.allclose(full(x), lin(x), atol=1e-12)
    with pytest.raises(ValueError, match="mode_factorization"):
        STTPLinear(12, 10, 3, mode_factorization="eq9")
    with pytest.raises(ValueError, match="mode_factorization"):
        STTPConv2d(4, 4, 3, rank=2, mode_factorization="kernel-first")


# A state dict saved by lowrankopt before issue 23 (STTPConv2d(2, 3, 3, rank=2), then the default factorization: V's
# modes (2, 9)), with its kernel as that version computed it.
_OLD_STATE = {
    "s": [1.0, 0.375],
    "bias": [0.5, -0.25, 0.125],
    "U.params.0": ("sin", 0.5, 3),  # 0.5 sin(1..3)
    "V.params.1": ("cos", 0.3, 33),  # 0.3 cos(1..33)
}
_OLD_KERNEL = [
    -0.207963693288235, -0.062895234454561, -0.008541900596838, 0.153933660352300, -0.119576110990626,
    -0.054411219721582, 0.164862224910242, -0.082802567003459, -0.095946172277297, 0.162657959147468,
    -0.039433017999569, -0.129838107755414, 0.147496453610934, 0.007077742611189, -0.153387214006016,
    0.120585465139577, 0.053024694303215, -0.164717582725901, 0.039381957205850, -0.135413510114180,
    0.161574810533946, 0.085574396008362, -0.232797838910571, 0.108181772426928, 0.142758834175513,
    -0.226999046889523, 0.046171036349071, 0.188571185455986, -0.203117640931976, -0.019517658014465,
    0.219362064211034, -0.163056000145281, -0.083651586930056, 0.232678686691462, -0.110005411867136,
    -0.141121878388314, -0.140023587404050, -0.118357109879133, 0.076775856767617, 0.162834988122925,
    -0.212302387140710, 0.013862945477102, 0.200764345329667, -0.180957839877900, -0.050154280102483,
    0.222700929885794, -0.135198294833678, -0.110176244482588, 0.226897286041826, -0.078668931132287,
    -0.161421632391333, 0.213019134472145, -0.015872845477854, -0.199808265606924,
]  # fmt: skip


def test_a_state_dict_of_the_old_default_loads_with_the_legacy_name():
    state = {"V.params.0": torch.zeros(1, 0, dtype=D)}
    for key, value in _OLD_STATE.items():
        if isinstance(value, tuple):
            fn, scale, n = value
            value = (scale * getattr(torch, fn)(torch.arange(1, n + 1, dtype=D)))[None]
        state[key] = torch.as_tensor(value, dtype=D)
    layer = STTPConv2d(2, 3, 3, rank=2, mode_factorization="legacy", dtype=D)
    layer.load_state_dict(state)
    kernel = torch.tensor(_OLD_KERNEL, dtype=D).reshape(3, 2, 3, 3)
    assert torch.allclose(layer.weight_kernel(), kernel, atol=1e-14, rtol=0)
    with pytest.raises(RuntimeError, match="state_dict"):  # the new default has other cores: a loud mismatch
        STTPConv2d(2, 3, 3, rank=2, dtype=D).load_state_dict(state)
    assert torch.equal(layer.state_dict()["_extra_state"], torch.tensor([0, 2, 9]))  # now saved with its layout
    # a layer pickled before the factorization names existed has no _in_reversed: the class default reads it as built
    del layer.__dict__["_in_reversed"]
    assert torch.allclose(layer.weight_kernel(), kernel, atol=1e-14, rtol=0)


# ------------------------------------------------------------------------------------------------ D-optimal pooling


def test_dopt_penalty_pools_all_singular_values_as_the_reference():
    """The authors' spectral_penalty_d_optimal: ``−Σ_layers Σ_i log(|s_i| / max|s|) / (total number of s_i)``, over
    the layers with the D-optimal spectrum (here ranks 3, 2 and 4: pooling weighs a layer by its rank)."""
    g = torch.Generator().manual_seed(14)
    model = torch.nn.Sequential(
        STTPLinear(8, 6, 3, spectrum="learned+dopt", dtype=D, generator=g),
        STTPConv2d(6, 4, 3, rank=2, spectrum="learned+dopt", dtype=D, generator=g),
        STTPLinear(6, 4, 3, spectrum="learned", dtype=D, generator=g),  # not regularized
        STTPLinear(8, 8, 4, spectrum="learned+dopt", lipschitz=None, dtype=D, generator=g),
    )
    values = {0: [2.0, -1.0, 0.5], 1: [0.3, -0.03], 2: [5.0, 0.01, 1.0], 3: [1.0, 0.9, -0.2, 0.7]}
    with torch.no_grad():
        for i, s in values.items():
            model[i].s.copy_(torch.tensor(s, dtype=D))
    regularized = [values[i] for i in (0, 1, 3)]
    logs = [[-math.log(abs(x) / max(abs(y) for y in s)) for x in s] for s in regularized]
    pooled = sum(map(sum, logs)) / sum(map(len, logs))
    layer_mean = sum(sum(t) / len(t) for t in logs) / len(logs)
    assert pooled != pytest.approx(layer_mean, rel=1e-3)  # the two reductions differ here
    assert dopt_penalty(model).item() == pytest.approx(pooled, rel=1e-14)
    assert dopt_penalty(model, reduction="pooled").item() == pytest.approx(pooled, rel=1e-14)
    assert dopt_penalty(model, reduction="layer-mean").item() == pytest.approx(layer_mean, rel=1e-14)
    penalty = dopt_penalty(model)
    penalty.backward()  # differentiable in every regularized layer's s, not in the others'
    assert all(model[i].s.grad is not None for i in (0, 1, 3)) and model[2].s.grad is None
    f32 = torch.nn.Sequential(
        STTPLinear(8, 6, 3, spectrum="learned+dopt", dtype=torch.float32),
        STTPLinear(6, 4, 2, spectrum="learned+dopt", dtype=torch.float32),
    )
    with torch.no_grad():
        f32[0].s.copy_(torch.tensor([2.0, -1.0, 0.5]))
        f32[1].s.copy_(torch.tensor([0.3, -0.03]))
    out = dopt_penalty(f32)
    ref = (-math.log(0.5) - math.log(0.25) - math.log(0.1)) / 5
    assert out.dtype == torch.float32 and out.item() == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        dopt_penalty(model, reduction="sum")


def test_layouts_with_equally_shaped_cores_load_only_with_the_same_row_order():
    """ "paper" and "reference" on a 2-channel 1×2 conv: in_modes (2, 2) both, the same core shapes, V's rows in
    another order — without the layout record one would load into the other silently, as another kernel. Layouts
    whose rows are in the same order load (a 1-channel 3×3 conv: (1, 9) under "legacy", (3, 3) under "paper")."""
    g = torch.Generator().manual_seed(15)
    paper = STTPConv2d(2, 4, (1, 2), rank=3, dtype=D, generator=g)
    with torch.no_grad():
        for p in paper.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=D, generator=g))
    reference = STTPConv2d(2, 4, (1, 2), rank=3, mode_factorization="reference", dtype=D)
    assert paper.V.modes == reference.V.modes == (2, 2)
    saved = paper.state_dict()
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in reference.state_dict().items()}
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="in_modes=\\(2, 2\\) \\(row-major rows\\)"):
            reference.load_state_dict(saved, strict=strict)
        assert all(torch.equal(v, before[k]) for k, v in reference.state_dict().items())  # nothing loaded
    # a state dict without the layer's entries (a backbone checkpoint, strict=False) leaves it alone
    for layer in (reference, paper):
        model = torch.nn.Sequential(torch.nn.Linear(3, 3).double(), layer)
        result = model.load_state_dict(
            {"0.weight": torch.eye(3, dtype=D), "0.bias": torch.zeros(3, dtype=D)}, strict=False
        )
        assert torch.equal(model[0].weight, torch.eye(3, dtype=D)) and "1._extra_state" not in result.missing_keys
    old = {k: v for k, v in saved.items() if k != "_extra_state"}  # as saved before issue 23: row-major rows
    with pytest.raises(RuntimeError, match="mode_factorization='legacy'"):
        reference.load_state_dict(old)
    model = torch.nn.Sequential(STTPConv2d(2, 4, (1, 2), rank=3, mode_factorization="reference", dtype=D))
    with pytest.raises(RuntimeError, match="0: the state dict"):  # named with its place in the model
        model.load_state_dict({f"0.{k}": v for k, v in saved.items()})
    # the same row order: (1, 9) and (3, 3) are both row-major over the 9 input indices, and the kernel is the same
    legacy = STTPConv2d(1, 4, 3, rank=4, mode_factorization="legacy", dtype=D, generator=g)
    with torch.no_grad():
        for p in legacy.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=D, generator=g))
    for state in (legacy.state_dict(), {k: v for k, v in legacy.state_dict().items() if k != "_extra_state"}):
        twin = STTPConv2d(1, 4, 3, rank=4, dtype=D)
        assert twin.V.modes == (3, 3) and legacy.V.modes == (1, 9)
        twin.load_state_dict(state)
        assert torch.allclose(twin.weight_kernel(), legacy.weight_kernel(), rtol=0, atol=1e-14)
    # an old state whose parameters the new default shapes differently: the error says how to load it
    old = STTPConv2d(8, 8, 3, rank=4, mode_factorization="legacy", dtype=D).state_dict()
    old.pop("_extra_state")
    with pytest.raises(RuntimeError, match="mode_factorization='legacy'"):
        STTPConv2d(8, 8, 3, rank=4, dtype=D).load_state_dict(old)
