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
    """An **assumed** absolute bound on the float64 error of a computed largest singular value of a matrix of
    Frobenius norm at most ``fro`` and shape ``rows × cols``, however it was formed from K (a few products and
    sums per entry): LAPACK documents ``p(m, n)·ε·‖A‖₂`` for singular values with an unspecified "modestly
    growing" p(m, n); here it is taken as ``8(m + n)``, which also covers the rounding of the entries. This is
    an assumption on the SVD, not a proof (:func:`certified_matrix_norm` proves its bound after the fact, at
    two to three times the cost of the singular values alone). Far below any tolerance (1e-10 relative for a
    512 × 512 × 3 × 3 kernel)."""
    return 8 * (rows + cols) * torch.finfo(torch.float64).eps * fro


_UNIT_ROUNDOFF = 2.0**-53  # float64
_UNDERFLOW_SLACK = 2.0**-500  # per computed norm: absorbs every underflow (each ≤ 2^-1075, far fewer than 2^500)


def _gamma(k: int) -> float:
    """Higham's ``γ_k = k u / (1 − k u)``: ``|fl(xᵀy) − xᵀy| ≤ γ_k |x|ᵀ|y|`` for a k-term float64 dot product,
    summed in any order, with or without FMA."""
    return k * _UNIT_ROUNDOFF / (1 - k * _UNIT_ROUNDOFF)


def _fro_upper(X: torch.Tensor) -> torch.Tensor:
    """An upper bound on the exact Frobenius norm of the float64 ``X (..., m, n)`` from the computed one: the sum
    of N squares has relative error at most γ_N, the square root u."""
    N = X.shape[-2] * X.shape[-1]
    return torch.linalg.vector_norm(X, dim=(-2, -1)) * (1 + 2 * _gamma(N + 2)) + _UNDERFLOW_SLACK


def certified_matrix_norm(A: torch.Tensor) -> torch.Tensor:
    """A guaranteed upper bound on ``‖A‖₂`` for float64 ``A (..., m, n)``, certified after the SVD: it does not
    rest on how accurate LAPACK's SVD is, only on float64 arithmetic being IEEE (every operation correctly
    rounded) and matrix products being classical (any summation order, FMA allowed; not Strassen-like).

    With the computed ``U, S, Vᵀ`` (whatever they are) and ``Ã = U diag(S) Vᵀ`` formed from them exactly,
    Weyl's inequality gives ``‖A‖₂ ≤ ‖Ã‖₂ + ‖A − Ã‖₂``, and ``‖Ã‖₂ ≤ ‖U‖₂ max S ‖Vᵀ‖₂`` with
    ``‖U‖₂² ≤ 1 + ‖UᵀU − I‖_F`` (the same for V), so

        ``‖A‖₂ ≤ max S · (1 + e_U/2)(1 + e_V/2) + ‖A − Ã‖_F,   e_U ≥ ‖UᵀU − I‖_F,  e_V ≥ ‖VᵀV − I‖_F``.

    The three residuals are computed in float64 and bounded with their rounding (``|fl(XY) − XY| ≤ γ_k|X||Y|``
    for inner dimension k, and ``‖|X||Y|‖_F ≤ ‖X‖_F‖Y‖_F``); each error term is then doubled, which covers the
    rounding of its own few operations. A is first scaled by a power of two so that its largest entry is in
    [1, 2) (exact but for entries that become subnormal, whose error, like every underflow, is absorbed by
    ``2^-500`` per norm). The result is also capped by ``‖A‖_F`` (rigorous, loose), which is what an SVD that
    returns NaN gives. On an accurate SVD the certificate adds about ``(m + n)·min(m, n)·ε`` relative: 5e-12
    for a 576 × 64 unfolding, 3e-10 for 4608 × 512.

    The entries of A must be the exact data (a float32 or float64 kernel, permuted and reshaped, is).

    Returns ``(...)``, float64; differentiable in A through the largest computed singular value (the certified
    slack is a constant). Cost: one SVD with vectors and three products of its sizes, O(m n min(m, n)).
    """
    m, n = A.shape[-2:]
    k = min(m, n)
    amax = A.detach().abs().amax(dim=(-2, -1))
    exponent = torch.frexp(amax)[1].clamp(min=-999)  # amax = mantissa · 2^exponent, mantissa ∈ [1/2, 1)
    scale = torch.ldexp(torch.ones_like(amax), 1 - exponent)
    As = A * scale[..., None, None]
    U, S, Vh = torch.linalg.svd(As, full_matrices=False)
    with torch.no_grad():
        U, S0, Vh, Ad = U.detach(), S.detach(), Vh.detach(), As.detach()
        eye = torch.eye(k, dtype=A.dtype, device=A.device)
        US = U * S0[..., None, :]
        us_fro, vh_fro, u_fro = _fro_upper(US), _fro_upper(Vh), _fro_upper(U)
        residual = _fro_upper(Ad - US @ Vh) / (1 - _UNIT_ROUNDOFF) + _gamma(k + 1) * us_fro * vh_fro
        e_u = _fro_upper(U.mT @ U - eye) / (1 - _UNIT_ROUNDOFF) + _gamma(m) * u_fro**2
        e_v = _fro_upper(Vh @ Vh.mT - eye) / (1 - _UNIT_ROUNDOFF) + _gamma(n) * vh_fro**2
        certified = S0.abs().amax(-1) * (1 + e_u) * (1 + e_v) + 2 * residual  # the e/2 and residual doubled
        certified = certified * (1 + 16 * _UNIT_ROUNDOFF)  # the rounding of the line above
        fro = _fro_upper(Ad)
        certified = torch.where(torch.isfinite(certified), torch.minimum(certified, fro), fro)
        certified = torch.where(amax > 0, certified, torch.zeros_like(certified))  # ‖0‖₂ = 0 exactly
    # the value is S₀ + (bound − S₀), which carries S₀'s gradient; with S₀ clamped into [0, bound] and two more
    # ulps on the bound, its rounding cannot take it below the bound
    top = torch.minimum(torch.nan_to_num(S[..., 0], nan=0.0, posinf=0.0).clamp_min(0), certified)
    value = top + (certified * (1 + 4 * _UNIT_ROUNDOFF) - top.detach())
    # unscaling is exact unless the result is subnormal (rounded by at most the smallest subnormal, added back)
    return torch.where(amax > 0, value / scale + 2.0**-1074, value)


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
