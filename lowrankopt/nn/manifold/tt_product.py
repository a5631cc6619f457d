r"""The TT-matrix layer's product ``y = x Wᵀ`` with its gradient in δ-coordinates, as one autograd node
(:func:`tt_delta_product`), in three sweeps at the point's TT-ranks r.

The layer's parameter is the packed point ``p = [C_1 | V_2 | … | V_d]`` of the fixed-TT-rank manifold (cores
``(r_{k-1}, o_k i_k, r_k)``, read as TT-matrix cores ``(r_{k-1}, o_k, i_k, r_k)``), and its gradient must be the
δ-gradient: for the tangent vectors ``T(δ) = Σ_k U_{<k} δ_k V_{>k}`` (``U_k`` the left-orthogonal frames, ``V_k`` the
right-orthogonal cores), ``∂L/∂δ_k = ⟨G, U_{<k} E V_{>k}⟩`` with ``G = Σ_b g_b x_bᵀ`` the Euclidean gradient in W
(``g = ∂L/∂y``). The straight-through object ``W + T(δ)`` gives it too, but its TT-ranks are 2r: each of its sweeps
costs up to 4× a rank-r sweep. Here (the ``"right"`` pattern; rows ``o_{k+1}⋯o_d · B · i_1⋯i_{k-1}``):

- forward: ``y = W x`` sweeping x from the right through ``V_d, …, V_2, C_1`` (W's right-orthogonal form); the state
  before core k is ``Q_k = x`` through ``V_{>k}``, ``(rows, i_k r_k)``, kept;
- backward: ``∂L/∂x = Wᵀ g`` sweeping g from the left through ``U_1ᵀ, …, U_{d-1}ᵀ, C_dᵀ`` (W's left-orthogonal form,
  ``C_d = R_{d-1} V_d``); the state before core k is ``P_k = g`` through ``U_{<k}ᵀ``, ``(rows, r_{k-1} o_k)``, and
  ``∂L/∂δ_k = P_kᵀ Q_k``, ``(r_{k-1} o_k, i_k r_k)``: the core's own layout.

Three sweeps of the cost of :meth:`TTMatrix.matvec`'s right-to-left order,
``B Σ_k i_1⋯i_k · o_k⋯o_d · r_{k-1} r_k`` multiply-adds each (the two sweeps, and the d contractions together); the
``"left"`` pattern mirrors it (x from the left through ``U``, g from the right through ``Vᵀ``) at three times the
left-to-right cost, and the cheaper is taken. Memory: the d forward states, ``O(B · state)``. Under ``create_graph``
the backward pass differentiates the straight-through matvec instead, so that higher derivatives stay exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ...formats.tt import TTMatrix, _sweep_left, _sweep_right

__all__ = ["tt_delta_product"]


def _transpose(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The operator cores of the transposed TT-matrix: ``(r, m, n, r') → (r, n, m, r')`` (views)."""
    return [c.transpose(1, 2) for c in cores]


class _TTDeltaProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, p, right, left, pattern, straight):  # type: ignore[override]
        ctx.save_for_backward(x2, p)
        ctx.right, ctx.left, ctx.pattern, ctx.straight = right, left, pattern, straight
        ctx.states = []
        if pattern == "right":
            return _sweep_right(right, x2, ctx.states)
        return _sweep_left(left, x2, ctx.states)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x2, p = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the straight-through matvec, differentiable to any order
            with torch.enable_grad():
                y = ctx.straight(p).matvec(x2)
                dx, dp = torch.autograd.grad(y, (x2, p), g, create_graph=True, allow_unused=True)
            return dx, dp, None, None, None, None
        g = g.contiguous()
        back: list[torch.Tensor] = []
        if ctx.pattern == "right":
            dx = _sweep_left(_transpose(ctx.left), g, back)  # P_k, k = 1 … d
            deltas = [(P.T @ Q).reshape(c.shape) for P, Q, c in zip(back, reversed(ctx.states), ctx.right)]
        else:
            dx = _sweep_right(_transpose(ctx.right), g, back)  # R_k = g through V_{>k}ᵀ, k = d … 1
            deltas = []
            for L, R, c in zip(ctx.states, reversed(back), ctx.left):
                r0, o, i, r1 = c.shape
                deltas.append((L.T @ R).reshape(r0, i, o, r1).transpose(1, 2))
        del ctx.states
        dp = torch.cat([dk.reshape(-1) for dk in deltas]) if ctx.needs_input_grad[1] else None
        return (dx if ctx.needs_input_grad[0] else None), dp, None, None, None, None


def delta_product_cost(right: Sequence[torch.Tensor], batch: int) -> dict[str, int]:
    """Multiply-adds of a forward + backward of :func:`tt_delta_product` on ``batch`` rows, per pattern: three times
    the right-to-left (``"right"``) or left-to-right (``"left"``) matvec cost of the TT-matrix (module docstring)."""
    W = TTMatrix._trusted(list(right))
    return {o: 3 * W.matvec_cost(batch, o) for o in ("left", "right")}


def tt_delta_product(
    x2: torch.Tensor,
    p: torch.Tensor,
    right: Sequence[torch.Tensor],
    left: Sequence[torch.Tensor],
    straight: Callable[[torch.Tensor], TTMatrix],
    pattern: str | None = None,
) -> torch.Tensor:
    """``x2 Wᵀ`` (``x2: (B, Π i_k)`` → ``(B, Π o_k)``) for the TT-matrix W, whose gradient flows to ``x2`` and, as the
    δ-gradient, to the packed point ``p`` (module docstring). ``right``: W's right-orthogonal form ``C_1, V_2 … V_d``
    and ``left``: its left-orthogonal form ``U_1 … U_{d-1}, C_d``, both detached operator cores
    ``(r_{k-1}, o_k, i_k, r_k)``; ``straight``: p ↦ the straight-through TT-matrix, for a backward pass under
    ``create_graph``; ``pattern``: ``"left"``, ``"right"`` or None (default: the one of least cost,
    :func:`delta_product_cost`). Cost: three rank-r sweeps."""
    if pattern is None:
        costs = delta_product_cost(right, x2.shape[0])
        pattern = min(costs, key=costs.get)
    elif pattern not in ("left", "right"):
        raise ValueError(f"pattern must be 'left', 'right' or None, got {pattern!r}")
    return _TTDeltaProduct.apply(x2, p, list(right), list(left), pattern, straight)
