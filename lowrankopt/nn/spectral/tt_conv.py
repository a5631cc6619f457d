"""Convolutions with a 3-core tensor-train kernel whose singular values are those of a small conv.

Senderovich, Bulatova, Obukhov, Rakhuba, *Towards Practical Control of Singular Values of Convolutional
Layers*, NeurIPS 2022 (re-derived; no code copied). The kernel ``K: (c_out, c_in, k, k)`` of a conv is the
tensor train

    K[o, i, p, q] = Σ_{α, β} first[i, α] · core[β, α, p, q] · last[o, β],

with ``first: (c_in, r1)``, ``core: (r2, r1, k, k)`` (torch's conv weight layout ``out, in, h, w``),
``last: (c_out, r2)``, ``r1 = min(c_in, rank)``, ``r2 = min(c_out, rank)``. As a layer it is three convs: a 1×1
conv with weight ``firstᵀ`` (c_in → r1 channels), the k×k conv ``core`` (with the layer's stride, padding and
padding mode; r1 → r2 channels) and a 1×1 conv with weight ``last`` (r2 → c_out channels, plus the bias). On
n×n inputs its linear operator is

    J = (last ⊗ I) · J_core · (firstᵀ ⊗ I),

so when ``first`` and ``last`` have orthonormal columns, ``last ⊗ I`` is an isometry and ``firstᵀ ⊗ I`` a
co-isometry, and the nonzero singular values of the layer are **exactly** those of the small core conv
``J_core`` — which, for circular padding, the FFT gives cheaply (:func:`lowrankopt.spectral.conv_singular_values`:
one ``r2 × r1 s²`` SVD per output frequency). So they can be read (:meth:`TTConv2d.singular_values`) and
clipped (:meth:`TTConv2d.clip_`) at the cost of the core alone.

**Gauge.** For invertible ``A: r1 × r1`` and ``B: r2 × r2`` the cores ``(first A, B core[:, :, p, q] A⁻ᵀ,
last B⁻¹)`` give the same kernel. :meth:`TTConv2d.orthogonalize_` uses it
to make the outer cores orthonormal without changing the function: QR ``first = Q1 R1``, ``last = Q3 R3``,
then ``first ← Q1``, ``last ← Q3``, ``core[:, :, p, q] ← R3 · core[:, :, p, q] · R1ᵀ``.

**Three ways to keep the outer cores orthonormal** (``orthogonality``):

* ``"gauge"`` — plain parameters, any ``torch.optim`` optimizer; call :meth:`TTConv2d.orthogonalize_` (or
  :func:`tt_conv_orthogonalize_` for a whole model) after optimizer steps (in place, so optimizer state stays
  attached to the parameters).
* ``"stiefel"`` — ``first`` and ``last`` are ``geoopt.ManifoldParameter`` on ``geoopt.EuclideanStiefel``,
  trained with ``geoopt.optim.RiemannianAdam`` / ``RiemannianSGD``: orthonormal after every step.
* ``"penalty"`` — plain parameters and the soft constraint :func:`tt_conv_penalty` over a model, added as
  ``λ · penalty`` to the loss. By default it is normalized as in the reference code, so the paper's λ
  (``--orthogonal-k``) transfers (see :func:`tt_conv_penalty`). The outer cores then drift off orthonormality,
  but :meth:`TTConv2d.effective_core` (the core of the gauge-equivalent layer with orthonormal outer cores) still
  gives the exact singular values.

**Spectral division.** ``lowrankopt.spectral.conv_spectral_normalization(layer, n, max_norm=c)`` accepts a
TTConv2d: it divides the *core* by ``max(1, σ / c)``, σ the norm of the core conv (as the reference's
``constrain_conv`` divides ``K2``), so with orthonormal outer cores the layer's norm is ``min(σ, c)``.

**Cost.** Forward ``O(B (H W c_in r1 + H' W' (r1 r2 k² + r2 c_out)))`` for a batch of B inputs ``H × W`` and
outputs ``H' × W'`` (the dense conv: ``O(B H' W' c_in c_out k²)``); parameters
``c_in r1 + r2 r1 k² + c_out r2`` (+ c_out bias) instead of ``c_out c_in k²``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..._checks import as_positive_int
from ...formats.tt import tt_svd
from ...manifolds.base import qr_positive
from ...spectral import clip_singular_values, conv_singular_values
from .._common import (
    LegacyPatterns,
    _check_dtype,
    _check_image,
    _conv_padding,
    _dense_conv,
    _init_bias,
    _kw,
    _legacy_selection,
    _outer_cores,
    _pair,
    _refuse_half,
)
from ..surgery import Targets, replace_modules, select_modules

__all__ = ["TTConv2d", "convert_to_tt_conv", "tt_conv_orthogonalize_", "tt_conv_penalty"]

PENALTY_NORMALIZATIONS = ("reference", "layer")

ORTHOGONALITIES = ("gauge", "stiefel", "penalty")
PADDING_MODES = ("zeros", "circular")


class TTConv2d(torch.nn.Module):
    """A 2-D conv whose kernel is a 3-core tensor train ``K[o, i, p, q] = Σ first[i, α] core[β, α, p, q] last[o, β]``.

    Args:
        in_channels: c_in.
        out_channels: c_out.
        kernel_size: k, an int or a square pair ``(k, k)``.
        rank: the TT-rank; ``r1 = min(c_in, rank)``, ``r2 = min(c_out, rank)``.
        stride: an int or a pair (as ``nn.Conv2d``).
        padding: an int, a pair, ``"same"`` (stride 1 only) or ``"valid"`` (as ``nn.Conv2d``).
        bias: whether to add a learnable bias ``(c_out,)``.
        padding_mode: ``"zeros"`` or ``"circular"``.
        orthogonality: ``"gauge"``, ``"stiefel"`` or ``"penalty"`` (see the module docstring).
        dtype: float32 or float64 (default: torch's default dtype).
        device: where the parameters live.
        generator: a CPU ``torch.Generator`` for the initialization.

    Parameters: ``first (c_in, r1)`` and ``last (c_out, r2)`` (random orthonormal columns at init),
    ``core (r2, r1, k, k)`` (Gaussian with variance ``c_out / (r1 r2 k²)``, so that the dense kernel has the
    variance ``1 / (c_in k²)`` of LeCun's init, and unit-variance inputs give outputs of about unit variance)
    and ``bias (c_out,)`` (``nn.Conv2d``'s init). Dilation and groups are not supported.

    Forward: ``(B, c_in, H, W) → (B, c_out, H', W')`` with ``nn.Conv2d``'s output size, in
    ``O(B (H W c_in r1 + H' W' (r1 r2 k² + r2 c_out)))``; the dense kernel is never formed.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        orthogonality: str = "gauge",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = as_positive_int("in_channels", in_channels)
        self.out_channels = as_positive_int("out_channels", out_channels)
        kh, kw = _pair(kernel_size, "kernel_size")
        if kh != kw or kh < 1:
            raise ValueError(f"kernel_size must be a positive int or a square pair (k, k), got {kernel_size!r}")
        self.kernel_size = (kh, kw)
        self.rank = as_positive_int("rank", rank)
        self.stride = _pair(stride, "stride")
        if min(self.stride) < 1:
            raise ValueError(f"stride must be positive, got {stride!r}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be 'zeros' or 'circular', got {padding_mode!r}")
        self.padding_mode = padding_mode
        # explicit (left, right, top, bottom) pads, as nn.Conv2d computes them (for "same": the extra one, for an
        # even kernel, on the right / bottom)
        self.padding, self._pads = _conv_padding(padding, self.stride, self.kernel_size)
        if orthogonality not in ORTHOGONALITIES:
            raise ValueError(f"orthogonality must be one of {ORTHOGONALITIES}, got {orthogonality!r}")
        self.orthogonality = orthogonality
        dtype, device, _ = _kw(dtype, device, generator)
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU generator, got one on {generator.device}")
        r1, r2 = min(self.in_channels, self.rank), min(self.out_channels, self.rank)
        self.ranks = (r1, r2)
        self.first, self.last = _outer_cores(
            f"TTConv2d({self.in_channels}, {self.out_channels}, kernel_size={kh}, rank={self.rank})",
            self.in_channels, self.out_channels, self.ranks, orthogonality == "stiefel",
            "build the layer with orthogonality='gauge' (any torch optimizer, then tt_conv_orthogonalize_)",
            dtype, device, generator,
        )  # fmt: skip
        std = math.sqrt(self.out_channels / (r1 * r2 * kh * kw))
        core = torch.randn(r2, r1, kh, kw, dtype=torch.float64, generator=generator) * std
        self.core = torch.nn.Parameter(core.to(dtype=dtype, device=device))
        b = _init_bias(self.out_channels, self.in_channels * kh * kw, bias, dtype, None, generator)
        self.bias = None if b is None else torch.nn.Parameter(b.detach().to(device))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
            f"ranks={self.ranks}, stride={self.stride}, padding={self.padding}, padding_mode={self.padding_mode!r}, "
            f"bias={self.bias is not None}, orthogonality={self.orthogonality!r}"
        )

    # --------------------------------------------------------------------------------------------------------
    # forward and dense form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, c_in, H, W) → (B, c_out, H', W')``. Cost ``O(B (H W c_in r1 + H' W' (r1 r2 k² + r2 c_out)))``."""
        _check_image(x, self.in_channels)
        needs = "its outer cores are kept orthonormal by QR (orthogonalize_, the Stiefel retraction)"
        _refuse_half(self, self.core.dtype, needs)
        _check_dtype(x, self.core)
        r1, r2 = self.ranks
        y = F.conv2d(x, self.first.T.reshape(r1, self.in_channels, 1, 1))
        left, right, top, bottom = self._pads
        if self.padding_mode == "circular" or left != right or top != bottom:  # asymmetric: "same", even kernel
            y = F.pad(y, self._pads, mode="circular" if self.padding_mode == "circular" else "constant")
            padding = (0, 0)
        else:
            padding = (top, left)
        y = F.conv2d(y, self.core, None, self.stride, padding)
        return F.conv2d(y, self.last.reshape(self.out_channels, r2, 1, 1), self.bias)

    def weight_kernel(self) -> torch.Tensor:
        """The dense kernel ``K (c_out, c_in, k, k)`` (differentiable). Cost ``O(c_out c_in k² min(r1, r2))``."""
        return torch.einsum("ia,bapq,ob->oipq", self.first, self.core, self.last)

    def to_dense(self) -> torch.nn.Conv2d:
        """An ``nn.Conv2d`` with the kernel :meth:`weight_kernel`, the same bias, stride, padding, padding mode."""
        return _dense_conv(self, self.weight_kernel().detach())

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d, rank: int, **kwargs: Any) -> TTConv2d:
        """A TT conv approximating a dense ``nn.Conv2d`` by TT-SVD of its kernel ``W (c_out, c_in, k, k)``.

        ``M1 = W`` as ``c_in × (k k c_out)`` (index ``[i, (p, q, o)]``): SVD, ``first`` = the r1 leading left singular
        vectors; ``S1 V1ᵀ`` as ``(r1 k k) × c_out``: SVD, ``last`` = the r2 leading right singular vectors, ``core`` =
        ``U2 S2`` as ``(r2, r1, k, k)``. ``first`` and ``last`` have orthonormal columns (completed by an orthonormal
        complement, with zero core slices, when a factor has fewer singular vectors than r1 or r2). Exact when
        ``rank ≥ max(c_in, c_out)``; otherwise quasi-optimal (error ≤ √2 × the best of these ranks).

        Stride, padding, padding mode, bias, dtype and device are copied; ``kwargs`` go to the constructor
        (e.g. ``orthogonality``). Cost: two SVDs, ``O(c_in² k² c_out + r1 k² c_out min(r1 k², c_out))``.
        """
        if not isinstance(conv, torch.nn.Conv2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"TTConv2d supports groups=1 only, got conv.groups={conv.groups}")
        if tuple(conv.dilation) != (1, 1):
            raise ValueError(f"TTConv2d does not support dilation, got conv.dilation={conv.dilation}")
        if conv.kernel_size[0] != conv.kernel_size[1]:
            raise ValueError(f"TTConv2d needs a square kernel, got conv.kernel_size={conv.kernel_size}")
        if conv.padding_mode not in PADDING_MODES:
            raise ValueError(f"TTConv2d supports padding_mode 'zeros' or 'circular', got {conv.padding_mode!r}")
        W = conv.weight.detach()
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, rank, conv.stride, conv.padding,
            conv.bias is not None, conv.padding_mode, dtype=W.dtype, device=W.device, **kwargs,
        )  # fmt: skip
        first, core, last = _tt_svd(W, *layer.ranks)
        with torch.no_grad():
            layer.first.copy_(first)
            layer.core.copy_(core)
            layer.last.copy_(last)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    # --------------------------------------------------------------------------------------------------------
    # orthogonality

    def orthogonality_penalty(self) -> torch.Tensor:
        """``(‖firstᵀ first − I‖_F² + ‖lastᵀ last − I‖_F²) / (2 rank²)`` (differentiable; ~0 when both are
        orthonormal, as in the "gauge" and "stiefel" modes): this layer's term of
        ``tt_conv_penalty(model, normalization="layer")``. For the reference's normalization (the paper's λ) use
        :func:`tt_conv_penalty`. Cost ``O(c_in r1² + c_out r2²)``."""
        return self._orthogonality_residual() / (2 * self.rank**2)

    def _orthogonality_residual(self) -> torch.Tensor:
        """``‖firstᵀ first − I‖_F² + ‖lastᵀ last − I‖_F²``. Cost ``O(c_in r1² + c_out r2²)``."""
        return _residual(self.first) + _residual(self.last)

    def _raw_core(self) -> torch.Tensor:
        """The stored core: the parameter, or the original under a parametrization of ``core`` (e.g.
        ``conv_spectral_normalization``), which in-place updates must write (``self.core`` is then computed)."""
        return self.parametrizations.core.original if parametrize.is_parametrized(self, "core") else self.core

    @torch.no_grad()
    def orthogonalize_(self) -> TTConv2d:
        """Move to the gauge with orthonormal ``first`` and ``last``, keeping the function exactly.

        ``first = Q1 R1``, ``last = Q3 R3`` (reduced QR, ``diag(R) ≥ 0``); ``first ← Q1``, ``last ← Q3``,
        ``core[:, :, p, q] ← R3 core[:, :, p, q] R1ᵀ``. In place (``copy_``), so optimizer state stays attached.
        Cost ``O(c_in r1² + c_out r2² + r1 r2 k² (r1 + r2))``. Returns self.

        Under a parametrization of ``core`` (``conv_spectral_normalization``) the stored original is moved to the
        new gauge and the parametrization then acts on it: the function is kept exactly when the division is
        inactive before and after; otherwise the layer's norm becomes exactly the cap (the division's σ is the
        norm of the core conv, which is the layer's only in the orthonormal gauge).
        """
        Q1, R1 = qr_positive(self.first)
        Q3, R3 = qr_positive(self.last)
        core = self._raw_core()
        core.copy_(torch.einsum("ab,bcpq,dc->adpq", R3, core, R1))
        self.first.copy_(Q1)
        self.last.copy_(Q3)
        return self

    def effective_core(self) -> torch.Tensor:
        """The core ``(r2, r1, k, k)`` of the gauge-equivalent layer with orthonormal outer cores:
        ``R3 · core[:, :, p, q] · R1ᵀ`` for the R factors of ``first`` and ``last`` (not mutating; differentiable
        where the QR is). Its conv has exactly the nonzero singular values of the layer, whatever the drift of
        ``first`` and ``last`` from orthonormality. Cost as :meth:`orthogonalize_`."""
        _, R1 = qr_positive(self.first)
        _, R3 = qr_positive(self.last)
        return torch.einsum("ab,bcpq,dc->adpq", R3, self.core, R1)

    # --------------------------------------------------------------------------------------------------------
    # singular values

    def _square_stride(self) -> int:
        if self.stride[0] != self.stride[1]:
            raise ValueError(f"the spectral routines need equal strides, the layer has stride={self.stride}")
        return self.stride[0]

    def singular_values(self, n: int) -> torch.Tensor:
        """The singular values of the layer's linear part on ``n × n`` inputs, circular padding semantics.

        ``lowrankopt.spectral.conv_singular_values(self.effective_core(), n, stride)``: shape
        ``(n', n', min(r2, r1 s²))``, ``n' = n / s`` (n must be divisible by the stride s), sorted descending per
        frequency. The nonzero singular values of the layer are exactly these (the rest of its
        ``c_out n'² ∧ c_in n²`` singular values are 0) when ``padding_mode="circular"`` and the output is
        ``n' × n'`` (e.g. ``padding = k // 2`` for odd k; any such padding is a cyclic shift of the input, an
        orthogonal map). With zero padding they are those of the circular operator at size n; the zero-padded
        operator's norm is at most the maximum of ``‖K̂(ω)‖₂`` over all continuous frequencies ω, which the
        values at the ``n'²`` sampled frequencies approach (from below) as n grows.
        Cost ``O(n'² (r1 r2 s² k² + r2 r1 s² min(r2, r1 s²)))`` (FFT and one small SVD per frequency).
        """
        s = self._square_stride()
        return conv_singular_values(self.effective_core(), n, stride=s)

    @torch.no_grad()
    def clip_(self, max_sv: float, n: int) -> TTConv2d:
        """Cap the layer's singular values (circular operator at size n) at ``max_sv``, in place.

        :meth:`orthogonalize_` (so the layer's singular values are the core's), then
        ``core ← lowrankopt.spectral.clip_singular_values(core, n, max_sv, stride)`` (FFT, clip per frequency,
        project back to the k×k support, then scale so the circular norm is at most ``max_sv``). Afterwards the
        circular operator at size n has norm ≤ ``max_sv``; see :meth:`singular_values` for zero padding. Returns
        self.
        """
        s = self._square_stride()
        self.orthogonalize_()
        self._raw_core().copy_(clip_singular_values(self.core.detach(), n, max_sv, stride=s))
        return self


def _tt_svd(W: torch.Tensor, r1: int, r2: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TT-SVD of a kernel ``W (c_out, c_in, k, k)`` into ``first (c_in, r1)``, ``core (r2, r1, k, k)``, ``last
    (c_out, r2)`` with orthonormal outer cores (see :meth:`TTConv2d.from_conv`): :func:`lowrankopt.formats.tt_svd`
    of ``W[i, (p, q), o]`` with exact ranks and the norm in the middle core."""
    c_out, c_in, kh, kw = W.shape
    T = W.permute(1, 2, 3, 0).reshape(c_in, kh * kw, c_out)  # [i, (p, q), o]
    first, core, last = tt_svd(T, [r1, r2], exact=True, center=1)
    core = core.reshape(r1, kh, kw, r2).permute(3, 0, 1, 2)  # [β, α, p, q]
    return first.reshape(c_in, r1), core, last.reshape(r2, c_out).T


# ------------------------------------------------------------------------------------------------------------
# model-level helpers


def _unsupported(m: torch.nn.Conv2d) -> str | None:
    """Why ``m`` cannot be a :class:`TTConv2d` (None if it can)."""
    if m.groups != 1:
        return f"groups={m.groups}"
    if tuple(m.dilation) != (1, 1):
        return f"dilation={m.dilation}"
    if m.kernel_size[0] != m.kernel_size[1]:
        return f"non-square kernel_size={m.kernel_size}"
    if m.padding_mode not in PADDING_MODES:
        return f"padding_mode={m.padding_mode!r}"
    return None


def convert_to_tt_conv(
    model: torch.nn.Module,
    rank: int | Callable[[str, torch.nn.Module], int],
    *,
    target_modules: Targets | None = None,
    exclude_modules: Targets | None = None,
    include: LegacyPatterns | None = None,
    exclude: LegacyPatterns | None = None,
    **layer_kwargs: Any,
) -> dict[str, TTConv2d]:
    """Replace the ``nn.Conv2d`` submodules of ``model`` by :class:`TTConv2d` layers (TT-SVD of the kernels,
    :meth:`TTConv2d.from_conv`), in place.

    Args:
        model: the module to convert (in place).
        rank: the TT-rank, an int or ``rank(name, module) -> int``.
        target_modules: which convs (:func:`~lowrankopt.nn.surgery.select_modules`: module-name suffixes, a regex, a
            predicate ``fn(name, module)``); None: every ``nn.Conv2d`` that a TTConv2d can represent (groups 1, no
            dilation, square kernel, zeros/circular padding; the others are left dense). A conv selected by an
            explicit ``target_modules`` that a TTConv2d cannot represent is an error.
        exclude_modules: the same forms, for convs to leave dense.
        include: deprecated (fnmatch patterns or a predicate of the name); use ``target_modules``.
        exclude: deprecated; use ``exclude_modules``.
        **layer_kwargs: passed to the layers (``orthogonality``, …).

    All replacements are built before any is installed, so an error leaves the model untouched; a module shared
    under several names is replaced by one shared TTConv2d; a kernel tied to another place is refused rather than
    silently untied (:func:`~lowrankopt.nn.surgery.replace_modules`). Returns ``{qualified name: new layer}``. Cost:
    two SVDs per converted layer.
    """
    target_modules, exclude_modules = _legacy_selection(target_modules, exclude_modules, include, exclude)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(rank):  # checked even when nothing is converted
        as_positive_int("rank", rank)
    explicit = target_modules is not None
    convs = select_modules(model, target_modules, exclude_modules, eligible=lambda m: type(m) is torch.nn.Conv2d)
    targets = {}
    for name, m in convs.items():
        why = _unsupported(m)
        if why is None:
            targets[name] = m
        elif explicit:
            raise ValueError(f"cannot convert {name!r} to a TTConv2d: {why} (exclude it)")

    def build(name: str, m: torch.nn.Module) -> TTConv2d:
        r = rank(name, m) if callable(rank) else rank
        try:
            r = as_positive_int("rank", r)
        except ValueError as e:
            raise ValueError(f"{e} (for {name!r})") from None
        return TTConv2d.from_conv(m, r, **layer_kwargs)

    return replace_modules(model, targets, build)


def _residual(M: torch.Tensor | None) -> torch.Tensor | float:
    """``‖Mᵀ M − I‖_F²`` (0 for an absent core). Cost ``O(rows · cols²)``."""
    if M is None:
        return 0.0
    return (M.T @ M - torch.eye(M.shape[1], dtype=M.dtype, device=M.device)).square().sum()


def _tt_layers(model: torch.nn.Module, kinds: tuple[type, ...] | None = None) -> list[torch.nn.Module]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    kinds = (TTConv2d,) if kinds is None else kinds
    return [m for m in model.modules() if isinstance(m, kinds)]  # modules() yields a shared layer once


def tt_conv_orthogonalize_(model: torch.nn.Module) -> int:
    """:meth:`TTConv2d.orthogonalize_` on every TT conv of ``model`` (each shared layer once); call it after the
    optimizer steps in the ``"gauge"`` mode. Returns the number of layers."""
    layers = _tt_layers(model)
    for m in layers:
        m.orthogonalize_()
    return len(layers)


def tt_conv_penalty(model: torch.nn.Module, normalization: str = "reference") -> torch.Tensor:
    """The orthogonality penalty of the outer cores of the TT convs (:class:`TTConv2d` and
    :class:`~lowrankopt.nn.spectral.sott.SOTTConv2d`) of ``model``: add ``λ · tt_conv_penalty(model)`` to the loss
    in the ``"penalty"`` mode. Differentiable; a 0-dim zero if there is no such layer. A layer shared under several
    names counts once.

    With ``E_l = ‖firstᵀ first − I‖_F² + ‖lastᵀ last − I‖_F²`` of layer l (``r2_l = min(c_out, rank)``):

    - ``normalization="reference"`` (default since issue 23): ``Σ_l E_l / Σ_l 2 r2_l²``, over the layers with
      ``rank < max(c_in, c_out)`` — the reference code's ``orthogonal_loss(model)`` divided by its ``shapes``
      (``practical_svd_conv``, ``src/SOTT.py``, ``orthogonal_loss``; ``src/train.py`` and
      ``src/SOC/train_robust.py`` add ``orthogonal_k / shapes · loss``), so the paper's λ (``--orthogonal-k``)
      is our λ. A layer with ``rank ≥ c_in`` and ``rank ≥ c_out`` has no outer cores in the reference (its
      kernel is the core alone) and is left out here (its square outer cores, if any, are invertible: they do
      not change what the layer can represent).
    - ``normalization="layer"`` (the default before issue 23): ``Σ_l E_l / (2 rank_l²)`` over every layer, i.e.
      the sum of :meth:`TTConv2d.orthogonality_penalty`. For L penalized layers with one rank r ≤ c_out and no
      full-rank layer, ``"reference" = "layer" / L``, so λ_layer = λ_paper / L; in general the two weight the
      layers differently and no single factor converts them.

    Cost ``O(Σ_l c_in r1² + c_out r2²)``.
    """
    if normalization not in PENALTY_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {PENALTY_NORMALIZATIONS}, got {normalization!r}")
    from .sott import SOTTConv2d  # sott builds on this module

    layers = _tt_layers(model, (TTConv2d, SOTTConv2d))
    if normalization == "reference":
        layers = [m for m in layers if m.rank < max(m.in_channels, m.out_channels)]
    if not layers:
        p = next(model.parameters(), None)
        return torch.zeros((), dtype=p.dtype if p is not None else None, device=p.device if p is not None else None)
    if normalization == "layer":
        return torch.stack([m.orthogonality_penalty() for m in layers]).sum()
    shapes = sum(2 * min(m.out_channels, m.rank) ** 2 for m in layers)
    return torch.stack([m._orthogonality_residual() for m in layers]).sum() / shapes
