"""TensorTrain.gather on prefix/suffix tables, merged middle modes and padded blocks (formats/tt_gather.py), and the
sorted index plans of the δ-objects (formats/index_plan.py): values, gradients and Hessian-vector products against a
dense reference, on every layout the planner can choose."""

import pytest
import torch
from reference import tt_full

from lowrankopt import TensorTrain
from lowrankopt.formats import tt_gather as tg
from lowrankopt.formats.index_plan import IndexPlan, sort_order

# (TABLE_ROWS, MERGED, SLICE_BUDGET): the defaults; no tables beyond the end modes (every other mode in the middle,
# merged); single-mode middle chunks (a permutation between each); core slices gathered a few blocks at a time.
SETTINGS = {
    "default": (tg.TABLE_ROWS, tg.MERGED, tg.SLICE_BUDGET),
    "merged-middle": (0, tg.MERGED, tg.SLICE_BUDGET),
    "single-mode-middle": (0, 1, tg.SLICE_BUDGET),
    "split-slices": (0, 1, 1),
}
SHAPES = [(5,), (4, 3), (3, 1, 4, 2, 3), (2, 3, 2, 3, 2, 2), (1, 1, 1)]


@pytest.fixture(params=list(SETTINGS))
def setting(request, monkeypatch):
    rows, merged, budget = SETTINGS[request.param]
    monkeypatch.setattr(tg, "TABLE_ROWS", rows)
    monkeypatch.setattr(tg, "MERGED", merged)
    monkeypatch.setattr(tg, "SLICE_BUDGET", budget)
    return request.param


def random_cores(shape, rank, dtype, g):
    d = len(shape)
    ranks = [1] + [rank] * (d - 1) + [1]
    return [torch.randn(ranks[k], shape[k], ranks[k + 1], generator=g, dtype=dtype) for k in range(d)]


def random_index(shape, N, g):
    """N unsorted multi-indices with repetitions, plus an explicit duplicate of the first rows."""
    idx = torch.stack([torch.randint(0, n, (N,), generator=g) for n in shape], 1)
    return torch.cat([idx, idx[:3]], 0) if N else idx


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("N", [0, 1, 9, 700])
def test_gather_matches_dense(setting, shape, N, dtype):
    g = torch.Generator().manual_seed(N + len(shape))
    cores = random_cores(shape, 3, dtype, g)
    idx = random_index(shape, N, g)
    got = TensorTrain(cores).gather(idx)
    ref = tt_full([c.double() for c in cores])[tuple(idx.T)]
    assert got.dtype == dtype and got.shape == (idx.shape[0],)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert torch.allclose(got.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", SHAPES[1:])
def test_gather_gradient_and_hvp_match_dense(setting, shape):
    """Exact first and second derivatives of a completion loss in the cores (double backward through the gather)."""
    g = torch.Generator().manual_seed(len(shape))
    cores = [c.requires_grad_(True) for c in random_cores(shape, 3, torch.float64, g)]
    idx = random_index(shape, 600, g)
    vals = torch.randn(idx.shape[0], dtype=torch.float64, generator=g)
    vs = [torch.randn(c.shape, dtype=torch.float64, generator=g) for c in cores]

    def grad_and_hvp(entries):
        loss = 0.5 * ((entries(cores) - vals) ** 2).sum()
        grads = torch.autograd.grad(loss, cores, create_graph=True)
        hvp = torch.autograd.grad(sum((a * v).sum() for a, v in zip(grads, vs)), cores)
        return grads, hvp

    got = grad_and_hvp(lambda cs: TensorTrain(cs).gather(idx))
    ref = grad_and_hvp(lambda cs: tt_full(cs)[tuple(idx.T)])
    for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
        assert torch.allclose(a, b, atol=1e-11, rtol=1e-11)


def test_layout_of_the_t3f_instance_and_its_invariants():
    assert tg.layout([20] * 10, 10, 100_000) == (4, 6, [(4, 6)])  # 20⁴-row tables, one merged mode of 400
    assert tg.layout([7, 9], 5, 10) == (1, 1, [])  # d = 2: the end modes' tables meet
    for shape, N in [([20] * 40, 100_000), ([3, 50, 2, 7, 1, 4], 300), ([1000] * 3, 50), ([2] * 30, 10**6)]:
        a, b, chunks = tg.layout(shape, 10, N)
        assert 1 <= a <= b <= len(shape) - 1
        assert (a == b and not chunks) or (chunks[0][0] == a and chunks[-1][1] == b)  # the chunks tile [a, b)
        assert all(c[1] == n[0] and c[0] < c[1] for c, n in zip(chunks, chunks[1:] + [(b, b)]))
        for s, e in chunks:
            size = 1
            for n in shape[s:e]:
                size *= n
            assert e - s == 1 or size <= min(tg.MERGED, N // 16)


@pytest.mark.parametrize(
    "keys,R",
    [
        (torch.randint(0, 400, (5000,), generator=torch.Generator().manual_seed(0)), 400),  # spread
        (torch.full((300,), 7), 20),  # one key drawn by every sample
        (torch.randint(0, 10**5, (50,), generator=torch.Generator().manual_seed(1)), 10**5),  # sparse: R >> N
        (torch.zeros(0, dtype=torch.int64), 5),
    ],
)
def test_blocks_are_a_padded_arrangement(keys, R):
    blk = tg.Blocks(keys, R)
    N = keys.shape[0]
    assert torch.equal(blk.src.index_select(0, blk.slot), torch.arange(N))  # slot and src invert each other
    assert torch.equal(blk.src_or_end.index_select(0, blk.slot), torch.arange(N))
    assert int((blk.src_or_end == N).sum()) == blk.src.shape[0] - N  # the padding slots point past the end
    T = blk.block_key.shape[0]
    assert blk.src.shape == (T * blk.B,) and T * blk.B >= N
    block_of = torch.div(blk.slot, blk.B, rounding_mode="floor")
    assert torch.equal(blk.block_key.index_select(0, block_of), keys)  # every sample sits in a block of its key
    core = torch.randn(2, R, 3, dtype=torch.float64)
    v = torch.randn(N, 2, dtype=torch.float64)
    got = blk.times_core(v.index_select(0, blk.src) if N else v.new_zeros(T * blk.B, 2), core).index_select(0, blk.slot)
    assert torch.allclose(got, torch.einsum("pa,apb->pb", v, core[:, keys, :]), atol=1e-13)


@pytest.mark.parametrize("size", [1, 3, 255, 256, 257, 40_000, 2**33])
def test_sort_order_sorts_in_every_key_width(size):
    keys = torch.randint(0, size, (1000,), generator=torch.Generator().manual_seed(size % 1000))
    order = sort_order(keys, size)
    assert torch.equal(torch.sort(order).values, torch.arange(1000))
    assert torch.equal(keys[order], torch.sort(keys).values)


def test_index_plan_products_and_their_gradients_match_per_sample_products():
    """times_core, core_times and outer_sum, differentiated (the split path) and not (the in-place path)."""
    g = torch.Generator().manual_seed(3)
    shape = (4, 1, 6)
    idx = torch.stack([torch.randint(0, n, (80,), generator=g) for n in shape], 1)
    plan = IndexPlan(idx, shape)
    k, ik = 2, idx[:, 2]
    core = torch.randn(3, 6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(80, 3, dtype=torch.float64, generator=g, requires_grad=True)
    u = torch.randn(80, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(80, 5, dtype=torch.float64, generator=g)
    vs, us = plan.from_natural(v, k), plan.from_natural(u, k)
    got = plan.to_natural(plan.times_core(vs, core, k), k)
    ref = torch.einsum("pa,apb->pb", v, core[:, ik, :])
    assert torch.allclose(got, ref, atol=1e-13)
    with torch.no_grad():
        assert torch.allclose(plan.to_natural(plan.times_core(vs, core, k), k), ref, atol=1e-13)
    assert torch.allclose(
        plan.to_natural(plan.core_times(core, us, k), k), torch.einsum("apb,pb->pa", core[:, ik, :], u), atol=1e-13
    )
    out = plan.outer_sum(vs, us, k, 6)
    ref_out = torch.zeros(3, 6, 5, dtype=torch.float64).index_add(1, ik, torch.einsum("pa,pb->apb", v, u))
    assert torch.allclose(out, ref_out, atol=1e-13)
    for a, b in zip(
        torch.autograd.grad((got * w).sum() + (out * core).sum(), (core, v, u)),
        torch.autograd.grad((ref * w).sum() + (ref_out * core).sum(), (core, v, u)),
    ):
        assert torch.allclose(a, b, atol=1e-12)


def per_sample_interfaces(U, V, row, k):
    """ℓ_k = U_1[i_1]⋯U_{k-1}[i_{k-1}] and ρ_k = V_{k+1}[i_{k+1}]⋯V_d[i_d] at one multi-index, by explicit products."""
    ell = torch.ones(1, 1, dtype=torch.float64)
    for j in range(k):
        ell = ell @ U[j][:, row[j], :]
    rho = torch.ones(1, 1, dtype=torch.float64)
    for j in range(len(V) - 1, k, -1):
        rho = V[j][:, row[j], :] @ rho
    return ell[0], rho[:, 0]


@pytest.mark.parametrize("shape", [(4, 3), (3, 1, 4, 2, 3), (2, 3, 2, 3, 2, 2)])
def test_linearization_grads_match_per_sample_outer_products(setting, shape):
    """G_k[:, j, :] = Σ_{p: i_k = j} g_p ℓ_k(p) ⊗ ρ_k(p) on every layout, and its derivative in g (the HVP's)."""
    g_ = torch.Generator().manual_seed(7)
    d = len(shape)
    ranks = [1] + [2 + k % 2 for k in range(d - 1)] + [1]
    U = [torch.randn(ranks[k], shape[k], ranks[k + 1], generator=g_, dtype=torch.float64) for k in range(d - 1)]
    V = [None] + [torch.randn(ranks[k], shape[k], ranks[k + 1], generator=g_, dtype=torch.float64) for k in range(1, d)]
    idx = random_index(shape, 500, g_)
    N = idx.shape[0]
    weights = torch.randn(N, dtype=torch.float64, generator=g_, requires_grad=True)
    C = torch.randn(1, shape[0], ranks[1], generator=g_, dtype=torch.float64)
    lin = tg.Linearization(tg.SamplePlan(idx, list(shape), 3), C, U, V)
    assert torch.allclose(lin.value, tt_full([C, *V[1:]])[tuple(idx.T)], atol=1e-12)  # x's entries
    got = lin.grads(weights)
    ref = [torch.zeros(ranks[k], shape[k], ranks[k + 1], dtype=torch.float64) for k in range(d)]
    outer = [[None] * d for _ in range(N)]
    for p, row in enumerate(idx.tolist()):
        for k in range(d):
            ell, rho = per_sample_interfaces(U, V, row, k)
            outer[p][k] = torch.outer(ell, rho)
            ref[k][:, row[k], :] += weights[p].detach() * outer[p][k]
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, atol=1e-12)
    Ws = [torch.randn(t.shape, dtype=torch.float64, generator=g_) for t in ref]
    (dg,) = torch.autograd.grad(sum((a * w).sum() for a, w in zip(got, Ws)), weights)
    ref_dg = torch.stack(
        [sum((outer[p][k] * Ws[k][:, row[k], :]).sum() for k in range(d)) for p, row in enumerate(idx.tolist())]
    )
    assert torch.allclose(dg, ref_dg, atol=1e-12)


def test_riemannian_grad_and_hvp_on_tables_match_the_general_gather(setting, monkeypatch):
    """The gradient's object takes the table path (DeltaTT._plain_linearization); the sorted-plan path is the
    reference for riemannian_grad and riemannian_hvp(curvature=False), and a dense projected gradient for the first."""
    from reference import tt_projector

    from lowrankopt import FixedTTRank, riemannian_grad, riemannian_hvp
    from lowrankopt.formats.delta_tt import DeltaTT

    monkeypatch.setattr(tg, "GRAD_TABLE_ROWS", tg.TABLE_ROWS)
    shape = (3, 2, 3, 2, 3)
    M = FixedTTRank(shape, (2, 3, 3, 2))
    g_ = torch.Generator().manual_seed(11)
    x, A = M.random_point(dtype=torch.float64, generator=g_), M.random_point(dtype=torch.float64, generator=g_)
    idx = random_index(shape, 900, g_)
    vals = A.gather(idx)

    def f(Y):
        return 0.5 * ((Y.gather(idx) - vals) ** 2).sum()

    xi = M.random_tangent(x, generator=g_)
    assert M.linearization(x, M.zero_deltas(x))._plain_linearization() is not None
    _, grad = riemannian_grad(f, x)
    hvp = riemannian_hvp(f, x, xi, curvature=False)
    X = tt_full(x.cores)
    E = torch.zeros_like(X).index_put_(tuple(idx.T), X[tuple(idx.T)] - vals, accumulate=True)  # dense ∇f
    dense = (tt_projector(x) @ E.reshape(-1)).reshape(X.shape)
    assert torch.allclose(M.to_ambient(x, grad).full(), dense, atol=1e-12)
    monkeypatch.setattr(DeltaTT, "_plain_linearization", lambda self: None)
    _, grad0 = riemannian_grad(f, x)
    hvp0 = riemannian_hvp(f, x, xi, curvature=False)
    for a, b in zip(grad.coords + hvp.coords, grad0.coords + hvp0.coords):
        assert torch.allclose(a, b, atol=1e-12)


def test_sample_plans_are_kept_per_index_and_rebuilt_when_it_changes(monkeypatch):
    """A gather's plan is built once per index tensor (what an optimizer's thousands of calls share), rebuilt after an
    in-place write (through a view too) or under another layout setting, and dropped when the tensor dies."""
    g = torch.Generator().manual_seed(5)
    shape = (3, 4, 2, 3)
    cores = random_cores(shape, 2, torch.float64, g)
    X = TensorTrain(cores)
    index = random_index(shape, 40, g)
    plan = tg.sample_plan(index, shape, 2)
    assert tg.sample_plan(index, shape, 2) is plan
    assert tg.sample_plan(index, shape, 2, tg.GRAD_TABLE_ROWS) is not plan  # another table size, another plan
    with monkeypatch.context() as m:
        m.setattr(tg, "MERGED", 1)  # another layout setting
        assert tg.sample_plan(index, shape, 2) is not plan
    index[1:][0, 2] = (index[1, 2] + 1) % shape[2]  # in place, through a view
    assert tg.sample_plan(index, shape, 2) is not plan
    full = tt_full(cores)
    assert torch.allclose(X.gather(index), full[tuple(index.T)], rtol=0, atol=1e-13)
    before = len(tg._PLANS._entries)
    del index, plan
    assert len(tg._PLANS._entries) == before - 1  # the entry went with its tensor
