"""The STTP layers (:mod:`.sttp`): :class:`STTPLinear` and :class:`STTPConv2d` apply ``W = U diag(σ) Vᵀ`` as two thin
products (two convs) without forming W; :class:`SVDPLinear` and :class:`SVDPConv2d` are their one-core (SVD) cases."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..._checks import as_positive_int
from .._common import (
    _check_dtype,
    _check_image,
    _check_input,
    _conv_padding,
    _dense_conv,
    _dense_linear,
    _pair,
)
from .sttp_base import ModeFactorization, STTPBase

__all__ = ["STTPConv2d", "STTPLinear", "SVDPConv2d", "SVDPLinear"]


class STTPLinear(STTPBase):
    """``y = x Wᵀ + b`` with ``W = U diag(σ) Vᵀ`` in STTP form (see :mod:`lowrankopt.nn.spectral.sttp`).

    Args:
        in_features: size of the input (d_in).
        out_features: size of the output (d_out).
        rank: the maximal TT-rank R; the number of singular values is ``r = min(R, in, out)``. Ranks at
            least as large as every maximal TT-rank give SVDP (any weight is representable).
        bias: learn an additive bias.
        mode_factorization: ``"paper"`` (the default; ``"auto"`` is the same: the prime factors of d_out and d_in,
            as STTP's eq. 9), ``"reference"`` (the authors' code: the input primes in the opposite order along the
            TT), ``"legacy"`` (here the same as ``"paper"``), or ``(out_modes, in_modes)``; see
            :data:`~lowrankopt.nn.spectral.sttp_base.FACTORIZATIONS`.
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
        mode_factorization: ModeFactorization = "paper",
        spectrum: str = "learned",
        lipschitz: float | None = 1.0,
        parametrization: str = "householder",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_features = as_positive_int("in_features", in_features)
        self.out_features = as_positive_int("out_features", out_features)
        self._init_parameters(
            self.out_features, self.in_features, as_positive_int("rank", rank), mode_factorization, bias, spectrum,
            lipschitz, parametrization, dtype, device, generator,
        )  # fmt: skip

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
    def from_linear(cls, linear: torch.nn.Linear, rank: int | None = None, **kwargs: Any) -> STTPLinear:
        """An STTP layer initialized from a trained ``nn.Linear`` (see :meth:`load_dense`); ``rank``
        defaults to maximal TT-ranks, and ``lipschitz`` to None here, so that the outputs are reproduced."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        kwargs.setdefault("lipschitz", None)
        w = linear.weight
        rank = math.prod(w.shape) if rank is None else rank  # None: every TT-rank maximal
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None, dtype=w.dtype, **kwargs)
        layer._load_dense_and_bias(w, linear.bias)
        return layer.to(w.device)


class SVDPLinear(STTPLinear):
    """:class:`STTPLinear` with one core per factor (``U``, ``V`` Householder-parameterized Stiefel
    matrices): the SVD parameterization, STTP's maximal-rank case. ``rank`` defaults to
    ``min(in_features, out_features)``."""

    def __init__(
        self, in_features: int, out_features: int, rank: int | None = None, bias: bool = True, **kwargs: Any
    ) -> None:
        if "mode_factorization" in kwargs:
            raise TypeError("SVDPLinear has no mode_factorization (it is one mode per side)")
        in_features = as_positive_int("in_features", in_features)
        out_features = as_positive_int("out_features", out_features)
        rank = min(in_features, out_features) if rank is None else rank
        super().__init__(
            in_features, out_features, rank, bias, mode_factorization=([out_features], [in_features]), **kwargs
        )


class STTPConv2d(STTPBase):
    """``nn.Conv2d`` with its kernel, reshaped to ``C_out × (C_in k_h k_w)``, in STTP form.

    Arguments as ``nn.Conv2d``, in its order (``groups=1`` only), plus the keyword-only ``rank`` and the other
    keywords of :class:`STTPLinear`. ``mode_factorization`` (:data:`~lowrankopt.nn.spectral.sttp_base.FACTORIZATIONS`;
    with ``p(n)`` the prime factors of n, non-decreasing, ``p(n)↓`` decreasing, and ``K = k_h k_w``, W's TT from
    output to input):

    - ``"paper"`` (default; ``"auto"`` is the same): ``p(C_out), Σ, p(C_in K)↓`` — STTP's eq. 9, the whole
      ``C_in k_h k_w`` factored into primes. A 16×8×3×3 kernel at rank 4 has 128 parameters (the paper's Sec. 8).
    - ``"reference"``: ``p(C_out), Σ, p(C_in), K`` — the authors' code (toshas/sttp), ``k_h k_w`` one mode at the
      far end; 116 parameters in the example.
    - ``"legacy"``: ``p(C_out), Σ, K, p(C_in)↓`` — the default of lowrankopt before issue 23 (changed: it matched
      neither); 192 parameters in the example. Build with it to load a state dict saved then.
    - ``(out_modes, in_modes)``: V's rows row-major over ``in_modes`` (None: ``p(C_in K)``, as ``"paper"``).

    Computed as a conv with the r kernels of V (``O(B H W C_in k_h k_w r)``), a scaling by σ, and a 1×1 conv with U
    (``O(B H' W' r C_out)``); the full kernel is never formed.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        rank: int,
        mode_factorization: ModeFactorization = "paper",
        spectrum: str = "learned",
        lipschitz: float | None = 1.0,
        parametrization: str = "householder",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
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
        kk = self.kernel_size[0] * self.kernel_size[1]
        self._init_parameters(
            self.out_channels, self.in_channels * kk, as_positive_int("rank", rank), mode_factorization, bias, spectrum,
            lipschitz, parametrization, dtype, device, generator, kernel_numel=kk,
        )  # fmt: skip

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
    def from_conv(cls, conv: torch.nn.Conv2d, rank: int | None = None, **kwargs: Any) -> STTPConv2d:
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
        layer._load_dense_and_bias(w.reshape(conv.out_channels, -1), conv.bias)
        return layer.to(w.device)


class SVDPConv2d(STTPConv2d):
    """:class:`STTPConv2d` with one core per factor (the SVD parameterization); ``rank`` defaults to
    ``min(C_out, C_in k_h k_w)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *args: Any,
        rank: int | None = None,
        **kwargs: Any,
    ) -> None:
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
