"""Grouped evaluation of TT sweeps over a set of multi-indices.

A sweep over N multi-indices multiplies, at each position k, N interface vectors by the core slices
``G_k[:, i_k, :]``. Done as a batch of N tiny products it is memory-bound (the gathered slices take
``N r²`` memory). Instead we sort the entries by ``i_k`` once per position, so that every slice
multiplies one contiguous block of vectors with a single GEMM; between positions the vectors are
carried from one sorted arrangement to the next with one permutation (``N r`` memory traffic).

Arrangement ``k``: position ``p`` holds entry ``order[k][p]``. All functions below take and return
vectors in the arrangement of the position they work on. Plans are cheap (d stable sorts of N ints)
and built once per gather call; everything is differentiable (slices, matmul, cat).
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
            order = torch.sort(index[:, k]).indices  # any order within a group will do
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
        slices = [(s, e, core[:, j, :].T if transpose else core[:, j, :]) for j, s, e in self._segments(k)]
        if torch.is_grad_enabled() and (v.requires_grad or core.requires_grad):
            parts = [v[s:e] @ c for s, e, c in slices]  # differentiable
            return torch.cat(parts, 0) if parts else v.new_zeros(0, width)
        out = v.new_empty(self.N, width)  # no graph needed: write each block in place, no concatenation
        for s, e, c in slices:
            torch.matmul(v[s:e], c, out=out[s:e])
        return out

    def outer_sum(self, left: torch.Tensor, right: torch.Tensor, k: int, n: int) -> torch.Tensor:
        """Core ``(a, n, b)`` with slice j equal to ``Σ_{p: i_k[p] = j} left[p] ⊗ right[p]``."""
        a, b = left.shape[1], right.shape[1]
        zero = left.new_zeros(a, b)
        slices = [zero] * n
        for j, s, e in self._segments(k):
            slices[j] = left[s:e].T @ right[s:e]
        return torch.stack(slices, 1)
