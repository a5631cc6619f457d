"""Skew-orthogonal and GS orthogonal convolutions: dense Jacobian checks; MaxMin; certified radius."""

import io
import math

import pytest
import torch
import torch.nn.functional as F

from lowrankopt.nn import GSOrthogonalConv2d, MaxMinPermuted, SkewOrthogonalConv2d, certified_radius, channel_shuffle
from lowrankopt.nn.orthogonal.gs_conv import LipConvNet, MaxMin

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


@pytest.mark.parametrize("shuffle, C", [("paper", 16), ("legacy", 8)])
def test_gs_orthogonal_conv_is_orthogonal_and_cheaper(shuffle, C):
    g = torch.Generator().manual_seed(3)
    conv = GSOrthogonalConv2d(C, 3, (4, 2), tol=1e-10, bias=True, shuffle=shuffle, dtype=D, generator=g)
    assert conv.paired == (shuffle == "paper")
    J = jacobian(lambda x: conv(x) - conv.conv2.bias[:, None, None], (C, 4, 4))
    assert (J.T @ J - torch.eye(16 * C, dtype=D)).abs().max() < 1e-9
    k = 3
    assert sum(p.numel() for p in conv.parameters()) == C * C * k * k // 4 + C * C // 2 + C
    # the shuffles make every output channel depend on every input channel (groups 4 then 2 still mix)
    dep = J.reshape(C, 16, C, 16).abs().sum(dim=(1, 3))
    assert (dep > 0).all()
    assert sum(p.numel() for p in SkewOrthogonalConv2d(C, 3, bias=False).parameters()) == C * C * k * k


def reference_channel_shuffle(x, groups, paired=False):
    """gsoft_demo's ``channel_shuffle`` (gs_conv/skew_ortho_conv.py), re-implemented: view as (B, c, g) channels
    (pairs kept together with ``paired``), swap the two, flatten."""
    B, C, H, W = x.shape
    if paired:
        return x.reshape(B, C // groups // 2, groups, 2, H, W).transpose(1, 2).reshape(B, C, H, W)
    return x.reshape(B, C // groups, groups, H, W).transpose(1, 2).reshape(B, C, H, W)


@pytest.mark.parametrize("C, groups", [(12, 2), (12, 3), (24, 4), (16, 4)])
def test_channel_shuffle_is_the_papers_and_the_references(C, groups):
    x = torch.randn(2, C, 3, 3, dtype=D, generator=torch.Generator().manual_seed(C + groups))
    assert torch.equal(channel_shuffle(x, groups), reference_channel_shuffle(x, groups))
    assert torch.equal(channel_shuffle(x, groups, paired=True), reference_channel_shuffle(x, groups, paired=True))
    # the paper's σ with its matrix convention (channel i is sent to σ(i)), Definition 5.2 and Appendix F
    k, n = groups, C
    sigma = [(i % k) * (n // k) + i // k for i in range(n)]
    paired = [((i // 2) % k) * (n // k) + 2 * (i // (2 * k)) + i % 2 for i in range(n)]
    for perm, kwargs in ((sigma, {}), (paired, {"paired": True})):
        want = torch.empty_like(x)
        want[:, perm] = x
        assert torch.equal(channel_shuffle(x, groups, **kwargs), want)
        back = channel_shuffle(channel_shuffle(x, groups, **kwargs), groups, shuffle="legacy", **kwargs)
        assert torch.equal(back, x)  # legacy is the inverse


def test_channel_shuffle_and_maxmin():
    x = torch.arange(12, dtype=D).reshape(1, 6, 1, 2)
    y = channel_shuffle(x, 2, shuffle="legacy")  # channel i·2 + j = old j·3 + i
    assert [int(v) for v in y[0, :, 0, 0]] == [0, 6, 2, 8, 4, 10]
    y = channel_shuffle(x, 2)  # channel j·3 + i = old i·2 + j
    assert [int(v) for v in y[0, :, 0, 0]] == [0, 4, 8, 2, 6, 10]
    with pytest.raises(ValueError, match="shuffle"):
        channel_shuffle(x, 2, shuffle="inverse")
    with pytest.raises(ValueError, match="pairs"):
        channel_shuffle(x, 2, paired=True)
    z = torch.randn(3, 6, 4, 4, dtype=D, generator=torch.Generator().manual_seed(4))
    mm = MaxMin()(z)
    assert torch.equal(mm[:, :3], torch.maximum(z[:, :3], z[:, 3:]))
    assert torch.equal(mm[:, 3:], torch.minimum(z[:, :3], z[:, 3:]))
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


def dense_operator(layer, shape):
    """The matrix of ``x ↦ layer(x) − layer(0)`` (columns: the images of the basis images)."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=D).reshape(n, *shape)
    with torch.no_grad():
        out = layer(basis) - layer(torch.zeros(1, *shape, dtype=D))
    return out.reshape(n, -1).T


def reference_strided_soc(conv, x):
    """SOC's forward (singlasahil14/SOC skew_ortho_conv.py) for a stride / channel change, re-implemented densely:
    the rearrange ``b c (w k1) (h k2) -> b (c k1 k2) w h``, zero channels up to C, the exponential of the dense
    skew conv matrix, the first out_channels."""
    s = conv.stride
    B, c, H, W = x.shape
    u = x.reshape(B, c, H // s, s, W // s, s).permute(0, 1, 3, 5, 2, 4).reshape(B, c * s * s, H // s, W // s)
    C = conv.width
    u = torch.cat([u, u.new_zeros(B, C - u.shape[1], H // s, W // s)], dim=1)
    K = conv.skew_kernel().detach()
    shape = (C, H // s, W // s)
    eye = torch.eye(math.prod(shape), dtype=D).reshape(-1, *shape)
    Lmat = F.conv2d(eye, K, padding=conv.kernel_size // 2, groups=conv.groups).reshape(eye.shape[0], -1).T
    z = (u.reshape(B, -1) @ torch.linalg.matrix_exp(Lmat).T).reshape(B, *shape)
    return z[:, : conv.out_channels]


@pytest.mark.parametrize(
    "c_in, c_out, stride, k, groups",
    [(2, 16, 2, 3, 1), (4, 8, 2, 3, 2), (3, 8, 1, 3, 1), (8, 3, 1, 3, 1), (4, 6, 2, 1, 2), (6, 4, 1, 1, 1)],
)
def test_strided_and_channel_changing_soc_is_isometric_or_coisometric(c_in, c_out, stride, k, groups):
    g = torch.Generator().manual_seed(c_in * 10 + c_out)
    conv = SkewOrthogonalConv2d(
        c_in, k, groups, out_channels=c_out, stride=stride, tol=1e-12, init_scale=0.5, dtype=D, generator=g
    )
    with torch.no_grad():
        conv.bias.normal_(generator=g)
    shape = (c_in, 4, 4)
    A = dense_operator(conv, shape)
    m, n = A.shape
    assert (m, n) == (c_out * 16 // stride**2, c_in * 16)
    if stride**2 * c_in <= c_out:  # isometric: ‖W x‖ = ‖x‖
        assert (A.T @ A - torch.eye(n, dtype=D)).abs().max() < 1e-10
    else:  # co-isometric: every singular value 1
        assert (A @ A.T - torch.eye(m, dtype=D)).abs().max() < 1e-10
    assert (torch.linalg.svdvals(A) - 1).abs().max() < 1e-10
    x = torch.randn(3, *shape, dtype=D, generator=g)
    with torch.no_grad():
        want = reference_strided_soc(conv, x) + conv.bias[:, None, None]
        assert (conv(x) - want).abs().max() < 1e-10
    assert sum(p.numel() for p in conv.parameters()) == conv.width**2 // groups * k * k + c_out


@pytest.mark.parametrize("c_in, c_out, groups", [(4, 8, (4, 2)), (2, 16, (4, 4)), (8, 8, (2, 4))])
def test_strided_gs_conv_is_isometric_or_coisometric(c_in, c_out, groups):
    g = torch.Generator().manual_seed(c_in + c_out)
    conv = GSOrthogonalConv2d(c_in, 3, groups, out_channels=c_out, stride=2, tol=1e-12, dtype=D, generator=g)
    A = dense_operator(conv, (c_in, 4, 4))
    m, n = A.shape
    if 4 * c_in <= c_out:
        assert (A.T @ A - torch.eye(n, dtype=D)).abs().max() < 1e-10
    else:
        assert (A @ A.T - torch.eye(m, dtype=D)).abs().max() < 1e-10
    # the reference's composition: shuffle (skipped only when the input's channels do not divide into g1 groups),
    # conv1, shuffle with g2, conv2 — built here; paired by default where both shuffles can move pairs
    x = torch.randn(2, c_in, 4, 4, dtype=D, generator=g)
    g1, g2 = groups
    assert conv.paired == (c_in % g1 != 0 or c_in % (2 * g1) == 0)  # (4, 8, (4, 2)): 4 channels, not 4 pairs
    u = reference_channel_shuffle(x, g1, paired=conv.paired) if c_in % g1 == 0 else x
    u = reference_channel_shuffle(conv.conv1(u), g2, paired=conv.paired)
    with torch.no_grad():
        assert (conv(x) - conv.conv2(u)).abs().max() < 1e-13


def test_bad_strided_arguments():
    with pytest.raises(ValueError, match="stride"):
        SkewOrthogonalConv2d(4, 3, stride=3)
    with pytest.raises(ValueError, match="divisible by groups"):
        SkewOrthogonalConv2d(3, 3, 4, out_channels=6)  # max(3, 6) = 6 channels in 4 groups
    with pytest.raises(ValueError, match="divisible by the stride"):
        SkewOrthogonalConv2d(2, 3, stride=2)(torch.zeros(1, 2, 5, 4))
    with pytest.raises(ValueError, match="pairs"):
        GSOrthogonalConv2d(4, 3, (2, 4), out_channels=4, paired=True)  # 4 channels are not 4 groups of pairs
    assert not GSOrthogonalConv2d(4, 3, (2, 4), out_channels=4).paired  # the default falls back to unpaired
    with pytest.raises(ValueError, match="paired=True.*groups"):
        GSOrthogonalConv2d(4, 3, (4, 2), out_channels=8, paired=True)  # the input's 4 channels are not 4 pairs
    with pytest.raises(ValueError, match="architecture"):
        LipConvNet(1, 10, 8, architecture="resnet")
    with pytest.raises(ValueError, match="activation"):
        LipConvNet(1, 10, 8, activation="relu")


def reference_lipconvnet_layout(in_ch, width, depth, stages):
    """(in, out, stride, kernel) of every conv of SOC's LipConvNet (lip_convnets.py, ``_make_layer``), with
    ``stages`` blocks instead of 5, re-derived: block s has planes = width·2ˢ, depth − 1 stride-1 3×3 convs, then a
    stride-2 conv to 2·planes (kernel 1 in the last block); in_planes carries over."""
    layout, in_planes = [], in_ch
    for s in range(stages):
        planes = width * 2**s
        for i in range(depth):
            last = i == depth - 1
            stride = 2 if last else 1
            layout.append((in_planes, planes * stride, stride, 1 if last and s == stages - 1 else 3))
            in_planes = planes * stride
    return layout, in_planes


@pytest.mark.parametrize("conv", ["soc", "gs"])
def test_reference_lipconvnet_layout_and_lipschitz(conv):
    g = torch.Generator().manual_seed(9)
    net = LipConvNet(1, 10, 8, width=4, depth=2, stages=3, conv=conv, groups=(2, 2), architecture="reference",
                     dtype=D, generator=g)  # fmt: skip
    layout, flat = reference_lipconvnet_layout(1, 4, 2, 3)
    convs = [m for m in net.features if isinstance(m, (SkewOrthogonalConv2d, GSOrthogonalConv2d))]
    got = []
    for m in convs:
        first = m.conv1 if conv == "gs" else m
        got.append((first.channels, first.out_channels, first.stride, first.kernel_size))
    assert got == layout
    acts = [m for m in net.features if not isinstance(m, (SkewOrthogonalConv2d, GSOrthogonalConv2d))]
    assert all(isinstance(a, MaxMin if conv == "soc" else MaxMinPermuted) for a in acts) and len(acts) == len(convs)
    head = net.head  # the final 1×1 SOC: flat features → classes
    assert isinstance(head, SkewOrthogonalConv2d) and head.kernel_size == 1 and head.groups == 1
    assert (head.channels, head.out_channels) == (flat, 10)
    x = torch.randn(64, dtype=D, generator=g)
    J = torch.autograd.functional.jacobian(lambda v: net(v.reshape(1, 1, 8, 8)).reshape(-1), x)
    assert torch.linalg.matrix_norm(J, 2) <= 1 + 1e-6
    assert net(torch.zeros(2, 1, 8, 8, dtype=D)).shape == (2, 10)


def test_reference_lipconvnet_15_has_the_papers_parameter_counts():
    """LipConvNet-15 on CIFAR-100 (5 blocks of 3 convs, 32 → 1024 channels; GS paper Table 3): SOC 24.1M, GS-SOC
    (4, 1) 8.91M, (4, 2) 7.86M, (4, 4) 7.3M parameters. (The reference also stores its power-iteration vectors as
    parameters, about 0.01M more.)"""
    paper = {None: 24.1e6, (4, 1): 8.91e6, (4, 2): 7.86e6, (4, 4): 7.3e6}
    for groups, want in paper.items():
        kw = {"conv": "soc"} if groups is None else {"conv": "gs", "groups": groups}
        net = LipConvNet(3, 100, 32, width=32, depth=3, stages=5, architecture="reference", **kw)
        count = sum(p.numel() for p in net.parameters())
        assert abs(count - want) < 0.006 * want, (groups, count)


def randomized_gs_conv(c, groups=(4, 2), seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    conv = GSOrthogonalConv2d(c, 3, groups, dtype=D, generator=g, **kw)
    with torch.no_grad():
        for p in conv.parameters():
            p.normal_(generator=g)
    return conv


def round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_gs_conv_state_records_its_shuffles():
    """The shuffles are not in the parameters' shapes: the state dict records (shuffle, paired) and loading checks
    them. A state without the record (lowrankopt before issue 23: legacy, unpaired) loads into a legacy layer with its
    outputs and is refused (strict or not, nothing loaded) by a paper layer, naming shuffle='legacy'; a paired state
    is refused by an unpaired layer, naming paired; with one group (all shuffles the identity) everything loads."""
    x = torch.randn(2, 16, 4, 4, dtype=D, generator=torch.Generator().manual_seed(1))
    old = randomized_gs_conv(16, shuffle="legacy")
    sd = round_trip({k: v for k, v in old.state_dict().items() if k != "_extra_state"})
    legacy = GSOrthogonalConv2d(16, 3, (4, 2), shuffle="legacy", dtype=D)
    legacy.load_state_dict(sd)
    with torch.no_grad():
        assert (legacy(x) - old(x)).abs().max() < 1e-12
    paper = randomized_gs_conv(16, seed=2)
    before = {k: v.clone() for k, v in paper.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="before issue 23.*shuffle='legacy'") as error:
            paper.load_state_dict(sd, strict=strict)
        assert "Missing key" not in str(error.value)
    assert all(torch.equal(v, before[k]) for k, v in paper.state_dict().items())
    new = round_trip(paper.state_dict())  # int64 record, weights_only
    assert torch.equal(new["_extra_state"], torch.tensor([1, 1]))
    GSOrthogonalConv2d(16, 3, (4, 2), dtype=D).load_state_dict(new)
    with pytest.raises(RuntimeError, match="paired=True.*paired=True"):
        GSOrthogonalConv2d(16, 3, (4, 2), paired=False, dtype=D).load_state_dict(new)
    one_group = randomized_gs_conv(8, groups=1, shuffle="legacy")
    plain = {k: v for k, v in one_group.state_dict().items() if k != "_extra_state"}
    GSOrthogonalConv2d(8, 3, 1, dtype=D).load_state_dict(plain)


def test_old_lipconvnet_checkpoint_needs_legacy():
    x = torch.randn(2, 3, 8, 8, dtype=D, generator=torch.Generator().manual_seed(4))
    old = LipConvNet(3, 5, 8, width=16, depth=1, stages=2, conv="gs", dtype=D, shuffle="legacy")
    sd = {k: v for k, v in old.state_dict().items() if not k.endswith("_extra_state")}
    with pytest.raises(RuntimeError, match="features.0: .*shuffle='legacy'"):
        LipConvNet(3, 5, 8, width=16, depth=1, stages=2, conv="gs", dtype=D).load_state_dict(sd)
    net = LipConvNet(3, 5, 8, width=16, depth=1, stages=2, conv="gs", dtype=D, shuffle="legacy")
    net.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(net(x), old(x))


def test_gs_conv_paired_default_and_input_shuffle_are_explicit():
    """paired=None resolves to paired only where both shuffles can move pairs; the choice shows in repr and the
    record. The input shuffle is skipped exactly when the input's channels do not divide into g1 groups (the
    reference's rule): for 12 channels and groups (4, 2) it is applied, unpaired."""
    conv = randomized_gs_conv(12)  # 12 = 4 groups of 3 channels: not of pairs
    assert not conv.paired and conv.shuffles_input
    assert "paired=False" in repr(conv) and torch.equal(conv.get_extra_state(), torch.tensor([1, 0]))
    x = torch.randn(2, 12, 5, 5, dtype=D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = conv.conv2(reference_channel_shuffle(conv.conv1(reference_channel_shuffle(x, 4)), 2))
        assert (conv(x) - want).abs().max() < 1e-13
    image = GSOrthogonalConv2d(3, 3, (4, 4), out_channels=16, dtype=D)  # 3 channels: not shuffled, paired after
    assert image.paired and not image.shuffles_input and "shuffles_input=False" in repr(image)
    with pytest.raises(ValueError, match="paired"):
        GSOrthogonalConv2d(12, 3, (4, 2), paired=True)


def test_a_soc_pickled_before_stride_and_out_channels_existed_still_works():
    # the pickle of lowrankopt before issue 23 has no stride / out_channels / width: unpickling fills them in
    soc = SkewOrthogonalConv2d(6, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    state = dict(soc.__dict__)
    for name in ("stride", "out_channels", "width"):
        del state[name]
    old = SkewOrthogonalConv2d.__new__(SkewOrthogonalConv2d)
    old.__setstate__(state)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    assert torch.equal(old(x), soc(x)) and repr(old) == repr(soc)
    old.load_state_dict(soc.state_dict())
