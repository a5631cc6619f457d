"""Riemannian Adam (AdamW-style decoupled weight decay, optional AMSGrad), per-coordinate in the δ-coordinates."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .base import Item, RiemannianOptimizer, Update

__all__ = ["RiemannianAdam", "adam_update"]


def adam_update(
    opt: RiemannianOptimizer,
    g: torch.Tensor,
    states: list[dict],
    betas: tuple[float, float],
    eps: float,
    amsgrad: bool,
    geo: Any,
) -> Update:
    """The Adam direction on a stack (shared with :class:`~lowrankopt.optim.stochastic.riemannion.Riemannion`'s plain
    parameters): ``m ← β₁ T(m) + (1 − β₁) g``, ``v ← β₂ v + (1 − β₂) g ⊙ g`` (``v̂ = max(v̂, v)`` with AMSGrad),
    ``d = gauge((m / (1 − β₁ᵗ)) / (√(v̂ / (1 − β₂ᵗ)) + ε))``. ``m`` is transported, ``v`` kept as it is."""
    b1, b2 = betas
    steps = [int(s.get("step", 0)) + 1 for s in states]
    m = b1 * opt.stacked(states, "exp_avg", g) + (1 - b1) * g
    v = b2 * opt.stacked(states, "exp_avg_sq", g) + (1 - b2) * g * g
    kept = {"exp_avg_sq": v}
    if amsgrad:
        v = kept["max_exp_avg_sq"] = torch.maximum(opt.stacked(states, "max_exp_avg_sq", g), v)
    bc1 = opt.per_item([1 - b1**t for t in steps], g)
    sqrt_bc2 = opt.per_item([math.sqrt(1 - b2**t) for t in steps], g)
    d = geo.gauge((m / bc1) / (v.sqrt() / sqrt_bc2 + eps))  # elementwise scaling leaves the gauge: project back
    return d, {"exp_avg": m}, kept, [{"step": t} for t in steps]


class RiemannianAdam(RiemannianOptimizer):
    """Adam on manifolds, with per-coordinate second moments in the packed δ-coordinates (like
    ``geoopt.optim.RiemannianAdam``; Bécigneul & Ganea, 2019).

    With ``g_t`` the Riemannian gradient (packed δ-coordinates after the gauge projection), ``T`` the vector transport
    (projection) and ``R`` the retraction::

        m_t = β₁ T(m_{t−1}) + (1 − β₁) g_t                  (transported: a tangent vector)
        v_t = β₂ v_{t−1} + (1 − β₂) g_t ⊙ g_t                (kept as it is: per coordinate)
        d_t = P((m_t / (1 − β₁ᵗ)) / (√(v̂_t / (1 − β₂ᵗ)) + ε))  (v̂ = v, or max(v̂_{t−1}, v_t) with AMSGrad)
        x_{t+1} = R((1 − lr·wd) x_t − lr d_t)

    ``P`` is the gauge projection (the elementwise division takes ``d`` out of the tangent coordinates).
    **Invariance caveat**: the coordinates are orthonormal, but ``v`` is elementwise in them, so the method depends
    on the choice of frames (a rotation ``C → C Q``, ``V → V Q`` of the factorization changes it, unlike SGD or
    Riemannion). The retraction returns the factorization whose ``V`` is closest to the previous one (polar
    alignment), so that consecutive coordinates stay comparable and ``v`` keeps its meaning; as in geoopt, ``v`` is
    not transported. Plain parameters: exactly AdamW (decoupled decay ``p ← (1 − lr·wd) p``).

    Args:
        params: parameters or param groups.
        lr: the learning rate (default 1e-3).
        betas: ``(β₁, β₂)`` (default ``(0.9, 0.999)``).
        eps: added to the denominator (default 1e-8).
        weight_decay: decoupled, on the manifold (default 0).
        amsgrad: keep the running maximum of ``v`` (default False).

    Cost per step of a fixed-rank ``(m, n, r)`` parameter: ``O((m + n) r² + r³)``, as :class:`RiemannianSGD`. State:
    ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq``), ``(m + n) r`` entries each, and ``step``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        super().__init__(params, defaults)

    def _check_group(self, i: int, group: dict) -> None:
        super()._check_group(i, group)
        check_betas_eps(type(self).__name__, i, group["betas"], group["eps"], "betas", "eps")

    def _update(self, items: list[Item], g: torch.Tensor, states: list[dict], geo: Any) -> Update:
        group = items[0].group
        return adam_update(self, g, states, tuple(group["betas"]), float(group["eps"]), bool(group["amsgrad"]), geo)


def check_betas_eps(who: str, i: int, betas: Any, eps: Any, betas_name: str, eps_name: str) -> None:
    """``ValueError`` unless ``betas`` is two floats in ``[0, 1)`` and ``eps >= 0``."""
    ok = isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0 <= float(b) < 1 for b in betas)
    if not ok:
        raise ValueError(f"{who}: param group {i} has {betas_name}={betas!r}; need two floats in [0, 1)")
    if not float(eps) >= 0:
        raise ValueError(f"{who}: param group {i} has {eps_name}={eps!r}; need >= 0")
