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
from ._kernel import _gamma, check_kernel, check_stride, polyphase_kernel, round_up, trim_zero_taps
from .circular import _symbol_blocks

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
    columns of zero taps (a shift, which changes no ``‖K̂(ω)‖``; it lowers ``h, w`` in the factor). The symbol is
    evaluated by small DFTs in float64, in blocks of frequencies (the half grid ``ω₂ ≤ π`` suffices:
    ``K̂(−ω) = conj K̂(ω)``); the computed norms carry an allowance for their rounding (about
    ``(hw + 32(h + w))·u·√(hw)·‖K‖_F`` absolute for the DFT and Higham's ``γ_{c_out c_in + 2}`` relative for the
    sums of squares), and the result is rounded up into K's
    dtype: a guaranteed upper bound on ``sup_ω ‖K̂(ω)‖_F ≥ sup_ω ‖K̂(ω)‖₂`` — hence on the conv's norm for zero
    padding of any amount at any n, and for circular padding up to "same" at n divisible by the stride — not on
    larger circular paddings (:mod:`lowrankopt.spectral.bounds`).

    Tightness: the factor tends to 1 as ``samples`` grows, the value to ``sup_ω ‖K̂(ω)‖_F``, which equals the
    conv's n-independent norm ``sup_ω ‖K̂(ω)‖₂`` only when ``K̂(ω)`` has rank one at its peak (one input or one
    output channel). For many channels ``‖K̂‖_F`` can be up to ``√min(c_out, c_in s²)`` times ``‖K̂‖₂``: on
    He-initialized ``c × c × 3 × 3`` kernels the bound is about 0.55·√c times the norm (the ``conv-norms``
    benchmark measures it), looser than :func:`~lowrankopt.spectral.tensor_norm_bound`.

    Args:
        K: ``(..., c_out, c_in, h, w)``, float32 or float64; leading dims are a batch of kernels.
        stride: the conv's stride (the bound is that of the polyphase kernel).
        samples: grid points N per axis (the reference's default 50); N ≥ π(h + w − 2)/2 (the factor ≤ 2).
        per_channel: the paper's theorem's form (sum over rows of per-row maxima) instead of the Frobenius form.

    Returns ``(...)`` in K's dtype; differentiable in K (through the grid point that gives the maximum).
    Cost: the symbol on the half grid, ``O(c_out c_in s² N² (h' + w'))`` for the polyphase ``h' × w'``, and its
    norms, ``O(c_out c_in s² N²)``; no SVD; independent of the input size.
    """
    K = check_kernel(K)
    if not isinstance(per_channel, bool):
        raise TypeError(f"per_channel must be a bool, got {per_channel!r}")
    K = trim_zero_taps(polyphase_kernel(K, check_stride(stride)))
    *batch, co, ci, h, w = K.shape
    factor = lipgrid_factor(h, w, samples)
    Kd = K.to(torch.float64)
    rows_dim = -2 if co <= ci else -1  # per_channel: the rows of the smaller side (the smaller sum of maxima)
    maxima = []
    for A in _symbol_blocks(Kd, samples, onesided=True):  # (..., ω₁ block, ω₂ ≤ π, co, ci)
        power = A.real.square() + A.imag.square()
        if per_channel:
            maxima.append(power.sum(-1 if rows_dim == -2 else -2).flatten(-3, -2).amax(-2))  # (..., rows)
        else:
            maxima.append(power.sum((-2, -1)).flatten(-2).amax(-1))
    squared = torch.stack(maxima, -1).amax(-1)
    if per_channel:
        squared = squared.sum(-1)
    # rounding: each symbol entry is a DFT of h·w taps with phases exp(−iωp) good to (32·(h + w) + 4) ulps (ω
    # and ω·p rounded, then cos and sin): |error| ≤ (γ_{hw+2} + that)·Σ|K_ij|, whose root-sum of squares over the
    # entries is at most √(hw)·‖K‖_F (for the rows too); then γ_{co·ci+2} relative for the sums of squares
    u = torch.finfo(torch.float64).eps / 2
    fro = torch.linalg.vector_norm(Kd.detach().flatten(-4), dim=-1)
    dft_error = (_gamma(h * w + 2) + (32 * (h + w) + 4) * u) * math.sqrt(h * w) * fro
    value = squared.sqrt() * (1 + _gamma(co * ci + 2)) + dft_error
    return round_up(value * factor * (1 + 16 * u), K.dtype)
