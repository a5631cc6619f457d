"""Tensor trains linear in δ-coordinates, on which autodiff evaluates a user's function.

    Y = Σ_families Σ_k  ℓ_{<k} · E_k (O_k + δ_k) F_kᵀ · ρ_{>k}

``ℓ_{<k}`` is the left interface of a *left chain* of cores (their product over positions < k),
``ρ_{>k}`` the right interface of a *right chain* (positions > k), ``E_k: (a_{k-1}, r_{k-1})`` and
``F_k: (b_k, r_k)`` map interface coordinates to the slot's ranks (None = identity), ``O_k`` is a
constant offset core and ``δ_k`` the family's coordinates (a family without δ is a constant term).

* Gradient family at ``x = C_1 V_2 ⋯ V_d``: left chain ``U``, right chain ``V``, offset ``C_1`` at
  k = 1, so ``Y(δ) = x + Σ_k U_{<k} δ_k V_{>k}``.
* Curvature families: *extension chains* — two-state chains ``[[U_k, ξ_k], [0, V_k]]`` (left) or
  ``[[V_k, R_k⁻¹ξ_k], [0, V_k]]`` (right) whose exposed state is the sum of paths through one ξ_j.
  They are stored as (parent chain, B = ξ cores, own cores) so that a sweep costs two GEMMs per mode.

The class subclasses :class:`TensorTrain`: generic ops see materialized block cores (autograd
through their construction), and ``gather`` has native implementations. The gradient's object (one plain
family at δ = 0: what ``riemannian_grad`` and ``riemannian_hvp(curvature=False)`` differentiate) is gathered on
prefix/suffix tables and padded blocks (:class:`.tt_gather.Linearization`). Every other object uses sorted
index plans (:mod:`index_plan`): the forward pass at δ = 0 needs only the offset term (one sweep of the right
chain), the backward pass the left chain and one GEMM per core slice. Interfaces are memoized per
plan inside :func:`shared_work`. Internal to autodiff.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from . import tt_gather
from .index_plan import IndexPlan
from .shared_work import CURVATURE_FOLLOWS, is_memoized, memo, memoized_function, unique_deltas
from .tt import TensorTrain
from .tt_gather import Linearization


@dataclass(frozen=True, eq=False)
class Chain:
    """Cores whose partial products are interface vectors.

    side "left": ``cores[k]`` at positions k = 0..d−2 (later entries unused);
    side "right": ``cores[k]`` at positions k = 1..d−1 (``cores[0]`` unused).
    With a ``parent`` the chain is an extension: the two-state chain ``[[parent_k, B_k], [0, cores_k]]``
    (left) or ``[[cores_k, B_k], [0, parent_k]]`` (right), exposing only its own state, which is zero
    at its start (position 0 for left chains, d − 1 for right chains).
    """

    side: str
    cores: tuple
    parent: Chain | None = None
    B: tuple | None = None

    def interfaces(self, plan: IndexPlan, d: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """Interface vectors at every position k (``(N, width)`` in arrangement k), memoized."""
        return memo("interfaces", (self, plan), lambda: self._interfaces(plan, d, dtype))

    def stream(self, plan: IndexPlan, d: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """The left interfaces one position at a time, without keeping them (plain left chains); the
        memoized ones when already computed."""
        if self.parent is not None or self.side != "left" or is_memoized("interfaces", (self, plan)):
            yield from self.interfaces(plan, d, dtype)
            return
        v = torch.ones(plan.N, 1, dtype=dtype, device=plan.order[0].device)
        for k in range(d):
            if k:
                v = plan.to_next(plan.times_core(v, self.cores[k - 1], k - 1), k - 1)
            yield v

    def _interfaces(self, plan, d, dtype):
        fill = torch.ones if self.parent is None else torch.zeros  # an extension's own state starts at 0
        v = fill(plan.N, 1, dtype=dtype, device=plan.order[0].device)
        par = None if self.parent is None else self.parent.interfaces(plan, d, dtype)
        out = [None] * d
        if self.side == "left":
            out[0] = v
            for k in range(1, d):
                t = None if (par is not None and k == 1) else plan.times_core(v, self.cores[k - 1], k - 1)
                if par is not None:
                    e = plan.times_core(par[k - 1], self.B[k - 1], k - 1)
                    t = e if t is None else t + e
                v = plan.to_next(t, k - 1)
                out[k] = v
        else:
            out[d - 1] = v
            for k in range(d - 1, 0, -1):
                t = None if (par is not None and k == d - 1) else plan.core_times(self.cores[k], v, k)
                if par is not None:
                    e = plan.core_times(self.B[k], par[k], k)
                    t = e if t is None else t + e
                v = plan.to_prev(t, k)
                out[k - 1] = v
        return out

    def block_cores(self, d: int) -> list:
        """Cores of the full (two-state, for extensions) chain, for materialization."""
        if self.parent is None:
            return list(self.cores)
        P = self.parent.block_cores(d)
        out = [None] * d
        if self.side == "left":
            out[0] = torch.cat([P[0], self.B[0]], 2)
            for k in range(1, d - 1):
                out[k] = _upper_block(P[k], self.B[k], self.cores[k])
        else:
            out[d - 1] = torch.cat([self.B[d - 1], P[d - 1]], 0)
            for k in range(1, d - 1):
                out[k] = _upper_block(self.cores[k], self.B[k], P[k])
        return out

    def embed(self, M: torch.Tensor | None, k: int, d: int, rank: int, like: torch.Tensor) -> torch.Tensor | None:
        """E_k (left) / F_k (right) as a map from the *full* chain interface (see block_cores)."""
        if self.parent is None:
            return M
        M = torch.eye(rank, dtype=like.dtype, device=like.device) if M is None else M
        at_start = k == 0 if self.side == "left" else k == d - 1
        if at_start:  # the exposed state does not exist yet: only the parent's single state
            return torch.zeros(1, M.shape[1], dtype=M.dtype, device=M.device)
        pad = torch.zeros(self.parent_width(k, d), M.shape[1], dtype=M.dtype, device=M.device)
        return torch.cat([pad, M], 0) if self.side == "left" else torch.cat([M, pad], 0)

    def parent_width(self, k: int, d: int) -> int:
        P = self.parent.block_cores(d)
        return P[k - 1].shape[2] if self.side == "left" else P[k + 1].shape[0]


def _upper_block(a, b, c):
    """[[a, b], [0, c]] along (left rank, right rank)."""
    bottom = torch.cat([c.new_zeros(c.shape[0], c.shape[1], a.shape[2]), c], 2)
    return torch.cat([torch.cat([a, b], 2), bottom], 0)


@dataclass(frozen=True, eq=False)
class TTFamily:
    """``Σ_k ℓ_{<k} E_k (O_k + δ_k) F_kᵀ ρ_{>k}``; per-position tuples of length d (None = absent /
    identity). ``deltas`` None makes a constant family (offsets only)."""

    left: Chain
    right: Chain
    offsets: tuple
    deltas: tuple | None = None
    E: tuple | None = None
    F: tuple | None = None

    def EF(self, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (None if self.E is None else self.E[k]), (None if self.F is None else self.F[k])


def _apply_EF(E, core, F):
    """E core Fᵀ on the (left, right) rank indices of ``core: (r, n, s)``."""
    if E is not None:
        core = torch.tensordot(E, core, dims=1)
    if F is not None:
        core = torch.tensordot(core, F, dims=([2], [1]))
    return core


def _apply_EF_adjoint(E, core, F):
    """Eᵀ core F — the adjoint of :func:`_apply_EF`."""
    if E is not None:
        core = torch.tensordot(E, core, dims=([0], [0]))
    if F is not None:
        core = torch.tensordot(core, F, dims=([2], [0]))
    return core


def _family_cores(fam: TTFamily, d: int) -> list[torch.Tensor]:
    """Materialize a family as TT cores ``[[left_k, E_k Δ_k F_kᵀ], [0, right_k]]``."""
    R = fam.right.block_cores(d)
    if fam.deltas is None:  # a constant family: the offset at position 0, then the right chain
        if any(o is not None for o in fam.offsets[1:]) or fam.E is not None or fam.F is not None:
            raise ValueError("a constant family has one offset, at position 0, and no E/F")
        return [fam.offsets[0]] + R[1:]
    L = fam.left.block_cores(d)
    cores = []
    for k in range(d):
        D = fam.deltas[k] if fam.offsets[k] is None else fam.offsets[k] + fam.deltas[k]
        E, F = fam.EF(k)
        mid = _apply_EF(fam.left.embed(E, k, d, D.shape[0], D), D, fam.right.embed(F, k, d, D.shape[2], D))
        if d == 1:
            cores.append(mid)
        elif k == 0:
            cores.append(torch.cat([L[0], mid], 2))
        elif k == d - 1:
            cores.append(torch.cat([mid, R[d - 1]], 0))
        else:
            cores.append(_upper_block(L[k], mid, R[k]))
    return cores


class DeltaTT(TensorTrain):
    """A sum of :class:`TTFamily` terms; ``zero`` says that the δ tensors are zero."""

    __slots__ = ("families", "zero", "_shape", "_cores")

    def __init__(self, shape: Sequence[int], families: Iterable[TTFamily], zero: bool = True) -> None:
        self._shape, self.families, self.zero = tuple(shape), tuple(families), zero
        self._cores = None
        self._cache = {}

    @property
    def cores(self) -> list[torch.Tensor]:
        if self._cores is None:
            d = len(self._shape)
            tt = None
            for fam in self.families:
                part = TensorTrain._trusted(_family_cores(fam, d))
                tt = part if tt is None else tt + part
            self._cores = tt.cores
        return self._cores

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def ndim(self) -> int:
        return len(self._shape)

    @property
    def dtype(self) -> torch.dtype:
        return self._some_core().dtype

    @property
    def device(self) -> torch.device:
        return self._some_core().device

    def _some_core(self):
        fam = self.families[0]
        return fam.offsets[0] if fam.offsets[0] is not None else fam.deltas[0]

    def materialize(self) -> TensorTrain:
        """A plain TensorTrain with the same value (ranks: the sum over the parts)."""
        return TensorTrain._trusted(self.cores)

    def _deltas(self) -> list[torch.Tensor]:
        return unique_deltas(self.families)

    def _gather(self, index):
        fam = self._plain_linearization()
        if fam is not None:
            return _LinearizationGather.apply(fam.offsets[0], fam.left.cores, fam.right.cores, index, *fam.deltas)
        return _DeltaTTGather.apply(self, index, *self._deltas())

    def _plain_linearization(self) -> TTFamily | None:
        """The family when this object is ``x + Σ_k U_{<k} δ_k V_{>k}`` at δ = 0 (what the gradient and the HVP
        without curvature differentiate) and no curvature pass follows in this scope, else None."""
        if not self.zero or len(self.families) != 1 or self.ndim < 2 or is_memoized(CURVATURE_FOLLOWS, ()):
            return None  # (the curvature passes reuse the sorted plans' interfaces: build them now)
        fam = self.families[0]
        plain = fam.deltas is not None and fam.E is None and fam.F is None
        plain = plain and fam.left.parent is None and fam.right.parent is None
        plain = plain and fam.offsets[0] is not None and all(o is None for o in fam.offsets[1:])
        return fam if plain and len({id(t) for t in fam.deltas}) == len(fam.deltas) else None


def _plan(index, shape) -> IndexPlan:
    return memo("plan", (index,), lambda: IndexPlan(index, shape), extra=(index._version, tuple(shape)))


def _slot_term(fam: TTFamily, k: int, core: torch.Tensor, plan: IndexPlan, d: int, dtype) -> torch.Tensor:
    """``ℓ_{<k} E_k core F_kᵀ ρ_{>k}`` at the plan's indices, in natural order."""
    E, F = fam.EF(k)
    core = _apply_EF(E, core, F)
    if k == 0 and fam.left.parent is None:  # the left interface is the constant 1: skip the sweep
        left = torch.ones(plan.N, 1, dtype=dtype, device=plan.order[0].device)
    else:
        left = fam.left.interfaces(plan, d, dtype)[k]
    right = fam.right.interfaces(plan, d, dtype)[k]
    return plan.to_natural((plan.times_core(left, core, k) * right).sum(-1), k)


def _offset_term(fam: TTFamily, k: int, plan: IndexPlan, d: int, dtype) -> torch.Tensor:
    """The constant offset's contribution, memoized (the curvature pass reuses the gradient pass's)."""
    key = (fam.left, fam.right, fam.offsets[k], plan) + fam.EF(k)
    return memo("offset", key, lambda: _slot_term(fam, k, fam.offsets[k], plan, d, dtype), extra=(k,))


@memoized_function
class _DeltaTTGather(torch.autograd.Function):
    @staticmethod
    def _forward(ctx, obj: DeltaTT, index, *deltas):
        d, dtype = obj.ndim, obj.dtype
        plan = _plan(index, obj.shape)
        ctx.obj, ctx.plan = obj, plan
        val = None
        for fam in obj.families:
            for k in range(d):
                terms = []
                if fam.offsets[k] is not None:
                    terms.append(_offset_term(fam, k, plan, d, dtype))
                if not obj.zero and fam.deltas is not None:
                    terms.append(_slot_term(fam, k, fam.deltas[k], plan, d, dtype))
                for t in terms:
                    val = t if val is None else val + t
        return val.clone() if val is not None else deltas[0].new_zeros(index.shape[0])

    @staticmethod
    def _backward(ctx, g):
        # Differentiable in g (no once_differentiable): double backward gives the HVP.
        obj, plan = ctx.obj, ctx.plan
        d, dtype = obj.ndim, obj.dtype
        g_sorted = [plan.from_natural(g, k) for k in range(d)]
        grads = {}
        for fam in obj.families:
            if fam.deltas is None:
                continue
            # A plain gradient (no graph of this backward) streams the left sweep instead of keeping
            # d interface blocks alive; a double backward reuses them, so then they are memoized.
            left = (
                fam.left.stream(plan, d, dtype) if not torch.is_grad_enabled() else fam.left.interfaces(plan, d, dtype)
            )
            right = fam.right.interfaces(plan, d, dtype)
            for k, (t, lk) in enumerate(zip(fam.deltas, left)):
                G = plan.outer_sum(lk, g_sorted[k][:, None] * right[k], k, t.shape[1])
                E, F = fam.EF(k)
                G = _apply_EF_adjoint(E, G, F)
                grads[id(t)] = G if id(t) not in grads else grads[id(t)] + G
        return (None, None, *(grads.get(id(t)) for t in obj._deltas()))


class _LinearizationGather(torch.autograd.Function):
    """``Y(δ) = x + Σ_k U_{<k} δ_k V_{>k}`` at δ = 0 gathered on prefix/suffix tables and padded blocks
    (:class:`.tt_gather.Linearization`): the forward pass computes x's entries and the V-side interfaces, the
    backward pass the δ-gradient — GEMMs on the tables and one U-sweep over the middle modes — in differentiable ops,
    so that a double backward gives the HVP."""

    @staticmethod
    def forward(ctx, C, U, V, index, *deltas):
        shape, rank = [t.shape[1] for t in deltas], max(t.shape[2] for t in deltas)
        ctx.lin = Linearization(tt_gather.sample_plan(index, shape, rank, tt_gather.GRAD_TABLE_ROWS), C, U, V)
        return ctx.lin.value

    @staticmethod
    def backward(ctx, g):
        return (None, None, None, None, *ctx.lin.grads(g))
