"""The native gather of the linearized objects agrees with gather on their materialized factors."""

import pytest
import torch

from lowrankopt import FixedRankMatrices, FixedTTRank
from lowrankopt.formats.delta_lowrank import DeltaLowRank
from lowrankopt.formats.delta_tt import DeltaTT
from lowrankopt.formats.lowrank import LowRankMatrix
from lowrankopt.formats.tt import TensorTrain

DT = torch.float64


def objects(kind, g):
    """(point's linearization, curvature object with base, curvature object without base), nonzero δ."""
    if kind == "matrix":
        M = FixedRankMatrices(6, 5, 2)
    else:
        M = FixedTTRank((3, 4, 3, 2), (2, 3, 2))
    x = M.random_point(generator=g, dtype=torch.float64)
    xi = M.random_tangent(x, generator=g)
    deltas = [torch.randn(s, dtype=DT, generator=g).requires_grad_(True) for s in M.coord_shapes]
    lin = M.linearization(x, deltas)
    with_base, without = M.second_fundamental(x, xi, deltas)
    return x, deltas, [lin, with_base, without]


def materialized(obj):
    if isinstance(obj, DeltaTT):
        return TensorTrain._trusted(obj.cores)
    return LowRankMatrix._trusted(obj.U, obj.S, obj.V)


@pytest.mark.parametrize("kind", ["matrix", "tt"])
def test_native_gather_matches_materialized(kind):
    g = torch.Generator().manual_seed(0)
    x, deltas, objs = objects(kind, g)
    idx = torch.stack([torch.randint(0, n, (40,), generator=g) for n in x.shape], 1)
    w = torch.randn(40, dtype=DT, generator=g)
    for obj in objs:
        obj.zero = False  # the δ are not zero here: the forward must include their terms
        ref_obj = materialized(obj)
        fast, ref = obj.gather(idx), ref_obj.gather(idx)  # one (N, d) index convention for every format
        assert torch.allclose(fast, ref, atol=1e-13)
        if kind == "matrix":  # the (rows, cols) convenience is the same code path
            assert torch.equal(obj.gather(idx[:, 0], idx[:, 1]), fast.detach())
        g_fast = torch.autograd.grad((fast * w).sum(), deltas)
        g_ref = torch.autograd.grad((ref * w).sum(), deltas)
        for a, b in zip(g_fast, g_ref):
            assert torch.allclose(a, b, atol=1e-13)


@pytest.mark.parametrize("kind", ["matrix", "tt"])
def test_zero_flag_value_is_the_point(kind):
    g = torch.Generator().manual_seed(1)
    x, deltas, objs = objects(kind, g)
    for t in deltas:
        t.data.zero_()
    idx = torch.stack([torch.randint(0, n, (30,), generator=g) for n in x.shape], 1)
    lin, with_base, _ = objs
    for obj in (lin, with_base):
        assert torch.allclose(obj.gather(idx), x.gather(idx), atol=1e-13)


def test_delta_objects_are_formats():
    g = torch.Generator().manual_seed(2)
    _, _, objs = objects("tt", g)
    assert all(isinstance(o, TensorTrain) for o in objs)
    _, _, objs = objects("matrix", g)
    assert all(isinstance(o, DeltaLowRank) and isinstance(o, LowRankMatrix) for o in objs)
