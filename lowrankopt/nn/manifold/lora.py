r"""Riemannian LoRA: fine-tuning with a rank-r update that is one point of the fixed-rank manifold, trained by
Riemannian optimizers (Bogachev et al., "LoRA meets Riemannion", ICLR 2026), never forming a dense gradient.

**The update.** A frozen linear layer ``y = W x + b`` becomes ``y = W x + b + ΔW x`` with ``ΔW = X − X₀``:
``X = C Vᵀ`` (``C: (out, r)``, ``V: (in, r)`` orthonormal) is a ``geoopt.ManifoldParameter`` on
:class:`~lowrankopt.manifolds.geoopt.GeooptFixedRank` ``(out, in, r)`` (``lora_X``, packed ``[C | V]``), and
``X₀ = C₀ V₀ᵀ`` a frozen copy of X at creation (persistent buffers ``lora_C0``, ``lora_V0``). A LoRA update
``ΔW = B A`` is two factors whose product is ambiguous (``B A = (B G)(G⁻¹ A)``); here the update is the matrix
itself, moved along the manifold by a retraction.

**0 ∉ M_r.** The manifold of rank-r matrices does not contain ``ΔW = 0``, the identity start. The paper (like PEFT's
PiSSA / LoRA-GA starts) moves the start into the frozen weight instead: ``W′ = W − X₀``. We keep ``W`` untouched and
subtract ``X₀`` in the adapter: the base weight is never modified (exact for bfloat16 bases too, where ``W − X₀``
would be rounded and the adapted model would not start at the base model), an unmerged checkpoint's base weights are
the pretrained ones, and ``unload`` needs no correction. ``ΔW`` is computed as
``(C − C₀) Vᵀ + C₀ (V − V₀)ᵀ = [C − C₀ | C₀] [V | V − V₀]ᵀ`` — equal to ``C Vᵀ − C₀ V₀ᵀ``, and exactly 0 while
``X = X₀`` bit for bit, whatever the BLAS: at step 0 the outputs are the base model's exactly (``torch.equal``). The
price: the forward carries a rank-2r product instead of rank r (see the costs).

**Gradients.** The forward is one autograd node (:func:`~.lora_product.delta_product`) whose backward gives
``lora_X.grad`` = the δ-gradient ``[G V | Gᵀ U]`` from the activations (``G = ∂L/∂ΔW`` is never formed:
``G V = gᵀ (x V)``, ``Gᵀ U = xᵀ (g U)``) — the same gradient as :class:`~lowrankopt.nn.LowRankLinear`'s
straight-through form, without its zero-valued products. A Riemannian optimizer (``geoopt.optim.RiemannianSGD`` /
``RiemannianAdam``, or lowrankopt's) projects it onto the tangent space, ``P_T(G) = G V Vᵀ + U Uᵀ G (I − V Vᵀ)``, in
``O((out + in) r²)``. This is the single-backprop trick of the paper (§6).

**Costs** per adapted layer and batch of B rows: forward ``O(B (out + in) r)`` (``x [V | V − V₀]`` once, then
``[C − C₀ | C₀]``); the backward ``O(B (out + in) r)`` more and one ``O(out r²)`` QR (for ``U``); ``ΔW`` is never
formed. Parameters ``(out + in) r``; the offset ``(out + in) r`` more, frozen.

**Merging** folds ``ΔW`` into the base weight (float64, checked finite before anything is written) and records the
factors folded in, so unmerging subtracts exactly what was added even if the adapter moved since. While merged, any
optimizer step of ``lora_X`` with a gradient is refused by the step guard (``RuntimeError`` naming the layer); a
forward of a merged layer is the base layer's (allowed, as in PEFT).

API in PEFT's style: :class:`RiemannianLoRAConfig`, :func:`convert_to_riemannian_lora` (in place, freezes everything
but the adapters), and the shared adapter functions of :mod:`lowrankopt.nn.adapters` (``merge_adapter``,
``unmerge_adapter``, ``merge_and_unload``, ``unload``, ``disable_adapters``, ``adapter_state_dict``,
``load_adapter_state_dict``); PEFT interop in :mod:`.lora_peft` (``from_peft``, ``to_peft_state_dict``,
``to_peft_config``). The layer is :mod:`.lora_layer`, the configuration :mod:`.lora_config`.
"""

from __future__ import annotations

import torch

from ..adapters.model import adapter_layers
from ..adapters.setup import train_only_adapters
from ..surgery import is_linear, replace_modules, select_modules
from .lora_config import RiemannianLoRAConfig
from .lora_layer import PREFIX, RiemannianLoRALinear

__all__ = ["RiemannianLoRAConfig", "RiemannianLoRALinear", "convert_to_riemannian_lora"]


def _select(model: torch.nn.Module, config: RiemannianLoRAConfig) -> dict[str, torch.nn.Module]:
    """The modules to adapt: what ``target_modules`` selects and ``exclude_modules`` does not, outside adapters already
    there; ``ValueError`` if nothing matches, ``TypeError`` naming ``target_modules`` if one is not linear."""
    inside = {id(sub) for layer in adapter_layers(model).values() for sub in layer.modules()}
    targets = select_modules(
        model, config.target_modules, config.exclude_modules, eligible=lambda m: id(m) not in inside
    )
    if not targets:
        raise ValueError(f"no module matches target_modules={config.target_modules!r}")
    for name, m in targets.items():
        if not is_linear(m):
            raise TypeError(
                f"target_modules={config.target_modules!r} selects {name!r}, a {type(m).__name__}: Riemannian LoRA "
                "adapts nn.Linear and GPT-2-style Conv1D layers only; name the linear layers inside it (or use "
                "'all-linear') or exclude it (exclude_modules)"
            )
    return targets


def convert_to_riemannian_lora(model: torch.nn.Module, config: RiemannianLoRAConfig) -> dict[str, RiemannianLoRALinear]:
    """Wrap the targeted linear layers of ``model`` with Riemannian LoRA adapters, in place, and freeze all other
    parameters (except biases per ``config.bias`` and ``config.modules_to_save``). The adapted model's outputs equal
    the base model's exactly until the first step.

    Targets: the modules ``target_modules`` selects and ``exclude_modules`` does not
    (:func:`~lowrankopt.nn.surgery.select_modules`, PEFT's forms, ``"all-linear"`` included), each an ``nn.Linear``
    or a GPT-2-style ``Conv1D``; layers inside other adapters are not candidates. A layer used at several places gets
    one adapter, used at all of them; the base layers keep their parameters, so tied weights stay tied
    (:func:`~lowrankopt.nn.merge_adapter` refuses to merge into a tied weight).

    Raises (the model unchanged: every adapter is built before any is installed,
    :func:`~lowrankopt.nn.surgery.replace_modules`): ``TypeError`` for a config that is not a
    :class:`RiemannianLoRAConfig`, a selected module that is not linear (naming ``target_modules``) or a base weight
    that is not floating; ``ValueError`` if the model already has Riemannian LoRA adapters, nothing matches
    ``target_modules`` or ``modules_to_save``, or ``r`` exceeds ``min(out, in)`` of a selected layer (naming it).

    Returns ``{name: adapter layer}``. Cost: ``O((out + in) r²)`` per layer (the random start).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, RiemannianLoRAConfig):
        raise TypeError(f"config must be a RiemannianLoRAConfig, got {type(config).__name__}")
    if any(isinstance(m, RiemannianLoRALinear) for m in model.modules()):
        raise ValueError("model already has Riemannian LoRA adapters")
    targets = _select(model, config)
    saved = {}
    if config.modules_to_save is not None:
        saved = select_modules(model, config.modules_to_save)
        if not saved:
            raise ValueError(f"no module matches modules_to_save={config.modules_to_save!r}")
    wrapped = replace_modules(model, targets, lambda name, m: RiemannianLoRALinear(m, config, name))
    train_only_adapters(model, wrapped.values(), PREFIX, config.bias, saved.values())
    return wrapped
