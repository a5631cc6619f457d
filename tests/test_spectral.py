"""Spectra of convolutions: exact values and norms against dense Jacobians built here, bounds, clipping, control."""

import math

import pytest
import torch
import torch.nn.functional as F
from reference import linear_map_matrix

from lowrankopt.spectral import (
    ConvNormRegularizer,
    IterationState,
    circular_spectral_norm,
    clip_singular_values,
    conv_singular_values,
    conv_spectral_norm,
    conv_spectral_normalization,
    fantastic_four_bound,
    gram_iteration_bound,
    polyphase_kernel,
    tensor_norm_bound,
)
from lowrankopt.spectral._kernel import unpolyphase_kernel

D = torch.float64


def jacobian(K, n, stride=1, padding="circular", pad=None, groups=1):
    """The dense Jacobian matrix of x ↦ conv(x, K) on (c_in, n, n) inputs: conv of every basis image."""
    h, w = K.shape[-2:]
    if padding == "circular":  # y[i, j] = Σ K[p, q] x[(s i + p) mod n, (s j + q) mod n]
        f = lambda X: F.conv2d(F.pad(X, (0, w - 1, 0, h - 1), mode="circular"), K, stride=stride)  # noqa: E731
    else:
        f = lambda X: F.conv2d(X, K, stride=stride, padding=pad, groups=groups)  # noqa: E731
    return linear_map_matrix(f, K.shape[1] * groups, n, K.dtype)


def top_sv(J):
    return torch.linalg.svdvals(J)[0].item()


SHAPES = [  # (c_out, c_in, h, w, n, stride)
    (3, 2, 3, 3, 6, 1),
    (2, 3, 3, 3, 6, 2),
    (4, 4, 2, 2, 5, 1),
    (3, 5, 5, 5, 8, 2),
    (2, 2, 1, 1, 4, 1),
    (3, 2, 4, 4, 8, 4),
    (2, 3, 3, 1, 6, 3),
    (1, 1, 3, 3, 4, 1),
]


@pytest.mark.parametrize("co,ci,h,w,n,s", SHAPES)
def test_circular_singular_values_equal_the_dense_jacobian(co, ci, h, w, n, s):
    g = torch.Generator().manual_seed(co * 100 + ci * 10 + h + n)
    K = torch.randn(co, ci, h, w, dtype=D, generator=g)
    sv = conv_singular_values(K, n, stride=s)
    m = n // s
    assert sv.shape == (m, m, min(co, ci * s * s))
    dense = torch.linalg.svdvals(jacobian(K, n, s))
    ours = sv.flatten().sort(descending=True).values
    assert torch.allclose(ours, dense[: ours.numel()], atol=1e-12 * dense[0], rtol=0)
    assert dense.numel() == ours.numel()  # the Jacobian has exactly m² · min(c_out, c_in s²) singular values
    assert circular_spectral_norm(K, n, s).item() == pytest.approx(dense[0].item(), rel=1e-13)
    assert conv_spectral_norm(K, n, "circular", s).item() == pytest.approx(dense[0].item(), rel=1e-13)


def test_batched_kernels_and_float32():
    g = torch.Generator().manual_seed(1)
    K = torch.randn(2, 3, 4, 3, 3, 3, dtype=D, generator=g)
    sv = conv_singular_values(K, 6, 2)
    for i in range(2):
        for j in range(3):
            assert torch.allclose(sv[i, j], conv_singular_values(K[i, j], 6, 2), atol=1e-13)
    norms = circular_spectral_norm(K, 6)
    assert norms.shape == (2, 3)
    assert torch.allclose(norms[1, 2], torch.tensor(top_sv(jacobian(K[1, 2], 6)), dtype=D), rtol=1e-13)
    for fn in (tensor_norm_bound, fantastic_four_bound):
        assert fn(K).shape == (2, 3)
    K32 = K[0, 0].float()
    assert conv_singular_values(K32, 6).dtype == torch.float32
    assert circular_spectral_norm(K32, 6).item() == pytest.approx(circular_spectral_norm(K[0, 0], 6).item(), rel=1e-5)
    assert tensor_norm_bound(K32).dtype == torch.float32


def test_blocked_symbol_equals_one_block(monkeypatch):
    import lowrankopt.spectral.circular as circular

    K = torch.randn(3, 2, 3, 3, dtype=D, generator=torch.Generator().manual_seed(2))
    whole, gram_8 = conv_singular_values(K, 8), gram_iteration_bound(K, 8).item()
    monkeypatch.setattr(circular, "_BLOCK_ELEMENTS", 1)  # one frequency row per block
    assert torch.allclose(conv_singular_values(K, 8), whole, rtol=1e-14, atol=0)
    assert gram_iteration_bound(K, 8).item() == pytest.approx(gram_8, rel=1e-14)
    assert circular_spectral_norm(K, 8).item() == pytest.approx(whole.max().item(), rel=1e-14)


def test_polyphase_kernel_is_the_same_operator():
    g = torch.Generator().manual_seed(3)
    K = torch.randn(3, 2, 5, 4, dtype=D, generator=g)
    x = torch.randn(1, 2, 12, 12, dtype=D, generator=g)
    s = 3
    Kp = polyphase_kernel(K, s)
    assert Kp.shape == (3, 2 * 9, 2, 2)
    # space-to-depth: x'[(c, a, b), i, j] = x[c, s i + a, s j + b]
    xp = x.reshape(1, 2, 4, s, 4, s).permute(0, 1, 3, 5, 2, 4).reshape(1, 18, 4, 4)
    assert torch.allclose(F.conv2d(x, K, stride=s), F.conv2d(xp, Kp)[..., :3, :3], atol=1e-13)


@pytest.mark.parametrize("co,ci,h,w,n,s,pad", [(3, 2, 3, 3, 6, 1, 1), (2, 3, 3, 3, 7, 2, 1), (4, 2, 2, 2, 5, 1, 0)])
def test_zero_padding_power_iteration_matches_the_dense_jacobian(co, ci, h, w, n, s, pad):
    g = torch.Generator().manual_seed(co + 7 * n)
    K = torch.randn(co, ci, h, w, dtype=D, generator=g)
    dense = top_sv(jacobian(K, n, s, "zeros", pad))
    state = IterationState()
    est = conv_spectral_norm(K, n, "zeros", s, pad=pad, iters=20000, tol=1e-15, state=state, generator=g)
    assert est.item() == pytest.approx(dense, rel=1e-9)
    assert est.item() <= dense * (1 + 1e-12)  # a Rayleigh-quotient estimate approaches from below
    assert state.converged and 0 < state.iterations < 20000
    warm = conv_spectral_norm(K, n, "zeros", s, pad=pad, iters=0, state=state)
    assert warm.item() == pytest.approx(est.item(), rel=1e-12)


def _random_kernel(k: int):
    g = torch.Generator().manual_seed(1000 + k)
    co, ci = (int(torch.randint(1, 7, (1,), generator=g)) for _ in range(2))
    h, w = (int(torch.tensor([1, 2, 3, 3, 5])[torch.randint(0, 5, (1,), generator=g)]) for _ in range(2))
    s = int(torch.randint(1, 3, (1,), generator=g))
    scale = [1.0, 1e-3, 50.0][k % 3]
    return scale * torch.randn(co, ci, h, w, dtype=D, generator=g), s, g


def test_every_bound_holds_on_200_random_kernels():
    worst = {"tensor-norm": math.inf, "fantastic-four": math.inf, "gram": math.inf}
    for k in range(200):
        K, s, g = _random_kernel(k)
        h, w = K.shape[-2:]
        m = max(-(-h // s), -(-w // s))
        n_small, n_large = s * m, s * (m + 5)  # two input sizes: the bounds do not depend on n
        exact = max(circular_spectral_norm(K, n, s).item() for n in (n_small, n_large))
        zero = top_sv(jacobian(K, n_small + 1 if s == 1 else n_small, s, "zeros", (h // 2, w // 2)))
        tn = tensor_norm_bound(K, s, generator=g, iters=2000, tol=1e-14).item()
        f4 = fantastic_four_bound(K, s).item()
        gram = gram_iteration_bound(K, n_large, s).item()
        assert tn >= max(exact, zero) * (1 - 1e-12), (k, tuple(K.shape), s, tn, exact, zero)
        assert f4 >= max(exact, zero) * (1 - 1e-12)
        assert gram >= circular_spectral_norm(K, n_large, s).item() * (1 - 1e-12)
        assert tn <= f4 * (1 + 1e-12)  # ‖K‖_σ ≤ every unfolding's norm
        worst["tensor-norm"] = min(worst["tensor-norm"], tn / exact)
        worst["fantastic-four"] = min(worst["fantastic-four"], f4 / exact)
        worst["gram"] = min(worst["gram"], gram / circular_spectral_norm(K, n_large, s).item())
    assert all(v >= 1 - 1e-12 for v in worst.values())


def test_tensor_norm_bound_is_exact_for_a_separable_kernel():
    # K = a ⊗ b ⊗ e(ω₁) ⊗ e(ω₂)-like real rank-one kernel: ‖K‖_σ = ‖a‖‖b‖‖c‖‖d‖ and the circular norm at large n
    # approaches √(hw)‖K‖_σ only when c, d are "flat"; with c = d = ones the bound equals the exact norm.
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(4, dtype=D, generator=g), torch.randn(3, dtype=D, generator=g)
    K = torch.einsum("o,c,p,q->ocpq", a, b, torch.ones(3, dtype=D), torch.ones(3, dtype=D))
    exact = circular_spectral_norm(K, 9).item()
    assert exact == pytest.approx(9 * a.norm().item() * b.norm().item(), rel=1e-12)
    assert tensor_norm_bound(K).item() == pytest.approx(exact, rel=1e-10)


def test_gram_iteration_converges_to_the_exact_norm():
    K = torch.randn(8, 6, 3, 3, dtype=D, generator=torch.Generator().manual_seed(5))
    exact = circular_spectral_norm(K, 8).item()
    frob = gram_iteration_bound(K, 8, iters=0).item()
    b2, b8 = gram_iteration_bound(K, 8, iters=2).item(), gram_iteration_bound(K, 8, iters=8).item()
    assert frob >= b2 >= b8 >= exact * (1 - 1e-12)
    assert b8 == pytest.approx(exact, rel=1e-3)
    big = gram_iteration_bound(1e150 * K, 8, iters=8).item()  # rescaling: no overflow
    assert big == pytest.approx(1e150 * b8, rel=1e-10)


def test_warm_started_tensor_norm_tracks_the_cold_value():
    g = torch.Generator().manual_seed(6)
    K = torch.randn(16, 16, 3, 3, dtype=D, generator=g)
    state = IterationState()
    cold = tensor_norm_bound(K, state=state, generator=g, iters=500, tol=1e-13).item()
    assert state.converged and len(state.vectors) == 4 and state.vectors[0].shape == (1, 1, 16)
    K2 = K + 1e-3 * torch.randn(K.shape, dtype=D, generator=g)
    warm = tensor_norm_bound(K2, state=state, iters=5).item()
    fresh = tensor_norm_bound(K2, generator=torch.Generator().manual_seed(0), iters=500, tol=1e-13).item()
    assert warm == pytest.approx(fresh, rel=1e-6)
    assert abs(warm - cold) < 0.01 * cold
    with pytest.raises(ValueError, match="state"):
        tensor_norm_bound(torch.randn(4, 4, 3, 3, dtype=D), state=state)


def _fd_check(fn, K, eps=1e-6, rel=1e-5):
    K = K.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(K), K)
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        E = torch.randn(K.shape, dtype=D, generator=g)
        fd = (fn(K.detach() + eps * E) - fn(K.detach() - eps * E)).item() / (2 * eps)
        assert (grad * E).sum().item() == pytest.approx(fd, rel=rel, abs=1e-9)


def test_gradients_match_finite_differences():
    K = torch.randn(3, 4, 3, 3, dtype=D, generator=torch.Generator().manual_seed(8))
    _fd_check(lambda k: tensor_norm_bound(k, iters=5000, tol=1e-15, generator=torch.Generator().manual_seed(1)), K)
    _fd_check(lambda k: tensor_norm_bound(k, 2, iters=5000, tol=1e-15, generator=torch.Generator().manual_seed(1)), K)
    _fd_check(lambda k: fantastic_four_bound(k), K)
    _fd_check(lambda k: gram_iteration_bound(k, 8, 1, iters=4), K)
    _fd_check(lambda k: circular_spectral_norm(k, 8, 2), K)
    _fd_check(
        lambda k: conv_spectral_norm(k, 6, "zeros", iters=20000, tol=1e-15, generator=torch.Generator().manual_seed(1)),
        K,
        rel=1e-4,
    )


def test_clipping_a_full_support_kernel_clips_the_spectrum_exactly():
    g = torch.Generator().manual_seed(9)
    K = torch.randn(3, 3, 4, 4, dtype=D, generator=g)  # h = w = n: the support projection is the identity
    sv = torch.linalg.svdvals(jacobian(K, 4))
    cap = sv[len(sv) // 3].item()
    clipped = clip_singular_values(K, 4, cap, rescale=False)
    after = torch.linalg.svdvals(jacobian(clipped, 4))
    assert torch.allclose(after, sv.clamp(max=cap).sort(descending=True).values, atol=1e-12 * sv[0])


@pytest.mark.parametrize("s", [1, 2])
def test_clipping_enforces_the_cap_on_the_dense_jacobian(s):
    g = torch.Generator().manual_seed(10 + s)
    K = torch.randn(4, 3, 3, 3, dtype=D, generator=g)
    n = 8
    before = torch.linalg.svdvals(jacobian(K, n, s))
    cap = 0.5 * before[0].item()
    clipped = clip_singular_values(K, n, cap, stride=s)
    assert clipped.shape == K.shape
    after = torch.linalg.svdvals(jacobian(clipped, n, s))
    assert after[0].item() == pytest.approx(cap, rel=1e-12)  # the cap holds and is active
    assert after.sum() > 0.5 * before.clamp(max=cap).sum()  # small singular values are not wiped out
    loose = clip_singular_values(K, n, 2 * before[0].item(), stride=s)
    assert torch.allclose(loose, K, atol=1e-12)  # within the cap: unchanged


def test_regularizer_sums_the_bounds_of_every_conv():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
    ).double()
    g = model[2].weight.reshape(2, 3, 2, 3, 3)
    # a grouped conv is block-diagonal: its norm is the largest group's
    dense = top_sv(jacobian(model[2].weight, 8, 2, "zeros", 1, groups=2))
    per_group = max(top_sv(jacobian(g[i], 8, 2, "zeros", 1)) for i in range(2))
    assert dense == pytest.approx(per_group, rel=1e-12)
    reg = ConvNormRegularizer(model, generator=torch.Generator().manual_seed(0))
    values = reg.bounds()
    assert set(values) == {"0", "2"}
    assert values["2"].item() >= dense
    assert values["0"].item() == pytest.approx(tensor_norm_bound(model[0].weight).item(), rel=1e-6)
    reg().backward()
    assert model[0].weight.grad is not None and model[2].weight.grad is not None
    hinge = ConvNormRegularizer(model, "fantastic-four", target=1e6)
    assert hinge().item() == 0
    power = ConvNormRegularizer(model, "power", n=8, cold_iters=5000)
    assert power.bounds()["2"].item() == pytest.approx(dense, rel=1e-6)
    with pytest.raises(ValueError, match="input size n"):
        ConvNormRegularizer(model, "gram")
    with pytest.raises(ValueError, match="method"):
        ConvNormRegularizer(model, "sn")


@pytest.mark.parametrize("mode", ["zeros", "circular"])
def test_conv_spectral_normalization_caps_the_operator_norm(mode):
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode).double()
    with torch.no_grad():
        conv.weight.mul_(10)
    conv_spectral_normalization(conv, 6, max_norm=0.7, iters=3000, generator=torch.Generator().manual_seed(0))
    conv.train()
    W = conv.weight.detach()  # a training-mode read: 3000 more power iterations
    norm = top_sv(jacobian(W, 6, 1, "zeros", 1)) if mode == "zeros" else top_sv(jacobian(W, 6))
    assert norm == pytest.approx(0.7, rel=1e-12 if mode == "circular" else 1e-7)
    assert conv.parametrizations.weight.original.abs().max() > W.abs().max()  # the raw weight is untouched
    conv.double()  # no module cycle: .to/.double recurse fine
    conv.eval()
    assert torch.allclose(conv.weight, W, rtol=1e-6)


def test_tensor_norm_normalization_caps_every_padding_and_size():
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight.mul_(10)
    conv_spectral_normalization(conv, method="tensor-norm", max_norm=0.5, generator=torch.Generator().manual_seed(0))
    conv.double()  # the stored complex vectors restart in float64 on the next forward
    conv.train()
    W = conv.weight.detach()
    assert W.dtype == D
    assert tensor_norm_bound(W, 2, generator=torch.Generator().manual_seed(1)).item() == pytest.approx(0.5, rel=1e-6)
    for n in (6, 8, 12):  # the bound covers every input size and padding
        assert top_sv(jacobian(W, n, 2, "zeros", 1)) <= 0.5 * (1 + 1e-9)
        assert top_sv(jacobian(W, n, 2)) <= 0.5 * (1 + 1e-9)
    conv.eval()
    assert torch.allclose(conv.weight, W, rtol=1e-12)  # eval: no update of the vectors
    with pytest.raises(ValueError, match="method"):
        conv_spectral_normalization(torch.nn.Conv2d(2, 2, 3), 6, method="sn")
    with pytest.raises(ValueError, match="n must be"):
        conv_spectral_normalization(torch.nn.Conv2d(2, 2, 3))


def test_bad_input():
    K = torch.randn(2, 2, 3, 3, dtype=D)
    with pytest.raises(ValueError, match="K must have shape"):
        conv_singular_values(torch.randn(2, 3, 3, dtype=D), 4)
    with pytest.raises(TypeError, match="K must be float32 or float64"):
        conv_singular_values(K.int(), 4)
    with pytest.raises(ValueError, match="K contains NaN"):
        tensor_norm_bound(K.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="n = 2 is too small"):
        conv_singular_values(K, 2)
    with pytest.raises(ValueError, match="divisible by stride"):
        circular_spectral_norm(K, 7, 2)
    with pytest.raises(ValueError, match="stride"):
        fantastic_four_bound(K, (1, 2))
    with pytest.raises(ValueError, match="padding"):
        conv_spectral_norm(K, 6, "reflect")
    with pytest.raises(ValueError, match="state and pad"):
        conv_spectral_norm(K, 6, "circular", state=IterationState())
    with pytest.raises(ValueError, match="max_sv"):
        clip_singular_values(K, 6, 0.0)
    with pytest.raises(ValueError, match="restarts"):
        tensor_norm_bound(K, restarts=0)
    with pytest.raises(ValueError, match="iters"):
        conv_spectral_norm(K, 6, "zeros", iters=0)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        conv_spectral_norm(K, 1, "zeros", pad=0)


def test_unpolyphase_inverts_polyphase():
    K = torch.randn(2, 3, 3, 5, 4, dtype=D, generator=torch.Generator().manual_seed(11))
    for s in (1, 2, 3, 6):
        assert torch.equal(unpolyphase_kernel(polyphase_kernel(K, s), s, (5, 4)), K)


def test_zero_symbol_frequencies_give_finite_bounds_and_gradients():
    diff = torch.tensor([[[[1.0, -1.0]]]], dtype=D, requires_grad=True)  # K̂(0) = 0
    exact = top_sv(jacobian(diff.detach(), 4))
    for value in (gram_iteration_bound(diff, 4), tensor_norm_bound(diff), fantastic_four_bound(diff)):
        assert value.item() >= exact * (1 - 1e-12)
        (grad,) = torch.autograd.grad(value, diff)
        assert torch.isfinite(grad).all()
    assert gram_iteration_bound(diff, 4).item() == pytest.approx(2.0, rel=1e-12)  # exact here: one singular value
    zero = torch.zeros(2, 2, 3, 3, dtype=D)
    assert gram_iteration_bound(zero, 4).item() == 0 and circular_spectral_norm(zero, 4).item() == 0


def test_float32_routines_agree_with_float64():
    g = torch.Generator().manual_seed(12)
    K = torch.randn(4, 3, 3, 3, dtype=D, generator=g)
    K32 = K.float()
    v = torch.randn(1, 3, 6, 6, dtype=D, generator=g)
    pairs = [
        (lambda k: gram_iteration_bound(k, 6, 2), 1e-5),
        (lambda k: clip_singular_values(k, 6, 2.0), 1e-5),
        (lambda k: conv_spectral_norm(k, 6, "zeros", iters=50, tol=0, state=IterationState([v.to(k.dtype)])), 1e-5),
        (lambda k: fantastic_four_bound(k, 2), 1e-5),
    ]
    for fn, rtol in pairs:
        lo, hi = fn(K32), fn(K)
        assert lo.dtype == torch.float32
        assert torch.allclose(lo.double(), hi, rtol=rtol, atol=rtol * hi.abs().max().item())


def test_regularizer_uses_each_convs_own_padding():
    torch.manual_seed(2)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding="valid"),
        torch.nn.Conv2d(3, 3, 3, padding="same"),
        torch.nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular"),
    ).double()
    norms = ConvNormRegularizer(model, "power", n=6, cold_iters=20000).bounds()
    assert norms["0"].item() == pytest.approx(top_sv(jacobian(model[0].weight, 6, 1, "zeros", 0)), rel=1e-6)
    assert norms["1"].item() == pytest.approx(top_sv(jacobian(model[1].weight, 6, 1, "zeros", 1)), rel=1e-6)
    assert norms["2"].item() == pytest.approx(top_sv(jacobian(model[2].weight.detach(), 6)), rel=1e-12)
    for bad in (
        torch.nn.Conv2d(2, 2, 3, dilation=2),
        torch.nn.Conv2d(2, 2, 4, padding="same"),
        torch.nn.Conv2d(2, 2, 3, padding_mode="reflect"),
        torch.nn.Conv2d(2, 2, 3, stride=(1, 2)),
    ):
        with pytest.raises(ValueError, match="conv '0'"):
            ConvNormRegularizer(torch.nn.Sequential(bad))


def test_regularizer_states_follow_the_model_to_another_dtype():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1))
    reg = ConvNormRegularizer(model, generator=torch.Generator().manual_seed(0))
    first = reg().item()
    model.double()
    again = reg()
    assert again.dtype == D and again.item() == pytest.approx(first, rel=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    K = torch.randn(4, 3, 3, 3, dtype=D, generator=torch.Generator().manual_seed(13))
    Kc = K.cuda()
    for fn in (
        lambda k: conv_singular_values(k, 6, 2),
        lambda k: gram_iteration_bound(k, 6),
        lambda k: fantastic_four_bound(k),
        lambda k: tensor_norm_bound(k, generator=torch.Generator().manual_seed(0), iters=500, tol=1e-13),
        lambda k: clip_singular_values(k, 6, 1.0),
        lambda k: conv_spectral_norm(k, 6, "zeros", iters=3000, tol=1e-14, generator=torch.Generator().manual_seed(0)),
    ):
        assert torch.allclose(fn(Kc).cpu(), fn(K), rtol=1e-8, atol=1e-10)
    reg = ConvNormRegularizer(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).cuda())
    reg().backward()


def test_refresh_keeps_the_better_of_warm_and_fresh_starts():
    g = torch.Generator().manual_seed(14)
    K = torch.randn(12, 10, 3, 3, dtype=D, generator=g)
    best = tensor_norm_bound(K, restarts=10, iters=2000, tol=1e-14, generator=torch.Generator().manual_seed(0))
    # a warm state stuck at a poor point: random vectors evaluated without sweeps
    state = IterationState()
    tensor_norm_bound(K, restarts=1, iters=1, state=state, generator=torch.Generator().manual_seed(1))
    state.vectors = [torch.randn_like(u) for u in state.vectors]
    stuck = tensor_norm_bound(K, iters=0, state=state).item()
    refreshed = tensor_norm_bound(
        K, iters=2000, tol=1e-14, restarts=10, state=state, refresh=True, generator=torch.Generator().manual_seed(0)
    ).item()
    assert stuck < 0.9 * best.item()
    assert refreshed >= best.item() * (1 - 1e-9)  # the fresh starts are the ones that found best
    assert state.vectors[0].shape == (1, 1, 12)  # the best start is kept, alone
