"""Random points, random formats and layers default to ``torch.get_default_dtype()``, as torch's own factories do;
an explicit ``dtype`` wins over the default."""

from __future__ import annotations

import pytest
import torch

import lowrankopt as lro
from lowrankopt import nn as lnn

FACTORIES = {
    "LowRankMatrix.random": lambda **kw: lro.LowRankMatrix.random(6, 5, 2, **kw),
    "TensorTrain.random": lambda **kw: lro.TensorTrain.random([3, 4, 2], 2, **kw),
    "TTMatrix.random": lambda **kw: lro.TTMatrix.random([2, 3], [3, 2], 2, **kw),
    "TensorRing.random": lambda **kw: lro.TensorRing.random([3, 4, 2], 2, **kw),
    "FixedRankMatrices.random_point": lambda **kw: lro.FixedRankMatrices(6, 5, 2).random_point(**kw),
    "FixedTTRank.random_point": lambda **kw: lro.FixedTTRank([3, 4, 2], 2).random_point(**kw),
    "GeooptFixedRank.random": lambda **kw: lro.GeooptFixedRank(6, 5, 2).random(**kw),
    "GeooptFixedTTRank.random": lambda **kw: lro.GeooptFixedTTRank([3, 4, 2], 2).random(**kw),
}

LAYERS = {
    "LowRankLinear": lambda **kw: lnn.LowRankLinear(8, 6, 2, **kw),
    "TTLinear": lambda **kw: lnn.TTLinear(8, 6, 2, **kw),
    "STTPLinear": lambda **kw: lnn.STTPLinear(8, 6, 2, **kw),
    "TTConv2d": lambda **kw: lnn.TTConv2d(4, 6, 3, 2, **kw),
    "GSOrthogonal": lambda **kw: lnn.GSOrthogonal(8, 4, **kw),
    "SkewOrthogonalConv2d": lambda **kw: lnn.SkewOrthogonalConv2d(4, **kw),
}


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def default_dtype(request):
    old = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    try:
        yield request.param
    finally:
        torch.set_default_dtype(old)


def _dtypes(obj) -> set[torch.dtype]:
    if isinstance(obj, torch.nn.Module):
        return {p.dtype for p in obj.parameters()}
    return {obj.dtype}


@pytest.mark.parametrize("name", FACTORIES)
def test_random_factories_follow_the_default_dtype(name, default_dtype):
    make = FACTORIES[name]
    assert _dtypes(make(generator=torch.Generator().manual_seed(0))) == {default_dtype}
    other = torch.float64 if default_dtype == torch.float32 else torch.float32
    assert _dtypes(make(dtype=other, generator=torch.Generator().manual_seed(0))) == {other}


@pytest.mark.parametrize("name", LAYERS)
def test_layers_follow_the_default_dtype(name, default_dtype):
    make = LAYERS[name]
    assert _dtypes(make()) == {default_dtype}
    other = torch.float64 if default_dtype == torch.float32 else torch.float32
    assert _dtypes(make(dtype=other)) == {other}


def test_the_default_is_torchs_not_a_fixed_float64():
    """Under torch's own default (float32) a random point is float32, as ``torch.randn`` would be."""
    assert torch.get_default_dtype() == torch.float32
    assert lro.FixedTTRank([3, 4], 2).random_point().dtype == torch.randn(1).dtype
