"""A dispatch-mode probe for "no dense matrix is formed": it sees every tensor every op creates, backward included
(profiler memory events would net allocations and frees within an op)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LargestAllocation(TorchDispatchMode):
    """``largest``: the bytes of the largest tensor storage any op allocates (outputs that are not views of an input)
    and the op that did."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                nbytes = t.untyped_storage().nbytes()
                if nbytes > self.largest[0]:
                    self.largest = (nbytes, str(func))
        return out
