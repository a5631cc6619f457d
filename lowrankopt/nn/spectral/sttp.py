"""Spectral tensor-train parameterization (STTP) of linear and convolutional layers.

Obukhov, Rakhuba, Liniger, Huang, Georgoulis, Dai, Van Gool, *Spectral Tensor Train Parameterization of
Deep Learning Layers*, AISTATS 2021 (re-derived; no code copied). A weight ``W: (d_out, d_in)`` (a conv
kernel reshaped to ``C_out × C_in k_h k_w``) is a compact SVD

    W = U diag(σ) Vᵀ,     U: (d_out, r),  V: (d_in, r)  with orthonormal columns,

and U, V are each a tensor train over a factorization of their rows, ``d = n_1 ⋯ n_D``: cores
``G_k: (R_{k−1}, n_k, R_k)``, ``R_0 = 1``, ``R_D = r``, ``R_k = min(R, n_1 ⋯ n_k, n_{k+1} ⋯ n_D r)`` (R the
``rank`` argument, the maximal TT-rank; ``r = min(R, d_out, d_in)``), whose left unfoldings
``(R_{k−1} n_k) × R_k`` have orthonormal columns — then U has orthonormal columns (STTP's Prop. 1).

**Non-redundant gauge.** Each core is a Householder product (:mod:`lowrankopt.nn.orthogonal.householder`): the
*reduced* layout (Grassmann, ``(R_{k−1} n_k − R_k) R_k`` parameters) for every core except the two next to σ, which
are full Stiefel; with ``spectrum="identity"`` the last U core is reduced too (``(U, V) ~ (UQ, VQ)``). The parameter
count is then exactly

    Σ_k R_{k−1} n_k R_k − Σ_k R_k²          (learned spectrum: the dimension of the TT manifold of W),

minus ``r (r + 1) / 2`` for the identity spectrum (σ = 1 and the O(r) gauge). At maximal ranks this is
SVDP (``U, V`` single Stiefel factors), :class:`SVDPLinear`.

**Spectrum.** ``"identity"``: σ = ±1 (fixed signs, a buffer set by :meth:`~_STTPBase.load_dense`; they make
both determinant components of ``U Vᵀ`` reachable when the Householder maps alone reach one). ``"learned"``:
a parameter s (initialized to 1) and ``σ = lipschitz · s / max|s|``, so ``‖W‖₂ = lipschitz`` exactly (1 by
default: a 1-Lipschitz layer; the overall scale of s is then one redundant parameter); with
``lipschitz=None``, ``σ = s`` (unconstrained). For :class:`STTPConv2d` the bound holds for the reshaped
kernel matrix (as in spectral normalization, Miyato et al.), not for the conv operator, whose norm can be
up to ``sqrt(k_h k_w)`` times larger. ``"learned+dopt"``: as learned, and
:func:`dopt_penalty` adds the D-optimal regularizer ``−mean log |s / max|s||`` of the layer.

**Two ways to train the same layer** (``parametrization``): ``"householder"`` — Euclidean parameters
(the reflector entries, exactly the degrees of freedom above), any ``torch.optim`` optimizer, U and V
orthonormal by construction; ``"stiefel"`` — every core is a point on ``geoopt.EuclideanStiefel`` (QR retraction; a
``geoopt.ManifoldParameter``, one per group of equally shaped cores; the TT gauge is then free, so the
parameter count exceeds the formula), trained with ``geoopt.optim.RiemannianSGD`` / ``RiemannianAdam``.
In both, equally shaped cores are built together: one batched Householder product per (core shape, layout)
of U and of V.

Forward cost: U and V are contracted from their cores (``O(d r Σ R_k)`` for d rows) and applied as
two thin products, ``O(B (d_in + d_out) r)`` for a batch of B — W is never formed (``to_dense`` forms it
on request).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..._checks import as_positive_int
from ...formats.tt import tt_svd
from .._common import (
    _check_dtype,
    _check_image,
    _check_input,
    _conv_padding,
    _dense_conv,
    _dense_linear,
    _full_precision,
    _init_bias,
    _kw,
    _legacy_selection,
    _pair,
    _refuse_half,
)
from ..orthogonal.orthonormal_tt import OrthonormalTT
from ..surgery import Targets, replace_modules, select_modules

__all__ = [
    "STTPConv2d",
    "STTPLinear",
    "SVDPConv2d",
    "SVDPLinear",
    "convert_to_sttp",
    "dopt_penalty",
]

SPECTRA = ("identity", "learned", "learned+dopt")
PARAMETRIZATIONS = ("householder", "stiefel")


def prime_factors(n: int) -> list[int]:
    """The prime factors of n in non-decreasing order (``[n]`` for n ≤ 3; ``[1]`` for n = 1)."""
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out + [n] if n > 1 or not out else out


def _spectrum(spectrum: str) -> str:
    if spectrum not in SPECTRA:
        raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
    return spectrum


class _STTPBase(torch.nn.Module):
    """What the linear and conv layers share: the factors U (out side), V (in side), σ, and their loading."""

    def _init_factors(
        self, d_out, d_in, rank, out_modes, in_modes, spectrum, lipschitz, parametrization, dtype, device, generator
    ):
        self.spectrum = _spectrum(spectrum)
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
        self.max_rank = rank
        rank = min(rank, d_out, d_in)  # the number of singular values
        if lipschitz is not None and (
            isinstance(lipschitz, bool) or not (isinstance(lipschitz, int | float) and 0 < lipschitz < math.inf)
        ):
            raise ValueError(f"lipschitz must be a positive number or None, got {lipschitz!r}")
        self.rank, self.lipschitz, self.parametrization = rank, lipschitz, parametrization
        learned = spectrum != "identity"
        common = dict(max_rank=self.max_rank, parametrization=parametrization, dtype=dtype, generator=generator)
        name = f"{type(self).__name__}(d_out={d_out}, d_in={d_in}, rank={self.max_rank})"
        self.U = OrthonormalTT(out_modes, rank, last="full" if learned else "reduced", owner=f"{name}.U", **common)
        self.V = OrthonormalTT(in_modes, rank, last="full", owner=f"{name}.V", **common)
        self.s = torch.nn.Parameter(torch.ones(rank, dtype=dtype)) if learned else None
        # identity spectrum: fixed signs ±1 (set by load_dense), so that both determinant components of
        # U Vᵀ are reachable when the Householder maps alone reach one (square last cores)
        self.register_buffer("signs", None if learned else torch.ones(rank, dtype=dtype))
        self.to(device)

    def singular_values(self) -> torch.Tensor:
        """σ, the diagonal of the compact SVD ``W = U diag(σ) Vᵀ`` (signs may be negative). Cost ``O(r)``."""
        if self.s is None:
            return self.signs
        if self.lipschitz is None:
            return self.s
        return self.lipschitz * self.s / self.s.abs().max().clamp_min(torch.finfo(self.s.dtype).tiny)

    def dopt_penalty(self) -> torch.Tensor:
        """The D-optimal regularizer ``−mean log |s / max|s||`` (≥ 0; 0 when all singular values are equal)."""
        if self.s is None:
            raise ValueError("dopt_penalty needs a learned spectrum")
        eps = torch.finfo(self.s.dtype).eps
        return -torch.log((self.s.abs() / self.s.abs().max().clamp_min(eps)).clamp_min(eps)).mean()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, σ, V)`` with ``U: (d_out, r)``, ``V: (d_in, r)``. Cost ``O((d_out + d_in) r Σ R_k)``."""
        return self.U.matrix(), self.singular_values(), self.V.matrix()

    def _forward_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`factors` for a forward on ``x``: refused in half precision, built with autocast off (in the
        parameters' dtype; only the products with ``x`` autocast)."""
        needs = "its orthonormal factors need QR (Householder products, Stiefel retractions)"
        _refuse_half(self, self.U.params[0].dtype, needs)
        with _full_precision(x):
            return self.factors()

    def weight_matrix(self) -> torch.Tensor:
        """The dense ``(d_out, d_in)`` weight (tests, ``to_dense``). Cost ``O(d_out d_in r)``."""
        U, s, V = self.factors()
        return (U * s) @ V.T

    def dof(self) -> int:
        """Degrees of freedom: ``Σ R_{k−1} n_k R_k − Σ R_k²`` over the TT of W (learned spectrum), minus
        ``r (r + 1) / 2`` for the identity spectrum. Equals the trainable parameter count with the
        Householder parameterization."""
        ranks = list(self.U.bonds[1:]) + list(reversed(self.V.bonds[1:-1]))
        modes = list(self.U.modes) + list(reversed(self.V.modes))
        bonds = [1] + ranks + [1]
        tt_dim = sum(bonds[k] * n * bonds[k + 1] for k, n in enumerate(modes)) - sum(b * b for b in ranks)
        return tt_dim - (self.rank * (self.rank + 1) // 2 if self.s is None else 0)

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor) -> None:
        """Set U, σ, V from a dense ``(d_out, d_in)`` weight: rank-r truncated SVD, then TT-SVD of U and V
        (left-orthonormal cores; the last core re-orthonormalized by its polar factor). Exact when the rank
        is ≥ the weight's rank and the TT ranks are maximal. With ``spectrum="identity"`` only the singular
        vectors are kept; with ``lipschitz`` set, σ is scaled to max ``lipschitz``. Cost: a dense SVD."""
        W = weight.detach().to(torch.float64).cpu()
        if not torch.isfinite(W).all():
            raise ValueError("weight has NaN or Inf entries")
        if tuple(W.shape) != (math.prod(self.U.modes), math.prod(self.V.modes)):
            raise ValueError(f"weight must have shape ({math.prod(self.U.modes)}, {math.prod(self.V.modes)})")
        P, S, Qt = torch.linalg.svd(W, full_matrices=False)
        P, S, Q = P[:, : self.rank], S[: self.rank], Qt[: self.rank].T
        u_cores, v_cores = _tt_svd(P, self.U.shapes), _tt_svd(Q, self.V.shapes)
        if self.s is None:  # U G (V G D)ᵀ with signs D: W = U G diag(D) (V G D)ᵀ
            G = self.U.set_cores(u_cores)
            d = torch.diagonal(self.V.set_cores(v_cores, right=G, allow_sign_flips=True))
            self.signs.copy_(d.to(self.signs.dtype))
            return
        du = torch.diagonal(self.U.set_cores(u_cores, allow_sign_flips=True))
        dv = torch.diagonal(self.V.set_cores(v_cores, allow_sign_flips=True))
        s = S * du.to(S.dtype) * dv.to(S.dtype)  # U D_u diag(D_u D_v s) (V D_v)ᵀ = U diag(s) Vᵀ
        self.s.copy_(s.to(self.s.dtype))

    def _factor_modes(self) -> str:
        return f"out_modes={self.U.modes}, in_modes={self.V.modes}, ranks={self.U.bonds[1:-1]}|{self.V.bonds[1:-1]}"


def _tt_svd(M: torch.Tensor, shapes: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Left-orthonormal TT cores of the ``d × r`` matrix M (rows over the modes) with the given shapes: the TT-SVD
    (:func:`lowrankopt.formats.tt_svd`, exact ranks) of M as a tensor ``(n_1, …, n_{D−1}, n_D r)``; the last core is
    replaced by its polar factor so that the product has orthonormal columns."""
    modes, r = [n for _, n, _ in shapes], shapes[-1][2]
    cores = tt_svd(M.reshape(*modes[:-1], modes[-1] * r), [r1 for _, _, r1 in shapes[:-1]], exact=True)
    r0, n, _ = shapes[-1]
    A, _, Bt = torch.linalg.svd(cores[-1].reshape(r0 * n, r), full_matrices=False)
    cores[-1] = (A @ Bt).reshape(r0, n, r)  # polar factor: the nearest orthonormal matrix
    return cores


def _modes(name: str, d: int, given) -> list[int]:
    if given is None:
        return prime_factors(d)
    given = [given] if isinstance(given, int) else given
    if isinstance(given, str | bytes) or not isinstance(given, Sequence):
        raise TypeError(f"{name} must be a sequence of positive ints, got {type(given).__name__}")
    modes = [as_positive_int(f"{name}[{k}]", m) for k, m in enumerate(given)]
    if math.prod(modes) != d:
        raise ValueError(f"{name} {modes} has product {math.prod(modes)}, not {d}")
    return modes


def _split_factorization(mode_factorization):
    if isinstance(mode_factorization, str):
        if mode_factorization != "auto":
            raise ValueError(f"mode_factorization must be 'auto' or (out_modes, in_modes), got {mode_factorization!r}")
        return None, None
    if not isinstance(mode_factorization, Sequence) or len(mode_factorization) != 2:
        raise ValueError("mode_factorization must be 'auto' or a pair (out_modes, in_modes)")
    return mode_factorization


class STTPLinear(_STTPBase):
    """``y = x Wᵀ + b`` with ``W = U diag(σ) Vᵀ`` in STTP form (see the module docstring).

    Args:
        in_features: size of the input (d_in).
        out_features: size of the output (d_out).
        rank: the maximal TT-rank R; the number of singular values is ``r = min(R, in, out)``. Ranks at
            least as large as every maximal TT-rank give SVDP (any weight is representable).
        bias: learn an additive bias.
        mode_factorization: ``"auto"`` (prime factors of d_out and d_in) or ``(out_modes, in_modes)``.
        spectrum: ``"identity"``, ``"learned"`` or ``"learned+dopt"``.
        lipschitz: bound on ``‖W‖₂`` for the learned spectra (``None``: unconstrained σ).
        parametrization: ``"householder"`` (Euclidean, any torch optimizer) or ``"stiefel"`` (geoopt).
        dtype: of the parameters (default ``torch.get_default_dtype()``).
        device: of the parameters.
        generator: for the random orthonormal initialization.

    Forward cost ``O(B (d_in + d_out) r)`` plus building U and V.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        mode_factorization="auto",
        spectrum: str = "learned",
        lipschitz: float | None = 1.0,
        parametrization: str = "householder",
        dtype=None,
        device=None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.in_features = as_positive_int("in_features", in_features)
        self.out_features = as_positive_int("out_features", out_features)
        rank = as_positive_int("rank", rank)
        dtype, device, _ = _kw(dtype, device, generator)
        out_m, in_m = _split_factorization(mode_factorization)
        out_m, in_m = _modes("out_modes", out_features, out_m), _modes("in_modes", in_features, in_m)
        self._init_factors(
            out_features, in_features, rank, out_m, in_m, spectrum, lipschitz, parametrization, dtype, device, generator
        )
        self.bias = _init_bias(out_features, in_features, bias, dtype, device, generator)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"spectrum={self.spectrum!r}, {self._factor_modes()}, bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _check_input(x, self.in_features, self.U.params[0])
        U, s, V = self._forward_factors(x)
        # σ folded into U: under autocast both products give the autocast dtype, as nn.Linear does
        y = F.linear(F.linear(x2, V.T), U * s, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight ``(out_features, in_features)``, read-only and differentiable, for code that reads
        ``.weight`` instead of calling the layer (torch's transformer fast path reads ``linear1.weight``). Each
        read forms it: ``O(d_out d_in r)``; ``forward`` never does."""
        return self.weight_matrix()

    def to_dense(self) -> torch.nn.Linear:
        """An ``nn.Linear`` with the same weight and bias."""
        with torch.no_grad():
            return _dense_linear(self.weight_matrix(), None if self.bias is None else self.bias.detach())

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, rank: int | None = None, **kwargs) -> STTPLinear:
        """An STTP layer initialized from a trained ``nn.Linear`` (see :meth:`load_dense`); ``rank``
        defaults to maximal TT-ranks, and ``lipschitz`` to None here, so that the outputs are reproduced."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        kwargs.setdefault("lipschitz", None)
        w = linear.weight
        rank = math.prod(w.shape) if rank is None else rank  # None: every TT-rank maximal
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None, dtype=w.dtype, **kwargs)
        layer.load_dense(w)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer.to(w.device)


class SVDPLinear(STTPLinear):
    """:class:`STTPLinear` with one core per factor (``U``, ``V`` Householder-parameterized Stiefel
    matrices): the SVD parameterization, STTP's maximal-rank case. ``rank`` defaults to
    ``min(in_features, out_features)``."""

    def __init__(self, in_features: int, out_features: int, rank: int | None = None, bias: bool = True, **kwargs):
        if "mode_factorization" in kwargs:
            raise TypeError("SVDPLinear has no mode_factorization (it is one mode per side)")
        in_features = as_positive_int("in_features", in_features)
        out_features = as_positive_int("out_features", out_features)
        rank = min(in_features, out_features) if rank is None else rank
        super().__init__(
            in_features, out_features, rank, bias, mode_factorization=([out_features], [in_features]), **kwargs
        )


class STTPConv2d(_STTPBase):
    """``nn.Conv2d`` with its kernel, reshaped to ``C_out × (C_in k_h k_w)``, in STTP form.

    Arguments as ``nn.Conv2d``, in its order (``groups=1`` only), plus the keyword-only ``rank`` and the other
    keywords of :class:`STTPLinear`. ``"auto"`` modes: the
    prime factors of C_out, and of C_in followed by one mode ``k_h k_w``. Computed as a conv with the r
    kernels of V (``O(B H W C_in k_h k_w r)``), a scaling by σ, and a 1×1 conv with U (``O(B H' W' r C_out)``);
    the full kernel is never formed.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        rank: int,
        mode_factorization="auto",
        spectrum: str = "learned",
        lipschitz: float | None = 1.0,
        parametrization: str = "householder",
        dtype=None,
        device=None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if groups != 1:
            raise ValueError(f"STTPConv2d supports groups=1 only, got {groups}")
        self.in_channels = as_positive_int("in_channels", in_channels)
        self.out_channels = as_positive_int("out_channels", out_channels)
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride, self.dilation = _pair(stride, "stride", 1), _pair(dilation, "dilation", 1)
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode must be zeros, reflect, replicate or circular, got {padding_mode!r}")
        # explicit (left, right, top, bottom) pads, as nn.Conv2d computes them
        self.padding, self._pads = _conv_padding(padding, self.stride, self.kernel_size, self.dilation)
        self.padding_mode = padding_mode
        dtype, device, _ = _kw(dtype, device, generator)
        kk = self.kernel_size[0] * self.kernel_size[1]
        d_in = in_channels * kk
        out_m, in_m = _split_factorization(mode_factorization)
        if in_m is None:
            in_m = prime_factors(in_channels) + ([kk] if kk > 1 else [])
        self._init_factors(
            out_channels, d_in, as_positive_int("rank", rank), _modes("out_modes", out_channels, out_m),
            _modes("in_modes", d_in, in_m), spectrum, lipschitz, parametrization, dtype, device, generator,
        )  # fmt: skip
        self.bias = _init_bias(out_channels, d_in, bias, dtype, device, generator)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
            f"stride={self.stride}, padding={self.padding}, spectrum={self.spectrum!r}, {self._factor_modes()}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, self.in_channels)
        U, s, V = self._forward_factors(x)
        _check_dtype(x, U)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pads, mode=self.padding_mode)
            padding = 0
        kv = V.T.reshape(self.rank, self.in_channels, *self.kernel_size)
        y = F.conv2d(x, kv, None, self.stride, padding, self.dilation)
        # σ folded into the 1×1 kernel: under autocast both convs give the autocast dtype, as nn.Conv2d does
        return F.conv2d(y, (U * s).reshape(self.out_channels, self.rank, 1, 1), self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense kernel ``(C_out, C_in, k_h, k_w)``, read-only and differentiable, for code that reads
        ``.weight`` instead of calling the layer. Each read forms it: ``O(C_out C_in k_h k_w r)``; ``forward``
        never does."""
        return self.weight_kernel()

    def weight_kernel(self) -> torch.Tensor:
        """The dense kernel ``(C_out, C_in, k_h, k_w)``. Cost ``O(C_out C_in k_h k_w r)``."""
        return self.weight_matrix().reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def to_dense(self) -> torch.nn.Conv2d:
        """An ``nn.Conv2d`` with the same kernel, bias and geometry."""
        return _dense_conv(self, self.weight_kernel().detach())

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d, rank: int | None = None, **kwargs) -> STTPConv2d:
        """An STTP conv initialized from a trained ``nn.Conv2d`` (``rank`` defaults to the maximal one,
        ``lipschitz`` to None)."""
        if not isinstance(conv, torch.nn.Conv2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}")
        kwargs.setdefault("lipschitz", None)
        w = conv.weight
        rank = w.numel() if rank is None else rank  # None: every TT-rank maximal
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, rank=rank, dtype=w.dtype, **kwargs,
        )  # fmt: skip
        layer.load_dense(w.reshape(conv.out_channels, -1))
        if conv.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(conv.bias)
        return layer.to(w.device)


class SVDPConv2d(STTPConv2d):
    """:class:`STTPConv2d` with one core per factor (the SVD parameterization); ``rank`` defaults to
    ``min(C_out, C_in k_h k_w)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *args, rank: int | None = None, **kwargs):
        if "mode_factorization" in kwargs:
            raise TypeError("SVDPConv2d has no mode_factorization (it is one mode per side)")
        kh, kw = _pair(kernel_size, "kernel_size", 1)
        in_channels = as_positive_int("in_channels", in_channels)
        out_channels = as_positive_int("out_channels", out_channels)
        rank = min(out_channels, in_channels * kh * kw) if rank is None else rank
        super().__init__(
            in_channels, out_channels, kernel_size, *args, rank=rank,
            mode_factorization=([out_channels], [in_channels * kh * kw]), **kwargs,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# module surgery


def _sttp_eligible(m: torch.nn.Module) -> bool:
    """What the STTP converter replaces: plain ``nn.Linear`` and ``nn.Conv2d`` with ``groups = 1`` (subclasses, which
    may be read differently by their owners, are left alone)."""
    return type(m) is torch.nn.Linear or (type(m) is torch.nn.Conv2d and m.groups == 1)


def convert_to_sttp(
    model: torch.nn.Module,
    rank: int | Callable[[str, torch.nn.Module], int],
    *,
    target_modules: Targets | None = None,
    exclude_modules: Targets | None = None,
    svdp: bool = False,
    include=None,
    exclude=None,
    **layer_kwargs,
) -> dict[str, torch.nn.Module]:
    """Replace the ``nn.Linear`` / ``nn.Conv2d`` (groups = 1) submodules of ``model`` by STTP layers, in place.

    Each new layer is initialized from the dense weight (:meth:`~_STTPBase.load_dense`: truncated SVD, then
    TT-SVD of U and V), with ``lipschitz=None`` unless given, so that at full rank the outputs are reproduced.
    The replacement is :func:`~lowrankopt.nn.surgery.replace_modules`': all or nothing (an error, e.g. a bad rank for
    one layer, leaves the model untouched), a module used at several places becomes one STTP layer used at all of
    them, and a weight tied to another place is refused rather than silently untied.

    Args:
        model: the module to convert (in place).
        rank: the maximal TT-rank, an int or ``rank(name, module) -> int`` (each layer caps it at what its
            factors allow).
        target_modules: which layers (:func:`~lowrankopt.nn.surgery.select_modules`: module-name suffixes, a regex,
            ``"all-linear"``, a predicate ``fn(name, module)``); None: all.
        exclude_modules: the same forms, for layers to leave dense.
        svdp: use :class:`SVDPLinear` / :class:`SVDPConv2d` instead.
        include: deprecated (fnmatch patterns or a predicate of the name); use ``target_modules``.
        exclude: deprecated; use ``exclude_modules``.
        **layer_kwargs: passed to the layers (``spectrum``, ``lipschitz``, ``parametrization``, …).

    Returns ``{qualified name: new layer}``. Cost: one dense SVD per converted layer.
    """
    target_modules, exclude_modules = _legacy_selection(target_modules, exclude_modules, include, exclude)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(rank):  # checked even when nothing is converted
        as_positive_int("rank", rank)
    targets = select_modules(model, target_modules, exclude_modules, eligible=_sttp_eligible)

    def build(name: str, m: torch.nn.Module) -> torch.nn.Module:
        r = as_positive_int("rank", rank(name, m) if callable(rank) else rank)
        if isinstance(m, torch.nn.Linear):
            return (SVDPLinear if svdp else STTPLinear).from_linear(m, r, **layer_kwargs)
        return (SVDPConv2d if svdp else STTPConv2d).from_conv(m, r, **layer_kwargs)

    return replace_modules(model, targets, build)


def dopt_penalty(model: torch.nn.Module) -> torch.Tensor:
    """Mean of :meth:`~_STTPBase.dopt_penalty` over the layers of ``model`` with ``spectrum="learned+dopt"``
    (0 if there are none): add ``λ · dopt_penalty(model)`` to the loss."""
    terms = [m.dopt_penalty() for m in model.modules() if isinstance(m, _STTPBase) and m.spectrum == "learned+dopt"]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), dtype=p.dtype if p is not None else None)
    return torch.stack(terms).mean()
