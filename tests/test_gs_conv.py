"""Skew-orthogonal and GS orthogonal convolutions: dense Jacobian checks; MaxMin; certified radius."""

import math

import pytest
import torch
import torch.nn.functional as F

from lowrankopt.nn import GSOrthogonalConv2d, MaxMinPermuted, SkewOrthogonalConv2d, certified_radius, channel_shuffle

D = torch.float64


def jacobian(layer, shape):
    n = math.prod(shape)
    return torch.autograd.functional.jacobian(
        lambda v: layer(v.reshape(1, *shape)).reshape(-1), torch.zeros(n, dtype=D)
    )


@pytest.mark.parametrize("groups", [1, 2])
def test_soc_is_the_exponential_of_a_skew_conv_and_orthogonal(groups):
    g = torch.Generator().manual_seed(groups)
    conv = SkewOrthogonalConv2d(4, 3, groups, tol=1e-10, bias=False, init_scale=0.5, dtype=D, generator=g)
    shape = (4, 5, 5)
    J = jacobian(conv, shape)
    assert (J.T @ J - torch.eye(J.shape[0], dtype=D)).abs().max() < 1e-9
    # independent reference: the dense matrix of L (zero-padded conv with the skew kernel), skew, and its exponential
    K = conv.skew_kernel().detach()
    eye = torch.eye(math.prod(shape), dtype=D).reshape(-1, *shape)
    Lmat = F.conv2d(eye, K, padding=1, groups=groups).reshape(eye.shape[0], -1).T
    assert torch.allclose(Lmat, -Lmat.T, atol=1e-13)
    assert torch.linalg.matrix_norm(Lmat, 2) <= conv.norm_bound() + 1e-12  # the certified bound holds
    assert torch.allclose(J, torch.linalg.matrix_exp(Lmat), atol=1e-9)


def test_gs_orthogonal_conv_is_orthogonal_and_cheaper():
    conv = GSOrthogonalConv2d(8, 3, (4, 2), tol=1e-10, bias=True, dtype=D, generator=torch.Generator().manual_seed(3))
    J = jacobian(lambda x: conv(x) - conv.conv2.bias[:, None, None], (8, 4, 4))
    assert (J.T @ J - torch.eye(128, dtype=D)).abs().max() < 1e-9
    C, k = 8, 3
    assert sum(p.numel() for p in conv.parameters()) == C * C * k * k // 4 + C * C // 2 + C
    # the shuffles make every output channel depend on every input channel (groups 4 then 2 still mix)
    dep = J.reshape(8, 16, 8, 16).abs().sum(dim=(1, 3))
    assert (dep > 0).all()
    assert sum(p.numel() for p in SkewOrthogonalConv2d(8, 3, bias=False).parameters()) == C * C * k * k


def test_channel_shuffle_and_maxmin():
    x = torch.arange(12, dtype=D).reshape(1, 6, 1, 2)
    y = channel_shuffle(x, 2)  # channel i·2 + j = old j·3 + i
    assert [int(v) for v in y[0, :, 0, 0]] == [0, 6, 2, 8, 4, 10]
    act = MaxMinPermuted()
    z = torch.randn(3, 6, 4, 4, dtype=D, generator=torch.Generator().manual_seed(4))
    out = act(z)
    assert torch.equal(out[:, 0::2], torch.maximum(z[:, 0::2], z[:, 1::2]))
    assert torch.allclose(out.norm(), z.norm())  # a per-pair permutation: norm preserving
    w = torch.randn(3, 6, 4, 4, dtype=D, generator=torch.Generator().manual_seed(5))
    assert (act(z) - act(w)).norm() <= (z - w).norm() + 1e-12  # 1-Lipschitz
    with pytest.raises(ValueError, match="even"):
        act(torch.zeros(1, 3, 2, 2))


def test_certified_radius_is_sound_for_a_1_lipschitz_classifier():
    g = torch.Generator().manual_seed(6)
    Q, _ = torch.linalg.qr(torch.randn(10, 4, dtype=D, generator=g))
    W = Q.T  # 4 × 10 with orthonormal rows: ‖W‖₂ = 1
    x = torch.randn(50, 10, dtype=D, generator=g)
    radius = certified_radius(x @ W.T)
    assert torch.allclose(
        certified_radius(torch.tensor([[3.0, 1.0, 0.0]], dtype=D)), torch.tensor([2 / math.sqrt(2)], dtype=D)
    )
    for _ in range(20):
        d = torch.randn(50, 10, dtype=D, generator=g)
        d = d / d.norm(dim=1, keepdim=True) * radius[:, None] * 0.999
        assert torch.equal((x @ W.T).argmax(1), ((x + d) @ W.T).argmax(1))


def test_bad_conv_arguments():
    with pytest.raises(ValueError, match="divisible"):
        SkewOrthogonalConv2d(6, 3, 4)
    with pytest.raises(ValueError, match="odd"):
        SkewOrthogonalConv2d(4, 2)
    with pytest.raises(ValueError, match="input"):
        SkewOrthogonalConv2d(4, 3)(torch.zeros(1, 3, 5, 5))
    big = SkewOrthogonalConv2d(4, 3, init_scale=50.0, max_terms=5)
    with pytest.raises(RuntimeError, match="max_terms"):
        big(torch.zeros(1, 4, 5, 5))


@pytest.mark.parametrize("conv", ["gs", "soc"])
def test_lipconvnet_is_1_lipschitz(conv):
    from lowrankopt.nn import LipConvNet, certified_accuracy

    g = torch.Generator().manual_seed(7)
    net = LipConvNet(1, 10, 8, width=8, depth=1, stages=1, conv=conv, groups=(2, 2), dtype=D, generator=g)
    with torch.no_grad():  # a head with norm > 1 must be rescaled to 1
        net.head.weight.mul_(10)
    x = torch.randn(64, dtype=D, generator=g)
    J = torch.autograd.functional.jacobian(lambda v: net(v.reshape(1, 1, 8, 8)).reshape(-1), x)
    assert torch.linalg.matrix_norm(J, 2) <= 1 + 1e-6
    X = torch.randn(30, 1, 8, 8, dtype=D, generator=g)
    y = net(X).argmax(1)  # all correct by construction: certified accuracy = share of radii > eps
    clean, cert = certified_accuracy(net, X, y, 0.05)
    radius = certified_radius(net(X).detach())
    assert clean == 1.0 and cert == pytest.approx((radius > 0.05).double().mean().item())
    with pytest.raises(ValueError, match="conv"):
        LipConvNet(1, 10, 8, conv="dense")
    with pytest.raises(ValueError, match="input"):
        net(torch.zeros(1, 3, 8, 8, dtype=D))
