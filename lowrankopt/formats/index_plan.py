"""Grouped evaluation of TT sweeps over a set of multi-indices.

A sweep over N multi-indices multiplies, at each position k, N interface vectors by the core slices
``G_k[:, i_k, :]``. Done as a batch of N tiny products it is memory-bound (the gathered slices take
``N r²`` memory). Instead we sort the entries by ``i_k`` once per position, so that every slice
multiplies one contiguous block of vectors with a single GEMM; between positions the vectors are
carried from one sorted arrangement to the next with one permutation (``N r`` memory traffic).

Arrangement ``k``: position ``p`` holds entry ``order[k][p]``. All functions below take and return
vectors in the arrangement of the position they work on. Plans are cheap (d sorts of N small ints, each
done in the narrowest integer type that holds the mode's size, where torch sorts by radix) and built once per
gather call; everything is differentiable (split, unbind, matmul, cat — whose backward passes cost O(N r), where
per-block slices of v would cost O(n N r): each slice's backward writes a zero tensor of v's full size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class IndexPlan:
    """Sorted arrangements of an index tensor ``(N, d)`` with ``index[:, k] < shape[k]``."""

    __slots__ = ("N", "order", "pos", "bounds")

    def __init__(self, index: torch.Tensor, shape: Sequence[int]) -> None:
        self.N = index.shape[0]
        self.order, self.pos, self.bounds = [], [], []
        arange = torch.arange(self.N, device=index.device)
        for k, n in enumerate(shape):
            order = sort_order(index[:, k], n)
            pos = torch.empty_like(order)
            pos[order] = arange
            counts = torch.bincount(index[:, k], minlength=n).tolist()
            starts = [0]
            for c in counts:
                starts.append(starts[-1] + c)
            self.order.append(order)
            self.pos.append(pos)
            self.bounds.append(starts)

    def to_next(self, v: torch.Tensor, k: int) -> torch.Tensor:
        """Rows of ``v`` from arrangement k to arrangement k + 1."""
        return v.index_select(0, self.pos[k].index_select(0, self.order[k + 1]))

    def to_prev(self, v: torch.Tensor, k: int) -> torch.Tensor:
        """Rows of ``v`` from arrangement k to arrangement k − 1."""
        return v.index_select(0, self.pos[k].index_select(0, self.order[k - 1]))

    def from_natural(self, v: torch.Tensor, k: int) -> torch.Tensor:
        return v.index_select(0, self.order[k])

    def to_natural(self, v: torch.Tensor, k: int) -> torch.Tensor:
        return v.index_select(0, self.pos[k])

    def _segments(self, k: int):
        b = self.bounds[k]
        return [(j, b[j], b[j + 1]) for j in range(len(b) - 1) if b[j + 1] > b[j]]

    def times_core(self, v: torch.Tensor, core: torch.Tensor, k: int) -> torch.Tensor:
        """``v[p] @ core[:, i_k[p], :]`` for v ``(N, a)`` in arrangement k; core ``(a, n_k, b)``."""
        return self._per_slice(v, core, k, transpose=False)

    def core_times(self, core: torch.Tensor, v: torch.Tensor, k: int) -> torch.Tensor:
        """``core[:, i_k[p], :] @ v[p]`` for v ``(N, b)`` in arrangement k; core ``(a, n_k, b)``."""
        return self._per_slice(v, core, k, transpose=True)

    def _per_slice(self, v, core, k, transpose):
        width = core.shape[0] if transpose else core.shape[2]
        segments = self._segments(k)
        if torch.is_grad_enabled() and (v.requires_grad or core.requires_grad):
            # split/unbind, not v[s:e] and core[:, j, :]: their backward is one cat/stack, not one full-size zero
            # tensor per block
            blocks = torch.split(v, [e - s for s, e in zip(self.bounds[k][:-1], self.bounds[k][1:])])
            cs = core.unbind(1)
            parts = [blocks[j] @ (cs[j].T if transpose else cs[j]) for j, _, _ in segments]  # differentiable
            return torch.cat(parts, 0) if parts else v.new_zeros(0, width)
        out = v.new_empty(self.N, width)  # no graph needed: write each block in place, no concatenation
        for j, s, e in segments:
            torch.matmul(v[s:e], core[:, j, :].T if transpose else core[:, j, :], out=out[s:e])
        return out

    def outer_sum(self, left: torch.Tensor, right: torch.Tensor, k: int, n: int) -> torch.Tensor:
        """Core ``(a, n, b)`` with slice j equal to ``Σ_{p: i_k[p] = j} left[p] ⊗ right[p]``."""
        a, b = left.shape[1], right.shape[1]
        zero = left.new_zeros(a, b)
        slices = [zero] * n
        sizes = [e - s for s, e in zip(self.bounds[k][:-1], self.bounds[k][1:])]
        ls, rs = torch.split(left, sizes), torch.split(right, sizes)  # split, not slices: see the module docstring
        for j, _, _ in self._segments(k):
            slices[j] = ls[j].T @ rs[j]
        return torch.stack(slices, 1)


def sort_order(keys: torch.Tensor, size: int) -> torch.Tensor:
    """A permutation sorting ``keys`` (integers in ``[0, size)``): any order within a group of equal keys.

    The keys are cast to the narrowest integer type that holds ``size`` first: torch sorts uint8 and int16 by
    radix (about 6× faster than int64 for 10⁵ keys on a CPU). Cost ``O(N)`` for ``size <= 2¹⁵``, else a comparison
    sort."""
    for dtype, top in ((torch.uint8, 256), (torch.int16, 2**15), (torch.int32, 2**31)):
        if size <= top:
            keys = keys.to(dtype)
            break
    return torch.sort(keys, stable=True).indices
