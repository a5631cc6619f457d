r"""The TT-matrix layer's product ``y = x Wᵀ`` with its gradient in δ-coordinates, as one autograd node
(:func:`tt_delta_product`), in three sweeps at the point's TT-ranks r.

The layer's parameter is the packed point ``p = [C_1 | V_2 | … | V_d]`` of the fixed-TT-rank manifold (cores
``(r_{k-1}, o_k i_k, r_k)``, read as TT-matrix cores ``(r_{k-1}, o_k, i_k, r_k)``), and its gradient must be the
δ-gradient: for the tangent vectors ``T(δ) = Σ_k U_{<k} δ_k V_{>k}`` (``U_k`` the left-orthogonal frames, ``V_k`` the
right-orthogonal cores), ``∂L/∂δ_k = ⟨G, U_{<k} E V_{>k}⟩`` with ``G = Σ_b g_b x_bᵀ`` the Euclidean gradient in W
(``g = ∂L/∂y``). The straight-through object ``W + T(δ)`` gives it too, but its TT-ranks are 2r: each of its sweeps
costs up to 4× a rank-r sweep. Here (the ``"right"`` pattern):

- forward: ``y = W x`` sweeping x from the right through ``V_d, …, V_2, C_1`` (W's right-orthogonal form); the state
  before core k, ``Q_k`` = x through ``V_{>k}``, is kept;
- backward: ``∂L/∂x = Wᵀ g`` sweeping g from the left through ``U_1ᵀ, …, U_{d-1}ᵀ, C_dᵀ`` (W's left-orthogonal form,
  ``C_d = R_{d-1} V_d``); with the state before core k, ``P_k`` = g through ``U_{<k}ᵀ``, ``∂L/∂δ_k = P_k Q_kᵀ``
  summed over the modes both states still carry.

The ``"left"`` pattern mirrors it (x from the left through ``U``, g from the right through ``Vᵀ``). The sweeps keep
the batch as the **last** dimension: a state is ``(a, c, q)`` with ``c`` the mode the next core consumes and its bond,
``a`` the modes on the near side of it and ``q`` those on the far side (already produced, or still to consume) times
the batch; each step is one batched product ``(p × c) · (c × q)`` whose result is the next state as it lies (no
transposition), and q ≥ B keeps the products wide. Only the batch's own transposition (in and out) is copied.

**Cost** (multiply-adds, B rows): three times ``B Σ_k i_1⋯i_k · o_k⋯o_d · r_{k-1} r_k`` (the right pattern: the
forward sweep, the backward sweep and the d contractions each cost that) or three times
``B Σ_k o_1⋯o_k · i_k⋯i_d · r_{k-1} r_k`` (left), the cheaper taken. Memory: the d forward states, each at most
``B · Π max(i_k, o_k) · r``. Under ``create_graph`` the backward pass differentiates the straight-through matvec
instead, so that higher derivatives stay exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .tt import TTMatrix

__all__ = ["tt_delta_product"]


def _apply(A: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``A: (p, c)`` applied to each ``S[a]: (c, q)``: ``(a, p, q)``. One GEMM when a = 1; else a batched product
    with A repeated (a contiguous batch runs ~1.5x faster than a stride-0 one on CPU; A is small)."""
    if S.shape[0] == 1:
        return (A @ S[0]).unsqueeze(0)
    return torch.bmm(A.expand(S.shape[0], -1, -1).contiguous(), S)


def _sweep_from_right(cores: Sequence[torch.Tensor], S: torch.Tensor, states: list) -> torch.Tensor:
    """Operator cores ``(r, m_k, n_k, r')`` applied to ``S: (Π n, B)`` from ``k = d`` down; the state before core k,
    ``(n_1⋯n_{k-1}, n_k r_k, m_{k+1}⋯m_d · B)``, is appended to ``states`` (k = d … 1). Returns ``(Π m, B)``."""
    rest, B = S.shape  # explicit sizes, no -1: B may be 0
    done = 1  # m_{k+1}⋯m_d
    for c in reversed(cores):
        r0, m, n, r1 = c.shape
        rest //= n
        S = S.reshape(rest, n * r1, done * B)
        states.append(S)
        S = _apply(c.reshape(r0 * m, n * r1), S)
        done *= m
    return S.reshape(done, B)


def _sweep_from_left(cores: Sequence[torch.Tensor], S: torch.Tensor, states: list) -> torch.Tensor:
    """The mirror of :func:`_sweep_from_right`: from ``k = 1`` up, the state before core k,
    ``(m_1⋯m_{k-1}, r_{k-1} n_k, n_{k+1}⋯n_d · B)``, appended to ``states`` (k = 1 … d). Returns ``(Π m, B)``."""
    rest, B = S.shape  # explicit sizes, no -1: B may be 0
    a = 1  # m_1⋯m_{k-1}
    for c in cores:
        r0, m, n, r1 = c.shape
        rest //= n
        S = S.reshape(a, r0 * n, rest * B)
        states.append(S)
        S = _apply(c.permute(1, 3, 0, 2).reshape(m * r1, r0 * n), S)
        a *= m
    return S.reshape(a, B)


def _contract(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``Σ_a L[a] R[a]ᵀ`` for the states ``(a, ·, q)`` of a left and a right sweep meeting at one core."""
    if L.shape[0] == 1:
        return L[0] @ R[0].T
    return torch.bmm(L, R.mT).sum(0)


def _transpose(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The operator cores of the transposed TT-matrix: ``(r, m, n, r') → (r, n, m, r')`` (views)."""
    return [c.transpose(1, 2) for c in cores]


class _TTDeltaProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, p, right, left, pattern, straight):  # type: ignore[override]
        ctx.right, ctx.left, ctx.pattern, ctx.straight = right, left, pattern, straight
        states: list[torch.Tensor] = []
        xt = x2.T.contiguous()  # the batch last (module docstring)
        y = _sweep_from_right(right, xt, states) if pattern == "right" else _sweep_from_left(left, xt, states)
        ctx.save_for_backward(x2, p, *states)  # freed after the backward pass, kept with retain_graph
        return y.T

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x2, p, *states = ctx.saved_tensors
        wanted = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph: the straight-through matvec, differentiable to any order
            inputs = [t for t, w in zip((x2, p), wanted) if w]
            with torch.enable_grad():
                y = ctx.straight(p).matvec(x2)
                grads = iter(torch.autograd.grad(y, inputs, g, create_graph=True))
            return (*(next(grads) if w else None for w in wanted), None, None, None, None)
        # the products in the parameters' dtype even if the backward pass runs under autocast (as the forward's did)
        with torch.autocast(g.device.type, enabled=False):
            dx, dp = _backward_sweeps(ctx, g, states)
        return (dx if wanted[0] else None), (dp if wanted[1] else None), None, None, None, None


def _backward_sweeps(ctx, g: torch.Tensor, states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``∂L/∂x`` and the δ-gradient (packed) from the output gradient g and the forward states (module docstring)."""
    gt = g.T.contiguous()
    back: list[torch.Tensor] = []
    if ctx.pattern == "right":  # P_k (g from the left through Uᵀ) against Q_k (x from the right through V)
        dx = _sweep_from_left(_transpose(ctx.left), gt, back).T
        deltas = [_contract(P, Q).reshape(c.shape) for P, Q, c in zip(back, reversed(states), ctx.right)]
    else:  # x from the left through U against g from the right through Vᵀ: (r, i, o, r') blocks
        dx = _sweep_from_right(_transpose(ctx.right), gt, back).T
        deltas = []
        for L, R, c in zip(states, reversed(back), ctx.left):
            r0, o, i, r1 = c.shape
            deltas.append(_contract(L, R).reshape(r0, i, o, r1).transpose(1, 2))
    return dx, torch.cat([dk.reshape(-1) for dk in deltas])


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
