"""Low-rank matrices polynomial in one scalar t, on which autodiff takes second derivatives along a curve.

``C(t) = Σ_k t^{p_k} L_k R_kᵀ`` with detached factors ``L_k: (m, r_k)``, ``R_k: (n, r_k)`` and a 0-dim ``t`` on the
autograd tape. Generic ops see the factors given at construction (built from t with autograd by the caller), so
every op differentiates in t exactly. ``gather`` has a native implementation: the entries are
``Σ_k t^{p_k} y_k`` with ``y_k = rowwise ⟨L_k[rows], R_k[cols]⟩`` computed off the tape, so the tape of a gather loss
holds only ``(N,)`` vectors and the double backward pass in t costs ``O(N)`` instead of ``(N, r)`` products and
scatters. Internal to autodiff (:func:`~lowrankopt.autodiff.riemannian_hessian_form`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .lowrank import LowRankMatrix, rowdot


class CurveLowRank(LowRankMatrix):
    """``U S Vᵀ`` (the generic factors, functions of t) equal to ``Σ_k t^{p_k} L_k R_kᵀ`` (``terms``: triples
    ``(p_k, L_k, R_k)``), whose ``gather`` uses the terms."""

    __slots__ = ("_terms", "_t")

    @classmethod
    def of(
        cls,
        U: torch.Tensor,
        S: torch.Tensor,
        V: torch.Tensor,
        t: torch.Tensor,
        terms: Sequence[tuple[int, torch.Tensor, torch.Tensor]],
    ) -> CurveLowRank:
        obj = cls._trusted(U, S, V)
        obj._t, obj._terms = t, tuple(terms)
        return obj

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        rows, cols = index[:, 0], index[:, 1]
        picked: dict[int, torch.Tensor] = {}  # each factor's rows once (a factor may appear in several terms)

        def pick(M: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            if id(M) not in picked:
                # row-major first: frames from QR are column-major, whose row gathers are strided (~10x slower)
                picked[id(M)] = M.detach().contiguous().index_select(0, idx)
            return picked[id(M)]

        coeffs: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for p, L, R in self._terms:
                y = rowdot(pick(L, rows), pick(R, cols))
                coeffs[p] = y if p not in coeffs else coeffs[p] + y
        # Horner in t: only (N,) vectors and the scalar t on the tape
        out = None
        for p in range(max(coeffs), -1, -1):
            c = coeffs.get(p)
            if out is None:
                out = c
            elif c is None:
                out = out * self._t
            else:
                out = out * self._t + c
        return out
