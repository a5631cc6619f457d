"""Riemannian LoRA adapters: the base model exactly at step 0, the forward and the δ-gradient against dense references
(no dense out × in tensor anywhere in a training step), merge/unmerge and the merge state in the state dict, training
with geoopt's RiemannianAdam, PEFT's selection language, bad input, GPT-2 Conv1D bases, and PEFT interop."""

import copy

import geoopt
import pytest
import torch
from allocations import LargestAllocation

import lowrankopt.optim
from lowrankopt.formats.lowrank import LowRankMatrix
from lowrankopt.nn import (
    GSOFTConfig,
    GSOFTLinear,
    RiemannianLoRAConfig,
    RiemannianLoRALinear,
    adapter_state_dict,
    convert_to_gsoft,
    convert_to_riemannian_lora,
    disable_adapters,
    load_adapter_state_dict,
    merge_adapter,
    merge_and_unload,
    unload,
    unmerge_adapter,
)

D = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(16, 12)
        self.v_proj = torch.nn.Linear(16, 12)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.GELU(), torch.nn.Linear(24, 16))

    def forward(self, x):
        return x + self.mlp(torch.tanh(self.q_proj(x)) * self.v_proj(x))


def make_model(dtype=D, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(Block(), Block(), torch.nn.Linear(16, 4)).to(dtype)


def layers(model):
    return [m for m in model.modules() if isinstance(m, RiemannianLoRALinear)]


def move_adapters(model, seed):
    """Put every adapter at a random point of its manifold (ΔW = X − X₀ ≠ 0, of the size of the weights)."""
    g = _gen(seed)
    with torch.no_grad():
        for layer in layers(model):
            X = LowRankMatrix.random(layer.out_features, layer.in_features, layer.rank, dtype=D, generator=g)
            layer.lora_X.copy_(layer.manifold.pack(X * 0.3))


def adapted(seed=1, dtype=D, **kw):
    model = make_model(dtype)
    convert_to_riemannian_lora(model, RiemannianLoRAConfig(r=3, target_modules="all-linear", **kw))
    move_adapters(model, seed)
    return model


def x_for(dtype=D, batch=5, seed=3):
    return torch.randn(batch, 16, dtype=torch.float64, generator=_gen(seed)).to(dtype)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def dense_delta(layer):
    """ΔW = C Vᵀ − C₀ V₀ᵀ, densely, in float64."""
    C, V = (t.double() for t in layer.manifold.unpack_tensor(layer.lora_X.detach()))
    return C @ V.T - layer.lora_C0.double() @ layer.lora_V0.double().T


# ---------------------------------------------------------------------- step 0, forward, gradient
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_step_0_outputs_are_the_base_models_exactly(dtype):
    model = make_model(dtype)
    x = x_for(dtype)
    ref, before = model(x), copy.deepcopy(model.state_dict())
    wrapped = convert_to_riemannian_lora(model, RiemannianLoRAConfig(r=2, target_modules="all-linear"))
    assert len(wrapped) == 9 and all(isinstance(m, RiemannianLoRALinear) for m in wrapped.values())
    assert torch.equal(model(x), ref)
    model.train()
    assert torch.equal(model(x), ref)  # the straight-through terms are exact zeros too
    for name, layer in wrapped.items():
        assert layer.compute_dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
        assert torch.equal(layer.base_layer.weight, before[f"{name}.weight"])  # never modified
        assert torch.equal(layer.delta_weight().full(), torch.zeros_like(layer.delta_weight().full()))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_X" for n in wrapped}
    # the parameter count: (out + in) r per layer
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        (m.in_features + m.out_features) * 2 for m in wrapped.values()
    )


def test_forward_is_the_dense_adapted_layer_and_delta_weight_is_low_rank():
    model = adapted()
    x = x_for()
    layer = model[0].q_proj
    dW = layer.delta_weight()
    assert isinstance(dW, LowRankMatrix) and dW.rank == 6 and dW.shape == (12, 16)
    assert rel(dW.full(), dense_delta(layer)) < 1e-14
    W = layer.base_layer.weight + dense_delta(layer)
    assert rel(layer(x), x @ W.T + layer.base_layer.bias) < 1e-14
    assert rel(layer.weight, W) < 1e-14  # .weight reads as the adapted dense weight
    with torch.no_grad():
        assert rel(layer(x), x @ W.T + layer.base_layer.bias) < 1e-14
    with disable_adapters(model):
        assert torch.equal(layer(x), layer.base_layer(x))
    y = layer(x.reshape(5, 1, 16))  # leading dimensions kept
    assert y.shape == (5, 1, 12)
    assert layer(torch.zeros(0, 16, dtype=D)).shape == (0, 12)


@pytest.mark.parametrize("offset", [True, False])
def test_the_gradient_is_the_delta_gradient_and_projects_to_the_riemannian_gradient(offset):
    model = adapted()
    layer = model[1].mlp[0]
    if not offset:  # ΔW = X: the product has r columns, not 2r
        layer.set_point(*layer.manifold.unpack_tensor(layer.lora_X.detach().clone()), offset=False)
    x = torch.randn(9, 12, dtype=D, generator=_gen(4)).requires_grad_()
    y = layer(x)
    g = torch.randn(y.shape, dtype=D, generator=_gen(5))
    (y * g).sum().backward()
    assert rel(x.grad, g @ (layer.base_layer.weight + dense_delta(layer))) < 1e-14  # the input's gradient
    x = x.detach()
    G = g.T @ x  # ∂L/∂ΔW, dense, in the test only
    X = layer.point()
    U, V = X.U, X.V
    C, _ = layer.manifold.unpack_tensor(layer.lora_X.detach())
    assert rel(layer.lora_X.grad, torch.cat([(G @ V).reshape(-1), (G.T @ U).reshape(-1)])) < 1e-13
    PT = G @ V @ V.T + U @ U.T @ G @ (torch.eye(12, dtype=D) - V @ V.T)
    A, B = layer.manifold.unpack_tensor(layer.manifold.egrad2rgrad(layer.lora_X.detach(), layer.lora_X.grad))
    assert rel(A @ V.T + U @ B.T, PT) < 1e-13
    # the same through .weight (what nn.MultiheadAttention reads)
    grad = layer.lora_X.grad.clone()
    layer.lora_X.grad = None
    (torch.nn.functional.linear(x, layer.weight, layer.bias) * g).sum().backward()
    assert rel(layer.lora_X.grad, grad) < 1e-13


def test_no_dense_out_by_in_tensor_in_a_training_step():
    """A 2048 × 2048 layer at rank 4: forward, backward and a RiemannianAdam step allocate nothing near
    out · in entries (the largest allocation is O(B out + (out + in) r))."""
    m = n = 2048
    model = torch.nn.Sequential(torch.nn.Linear(n, m))
    convert_to_riemannian_lora(model, RiemannianLoRAConfig(r=4, target_modules=["0"]))
    opt = geoopt.optim.RiemannianAdam([model[0].lora_X], lr=1e-3)
    x = torch.randn(8, n, generator=_gen(6))
    for _ in range(2):  # the second step has Adam's state
        with LargestAllocation() as allocations:
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        assert allocations.largest[0] < m * n * 4 / 16, allocations.largest
    assert allocations.largest[0] > 0


# ---------------------------------------------------------------------- training
def test_training_with_riemannian_adam_changes_outputs_and_keeps_rank_r():
    model = make_model()
    x, target = x_for(batch=32), torch.randn(32, 4, dtype=D, generator=_gen(7))
    ref = model(x).detach()
    convert_to_riemannian_lora(model, RiemannianLoRAConfig(r=2, target_modules=["q_proj", "mlp.2"]))
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(isinstance(p, geoopt.ManifoldParameter) for p in params)
    opt = geoopt.optim.RiemannianAdam(params, lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = (model(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.allclose(model(x), ref)
    for layer in layers(model):
        s = torch.linalg.svdvals(layer.point().full())
        assert s[1] > 1e-6 and s[2] < 1e-12  # rank exactly r = 2
        C, V = layer.manifold.unpack_tensor(layer.lora_X.detach())
        assert (V.T @ V - torch.eye(2, dtype=D)).abs().max() < 1e-12  # a valid packed point


# ---------------------------------------------------------------------- merging and the state dict
def test_merge_unmerge_round_trip_and_merge_and_unload():
    model = adapted()
    x = x_for()
    out = model(x)
    pristine = {n: m.base_layer.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "lora_X")}
    merge_adapter(model)
    assert all(m.merged for m in layers(model))
    assert rel(model(x), out) < 1e-14
    for layer in layers(model):  # the merged weight is W + ΔW
        name = next(n for n, m in model.named_modules() if m is layer)
        assert rel(layer.base_layer.weight, pristine[name] + dense_delta(layer)) < 1e-15
    unmerge_adapter(model)
    for name, m in model.named_modules():
        if name in pristine:
            assert rel(m.base_layer.weight, pristine[name]) < 1e-15
    assert rel(model(x), out) < 1e-14
    plain = merge_and_unload(copy.deepcopy(model))
    assert not layers(plain) and rel(plain(x), out) < 1e-14
    base = unload(model)
    assert not layers(base)
    assert all(rel(base.get_submodule(n).weight, w) < 1e-15 for n, w in pristine.items())


def test_bfloat16_bases_merge_and_unmerge_to_bfloat16_rounding():
    model = make_model(torch.bfloat16)
    convert_to_riemannian_lora(model, RiemannianLoRAConfig(r=3, target_modules="all-linear"))
    with torch.no_grad():
        for layer in layers(model):  # the adapters compute in float32: a random point of that dtype
            X = LowRankMatrix.random(layer.out_features, layer.in_features, 3, generator=_gen(16))
            layer.lora_X.copy_(layer.manifold.pack(X * 0.1))
    x = x_for(torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16 and model[0].q_proj.lora_X.dtype == torch.float32
    pristine = [m.base_layer.weight.detach().clone() for m in layers(model)]
    merge_adapter(model)
    for m, w in zip(layers(model), pristine):  # W + ΔW rounded once to bfloat16
        assert rel(m.base_layer.weight.double(), w.double() + dense_delta(m)) < 2**-8
    assert rel(model(x).double(), out.double()) < 2e-2
    unmerge_adapter(model)
    assert all(rel(m.base_layer.weight.double(), w.double()) < 2**-8 for m, w in zip(layers(model), pristine))


def test_unmerge_after_the_adapter_moved_restores_the_base_weight():
    model = adapted()
    pristine = [m.base_layer.weight.detach().clone() for m in layers(model)]
    merge_adapter(model)
    move_adapters(model, 9)  # e.g. loaded adapter weights while merged
    unmerge_adapter(model)
    assert all(rel(m.base_layer.weight, w) < 1e-15 for m, w in zip(layers(model), pristine))


def test_the_merged_state_round_trips_through_the_state_dict(tmp_path):
    a = adapted()
    x = x_for()
    out = a(x).detach()
    merge_adapter(a)
    torch.save(a.state_dict(), tmp_path / "merged.pt")
    sd = torch.load(tmp_path / "merged.pt", weights_only=True)
    assert sd["0.q_proj.merged_flag"].dtype == torch.bool and bool(sd["0.q_proj.merged_flag"])
    b = adapted(seed=5)  # another adapter, unmerged
    b.load_state_dict(sd)
    assert all(m.merged for m in layers(b))
    assert rel(b(x), out) < 1e-14
    unmerge_adapter(b)  # the record travelled with the weights
    assert rel(b(x), out) < 1e-14
    assert all(rel(m.base_layer.weight, n.base_layer.weight) < 1e-15 for m, n in zip(layers(b), layers(adapted())))
    # an unmerged state dict into a merged model loads as unmerged
    c = adapted(seed=5)
    merge_adapter(c)
    c.load_state_dict(b.state_dict())
    assert not any(m.merged for m in layers(c)) and rel(c(x), out) < 1e-14


def test_adapter_state_dict_round_trip_and_offsets_of_either_width():
    a, b = adapted(seed=1), adapted(seed=2)
    x = x_for()
    sd = adapter_state_dict(a)
    assert set(sd) == {f"{n}.{k}" for n, m in a.named_modules() if hasattr(m, "lora_X") for k in m.adapter_state_keys()}
    load_adapter_state_dict(b, sd)
    assert torch.equal(a(x), b(x))
    # a layer without an offset (ΔW = X, as converted from a trained PEFT LoRA) loads into one with, and back
    layer = a[0].q_proj
    fresh = copy.deepcopy(layer)
    no_offset = {k: v for k, v in layer.state_dict().items()}
    no_offset["lora_C0"], no_offset["lora_V0"] = torch.zeros(12, 0, dtype=D), torch.zeros(16, 0, dtype=D)
    no_offset["merged_left"], no_offset["merged_right"] = torch.zeros(12, 3, dtype=D), torch.zeros(16, 3, dtype=D)
    fresh.load_state_dict(no_offset)
    assert not fresh.has_offset and fresh.delta_weight().rank == 3
    C, V = fresh.manifold.unpack_tensor(fresh.lora_X.detach())
    assert rel(fresh(x[:, :16]), layer.base_layer(x) + x @ (C @ V.T).T) < 1e-14
    fresh.load_state_dict(layer.state_dict())
    assert fresh.has_offset and torch.equal(fresh(x), layer(x))
    # the same through the adapter files: one saved without offsets loads into a model with them
    with torch.no_grad():
        for m in layers(a):
            C, V = m.manifold.unpack_tensor(m.lora_X.detach())
            m.load_state_dict({**m.state_dict(), "lora_C0": C[:, :0], "lora_V0": V[:, :0],
                               "merged_left": C.clone(), "merged_right": V.clone()})  # fmt: skip
    load_adapter_state_dict(b, adapter_state_dict(a))
    assert not any(m.has_offset for m in layers(b)) and torch.equal(a(x), b(x))
    with pytest.raises(ValueError, match="lora_C0 must have shape"):
        load_adapter_state_dict(b, {**adapter_state_dict(a), "0.q_proj.lora_C0": torch.zeros(12, 2, dtype=D)})


def test_a_mix_of_gsoft_and_riemannian_lora_merges_all_or_none():
    model = make_model()
    convert_to_gsoft(model, GSOFTConfig(block_size=4, target_modules=["q_proj"]))
    convert_to_riemannian_lora(model, RiemannianLoRAConfig(r=2, target_modules="all-linear"))
    assert isinstance(model[0].q_proj, GSOFTLinear) and isinstance(model[0].v_proj, RiemannianLoRALinear)
    assert not isinstance(model[0].q_proj.base_layer, RiemannianLoRALinear)  # adapters are not nested
    move_adapters(model, 3)
    x = x_for()
    out = model(x)
    with torch.no_grad():
        model[2].base_layer.weight[0, 0] = float("inf")  # the last layer cannot be merged
    with pytest.raises(ValueError, match="2: merging would write non-finite"):
        merge_adapter(model)
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged_flag"))
    with torch.no_grad():
        model[2].base_layer.weight[0, 0] = 0.0
    out = model(x)
    merge_adapter(model)
    assert all(m.merged for m in model.modules() if hasattr(m, "merged_flag"))
    assert rel(model(x), out) < 1e-13
    unload(model)
    assert not any(hasattr(m, "merged_flag") for m in model.modules())


def test_a_transformer_layer_starts_exactly_trains_and_merges():
    """nn.MultiheadAttention reads out_proj.weight directly (the adapter's dense W + ΔW there), and torch's fast path
    (eval, no grad) reads every .weight: all start at the base model exactly and agree with the merged model."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, dtype=D)
    base = copy.deepcopy(layer).requires_grad_(False)  # torch's attention picks its kernel by requires_grad
    x = torch.randn(3, 5, 16, dtype=D, generator=_gen(14))
    wrapped = convert_to_riemannian_lora(layer, RiemannianLoRAConfig(r=2, target_modules="all-linear"))
    assert sorted(wrapped) == ["linear1", "linear2", "self_attn.out_proj"]
    assert torch.equal(layer(x), base(x))
    layer.eval(), base.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))
    layer.train()
    move_adapters(layer, 15)
    out = layer(x)
    out.square().sum().backward()
    assert all(m.lora_X.grad is not None and m.lora_X.grad.abs().sum() > 0 for m in wrapped.values())
    merge_adapter(layer)
    assert rel(layer(x), out) < 1e-13


def test_a_checkpoint_mid_training_continues_bit_identically(tmp_path):
    model = adapted()
    x = x_for()
    opt = geoopt.optim.RiemannianAdam([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def step(model, opt):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    for _ in range(2):
        step(model, opt)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    other = adapted(seed=8)
    other.load_state_dict(ckpt["model"])
    other_opt = geoopt.optim.RiemannianAdam([p for p in other.parameters() if p.requires_grad], lr=1e-2)
    other_opt.load_state_dict(ckpt["opt"])
    for _ in range(2):
        step(model, opt), step(other, other_opt)
    assert torch.equal(model(x), other(x))


# ---------------------------------------------------------------------- selection and options
def test_selection_bias_and_modules_to_save():
    model = make_model()
    cfg = RiemannianLoRAConfig(
        r=2, target_modules=["q_proj", "mlp.0"], exclude_modules=r"1\.q_proj", bias="lora_only", modules_to_save="2"
    )
    wrapped = convert_to_riemannian_lora(model, cfg)
    assert sorted(wrapped) == ["0.mlp.0", "0.q_proj", "1.mlp.0"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}" for n in wrapped for k in ("lora_X", "base_layer.bias")} | {"2.weight", "2.bias"}
    model = make_model()
    convert_to_riemannian_lora(model, RiemannianLoRAConfig(r=2, target_modules=r".*_proj", bias="all"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not n.endswith("lora_X")} == {n for n, _ in model.named_parameters() if "bias" in n}


def test_the_random_start_is_seeded_per_layer():
    a, b, c = make_model(), make_model(), make_model()
    convert_to_riemannian_lora(a, RiemannianLoRAConfig(r=2, target_modules="all-linear", seed=4))
    convert_to_riemannian_lora(b, RiemannianLoRAConfig(r=2, target_modules=["v_proj", "q_proj"], seed=4))
    convert_to_riemannian_lora(c, RiemannianLoRAConfig(r=2, target_modules="all-linear", seed=5))
    assert torch.equal(a[1].q_proj.lora_X, b[1].q_proj.lora_X)  # independent of which other layers are adapted
    assert not torch.equal(a[1].q_proj.lora_X, c[1].q_proj.lora_X)
    assert not torch.equal(a[1].q_proj.lora_X, a[0].q_proj.lora_X)
    s = torch.linalg.svdvals(a[0].q_proj.point().full())
    assert torch.allclose(s[:2], torch.full((2,), 0.01 / 2**0.5, dtype=D))  # init_scale None: 0.01/√r


class Conv1D(torch.nn.Module):
    """GPT-2's layout: ``y = x W + b`` with ``W: (in, out)``."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n_in, n_out, dtype=D) / n_in**0.5)
        self.bias = torch.nn.Parameter(torch.randn(n_out, dtype=D))

    def forward(self, x):
        return x @ self.weight + self.bias


def _conv1d_models():
    yield "stand-in", torch.nn.Sequential(Conv1D(16, 24), torch.nn.ReLU(), Conv1D(24, 8))
    transformers = pytest.importorskip("transformers.pytorch_utils", reason="transformers is not installed")
    yield (
        "transformers",
        torch.nn.Sequential(transformers.Conv1D(24, 16), torch.nn.ReLU(), transformers.Conv1D(8, 24)).double(),
    )


def test_conv1d_bases():
    torch.manual_seed(9)
    for _, model in _conv1d_models():
        x = x_for()
        ref = model(x)
        pristine = model[0].weight.detach().clone()
        wrapped = convert_to_riemannian_lora(model, RiemannianLoRAConfig(r=3, target_modules="all-linear"))
        assert sorted(wrapped) == ["0", "2"] and model[0].fan_in_fan_out
        assert (model[0].in_features, model[0].out_features) == (16, 24)
        assert torch.equal(model(x), ref)
        move_adapters(model, 10)
        out = model(x)
        assert rel(model[0](x), x @ (pristine + dense_delta(model[0]).T) + model[0].bias) < 1e-14
        assert rel(model[0].weight, pristine + dense_delta(model[0]).T) < 1e-14  # the base layout
        merge_adapter(model)
        assert rel(model[0].base_layer.weight, pristine + dense_delta(model[0]).T) < 1e-15
        assert rel(model(x), out) < 1e-14
        unmerge_adapter(model)
        assert rel(model[0].base_layer.weight, pristine) < 1e-15


# ---------------------------------------------------------------------- bad input
def _untouched(model, make):
    """Run ``make()`` (which must raise) and check ``model`` is unchanged."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    make()
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(v.is_meta and after[k].is_meta or torch.equal(after[k], v) for k, v in before.items())
    assert [type(m) for m in model.modules()] == types and [p.requires_grad for p in model.parameters()] == grads


def test_bad_configs():
    with pytest.raises(ValueError, match="r must"):
        RiemannianLoRAConfig(r=0, target_modules="all-linear")
    with pytest.raises(ValueError, match="target_modules"):
        RiemannianLoRAConfig(r=2)
    with pytest.raises(ValueError, match="bias"):
        RiemannianLoRAConfig(r=2, target_modules="all-linear", bias="gsoft_only")
    with pytest.raises(ValueError, match="init_scale"):
        RiemannianLoRAConfig(r=2, target_modules="all-linear", init_scale=0.0)
    with pytest.raises(TypeError, match="compute_dtype"):
        RiemannianLoRAConfig(r=2, target_modules="all-linear", compute_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="seed"):
        RiemannianLoRAConfig(r=2, target_modules="all-linear", seed=1.5)
    with pytest.raises(TypeError, match="modules_to_save"):
        RiemannianLoRAConfig(r=2, target_modules="all-linear", modules_to_save=lambda n, m: True)


def test_bad_input_is_refused_by_name_and_the_model_is_untouched():
    model = make_model()

    def refuses(exc, match, config):
        def make():
            with pytest.raises(exc, match=match):
                convert_to_riemannian_lora(model, config)

        _untouched(model, make)

    # a rank larger than min(out, in) of one selected layer (0.q_proj is 16 -> 12): nothing adapted
    refuses(ValueError, r"0\.q_proj: r=13 is larger than min\(out_features, in_features\) = 12",
            RiemannianLoRAConfig(r=13, target_modules="all-linear"))  # fmt: skip
    refuses(
        ValueError, "no module matches target_modules=\\['k_proj'\\]", RiemannianLoRAConfig(target_modules=["k_proj"])
    )
    refuses(
        TypeError,
        "target_modules=.* selects '0.mlp', a Sequential",
        RiemannianLoRAConfig(target_modules=r"0\.mlp"),
    )
    refuses(TypeError, "selects '0.mlp.1', a GELU", RiemannianLoRAConfig(target_modules=["mlp.1", "q_proj"]))
    refuses(ValueError, "modules_to_save", RiemannianLoRAConfig(target_modules=["q_proj"], modules_to_save=["head"]))
    with pytest.raises(TypeError, match="config must be a RiemannianLoRAConfig"):
        convert_to_riemannian_lora(model, GSOFTConfig(block_size=4, target_modules=["q_proj"]))
    # a frozen base of a dtype the adapter cannot take, a bias on another dtype, a base without values
    with torch.no_grad():
        model[0].q_proj.weight = torch.nn.Parameter(torch.zeros(12, 16, dtype=torch.int8), requires_grad=False)
    refuses(
        TypeError,
        r"0\.q_proj: base_layer\.weight has dtype torch\.int8",
        RiemannianLoRAConfig(target_modules=["q_proj"]),
    )
    model = make_model()
    model[1].v_proj.bias = torch.nn.Parameter(model[1].v_proj.bias.float())
    refuses(
        ValueError, r"1\.v_proj: base_layer\.bias is torch\.float32", RiemannianLoRAConfig(target_modules=["v_proj"])
    )
    model = make_model()
    model[0].mlp[2].to("meta")
    refuses(ValueError, "meta device", RiemannianLoRAConfig(target_modules="all-linear"))
    model = make_model()
    convert_to_riemannian_lora(model, RiemannianLoRAConfig(r=2, target_modules=["q_proj"]))
    refuses(ValueError, "already has Riemannian LoRA", RiemannianLoRAConfig(target_modules=["v_proj"]))


def test_a_base_moved_apart_from_its_adapter_is_refused_by_name():
    model = adapted()
    x = x_for()
    model[0].q_proj.base_layer.to("meta")
    with pytest.raises(
        RuntimeError, match=r"0\.q_proj: base_layer\.weight is on meta but the adapter \(lora_X\) is on cpu"
    ):
        model(x)
    model = adapted()
    model.to(torch.bfloat16)  # casts the adapters too
    with pytest.raises(TypeError, match=r"0\.q_proj: lora_X has dtype torch\.bfloat16"):
        model(x.bfloat16())
    with pytest.raises(TypeError, match="input has dtype torch.float32 but the layer has dtype torch.float64"):
        adapted()(x.float())


@pytest.mark.parametrize("optimizer", ["riemannian_adam", "riemannian_sgd", "riemannion", "sgd"])
def test_stepping_a_merged_adapter_is_refused_by_name(optimizer):
    model = adapted()  # the 16 -> 4 head at r = 3 too (2r > out_features)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = {
        "riemannian_adam": lambda: geoopt.optim.RiemannianAdam(params, lr=1e-3),
        "riemannian_sgd": lambda: geoopt.optim.RiemannianSGD(params, lr=1e-3, momentum=0.9),
        "riemannion": lambda: lowrankopt.optim.Riemannion(params, lr=1e-3),
        "sgd": lambda: torch.optim.SGD(params, lr=1e-3),
    }[optimizer]()
    model(x_for()).square().sum().backward()
    merge_adapter(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"adapter of '0\.q_proj', which is merged into its base weight.*Unmerge"):
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    opt.zero_grad()
    opt.step()  # no gradients: nothing to refuse (and nothing changes)
    unmerge_adapter(model)
    model(x_for()).square().sum().backward()
    if optimizer == "sgd":
        with pytest.raises(TypeError, match="not a Riemannian optimizer"):
            opt.step()
    else:
        opt.step()
    # the merge state loaded from a state dict marks the parameters too
    merged = adapted()
    merge_adapter(merged)
    fresh = adapted()
    fresh(x_for()).square().sum().backward()
    fresh.load_state_dict(merged.state_dict())
    with pytest.raises(RuntimeError, match="merged"):
        geoopt.optim.RiemannianAdam([p for p in fresh.parameters() if p.requires_grad]).step()


# ---------------------------------------------------------------------- PEFT interop
def _peft():
    return pytest.importorskip("peft", reason="peft is not installed: the PEFT round trips are skipped")


def test_our_model_exports_to_peft_with_the_same_outputs(tmp_path):
    peft = _peft()
    from lowrankopt.nn.manifold.lora_peft import save_peft, to_peft_config, to_peft_state_dict

    model = make_model()
    cfg = RiemannianLoRAConfig(r=3, target_modules=["q_proj", "v_proj", "mlp.0"], bias="lora_only", modules_to_save="2")
    convert_to_riemannian_lora(model, cfg)
    move_adapters(model, 11)
    with torch.no_grad():  # trained biases and head travel too
        for name, p in model.named_parameters():
            if p.requires_grad and not name.endswith("lora_X"):
                p.add_(0.1 * torch.randn(p.shape, dtype=D, generator=_gen(12)))
    x = x_for()
    ours = model(x)
    sd, config = to_peft_state_dict(model), to_peft_config(model)
    assert config.r == 6 and config.lora_alpha == 6 and config.bias == "lora_only" and config.modules_to_save == ["2"]
    assert sd["base_model.model.0.q_proj.lora_A.weight"].shape == (6, 16)
    assert sd["base_model.model.0.q_proj.lora_B.weight"].shape == (12, 6)
    peft_model = peft.get_peft_model(make_model(), config)
    result = peft.set_peft_model_state_dict(peft_model, sd)
    assert not result.unexpected_keys
    assert rel(peft_model(x), ours) < 1e-12
    save_peft(model, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(make_model(), tmp_path / "adapter")
    assert rel(loaded(x), ours) < 1e-12
    # a layer without an offset exports at rank r (rank_pattern for it)
    layer = model[0].q_proj
    layer.load_state_dict({**layer.state_dict(), "lora_C0": torch.zeros(12, 0), "lora_V0": torch.zeros(16, 0),
                           "merged_left": torch.zeros(12, 3), "merged_right": torch.zeros(16, 3)})  # fmt: skip
    config = to_peft_config(model)
    assert config.r == 6 and config.rank_pattern == {r"0\.q_proj": 3} and config.alpha_pattern == {r"0\.q_proj": 3}
    peft_model = peft.get_peft_model(make_model(), config)
    peft.set_peft_model_state_dict(peft_model, to_peft_state_dict(model))
    assert rel(peft_model(x), model(x)) < 1e-12


def _peft_lora(peft, B_rank=None, **kw):
    """A PEFT LoRA model of make_model with random ("trained") A and B; B of rank ``B_rank`` if given."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "mlp.0"], **kw)
    peft_model = peft.get_peft_model(make_model(), config)
    g = _gen(13)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, dtype=D, generator=g) * 0.3)
                if B_rank is not None and "lora_B" in name:
                    p[:, B_rank:] = 0.0
    return peft_model


@pytest.mark.parametrize("kind", ["trained", "rslora", "rank_pattern", "rank deficient", "fresh"])
def test_a_peft_lora_model_converts_with_the_same_outputs(kind):
    peft = _peft()
    from lowrankopt.nn.manifold.lora_peft import from_peft

    if kind == "fresh":
        peft_model = peft.get_peft_model(make_model(), peft.LoraConfig(r=4, target_modules="all-linear"))
    else:
        kw = {"rslora": {"use_rslora": True}, "rank_pattern": {"rank_pattern": {"mlp.0": 2}}}.get(kind, {})
        peft_model = _peft_lora(peft, B_rank=2 if kind == "rank deficient" else None, **kw)
    x = x_for()
    with torch.no_grad():
        expected = peft_model(x)
    model = from_peft(peft_model, seed=3)
    assert not any(type(m).__module__.startswith("peft") for m in model.modules())
    converted = layers(model)
    assert converted and all(m.lora_X.requires_grad for m in converted)
    if kind == "fresh":
        assert torch.equal(model(x), expected) and all(m.has_offset for m in converted)
        assert len(converted) == 9
    else:
        assert rel(model(x), expected) < 1e-12
        assert all(m.has_offset == (kind == "rank deficient") for m in converted)
        if kind == "rank_pattern":
            assert model[0].mlp[0].rank == 2 and model[0].q_proj.rank == 4
    # it trains, and exports back to PEFT with the same outputs
    opt = geoopt.optim.RiemannianAdam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(x).square().mean().backward()
    opt.step()
    from lowrankopt.nn.manifold.lora_peft import to_peft_config, to_peft_state_dict

    back = peft.get_peft_model(make_model(), to_peft_config(model))
    peft.set_peft_model_state_dict(back, to_peft_state_dict(model))
    assert rel(back(x), model(x)) < 1e-12


def test_peft_models_that_cannot_convert_are_refused_untouched():
    peft = _peft()
    from lowrankopt.nn.manifold.lora_peft import from_peft, to_peft_state_dict

    with pytest.raises(TypeError, match="peft_model must be a peft.PeftModel"):
        from_peft(make_model())
    for kw, exc, match in [
        ({"use_dora": True}, ValueError, "DoRA"),
        ({}, ValueError, "merged"),
    ]:
        peft_model = _peft_lora(peft, **kw)
        if not kw:
            peft_model.merge_adapter()
        before = {k: v.clone() for k, v in peft_model.state_dict().items()}
        with pytest.raises(exc, match=match):
            from_peft(peft_model)
        assert all(torch.equal(v, before[k]) for k, v in peft_model.state_dict().items())
    model = make_model()
    convert_to_gsoft(model, GSOFTConfig(block_size=4, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="GSOFTLinear: only Riemannian LoRA adapters export"):
        to_peft_state_dict(model)
    with pytest.raises(ValueError, match="no Riemannian LoRA adapters"):
        to_peft_state_dict(make_model())
    # PEFT's modules_to_save matches name suffixes: "2" would also wrap the adapted 0.mlp.2
    model = make_model()
    convert_to_riemannian_lora(
        model, RiemannianLoRAConfig(r=2, target_modules="all-linear", exclude_modules="2", modules_to_save="2")
    )
    with pytest.raises(ValueError, match="'0.mlp.2' ends with the saved module name '2'.*adapted layer"):
        to_peft_state_dict(model)
