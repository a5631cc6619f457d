"""Objects linear in δ-coordinates, on which autodiff evaluates a user's function.

The Riemannian gradient and Hessian need derivatives of ``f(Y(δ))`` where ``Y(δ)`` is a fixed
low-rank object plus terms linear in the coordinates δ with **detached** frames:

* matrices: ``Y = base + Σ_families (A0 + A) Pᵀ + Q Bᵀ``  (δ = (A, B));
* tensor trains: ``Y = base + Σ_families Σ_k ℓ_{<k} E_k (O_k + δ_k) F_kᵀ ρ_{>k}``, where the
  left interface ``ℓ_{<k}`` is the product of a *left chain* of TT cores 1..k−1, ``ρ_{>k}`` that of
  a *right chain* k+1..d, ``E_k``/``F_k`` select and transform interface coordinates and ``O_k`` is
  a constant offset (the point itself sits in the offset of the gradient family).

Both classes subclass the public formats, so any function written with format ops runs on them:
generic ops see materialized factors/cores (a rank-2r or rank-4r object built with autograd), and
``gather`` — the op of completion and regression losses — has a native implementation whose forward
pass costs one rank-r sweep and whose backward pass one more sweep plus rank-1 updates.
Derivatives are only wanted at δ = 0, where the forward value is just the base and offsets; the flag
``zero`` records that the δ tensors are zero, so the forward skips their terms.

Everything here is internal to lowrankopt.autodiff and the manifolds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .index_plan import IndexPlan
from .lowrank import LowRankMatrix
from .tt import TensorTrain

# ======================================================================================= matrices


@dataclass(frozen=True)
class MatrixFamily:
    """The terms ``(A0 + A) Pᵀ + Q Bᵀ``. ``P: (n, r)``, ``Q: (m, r)``, ``A0: (m, r)`` or None."""

    P: torch.Tensor
    Q: torch.Tensor
    A0: torch.Tensor | None = None


class DeltaLowRank(LowRankMatrix):
    """``base + Σ_families (A0 + A) Pᵀ + Q Bᵀ`` for δ = (A: (m, r), B: (n, r))."""

    __slots__ = ("A", "B", "families", "base", "zero", "_factors")

    def __init__(self, A, B, families, base: LowRankMatrix | None = None, zero: bool = True):
        self.A, self.B, self.families, self.base, self.zero = A, B, tuple(families), base, zero
        self._factors = None
        self._cache = {}

    def _materialize(self):
        if self._factors is None:
            us = [] if self.base is None else [self.base.U @ self.base.S]
            vs = [] if self.base is None else [self.base.V]
            for fam in self.families:
                us += [self.A if fam.A0 is None else fam.A0 + self.A, fam.Q]
                vs += [fam.P, self.B]
            U, V = torch.cat(us, 1), torch.cat(vs, 1)
            self._factors = (U, torch.eye(U.shape[1], dtype=U.dtype, device=U.device), V)
        return self._factors

    U = property(lambda self: self._materialize()[0])
    S = property(lambda self: self._materialize()[1])
    V = property(lambda self: self._materialize()[2])

    @property
    def shape(self):
        return (self.A.shape[0], self.B.shape[0])

    @property
    def dtype(self):
        return self.A.dtype

    @property
    def device(self):
        return self.A.device

    def _gather(self, rows, cols):
        return _DeltaLowRankGather.apply(self, rows, cols, self.A, self.B)


class _DeltaLowRankGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, obj: DeltaLowRank, rows, cols, A, B):
        ctx.obj, ctx.rows, ctx.cols = obj, rows, cols
        val = obj.base._gather(rows, cols) if obj.base is not None else A.new_zeros(rows.shape[0])
        for fam in obj.families:
            if fam.A0 is not None:
                val = val + (fam.A0[rows] * fam.P[cols]).sum(-1)
            if not obj.zero:
                val = val + (A[rows] * fam.P[cols]).sum(-1) + (fam.Q[rows] * B[cols]).sum(-1)
        return val

    @staticmethod
    def backward(ctx, g):
        # Written with differentiable ops in g, so double backward (HVP) works.
        obj, rows, cols = ctx.obj, ctx.rows, ctx.cols
        gA = gB = None
        for fam in obj.families:
            tA = torch.zeros_like(obj.A).index_add(0, rows, g[:, None] * fam.P[cols])
            tB = torch.zeros_like(obj.B).index_add(0, cols, g[:, None] * fam.Q[rows])
            gA = tA if gA is None else gA + tA
            gB = tB if gB is None else gB + tB
        return None, None, None, gA, gB


# ================================================================================= tensor trains


@dataclass(frozen=True)
class TTFamily:
    """Terms ``Σ_k ℓ_{<k} E_k (O_k + δ_k) F_kᵀ ρ_{>k}`` (positions k = 0..d−1).

    left[k]:  left-chain core at position k (k = 0..d−2), shape (a_{k-1}, n_k, a_k), a_{-1} = 1.
    right[k]: right-chain core at position k (k = 1..d−1; right[0] is unused), (b_{k-1}, n_k, b_k),
              b_{d-1} = 1.
    E[k]: (a_{k-1}, r_{k-1}) or None for the identity; F[k]: (b_k, r_k) or None.
    offsets[k]: constant (r_{k-1}, n_k, r_k) core or None.
    """

    left: tuple
    right: tuple
    E: tuple
    F: tuple
    offsets: tuple


def _apply_EF(E, core, F):
    if E is not None:
        core = torch.tensordot(E, core, dims=1)
    if F is not None:
        core = torch.tensordot(core, F, dims=([2], [1]))
    return core


def _family_cores(fam: TTFamily, deltas) -> list[torch.Tensor]:
    """Materialize one family as TT cores with blocks [[left_k, E_k Δ_k F_kᵀ], [0, right_k]]."""
    d = len(deltas)
    cores = []
    for k in range(d):
        D = deltas[k] if fam.offsets[k] is None else fam.offsets[k] + deltas[k]
        mid = _apply_EF(fam.E[k], D, fam.F[k])  # (a_{k-1}, n, b_k)
        if d == 1:
            cores.append(mid)
            continue
        if k == 0:
            cores.append(torch.cat([fam.left[0], mid], 2))
        elif k == d - 1:
            cores.append(torch.cat([mid, fam.right[k]], 0))
        else:
            L, R = fam.left[k], fam.right[k]
            top = torch.cat([L, mid], 2)
            bottom = torch.cat([R.new_zeros(R.shape[0], R.shape[1], L.shape[2]), R], 2)
            cores.append(torch.cat([top, bottom], 0))
    return cores


class DeltaTT(TensorTrain):
    """``base + Σ_families Σ_k ℓ_{<k} E_k (O_k + δ_k) F_kᵀ ρ_{>k}``; see the module docstring."""

    __slots__ = ("deltas", "families", "base", "zero", "_cores")

    def __init__(self, deltas, families, base: TensorTrain | None = None, zero: bool = True):
        self.deltas, self.families, self.base, self.zero = list(deltas), tuple(families), base, zero
        self._cores = None
        self._cache = {}

    @property
    def cores(self):
        if self._cores is None:
            tt = None if self.base is None else TensorTrain._trusted(self.base.cores)
            for fam in self.families:
                part = TensorTrain._trusted(_family_cores(fam, self.deltas))
                tt = part if tt is None else tt + part
            self._cores = tt.cores
        return self._cores

    @property
    def shape(self):
        return tuple(c.shape[1] for c in self.deltas)

    @property
    def ndim(self):
        return len(self.deltas)

    @property
    def dtype(self):
        return self.deltas[0].dtype

    @property
    def device(self):
        return self.deltas[0].device

    def materialize(self) -> TensorTrain:
        """A plain TensorTrain with the same value (ranks: sum over the parts)."""
        return TensorTrain._trusted(self.cores)

    def _gather(self, index):
        return _DeltaTTGather.apply(self, index, *self.deltas)


def _left_interfaces(fam: TTFamily, plan: IndexPlan, d: int, dtype, upto: int | None = None):
    """ℓ_k E_k for k = 0..upto (default d−1), each (N, r_{k-1}) in arrangement k."""
    v = torch.ones(plan.N, 1, dtype=dtype, device=plan.order[0].device)
    out = []
    for k in range(d if upto is None else upto + 1):
        if k > 0:
            v = plan.to_next(plan.times_core(v, fam.left[k - 1], k - 1), k - 1)
        out.append(v if fam.E[k] is None else v @ fam.E[k])
    return out


def _right_interfaces(fam: TTFamily, plan: IndexPlan, d: int, dtype):
    """ρ_k F_k for k = 0..d−1, each (N, r_k) in arrangement k."""
    v = torch.ones(plan.N, 1, dtype=dtype, device=plan.order[0].device)
    out = [None] * d
    for k in range(d - 1, -1, -1):
        if k < d - 1:
            v = plan.to_prev(plan.core_times(fam.right[k + 1], v, k + 1), k + 1)
        out[k] = v if fam.F[k] is None else v @ fam.F[k]
    return out


class _DeltaTTGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, obj: DeltaTT, index, *deltas):
        d = len(deltas)
        plan = IndexPlan(index, obj.shape)
        ctx.obj, ctx.plan, ctx.cache = obj, plan, {}
        val = obj.base._gather(index) if obj.base is not None else deltas[0].new_zeros(index.shape[0])
        for f, fam in enumerate(obj.families):
            ks = [k for k in range(d) if fam.offsets[k] is not None or not obj.zero]
            if not ks:
                continue
            right = _DeltaTTGather._side(ctx, f, "right")
            if ks == [0]:  # the gradient at δ = 0: only the offset at k = 0 (the point) contributes
                left = _left_interfaces(fam, plan, d, deltas[0].dtype, upto=0)
            else:
                left = _DeltaTTGather._side(ctx, f, "left")
            for k in ks:
                off = fam.offsets[k]
                D = deltas[k] if off is None else (off if obj.zero else off + deltas[k])
                val = val + plan.to_natural((plan.times_core(left[k], D, k) * right[k]).sum(-1), k)
        return val

    @staticmethod
    def _side(ctx, f, side):
        key = (f, side)
        if key not in ctx.cache:
            fam, obj = ctx.obj.families[f], ctx.obj
            fn = _left_interfaces if side == "left" else _right_interfaces
            ctx.cache[key] = fn(fam, ctx.plan, obj.ndim, obj.dtype)
        return ctx.cache[key]

    @staticmethod
    def backward(ctx, g):
        # Differentiable in g (no once_differentiable), so double backward gives the HVP.
        obj, plan = ctx.obj, ctx.plan
        grads = [None] * obj.ndim
        for f in range(len(obj.families)):
            left = _DeltaTTGather._side(ctx, f, "left")
            right = _DeltaTTGather._side(ctx, f, "right")
            for k, delta in enumerate(obj.deltas):
                gk = plan.outer_sum(left[k], plan.from_natural(g, k)[:, None] * right[k], k, delta.shape[1])
                grads[k] = gk if grads[k] is None else grads[k] + gk
        return (None, None, *grads)
