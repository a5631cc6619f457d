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
"""

from __future__ import annotations

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
    """The shared basis: ``B`` cores ``(R, N, R)``, initialized i.i.d. ``N(0, 1/(B R))`` (the paper's choice: a core
    ``Σ_β α_β B_β`` with ``α ~ N(0, σ²)`` then has entries of variance ``σ² / R``).

    Args:
        basis_size: B.
        rank: R.
        mode_size: N, a perfect square n² (4 for linear layers, 9 for nets of 3×3 convs).
        dtype: of the basis (default: torch's default dtype).
        device: of the basis (drawn on the CPU generator, then moved).
        generator: for the initialization.
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
    ) -> None:
        super().__init__()
        for name, v in (("basis_size", basis_size), ("rank", rank), ("mode_size", mode_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        n = math.isqrt(mode_size)
        if n * n != mode_size or n < 2:
            raise ValueError(f"mode_size must be a square n² with n ≥ 2 (4, 9, 16, ...), got {mode_size}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in HALF_OR_FULL:
            raise TypeError(f"dtype must be one of {HALF_OR_FULL}, got {dtype}")
        _, device, _ = check_random_options(torch.float32, device, generator)  # (the device and the generator)
        self.basis_size, self.rank, self.mode_size, self.n = basis_size, rank, mode_size, n
        b = torch.randn(
            basis_size,
            rank,
            mode_size,
            rank,
            dtype=dtype,
            generator=generator,
            device=_gen_device(generator),
        )
        self.basis = nn.Parameter((b / math.sqrt(basis_size * rank)).to(device))

    def extra_repr(self) -> str:
        return f"basis_size={self.basis_size}, rank={self.rank}, mode_size={self.mode_size}"


class TBasisFactory(nn.Module):
    """The basis, every layer's coefficients ``α (m, B)`` and log rank adapters ``λ (m, R)``, and the batched
    decompression of all weights.

    ``weight(key)`` returns layer ``key``'s decompressed, cropped weight. All weights are decompressed together on
    the first request and kept until :meth:`refresh` (the model that :func:`tbasis_convert` converted calls it
    before every forward), until a backward pass runs through them, or until the grad mode or a parameter
    (identity, in-place version, dtype, device) changes.

    Cost of one decompression: ``O(Σ_ℓ N^{m_ℓ} R²)`` flops — the padded weights times R² — plus
    ``O(Σ_ℓ m_ℓ B N R²)`` for the cores; memory ``O(Σ_ℓ N^{m_ℓ})`` (each ring is closed by one contraction of its
    two halves). The envelope is square in the channels: a rectangular layer pays for ``n^{2d}`` entries (a
    1024 → 10 linear layer with n = 3: 2187² ≈ 4.8·10⁶ for 10⁴ weights).

    Args:
        basis: a :class:`TBasis`, or None for plain tensor rings: every layer then owns its cores ``(m, R, N, R)``
            (the no-sharing baseline).
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

    def add(self, key: str, shape: tuple[int, ...], std: float, generator: torch.Generator | None = None) -> None:
        """Register a weight of ``shape`` whose decompressed entries get standard deviation ``std`` (variance
        matching: ``α ~ N(0, std^{2/m})``, then α is rescaled by ``(std / actual)^{1/m}``)."""
        plan = Tensorization(tuple(shape), self.n)
        m, R, dtype = plan.modes, self.rank, self.dtype
        if self.tbasis is not None:
            B = self.tbasis.basis_size
            alpha = torch.randn(m, B, dtype=dtype, generator=generator, device=_gen_device(generator)) * std ** (1 / m)
        else:  # plain rings: cores with entries of variance std^{2/m} / R
            alpha = (
                torch.randn(m, R, self.mode_size, R, dtype=dtype, generator=generator, device=_gen_device(generator))
                * std ** (1 / m)
                / math.sqrt(R)
            )
        self.coefficients[key] = nn.Parameter(alpha.to(self.device))
        self.log_adapters[key] = nn.Parameter(torch.zeros(m, R, dtype=dtype, device=self.device))
        self.plans[key] = plan
        self._cache = None
        with torch.no_grad():  # the per-layer variance correction
            actual = float(self._decompress([key])[key].std())
            if actual > 0:
                self.coefficients[key].mul_((std / actual) ** (1 / m))
        self._cache = None

    def _apply(self, fn, recurse=True):  # .to(), .double(), .cuda(): follow the parameters, decompress afresh
        out = super()._apply(fn, recurse)
        ref = next(self.parameters(), None)
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
        """What the decompressed weights depend on: grad mode and every parameter's identity, version, dtype, device."""
        params = tuple((id(p), p._version, p.dtype, p.device) for p in self.parameters())
        return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), params)

    def weight(self, key: str) -> torch.Tensor:
        """Layer ``key``'s weight, decompressed with all others in one pass when needed.

        The weights are reused while nothing they depend on changes (grad mode, parameter identity, in-place
        version, dtype, device) and until a backward pass runs through them (so an optimizer step, fused or not,
        and the next accumulation step see fresh ones)."""
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
    basis_size: int | None,
    rank: int,
    *,
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
        basis_size: B; None converts to plain tensor rings with no shared basis (each layer owns its cores).
        rank: R.
        mode_size: N = n²; default 9 when a converted conv has a 3×3 kernel, else 4.
        target_modules: which layers (:func:`~lowrankopt.nn.surgery.select_modules`: module-name suffixes, a regex,
            ``"all-linear"``, a predicate ``fn(name, module)``); None: all. A selected grouped conv is an error.
        exclude_modules: the same forms, for layers to leave dense (e.g. the first conv: ``exclude_modules=["0"]``).
        generator: for the basis and the coefficients.
        include: deprecated (fnmatch patterns or a predicate of the name); use ``target_modules``.
        exclude: deprecated; use ``exclude_modules``.

    Each converted layer's decompressed weight gets the standard deviation of the weight it replaces (variance
    matching); biases are kept. All or nothing (:func:`~lowrankopt.nn.surgery.replace_modules`): an error leaves the
    model untouched, and a weight tied to another place is refused rather than silently untied. Returns the factory
    (``factory.penalty()`` is the decompressed-weight L2 penalty). Cost: one decompression per converted layer (the
    variance correction).
    """
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
    if mode_size is None:
        mode_size = 9 if any(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in modules) else 4
    dtype, device = first.dtype, first.device
    if basis_size is None:
        factory = TBasisFactory(None, rank=rank, mode_size=mode_size, dtype=dtype, device=device)
    else:
        factory = TBasisFactory(TBasis(basis_size, rank, mode_size, dtype=dtype, device=device, generator=generator))

    def build(name: str, m: nn.Module) -> nn.Module:
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
