"""Riemannian SGD with momentum (heavy ball or Nesterov) and decoupled weight decay."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .base import Item, RiemannianOptimizer, Update

__all__ = ["RiemannianSGD"]


class RiemannianSGD(RiemannianOptimizer):
    """Stochastic gradient descent on manifolds, with momentum transported by projection.

    With ``g_t`` the Riemannian gradient (packed δ-coordinates after the gauge projection), ``μ`` the momentum,
    ``τ`` the dampening, ``T`` the vector transport (projection onto the new tangent space) and ``R`` the retraction
    (metric projection for fixed-rank matrices, TT-rounding for tensor trains)::

        b_t = μ T(b_{t−1}) + (1 − τ) g_t      (b_1 = g_1, as torch.optim.SGD)
        d_t = g_t + μ b_t  (Nesterov)   or   b_t  (μ > 0)   or   g_t  (μ = 0)
        x_{t+1} = R((1 − lr·wd) x_t − lr d_t)

    Plain parameters take the same rule with ``T`` and ``R`` the identity; their weight decay is decoupled too
    (``p ← (1 − lr·wd) p − lr d``, unlike ``torch.optim.SGD``'s L2 term). See :class:`RiemannianOptimizer` for the
    parameter kinds, batching and non-finite checks.

    Args:
        params: parameters or param groups (as for ``torch.optim.SGD``).
        lr: the learning rate (required).
        momentum: ``μ >= 0`` (default 0: no state).
        dampening: ``τ`` (default 0).
        nesterov: Nesterov momentum (needs ``μ > 0`` and ``τ = 0``).
        weight_decay: decoupled, on the manifold (default 0).

    Cost per step of a fixed-rank ``(m, n, r)`` parameter: ``O((m + n) r² + r³)`` (two QRs of ``(·, 2r)`` factors and
    a ``2r × 2r`` SVD for the retraction, ``O((m + n) r²)`` for the frames and the transport); tensor trains
    ``O(d n r³)``. State: the momentum buffer, a packed tangent vector (``(m + n) r`` entries).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def _check_group(self, i: int, group: dict) -> None:
        super()._check_group(i, group)
        if float(group["momentum"]) < 0:
            raise ValueError(f"RiemannianSGD: param group {i} has momentum={group['momentum']!r}; need >= 0")
        if group["nesterov"] and (float(group["momentum"]) <= 0 or float(group["dampening"]) != 0):
            raise ValueError(f"RiemannianSGD: param group {i}: nesterov needs momentum > 0 and dampening = 0")

    def _update(self, items: list[Item], g: torch.Tensor, states: list[dict], geo: Any) -> Update:
        group = items[0].group
        mu, tau = float(group["momentum"]), float(group["dampening"])
        if mu == 0:
            return g, {}, {}, []
        fresh = self.per_item([1.0 if "momentum_buffer" not in s else 1.0 - tau for s in states], g)
        buf = mu * self.stacked(states, "momentum_buffer", g) + fresh * g
        d = g + mu * buf if group["nesterov"] else buf
        return d, {"momentum_buffer": buf}, {}, []
