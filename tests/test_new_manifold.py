"""A new manifold is one class: the sphere of docs/writing-a-manifold.md (read from the page, so the page and the test
cannot drift apart) and a Stiefel manifold written the same way, with autodiff, ``minimize`` and the geoopt bridge
working on them unchanged — checked in float64 against closed forms written here."""

import math
import re
from pathlib import Path

import geoopt
import pytest
import torch
from reference import loglog_slope

import lowrankopt as lro
from lowrankopt.manifolds import LowRankManifold, TangentVector
from lowrankopt.manifolds.geoopt import GeooptManifold

DT = torch.float64
PAGE = Path(__file__).resolve().parents[1] / "docs" / "writing-a-manifold.md"


def _page_class(name: str) -> type:
    """The class ``name`` defined by a ```python block of the page (the block is run alone, as the page runs it)."""
    blocks = re.findall(r"^```python\n(.*?)^```$", PAGE.read_text(), re.S | re.M)
    block = next(b for b in blocks if f"class {name}(" in b)
    namespace = {"__name__": "writing_a_manifold"}
    exec(compile(block, f"{PAGE.name}[class {name}]", "exec"), namespace)
    return namespace[name]


Sphere = _page_class("Sphere")


def sym(A):
    return 0.5 * (A + A.mT)


class Stiefel(LowRankManifold):
    """St(n, p) = {X ∈ ℝ^{n×p}: XᵀX = I}: points are tensors (n, p); coordinates the ambient matrix of ξ (orthonormal);
    gauge Z ↦ Z − X sym(XᵀZ); chart normal part Y(η) = −X sym(ξᵀη); retraction the polar factor of X + ξ (the metric
    projection, second order). Every method O(n p²)."""

    point_type = torch.Tensor

    def __init__(self, n: int, p: int):
        self.n, self.p = n, p
        self.ambient_shape = (n, p)

    def __repr__(self) -> str:
        return f"Stiefel({self.n}, {self.p})"

    def check_point(self, x, name: str = "x") -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape) != self.ambient_shape:
            raise ValueError(f"{name} must have shape {self.ambient_shape}, got {tuple(x.shape)}")

    @property
    def dim(self) -> int:
        return self.n * self.p - self.p * (self.p + 1) // 2

    @property
    def coord_shapes(self):
        return (self.ambient_shape,)

    def random_point(self, *, dtype=None, device=None, generator=None):
        Z = torch.randn(self.n, self.p, dtype=dtype or torch.get_default_dtype(), generator=generator)
        return _polar(Z).to(device)

    def frames(self, x):
        return x.detach()

    def from_frames(self, frames):
        return frames

    def gauge(self, x, coords):
        (Z,) = coords
        X = x.detach()
        return [Z - X @ sym(X.T @ Z)]

    def linearization(self, x, deltas):
        return x.detach() + deltas[0]

    def second_fundamental(self, x, xi, deltas):
        X = x.detach()
        Y = -X @ sym(xi.coords[0].detach().T @ deltas[0])
        return X + Y, Y

    def to_ambient(self, x, v):
        return v.coords[0]

    def retr(self, x, v):
        return _polar(x.detach() + v.coords[0])

    def point_parts(self, x, like=None):
        return [x.detach()]

    def point_from_parts(self, parts):
        return parts[0]

    def canonical_parts(self, parts):
        return [_polar(parts[0])]


def _polar(Z):
    W, _, Vh = torch.linalg.svd(Z, full_matrices=False)
    return W @ Vh


# ---------------------------------------------------------------------------------------------- problems
def problem(kind, seed=0):
    """``(M, x, f, egrad, ehvp, P, weingarten, g)`` for f(x) = Σ sin(a ∘ x) + <x, A x> (A acting on the rows), with
    the Euclidean gradient, Hessian-vector product, tangent projector and Weingarten term written here in closed form:
    ``Hess f(x)[ξ] = P_x(∇²f(x) ξ + weingarten(x, ξ, ∇f(x)))``."""
    g = torch.Generator().manual_seed(seed)
    if kind == "sphere":
        M = Sphere(9)
        shape = (9,)
    else:
        M = Stiefel(7, 3)
        shape = (7, 3)
    n = shape[0]
    A = torch.randn(n, n, dtype=DT, generator=g)
    A = A + A.T
    a = torch.randn(shape, dtype=DT, generator=g)
    x = M.random_point(dtype=DT, generator=g)

    def f(y):
        return torch.sin(a * y).sum() + (y * (A @ y)).sum()

    def egrad(y):
        return a * torch.cos(a * y) + 2 * A @ y

    def ehvp(y, v):
        return -(a**2) * torch.sin(a * y) * v + 2 * A @ v

    if kind == "sphere":

        def P(y, z):
            return z - y * (y @ z)

        def weingarten(y, v, G):  # the sphere's Hessian term: −<x, ∇f> ξ
            return -(y @ G) * v
    else:

        def P(y, z):
            return z - y @ sym(y.T @ z)

        def weingarten(y, v, G):  # Stiefel (Euclidean metric): −ξ sym(Xᵀ∇f), projected (Absil et al.)
            return -v @ sym(y.T @ G)

    return M, x, f, egrad, ehvp, P, weingarten, g


KINDS = ["sphere", "stiefel"]


# ---------------------------------------------------------------------------------------------- geometry and autodiff
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_is_the_projected_euclidean_gradient(kind):
    M, x, f, egrad, _, P, _, g = problem(kind)
    val, grad = lro.riemannian_grad(f, x, manifold=M)
    assert isinstance(grad, TangentVector) and grad.base is x
    assert float(val) == pytest.approx(float(f(x)), rel=1e-15)
    G = egrad(x)
    if kind == "sphere":  # the dense projector I − x xᵀ
        ref = (torch.eye(x.numel(), dtype=DT) - torch.outer(x, x)) @ G
    else:
        ref = P(x, G)
    assert torch.allclose(grad.coords[0], ref, rtol=0, atol=1e-13)
    # <grad, ξ> is the directional derivative, by central differences along the retraction
    xi = M.random_tangent(x, generator=g)
    t = 1e-5
    fd = (float(f(M.retr(x, xi * t))) - float(f(M.retr(x, xi * -t)))) / (2 * t)
    assert float(grad.inner(xi)) == pytest.approx(fd, rel=1e-8)


@pytest.mark.parametrize("kind", KINDS)
def test_exact_hessian_vector_product_equals_the_closed_form(kind):
    M, x, f, egrad, ehvp, P, weingarten, g = problem(kind, seed=1)
    xi = M.random_tangent(x, generator=g)
    v = xi.coords[0]
    ref = P(x, ehvp(x, v) + weingarten(x, v, egrad(x)))
    h = lro.riemannian_hvp(f, x, xi, manifold=M)
    assert torch.allclose(h.coords[0], ref, rtol=0, atol=1e-12)
    assert torch.allclose(P(x, h.coords[0]), h.coords[0], rtol=0, atol=1e-13)  # tangent
    # without the curvature term: P ∇²f ξ alone, which differs here (∇f has a normal part)
    h0 = lro.riemannian_hvp(f, x, xi, manifold=M, curvature=False)
    assert torch.allclose(h0.coords[0], P(x, ehvp(x, v)), rtol=0, atol=1e-12)
    assert float((h - h0).norm()) > 1e-3
    # symmetric: <Hess ξ, η> = <ξ, Hess η>
    eta = M.random_tangent(x, generator=g)
    he = lro.riemannian_hvp(f, x, eta, manifold=M)
    assert float(h.inner(eta)) == pytest.approx(float(xi.inner(he)), rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_taylor_slope_three_along_the_retraction(kind):
    M, x, f, *_, g = problem(kind, seed=2)
    xi = M.random_tangent(x, generator=g)
    val, grad, h = lro.riemannian_grad_and_hvp(f, x, xi, manifold=M)
    gx, hx = float(grad.inner(xi)), float(h.inner(xi))
    ts = [10 ** (-1.5 - 0.25 * k) for k in range(6)]
    errs = [abs(float(f(M.retr(x, xi * t))) - float(val) - t * gx - 0.5 * t * t * hx) for t in ts]
    assert loglog_slope(ts, errs) > 2.8
    # and the test is discriminative: without the curvature term the model is only second order
    _, _, h0 = lro.riemannian_grad_and_hvp(f, x, xi, manifold=M, curvature=False)
    errs0 = [abs(float(f(M.retr(x, xi * t))) - float(val) - t * gx - 0.5 * t * t * float(h0.inner(xi))) for t in ts]
    assert loglog_slope(ts, errs0) < 2.3


@pytest.mark.parametrize("kind", KINDS)
def test_generic_geometry_from_the_protocol(kind):
    """What LowRankManifold builds from the protocol: tangent(), proj of a dense tensor, transp, retr on the
    manifold, dim, and the packing of points and tangent vectors."""
    M, x, _, _, _, P, _, g = problem(kind, seed=3)
    z = torch.randn(M.ambient_shape, dtype=DT, generator=g)
    assert torch.allclose(M.proj(x, z).coords[0], P(x, z), rtol=0, atol=1e-14)
    assert torch.allclose(M.tangent(x, [z]).coords[0], P(x, z), rtol=0, atol=1e-14)
    xi = M.random_tangent(x, generator=g)
    assert float(xi.norm()) == pytest.approx(1.0, rel=1e-14)
    y = M.retr(x, xi * 0.3)
    gram = (y @ y).reshape(1, 1) if kind == "sphere" else y.T @ y
    assert torch.allclose(gram, torch.eye(len(gram), dtype=DT), rtol=0, atol=1e-14)  # on the manifold
    w = M.transp(x, y, xi)
    assert w.base is y and torch.allclose(w.coords[0], P(y, xi.coords[0]), rtol=0, atol=1e-14)
    # dim: the rank of the dense projector onto the tangent space
    N = math.prod(M.ambient_shape)
    E = torch.eye(N, dtype=DT).reshape(N, *M.ambient_shape)
    proj = torch.stack([P(x, e).reshape(-1) for e in E])
    assert int(torch.linalg.matrix_rank(proj)) == M.dim
    # flat parameters
    flat = M.pack_point(x)
    assert torch.equal(flat, x.reshape(-1))
    assert torch.equal(M.unpack_point(flat), x)
    assert torch.equal(M.pack_tangent(xi), xi.coords[0].reshape(-1))
    assert torch.allclose(M.unpack_tangent(x, M.pack_tangent(xi)).coords[0], xi.coords[0], rtol=0, atol=1e-15)


def test_bad_points_are_refused_naming_the_argument():
    S = Sphere(4)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lro.riemannian_grad(lambda y: y.sum(), [1.0, 0, 0, 0], manifold=S)
    with pytest.raises(ValueError, match=r"x0 must be .*shape \(4,\)"):
        lro.minimize(lambda y: y.sum(), torch.ones(5, dtype=DT), manifold=S)
    with pytest.raises(ValueError, match="n must be"):
        Sphere(1)
    with pytest.raises(TypeError, match="or pass manifold="):  # a tensor does not say which manifold it is on
        lro.riemannian_grad(lambda y: y.sum(), S.random_point(dtype=DT))


# ---------------------------------------------------------------------------------------------- minimize
def test_trust_region_finds_the_top_eigenvector():
    g = torch.Generator().manual_seed(4)
    n = 30
    A = torch.randn(n, n, dtype=DT, generator=g)
    A = A + A.T
    S = Sphere(n)
    x0 = S.random_point(dtype=DT, generator=g)
    res = lro.minimize(lambda x: -(x @ A @ x), x0, "trust-region", manifold=S, gtol=1e-10)
    evals, evecs = torch.linalg.eigh(A)
    assert res.success, res.message
    assert abs(-res.fun - float(evals[-1])) <= 1e-10 * float(evals.abs().max())
    assert abs(float(torch.linalg.vector_norm(res.x)) - 1) < 1e-14
    assert abs(abs(float(res.x @ evecs[:, -1])) - 1) < 1e-10
    assert float(torch.linalg.vector_norm(A @ res.x - float(evals[-1]) * res.x)) < 1e-8


@pytest.mark.parametrize("method", ["cg", "sd"])
def test_line_search_methods_on_the_sphere(method):
    g = torch.Generator().manual_seed(5)
    n = 12
    Q = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=g))[0]
    lam = torch.linspace(1.0, 3.0, n, dtype=DT)
    A = Q @ torch.diag(lam) @ Q.T
    S = Sphere(n)
    res = lro.minimize(lambda x: x @ A @ x, S.random_point(dtype=DT, generator=g), method, manifold=S, gtol=1e-9)
    assert res.success, res.message
    assert res.fun == pytest.approx(1.0, abs=1e-12)  # the smallest eigenvalue
    assert abs(abs(float(res.x @ Q[:, 0])) - 1) < 1e-9


def test_trust_region_on_stiefel_finds_the_top_invariant_subspace():
    g = torch.Generator().manual_seed(6)
    n, p = 10, 3
    A = torch.randn(n, n, dtype=DT, generator=g)
    A = A + A.T
    M = Stiefel(n, p)
    res = lro.minimize(lambda X: -(X * (A @ X)).sum(), M.random_point(dtype=DT, generator=g), manifold=M, gtol=1e-10)
    evals, evecs = torch.linalg.eigh(A)
    assert res.success, res.message
    assert abs(-res.fun - float(evals[-p:].sum())) <= 1e-10 * float(evals.abs().max())
    top = evecs[:, -p:]
    assert torch.allclose(res.x @ res.x.T, top @ top.T, atol=1e-9)  # the same subspace
    assert torch.allclose(res.x.T @ res.x, torch.eye(p, dtype=DT), atol=1e-14)


# ---------------------------------------------------------------------------------------------- the geoopt bridge
def _eig_problem(n=8, seed=7):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, dtype=DT, generator=g)
    return A + A.T, g


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: geoopt.optim.RiemannianSGD(ps, lr=0.02),
        lambda ps: geoopt.optim.RiemannianSGD(ps, lr=0.02, momentum=0.5, nesterov=True, dampening=0),
        lambda ps: geoopt.optim.RiemannianAdam(ps, lr=0.05),
    ],
    ids=["sgd", "nesterov", "adam"],
)
def test_geoopt_optimizers_stay_on_the_sphere_and_decrease_the_loss(make_opt):
    A, g = _eig_problem()
    S = Sphere(A.shape[0])
    G = GeooptManifold(S)
    p = geoopt.ManifoldParameter(G.random(dtype=DT, generator=g), manifold=G)
    opt = make_opt([p])
    losses = []
    for _ in range(300):
        opt.zero_grad()
        x = G.straight_through(p)
        loss = -(x @ A @ x)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert abs(float(torch.linalg.vector_norm(p.detach())) - 1) < 1e-13
    top = float(torch.linalg.eigvalsh(A)[-1])
    assert losses[-1] < losses[0] - 1.0
    assert -losses[-1] == pytest.approx(top, rel=1e-3)


def test_geoopt_adam_on_stiefel_keeps_orthonormal_columns():
    A, g = _eig_problem(9, seed=8)
    M = Stiefel(9, 2)
    G = GeooptManifold(M)
    p = geoopt.ManifoldParameter(G.random(dtype=DT, generator=g), manifold=G)
    assert p.shape == (18,)
    opt = geoopt.optim.RiemannianAdam([p], lr=0.05)
    first = None
    for _ in range(300):
        opt.zero_grad()
        X = G.straight_through(p)
        loss = -(X * (A @ X)).sum()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
        X1 = G.unpack(p)
        assert torch.allclose(X1.T @ X1, torch.eye(2, dtype=DT), atol=1e-13)
    assert float(loss.detach()) < first - 1.0
    assert -float(loss.detach()) == pytest.approx(float(torch.linalg.eigvalsh(A)[-2:].sum()), rel=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_egrad2rgrad_of_a_straight_through_gradient_is_the_riemannian_gradient(kind):
    M, x, f, *_, g = problem(kind, seed=9)
    G = GeooptManifold(M)
    p = geoopt.ManifoldParameter(G.pack(x), manifold=G)
    f(G.straight_through(p)).backward()
    rgrad = G.egrad2rgrad(p.detach(), p.grad)
    _, grad = lro.riemannian_grad(f, x, manifold=M)
    assert torch.allclose(rgrad, G.pack_tangent(grad), rtol=0, atol=1e-13)
    assert torch.allclose(rgrad.reshape(M.ambient_shape), grad.coords[0], rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", KINDS)
def test_bridge_operations_on_tensor_points(kind):
    """The bridge on points that are plain tensors (no cache to mark): projx, proju, retr, transp, inner, pack/unpack
    of tangent vectors at points that did not come from unpack, the point check."""
    M, x, _, _, _, P, _, g = problem(kind, seed=10)
    G = GeooptManifold(M)
    px = G.pack(x)
    z = torch.randn(G.numel, dtype=DT, generator=g)
    u = G.proju(px, z)
    assert torch.allclose(u.reshape(M.ambient_shape), P(x, z.reshape(M.ambient_shape)), rtol=0, atol=1e-14)
    assert torch.allclose(G.projx(px), px, rtol=0, atol=1e-14)
    assert torch.allclose(G.projx(3 * px), px, rtol=0, atol=1e-14)
    assert G.check_point_on_manifold(px) and not G.check_point_on_manifold(2 * px)
    y = G.retr(px, 0.2 * u)
    assert torch.allclose(y.reshape(M.ambient_shape), M.retr(x, M.tangent(x, [0.2 * u.reshape(x.shape)])), atol=1e-15)
    w = G.transp(px, y, u)
    assert torch.allclose(w, G.proju(y, u), rtol=0, atol=1e-14)
    assert float(G.inner(px, u, w)) == pytest.approx(float((u * w).sum()), rel=1e-15)
    xi = M.random_tangent(x, generator=g)  # at x itself, not at a point of unpack()
    assert torch.allclose(G.pack_tangent(xi), xi.coords[0].reshape(-1), rtol=0, atol=1e-15)
    v = G.unpack_tangent(px, G.pack_tangent(xi))  # at unpack(px) (for the sphere px is a point: at px itself)
    assert torch.equal(v.base, x) and torch.allclose(v.coords[0], xi.coords[0], rtol=0, atol=1e-15)
    v = G.unpack_tangent(x, G.pack_tangent(xi))  # at a point of the manifold: the vector is built at it
    assert v.base is x and float((v - xi).norm()) < 1e-15  # so it combines with x's vectors
    xo = G.unpack(px)  # a point of unpack() (for tensor points: not marked, a point of the manifold all the same)
    assert G.unpack_tangent(xo, G.pack_tangent(xi)).base is xo
    with pytest.raises(TypeError, match="x must be a packed point tensor or a point of"):
        G.unpack_tangent([0.0], G.pack_tangent(xi))


def test_unpack_tangent_at_a_low_rank_point_that_did_not_come_from_unpack():
    """The bridge builds a vector at any point of its base manifold (moved from the packed frames by a projection):
    the same ambient ξ as at the packed point."""
    g = torch.Generator().manual_seed(11)
    M = lro.FixedRankMatrices(6, 5, 2)
    G = GeooptManifold(M)
    x = M.random_point(dtype=DT, generator=g)
    xi = M.random_tangent(x, generator=g)
    u = G.pack_tangent(xi)
    v = G.unpack_tangent(x, u)
    assert v.base is x and float((v - xi).norm()) < 1e-14
    w = G.unpack_tangent(G.pack(x), u)  # at unpack(...): another object, the same ξ
    assert w.base is not x
    assert torch.allclose(w.to_ambient().full(), xi.to_ambient().full(), rtol=0, atol=1e-14)


def test_the_step_guard_refuses_a_euclidean_optimizer_on_a_sphere_parameter():
    A, g = _eig_problem()
    G = GeooptManifold(Sphere(A.shape[0]))
    p = geoopt.ManifoldParameter(G.random(dtype=DT, generator=g), manifold=G)
    before = p.detach().clone()
    opt = torch.optim.SGD([p], lr=0.1)
    x = G.straight_through(p)
    (-(x @ A @ x)).backward()
    with pytest.raises(TypeError, match="SGD is not a Riemannian optimizer"):
        opt.step()
    assert torch.equal(p.detach(), before)
    with pytest.raises(ValueError, match="weight_decay"):
        geoopt.optim.RiemannianSGD([p], lr=0.1, weight_decay=0.01).step()
