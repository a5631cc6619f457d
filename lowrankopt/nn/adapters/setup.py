"""What every adapter converter shares around the surgery: checking the selection fields of a config, and after the
layers are swapped in, training only the adapters (PEFT's freezing rules). Cost ``O(parameters)``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["check_selection_fields", "train_only_adapters"]


def check_selection_fields(config: object) -> None:
    """``target_modules`` (required), ``exclude_modules`` (suffixes, a regex or a predicate) and ``modules_to_save``
    (suffixes or a regex) of an adapter config: ``ValueError`` / ``TypeError`` naming the field."""
    if getattr(config, "target_modules", None) is None:
        raise ValueError("target_modules is required (names, a regex, 'all-linear' or a predicate)")
    for name in ("target_modules", "exclude_modules", "modules_to_save"):
        spec = getattr(config, name)
        names = isinstance(spec, Sequence) and all(isinstance(s, str) for s in spec)
        predicate = callable(spec) and name != "modules_to_save"
        if spec is not None and not isinstance(spec, str) and not names and not predicate:
            forms = "a regex string or a sequence of names (strings)" + (
                ", or a predicate" if name != "modules_to_save" else ""
            )
            raise TypeError(f"{name} must be {forms}, got {spec!r}")


def train_only_adapters(
    model: torch.nn.Module,
    layers: Iterable[torch.nn.Module],
    prefix: str,
    bias: str,
    saved: Iterable[torch.nn.Module] = (),
) -> None:
    """Freeze every parameter of ``model`` but those of the adapter ``layers`` whose names start with ``prefix``;
    ``bias``: ``"all"`` also trains every bias of the model, ``"<kind>_only"`` the base biases of the adapted layers,
    ``"none"`` none; the ``saved`` modules (``modules_to_save``) stay fully trainable."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers:
        for name, p in layer.named_parameters():
            p.requires_grad_(name.startswith(prefix) or (bias.endswith("_only") and name == "base_layer.bias"))
    if bias == "all":
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                p.requires_grad_(True)
    for m in saved:
        for p in m.parameters():
            p.requires_grad_(True)
