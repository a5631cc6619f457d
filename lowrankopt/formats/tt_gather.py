"""Entries of a tensor train at N multi-indices: prefix and suffix tables, merged middle modes, batched GEMMs.

``X[i] = G_1[:, i_1, :] ⋯ G_d[:, i_d, :]``. Sample by sample, a sweep costs ``N Σ_k r_{k-1} r_k`` multiply-adds
(about ``N d r²``) in matrix-vector products. Much of that work is shared between samples when N is large against
the first and the last modes, and the rest can be done as GEMMs:

* The product of the first a cores depends only on the prefix ``(i_1, ..., i_a)``: all ``P = n_1⋯n_a`` of them
  form a *prefix table* ``(P, r_a)``, built by a GEMMs of growing height (about ``P r²`` multiply-adds, at GEMM
  speed). It grows while ``P <= TABLE_ROWS · N``. Likewise a *suffix table* of the last modes, from the right.
* Consecutive modes between the two are *merged* into one mode of size ``n_k⋯n_l`` (its core built by dense
  contraction, ``n_k⋯n_l r³`` multiply-adds) while the merged size stays at most ``min(MERGED, N/16, N/r)``.
* Each merged mode multiplies the samples' interface vectors in one batched GEMM: the samples are sorted by the
  mode's index into blocks of equal index (:class:`Blocks`), so that every block meets a single core slice.

The sweep starts from rows of the prefix table, runs over the merged middle modes (one permutation of the
``(N, r)`` vectors between two) and ends with a row-wise dot product with rows of the suffix table; where the
tables meet no sort is needed at all. For d = 10, n = 20, r = 10, N = 10⁵: tables of 20⁴ rows on each side and
one merged middle mode of 400 values, about 3.4·10⁷ multiply-adds in the tables and 10⁷ in the sweep, against 10⁸
sample by sample.

Everything is differentiable (matmul, bmm, reshape, index_select, split, cat), to any order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .index_plan import sort_order


def tt_gather(cores: Sequence[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """``X[index[p]]`` for the TT with ``cores[k]: (r_{k-1}, n_k, r_k)`` and a checked ``index: (N, d)``; ``(N,)``.

    Cost: ``O((P + Q) r² + N r² · #middle modes)`` for prefix/suffix tables of P, Q rows (see the module
    docstring), never more than ``O(N d r²)``."""
    d, N = len(cores), index.shape[0]
    shape = [c.shape[1] for c in cores]
    if d == 1:
        return cores[0].reshape(-1).index_select(0, index[:, 0])
    a, b, chunks = layout(shape, max(c.shape[2] for c in cores), N)
    left = _prefix_table(cores[:a])
    right = _suffix_table(cores[b:])
    lkey = _digits(index, 0, a, shape)
    rkey = _digits(index, b, d, shape, little=True)  # the suffix table's row order
    if not chunks:  # the tables meet
        return (left.index_select(0, lkey) * right.index_select(0, rkey)).sum(1)
    blocks = [Blocks(_digits(index, s, e, shape), math.prod(shape[s:e])) for s, e in chunks]
    v = left.index_select(0, lkey.index_select(0, blocks[0].src))
    for c, (s, e) in enumerate(chunks):
        if c:
            v = v.index_select(0, blocks[c - 1].slot.index_select(0, blocks[c].src))
        v = blocks[c].times_core(v, _merged_core(cores[s:e]))
    last = blocks[-1]
    return (v * right.index_select(0, rkey.index_select(0, last.src))).sum(1).index_select(0, last.slot)


class Blocks:
    """Samples grouped by a key in ``[0, R)`` into blocks of B rows, every block within one key value: a *padded
    arrangement* of ``T·B >= N`` slots in which one batched GEMM multiplies every block by its key's core slice.

    ``src[q]`` is the sample at slot q (sample 0 at the padding slots, whose values are never read back, so that
    their gradients are zero), ``slot[p]`` the slot of sample p, ``block_key[t]`` the key of block t. B is about a
    quarter of the mean group size (1 to 256): padding adds about ``R·B/2 <= N/8`` slots when keys are spread, and a
    key drawn by every sample still makes full blocks. Cost: one sort of N keys (radix for R <= 2¹⁵) and
    ``O(N + R)`` integer work."""

    __slots__ = ("src", "slot", "block_key", "B")

    def __init__(self, key: torch.Tensor, R: int) -> None:
        N, dev = key.shape[0], key.device
        self.B = B = max(1, min(256, N // (4 * R)))
        order = sort_order(key, R)
        counts = torch.bincount(key, minlength=R)
        nblk = (counts + B - 1) // B
        first_block = torch.cumsum(nblk, 0) - nblk
        first_sample = torch.cumsum(counts, 0) - counts
        ks = key.index_select(0, order)
        rank = torch.arange(N, device=dev) - first_sample.index_select(0, ks)  # within its group
        slot_sorted = rank + B * first_block.index_select(0, ks)
        self.slot = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)
        T = int(nblk.sum())
        self.src = torch.zeros(T * B, dtype=torch.int64, device=dev).scatter_(0, slot_sorted, order)
        self.block_key = torch.repeat_interleave(torch.arange(R, device=dev), nblk, output_size=T)

    def times_core(self, v: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        """``v[q] @ core[:, key(q), :]`` for v ``(T·B, a)`` in the padded arrangement; core ``(a, R, b)``.

        The core slices are gathered per block, at most ``SLICE_BUDGET`` numbers at a time (blocks of one row when
        keys are sparse would otherwise take ``N a b`` memory)."""
        a, b = core.shape[0], core.shape[2]
        per_slice = core.transpose(0, 1)  # (R, a, b)
        vb = v.reshape(-1, self.B, a)
        step = max(1, SLICE_BUDGET // (a * b))
        if vb.shape[0] <= step:
            return torch.bmm(vb, per_slice.index_select(0, self.block_key)).reshape(-1, b)
        # split, not slices: the backward of a slice writes a zero tensor of v's full size
        parts = [
            torch.bmm(part, per_slice.index_select(0, keys))
            for part, keys in zip(torch.split(vb, step), torch.split(self.block_key, step))
        ]
        return torch.cat(parts, 0).reshape(-1, b)


def layout(shape: Sequence[int], rank: int, N: int) -> tuple[int, int, list[tuple[int, int]]]:
    """``(a, b, chunks)``: modes ``[0, a)`` in the prefix table, ``[b, d)`` in the suffix table (d >= 2; each holds
    at least its end mode), the middle ``[a, b)`` cut into ``chunks`` of consecutive modes ``(start, stop)``;
    ``rank`` is the largest TT rank.

    A table grows (the smaller first) while it has at most ``TABLE_ROWS · N`` rows: building it costs about as
    much as sweeping the N samples over its last mode, at GEMM speed. A chunk grows while its merged size stays at
    most ``min(MERGED, N // 16, N // rank)`` (a single mode is a chunk of any size): every key value still has
    blocks of several samples, and merging costs less than one sweep."""
    d = len(shape)
    a, b, P, Q = 1, d - 1, shape[0], shape[-1]
    cap = TABLE_ROWS * N
    while a < b:
        left, right = P * shape[a], Q * shape[b - 1]
        if min(left, right) > cap:
            break
        if left <= right:
            a, P = a + 1, left
        else:
            b, Q = b - 1, right
    mid_cap = min(MERGED, N // 16, N // max(rank, 1))
    chunks, k = [], a
    while k < b:
        stop, size = k + 1, shape[k]
        while stop < b and size * shape[stop] <= mid_cap:
            size, stop = size * shape[stop], stop + 1
        chunks.append((k, stop))
        k = stop
    return a, b, chunks


TABLE_ROWS = 2  # a table's rows per sample (see layout)
MERGED = 2048  # the largest merged middle mode (see layout)
SLICE_BUDGET = 1 << 22  # numbers of gathered core slices held at once (see Blocks.times_core)


def _digits(index: torch.Tensor, start: int, stop: int, sizes: Sequence[int], little: bool = False) -> torch.Tensor:
    """The mixed-radix number of the columns ``[start, stop)`` of each row of ``index`` (first column most
    significant; last column with ``little``)."""
    cols = list(range(start, stop))[:: -1 if little else 1]
    if index.device.type == "cpu":  # one integer matrix-vector product: column by column, strided ops are slow
        stride, strides = 1, index.new_zeros(index.shape[1])
        for k in reversed(cols):
            strides[k] = stride
            stride *= sizes[k]
        return index @ strides
    key = index[:, cols[0]]
    for k in cols[1:]:
        key = key * sizes[k] + index[:, k]
    return key


def _prefix_table(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(n_1⋯n_a, r_a)``: row ``digits(i_1..i_a)`` is ``G_1[:, i_1, :] ⋯ G_a[:, i_a, :]``. Cost ``O(P r²)``."""
    T = cores[0].reshape(cores[0].shape[1], -1)
    for c in cores[1:]:
        T = (T @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[2])
    return T


def _suffix_table(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(n_b⋯n_d, r_{b-1})``: row ``digits(i_d..i_b)`` (little-endian) is ``(G_b[:, i_b, :] ⋯ G_d[:, i_d, :])ᵀ``.
    Cost ``O(Q r²)``."""
    T = cores[-1].reshape(cores[-1].shape[0], -1).T
    for c in reversed(cores[:-1]):
        # row s·n + i of the new table: Σ_β G[α, i, β] T[s, β]; the core as (β, (i, α)) keeps rows in that order
        T = (T @ c.permute(2, 1, 0).reshape(c.shape[2], -1)).reshape(-1, c.shape[0])
    return T


def _merged_core(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The core ``(r_s, n_s⋯n_l, r_l)`` of consecutive modes merged (big-endian). Cost ``O(n_s⋯n_l r³)``."""
    M = cores[0]
    for c in cores[1:]:
        M = (M.reshape(-1, c.shape[0]) @ c.reshape(c.shape[0], -1)).reshape(M.shape[0], -1, c.shape[2])
    return M
