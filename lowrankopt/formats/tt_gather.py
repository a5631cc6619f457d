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

The same layout serves the Riemannian gradient (:class:`Linearization`): the δ-gradient of the linearization
``x + Σ_k U_{<k} δ_k V_{>k}`` sums ``g_p ℓ_k(p) ⊗ ρ_k(p)`` over the samples; on the table modes these sums are GEMMs
over the table rows (after one scattered add of the samples' vectors into the table), on a middle chunk one batched
GEMM per block. The δ-gradient uses smaller tables (``GRAD_TABLE_ROWS``) so that the scattered adds stay in cache.

Everything is differentiable (matmul, bmm, reshape, index_select, index_add, split, cat), to any order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._checks import IndexCache
from .index_plan import sort_order
from .lowrank import rowdot


def tt_gather(cores: Sequence[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """``X[index[p]]`` for the TT with ``cores[k]: (r_{k-1}, n_k, r_k)`` and a checked ``index: (N, d)``; ``(N,)``.

    Cost: ``O((P + Q) r² + N r² · #middle modes)`` for prefix/suffix tables of P, Q rows (see the module
    docstring), never more than ``O(N d r²)``."""
    if len(cores) == 1:
        return cores[0].reshape(-1).index_select(0, index[:, 0])
    return sample_plan(index, [c.shape[1] for c in cores], max(c.shape[2] for c in cores)).gather(cores)


# the plans of live index tensors, per (shape, rank, table size): a plan holds a few int64 vectors of length N
_PLANS = IndexCache(8)


def sample_plan(index: torch.Tensor, shape: Sequence[int], rank: int, table_rows: float | None = None) -> SamplePlan:
    """The :class:`SamplePlan` of ``index`` for this shape, rank and table size, built once per index tensor and kept
    while the tensor lives and is unchanged (a sort and ``O(N d)`` integer work saved per call: at N = 10⁵, d = 10
    about a quarter of the time of a gather). Writes torch does not see (through NumPy, ``.data``) need a new
    tensor: see :func:`lowrankopt._checks._index_state`."""
    key = (tuple(shape), rank, TABLE_ROWS if table_rows is None else table_rows, MERGED)  # what the layout reads
    return _PLANS.get(index, key, lambda: SamplePlan(index, shape, rank, table_rows))


class SamplePlan:
    """How N multi-indices ``(N, d)`` (d >= 2) meet a TT of this shape: the :func:`layout`, each sample's row in the
    prefix table (``lkey``) and in the suffix table (``rkey``, little-endian), and the :class:`Blocks` of every
    middle chunk. Arrangement c is the padded arrangement of chunk c."""

    __slots__ = ("a", "b", "chunks", "lkey", "rkey", "blocks", "shape")

    def __init__(self, index: torch.Tensor, shape: Sequence[int], rank: int, table_rows: float | None = None) -> None:
        d, self.shape = len(shape), list(shape)
        self.a, self.b, self.chunks = layout(shape, rank, index.shape[0], table_rows)
        # the suffix table's rows are little-endian
        keys = _digits(index, shape, [(0, self.a, False), (self.b, d, True)] + [(s, e, False) for s, e in self.chunks])
        self.lkey, self.rkey = keys[0], keys[1]
        self.blocks = [Blocks(key, math.prod(shape[s:e])) for key, (s, e) in zip(keys[2:], self.chunks)]

    def gather(self, cores: Sequence[torch.Tensor]) -> torch.Tensor:
        """The entries of the TT with these ``cores`` at the plan's indices, ``(N,)``."""
        left, right = _prefix_table(cores[: self.a]), _suffix_table(cores[self.b :])
        if not self.blocks:  # the tables meet
            return rowdot(left.index_select(0, self.lkey), right.index_select(0, self.rkey))
        v = left.index_select(0, self.lkey.index_select(0, self.blocks[0].src))
        for c, (s, e) in enumerate(self.chunks):
            if c:
                v = self.move(v, c - 1, c)
            v = self.blocks[c].times_core(v, _merged_core(cores[s:e]))
        last = self.blocks[-1]
        return rowdot(v, right.index_select(0, self.rkey.index_select(0, last.src))).index_select(0, last.slot)

    def move(self, v: torch.Tensor, c: int, to: int) -> torch.Tensor:
        """Rows of ``v`` from arrangement c to arrangement ``to`` (one permutation; padding rows get some row)."""
        return v.index_select(0, self.blocks[c].slot.index_select(0, self.blocks[to].src))


class Linearization:
    """``Y(δ) = x + Σ_k U_{<k} δ_k V_{>k}`` at δ = 0 on a :class:`SamplePlan`, ``x = C_1 V_2 ⋯ V_d``: its entries
    (``value``) and, by :meth:`grads`, the δ-gradient of ``Σ_p g_p Y(δ)[i(p)]``. ``U``: d − 1 cores, ``V``: d entries
    (the first unused). The V-side work (suffix tables, one V-sweep over the middle chunks) is done here and shared by
    the value (rows of the ``[C_1, V_2, ...]`` prefix table dotted with the samples' V-interfaces) and the gradient.
    Cost ``O((P + Q) r² + N r² · #chunks)``."""

    __slots__ = ("plan", "U", "V", "RV", "Rs", "r_a", "value")

    def __init__(self, plan: SamplePlan, C: torch.Tensor, U: Sequence[torch.Tensor], V: Sequence) -> None:
        d, a, b = len(V), plan.a, plan.b
        self.plan, self.U, self.V = plan, U, V
        self.RV = RV = {d - 1: C.new_ones(1, 1)}  # RV[k]: V-suffix table over the modes after k, width r_{k+1}
        for k in range(d - 1, b - 1, -1):
            RV[k - 1] = (RV[k] @ V[k].permute(2, 1, 0).reshape(V[k].shape[2], -1)).reshape(-1, V[k].shape[0])
        left = _prefix_table([C, *V[1:a]])
        if not plan.blocks:  # ρ at a − 1 (= b − 1), natural order
            self.Rs, self.r_a = [], RV[b - 1].index_select(0, plan.rkey)
            self.value = rowdot(left.index_select(0, plan.lkey), self.r_a)
            return
        blocks = plan.blocks
        self.Rs = Rs = [None] * len(blocks)  # ρ at each chunk's last mode, in its arrangement
        Rs[-1] = RV[b - 1].index_select(0, plan.rkey.index_select(0, blocks[-1].src))
        for c in range(len(blocks) - 1, -1, -1):
            s, e = plan.chunks[c]
            prev = blocks[c].times_core(Rs[c], _merged_core(V[s:e]).permute(2, 1, 0))
            if c:
                Rs[c - 1] = plan.move(prev, c, c - 1)
        self.r_a = prev  # ρ_{a-1} in arrangement 0
        lkey = plan.lkey.index_select(0, blocks[0].src)
        self.value = rowdot(left.index_select(0, lkey), prev).index_select(0, blocks[0].slot)

    def grads(self, g: torch.Tensor) -> list[torch.Tensor]:
        """The cores ``G_k[:, j, :] = Σ_{p: i_k(p) = j} g_p ℓ_k(p) ⊗ ρ_k(p)``, k = 1..d, with the interfaces
        ``ℓ_k = U_1[i_1]⋯U_{k-1}[i_{k-1}]`` and ``ρ_k = V_{k+1}[i_{k+1}]⋯V_d[i_d]`` at sample p; ``g: (N,)`` in
        natural order. Linear in g and differentiable in it (a double backward gives the HVP).

        The left-table modes' gradients are ``Σ_u LU_k[u] ⊗ Z_k[u]`` over the U-prefix table rows, with ``Z`` the
        samples' ``g ρ`` summed per prefix and swept down the table by GEMMs; the right-table modes likewise with
        the V-suffix table; a middle chunk sums ``g ℓ ⊗ ρ`` per block in one batched GEMM, then per key value, and
        hands it to its modes through partial merged cores. Per-sample work: one U-sweep over the middle chunks."""
        plan, U, V, RV = self.plan, self.U, self.V, self.RV
        d, a, b, shape = len(V), plan.a, plan.b, plan.shape
        LU = [g.new_ones(1, 1)]  # LU[k]: (n_1⋯n_k rows, r_k), the U-prefix table over the first k modes
        for k in range(a):
            LU.append((LU[-1] @ U[k].reshape(U[k].shape[0], -1)).reshape(-1, U[k].shape[2]))
        grads: list[torch.Tensor | None] = [None] * d
        if not plan.blocks:  # ℓ at b (= a), natural order
            l_b = LU[a].index_select(0, plan.lkey)
            lkey_a, g_a, rkey_b, g_b = plan.lkey, g, plan.rkey, g
        else:
            blocks, C = plan.blocks, len(plan.blocks)
            g_ext = torch.cat([g, g.new_zeros(1)])  # the padding slots get weight 0: their rows are arbitrary
            gs = [g_ext.index_select(0, blk.src_or_end) for blk in blocks]
            Ls = [LU[a].index_select(0, plan.lkey.index_select(0, blocks[0].src))]  # ℓ at each chunk's first mode
            for c, (s, e) in enumerate(plan.chunks):
                nxt = blocks[c].times_core(Ls[c], _merged_core(U[s:e]))
                Ls.append(plan.move(nxt, c, c + 1) if c + 1 < C else nxt)
                _chunk_grads(grads, blocks[c], Ls[c], self.Rs[c], gs[c], U, V, shape, s, e)
            l_b = Ls[C]  # in the last arrangement
            lkey_a, g_a = plan.lkey.index_select(0, blocks[0].src), gs[0]
            rkey_b, g_b = plan.rkey.index_select(0, blocks[-1].src), gs[-1]
        Z = _sum_rows(lkey_a, LU[a].shape[0], g_a[:, None] * self.r_a)
        X = _sum_rows(rkey_b, RV[b - 1].shape[0], g_b[:, None] * l_b)
        _table_grads(grads, Z, X, LU, RV, U, V, a, b, shape)
        return grads


def _table_grads(grads, Z, X, LU, RV, U, V, a, b, shape):
    """The gradients of the table modes from the per-prefix sums ``Z`` (P, r_a) and per-suffix sums ``X`` (Q, r_b).
    Plain matrix products on the tables' rows (an einsum would transpose the (P, n, r) blocks first)."""
    d = len(shape)
    for k in range(a - 1, -1, -1):  # Z: rows = prefixes over the modes up to k; width r_{k+1}
        rows = Z.reshape(LU[k].shape[0], -1)  # (prefixes over modes < k, n_k r_{k+1})
        grads[k] = (LU[k].T @ rows).reshape(LU[k].shape[1], shape[k], -1)
        if k:
            Z = rows @ V[k].reshape(V[k].shape[0], -1).T
    for k in range(b, d):  # X: rows = suffixes over the modes from k (little-endian); width r_k
        rows = X.reshape(RV[k].shape[0], -1)  # (suffixes over modes > k, n_k r_k)
        grads[k] = (rows.T @ RV[k]).reshape(shape[k], -1, RV[k].shape[1]).transpose(0, 1)
        if k < d - 1:
            X = rows @ U[k].transpose(0, 1).reshape(-1, U[k].shape[2])


def _sum_rows(key: torch.Tensor, rows: int, src: torch.Tensor) -> torch.Tensor:
    """``out[u] = Σ_{p: key[p] = u} src[p]``, ``(rows, width)``: one row-wise index_add (as fast as one over the
    flattened entries in torch 2.13, without building their ``(N, width)`` index: ~2.7 ms at N = 10⁵, width 10)."""
    return src.new_zeros(rows, src.shape[1]).index_add(0, key, src)


def _chunk_grads(grads, blk, L, R, g, U, V, shape, s, e):
    """The gradients of the modes ``[s, e)`` of a middle chunk from ℓ at its start and ρ at its end (arrangement of
    ``blk``): ``Σ g ℓ ⊗ ρ`` per block (one bmm), per key value (index_add), then through partial merged cores."""
    ra, rb = L.shape[1], R.shape[1]
    W = torch.bmm((L * g[:, None]).reshape(-1, blk.B, ra).transpose(1, 2), R.reshape(-1, blk.B, rb))
    Ck = W.new_zeros(math.prod(shape[s:e]), ra, rb).index_add(0, blk.block_key, W)

    def eye(r):  # the merged core of no modes
        return torch.eye(r, dtype=W.dtype, device=W.device).reshape(r, 1, r)

    for k in range(s, e):
        PU = _merged_core(U[s:k]) if k > s else eye(ra)
        SV = _merged_core(V[k + 1 : e]) if k + 1 < e else eye(rb)
        C5 = Ck.reshape(PU.shape[1], shape[k], SV.shape[1], ra, rb)
        grads[k] = torch.einsum("aub,ujvae,cve->bjc", PU, C5, SV)


class Blocks:
    """Samples grouped by a key in ``[0, R)`` into blocks of B rows, every block within one key value: a *padded
    arrangement* of ``T·B >= N`` slots in which one batched GEMM multiplies every block by its key's core slice.

    ``src[q]`` is the sample at slot q (sample 0 at the padding slots, whose values are never read back, so that
    their gradients are zero), ``slot[p]`` the slot of sample p, ``block_key[t]`` the key of block t. B is about a
    quarter of the mean group size (1 to 256): padding adds about ``R·B/2 <= N/8`` slots when keys are spread, and a
    key drawn by every sample still makes full blocks. Cost: one sort of N keys (radix for R <= 2¹⁵) and
    ``O(N + R)`` integer work."""

    __slots__ = ("src", "slot", "block_key", "B", "_src_or_end")

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
        self._src_or_end = None
        self.block_key = torch.repeat_interleave(torch.arange(R, device=dev), nblk, output_size=T)

    @property
    def src_or_end(self) -> torch.Tensor:
        """``src`` with N at the padding slots: the row of a zero appended to a per-sample vector."""
        if self._src_or_end is None:
            N = self.slot.shape[0]
            ends = torch.full_like(self.src, N)
            self._src_or_end = ends.scatter_(0, self.slot, torch.arange(N, device=self.slot.device))
        return self._src_or_end

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


def layout(
    shape: Sequence[int], rank: int, N: int, table_rows: float | None = None
) -> tuple[int, int, list[tuple[int, int]]]:
    """``(a, b, chunks)``: modes ``[0, a)`` in the prefix table, ``[b, d)`` in the suffix table (d >= 2; each holds
    at least its end mode), the middle ``[a, b)`` cut into ``chunks`` of consecutive modes ``(start, stop)``;
    ``rank`` is the largest TT rank.

    A table grows (the smaller first) while it has at most ``TABLE_ROWS · N`` rows: building it costs about as
    much as sweeping the N samples over its last mode, at GEMM speed. A chunk grows while its merged size stays at
    most ``min(MERGED, N // 16, N // rank)`` (a single mode is a chunk of any size): every key value still has
    blocks of several samples, and merging costs less than one sweep."""
    d = len(shape)
    a, b, P, Q = 1, d - 1, shape[0], shape[-1]
    cap = (TABLE_ROWS if table_rows is None else table_rows) * N
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
GRAD_TABLE_ROWS = 0.125  # the same for the δ-gradient, which sums rows into its tables (scattered adds)
MERGED = 2048  # the largest merged middle mode (see layout)
SLICE_BUDGET = 1 << 22  # numbers of gathered core slices held at once (see Blocks.times_core)


def _digits(index: torch.Tensor, sizes: Sequence[int], spans: Sequence[tuple[int, int, bool]]) -> list[torch.Tensor]:
    """For each span ``(start, stop, little)``, the mixed-radix number of the columns ``[start, stop)`` of every row
    of ``index`` (first column most significant; last column with ``little``)."""
    strides = torch.zeros(index.shape[1], len(spans), dtype=torch.float64)
    for j, (start, stop, little) in enumerate(spans):
        stride = 1
        for k in range(start, stop)[:: 1 if little else -1]:
            strides[k, j] = stride
            stride *= sizes[k]
    if index.device.type == "cpu":
        # one float64 GEMM for all spans (exact: every key and partial sum is an integer below 2⁵³); integer
        # column arithmetic on the strided columns of index is several times slower
        keys = (index.to(torch.float64) @ strides).to(torch.int64)
        return list(keys.T.contiguous())
    cols = index.T.contiguous()
    return [
        (cols[start:stop] * strides[start:stop, j, None].to(cols)).sum(0) for j, (start, stop, _) in enumerate(spans)
    ]


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
