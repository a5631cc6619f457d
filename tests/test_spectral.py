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
    symbol_norm_bound,
    tensor_norm_bound,
    tensor_norm_estimate,
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
    for fn in (tensor_norm_bound, fantastic_four_bound, tensor_norm_estimate, symbol_norm_bound):
        assert fn(K).shape == (2, 3)
    assert torch.allclose(symbol_norm_bound(K)[1, 2], symbol_norm_bound(K[1, 2]), rtol=1e-15)
    K32 = K[0, 0].float()
    assert conv_singular_values(K32, 6).dtype == torch.float32
    assert circular_spectral_norm(K32, 6).item() == pytest.approx(circular_spectral_norm(K[0, 0], 6).item(), rel=1e-5)
    assert tensor_norm_bound(K32).dtype == tensor_norm_estimate(K32).dtype == torch.float32


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


def test_tensor_norm_bound_is_exact_for_a_separable_kernel():
    # K = a ⊗ b ⊗ e(ω₁) ⊗ e(ω₂)-like real rank-one kernel: ‖K‖_σ = ‖a‖‖b‖‖c‖‖d‖ and the circular norm at large n
    # approaches √(hw)‖K‖_σ only when c, d are "flat"; with c = d = ones the bound equals the exact norm.
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(4, dtype=D, generator=g), torch.randn(3, dtype=D, generator=g)
    K = torch.einsum("o,c,p,q->ocpq", a, b, torch.ones(3, dtype=D), torch.ones(3, dtype=D))
    exact = circular_spectral_norm(K, 9).item()
    assert exact == pytest.approx(9 * a.norm().item() * b.norm().item(), rel=1e-12)
    assert tensor_norm_bound(K).item() == pytest.approx(exact, rel=1e-10)  # the (o p | c q) unfolding is rank one
    assert tensor_norm_estimate(K).item() == pytest.approx(exact, rel=1e-10)


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
    cold = tensor_norm_estimate(K, state=state, generator=g, iters=500, tol=1e-13).item()
    assert state.converged and len(state.vectors) == 4 and state.vectors[0].shape == (1, 1, 16)
    K2 = K + 1e-3 * torch.randn(K.shape, dtype=D, generator=g)
    warm = tensor_norm_estimate(K2, state=state, iters=5).item()
    fresh = tensor_norm_estimate(K2, generator=torch.Generator().manual_seed(0), iters=500, tol=1e-13).item()
    assert warm == pytest.approx(fresh, rel=1e-6)
    assert abs(warm - cold) < 0.01 * cold
    with pytest.raises(ValueError, match="state"):
        tensor_norm_estimate(torch.randn(4, 4, 3, 3, dtype=D), state=state)


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
    hopm = dict(iters=5000, tol=1e-15)
    _fd_check(lambda k: tensor_norm_estimate(k, **hopm, generator=torch.Generator().manual_seed(1)), K)
    _fd_check(lambda k: tensor_norm_estimate(k, 2, **hopm, generator=torch.Generator().manual_seed(1)), K)
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
    assert values["0"].item() == pytest.approx(tensor_norm_estimate(model[0].weight).item(), rel=1e-6)
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
    assert tensor_norm_estimate(W, 2, generator=torch.Generator().manual_seed(1)).item() == pytest.approx(0.5, rel=1e-6)
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
        tensor_norm_estimate(K, restarts=0)
    with pytest.raises(ValueError, match="rtol"):
        symbol_norm_bound(K, rtol=0.0)
    with pytest.raises(ValueError, match="max_evals"):
        symbol_norm_bound(K, max_evals=0)
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
        lambda k: tensor_norm_estimate(k, generator=torch.Generator().manual_seed(0), iters=500, tol=1e-13),
        lambda k: tensor_norm_bound(k),
        lambda k: symbol_norm_bound(k, 2),
        lambda k: clip_singular_values(k, 6, 1.0),
        lambda k: conv_spectral_norm(k, 6, "zeros", iters=3000, tol=1e-14, generator=torch.Generator().manual_seed(0)),
    ):
        assert torch.allclose(fn(Kc).cpu(), fn(K), rtol=1e-8, atol=1e-10)
    reg = ConvNormRegularizer(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).cuda())
    reg().backward()


def test_refresh_keeps_the_better_of_warm_and_fresh_starts():
    g = torch.Generator().manual_seed(14)
    K = torch.randn(12, 10, 3, 3, dtype=D, generator=g)
    best = tensor_norm_estimate(K, restarts=10, iters=2000, tol=1e-14, generator=torch.Generator().manual_seed(0))
    # a warm state stuck at a poor point: random vectors evaluated without sweeps
    state = IterationState()
    tensor_norm_estimate(K, restarts=1, iters=1, state=state, generator=torch.Generator().manual_seed(1))
    state.vectors = [torch.randn_like(u) for u in state.vectors]
    stuck = tensor_norm_estimate(K, iters=0, state=state).item()
    refreshed = tensor_norm_estimate(
        K, iters=2000, tol=1e-14, restarts=10, state=state, refresh=True, generator=torch.Generator().manual_seed(0)
    ).item()
    assert stuck < 0.9 * best.item()
    assert refreshed >= best.item() * (1 - 1e-9)  # the fresh starts are the ones that found best
    assert state.vectors[0].shape == (1, 1, 12)  # the best start is kept, alone


# ------------------------------------------------------------------------------- certified bounds (issue 18, 4.)


def _two_mode_kernel(c: int = 8, beta: float = 0.7) -> torch.Tensor:
    """A 3×3 kernel whose tensor norm has a local maximum that HOPM's default starts fall into.

    Channel 0 carries a rank-one term with flat taps, whose symbol has norm 3 at ω = 0; channels 1…c−1 carry
    β·Q (Q orthogonal) with alternating taps, symbol norm 3β at ω = π and the larger ‖K̂(ω)‖_F (3β√(c−1)),
    which the spectral start follows. The two blocks act on orthogonal channels, so the conv's norm is
    max(3, 3β) = 3 in closed form, while HOPM from the second block stops at 3β.
    """
    e0 = torch.zeros(c, dtype=D)
    e0[0] = 1
    flat = torch.ones(3, dtype=D) / math.sqrt(3)
    alternating = torch.tensor([1.0, -1.0, 1.0], dtype=D) / math.sqrt(3)
    Q = torch.zeros(c, c, dtype=D)
    Q[1:, 1:] = torch.linalg.qr(torch.randn(c - 1, c - 1, dtype=D, generator=torch.Generator().manual_seed(0)))[0]
    return torch.einsum("o,c,p,q->ocpq", e0, e0, flat, flat) + beta * torch.einsum(
        "oc,p,q->ocpq", Q, alternating, alternating
    )


def test_hopm_estimate_can_fall_below_the_norm_and_the_bound_cannot():
    K = _two_mode_kernel()
    exact = top_sv(jacobian(K, 4))  # circular, n = 4: the grid holds ω = 0 and π, where the symbol peaks
    assert exact == pytest.approx(3.0, rel=1e-12)
    estimate = tensor_norm_estimate(K, generator=torch.Generator().manual_seed(0)).item()
    assert estimate < 2.9  # the default starts stop at a local maximum (3β = 2.1 with these starts), not at 3
    assert tensor_norm_bound(K).item() >= exact
    upper = symbol_norm_bound(K).item()
    assert exact <= upper <= exact * (1 + 1e-3)


def _adversarial_kernels():
    """(label, kernel, stride): the shapes and structures that break a bound or its numerics."""
    g = torch.Generator().manual_seed(77)

    def randn(*shape):
        return torch.randn(*shape, dtype=D, generator=g)

    out = [("two-mode", _two_mode_kernel(), 1), ("two-mode, β = 0.95", _two_mode_kernel(5, 0.95), 1)]
    for s in (1, 2, 3):
        a, b, p, q = randn(4), randn(3), randn(3), randn(3)
        out.append(("rank one", torch.einsum("o,c,p,q->ocpq", a, b, p, q), s))
        ones = torch.ones(3, dtype=D)
        out.append(("rank one, flat taps", torch.einsum("o,c,p,q->ocpq", a, b, ones, ones), s))
        for tap in ((0, 0), (1, 1), (2, 0)):
            delta = torch.zeros(3, 2, 3, 3, dtype=D)
            delta[:, :, tap[0], tap[1]] = randn(3, 2)
            out.append((f"delta at {tap}", delta, s))
        for co, ci in ((1, 1), (1, 6), (6, 1), (5, 2)):
            out.append((f"1×1, {co}×{ci} channels", randn(co, ci, 1, 1), s))
        for h, w in ((1, 3), (3, 1), (2, 2), (4, 4), (5, 5), (1, 5), (2, 5)):
            out.append((f"{h}×{w}", randn(3, 2, h, w), s))
    for w in (3, 5):  # one channel whose symbol peaks between the points of the first frequency grid
        omega0 = math.pi / (8 * (w - 1))
        out.append((f"peak off the grid, 1×{w}", torch.cos(omega0 * torch.arange(w, dtype=D)).reshape(1, 1, 1, w), 1))
    P = torch.linalg.qr(randn(4, 2))[0]
    P = P @ P.T  # K̂(ω) = P + (I − P) e^{−iω₂} is unitary at every ω: a flat symbol norm, 1
    out.append(("orthogonal", torch.stack([P, torch.eye(4, dtype=D) - P], -1)[:, :, None, :], 1))
    out.append(("zero", torch.zeros(2, 3, 3, 3, dtype=D), 1))
    return out


def _exact_norms(K, s):
    """The conv's exact norms at small sizes: circular (n divisible by s) and zero padding of several amounts,
    from dense Jacobians built here."""
    h, w = K.shape[-2:]
    m = max(-(-h // s), -(-w // s))
    norms = [top_sv(jacobian(K, s * m, s)), top_sv(jacobian(K, s * (m + 2), s))]
    n = max(h, w) + 2
    for pad in ((h // 2, w // 2), (0, 0), (h - 1, w - 1), (h, 0)):
        norms.append(top_sv(jacobian(K, n, s, "zeros", pad)))
    return norms


def test_certified_bounds_hold_on_200_random_and_adversarial_kernels():
    kernels = [(label, K, s) for label, K, s in _adversarial_kernels()]
    for k in range(200 - len(kernels) + 20):
        K, s, _ = _random_kernel(k)
        kernels.append((f"random {k}", K, s))
    assert len(kernels) >= 220
    for label, K, s in kernels:
        exact = max(_exact_norms(K, s))
        certified = tensor_norm_bound(K, s).item()
        lower, upper = (v.item() for v in symbol_norm_bound(K, s, return_lower=True))
        estimate = tensor_norm_estimate(K, s, generator=torch.Generator().manual_seed(0)).item()
        assert certified >= exact, (label, tuple(K.shape), s, certified, exact)
        assert upper >= exact, (label, tuple(K.shape), s, upper, exact)
        assert certified >= estimate  # the estimate is a value of the tensor-norm maximization: never above
        assert certified <= fantastic_four_bound(K, s).item()  # three more unfoldings
        assert lower <= upper <= lower * (1 + 1e-3) * (1 + 1e-12), (label, lower, upper)  # rtol met
        n = s * (max(-(-K.shape[-2] // s), -(-K.shape[-1] // s)) + 5)
        assert gram_iteration_bound(K, n, s).item() >= circular_spectral_norm(K, n, s).item() * (1 - 1e-12)


def test_tensor_norm_bound_refuses_hopm_options_and_points_to_the_estimate():
    K = torch.randn(2, 2, 3, 3, dtype=D)
    with pytest.raises(TypeError, match="tensor_norm_estimate"):
        tensor_norm_bound(K, iters=5)
    with pytest.raises(TypeError, match="state"):
        tensor_norm_bound(K, state=IterationState())


def test_circular_padding_beyond_same_or_an_indivisible_size_breaks_every_bound_and_is_refused():
    # duplicated output rows (padding 2 on a 3×3 kernel) or a stride that does not divide n: the conv is not a
    # circular convolution, and its norm exceeds sup_ω ‖K̂(ω)‖₂ — so the regularizer must not accept it
    ones = torch.ones(1, 1, 3, 3, dtype=D)
    for stride, pad, n in ((1, 2, 6), (2, 1, 5)):
        conv = torch.nn.Conv2d(1, 1, 3, stride=stride, padding=pad, padding_mode="circular", bias=False).double()
        conv.weight.data.copy_(ones)
        dense = top_sv(linear_map_matrix(conv, 1, n))
        assert dense > 1.1 * symbol_norm_bound(ones, stride).item()
    with pytest.raises(ValueError, match="conv '0'.*circular"):
        ConvNormRegularizer(torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, padding=2, padding_mode="circular")))


def test_symbol_norm_bound_is_tight_against_a_fine_frequency_grid():
    g = torch.Generator().manual_seed(78)
    for h, w, s in ((3, 3, 1), (5, 5, 1), (1, 4, 1), (4, 4, 2)):
        K = torch.randn(1, 1, h, w, dtype=D, generator=g)
        # one channel (stride 1): sup |K̂| on a 2048² grid, within 1e-5 of the true sup by the same certificate
        fine = circular_spectral_norm(K, 2048 * s, s).item()
        upper = symbol_norm_bound(K, s).item()
        assert fine <= upper <= fine * (1 + 1e-3) / (1 - (math.pi * (h + w) / 2048) ** 2 / 2)


def test_certified_values_round_up_in_float32_and_have_gradients():
    g = torch.Generator().manual_seed(79)
    for _ in range(20):
        K = torch.randn(4, 3, 3, 3, dtype=D, generator=g)
        K32 = K.float()
        for fn in (tensor_norm_bound, symbol_norm_bound, fantastic_four_bound):
            lo = fn(K32)
            assert lo.dtype == torch.float32
            assert lo.double().item() >= fn(K32.double()).item()  # rounded up, never to nearest below
    K = torch.randn(3, 4, 3, 3, dtype=D, generator=g)
    _fd_check(tensor_norm_bound, K)
    _fd_check(lambda k: symbol_norm_bound(k, 2), K)


def test_zero_padding_power_iteration_is_a_lower_estimate_and_a_larger_circular_grid_an_upper_bound():
    g = torch.Generator().manual_seed(27)
    K = torch.randn(16, 16, 1, 3, dtype=D, generator=g)
    n, pad = 10, (0, 1)
    exact = top_sv(jacobian(K, n, 1, "zeros", pad))
    estimate = conv_spectral_norm(K, n, "zeros", generator=g).item()  # the defaults: iters=100, tol=1e-6
    assert estimate <= exact * (1 + 1e-12)  # a lower estimate (0.14 % short here): never above the norm
    strided = top_sv(jacobian(K, n, 2, "zeros", pad))
    for s, L, zeros in ((1, 12, exact), (1, 13, exact), (2, 12, strided)):  # any L ≥ n + 2·pad divisible by s
        assert circular_spectral_norm(K, L, s).item() >= zeros * (1 - 1e-12)
    assert symbol_norm_bound(K).item() >= exact


def _unfolding_norms(K, unfoldings):
    """‖M‖₂ of the matricizations (row modes, column modes) of one kernel, by dense SVDs here."""
    out = []
    for rows, cols in unfoldings:
        M = K.permute(*rows, *cols).reshape(math.prod(K.shape[i] for i in rows), -1)
        out.append(torch.linalg.svdvals(M)[0].item())
    return out


ALL_SEVEN = [((0,), (1, 2, 3)), ((1,), (0, 2, 3)), ((2,), (0, 1, 3)), ((3,), (0, 1, 2))]
ALL_SEVEN += [((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0, 3), (1, 2))]
FOUR = [((0, 2), (1, 3)), ((0, 3), (1, 2)), ((0,), (1, 2, 3)), ((1,), (0, 2, 3))]


def test_unfolding_bounds_are_certified_after_the_svd_whatever_it_returns(monkeypatch):
    # the bound may not rest on how accurate LAPACK is: an SVD whose singular values come back 1e-6 too low (far
    # beyond any backward-error constant), or not at all, is caught by the residual of the computed SVD
    g = torch.Generator().manual_seed(80)
    K = torch.randn(5, 4, 3, 3, dtype=D, generator=g)
    seven, four = 3 * min(_unfolding_norms(K, ALL_SEVEN)), 3 * min(_unfolding_norms(K, FOUR))
    exact = max(_exact_norms(K, 1))
    assert seven <= tensor_norm_bound(K).item() <= seven * (1 + 1e-12)  # the certificate costs no tightness
    assert four <= fantastic_four_bound(K).item() <= four * (1 + 1e-12)
    assert seven <= tensor_norm_bound(K.float()).item() <= seven * (1 + 1e-6)
    svd, svdvals, matrix_norm = torch.linalg.svd, torch.linalg.svdvals, torch.linalg.matrix_norm
    for wrong in (1 - 1e-6, float("nan")):

        def off_svd(A, *args, w=wrong, **kwargs):
            U, S, Vh = svd(A, *args, **kwargs)
            return U, w * S, Vh

        monkeypatch.setattr(torch.linalg, "svd", off_svd)
        monkeypatch.setattr(torch.linalg, "svdvals", lambda A, *a, w=wrong, **k: w * svdvals(A, *a, **k))
        monkeypatch.setattr(torch.linalg, "matrix_norm", lambda A, *a, w=wrong, **k: w * matrix_norm(A, *a, **k))
        for K_ in (K, K.float()):
            bound, ff = tensor_norm_bound(K_).item(), fantastic_four_bound(K_).item()
            assert seven <= bound < math.inf and four <= ff < math.inf, (wrong, K_.dtype, bound, ff)
            assert bound >= exact
        if math.isfinite(wrong):  # an SVD a little off: the bound moves by about as much, not to a loose fallback
            assert tensor_norm_bound(K).item() <= seven * (1 + 1e-5)


def test_zero_taps_on_the_border_do_not_loosen_the_tensor_norm_bound():
    # a zero-padded kernel is a shifted copy of the unpadded one (same conv norm up to a shift), so the bound
    # uses the √(hw) of the taps that are there
    g = torch.Generator().manual_seed(81)
    K = torch.randn(4, 3, 3, 3, dtype=D, generator=g)
    padded = F.pad(K, (1, 1, 0, 2))  # 5 × 5, zero rows and columns on the border
    assert tensor_norm_bound(padded).item() == pytest.approx(tensor_norm_bound(K).item(), rel=1e-15)
    # at stride 3, a 4 × 4 padding of a 3 × 3 kernel gives a 2 × 2 polyphase kernel whose second row and column
    # are zero: the bound is the 1 × 1 polyphase kernel's
    padded3 = F.pad(K, (0, 1, 0, 1))
    assert tensor_norm_bound(padded3, 3).item() == pytest.approx(tensor_norm_bound(K, 3).item(), rel=1e-15)
    for P, s in ((padded, 1), (padded3, 3)):
        assert tensor_norm_bound(P, s).item() >= max(_exact_norms(P, s))
        estimate = tensor_norm_estimate(P, s, generator=torch.Generator().manual_seed(0)).item()
        assert estimate <= tensor_norm_bound(P, s).item()  # the estimate uses the same √(hw)


def test_symbol_norm_bound_stopped_by_max_evals_is_a_bound_from_the_first_grid(monkeypatch):
    import lowrankopt.spectral.symbol as symbol

    g = torch.Generator().manual_seed(82)
    K = torch.randn(6, 5, 3, 3, dtype=D, generator=g)
    lower, upper = (v.item() for v in symbol_norm_bound(K, return_lower=True))  # lower ≤ sup ≤ upper
    counts, norms = [], symbol._symbol_norms
    monkeypatch.setattr(symbol, "_symbol_norms", lambda K, om: (counts.append(len(om)), norms(K, om))[1])
    stopped = symbol_norm_bound(K, max_evals=1).item()
    # the documented first grid, evaluated whatever max_evals: 8(h − 1) × (4(w − 1) + 1) frequencies
    assert counts[0] == 16 * 9 and sum(counts[:-1]) == 16 * 9  # (the last call: the value, differentiably)
    theta = math.pi / 8  # its cells' θ: (h − 1)/2 · π/(8(h − 1)) per axis
    assert lower <= stopped <= upper / (1 - theta**2 / 2) * (1 + 1e-12)  # a bound, within the first level's factor
    assert stopped >= max(_exact_norms(K, 1))
