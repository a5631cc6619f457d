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
:mod:`.gsoft_config` (both re-exported here). The merge, unload, disable and state-dict functions are the shared ones
of :mod:`lowrankopt.nn.adapters` (they act on every adapter of a model, GSOFT or not); ``gsoft_state_dict`` and
``load_gsoft_state_dict`` are their GSOFT-named aliases.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..adapters.model import (
    adapter_layers,
    adapter_state_dict,
    disable_adapters,
    load_adapter_state_dict,
    merge_adapter,
    merge_and_unload,
    unload,
    unmerge_adapter,
)
from ..adapters.setup import train_only_adapters
from ..surgery import replace_modules, select_modules
from .gs import share_cayley_pool
from .gsoft_config import GSOFTConfig
from .gsoft_layer import PREFIX, GSOFTLinear

__all__ = [
    "GSOFTConfig",
    "GSOFTLinear",
    "convert_to_gsoft",
    "disable_adapters",
    "gsoft_parameter_counts",
    "gsoft_state_dict",
    "load_gsoft_state_dict",
    "merge_adapter",
    "merge_and_unload",
    "unload",
    "unmerge_adapter",
]


def _adapted(model: torch.nn.Module) -> Iterator[tuple[str, GSOFTLinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, GSOFTLinear))


def _gsoft_eligible(config: GSOFTConfig, model: torch.nn.Module):
    """What GSOFT adapts: ``nn.Linear``; with ``fan_in_fan_out``, also any module with a 2-D ``(in, out)`` weight but an
    embedding (GPT-2's ``Conv1D``) — not the layers inside adapters already there (of another kind)."""
    inside = {id(sub) for layer in adapter_layers(model).values() for sub in layer.modules()}

    def eligible(m: torch.nn.Module) -> bool:
        w = getattr(m, "weight", None)
        return id(m) not in inside and (
            isinstance(m, torch.nn.Linear)
            or (
                config.fan_in_fan_out
                and isinstance(w, torch.Tensor)
                and w.dim() == 2
                and not isinstance(m, torch.nn.Embedding)
            )
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
    to merge into a tied weight). The rotations of all the adapters share one :class:`~.gs.CayleyPool`: a step
    computes their Cayley blocks in one batched call. Returns ``{name: adapter layer}``. Cost: building the adapters
    (``O(n b)`` each).
    """
    if not isinstance(config, GSOFTConfig):
        raise TypeError(f"config must be a GSOFTConfig, got {type(config).__name__}")
    if any(True for _ in _adapted(model)):
        raise ValueError("model already has GSOFT adapters")
    targets = select_modules(
        model, config.target_modules, config.exclude_modules, eligible=_gsoft_eligible(config, model)
    )
    if not targets:
        raise ValueError(f"no module matches target_modules={config.target_modules!r}")
    wrapped = replace_modules(model, targets, lambda name, m: GSOFTLinear(m, config, name))
    share_cayley_pool(m for layer in wrapped.values() for m in layer.modules())  # one batched Cayley map per step
    saved = select_modules(model, config.modules_to_save).values() if config.modules_to_save is not None else ()
    train_only_adapters(model, wrapped.values(), PREFIX, config.bias, saved)
    return wrapped


def gsoft_parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """The trainable parameters of a model's GSOFT adapters, ``{"stored": …, "paper": …}``: as stored here (packed
    skew, ``n (b − 1)`` per rotation) and as the paper's tables count them (``2 n b`` per rotation), each plus the
    scales (:meth:`GSOFTLinear.parameter_counts`). Other trainable parameters (``modules_to_save``, biases) are not
    counted. Raises ``ValueError`` if the model has no GSOFT adapter."""
    layers = [m for _, m in _adapted(model)]
    if not layers:
        raise ValueError("the model has no GSOFT adapters")
    counts = [layer.parameter_counts() for layer in layers]
    return {key: sum(c[key] for c in counts) for key in ("stored", "paper")}


def gsoft_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: the adapter parameters (``…gsoft_in.L``, ``…gsoft_scale``, …), the record of each
    rotation's permutation (``…gsoft_in._extra_state``, an int64 tensor: :meth:`GSOrthogonal.get_extra_state`) and
    every other trainable parameter (``modules_to_save``, trainable biases), detached copies (tensors only:
    ``torch.load(..., weights_only=True)`` reads them). The same whether the model is merged or not (the merge state
    stays out: the adapter file is applied to unmerged base weights); raises ``ValueError`` if a trainable base weight
    holds a merged weight (unmerge first). The same as :func:`~lowrankopt.nn.adapter_state_dict` (every adapter of the
    model, of any kind)."""
    return adapter_state_dict(model)


def load_gsoft_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load adapter parameters saved by :func:`gsoft_state_dict` into an unmerged model injected with the same
    config. Raises ``ValueError`` (nothing loaded) if the model is merged, keys or shapes differ, or a rotation's
    permutation differs from the saved one: a file saved with another ``shuffle``, or one without the records
    (``…gsoft_in._extra_state``: saved by lowrankopt before issue 23, whose permutation is now ``shuffle="legacy"``)
    into adapters whose permutation is not the legacy one — the error names the ``shuffle`` to build with
    (``GSOFTConfig(..., shuffle="legacy")`` for old files). A file without records loads into adapters with the
    legacy permutation. The same as :func:`~lowrankopt.nn.load_adapter_state_dict` (which checks and completes the
    records of such a file through the layers)."""
    load_adapter_state_dict(model, state_dict)
