"""Mode balancing of tensor-train completion: a diagonal change of variables per mode that equalizes the slices.

Scaling mode k of a tensor by a positive vector ``D_k`` (``B = A ×_1 diag(D_1) ⋯ ×_d diag(D_d)``, i.e.
``B[i] = A[i] · Π_k D_k[i_k]``) multiplies slice ``i`` of core k by ``D_k[i]``: it maps the manifold of TT-rank r
tensors onto itself, and an observed entry of A gives the entry of B at the same position. So :func:`complete` may
solve for B instead of A and divide the cores back. It is a preconditioner: the solver's metric becomes the
Frobenius metric of B.

Why: a zero-mean tensor with Gaussian cores (``FixedTTRank.random_point``) has heavy-tailed entries whose energy is
spread unevenly over the slices (at d = 6, n = 10, TT-rank 4 the mean square of the mode-1 slices ranges over a
factor 16, and 1 % of the entries hold a third of the energy). Least squares on a few entries then favours spiky
fits of the largest observed values; such a fit can explain most of the observed energy while orthogonal to the
target (measured: test error 2–15 where the training residual stalls at 0.6–0.8). :func:`balance_modes` chooses
``D`` so that every slice of B has the same mean square over its observed entries (alternating, Sinkhorn-style
updates ``D_k[i] ← D_k[i] / rms_k[i]``); in the ``tt-completion-phase`` benchmark this lowered the sampling at which
``complete()`` recovers such tensors (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..formats.tt import TensorTrain

__all__ = ["ModeScaling", "balance_modes"]


class ModeScaling:
    """Positive diagonal scalings ``D_k`` (``(n_k,)`` tensors, one per mode): ``B[i] = A[i] · Π_k D_k[i_k]``.

    :meth:`weights` gives ``Π_k D_k[i_k]`` at positions, :meth:`apply` maps a TT A to B and :meth:`undo` B to A
    (the TT-ranks are unchanged: slice i of core k is multiplied / divided by ``D_k[i]``).
    """

    def __init__(self, factors: Sequence[torch.Tensor]) -> None:
        self.factors = list(factors)

    def weights(self, indices: torch.Tensor) -> torch.Tensor:
        """``Π_k D_k[indices[:, k]]`` for ``indices (N, d)``: the factor from A's entries to B's. Cost O(N d)."""
        w = self.factors[0][indices[:, 0]]
        for k in range(1, len(self.factors)):
            w = w * self.factors[k][indices[:, k]]
        return w

    def apply(self, x: TensorTrain) -> TensorTrain:
        """B for A = ``x`` (slice i of core k times ``D_k[i]``). Cost O(d n r²)."""
        return self._scaled(x, 1)

    def undo(self, x: TensorTrain) -> TensorTrain:
        """A for B = ``x`` (slice i of core k divided by ``D_k[i]``). Cost O(d n r²)."""
        return self._scaled(x, -1)

    def _scaled(self, x: TensorTrain, power: int) -> TensorTrain:
        cores = [c * (D if power > 0 else 1 / D).to(c.dtype).reshape(1, -1, 1) for c, D in zip(x.cores, self.factors)]
        return TensorTrain._trusted(cores)


def balance_modes(
    indices: torch.Tensor,
    values: torch.Tensor,
    shape: Sequence[int],
    *,
    sweeps: int = 10,
    max_ratio: float = 1e4,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> ModeScaling:
    """The scalings ``D_k`` under which every slice (k, i) of the observed entries has the same mean square.

    ``sweeps`` alternating passes over the modes, each setting ``D_k[i] ← D_k[i] / rms_k[i]`` (``rms_k[i]``: the
    root mean square of the scaled observed values with ``i_k = i``, relative to their overall one), then
    normalized to geometric mean 1 per mode. Slices without observations, or whose observed values are all zero,
    are not updated (they move only with that normalization and the clip; their factor does not change the loss)
    and do not count in the overall mean square. Each ``D_k`` is clipped to ``[c⁻¹, c]`` with
    ``c = max_ratio^(1/(2d))``, so that no weight ``Π_k D_k[i_k]`` exceeds ``√max_ratio`` or falls below its
    inverse (a slice seen a few times cannot dominate, and the weights stay finite in float32 for any d).
    ``reduce`` sums the slice statistics over the processes that hold the other shards (identity in one process).
    Computed in float64.
    Cost ``O(sweeps · d · N)`` and ``sweeps · d`` reductions of ``2 n_k`` numbers.
    """
    d = len(shape)
    kw = dict(dtype=torch.float64, device=values.device)
    y2 = values.to(torch.float64).square()
    factors = [torch.ones(n, **kw) for n in shape]
    bound = max_ratio ** (1 / (2 * d))
    w2 = torch.ones_like(y2)  # the squared weights Π_k D_k[i_k]², updated one mode at a time (O(N) per update)
    for _ in range(sweeps):
        for k in range(d):
            stats = torch.zeros(2, shape[k], **kw)
            stats[0].index_add_(0, indices[:, k], w2 * y2)
            stats[1].index_add_(0, indices[:, k], torch.ones_like(y2))
            energy, count = reduce(stats)
            seen = (count > 0) & (energy > 0)
            if not bool(seen.any()):
                return ModeScaling(factors)
            # the mean square over the slices that can be balanced (an all-zero slice cannot reach any target: counting
            # its entries would shrink the others every sweep, without a fixed point)
            total = float(energy[seen].sum()) / float(count[seen].sum())
            ms = torch.where(seen, energy / count.clamp(min=1) / total, torch.ones_like(energy))
            D = factors[k] / ms.sqrt()
            D = D / torch.exp(torch.log(D).mean())  # geometric mean 1: the scale of the values is kept
            D = D.clamp(1 / bound, bound)
            w2 = w2 * (D / factors[k]).square()[indices[:, k]]
            factors[k] = D
    return ModeScaling(factors)
