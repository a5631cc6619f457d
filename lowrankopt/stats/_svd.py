"""Leading singular triplets of an operator given only by its products with blocks of vectors."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def top_singular_triplets(
    matmat: Callable[[torch.Tensor], torch.Tensor],
    rmatmat: Callable[[torch.Tensor], torch.Tensor],
    shape: tuple[int, int],
    k: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    tol: float = 1e-12,
    max_iter: int = 1000,
    oversample: int = 10,
    above: float | None = None,
    criterion: str = "residual",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """The k leading singular triplets ``(U (m, k), s (k,), V (n, k))`` of an ``m × n`` operator M.

    Block subspace iteration with a Rayleigh–Ritz step (Halko, Martinsson & Tropp 2011, Alg. 4.4 iterated to
    convergence): a block of ``k + oversample`` vectors alternates ``M ·`` and ``Mᵀ ·`` with QR in between, and the
    small SVD of the block's projection gives the triplets. It stops when the residual
    ``‖M v_j − s_j u_j‖ ≤ tol · s_1`` (checked every 5 iterations) for every j — or, with ``above`` (for
    soft-thresholding at ``above``), ``‖M v_j − s_j u_j‖ (s_j − above) ≤ tol · s_1²`` for every j with ``s_j > above``:
    a triplet enters the thresholded result with weight ``s_j − above``, so those near the threshold need less
    accuracy, and those below it none — and the first Ritz value below ``above`` must be certified below it
    (``s_j + ‖M v_j − s_j u_j‖ ≤ above``: Ritz values approach the singular values from below) — or after
    ``max_iter`` iterations. With ``criterion="value"`` it stops instead when no singular value
    changed by more than ``tol`` (relative to s_1) since the last check: enough for a norm estimate, whose value
    converges about twice as fast as the vectors. When the block spans a whole side of M, one iteration is exact.

    ``matmat(V (n, b)) → (m, b)`` and ``rmatmat(U (m, b)) → (n, b)``. Cost per iteration: one of each on
    ``k + oversample`` vectors plus O((m + n)(k + oversample)²). Returns ``info`` with ``iterations``,
    ``converged`` and the largest relative ``residual``.
    """
    m, n = shape
    b = min(k + oversample, m, n)
    k = min(k, b)
    Q = torch.linalg.qr(torch.randn(n, b, dtype=torch.float64, generator=generator).to(dtype=dtype, device=device))[0]
    info = {"iterations": 0, "converged": False, "residual": float("inf")}
    last = None
    for it in range(1, max_iter + 1):
        Ub = torch.linalg.qr(matmat(Q))[0]
        Q, Rf = torch.linalg.qr(rmatmat(Ub))  # Mᵀ Ub = Q Rf, so Ubᵀ M = Rfᵀ Qᵀ
        W, s, Zh = torch.linalg.svd(Rf.T)
        U, V, s = Ub @ W[:, :k], Q @ Zh.T[:, :k], s[:k]
        info["iterations"] = it
        if criterion == "value" and b < min(m, n):
            if it % 2 == 0:
                change = float("inf") if last is None else float((s - last).abs().max() / s[0])
                info["residual"], last = change, s
                if change <= tol:
                    info["converged"] = True
                    break
            continue
        if b == min(m, n) or it % 5 == 0 or it == max_iter:
            res = torch.linalg.vector_norm(matmat(V) - U * s, dim=0) / s[0].clamp_min(torch.finfo(dtype).tiny)
            if above is not None:  # a triplet enters the result with weight s_j − above: scale its residual so
                keep = s > above  # that those near the threshold need less accuracy
                below = (~keep).nonzero()
                # the first value below the threshold must be certified below it: s_j + residual ≤ above
                certified = below.numel() == 0 or float(s[below[0, 0]] + res[below[0, 0]] * s[0]) <= above
                res = res[keep] * (s[keep] - above) / s[0]
                if not certified:
                    res = torch.cat([res, res.new_full((1,), math.inf)])
            info["residual"] = float(res.max()) if res.numel() else 0.0
            if b == min(m, n) or info["residual"] <= tol:
                info["converged"] = True
                break
    return U, s, V, info
