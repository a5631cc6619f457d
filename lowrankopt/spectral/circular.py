"""Exact singular values of circular (periodic) convolutions, their clipping, and the Gram-iteration bound.

A circular 2-D convolution (torch's cross-correlation) of stride 1 with kernel ``K (c_out, c_in, h, w)`` on
``n × n`` inputs is block-diagonalized by the 2-D DFT (Sedghi, Gupta & Long, ICLR 2019): its singular values
are the union over the ``n²`` frequencies ``ω`` of the singular values of the ``c_out × c_in`` symbol

    K̂(ω) = Σ_{p,q} K[:, :, p, q] · exp(−2πi (ω₁p + ω₂q) / n).

A stride-s conv is first rewritten as a stride-1 conv on the space-to-depth input
(:func:`~lowrankopt.spectral.polyphase_kernel`; Senderovich et al., NeurIPS 2022), on ``n/s × n/s``.
The symbol is formed by a small DFT (``h, w ≪ n``), block by block of frequencies, so that memory stays
bounded at large n.
"""

from __future__ import annotations

import math

import torch

from .._checks import check_scalar
from ._kernel import check_kernel, check_size, check_stride, fourier_vectors, polyphase_kernel, unpolyphase_kernel

__all__ = ["circular_spectral_norm", "clip_singular_values", "conv_singular_values", "gram_iteration_bound"]

_BLOCK_ELEMENTS = 1 << 23  # complex entries of the symbol formed at once (128 MB in complex128)


def _dft(m: int, taps: int, freqs: range, dtype: torch.dtype, device) -> torch.Tensor:
    """``E[f, p] = exp(−2πi f p / m)`` for f in ``freqs``, p < taps."""
    f = torch.tensor(list(freqs), dtype=torch.float64, device=device)
    return fourier_vectors(2 * math.pi * f / m, taps, dtype)


def _symbol_blocks(Kp: torch.Tensor, m: int, onesided: bool):
    """Yield the symbol of the stride-1 kernel ``Kp (..., co, ci, h, w)`` on the ``m × m`` grid in blocks of
    rows ``ω₁``: tensors ``(..., rows, m or m//2+1, co, ci)``. One-sided (``ω₂ ≤ m/2``) suffices for norms:
    ``K̂(−ω) = conj K̂(ω)`` has the same singular values."""
    co, ci, h, w = Kp.shape[-4:]
    cols = range(m // 2 + 1) if onesided else range(m)
    E2 = _dft(m, w, cols, Kp.dtype, Kp.device)
    B = torch.einsum("...ochw,fw->...ochf", Kp.to(E2.dtype), E2)  # (..., co, ci, h, cols)
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(1, len(cols) * co * ci * max(1, Kp[..., 0, 0, 0, 0].numel())))
    for start in range(0, m, rows_per_block):
        E1 = _dft(m, h, range(start, min(m, start + rows_per_block)), Kp.dtype, Kp.device)
        yield torch.einsum("...ochf,eh->...efoc", B, E1)


def _prepare(K, n, stride):
    K = check_kernel(K)
    stride = check_stride(stride)
    n = check_size(n, K, stride)
    return polyphase_kernel(K, stride), n // stride


def conv_singular_values(K: torch.Tensor, n: int, stride: int = 1) -> torch.Tensor:
    """All singular values of the circular conv with kernel ``K`` on ``n × n`` inputs, exactly.

    Args:
        K: ``(..., c_out, c_in, h, w)``, float32 or float64 (leading dims are a batch of kernels).
        n: input height = width; divisible by ``stride``, with ``n / stride ≥ ⌈h / stride⌉, ⌈w / stride⌉``.
        stride: the conv's stride (same on both axes).

    Returns ``(..., m, m, min(c_out, c_in·s²))`` with ``m = n / s``: at ``[..., ω₁, ω₂, :]`` the singular values
    of the symbol at that frequency, descending. Their union is the spectrum of the ``(c_out m²) × (c_in n²)``
    Jacobian (Sedghi et al. 2019). Differentiable (through ``svdvals``; gradients need distinct values).

    Cost: O(m² c_out c_in (h' + w')) for the symbol and m² SVDs of ``c_out × c_in s²`` matrices,
    O(m² c_out c_in s² min(c_out, c_in s²)) — instead of the SVD of the dense Jacobian.
    """
    Kp, m = _prepare(K, n, stride)
    return torch.cat([torch.linalg.svdvals(A) for A in _symbol_blocks(Kp, m, onesided=False)], dim=-3)


def circular_spectral_norm(K: torch.Tensor, n: int, stride: int = 1) -> torch.Tensor:
    """``‖J‖₂`` of the circular conv on ``n × n`` inputs, exactly: the largest singular value over the
    frequencies (the one-sided half of the grid suffices). Shape ``(...)``; differentiable.

    Cost: half of :func:`conv_singular_values`'s.
    """
    Kp, m = _prepare(K, n, stride)
    maxima = [torch.linalg.matrix_norm(A, ord=2).flatten(-2).amax(-1) for A in _symbol_blocks(Kp, m, True)]
    return torch.stack(maxima, -1).amax(-1)


def gram_iteration_bound(K: torch.Tensor, n: int, stride: int = 1, iters: int = 6) -> torch.Tensor:
    """An upper bound on the circular conv's ``‖J‖₂`` by Gram iteration (Delattre, Barthélemy, Araujo &
    Allauzen, ICML 2023).

    For each frequency, ``σ₁(A) ≤ ‖G_t‖_F^{1/2^t}`` with ``G₀ = A``, ``G_{t+1} = G_tᴴ G_t``; the bound converges
    to σ₁ super-linearly in t. Each G is rescaled to unit norm and the scale kept in log space (no overflow).
    We take the maximum over frequencies of the per-frequency bounds, which is never larger than Delattre's
    Frobenius norm of the whole block-diagonal Gram iterate (the same cost). Differentiable, no SVD.

    Args:
        K: ``(..., c_out, c_in, h, w)``.
        n: input size (as in :func:`conv_singular_values`).
        stride: the conv's stride.
        iters: Gram steps t ≥ 0 (t = 0 is the Frobenius norm). The bound exceeds
            σ₁ by at most a factor ``c^{1/2^{t+1}}`` (c = min(c_out, c_in s²)): 1.033 for c = 64 at t = 6, and in
            practice far less (the benchmark measures it).

    Returns ``(...)``. Cost: O(m² c_out c_in (h' + w')) for the symbol, then t products of
    ``c × c`` matrices per frequency, c = min(c_out, c_in s²): O(t m² c³).
    """
    Kp, m = _prepare(K, n, stride)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    out = []
    for A in _symbol_blocks(Kp, m, onesided=True):
        G = A if A.shape[-2] >= A.shape[-1] else A.mT  # G_1 = GᴴG is then the smaller Gram matrix
        log_scale = torch.zeros(G.shape[:-2], dtype=Kp.dtype, device=Kp.device)
        tiny = torch.finfo(Kp.dtype).tiny  # a zero symbol (e.g. a difference kernel at ω = 0) stays 0, not NaN
        for _ in range(iters):
            norm = torch.linalg.matrix_norm(G).clamp_min(tiny)
            G = G / norm[..., None, None]
            log_scale = 2 * (log_scale + norm.log())
            G = G.mH @ G
        log_bound = (log_scale + torch.linalg.matrix_norm(G).clamp_min(tiny).log()) / 2**iters
        out.append(log_bound.flatten(-2).amax(-1))
    return torch.stack(out, -1).amax(-1).exp()


@torch.no_grad()
def clip_singular_values(K: torch.Tensor, n: int, max_sv: float, stride: int = 1, rescale: bool = True) -> torch.Tensor:
    """Cap the singular values of the circular conv with kernel ``K`` on ``n × n`` inputs at ``max_sv``.

    The projection of Senderovich et al. (NeurIPS 2022): SVD of the symbol at each frequency, singular values
    clipped to ``max_sv``, inverse DFT — the ``n × n`` kernel of the clipped operator — and the orthogonal
    projection back onto the kernel's ``h × w`` support. That last step can push the norm slightly above the
    cap again; with ``rescale`` (default) the kernel is then scaled by ``max_sv / ‖J‖₂``, so that the cap holds
    exactly (up to rounding) on the circular operator at size n. A kernel already within the cap comes back
    unchanged up to rounding (a new tensor).

    Args:
        K: ``(..., c_out, c_in, h, w)``.
        n: input size (as in :func:`conv_singular_values`).
        stride: the conv's stride.
        max_sv: the cap, > 0.
        rescale: scale down to enforce the cap exactly after the support projection.

    Returns a new kernel of the shape of ``K`` (not differentiable: a projection step for training loops).
    Cost: O(m² c_out c_in s² min(c_out, c_in s²)) for the SVDs, O(m² log m · c_out c_in s²) for the inverse FFT.
    """
    Kp, m = _prepare(K, n, stride)
    max_sv = check_scalar("max_sv", max_sv)
    if not max_sv > 0:
        raise ValueError(f"max_sv must be positive, got {max_sv}")
    s = check_stride(stride)
    h, w = K.shape[-2:]
    hp, wp = Kp.shape[-2:]
    full = []
    for A in _symbol_blocks(Kp, m, onesided=False):
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        full.append((U * S.clamp(max=max_sv).to(U.dtype)[..., None, :]) @ Vh)
    A = torch.cat(full, dim=-4).movedim(-2, -4).movedim(-1, -3)  # (..., co, ci s², m, m)
    Kp_new = torch.fft.ifft2(A).real[..., :hp, :wp].to(K.dtype)
    K_new = unpolyphase_kernel(Kp_new, s, (h, w)).contiguous()  # crop: the projection onto K's support
    if rescale:
        norm = circular_spectral_norm(K_new, n, stride)
        K_new = K_new * (max_sv / norm).clamp(max=1)[..., None, None, None, None]
    return K_new
