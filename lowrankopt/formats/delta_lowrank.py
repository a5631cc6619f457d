"""Low-rank matrices linear in δ-coordinates, on which autodiff evaluates a user's function.

``Y = Σ_families (A0 + A) Pᵀ + Q Bᵀ`` with detached frames ``P: (n, r)``, ``Q: (m, r)``, an
optional constant offset ``A0: (m, r)`` and the δ-coordinates ``(A, B)`` of the family (a family
without δ is a constant term ``A0 Pᵀ``). The gradient family at ``x = U S Vᵀ`` is
``(US + A) Vᵀ + U Bᵀ``.

The class subclasses :class:`LowRankMatrix`: generic ops see concatenated factors (built with
autograd), and ``gather`` has a native implementation: its forward pass at δ = 0 gathers only the
offset term, its backward pass one sampled product ``G P`` / ``Gᵀ Q`` per factor (a CSR product with a plan kept
per index tensor, :mod:`~lowrankopt.formats.sampled_product`; a scatter on other devices). Internal to autodiff.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .lowrank import LowRankMatrix, rowdot
from .sampled_product import plan_for, sampled_product, supported
from .shared_work import memo, memoized_function, unique_deltas


@dataclass(frozen=True, eq=False)
class MatrixFamily:
    """``(A0 + A) Pᵀ + Q Bᵀ`` with δ = ``deltas = (A, B)``, or the constant ``A0 Pᵀ`` if deltas is None."""

    P: torch.Tensor
    Q: torch.Tensor | None
    A0: torch.Tensor | None = None
    deltas: tuple | None = None


class DeltaLowRank(LowRankMatrix):
    """A sum of :class:`MatrixFamily` terms; ``zero`` says that the δ tensors are zero."""

    __slots__ = ("families", "zero", "_shape", "_factors")

    def __init__(self, shape: tuple[int, int], families: Iterable[MatrixFamily], zero: bool = True) -> None:
        self._shape, self.families, self.zero = tuple(shape), tuple(families), zero
        self._factors = None
        self._cache = {}

    def _materialize(self):
        if self._factors is None:
            us, vs = [], []
            for fam in self.families:
                if fam.deltas is None:
                    us.append(fam.A0)
                    vs.append(fam.P)
                    continue
                A, B = fam.deltas
                us += [A if fam.A0 is None else fam.A0 + A, fam.Q]
                vs += [fam.P, B]
            U, V = torch.cat(us, 1), torch.cat(vs, 1)
            self._factors = (U, torch.eye(U.shape[1], dtype=U.dtype, device=U.device), V)
        return self._factors

    @property
    def U(self) -> torch.Tensor:
        return self._materialize()[0]

    @property
    def S(self) -> torch.Tensor:
        return self._materialize()[1]

    @property
    def V(self) -> torch.Tensor:
        return self._materialize()[2]

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self.families[0].P.dtype

    @property
    def device(self) -> torch.device:
        return self.families[0].P.device

    def _deltas(self) -> list[torch.Tensor]:
        return unique_deltas(self.families)

    def _gather(self, index):
        return _DeltaLowRankGather.apply(self, index, *self._deltas())


def _split(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The row and column indices of an ``(N, 2)`` index, memoized by its identity (so that the passes of one HVP
    that gather at one index share the row gathers below)."""
    return memo("split", (index,), lambda: (index[:, 0], index[:, 1]), extra=(index._version,))


def _rows(M: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # Row-major first: frames come from QR in column-major order, whose row gathers are ~10x slower (strided reads).
    return memo("rows", (M, idx), lambda: M.contiguous().index_select(0, idx))


@memoized_function
class _DeltaLowRankGather(torch.autograd.Function):
    @staticmethod
    def _forward(ctx, obj: DeltaLowRank, index, *deltas):
        rows, cols = _split(index)
        ctx.obj, ctx.rows, ctx.cols, ctx.index = obj, rows, cols, index
        val = obj.families[0].P.new_zeros(rows.shape[0])
        for fam in obj.families:
            if fam.A0 is not None:
                val = val + memo(
                    "offset",
                    (fam.A0, fam.P, rows, cols),
                    lambda fam=fam: rowdot(_rows(fam.A0, rows), _rows(fam.P, cols)),
                )
            if not obj.zero and fam.deltas is not None:
                A, B = fam.deltas
                val = val + rowdot(A[rows], _rows(fam.P, cols)) + rowdot(_rows(fam.Q, rows), B[cols])
        return val

    @staticmethod
    def _backward(ctx, g):
        # Written with differentiable ops in g, so double backward (HVP) works.
        obj, rows, cols = ctx.obj, ctx.rows, ctx.cols
        csr = supported(g.device) and not g.is_inference()
        grads = {}
        for fam in obj.families:
            if fam.deltas is None:
                continue
            A, B = fam.deltas
            for axis, (t, idx, frame, other) in enumerate(((A, rows, fam.P, cols), (B, cols, fam.Q, rows))):
                if csr and not frame.requires_grad:  # G P and Gᵀ Q as CSR products (formats.sampled_product)
                    gt = sampled_product(g, frame.contiguous(), plan_for(ctx.index, axis, obj.shape))
                else:  # index_put with accumulate: deterministic on CPU and ~2x faster than index_add here
                    gt = torch.zeros_like(t).index_put((idx,), g[:, None] * _rows(frame, other), accumulate=True)
                grads[id(t)] = gt if id(t) not in grads else grads[id(t)] + gt
        return (None, None, *(grads.get(id(t)) for t in obj._deltas()))
