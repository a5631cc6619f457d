"""LipGrid (Araujo, Negrevergne, Chevaleyre & Atif, AAAI 2021): a bound from the symbol on a frequency grid.

For a kernel ``K (c_out, c_in, h, w)`` with symbol ``K̂(ω) = Σ_{p,q} K[:, :, p, q] e^{−i(ω₁p + ω₂q)}``, the conv's
``‖J‖₂ ≤ sup_ω ‖K̂(ω)‖₂`` for the paddings and sizes of :mod:`lowrankopt.spectral.bounds` (zero padding of any
amount at any input size; circular padding up to "same" on sizes divisible by the stride). Araujo et al. bound
the operator norm of each ``K̂(ω)`` by a Frobenius norm — no SVD — and the sup over the torus by the maximum over
an ``N × N`` grid times a factor ≥ 1 that depends on N and the kernel size (their algorithm LipGrid). Two forms:

- ``sup_ω ‖K̂(ω)‖_F`` — the form that the later comparisons run as "Araujo 2021" (Delattre et al. 2023/2024
  and Grishina et al. 2024, ``compute_araujo2021`` in ``blaisedelattre/lip4conv/bounds.py`` and
  ``GrishKate/conv_norm/bounds.py``): the default here.
- ``(Σ_i sup_ω Σ_j |K̂(ω)_{ij}|²)^{1/2}`` over the rows i of the side with fewer channels — the bound of the
  paper's theorem for multi-channel convs (stacking the rows of doubly-block Toeplitz matrices), as in the
  authors' ``MILES-PSL/Upper-Bound-Lipschitz-Convolutional-Layers/lipschitz_bound/lipschitz_bound.py``
  (``poly.max(axis=-1)[0].sum()``): ``per_channel=True``. Never smaller than the first form.

**The grid factor, certified.** Let ``F(ω)`` be the vector ``K̂(ω)`` (or one row of it), ``M = sup ‖F‖ = ‖F(ω*)‖``,
``x = F(ω*)/M`` and ``σ_k = (t_k − 1)/2`` for ``t₁ = h``, ``t₂ = w`` taps. Then
``T(ω) = Re(e^{i(σ₁(ω₁ − ω₁*) + σ₂(ω₂ − ω₂*))} xᴴF(ω))`` is a real sum of exponentials with frequencies in
``[−σ₁, σ₁] × [−σ₂, σ₂]``, ``|T| ≤ ‖F‖ ≤ M`` everywhere and ``T(ω*) = M``. The nearest point ω of the grid
``2πj/N`` is within ``π/N`` of ω* on each axis; along the segment from ω* to ω, ``g(t) = T(ω* + t(ω − ω*))`` has
frequencies at most ``θ = π(σ₁ + σ₂)/N`` in modulus and a maximum at t = 0, so Bernstein's inequality (twice:
``|g''| ≤ θ²M``) and Taylor's theorem give ``‖F(ω)‖ ≥ T(ω) = g(1) ≥ M(1 − θ²/2)``. Hence

    ``sup_ω ‖F(ω)‖ ≤ max_grid ‖F‖ / (1 − θ²/2),   θ = π(h + w − 2) / (2N)``,

valid for ``θ < √2`` (N samples per axis; 1.008 for a 3 × 3 kernel at N = 50). This is the same certificate as
:func:`~lowrankopt.spectral.symbol_norm_bound`'s, applied once to the whole grid.
The reference implementations use another factor, ``(1 − (k − 1)/N)^{-1}`` for a square k × k kernel (1.042 for
3 × 3 at N = 50), over ``linspace(0, 2π, N)`` — N − 1 distinct points, the last one a copy of the first — and
only for odd square kernels; we do not use it: it is not the one derived here, it is larger at the grid sizes
used in practice (N ≥ 5(k − 1)), and it does not cover non-square kernels or strides.
"""

from __future__ import annotations

import math

import torch

from .._checks import as_positive_int
from ._kernel import _gamma, check_kernel, check_stride, fourier_vectors, polyphase_kernel, round_up, trim_zero_taps

__all__ = ["lipgrid_bound", "lipgrid_factor"]


def lipgrid_factor(h: int, w: int, samples: int) -> float:
    """The certified grid factor ``1 / (1 − θ²/2)``, ``θ = π(h + w − 2)/(2N)``, of the module docstring, for an
    ``h × w`` kernel sampled on ``samples = N`` points per axis (an axis with one tap needs one sample and adds
    nothing to θ). Raises a ``ValueError`` when ``θ ≥ 1`` (the factor would exceed 2): ask for more samples."""
    h, w, samples = as_positive_int("h", h), as_positive_int("w", w), as_positive_int("samples", samples)
    theta = math.pi * (h + w - 2) / (2 * samples)
    if theta >= 1:
        need = math.floor(math.pi * (h + w - 2) / 2) + 1
        raise ValueError(f"samples = {samples} is too few for a {h} × {w} kernel: the grid factor needs ≥ {need}")
    return 1 / (1 - theta * theta / 2)


def lipgrid_bound(K: torch.Tensor, stride: int = 1, *, samples: int = 50, per_channel: bool = False) -> torch.Tensor:
    """Araujo et al.'s LipGrid bound on the conv's ``‖J‖₂``, with a certified grid factor (module docstring).

    ``max`` over the grid ``ω ∈ (2π/N)·{0, …, N − 1}²`` of ``‖K̂(ω)‖_F`` (or, with ``per_channel``, the root of the
    sum over the rows of the smaller channel side of each row's maximum of ``Σ_j |K̂(ω)_{ij}|²``), times
    :func:`lipgrid_factor`. The kernel is first the polyphase kernel of the stride and loses its border rows and
    columns of zero taps (a shift, which changes no ``‖K̂(ω)‖``; it lowers ``h, w`` in the factor). No symbol is
    formed: ``Σ_j |K̂(ω)_{ij}|² = z(ω)ᵀ R_i z̄(ω)`` with ``z_a = e^{−iω·x_a}`` over the taps ``x_a`` and
    ``R_i = Σ_j K_ij K_ijᵀ`` the ``hw × hw`` Gram matrix of row i's taps (summed over the rows for the Frobenius
    form) — the paper's trigonometric polynomial, whose coefficients are the autocorrelation of K — evaluated in
    float64 on the half grid ``ω₂ ≤ π`` (``‖K̂(−ω)‖ = ‖K̂(ω)‖``). The computed values carry an allowance for their
    rounding (about ``(c + (hw)² + 128(h + w))·u·hw·‖K‖²_F`` absolute on the squared norm, ``u = 2⁻⁵³``), and
    the result is rounded up into K's dtype: a guaranteed upper bound on
    ``sup_ω ‖K̂(ω)‖_F ≥ sup_ω ‖K̂(ω)‖₂`` — hence on the conv's norm for zero padding of any amount at any n, and
    for circular padding up to "same" at n divisible by the stride — not on larger circular paddings
    (:mod:`lowrankopt.spectral.bounds`).

    Tightness: the factor tends to 1 as ``samples`` grows, the value to ``sup_ω ‖K̂(ω)‖_F``, which equals the
    conv's n-independent norm ``sup_ω ‖K̂(ω)‖₂`` only when ``K̂(ω)`` has rank one at its peak (one input or one
    output channel). For many channels ``‖K̂‖_F`` can be up to ``√min(c_out, c_in s²)`` times ``‖K̂‖₂``: on
    He-initialized ``c × c × 3 × 3`` kernels the bound is about √c / 2 times the norm (the ``conv-norms``
    benchmark measures it), looser than :func:`~lowrankopt.spectral.tensor_norm_bound`.

    Args:
        K: ``(..., c_out, c_in, h, w)``, float32 or float64; leading dims are a batch of kernels.
        stride: the conv's stride (the bound is that of the polyphase kernel).
        samples: grid points N per axis (the reference's default 50); N ≥ π(h + w − 2)/2 (the factor ≤ 2).
        per_channel: the paper's theorem's form (sum over rows of per-row maxima) instead of the Frobenius form.

    Returns ``(...)`` in K's dtype; differentiable in K (through the grid point that gives the maximum).
    Cost: the Gram matrices, ``O(c_out c_in s² (h'w')²)`` for the polyphase ``h' × w'``, and the forms on the grid,
    ``O(N² (h'w')²)`` (times ``min(c_out, c_in s²)`` with ``per_channel``); no SVD, no FFT; independent of the
    input size.
    """
    K = check_kernel(K)
    if not isinstance(per_channel, bool):
        raise TypeError(f"per_channel must be a bool, got {per_channel!r}")
    K = trim_zero_taps(polyphase_kernel(K, check_stride(stride)))
    *batch, co, ci, h, w = K.shape
    factor = lipgrid_factor(h, w, samples)
    M = K.to(torch.float64).reshape(*batch, co, ci, h * w)
    if per_channel:  # one Gram matrix of the taps per row of the smaller side, summed over the other side
        if co > ci:
            M = M.transpose(-3, -2)
        gram = M.mT @ M  # (..., rows, hw, hw)
        summed = M.shape[-2]
    else:
        gram = (M.flatten(-3, -2).mT @ M.flatten(-3, -2))[..., None, :, :]  # (..., 1, hw, hw)
        summed = co * ci
    # ‖row(ω)‖² = z(ω)ᵀ·gram·conj z(ω) with z_a = exp(−iω·x_a) over the taps x_a: a quadratic form per frequency, on
    # the half grid ω₂ ≤ π (‖K̂(−ω)‖ = ‖K̂(ω)‖ and the grid is symmetric)
    omega1 = 2 * math.pi * torch.arange(samples if h > 1 else 1, dtype=torch.float64, device=K.device) / samples
    omega2 = (
        2 * math.pi * torch.arange(samples // 2 + 1 if w > 1 else 1, dtype=torch.float64, device=K.device) / samples
    )
    E1, E2 = fourier_vectors(omega1, h, torch.float64), fourier_vectors(omega2, w, torch.float64)
    z = (E1[:, None, :, None] * E2[None, :, None, :]).reshape(-1, h * w)  # (F, hw)
    values = ((z @ gram.to(z.dtype)) * z.conj()).real.sum(-1)  # (..., rows, F)
    squared = values.amax(-1).sum(-1)
    # rounding: each computed quadratic form is within e·Σ_ab|gram_ab| of the exact one, with e covering the Gram
    # products (γ over the summed channels), the form's (h w)² terms, and the phases, each good to 32(h + w) + 8
    # ulps (ω and ω·p rounded, then cos and sin, then the product of two); Σ_ab|gram_ab| ≤ h w ‖K‖²_F, summed over
    # the rows too. The allowance is doubled, which covers its own rounding.
    u = torch.finfo(torch.float64).eps / 2
    e = _gamma(summed + 2) + _gamma((h * w) ** 2 + 4) + 4 * (32 * (h + w) + 8) * u
    allowance = 2 * e * h * w * M.detach().square().sum((-3, -2, -1))
    value = (squared.clamp_min(0) + allowance).sqrt()
    return round_up(value * factor * (1 + 16 * u), K.dtype)
