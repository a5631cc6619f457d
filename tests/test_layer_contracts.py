"""What every layer of ``lowrankopt.nn`` promises, as ``nn.Linear`` / ``nn.Conv2d`` do: an empty batch, torch
reading ``.weight`` directly, autocast, half precision (supported or refused up front), and a checkpoint round trip
(``torch.load(..., weights_only=True)``, optimizer state included) that continues training bit-identically."""

import geoopt
import pytest
import torch
from torch import nn

from lowrankopt.nn import (
    GSMatrix,
    GSOrthogonal,
    GSOrthogonalConv2d,
    LowRankLinear,
    SkewOrthogonalConv2d,
    SOTTConv2d,
    STTPConv2d,
    STTPLinear,
    SVDPConv2d,
    SVDPLinear,
    TBasis,
    TBasisConv2d,
    TBasisFactory,
    TBasisLinear,
    TTConv2d,
    TTLinear,
    convert_to_sttp,
    convert_to_tbasis,
    convert_to_tt_conv,
    tt_conv_orthogonalize_,
)

D = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _tbasis_linear(dtype, seed):
    factory = TBasisFactory(TBasis(3, 2, 4, dtype=dtype, generator=_gen(seed)))
    factory.add("fc", (6, 8), 0.3, generator=_gen(seed + 1))
    return TBasisLinear(factory, "fc", torch.randn(6, dtype=dtype, generator=_gen(seed + 2)))


def _tbasis_conv(dtype, seed):
    factory = TBasisFactory(TBasis(3, 2, 9, dtype=dtype, generator=_gen(seed)))
    factory.add("conv", (6, 4, 3, 3), 0.2, generator=_gen(seed + 1))
    conv = nn.Conv2d(4, 6, 3, padding=1, dtype=dtype)
    with torch.no_grad():
        conv.bias.copy_(torch.randn(6, dtype=dtype, generator=_gen(seed + 2)))
    return TBasisConv2d(factory, "conv", conv)


class _GSMatrixModule(nn.Module):
    """A GSMatrix with learnable blocks, applied by ``gs_matmul`` (GSMatrix itself is not a module)."""

    def __init__(self, dtype, seed):
        super().__init__()
        g = _gen(seed)
        self.R = nn.Parameter(torch.randn(4, 2, 2, dtype=dtype, generator=g))
        self.L = nn.Parameter(torch.randn(2, 3, 4, dtype=dtype, generator=g))

    def forward(self, x):
        return GSMatrix([self.R, self.L]).matmul(x)


def _perturbed(layer, seed):
    """The layer with its plain parameters moved off their (often special, e.g. identity) initial values."""
    g = _gen(seed)
    with torch.no_grad():
        for p in layer.parameters():
            if not isinstance(p, geoopt.ManifoldParameter):
                p.add_(0.1 * torch.randn(p.shape, dtype=p.dtype, generator=g))
    return layer


# name -> (make(dtype, seed), input shape without the batch dimension)
LAYERS = {
    "LowRankLinear": (lambda dt, s: LowRankLinear(8, 6, 2, dtype=dt, generator=_gen(s)), (8,)),
    "TTLinear": (lambda dt, s: TTLinear(8, 6, 2, dtype=dt, generator=_gen(s)), (8,)),
    "STTPLinear": (lambda dt, s: _perturbed(STTPLinear(8, 6, 3, dtype=dt, generator=_gen(s)), s), (8,)),
    "STTPLinear-stiefel": (
        lambda dt, s: _perturbed(STTPLinear(8, 6, 3, parametrization="stiefel", dtype=dt, generator=_gen(s)), s),
        (8,),
    ),
    "SVDPLinear": (lambda dt, s: _perturbed(SVDPLinear(8, 6, dtype=dt, generator=_gen(s)), s), (8,)),
    "STTPConv2d": (
        lambda dt, s: _perturbed(STTPConv2d(4, 6, 3, padding=1, rank=3, dtype=dt, generator=_gen(s)), s),
        (4, 5, 5),
    ),
    "SVDPConv2d": (
        lambda dt, s: _perturbed(SVDPConv2d(2, 4, 3, 1, 1, padding_mode="circular", dtype=dt, generator=_gen(s)), s),
        (2, 5, 5),
    ),
    "SkewOrthogonalConv2d": (
        lambda dt, s: SkewOrthogonalConv2d(4, 3, 2, init_scale=0.5, dtype=dt, generator=_gen(s)),
        (4, 5, 5),
    ),
    "GSOrthogonalConv2d": (
        lambda dt, s: GSOrthogonalConv2d(8, 3, (2, 2), init_scale=0.5, dtype=dt, generator=_gen(s)),
        (8, 5, 5),
    ),
    "TTConv2d": (lambda dt, s: TTConv2d(4, 6, 3, 2, padding=1, dtype=dt, generator=_gen(s)), (4, 5, 5)),
    "SOTTConv2d": (lambda dt, s: SOTTConv2d(4, 6, 3, 2, 2, dtype=dt, generator=_gen(s)), (4, 6, 6)),
    "TTConv2d-stiefel": (
        lambda dt, s: TTConv2d(4, 6, 3, 2, stride=2, orthogonality="stiefel", dtype=dt, generator=_gen(s)),
        (4, 5, 5),
    ),
    "TBasisLinear": (_tbasis_linear, (8,)),
    "TBasisConv2d": (_tbasis_conv, (4, 5, 5)),
    "GSOrthogonal": (lambda dt, s: _perturbed(GSOrthogonal(8, 2, dtype=dt), s), (8,)),
    "GSOrthogonal-orthogonal": (
        lambda dt, s: GSOrthogonal(8, 2, parametrization="orthogonal", dtype=dt),
        (8,),
    ),
    "GSMatrix": (_GSMatrixModule, (8,)),
}


def _x(shape, batch, dtype=D, seed=0):
    return torch.randn(batch, *shape, dtype=dtype, generator=_gen(seed))


def _reference(shape):
    """The torch layer of the same kind (what autocast does to it is the contract)."""
    return nn.Linear(shape[0], 3) if len(shape) == 1 else nn.Conv2d(shape[0], 3, 3)


# ---------------------------------------------------------------------------------------------- empty batches
@pytest.mark.parametrize("name", list(LAYERS))
def test_an_empty_batch_gives_an_empty_output_and_zero_gradients(name):
    make, shape = LAYERS[name]
    layer = make(D, 1)
    out_shape = layer(_x(shape, 2)).shape[1:]
    x = _x(shape, 0).requires_grad_(True)
    y = layer(x)
    assert y.shape == (0, *out_shape) and y.dtype == D
    (y.sum() + 0.0).backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for p in layer.parameters():
        assert p.grad is None or not p.grad.any()


# -------------------------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("name", list(LAYERS))
def test_autocast_runs_like_torch_layers(name):
    """Under bfloat16 autocast a float32 layer gives what nn.Linear / nn.Conv2d give: the autocast dtype, for a
    float32 input and for the autocast-dtype input a previous layer hands on; close to the float32 output; and
    backward reaches the float32 parameters."""
    make, shape = LAYERS[name]
    layer = make(torch.float32, 1)
    x = _x(shape, 3, torch.float32)
    exact = make(torch.float32, 1)(x).detach()  # a twin outside autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_dtype = _reference(shape)(x).dtype
        y = layer(x)
        y_low = layer(x.to(torch.bfloat16))
    assert expected_dtype == torch.bfloat16
    assert torch.equal(layer(x), exact)  # nothing computed under autocast sticks (a cache, a frame)
    assert y.dtype == expected_dtype and y_low.dtype == expected_dtype
    for out in (y, y_low):
        assert (out.float() - exact).norm() <= 0.05 * exact.norm()
    y.float().square().sum().backward()
    grads = [p.grad for p in layer.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# -------------------------------------------------------------------------------------------- half precision
HALF_SUPPORTED = {"TBasisLinear", "TBasisConv2d", "GSOrthogonal", "GSMatrix"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(LAYERS))
def test_half_precision_is_supported_or_refused_up_front(name, dtype):
    make, shape = LAYERS[name]
    layer = make(torch.float32, 1)
    x = _x(shape, 3, torch.float32)
    exact = layer(x).detach()
    layer = layer.to(dtype)
    if name not in HALF_SUPPORTED:
        base = name.split("-")[0]
        with pytest.raises(TypeError, match=rf"{base} does not support {dtype}.*float32.*autocast"):
            layer(x.to(dtype))
        return
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    assert (y.float() - exact).norm() <= 0.05 * exact.norm()
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in layer.parameters())


# ------------------------------------------------------------------------------------ torch reading .weight
def _riemannian_or_adam(params, lr=1e-2):
    """RiemannianAdam when there are manifold parameters (it steps plain ones as Adam), else torch's Adam."""
    params = list(params)
    if any(isinstance(p, geoopt.ManifoldParameter) for p in params):
        return geoopt.optim.RiemannianAdam(params, lr=lr)
    return torch.optim.Adam(params, lr=lr)


CONVERTERS = {
    "sttp": lambda m: convert_to_sttp(m, 3),
    "svdp-stiefel": lambda m: convert_to_sttp(m, 100, svdp=True, parametrization="stiefel"),
    "tbasis": lambda m: convert_to_tbasis(m, 4, 2, generator=_gen(3)),
}


@pytest.mark.parametrize("convert", list(CONVERTERS))
def test_a_converted_transformer_layer_evaluates_like_it_trains(convert, monkeypatch):
    """torch's TransformerEncoderLayer reads ``linear1.weight`` (its eval fast path) and MultiheadAttention reads
    ``out_proj.weight``: converted layers serve those reads, and eval equals train mode (no dropout)."""
    fast_path = []
    fused = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a: fast_path.append(1) or fused(*a))
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, dtype=D)
    CONVERTERS[convert](model)
    assert not isinstance(model.linear1, nn.Linear)
    opt = _riemannian_or_adam(model.parameters())
    x = _x((5, 8), 3)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    trained = model(x).detach()
    model.eval()
    assert torch.allclose(model(x), trained, rtol=0, atol=1e-12)  # grad enabled: the layers' own forward
    with torch.no_grad():
        assert torch.allclose(model(x), trained, rtol=0, atol=1e-12)  # the fast path, from .weight
    # convert_to_tbasis's forward pre-hook (the refresh) turns the fast path off; MHA still reads out_proj.weight
    assert fast_path or convert == "tbasis"


@pytest.mark.parametrize(
    "make", [lambda: STTPLinear(8, 6, 3, dtype=D), lambda: SVDPConv2d(2, 4, 3, padding=1, dtype=D)]
)
def test_sttp_weight_reads_as_the_dense_weight_and_is_differentiable(make):
    layer = _perturbed(make(), 4)
    dense = layer.to_dense()
    assert torch.equal(layer.weight, dense.weight.detach())
    x = _x((8,) if isinstance(layer, STTPLinear) else (2, 5, 5), 2)
    assert torch.allclose(dense(x), layer(x), rtol=0, atol=1e-13)
    # d<R, weight>/dθ against central differences along a random direction of the Householder parameters
    R = torch.randn(layer.weight.shape, dtype=D, generator=_gen(5))
    (layer.weight * R).sum().backward()
    params = [p for p in layer.parameters() if p.grad is not None]
    dirs = [torch.randn(p.shape, dtype=D, generator=_gen(6 + k)) for k, p in enumerate(params)]
    h = 1e-6
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            for p, d in zip(params, dirs):
                p.add_(sign * h * d)
            values.append(float((layer.weight * R).sum()))
            for p, d in zip(params, dirs):
                p.sub_(sign * h * d)
    fd = (values[0] - values[1]) / (2 * h)
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, dirs))
    assert abs(fd - analytic) <= 1e-7 * max(1.0, abs(analytic))
    with pytest.raises(AttributeError):
        layer.weight = dense.weight.detach()  # read-only


# --------------------------------------------------------------------------------- checkpoints (weights_only)
def _optimizers(model, kind):
    """``"riemannian"``: one RiemannianAdam for everything (it steps plain parameters as Adam); ``"mixed"``: the
    documented split, RiemannianSGD with momentum for the manifold parameters and torch's Adam for the rest."""
    params = list(model.parameters())
    if kind == "riemannian":
        return [geoopt.optim.RiemannianAdam(params, lr=1e-2)]
    manifold = [p for p in params if isinstance(p, geoopt.ManifoldParameter)]
    plain = [p for p in params if not isinstance(p, geoopt.ManifoldParameter)]
    opts = [geoopt.optim.RiemannianSGD(manifold, lr=1e-2, momentum=0.9)] if manifold else []
    return opts + ([torch.optim.Adam(plain, lr=1e-2)] if plain else [])


def _train(model, opts, x, steps, after_step=None):
    for _ in range(steps):
        for o in opts:
            o.zero_grad()
        y = model(x)
        (y.square().mean() + y.mean()).backward()
        for o in opts:
            o.step()
        if after_step is not None:
            after_step(model)


def _assert_round_trip_continues_identically(make, x, kind, path, after_step=None):
    """Train, save model and optimizer state mid-training, load both (weights_only) into a fresh, differently
    initialized instance: identical outputs now and after more training, identical parameters."""
    a = make(1)
    opts_a = _optimizers(a, kind)
    _train(a, opts_a, x, 3, after_step)
    torch.save({"model": a.state_dict(), "opts": [o.state_dict() for o in opts_a]}, path)
    b = make(2)
    opts_b = _optimizers(b, kind)
    saved = torch.load(path, weights_only=True)
    b.load_state_dict(saved["model"])
    for o, state in zip(opts_b, saved["opts"], strict=True):
        o.load_state_dict(state)
    assert torch.equal(b(x), a(x))
    _train(a, opts_a, x, 3, after_step)
    _train(b, opts_b, x, 3, after_step)
    assert torch.equal(b(x), a(x))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name


# layers with manifold parameters: also trained by one RiemannianAdam for all parameters
ON_MANIFOLDS = {
    "LowRankLinear",
    "TTLinear",
    "STTPLinear-stiefel",
    "TTConv2d-stiefel",
    "SOTTConv2d",
    "GSOrthogonal-orthogonal",
}


@pytest.mark.parametrize(
    "name,kind", [(n, "mixed") for n in LAYERS] + [(n, "riemannian") for n in LAYERS if n in ON_MANIFOLDS]
)
def test_every_layer_round_trips_a_checkpoint_mid_training(name, kind, tmp_path):
    make, shape = LAYERS[name]
    _assert_round_trip_continues_identically(lambda seed: make(D, seed), _x(shape, 4), kind, tmp_path / "ckpt.pt")


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4)).double()


def _cnn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 3, padding=1), nn.Flatten(), nn.Linear(96, 5)
    ).double()


CONVERTED = {
    "sttp": (lambda m, s: convert_to_sttp(m, 3), None),
    "sttp-stiefel": (lambda m, s: convert_to_sttp(m, 4, parametrization="stiefel"), None),
    "svdp": (lambda m, s: convert_to_sttp(m, 100, svdp=True), None),
    "tt_conv": (lambda m, s: convert_to_tt_conv(m, 3), tt_conv_orthogonalize_),
    "tt_conv-stiefel": (lambda m, s: convert_to_tt_conv(m, 3, orthogonality="stiefel"), None),
    "tbasis": (lambda m, s: convert_to_tbasis(m, 4, 2, generator=_gen(s)), None),
}


@pytest.mark.parametrize(
    "convert,model", [(c, m) for c in CONVERTED for m in ("mlp", "cnn") if m == "cnn" or not c.startswith("tt_conv")]
)
def test_every_converted_model_round_trips_a_checkpoint_mid_training(convert, model, tmp_path):
    dense, shape = (_mlp, (8,)) if model == "mlp" else (_cnn, (3, 4, 4))
    conversion, after_step = CONVERTED[convert]

    def make(seed):
        m = dense(seed)
        conversion(m, seed)
        return m

    _assert_round_trip_continues_identically(make, _x(shape, 4), "mixed", tmp_path / "ckpt.pt", after_step)


# ---------------------------------------------------------------------------------------------- dtype errors
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.complex64, torch.int64], ids=str)
@pytest.mark.parametrize("name", [n for n in LAYERS if n != "GSMatrix"])
def test_a_dtype_no_layer_supports_is_one_type_error(name, dtype):
    """Was: LowRankLinear / TTLinear / STTP / SVDP / TTConv2d / the orthogonal convs (dtype=torch.float16) raised a
    ValueError without the half-precision explanation, where TensorTrain.random(dtype=torch.float16) raised a
    TypeError with it, and GSOrthogonal(parametrization='orthogonal', dtype=torch.float16) was built and failed at
    its first forward. Every layer refuses a dtype it cannot hold with a TypeError naming dtype — the message of the
    formats where the layer takes float32/float64 only; half precision only where the layer has no support for it."""
    from lowrankopt import TensorTrain

    if dtype in (torch.float16, torch.bfloat16) and name in HALF_SUPPORTED:
        pytest.skip("supported in half precision")
    with pytest.raises(TypeError) as formats_error:
        TensorTrain.random((2, 3), 1, dtype=dtype)
    assert str(formats_error.value).startswith(f"dtype must be float32 or float64, got {dtype}")
    why = {torch.float16: "half precision", torch.bfloat16: "half precision", torch.complex64: "complex"}
    assert why.get(dtype, "dtype") in str(formats_error.value)
    make, _ = LAYERS[name]
    with pytest.raises(TypeError, match="dtype") as layer_error:
        make(dtype, 1)
    if name.split("-")[0] in ("LowRankLinear", "TTLinear", "STTPLinear", "STTPConv2d", "TTConv2d", "SVDPLinear",
                              "SVDPConv2d", "SkewOrthogonalConv2d", "GSOrthogonalConv2d"):  # fmt: skip
        assert str(layer_error.value) == str(formats_error.value)
