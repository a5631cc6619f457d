"""GSOFT: orthogonal fine-tuning with Group-and-Shuffle matrices, with PEFT's conventions.

A frozen linear layer ``y = W x + b`` becomes ``y = s ⊙ (Q_out W Q_in x) + b`` (``Q_out`` only with
``double=True``; ``s`` only with ``scale=True``), where ``Q_in``, ``Q_out`` are :class:`~.gs.GSOrthogonal`
(``Pᵀ L P R`` with orthogonal blocks) initialized at the identity — so the adapted model equals the base
model at injection. One-sided GSOFT rotates the input side (the right singular vectors of W); double GSOFT
also rotates the output side (Gorbunov et al., NeurIPS 2024).

API in PEFT's style: :class:`GSOFTConfig`, :func:`convert_to_gsoft` (in place, freezes everything but the
adapters), :func:`merge_adapter` / :func:`unmerge_adapter`, :func:`merge_and_unload` / :func:`unload`,
:func:`disable_adapters` (a context manager), :func:`gsoft_state_dict` / :func:`load_gsoft_state_dict`.

Cost per adapted layer and vector: ``O(n_in b)`` (+ ``O(n_out b)`` double) on top of the frozen ``W x``;
parameters ``n_in (b − 1)`` (+ ``n_out (b − 1)``) + ``n_out`` (scale).

This module is the model-level API; the adapter layer is :mod:`.gsoft_layer` and its configuration
:mod:`.gsoft_config` (both re-exported here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..surgery import replace_modules, restore_modules, select_modules, tied_parameters
from .gsoft_config import GSOFTConfig
from .gsoft_layer import PREFIX, GSOFTLinear, merge_all

__all__ = [
    "GSOFTConfig",
    "GSOFTLinear",
    "convert_to_gsoft",
    "disable_adapters",
    "gsoft_state_dict",
    "load_gsoft_state_dict",
    "merge_adapter",
    "merge_and_unload",
    "unload",
    "unmerge_adapter",
]


def _adapted(model: torch.nn.Module) -> Iterator[tuple[str, GSOFTLinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, GSOFTLinear))


def _gsoft_eligible(config: GSOFTConfig):
    """What GSOFT adapts: ``nn.Linear``; with ``fan_in_fan_out``, also any module with a 2-D ``(in, out)`` weight but an
    embedding (GPT-2's ``Conv1D``)."""

    def eligible(m: torch.nn.Module) -> bool:
        w = getattr(m, "weight", None)
        return isinstance(m, torch.nn.Linear) or (
            config.fan_in_fan_out
            and isinstance(w, torch.Tensor)
            and w.dim() == 2
            and not isinstance(m, torch.nn.Embedding)
        )

    return eligible


def convert_to_gsoft(model: torch.nn.Module, config: GSOFTConfig) -> dict[str, GSOFTLinear]:
    """Wrap the targeted linear layers of ``model`` with GSOFT adapters, in place, and freeze all other
    parameters (except biases per ``config.bias`` and ``config.modules_to_save``).

    Targets: ``nn.Linear`` modules (and, with ``fan_in_fan_out``, any module with an ``(in, out)`` weight) selected by
    ``target_modules`` and not by ``exclude_modules`` (:func:`~lowrankopt.nn.surgery.select_modules`, PEFT's forms).
    Raises ``ValueError`` if nothing matches or a size is not divisible by the block size (the model is then
    unchanged: :func:`~lowrankopt.nn.surgery.replace_modules`). A layer used at several places gets one adapter, used
    at all of them; the base layers keep their parameters, so tied weights stay tied (:func:`merge_adapter` refuses
    to merge into a tied weight). Returns ``{name: adapter layer}``. Cost: building the adapters (``O(n b)`` each).
    """
    if not isinstance(config, GSOFTConfig):
        raise TypeError(f"config must be a GSOFTConfig, got {type(config).__name__}")
    if any(True for _ in _adapted(model)):
        raise ValueError("model already has GSOFT adapters")
    targets = select_modules(model, config.target_modules, config.exclude_modules, eligible=_gsoft_eligible(config))
    if not targets:
        raise ValueError(f"no module matches target_modules={config.target_modules!r}")
    wrapped = replace_modules(model, targets, lambda name, m: GSOFTLinear(m, config, name))
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in wrapped.values():
        for pname, p in layer.named_parameters():
            p.requires_grad_(pname.startswith(PREFIX) or (config.bias == "gsoft_only" and pname == "base_layer.bias"))
    if config.bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.requires_grad_(True)
    if config.modules_to_save is not None:
        for m in select_modules(model, config.modules_to_save).values():
            for p in m.parameters():
                p.requires_grad_(True)
    return wrapped


def _refuse_tied(model: torch.nn.Module, layers: list[tuple[str, GSOFTLinear]]) -> None:
    """Merging writes the base weight in place: refused (``ValueError``, before any write) for a base weight tied to
    another place of the model, which would change there too. Cost ``O(modules + parameters)`` per layer."""
    for name, layer in layers:
        others = tied_parameters(model, layer).get("base_layer.weight")
        if others:
            raise ValueError(
                f"{name}.base_layer.weight is tied to {others[0]}: merging would change it there too; nothing was "
                "merged (untie the weights first)"
            )


def merge_adapter(model: torch.nn.Module) -> None:
    """Merge every GSOFT adapter into its base weight, all or none: if one cannot be merged (``ValueError``: a
    (nearly) zero scale entry, a non-finite result), no weight has changed. Cost per layer: one ``O(n_out n_in b)``
    pass (two for a weight near the largest float, whose result cannot be proven finite beforehand) plus
    ``O(n_out n_in + n b²)`` of checks; extra memory: one weight."""
    adapted = list(_adapted(model))
    _refuse_tied(model, [(n, layer) for n, layer in adapted if not layer.merged])
    merge_all([layer for _, layer in adapted], merge=True)


def unmerge_adapter(model: torch.nn.Module) -> None:
    """Undo :func:`merge_adapter` (all or none), restoring the base weights to rounding. Cost as
    :func:`merge_adapter`'s."""
    merge_all([layer for _, layer in _adapted(model)], merge=False)


def merge_and_unload(model: torch.nn.Module) -> torch.nn.Module:
    """Merge the adapters (all or none) and put the plain base layers back at every place (in place,
    :func:`~lowrankopt.nn.surgery.restore_modules`); returns ``model``. Cost as :func:`merge_adapter`'s."""
    merge_adapter(model)
    restore_modules(model, GSOFTLinear, lambda name, layer: layer.base_layer)
    return model


def unload(model: torch.nn.Module) -> torch.nn.Module:
    """Remove the adapters without merging them: merged ones are unmerged first (all or none), then the plain base
    layers are put back at every place (in place); returns ``model``, the base model again (to rounding where a
    layer was merged). Cost as :func:`unmerge_adapter`'s."""
    unmerge_adapter(model)
    restore_modules(model, GSOFTLinear, lambda name, layer: layer.base_layer)
    return model


@contextlib.contextmanager
def disable_adapters(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the context, the adapted layers compute the base model's outputs."""
    layers = [layer for _, layer in _adapted(model)]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def _key(module_name: str, leaf: str) -> str:
    return f"{module_name}.{leaf}" if module_name else leaf


def _adapter_entries(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State-dict key → live tensor of what training changes: the adapter parameters and every trainable one."""
    keys = {k for k, p in model.named_parameters() if p.requires_grad}
    for name, layer in _adapted(model):
        keys.update(_key(name, k) for k, _ in layer.named_parameters() if k.startswith(PREFIX))
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if k in keys}


def gsoft_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: the adapter parameters (``…gsoft_in.L``, ``…gsoft_scale``, …) and every other
    trainable parameter (``modules_to_save``, trainable biases), detached copies. The same whether the model is
    merged or not (the merge state stays out: the adapter file is applied to unmerged base weights); raises
    ``ValueError`` if a trainable base weight holds a merged weight (unmerge first)."""
    entries = _adapter_entries(model)
    for name, layer in _adapted(model):
        if layer.merged and _key(name, "base_layer.weight") in entries:
            raise ValueError(
                f"{_key(name, 'base_layer.weight')} is trainable and holds the merged weight: saved, it would apply "
                "the adapter twice when loaded; unmerge the adapters first"
            )
    return {k: v.detach().clone() for k, v in entries.items()}


def load_gsoft_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load adapter parameters saved by :func:`gsoft_state_dict` into an unmerged model injected with the same
    config. Raises ``ValueError`` (nothing loaded) if the model is merged or keys or shapes differ."""
    adapted = list(_adapted(model))
    if any(layer.merged for _, layer in adapted):
        raise ValueError("unmerge the adapters before loading adapter weights")
    expected = _adapter_entries(model)
    missing, unexpected = set(expected) - set(state_dict), set(state_dict) - set(expected)
    if missing or unexpected:
        raise ValueError(f"adapter state mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor) or v.shape != expected[k].shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"adapter state mismatch: {k} must have shape {tuple(expected[k].shape)}, got {got}")
    state_dict = dict(state_dict)
    for name, _ in adapted:  # a trainable base weight in the file is an unmerged one (gsoft_state_dict saw to it)
        if _key(name, "base_layer.weight") in state_dict:
            state_dict[_key(name, "merged_flag")] = torch.tensor(False)
    model.load_state_dict(state_dict, strict=False)
