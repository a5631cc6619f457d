"""locally_optimal_init: the LOI theorem against a dense gradient (float64), LoRA-GA / PiSSA / random starts, exact
outputs after the init, nothing else changed, no dense out x in tensor, reproducibility and bad input."""

import copy
import math

import pytest
import torch
from allocations import LargestAllocation

from lowrankopt.nn import RiemannianLoRAConfig, convert_to_riemannian_lora, locally_optimal_init

D = torch.float64
NAMES = ["fc1", "fc2", "fc3"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class Net(torch.nn.Module):
    """fc3 (20 -> 3) has 2r > min(out, in) at r = 2: LOI completes V_{r+1:2r}."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(24, 32)
        self.fc2 = torch.nn.Linear(32, 20)
        self.fc3 = torch.nn.Linear(20, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def make_base():
    torch.manual_seed(0)
    return Net().double()


def make_batches():
    g = _gen(1)
    return [(torch.randn(16, 24, dtype=D, generator=g), torch.randn(16, 3, dtype=D, generator=g)) for _ in range(3)]


def loss_fn(model, batch):
    x, y = batch
    return (model(x) - y).square().mean()


def adapted(base, r=2, names=NAMES):
    model = copy.deepcopy(base)
    convert_to_riemannian_lora(model, RiemannianLoRAConfig(r=r, target_modules=names))
    return model


def dense_gradients(base, batches, names=NAMES):
    """G = dL/dW of each named layer, summed over the batches, by autograd on a dense copy."""
    model = copy.deepcopy(base)
    for b in batches:
        loss_fn(model, b).backward()
    return {n: model.get_submodule(n).weight.grad.clone() for n in names}


def svd_top(G, k):
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    return U[:, :k], S[:k], Vh[:k].T


def sin_angle(P, Q):
    """The sine of the largest principal angle between the column spaces of P and Q (orthonormalized)."""
    P, Q = torch.linalg.qr(P)[0], torch.linalg.qr(Q)[0]
    return float(torch.linalg.matrix_norm(P - Q @ (Q.T @ P), ord=2))


def riemannian_gradient(layer):
    """P_T(G) at the layer's point, densely: the adapter's .grad projected by the manifold."""
    man, p = layer.manifold, layer.lora_X.detach()
    v = man.unpack_tangent(p, man.egrad2rgrad(p, layer.lora_X.grad))
    return man.base.to_ambient(v.base, v).full()


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------- the LOI theorem
@pytest.mark.parametrize("method", ["loi", "lora-ga"])
@pytest.mark.parametrize(("oversample", "power_iters"), [(40, 0), (4, 30)])
def test_first_riemannian_gradient_is_the_best_rank_2r_approximation(method, oversample, power_iters):
    """The theorem: at the start, P_T(G) = SVD_2r(G) — exactly when the sketch spans everything (k = min(out, in)),
    to 1e-10 with a narrow sketch (k = 2r + 4) and enough power steps; LoRA-GA's mirrored pairing too."""
    base, batches = make_base(), make_batches()
    G = dense_gradients(base, batches)
    model = adapted(base)
    locally_optimal_init(model, loss_fn, batches, method=method, oversample=oversample, power_iters=power_iters)
    for b in batches:
        loss_fn(model, b).backward()
    for n in NAMES:
        U, S, V = svd_top(G[n], 4)
        assert rel(riemannian_gradient(model.get_submodule(n)), U @ torch.diag(S) @ V.T) < 1e-10, n


@pytest.mark.parametrize(("oversample", "power_iters", "tol"), [(40, 0, 1e-12), (4, 30, 1e-10)])
def test_loi_point_spans_the_top_singular_subspaces(oversample, power_iters, tol):
    """X₀ = α U_{1:r} V_{r+1:2r}ᵀ: its column space is G's top-r left singular subspace, its row space the
    (r+1..2r)-th right one; its singular values are |α| = 0.01/√r (α = −0.01/√r by default)."""
    base, batches = make_base(), make_batches()
    G = dense_gradients(base, batches)
    model = adapted(base)
    stats = locally_optimal_init(model, loss_fn, batches, oversample=oversample, power_iters=power_iters)
    for n in ["fc1", "fc2"]:
        layer = model.get_submodule(n)
        C, V = layer.manifold.unpack_tensor(layer.lora_X.detach())
        U, _, Vd = svd_top(G[n], 4)
        assert sin_angle(C, U[:, :2]) < tol and sin_angle(V, Vd[:, 2:4]) < tol, n
        assert torch.allclose(torch.linalg.svdvals(C), torch.full((2,), 0.01 / math.sqrt(2), dtype=D), rtol=1e-12)
        s = stats[n]
        assert s["scale"] == -0.01 / math.sqrt(2) and s["reached"] == 1.0
        S = torch.linalg.svdvals(G[n])
        assert s["sigma_1"] == pytest.approx(float(S[0]), rel=1e-10)
        assert s["sigma_2r"] == pytest.approx(float(S[3]), rel=1e-10)
        true = float(S[:4].square().sum() / S.square().sum())
        assert abs(s["captured_energy"] - true) < 0.05  # an estimate: exact on the sketch, sampled beyond it
    assert stats["fc3"]["captured_energy"] == pytest.approx(1.0)  # rank G <= 3 <= 2r: the tangent space holds all


def test_lora_ga_point_and_explicit_scale():
    """LoRA-GA: X₀ = γ U_{r+1:2r} Σ_{r+1:2r} V_{1:r}ᵀ, γ = out^{1/4}/4 by default; an explicit scale replaces γ."""
    base, batches = make_base(), make_batches()
    G = dense_gradients(base, batches)
    for scale in (None, -0.3):
        model = adapted(base)
        stats = locally_optimal_init(model, loss_fn, batches, method="lora-ga", oversample=40, scale=scale)
        layer = model.fc1
        U, S, V = svd_top(G["fc1"], 4)
        gamma = 32**0.25 / 4 if scale is None else scale
        want = gamma * U[:, 2:4] @ torch.diag(S[2:4]) @ V[:, :2].T
        assert rel(layer.point().full(), want) < 1e-12
        assert stats["fc1"]["scale"] == pytest.approx(gamma)


def test_explicit_loi_scale_sets_the_singular_values_and_sign():
    base, batches = make_base(), make_batches()
    G = dense_gradients(base, batches)
    model = adapted(base)
    locally_optimal_init(model, loss_fn, batches, scale=0.5, oversample=40)
    U, _, V = svd_top(G["fc2"], 4)
    assert rel(model.fc2.point().full(), 0.5 * U[:, :2] @ V[:, 2:4].T) < 1e-12


# ---------------------------------------------------------------------- the model otherwise unchanged
@pytest.mark.parametrize("method", ["loi", "lora-ga", "pissa", "random"])
def test_outputs_and_everything_but_the_adapters_unchanged(method):
    base, batches = make_base(), make_batches()
    model = adapted(base)
    model.train()
    model.fc2.eval()  # a mixed state comes back as it was
    x = torch.randn(5, 24, dtype=D, generator=_gen(2))
    ref = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    point = model.fc1.lora_X.detach().clone()
    locally_optimal_init(model, loss_fn, batches, method=method)
    assert torch.equal(model(x), ref)
    after = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and model.fc1.training and not model.fc2.training
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(model.fc1.lora_X.detach(), point) or method == "random"
    for layer in (model.fc1, model.fc2, model.fc3):
        assert "_delta" not in layer.__dict__ and "_dense_delta" not in layer.__dict__ and not layer.disabled
        C, V = layer.manifold.unpack_tensor(layer.lora_X.detach())
        assert torch.equal(layer.lora_C0, C) and torch.equal(layer.lora_V0, V)  # X₀ = X bit for bit


def test_gradient_is_taken_at_the_base_weights_after_training():
    """A trained adapter is discarded: G is the base model's gradient, and the outputs return to the base model's."""
    base, batches = make_base(), make_batches()
    model = adapted(base)
    with torch.no_grad():
        model.fc1.set_point(torch.randn(32, 2, dtype=D, generator=_gen(3)), torch.randn(24, 2, dtype=D), offset=False)
    x = batches[0][0]
    assert not torch.equal(model(x), base(x))
    locally_optimal_init(model, loss_fn, batches, oversample=40)
    assert torch.equal(model(x), adapted(base)(x))
    for b in batches:
        loss_fn(model, b).backward()
    U, S, V = svd_top(dense_gradients(base, batches)["fc1"], 4)
    assert rel(riemannian_gradient(model.fc1), U @ torch.diag(S) @ V.T) < 1e-10


def test_a_layer_read_through_its_weight_multihead_attention_out_proj():
    """nn.MultiheadAttention reads out_proj.weight instead of calling out_proj: the probe joins the dense weight, and
    the theorem still holds there."""
    torch.manual_seed(0)
    base = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).double()
    g = _gen(4)
    batches = [(torch.randn(3, 5, 8, dtype=D, generator=g), torch.randn(3, 5, 8, dtype=D, generator=g))]
    G = dense_gradients(base, batches, names=["self_attn.out_proj", "linear1"])
    model = copy.deepcopy(base)
    convert_to_riemannian_lora(model, RiemannianLoRAConfig(r=2, target_modules=["out_proj", "linear1"]))
    locally_optimal_init(model, loss_fn, batches, oversample=40)
    for b in batches:
        loss_fn(model, b).backward()
    for n in G:
        U, S, V = svd_top(G[n], 4)
        assert rel(riemannian_gradient(model.get_submodule(n)), U @ torch.diag(S) @ V.T) < 1e-10, n


def test_a_layer_the_loss_does_not_reach_gets_the_random_start_with_a_warning():
    class Unused(Net):
        def __init__(self):
            super().__init__()
            self.pooler = torch.nn.Linear(3, 3)  # computed by nothing the loss uses

    torch.manual_seed(0)
    base = Unused().double()
    model = adapted(base, names=["fc1", "pooler"])
    fresh = adapted(base, names=["fc1", "pooler"])
    with pytest.warns(UserWarning, match="pooler"):
        stats = locally_optimal_init(model, loss_fn, make_batches())
    assert stats["pooler"]["reached"] == 0.0 and stats["fc1"]["reached"] == 1.0
    torch.testing.assert_close(model.pooler.lora_X, fresh.pooler.lora_X, rtol=1e-14, atol=0)


# ---------------------------------------------------------------------- PiSSA and random
class Conv1D(torch.nn.Module):
    """GPT-2's layout: ``y = x W + b`` with ``W: (in, out)``."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n_in, n_out, dtype=D) / n_in**0.5)
        self.bias = torch.nn.Parameter(torch.zeros(n_out, dtype=D))

    def forward(self, x):
        return x @ self.weight + self.bias


@pytest.mark.parametrize(("oversample", "power_iters", "tol"), [(40, 0, 1e-12), (8, 40, 1e-8)])
def test_pissa_start_is_the_top_r_svd_of_the_weight(oversample, power_iters, tol):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Tanh(), Conv1D(32, 20)).double()
    model = copy.deepcopy(base)
    convert_to_riemannian_lora(model, RiemannianLoRAConfig(r=3, target_modules=["0", "2"]))
    x = torch.randn(4, 24, dtype=D, generator=_gen(5))
    ref = model(x)
    stats = locally_optimal_init(model, loss_fn, [], method="pissa", oversample=oversample, power_iters=power_iters)
    assert torch.equal(model(x), ref)
    for name, W in (("0", base[0].weight.detach()), ("2", base[2].weight.detach().T)):
        U, S, V = svd_top(W, 3)
        assert rel(model.get_submodule(name).point().full(), U @ torch.diag(S) @ V.T) < tol
        assert stats[name]["sigma_r"] == pytest.approx(float(S[2]), rel=tol)
        assert stats[name]["captured_energy"] == pytest.approx(float(S.square().sum() / W.square().sum()), rel=tol)


def test_random_start_restores_the_converters_and_redraws_with_a_generator():
    base = make_base()
    model, fresh = adapted(base), adapted(base)
    locally_optimal_init(model, loss_fn, make_batches(), method="loi")
    locally_optimal_init(model, loss_fn, [], method="random")
    for n in NAMES:  # the converter's draw, to rounding (the factors are multiplied in another order)
        torch.testing.assert_close(model.get_submodule(n).lora_X, fresh.get_submodule(n).lora_X, rtol=1e-14, atol=0)
    stats = locally_optimal_init(model, loss_fn, [], method="random", generator=_gen(7), scale=-0.2)
    assert stats["fc1"]["scale"] == -0.2
    assert torch.allclose(torch.linalg.svdvals(model.fc1.point().full())[:2], torch.full((2,), 0.2, dtype=D))
    assert not torch.equal(model.fc1.lora_X, fresh.fc1.lora_X)


# ---------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("method", ["loi", "lora-ga", "pissa", "random"])
def test_reproducible_with_a_generator(method):
    base, batches = make_base(), make_batches()
    points = []
    for seed in (0, 0, 1):
        model = adapted(base)
        locally_optimal_init(model, loss_fn, batches, method=method, oversample=1, generator=_gen(seed))
        points.append(model.fc1.lora_X.detach().clone())
    assert torch.equal(points[0], points[1])
    assert not torch.equal(points[0], points[2])


def test_reproducible_without_a_generator():
    base, batches = make_base(), make_batches()
    a, b = adapted(base), adapted(base)
    locally_optimal_init(a, loss_fn, batches, oversample=1)
    locally_optimal_init(b, loss_fn, batches, oversample=1)
    assert torch.equal(a.fc1.lora_X, b.fc1.lora_X)


# ---------------------------------------------------------------------- no dense gradient
@pytest.mark.parametrize("method", ["loi", "lora-ga"])
def test_no_dense_out_by_in_tensor(method):
    m = n = 1024
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(n, m)).double()
    model = copy.deepcopy(base)
    convert_to_riemannian_lora(model, RiemannianLoRAConfig(r=4, target_modules=["0"]))
    g = _gen(6)
    batches = [(torch.randn(8, n, dtype=D, generator=g), torch.randn(8, m, dtype=D, generator=g)) for _ in range(2)]
    with LargestAllocation() as allocations:
        stats = locally_optimal_init(model, loss_fn, batches, method=method)
    assert 0 < allocations.largest[0] < m * n * 8 / 8, allocations.largest  # the sketch [Ω | Ω'] is n x 2k
    S = torch.linalg.svdvals(dense_gradients(base, batches, names=["0"])["0"])
    # rank G <= 16 rows <= k = 2r + p: the sketch holds all of G, so the energy statistics are exact
    assert stats["0"]["captured_energy"] == pytest.approx(float(S[:8].square().sum() / S.square().sum()), rel=1e-10)


# ---------------------------------------------------------------------- bad input
def test_bad_input_leaves_the_model_untouched():
    base, batches = make_base(), make_batches()
    model = adapted(base)
    point = model.fc1.lora_X.detach().clone()
    with pytest.raises(ValueError, match="no Riemannian LoRA adapters"):
        locally_optimal_init(copy.deepcopy(base), loss_fn, batches)
    with pytest.raises(ValueError, match="batches is empty"):
        locally_optimal_init(model, loss_fn, [])
    with pytest.raises(ValueError, match="batches is empty"):
        locally_optimal_init(model, loss_fn, iter([]), method="lora-ga")
    with pytest.raises(TypeError, match="batches"):
        locally_optimal_init(model, loss_fn, 3)
    with pytest.raises(ValueError, match="loss_fn"):
        locally_optimal_init(model, lambda m, b: (m(b[0]) - b[1]).square(), batches)
    with pytest.raises(TypeError, match="loss_fn"):
        locally_optimal_init(model, lambda m, b: 1.0, batches)
    with pytest.raises(ValueError, match="loss_fn"):
        locally_optimal_init(model, lambda m, b: loss_fn(m, b).detach(), batches)
    with pytest.raises(ValueError, match="loss_fn"):
        locally_optimal_init(model, lambda m, b: loss_fn(m, b) * float("nan"), batches)
    with pytest.raises(TypeError, match="loss_fn"):
        locally_optimal_init(model, "mse", batches)
    with pytest.raises(ValueError, match="method"):
        locally_optimal_init(model, loss_fn, batches, method="gaussian")
    for scale in (0.0, float("inf"), True):
        with pytest.raises(ValueError, match="scale"):
            locally_optimal_init(model, loss_fn, batches, scale=scale)
    with pytest.raises(ValueError, match="oversample"):
        locally_optimal_init(model, loss_fn, batches, oversample=-1)
    with pytest.raises(ValueError, match="power_iters"):
        locally_optimal_init(model, loss_fn, batches, power_iters=1.5)
    with pytest.raises(TypeError, match="generator"):
        locally_optimal_init(model, loss_fn, batches, generator=0)

    calls = []

    def failing(m, b):  # fails in the second pass: nothing may have changed
        calls.append(1)
        if len(calls) > len(batches):
            raise RuntimeError("boom")
        return loss_fn(m, b)

    with pytest.raises(RuntimeError, match="boom"):
        locally_optimal_init(model, failing, batches)
    assert torch.equal(model.fc1.lora_X, point) and model.training
    assert all("_delta" not in layer.__dict__ for layer in (model.fc1, model.fc2, model.fc3))
    x = batches[0][0]
    assert torch.equal(model(x), base(x))


def test_merged_adapter_is_refused():
    from lowrankopt.nn import merge_adapter

    model = adapted(make_base())
    merge_adapter(model)
    with pytest.raises(ValueError, match="merged"):
        locally_optimal_init(model, loss_fn, make_batches())


def test_set_point_checks_its_arguments():
    layer = adapted(make_base()).fc1
    with pytest.raises(ValueError, match="shape"):
        layer.set_point(torch.zeros(32, 3, dtype=D), torch.zeros(24, 2, dtype=D))
    with pytest.raises(ValueError, match="rank"):
        layer.set_point(torch.ones(32, 2, dtype=D), torch.randn(24, 2, dtype=D))
    with pytest.raises(ValueError, match="non-finite"):
        layer.set_point(torch.full((32, 2), float("nan"), dtype=D), torch.randn(24, 2, dtype=D))
    C, V = torch.randn(32, 2, dtype=D), torch.randn(24, 2, dtype=D)
    layer.set_point(C, V, offset=False)
    assert not layer.has_offset and rel(layer.point().full(), C @ V.T) < 1e-14
