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
        with torch.no_grad():
            coeffs = _coefficients(self._terms, rows, cols)
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


def _coefficients(
    terms: Sequence[tuple[int, torch.Tensor, torch.Tensor]], rows: torch.Tensor, cols: torch.Tensor
) -> dict[int, torch.Tensor]:
    """``{p: Σ_{p_k = p} rowwise ⟨L_k[rows], R_k[cols]⟩}``. Factors of one width r: each distinct factor's rows
    gathered once (from the factors side by side, row-major: QR's column-major frames have strided rows, ~10x slower
    to gather) and all products from one batched ``(N, k_L, r) @ (N, r, k_R)`` Gram product; else term by term."""
    Ls, Rs = _distinct(L for _, L, _ in terms), _distinct(R for _, _, R in terms)
    widths = {M.shape[1] for M in (*Ls.values(), *Rs.values())}
    coeffs: dict[int, torch.Tensor] = {}
    if len(widths) == 1:
        (r,) = widths
        N = rows.shape[0]
        Lr = torch.cat([M.detach() for M in Ls.values()], 1).index_select(0, rows).view(N, len(Ls), r)
        Rc = torch.cat([M.detach() for M in Rs.values()], 1).index_select(0, cols).view(N, len(Rs), r)
        gram = torch.bmm(Lr, Rc.transpose(1, 2))
        iL, iR = {k: i for i, k in enumerate(Ls)}, {k: i for i, k in enumerate(Rs)}
        for p, L, R in terms:
            y = gram[:, iL[id(L)], iR[id(R)]]
            coeffs[p] = y if p not in coeffs else coeffs[p] + y
        return coeffs
    for p, L, R in terms:
        y = rowdot(L.detach().contiguous().index_select(0, rows), R.detach().contiguous().index_select(0, cols))
        coeffs[p] = y if p not in coeffs else coeffs[p] + y
    return coeffs


def _distinct(factors) -> dict[int, torch.Tensor]:
    """The factors by identity, each once, in order."""
    out: dict[int, torch.Tensor] = {}
    for M in factors:
        out.setdefault(id(M), M)
    return out
