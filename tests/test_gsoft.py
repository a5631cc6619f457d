"""GSOFT adapters: identity at injection, targeting, merge/unmerge, state dicts, training."""

import pytest
import torch

from lowrankopt.nn import (
    GSOFTConfig,
    GSOFTLinear,
    convert_to_gsoft,
    disable_adapters,
    gsoft_state_dict,
    load_gsoft_state_dict,
    merge_adapter,
    merge_and_unload,
    unmerge_adapter,
)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(16, 16)
        self.v_proj = torch.nn.Linear(16, 16)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))

    def forward(self, x):
        return x + self.mlp(torch.tanh(self.q_proj(x)) * self.v_proj(x))


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(Block(), Block(), torch.nn.Linear(16, 4)).to(dtype)


def randomize_adapters(model, g):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gsoft_" in name:
                p.copy_(
                    torch.randn(p.shape, dtype=p.dtype, generator=g) * (0.3 if "scale" not in name else 0.1)
                    + (1.0 if "scale" in name else 0.0)
                )


@pytest.mark.parametrize("double", [False, True])
def test_injection_targets_exactly_and_starts_at_the_base_model(double):
    model = make_model()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    ref = model(x)
    cfg = GSOFTConfig(block_size=4, target_modules=["q_proj", "mlp.0"], exclude_modules=r"1\.q_proj", double=double)
    wrapped = convert_to_gsoft(model, cfg)
    assert sorted(wrapped) == ["0.mlp.0", "0.q_proj", "1.mlp.0"]
    assert isinstance(model[0].q_proj, GSOFTLinear) and not isinstance(model[1].q_proj, GSOFTLinear)
    assert torch.equal(model(x), ref)  # Q = I, s = 1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("gsoft_" in n for n in trainable)
    # parameters: n_in (b − 1) (+ n_out (b − 1) double) + n_out per layer, b = 4
    sizes = [(16, 16), (16, 32), (16, 32)]  # 0.q_proj, 0.mlp.0, 1.mlp.0
    expected = sum(n_in * 3 + (n_out * 3 if double else 0) + n_out for n_in, n_out in sizes)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_all_linear_bias_and_modules_to_save():
    model = make_model()
    convert_to_gsoft(model, GSOFTConfig(r=4, target_modules="all-linear", bias="gsoft_only", modules_to_save=["2"]))
    assert sum(isinstance(m, GSOFTLinear) for m in model.modules()) == 9
    assert model[2].base_layer.weight.requires_grad and model[0].q_proj.base_layer.bias.requires_grad
    assert not model[0].q_proj.base_layer.weight.requires_grad


@pytest.mark.parametrize("double", [False, True])
def test_merge_unmerge_round_trip_and_merge_and_unload(double):
    model = make_model()
    convert_to_gsoft(model, GSOFTConfig(block_size=4, target_modules="all-linear", double=double))
    randomize_adapters(model, torch.Generator().manual_seed(2))
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(3))
    adapted = model(x)
    base_w = model[0].mlp[0].base_layer.weight.detach().clone()
    merge_adapter(model)
    assert all(m.merged for m in model.modules() if isinstance(m, GSOFTLinear))
    assert torch.allclose(model(x), adapted, atol=1e-5)
    unmerge_adapter(model)
    assert (model[0].mlp[0].base_layer.weight - base_w).abs().max() < 1e-6
    assert torch.allclose(model(x), adapted, atol=1e-5)
    with disable_adapters(model):
        base_out = model(x)
    assert not torch.allclose(base_out, adapted, atol=1e-3)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, GSOFTLinear) for m in plain.modules())
    assert torch.allclose(plain(x), adapted, atol=1e-5)


def test_disabled_adapters_give_the_base_model():
    model = make_model(torch.float64)
    x = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref = model(x)
    convert_to_gsoft(model, GSOFTConfig(block_size=8, target_modules="all-linear", exclude_modules=["2"], double=True))
    randomize_adapters(model, torch.Generator().manual_seed(5))
    with disable_adapters(model):
        assert torch.equal(model(x), ref)
    assert not torch.allclose(model(x), ref)


def test_state_dict_round_trip():
    a, b = make_model(), make_model()
    cfg = GSOFTConfig(
        block_size=4, target_modules=["v_proj"], double=True, modules_to_save="2"
    )  # regex: top-level only
    convert_to_gsoft(a, cfg)
    convert_to_gsoft(b, cfg)
    randomize_adapters(a, torch.Generator().manual_seed(6))
    with torch.no_grad():
        a[2].weight.add_(1.0)  # a trained head (modules_to_save) must travel with the adapters
    sd = gsoft_state_dict(a)
    assert "2.weight" in sd and all("gsoft_" in k or k.startswith("2.") for k in sd)
    load_gsoft_state_dict(b, sd)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a(x), b(x))
    with pytest.raises(ValueError, match="mismatch"):
        load_gsoft_state_dict(b, {"nonsense": torch.zeros(1)})
    merge_adapter(b)
    with pytest.raises(ValueError, match="unmerge"):
        load_gsoft_state_dict(b, sd)


def test_neumann_merge_unmerge_and_zero_scale():
    model = make_model(torch.float64)
    convert_to_gsoft(model, GSOFTConfig(block_size=4, target_modules=["q_proj"], map="neumann", double=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gsoft_" in name and "scale" not in name:
                p.copy_(0.1 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(11)))
    w = model[0].q_proj.base_layer.weight.detach().clone()
    merge_adapter(model)
    unmerge_adapter(model)  # Neumann Q is only nearly orthogonal: unmerge must invert, not transpose
    assert (model[0].q_proj.base_layer.weight - w).abs().max() < 1e-12
    with torch.no_grad():
        model[0].q_proj.gsoft_scale[0] = 0.0
    with pytest.raises(ValueError, match="scale"):
        merge_adapter(model)


def test_training_keeps_the_rotations_orthogonal():
    model = make_model(torch.float64)
    convert_to_gsoft(model, GSOFTConfig(block_size=4, target_modules="all-linear", double=True))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(32, 16, dtype=torch.float64, generator=g), torch.randn(32, 4, dtype=torch.float64, generator=g)
    first = None
    for _ in range(100):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < first
    for m in model.modules():
        if isinstance(m, GSOFTLinear):
            for Q in (m.gsoft_in, m.gsoft_out):
                M = Q.matrix()
                assert (M.T @ M - torch.eye(M.shape[0], dtype=torch.float64)).abs().max() < 1e-12


def test_bad_configs():
    with pytest.raises(ValueError, match="exactly one"):
        GSOFTConfig(target_modules=["q_proj"])
    with pytest.raises(ValueError, match="bias"):
        GSOFTConfig(block_size=4, target_modules=["q_proj"], bias="some")
    with pytest.raises(ValueError, match="target_modules"):
        GSOFTConfig(block_size=4)
    model = make_model()
    with pytest.raises(ValueError, match="no module"):
        convert_to_gsoft(model, GSOFTConfig(block_size=4, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="divisible"):
        convert_to_gsoft(model, GSOFTConfig(block_size=5, target_modules=["q_proj"]))
    assert not any(isinstance(m, GSOFTLinear) for m in model.modules())  # unchanged after the failure
    convert_to_gsoft(model, GSOFTConfig(block_size=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already"):
        convert_to_gsoft(model, GSOFTConfig(block_size=4, target_modules=["v_proj"]))


class Conv1D(torch.nn.Module):
    """GPT-2's layout: ``y = x W + b`` with ``W: (in, out)``."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bias = torch.nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


def test_fan_in_fan_out_is_ignored_for_nn_linear():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    x = torch.randn(2, 8)
    ref = model(x)
    convert_to_gsoft(model, GSOFTConfig(block_size=4, target_modules=["0"], fan_in_fan_out=True))
    assert torch.equal(model(x), ref) and not model[0].fan_in_fan_out


def test_fan_in_fan_out_layers():
    torch.manual_seed(9)
    model = torch.nn.Sequential(Conv1D(16, 24), torch.nn.ReLU(), Conv1D(24, 8))
    x = torch.randn(5, 16)
    ref = model(x)
    convert_to_gsoft(model, GSOFTConfig(block_size=8, target_modules=["0", "2"], fan_in_fan_out=True, double=True))
    assert torch.allclose(model(x), ref, atol=1e-6)  # Q = I
    randomize_adapters(model, torch.Generator().manual_seed(10))
    adapted = model(x)
    w0 = model[0].base_layer.weight.detach().clone()
    merge_adapter(model)
    assert torch.allclose(model(x), adapted, atol=1e-5)
    unmerge_adapter(model)
    assert (model[0].base_layer.weight - w0).abs().max() < 1e-6


# --- issue 18: merge state, exact unmerge, all-or-nothing, modules torch reads directly, dtypes, save/load ---


def injected(double=False, dtype=torch.float64, seed=2):
    """make_model with GSOFT on every linear layer and random (non-identity) adapters."""
    model = make_model(dtype)
    convert_to_gsoft(model, GSOFTConfig(block_size=4, target_modules="all-linear", double=double))
    randomize_adapters(model, torch.Generator().manual_seed(seed))
    return model


def base_weights(model):
    return {n: m.base_layer.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, GSOFTLinear)}


def layers(model):
    return [m for m in model.modules() if isinstance(m, GSOFTLinear)]


def dense_adapted_weight(layer):
    """The adapted layer's linear map, read off its (unmerged) forward: columns are layer(e_j) − b."""
    eye = torch.eye(layer.base_layer.in_features, dtype=layer.base_layer.weight.dtype)
    with torch.no_grad():
        out = layer(eye)
    bias = layer.base_layer.bias
    return (out if bias is None else out - bias).T


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("double", [False, True])
def test_merged_state_dict_loads_as_merged_and_unmerges_to_the_base(double, tmp_path):
    x = torch.randn(6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    pristine = base_weights(injected(double))
    a = injected(double)
    adapted = a(x).detach()
    merge_adapter(a)
    sd = a.state_dict()
    assert sd["0.q_proj.merged_flag"].dtype == torch.bool and sd["0.q_proj.merged_flag"].dim() == 0
    torch.save(sd, tmp_path / "merged.pt")
    for target_merged in (False, True):  # into a fresh model and into a merged one
        b = injected(double, seed=99)  # other adapters: everything must come from the file
        if target_merged:
            merge_adapter(b)
        b.load_state_dict(torch.load(tmp_path / "merged.pt", weights_only=True))
        assert all(m.merged for m in layers(b))
        assert (b(x) - adapted).abs().max() < 1e-12  # the adapter applied once, not twice
        unmerge_adapter(b)
        for name, w in base_weights(b).items():
            assert rel(w, pristine[name]) < 1e-14
        assert (b(x) - adapted).abs().max() < 1e-12


@pytest.mark.parametrize("double", [False, True])
def test_unmerged_state_dict_loads_as_unmerged_into_a_merged_model(double, tmp_path):
    x = torch.randn(6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    pristine = base_weights(injected(double))
    a = injected(double)
    adapted = a(x).detach()
    torch.save(a.state_dict(), tmp_path / "unmerged.pt")
    b = injected(double, seed=99)
    merge_adapter(b)
    b.load_state_dict(torch.load(tmp_path / "unmerged.pt", weights_only=True))
    assert not any(m.merged for m in layers(b))
    assert torch.equal(b(x), adapted)  # the adapter is not ignored
    unmerge_adapter(b)  # a no-op: nothing is merged
    assert all(torch.equal(w, pristine[n]) for n, w in base_weights(b).items())
    merge_adapter(b)
    unmerge_adapter(b)
    assert all(rel(w, pristine[n]) < 1e-14 for n, w in base_weights(b).items())


def test_ambiguous_partial_state_dicts_are_refused():
    a = injected()
    merge_adapter(a)
    sd = a.state_dict()
    old_format = {k: v for k, v in sd.items() if not k.endswith("merged_flag")}  # saved before merge state existed
    b = injected(seed=99)
    with pytest.raises(ValueError, match="merged_flag"):
        b.load_state_dict(old_format, strict=False)
    adapter_only = {k: v for k, v in sd.items() if ".gsoft_" in k}
    with pytest.raises(ValueError, match="merged"):
        a.load_state_dict(adapter_only, strict=False)  # would not change the merged weight


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1.2e-7), (torch.float64, 1e-14)])
@pytest.mark.parametrize("double", [False, True])
def test_unmerge_after_a_step_while_merged_restores_the_base_weight(double, dtype, tol):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(8, 16, generator=g).to(dtype)
    pristine = base_weights(injected(double, dtype))
    model = injected(double, dtype)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x).square().sum().backward()
    merge_adapter(model)
    before = gsoft_state_dict(model)
    opt.step()  # changes the adapter while merged
    after = gsoft_state_dict(model)
    records = {k for k in before if k.endswith("._extra_state")}  # the permutations' records (issue 23)
    assert records and all(torch.equal(before[k], after[k]) for k in records)
    assert all(not torch.equal(before[k], after[k]) for k in set(before) - records)
    unmerge_adapter(model)
    for name, w in base_weights(model).items():
        assert rel(w, pristine[name]) < tol, name
    # the stepped adapter is the one in effect now, on the restored base weights
    reference = injected(double, dtype, seed=99)
    load_gsoft_state_dict(reference, after)
    assert rel(model(x), reference(x)) < 10 * tol  # weights equal to rounding, through 9 layers


def test_merge_adapter_is_all_or_nothing():
    x = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    model = injected()
    adapted = model(x).detach()
    weights = base_weights(model)
    scale = layers(model)[-1].gsoft_scale
    kept = scale[0].item()
    with torch.no_grad():
        scale[0] = 0.0  # only the last adapter cannot be merged
    with pytest.raises(ValueError, match="scale"):
        merge_adapter(model)
    assert not any(m.merged for m in layers(model))
    assert all(torch.equal(w, weights[n]) for n, w in base_weights(model).items())
    with pytest.raises(ValueError, match="scale"):
        merge_and_unload(model)
    assert len(layers(model)) == 9 and not any(m.merged for m in layers(model))
    with torch.no_grad():
        scale[0] = kept
    merge_adapter(model)
    merged = base_weights(model)
    with torch.no_grad():  # a corrupted checkpoint: the last layer's record of what was merged is NaN
        layers(model)[-1].merged_in_L.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        unmerge_adapter(model)
    assert all(m.merged for m in layers(model))
    assert all(torch.equal(w, merged[n]) for n, w in base_weights(model).items())
    assert (model(x) - adapted).abs().max() < 1e-12


def test_gsoft_state_dict_is_independent_of_the_merge_state():
    x = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    a = injected()
    adapted = a(x).detach()
    merge_adapter(a)
    sd = gsoft_state_dict(a)
    assert not any("merged" in k for k in sd)  # adapter parameters only
    b = injected(seed=99)
    load_gsoft_state_dict(b, sd)  # into an unmerged model: the adapter applies once
    assert (b(x) - adapted).abs().max() < 1e-12
    # a trainable (modules_to_save) base weight that holds a merged weight would apply the adapter twice
    c = make_model(torch.float64)
    convert_to_gsoft(c, GSOFTConfig(block_size=4, target_modules=["q_proj"], modules_to_save=["0"]))
    merge_adapter(c)
    with pytest.raises(ValueError, match="unmerge"):
        gsoft_state_dict(c)
    unmerge_adapter(c)
    assert "0.q_proj.base_layer.weight" in gsoft_state_dict(c)
    with pytest.raises(ValueError, match="shape"):
        load_gsoft_state_dict(b, {k: v[..., :1] for k, v in sd.items()})


def test_adapted_weight_is_the_layers_linear_map_and_differentiable():
    model = injected(double=True)
    for layer in layers(model):
        W = layer.weight
        assert W.requires_grad and torch.allclose(W, dense_adapted_weight(layer), rtol=0, atol=1e-13)
        assert layer.bias is layer.base_layer.bias
    layer = layers(model)[0]
    x = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    (g1,) = torch.autograd.grad(layer(x).square().sum(), layer.gsoft_in.L)
    through_weight = torch.nn.functional.linear(x, layer.weight, layer.bias)
    (g2,) = torch.autograd.grad(through_weight.square().sum(), layer.gsoft_in.L)
    assert torch.allclose(g1, g2, rtol=1e-12, atol=1e-12)
    with disable_adapters(model):
        assert torch.equal(layer.weight, layer.base_layer.weight)
    merge_adapter(model)
    assert torch.equal(layer.weight, layer.base_layer.weight)


def encoder_layer(batch_first, dtype=torch.float64):
    torch.manual_seed(16)
    return torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first, dtype=dtype)


@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_encoder_layer_trains_evaluates_and_merges(batch_first, double, monkeypatch):
    model = encoder_layer(batch_first)
    wrapped = convert_to_gsoft(model, GSOFTConfig(block_size=4, target_modules="all-linear", double=double))
    assert set(wrapped) == {"self_attn.out_proj", "linear1", "linear2"}  # out_proj is read directly by MHA
    g = torch.Generator().manual_seed(17)
    x = torch.randn(3, 5, 16, dtype=torch.float64, generator=g)
    target = torch.randn(3, 5, 16, dtype=torch.float64, generator=g)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (model(x) - target).square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in params.values())
        opt.step()
    assert all(not torch.equal(p, start[n]) for n, p in params.items())

    # reference: the stock layer with the adapted weights materialized from each adapter's forward
    reference = encoder_layer(batch_first)
    with torch.no_grad():
        for name in wrapped:
            reference.get_submodule(name).weight.copy_(dense_adapted_weight(model.get_submodule(name)))
    expected = reference(x).detach()  # training mode, dropout 0: the slow path
    model.eval()
    fast_calls = []
    fast = torch._transformer_encoder_layer_fwd

    def counting(*args, **kwargs):
        fast_calls.append(1)
        return fast(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting)
    assert (model(x) - expected).abs().max() < 1e-12  # slow path (grad enabled, adapters require grad)
    with torch.no_grad():
        assert (model(x) - expected).abs().max() < 1e-12  # torch's fast path when batch_first
    assert len(fast_calls) == (1 if batch_first else 0)
    base = base_weights(model)
    merge_adapter(model)
    with torch.no_grad():
        assert (model(x) - expected).abs().max() < 1e-12
    unmerge_adapter(model)
    assert all(rel(w, base[n]) < 1e-14 for n, w in base_weights(model).items())


@pytest.mark.parametrize("double", [False, True])
def test_empty_batches(double):
    model = injected(double, torch.float32)
    layer = layers(model)[0]
    for shape in [(0, 16), (2, 0, 16)]:
        y = layer(torch.randn(shape))
        assert y.shape == (*shape[:-1], 16)
    assert model(torch.randn(0, 16)).shape == (0, 4)


@pytest.mark.parametrize("double", [False, True])
def test_autocast_bfloat16_gives_the_dtype_of_nn_linear(double):
    model = injected(double, torch.float32)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(18))
    exact = model(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = torch.nn.Linear(16, 4)(x)
        y = model(x)
        layer = layers(model)[0]
        one = layer(x)
    assert y.dtype == plain.dtype == one.dtype == torch.bfloat16
    assert rel(y.float(), exact) < 5e-2
    y.float().square().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("double", [False, True])
def test_half_precision_models(dtype, double):
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(19))
    exact = injected(double, torch.float32)
    model = injected(double, torch.float32).to(dtype)
    eps = torch.finfo(dtype).eps
    y = model(x.to(dtype))
    assert y.dtype == dtype and rel(y.float(), exact(x).detach()) < 5 * eps
    y.float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    base = base_weights(model)
    merge_adapter(model)
    assert rel(model(x.to(dtype)).float(), exact(x).detach()) < 5 * eps
    unmerge_adapter(model)
    for name, w in base_weights(model).items():
        assert rel(w.float(), base[name].float()) < eps, name


@pytest.mark.parametrize("state", ["unmerged", "merged", "mid-training"])
def test_save_load_in_every_state_with_optimizer(state, tmp_path):
    g = torch.Generator().manual_seed(20)
    x = torch.randn(8, 16, dtype=torch.float64, generator=g)
    target = torch.randn(8, 4, dtype=torch.float64, generator=g)

    def make(seed):
        model = injected(double=True, seed=seed)
        return model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            (model(x) - target).square().mean().backward()
            opt.step()

    a, opt_a = make(2)
    if state != "unmerged":
        train(a, opt_a, 3)
    if state == "merged":
        merge_adapter(a)
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, tmp_path / "ckpt.pt")
    continued = []
    for into_merged in (False, True):
        b, opt_b = make(99)
        if into_merged:
            merge_adapter(b)
        ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        b.load_state_dict(ckpt["model"])
        opt_b.load_state_dict(ckpt["opt"])
        assert torch.equal(b(x), a(x))
        assert [m.merged for m in layers(b)] == [m.merged for m in layers(a)]
        if state == "merged":
            unmerge_adapter(b)
        train(b, opt_b, 3)
        continued.append(b.state_dict())
    if state == "merged":
        unmerge_adapter(a)
    train(a, opt_a, 3)  # the original, continued in memory: every copy continues with the same bits
    for sd in continued:
        assert sd.keys() == a.state_dict().keys()
        assert all(torch.equal(v, sd[k]) for k, v in a.state_dict().items())


def _counting(monkeypatch, name):
    """Count the calls of GSOFTLinear.<name> (the O(n_out n_in b) merge or unmerge of one weight)."""
    calls, original = [], getattr(GSOFTLinear, name)

    def counted(self, *args):
        calls.append(self)
        return original(self, *args)

    monkeypatch.setattr(GSOFTLinear, name, counted)
    return calls


@pytest.mark.parametrize("double", [False, True])
def test_merging_many_layers_computes_each_weight_once(double, monkeypatch):
    """Was: merge_adapter / unmerge_adapter computed every layer's result twice (once to check it, once to write it):
    two O(n_out n_in b) passes per layer. Now a cheap bound proves the results finite first and each is computed
    once; the merged weights are the adapted linear maps (read off the unmerged forward) and unmerging restores the
    base weights."""
    model = injected(double)
    expected = {id(m): dense_adapted_weight(m) for m in layers(model)}
    pristine = base_weights(model)
    merges, unmerges = _counting(monkeypatch, "_adapt"), _counting(monkeypatch, "_unadapt")
    merge_adapter(model)
    assert merges == layers(model)  # each layer once, in order
    assert all(rel(m.base_layer.weight, expected[id(m)]) < 1e-13 for m in layers(model))
    unmerge_adapter(model)
    assert unmerges == layers(model)
    assert all(rel(w, pristine[n]) < 1e-14 for n, w in base_weights(model).items())


@pytest.mark.parametrize("overflows", [False, True])
def test_merging_near_the_largest_float_is_exact_or_changes_nothing(overflows):
    """Where the bound cannot prove every result finite (a float32 base weight near the largest float32), every
    result is checked before any weight is written: a merge that fits is the adapted map, unmerged to rounding; one
    that overflows raises and leaves every layer as it was."""
    model = injected(dtype=torch.float32)
    last = layers(model)[-1]
    with torch.no_grad():
        last.base_layer.weight[0] = 0.0
        last.base_layer.weight[0, 0] = 1e38  # row norm 1e38: finite after any rotation, ×1e3 not
        last.gsoft_scale[0] = 1e3 if overflows else 1.0
    expected = {id(m): dense_adapted_weight(m) for m in layers(model)}
    pristine = base_weights(model)
    if overflows:
        with pytest.raises(ValueError, match="non-finite"):
            merge_adapter(model)
        assert not any(m.merged for m in layers(model))
        assert all(torch.equal(w, pristine[n]) for n, w in base_weights(model).items())
        return
    merge_adapter(model)
    assert all(rel(m.base_layer.weight.double(), expected[id(m)].double()) < 1e-6 for m in layers(model))
    unmerge_adapter(model)
    assert all(rel(w.double(), pristine[n].double()) < 1e-6 for n, w in base_weights(model).items())


def test_a_singular_record_of_what_was_merged_is_refused_by_name():
    """Was: torch.linalg.inv's 'singular' error from deep inside unmerge_adapter when a (corrupted) checkpoint's record
    of the merged blocks holds a singular block. Now a ValueError naming the layer and the buffer; nothing unmerged."""
    model = injected()
    merge_adapter(model)
    merged = base_weights(model)
    with torch.no_grad():
        layers(model)[-1].merged_in_R[1] = 0.0
    with pytest.raises(ValueError, match=r"^2: .*merged_in_R.*singular.*nothing was unmerged"):
        unmerge_adapter(model)
    assert all(m.merged for m in layers(model))
    assert all(torch.equal(w, merged[n]) for n, w in base_weights(model).items())
