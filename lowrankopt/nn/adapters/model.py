"""The model-level adapter API in PEFT's style, for every :class:`~.layer.AdapterLayer` of a model whatever its kind
(GSOFT, Riemannian LoRA, a mix): :func:`merge_adapter` / :func:`unmerge_adapter` (all layers or none),
:func:`merge_and_unload` / :func:`unload`, :func:`disable_adapters` (a context manager), :func:`adapter_state_dict` /
:func:`load_adapter_state_dict` (what training changes, independent of the merge state)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..surgery import restore_modules, tied_parameters
from .layer import AdapterLayer, merge_all

__all__ = [
    "adapter_layers",
    "adapter_state_dict",
    "disable_adapters",
    "load_adapter_state_dict",
    "merge_adapter",
    "merge_and_unload",
    "unload",
    "unmerge_adapter",
]


def adapter_layers(model: torch.nn.Module) -> dict[str, AdapterLayer]:
    """``{qualified name: adapter layer}`` for every :class:`~.layer.AdapterLayer` of ``model`` (a layer used at
    several places once, under its first name), in ``named_modules`` order. Cost ``O(modules)``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def _refuse_tied(model: torch.nn.Module, layers: dict[str, AdapterLayer]) -> None:
    """Merging writes the base weight in place: refused (``ValueError``, before any write) for a base weight tied to
    another place of the model, which would change there too. Cost ``O(modules + parameters)`` per layer."""
    for name, layer in layers.items():
        others = tied_parameters(model, layer).get("base_layer.weight")
        if others:
            raise ValueError(
                f"{name}.base_layer.weight is tied to {others[0]}: merging would change it there too; nothing was "
                "merged (untie the weights first)"
            )


def merge_adapter(model: torch.nn.Module) -> None:
    """Merge every adapter of ``model`` into its base weight, all or none: if one cannot be merged (``ValueError``:
    e.g. a (nearly) zero GSOFT scale entry, a non-finite result, a base weight tied to another place of the model),
    no weight has changed. Cost per layer: one pass forming the ``out × in`` weight (GSOFT ``O(n_out n_in b)``,
    Riemannian LoRA ``O(n_out n_in r)``; two passes for a weight near the largest float, whose result cannot be
    proven finite beforehand) plus cheap checks; extra memory: one weight."""
    adapted = adapter_layers(model)
    _refuse_tied(model, {n: layer for n, layer in adapted.items() if not layer.merged})
    merge_all(list(adapted.values()), merge=True)


def unmerge_adapter(model: torch.nn.Module) -> None:
    """Undo :func:`merge_adapter` (all or none), restoring the base weights to rounding from the record of what was
    merged. Cost as :func:`merge_adapter`'s."""
    merge_all(list(adapter_layers(model).values()), merge=False)


def merge_and_unload(model: torch.nn.Module) -> torch.nn.Module:
    """Merge the adapters (all or none) and put the plain base layers back at every place (in place,
    :func:`~lowrankopt.nn.surgery.restore_modules`); returns ``model``. Cost as :func:`merge_adapter`'s."""
    merge_adapter(model)
    restore_modules(model, AdapterLayer, lambda name, layer: layer.base_layer)
    return model


def unload(model: torch.nn.Module) -> torch.nn.Module:
    """Remove the adapters without merging them: merged ones are unmerged first (all or none), then the plain base
    layers are put back at every place (in place); returns ``model``, the base model again (to rounding where a
    layer was merged). Cost as :func:`unmerge_adapter`'s."""
    unmerge_adapter(model)
    restore_modules(model, AdapterLayer, lambda name, layer: layer.base_layer)
    return model


@contextlib.contextmanager
def disable_adapters(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the context, the adapted layers compute the base model's outputs (a merged adapter cannot be
    disabled: its forward raises ``RuntimeError``)."""
    layers = list(adapter_layers(model).values())
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
    """State-dict key → live tensor of what training changes: the adapters' own entries and every trainable
    parameter."""
    keys = {k for k, p in model.named_parameters() if p.requires_grad}
    for name, layer in adapter_layers(model).items():
        keys.update(_key(name, k) for k in layer.adapter_state_keys())
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if k in keys}


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: the adapters' own parameters and state (GSOFT's ``…gsoft_in.L``, ``…gsoft_scale``;
    Riemannian LoRA's ``…lora_X`` and its offset ``…lora_C0``, ``…lora_V0``) and every other trainable parameter
    (``modules_to_save``, trainable biases), detached copies. The same whether the model is merged or not (the merge
    state stays out: the adapter file is applied to unmerged base weights); raises ``ValueError`` if a trainable base
    weight holds a merged weight (unmerge first). Cost: one copy of those tensors."""
    entries = _adapter_entries(model)
    for name, layer in adapter_layers(model).items():
        if layer.merged and _key(name, "base_layer.weight") in entries:
            raise ValueError(
                f"{_key(name, 'base_layer.weight')} is trainable and holds the merged weight: saved, it would apply "
                "the adapter twice when loaded; unmerge the adapters first"
            )
    return {k: v.detach().clone() for k, v in entries.items()}


def load_adapter_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load what :func:`adapter_state_dict` saved into an unmerged model adapted with the same configuration. Raises
    ``ValueError`` (nothing loaded) if the model is merged or keys or shapes differ. Records a file of an earlier
    version lacks are completed by the layer first where it knows them (GSOFT: the permutation of a file saved
    before issue 23, checked against the layer's)."""
    adapted = adapter_layers(model)
    if any(layer.merged for layer in adapted.values()):
        raise ValueError("unmerge the adapters before loading adapter weights")
    state_dict = dict(state_dict)
    for name, layer in adapted.items():
        fill = getattr(layer, "_fill_absent_records", None)
        if fill is not None:
            fill(state_dict, name)
    expected = _adapter_entries(model)
    missing, unexpected = set(expected) - set(state_dict), set(state_dict) - set(expected)
    if missing or unexpected:
        raise ValueError(f"adapter state mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    owners = {_key(n, k): (layer, k) for n, layer in adapted.items() for k in layer.adapter_state_keys()}
    for k, v in state_dict.items():
        ok = isinstance(v, torch.Tensor) and (
            owners[k][0]._loadable(owners[k][1], v) if k in owners else v.shape == expected[k].shape
        )
        if not ok:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"adapter state mismatch: {k} must have shape {tuple(expected[k].shape)}, got {got}")
    for name in adapted:  # a trainable base weight in the file is an unmerged one (adapter_state_dict saw to it)
        if _key(name, "base_layer.weight") in state_dict:
            state_dict[_key(name, "merged_flag")] = torch.tensor(False)
    model.load_state_dict(state_dict, strict=False)
