"""A certified upper bound on ``sup_ω ‖K̂(ω)‖₂`` — the norm of a conv on inputs of every size — by a frequency search.

For the paddings and sizes listed in :mod:`lowrankopt.spectral.bounds`, ``‖J‖₂ ≤ sup_ω ‖K̂(ω)‖₂`` with the symbol
``K̂(ω) = Σ_{p,q} K[:, :, p, q] e^{−i(ω₁p + ω₂q)}``, and it is the smallest bound that holds at every input size
(a zero-padded conv's norm tends to it as n grows). Sampling ``‖K̂(ω)‖₂`` on a grid gives values *below* the
sup; the certificate below turns a grid maximum into an upper bound.

**Certificate.** Let the sup ``M`` be attained at ω* with top singular vectors x, y, and let ``σ_k = (t_k − 1)/2``
for ``t₁ = h``, ``t₂ = w`` taps. Then ``T(ω) = Re(e^{iφ} e^{i(σ₁ω₁ + σ₂ω₂)} xᴴK̂(ω)y)`` (φ chosen so that
``T(ω*) = M``) is a real sum of exponentials with frequencies in ``[−σ₁, σ₁] × [−σ₂, σ₂]`` and ``|T| ≤ M``
everywhere. Along the segment from ω* to any ω with ``|ω_k − ω*_k| ≤ a_k``, ``g(t) = T(ω* + t(ω − ω*))`` is such
a sum in t with frequencies at most ``θ = σ₁a₁ + σ₂a₂`` in modulus, bounded by M, maximal at t = 0 (so
``g'(0) = 0``); Bernstein's inequality applied twice gives ``|g''| ≤ θ²M``, and Taylor's theorem
``g(1) ≥ M(1 − θ²/2)``. Hence ``‖K̂(ω)‖₂ ≥ |xᴴK̂(ω)y| ≥ T(ω) ≥ M(1 − θ²/2)``: **any point within a_k of ω* on
each axis certifies** ``M ≤ ‖K̂(ω)‖₂ / (1 − θ²/2)``.

**Search (branch and bound).** A grid of cells of half-widths ``a_k`` (``8(t_k − 1)`` cells per axis, one per
axis without taps to vary; only the half ``ω₂ ∈ [0, π]`` since ``K̂(−ω) = conj K̂(ω)`` for real K). The cell
holding ω* has a center with ``‖K̂‖₂ ≥ M(1 − θ²/2) ≥ L(1 − θ²/2)`` for the best value L found so far, so the
cells below that are dropped, the others split in 2 × 2 with half the widths, until ``1/(1 − θ²/2) ≤ 1 + rtol``.
At every level ``max ‖K̂‖₂ / (1 − θ²/2)`` over the kept centers is a bound; the smallest is returned.
Each ``‖K̂(ω)‖₂`` is an SVD in float64 with an allowance for its error added (and allowed for when cells are
dropped), and the result is rounded up into K's dtype. The allowance is LAPACK's documented error bound
``p(m, n)·ε·‖A‖₂`` for singular values, with its unspecified "modestly growing" ``p(m, n)`` taken as ``8(m + n)``
(:func:`~lowrankopt.spectral._kernel.svd_error_bound`): the bound is **guaranteed up to that constant**, an
assumption on the SVD — unlike :func:`~lowrankopt.spectral.tensor_norm_bound`, whose SVDs are certified after the
fact (doing the same at every frequency would cost about four times the search).
"""

from __future__ import annotations

import math
from typing import Literal, overload

import torch

from .._checks import as_positive_int, as_tolerance
from ._kernel import (
    check_kernel,
    check_stride,
    fourier_vectors,
    polyphase_kernel,
    round_up,
    svd_error_bound,
    trim_zero_taps,
)

__all__ = ["symbol_norm_bound"]

_BLOCK_ELEMENTS = 1 << 22  # complex entries of the partial symbol formed at once (64 MB in complex128)


def _symbol_norms(K: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """``‖K̂(ω)‖₂`` at the frequencies ``omega (P, 2)`` for one float64 kernel ``K (c_out, c_in, h, w)``: ``(P,)``.
    Cost O(P c_out c_in (h + min(c_out, c_in))·min side)."""
    co, ci, h, w = K.shape
    Kc = K.to(torch.complex128).reshape(co * ci * h, w)
    per_block = max(1, _BLOCK_ELEMENTS // (co * ci * h))
    norms = []
    for start in range(0, len(omega), per_block):
        om = omega[start : start + per_block]
        E1, E2 = fourier_vectors(om[:, 0], h, K.dtype), fourier_vectors(om[:, 1], w, K.dtype)  # (P, h), (P, w)
        partial = (Kc @ E2.T).reshape(co, ci, h, len(om))  # the sum over q first, then over p
        symbol = (partial * E1.T).sum(2).permute(2, 0, 1)  # (P, c_out, c_in)
        norms.append(torch.linalg.matrix_norm(symbol, ord=2))
    return torch.cat(norms)


def _first_grid(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, list[float]]:
    """The centers ``(P, 2)`` and half-widths of the first cells: ``8(t − 1)`` per axis with t > 1 taps (θ = π/16
    per axis), one otherwise; on the axis ω₂ (ω₁ if w = 1) only the centers in ``[0, π]``, whose cells cover that
    closed half because the count is even."""
    counts = [8 * (t - 1) if t > 1 else 1 for t in (h, w)]
    axes = [2 * math.pi * torch.arange(n, dtype=torch.float64, device=device) / n for n in counts]
    half_axis = 1 if w > 1 else 0
    axes[half_axis] = axes[half_axis][: counts[half_axis] // 2 + 1]
    grid = torch.stack([g.flatten() for g in torch.meshgrid(*axes, indexing="ij")], 1)
    return grid, [math.pi / n if t > 1 else 0.0 for n, t in zip(counts, (h, w), strict=True)]


def _split(centers: torch.Tensor, half: list[float]) -> torch.Tensor:
    """The 2 × 2 (2 × 1 on an axis without taps to vary) sub-cell centers of each cell, for the new ``half``."""
    offsets = torch.cartesian_prod(
        *[torch.tensor([-a, a] if a else [0.0], dtype=torch.float64, device=centers.device) for a in half]
    )
    return (centers[:, None, :] + offsets.reshape(1, -1, 2)).reshape(-1, 2)


def _search(K: torch.Tensor, rtol: float, max_evals: int, error: float):
    """Branch and bound of the module docstring for one detached float64 kernel. Returns the frequency whose
    value gives the bound, that value and its level's factor ``1 − θ²/2`` (bound = (value + error) / factor), and
    the frequency of the best value found."""
    co, ci, h, w = K.shape
    sigma = ((h - 1) / 2, (w - 1) / 2)
    centers, half = _first_grid(h, w, K.device)
    evals, best, best_at = 0, -math.inf, None
    upper = (math.inf, None, 0.0, 1.0)  # (bound, frequency, value, factor)
    while True:
        values = _symbol_norms(K, centers)
        evals += len(centers)
        top = int(values.argmax())
        if values[top].item() > best:
            best, best_at = values[top].item(), centers[top]
        theta = sigma[0] * half[0] + sigma[1] * half[1]
        factor = 1 - theta * theta / 2  # > 0: θ ≤ π/8 at the first level
        if (values[top].item() + error) / factor < upper[0]:
            upper = ((values[top].item() + error) / factor, centers[top], values[top].item(), factor)
        if 1 / factor <= 1 + rtol:
            break
        keep = values >= (best - error) * factor - error  # the cell of ω* stays, rounding allowed for
        half = [a / 2 for a in half]
        children = _split(centers[keep], half)
        if evals + len(children) > max_evals:
            break  # the bound of the levels done holds; only the tolerance is not met
        centers = children
    return upper[1], upper[2], upper[3], best_at


@overload
def symbol_norm_bound(
    K: torch.Tensor,
    stride: int = 1,
    *,
    rtol: float = 1e-3,
    max_evals: int = 20_000,
    return_lower: Literal[False] = False,
) -> torch.Tensor: ...


@overload
def symbol_norm_bound(
    K: torch.Tensor, stride: int = 1, *, rtol: float = 1e-3, max_evals: int = 20_000, return_lower: Literal[True]
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def symbol_norm_bound(
    K: torch.Tensor, stride: int = 1, *, rtol: float = 1e-3, max_evals: int = 20_000, return_lower: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


def symbol_norm_bound(
    K: torch.Tensor,
    stride: int = 1,
    *,
    rtol: float = 1e-3,
    max_evals: int = 20_000,
    return_lower: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A guaranteed upper bound on ``sup_ω ‖K̂(ω)‖₂ ≥ ‖J‖₂``, within ``rtol`` of that sup, for every input size.

    The certified frequency search of the module docstring on the polyphase kernel (border rows and columns of
    zero taps dropped: a shift), one kernel at a time. The value is at most ``(1 + rtol)`` times the sup (plus
    rounding) unless ``max_evals`` stops the refinement first — on kernels whose ``‖K̂(ω)‖₂`` is nearly flat over
    large regions (orthogonal convs), where most cells stay in the search — and is a bound either way
    (guaranteed up to the SVD error constant of the module docstring); stopped, it is at most the sup (plus
    rounding) over ``1 − θ²/2`` for the θ of the last level done, 1.083 after the first grid.
    It holds for zero padding of any amount and any input size, and for circular padding up to "same" on input
    sizes divisible by the stride (:mod:`lowrankopt.spectral.bounds`). When the search reaches ``rtol`` it is at
    most ``(1 + rtol)·√(hw)·‖K‖_σ`` (plus rounding; ``h × w`` as in :func:`~lowrankopt.spectral.tensor_norm_bound`),
    so up to ``rtol`` at least as tight as the tensor-norm bound of Grishina et al., and unlike the HOPM value
    (:func:`~lowrankopt.spectral.tensor_norm_estimate`) it is certified.

    Args:
        K: ``(..., c_out, c_in, h, w)``, float32 or float64; leading dims are a batch of kernels.
        stride: the conv's stride.
        rtol: target relative gap to the sup, > 0 (1e-3: five levels of cells for a 3×3 kernel).
        max_evals: symbol norms (SVDs) per kernel at most; the search stops before a level that would exceed it.
            The first grid is evaluated whatever ``max_evals``: ``8(h − 1)·(4(w − 1) + 1)`` frequencies for the
            trimmed polyphase kernel's ``h, w > 1`` (144 for 3 × 3, 544 for 5 × 5), ``4(t − 1) + 1`` for a
            1 × t or t × 1 kernel, 1 for 1 × 1.
        return_lower: also return a lower end: ``‖K̂(ω)‖₂`` at the best frequency found (minus its rounding
            bound), so ``lower ≤ sup ≤ upper``.

    Returns ``(...)`` in K's dtype (the upper bound), or ``(lower, upper)`` with ``return_lower``; differentiable in K
    (through the SVD at the frequency that gives the value).
    Cost: per kernel, P SVDs of ``c_out × c_in s²`` complex matrices, O(P c_out c_in s² min(c_out, c_in s²)), with
    P the frequencies searched, at most ``max_evals`` — at rtol = 1e-3, 346 for a random 16 × 16 × 3 × 3 kernel,
    1070 for 64 × 64 × 3 × 3 (1 s on one CPU thread), 4078 for 64 × 64 × 5 × 5 — independent of the input size.
    Far more than :func:`~lowrankopt.spectral.tensor_norm_bound` (seven SVDs of K's unfoldings).
    """
    K = check_kernel(K)
    K = trim_zero_taps(polyphase_kernel(K, check_stride(stride)))
    rtol = as_tolerance("rtol", rtol)
    if rtol <= 0:
        raise ValueError(f"rtol must be positive, got {rtol}")
    max_evals = as_positive_int("max_evals", max_evals)
    *batch, co, ci, h, w = K.shape
    kernels = K.to(torch.float64).reshape(-1, co, ci, h, w)
    uppers, lowers = [], []
    for Kb in kernels:
        fro = torch.linalg.vector_norm(Kb.detach()).item()
        error = svd_error_bound(torch.tensor(math.sqrt(h * w) * fro), co + h * w, ci).item()
        up_at, found, factor, low_at = _search(Kb.detach(), rtol, max_evals, error)
        at_up = _symbol_norms(Kb, up_at[None])[0]  # the same value, now differentiable
        uppers.append((at_up + max(found - at_up.item(), 0.0) + error) / factor)  # never below the search's value
        if return_lower:
            lowers.append((_symbol_norms(Kb, low_at[None])[0] - error).clamp_min(0))
    eps = torch.finfo(torch.float64).eps
    upper = round_up(torch.stack(uppers).reshape(batch) * (1 + 4 * eps), K.dtype)
    if not return_lower:
        return upper
    lower = -round_up(-torch.stack(lowers).reshape(batch) * (1 - 4 * eps), K.dtype)
    return lower, upper
