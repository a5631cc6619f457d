"""T-Basis (Obukhov et al., ICML 2020): every weight of a network as a tensor ring over one shared basis of cores.

A weight ``W (c_out, c_in, k_h, k_w)`` (or ``(c_out, c_in)``) is padded to the envelope ``(n^d, n^d, n^s, n^s)``
— ``d`` base-n digits for the channel pair, ``s`` for the kernel pair — and its digits are interleaved, so that
mode j of the tensor joins the j-th output and input digits (``o_j n + i_j``, size ``N = n²``): a tensor of
``m = d + s`` modes of size N. That tensor is a tensor ring

    W[i_1, ..., i_m] = Tr( ρ_1 C_1[:, i_1, :] ρ_2 C_2[:, i_2, :] ⋯ ρ_m C_m[:, i_m, :] ),

    C_k = Σ_β α_{kβ} B_β,  B_β ∈ R^{R × N × R} shared by all layers,  ρ_k = diag(exp(λ_k)) > 0,

so a layer owns only its coefficients ``α (m, B)`` and rank adapters ``λ (m, R)``: ``m (B + R)`` numbers. The
:class:`TBasisFactory` holds the basis and every layer's coefficients and decompresses all weights in one batched pass
per forward (layers with the same m contract together, by :func:`lowrankopt.formats.tr_full`, the ring
contraction of :class:`~lowrankopt.formats.TensorRing`), after which ordinary ``F.linear`` / ``F.conv2d`` run.

Initialization (the paper's Sec. 4.2 and the reference code ``toshas/tbasis``): basis entries ``N(0, 1/(B R))`` and
coefficients ``N(0, σ_ℓ^{2/m})`` (Eq. 13; both drawn clamped at 3 standard deviations, as the reference), rank
adapters the identity; then each layer's coefficients are rescaled by ``(σ_ℓ / std(W_ℓ))^{1/m}`` so that the
decompressed, cropped weight has standard deviation exactly ``σ_ℓ = √(2 / fan_in)`` (He et al., 2015). The basis can
be fixed (a buffer, :class:`TBasis` ``trainable=False`` or :meth:`TBasis.freeze`) and shared by several models
(``convert_to_tbasis(model, basis=...)``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..._checks import as_device, check_random_options
from ...formats.tr import TensorRing, tr_full
from .._common import HALF_OR_FULL, LegacyPatterns, _check_dtype, _check_image, _check_input, _legacy_selection
from ..surgery import Targets, replace_modules, select_modules

__all__ = [
    "TBasis",
    "TBasisFactory",
    "TBasisLinear",
    "TBasisConv2d",
    "Tensorization",
    "convert_to_tbasis",
    "tbasis_penalty",
]


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _digits(size: int, n: int) -> int:
    """Base-n digits needed for indices ``0..size-1`` (at least 1)."""
    d = 1
    while n**d < size:
        d += 1
    return d


def _clamped_randn(*shape: int, dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal entries clamped to [-3, 3] (the reference's draw for the basis and the coefficients)."""
    return torch.randn(*shape, dtype=dtype, generator=generator, device=_gen_device(generator)).clamp_(-3.0, 3.0)


def _he_std(shape: tuple[int, ...]) -> float:
    """He et al. (2015) standard deviation ``√(2 / fan_in)`` of a weight ``(c_out, c_in, *kernel)``, ``fan_in = c_in ·
    ∏ kernel`` (``torch.nn.init.kaiming_normal_`` with its defaults; the reference's ``gain / √fan`` with the ReLU
    gain √2 and fan mode ``fan_in``, of the unpadded weight)."""
    return math.sqrt(2.0 / math.prod(shape[1:]))


_INITS = ("he", "match")


@dataclass(frozen=True)
class Tensorization:
    """The map between a weight of ``shape`` ``(c_out, c_in)`` or ``(c_out, c_in, k_h, k_w)`` and a tensor of
    ``modes`` modes of size ``n²`` (padding to the envelope, interleaving, cropping)."""

    shape: tuple[int, ...]
    n: int

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 2:
            raise ValueError(f"n must be an int ≥ 2, got {self.n!r}")
        if len(self.shape) not in (2, 4) or any(not isinstance(k, int) or k < 1 for k in self.shape):
            raise ValueError(
                f"shape must be (c_out, c_in) or (c_out, c_in, k_h, k_w) of positive ints, got {self.shape}"
            )

    @property
    def channel_digits(self) -> int:
        return max(_digits(self.shape[0], self.n), _digits(self.shape[1], self.n))

    @property
    def kernel_digits(self) -> int:
        return max(_digits(k, self.n) for k in self.shape[2:]) if len(self.shape) > 2 else 0

    @property
    def modes(self) -> int:
        return self.channel_digits + self.kernel_digits

    @property
    def envelope(self) -> tuple[int, ...]:
        d, s = self.channel_digits, self.kernel_digits
        return (self.n**d, self.n**d) + ((self.n**s, self.n**s) if len(self.shape) > 2 else ())

    def to_weight(self, flat: torch.Tensor) -> torch.Tensor:
        """``(..., N^m)`` ring entries (mode j = output digit · n + input digit) → cropped weights ``(..., *shape)``.
        Cost O(N^m)."""
        d, s, n = self.channel_digits, self.kernel_digits, self.n
        lead = flat.shape[:-1]
        t = flat.reshape(*lead, *([n] * (2 * (d + s))))
        L = len(lead)
        outs = [L + 2 * j for j in range(d)]
        ins = [L + 2 * j + 1 for j in range(d)]
        rows = [L + 2 * (d + j) for j in range(s)]
        cols = [L + 2 * (d + j) + 1 for j in range(s)]
        t = t.permute(*range(L), *outs, *ins, *rows, *cols).reshape(*lead, *self.envelope)
        crop = tuple(slice(0, k) for k in self.shape)
        return t[(..., *crop)]


class TBasis(nn.Module):
    """The shared basis: ``B`` cores ``(R, N, R)``, initialized i.i.d. ``N(0, 1/(B R))`` clamped at 3 standard
    deviations (the paper's Eq. 13 and the reference's clamp: a core ``Σ_β α_β B_β`` with ``α ~ N(0, σ²)`` then has
    entries of variance ``σ² / R``, whatever B).

    A trainable basis is a parameter ``basis (B, R, N, R)``; a fixed one (``trainable=False``, or :meth:`freeze`) is a
    buffer of the same name, as in the reference (``TBasis(..., is_trainable=False)``): it is saved in the state dict
    and moved by ``.to()``, but it is not among ``parameters()``, so no optimizer updates it and
    :func:`~lowrankopt.nn.count_parameters` does not count it. One :class:`TBasis` given to several factories (or to
    :func:`convert_to_tbasis` for several models, ``basis=``) is one tensor shared by all of them; a pre-trained
    basis is loaded with ``load_state_dict`` (the key ``basis`` is the same, trainable or fixed).

    Args:
        basis_size: B.
        rank: R.
        mode_size: N, a perfect square n² (4 for linear layers, 9 for nets of 3×3 convs).
        dtype: of the basis (default: torch's default dtype).
        device: of the basis (drawn on the generator's device, then moved).
        generator: for the initialization.
        trainable: False makes the basis a fixed buffer (default True: a parameter).
    """

    def __init__(
        self,
        basis_size: int,
        rank: int,
        mode_size: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        trainable: bool = True,
    ) -> None:
        super().__init__()
        for name, v in (("basis_size", basis_size), ("rank", rank), ("mode_size", mode_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        n = math.isqrt(mode_size)
        if n * n != mode_size or n < 2:
            raise ValueError(f"mode_size must be a square n² with n ≥ 2 (4, 9, 16, ...), got {mode_size}")
        if not isinstance(trainable, bool):
            raise TypeError(f"trainable must be a bool, got {trainable!r}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in HALF_OR_FULL:
            raise TypeError(f"dtype must be one of {HALF_OR_FULL}, got {dtype}")
        _, device, _ = check_random_options(torch.float32, device, generator)  # (the device and the generator)
        self.basis_size, self.rank, self.mode_size, self.n = basis_size, rank, mode_size, n
        b = _clamped_randn(basis_size, rank, mode_size, rank, dtype=dtype, generator=generator)
        b = (b / math.sqrt(basis_size * rank)).to(device)
        if trainable:
            self.basis = nn.Parameter(b)
        else:
            self.register_buffer("basis", b)

    @property
    def trainable(self) -> bool:
        """Whether the basis is a parameter (True) or a fixed buffer (False)."""
        return "basis" in self._parameters

    def freeze(self) -> TBasis:
        """Make the basis a fixed buffer, in place, keeping its values (e.g. a basis learned with one model, then
        shared, fixed, by others). The buffer is a copy: an optimizer built before still holds the old parameter,
        and its later steps (momentum, weight decay) change that parameter, never the fixed basis. Returns
        ``self``."""
        if self.trainable:
            b = self.basis.detach().clone()
            del self.basis
            self.register_buffer("basis", b)
        return self

    def extra_repr(self) -> str:
        kind = "trainable" if self.trainable else "fixed"
        return f"basis_size={self.basis_size}, rank={self.rank}, mode_size={self.mode_size}, {kind}"


class TBasisFactory(nn.Module):
    """The basis, every layer's coefficients ``α (m, B)`` and log rank adapters ``λ (m, R)``, and the batched
    decompression of all weights.

    ``weight(key)`` returns layer ``key``'s decompressed, cropped weight. All weights are decompressed together on
    the first request and kept until :meth:`refresh` (the model that :func:`convert_to_tbasis` converted calls it
    before every forward), until a backward pass runs through them, or until the grad mode or a parameter or
    buffer (a fixed basis; identity, in-place version, dtype, device) changes.

    Cost of one decompression: ``O(Σ_ℓ N^{m_ℓ} R²)`` flops — the padded weights times R² — plus
    ``O(Σ_ℓ m_ℓ B N R²)`` for the cores; memory ``O(Σ_ℓ N^{m_ℓ})`` (each ring is closed by one contraction of its
    two halves). The envelope is square in the channels: a rectangular layer pays for ``n^{2d}`` entries (a
    1024 → 10 linear layer with n = 3: 2187² ≈ 4.8·10⁶ for 10⁴ weights).

    Args:
        basis: a :class:`TBasis` (trainable or fixed; one basis may serve several factories, sharing its
            tensor), or None for plain tensor rings: every layer then owns its cores ``(m, R, N, R)`` (the no-sharing
            baseline).
        rank: of the plain rings when ``basis`` is None.
        mode_size: of the plain rings when ``basis`` is None.
        dtype: of the plain rings' cores (default: torch's default dtype).
        device: of the plain rings' cores (default: CPU).
    """

    def __init__(
        self,
        basis: TBasis | None,
        *,
        rank: int | None = None,
        mode_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if basis is not None and not isinstance(basis, TBasis):
            raise TypeError(f"basis must be a TBasis or None, got {type(basis).__name__}")
        self.tbasis = basis
        if basis is not None:
            if rank not in (None, basis.rank) or mode_size not in (None, basis.mode_size):
                raise ValueError("rank and mode_size come from the basis; do not give other values")
            rank, mode_size, dtype, device = basis.rank, basis.mode_size, basis.basis.dtype, basis.basis.device
        else:
            for name, v in (("rank", rank), ("mode_size", mode_size)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"without a basis give {name} as a positive int, got {v!r}")
            if math.isqrt(mode_size) ** 2 != mode_size or mode_size < 4:
                raise ValueError(f"mode_size must be a square n² with n ≥ 2 (4, 9, 16, ...), got {mode_size}")
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dtype, self.device = dtype or torch.get_default_dtype(), as_device(device or "cpu")
        self.rank, self.mode_size, self.n = rank, mode_size, math.isqrt(mode_size)
        self.coefficients = nn.ParameterDict()
        self.log_adapters = nn.ParameterDict()
        self.plans: dict[str, Tensorization] = {}
        self._cache: dict[str, torch.Tensor] | None = None
        self._versions: tuple | None = None

    def add(
        self,
        key: str,
        shape: tuple[int, ...],
        std: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Register a weight of ``shape`` ``(c_out, c_in)`` or ``(c_out, c_in, k_h, k_w)`` whose decompressed,
        cropped entries get standard deviation ``std``.

        The paper's two steps (Sec. 4.2): coefficients ``α ~ N(0, std^{2/m})`` clamped at 3 standard deviations
        (Eq. 13; plain rings: cores ``N(0, std^{2/m} / R)``), rank adapters the identity; then α is rescaled by
        ``(std / std(W))^{1/m}``, so the weight's (unbiased) standard deviation is ``std`` exactly, whatever the
        basis (a pre-trained one included). Cost: one decompression of this layer, ``O(N^m R²)``.

        Args:
            key: the layer's name in the factory.
            shape: the weight's shape.
            std: the target standard deviation; None (default): He's ``√(2 / fan_in)``, ``fan_in = c_in k_h k_w``
                (the paper's and the reference's choice; ``std`` used to be required).
            generator: for the coefficients.
        """
        plan = Tensorization(tuple(shape), self.n)
        if std is None:
            std = _he_std(plan.shape)
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not (0 < std < math.inf):
            raise ValueError(f"std must be a positive finite number or None, got {std!r}")
        m, R, dtype = plan.modes, self.rank, self.dtype
        if self.tbasis is not None:
            alpha = _clamped_randn(m, self.tbasis.basis_size, dtype=dtype, generator=generator) * std ** (1 / m)
        else:  # plain rings: cores with entries of variance std^{2/m} / R
            alpha = _clamped_randn(m, R, self.mode_size, R, dtype=dtype, generator=generator)
            alpha = alpha * (std ** (1 / m) / math.sqrt(R))
        self.coefficients[key] = nn.Parameter(alpha.to(self.device))
        self.log_adapters[key] = nn.Parameter(torch.zeros(m, R, dtype=dtype, device=self.device))
        self.plans[key] = plan
        self._cache = None
        with torch.no_grad():  # the per-layer variance correction (W is homogeneous of degree m in α)
            actual = float(self._decompress([key])[key].std())
            if actual > 0:
                self.coefficients[key].mul_((std / actual) ** (1 / m))
        self._cache = None

    def _apply(self, fn, recurse=True):  # .to(), .double(), .cuda(): follow the parameters, decompress afresh
        out = super()._apply(fn, recurse)
        ref = next(itertools.chain(self.parameters(), self.buffers()), None)  # a fixed basis is a buffer
        if ref is not None:
            self.dtype, self.device = ref.dtype, ref.device
        self.refresh()
        return out

    def __getstate__(self):  # copies and pickles carry the parameters, not the decompressed weights (graph nodes)
        state = super().__getstate__()
        return {**state, "_cache": None, "_versions": None}

    def refresh(self) -> None:
        """Forget the decompressed weights (the next :meth:`weight` decompresses all layers again)."""
        self._cache = None

    def _state(self) -> tuple:
        """What the decompressed weights depend on: grad mode and every parameter's and buffer's (a fixed basis)
        identity, version, dtype, device."""
        params = tuple(
            (id(p), p._version, p.dtype, p.device) for p in itertools.chain(self.parameters(), self.buffers())
        )
        return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), params)

    def weight(self, key: str) -> torch.Tensor:
        """Layer ``key``'s weight, decompressed with all others in one pass when needed.

        The weights are reused while nothing they depend on changes (grad mode, parameter or buffer identity,
        in-place version, dtype, device) and until a backward pass runs through them (so an optimizer step, fused or
        not, and the next accumulation step see fresh ones)."""
        state = self._state()
        if self._cache is None or state != self._versions:
            # autocast off: the weights in the parameters' dtype whatever the caller's autocast (the layers' products
            # autocast), so a cache filled under autocast serves calls without it
            with torch.autocast(self.device.type, enabled=False):
                self._cache = self._decompress(list(self.plans))
            self._versions = state
        return self._cache[key]

    def cores(self, key: str) -> torch.Tensor:
        """Layer ``key``'s ring cores ``(m, R, N, R)``, rank adapters applied (``ρ_k C_k``)."""
        return self._cores([key])[0]

    def ring(self, key: str) -> TensorRing:
        """Layer ``key``'s tensor ring as a :class:`~lowrankopt.formats.TensorRing` (cores ``ρ_k C_k``, float32 or
        float64): ``ring(key).full()`` is the padded, tensorized weight (``m`` modes of size N) that :meth:`weight`
        crops; ``gather``, ``norm`` and ``inner`` work on it without forming it. Differentiable in the parameters.
        Cost ``O(m B N R²)`` (the cores) and one finiteness check."""
        return TensorRing(list(self.cores(key).unbind(0)))

    def _cores(self, keys: list[str]) -> torch.Tensor:
        alpha = torch.stack([self.coefficients[k] for k in keys])
        rho = torch.stack([self.log_adapters[k] for k in keys]).exp()
        if self.tbasis is not None:
            cores = torch.einsum("lmb,brns->lmrns", alpha, self.tbasis.basis)
        else:
            cores = alpha
        return cores * rho[..., None, None]  # ρ_k on the left rank index

    def _decompress(self, keys: list[str]) -> dict[str, torch.Tensor]:
        if self.tbasis is not None:
            basis, coefficients = self.tbasis.basis, next(iter(self.coefficients.values()), None)
            if coefficients is not None and (basis.dtype, basis.device) != (coefficients.dtype, coefficients.device):
                raise RuntimeError(
                    f"the shared basis is {basis.dtype} on {basis.device} but this model's coefficients are "
                    f"{coefficients.dtype} on {coefficients.device}: a model that shares the basis was moved or cast "
                    "alone; move or cast every model built on it together"
                )
        groups: dict[int, list[str]] = {}
        for k in keys:
            groups.setdefault(self.plans[k].modes, []).append(k)
        out = {}
        for group in groups.values():
            cores = self._cores(group)  # (L, m, R, N, R)
            # the L rings' dense tensors in one batched TensorRing contraction (two halves, then one contraction
            # that also closes the ring: memory O(N^m), not O(N^m R²))
            flat = tr_full(cores.unbind(1)).reshape(len(group), -1)
            if flat.requires_grad:  # a backward through these weights ends their use
                flat.register_hook(self._forget)
            for i, key in enumerate(group):
                out[key] = self.plans[key].to_weight(flat[i])
        return out

    def _forget(self, grad: torch.Tensor) -> None:
        self._cache = None

    def penalty(self) -> torch.Tensor:
        """``Σ_ℓ ‖W_ℓ‖²`` over the decompressed weights (the paper's L2 penalty, needed to keep the norms in check;
        add ``λ · penalty()`` to the loss)."""
        return sum(self.weight(k).square().sum() for k in self.plans)


class _TBasisLayer(nn.Module):
    def __init__(self, factory: TBasisFactory, key: str, bias: torch.Tensor | None) -> None:
        super().__init__()
        if key not in factory.plans:
            raise KeyError(f"the factory has no layer {key!r}")
        # every layer registers the shared factory: modules() and parameters() list it once, and no layer's
        # removal loses it (state_dict lists it under each layer, as for tied weights)
        self.factory = factory
        self.key = key
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.factory.weight(self.key)


class TBasisLinear(_TBasisLayer):
    """``nn.Linear`` whose weight is decompressed from the factory. Forward cost: that of ``nn.Linear`` (plus the
    factory's one decompression per model forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.weight
        _check_input(x, W.shape[1], W)
        return F.linear(x, W, self.bias)


class TBasisConv2d(_TBasisLayer):
    """``nn.Conv2d`` (groups = 1) whose weight is decompressed from the factory."""

    def __init__(self, factory: TBasisFactory, key: str, conv: nn.Conv2d) -> None:
        if conv.groups != 1:
            raise ValueError(f"only groups = 1 convolutions are supported, got groups={conv.groups}")
        super().__init__(factory, key, conv.bias)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.padding_mode = conv.padding_mode
        if conv.padding_mode != "zeros":
            raise ValueError(f"only zero padding is supported, got padding_mode={conv.padding_mode!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.weight
        _check_image(x, W.shape[1])
        _check_dtype(x, W)
        return F.conv2d(x, W, self.bias, self.stride, self.padding, self.dilation)


def convert_to_tbasis(
    model: nn.Module,
    basis_size: int | None = None,
    rank: int | None = None,
    *,
    basis: TBasis | None = None,
    init: str = "he",
    mode_size: int | None = None,
    target_modules: Targets | None = None,
    exclude_modules: Targets | None = None,
    generator: torch.Generator | None = None,
    include: LegacyPatterns | None = None,
    exclude: LegacyPatterns | None = None,
) -> TBasisFactory:
    """Replace the ``nn.Linear`` and ``nn.Conv2d`` (groups = 1) submodules of ``model`` by T-Basis layers, in place.

    Args:
        model: the network; the factory becomes a submodule of every converted layer (``<name>.factory``, one
            object) and a forward pre-hook on ``model`` refreshes the decompressed weights before every forward. A
            module used at several places becomes one T-Basis layer used at all of them.
        basis_size: B of a new basis; None (and no ``basis``): plain tensor rings with no shared basis (each layer
            owns its cores).
        rank: R (required unless ``basis`` gives it).
        basis: an existing :class:`TBasis` to build on instead of a new one (e.g. a pre-trained, fixed basis shared
            by several models: ``TBasis(B, R, N, trainable=False)`` then ``load_state_dict``, or :meth:`TBasis.freeze`
            on a learned one). Its B, R and N are used (``basis_size``, ``rank`` and ``mode_size``, if given, must
            agree) and its dtype and device must be the model's. The models then share one basis tensor: move them
            together, and a trainable shared basis is updated by every model's optimizer.
        init: the decompressed weights' standard deviation at the start. ``"he"`` (default, the paper's Sec. 4.2
            and the reference code's): ``√(2 / fan_in)`` with ``fan_in = c_in k_h k_w`` of each layer. ``"match"``:
            the standard deviation of the weight each layer replaces (the default before issue 23: with PyTorch's
            default initialization, ``1/√(3 fan_in)``, √6 ≈ 2.45 times smaller than He's; useful to start from a
            trained model's scales).
        mode_size: N = n²; default 9 when a converted conv has a 3×3 kernel, else 4 (with ``basis``: its N).
        target_modules: which layers (:func:`~lowrankopt.nn.surgery.select_modules`: module-name suffixes, a regex,
            ``"all-linear"``, a predicate ``fn(name, module)``); None: all. A selected grouped conv is an error.
        exclude_modules: the same forms, for layers to leave dense (e.g. the first conv: ``exclude_modules=["0"]``).
        generator: for a new basis and the coefficients.
        include: deprecated (fnmatch patterns or a predicate of the name); use ``target_modules``.
        exclude: deprecated; use ``exclude_modules``.

    Each layer starts as :meth:`TBasisFactory.add` describes: coefficients drawn by the paper's Eq. 13, then
    rescaled so that its decompressed weight has exactly the standard deviation ``init`` asks for (computed against
    the basis it is built on, a pre-trained one included); rank adapters start at the identity; biases are kept.
    All or nothing (:func:`~lowrankopt.nn.surgery.replace_modules`): an error leaves the model untouched, and a
    weight tied to another place is refused rather than silently untied. Returns the factory (``factory.penalty()``
    is the decompressed-weight L2 penalty). Cost: one decompression per converted layer (the variance correction).
    """
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    if basis is not None:
        if not isinstance(basis, TBasis):
            raise TypeError(f"basis must be a TBasis or None, got {type(basis).__name__}")
        for name, given, own in (
            ("basis_size", basis_size, basis.basis_size),
            ("rank", rank, basis.rank),
            ("mode_size", mode_size, basis.mode_size),
        ):
            if given is not None and given != own:
                raise ValueError(f"{name}={given!r} disagrees with the basis ({name}={own}); leave it out")
    elif rank is None:
        raise ValueError("rank must be given (a positive int) when no basis is given")
    target_modules, exclude_modules = _legacy_selection(target_modules, exclude_modules, include, exclude)
    targets = select_modules(model, target_modules, exclude_modules, eligible=(nn.Linear, nn.Conv2d))
    for name, m in targets.items():
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise ValueError(f"{name} is a grouped convolution (groups={m.groups}); exclude it")
    if not targets:
        raise ValueError("no nn.Linear or nn.Conv2d submodule matches target_modules/exclude_modules")
    modules = list(targets.values())
    first = modules[0].weight
    if first.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the model must be float32 or float64, got {first.dtype}")
    dtype, device = first.dtype, first.device
    if basis is not None:
        if basis.basis.dtype != dtype or basis.basis.device != device:
            raise ValueError(
                f"basis is {basis.basis.dtype} on {basis.basis.device}, the model {dtype} on {device}: "
                "convert the basis (basis.to(...)) or the model first"
            )
        factory = TBasisFactory(basis)
    else:
        if mode_size is None:
            mode_size = 9 if any(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in modules) else 4
        if basis_size is None:
            factory = TBasisFactory(None, rank=rank, mode_size=mode_size, dtype=dtype, device=device)
        else:
            new = TBasis(basis_size, rank, mode_size, dtype=dtype, device=device, generator=generator)
            factory = TBasisFactory(new)

    def build(name: str, m: nn.Module) -> nn.Module:
        if init == "he":
            std = None  # the factory's default, √(2 / fan_in)
        else:
            std = float(m.weight.detach().std()) if m.weight.numel() > 1 else 0.0
            if not std > 0:  # a constant (or one-entry) weight: PyTorch's default scale 1/sqrt(3 fan_in)
                std = 1 / math.sqrt(3 * m.weight[0].numel())
        key = name.replace(".", "/")
        factory.add(key, tuple(m.weight.shape), std, generator=generator)
        return TBasisConv2d(factory, key, m) if isinstance(m, nn.Conv2d) else TBasisLinear(factory, key, m.bias)

    replace_modules(model, targets, build)
    model.register_forward_pre_hook(_refresh_factories)
    return factory


def _refresh_factories(module: nn.Module, args) -> None:
    """Forward pre-hook: decompress afresh in this forward (looked up at call time, so copies of the model work)."""
    for m in module.modules():
        if isinstance(m, TBasisFactory):
            m.refresh()


def tbasis_penalty(model: nn.Module) -> torch.Tensor:
    """The decompressed-weight L2 penalty ``Σ_ℓ ‖W_ℓ‖²`` of every T-Basis factory in ``model``."""
    return sum(m.penalty() for m in model.modules() if isinstance(m, TBasisFactory))
