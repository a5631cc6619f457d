"""GSOFT: orthogonal fine-tuning with Group-and-Shuffle matrices, with PEFT's conventions.

A frozen linear layer ``y = W x + b`` becomes ``y = s ⊙ (Q_out W Q_in x) + b`` (``Q_out`` only with
``double=True``; ``s`` only with ``scale=True``), where ``Q_in``, ``Q_out`` are :class:`~.gs.GSOrthogonal`
(``Pᵀ L P R`` with orthogonal blocks) initialized at the identity — so the adapted model equals the base
model at injection. One-sided GSOFT rotates the input side (the right singular vectors of W); double GSOFT
also rotates the output side (Gorbunov et al., NeurIPS 2024).

API in PEFT's style: :class:`GSOFTConfig`, :func:`inject_gsoft` (in place, freezes everything but the adapters),
:func:`merge_adapter` / :func:`unmerge_adapter`, :func:`merge_and_unload`, :func:`disable_adapters` (a context
manager), :func:`gsoft_state_dict` / :func:`load_gsoft_state_dict`.

Cost per adapted layer and vector: ``O(n_in b)`` (+ ``O(n_out b)`` double) on top of the frozen ``W x``;
parameters ``n_in (b − 1)`` (+ ``n_out (b − 1)``) + ``n_out`` (scale).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .gs import MAPS, GSOrthogonal

__all__ = [
    "GSOFTConfig",
    "GSOFTLinear",
    "disable_adapters",
    "gsoft_state_dict",
    "inject_gsoft",
    "load_gsoft_state_dict",
    "merge_adapter",
    "merge_and_unload",
    "unmerge_adapter",
]

PREFIX = "gsoft_"


@dataclass
class GSOFTConfig:
    """What to adapt and how (field names follow PEFT's ``OFTConfig``).

    Attributes:
        block_size: b, the GS block size (give this or ``r``); it must divide the adapted sizes.
        r: the number of blocks (``block_size = n / r`` per layer).
        target_modules: qualified-name suffixes (``"q_proj"`` matches ``"layer.0.attn.q_proj"``), a regex
            string matched against the whole name, or ``"all-linear"``.
        exclude_modules: the same forms, for names to leave alone.
        double: also rotate the output side (``Q_out W Q_in``).
        scale: learn a per-output scale s (initialized to 1).
        bias: ``"none"`` (frozen), ``"all"`` (every bias trainable) or ``"gsoft_only"`` (biases of adapted layers).
        modules_to_save: modules left fully trainable (e.g. a new classifier head): suffixes, or a regex string.
        fan_in_fan_out: the base weight is stored ``(in, out)`` (GPT-2's ``Conv1D``).
        map: ``"cayley"``, ``"exp"`` or ``"neumann"`` (see :class:`~.gs.GSOrthogonal`).
        neumann_terms: series terms of the ``"neumann"`` map.
    """

    block_size: int | None = None
    r: int | None = None
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    double: bool = False
    scale: bool = True
    bias: str = "none"
    modules_to_save: Sequence[str] | None = None
    fan_in_fan_out: bool = False
    map: str = "cayley"
    neumann_terms: int = 5

    def __post_init__(self):
        if (self.block_size is None) == (self.r is None):
            raise ValueError("give exactly one of block_size and r")
        for name in ("block_size", "r"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.bias not in ("none", "all", "gsoft_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'gsoft_only', got {self.bias!r}")
        if self.target_modules is None:
            raise ValueError("target_modules is required (names, a regex, or 'all-linear')")
        if self.map not in MAPS:
            raise ValueError(f"map must be one of {MAPS}, got {self.map!r}")

    def block_for(self, n: int, name: str) -> int:
        b = self.block_size if self.block_size is not None else (n // self.r if n % self.r == 0 else 0)
        if b < 1 or n % b:
            raise ValueError(
                f"{name}: size {n} is not divisible into blocks (block_size={self.block_size}, r={self.r})"
            )
        return b


def _matches(name: str, spec) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return spec != "all-linear" and re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


class GSOFTLinear(torch.nn.Module):
    """A frozen linear layer with a GSOFT adapter (see the module docstring). ``base_layer`` keeps the
    original module; :meth:`merge` folds the adapter into its weight, :meth:`unmerge` takes it out again."""

    def __init__(self, base_layer: torch.nn.Module, config: GSOFTConfig, name: str = ""):
        super().__init__()
        w = base_layer.weight
        # nn.Linear stores (out, in) whatever the config says (PEFT also ignores fan_in_fan_out for it)
        self.fan_in_fan_out = config.fan_in_fan_out and not isinstance(base_layer, torch.nn.Linear)
        out_f, in_f = (w.shape[1], w.shape[0]) if self.fan_in_fan_out else tuple(w.shape)
        kw = dict(map=config.map, neumann_terms=config.neumann_terms, dtype=w.dtype, device=w.device)
        self.base_layer = base_layer
        self.gsoft_in = GSOrthogonal(in_f, config.block_for(in_f, name or "layer"), **kw)
        self.gsoft_out = GSOrthogonal(out_f, config.block_for(out_f, name or "layer"), **kw) if config.double else None
        self.gsoft_scale = (
            torch.nn.Parameter(torch.ones(out_f, dtype=w.dtype, device=w.device)) if config.scale else None
        )
        self.merged = False
        self.disabled = False

    def _weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled and self.merged:
            raise RuntimeError("cannot disable a merged adapter; unmerge it first")
        if self.disabled or self.merged:
            return self.base_layer(x)
        y = F.linear(self.gsoft_in(x), self._weight())
        if self.gsoft_out is not None:
            y = self.gsoft_out(y)
        if self.gsoft_scale is not None:
            y = y * self.gsoft_scale
        bias = getattr(self.base_layer, "bias", None)
        return y if bias is None else y + bias

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The adapted weight ``diag(s) Q_out W Q_in`` (dense, ``(out, in)``). Cost ``O(n_out n_in (n_in + n_out))``
        at most — forming the dense Q factors."""
        W = self._weight() @ self.gsoft_in.matrix()
        if self.gsoft_out is not None:
            W = self.gsoft_out.matrix() @ W
        return W if self.gsoft_scale is None else self.gsoft_scale[:, None] * W

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (forward then costs what the base layer costs)."""
        if self.merged:
            return
        if self.gsoft_scale is not None and (self.gsoft_scale.abs() < 1e-12).any():
            raise ValueError("a scale entry is (nearly) 0: merging could not be undone; adapter left unmerged")
        W = self.delta_weight()
        if not torch.isfinite(W).all():
            raise ValueError("merging would write non-finite values into the weight; adapter left unmerged")
        self.base_layer.weight.copy_(W.T if self.fan_in_fan_out else W)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight: ``W = Q_out⁻¹ diag(1/s) W' Q_in⁻¹`` (by solves: exact also for the
        approximately orthogonal Neumann map)."""
        if not self.merged:
            return
        W = self._weight()
        if self.gsoft_scale is not None:
            W = W / self.gsoft_scale[:, None]
        if self.gsoft_out is not None:
            W = torch.linalg.solve(self.gsoft_out.matrix(), W)
        W = torch.linalg.solve(self.gsoft_in.matrix().T, W.T).T
        if not torch.isfinite(W).all():
            raise ValueError("unmerging produced non-finite values; the weight is left merged")
        self.base_layer.weight.copy_(W.T if self.fan_in_fan_out else W)
        self.merged = False


def _adapted(model: torch.nn.Module) -> Iterator[tuple[str, GSOFTLinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, GSOFTLinear))


def inject_gsoft(model: torch.nn.Module, config: GSOFTConfig) -> dict[str, GSOFTLinear]:
    """Wrap the targeted linear layers of ``model`` with GSOFT adapters, in place, and freeze all other
    parameters (except biases per ``config.bias`` and ``config.modules_to_save``).

    Targets: ``nn.Linear`` modules (and, with ``fan_in_fan_out``, any module with an ``(in, out)`` weight)
    whose qualified name matches ``target_modules`` and not ``exclude_modules``. Raises ``ValueError`` if
    nothing matches or a size is not divisible by the block size (the model is then unchanged).
    Returns ``{name: adapter layer}``.
    """
    if not isinstance(config, GSOFTConfig):
        raise TypeError(f"config must be a GSOFTConfig, got {type(config).__name__}")
    if any(True for _ in _adapted(model)):
        raise ValueError("model already has GSOFT adapters")
    all_linear = config.target_modules == "all-linear"
    targets = []
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        linear_like = isinstance(m, torch.nn.Linear) or (
            config.fan_in_fan_out
            and isinstance(w, torch.Tensor)
            and w.dim() == 2
            and not isinstance(m, torch.nn.Embedding)
        )
        if not linear_like or not name:
            continue
        if (all_linear or _matches(name, config.target_modules)) and not _matches(name, config.exclude_modules):
            targets.append((name, m))
    if not targets:
        raise ValueError(f"no module matches target_modules={config.target_modules!r}")
    wrapped = {name: GSOFTLinear(m, config, name) for name, m in targets}  # all built before any swap
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        for pname, p in layer.named_parameters():
            p.requires_grad_(pname.startswith(PREFIX) or (config.bias == "gsoft_only" and pname == "base_layer.bias"))
    if config.bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.requires_grad_(True)
    for name, m in model.named_modules():
        if _matches(name, config.modules_to_save):
            for p in m.parameters():
                p.requires_grad_(True)
    return wrapped


def merge_adapter(model: torch.nn.Module) -> None:
    """Merge every GSOFT adapter into its base weight."""
    for _, layer in _adapted(model):
        layer.merge()


def unmerge_adapter(model: torch.nn.Module) -> None:
    """Undo :func:`merge_adapter`."""
    for _, layer in _adapted(model):
        layer.unmerge()


def merge_and_unload(model: torch.nn.Module) -> torch.nn.Module:
    """Merge the adapters and put the plain base layers back (in place); returns ``model``."""
    for name, layer in list(_adapted(model)):
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)
    return model


@contextlib.contextmanager
def disable_adapters(model: torch.nn.Module):
    """Within the context, the adapted layers compute the base model's outputs."""
    layers = [layer for _, layer in _adapted(model)]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def gsoft_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: the adapter parameters (``…gsoft_in.L``, ``…gsoft_scale``, …) and every other
    trainable parameter (``modules_to_save``, trainable biases), detached copies."""
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if PREFIX in k or k in trainable}


def load_gsoft_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load adapter parameters saved by :func:`gsoft_state_dict` into a model injected with the same config."""
    if any(layer.merged for _, layer in _adapted(model)):
        raise ValueError("unmerge the adapters before loading adapter weights")
    expected = set(gsoft_state_dict(model))
    missing, unexpected = expected - set(state_dict), set(state_dict) - expected
    if missing or unexpected:
        raise ValueError(f"adapter state mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    model.load_state_dict(state_dict, strict=False)
