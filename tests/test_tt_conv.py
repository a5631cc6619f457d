"""TTConv2d: a conv with a 3-core TT kernel whose singular values are those of its small core conv.

References are built here in float64: the dense Jacobian of a layer (the layer applied to the identity basis)
and its SVD, the dense ``nn.Conv2d`` of the same kernel.
"""

import geoopt
import pytest
import torch
import torch.nn.functional as F
from reference import linear_map_matrix

from lowrankopt.nn import TTConv2d, convert_to_tt_conv, tt_conv_orthogonalize_, tt_conv_penalty
from lowrankopt.nn.spectral.sott import SOTTConv2d
from lowrankopt.spectral import conv_spectral_normalization

D = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def svdvals_sorted(A):
    return torch.linalg.svdvals(A).sort(descending=True).values


def layer_svs(layer, n):
    return layer.singular_values(n).flatten().sort(descending=True).values


def core_conv(core, stride, pads):
    return lambda x: F.conv2d(F.pad(x, pads, mode="circular"), core, stride=stride)


def perturb_(layer, scale=0.3, seed=5):
    g = gen(seed)
    with torch.no_grad():
        layer.first.add_(scale * torch.randn(layer.first.shape, dtype=D, generator=g))
        layer.last.add_(scale * torch.randn(layer.last.shape, dtype=D, generator=g))


def is_orthonormal(M, tol):
    eye = torch.eye(M.shape[1], dtype=M.dtype)
    return (M.T @ M - eye).abs().max().item() < tol


# ------------------------------------------------------------------------------------------------------------
# singular values


@pytest.mark.parametrize("orthogonality", ["gauge", "stiefel", "penalty"])
@pytest.mark.parametrize("stride,n", [(1, 6), (2, 8)])
def test_singular_values_match_dense_linear_map_matrix(orthogonality, stride, n):
    c_in, c_out, rank, k = 5, 4, 3, 3
    layer = TTConv2d(
        c_in, c_out, k, rank, stride=stride, padding=1, bias=True, padding_mode="circular",
        orthogonality=orthogonality, dtype=D, generator=gen(1),
    )  # fmt: skip
    if orthogonality != "stiefel":  # leave the orthonormal gauge, then come back to it
        perturb_(layer)
        layer.orthogonalize_()
    assert is_orthonormal(layer.first, 1e-13) and is_orthonormal(layer.last, 1e-13)
    J = linear_map_matrix(layer, c_in, n)
    m = n // stride
    assert J.shape == (c_out * m * m, c_in * n * n)
    sv = layer_svs(layer, n)
    r1, r2 = layer.ranks
    assert sv.numel() == m * m * min(r2, r1 * stride**2)
    dense = svdvals_sorted(J)
    torch.testing.assert_close(dense[: sv.numel()], sv, rtol=0, atol=1e-12)
    assert dense[sv.numel() :].abs().max() < 1e-12  # the rest of the layer's singular values are 0
    # and they are those of the small core conv alone
    core = svdvals_sorted(linear_map_matrix(core_conv(layer.core.detach(), stride, layer._pads), r1, n))
    torch.testing.assert_close(core, sv, rtol=0, atol=1e-12)


@pytest.mark.parametrize("stride,n", [(1, 6), (2, 8)])
def test_effective_core_gives_exact_singular_values_off_gauge(stride, n):
    c_in, c_out = 5, 4
    layer = TTConv2d(
        c_in, c_out, 3, 3, stride, 1, False, "circular", orthogonality="penalty", dtype=D, generator=gen(2)
    )
    perturb_(layer, 0.5)
    assert not is_orthonormal(layer.first, 1e-2)
    before = [p.detach().clone() for p in layer.parameters()]
    sv = layer_svs(layer, n)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))  # effective_core does not mutate
    dense = svdvals_sorted(linear_map_matrix(layer, c_in, n))
    torch.testing.assert_close(dense[: sv.numel()], sv, rtol=0, atol=1e-12)
    # the raw core's spectrum is not the layer's here
    raw = svdvals_sorted(linear_map_matrix(core_conv(layer.core.detach(), stride, layer._pads), layer.ranks[0], n))
    assert (raw - sv).abs().max() > 1e-3
    # effective_core is the core after orthogonalize_
    torch.testing.assert_close(layer.effective_core(), layer.orthogonalize_().core, rtol=0, atol=1e-13)


def test_orthogonalize_preserves_the_function():
    layer = TTConv2d(6, 5, 3, 4, stride=2, padding=1, orthogonality="gauge", dtype=D, generator=gen(3))
    perturb_(layer, 0.7)
    x = torch.randn(3, 6, 9, 9, dtype=D, generator=gen(4))
    y = layer(x)
    core = layer.core
    layer.orthogonalize_()
    assert layer.core is core  # in place: optimizer state stays attached
    torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-12)
    assert is_orthonormal(layer.first, 1e-13) and is_orthonormal(layer.last, 1e-13)
    assert (torch.diagonal(torch.linalg.qr(layer.first.detach()).R).abs() > 0).all()
    # zero padding too, and float32
    layer32 = TTConv2d(4, 7, 3, 2, padding="same", dtype=torch.float32, generator=gen(5))
    with torch.no_grad():
        layer32.first.mul_(3.0)
        layer32.last.mul_(0.5)
    x = torch.randn(2, 4, 7, 7, generator=gen(6))
    y = layer32(x)
    torch.testing.assert_close(layer32.orthogonalize_()(x), y, rtol=1e-5, atol=1e-5)
    assert is_orthonormal(layer32.first, 1e-5)


@pytest.mark.parametrize("stride,n", [(1, 6), (2, 8)])
def test_clip_caps_the_norm(stride, n):
    c_in = 5
    layer = TTConv2d(c_in, 4, 3, 3, stride, 1, False, "circular", orthogonality="penalty", dtype=D, generator=gen(7))
    perturb_(layer, 0.4)
    with torch.no_grad():
        layer.core.mul_(10.0)
    x = torch.randn(2, c_in, n, n, dtype=D, generator=gen(8))
    before = svdvals_sorted(linear_map_matrix(layer, c_in, n))[0]
    cap = 1.0
    assert before > 3 * cap
    assert layer.clip_(cap, n) is layer
    after = svdvals_sorted(linear_map_matrix(layer, c_in, n))
    assert after[0] <= cap * (1 + 1e-10)
    assert after[0] >= cap * (1 - 1e-10)  # the rescaling step makes the cap active
    assert is_orthonormal(layer.first, 1e-13) and is_orthonormal(layer.last, 1e-13)
    torch.testing.assert_close(layer.singular_values(n).max(), after[0], rtol=0, atol=1e-12)
    # a layer already within the cap keeps its function
    y = layer(x)
    layer.clip_(2 * cap, n)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# spectral division (the reference's "divide-by-largest" on K2)


def dense_norm(layer, c_in, n):
    return svdvals_sorted(linear_map_matrix(layer, c_in, n))[0]


@pytest.mark.parametrize("orthogonality", ["gauge", "stiefel"])
@pytest.mark.parametrize("stride,n", [(1, 6), (2, 8)])
def test_spectral_division_of_a_tt_conv_gives_max_norm(orthogonality, stride, n):
    c_in, cap = 5, 0.5
    layer = TTConv2d(
        c_in, 4, 3, 3, stride, 1, True, "circular", orthogonality=orthogonality, dtype=D, generator=gen(30)
    )  # fmt: skip
    with torch.no_grad():
        layer.core.mul_(10.0)
    raw = layer.core.detach().clone()
    # the reference divides K2 by the norm of its conv: σ here from the dense core operator, in the test
    sigma = svdvals_sorted(linear_map_matrix(core_conv(raw, stride, layer._pads), layer.ranks[0], n))[0]
    assert dense_norm(layer, c_in, n) > 3 * cap
    assert conv_spectral_normalization(layer, n, max_norm=cap) is layer
    torch.testing.assert_close(layer.core, raw * (cap / sigma), rtol=0, atol=1e-13)
    torch.testing.assert_close(dense_norm(layer, c_in, n), torch.tensor(cap, dtype=D), rtol=0, atol=1e-12)
    # gradients reach the stored core through the division
    layer(torch.randn(2, c_in, n, n, dtype=D, generator=gen(31))).square().sum().backward()
    assert layer.parametrizations.core.original.grad.abs().max() > 0
    if orthogonality == "gauge":  # drift off the gauge, come back: the cap holds again, exactly
        perturb_(layer, 0.3)
        assert abs(dense_norm(layer, c_in, n) - cap) > 1e-2
        assert layer.orthogonalize_() is layer and is_orthonormal(layer.first, 1e-13)
        torch.testing.assert_close(dense_norm(layer, c_in, n), torch.tensor(cap, dtype=D), rtol=0, atol=1e-12)
        layer.clip_(0.3, n)  # clip_ writes the stored core too
        torch.testing.assert_close(dense_norm(layer, c_in, n), torch.tensor(0.3, dtype=D), rtol=0, atol=1e-10)


def test_spectral_division_of_a_tt_conv_zero_padding_and_refusals():
    c_in, n, cap = 4, 7, 0.7
    layer = TTConv2d(c_in, 6, 3, 3, padding=1, dtype=D, generator=gen(32))
    with torch.no_grad():
        layer.core.mul_(5.0)
    conv_spectral_normalization(layer, n, max_norm=cap, iters=3000, generator=gen(33))
    norm = dense_norm(layer, c_in, n)  # zero padding: the power estimate approaches from below
    assert cap * (1 - 1e-6) <= norm <= cap * (1 + 1e-4)
    layer32 = TTConv2d(c_in, 6, 3, 2, padding=1, generator=gen(34))
    conv_spectral_normalization(layer32, method="tensor-norm", max_norm=cap)
    assert layer32(torch.randn(1, c_in, 5, 5)).dtype == torch.float32
    with pytest.raises(ValueError, match="asymmetrically"):
        conv_spectral_normalization(TTConv2d(3, 4, 4, 2, padding="same"), 6)
    with pytest.raises(TypeError, match="nn.Conv2d or a TTConv2d"):
        conv_spectral_normalization(torch.nn.Linear(2, 2), 6)


# ------------------------------------------------------------------------------------------------------------
# dense conversion


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_from_conv_full_rank_is_exact(padding_mode):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, 3, stride=2, padding=1, bias=True, padding_mode=padding_mode, dtype=D)
    layer = TTConv2d.from_conv(conv, 7)
    assert layer.ranks == (5, 7) and layer.stride == (2, 2) and layer.padding_mode == padding_mode
    assert layer.core.dtype == D and layer.bias is not None
    x = torch.randn(2, 5, 10, 10, dtype=D, generator=gen(9))
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.weight_kernel(), conv.weight, rtol=0, atol=1e-12)
    assert is_orthonormal(layer.first, 1e-13) and is_orthonormal(layer.last, 1e-13)


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # from the reference nn.Conv2d
def test_from_conv_rank_completion_and_same_padding():
    # a 1×1 conv with c_in > c_out: M1 has fewer singular vectors than r1 = c_in (completed by zeros in the core)
    torch.manual_seed(1)
    for conv in (torch.nn.Conv2d(8, 2, 1, dtype=D), torch.nn.Conv2d(2, 8, 1, dtype=D)):
        layer = TTConv2d.from_conv(conv, 8, orthogonality="stiefel")
        assert isinstance(layer.first, geoopt.ManifoldParameter)
        assert is_orthonormal(layer.first, 1e-13) and is_orthonormal(layer.last, 1e-13)
        x = torch.randn(2, conv.in_channels, 5, 5, dtype=D, generator=gen(10))
        torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-12)
    conv = torch.nn.Conv2d(3, 4, 4, padding="same", dtype=D)  # even kernel: asymmetric "same" padding
    for mode in ("zeros", "circular"):
        conv.padding_mode = mode
        layer = TTConv2d.from_conv(conv, 4)
        x = torch.randn(2, 3, 7, 7, dtype=D, generator=gen(11))
        torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-12)


def test_low_rank_to_dense_matches_forward():
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(8, 6, 3, stride=2, padding=1, dtype=D)
    layer = TTConv2d.from_conv(conv, 2)
    assert layer.ranks == (2, 2)
    dense = layer.to_dense()
    assert isinstance(dense, torch.nn.Conv2d) and dense.stride == (2, 2) and dense.padding == (1, 1)
    torch.testing.assert_close(dense.weight, layer.weight_kernel(), rtol=0, atol=1e-13)
    x = torch.randn(3, 8, 9, 9, dtype=D, generator=gen(12))
    torch.testing.assert_close(dense(x), layer(x), rtol=0, atol=1e-12)
    # the rank-2 TT-SVD is a fair approximation of the kernel (quasi-optimal: within √2 of the best at these ranks)
    W = conv.weight.detach()
    s1 = torch.linalg.svdvals(W.permute(1, 2, 3, 0).reshape(8, -1))
    s2 = torch.linalg.svdvals(W.reshape(6, -1))
    best = max(s1[2:].square().sum(), s2[2:].square().sum()).sqrt()
    err = torch.linalg.vector_norm(W - layer.weight_kernel())
    assert best <= err + 1e-12 and err <= 2**0.5 * best * (1 + 1e-12)
    # float32
    conv32 = torch.nn.Conv2d(4, 4, 3, padding=1)
    layer32 = TTConv2d.from_conv(conv32, 4)
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(layer32(x), conv32(x), rtol=1e-5, atol=1e-5)


def test_convert():
    torch.manual_seed(3)
    shared = torch.nn.Conv2d(4, 4, 3, padding=1, dtype=D)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, dtype=D),
        shared,
        torch.nn.ReLU(),
        shared,
        torch.nn.Conv2d(4, 4, 3, padding=1, groups=2, dtype=D),  # left dense by default
        torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, dtype=D)),
    )
    x = torch.randn(2, 3, 6, 6, dtype=D, generator=gen(13))
    y = model(x)
    names = []
    out = convert_to_tt_conv(model, lambda name, m: (names.append(name), 4)[1], exclude_modules=r"5\..*")
    assert sorted(out) == ["0", "1", "3"] and sorted(set(names)) == ["0", "1"]
    assert model[1] is model[3] and isinstance(model[1], TTConv2d) and out["1"] is out["3"]
    assert type(model[4]) is torch.nn.Conv2d and type(model[5][0]) is torch.nn.Conv2d
    torch.testing.assert_close(model(x), y, rtol=0, atol=1e-12)  # full rank: the function is kept
    assert len({id(m) for m in model.modules() if isinstance(m, TTConv2d)}) == 2
    # include: only the nested conv
    out = convert_to_tt_conv(model, 1, target_modules=r"5\..*", orthogonality="penalty")
    assert list(out) == ["5.0"] and out["5.0"].orthogonality == "penalty" and out["5.0"].ranks == (1, 1)
    # errors leave the model untouched: a grouped conv explicitly selected, or a bad rank for a later layer
    m2 = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3, groups=2))
    before = list(m2)
    with pytest.raises(ValueError, match="groups"):
        convert_to_tt_conv(m2, 2, target_modules=["0", "1"])
    m3 = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3))
    before3 = list(m3)
    with pytest.raises(ValueError, match="rank"):
        convert_to_tt_conv(m3, lambda name, m: 2 if name == "0" else 0)
    assert list(m2) == before and list(m3) == before3
    with pytest.raises(TypeError, match="model"):
        convert_to_tt_conv("not a model", 2)


# ------------------------------------------------------------------------------------------------------------
# training


def regression_problem(layer, seed):
    g = gen(seed)
    c_in, c_out = layer.in_channels, layer.out_channels
    x = torch.randn(8, c_in, 6, 6, dtype=D, generator=g)
    target = torch.nn.Conv2d(c_in, c_out, 3, padding=1, dtype=D)
    with torch.no_grad():
        target.weight.copy_(torch.randn(target.weight.shape, dtype=D, generator=g) * 0.3)
        y = target(x)
    return lambda: (layer(x) - y).square().mean()


def train(objective, opt, steps, after_step=None):
    for _ in range(steps):
        opt.zero_grad()
        objective().backward()
        opt.step()
        if after_step is not None:
            after_step()


def test_stiefel_training_stays_orthonormal():
    layer = TTConv2d(6, 5, 3, 3, padding=1, orthogonality="stiefel", dtype=D, generator=gen(14))
    assert all(isinstance(p, geoopt.ManifoldParameter) for p in (layer.first, layer.last))
    loss = regression_problem(layer, 15)
    opt = geoopt.optim.RiemannianAdam(layer.parameters(), lr=1e-2)
    l0 = loss().item()
    train(loss, opt, 200)
    assert loss().item() < 0.5 * l0
    assert is_orthonormal(layer.first, 1e-10) and is_orthonormal(layer.last, 1e-10)
    assert layer.orthogonality_penalty().item() < 1e-20


def test_gauge_training_with_orthogonalize():
    model = torch.nn.Sequential(TTConv2d(6, 5, 3, 3, padding=1, dtype=D, generator=gen(16)))
    layer = model[0]
    loss = regression_problem(layer, 17)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    l0 = loss().item()
    counts = []
    train(loss, opt, 100, after_step=lambda: counts.append(tt_conv_orthogonalize_(model)))
    assert counts == [1] * 100
    assert loss().item() < 0.5 * l0
    assert is_orthonormal(layer.first, 1e-13) and is_orthonormal(layer.last, 1e-13)
    assert all(p in opt.state for p in layer.parameters())


def test_penalty_training_reduces_the_penalty():
    model = torch.nn.Sequential(TTConv2d(6, 5, 3, 3, padding=1, orthogonality="penalty", dtype=D, generator=gen(18)))
    layer = model[0]
    perturb_(layer, 0.3)
    p0 = tt_conv_penalty(model).item()
    torch.testing.assert_close(tt_conv_penalty(model), layer.orthogonality_penalty())
    r = layer.rank
    e = lambda M: (M.T @ M - torch.eye(M.shape[1], dtype=D)).square().sum()  # noqa: E731
    torch.testing.assert_close(layer.orthogonality_penalty(), (e(layer.first) + e(layer.last)) / (2 * r * r))
    loss = regression_problem(layer, 19)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    l0 = loss().item()
    train(lambda: loss() + 10 * tt_conv_penalty(model), opt, 100)
    assert tt_conv_penalty(model).item() < 0.1 * p0
    assert loss().item() < l0
    assert tt_conv_penalty(torch.nn.Linear(2, 2)).item() == 0


def reference_penalty(model):
    """``practical_svd_conv`` (src/SOTT.py ``orthogonal_loss``; src/train.py adds ``orthogonal_k / shapes · loss``),
    re-implemented: the TT and SOTT children with outer cores (``K1 (c_in, r1)``, ``K3 = lastᵀ (r2, c_out)``)."""
    loss, shapes = 0, 0
    for m in model.children():
        if m.rank >= m.in_channels and m.rank >= m.out_channels:  # the reference's K1 is None: no outer cores
            continue
        K1, K3 = m.first, m.last.T
        loss = loss + F.mse_loss(K1.T @ K1, torch.eye(K1.shape[1], dtype=D), reduction="sum")
        loss = loss + F.mse_loss(K3 @ K3.T, torch.eye(K3.shape[0], dtype=D), reduction="sum")
        shapes += 2 * K3.shape[0] ** 2
    return loss / shapes


def test_penalty_reference_normalization():
    model = torch.nn.Sequential(
        TTConv2d(6, 4, 3, 5, orthogonality="penalty", dtype=D, generator=gen(40)),  # rank > c_out: r2 = 4
        TTConv2d(4, 8, 3, 3, orthogonality="penalty", dtype=D, generator=gen(41)),
        TTConv2d(3, 3, 3, 4, orthogonality="penalty", dtype=D, generator=gen(42)),  # full rank: not penalized
        SOTTConv2d(8, 5, 3, 2, orthogonality="penalty", dtype=D, generator=gen(43)),
    )
    for i, m in enumerate(model):
        g = gen(50 + i)
        with torch.no_grad():
            m.first.add_(0.3 * torch.randn(m.first.shape, dtype=D, generator=g))
            m.last.add_(0.3 * torch.randn(m.last.shape, dtype=D, generator=g))
    ours = tt_conv_penalty(model)
    torch.testing.assert_close(ours, reference_penalty(model), rtol=0, atol=1e-12)
    torch.testing.assert_close(tt_conv_penalty(model, normalization="reference"), ours, rtol=0, atol=0)
    # the gradients are the reference's too
    (g_ours,) = torch.autograd.grad(ours, model[0].last)
    (g_ref,) = torch.autograd.grad(reference_penalty(model), model[0].last)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-12)
    # "layer" (the normalization before issue 23): the sum of the per-layer penalties over every layer
    layer = tt_conv_penalty(model, normalization="layer")
    torch.testing.assert_close(layer, sum(m.orthogonality_penalty() for m in model), rtol=0, atol=1e-12)
    assert abs(layer.item() - ours.item()) > 0.1 * ours.item()
    # L equal-rank layers, none full rank: reference = layer / L
    same = torch.nn.Sequential(*(TTConv2d(6, 5, 3, 3, orthogonality="penalty", dtype=D) for _ in range(3)))
    for m in same:
        with torch.no_grad():
            m.first.mul_(1.2)
    torch.testing.assert_close(tt_conv_penalty(same), tt_conv_penalty(same, "layer") / 3, rtol=1e-14, atol=0)
    # only full-rank layers: nothing to penalize in the reference
    assert tt_conv_penalty(torch.nn.Sequential(model[2])).item() == 0
    with pytest.raises(ValueError, match="normalization"):
        tt_conv_penalty(model, normalization="mean")


# ------------------------------------------------------------------------------------------------------------
# validation and counting


def test_bad_inputs():
    with pytest.raises(ValueError, match="rank"):
        TTConv2d(4, 4, 3, 0)
    with pytest.raises(ValueError, match="rank"):
        TTConv2d(4, 4, 3, 2.0)
    with pytest.raises(ValueError, match="in_channels"):
        TTConv2d(0, 4, 3, 2)
    with pytest.raises(ValueError, match="out_channels"):
        TTConv2d(4, -1, 3, 2)
    with pytest.raises(ValueError, match="kernel_size"):
        TTConv2d(4, 4, (3, 5), 2)
    with pytest.raises(ValueError, match="stride"):
        TTConv2d(4, 4, 3, 2, stride=0)
    with pytest.raises(ValueError, match="padding"):
        TTConv2d(4, 4, 3, 2, padding="full")
    with pytest.raises(ValueError, match="padding"):
        TTConv2d(4, 4, 3, 2, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding_mode"):
        TTConv2d(4, 4, 3, 2, padding_mode="reflect")
    with pytest.raises(ValueError, match="orthogonality"):
        TTConv2d(4, 4, 3, 2, orthogonality="cayley")
    with pytest.raises(TypeError, match="dtype"):
        TTConv2d(4, 4, 3, 2, dtype=torch.float16)
    layer = TTConv2d(4, 4, 3, 2, padding=1, dtype=D)
    with pytest.raises(ValueError, match=r"input must have shape \(B, 4, H, W\)"):
        layer(torch.zeros(1, 3, 5, 5, dtype=D))
    with pytest.raises(ValueError, match="input"):
        layer(torch.zeros(4, 5, 5, dtype=D))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.zeros(1, 4, 5, 5))
    with pytest.raises(ValueError, match="n"):
        layer.singular_values(1)
    with pytest.raises(ValueError, match="max_sv"):
        layer.clip_(-1.0, 6)
    for bad, what in [
        (torch.nn.Conv2d(4, 4, 3, groups=2), "groups"),
        (torch.nn.Conv2d(4, 4, 3, dilation=2), "dilation"),
        (torch.nn.Conv2d(4, 4, (3, 1)), "kernel"),
        (torch.nn.Conv2d(4, 4, 3, padding_mode="reflect"), "padding_mode"),
    ]:
        with pytest.raises(ValueError, match=what):
            TTConv2d.from_conv(bad, 2)
    with pytest.raises(TypeError, match="conv"):
        TTConv2d.from_conv(torch.nn.Linear(2, 2), 2)


def test_parameter_count_and_init():
    c_in, c_out, k, rank = 64, 128, 3, 8
    layer = TTConv2d(c_in, c_out, k, rank, padding=1, dtype=D, generator=gen(20))
    r1, r2 = layer.ranks
    assert (r1, r2) == (8, 8)
    count = sum(p.numel() for p in layer.parameters())
    assert count == r1 * c_in + r2 * r1 * k * k + c_out * r2 + c_out
    assert count < 0.05 * (c_out * c_in * k * k)
    assert sum(p.numel() for p in TTConv2d(3, 5, 3, 10, bias=False).parameters()) == 3 * 3 + 5 * 3 * 9 + 5 * 5
    # init: orthonormal outer cores, outputs of about the input's variance; reproducible from the generator
    assert is_orthonormal(layer.first, 1e-13) and is_orthonormal(layer.last, 1e-13)
    x = torch.randn(4, c_in, 12, 12, dtype=D, generator=gen(21))
    with torch.no_grad():
        var = (layer(x) - layer.bias[:, None, None]).var().item()
    assert 0.3 < var < 3
    again = TTConv2d(c_in, c_out, k, rank, padding=1, dtype=D, generator=gen(20))
    assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), again.parameters()))
    assert "rank=8" in repr(layer)
