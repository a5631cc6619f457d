"""What every adapter layer shares (:class:`AdapterLayer`): a frozen base layer kept as ``base_layer``, the adapter
disabled or not, the adapter folded into the base weight or not (``merged_flag``, saved in the ``state_dict`` with the
record of what was folded in), and the all-or-none merge of many layers (:func:`merge_all`).

**The protocol.** A subclass (GSOFT's :class:`~lowrankopt.nn.GSOFTLinear`, the Riemannian LoRA
:class:`~lowrankopt.nn.RiemannianLoRALinear`) sets :attr:`AdapterLayer.adapter_prefix` (the names of its own
parameters and state start with it), registers one ``merged_<key>`` buffer per key of :meth:`_adapter_keys` (the record
of what a merge folded in) and implements

* ``_surely_finite(merge) -> bool``: a cheap proof that (un)merging gives a finite weight (False: not proven), raising
  ``ValueError`` for what cannot be (un)merged at all;
* ``_merge_result() -> (W, record)``: the merged ``(out, in)`` weight and the record of what it folds in, checked
  finite, nothing written;
* ``_unmerge_result() -> (W, record)``: the base weight recovered from the record, checked, nothing written.

:meth:`AdapterLayer._write` then writes the weight (in the base layer's layout), the record and the flag.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["AdapterLayer", "merge_all"]


class AdapterLayer(torch.nn.Module):
    """A frozen base layer (``nn.Linear``, or a GPT-2-style ``Conv1D`` whose weight is stored ``(in, out)``:
    ``fan_in_fan_out``) with an adapter: the base class of the library's adapters (see the module docstring for what
    a subclass implements).

    The merge state is part of the ``state_dict``: ``merged_flag`` (a 0-dim bool, whether ``base_layer.weight``
    holds the adapted weight) and the ``merged_*`` record of what was folded in. A checkpoint saved merged loads
    merged, one saved unmerged loads unmerged, whatever state the receiving layer was in; a state dict that could load
    an inconsistent state (a base weight without the flag, a merged flag without its record, adapter entries alone
    into a merged layer) is refused with a ``ValueError``.

    Args:
        base_layer: the frozen layer (it keeps its parameters, so tied weights stay tied).
        name: the layer's qualified name, for error messages.
        fan_in_fan_out: ``base_layer.weight`` is stored ``(in, out)``.
    """

    adapter_prefix: str = "adapter_"
    """The names of the adapter's own parameters and state (what training changes) start with this."""

    def __init__(self, base_layer: torch.nn.Module, name: str = "", *, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        w = base_layer.weight
        self.fan_in_fan_out = fan_in_fan_out
        self.layer_name = name or "layer"
        self.base_layer = base_layer
        self.disabled = False
        self.register_buffer("merged_flag", torch.tensor(False, device=w.device))
        self._merged = False  # the flag as a Python bool: reading the buffer in forward would sync a GPU

    @property
    def merged(self) -> bool:
        """Whether the adapter is folded into ``base_layer.weight``."""
        return self._merged

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (the adapter leaves it as it is)."""
        return getattr(self.base_layer, "bias", None)

    def _weight(self) -> torch.Tensor:
        """The base weight as ``(out, in)`` (a view)."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def _check_not_disabled_while_merged(self) -> None:
        if self.disabled and self.merged:
            raise RuntimeError("cannot disable a merged adapter; unmerge it first")

    def adapter_state_keys(self) -> list[str]:
        """The local ``state_dict`` keys of the adapter itself (what training changes): by default its parameters
        whose names start with :attr:`adapter_prefix`."""
        return [k for k, _ in self.named_parameters() if k.startswith(self.adapter_prefix)]

    def _loadable(self, key: str, value: torch.Tensor) -> bool:
        """Whether ``value`` can be loaded as the adapter entry ``key`` (local): by default, of the same shape."""
        try:
            current = self.get_parameter(key)
        except AttributeError:
            current = self.get_buffer(key)
        return value.shape == current.shape

    # ------------------------------------------------------------------ the protocol (see the module docstring)
    def _adapter_keys(self) -> list[str]:
        """The keys of the record of what a merge folds in (buffers ``merged_<key>``)."""
        raise NotImplementedError

    def _surely_finite(self, merge: bool) -> bool:
        raise NotImplementedError

    def _merge_result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _unmerge_result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _recorded(self) -> dict[str, torch.Tensor]:
        """The record of what was merged (the ``merged_*`` buffers)."""
        return {key: getattr(self, f"merged_{key}") for key in self._adapter_keys()}

    def _set_merged(self, merged: bool) -> None:
        """Keep the Python copy of the flag (a subclass may mark its parameters too)."""
        self._merged = merged

    @torch.no_grad()
    def _write(self, W: torch.Tensor, record: dict[str, torch.Tensor], merged: bool) -> None:
        """Write the ``(out, in)`` weight ``W`` in the base layer's layout, the record and the flag."""
        self.base_layer.weight.copy_(W.T if self.fan_in_fan_out else W)
        for key, value in record.items():
            getattr(self, f"merged_{key}").copy_(value)
        self.merged_flag.fill_(merged)
        self._set_merged(merged)

    def merge(self) -> None:
        """Fold the adapter into the base weight (forward then costs what the base layer costs) and record what was
        folded in. Raises ``ValueError`` (nothing changed) if it cannot be merged or the result would not be
        finite."""
        merge_all([self], merge=True)

    def unmerge(self) -> None:
        """Restore the base weight from the record of what was merged — to rounding, whatever the adapter became
        since."""
        merge_all([self], merge=False)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # the base weight and the merge flag only make sense together; refuse what could load an inconsistent state
        name = prefix.rstrip(".") or self.layer_name
        flag, weight = prefix + "merged_flag", prefix + "base_layer.weight"
        if (flag in state_dict) != (weight in state_dict):
            raise ValueError(
                f"{name}: the state dict must hold both {weight!r} and {flag!r} (whether that weight has the adapter "
                "merged in) or neither; a state dict saved before the merge state was saved needs "
                f"state_dict[{flag!r}] = torch.tensor(False) (unmerged) added"
            )
        if flag in state_dict and bool(state_dict[flag]):
            absent = [prefix + f"merged_{k}" for k in self._adapter_keys() if prefix + f"merged_{k}" not in state_dict]
            if absent:
                raise ValueError(f"{name}: a merged state needs the record of what was merged; missing {absent}")
        own = prefix + self.adapter_prefix
        if flag not in state_dict and self.merged and any(k.startswith(own) for k in state_dict):
            raise ValueError(
                f"{name}: the adapter is merged; loading adapter parameters alone would not change the merged "
                "weight: unmerge first (or load a full state dict)"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._set_merged(bool(self.merged_flag))


def merge_all(layers: Sequence[AdapterLayer], merge: bool) -> None:
    """Merge (or unmerge) every layer or none, each new weight computed once where it can be; the layers may be of
    different adapter types.

    First every layer is checked cheaply (``_surely_finite``), before any weight is written: what cannot be merged is
    refused and a bound proves the result finite. Then each weight is computed and written in one pass. A result the
    bound does not prove finite (weights near the largest float, non-finite values) is computed and checked before
    any weight is written, and computed again to be written — a second pass for those layers only, since holding the
    results instead would cost one weight per layer; the extra memory stays one weight.
    """
    todo = [layer for layer in layers if layer.merged != merge]
    proven = [layer._surely_finite(merge) for layer in todo]  # every layer, before any write
    if len(todo) > 1:
        for layer, ok in zip(todo, proven):
            if not ok:
                layer._merge_result() if merge else layer._unmerge_result()  # raises (nothing written yet)
    for layer in todo:
        layer._write(*(layer._merge_result() if merge else layer._unmerge_result()), merged=merge)
