r"""The Riemannian LoRA adapter's product ``ΔW x`` with its gradient in δ-coordinates, as one autograd node
(:func:`delta_product`).

The adapter's parameter is the packed point ``p = [C | V]`` of the fixed-rank manifold (``X = C Vᵀ``, ``V``
orthonormal, ``C = U S``), and the update is ``ΔW = L Rᵀ`` (``L = [C − C₀ | C₀]``, ``R = [V | V − V₀]`` with the
offset ``X₀ = C₀ V₀ᵀ``; ``L = C``, ``R = V`` without one). For the rows ``x: (B, in)`` with output gradient
``g: (B, out)``, the Euclidean gradient of the loss in ``ΔW`` is ``G = gᵀ x`` (``out × in``), and what the Riemannian
optimizers need is its δ-coordinates at ``X`` (:mod:`lowrankopt.autodiff`): ``[G V | Gᵀ U]`` with ``U`` the orthonormal
frame of ``C``. Both come from the activations, never forming ``G``:

    ``G V = gᵀ (x V)``  (``x V`` is the first ``r`` columns of ``x R``, kept from the forward),
    ``Gᵀ U = xᵀ (g U)``,  and the input gradient ``g ΔW = (g L) Rᵀ``.

A straight-through form written with ordinary ops (``(x R) Lᵀ + (x V) z_Cᵀ + (x z_V) Uᵀ`` with ``z = p − p.detach()``)
gives the same gradient, but it computes two more ``B × out`` products of value zero in the forward and keeps their
inputs for the backward; this node does the forward in two matmuls, saves only ``x`` (shared with the caller) and
``x R`` (``B × 2r``), and computes ``U`` (a QR, ``O(out r²)``) only in the backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from ...manifolds.base import qr_positive

__all__ = ["delta_product"]


class _DeltaProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, p, L, R, C, pack):  # type: ignore[override]
        xr = x2 @ R
        ctx.save_for_backward(x2, xr, L, R, C)
        ctx.pack = pack
        return xr @ L.T

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        x2, xr, L, R, C = ctx.saved_tensors
        dx = (g @ L) @ R.T if ctx.needs_input_grad[0] else None
        dp = None
        if ctx.needs_input_grad[1]:
            U = qr_positive(C)[0]  # the frame the δ-coordinates refer to
            dC = g.T @ xr[:, : C.shape[1]]  # G V
            dV = x2.T @ (g @ U)  # Gᵀ U
            dp = ctx.pack(dC, dV)
        return dx, dp, None, None, None, None


def delta_product(
    x2: torch.Tensor,
    p: torch.Tensor,
    L: torch.Tensor,
    R: torch.Tensor,
    C: torch.Tensor,
    pack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``(x2 R) Lᵀ = ΔW x`` for the rows ``x2: (B, in)``, with the gradient ``[G V | Gᵀ U]`` flowing to the packed point
    ``p`` and ``g ΔW`` to ``x2``.

    ``L: (out, k)``, ``R: (in, k)`` (``k = r`` or ``2r``) are the factors of ``ΔW`` at ``p`` and ``C: (out, r)`` its
    left factor, all detached; the first ``r`` columns of ``R`` must be ``V``; ``pack(A, B)`` packs δ-coordinates like
    ``p`` (the manifold's ``pack_point``). Forward ``O(B (out + in) k)``; backward ``O(B (out + in) k + out r²)``; saved
    for the backward: ``x2`` (no copy), ``x2 R`` (``B × k``) and the factors. Not twice differentiable."""
    return _DeltaProduct.apply(x2, p, L, R, C, pack)
