"""Riemannion (Bogachev et al., RiemannLoRA, arXiv 2507.12142): Muon-like orthogonalized heavy-ball momentum on the
manifold of fixed-rank matrices."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .adam import adam_update, check_betas_eps
from .base import FIXED_RANK, PLAIN, Item, RiemannianOptimizer, Update
from .geometry import FixedRankStack

__all__ = ["Riemannion"]


class Riemannion(RiemannianOptimizer):
    """Riemannion: heavy-ball momentum on the fixed-rank manifold, its singular values set to 1 (``Ortho_r``), and a
    retraction — Muon on the manifold.

    With ``g_t`` the Riemannian gradient (packed δ-coordinates after the gauge projection), ``T`` the vector transport
    (projection onto the new tangent space), ``P_T`` the projection onto the current one and ``R`` the metric
    projection retraction (rank-r truncated SVD)::

        M_t = β T(M_{t−1}) + g_t                         (no dampening; M_1 = g_1)
        D_t = P_T(Ortho_r(M_t))         or, with nesterov,   P_T(Ortho_r(g_t + β M_t))
        x_{t+1} = R((1 − lr·wd) x_t − lr D_t)

    ``Ortho_r(ξ)`` maps the nonzero singular values of the tangent matrix ``ξ = A Vᵀ + U Bᵀ = [A, U][V, B]ᵀ`` (rank
    ≤ 2r) to 1: thin QRs of both ``(·, 2r)`` factors and an exact SVD of the ``2r × 2r`` core (not Newton–Schulz).
    Singular values ``≤ ortho_rtol · σ_max`` are dropped rather than inflated: a gradient of rank < 2r (a batch
    smaller than 2r, or the first steps) is not padded with noise directions. The default
    ``ortho_rtol = max(m, n) · eps(dtype)`` is ``torch.linalg.matrix_rank``'s tolerance for ξ (measured rounding
    noise of the core: about 2 eps · σ_max). ``P_T`` is needed because ``Ortho_r(ξ)`` is not tangent in general.
    ``lr`` is the step in spectral norm (no RMS rescaling, as in the paper; its Llama-3-8B setting: lr = 1e-4,
    β = 0.9, weight decay 0.00316, linear schedule with warmup).

    **Momentum storage**: the optimizer stores the raw heavy-ball momentum ``M_t`` (the paper's equations 10–12,
    Muon's convention). The paper's pseudocode (Alg. 4/5, line "A_HB, B_HB := ...") can be read as storing the
    orthogonalized ``D_t`` instead; the equations are followed here.

    **Plain parameters** (biases, heads, norms): AdamW with ``adam_betas``, ``adam_eps`` and the group's ``lr`` and
    ``weight_decay``, as Muon implementations do for non-matrix parameters (Muon's ``MuonWithAuxAdam``; torch's
    ``Muon`` refuses them). An orthogonalized step of size lr in spectral norm and an Adam step of size lr per entry
    differ in scale: give plain parameters their own param group with an Adam-sized ``lr``.

    Only fixed-rank parameters (``LowRankLinear``, :class:`~lowrankopt.manifolds.geoopt.GeooptFixedRank`) and plain
    ones: a parameter on another manifold (TT, Stiefel) raises ``TypeError`` naming it. Parameters of one group and
    one ``(m, n, r, dtype, device)`` are stepped together (one batched QR/SVD per kernel).

    Args:
        params: parameters or param groups.
        lr: the step size in spectral norm (required).
        momentum: ``β`` (default 0.9; 0: no momentum).
        nesterov: the direction from ``g_t + β M_t`` (default False).
        weight_decay: decoupled, on the manifold: the matrix is scaled by ``1 − lr·wd`` (default 0).
        ortho_rtol: the relative threshold of ``Ortho_r`` (default ``None``: ``max(m, n) · eps``).
        adam_betas: betas of the AdamW steps of plain parameters (default ``(0.9, 0.999)``).
        adam_eps: eps of those steps (default 1e-8).

    Cost per step of an ``(m, n, r)`` parameter: ``O((m + n) r² + r³)`` — QRs of four ``(·, 2r)`` factors (Ortho
    and retraction), two ``2r × 2r`` SVDs, the frames and two projections (Ortho's re-projection, the transport).
    State: ``momentum_buffer``, a packed tangent vector (``(m + n) r`` entries).
    """

    kinds = (FIXED_RANK, PLAIN)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        *,
        ortho_rtol: float | None = None,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ortho_rtol=ortho_rtol,
            adam_betas=tuple(adam_betas),
            adam_eps=adam_eps,
        )
        super().__init__(params, defaults)

    def _check_group(self, i: int, group: dict) -> None:
        super()._check_group(i, group)
        if not 0 <= float(group["momentum"]) < 1:
            raise ValueError(f"Riemannion: param group {i} has momentum={group['momentum']!r}; need 0 <= β < 1")
        if group["nesterov"] and float(group["momentum"]) == 0:
            raise ValueError(f"Riemannion: param group {i}: nesterov needs momentum > 0")
        rtol = group["ortho_rtol"]
        if rtol is not None and not 0 <= float(rtol) < 1:
            raise ValueError(f"Riemannion: param group {i} has ortho_rtol={rtol!r}; need None or 0 <= rtol < 1")
        check_betas_eps("Riemannion", i, group["adam_betas"], group["adam_eps"], "adam_betas", "adam_eps")

    def _update(self, items: list[Item], g: torch.Tensor, states: list[dict], geo: Any) -> Update:
        group = items[0].group
        if not isinstance(geo, FixedRankStack):  # a plain parameter
            return adam_update(self, g, states, tuple(group["adam_betas"]), float(group["adam_eps"]), False, geo)
        beta = float(group["momentum"])
        rtol = group["ortho_rtol"]
        if rtol is None:
            rtol = max(geo.base.m, geo.base.n) * torch.finfo(g.dtype).eps
        if beta == 0:
            return geo.ortho(g, float(rtol)), {}, {}, []
        M = beta * self.stacked(states, "momentum_buffer", g) + g
        d = geo.ortho(g + beta * M if group["nesterov"] else M, float(rtol))
        return d, {"momentum_buffer": M}, {}, []
