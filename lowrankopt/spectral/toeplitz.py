"""Gram iteration for zero-padded convolutions (Delattre, Barthélemy & Allauzen, "Spectral Norm of Convolutional
Layers with Circular and Zero Paddings", 2024, arXiv:2402.00240).

A zero-padded conv at any input size is a compression (rows and columns kept) of the convolution ``C`` on the
infinite grid ``ℓ²(ℤ²)``, whose norm is ``‖C‖₂ = sup_ω ‖K̂(ω)‖₂`` (:mod:`lowrankopt.spectral.bounds`). Gram
iteration on ``C`` stays within convolutions: ``G₁ = C C*`` is the conv with the kernel
``K ⋆ K (c × c, (2h − 1) × (2w − 1))`` — the correlation of K with itself over the other channel side — and
``G_{t+1} = G_t G_t* = G_t²`` the conv with the self-correlation of G_t's kernel, of size ``2^t(h − 1) + 1``
per axis, so that ``‖C‖₂^{2^t} = ‖G_t‖₂``. Delattre et al. bound ``‖G_t‖₂`` (a self-adjoint operator) by its
``ℓ∞ → ℓ∞`` norm, the largest absolute row sum ``max_a Σ_{b,u,v} |G_t[a, b, u, v]|`` of its kernel, which holds
for the compressed (zero-padded) operator at every size too:

    ``‖J‖₂ ≤ ‖C‖₂ ≤ (max_a Σ_{b,u,v} |G_t[a, b, u, v]|)^{1/2^t}``.

The ratio of the right side to ‖C‖₂ is at most ``(c·(2^t(h−1)+1)(2^t(w−1)+1))^{1/2^{t+1}}`` (a row sum is at most
√(its length) times the row's 2-norm), so the bound converges to ``sup_ω ‖K̂(ω)‖₂`` as t grows — the norm for every
input size, not the norm at a given n. Their code (``blaisedelattre/lip4conv``, ``spectral_rescaling.py``,
``compute_spectral_rescaling_conv``; ``bounds.py``, ``compute_delattre2024``, ``n_iter=4``) forms the kernels
with ``conv2d(G, G, padding=size − 1)`` — ``O(c³ S⁴)`` for kernels of size S — and the same row sums give the
weights of their "spectral rescaling" layer.
"""

from __future__ import annotations

import math

import torch

from .._checks import as_positive_int
from ._kernel import check_kernel, check_stride, polyphase_kernel, round_up, trim_zero_taps

__all__ = ["zero_padding_gram_bound"]

_BLOCK_ELEMENTS = 1 << 22  # complex entries of the Gram symbols squared at once (64 MB in complex128)
_SIDES = ("smaller", "larger")


def zero_padding_gram_bound(K: torch.Tensor, stride: int = 1, iters: int = 4, *, side: str = "smaller") -> torch.Tensor:
    """Delattre et al.'s (2024) Gram-iteration bound for zero padding: ``(max row sum of |G_t|)^{1/2^t} ≥ ‖J‖₂``.

    An upper bound on ``sup_ω ‖K̂(ω)‖₂``, hence on the conv's norm for zero padding of any amount at every input
    size (and for circular padding up to "same" on sizes divisible by the stride; :mod:`lowrankopt.spectral.bounds`),
    that tends to ``sup_ω ‖K̂(ω)‖₂`` as ``iters`` grows (module docstring). The kernel is first the polyphase
    kernel of the stride, without its border rows and columns of zero taps (a shift: it changes no norm and
    shrinks every G_t).

    The kernel of ``G_t`` is computed in the Fourier domain, exactly: its symbol ``Ĝ_t(ω) = (K̂(ω)K̂(ω)ᴴ)^{2^{t−1}}``
    is a trigonometric polynomial of degree ``2^{t−1}(h − 1)`` per axis, so its values on an
    ``(2^t(h−1)+1) × (2^t(w−1)+1)`` grid (a real FFT of the zero-padded kernel: the half grid) determine its
    coefficients with no aliasing; the squarings are per frequency, each rescaled by a common power of two
    (kept in log space: no overflow), and an inverse real FFT returns ``G_t``'s kernel. The same value as
    forming the kernels by ``conv2d`` as the reference does (in the tests, to 1e-12), at ``O(t S² c³)`` instead
    of ``O(c³ S⁴)``.

    **Side.** ``side="smaller"`` (default) takes the Gram operator on the side with fewer channels
    (``K̂ᴴK̂`` when ``c_in s² < c_out``): ``c_min³`` instead of ``c_max³`` per frequency and step, and usually a
    little tighter — on 57 random non-square 3 × 3 kernels with 1 to 32 channels, its value over the larger
    side's is 0.60 to 0.99 at t = 1 (median 0.87) and 0.96 to 1.01 at t = 4 (median 0.99; above 1 for 10 of
    them). The reference code always takes the larger side (it transposes K when ``c_in > c_out``);
    ``side="larger"`` reproduces it.

    Exact arithmetic bound; computed in float64 (relative rounding about 1e-14 on the tested sizes, no
    allowance added) and rounded up into K's dtype.

    Args:
        K: ``(..., c_out, c_in, h, w)``, float32 or float64; leading dims are a batch of kernels.
        stride: the conv's stride.
        iters: Gram steps t ≥ 1 (the reference's default 4). On He-initialized c × c × 3 × 3 kernels, times
            ``sup_ω ‖K̂(ω)‖₂``: 1.06 at t = 4 and 1.009 at t = 6 for c = 16; 1.12 at t = 4 for c = 64; 1.14 at
            t = 4 and 1.06 at t = 5 for c = 128 (the ``conv-norms`` benchmark measures it). Each step doubles
            the grid on both axes: four times the cost.
        side: ``"smaller"`` or ``"larger"`` (see above).

    Returns ``(...)`` in K's dtype; differentiable in K.
    Cost: ``S₁ S₂ / 2`` frequencies with ``S_k = 2^t(t_k − 1) + 1`` (561 for 3 × 3 at t = 4, 8385 at t = 6), t
    products of ``c × c`` matrices at each, ``O(t S₁ S₂ c³)`` with ``c`` the chosen side's channels, plus the FFTs;
    memory one copy of the Gram symbols, ``S₁ S₂ c² / 2`` complex128 numbers (2.4 GB for c = 512, 3 × 3, t = 4; a
    second one, and one per step, when K requires a gradient); independent of the input size.
    """
    K = check_kernel(K)
    iters = as_positive_int("iters", iters)
    if side not in _SIDES:
        raise ValueError(f"side must be one of {_SIDES}, got {side!r}")
    K = trim_zero_taps(polyphase_kernel(K, check_stride(stride)))
    *batch, co, ci, h, w = K.shape
    if (ci < co) if side == "smaller" else (ci > co):  # the Gram side first: G = K̂ K̂ᴴ over the first axis
        K = K.transpose(-4, -3)  # (with c_in = c_out the output side, as in the reference)
    sizes = ((1 << iters) * (h - 1) + 1, (1 << iters) * (w - 1) + 1)
    A = torch.fft.rfft2(K.to(torch.float64), s=sizes).movedim((-2, -1), (-4, -3))  # (..., S₁, S₂//2+1, c, c')
    G = A @ A.mH  # Ĝ₁ on the half grid
    del A
    in_place = not G.requires_grad  # without autograd the squarings overwrite Ĝ: one copy in memory
    c = G.shape[-1]
    log_scale = torch.zeros(batch, dtype=torch.float64, device=K.device)
    per_block = max(1, _BLOCK_ELEMENTS // (G.shape[-3] * c * c * max(1, math.prod(batch))))
    for _ in range(iters - 1):
        # a common scale per kernel (a power of two: exact) keeps Ĝ² in range; the polynomial structure needs
        # the same scale at every frequency
        top = G.detach().abs().flatten(-4).amax(-1)
        exponent = torch.frexp(top)[1]  # top = m·2^e, m ∈ [1/2, 1) (e = 0 for a zero kernel)
        scale = torch.ldexp(torch.ones_like(top), -exponent)[..., None, None, None, None].to(G.dtype)
        log_scale = 2 * (log_scale + exponent.to(torch.float64) * math.log(2))
        if in_place:
            G.mul_(scale)
            for start in range(0, G.shape[-4], per_block):
                B = G[..., start : start + per_block, :, :, :]
                B.copy_(B @ B)  # Ĝ Hermitian: Ĝ Ĝᴴ = Ĝ²
        else:
            G = G * scale
            G = torch.cat([B @ B for B in G.split(per_block, dim=-4)], dim=-4)
    # G_t's kernel by an inverse real FFT, a block of rows a at a time, and its largest absolute row sum
    rows_per_block = max(1, _BLOCK_ELEMENTS // (G.shape[-4] * G.shape[-3] * c * max(1, math.prod(batch))))
    sums = []
    for start in range(0, c, rows_per_block):
        rows = G[..., start : start + rows_per_block, :].movedim((-4, -3), (-2, -1))  # (..., a, b, S₁, S₂//2+1)
        sums.append(torch.fft.irfft2(rows, s=sizes).abs().sum((-3, -2, -1)))
    rows = torch.cat(sums, -1).amax(-1)
    tiny = torch.finfo(torch.float64).tiny  # a zero kernel: 0, not NaN
    value = torch.exp((log_scale + rows.clamp_min(tiny).log()) / 2**iters)
    value = torch.where(rows > 0, value, torch.zeros_like(value))
    eps = torch.finfo(torch.float64).eps
    return round_up(value * (1 + 8 * eps), K.dtype)
