"""The module surgery every converter of lowrankopt.nn shares (lowrankopt.nn.surgery): PEFT's target selection
(suffixes, regex, "all-linear", predicates, exclusions), all-or-nothing replacement, modules shared between places,
tied weights, restoring, counting parameters, and the deprecated names of the converters."""

import warnings

import pytest
import torch
from torch import nn

import lowrankopt.nn as lnn
from lowrankopt.nn import (
    GSOFTConfig,
    GSOFTLinear,
    STTPLinear,
    TBasis,
    TTConv2d,
    convert_to_dense,
    convert_to_gsoft,
    convert_to_sttp,
    convert_to_tbasis,
    convert_to_tt_conv,
    count_parameters,
    merge_adapter,
    merge_and_unload,
    replace_modules,
    restore_modules,
    select_modules,
    unload,
)
from lowrankopt.nn.surgery import tied_parameters

D = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.kq_proj = nn.Linear(8, 8)  # ends with "q_proj", but not as a whole component
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        return self.out(torch.tanh(self.q_proj(x)) + self.kq_proj(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Attention(), Attention()])
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.q_proj = nn.Linear(8, 8)  # a top-level one
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.head(self.norm(self.q_proj(self.mlp(x))))


LINEARS = [
    "layers.0.q_proj",
    "layers.0.kq_proj",
    "layers.0.out",
    "layers.1.q_proj",
    "layers.1.kq_proj",
    "layers.1.out",
    "mlp.0",
    "mlp.2",
    "q_proj",
    "head",
]


def _snapshot(model):
    """What must not change when a conversion fails: every module object at every place, and the parameters."""
    return (
        [(n, id(m)) for n, m in model.named_modules(remove_duplicate=False)],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
    )


def _assert_unchanged(model, snapshot):
    places, state = snapshot
    assert [(n, id(m)) for n, m in model.named_modules(remove_duplicate=False)] == places
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


# ------------------------------------------------------------------------------------------------------ selection
def test_suffixes_match_whole_dotted_components():
    model = Net()
    assert list(select_modules(model, ["q_proj"])) == ["layers.0.q_proj", "layers.1.q_proj", "q_proj"]
    assert list(select_modules(model, ("mlp.2", "1.out"))) == ["layers.1.out", "mlp.2"]  # several components
    assert list(select_modules(model, {"head"})) == ["head"]  # any iterable of names
    assert list(select_modules(model, ["proj"])) == []  # "q_proj" does not end with the component "proj"
    # None: every eligible module (the root never: it cannot be replaced in place)
    assert list(select_modules(model, eligible=nn.Linear)) == LINEARS
    assert select_modules(nn.Linear(3, 3)) == {}


def test_a_regex_string_is_matched_against_the_whole_name():
    model = Net()
    assert list(select_modules(model, r"layers\.\d+\.(q|kq)_proj")) == [n for n in LINEARS[:5] if "proj" in n]
    assert list(select_modules(model, "q_proj")) == ["q_proj"]  # fullmatch: not layers.0.q_proj
    assert list(select_modules(model, r".*\.out")) == ["layers.0.out", "layers.1.out"]
    with pytest.raises(ValueError, match="target_modules is not a valid regular expression"):
        select_modules(model, "layers.(")


def test_all_linear_is_every_linear_layer_but_the_output_layer_a_model_names():
    # a plain module names no output layer: every nn.Linear (PEFT's definition), not the LayerNorm or the GELU
    model = Net()
    assert list(select_modules(model, "all-linear")) == LINEARS
    assert list(select_modules(model, "ALL-LINEAR")) == LINEARS

    class LM(Net):  # Hugging Face's convention: the model names its output layer
        def get_output_embeddings(self):
            return self.head

    assert list(select_modules(LM(), "all-linear")) == LINEARS[:-1]

    class Conv1D(nn.Module):  # GPT-2's layer: weight stored (in, out)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 6))

    mixed = nn.Sequential(nn.Embedding(5, 4), Conv1D(), nn.Conv2d(1, 1, 1), nn.Linear(6, 2))
    assert list(select_modules(mixed, "all-linear")) == ["1", "3"]
    # the converter's eligibility still applies: STTP converts plain nn.Linear, so not the Conv1D
    converted = convert_to_sttp(mixed, 2, target_modules="all-linear")
    assert list(converted) == ["3"] and type(mixed[1]) is Conv1D


def test_the_selection_is_peft_s():
    """PEFT itself (when installed: the bench extra) as the reference: the same modules for suffixes, regexes,
    "all-linear" on a plain module, and exclusions."""
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import check_target_module_exists

    model = Net()
    for spec in (["q_proj"], ["mlp.2", "1.out"], r"layers\.\d+\.(q|kq)_proj", "q_proj", ["proj"]):
        config = peft.LoraConfig(target_modules=spec)
        expected = [n for n in LINEARS if check_target_module_exists(config, n)]
        assert list(select_modules(model, spec, eligible=nn.Linear)) == expected, spec
    for spec, exclude in (("all-linear", None), (["q_proj"], r"layers\.1\..*"), ("all-linear", ["out", "head"])):
        adapted = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=spec, exclude_modules=exclude), Net())
        expected = [n for n, m in adapted.named_modules() if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)]
        assert list(select_modules(model, spec, exclude)) == expected, (spec, exclude)


def test_predicates_exclusions_and_the_outermost_selection():
    model = Net()
    seen = []

    def wide(name, module):
        seen.append((name, type(module)))
        return module.out_features == 16

    assert list(select_modules(model, wide, eligible=nn.Linear)) == ["mlp.0"]
    assert ("mlp.0", nn.Linear) in seen and all(t is nn.Linear for _, t in seen)
    # exclude_modules wins, in every form
    assert list(select_modules(model, ["q_proj"], ["q_proj"])) == []
    assert list(select_modules(model, ["q_proj"], r"layers\.1\..*")) == ["layers.0.q_proj", "q_proj"]
    assert list(select_modules(model, "all-linear", lambda n, m: n.startswith("layers"))) == LINEARS[6:]
    # a selected module inside a selected one is left to the outer one
    assert list(select_modules(model, ["mlp", "mlp.0"])) == ["mlp"]


def test_bad_selections_name_the_argument():
    model = Net()
    with pytest.raises(TypeError, match="target_modules"):
        select_modules(model, 3)
    with pytest.raises(TypeError, match="exclude_modules"):
        select_modules(model, ["q_proj"], [1])
    with pytest.raises(TypeError, match="target_modules"):
        select_modules(model, b"q_proj")
    with pytest.raises(TypeError, match="eligible"):
        select_modules(model, eligible="Linear")
    with pytest.raises(TypeError, match="model"):
        select_modules("model")
    with pytest.raises(ValueError, match="root"):
        replace_modules(model, [""], lambda n, m: m)
    with pytest.raises(TypeError, match="target_modules"):
        convert_to_sttp(model, 2, target_modules=3)


# ------------------------------------------------------------------------------------------------------ replacing
def test_a_module_used_at_two_places_is_replaced_once_by_one_module():
    lin = nn.Linear(6, 6).double()
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Linear(6, 2).double())
    assert list(select_modules(model, ["0"])) == ["0", "2"]  # one module: both of its places
    assert list(select_modules(model, ["0"], ["2"])) == []  # excluded at one of its places: excluded
    calls = []
    new = replace_modules(model, ["2"], lambda name, m: calls.append(name) or nn.Linear(6, 6).double())
    assert calls == ["0"] and list(new) == ["0", "2"] and model[0] is model[2] is new["0"]
    # GSOFT: one adapter, used at both places; restoring puts the base layer back at both
    lin = nn.Linear(8, 8).double()
    model = nn.Sequential(lin, nn.Tanh(), lin)
    x = torch.randn(3, 8, dtype=D, generator=_gen(1))
    ref = model(x)
    wrapped = convert_to_gsoft(model, GSOFTConfig(block_size=4, target_modules=["0"]))
    assert set(wrapped) == {"0", "2"} and model[0] is model[2] and isinstance(model[0], GSOFTLinear)
    assert torch.equal(model(x), ref)
    merge_and_unload(model)
    assert model[0] is model[2] is lin


def test_replacing_is_all_or_nothing():
    model = Net().double()
    before = _snapshot(model)

    def build(name, m):
        if name == "mlp.2":
            raise ValueError("no")
        return nn.Linear(m.in_features, m.out_features).double()

    with pytest.raises(ValueError, match="no"):
        replace_modules(model, select_modules(model, eligible=nn.Linear), build)
    _assert_unchanged(model, before)
    with pytest.raises(TypeError, match="must return a torch.nn.Module"):
        replace_modules(model, ["head"], lambda n, m: torch.zeros(3))
    _assert_unchanged(model, before)
    # every converter: a bad rank (or block size) for the last layer leaves the model untouched
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 4)).double()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="rank"):
        convert_to_sttp(model, lambda name, m: 0 if name == "3" else 2)
    with pytest.raises(ValueError, match="rank"):
        convert_to_tt_conv(model, lambda name, m: 0 if name == "1" else 2)
    with pytest.raises(ValueError, match="divisible"):
        convert_to_gsoft(model, GSOFTConfig(block_size=3, target_modules="all-linear"))
    _assert_unchanged(model, before)

    # a failure while installing (here: a parent that refuses a child) puts back what was already installed
    class Locked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def __setattr__(self, name, value):
            if name == "b" and "b" in self._modules:
                raise RuntimeError("locked")
            super().__setattr__(name, value)

    locked = Locked()
    before = _snapshot(locked)
    with pytest.raises(RuntimeError, match="locked"):
        replace_modules(locked, ["a", "b"], lambda n, m: nn.Identity())
    _assert_unchanged(locked, before)


def _tied_lm():
    torch.manual_seed(3)
    model = nn.Module()
    model.emb = nn.Embedding(10, 8)
    model.body = nn.Linear(8, 8)
    model.head = nn.Linear(8, 10, bias=False)
    model.head.weight = model.emb.weight  # the output layer tied to the input embedding
    return model.double()


def test_tied_weights_stay_tied():
    model = _tied_lm()
    assert tied_parameters(model, model.head) == {"weight": ["emb.weight"]}
    assert tied_parameters(model, model.body) == {}
    before = _snapshot(model)
    # a replacement that would drop the tied weight is refused, before anything is installed
    for convert in (
        lambda: convert_to_sttp(model, 4),
        lambda: convert_to_tbasis(model, 2, 2, generator=_gen(4)),
        lambda: replace_modules(model, ["head", "body"], lambda n, m: nn.Linear(8, m.out_features).double()),
    ):
        with pytest.raises(ValueError, match=r"head\.weight is tied to emb\.weight"):
            convert()
        _assert_unchanged(model, before)
    converted = convert_to_sttp(model, 4, exclude_modules=["head"])
    assert list(converted) == ["body"] and model.head.weight is model.emb.weight
    # an adapter keeps the base layer, and so the tie; merging into the tied weight is refused, unloading keeps it
    model = _tied_lm()
    head = model.head
    convert_to_gsoft(model, GSOFTConfig(block_size=4, target_modules=["head"]))
    assert model.head.base_layer.weight is model.emb.weight
    with torch.no_grad():
        model.head.gsoft_in.L.normal_(generator=_gen(5))
    weight = model.emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"head\.base_layer\.weight is tied to emb\.weight"):
        merge_adapter(model)
    assert torch.equal(model.emb.weight, weight) and not model.head.merged
    unload(model)
    assert model.head is head and model.head.weight is model.emb.weight and torch.equal(model.emb.weight, weight)
    # two layers sharing one weight: converting either would untie them
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    pair = nn.Sequential(a, b).double()
    with pytest.raises(ValueError, match=r"0\.weight is tied to 1\.weight"):
        convert_to_tbasis(pair, 2, 2)
    assert pair[0] is a and pair[1] is b


def test_restore_modules_and_convert_to_dense():
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 3)
    ).double()
    x = torch.randn(2, 2, 4, 4, dtype=D, generator=_gen(7))
    ref = model(x)
    convert_to_tt_conv(model, 8, target_modules=["2"])
    convert_to_sttp(model, 1000, target_modules=["4"])
    low_rank = lnn.LowRankLinear(3, 3, 2, dtype=D, generator=_gen(8))
    model.append(low_rank)
    ref = low_rank.to_dense()(ref)
    assert isinstance(model[2], TTConv2d) and isinstance(model[4], STTPLinear)
    assert torch.allclose(model(x), ref, rtol=0, atol=1e-12)
    dense = convert_to_dense(model, types=STTPLinear)  # only these
    assert list(dense) == ["4"] and type(model[4]) is nn.Linear and isinstance(model[2], TTConv2d)
    dense = convert_to_dense(model)  # every layer with a dense equivalent
    assert list(dense) == ["2", "5"] and type(model[2]) is nn.Conv2d and type(model[5]) is nn.Linear
    assert torch.allclose(model(x), ref, rtol=0, atol=1e-12)
    # restore_modules takes a type or a predicate
    restored = restore_modules(model, lambda m: isinstance(m, nn.Tanh), lambda n, m: nn.ReLU())
    assert list(restored) == ["1"] and isinstance(model[1], nn.ReLU)


def test_unload_removes_the_adapters_and_restores_the_base_weights():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    layers = list(model)
    x = torch.randn(3, 8, dtype=D, generator=_gen(10))
    ref = model(x)
    weights = [m.weight.detach().clone() for m in (layers[0], layers[2])]
    convert_to_gsoft(model, GSOFTConfig(block_size=4, target_modules="all-linear", double=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gsoft_" in name:
                p.add_(0.1 * torch.randn(p.shape, dtype=D, generator=_gen(11)))
    merge_adapter(model)
    assert unload(model) is model and list(model) == layers  # the base layers at their places again
    for m, w in zip((layers[0], layers[2]), weights):
        assert torch.allclose(m.weight, w, rtol=0, atol=1e-13)
    assert torch.allclose(model(x), ref, rtol=0, atol=1e-13)


# ------------------------------------------------------------------------------------------------- counting
def test_count_parameters_counts_each_tensor_once():
    lin = nn.Linear(4, 3)  # 15 entries
    other = nn.Linear(3, 2)  # 8 entries
    model = nn.Sequential(lin, nn.Tanh(), lin, other, nn.Linear(3, 2))  # + 8 entries
    model[4].weight = other.weight  # tied: 2 more bias entries only
    assert count_parameters(model) == 15 + 8 + 2
    other.bias.requires_grad_(False)
    assert count_parameters(model) == 15 + 8 + 2 - 2
    assert count_parameters(model, trainable_only=False) == 15 + 8 + 2
    assert count_parameters(model, False, exclude_modules=["0"]) == 8 + 2  # the shared module, at both places
    assert count_parameters(model, False, exclude_modules=lambda n, m: n == "4") == 15 + 2  # a tied weight too
    with pytest.raises(TypeError, match="trainable_only"):
        count_parameters(model, "yes")
    # T-Basis: the shared basis (shipped once with the code) left out by type
    torch.manual_seed(12)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    factory = convert_to_tbasis(net, 4, 2, generator=_gen(13))
    basis = factory.tbasis.basis.numel()
    assert basis == 4 * 2 * 4 * 2
    total = count_parameters(net, False)
    assert total - count_parameters(net, False, exclude_modules=lambda n, m: isinstance(m, TBasis)) == basis


# ------------------------------------------------------------------------------------------- deprecated names
def _cnn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 3)
    ).double()


OLD_AND_NEW = {
    "sttp_convert": (lambda f, m: f(m, 3), convert_to_sttp),
    "tt_conv_convert": (lambda f, m: f(m, 2), convert_to_tt_conv),
    "tbasis_convert": (lambda f, m: f(m, 3, 2, generator=_gen(14)), convert_to_tbasis),
    "inject_gsoft": (lambda f, m: f(m, GSOFTConfig(block_size=2, target_modules="all-linear")), convert_to_gsoft),
}


@pytest.mark.parametrize("old", list(OLD_AND_NEW))
def test_the_old_converter_names_warn_and_convert_alike(old):
    call, new = OLD_AND_NEW[old]
    x = torch.randn(2, 2, 4, 4, dtype=D, generator=_gen(15))
    a, b = _cnn(16), _cnn(16)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated.*use {new.__name__}"):
        out_old = call(getattr(lnn, old), a)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        out_new = call(new, b)
    if isinstance(out_old, dict):
        assert list(out_old) == list(out_new) and all(type(out_old[k]) is type(out_new[k]) for k in out_old)
    assert [type(m) for m in a] == [type(m) for m in b]
    assert torch.equal(a(x), b(x))


def test_the_old_helper_names_warn_and_give_the_old_results():
    model = _cnn(17)
    x = torch.randn(2, 2, 4, 4, dtype=D, generator=_gen(18))
    ref = model(x)
    convert_to_sttp(model, 1000)
    with pytest.warns(DeprecationWarning, match="sttp_to_dense is deprecated.*use convert_to_dense"):
        dense = lnn.sttp_to_dense(model)
    assert list(dense) == ["0", "2", "4"] and type(model[4]) is nn.Linear
    assert torch.allclose(model(x), ref, rtol=0, atol=1e-12)
    factory = convert_to_tbasis(model, 3, 2, generator=_gen(19))
    with pytest.warns(DeprecationWarning, match="tbasis_parameter_count is deprecated.*use count_parameters"):
        counts = lnn.tbasis_parameter_count(model)
    B, R, N = 3, 2, 9
    modes = sum(p.modes for p in factory.plans.values())
    biases = 4 + 4 + 3
    assert counts == {
        "total": B * N * R * R + modes * (B + R) + biases,
        "basis": B * N * R * R,
        "layers": modes * (B + R),
        "other": biases,
        "without_basis": modes * (B + R) + biases,
    }
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_the_old_include_exclude_arguments_still_select_by_fnmatch():
    model = _cnn(20)
    with pytest.warns(DeprecationWarning, match="include=/exclude="):
        converted = convert_to_sttp(model, 2, include=["[02]", "4"], exclude="4")  # fnmatch patterns
    assert list(converted) == ["0", "2"] and type(model[4]) is nn.Linear
    model = _cnn(20)
    with pytest.warns(DeprecationWarning):
        converted = lnn.tt_conv_convert(model, 2, include=lambda name: name == "2")  # a predicate of the name
    assert list(converted) == ["2"]
    nested = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), nn.Linear(4, 2))
    with pytest.warns(DeprecationWarning):
        convert_to_tbasis(nested, 2, 2, exclude="0.*")
    assert [type(m) for m in nested[0]] == [nn.Linear, nn.Linear] and type(nested[1]) is lnn.TBasisLinear
    with pytest.raises(TypeError, match="target_modules or the deprecated include"), pytest.warns(DeprecationWarning):
        convert_to_sttp(_cnn(20), 2, target_modules=["0"], include=["0"])
