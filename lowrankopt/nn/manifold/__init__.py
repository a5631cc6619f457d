"""Manifold-constrained layers: the weight is one point of a fixed-rank or fixed-TT-rank manifold, stored as a packed
``geoopt.ManifoldParameter`` and trained by geoopt's Riemannian optimizers (``RiemannianSGD``, ``RiemannianAdam``):
:class:`LowRankLinear` (``W = C Vᵀ`` of rank r) and :class:`TTLinear` (a TT-matrix of fixed TT-ranks); and Riemannian
LoRA adapters (:mod:`.lora`), a frozen linear layer plus a rank-r update on the fixed-rank manifold
(:class:`RiemannianLoRALinear`, :func:`convert_to_riemannian_lora`, gradient-informed starts
:func:`locally_optimal_init` in :mod:`.lora_init`, PEFT interop in :mod:`.lora_peft`)."""

from .lora import RiemannianLoRAConfig, RiemannianLoRALinear, convert_to_riemannian_lora
from .lora_init import locally_optimal_init
from .lora_peft import from_peft, save_peft, to_peft_config, to_peft_state_dict
from .lowrank import LowRankLinear, TTLinear

__all__ = [
    "LowRankLinear",
    "RiemannianLoRAConfig",
    "RiemannianLoRALinear",
    "TTLinear",
    "convert_to_riemannian_lora",
    "from_peft",
    "locally_optimal_init",
    "save_peft",
    "to_peft_config",
    "to_peft_state_dict",
]
