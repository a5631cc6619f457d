"""The configuration of GSOFT adapters (:mod:`.gsoft`): what to adapt and how, in the style of PEFT's ``OFTConfig``,
checked when built."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..._checks import as_positive_int
from ..adapters.setup import check_selection_fields
from ..surgery import Targets
from .gs import MAPS, SHUFFLES

__all__ = ["GSOFTConfig"]


@dataclass
class GSOFTConfig:
    """What to adapt and how (field names follow PEFT's ``OFTConfig``).

    Attributes:
        block_size: b, the GS block size (give this or ``r``); it must divide the adapted sizes.
        r: the number of blocks (``block_size = n / r`` per layer).
        target_modules: which layers, as PEFT selects them (:func:`~lowrankopt.nn.surgery.select_modules`):
            qualified-name suffixes on whole components (``"q_proj"`` matches ``"layer.0.attn.q_proj"``), a regex
            string matched against the whole name, ``"all-linear"`` (every linear layer but the output layer a
            Hugging Face model names) or a predicate ``fn(name, module) -> bool``.
        exclude_modules: the same forms, for layers to leave alone.
        double: also rotate the output side (``Q_out W Q_in``).
        scale: learn a per-output scale s (initialized to 1).
        bias: ``"none"`` (frozen), ``"all"`` (every bias trainable) or ``"gsoft_only"`` (biases of adapted layers).
        modules_to_save: modules left fully trainable (e.g. a new classifier head): suffixes, or a regex string.
        fan_in_fan_out: the base weight is stored ``(in, out)`` (GPT-2's ``Conv1D``).
        map: ``"cayley"``, ``"exp"`` or ``"neumann"`` (see :class:`~.gs.GSOrthogonal`).
        neumann_terms: series terms of the ``"neumann"`` map.
        shuffle: the GS permutation, ``"paper"`` (default since issue 23: the paper's ``P_(r, br)``, as the authors'
            code computes it) or ``"legacy"`` (its transpose, used by earlier lowrankopt versions: give it to load
            adapters saved by them; see :class:`~.gs.GSOrthogonal`). State dicts record it: loading one saved with
            another permutation, or an old one (no record: ``"legacy"``) into adapters with another permutation, is
            refused with an error naming the ``shuffle`` to build with.
    """

    block_size: int | None = None
    r: int | None = None
    target_modules: Targets | None = None
    exclude_modules: Targets | None = None
    double: bool = False
    scale: bool = True
    bias: str = "none"
    modules_to_save: Sequence[str] | None = None
    fan_in_fan_out: bool = False
    map: str = "cayley"
    neumann_terms: int = 5
    shuffle: str = "paper"

    def __post_init__(self):
        if (self.block_size is None) == (self.r is None):
            raise ValueError("give exactly one of block_size and r")
        for name in ("block_size", "r"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.bias not in ("none", "all", "gsoft_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'gsoft_only', got {self.bias!r}")
        check_selection_fields(self)
        for name in ("double", "scale", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        as_positive_int("neumann_terms", self.neumann_terms)
        if self.map not in MAPS:
            raise ValueError(f"map must be one of {MAPS}, got {self.map!r}")
        if self.shuffle not in SHUFFLES:
            raise ValueError(f"shuffle must be one of {SHUFFLES}, got {self.shuffle!r}")

    def block_for(self, n: int, name: str) -> int:
        b = self.block_size if self.block_size is not None else (n // self.r if n % self.r == 0 else 0)
        if b < 1 or n % b:
            raise ValueError(
                f"{name}: size {n} is not divisible into blocks (block_size={self.block_size}, r={self.r})"
            )
        return b
