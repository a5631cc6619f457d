"""Orthogonal convolutions for 1-Lipschitz networks: skew-orthogonal convs (SOC) and their GS version.

A conv operator ``x ↦ conv(x, M)`` with stride 1, odd kernel and zero "same" padding has the adjoint
``x ↦ conv(x, M*)``, ``M*[j, i, a, b] = M[i, j, −a, −b]`` (channels transposed, taps flipped). So
``L = conv(·, M − M*)`` is skew-symmetric and ``exp(L)`` is an orthogonal operator (Singla & Feizi, ICML
2021). It is applied as the truncated series ``Σ_{i≤T} Lⁱx / i!``; the number of terms T is *certified*:
with ``λ = Σ_taps ‖(M − M*)[:, :, a, b]‖₂ ≥ ‖L‖₂`` (the operator is a sum of shifted tap matrices),
the remainder is at most ``λ^{T+1} e^λ / (T+1)!``, and T is the least count that brings it under ``tol``.

Stride 2 and ``C_in ≠ C_out`` as in SOC's code (``singlasahil14/SOC``, ``skew_ortho_conv.py``, ``SOC.forward``): the
input is first rearranged by an invertible 2×2 space-to-depth (``pixel_unshuffle``, a permutation: ``4 C_in``
channels at half the resolution), then zero-padded to ``C = max(4 C_in, C_out)`` channels (an isometric embedding),
``exp(L)`` acts on C channels, and the first ``C_out`` channels are kept (a co-isometry). The map is therefore an
isometry (``‖W x‖ = ‖x‖``) when ``stride² C_in ≤ C_out`` and a co-isometry (``W Wᵀ = I``: every singular value 1)
otherwise — 1-Lipschitz either way.

Grouped SOC applies one such operator per channel group (a block-diagonal orthogonal operator). The GS
orthogonal conv (Gorbunov et al., NeurIPS 2024, §6.3) mixes the groups with channel shuffles,
``Y = GrExpConv₂(ChShuffle₂(GrExpConv₁(ChShuffle₁(X))))``, the second with a 1×1 kernel: orthogonal, with fewer
parameters and FLOPs than an ungrouped SOC. :class:`MaxMinPermuted` is the matching 1-Lipschitz activation (paper,
Definition F.2), :class:`MaxMin` SOC's.

**The channel shuffle.** ``ChShuffle`` with k groups is the paper's ``P_(k, C)`` sending channel i to
``σ(i) = (i mod k)·C/k + ⌊i/k⌋`` (the paper's matrix convention, see :mod:`.gs`), or its "paired" version
(Appendix F) that moves channel pairs ``(2i, 2i+1)`` together — what the authors' ``channel_shuffle`` computes
(gsoft_demo, ``gs_conv/skew_ortho_conv.py``). Earlier lowrankopt versions used the inverse permutation, and the same
shuffle (g1 groups) before both factors: ``shuffle="legacy"`` keeps that layer exactly, for their checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..._checks import as_positive_int, check_scalar
from .._common import (
    _autocast_output,
    _check_dtype,
    _check_image,
    _full_precision,
    _int_record,
    _kw,
    _load_with_record,
    _refuse_half,
)
from .gs import SHUFFLE_CODES

__all__ = [
    "GSOrthogonalConv2d",
    "LipConvNet",
    "MaxMin",
    "MaxMinPermuted",
    "SkewOrthogonalConv2d",
    "certified_accuracy",
    "certified_radius",
    "channel_shuffle",
]


SHUFFLES = ("paper", "legacy")


def channel_shuffle(x: torch.Tensor, groups: int, *, shuffle: str = "paper", paired: bool = False) -> torch.Tensor:
    """The paper's ``ChShuffle`` with ``groups`` = k groups on ``x: (B, C, H, W)``, ``c = C / k``:

    * ``shuffle="paper"`` (default): channel ``i·k + j`` moves to ``j·c + i`` (``P_(k, C)``: i ↦ ``(i mod k)·c +
      ⌊i/k⌋``), so new group j gathers the channels ``j, j + k, j + 2k, …``; with ``paired=True`` the same on channel
      pairs (``σ^paired``, Appendix F): pair ``i·k + j`` moves to pair position ``j·c/2 + i``, its two channels in
      order. This is gsoft_demo's ``channel_shuffle(x, groups, paired)``.
    * ``shuffle="legacy"``: the inverse, earlier lowrankopt's ``channel_shuffle``: channel ``i·k + j`` ← ``j·c + i``
      (with ``paired``: the inverse of the paired shuffle).

    A permutation of the channels (orthogonal). Cost: one copy of x."""
    B, C, H, W = x.shape
    if shuffle not in SHUFFLES:
        raise ValueError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}")
    unit = 2 if paired else 1
    if C % (groups * unit):
        raise ValueError(f"channels {C} are not divisible into {groups} groups" + (" of pairs" if paired else ""))
    c = C // (groups * unit)  # units (channels or pairs) per group
    if shuffle == "paper":
        x = x.reshape(B, c, groups, unit, H, W)
    else:
        x = x.reshape(B, groups, c, unit, H, W)
    return x.transpose(1, 2).reshape(B, C, H, W)


class SkewOrthogonalConv2d(torch.nn.Module):
    """``y = exp(L) x`` with L the skew-symmetric (grouped) conv ``conv(·, M − M*)``; with ``stride=2`` or
    ``out_channels ≠ channels``, ``y = S exp(L) E U x`` as SOC's code does it (module docstring): U the 2×2
    space-to-depth, E zero-padding to ``C = max(stride² · channels, out_channels)`` channels, S keeping the first
    ``out_channels``.

    Args:
        channels: input channels.
        kernel_size: odd k (zero "same" padding, applied after the space-to-depth).
        groups: channel groups of L (they must divide C); each gets its own skew conv (a block-diagonal orthogonal
            operator).
        out_channels: output channels (default: ``stride² · channels``, so a stride-1 layer keeps its width).
        stride: 1 or 2.
        tol: certified bound on the truncation error of the series, relative to ``‖x‖``.
        max_terms: at most this many terms (a ``RuntimeError`` if the certificate needs more).
        max_norm: if the bound λ exceeds it, L is scaled by ``max_norm / λ`` (still skew: the map stays
            orthogonal, and the series short); None: no scaling.
        bias: add a learned bias after the orthogonal map (keeps the layer 1-Lipschitz).

    Isometric (``‖y − bias‖ = ‖x‖``) when ``stride² · channels ≤ out_channels``, co-isometric (all singular
    values 1) otherwise, up to ``tol``. Parameters ``C (C / groups) k²`` (+ ``out_channels`` bias). Cost
    ``O(T B H' W' C (C / groups) k²)`` for T terms at the output resolution ``H' × W'``. A 1×1 kernel
    (``kernel_size=1``) takes no series: its exponential is the block-diagonal matrix of the groups' ``c × c``
    exponentials, exact to rounding (cost ``O(B H' W' C (C / groups))``; ``tol`` and ``max_terms`` then do not
    apply).
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
        out_channels: int | None = None,
        stride: int = 1,
    ) -> None:
        super().__init__()
        channels, groups = as_positive_int("channels", channels), as_positive_int("groups", groups)
        stride = as_positive_int("stride", stride)
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        out_channels = (
            stride * stride * channels if out_channels is None else as_positive_int("out_channels", out_channels)
        )
        width = max(stride * stride * channels, out_channels)  # C: the channels exp(L) acts on
        if width % groups:
            raise ValueError(
                f"the conv's channels max(stride² · channels, out_channels) = {width} must be divisible by groups "
                f"{groups}"
            )
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
        self.out_channels, self.stride, self.width = out_channels, stride, width
        dtype, device, _ = _kw(dtype, device, generator)
        c = width // groups
        M = torch.randn(width, c, kernel_size, kernel_size, dtype=dtype, generator=generator)
        self.weight = torch.nn.Parameter((init_scale / math.sqrt(c * kernel_size**2) * M).to(device))
        self.bias = torch.nn.Parameter(torch.zeros(out_channels, dtype=dtype, device=device)) if bias else None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for name, default in (("stride", 1), ("width", self.channels), ("out_channels", self.channels)):
            self.__dict__.setdefault(name, default)  # a module pickled before stride / out_channels existed

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"groups={self.groups}, width={self.width}"
        )

    def skew_kernel(self) -> torch.Tensor:
        """The kernel of L: ``M − M*`` per group (scaled down to ``max_norm`` if its bound exceeds it),
        ``(C, C/groups, k, k)``."""
        g, c, k = self.groups, self.width // self.groups, self.kernel_size
        M = self.weight.reshape(g, c, c, k, k)
        K = (M - M.transpose(1, 2).flip(-1, -2)).reshape(self.width, c, k, k)
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
        g, c, k = self.groups, self.width // self.groups, self.kernel_size
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
        """``S exp(L) E U x`` for ``x: (B, channels, H, W)`` → ``(B, out_channels, H/stride, W/stride)`` (H, W
        divisible by the stride). Under autocast the convs autocast, the kernel and its bound are computed in the
        parameters' dtype, and the output has the autocast dtype (as ``nn.Conv2d``'s)."""
        _check_image(x, self.channels)
        _refuse_half(self, self.weight.dtype, "its certified series needs the spectral norms of its taps (SVD)")
        _check_dtype(x, self.weight)
        stride, width = self.stride, self.width
        if stride > 1:
            if x.shape[-1] % stride or x.shape[-2] % stride:
                raise ValueError(f"input height and width must be divisible by the stride {stride}, got {x.shape}")
            x = F.pixel_unshuffle(x, stride)  # channel c·s² + i·s + j ← pixel (s·h + i, s·w + j): SOC's rearrange
        if x.shape[1] < width:
            x = F.pad(x, (0, 0, 0, 0, 0, width - x.shape[1]))  # zero channels: an isometric embedding
        out = self._exp(x)
        out_channels = self.out_channels
        if out_channels < width:
            out = out[:, :out_channels]  # the first channels: a co-isometry
        return _autocast_output(out if self.bias is None else out + self.bias[:, None, None])

    def _exp(self, x: torch.Tensor) -> torch.Tensor:
        """``exp(L) x`` on the C channels, by the certified series (or exactly for a 1×1 kernel)."""
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
        return out

    def _exp_1x1(self, x: torch.Tensor) -> torch.Tensor:
        """``exp(L) x`` for a 1×1 kernel: L mixes channels only, so ``exp(L)`` is the block-diagonal matrix of the
        ``c × c`` exponentials ``exp(K_g)`` (``torch.linalg.matrix_exp``: exact to rounding, no truncated series and
        no term count), applied as one batched product over the groups — one pass over x instead of T grouped 1×1
        convolutions (slow kernels on CPUs). Cost ``O(g c³)`` for the exponentials + ``O(B H W C c)``."""
        g, c = self.groups, self.width // self.groups
        with _full_precision(x):
            E = torch.linalg.matrix_exp(self.skew_kernel().reshape(g, c, c))
        B, C, H, W = x.shape
        return torch.einsum("goi,bgihw->bgohw", E, x.reshape(B, g, c, H, W)).reshape(B, C, H, W)


class GSOrthogonalConv2d(torch.nn.Module):
    """The GS orthogonal conv: ``GrExpConv₂(ChShuffle₂(GrExpConv₁(ChShuffle₁(x))))`` — a grouped k×k SOC and a
    grouped 1×1 SOC, each after the channel shuffle of its group count (paper §6.3 and Table 3: "before each
    grouped layer with k groups use a ChShuffle operator"; gsoft_demo's ``GS_SOC_Accelerated``); orthogonal (up to
    the certified truncation). With ``stride=2`` or ``out_channels ≠ channels`` the first factor is a strided /
    channel-changing :class:`SkewOrthogonalConv2d` (space-to-depth, zero-padding or slicing, as SOC's code), the
    second acts on ``out_channels``.

    Args:
        channels: input channels.
        kernel_size: odd k of the first factor.
        groups: ``(g1, g2)`` group counts of the two factors (an int: both).
        tol: certified truncation bound of each factor.
        out_channels: output channels (default ``stride² · channels``).
        stride: 1 or 2.
        shuffle: ``"paper"`` (default since issue 23: the paper's ChShuffle before each factor, with its group count)
            or ``"legacy"`` (earlier lowrankopt: the inverse shuffle, with g1 groups before both factors — for their
            checkpoints; unpaired).
        paired: move channel pairs together in the shuffles (the paper's "paired" permutation, Appendix F, which
            keeps the pairs of :class:`MaxMinPermuted` in one group). Default (None): paired with ``shuffle="paper"``
            (the setting of the paper's Table 3) when both shuffles can move pairs — the input shuffle's channels
            divide into g1 groups of pairs (or are not shuffled, see below) and ``out_channels`` into g2 groups of
            pairs — else unpaired; unpaired with ``"legacy"``. The choice made is the attribute ``paired``, shown by
            ``repr`` and recorded in the state dict. ``paired=True`` where a shuffle cannot move pairs is a
            ``ValueError`` naming ``paired`` and ``groups``.

    The input shuffle is skipped, as in the reference (gsoft_demo ``GS_SOC_Accelerated``), exactly when the input
    channels are not divisible by g1 — e.g. the 3 (or 1) channels of an image (``shuffles_input`` says which).
    Parameters: ``C²k²/g1 + C_out²/g2`` (plus the bias), with ``C = max(stride² · channels, out_channels)``, against
    ``C²k²`` for an ungrouped SOC.

    **Checkpoints.** The parameters have the same shapes whatever ``shuffle`` and ``paired`` are, so the state dict
    records them (``_extra_state``, int64 ``[shuffle code, paired]``: :meth:`get_extra_state`) and loading checks
    the record against the layer: a state dict saved with other permutations — or one without the record (saved by
    lowrankopt before issue 23, whose layer is now ``shuffle="legacy"``, unpaired) into a layer whose shuffles differ
    from that one — is an error of ``load_state_dict`` (also with ``strict=False``) naming the setting to build with.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        groups: int | tuple[int, int] = (4, 4),
        *,
        tol: float = 1e-6,
        bias: bool = True,
        out_channels: int | None = None,
        stride: int = 1,
        shuffle: str = "paper",
        paired: bool | None = None,
        **kw: Any,
    ) -> None:
        super().__init__()
        if isinstance(groups, (tuple, list)) and len(groups) == 2:
            g1, g2 = groups
        elif isinstance(groups, (tuple, list, str)):
            raise ValueError(f"groups must be an int or a pair (g1, g2) of ints, got {groups!r}")
        else:  # one count for both factors (checked by them)
            g1 = g2 = groups
        if shuffle not in SHUFFLES:
            raise ValueError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}")
        if paired is not None and not isinstance(paired, bool):
            raise TypeError(f"paired must be a bool or None, got {paired!r}")
        self.conv1 = SkewOrthogonalConv2d(
            channels, kernel_size, g1, tol=tol, bias=False, out_channels=out_channels, stride=stride, **kw
        )
        self.conv2 = SkewOrthogonalConv2d(self.conv1.out_channels, 1, g2, tol=tol, bias=bias, **kw)
        self.g1, self.g2 = self.conv1.groups, self.conv2.groups
        c_in, c_mid = self.conv1.channels, self.conv1.out_channels
        second = self.g2 if shuffle == "paper" else self.g1  # legacy: interleave conv1's g1 groups
        input_pairs = not self.shuffles_input or c_in % (2 * self.g1) == 0
        if paired is None:  # the paper's setting where both shuffles can move pairs (documented, recorded)
            paired = shuffle == "paper" and input_pairs and c_mid % (2 * second) == 0
        if paired and not input_pairs:
            raise ValueError(
                f"paired=True: the input's {c_in} channels divide into groups[0]={self.g1} groups (so they are "
                f"shuffled) but not into {self.g1} groups of pairs; use paired=False or other groups"
            )
        self.shuffle, self.paired = shuffle, paired
        unit = 2 if paired else 1
        if c_mid % (second * unit):
            raise ValueError(
                f"out_channels {c_mid} must be divisible into {second} groups"
                + (" of pairs (paired=True; use paired=False or other groups)" if paired else "")
            )

    @property
    def shuffles_input(self) -> bool:
        """Whether the input is shuffled before the first factor: when its channels divide into g1 groups (the
        reference's rule; an image's 3 channels are not shuffled)."""
        return self.conv1.channels % self.g1 == 0

    def extra_repr(self) -> str:
        shuffle, paired = self._setting()
        return (
            f"groups=({self.g1}, {self.g2}), shuffle={shuffle!r}, paired={paired}, shuffles_input={self.shuffles_input}"
        )

    def _setting(self) -> tuple[str, bool]:
        """``(shuffle, paired)``; a module pickled before they existed is the legacy, unpaired layer."""
        return getattr(self, "shuffle", "legacy"), getattr(self, "paired", False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x, self.conv1.channels)
        _refuse_half(self, self.conv1.weight.dtype, "its certified series need the spectral norms of their taps (SVD)")
        shuffle, paired = self._setting()
        if self.shuffles_input:  # as the reference: an image's few channels are not shuffled
            x = channel_shuffle(x, self.g1, shuffle=shuffle, paired=paired)
        x = self.conv1(x)
        second = self.g2 if shuffle == "paper" else self.g1  # legacy: interleave conv1's g1 groups
        return self.conv2(channel_shuffle(x, second, shuffle=shuffle, paired=paired))

    # ---------------------------------------------------------------- the shuffles' record in state dicts
    def get_extra_state(self) -> torch.Tensor:
        """The shuffles' setting, saved in the state dict (key ``_extra_state``): int64 ``[shuffle code, paired]``
        (code 1 ``"paper"``, 0 ``"legacy"``)."""
        shuffle, paired = self._setting()
        return torch.tensor([SHUFFLE_CODES[shuffle], int(paired)], dtype=torch.int64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Nothing to set: the shuffles are fixed at construction; :meth:`_load_from_state_dict` checks the saved
        ones."""

    def _permutations(self, shuffle: str, paired: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The channel permutations (input shuffle or None, middle shuffle) of this layer's sizes under a setting;
        ``ValueError`` if the setting cannot apply to them."""

        def perm(c: int, groups: int) -> torch.Tensor:
            ids = torch.arange(c, dtype=torch.float64).reshape(1, c, 1, 1)
            return channel_shuffle(ids, groups, shuffle=shuffle, paired=paired).reshape(-1)

        first = perm(self.conv1.channels, self.g1) if self.shuffles_input else None
        return first, perm(self.conv1.out_channels, self.g2 if shuffle == "paper" else self.g1)

    def _permutation_mismatch(self, saved: object, name: str) -> str | None:
        """None if a state saved with the record ``saved`` (None: no record, lowrankopt before issue 23: the legacy,
        unpaired layer) has this layer's channel permutations; else the error message. Compares the permutations,
        not the names (with one group the shuffles are all the identity)."""
        own = self._setting()
        if saved is None:
            setting = ("legacy", False)
        else:
            record = _int_record(saved)
            names = {code: key for key, code in SHUFFLE_CODES.items()}
            if record is None or len(record) != 2 or record[0] not in names or record[1] not in (0, 1):
                return f"{name}: unreadable record of the channel shuffles in the state dict: {saved!r}"
            setting = (names[record[0]], bool(record[1]))
        try:
            saved_perms = self._permutations(*setting)
        except ValueError:
            saved_perms = None
        mine = self._permutations(*own)
        if saved_perms is not None and all(
            (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
            for a, b in zip(saved_perms, mine)
        ):
            return None
        layer = f"this layer has shuffle={own[0]!r}, paired={own[1]} (other channel permutations)"
        if saved is None:
            return (
                f"{name}: the state dict records no channel shuffle: it was saved by lowrankopt before issue 23, whose "
                f"layer is now shuffle='legacy', paired=False; {layer}. Build it with shuffle='legacy' (LipConvNet: "
                "shuffle='legacy')"
            )
        return (
            f"{name}: the state dict was saved with shuffle={setting[0]!r}, paired={setting[1]}; {layer}. Build it "
            f"with shuffle={setting[0]!r}, paired={setting[1]}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """torch's loading, after a check of the saved shuffles (:meth:`_permutation_mismatch`) when the state dict
        loads anything into this layer: a mismatch is an error of ``load_state_dict`` (also with ``strict=False``), and
        nothing of the layer (``conv1``, ``conv2`` included) is loaded then."""
        name = f"{type(self).__name__} {prefix[:-1] or '(root)'}"
        _load_with_record(
            self, super()._load_from_state_dict, lambda saved: self._permutation_mismatch(saved, name), state_dict,
            prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs=error_msgs,
        )  # fmt: skip


class MaxMin(torch.nn.Module):
    """SOC's 1-Lipschitz, gradient-norm-preserving activation (Anil et al. 2019; paper Definition F.1): the two
    channel halves ``(A, B)`` → ``(max(A, B), min(A, B))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] % 2:
            raise ValueError(f"MaxMin needs an even number of channels, got {x.shape[1]}")
        a, b = x.chunk(2, dim=1)
        return torch.cat((torch.maximum(a, b), torch.minimum(a, b)), dim=1)


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


ARCHITECTURES = ("compact", "reference")
ACTIVATIONS = {"maxmin": MaxMin, "maxmin_permuted": MaxMinPermuted}


class LipConvNet(torch.nn.Module):
    """A 1-Lipschitz convolutional classifier, in one of two layouts (``architecture``):

    * ``"compact"`` (default): channels zero-padded to ``width``, then per stage ``depth`` × (orthogonal conv →
      activation) and an invertible 2×2 space-to-depth (a permutation: width × 4 channels), then a linear head with
      spectral norm ≤ 1.
    * ``"reference"``: Singla & Feizi's LipConvNet (``singlasahil14/SOC``, ``lip_convnets.py``; the GS paper's
      §7.3 uses it with GS-SOC layers, gsoft_demo ``gs_conv/lip_convnets.py``): ``stages`` blocks, block s with
      ``planes = width · 2ˢ``: ``depth − 1`` stride-1 3×3 convs (``planes`` channels; the very first takes the
      image's channels, zero-padded) and a stride-2 conv to ``2 · planes`` channels (space-to-depth then slicing:
      co-isometric), each followed by the activation; the last block's stride-2 conv has a 1×1 kernel. Then the
      features are flattened to channels and a final 1×1 SOC (:class:`SkewOrthogonalConv2d`, ungrouped, with bias)
      maps them to ``num_classes`` (a slice of an orthogonal map). LipConvNet-n is ``stages=5, depth=n/5,
      width=32`` on 32×32 images.

    Args:
        in_channels: input channels.
        num_classes: outputs.
        image_size: input height = width (divisible by ``2**stages``).
        width: channels after the padding ("compact"); the first block's planes ("reference", SOC's
            ``init_channels``).
        depth: orthogonal convs per stage.
        stages: downsampling stages.
        conv: ``"gs"`` (:class:`GSOrthogonalConv2d` with ``groups``) or ``"soc"`` (ungrouped
            :class:`SkewOrthogonalConv2d`).
        groups: the GS group counts.
        activation: ``"maxmin"`` (:class:`MaxMin`) or ``"maxmin_permuted"`` (:class:`MaxMinPermuted`); default:
            ``"maxmin_permuted"``, except ``"maxmin"`` for SOC convs in the reference layout (as SOC's code).
        shuffle: the GS convs' channel shuffle (:class:`GSOrthogonalConv2d`; ``"legacy"`` for earlier checkpoints).

    Every layer is 1-Lipschitz (orthogonal or co-isometric up to the certified truncation tol), so the network is;
    use :func:`certified_radius` on its logits.
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
        architecture: str = "compact",
        activation: str | None = None,
        shuffle: str = "paper",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if conv not in ("gs", "soc"):
            raise ValueError(f"conv must be 'gs' or 'soc', got {conv!r}")
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        if activation is None:
            activation = "maxmin" if architecture == "reference" and conv == "soc" else "maxmin_permuted"
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        depth, stages = as_positive_int("depth", depth), as_positive_int("stages", stages)
        if image_size % (2**stages):
            raise ValueError(f"image_size {image_size} must be divisible by 2**stages = {2**stages}")
        if architecture == "compact" and in_channels > width:
            raise ValueError(f"need in_channels <= width, got {in_channels} > {width}")
        self.width, self.in_channels, self.architecture = width, in_channels, architecture
        kw = dict(tol=tol, dtype=dtype, device=device, generator=generator)
        gs_kw = dict(kw, shuffle=shuffle)
        act = ACTIVATIONS[activation]
        layers: list[torch.nn.Module] = []
        side = image_size // 2**stages
        if architecture == "compact":
            c = width
            for _ in range(stages):
                for _ in range(depth):
                    layers.append(
                        GSOrthogonalConv2d(c, 3, groups, **gs_kw) if conv == "gs" else SkewOrthogonalConv2d(c, 3, **kw)
                    )
                    layers.append(act())
                layers.append(torch.nn.PixelUnshuffle(2))
                c *= 4
            self.features = torch.nn.Sequential(*layers)
            self.head = _OrthonormalRowsLinear(
                c * side * side, num_classes, dtype=dtype, device=device, generator=generator
            )
            return
        c = in_channels
        for s in range(stages):
            planes = width * 2**s
            for i in range(depth):
                last = i == depth - 1
                stride, out = (2, 2 * planes) if last else (1, planes)
                k = 1 if last and s == stages - 1 else 3
                if conv == "gs":
                    layers.append(GSOrthogonalConv2d(c, k, groups, out_channels=out, stride=stride, **gs_kw))
                else:
                    layers.append(SkewOrthogonalConv2d(c, k, out_channels=out, stride=stride, **kw))
                layers.append(act())
                c = out
        self.features = torch.nn.Sequential(*layers)
        self.head = SkewOrthogonalConv2d(c * side * side, 1, out_channels=num_classes, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"input must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if getattr(self, "architecture", "compact") == "reference":
            z = self.features(x)
            return self.head(z.reshape(z.shape[0], -1, 1, 1)).flatten(1)
        x = F.pad(x, (0, 0, 0, 0, 0, self.width - x.shape[1]))  # zero channels: an isometric embedding
        return self.head(self.features(x).flatten(1))


@torch.no_grad()
def certified_accuracy(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, eps: float) -> tuple[float, float]:
    """``(clean accuracy, certified accuracy at ℓ₂ radius eps)`` of a 1-Lipschitz classifier: a sample counts as
    certified when it is classified correctly and its :func:`certified_radius` exceeds ``eps``."""
    logits = model(X)
    correct = logits.argmax(1) == y
    return correct.float().mean().item(), (correct & (certified_radius(logits) > eps)).float().mean().item()
