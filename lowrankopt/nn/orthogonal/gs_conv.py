"""Orthogonal convolutions for 1-Lipschitz networks: skew-orthogonal convs (SOC) and their GS version.

A conv operator ``x ↦ conv(x, M)`` with stride 1, odd kernel and zero "same" padding has the adjoint
``x ↦ conv(x, M*)``, ``M*[j, i, a, b] = M[i, j, −a, −b]`` (channels transposed, taps flipped). So
``L = conv(·, M − M*)`` is skew-symmetric and ``exp(L)`` is an orthogonal operator (Singla & Feizi, ICML
2021). It is applied as the truncated series ``Σ_{i≤T} Lⁱx / i!``; the number of terms T is *certified*:
with ``λ = Σ_taps ‖(M − M*)[:, :, a, b]‖₂ ≥ ‖L‖₂`` (the operator is a sum of shifted tap matrices),
the remainder is at most ``λ^{T+1} e^λ / (T+1)!``, and T is the least count that brings it under ``tol``.

Grouped SOC applies one such operator per channel group (a block-diagonal orthogonal operator). The GS
orthogonal conv (Gorbunov et al., NeurIPS 2024) mixes the groups with channel shuffles,
``Y = GrExpConv₂(Shuffle(GrExpConv₁(Shuffle(X))))``, the second with a 1×1 kernel: orthogonal, with fewer
parameters and FLOPs than an ungrouped SOC. :class:`MaxMinPermuted` is the matching 1-Lipschitz activation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..._checks import as_positive_int, check_scalar
from .._common import _autocast_output, _check_dtype, _check_image, _full_precision, _kw, _refuse_half

__all__ = [
    "GSOrthogonalConv2d",
    "LipConvNet",
    "MaxMinPermuted",
    "SkewOrthogonalConv2d",
    "certified_accuracy",
    "certified_radius",
    "channel_shuffle",
]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups: ``(B, g·c, H, W)`` → channel ``i·g + j`` = old ``j·c + i``."""
    B, C, H, W = x.shape
    if C % groups:
        raise ValueError(f"channels {C} are not divisible into {groups} groups")
    return x.reshape(B, groups, C // groups, H, W).transpose(1, 2).reshape(B, C, H, W)


class SkewOrthogonalConv2d(torch.nn.Module):
    """``y = exp(L) x`` with L the skew-symmetric (grouped) conv ``conv(·, M − M*)``; channels in = out.

    Args:
        channels: C (divisible by ``groups``).
        kernel_size: odd k (stride 1, zero "same" padding).
        groups: channel groups; each gets its own skew conv (a block-diagonal orthogonal operator).
        tol: certified bound on the truncation error of the series, relative to ``‖x‖``.
        max_terms: at most this many terms (a ``RuntimeError`` if the certificate needs more).
        max_norm: if the bound λ exceeds it, L is scaled by ``max_norm / λ`` (still skew: the map stays
            orthogonal, and the series short); None: no scaling.
        bias: add a learned bias after the orthogonal map (keeps the layer 1-Lipschitz).

    Cost ``O(T B H W C (C / groups) k²)`` for T terms. A 1×1 kernel (``kernel_size=1``) takes no series: its
    exponential is the block-diagonal matrix of the groups' ``c × c`` exponentials, exact to rounding (cost
    ``O(B H W C (C / groups))``; ``tol`` and ``max_terms`` then do not apply).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        groups: int = 1,
        *,
        tol: float = 1e-6,
        max_terms: int = 30,
        max_norm: float | None = 2.0,
        bias: bool = True,
        init_scale: float = 0.1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        channels, groups = as_positive_int("channels", channels), as_positive_int("groups", groups)
        if channels % groups:
            raise ValueError(f"channels {channels} must be divisible by groups {groups}")
        kernel_size = as_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if not 0 < check_scalar("tol", tol) < 1:
            raise ValueError(f"tol must be in (0, 1), got {tol}")
        max_terms = as_positive_int("max_terms", max_terms)
        if max_norm is not None and not check_scalar("max_norm", max_norm) > 0:
            raise ValueError(f"max_norm must be positive or None, got {max_norm}")
        if not check_scalar("init_scale", init_scale) >= 0:
            raise ValueError(f"init_scale must be ≥ 0, got {init_scale}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        self.channels, self.kernel_size, self.groups, self.tol, self.max_terms, self.max_norm = (
            channels, kernel_size, groups, tol, max_terms, max_norm,
        )  # fmt: skip
        dtype, device, _ = _kw(dtype, device, generator)
        c = channels // groups
        M = torch.randn(channels, c, kernel_size, kernel_size, dtype=dtype, generator=generator)
        self.weight = torch.nn.Parameter((init_scale / math.sqrt(c * kernel_size**2) * M).to(device))
        self.bias = torch.nn.Parameter(torch.zeros(channels, dtype=dtype, device=device)) if bias else None

    def skew_kernel(self) -> torch.Tensor:
        """The kernel of L: ``M − M*`` per group (scaled down to ``max_norm`` if its bound exceeds it),
        ``(C, C/groups, k, k)``."""
        g, c, k = self.groups, self.channels // self.groups, self.kernel_size
        M = self.weight.reshape(g, c, c, k, k)
        K = (M - M.transpose(1, 2).flip(-1, -2)).reshape(self.channels, c, k, k)
        if self.max_norm is not None:
            lam = self._bound(K)
            if lam > self.max_norm:
                K = K * (self.max_norm / lam)
        return K

    def norm_bound(self, kernel: torch.Tensor | None = None) -> torch.Tensor:
        """``λ ≥ ‖L‖₂``: per group, the sum over taps of the spectral norms of the tap matrices; the max
        over groups."""
        return self._bound(self.skew_kernel() if kernel is None else kernel).detach()

    def _bound(self, K: torch.Tensor) -> torch.Tensor:
        g, c, k = self.groups, self.channels // self.groups, self.kernel_size
        taps = K.reshape(g, c, c, k * k).permute(0, 3, 1, 2)  # (g, k², c, c)
        return torch.linalg.matrix_norm(taps, ord=2).sum(dim=1).max()

    def terms(self, bound: float) -> int:
        """The least T with ``bound^{T+1} e^bound / (T+1)! ≤ tol``."""
        for T in range(1, self.max_terms + 1):
            if (T + 1) * math.log(max(bound, 1e-300)) + bound - math.lgamma(T + 2) <= math.log(self.tol):
                return T
        raise RuntimeError(
            f"the series needs more than max_terms={self.max_terms} terms for tol={self.tol} at ‖L‖ ≤ {bound:.3g}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``exp(L) x`` for ``x: (B, C, H, W)``. Under autocast the convs autocast, the kernel and its bound are
        computed in the parameters' dtype, and the output has the autocast dtype (as ``nn.Conv2d``'s)."""
        _check_image(x, self.channels)
        _refuse_half(self, self.weight.dtype, "its certified series needs the spectral norms of its taps (SVD)")
        _check_dtype(x, self.weight)
        if self.kernel_size == 1:
            out = self._exp_1x1(x)
        else:
            with _full_precision(x):
                K = self.skew_kernel()
                terms = self.terms(float(self.norm_bound(K)))
            pad = self.kernel_size // 2
            term, out = x, x
            for i in range(1, terms + 1):
                term = F.conv2d(term, K, padding=pad, groups=self.groups) / i
                out = out + term
        return _autocast_output(out if self.bias is None else out + self.bias[:, None, None])

    def _exp_1x1(self, x: torch.Tensor) -> torch.Tensor:
        """``exp(L) x`` for a 1×1 kernel: L mixes channels only, so ``exp(L)`` is the block-diagonal matrix of the
        ``c × c`` exponentials ``exp(K_g)`` (``torch.linalg.matrix_exp``: exact to rounding, no truncated series and
        no term count), applied as one batched product over the groups — one pass over x instead of T grouped 1×1
        convolutions (slow kernels on CPUs). Cost ``O(g c³)`` for the exponentials + ``O(B H W C c)``."""
        g, c = self.groups, self.channels // self.groups
        with _full_precision(x):
            E = torch.linalg.matrix_exp(self.skew_kernel().reshape(g, c, c))
        B, C, H, W = x.shape
        return torch.einsum("goi,bgihw->bgohw", E, x.reshape(B, g, c, H, W)).reshape(B, C, H, W)


class GSOrthogonalConv2d(torch.nn.Module):
    """The GS orthogonal conv: ``GrExpConv₂(Shuffle(GrExpConv₁(Shuffle(x))))`` — a grouped k×k SOC and a
    grouped 1×1 SOC with channel shuffles between; orthogonal (up to the certified truncation).

    Args:
        channels: C.
        kernel_size: odd k of the first factor.
        groups: ``(g1, g2)`` group counts of the two factors (an int: both).
        tol: certified truncation bound of each factor.

    Parameters: ``C²k²/g1 + C²/g2`` (plus the bias) against ``C²k²`` for an ungrouped SOC.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        groups: int | tuple[int, int] = (4, 4),
        *,
        tol: float = 1e-6,
        bias: bool = True,
        **kw: Any,
    ) -> None:
        super().__init__()
        if isinstance(groups, (tuple, list)) and len(groups) == 2:
            g1, g2 = groups
        elif isinstance(groups, (tuple, list, str)):
            raise ValueError(f"groups must be an int or a pair (g1, g2) of ints, got {groups!r}")
        else:  # one count for both factors (checked by them)
            g1 = g2 = groups
        self.conv1 = SkewOrthogonalConv2d(channels, kernel_size, g1, tol=tol, bias=False, **kw)
        self.conv2 = SkewOrthogonalConv2d(channels, 1, g2, tol=tol, bias=bias, **kw)
        self.g1, self.g2 = self.conv1.groups, self.conv2.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, self.conv1.channels)
        _refuse_half(self, self.conv1.weight.dtype, "its certified series need the spectral norms of their taps (SVD)")
        x = self.conv1(channel_shuffle(x, self.g1))
        return self.conv2(channel_shuffle(x, self.g1))  # interleave conv1's g1 groups so that conv2's groups mix them


class MaxMinPermuted(torch.nn.Module):
    """1-Lipschitz, gradient-norm-preserving activation: channel pairs ``(2i, 2i+1)`` → ``(max, min)``.

    Adjacent pairs (rather than the halves of MaxMin) stay within one group after a channel shuffle.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] % 2:
            raise ValueError(f"MaxMinPermuted needs an even number of channels, got {x.shape[1]}")
        a, b = x[:, 0::2], x[:, 1::2]
        return torch.stack((torch.maximum(a, b), torch.minimum(a, b)), dim=2).flatten(1, 2)


def certified_radius(logits: torch.Tensor, lipschitz: float = 1.0) -> torch.Tensor:
    """The ℓ₂ radius within which the prediction of a ``lipschitz``-Lipschitz classifier cannot change:
    ``(top logit − runner-up) / (√2 · lipschitz)``. A sample is certified at ε if its radius exceeds ε."""
    top2 = logits.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]) / (math.sqrt(2) * lipschitz)


class _OrthonormalRowsLinear(torch.nn.Module):
    """``y = W x + b`` with ``W = V / max(1, ‖V‖₂)``: at most 1-Lipschitz (exact spectral norm, a dense SVD of
    the small head matrix per forward)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        dtype = torch.get_default_dtype() if dtype is None else dtype
        V = torch.randn(out_features, in_features, dtype=dtype, generator=generator) / math.sqrt(in_features)
        self.weight = torch.nn.Parameter(V.to(device))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.matrix_norm(self.weight, ord=2)
        return F.linear(x, self.weight / torch.clamp(norm, min=1.0), self.bias)


class LipConvNet(torch.nn.Module):
    """A 1-Lipschitz convolutional classifier (LipConvNet-style): channels zero-padded to ``width``, then per
    stage ``depth`` × (orthogonal conv → :class:`MaxMinPermuted`) and an invertible 2×2 space-to-depth
    (a permutation: width × 4 channels), then a linear head with spectral norm ≤ 1.

    Args:
        in_channels: input channels.
        num_classes: outputs.
        image_size: input height = width (divisible by ``2**stages``).
        width: channels after the padding.
        depth: orthogonal convs per stage.
        stages: downsampling stages.
        conv: ``"gs"`` (:class:`GSOrthogonalConv2d` with ``groups``) or ``"soc"`` (ungrouped
            :class:`SkewOrthogonalConv2d`).
        groups: the GS group counts.

    Every layer is 1-Lipschitz (orthogonal up to the certified truncation tol), so the network is; use
    :func:`certified_radius` on its logits.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        *,
        width: int = 16,
        depth: int = 2,
        stages: int = 2,
        conv: str = "gs",
        groups: int | tuple[int, int] = (4, 4),
        tol: float = 1e-6,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if conv not in ("gs", "soc"):
            raise ValueError(f"conv must be 'gs' or 'soc', got {conv!r}")
        if in_channels > width or image_size % (2**stages):
            raise ValueError("need in_channels <= width and image_size divisible by 2**stages")
        self.width, self.in_channels = width, in_channels
        layers: list[torch.nn.Module] = []
        c = width
        kw = dict(tol=tol, dtype=dtype, device=device, generator=generator)
        for _ in range(stages):
            for _ in range(depth):
                layers.append(
                    GSOrthogonalConv2d(c, 3, groups, **kw) if conv == "gs" else SkewOrthogonalConv2d(c, 3, **kw)
                )
                layers.append(MaxMinPermuted())
            layers.append(torch.nn.PixelUnshuffle(2))
            c *= 4
        self.features = torch.nn.Sequential(*layers)
        side = image_size // 2**stages
        self.head = _OrthonormalRowsLinear(
            c * side * side, num_classes, dtype=dtype, device=device, generator=generator
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"input must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        x = F.pad(x, (0, 0, 0, 0, 0, self.width - x.shape[1]))  # zero channels: an isometric embedding
        return self.head(self.features(x).flatten(1))


@torch.no_grad()
def certified_accuracy(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, eps: float) -> tuple[float, float]:
    """``(clean accuracy, certified accuracy at ℓ₂ radius eps)`` of a 1-Lipschitz classifier: a sample counts as
    certified when it is classified correctly and its :func:`certified_radius` exceeds ``eps``."""
    logits = model(X)
    correct = logits.argmax(1) == y
    return correct.float().mean().item(), (correct & (certified_radius(logits) > eps)).float().mean().item()
