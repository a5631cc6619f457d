"""Spectral control of a model's convolutions in training: a bound regularizer and a normalization."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch.nn.utils import parametrize

from .._checks import as_positive_int
from ._kernel import IterationState, check_stride
from .bounds import fantastic_four_bound, tensor_norm_estimate
from .circular import circular_spectral_norm, gram_iteration_bound
from .power import conv_spectral_norm

__all__ = ["ConvNormRegularizer", "conv_spectral_normalization"]

METHODS = ("tensor-norm", "fantastic-four", "gram", "circular", "power")


def _grouped(W: torch.Tensor, groups: int) -> torch.Tensor:
    """The kernel of a grouped conv as a batch of per-group kernels ``(g, c_out/g, c_in/g, h, w)``: the operator is
    block-diagonal over groups, so its norm is the largest of theirs."""
    return W.reshape(groups, W.shape[0] // groups, *W.shape[1:])


def _padding(conv: torch.nn.Conv2d) -> str | tuple[int, int]:
    """``"circular"``, or the zero padding on each side as a pair; refuses what the norms do not cover."""
    if conv.dilation != (1, 1):
        raise ValueError(f"convs with dilation {conv.dilation} are not supported")
    check_stride(conv.stride)
    if conv.padding_mode not in ("zeros", "circular"):
        raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported (only 'zeros' and 'circular')")
    h, w = conv.kernel_size
    if conv.padding == "valid":
        pad = (0, 0)
    elif conv.padding == "same":
        if h % 2 == 0 or w % 2 == 0:
            raise ValueError("padding='same' with an even kernel pads asymmetrically: not supported")
        pad = (h // 2, w // 2)
    else:
        pad = tuple(conv.padding)
    if conv.padding_mode == "zeros":
        return pad
    if 2 * pad[0] > h - 1 or 2 * pad[1] > w - 1:  # then output rows repeat: not a circular convolution
        raise ValueError(
            f"circular padding {pad} is larger than 'same' for the kernel {(h, w)}: its output repeats input rows, "
            "and neither the circular norm nor any bound here covers it (2·padding ≤ kernel_size − 1 needed)"
        )
    return "circular"


class ConvNormRegularizer:
    """A differentiable estimate or bound of the spectral norm of every ``nn.Conv2d`` of a model, for a penalty.

    ``reg = ConvNormRegularizer(model)``, then ``loss = task_loss + λ · reg()`` each step. ``reg()`` is the sum
    over the convs of their values, or with ``target`` the sum of ``relu(value − target)²`` (only norms above
    the target are pushed down). ``reg.bounds()`` gives each conv's value — an *estimate* for ``"tensor-norm"``
    and ``"power"`` (for a penalty, a value a little low is harmless; to certify a trained model's norms use
    :func:`~lowrankopt.spectral.symbol_norm_bound` or :func:`~lowrankopt.spectral.tensor_norm_bound`).

    Methods (``method=``):

    - ``"tensor-norm"`` (default): :func:`tensor_norm_estimate`, the HOPM estimate of the tensor-norm bound,
      independent of the input size; a cold start (``cold_iters`` HOPM sweeps, ``restarts`` starts) on the first
      call, then ``iters`` warm sweeps per call from the last vectors (one :class:`IterationState` per conv), and
      every ``refresh_every`` calls a refresh (the warm vectors and ``restarts`` fresh starts, ``cold_iters``
      sweeps) so that the tracked maximum does not get stuck at a local one as the weights move.
    - ``"fantastic-four"``: :func:`fantastic_four_bound` (a guaranteed bound).
    - ``"gram"`` / ``"circular"``: :func:`gram_iteration_bound` / the exact circular norm at input size ``n``.
    - ``"power"``: power iteration with the conv's own zero padding at input size ``n`` (a lower estimate),
      ``cold_iters`` iterations on the first call, then ``iters`` warm ones per call; a circular conv gets its
      exact norm instead.

    Grouped convs count as the largest norm of their groups. Dilated convs, padding modes other than zeros and
    circular, circular padding larger than "same" (its output repeats input rows), ``padding="same"`` with an
    even kernel, and unequal strides are refused. A circular conv of stride s > 1 is a circular convolution,
    covered by these values, on input sizes divisible by s only (the methods that take ``n`` check it). States
    follow the model to another device or dtype (they restart cold there). Cost per call: the chosen method's,
    summed over the convs.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        method: str = "tensor-norm",
        *,
        n: int | None = None,
        target: float | None = None,
        iters: int = 5,
        cold_iters: int = 100,
        restarts: int = 3,
        refresh_every: int = 100,
        include: Callable[[str, torch.nn.Conv2d], bool] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if method in ("gram", "circular", "power") and n is None:
            raise ValueError(f"method {method!r} needs the input size n")
        if target is not None and not target > 0:
            raise ValueError(f"target must be positive or None, got {target}")
        self.method, self.n, self.target, self.generator = method, n, target, generator
        self.iters = as_positive_int("iters", iters)
        self.cold_iters = as_positive_int("cold_iters", cold_iters)
        self.restarts = as_positive_int("restarts", restarts)
        self.refresh_every = as_positive_int("refresh_every", refresh_every)
        self.calls = 0
        self.convs = {
            name: m
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d) and (include is None or include(name, m))
        }
        if not self.convs:
            raise ValueError("model has no nn.Conv2d to regularize")
        self.paddings = {}
        for name, m in self.convs.items():
            try:
                self.paddings[name] = _padding(m)
            except ValueError as e:
                raise ValueError(f"conv {name!r}: {e}") from None
        self.states = {name: IterationState() for name in self.convs}

    def _bound(self, name: str, conv: torch.nn.Conv2d) -> torch.Tensor:
        K, s, state = _grouped(conv.weight, conv.groups), conv.stride[0], self.states[name]
        if state.vectors and (state.vectors[0].device != K.device or state.vectors[0].real.dtype != K.dtype):
            state.reset()  # the model moved to another device or dtype: start cold there
        warm = bool(state.vectors)
        if self.method == "tensor-norm":
            refresh = warm and self.calls % self.refresh_every == 0
            b = tensor_norm_estimate(
                K, s, restarts=self.restarts, iters=self.iters if warm and not refresh else self.cold_iters,
                tol=0.0 if warm and not refresh else 1e-8, state=state, refresh=refresh, generator=self.generator,
            )  # fmt: skip
        elif self.method == "fantastic-four":
            b = fantastic_four_bound(K, s)
        elif self.method == "gram":
            b = gram_iteration_bound(K, self.n, s)
        elif self.method == "circular" or self.paddings[name] == "circular":
            b = circular_spectral_norm(K, self.n, s)
        else:  # a fixed number of iterations per call (tol=0): the estimate keeps improving across steps
            b = conv_spectral_norm(
                K, self.n, "zeros", s, pad=self.paddings[name], iters=self.iters if warm else self.cold_iters,
                tol=0.0, state=state, generator=self.generator,
            )  # fmt: skip
        return b.amax()

    def bounds(self) -> dict[str, torch.Tensor]:
        """``{conv name: bound}`` (differentiable scalars)."""
        self.calls += 1
        return {name: self._bound(name, m) for name, m in self.convs.items()}

    def __call__(self) -> torch.Tensor:
        values = torch.stack(list(self.bounds().values()))
        return values.sum() if self.target is None else torch.relu(values - self.target).square().sum()


class _ConvSpectralNorm(torch.nn.Module):
    def __init__(self, conv, n: int | None, method: str, max_norm: float, iters: int, refresh_every: int, generator):
        super().__init__()
        # the conv's attributes, not the conv: a submodule pointing back at its owner would make a cycle
        self.n, self.method, self.max_norm, self.iters, self.groups = n, method, max_norm, iters, conv.groups
        self.stride, self.pad = conv.stride[0], _padding(conv)
        self.exact = method == "power" and self.pad == "circular"
        self.refresh_every, self.steps, self.generator = refresh_every, 0, generator
        self._cold(conv.weight.detach(), generator)

    def _cold(self, W: torch.Tensor, generator=None) -> None:
        """Cold start of the stored vectors (buffers: saved with the module and moved by ``.to``)."""
        if self.exact:
            return
        state = IterationState()
        self._norm(W, 50 if self.method == "power" else 100, state, generator)
        for k, v in enumerate(state.vectors):
            self.register_buffer(f"v{k}", v)

    def _norm(self, W, iters, state, generator=None, refresh=False):
        K = _grouped(W, self.groups)
        if self.exact:
            return circular_spectral_norm(K, self.n, self.stride).amax()
        if self.method == "tensor-norm":
            return tensor_norm_estimate(
                K, self.stride, iters=iters, tol=1e-8 if refresh else 0.0, state=state, refresh=refresh,
                generator=generator,
            ).amax()  # fmt: skip
        return conv_spectral_norm(
            K, self.n, "zeros", self.stride, pad=self.pad, iters=iters, tol=0.0, state=state, generator=generator
        ).amax()

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        if self.exact:
            sigma = self._norm(W, 0, None)
        else:
            vectors = [getattr(self, f"v{k}") for k in range(1 if self.method == "power" else 4)]
            if vectors[0].device != W.device or vectors[0].real.dtype != W.dtype:  # moved or cast: start again
                self._cold(W.detach())
                vectors = [getattr(self, f"v{k}") for k in range(len(vectors))]
            state = IterationState(vectors=vectors)
            if self.training:
                self.steps += 1
            refresh = self.training and self.method == "tensor-norm" and self.steps % self.refresh_every == 0
            iters = 100 if refresh else self.iters if self.training else 0  # eval: at the stored vectors
            sigma = self._norm(W, iters, state, self.generator, refresh)
            if self.training:
                for v, new in zip(vectors, state.vectors, strict=True):
                    v.copy_(new)
        return W * (self.max_norm / sigma).clamp(max=1)


NORMALIZATIONS = ("power", "tensor-norm")


def _tt_core_conv(layer) -> SimpleNamespace:
    """The attributes of the core conv of a TT conv (``r1 → r2`` channels, the layer's kernel, stride, padding and
    padding mode), as :func:`_padding` and :class:`_ConvSpectralNorm` read them from an ``nn.Conv2d``."""
    left, right, top, bottom = layer._pads
    if left != right or top != bottom:
        raise ValueError(
            f"the TT conv pads asymmetrically {layer._pads} (padding='same' with an even kernel): not supported"
        )
    return SimpleNamespace(
        weight=layer.core, groups=1, dilation=(1, 1), stride=layer.stride, padding_mode=layer.padding_mode,
        kernel_size=layer.kernel_size, padding=(top, left),
    )  # fmt: skip


def conv_spectral_normalization(
    conv: torch.nn.Module,
    n: int | None = None,
    *,
    method: str = "power",
    max_norm: float = 1.0,
    iters: int | None = None,
    refresh_every: int = 100,
    generator: torch.Generator | None = None,
) -> torch.nn.Module:
    """Keep the conv's operator norm at most ``max_norm``: ``W ← W · min(1, max_norm / σ)``.

    - ``method="power"``: σ is the conv's norm on ``n × n`` inputs with its own padding: exact for
      ``padding_mode="circular"``, else a power iteration with ``conv2d`` / ``conv_transpose2d`` at its zero
      padding (Gouk et al. 2021's "division", Ryu et al.'s estimate). The estimate approaches σ from below, so
      the normalized norm can exceed ``max_norm`` a little.
    - ``method="tensor-norm"``: σ is the HOPM estimate of the tensor-norm bound (:func:`tensor_norm_estimate`),
      independent of the padding and input size (``n`` is not needed). It is usually above the conv's norm, so
      the normalized norm usually stays below ``max_norm`` on any input, but that is **not guaranteed**: the
      estimate approaches from below and can stop at a local maximum under the conv's norm (see
      :func:`tensor_norm_estimate`). On the digits benchmark (``conv-norm-training``) the tracked value lagged
      a careful cold start by up to half a percent, while the convs' actual norms stayed below ``max_norm``.
      To certify the result, bound the normalized weight afterwards
      (:func:`~lowrankopt.spectral.symbol_norm_bound`).

    The vectors are warm-started: a cold start at registration (50 power iterations / 100 HOPM sweeps), then
    ``iters`` per training forward (default 1 power iteration, 5 HOPM sweeps: HOPM converges slowly, and one
    sweep per step lags behind the moving kernel), none in eval mode (tensor-norm: every ``refresh_every``
    training forwards a refresh, the warm vectors and 3 fresh starts, 100 sweeps; see :func:`tensor_norm_estimate`).
    They are buffers (saved, moved with the module; a cast or move restarts them cold). Convs that
    :class:`ConvNormRegularizer` refuses are refused. A ``torch.nn.utils.parametrize`` parametrization of
    ``conv.weight`` (``remove_parametrizations`` bakes it in).
    Unlike ``torch.nn.utils.spectral_norm``, which normalizes the reshaped ``c_out × c_in h w`` matrix (not a
    bound on the conv's norm), this uses the conv operator.

    **TT convs.** ``conv`` may be a :class:`~lowrankopt.nn.TTConv2d` (Senderovich et al. 2022): then its *core*
    ``(r2, r1, k, k)`` is divided, ``core ← core · min(1, max_norm / σ)``, σ the norm of the core conv (``r1 → r2``
    channels, the layer's stride, padding and padding mode) — what the reference code's ``constrain_conv`` does to
    ``K2`` in its "divide-by-largest" (power iteration) and "divide-by-exact-largest" modes (``practical_svd_conv``,
    ``src/utils.py``), there in place every ``clip_freq`` steps, here at every forward as for an ``nn.Conv2d``.
    The reference's "exact" mode takes the circular (FFT) norm at the input size even for a zero-padded layer;
    here σ follows the layer's padding (``method="power"``: exact for circular padding, power iteration for zero
    padding; or the tensor-norm estimate), so that ``max_norm`` refers to the layer as it is applied.
    With orthonormal outer cores (``orthogonality="stiefel"``, or ``"gauge"`` after
    ``orthogonalize_()``, which keeps working under the parametrization) the layer's norm is exactly the core's,
    so it becomes ``min(σ, max_norm)`` (for circular padding exactly; with zero padding up to the power
    estimate). With ``"penalty"`` the raw core is divided, as in the reference with its orthogonality loss: the
    layer's norm is then at most ``max_norm · ‖first‖₂ ‖last‖₂``.

    Returns ``conv``. Cost per training forward: ``iters + 1`` convs at resolution n (power), ``iters`` HOPM
    sweeps O(c_out c_in h w) (tensor-norm), or the exact circular norm — for a TT conv, of the small core conv.
    """
    from ..nn.spectral.tt_conv import TTConv2d  # lowrankopt.nn builds on this package

    if isinstance(conv, TTConv2d):
        target, name = _tt_core_conv(conv), "core"
    elif isinstance(conv, torch.nn.Conv2d):
        target, name = conv, "weight"
    else:
        raise TypeError(f"conv must be an nn.Conv2d or a TTConv2d, got {type(conv).__name__}")
    if method not in NORMALIZATIONS:
        raise ValueError(f"method must be one of {NORMALIZATIONS}, got {method!r}")
    if method == "power":
        n = as_positive_int("n", n)
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    iters = as_positive_int("iters", (1 if method == "power" else 5) if iters is None else iters)
    refresh_every = as_positive_int("refresh_every", refresh_every)
    module = _ConvSpectralNorm(target, n, method, max_norm, iters, refresh_every, generator)
    parametrize.register_parametrization(conv, name, module)
    return conv
