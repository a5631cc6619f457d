"""The configuration of Riemannian LoRA adapters (:mod:`.lora`): what to adapt and how, in the style of PEFT's
``LoraConfig``, checked when built."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..._checks import as_positive_int
from ..adapters.setup import check_selection_fields
from ..surgery import Targets

__all__ = ["RiemannianLoRAConfig"]

BIAS = ("none", "all", "lora_only")


@dataclass
class RiemannianLoRAConfig:
    """What to adapt and how (field names follow PEFT's ``LoraConfig``).

    Attributes:
        r: the rank of the update ``ΔW`` (of the manifold point ``X``), ``1 <= r <= min(out, in)`` per layer.
        target_modules: which layers, as PEFT selects them (:func:`~lowrankopt.nn.surgery.select_modules`):
            qualified-name suffixes on whole components (``"q_proj"`` matches ``"layer.0.attn.q_proj"``), a regex
            string matched against the whole name, ``"all-linear"`` (every linear layer but the output layer a Hugging
            Face model names) or a predicate ``fn(name, module) -> bool``. Every selected module must be an
            ``nn.Linear`` or a GPT-2-style ``Conv1D`` (else ``TypeError``).
        exclude_modules: the same forms, for layers to leave alone.
        modules_to_save: modules left fully trainable (e.g. a new classifier head): suffixes, or a regex string.
        bias: ``"none"`` (frozen), ``"all"`` (every bias trainable) or ``"lora_only"`` (biases of adapted layers).
        init_scale: the singular values of the random start ``X = init_scale · U Vᵀ`` (``U``, ``V`` Haar-random
            orthonormal), so ``‖X‖_F = init_scale √r``. None: ``0.01 / √r`` — the scale of the paper's locally optimal
            start (Bogachev et al., "LoRA meets Riemannion", α = 0.01/√r, ``‖ΔW₀‖_F = 0.01``). The update starts at
            ``ΔW = X − X₀ = 0`` whatever the scale; the scale sets how far the first steps reach relative to X's own
            singular values (small: the first retraction essentially picks the best rank-r approximation of the
            step, as from 0).
        compute_dtype: the dtype of the adapter's parameters and math, float32 or float64. None: float32 for half
            (float16 / bfloat16) base weights, else the base weight's dtype.
        seed: the random start of each layer is drawn from a generator seeded by ``(seed, layer name)``: reproducible
            and independent of the order of the layers.
    """

    r: int = 8
    target_modules: Targets | None = None
    exclude_modules: Targets | None = None
    modules_to_save: Sequence[str] | str | None = None
    bias: str = "none"
    init_scale: float | None = None
    compute_dtype: torch.dtype | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.r = as_positive_int("r", self.r)
        if self.bias not in BIAS:
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        check_selection_fields(self)
        if self.init_scale is not None:
            s = self.init_scale
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
                raise ValueError(f"init_scale must be a finite float > 0 or None, got {s!r}")
            self.init_scale = float(s)
        if self.compute_dtype is not None and self.compute_dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"compute_dtype must be torch.float32, torch.float64 or None, got {self.compute_dtype!r} (the "
                "adapter's manifold point needs QR and SVD, which torch does not implement in half precision)"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")

    @property
    def scale(self) -> float:
        """The singular value of the random start: ``init_scale``, or ``0.01 / √r`` when it is None."""
        return self.init_scale if self.init_scale is not None else 0.01 / math.sqrt(self.r)

    def dtype_for(self, base_dtype: torch.dtype) -> torch.dtype:
        """The adapter's dtype for a base weight of ``base_dtype`` (see ``compute_dtype``)."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
