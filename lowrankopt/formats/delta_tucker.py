"""Tucker tensors linear in δ-coordinates, on which autodiff evaluates a user's function of a Tucker tensor.

``Y = Σ_t G_t ×_1 U_{t,1} ⋯ ×_d U_{t,d}``: a sum of rank-r Tucker terms sharing most factors (the point's frames),
in which the δ-coordinates appear linearly, each in one core or one factor. The gradient object at
``x = G ×_k U_k`` is ``(G + Ġ) ×_k U_k + Σ_k Q̃_k ×_k δ_k ×_{j≠k} U_j`` (d + 1 terms, see
:class:`~lowrankopt.manifolds.FixedTuckerRank`). ``gather``, ``full`` and ``inner`` run term by term (``(d + 1)``
times the cost on a rank-r Tucker tensor, against ``2^d`` on the materialized rank-2r one); every other operation sees
the materialized block form (:func:`~lowrankopt.formats.tucker.block_tucker`, autograd through its construction).
Internal to autodiff.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .tucker import Tucker, block_tucker, tucker_entries

Term = tuple[torch.Tensor, tuple[torch.Tensor, ...]]


class DeltaTucker(Tucker):
    """The sum of the Tucker ``terms`` ``(core, factors)``, all of one shape."""

    __slots__ = ("terms", "_block")

    def __init__(self, terms: Sequence[Term]) -> None:
        self.terms = tuple((G, tuple(F)) for G, F in terms)
        self._block = None
        self._cache = {}

    def _materialized(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self._block is None:
            self._block = block_tucker(self.terms)
        return self._block

    @property
    def core(self) -> torch.Tensor:
        return self._materialized()[0]

    @property
    def factors(self) -> list[torch.Tensor]:
        return self._materialized()[1]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(U.shape[0] for U in self.terms[0][1])

    @property
    def ndim(self) -> int:
        return len(self.terms[0][1])

    @property
    def dtype(self) -> torch.dtype:
        return self.terms[0][0].dtype

    @property
    def device(self) -> torch.device:
        return self.terms[0][0].device

    def materialize(self) -> Tucker:
        """A plain Tucker tensor with the same value (the block form; ranks: the distinct factors' widths)."""
        return Tucker._trusted(*self._materialized())

    def _parts(self) -> list[Tucker]:
        return [Tucker._trusted(G, F) for G, F in self.terms]

    def full(self) -> torch.Tensor:
        """The dense tensor, term by term. Cost ``O(T n^d r)`` for T terms."""
        return sum(t.full() for t in self._parts())

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        """Term by term, each distinct factor's rows gathered once (most terms share the point's frames)."""
        rows: dict[tuple[int, int], torch.Tensor] = {}

        def row(U: torch.Tensor, k: int) -> torch.Tensor:
            if (id(U), k) not in rows:
                rows[id(U), k] = U[index[:, k]]
            return rows[id(U), k]

        return sum(tucker_entries(G, F, index, row) for G, F in self.terms)

    def inner(self, other: Tucker | torch.Tensor) -> torch.Tensor:
        """``<Y, other>``, term by term (T times the cost of one rank-r term's inner product)."""
        if isinstance(other, DeltaTucker):
            other = other.materialize()
        return sum(t.inner(other) for t in self._parts())
