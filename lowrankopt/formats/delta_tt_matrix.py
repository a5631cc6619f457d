"""TT-matrices linear in δ-coordinates: a :class:`~lowrankopt.formats.delta_tt.DeltaTT` of the merged modes
``(m_k n_k)`` read as an operator, on which autodiff evaluates a user's function of a TT-matrix.

Every operation of :class:`~lowrankopt.formats.tt.TTMatrix` works on it: ``gather`` on the merged δ-object's native
gather (index plans, no materialization), ``inner``/``norm``/``+``/``-``/``*`` through the merged tensor train, and
``matvec``/``@`` on its materialized block cores — except ``matvec`` on the linearization ``x + T_x(δ)`` itself (what
the Riemannian gradient and a layer's training step differentiate), which runs the rank-r δ-product node of
:mod:`~lowrankopt.formats.tt_product`: three sweeps at the point's ranks instead of three on the rank-2r block cores.
Internal to autodiff and the manifold of TT-matrices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from .delta_tt import DeltaTT
from .tt import TTMatrix
from .tt_product import tt_delta_product


class DeltaTTMatrix(TTMatrix):
    """The TT-matrix of modes ``row_shape × col_shape`` whose merged tensor train is the δ-object ``delta``.

    ``product``: ``(right, left)``, the point's right-orthogonal cores ``C_1, V_2, …, V_d`` and left-orthogonal cores
    ``U_1, …, U_{d-1}, C_d`` as operator cores (detached), given when ``delta`` is the plain linearization
    ``x + Σ_k U_{<k} δ_k V_{>k}`` at δ = 0: then :meth:`matvec` runs the δ-product node.
    """

    __slots__ = ("delta", "_modes", "product")

    def __init__(
        self,
        delta: DeltaTT,
        row_shape: Sequence[int],
        col_shape: Sequence[int],
        product: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None,
    ) -> None:
        self.delta, self._modes, self.product = delta, (tuple(row_shape), tuple(col_shape)), product
        self._cache = {"merged": delta}

    @property
    def cores(self) -> list[torch.Tensor]:
        """The materialized block cores as operator cores (autograd through their construction)."""
        return [c.reshape(c.shape[0], m, n, c.shape[2]) for c, m, n in zip(self.delta.cores, *self._modes)]

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self._modes[0]

    @property
    def col_shape(self) -> tuple[int, ...]:
        return self._modes[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.delta.dtype

    @property
    def device(self) -> torch.device:
        return self.delta.device

    def materialize(self) -> TTMatrix:
        """A plain TTMatrix with the same value (ranks: the sum over the parts)."""
        return TTMatrix.from_merged(self.delta.materialize(), *self._modes)

    def matvec(self, X: torch.Tensor, order: str | None = None) -> torch.Tensor:
        """As :meth:`TTMatrix.matvec`. On the plain linearization (``product`` given) and without ``order``: the
        δ-product node, ``3 B Σ_k …`` multiply-adds at the point's ranks r forward and backward
        (:func:`~lowrankopt.formats.tt_product.tt_delta_product`); otherwise the sweeps of the materialized block
        cores (ranks up to a few times r)."""
        if self.product is None or order is not None:
            return super().matvec(X, order)
        self._check_batch(X)
        (fam,) = self.delta.families
        shapes = [tuple(t.shape) for t in fam.deltas]

        def straight(q: torch.Tensor) -> TTMatrix:  # the block cores with δ = q: a backward pass under create_graph
            parts, pos = [], 0
            for s in shapes:
                parts.append(q[pos : pos + math.prod(s)].reshape(s))
                pos += math.prod(s)
            obj = DeltaTT(self.delta.shape, [dataclasses.replace(fam, deltas=tuple(parts))])
            return TTMatrix.from_merged(obj.materialize(), *self._modes)

        p = _flat_source(fam.deltas)
        if p is None:
            p = torch.cat([t.reshape(-1) for t in fam.deltas])
        right, left = self.product
        return tt_delta_product(X, p, right, left, straight)


def _flat_source(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The flat tensor whose consecutive slices ``parts`` are, in order and covering it (as the geoopt bridge's
    ``split(p − p.detach())`` makes them), else None: the node then takes it as it is, instead of concatenating the
    parts (one copy and one autograd node fewer each way)."""
    base, pos = parts[0]._base, 0
    if base is None or base.dim() != 1 or not base.is_contiguous():
        return None
    for t in parts:
        if t._base is not base or not t.is_contiguous() or t.storage_offset() - base.storage_offset() != pos:
            return None
        pos += t.numel()
    return base if pos == base.numel() else None
