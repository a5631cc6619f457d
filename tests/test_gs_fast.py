"""The fast GS paths (issue 21): gs_apply against dense products, the pooled Cayley blocks against the per-module
solve, their cache, and GSOFT's choice between rotating the weight and rotating the activations. All in float64
against references written here."""

import copy
import io
import pickle

import pytest
import torch

from lowrankopt.nn import GSOFTConfig, GSOrthogonal, convert_to_gsoft
from lowrankopt.nn.orthogonal import gs as gs_module
from lowrankopt.nn.orthogonal.gs import gs_apply
from lowrankopt.nn.orthogonal.gsoft_layer import GSOFTLinear, rotate_weight_cost

D = torch.float64


def dense_q(L, R, shuffle="paper"):
    """``Pᵀ diag(L) P diag(R)`` as a dense matrix, P built here from the paper: ``P_(k, n)`` (k blocks of size b,
    n = k b) has a 1 at ``(σ(i), i)``, ``σ(i) = (i mod k)·b + ⌊i/k⌋`` (Definition 5.2, Prop. 1's convention);
    the legacy P is its transpose."""
    k, b, _ = L.shape
    n = k * b
    P = torch.zeros(n, n, dtype=L.dtype)
    for i in range(n):
        P[(i % k) * b + i // k, i] = 1.0
    if shuffle != "paper":
        P = P.T
    return P.T @ torch.block_diag(*L) @ P @ torch.block_diag(*R)


def reference_blocks(q):
    """The Cayley blocks by the per-module solve ``(I − K)⁻¹ (I + K)`` (the map before pooling)."""
    b = q.block_size
    eye = torch.eye(b, dtype=q.L.dtype)
    return [torch.linalg.solve(eye - K, eye + K) for K in (_skew_ref(q.L, b), _skew_ref(q.R, b))]


def _skew_ref(p, b):
    rows, cols = torch.triu_indices(b, b, offset=1)
    S = torch.zeros(p.shape[0], b, b, dtype=p.dtype)
    S = S.index_put((torch.arange(p.shape[0])[:, None], rows[None], cols[None]), p)
    return S - S.mT


def randomize(q, g, scale=1.0):
    with torch.no_grad():
        q.L.copy_(scale * torch.randn(q.L.shape, dtype=q.L.dtype, generator=g))
        q.R.copy_(scale * torch.randn(q.R.shape, dtype=q.R.dtype, generator=g))


@pytest.mark.parametrize("n, b", [(24, 4), (12, 3), (16, 8), (8, 1), (10, 10), (48, 8)])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("shuffle", ["paper", "legacy"])
def test_gs_apply_matches_the_dense_product_and_its_gradients(n, b, transpose, shuffle):
    g = torch.Generator().manual_seed(n + b)
    k = n // b
    L = torch.randn(k, b, b, dtype=D, generator=g, requires_grad=True)
    R = torch.randn(k, b, b, dtype=D, generator=g, requires_grad=True)
    x = torch.randn(2, 3, n, dtype=D, generator=g, requires_grad=True)
    y = gs_apply(x, L, R, transpose=transpose, shuffle=shuffle)
    Q = dense_q(L, R, shuffle)
    ref = x @ (Q if transpose else Q.T)
    assert y.shape == x.shape and (y - ref).abs().max() < 1e-12
    w = torch.randn(y.shape, dtype=D, generator=g)
    got = torch.autograd.grad(y, (x, L, R), w)
    want = torch.autograd.grad(ref, (x, L, R), w)
    for a, c in zip(got, want, strict=True):
        assert (a - c).abs().max() < 1e-12
    assert gs_apply(torch.zeros(0, n, dtype=D), L, R, transpose=transpose, shuffle=shuffle).shape == (0, n)


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_pooled_cayley_blocks_match_the_solve_with_gradients(scale):
    g = torch.Generator().manual_seed(1)
    q = GSOrthogonal(48, 8, dtype=D)
    randomize(q, g, scale)
    got, want = q.blocks(), reference_blocks(q)
    for a, c in zip(got, want, strict=True):
        assert (a - c).abs().max() < 1e-12 * max(1.0, scale**2)
        assert (a.mT @ a - torch.eye(8, dtype=D)).abs().max() < 1e-12 * max(1.0, scale**2)
    w = [torch.randn(a.shape, dtype=D, generator=g) for a in got]
    g_got = torch.autograd.grad(got, (q.L, q.R), w)
    g_want = torch.autograd.grad(want, (q.L, q.R), w)
    for a, c in zip(g_got, g_want, strict=True):
        assert (a - c).abs().max() < 1e-12 * max(1.0, scale**2) * max(1.0, c.abs().max().item())


def test_gs_orthogonal_forward_gradcheck_and_second_derivatives():
    q = GSOrthogonal(12, 4, dtype=D)
    randomize(q, torch.Generator().manual_seed(2), 0.5)
    x = torch.randn(3, 12, dtype=D, requires_grad=True)

    def f(x, L, R):
        return torch.func.functional_call(q, {"L": L, "R": R}, (x,))

    L = q.L.detach().clone().requires_grad_()
    R = q.R.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, L, R))
    assert torch.autograd.gradgradcheck(f, (x, L, R))


def test_cache_follows_every_kind_of_parameter_change():
    g = torch.Generator().manual_seed(3)
    q = GSOrthogonal(16, 4, dtype=D)
    x = torch.randn(5, 16, dtype=D, generator=g)
    assert torch.allclose(q(x), x)  # identity at init
    q.L.data.add_(torch.randn(q.L.shape, dtype=D, generator=g))  # through .data: no version bump
    assert (q(x) - x @ dense_q(*reference_blocks(q)).T).abs().max() < 1e-12
    q.load_state_dict({"L": torch.randn(q.L.shape, dtype=D, generator=g), "R": q.R.detach()})
    assert (q(x) - x @ dense_q(*reference_blocks(q)).T).abs().max() < 1e-12
    q.float()
    y = q(x.float())
    assert y.dtype == torch.float32 and (y.double() - x @ dense_q(*reference_blocks(q.double())).T).abs().max() < 1e-5


def test_a_pool_of_mixed_rotations_maps_only_its_cayley_members():
    """Rotations with other maps or parametrizations may share a pool (share_cayley_pool takes a whole model): the
    pooled map skips them, and every member still computes its own Q."""
    g = torch.Generator().manual_seed(7)
    a = GSOrthogonal(8, 4, dtype=D)
    b = GSOrthogonal(8, 4, dtype=D, parametrization="orthogonal")
    c = GSOrthogonal(8, 4, dtype=D, map="exp")
    for q in (a, c):
        randomize(q, g, 0.3)
    gs_module.share_cayley_pool([a, b, c])
    x = torch.randn(3, 8, dtype=D, generator=g)
    assert (a(x) - x @ dense_q(*reference_blocks(a)).T).abs().max() < 1e-12
    assert c._cayley_cache is None  # not computed for a module that does not use it
    expm = [torch.linalg.matrix_exp(_skew_ref(p, 4)) for p in (c.L, c.R)]
    assert (c(x) - x @ dense_q(*expm).T).abs().max() < 1e-12
    assert torch.allclose(b(x), x)  # identity blocks


def test_a_cache_built_under_inference_mode_serves_training():
    g = torch.Generator().manual_seed(8)
    q = GSOrthogonal(8, 4, dtype=D)
    randomize(q, g, 0.3)
    x = torch.randn(3, 8, dtype=D, generator=g)
    with torch.inference_mode():
        y0 = q(x)
    y = q(x)  # the same parameters: the cache is reused, and must be saveable for backward
    y.square().sum().backward()
    assert torch.equal(y.detach(), y0) and q.L.grad is not None and torch.isfinite(q.L.grad).all()


def test_two_forwards_keep_separate_graphs():
    g = torch.Generator().manual_seed(4)
    q = GSOrthogonal(16, 4, dtype=D)
    randomize(q, g)
    x1, x2 = (torch.randn(3, 16, dtype=D, generator=g) for _ in range(2))
    y1, y2 = q(x1), q(x2)  # the second uses the cached blocks
    y1.sum().backward()
    y2.square().sum().backward()  # its own graph: not freed by the first backward
    got = q.L.grad.clone()
    q.zero_grad()
    L, R = reference_blocks(q)
    Q = dense_q(L, R)
    ((x1 @ Q.T).sum() + (x2 @ Q.T).square().sum()).backward()
    assert (got - q.L.grad).abs().max() < 1e-12


def mlp(dtype=D):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)
    ).to(dtype)


def test_a_models_rotations_are_mapped_in_one_batched_call(monkeypatch):
    model = mlp()
    convert_to_gsoft(model, GSOFTConfig(block_size=4, target_modules=["0", "2", "4"], double=True))
    pools = {id(m._pool) for m in model.modules() if isinstance(m, GSOrthogonal)}
    assert len(pools) == 1
    calls = []
    real = gs_module._cayley_values
    monkeypatch.setattr(gs_module, "_cayley_values", lambda K: calls.append(K.shape[0]) or real(K))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 16, dtype=D, generator=g)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    # two forwards: each maps the blocks of all six rotations once (16 + 32 + 32 + 16 + 16 + 8 = 120 sizes, b = 4)
    assert calls == [2 * 120 // 4] * 2
    # and the result is the dense adapted model's
    y = x
    for layer in model:
        if isinstance(layer, GSOFTLinear):
            a = {}
            for side, q in layer._rotations():
                a[side] = dense_q(*reference_blocks(q))
            W = layer.gsoft_scale[:, None] * (a["out"] @ layer.base_layer.weight @ a["in"])
            y = y @ W.T + layer.base_layer.bias
        else:
            y = layer(y)
    assert (model(x) - y).abs().max() < 1e-12


def test_copies_and_pickles_get_pools_of_their_own():
    model = mlp()
    convert_to_gsoft(model, GSOFTConfig(block_size=4, target_modules=["0", "2"]))
    x = torch.randn(4, 16, dtype=D)
    y = model(x)
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded, pickle.loads(pickle.dumps(model))):
        assert other[0].gsoft_in._pool is not model[0].gsoft_in._pool
        assert other[0].gsoft_in._pool is other[2].gsoft_in._pool
        assert torch.equal(other(x), y)
    with torch.no_grad():
        twin[0].gsoft_in.L.add_(0.5)  # the copy changes; the original keeps its blocks
    assert torch.equal(model(x), y) and not torch.allclose(twin(x), y)


def test_rotate_weight_cost_decisions():
    # MiniLM-like training step: rotating activations is cheaper
    act, wt = rotate_weight_cost(112, 384, 384, 8, None, training=True, input_grad=True)
    assert act < wt
    # inference with more tokens than outputs: rotate the weight
    act, wt = rotate_weight_cost(2000, 384, 384, 8, 8, training=False, input_grad=False)
    assert wt < act
    # training a tiny layer (n_out < 6 b) on many tokens: the weight
    act, wt = rotate_weight_cost(4096, 32, 4, 8, None, training=True, input_grad=True)
    assert wt < act


@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_weight_and_activation_paths_agree(double, grad, monkeypatch):
    g = torch.Generator().manual_seed(6)
    lin = torch.nn.Linear(16, 4 if not double else 8).to(D)
    layer = GSOFTLinear(lin, GSOFTConfig(block_size=4, double=double, target_modules=["x"]))
    for _, q in layer._rotations():
        randomize(q, g, 0.7)
    with torch.no_grad():
        layer.gsoft_scale.copy_(1 + 0.1 * torch.randn(layer.gsoft_scale.shape, dtype=D, generator=g))
    x = torch.randn(600, 16, dtype=D, generator=g, requires_grad=grad)
    outs, grads = [], []
    for force in (True, False):
        monkeypatch.setattr(GSOFTLinear, "_rotate_weight", lambda self, x, W, f=force: f)
        with torch.set_grad_enabled(grad):
            y = layer(x)
        outs.append(y.detach())
        if grad:
            params = [p for p in layer.parameters() if p.requires_grad] + [x]
            grads.append(torch.autograd.grad(y.square().sum(), params))
    monkeypatch.undo()
    ref = x.detach() @ layer.weight.detach().T + lin.bias.detach()  # the weight property: the dense adapted W
    assert (outs[0] - ref).abs().max() < 1e-12 and (outs[1] - ref).abs().max() < 1e-12
    for a, c in zip(*grads, strict=True):
        assert (a - c).abs().max() < 1e-11
    with torch.set_grad_enabled(grad):  # the cost model picks the weight here (600 tokens, 4 or 8 outputs)
        assert layer._rotate_weight(x, layer._weight())
        assert (layer(x).detach() - ref).abs().max() < 1e-12


def test_torch_func_grad_runs_the_differentiable_map():
    q = GSOrthogonal(8, 4, dtype=D)
    randomize(q, torch.Generator().manual_seed(7), 0.5)
    x = torch.randn(2, 8, dtype=D)
    params = {"L": q.L.detach(), "R": q.R.detach()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(q, p, (x,)).square().sum())(params)
    L = q.L.detach().clone().requires_grad_()
    R = q.R.detach().clone().requires_grad_()
    eye = torch.eye(4, dtype=D)
    blocks = [torch.linalg.solve(eye - K, eye + K) for K in (_skew_ref(L, 4), _skew_ref(R, 4))]
    (x @ dense_q(*blocks).T).square().sum().backward()
    assert (grads["L"] - L.grad).abs().max() < 1e-12 and (grads["R"] - R.grad).abs().max() < 1e-12


@pytest.mark.parametrize("groups", [1, 4])
def test_a_1x1_soc_is_the_exact_exponential_of_its_channel_mixing(groups):
    from lowrankopt.nn import GSOrthogonalConv2d, SkewOrthogonalConv2d

    g = torch.Generator().manual_seed(8)
    soc = SkewOrthogonalConv2d(8, 1, groups, init_scale=2.0, dtype=D, generator=g)
    with torch.no_grad():
        soc.bias.copy_(torch.randn(8, dtype=D, generator=g))
    x = torch.randn(3, 8, 5, 4, dtype=D, generator=g, requires_grad=True)
    y = soc(x)
    # reference: the series Σ_{i ≤ 60} Lⁱ x / i! of the 1×1 conv L (converged far below float64 rounding)
    K = soc.skew_kernel()
    term, ref = x, x
    for i in range(1, 61):
        term = torch.nn.functional.conv2d(term, K, groups=groups) / i
        ref = ref + term
    ref = ref + soc.bias[:, None, None]
    assert (y - ref).abs().max() < 1e-12
    w = torch.randn(y.shape, dtype=D, generator=g)
    for a, c in zip(torch.autograd.grad(y, (x, soc.weight), w), torch.autograd.grad(ref, (x, soc.weight), w)):
        assert (a - c).abs().max() < 1e-11
    gs = GSOrthogonalConv2d(8, 3, (2, 4), dtype=D, generator=g)  # its second factor is a grouped 1×1 SOC
    z = torch.randn(2, 8, 6, 6, dtype=D, generator=g)
    assert abs(gs(z).norm() - z.norm()) < 1e-5 * z.norm()  # orthogonal up to the first factor's tol
