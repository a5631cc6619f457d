"""Riemannian LoRA ⇄ PEFT LoRA: start from a ``peft`` LoRA model (:func:`from_peft`), and export to a LoRA adapter that
``peft`` loads (:func:`to_peft_state_dict`, :func:`to_peft_config`, :func:`save_peft`), so a model trained here is
served with an existing PEFT stack. ``peft`` is imported only by these functions.

**PEFT → ours.** A PEFT LoRA layer adds ``ΔW = s · B A`` (``lora_B.weight`` ``(out, r)``, ``lora_A.weight`` ``(r, in)``,
``s = lora_alpha / r``, or ``/ √r`` with rsLoRA). Its rank-r point comes from QRs of the factors and the SVD of the
``r × r`` core, never densely: ``s B A = P diag(σ) Qᵀ``. With ``k`` singular values above rounding:

* ``k = r`` (a trained LoRA): ``X = s B A`` and no offset (``ΔW = X``);
* ``k = 0`` (a fresh LoRA, ``B = 0``): a random start ``X = X₀`` as :func:`~.lora.convert_to_riemannian_lora` makes;
* ``0 < k < r``: ``X = P_k σ_k Q_kᵀ + ε P_c Q_cᵀ`` with random orthonormal completions ``P_c ⊥ P_k``, ``Q_c ⊥ Q_k``
  (``ε`` the config's start scale) and ``X₀ = ε P_c Q_cᵀ``.

In every case ``X − X₀ = s B A`` to rounding, so the converted model computes what the PEFT model computes. The
layer's rank is ``min(r, out, in)`` (PEFT allows a larger r). Cost per layer ``O((out + in) r²)``.

**Ours → PEFT.** ``ΔW = L Rᵀ`` (``L = [C − C₀ | C₀]``, ``R = [V | V − V₀]``: rank ``r' = 2r``; ``L = C``, ``R = V``:
``r' = r`` without an offset) is a LoRA with ``lora_B = L``, ``lora_A = Rᵀ`` and ``lora_alpha = r'`` (``s = 1``) —
the construction PEFT itself uses to save a LoRA whose base weight was shifted
(``path_initial_model_for_weight_conversion``). Layers of different ``r'`` use ``rank_pattern`` / ``alpha_pattern``.
Trainable biases and ``modules_to_save`` travel too (PEFT's ``bias`` / ``modules_to_save`` read off what is
trainable).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from typing import Any

import torch

from ...formats.lowrank import LowRankMatrix
from ..adapters.model import adapter_layers, adapter_state_dict
from ..surgery import replace_modules, select_modules
from .lora_config import RiemannianLoRAConfig
from .lora_layer import PREFIX, RiemannianLoRALinear, layer_generator

__all__ = ["from_peft", "save_peft", "to_peft_config", "to_peft_state_dict"]

_MODEL_PREFIX = "base_model.model."  # where PEFT's state dicts put the wrapped model's keys


def _peft():
    try:
        import peft
        from peft.tuners.lora.layer import Linear, LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
    except ImportError as err:  # pragma: no cover - peft is an optional dependency
        raise ImportError("PEFT interop needs the peft package: pip install peft") from err
    return peft, Linear, LoraLayer, AuxiliaryTrainingWrapper, ModulesToSaveWrapper


# ---------------------------------------------------------------------- PEFT -> ours
def _orthonormal_complement(P: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """``k`` random orthonormal columns orthogonal to the orthonormal columns of ``P`` (float64). ``O(m (r + k)²)``."""
    Z = torch.randn(P.shape[0], k, dtype=P.dtype, generator=g)
    Z = Z - P @ (P.T @ Z)
    Q = torch.linalg.qr(Z)[0]
    return torch.linalg.qr(Q - P @ (P.T @ Q))[0]  # twice is enough


def _set_point(layer: RiemannianLoRALinear, L: torch.Tensor, R: torch.Tensor, scale: float, seed: int) -> None:
    """Make ``layer``'s ``X − X₀`` equal ``L Rᵀ`` (``L: (out, r_peft)``, ``R: (in, r_peft)``, float64), as the module
    docstring describes; a ``ΔW`` of numerical rank 0 keeps the layer's random start."""
    r, m, n = layer.rank, layer.out_features, layer.in_features
    QL, RL = torch.linalg.qr(L)
    QR, RR = torch.linalg.qr(R)
    Uc, s, Vch = torch.linalg.svd(RL @ RR.T)
    P, Q, s = (QL @ Uc)[:, :r], (QR @ Vch.T)[:, :r], s[:r]
    tol = float(s[0]) * max(m, n) * torch.finfo(layer.compute_dtype).eps if len(s) else 0.0
    k = int((s > tol).sum()) if tol > 0 else 0
    if k == 0:
        return  # B = 0: the random start, X₀ = X
    if k < r:
        g = layer_generator(seed, layer.layer_name + "#complement")
        P = torch.cat([P[:, :k], _orthonormal_complement(P[:, :k], r - k, g)], 1)
        Q = torch.cat([Q[:, :k], _orthonormal_complement(Q[:, :k], r - k, g)], 1)
        s = torch.cat([s[:k], torch.full((r - k,), scale, dtype=s.dtype)])
    with torch.no_grad():
        layer.lora_X.copy_(layer.manifold.pack(LowRankMatrix._trusted(P, torch.diag(s), Q)))
        if k == r:
            layer._set_offset(torch.zeros(m, 0), torch.zeros(n, 0))
        else:
            C0 = torch.cat([torch.zeros(m, k, dtype=s.dtype), scale * P[:, k:]], 1)
            V0 = torch.cat([torch.zeros(n, k, dtype=s.dtype), Q[:, k:]], 1)
            layer._set_offset(C0, V0)


def _refuse(peft_model, adapter: str) -> None:
    """What :func:`from_peft` cannot carry over, refused before anything changes."""
    peft, LoraLinear, LoraLayer, Auxiliary, ModulesToSave = _peft()
    cfg = peft_model.peft_config[adapter]
    if not isinstance(cfg, peft.LoraConfig):
        raise ValueError(f"peft_model's adapter {adapter!r} is {type(cfg).__name__}, not a LoraConfig")
    for name, m in peft_model.get_base_model().named_modules():
        if isinstance(m, LoraLayer):
            if type(m) is not LoraLinear:
                raise TypeError(f"{name} is a PEFT {type(m).__name__} LoRA layer: only linear LoRA layers convert")
            if set(m.lora_A) != {adapter}:
                raise ValueError(f"{name} has the LoRA adapters {sorted(m.lora_A)}: delete all but {adapter!r} first")
            if m.merged:
                raise ValueError(f"{name}: the PEFT adapter is merged; unmerge it first (peft_model.unmerge_adapter())")
            if m.use_dora.get(adapter) or getattr(m, "lora_bias", {}).get(adapter):
                raise ValueError(f"{name}: DoRA and lora_bias adapters are not LoRA updates ΔW = s B A; cannot convert")
        elif isinstance(m, Auxiliary) and not isinstance(m, ModulesToSave):
            raise TypeError(f"{name} is a PEFT {type(m).__name__}: only LoRA layers and modules_to_save convert")


def from_peft(
    peft_model: Any,
    *,
    init_scale: float | None = None,
    compute_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> torch.nn.Module:
    """The model of a ``peft`` LoRA model (``PeftModel``, active adapter) with each linear LoRA layer replaced by a
    :class:`~.lora_layer.RiemannianLoRALinear` computing the same ``ΔW = s B A`` (see the module docstring), in place
    (as PEFT's ``unload``: ``peft_model`` no longer has its LoRA layers), and ``modules_to_save`` by their trained
    copies; ``requires_grad`` stays as PEFT set it (the adapters' ``lora_X`` trainable). LoRA dropout is not carried
    over (the adapter has none).

    Args:
        peft_model: a ``peft.PeftModel`` with one active LoRA adapter.
        init_scale: the start scale of the Riemannian layers (see :class:`RiemannianLoRAConfig`; used where
            ``s B A`` has rank below r).
        compute_dtype: the adapters' dtype (see :class:`RiemannianLoRAConfig`).
        seed: for the random starts.

    Raises ``TypeError`` for what is not a ``PeftModel`` or holds non-linear LoRA layers or other PEFT wrappers,
    ``ValueError`` for a non-LoRA adapter, several adapters, a merged one or DoRA — before anything changes (the
    replacement itself is all or nothing). Returns the model. Cost ``O((out + in) r²)`` per layer.
    """
    peft, LoraLinear, _, _, ModulesToSave = _peft()
    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(f"peft_model must be a peft.PeftModel, got {type(peft_model).__name__}")
    adapters = peft_model.active_adapters
    if len(adapters) != 1:
        raise ValueError(f"peft_model must have one active adapter, got {adapters}")
    adapter = adapters[0]
    _refuse(peft_model, adapter)
    model = peft_model.get_base_model()
    base_config = RiemannianLoRAConfig(
        target_modules="all-linear", init_scale=init_scale, compute_dtype=compute_dtype, seed=seed
    )

    def build(name: str, m: torch.nn.Module) -> torch.nn.Module:
        if isinstance(m, ModulesToSave):
            return m.modules_to_save[adapter]
        A, B = m.lora_A[adapter].weight.detach(), m.lora_B[adapter].weight.detach()
        base = m.get_base_layer()
        out_f, in_f = B.shape[0], A.shape[1]
        config = dataclasses.replace(base_config, r=min(A.shape[0], out_f, in_f))
        layer = RiemannianLoRALinear(base, config, name)
        L = m.scaling[adapter] * B.to(torch.float64).cpu()
        _set_point(layer, L, A.to(torch.float64).cpu().T, config.scale, seed)
        return layer

    targets = select_modules(model, eligible=lambda m: isinstance(m, (LoraLinear, ModulesToSave)))
    replace_modules(model, targets, build)
    return model


# ---------------------------------------------------------------------- ours -> PEFT
def _lora_places(model: torch.nn.Module) -> dict[str, RiemannianLoRALinear]:
    """Every place of a Riemannian LoRA layer (a shared layer at each of its names); ``TypeError`` for adapters of
    another kind, which a LoRA cannot express."""
    for name, layer in adapter_layers(model).items():
        if not isinstance(layer, RiemannianLoRALinear):
            raise TypeError(f"{name} is a {type(layer).__name__}: only Riemannian LoRA adapters export to PEFT LoRA")
    places = {n: m for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, RiemannianLoRALinear)}
    if not places:
        raise ValueError("model has no Riemannian LoRA adapters")
    return places


def _extras(model: torch.nn.Module, places: dict[str, RiemannianLoRALinear]) -> tuple[str, list[str], dict]:
    """``(bias, modules_to_save, entries)``: PEFT's ``bias`` option and ``modules_to_save`` for what is trainable
    besides the adapters, and the state-dict entries (our keys, detached copies) PEFT expects for them. A module with
    a trainable parameter other than a bias is saved whole; biases alone give ``"lora_only"`` (of adapted layers only)
    or ``"all"``. PEFT wraps every module whose name *ends with* a saved name (a string suffix), so the entries hold
    the state of each of those; ``ValueError`` if one of them is or holds an adapted layer (PEFT cannot express
    that)."""
    trainable = adapter_state_dict(model)  # also refuses a trainable base weight that holds a merged weight
    biases, saved = set(), set()
    for key in trainable:
        module, _, leaf = key.rpartition(".")
        if not leaf.startswith(PREFIX):
            (biases if leaf == "bias" else saved).add(module)
    biases -= saved  # a bias of a module trained whole travels with its module
    adapted = {f"{n}.base_layer" for n in places}
    bias = "none" if not biases else "lora_only" if biases <= adapted else "all"
    entries = {f"{m}.bias": trainable[f"{m}.bias"] for m in biases}
    inside = {id(sub) for layer in places.values() for sub in layer.modules()}
    for path, m in model.named_modules(remove_duplicate=False):
        match = next((s for s in sorted(saved) if path.endswith(s)), None)
        if not path or match is None:
            continue
        if id(m) in inside or any(isinstance(sub, RiemannianLoRALinear) for sub in m.modules()):
            raise ValueError(
                f"modules_to_save: {path!r} ends with the saved module name {match!r}, and PEFT would wrap it, but it "
                "is or holds an adapted layer, which PEFT cannot save whole; rename or untrain the module"
            )
        entries.update({f"{path}.{k}": v.detach().clone() for k, v in m.state_dict().items()})
    return bias, sorted(saved), entries


def to_peft_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A PEFT LoRA state dict of the model's Riemannian LoRA adapters (see the module docstring):
    ``base_model.model.<path>.lora_A.weight`` ``(r', in)`` and ``…lora_B.weight`` ``(out, r')`` per adapted place,
    plus every other trainable parameter (``base_model.model.<key>``: biases, ``modules_to_save``), in the adapters'
    compute dtype. With :func:`to_peft_config`'s config, ``set_peft_model_state_dict(get_peft_model(base, config),
    state_dict)`` computes what ``model`` computes (``base`` the unmerged base model). Raises ``TypeError`` for
    adapters of another kind, ``ValueError`` for a model without Riemannian LoRA adapters or a trainable base weight
    that holds a merged weight. Cost ``O((out + in) r)`` per layer."""
    out = {}
    places = _lora_places(model)
    for name, layer in places.items():
        dW = layer.delta_weight()
        out[f"{_MODEL_PREFIX}{name}.lora_A.weight"] = dW.V.T.contiguous()
        out[f"{_MODEL_PREFIX}{name}.lora_B.weight"] = dW.U.contiguous()
    out.update({_MODEL_PREFIX + k: v for k, v in _extras(model, places)[2].items()})
    return out


def to_peft_config(model: torch.nn.Module, **lora_config: Any) -> Any:
    """The ``peft.LoraConfig`` that :func:`to_peft_state_dict`'s state dict loads into: ``target_modules`` the adapted
    paths, ``r`` the most common ``r'`` with ``lora_alpha = r`` (``s = 1``) and ``rank_pattern`` / ``alpha_pattern``
    for the other layers, ``bias`` (``"none"``, ``"lora_only"`` or ``"all"``) and ``modules_to_save`` read off the
    trainable parameters. ``lora_config`` adds or overrides fields (e.g. ``task_type``)."""
    peft = _peft()[0]
    places = _lora_places(model)
    ranks = {name: layer.delta_weight().rank for name, layer in places.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(n): k for n, k in ranks.items() if k != r}
    bias, saved, _ = _extras(model, places)
    fields = dict(
        r=r,
        lora_alpha=r,
        target_modules=sorted(places),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        bias=bias,
        modules_to_save=saved or None,
        lora_dropout=0.0,
    )
    fields.update(lora_config)
    return peft.LoraConfig(**fields)


def save_peft(model: torch.nn.Module, directory: str | os.PathLike, **lora_config: Any) -> None:
    """Write the model's adapters as a PEFT adapter directory (``adapter_config.json`` and
    ``adapter_model.safetensors``), which ``peft.PeftModel.from_pretrained(base, directory)`` loads
    (:func:`to_peft_config`, :func:`to_peft_state_dict`)."""
    from safetensors.torch import save_file

    config = to_peft_config(model, **lora_config)
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(os.fspath(directory))
    save_file(to_peft_state_dict(model), os.path.join(directory, "adapter_model.safetensors"))
