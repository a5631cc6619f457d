"""GSOFT adapters: identity at injection, targeting, merge/unmerge, state dicts, training."""

import pytest
import torch

from lowrankopt.nn import (
    GSOFTConfig,
    GSOFTLinear,
    disable_adapters,
    gsoft_state_dict,
    inject_gsoft,
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
    wrapped = inject_gsoft(model, cfg)
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
    inject_gsoft(model, GSOFTConfig(r=4, target_modules="all-linear", bias="gsoft_only", modules_to_save=["2"]))
    assert sum(isinstance(m, GSOFTLinear) for m in model.modules()) == 9
    assert model[2].base_layer.weight.requires_grad and model[0].q_proj.base_layer.bias.requires_grad
    assert not model[0].q_proj.base_layer.weight.requires_grad


@pytest.mark.parametrize("double", [False, True])
def test_merge_unmerge_round_trip_and_merge_and_unload(double):
    model = make_model()
    inject_gsoft(model, GSOFTConfig(block_size=4, target_modules="all-linear", double=double))
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
    inject_gsoft(model, GSOFTConfig(block_size=8, target_modules="all-linear", exclude_modules=["2"], double=True))
    randomize_adapters(model, torch.Generator().manual_seed(5))
    with disable_adapters(model):
        assert torch.equal(model(x), ref)
    assert not torch.allclose(model(x), ref)


def test_state_dict_round_trip():
    a, b = make_model(), make_model()
    cfg = GSOFTConfig(
        block_size=4, target_modules=["v_proj"], double=True, modules_to_save="2"
    )  # regex: top-level only
    inject_gsoft(a, cfg)
    inject_gsoft(b, cfg)
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
    inject_gsoft(model, GSOFTConfig(block_size=4, target_modules=["q_proj"], map="neumann", double=True))
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
    inject_gsoft(model, GSOFTConfig(block_size=4, target_modules="all-linear", double=True))
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
        inject_gsoft(model, GSOFTConfig(block_size=4, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="divisible"):
        inject_gsoft(model, GSOFTConfig(block_size=5, target_modules=["q_proj"]))
    assert not any(isinstance(m, GSOFTLinear) for m in model.modules())  # unchanged after the failure
    inject_gsoft(model, GSOFTConfig(block_size=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already"):
        inject_gsoft(model, GSOFTConfig(block_size=4, target_modules=["v_proj"]))


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
    inject_gsoft(model, GSOFTConfig(block_size=4, target_modules=["0"], fan_in_fan_out=True))
    assert torch.equal(model(x), ref) and not model[0].fan_in_fan_out


def test_fan_in_fan_out_layers():
    torch.manual_seed(9)
    model = torch.nn.Sequential(Conv1D(16, 24), torch.nn.ReLU(), Conv1D(24, 8))
    x = torch.randn(5, 16)
    ref = model(x)
    inject_gsoft(model, GSOFTConfig(block_size=8, target_modules=["0", "2"], fan_in_fan_out=True, double=True))
    assert torch.allclose(model(x), ref, atol=1e-6)  # Q = I
    randomize_adapters(model, torch.Generator().manual_seed(10))
    adapted = model(x)
    w0 = model[0].base_layer.weight.detach().clone()
    merge_adapter(model)
    assert torch.allclose(model(x), adapted, atol=1e-5)
    unmerge_adapter(model)
    assert (model[0].base_layer.weight - w0).abs().max() < 1e-6
