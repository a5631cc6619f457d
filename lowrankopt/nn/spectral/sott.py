"""SOTT: a TT convolution whose core is a skew-orthogonal convolution, so the layer is 1-Lipschitz.

Senderovich, Bulatova, Obukhov, Rakhuba, *Towards Practical Control of Singular Values of Convolutional Layers*,
NeurIPS 2022, the layer of their Lipschitz experiments (re-derived; no code copied). As :class:`~.tt_conv.TTConv2d`
it is a 1×1 conv (``firstᵀ``, c_in → r1 channels), a k×k conv on few channels and a 1×1 conv (``last``, r2 → c_out
channels), ``r1 = min(c_in, rank)``, ``r2 = min(c_out, rank)``; but the middle conv is a skew-orthogonal convolution
(SOC, Singla & Feizi 2021; :class:`~lowrankopt.nn.orthogonal.gs_conv.SkewOrthogonalConv2d`): ``exp(L)`` with
``L = conv(·, M − M*)`` skew-symmetric, an orthogonal operator. On ``(B, c_in, H, W)`` inputs (H, W divisible by
the stride s) the layer is

    y = last · T · exp(L) · P · S(firstᵀ x) + bias,

with ``S`` the space-to-depth rearrangement (in the order of ``torch.nn.functional.pixel_unshuffle``: r1
channels at H × W → ``r1 s²`` channels at ``H/s × W/s``, a permutation), ``m = max(r1 s², r2)`` the SOC's
channels, ``P`` the zero padding of the channels to m and ``T`` the truncation to the first r2 channels. ``S`` and
``exp(L)`` are orthogonal, ``P`` is an isometry and ``T`` a co-isometry, so with orthonormal columns in ``first``
and ``last``:

- the layer's linear part has norm ≤ 1 (1-Lipschitz), and
- all its singular values are 1 — it is an isometry — when ``rank ≥ c_in`` and ``r1 s² ≤ r2``
  (``firstᵀ`` is then orthogonal and ``T`` the identity), and a co-isometry when ``rank ≥ c_out`` and
  ``r1 s² ≥ r2`` (``last`` orthogonal and ``P`` the identity).

With ``rank ≥ c_in`` and ``rank ≥ c_out`` the layer has no outer cores (``first`` and ``last`` are None), as in the
reference: it is the SOC on the space-to-depth input, padded or truncated in channels.

**Outer cores** (``orthogonality``): ``"stiefel"`` (default) — ``geoopt.ManifoldParameter`` on the Stiefel manifold,
trained with ``geoopt.optim.RiemannianAdam`` / ``RiemannianSGD``: orthonormal after every step, so the layer is
1-Lipschitz at every step (up to the SOC's certified series tolerance). ``"penalty"`` — plain parameters and the
soft constraint :func:`~.tt_conv.tt_conv_penalty` (with the reference's normalization by default), which is what
the reference trains with; the outer cores are then only close to orthonormal, and :meth:`SOTTConv2d.lipschitz_bound`
gives the layer's certified Lipschitz bound ``‖first‖₂ ‖last‖₂``. The default differs from the reference because
only exactly orthonormal outer cores make the layer 1-Lipschitz, which is what certified robustness needs (the
reference monitors ``max σ(K1), σ(K3)`` during training for this reason).

**Differences from the reference's SOTT** (deliberate): the SOC's normalization and series length are those of
:class:`~lowrankopt.nn.orthogonal.gs_conv.SkewOrthogonalConv2d` — L is scaled down only when the bound ``λ ≥ ‖L‖₂``
(sum of the tap norms) exceeds ``max_norm``, and the number of terms is the least that *certifies* the truncation
error ≤ ``tol`` — where the reference always scales L to ``0.7 / σ̂`` (σ̂ a Fantastic-Four power-iteration estimate)
and sums a fixed 5 (train) / 12 (eval) terms; the exponential is orthogonal either way. Any stride s with H, W
divisible by s is accepted (the reference: s ∈ {1, 2}).

**Cost.** Forward ``O(B (H W c_in r1 + H' W' (T m² k² + r2 c_out)))`` with ``H' = H/s``, T the number of series
terms; parameters ``c_in r1 + m² k² + c_out r2`` (+ c_out bias).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..._checks import as_positive_int
from .._common import (
    _autocast_output,
    _check_dtype,
    _check_image,
    _kw,
    _outer_cores,
    _pair,
    _refuse_half,
    _uniform,
)
from ..orthogonal.gs_conv import SkewOrthogonalConv2d

__all__ = ["SOTTConv2d"]

ORTHOGONALITIES = ("stiefel", "penalty")


class SOTTConv2d(torch.nn.Module):
    """A TT conv ``x ↦ last · T · exp(L) · P · S(firstᵀ x) + bias`` with a skew-orthogonal core (see the module
    docstring): 1-Lipschitz with orthonormal outer cores.

    Args:
        in_channels: c_in.
        out_channels: c_out.
        kernel_size: odd k (an int or a square pair); the core pads by ``k // 2`` zeros ("same").
        rank: the TT-rank; ``r1 = min(c_in, rank)``, ``r2 = min(c_out, rank)``.
        stride: s (an int or a pair of equal ints), by space-to-depth: inputs ``H × W`` divisible by s give outputs
            ``H/s × W/s``.
        bias: whether to add a learnable bias ``(c_out,)`` (``U(−1/√c_out, 1/√c_out)``, as the reference).
        orthogonality: ``"stiefel"`` (default) or ``"penalty"`` (see the module docstring).
        tol: the core's certified bound on the truncation error of its series, relative to ``‖x‖`` (as
            :class:`~lowrankopt.nn.orthogonal.gs_conv.SkewOrthogonalConv2d`, like the next three).
        max_terms: at most this many series terms.
        max_norm: if the bound λ ≥ ‖L‖₂ exceeds it, L is scaled to it (None: never).
        init_scale: the initial scale of the core's weight.
        dtype: float32 or float64 (default: torch's default dtype).
        device: where the parameters live.
        generator: a CPU ``torch.Generator`` for the initialization.

    Parameters: ``first (c_in, r1)`` and ``last (c_out, r2)`` (random orthonormal columns; None when
    ``rank ≥ max(c_in, c_out)``), ``core.weight (m, m, k, k)`` with ``m = max(r1 s², r2)`` and ``bias``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int,
        stride: int | tuple[int, int] = 1,
        bias: bool = True,
        *,
        orthogonality: str = "stiefel",
        tol: float = 1e-6,
        max_terms: int = 30,
        max_norm: float | None = 2.0,
        init_scale: float = 0.1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = as_positive_int("in_channels", in_channels)
        self.out_channels = as_positive_int("out_channels", out_channels)
        kh, kw = _pair(kernel_size, "kernel_size")
        if kh != kw or kh < 1 or kh % 2 != 1:
            raise ValueError(f"kernel_size must be an odd positive int or a square pair (k, k), got {kernel_size!r}")
        self.kernel_size = (kh, kw)
        self.rank = as_positive_int("rank", rank)
        sh, sw = _pair(stride, "stride")
        if sh != sw or sh < 1:
            raise ValueError(f"stride must be a positive int or a pair of equal ints, got {stride!r}")
        self.stride = (sh, sw)
        if orthogonality not in ORTHOGONALITIES:
            raise ValueError(f"orthogonality must be one of {ORTHOGONALITIES}, got {orthogonality!r}")
        self.orthogonality = orthogonality
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        dtype, device, _ = _kw(dtype, device, generator)
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU generator, got one on {generator.device}")
        r1, r2 = min(self.in_channels, self.rank), min(self.out_channels, self.rank)
        self.ranks = (r1, r2)
        self.channels = max(r1 * sh * sh, r2)  # m, the SOC's channels
        if self.rank >= max(self.in_channels, self.out_channels):  # no outer cores, as in the reference
            self.register_parameter("first", None)
            self.register_parameter("last", None)
        else:
            self.first, self.last = _outer_cores(
                f"SOTTConv2d({self.in_channels}, {self.out_channels}, kernel_size={kh}, rank={self.rank})",
                self.in_channels, self.out_channels, self.ranks, orthogonality == "stiefel",
                "build the layer with orthogonality='penalty' and add λ · tt_conv_penalty(model) to the loss",
                dtype, device, generator,
            )  # fmt: skip
        self.core = SkewOrthogonalConv2d(
            self.channels, kh, tol=tol, max_terms=max_terms, max_norm=max_norm, bias=False, init_scale=init_scale,
            dtype=dtype, device=device, generator=generator,
        )  # fmt: skip
        if bias:
            b = _uniform((self.out_channels,), 1 / math.sqrt(self.out_channels), dtype, None, generator)
            self.bias = torch.nn.Parameter(b.detach().to(device))
        else:
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
            f"ranks={self.ranks}, stride={self.stride}, bias={self.bias is not None}, "
            f"orthogonality={self.orthogonality!r}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, c_in, H, W) → (B, c_out, H/s, W/s)`` (H, W divisible by the stride s). Cost in the module
        docstring."""
        _check_image(x, self.in_channels)
        _refuse_half(self, self.core.weight.dtype, "its core's certified series needs the spectral norms of its taps")
        _check_dtype(x, self.core.weight)
        s = self.stride[0]
        if x.shape[-2] % s or x.shape[-1] % s:
            raise ValueError(f"input height and width must be divisible by the stride {s}, got {tuple(x.shape[-2:])}")
        r1, r2 = self.ranks
        y = x if self.first is None else F.conv2d(x, self.first.T.reshape(r1, self.in_channels, 1, 1))
        if s > 1:  # channel c·s² + a·s + b = pixel (a, b) of each s × s block of channel c (as pixel_unshuffle,
            # which returns an empty batch unchanged in shape)
            B, c, H, W = y.shape
            y = y.reshape(B, c, H // s, s, W // s, s).permute(0, 1, 3, 5, 2, 4).reshape(B, c * s * s, H // s, W // s)
        if self.channels > y.shape[1]:
            y = F.pad(y, (0, 0, 0, 0, 0, self.channels - y.shape[1]))
        y = self.core(y)[:, :r2]
        if self.last is not None:  # the bias in the conv: under autocast it comes out in the autocast dtype
            return F.conv2d(y, self.last.reshape(self.out_channels, r2, 1, 1), self.bias)
        return _autocast_output(y if self.bias is None else y + self.bias[:, None, None])

    def orthogonality_penalty(self) -> torch.Tensor:
        """``(‖firstᵀ first − I‖_F² + ‖lastᵀ last − I‖_F²) / (2 rank²)`` (0 without outer cores), this layer's term of
        ``tt_conv_penalty(model, normalization="layer")``; for the reference's normalization use
        :func:`~.tt_conv.tt_conv_penalty`. Cost ``O(c_in r1² + c_out r2²)``."""
        residual = torch.as_tensor(
            self._orthogonality_residual(), dtype=self.core.weight.dtype, device=self.core.weight.device
        )
        return residual / (2 * self.rank**2)

    def _orthogonality_residual(self) -> torch.Tensor | float:
        """``‖firstᵀ first − I‖_F² + ‖lastᵀ last − I‖_F²`` (0 without outer cores), read by ``tt_conv_penalty``."""
        if self.first is None:
            return 0.0
        return sum(
            (M.T @ M - torch.eye(M.shape[1], dtype=M.dtype, device=M.device)).square().sum()
            for M in (self.first, self.last)
        )

    @torch.no_grad()
    def lipschitz_bound(self) -> torch.Tensor:
        """``‖first‖₂ · ‖last‖₂`` (1 without outer cores): a bound on the norm of the layer's linear part, exact up to
        the SOC's certified series tolerance ``tol`` (relative), whatever the drift of the outer cores in the
        ``"penalty"`` mode; 1 (to rounding) in the ``"stiefel"`` mode. Cost ``O(c_in r1² + c_out r2²)``."""
        one = torch.ones((), dtype=self.core.weight.dtype, device=self.core.weight.device)
        for M in (self.first, self.last):
            if M is not None:
                one = one * torch.linalg.matrix_norm(M, ord=2)
        return one
