"""geoopt bridge: packed manifolds against dense references, and geoopt's optimizers training the
low-rank layers unmodified."""

import functools
import io
import math
import os

import geoopt
import pytest
import torch
from reference import matrix_projector, rel, tt_full, tt_projector

from lowrankopt import LowRankMatrix, TensorTrain, TTMatrix, riemannian_grad
from lowrankopt.formats import delta_tt_matrix, tt_product
from lowrankopt.manifolds.geoopt import GeooptFixedRank, GeooptFixedTTRank
from lowrankopt.nn import LowRankLinear, TTLinear

DT = torch.float64
KINDS = ["matrix", "tt"]


@pytest.fixture
def g():
    return torch.Generator().manual_seed(3)


def make(kind):
    return GeooptFixedRank(7, 5, 2) if kind == "matrix" else GeooptFixedTTRank((3, 4, 2, 3), (2, 3, 2))


def rand_tangent(M, x, g):
    return M.proju(x, torch.randn(M.numel, dtype=x.dtype, generator=g))


# ---------------------------------------------------------------------- independent dense references
def qr_pos(A):
    Q, R = torch.linalg.qr(A)
    s = torch.sign(torch.diagonal(R))
    return Q * s, R * s[:, None]


def dense_point(M, p):
    """The dense matrix / tensor of a packed point, from the layout alone."""
    parts = M.unpack_tensor(p)
    if isinstance(M, GeooptFixedRank):
        C, V = parts
        return C @ V.T
    return tt_full(list(parts))


def dense_tangent(M, p, u):
    """ξ from packed coordinates: A Vᵀ + U Bᵀ with U from a positive-diagonal QR of C, or Σ_k U_{<k} δ_k V_{>k} with
    U_k from a positive-diagonal QR sweep of the packed (right-orthogonal) cores."""
    if isinstance(M, GeooptFixedRank):
        C, V = M.unpack_tensor(p)
        A, B = M.unpack_tensor(u)
        return A @ V.T + qr_pos(C)[0] @ B.T
    cores, deltas = list(M.unpack_tensor(p)), list(M.unpack_tensor(u))
    d, left, Y = len(cores), [], cores[0]
    for k in range(d - 1):
        a, n, b = Y.shape
        Q, R = qr_pos(Y.reshape(a * n, b))
        left.append(Q.reshape(a, n, b))
        Y = torch.tensordot(R, cores[k + 1], dims=1)
    return sum(tt_full(left[:k] + [deltas[k]] + cores[k + 1 :]) for k in range(d))


def projector(M, p):
    if isinstance(M, GeooptFixedRank):
        return matrix_projector(dense_point(M, p), M.rank)
    return tt_projector(M.unpack(p))


# ---------------------------------------------------------------------- geometry
@pytest.mark.parametrize("kind", KINDS)
def test_random_point_is_on_manifold_and_reproducible(kind):
    M = make(kind)
    x = M.random(dtype=DT, generator=torch.Generator().manual_seed(0))
    assert isinstance(x, geoopt.ManifoldTensor) and x.shape == (M.numel,) and x.dtype == DT
    assert M.check_point_on_manifold(x, atol=1e-12, rtol=1e-12)
    assert torch.equal(x, M.random(dtype=DT, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(M.origin(dtype=DT), M.origin(dtype=DT))
    assert M.random(4, M.numel, dtype=DT).shape == (4, M.numel)
    assert M.dim == round(float(torch.trace(projector(M, x))))


@pytest.mark.parametrize("kind", KINDS)
def test_proju_is_idempotent_and_tangent(kind, g):
    M = make(kind)
    x = M.random(dtype=DT, generator=g)
    raw = torch.randn(M.numel, dtype=DT, generator=g)
    u = M.proju(x, raw)
    assert (M.proju(x, u) - u).abs().max() < 1e-14
    assert M.check_vector_on_tangent(x, u, atol=1e-13, rtol=1e-13)
    assert not M.check_vector_on_tangent(x, raw)
    # orthogonal projection in the coordinates: the residual is orthogonal to every tangent vector
    w = rand_tangent(M, x, g)
    assert abs(float(M.inner(x, raw - u, w))) < 1e-13
    assert torch.equal(M.egrad2rgrad(x, raw), u)


@pytest.mark.parametrize("kind", KINDS)
def test_inner_matches_ambient_inner_product(kind, g):
    M = make(kind)
    x = M.random(dtype=DT, generator=g)
    u, v = rand_tangent(M, x, g), rand_tangent(M, x, g)
    U, V = dense_tangent(M, x, u), dense_tangent(M, x, v)
    assert torch.isclose(M.inner(x, u, v), (U * V).sum(), rtol=1e-12)
    assert torch.isclose(M.norm(x, u), U.norm(), rtol=1e-12)
    assert torch.isclose(M.component_inner(x, u, v).sum(), (U * V).sum(), rtol=1e-12)
    assert M.inner(x, u, v, keepdim=True).shape == (1,)
    P = projector(M, x)
    assert rel(P @ U.reshape(-1), U.reshape(-1)) < 1e-12  # the coordinates describe a tangent vector
    # and agree with the library's TangentVector at the unpacked point
    assert rel(M.unpack_tangent(x, u).to_ambient().full(), U) < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_pack_unpack_round_trips(kind, g):
    M = make(kind)
    x = M.random(dtype=DT, generator=g)
    xo = M.unpack(x)
    assert torch.equal(M.pack(xo), x)
    assert rel(xo.full(), dense_point(M, x)) < 1e-14
    u = rand_tangent(M, x, g)
    assert (M.pack_tangent(M.unpack_tangent(x, u)) - u).abs().max() < 1e-14
    # a generic (non-canonical) representation packs to the same tensor, tangent vectors too
    if kind == "matrix":
        A = torch.randn(2, 2, dtype=DT, generator=g) + 3 * torch.eye(2, dtype=DT)
        other = LowRankMatrix(xo.U @ A, torch.linalg.solve(A, xo.S), xo.V)
    else:
        A = torch.randn(2, 2, dtype=DT, generator=g) + 3 * torch.eye(2, dtype=DT)
        c = list(xo.cores)
        other = TensorTrain(
            [torch.tensordot(c[0], A, dims=1), torch.tensordot(torch.linalg.inv(A), c[1], dims=1)] + c[2:]
        )
    packed_other = M.pack(other)
    assert M.check_point_on_manifold(packed_other, atol=1e-13, rtol=1e-13)
    assert rel(dense_point(M, packed_other), dense_point(M, x)) < 1e-13
    tv = M.base.random_tangent(other, generator=g)
    packed = M.pack_tangent(tv)
    assert rel(dense_tangent(M, packed_other, packed), tv.to_ambient().full()) < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_egrad2rgrad_equals_riemannian_grad(kind, g):
    M = make(kind)
    x = M.random(dtype=DT, generator=g)
    shape = (M.m, M.n) if kind == "matrix" else M.shape
    A = torch.randn(shape, dtype=DT, generator=g)
    idx = torch.stack([torch.randint(0, s, (30,), generator=g) for s in shape], 1)
    w = torch.randn(30, dtype=DT, generator=g)

    def f(X):  # a generic op (inner with a dense tensor) and the δ-structured gather
        vals = X.gather(idx[:, 0], idx[:, 1]) if kind == "matrix" else X.gather(idx)
        return 0.5 * X.inner(X) - X.inner(A) + (w * vals**2).sum()

    p = geoopt.ManifoldParameter(x.clone(), manifold=M)
    f(M.straight_through(p)).backward()
    rg = M.egrad2rgrad(p, p.grad)
    expected = M.pack_tangent(riemannian_grad(f, M.unpack(x))[1])
    assert rel(rg, expected) < 1e-12
    # independent: the dense projected gradient
    X = dense_point(M, x).clone().requires_grad_(True)
    vals = X[tuple(idx.T)]
    (G,) = torch.autograd.grad(0.5 * (X * X).sum() - (X * A).sum() + (w * vals**2).sum(), X)
    P = projector(M, x)
    assert rel(dense_tangent(M, x, rg).reshape(-1), P @ G.reshape(-1)) < 1e-12
    # and the value of the straight-through object is the point
    assert rel(M.straight_through(p).full(), dense_point(M, x)) < 1e-14


def test_straight_through_grad_layout_for_matrices(g):
    M = GeooptFixedRank(6, 4, 2)
    x = M.random(dtype=DT, generator=g)
    G = torch.randn(6, 4, dtype=DT, generator=g)
    p = geoopt.ManifoldParameter(x.clone(), manifold=M)
    M.straight_through(p).inner(G).backward()
    C, V = M.unpack_tensor(x)
    gA, gB = M.unpack_tensor(p.grad)
    assert torch.allclose(gA, G @ V, atol=1e-14)  # the raw δ-gradient: (G V, Gᵀ U), U the orthonormal factor of C
    assert torch.allclose(gB, G.T @ qr_pos(C)[0], atol=1e-14)


@pytest.mark.parametrize("kind", KINDS)
def test_retr_lands_on_manifold_and_equals_base_retraction(kind, g):
    M = make(kind)
    x = M.random(dtype=DT, generator=g)
    u = rand_tangent(M, x, g) * 0.3
    y = M.retr(x, u)
    assert M.check_point_on_manifold(y, atol=1e-13, rtol=1e-13)
    xo = M.unpack(x)
    assert rel(dense_point(M, y), M.base.retr(xo, M.unpack_tangent(xo, u)).full()) < 1e-13
    assert torch.equal(M.expmap(x, u), y)
    if kind == "matrix":  # metric projection: the truncated SVD of x + ξ
        Z = dense_point(M, x) + dense_tangent(M, x, u)
        Uz, s, Vh = torch.linalg.svd(Z)
        assert rel(dense_point(M, y), Uz[:, :2] @ torch.diag(s[:2]) @ Vh[:2]) < 1e-12
    # the frames follow the old ones (closest rotation): a small step moves the packed factors little
    small = M.retr(x, u * 1e-4)
    assert (small - x).norm() < 1e-3 * u.norm()
    # a non-tangent u is projected first
    raw = torch.randn(M.numel, dtype=DT, generator=g) * 0.1
    assert (M.retr(x, raw) - M.retr(x, M.proju(x, raw))).abs().max() < 1e-14


@pytest.mark.parametrize("kind", KINDS)
def test_projx_is_idempotent_and_keeps_the_point(kind, g):
    M = make(kind)
    x = M.random(dtype=DT, generator=g)
    assert (M.projx(x) - x).abs().max() < 1e-14
    y = M.retr(x, rand_tangent(M, x, g))
    assert (M.projx(y) - y).abs().max() < 1e-14
    # a perturbed representation (non-orthonormal frames) of the same point is restored
    parts = list(M.unpack_tensor(x.clone()))
    if kind == "matrix":
        A = torch.eye(2, dtype=DT) + 0.2 * torch.randn(2, 2, dtype=DT, generator=g)
        parts = [parts[0] @ A, parts[1] @ torch.linalg.inv(A).T]
    else:
        A = torch.eye(2, dtype=DT) + 0.2 * torch.randn(2, 2, dtype=DT, generator=g)
        parts[-1] = torch.tensordot(A, parts[-1], dims=1)
        parts[-2] = torch.tensordot(parts[-2], torch.linalg.inv(A), dims=1)
    bent = M.pack_point(*parts)
    assert not M.check_point_on_manifold(bent)
    fixed = M.projx(bent)
    assert M.check_point_on_manifold(fixed, atol=1e-13, rtol=1e-13)
    assert rel(dense_point(M, fixed), dense_point(M, x)) < 1e-13
    assert (M.projx(fixed) - fixed).abs().max() < 1e-14


@pytest.mark.parametrize("kind", KINDS)
def test_transp_is_projection_onto_new_tangent_space(kind, g):
    M = make(kind)
    x = M.random(dtype=DT, generator=g)
    u, v = rand_tangent(M, x, g), rand_tangent(M, x, g)
    y = M.retr(x, 0.3 * u)
    w = M.transp(x, y, v)
    assert M.check_vector_on_tangent(y, w, atol=1e-13, rtol=1e-13)
    Py = projector(M, y)
    assert rel(dense_tangent(M, y, w).reshape(-1), Py @ dense_tangent(M, x, v).reshape(-1)) < 1e-12
    y2, w2 = M.retr_transp(x, 0.3 * u, v)
    assert torch.equal(y2, y) and (w2 - w).abs().max() < 1e-14
    assert (M.transp(x, x, v) - v).abs().max() < 1e-13  # identity at the same point


@pytest.mark.parametrize("kind", KINDS)
def test_batched_tensors(kind, g):
    M = make(kind)
    xs = M.random(3, M.numel, dtype=DT, generator=g)
    us = M.proju(xs, torch.randn(3, M.numel, dtype=DT, generator=g))
    vs = torch.stack([rand_tangent(M, xs[i], g) for i in range(3)])
    ys = M.retr(xs, us)
    ws = M.transp(xs, ys, vs)
    for i in range(3):
        assert (us[i] - M.proju(xs[i], us[i])).abs().max() < 1e-14
        assert (ys[i] - M.retr(xs[i], us[i])).abs().max() < 1e-14
        assert (ws[i] - M.transp(xs[i], ys[i], vs[i])).abs().max() < 1e-14
    assert (M.projx(xs) - xs).abs().max() < 1e-14
    one = torch.randn(M.numel, dtype=DT, generator=g)  # broadcast: batched x, one u
    assert (M.proju(xs, one)[1] - M.proju(xs[1], one)).abs().max() < 1e-14
    assert M.inner(xs, us, vs).shape == (3,)
    assert M.check_point_on_manifold(ys, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match=r"p must be one packed point"):
        M.straight_through(xs)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="rank must be <="):
        GeooptFixedRank(5, 3, 4)
    with pytest.raises(ValueError, match="not attainable"):
        GeooptFixedTTRank((2, 3, 4), (5, 2))
    M = GeooptFixedRank(5, 4, 2)
    x = M.random(dtype=DT)
    with pytest.raises(ValueError, match="u must have last dimension 18"):
        M.proju(x, torch.zeros(25, dtype=DT))
    with pytest.raises(ValueError, match="u has dtype torch.float32"):
        M.proju(x, torch.zeros(18))
    with pytest.raises(ValueError, match="x must be float32 or float64"):
        M.projx(torch.zeros(18, dtype=torch.int64))
    with pytest.raises(ValueError, match="last dimension 18"):
        geoopt.ManifoldParameter(torch.zeros(19, dtype=DT), manifold=M)
    with pytest.raises(ValueError, match="float32 or float64"):
        geoopt.ManifoldParameter(torch.zeros(18, dtype=torch.int32), manifold=M)
    with pytest.raises(ValueError, match="must end with shape"):
        M.pack_point(torch.zeros(5, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="v lives on"):
        M.pack_tangent(GeooptFixedRank(5, 4, 1).base.random_tangent(LowRankMatrix.random(5, 4, 1)))
    bad_layers = [
        lambda: LowRankLinear(0, 3, 1),
        lambda: LowRankLinear(4, 3, 4),
        lambda: LowRankLinear(4, 3, True),
        lambda: TTLinear(12, 6, 2, in_factors=(3, 5)),
        lambda: TTLinear(12, 6, 2, in_factors=(3, 4), out_factors=(6,)),
        lambda: TTLinear(12, 6, [2, 2], in_factors=(3, 4), out_factors=(2, 3)),
        lambda: TTLinear(12, 6, [7], in_factors=(3, 4), out_factors=(2, 3)),
        lambda: TTLinear(12, 6, 2, d=1),
        lambda: TTLinear(12, 6, 2, in_factors=(3, 4), d=3),
    ]
    for make_layer in bad_layers:
        with pytest.raises(ValueError):
            make_layer()
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got torch.int64"):
        LowRankLinear(4, 3, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"input must have shape \(\.\.\., 4\)"):
        LowRankLinear(4, 3, 2, dtype=DT)(torch.zeros(2, 5, dtype=DT))


# ---------------------------------------------------------------------- layers
def test_low_rank_linear_forward_equals_dense(g):
    layer = LowRankLinear(12, 9, 3, dtype=DT, generator=g)
    x = torch.randn(2, 5, 12, dtype=DT, generator=g)
    W = layer.weight_matrix().full()
    assert W.shape == (9, 12) and torch.linalg.matrix_rank(W) == 3
    expected = x @ W.T + layer.bias
    assert rel(layer(x), expected) < 1e-14
    with torch.no_grad():
        assert rel(layer(x), expected) < 1e-14
    dense = layer.to_dense()
    assert isinstance(dense, torch.nn.Linear) and rel(dense(x), expected) < 1e-14
    # the hand-written forward gives the same packed gradient as the straight-through object
    R = torch.randn(2, 5, 9, dtype=DT, generator=g)
    (layer(x) * R).sum().backward()
    p = geoopt.ManifoldParameter(layer.weight.detach().clone(), manifold=layer.manifold)
    ((x.reshape(-1, 12) @ layer.manifold.straight_through(p).T) * R.reshape(-1, 9)).sum().backward()
    assert rel(layer.weight.grad, p.grad) < 1e-14
    # init variance: mean squared entry 1 / (3 in), like nn.Linear
    assert math.isclose(float(W.pow(2).mean()), 1 / 36, rel_tol=1e-12)


def test_low_rank_linear_from_linear_is_truncated_svd(g):
    lin = torch.nn.Linear(10, 7, dtype=DT)
    layer = LowRankLinear.from_linear(lin, 3)
    U, s, Vh = torch.linalg.svd(lin.weight.detach())
    assert rel(layer.weight_matrix().full(), U[:, :3] @ torch.diag(s[:3]) @ Vh[:3]) < 1e-13
    assert torch.equal(layer.bias.detach(), lin.bias.detach())
    assert layer.manifold.check_point_on_manifold(layer.weight, atol=1e-13, rtol=1e-13)


def test_tt_linear_forward_equals_dense(g):
    layer = TTLinear(12, 6, 2, in_factors=(3, 4), out_factors=(2, 3), dtype=DT, generator=g)
    Wt = layer.weight_matrix()
    assert isinstance(Wt, TTMatrix) and Wt.row_shape == (2, 3) and Wt.col_shape == (3, 4)
    W = Wt.full()
    x = torch.randn(3, 2, 12, dtype=DT, generator=g)
    expected = x @ W.T + layer.bias
    assert rel(layer(x), expected) < 1e-13
    with torch.no_grad():
        assert rel(layer(x), expected) < 1e-13
    assert rel(layer.to_dense()(x), expected) < 1e-13
    assert math.isclose(float(W.pow(2).mean()), 1 / 36, rel_tol=1e-12)
    auto = TTLinear(784, 10, 8, dtype=DT)
    assert math.prod(auto.in_factors) == 784 and math.prod(auto.out_factors) == 10 and len(auto.in_factors) == 3
    assert TTLinear(256, 256, 16, dtype=DT).in_factors == (4, 8, 8)
    assert TTLinear(16, 16, 100, d=2, dtype=DT).ranks == (16,)  # an int rank is clipped


def _straight_through_dense(layer: TTLinear) -> torch.Tensor:
    """W + T(δ) of the layer as a dense (out, in) matrix, formed by one einsum of the straight-through cores: the
    reference the δ-product node is checked against (its gradient in δ is the δ-gradient by definition)."""
    ops = layer.manifold.straight_through(layer.weight).materialize().cores  # (r, out_k, in_k, r') operator cores
    d = len(ops)
    spec = ",".join(f"{'abcde'[k]}{'ABCD'[k]}{'PQRS'[k]}{'abcde'[k + 1]}" for k in range(d))
    return torch.einsum(spec + "->" + "ABCD"[:d] + "PQRS"[:d], *ops).reshape(layer.out_features, layer.in_features)


def _force_pattern(monkeypatch, pattern: str | None) -> None:
    """TTLinear's δ-product node with its sweep pattern forced (None: the cost model's choice)."""
    forced = functools.partial(tt_product.tt_delta_product, pattern=pattern)
    monkeypatch.setattr(delta_tt_matrix, "tt_delta_product", forced)


_TT_SHAPES = [(12, 6, (3, 4), (2, 3)), (24, 20, (2, 3, 4), (5, 2, 2)), (32, 48, (2, 4, 2, 2), (3, 2, 4, 2))]


@pytest.mark.parametrize("pattern", ["left", "right", None])
@pytest.mark.parametrize("shape", _TT_SHAPES)
def test_tt_linear_gradients_in_every_pattern(g, monkeypatch, pattern, shape):
    """The δ-gradient (``weight.grad``), ``x.grad`` and ``bias.grad`` of a training step (the rank-r δ-product node,
    either sweep pattern) equal dense autograd through the straight-through rank-2r object."""
    n_in, n_out, in_f, out_f = shape
    layer = TTLinear(n_in, n_out, 3, in_factors=in_f, out_factors=out_f, dtype=DT, generator=g)
    x = torch.randn(5, n_in, dtype=DT, generator=g, requires_grad=True)
    w = torch.randn(5, n_out, dtype=DT, generator=g)
    ref_layer = TTLinear(n_in, n_out, 3, in_factors=in_f, out_factors=out_f, dtype=DT)
    ref_layer.load_state_dict(layer.state_dict())
    xr = x.detach().clone().requires_grad_()
    ((xr @ _straight_through_dense(ref_layer).T + ref_layer.bias) * w).sum().backward()
    _force_pattern(monkeypatch, pattern)
    (layer(x) * w).sum().backward()
    for a, b in ((layer.weight.grad, ref_layer.weight.grad), (x.grad, xr.grad), (layer.bias.grad, ref_layer.bias.grad)):
        assert torch.allclose(a, b, atol=1e-13 * max(1.0, float(b.abs().max())), rtol=0)
    layer.weight.grad = None  # the graph kept and differentiated twice: the same gradient twice over
    loss = (layer(x) * w).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    assert torch.allclose(
        layer.weight.grad, 2 * ref_layer.weight.grad, atol=1e-13 * float(ref_layer.weight.grad.abs().max()), rtol=0
    )
    x.grad = None  # an input without a gradient, and an empty batch
    (layer(x.detach()) * w).sum().backward()
    assert layer(torch.zeros(0, n_in, dtype=DT)).shape == (0, n_out)
    with pytest.raises(ValueError, match="pattern"):
        tt_product.tt_delta_product(x, layer.weight, [], [], None, pattern="middle")


@pytest.mark.parametrize("pattern", ["left", "right"])
def test_tt_linear_second_derivatives_through_the_node(g, monkeypatch, pattern):
    """Under ``create_graph`` the node's backward differentiates the straight-through matvec: a Hessian-vector product
    in (x, δ) through the layer equals the dense reference's."""
    n_in, n_out, in_f, out_f = _TT_SHAPES[1]
    layer = TTLinear(n_in, n_out, 3, in_factors=in_f, out_factors=out_f, dtype=DT, generator=g)
    x = torch.randn(4, n_in, dtype=DT, generator=g, requires_grad=True)
    v = torch.randn(layer.weight.shape, dtype=DT, generator=g)
    _force_pattern(monkeypatch, pattern)

    def hvp(forward):
        loss = forward(x).tanh().sum()
        (gw,) = torch.autograd.grad(loss, layer.weight, create_graph=True)
        return torch.autograd.grad((gw * v).sum(), (x, layer.weight))

    got = hvp(layer)
    expected = hvp(lambda t: t @ _straight_through_dense(layer).T + layer.bias)
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-13 * max(1.0, float(b.abs().max())), rtol=0)
    data = x.detach()  # an input without a gradient (data): only the weight is differentiated

    def weight_hvp(forward):
        (gw,) = torch.autograd.grad(forward(data).tanh().sum(), layer.weight, create_graph=True)
        return torch.autograd.grad((gw * v).sum(), layer.weight)[0]

    b = weight_hvp(lambda t: t @ _straight_through_dense(layer).T + layer.bias)
    assert torch.allclose(weight_hvp(layer), b, atol=1e-13 * float(b.abs().max()), rtol=0)


def test_tt_linear_backward_under_autocast_keeps_the_parameters_precision(g):
    """Of one forward pass under autocast, a backward pass run inside the autocast block gives the gradient of one run
    outside it (the node's products stay in the parameters' dtype, as in its forward pass)."""
    layer = TTLinear(24, 20, 3, in_factors=(2, 3, 4), out_factors=(5, 2, 2), generator=g)
    x = torch.randn(6, 24, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = layer(x).float().square().sum()
    loss.backward()
    outside = layer.weight.grad.clone()
    layer.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().square().sum().backward()
    assert torch.allclose(layer.weight.grad, outside, rtol=1e-6, atol=1e-6 * float(outside.abs().max()))


def _regression(kind, seed=0, B=64):
    g = torch.Generator().manual_seed(seed)
    init = torch.Generator().manual_seed(100 + seed)
    if kind == "matrix":
        target = LowRankMatrix.random(9, 12, 3, generator=g, dtype=torch.float64).full()
        layer = LowRankLinear(12, 9, 3, bias=False, dtype=DT, generator=init)
    else:
        target = TTMatrix.random((2, 2, 2), (2, 2, 2), 2, generator=g, dtype=torch.float64).full()
        layer = TTLinear(8, 8, 2, bias=False, dtype=DT, generator=init)
    X = torch.randn(B, target.shape[1], dtype=DT, generator=g)
    return layer, X, X @ target.T, target


def _train(layer, opt, X, Y, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss = ((layer(X) - Y) ** 2).sum() / X.shape[0]
        loss.backward()
        opt.step()
    return loss


OPTIMIZERS = {
    "sgd": (lambda p: geoopt.optim.RiemannianSGD(p, lr=0.2), 200),
    "momentum": (lambda p: geoopt.optim.RiemannianSGD(p, lr=0.05, momentum=0.9), 400),
    "nesterov": (lambda p: geoopt.optim.RiemannianSGD(p, lr=0.05, momentum=0.9, nesterov=True), 300),
    "adam": (lambda p: geoopt.optim.RiemannianAdam(p, lr=0.02, betas=(0.9, 0.99)), 400),
    "adam-stabilize": (lambda p: geoopt.optim.RiemannianAdam(p, lr=0.02, betas=(0.9, 0.99), stabilize=1), 400),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", KINDS)
def test_geoopt_optimizers_fit_exact_low_rank_map(kind, name):
    layer, X, Y, target = _regression(kind)
    make_opt, steps = OPTIMIZERS[name]
    _train(layer, make_opt(layer.parameters()), X, Y, steps)
    assert rel(layer.weight_matrix().full(), target) < 1e-6
    assert layer.manifold.check_point_on_manifold(layer.weight, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", ["momentum", "adam"])
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_continues_identically(kind, name):
    layer, X, Y, _ = _regression(kind)
    make_opt, _ = OPTIMIZERS[name]
    opt = make_opt(layer.parameters())
    _train(layer, opt, X, Y, 5)
    buf = io.BytesIO()
    torch.save({"model": layer.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)  # weights_only: the packed parameter is a plain tensor in the state dict
    layer2, _, _, _ = _regression(kind, seed=99)
    opt2 = make_opt(layer2.parameters())
    layer2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert isinstance(layer2.weight, geoopt.ManifoldParameter) and torch.equal(layer2.weight, layer.weight)
    _train(layer, opt, X, Y, 5)
    _train(layer2, opt2, X, Y, 5)
    assert torch.equal(layer2.weight, layer.weight)
    for s1, s2 in zip(opt.state.values(), opt2.state.values()):
        for key in s1:
            assert torch.equal(torch.as_tensor(s1[key]), torch.as_tensor(s2[key]))


WEIGHT_DECAY = r"param group 0 has weight_decay=.*use weight_decay=0 for lowrankopt"


@pytest.mark.parametrize(
    "make_opt,error,message",
    [
        (lambda p: geoopt.optim.RiemannianSGD(p, lr=0.1, weight_decay=1e-3), ValueError, WEIGHT_DECAY),
        (lambda p: geoopt.optim.RiemannianAdam(p, lr=0.1, weight_decay=1e-3), ValueError, WEIGHT_DECAY),
        # default weight_decay=0.01, but first of all a Euclidean optimizer
        (lambda p: torch.optim.AdamW(p, lr=0.1), TypeError, r"AdamW is not a Riemannian optimizer"),
    ],
)
def test_weight_decay_on_packed_parameters_raises(make_opt, error, message, g):
    layer = LowRankLinear(6, 5, 2, dtype=DT, generator=g)
    opt = make_opt(layer.parameters())
    layer(torch.randn(3, 6, dtype=DT, generator=g)).sum().backward()
    before = layer.weight.detach().clone()
    with pytest.raises(error, match=message):
        opt.step()
    assert torch.equal(layer.weight.detach(), before)


def test_weight_decay_allowed_on_other_groups(g):
    layer = LowRankLinear(6, 5, 2, dtype=DT, generator=g)
    opt = geoopt.optim.RiemannianAdam(
        [{"params": [layer.weight], "weight_decay": 0.0}, {"params": [layer.bias]}], lr=0.01, weight_decay=0.1
    )
    layer(torch.randn(3, 6, dtype=DT, generator=g)).sum().backward()
    opt.step()
    assert layer.manifold.check_point_on_manifold(layer.weight, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_training(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "matrix":
        layer = LowRankLinear(12, 9, 3, dtype=torch.float32, generator=g)
        target = LowRankMatrix.random(9, 12, 3, dtype=torch.float32, generator=g).full()
    else:
        layer = TTLinear(8, 8, 2, dtype=torch.float32, generator=g)
        target = TTMatrix.random((2, 2, 2), (2, 2, 2), 2, dtype=torch.float32, generator=g).full()
    X = torch.randn(64, target.shape[1], generator=g)
    Y = X @ target.T
    opt = geoopt.optim.RiemannianAdam(layer.parameters(), lr=0.05)
    first = float(((layer(X) - Y) ** 2).mean())
    loss = _train(layer, opt, X, Y, 100)
    assert layer.weight.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    assert float(loss) / 9 < 1e-2 * first
    assert layer.manifold.check_point_on_manifold(layer.weight, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_training_matches_cpu(kind):
    layer, X, Y, _ = _regression(kind)
    layer_c = _regression(kind)[0].to("cuda")
    assert layer_c.weight.device.type == "cuda" and isinstance(layer_c.weight, geoopt.ManifoldParameter)
    make_opt, _ = OPTIMIZERS["momentum"]
    _train(layer, make_opt(layer.parameters()), X, Y, 20)
    _train(layer_c, make_opt(layer_c.parameters()), X.cuda(), Y.cuda(), 20)
    assert rel(layer_c.weight_matrix().full().cpu(), layer.weight_matrix().full()) < 1e-10


# ---------------------------------------------------------------------- the step guard: Euclidean optimizers
def _manifold_layers():
    """Every layer of the library with manifold parameters, with an input; float64."""
    from lowrankopt.nn import GSOrthogonal, STTPLinear, SVDPConv2d, TTConv2d

    g = torch.Generator().manual_seed(5)
    return {
        "LowRankLinear": (LowRankLinear(6, 5, 2, dtype=DT, generator=g), (6,)),
        "TTLinear": (TTLinear(8, 8, 2, dtype=DT, generator=g), (8,)),
        "STTPLinear": (STTPLinear(8, 6, 3, parametrization="stiefel", dtype=DT, generator=g), (8,)),
        "SVDPConv2d": (SVDPConv2d(2, 3, 3, padding=1, parametrization="stiefel", dtype=DT, generator=g), (2, 4, 4)),
        "GSOrthogonal": (GSOrthogonal(8, 2, parametrization="orthogonal", dtype=DT), (8,)),
        "TTConv2d": (TTConv2d(4, 6, 3, 2, padding=1, orthogonality="stiefel", dtype=DT, generator=g), (4, 5, 5)),
    }


def _loss(layer, shape, seed=0):
    x = torch.randn(3, *shape, dtype=DT, generator=torch.Generator().manual_seed(seed))
    return (layer(x) ** 2).sum() + layer(x).sum()


@pytest.mark.parametrize(
    "make_opt",
    [lambda p: torch.optim.SGD(p, lr=0.1), lambda p: torch.optim.Adam(p, lr=0.1)],
    ids=["SGD", "Adam"],
)
@pytest.mark.parametrize("name", list(_manifold_layers()))
def test_euclidean_optimizer_on_a_manifold_parameter_raises_naming_it(name, make_opt):
    layer, shape = _manifold_layers()[name]
    opt = make_opt(layer.parameters())
    _loss(layer, shape).backward()
    before = [p.detach().clone() for p in layer.parameters()]
    with pytest.raises(TypeError, match=rf"param group 0, parameter \d+ .*is {name}\(.*RiemannianSGD.*RiemannianAdam"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(layer.parameters(), before))  # nothing moved


def test_the_guard_survives_copies_and_names_the_euclidean_alternative():
    import copy

    layer, shape = _manifold_layers()["STTPLinear"]
    twin = copy.deepcopy(layer)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    _loss(twin, shape).backward()
    with pytest.raises(TypeError, match=r"STTPLinear\(.*\)\.U\.params\[0\].*parametrization='householder'"):
        opt.step()


@pytest.mark.parametrize("name", list(_manifold_layers()))
def test_riemannian_optimizers_with_euclidean_ones_schedulers_and_swa_are_not_refused(name):
    """The documented pattern — a Riemannian optimizer for the manifold parameters, any optimizer for the plain
    ones — with an LR scheduler, geoopt's stabilize and momentum, and SWA, trains and stays on the manifold."""
    layer, shape = _manifold_layers()[name]
    manifold_params = [p for p in layer.parameters() if isinstance(p, geoopt.ManifoldParameter)]
    plain = [p for p in layer.parameters() if not isinstance(p, geoopt.ManifoldParameter)]
    riem = [
        geoopt.optim.RiemannianAdam(manifold_params, lr=1e-2, stabilize=2),
        geoopt.optim.RiemannianSGD(manifold_params, lr=1e-2, momentum=0.9, stabilize=2),
    ]
    swa = torch.optim.swa_utils.AveragedModel(layer)
    for riemannian in riem:
        opts = [riemannian] + ([torch.optim.Adam(plain, lr=1e-2)] if plain else [])
        scheds = [torch.optim.lr_scheduler.StepLR(o, 2) for o in opts] + [torch.optim.swa_utils.SWALR(opts[0], 1e-3)]
        first = float(_loss(layer, shape))
        for _ in range(4):
            for o in opts:
                o.zero_grad()
            _loss(layer, shape).backward()
            for o in opts:
                o.step()
            for s in scheds:
                s.step()
            swa.update_parameters(layer)
        assert float(_loss(layer, shape)) < first
        for p in manifold_params:
            assert p.manifold.check_point_on_manifold(p, atol=1e-12, rtol=1e-12)


def test_the_guard_is_installed_by_layers_without_packed_manifolds():
    """Layers whose only manifold parameters are geoopt.EuclideanStiefel ones install the guard themselves."""
    from lowrankopt.manifolds import step_guard as bridge
    from lowrankopt.nn import STTPLinear

    if bridge._STEP_PRE_HOOK is not None:  # as in a fresh process where no packed manifold was ever made
        bridge._STEP_PRE_HOOK.remove()
        bridge._STEP_PRE_HOOK = None
    layer = STTPLinear(8, 6, 3, parametrization="stiefel", dtype=DT)
    assert bridge._STEP_PRE_HOOK is not None
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    _loss(layer, (8,)).backward()
    with pytest.raises(TypeError, match="STTPLinear"):
        opt.step()


def test_frozen_manifold_parameters_do_not_trip_the_guard():
    """A Euclidean optimizer given a whole model whose manifold layer is frozen (no gradient) steps nothing off."""
    layer = LowRankLinear(6, 5, 2, dtype=DT)
    layer.weight.requires_grad_(False)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    _loss(layer, (6,)).backward()
    opt.step()
    assert layer.manifold.check_point_on_manifold(layer.weight, atol=1e-12, rtol=1e-12)


# The fresh process: nothing of lowrankopt imported before the first load; between objects the guard is removed
# again, so that each object must install it by itself. Each object gets a gradient and one torch.optim.SGD step.
_FRESH_PROCESS_SCRIPT = r"""
import pickle, sys
import torch

def check(path, what):
    with open(path, "rb") as f:
        obj = pickle.load(f) if path.endswith(".pkl") else torch.load(f, weights_only=False)
    params = [obj] if isinstance(obj, torch.Tensor) else list(obj.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    try:
        torch.optim.SGD(params, lr=0.1).step()
    except TypeError as e:
        assert what in str(e) and "RiemannianSGD" in str(e), str(e)
        print("refused", what)
    else:
        print("STEPPED", what)

files = sys.argv[1:]
for k in range(0, len(files), 2):
    if k:
        from lowrankopt.manifolds import step_guard as bridge
        if bridge._STEP_PRE_HOOK is not None:
            bridge._STEP_PRE_HOOK.remove()
            bridge._STEP_PRE_HOOK = None
    check(files[k], files[k + 1])
"""


def test_the_guard_is_installed_when_pickled_manifold_parameters_are_loaded_in_a_fresh_process(tmp_path):
    """Was: the guard was registered by constructors only, so a layer saved with torch.save (or pickled to a spawned
    worker) and loaded in a new process had none, and torch.optim.SGD stepped its packed weight off the manifold."""
    import pickle
    import subprocess
    import sys

    from lowrankopt.nn import STTPLinear

    g = torch.Generator().manual_seed(6)
    packed = GeooptFixedRank(6, 5, 2)
    objects = {  # file -> what the error names
        "lowrank.pt": (LowRankLinear(6, 5, 2, dtype=DT, generator=g), "LowRankLinear(in_features=6"),
        "sttp.pt": (STTPLinear(8, 6, 3, parametrization="stiefel", dtype=DT, generator=g), "STTPLinear("),
        "stiefel_param.pt": (STTPLinear(8, 6, 3, parametrization="stiefel", dtype=DT).U.params[0], "STTPLinear("),
        "user_packed.pt": (geoopt.ManifoldParameter(packed.random(dtype=DT, generator=g), manifold=packed), "on "),
        "ttlinear.pkl": (TTLinear(8, 8, 2, dtype=DT, generator=g), "TTLinear("),  # as sent to a spawned worker
    }
    args = []
    for name, (obj, what) in objects.items():
        path = tmp_path / name
        if name.endswith(".pkl"):
            path.write_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        else:
            torch.save(obj, path)
        args += [str(path), what]
    import lowrankopt  # the child imports the same copy of the package

    root = os.path.dirname(os.path.dirname(os.path.abspath(lowrankopt.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-c", _FRESH_PROCESS_SCRIPT, *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:-1] == [f"refused {what}" for _, what in objects.values()], res.stdout


def test_load_state_dict_into_a_fresh_layer_keeps_the_guard():
    """The state-dict route: a freshly constructed layer (which installs the guard) loads the saved weights and still
    refuses a Euclidean step."""
    from lowrankopt.manifolds import step_guard as bridge

    g = torch.Generator().manual_seed(7)
    saved = LowRankLinear(6, 5, 2, dtype=DT, generator=g)
    buf = io.BytesIO()
    torch.save(saved.state_dict(), buf)
    buf.seek(0)
    if bridge._STEP_PRE_HOOK is not None:
        bridge._STEP_PRE_HOOK.remove()
        bridge._STEP_PRE_HOOK = None
    layer = LowRankLinear(6, 5, 2, dtype=DT)
    layer.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(layer.weight, saved.weight)
    _loss(layer, (6,)).backward()
    with pytest.raises(TypeError, match=r"LowRankLinear\(in_features=6"):
        torch.optim.SGD(layer.parameters(), lr=0.1).step()


def test_the_guard_scans_an_optimizers_parameters_once_not_at_every_step(monkeypatch):
    """Was: the global step hook looked at every parameter of every optimizer at every step (about 1 ms per step of
    torch.optim.SGD on 2,000 plain parameters). Now the scan is cached per optimizer: later steps look at no
    parameter until the param groups change."""
    from lowrankopt.manifolds import step_guard as bridge

    LowRankLinear(3, 3, 1)  # the guard is installed
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2000)]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = torch.optim.SGD(params, lr=0.1)
    opt.step()
    looked_at = []
    is_ours = bridge._is_ours
    monkeypatch.setattr(bridge, "_is_ours", lambda p: looked_at.append(p) or is_ours(p))
    for _ in range(3):
        opt.step()
    assert looked_at == []
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    opt.step()
    assert len(looked_at) == 2001  # a change of the groups: one new scan


def test_the_cached_guard_follows_changes_of_the_param_groups(g):
    """The per-optimizer cache is redone when the groups change: a manifold parameter added later (add_param_group, a
    new param list, a new element of one) is refused; weight decay set later on a packed group or loaded with
    load_state_dict is refused; a RiemannianAdam checkpoint loaded twice still resumes with integer steps."""
    layer = LowRankLinear(6, 5, 2, dtype=DT, generator=g)
    _loss(layer, (6,)).backward()
    plain = torch.nn.Parameter(torch.zeros(3, dtype=DT))
    plain.grad = torch.ones_like(plain)
    for add in (
        lambda opt: opt.add_param_group({"params": [layer.weight]}),
        lambda opt: opt.param_groups[0].__setitem__("params", [plain, layer.weight]),
        lambda opt: opt.param_groups[0]["params"].append(layer.weight),
    ):
        opt = torch.optim.SGD([plain], lr=0.1)
        opt.step()
        add(opt)
        with pytest.raises(TypeError, match="LowRankLinear"):
            opt.step()
    opt = geoopt.optim.RiemannianAdam([layer.weight], lr=1e-3)
    opt.step()
    opt.param_groups[0]["weight_decay"] = 1e-2  # in place, as a scheduler would
    with pytest.raises(ValueError, match=WEIGHT_DECAY):
        opt.step()
    opt.param_groups[0]["weight_decay"] = 0.0
    opt.step()
    sd = opt.state_dict()
    for wd, expected_step in ((0.0, 2), (1e-2, None)):
        sd["param_groups"][0]["weight_decay"] = wd
        opt.load_state_dict(sd)  # new group dicts, a new state (its "step" turned into tensors by torch's Adam)
        if expected_step is None:
            with pytest.raises(ValueError, match=WEIGHT_DECAY):
                opt.step()
        else:
            opt.step()
            assert opt.state[layer.weight]["step"] == expected_step + 1
            assert type(opt.state[layer.weight]["step"]) is int


def test_the_guard_works_for_optimizers_that_cannot_be_cached(g):
    """An optimizer class that is unhashable (it defines __eq__) cannot key the per-optimizer cache: it is scanned at
    every step instead, and still refused."""

    class ComparableSGD(torch.optim.SGD):
        def __eq__(self, other):
            return self is other

    layer = LowRankLinear(6, 5, 2, dtype=DT, generator=g)
    _loss(layer, (6,)).backward()
    opt = ComparableSGD([layer.bias], lr=0.1)
    opt.step()
    opt.add_param_group({"params": [layer.weight]})
    with pytest.raises(TypeError, match="LowRankLinear"):
        opt.step()


# ---------------------------------------------------------------------- issue 19: one layout, old files still load
def test_packed_tangents_are_the_delta_coordinates_of_tangent_vectors(g):
    """The packed tangent of a point is exactly the coordinate list of the library's TangentVector there."""
    for M in (make("matrix"), make("tt")):
        x = M.random(dtype=DT, generator=g)
        xo = M.unpack(x)
        v = M.base.random_tangent(xo, generator=g)
        u = M.pack_tangent(v)
        assert torch.equal(u, torch.cat([c.reshape(-1) for c in v.coords]))
        back = M.unpack_tangent(xo, u)  # projected onto the gauge again: equal up to rounding
        assert all((a - b).abs().max() < 1e-15 for a, b in zip(back.coords, v.coords))


def test_a_state_dict_of_the_old_matrix_layout_loads(g):
    """lowrankopt 0.1 packed LowRankLinear's weight as [U | S | V] ((in + out) r + r² entries); such a state dict still
    loads, into the same matrix."""
    U = torch.linalg.qr(torch.randn(5, 2, dtype=DT, generator=g))[0]
    V = torch.linalg.qr(torch.randn(6, 2, dtype=DT, generator=g))[0]
    S = torch.tensor([[2.0, 0.3], [0.0, 0.7]], dtype=DT)
    old = {"weight": torch.cat([U.reshape(-1), S.reshape(-1), V.reshape(-1)]), "bias": torch.randn(5, dtype=DT)}
    layer = LowRankLinear(6, 5, 2, dtype=DT)
    layer.load_state_dict(old)
    assert layer.weight.shape == (22,)
    assert rel(layer.weight_matrix().full(), U @ S @ V.T) < 1e-14
    assert layer.manifold.check_point_on_manifold(layer.weight, atol=1e-13, rtol=1e-13)
    x = torch.randn(3, 6, dtype=DT, generator=g)
    assert rel(layer(x), x @ (U @ S @ V.T).T + old["bias"]) < 1e-14
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict({**old, "weight": old["weight"][:-1]})


def test_optimizer_state_of_another_layout_is_refused(g):
    layer = LowRankLinear(6, 5, 2, dtype=DT, generator=g)
    opt = geoopt.optim.RiemannianAdam([layer.weight], lr=1e-2)
    _loss(layer, (6,)).backward()
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = torch.zeros(26, dtype=DT)  # an optimizer checkpoint of the old [U | S | V] layout
    sd["state"][0]["exp_avg_sq"] = torch.zeros(26, dtype=DT)
    opt2 = geoopt.optim.RiemannianAdam([layer.weight], lr=1e-2)
    opt2.load_state_dict(sd)
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="'exp_avg' of param group 0, parameter 0 has shape"):
        opt2.step()
    assert torch.equal(layer.weight, before)
