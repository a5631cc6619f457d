"""The LipGrid (Araujo et al. 2021) and zero-padding Gram-iteration (Delattre et al. 2024) bounds: against exact norms
computed here (dense Jacobians, FFT symbols on all n² frequencies), the references' formulas re-implemented here in
a few lines, closed forms, convergence, strides, dtypes, gradients and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_spectral import _adversarial_kernels, _exact_norms, _fd_check, _random_kernel

from lowrankopt.spectral import (
    circular_spectral_norm,
    lipgrid_bound,
    lipgrid_factor,
    symbol_norm_bound,
    tensor_norm_bound,
    zero_padding_gram_bound,
)

D = torch.float64


def circular_exact(K, n):
    """The stride-1 circular conv's norm on n × n inputs: the largest singular value of the symbol over all n²
    frequencies of a full FFT (Sedghi et al. 2019), written here independently of the library's blocked DFT."""
    symbol = torch.fft.fft2(K, s=(n, n)).permute(2, 3, 0, 1)  # (n, n, c_out, c_in)
    return torch.linalg.svdvals(symbol).max().item()


def fine_grid_sup(K, n=1024, fro=False):
    """``max ‖K̂(ω)‖`` over an n × n grid (spectral norm, or Frobenius): a value *below* the sup over the torus."""
    symbol = torch.fft.fft2(K, s=(n, n)).permute(2, 3, 0, 1)
    norms = torch.linalg.matrix_norm(symbol) if fro else torch.linalg.matrix_norm(symbol, ord=2)
    return norms.max().item()


def lipgrid_reference(K, N, per_channel=False):
    """The grid maximum of the references, on the N × N grid 2πj/N without their factor: lip4conv's
    ``compute_araujo2021`` (``sqrt(max_ω Σ_ij |f_ij(ω)|²)``) or, per channel, MILES-PSL's ``LipschitzBound``
    (``sqrt(Σ_i max_ω Σ_j |f_ij(ω)|²)`` over the rows of the smaller side), by an explicit DFT."""
    co, ci, h, w = K.shape
    omega = 2 * math.pi * torch.arange(N, dtype=D) / N
    E1 = torch.exp(-1j * torch.outer(omega, torch.arange(h, dtype=D)))
    E2 = torch.exp(-1j * torch.outer(omega, torch.arange(w, dtype=D)))
    f = torch.einsum("ocpq,ap,bq->abocq", K.to(torch.complex128), E1, E2).sum(-1)  # (N, N, co, ci)
    power = f.abs() ** 2
    if not per_channel:
        return power.sum((-2, -1)).max().sqrt().item()
    if co > ci:
        power = power.transpose(-2, -1)
    return power.sum(-1).flatten(0, 1).amax(0).sum().sqrt().item()


def gram_reference(X, n_iter, side="larger"):
    """Delattre et al.'s zero-padding Gram iteration as their code does it (lip4conv, compute_delattre2024 with
    compute_spectral_rescaling_conv): self-correlation by conv2d, Frobenius rescaling, largest absolute row sum.
    Their code takes the Gram operator on the larger channel side (dim 0 after a transpose); ``side="smaller"``
    runs the same lines on the other side."""
    if (X.shape[1] > X.shape[0]) if side == "larger" else (X.shape[1] < X.shape[0]):
        X = X.transpose(0, 1)
    G, log_norm = X, 0.0
    for _ in range(n_iter):
        norm = G.norm()
        G = G / norm
        log_norm = 2 * (log_norm + norm.log())
        G = F.conv2d(G, G, padding=(G.shape[-2] - 1, G.shape[-1] - 1))
    rows = G.abs().sum((1, 2, 3))
    return (rows.pow(2.0**-n_iter) * torch.exp(log_norm * 2.0**-n_iter)).max().item()


def _kernels():
    """The adversarial and random kernels of test_spectral's certified-bound test, and kernels whose symbol peaks
    halfway between the points of odd LipGrid grids."""
    kernels = list(_adversarial_kernels())
    for k in range(120):
        K, s, _ = _random_kernel(k)
        kernels.append((f"random {k}", K, s))
    for h, w in ((1, 3), (3, 3), (2, 5), (5, 5)):  # peaks at ω = π: off the odd grids
        kernels.append((f"alternating {h}×{w}", alternating(torch.ones(1, 1, h, w, dtype=D)), 1))
        kernels.append((f"alternating {h}×{w}, 3 channels", alternating(torch.ones(3, 3, h, w, dtype=D)), 1))
    return kernels


def test_both_bounds_hold_against_exact_norms_on_random_and_adversarial_kernels():
    for label, K, s in _kernels():
        exact = max(_exact_norms(K, s))  # circular at two sizes and zero padding of four amounts, dense
        if s == 1:
            exact = max(exact, circular_exact(K, max(K.shape[-2:]) + 3))
        h, w = K.shape[-2:]
        smallest = max(1, math.floor(math.pi * (math.ceil(h / s) + math.ceil(w / s) - 2) / 2) + 1)
        for samples in (smallest, smallest + 1, smallest + 4, max(51, smallest)):
            for per_channel in (False, True):
                value = lipgrid_bound(K, s, samples=samples, per_channel=per_channel).item()
                assert value >= exact, (label, s, samples, per_channel, value, exact)
        for iters in (1, 2, 4):
            for side in ("smaller", "larger"):
                value = zero_padding_gram_bound(K, s, iters, side=side).item()
                assert value >= exact * (1 - 1e-12), (label, s, iters, side, value, exact)


def alternating(taps):
    """``(−1)^p`` times non-negative taps: ``|K̂|`` peaks at ω = π, which is no grid point 2πj/N for odd N (it is
    then halfway between two: the worst place for a grid)."""
    h, w = taps.shape[-2:]
    signs = torch.outer((-1.0) ** torch.arange(h, dtype=D), (-1.0) ** torch.arange(w, dtype=D))
    return taps.abs() * signs


def test_lipgrid_grid_factor_holds_where_the_sup_falls_between_grid_points():
    # one channel: ‖K̂‖_F = |K̂| = the conv's n-independent norm. The certified factor must cover the worst case, a
    # peak halfway between grid points, at the coarsest grids it allows; the fine grid is a value below the sup
    g = torch.Generator().manual_seed(3)
    cases = []
    for h, w in ((1, 3), (3, 3), (2, 5), (5, 5), (1, 7)):
        for _ in range(6):
            K = torch.randn(1, 1, h, w, dtype=D, generator=g)
            cases += [K, alternating(K)]
        cases.append(alternating(torch.ones(1, 1, h, w, dtype=D)))
    for K in cases:
        h, w = K.shape[-2:]
        fine = fine_grid_sup(K, 1024, fro=True)
        smallest = math.floor(math.pi * (h + w - 2) / 2) + 1
        for N in (smallest, smallest + 1, 2 * smallest + 1, 51):
            assert lipgrid_bound(K, samples=N).item() >= fine, (tuple(K.shape), N)
    # the grid maximum alone (the factor dropped) is below the sup there: the factor is needed, and of about the
    # size derived (|2cos ω − 1| peaks at 3 = |K̂(π)|; the grid of 5 gets 2.618 at 4π/5; the factor is 1.246)
    K = alternating(torch.ones(1, 1, 1, 3, dtype=D))
    assert lipgrid_reference(K, 5) == pytest.approx(1 + 2 * math.cos(math.pi / 5), rel=1e-14)
    assert lipgrid_reference(K, 5) * lipgrid_factor(1, 3, 5) >= 3 > lipgrid_reference(K, 5) * 1.14


def test_lipgrid_equals_the_reference_grid_maximum_times_the_certified_factor():
    g = torch.Generator().manual_seed(4)
    for co, ci, h, w, N in ((4, 6, 3, 3, 50), (6, 4, 3, 3, 20), (3, 3, 5, 5, 16), (2, 5, 1, 3, 9), (5, 2, 2, 4, 12)):
        K = torch.randn(co, ci, h, w, dtype=D, generator=g)
        factor = 1 / (1 - (math.pi * (h + w - 2) / (2 * N)) ** 2 / 2)
        assert lipgrid_factor(h, w, N) == pytest.approx(factor, rel=1e-15)
        for per_channel in (False, True):
            value = lipgrid_bound(K, samples=N, per_channel=per_channel).item()
            ref = lipgrid_reference(K, N, per_channel) * factor
            assert ref <= value <= ref * (1 + 1e-10), (co, ci, h, w, per_channel)  # the rounding allowance
        # the Frobenius form is never above the per-channel form, and the circular grid norm never above either
        assert lipgrid_bound(K, samples=N).item() <= lipgrid_bound(K, samples=N, per_channel=True).item()


def test_closed_forms():
    g = torch.Generator().manual_seed(5)
    # a 1 × 1 kernel: K̂ is the constant matrix K, the grid factor is 1 and LipGrid is ‖K‖_F; the Gram bound is the
    # largest absolute row sum of (KKᵀ)^{2^{t−1}} (the smaller side), to the power 1/2^t
    K = torch.randn(3, 5, 1, 1, dtype=D, generator=g)
    M = K[:, :, 0, 0]
    assert lipgrid_factor(1, 1, 1) == 1.0
    assert lipgrid_bound(K).item() == pytest.approx(M.norm().item(), rel=1e-14)
    rows = M @ M.T
    assert lipgrid_bound(K, per_channel=True).item() == pytest.approx(rows.diagonal().sum().sqrt().item(), rel=1e-14)
    for t in (1, 2, 3, 5):
        G = torch.linalg.matrix_power(M @ M.T, 2 ** (t - 1))
        expected = G.abs().sum(1).max().item() ** (1 / 2**t)
        assert zero_padding_gram_bound(K, iters=t).item() == pytest.approx(expected, rel=1e-13)
    # a non-negative single-channel kernel: |K̂| peaks at ω = 0 (a grid point) with value ΣK, and every Gram
    # kernel is non-negative with row sum Ĝ_t(0) = (ΣK)^{2^t}: both bounds are ΣK (LipGrid times its factor)
    P = torch.rand(1, 1, 3, 4, dtype=D, generator=g)
    total = P.sum().item()
    assert circular_exact(P, 12) == pytest.approx(total, rel=1e-13)
    assert lipgrid_bound(P, samples=30).item() == pytest.approx(total * lipgrid_factor(3, 4, 30), rel=1e-13)
    for t in (1, 3, 6):
        assert zero_padding_gram_bound(P, iters=t).item() == pytest.approx(total, rel=1e-12)
    # border zero taps are a shift: the same values as the unpadded kernel
    Q = torch.randn(2, 3, 3, 3, dtype=D, generator=g)
    padded = F.pad(Q, (1, 0, 0, 2))
    assert lipgrid_bound(padded).item() == pytest.approx(lipgrid_bound(Q).item(), rel=1e-14)
    assert zero_padding_gram_bound(padded).item() == pytest.approx(zero_padding_gram_bound(Q).item(), rel=1e-12)
    # zero kernels: 0, not NaN
    for fn in (lipgrid_bound, zero_padding_gram_bound):
        assert fn(torch.zeros(2, 3, 3, 3, dtype=D)).item() == 0.0


def test_gram_bound_equals_the_reference_conv2d_iteration():
    g = torch.Generator().manual_seed(6)
    for co, ci, h, w in ((4, 4, 3, 3), (6, 3, 3, 3), (3, 6, 3, 3), (2, 3, 5, 5), (3, 2, 2, 3), (1, 1, 3, 3)):
        K = torch.randn(co, ci, h, w, dtype=D, generator=g)
        for t in (1, 2, 3, 4):
            for side in ("larger", "smaller"):
                ref = gram_reference(K, t, side)
                assert zero_padding_gram_bound(K, iters=t, side=side).item() == pytest.approx(ref, rel=1e-12)


def test_gram_bound_decreases_to_the_n_independent_norm():
    # ‖G_{t+1}‖_∞ = ‖G_t²‖_∞ ≤ ‖G_t‖_∞²: the bound never increases with t, and it tends to sup_ω ‖K̂(ω)‖₂
    g = torch.Generator().manual_seed(7)
    for co, ci, h, w in ((3, 3, 3, 3), (4, 2, 3, 3), (2, 2, 5, 5)):
        K = torch.randn(co, ci, h, w, dtype=D, generator=g)
        lower, upper = (v.item() for v in symbol_norm_bound(K, rtol=1e-6, max_evals=200_000, return_lower=True))
        values = [zero_padding_gram_bound(K, iters=t).item() for t in range(1, 9 if h == 3 else 8)]
        assert all(b <= a * (1 + 1e-12) for a, b in zip(values, values[1:], strict=False)), values
        assert all(v >= lower for v in values)
        assert values[-1] <= upper * 1.01, values[-1] / upper
        bound = (co * ci * (2 ** len(values) * (h - 1) + 1) ** 2) ** (1 / 2 ** (len(values) + 1))
        assert values[-1] <= upper * bound  # the documented worst-case ratio


def test_lipgrid_converges_to_the_sup_of_the_frobenius_norm():
    g = torch.Generator().manual_seed(8)
    for K in (torch.randn(3, 4, 3, 3, dtype=D, generator=g), torch.randn(1, 1, 5, 5, dtype=D, generator=g)):
        sup_fro = fine_grid_sup(K, 1024, fro=True)
        values = [lipgrid_bound(K, samples=N).item() for N in (13, 32, 128, 512)]
        assert all(v >= sup_fro for v in values)
        h, w = K.shape[-2:]
        assert values[-1] <= sup_fro * lipgrid_factor(h, w, 512) * (1 + 1e-12)  # the 512-grid is in the 1024-grid
        assert values[0] >= values[-1] and lipgrid_factor(h, w, 512) < 1 + 4e-4
    # one channel: the Frobenius norm is the operator norm, so LipGrid tends to the conv's norm for every n
    K = torch.randn(1, 1, 3, 3, dtype=D, generator=g)
    assert lipgrid_bound(K, samples=1000).item() == pytest.approx(fine_grid_sup(K, 2048, fro=True), rel=1e-4)
    # many channels: the Frobenius norm is looser than the tensor-norm bound's unfoldings on random kernels
    K = torch.randn(32, 32, 3, 3, dtype=D, generator=g) / 30
    assert lipgrid_bound(K).item() > tensor_norm_bound(K).item() > circular_exact(K, 16)


def test_strides_use_the_polyphase_kernel():
    g = torch.Generator().manual_seed(9)
    K = torch.randn(3, 2, 4, 4, dtype=D, generator=g)
    from lowrankopt.spectral import polyphase_kernel

    for s in (2, 3):
        Kp = polyphase_kernel(K, s)
        assert lipgrid_bound(K, s).item() == pytest.approx(lipgrid_bound(Kp).item(), rel=1e-14)
        assert zero_padding_gram_bound(K, s).item() == pytest.approx(zero_padding_gram_bound(Kp).item(), rel=1e-13)
        exact = max(_exact_norms(K, s))
        assert lipgrid_bound(K, (s, s)).item() >= exact
        assert zero_padding_gram_bound(K, s).item() >= exact


def test_batches_float32_and_gradients():
    g = torch.Generator().manual_seed(10)
    K = torch.randn(2, 3, 4, 3, 3, 3, dtype=D, generator=g)
    for fn in (lipgrid_bound, lambda k: lipgrid_bound(k, per_channel=True), zero_padding_gram_bound):
        values = fn(K)
        assert values.shape == (2, 3)
        for i in range(2):
            for j in range(3):
                assert values[i, j].item() == pytest.approx(fn(K[i, j]).item(), rel=1e-13)
        low = fn(K.float())
        assert low.dtype == torch.float32
        assert (low.double() >= fn(K.float().double())).all()  # rounded up, never to nearest below
        assert torch.allclose(low.double(), values, rtol=1e-6)
    K = torch.randn(3, 4, 3, 3, dtype=D, generator=g)
    _fd_check(lipgrid_bound, K)
    _fd_check(lambda k: lipgrid_bound(k, 2, per_channel=True), K)
    _fd_check(zero_padding_gram_bound, K)
    _fd_check(lambda k: zero_padding_gram_bound(k, 2, 3, side="larger"), K)


def test_bad_input():
    K = torch.randn(2, 2, 3, 3, dtype=D)
    with pytest.raises(ValueError, match="samples = 3 is too few"):
        lipgrid_bound(K, samples=3)  # θ = π·4/6 > 1
    with pytest.raises(ValueError, match="samples"):
        lipgrid_bound(K, samples=0)
    with pytest.raises(TypeError, match="per_channel"):
        lipgrid_bound(K, per_channel="yes")
    with pytest.raises(ValueError, match="iters"):
        zero_padding_gram_bound(K, iters=0)
    with pytest.raises(ValueError, match="side"):
        zero_padding_gram_bound(K, side="out")
    for fn in (lipgrid_bound, zero_padding_gram_bound):
        with pytest.raises(ValueError, match="K must have shape"):
            fn(torch.randn(2, 3, 3))
        with pytest.raises(ValueError, match="stride"):
            fn(K, 0)
        with pytest.raises(ValueError, match="stride"):
            fn(K, (2, 1))
        with pytest.raises(ValueError):
            fn(torch.full((1, 1, 3, 3), float("nan")))
        with pytest.raises((TypeError, ValueError)):
            fn(torch.ones(1, 1, 3, 3, dtype=torch.int64))
    # the n-independent bounds hold for every n, so the circular grid norm at any size is below them
    assert circular_spectral_norm(K, 64).item() <= zero_padding_gram_bound(K).item()


def test_gram_bound_in_blocks_and_with_autograd_equals_one_block(monkeypatch):
    import lowrankopt.spectral.toeplitz as toeplitz

    g = torch.Generator().manual_seed(11)
    K = torch.randn(2, 6, 5, 3, 3, dtype=D, generator=g)
    whole = zero_padding_gram_bound(K, iters=3)
    monkeypatch.setattr(toeplitz, "_BLOCK_ELEMENTS", 50)  # one frequency row, one kernel row per block
    blocked = zero_padding_gram_bound(K, iters=3)
    tracked = zero_padding_gram_bound(K.clone().requires_grad_(True), iters=3)  # the out-of-place path
    assert torch.equal(whole, blocked) and torch.equal(whole, tracked.detach())
    assert whole[1].item() == pytest.approx(gram_reference(K[1], 3, "smaller"), rel=1e-12)


def test_conv_norms_benchmark_rows_of_the_new_bounds():
    from lowrankopt.benchmarks import spectral
    from lowrankopt.benchmarks.registry import Case
    from lowrankopt.benchmarks.runner import Context

    spectral._LAST.clear()
    try:
        ctx = Context("quick", torch.device("cpu"), 1, 0, max_time=1e-9)  # no budget: only first measurements run
        rows = {r["variant"]: r for r in spectral.run_norms(Case("a", dict(c=8, n=8)), ctx)["rows"]}
        K = torch.randn(8, 8, 3, 3, generator=ctx.generator(8)) * math.sqrt(2 / 72)
        exact = circular_spectral_norm(K, 8).item()
        expected = {
            "LipGrid (Araujo 2021, sup ‖K̂‖_F, 50² grid)": lipgrid_bound(K).item(),
            "LipGrid per channel (Araujo 2021 theorem)": lipgrid_bound(K, per_channel=True).item(),
            "Gram iteration t=4, zero padding (Delattre 2024)": zero_padding_gram_bound(K).item(),
        }
        for name, value in expected.items():
            figures = rows[name]["figures"]
            assert figures["value"] == pytest.approx(value, rel=1e-6)
            assert figures["value / exact"] == pytest.approx(value / exact, rel=1e-5) and value >= exact
            assert rows[name]["time"] > 0
        # the same c at another n: re-timed; a larger c: the n-independent ones extrapolated as c³, not run
        rows = {r["variant"]: r for r in spectral.run_norms(Case("b", dict(c=8, n=16)), ctx)["rows"]}
        assert all(rows[name]["time"] > 0 for name in expected)
        rows = {r["variant"]: r for r in spectral.run_norms(Case("c", dict(c=16, n=8)), ctx)["rows"]}
        assert all("the c³ trend from c = 8" in rows[name]["skipped"] for name in expected)
    finally:
        spectral._LAST.clear()
