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
