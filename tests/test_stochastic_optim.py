"""The stochastic optimizers (lowrankopt.optim: RiemannianSGD, RiemannianAdam, Riemannion) and the batched fixed-rank
kernels they share with FixedRankMatrices, against dense references written here (SVDs of dense matrices)."""

import copy
import io
import math
import re

import geoopt
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowrankopt.manifolds import fixed_rank_kernels as K
from lowrankopt.manifolds.geoopt import GeooptFixedRank, GeooptFixedTTRank, manifold_parameter
from lowrankopt.manifolds.step_guard import RIEMANNIAN
from lowrankopt.nn import LowRankLinear, TTLinear
from lowrankopt.optim import RiemannianAdam, RiemannianSGD, Riemannion

DT = torch.float64
EPS = torch.finfo(DT).eps


@pytest.fixture
def g():
    return torch.Generator().manual_seed(7)


# ---------------------------------------------------------------------- dense references
def qr_pos(A):
    Q, R = torch.linalg.qr(A)
    s = torch.sign(torch.diagonal(R))
    return Q * s, R * s[:, None]


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def span_frames(W, r):
    U, _, Vh = torch.linalg.svd(W)
    return U[:, :r], Vh[:r].T


def proj_dense(W, r, Z):
    """P_T(Z) = UUᵀZ + ZVVᵀ − UUᵀZVVᵀ at the rank-r matrix W (U, V from its dense SVD)."""
    U, V = span_frames(W, r)
    PU, PV = U @ U.T, V @ V.T
    return PU @ Z + Z @ PV - PU @ Z @ PV


def trunc_dense(Z, r):
    U, s, Vh = torch.linalg.svd(Z)
    return U[:, :r] @ torch.diag(s[:r]) @ Vh[:r]


def ortho_dense(Z, rtol):
    """The polar factor of Z on its range (singular values > rtol σ_max set to 1, the others to 0)."""
    U, s, Vh = torch.linalg.svd(Z, full_matrices=False)
    keep = s > rtol * s[0]
    return U[:, keep] @ Vh[keep]


def packed(layer):
    """(C, V, U) of a LowRankLinear's packed weight (U from a positive-diagonal QR of C), copies (not views of the
    parameter, which the optimizer overwrites)."""
    C, V = (t.clone() for t in layer.manifold.unpack_tensor(layer.weight.detach()))
    return C, V, qr_pos(C)[0]


def dense_w(layer):
    C, V, _ = packed(layer)
    return C @ V.T


def coords(U, V, Z):
    """Tangent coordinates of the tangent matrix Z in the frames (U, V): A = Z V, B = (I − VVᵀ) Zᵀ U."""
    return Z @ V, (Z.T @ U) - V @ (V.T @ (Z.T @ U))


def from_coords(U, V, A, B):
    return A @ V.T + U @ B.T


def egrad(W, b, X, Y):
    """Euclidean gradients of the loss at the dense weight W and bias b."""
    W, b = W.clone().requires_grad_(), b.clone().requires_grad_()
    loss_fn(X @ W.T + b, Y).backward()
    return W.grad, b.grad


def loss_fn(out, Y):
    return ((out - Y) ** 2).mean()


def problem(g, m=7, n=6, r=2, batch=16):
    layer = LowRankLinear(n, m, r, dtype=DT, generator=g)
    X = torch.randn(batch, n, dtype=DT, generator=g)
    Y = torch.randn(batch, m, dtype=DT, generator=g)
    return layer, X, Y


def train(model, opt, X, Y, steps, sched=None):
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(X), Y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return float(loss.detach())


# ---------------------------------------------------------------------- kernels
def _point_and_tangent(g, k=None, m=9, n=7, r=3):
    lead = () if k is None else (k,)
    C = torch.randn(*lead, m, r, dtype=DT, generator=g)
    V = torch.linalg.qr(torch.randn(*lead, n, r, dtype=DT, generator=g))[0]
    U = K.left_frame(C)
    A = torch.randn(*lead, m, r, dtype=DT, generator=g)
    B = K.gauge(V, torch.randn(*lead, n, r, dtype=DT, generator=g))
    return C, V, U, A, B


def test_kernels_against_dense_references_batched(g):
    k, r = 3, 3
    C, V, U, A, B = _point_and_tangent(g, k)
    Uk, s, Vk = K.retract(C, U, V, A, B, r)
    Z = torch.randn(k, 9, 7, dtype=DT, generator=g)
    P, Q = torch.randn(k, 9, 5, dtype=DT, generator=g), torch.randn(k, 7, 5, dtype=DT, generator=g)
    S = torch.randn(k, 5, 5, dtype=DT, generator=g)
    pA, pB = K.project(P, Q, U, V, S=S)
    for i in range(k):
        W = C[i] @ V[i].T
        assert torch.allclose(U[i], qr_pos(C[i])[0]) and torch.allclose(
            V[i].T @ B[i], torch.zeros(r, r, dtype=DT), atol=1e-14
        )
        xi = from_coords(U[i], V[i], A[i], B[i])
        # retraction: the truncated SVD of x + ξ; orthonormal factors, non-increasing s
        assert rel(Uk[i] @ torch.diag(s[i]) @ Vk[i].T, trunc_dense(W + xi, r)) < 1e-13
        assert torch.allclose(Uk[i].T @ Uk[i], torch.eye(r, dtype=DT), atol=1e-14)
        assert torch.allclose(Vk[i].T @ Vk[i], torch.eye(r, dtype=DT), atol=1e-14)
        assert bool((s[i][:-1] >= s[i][1:]).all())
        # projection of P S Qᵀ: the dense P_T
        assert rel(from_coords(U[i], V[i], pA[i], pB[i]), proj_dense(W, r, P[i] @ S[i] @ Q[i].T)) < 1e-13
        assert torch.allclose(V[i].T @ pB[i], torch.zeros(r, r, dtype=DT), atol=1e-13)
        # the gauge is the projection of B onto V's complement, and idempotent
        Zb = Z[i].T[:, :r]
        assert torch.allclose(K.gauge(V[i], Zb), Zb - V[i] @ V[i].T @ Zb, atol=1e-14)
    # aligned parts: the same matrix, and V rotated closest to V_like (Vᵀ V_like symmetric positive definite)
    C2, V2 = K.aligned_parts(Uk, s, Vk, V)
    for i in range(k):
        assert rel(C2[i] @ V2[i].T, Uk[i] @ torch.diag(s[i]) @ Vk[i].T) < 1e-14
        M = V2[i].T @ V[i]
        assert torch.allclose(M, M.T, atol=1e-14) and float(torch.linalg.eigvalsh(M).min()) > 0


@pytest.mark.parametrize("m,n,r", [(9, 7, 3), (4, 16, 3), (16, 5, 3)], ids=["tall", "m<2r", "n<2r"])
@pytest.mark.parametrize("deficient", [False, True])
def test_ortho_is_the_reprojected_polar_factor_of_the_dense_tangent_matrix(deficient, m, n, r, g):
    """Also when m or n < 2r: then ξ has rank ≤ min(m, n) < 2r and the core of Ortho is not square."""
    C, V, U, A, B = _point_and_tangent(g, None, m, n, r)
    if deficient:  # a rank-1 Euclidean gradient (batch 1): ξ = P_T(G) has rank 2 < 2r
        G = torch.randn(m, 1, dtype=DT, generator=g) @ torch.randn(1, n, dtype=DT, generator=g)
        A, B = coords(U, V, G)
    xi = from_coords(U, V, A, B)
    rtol = max(m, n) * EPS
    P, Q = K.ortho(A, B, U, V, rtol)
    W = C @ V.T
    expected = ortho_dense(xi, rtol)
    assert rel(P @ Q.T, expected) < 1e-12
    assert int(torch.linalg.matrix_rank(P @ Q.T)) == (2 if deficient else min(2 * r, m, n))
    dA, dB = K.project(P, Q, U, V)
    assert rel(from_coords(U, V, dA, dB), proj_dense(W, r, expected)) < 1e-12
    zero = K.ortho(torch.zeros_like(A), torch.zeros_like(B), U, V, rtol)  # ξ = 0: no direction, no NaN
    assert all(bool((t == 0).all()) for t in (zero[0] @ zero[1].T,))


def test_the_manifold_class_uses_the_shared_kernels(g):
    """FixedRankMatrices.retr and the transport (proj of a LowRankMatrix) equal the kernels (one geometry)."""
    from lowrankopt import FixedRankMatrices, LowRankMatrix

    M = FixedRankMatrices(9, 7, 3)
    x = M.random_point(dtype=DT, generator=g)
    v = M.random_tangent(x, generator=g)
    U, S, V = M.frames(x)
    Uk, s, Vk = K.retract(U @ S, U, V, *v.coords, 3)
    y = M.retr(x, v)
    assert torch.equal(y.U, Uk) and torch.equal(torch.diagonal(y.S), s) and torch.equal(y.V, Vk)
    z = LowRankMatrix.random(9, 7, 2, dtype=DT, generator=g)
    A, B = K.project(z.U, z.V, U, V, S=z.S)
    w = M.proj(x, z)
    assert torch.equal(w.coords[0], A) and torch.equal(w.coords[1], B)


# ---------------------------------------------------------------------- one step against dense references
ETA, WD, MU = 0.05, 0.1, 0.8


def _two_steps(layer, opt, X, Y):
    out = []
    for _ in range(2):
        opt.zero_grad()
        loss_fn(layer(X), Y).backward()
        opt.step()
        out.append((dense_w(layer), layer.bias.detach().clone(), packed(layer)))
    return out


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_two_steps_equal_the_dense_reference(nesterov, g):
    layer, X, Y = problem(g)
    W, b = dense_w(layer), layer.bias.detach().clone()
    opt = RiemannianSGD(layer.parameters(), lr=ETA, momentum=MU, nesterov=nesterov, weight_decay=WD)
    got = _two_steps(layer, opt, X, Y)
    c, r = 1 - ETA * WD, 2
    buf = bbuf = None
    for t in range(2):
        G, gb = egrad(W, b, X, Y)
        gr = proj_dense(W, r, G)
        buf = gr if buf is None else MU * proj_dense(W, r, buf) + gr  # transported, then the new gradient
        bbuf = gb if bbuf is None else MU * bbuf + gb
        d, db = (gr + MU * buf, gb + MU * bbuf) if nesterov else (buf, bbuf)
        W, b = trunc_dense(c * W - ETA * d, r), c * b - ETA * db
        assert rel(got[t][0], W) < 1e-12 and rel(got[t][1], b) < 1e-13
    # the stored momentum is the dense buffer transported to the new point
    state = opt.state[layer.weight]["momentum_buffer"]
    C, V, U = packed(layer)
    A, B = layer.manifold.unpack_tensor(state)
    assert rel(from_coords(U, V, A, B), proj_dense(W, r, buf)) < 1e-12


def test_adam_two_steps_equal_the_coordinatewise_reference(g):
    """Second moments per packed coordinate (kept as they are), first moment transported, direction re-gauged; the
    frames at step 2 are the optimizer's (the aligned factorization), checked to be the reference point."""
    layer, X, Y = problem(g)
    b1, b2, eps = 0.9, 0.99, 1e-8
    W, b = dense_w(layer), layer.bias.detach().clone()
    C, V, U = packed(layer)
    opt = RiemannianAdam(layer.parameters(), lr=ETA, betas=(b1, b2), eps=eps, weight_decay=WD)
    got = _two_steps(layer, opt, X, Y)
    c, r = 1 - ETA * WD, 2
    mA = mB = vA = vB = m_dense = None
    mb = vb = torch.zeros_like(b)
    for t in range(1, 3):
        G, gb = egrad(W, b, X, Y)
        gA, gB = coords(U, V, G)
        if mA is None:
            mA, mB, vA, vB = (1 - b1) * gA, (1 - b1) * gB, (1 - b2) * gA**2, (1 - b2) * gB**2
        else:  # m at the new point: the transported dense first moment, in the new frames
            tA, tB = coords(U, V, proj_dense(W, r, m_dense))
            mA, mB = b1 * tA + (1 - b1) * gA, b1 * tB + (1 - b1) * gB
            vA, vB = b2 * vA + (1 - b2) * gA**2, b2 * vB + (1 - b2) * gB**2
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        dA = (mA / bc1) / ((vA / bc2).sqrt() + eps)
        dB = (mB / bc1) / ((vB / bc2).sqrt() + eps)
        dB = dB - V @ (V.T @ dB)
        m_dense = from_coords(U, V, mA, mB)
        W = trunc_dense(c * W - ETA * from_coords(U, V, dA, dB), r)
        mb, vb = b1 * mb + (1 - b1) * gb, b2 * vb + (1 - b2) * gb**2  # the bias: AdamW
        b = c * b - ETA * (mb / bc1) / ((vb / bc2).sqrt() + eps)
        assert rel(got[t - 1][0], W) < 1e-12 and rel(got[t - 1][1], b) < 1e-12
        C, V, U = got[t - 1][2]
    state = opt.state[layer.weight]
    assert state["step"] == 2
    sA, sB = layer.manifold.unpack_tensor(state["exp_avg_sq"])
    assert rel(sA, vA) < 1e-12 and rel(sB, vB) < 1e-12


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("m,n,r", [(7, 6, 2), (3, 16, 2)], ids=["square-ish", "out<2r"])
def test_riemannion_two_steps_equal_the_dense_reference(nesterov, m, n, r, g):
    """Also for a head with out_features < 2r (the tangent matrices' 2r × 2r core is then not square)."""
    layer, X, Y = problem(g, m=m, n=n, r=r)
    W, b = dense_w(layer), layer.bias.detach().clone()
    opt = Riemannion(layer.parameters(), lr=ETA, momentum=MU, nesterov=nesterov, weight_decay=WD)
    got = _two_steps(layer, opt, X, Y)
    c, rtol = 1 - ETA * WD, max(m, n) * EPS
    M = None
    mb = vb = torch.zeros_like(b)
    for t in range(1, 3):
        G, gb = egrad(W, b, X, Y)
        gr = proj_dense(W, r, G)
        M = gr if M is None else MU * proj_dense(W, r, M) + gr  # raw heavy-ball momentum, no dampening
        D = proj_dense(W, r, ortho_dense(gr + MU * M if nesterov else M, rtol))
        W = trunc_dense(c * W - ETA * D, r)
        mb, vb = 0.9 * mb + 0.1 * gb, 0.999 * vb + 0.001 * gb**2  # plain parameters: AdamW (adam_betas)
        b = c * b - ETA * (mb / (1 - 0.9**t)) / ((vb / (1 - 0.999**t)).sqrt() + 1e-8)
        assert rel(got[t - 1][0], W) < 1e-12 and rel(got[t - 1][1], b) < 1e-12
    C, V, U = packed(layer)
    A, B = layer.manifold.unpack_tensor(opt.state[layer.weight]["momentum_buffer"])
    assert rel(from_coords(U, V, A, B), proj_dense(W, r, M)) < 1e-12


def test_a_rank_deficient_momentum_is_not_inflated(g):
    """Batch 1: the first gradient has rank ≤ 2 < 2r; Ortho keeps 2 singular values (not noise padded to 1)."""
    layer, X, Y = problem(g, m=9, n=8, r=3, batch=1)
    W = dense_w(layer)
    opt = Riemannion(layer.parameters(), lr=1e-3, momentum=0.0)
    opt.zero_grad()
    loss_fn(layer(X), Y).backward()
    opt.step()
    step = (W - dense_w(layer)) / 1e-3  # = P_T(Ortho(g)) + O(lr)
    s = torch.linalg.svdvals(step)
    assert float(s[2]) < 1e-2 and 0.5 < float(s[0]) < 1.5


# ---------------------------------------------------------------------- invariants
@pytest.mark.parametrize("make", [RiemannianSGD, RiemannianAdam, Riemannion])
def test_iterates_keep_rank_and_orthonormal_factors_and_decay_scales_exactly(make, g):
    layer, X, Y = problem(g, m=9, n=8, r=3)
    opt = make(layer.parameters(), lr=0.02, weight_decay=0.05)
    train(layer, opt, X, Y, 10)
    C, V, U = packed(layer)
    assert torch.allclose(V.T @ V, torch.eye(3, dtype=DT), atol=1e-13)
    assert layer.manifold.check_point_on_manifold(layer.weight, atol=1e-12, rtol=1e-12)
    s = torch.linalg.svdvals(dense_w(layer))
    assert float(s[2]) > 1e-3 * float(s[0]) and float(s[3]) < 1e-13 * float(s[0])
    # zero gradient: the step is pure decay, the dense weight scaled by (1 − lr·wd)
    W, b = dense_w(layer), layer.bias.detach().clone()
    for p in layer.parameters():
        p.grad = torch.zeros_like(p)
    opt.state.clear()
    opt.step()
    assert rel(dense_w(layer), (1 - 0.02 * 0.05) * W) < 1e-14
    assert rel(layer.bias.detach(), (1 - 0.02 * 0.05) * b) < 1e-15


class Stack(torch.nn.Module):
    def __init__(self, g, k=3):
        super().__init__()
        self.layers = torch.nn.ModuleList(LowRankLinear(6, 7, 2, dtype=DT, generator=g) for _ in range(k))
        self.head = torch.nn.Linear(7, 3, dtype=DT)

    def forward(self, x):
        return self.head(sum(torch.tanh(layer(x)) for layer in self.layers))


@pytest.mark.parametrize(
    "make",
    [
        lambda p: RiemannianSGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
        lambda p: RiemannianAdam(p, lr=0.02, weight_decay=0.01, amsgrad=True),
        lambda p: Riemannion(p, lr=0.02, weight_decay=0.01),
    ],
)
def test_batched_step_equals_per_parameter_steps(make, g, monkeypatch):
    torch.manual_seed(0)
    model = Stack(g)
    twin = copy.deepcopy(model)
    X, Y = torch.randn(8, 6, dtype=DT, generator=g), torch.randn(8, 3, dtype=DT, generator=g)
    batched = make(model.parameters())  # one group: the three weights are one stack
    single = make([{"params": [p]} for p in twin.parameters()])  # one group each: stacks of one
    calls = []
    real = K.retract
    monkeypatch.setattr(K, "retract", lambda C, *a: calls.append(C.shape) or real(C, *a))
    train(model, batched, X, Y, 4)
    assert calls == [(3, 7, 2)] * 4  # one batched retraction per step
    train(twin, single, X, Y, 4)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert rel(p.detach(), q.detach()) < 1e-13
    for p, q in zip(model.parameters(), twin.parameters()):
        for key, v in batched.state[p].items():
            w = single.state[q][key]
            assert rel(v, w) < 1e-12 if isinstance(v, torch.Tensor) else v == w


# ---------------------------------------------------------------------- training
@pytest.mark.parametrize(
    "make",
    [
        lambda p: (RiemannianSGD(p, lr=0.1, momentum=0.9), 0.99),
        lambda p: (RiemannianAdam(p, lr=0.2, betas=(0.9, 0.99)), 0.99),
        lambda p: (Riemannion(p, lr=0.5, momentum=0.9), 0.97),  # a spectral-norm step: decay it
    ],
)
def test_a_low_rank_regression_is_fitted(make, g):
    m, n, r = 12, 10, 3
    teacher = torch.randn(m, r, dtype=DT, generator=g) @ torch.randn(r, n, dtype=DT, generator=g) / 2
    layer = LowRankLinear(n, m, r, bias=False, dtype=DT, generator=g)
    X = torch.randn(64, n, dtype=DT, generator=g)
    Y = X @ teacher.T
    opt, gamma = make(layer.parameters())
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
    first = float(loss_fn(layer(X), Y).detach())
    last = train(layer, opt, X, Y, 250, sched)
    assert last < 1e-6 * first


def test_lr_schedulers_are_honoured(g):
    layer, X, Y = problem(g)
    opt = Riemannion(layer.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 if t < 2 else 0.0)
    before = layer.weight.detach().clone()
    train(layer, opt, X, Y, 2, sched)
    assert opt.param_groups[0]["lr"] == 0.0 and not torch.equal(layer.weight.detach(), before)
    moved = dense_w(layer), layer.bias.detach().clone()
    train(layer, opt, X, Y, 1, sched)  # lr 0: the matrix does not move (up to the retraction's rounding)
    assert rel(dense_w(layer), moved[0]) < 1e-14 and torch.equal(layer.bias.detach(), moved[1])


@pytest.mark.parametrize(
    "make",
    [
        lambda p: RiemannianSGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
        lambda p: RiemannianAdam(p, lr=0.02, weight_decay=0.01),
        lambda p: Riemannion(p, lr=0.02, weight_decay=0.01),
    ],
)
def test_state_dict_round_trip_continues_identically(make, g):
    model = Stack(g)
    X, Y = torch.randn(8, 6, dtype=DT, generator=g), torch.randn(8, 3, dtype=DT, generator=g)
    opt = make(model.parameters())
    train(model, opt, X, Y, 3)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    fresh = Stack(torch.Generator().manual_seed(99))
    opt2 = make(fresh.parameters())
    fresh.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    train(model, opt, X, Y, 3)
    train(fresh, opt2, X, Y, 3)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
        for key, v in opt.state[p].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt2.state[q][key]))


# ---------------------------------------------------------------------- non-finite values
def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for key, v in sa["state"][k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][k][key]))


@pytest.mark.parametrize("make", [RiemannianSGD, RiemannianAdam, Riemannion])
@pytest.mark.parametrize("where", ["weight", "bias"])
def test_a_non_finite_gradient_names_the_parameter_and_changes_nothing(make, where, g):
    model = Stack(g)
    X, Y = torch.randn(8, 6, dtype=DT, generator=g), torch.randn(8, 3, dtype=DT, generator=g)
    opt = make(model.parameters(), lr=0.01, weight_decay=0.01)
    train(model, opt, X, Y, 2)
    opt.zero_grad()
    loss_fn(model(X), Y).backward()
    target = getattr(model.layers[2], where)
    target.grad[3] = float("nan")
    before = _snapshot(model, opt)
    index = [id(p) for p in model.parameters()].index(id(target))
    owner = re.escape("LowRankLinear(in_features=6, out_features=7).weight") if where == "weight" else ""
    with pytest.raises(ValueError, match=rf"param group 0, parameter {index} \(shape .*{owner}.*contains NaN or Inf"):
        opt.step()
    _same(before, _snapshot(model, opt))


def test_a_step_that_overflows_names_the_parameter_and_changes_nothing(g):
    model = Stack(g)
    X, Y = torch.randn(8, 6, dtype=DT, generator=g), torch.randn(8, 3, dtype=DT, generator=g)
    opt = RiemannianSGD(model.parameters(), lr=1e300, momentum=0.9)
    opt.zero_grad()
    loss_fn(model(X), Y).backward()
    for p in model.parameters():
        p.grad.mul_(1e300)  # finite, but lr · grad overflows
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"param group 0, parameter \d"):
        opt.step()
    _same(before, _snapshot(model, opt))


# ---------------------------------------------------------------------- other manifolds, the step guard
def test_tt_parameters_step_through_the_protocol_and_riemannion_refuses_them(g):
    torch.manual_seed(0)
    layer = TTLinear(8, 8, 2, d=3, dtype=DT)
    twin = copy.deepcopy(layer)
    X = torch.randn(16, 8, dtype=DT, generator=g)
    Y = torch.randn(16, 8, dtype=DT, generator=g)
    # with weight decay 0 and no momentum, our SGD and Adam are geoopt's
    for ours, theirs in [
        (RiemannianSGD([layer.weight], lr=0.05), geoopt.optim.RiemannianSGD([twin.weight], lr=0.05)),
        (RiemannianAdam([layer.weight], lr=0.02), geoopt.optim.RiemannianAdam([twin.weight], lr=0.02)),
    ]:
        train(layer, ours, X, Y, 3)
        train(twin, theirs, X, Y, 3)
        assert rel(layer.weight.detach(), twin.weight.detach()) < 1e-10
    # weight decay scales the tensor (the first core), frames untouched
    full = layer.weight_matrix().full()
    layer.weight.grad = torch.zeros_like(layer.weight)
    opt = RiemannianSGD([layer.weight], lr=0.1, weight_decay=0.5)
    opt.step()
    assert rel(layer.weight_matrix().full(), 0.95 * full) < 1e-13
    with pytest.raises(TypeError, match=r"Riemannion cannot step param group 0, parameter 0 .*TTLinear"):
        Riemannion(layer.parameters(), lr=0.01)


def test_other_geoopt_manifolds_step_by_their_own_retraction(g):
    x0 = geoopt.Stiefel().projx(torch.randn(6, 3, dtype=DT, generator=g))
    p, q = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.Stiefel()), None
    q = geoopt.ManifoldParameter(x0.clone(), manifold=geoopt.Stiefel())
    target = torch.randn(6, 3, dtype=DT, generator=g)
    ours, theirs = RiemannianSGD([p], lr=0.1), geoopt.optim.RiemannianSGD([q], lr=0.1)
    for opt, w in ((ours, p), (theirs, q)):
        for _ in range(3):
            opt.zero_grad()
            ((w - target) ** 2).sum().backward()
            opt.step()
    assert rel(p.detach(), q.detach()) < 1e-12
    assert torch.allclose(p.T @ p, torch.eye(3, dtype=DT), atol=1e-12)
    with pytest.raises(ValueError, match="not closed under scaling"):
        RiemannianAdam([p], weight_decay=0.1)
    with pytest.raises(TypeError, match="Riemannion cannot step"):
        Riemannion([p], lr=0.1)


def test_the_step_guard_accepts_these_optimizers_with_weight_decay_and_refuses_euclidean_ones(g):
    assert RiemannianSGD.lowrankopt_riemannian is True and RIEMANNIAN == "lowrankopt_riemannian"
    layer, X, Y = problem(g)
    for make in (RiemannianSGD, RiemannianAdam, Riemannion):
        train(layer, make(layer.parameters(), lr=1e-3, weight_decay=0.1), X, Y, 1)
    with pytest.raises(TypeError, match="AdamW is not a Riemannian optimizer"):
        train(layer, torch.optim.AdamW(layer.parameters()), X, Y, 1)
    with pytest.raises(ValueError, match="weight_decay=0.1 but holds a lowrankopt manifold parameter"):
        train(layer, geoopt.optim.RiemannianAdam(layer.parameters(), weight_decay=0.1), X, Y, 1)
    bare = manifold_parameter(
        GeooptFixedRank(5, 4, 2).random(dtype=DT, generator=g).data, GeooptFixedRank(5, 4, 2), "w"
    )
    bare.grad = torch.randn(bare.shape, dtype=DT, generator=g)
    Riemannion([bare], lr=0.01, weight_decay=0.1).step()
    assert GeooptFixedRank(5, 4, 2).check_point_on_manifold(bare, atol=1e-12, rtol=1e-12)
    tt = manifold_parameter(
        GeooptFixedTTRank((3, 4, 2), 2).random(dtype=DT, generator=g).data, GeooptFixedTTRank((3, 4, 2), 2), "t"
    )
    with pytest.raises(TypeError, match=r"Riemannion cannot step param group 0, parameter 0 \(shape .*, t\)"):
        Riemannion([tt], lr=0.01)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "lr=-1.0"),
        (dict(lr=0.1, weight_decay=-1.0), "weight_decay=-1.0"),
        (dict(lr=0.1, momentum=1.0), "momentum=1.0"),
        (dict(lr=0.1, momentum=0.0, nesterov=True), "nesterov needs momentum > 0"),
        (dict(lr=0.1, ortho_rtol=2.0), "ortho_rtol=2.0"),
        (dict(lr=0.1, adam_betas=(0.9, 1.0)), "adam_betas"),
        (dict(lr=10.0, weight_decay=0.1), r"lr \* weight_decay = 1 >= 1"),
    ],
)
def test_bad_hyperparameters_raise_naming_them(kwargs, message, g):
    layer, _, _ = problem(g)
    with pytest.raises(ValueError, match=message):
        Riemannion(layer.parameters(), **kwargs)


# ---------------------------------------------------------------------- memory
class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op produces (forward, backward, step). Stricter
    than the profiler's memory events (which net allocations and frees within an op): every intermediate tensor of
    every op, the autograd engine's included, is seen."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


@pytest.mark.parametrize("make", [Riemannion, RiemannianAdam])
def test_a_step_on_a_4096_square_rank_8_layer_never_forms_a_dense_matrix(make):
    N = 4096
    layer = LowRankLinear(N, N, 8, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    opt = make(layer.parameters(), lr=1e-3, weight_decay=0.01)
    x = torch.randn(4, N, generator=torch.Generator().manual_seed(1))
    with _LargestTensor() as seen:
        for _ in range(2):  # the second step transports the state
            opt.zero_grad()
            layer(x).pow(2).mean().backward()
            opt.step()
    assert seen.largest <= 2 * N * 8 * 4, (seen.largest, seen.op)  # O((m + n) r): a few packed stacks
    with _LargestTensor() as control:  # the detector sees a dense matrix when one is formed
        layer.weight_matrix().full()
    assert control.largest == N * N
    assert math.isfinite(float(layer(x).sum()))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "make",
    [
        lambda p: RiemannianSGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
        lambda p: RiemannianAdam(p, lr=0.02, weight_decay=0.01),
        lambda p: Riemannion(p, lr=0.02, weight_decay=0.01),
    ],
)
def test_cuda_training_matches_cpu(make):
    """The batched kernels on the device (three same-shape weights in one stack) follow the CPU run."""
    model = Stack(torch.Generator().manual_seed(3))
    model_c = copy.deepcopy(model).to("cuda")
    g = torch.Generator().manual_seed(4)
    X, Y = torch.randn(8, 6, dtype=DT, generator=g), torch.randn(8, 3, dtype=DT, generator=g)
    train(model, make(model.parameters()), X, Y, 10)
    train(model_c, make(model_c.parameters()), X.cuda(), Y.cuda(), 10)
    for layer, layer_c in zip(model.layers, model_c.layers):
        assert rel(dense_w(layer_c).cpu(), dense_w(layer)) < 1e-10
