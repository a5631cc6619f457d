"""SOTTConv2d: a TT conv with a skew-orthogonal core (Senderovich et al. 2022), 1-Lipschitz.

References are built here in float64: the layer's dense operator (the layer applied to the identity basis) and its
SVD; the forward against a dense composition written in the test (the skew kernel ``M − M*`` from the weight, its
conv as a dense matrix, ``torch.linalg.matrix_exp``, space-to-depth by reshapes).
"""

import geoopt
import pytest
import torch
import torch.nn.functional as F
from reference import linear_map_matrix

from lowrankopt.nn.spectral.sott import SOTTConv2d
from lowrankopt.nn.spectral.tt_conv import tt_conv_penalty

D = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def make(c_in, c_out, rank, stride, seed=0, scale=0.4, **kw):
    """A float64 layer with a tight series tolerance and a core far from the identity (exp(L) nontrivial)."""
    kw = {"tol": 1e-14, "max_terms": 60, "max_norm": None, "dtype": D, "generator": gen(seed)} | kw
    layer = SOTTConv2d(c_in, c_out, 3, rank, stride, **kw)
    with torch.no_grad():
        w = layer.core.weight
        w.copy_(torch.randn(w.shape, dtype=w.dtype, generator=gen(seed + 100)) * scale / w.shape[1] ** 0.5)
    return layer


def dense_reference(layer, x):
    """``last · T · exp(L) · P · S(firstᵀ x) + bias`` with L's dense matrix built from the weight."""
    s, r2, m = layer.stride[0], layer.ranks[1], layer.channels
    y = x if layer.first is None else torch.einsum("ia,zihw->zahw", layer.first, x)
    y = F.pixel_unshuffle(y, s)  # the reference's einops "b c (w k1) (h k2) -> b (c k1 k2) w h"
    y = torch.cat([y, y.new_zeros(y.shape[0], m - y.shape[1], *y.shape[2:])], 1)
    M = layer.core.weight.detach()
    K = M - M.transpose(0, 1).flip(-1, -2)
    n = y.shape[-1]
    L = linear_map_matrix(lambda z: F.conv2d(z, K, padding=1), m, n)
    y = (torch.linalg.matrix_exp(L) @ y.reshape(y.shape[0], -1).T).T.reshape(y.shape)[:, :r2]
    y = y if layer.last is None else torch.einsum("ob,zbhw->zohw", layer.last, y)
    return y + layer.bias[:, None, None]


# (c_in, c_out, rank, stride, kind): "isometry" — all c_in n² singular values 1; "coisometry" — all c_out n'²
# singular values 1; "contraction" — all ≤ 1
SHAPES = [
    (3, 8, 4, 1, "isometry"),  # rank ≥ c_in, r1 s² = 3 < r2 = 4: channels padded, last 8 × 4
    (2, 10, 8, 2, "isometry"),  # space-to-depth: r1 s² = 8 = r2
    (4, 16, 16, 2, "isometry"),  # rank ≥ c_in, c_out: no outer cores (the SOC alone)
    (6, 3, 4, 1, "coisometry"),  # rank ≥ c_out, r1 s² = 4 > r2 = 3: channels truncated
    (6, 5, 3, 1, "contraction"),
    (4, 4, 2, 2, "contraction"),
]


@pytest.mark.parametrize("orthogonality", ["stiefel", "penalty"])
@pytest.mark.parametrize("c_in,c_out,rank,stride,kind", SHAPES)
def test_singular_values_of_the_whole_layer(c_in, c_out, rank, stride, kind, orthogonality):
    layer = make(c_in, c_out, rank, stride, seed=c_in + 10 * rank, orthogonality=orthogonality)
    assert (layer.first is None) == (rank >= max(c_in, c_out))
    n = 6 if stride == 1 else 8
    x = torch.randn(2, c_in, n, n, dtype=D, generator=gen(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_reference(layer, x), rtol=0, atol=1e-11)
    J = linear_map_matrix(layer, c_in, n)
    m = n // stride
    assert J.shape == (c_out * m * m, c_in * n * n)
    sv = torch.linalg.svdvals(J)
    tol = 1e-10  # the series is certified to 1e-14 here; the rest is rounding
    assert sv.max() <= 1 + tol
    if kind == "isometry":
        assert sv.numel() == c_in * n * n and (sv - 1).abs().max() < tol
    elif kind == "coisometry":
        assert sv.numel() == c_out * m * m and (sv - 1).abs().max() < tol
    else:
        assert sv.min() < 1 - 1e-3  # not orthogonal: it drops dimensions on both sides
    torch.testing.assert_close(layer.lipschitz_bound(), torch.tensor(1.0, dtype=D), rtol=0, atol=1e-13)


def test_gradients_flow_and_stiefel_training_keeps_the_layer_orthogonal():
    layer = make(3, 8, 4, 1, seed=3, scale=0.2, tol=1e-12)
    x = torch.randn(4, 3, 6, 6, dtype=D, generator=gen(4))
    target = torch.randn(4, 8, 6, 6, dtype=D, generator=gen(5))
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    opt = geoopt.optim.RiemannianAdam(layer.parameters(), lr=1e-2)
    loss = lambda: (layer(x) - target).square().mean()  # noqa: E731
    l0 = loss().item()
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < l0
    sv = torch.linalg.svdvals(linear_map_matrix(layer, 3, 6))
    assert sv.numel() == 3 * 36 and (sv - 1).abs().max() < 1e-9  # still an isometry after training


def test_penalty_mode_drifts_and_is_bounded():
    layer = make(6, 5, 3, 1, seed=6, orthogonality="penalty", tol=1e-12)
    with torch.no_grad():
        layer.first.mul_(1.3)
        layer.last.add_(0.2 * torch.randn(layer.last.shape, dtype=D, generator=gen(7)))
    norm = torch.linalg.svdvals(linear_map_matrix(layer, 6, 6)).max()
    bound = layer.lipschitz_bound()
    assert 1.05 < norm <= bound * (1 + 1e-10)
    # the penalty sees the layer, and training with it brings the outer cores back
    model = torch.nn.Sequential(layer)
    e = lambda M: (M.T @ M - torch.eye(M.shape[1], dtype=D)).square().sum()  # noqa: E731
    p0 = tt_conv_penalty(model)
    torch.testing.assert_close(p0, (e(layer.first) + e(layer.last)) / (2 * 3**2), rtol=1e-14, atol=0)
    torch.testing.assert_close(tt_conv_penalty(model, "layer"), layer.orthogonality_penalty(), rtol=1e-14, atol=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(100):
        opt.zero_grad()
        tt_conv_penalty(model).backward()
        opt.step()
    assert tt_conv_penalty(model).item() < 1e-3 * p0.item()
    assert layer.lipschitz_bound() < 1.01


def test_float32_matches_float64():
    layer = make(3, 8, 4, 2, seed=8, tol=1e-6, max_terms=30, max_norm=2.0)
    layer32 = SOTTConv2d(3, 8, 3, 4, 2, dtype=torch.float32, tol=1e-6, max_norm=2.0, generator=gen(8))
    layer32.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    x = torch.randn(2, 3, 8, 8, dtype=D, generator=gen(9))
    torch.testing.assert_close(layer32(x.float()), layer(x).float(), rtol=1e-4, atol=1e-5)
    assert layer32(x.float()).dtype == torch.float32


def test_no_bias_parameter_count_and_repr():
    layer = SOTTConv2d(6, 5, 3, 3, 2, bias=False, dtype=D)
    r1, r2 = layer.ranks
    m = max(r1 * 4, r2)
    assert layer.bias is None and layer.channels == m
    assert sum(p.numel() for p in layer.parameters()) == 6 * r1 + m * m * 9 + 5 * r2
    assert "rank=3" in repr(layer) and "orthogonality='stiefel'" in repr(layer)
    assert layer(torch.zeros(1, 6, 4, 4, dtype=D)).shape == (1, 5, 2, 2)
    assert layer(torch.zeros(0, 6, 4, 4, dtype=D)).shape == (0, 5, 2, 2)  # an empty batch too
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as nn.Conv2d: the output in the autocast dtype
        assert layer.float()(torch.zeros(1, 6, 4, 4)).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="SOTTConv2d does not support torch.float16"):
        layer.half()(torch.zeros(1, 6, 4, 4, dtype=torch.half))


def test_bad_inputs():
    with pytest.raises(ValueError, match="kernel_size"):
        SOTTConv2d(4, 4, 2, 2)
    with pytest.raises(ValueError, match="kernel_size"):
        SOTTConv2d(4, 4, (3, 5), 2)
    with pytest.raises(ValueError, match="stride"):
        SOTTConv2d(4, 4, 3, 2, stride=(1, 2))
    with pytest.raises(ValueError, match="stride"):
        SOTTConv2d(4, 4, 3, 2, stride=0)
    with pytest.raises(ValueError, match="rank"):
        SOTTConv2d(4, 4, 3, 0)
    with pytest.raises(ValueError, match="orthogonality"):
        SOTTConv2d(4, 4, 3, 2, orthogonality="gauge")
    with pytest.raises(TypeError, match="bias"):
        SOTTConv2d(4, 4, 3, 2, bias=1)
    with pytest.raises(TypeError, match="dtype"):
        SOTTConv2d(4, 4, 3, 2, dtype=torch.float16)
    layer = SOTTConv2d(4, 4, 3, 2, stride=2, dtype=D)
    with pytest.raises(ValueError, match="divisible by the stride 2"):
        layer(torch.zeros(1, 4, 5, 6, dtype=D))
    with pytest.raises(ValueError, match=r"input must have shape \(B, 4, H, W\)"):
        layer(torch.zeros(1, 3, 6, 6, dtype=D))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.zeros(1, 4, 6, 6))
