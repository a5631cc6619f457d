"""Adapters in PEFT's style, one implementation for every kind: the base class :class:`AdapterLayer` (a frozen base
layer, disabled or not, merged or not, the merge state in the ``state_dict``; :mod:`.layer`) and the model-level
functions over every adapter layer of a model (:mod:`.model`): :func:`merge_adapter` / :func:`unmerge_adapter` (all
or none), :func:`merge_and_unload` / :func:`unload`, :func:`disable_adapters`, :func:`adapter_state_dict` /
:func:`load_adapter_state_dict`.

The adapters themselves live with their families: GSOFT (:mod:`lowrankopt.nn.orthogonal.gsoft`) and Riemannian LoRA
(:mod:`lowrankopt.nn.manifold.lora`). (A sub-package rather than a module ``nn/adapters.py``: the top of
:mod:`lowrankopt.nn` holds only the package, the shared ``surgery`` and ``_common`` and the 0.1 paths.)"""

from .layer import AdapterLayer, merge_all
from .model import (
    adapter_layers,
    adapter_state_dict,
    disable_adapters,
    load_adapter_state_dict,
    merge_adapter,
    merge_and_unload,
    unload,
    unmerge_adapter,
)

__all__ = [
    "AdapterLayer",
    "adapter_layers",
    "adapter_state_dict",
    "disable_adapters",
    "load_adapter_state_dict",
    "merge_adapter",
    "merge_all",
    "merge_and_unload",
    "unload",
    "unmerge_adapter",
]
