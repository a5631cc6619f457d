"""Kernel validation and the polyphase (space-to-depth) reshape shared by the spectral routines."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import as_positive_int, check_tensor


def check_kernel(K: object, name: str = "K") -> torch.Tensor:
    """A float32/float64 finite kernel ``(..., c_out, c_in, h, w)``."""
    K = check_tensor(name, K)
    if K.dim() < 4:
        raise ValueError(f"{name} must have shape (..., c_out, c_in, h, w), got {tuple(K.shape)}")
    if K.numel() == 0:  # an empty batch has no norm to report; refuse rather than return an empty result
        raise ValueError(f"{name} is empty: shape {tuple(K.shape)}")
    return K


def check_stride(stride: object) -> int:
    """One stride for both spatial axes (an int, or a pair of equal ints)."""
    if isinstance(stride, (tuple, list)):
        if len(stride) != 2 or stride[0] != stride[1]:
            raise ValueError(f"stride must be an int or a pair of equal ints, got {stride!r}")
        stride = stride[0]
    return as_positive_int("stride", stride)


def check_size(n: object, K: torch.Tensor, stride: int) -> int:
    """The input size ``n`` (square n × n) of a circular conv: divisible by the stride, and the polyphase
    kernel must fit in the ``n / stride`` grid (no kernel wraps onto itself)."""
    n = as_positive_int("n", n)
    if n % stride:
        raise ValueError(f"n = {n} must be divisible by stride = {stride} for a circular convolution")
    h, w = -(-K.shape[-2] // stride), -(-K.shape[-1] // stride)
    if n // stride < max(h, w):
        raise ValueError(
            f"n = {n} is too small for the kernel {tuple(K.shape[-2:])} at stride {stride}: "
            f"need n / stride ≥ {max(h, w)}"
        )
    return n


def polyphase_kernel(K: torch.Tensor, stride: int) -> torch.Tensor:
    """The stride-1 kernel of the same operator on the space-to-depth input.

    A conv of stride s with kernel ``K (..., c_out, c_in, h, w)`` equals, up to the orthogonal permutation
    ``x[c, s·i + a, s·j + b] → x'[(c, a, b), i, j]`` of its input, the stride-1 conv with kernel
    ``K'[o, (c, a, b), p, q] = K[o, c, s·p + a, s·q + b]`` (zero outside K), of shape
    ``(..., c_out, c_in·s², ⌈h/s⌉, ⌈w/s⌉)``. So both have the same singular values. Cost O(|K|).
    """
    if stride == 1:
        return K
    *batch, co, ci, h, w = K.shape
    hp, wp = -(-h // stride), -(-w // stride)
    K = torch.nn.functional.pad(K, (0, wp * stride - w, 0, hp * stride - h))
    K = K.reshape(*batch, co, ci, hp, stride, wp, stride)  # [..., o, c, p, a, q, b]
    nb = len(batch)
    K = K.permute(*range(nb), nb, nb + 1, nb + 3, nb + 5, nb + 2, nb + 4)  # [..., o, c, a, b, p, q]
    return K.reshape(*batch, co, ci * stride * stride, hp, wp)


def unpolyphase_kernel(Kp: torch.Tensor, stride: int, size: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`polyphase_kernel`: ``(..., c_out, c_in·s², h', w') → (..., c_out, c_in, h, w)`` for
    ``size = (h, w)``; taps of ``Kp`` that fall outside ``h × w`` (the zero padding of the forward map) are
    dropped, so on any ``Kp`` this is the orthogonal projection onto the kernels of that support. Cost O(|K|)."""
    if stride == 1:
        return Kp[..., : size[0], : size[1]]
    *batch, co, cis, hp, wp = Kp.shape
    s, nb = stride, len(batch)
    K = Kp.reshape(*batch, co, cis // (s * s), s, s, hp, wp)  # [..., o, c, a, b, p, q]
    K = K.permute(*range(nb), nb, nb + 1, nb + 4, nb + 2, nb + 5, nb + 3)  # [..., o, c, p, a, q, b]
    return K.reshape(*batch, co, cis // (s * s), hp * s, wp * s)[..., : size[0], : size[1]]


def trim_zero_taps(K: torch.Tensor) -> torch.Tensor:
    """``K (..., c_out, c_in, h, w)`` without its border rows and columns of taps that are zero in every kernel.

    Dropping them shifts the kernel, which multiplies its symbol ``K̂(ω)`` by a unit scalar ``e^{−i(ω₁a + ω₂b)}``:
    every singular value of the conv is unchanged, and the bounds below use the smaller ``h × w``. An all-zero
    kernel keeps one tap. Cost O(|K|)."""
    live_rows = K.detach().abs().amax(dim=(*range(K.dim() - 2), -1)) > 0
    live_cols = K.detach().abs().amax(dim=tuple(range(K.dim() - 1))) > 0
    if not bool(live_rows.any()):
        return K[..., :1, :1]
    rows, cols = live_rows.nonzero().flatten(), live_cols.nonzero().flatten()
    return K[..., int(rows[0]) : int(rows[-1]) + 1, int(cols[0]) : int(cols[-1]) + 1]


def svd_error_bound(fro: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """An absolute bound on the float64 rounding error of a computed largest singular value of a matrix of
    Frobenius norm at most ``fro`` and shape ``rows × cols``, however it was formed from K (a few products and
    sums per entry): LAPACK's bound ``p(m, n)·ε·‖A‖₂`` for singular values, with the "modestly growing" p(m, n)
    taken as ``8(m + n)``, which also covers the rounding of the entries. Far below any tolerance (1e-10 relative
    for a 512 × 512 × 3 × 3 kernel), it turns a computed value into a guaranteed upper bound."""
    return 8 * (rows + cols) * torch.finfo(torch.float64).eps * fro


def round_up(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float64 upper bound ``value`` in ``dtype``, rounded toward +∞ (a plain cast rounds to the nearest float32,
    which can be below). Differentiable: the rounding step is a constant."""
    out = value.to(dtype)
    if dtype == torch.float64:
        return out
    fixed = out.detach()
    bump = torch.nextafter(fixed, torch.full_like(fixed, math.inf)) - fixed
    return out + torch.where(fixed.double() < value.detach(), bump, torch.zeros_like(bump))


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex64 if dtype == torch.float32 else torch.complex128


def fourier_vectors(omega: torch.Tensor, taps: int, dtype: torch.dtype) -> torch.Tensor:
    """``E[f, p] = exp(−i ω_f p)`` for angles ``omega (F,)`` (float64, on the target device), ``p < taps``; complex
    of the precision of the real ``dtype``. Built in float64, then rounded."""
    p = torch.arange(taps, dtype=torch.float64, device=omega.device)
    one = torch.ones((), dtype=torch.float64, device=omega.device)
    return torch.polar(one, -torch.outer(omega, p)).to(complex_dtype(dtype))


@dataclass
class IterationState:
    """Warm-start state of an iterative estimate (power iteration, HOPM), updated in place by each call.

    Attributes:
        vectors: the last iterates (None before the first call); the next call starts from them.
        iterations: iterations run over all calls.
        converged: whether the last call met its tolerance (False when it ran a fixed number of iterations:
            ``tol=0`` or ``iters=0``).
        value: the last estimate, a detached tensor of the batch shape (None before the first call).

    The vectors live on the kernel's device in its precision; a call with a kernel of another shape, dtype or
    device raises (start a new state, or :meth:`reset` this one).
    """

    vectors: list[torch.Tensor] | None = None
    iterations: int = 0
    converged: bool = False
    value: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the vectors: the next call starts cold."""
        self.vectors, self.converged, self.value = None, False, None
