"""Tensor rings (TR): tensor trains closed by a trace.

A :class:`TensorRing` of shape ``(n_1, ..., n_d)`` has cores ``G_k: (r_k, n_k, r_{k+1})`` with ``r_{d+1} = r_1``:

    X[i_1, ..., i_d] = Tr( G_1[:, i_1, :] G_2[:, i_2, :] ⋯ G_d[:, i_d, :] ).

A tensor train is the case ``r_1 = 1``. In costs below ``n = max n_k`` and ``r = max r_k``. No operation forms the
dense tensor except :meth:`TensorRing.full` and :meth:`TensorRing.from_dense` (Zhao, Zhou, Xie, Zhang & Cichocki,
"Tensor ring decomposition", 2016).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._checks import (
    as_positive_int,
    as_shape,
    as_tolerance,
    check_index,
    check_random_options,
    check_same,
    check_tensor,
)
from .decompositions import _trunc_rank, _tt_svd
from .tt import _checked_cores, _CoreList

__all__ = ["TensorRing", "tr_full", "tr_svd"]


class TensorRing(_CoreList):
    """A d-dimensional tensor in tensor-ring format.

    Args:
        cores: sequence of d tensors, ``cores[k]: (r_k, n_k, r_{k+1})`` with the last core's right rank equal to the
            first core's left rank (the ring closes), one dtype (float32/float64) and one device.

    Storage ``O(d n r²)``. Objects are immutable: every operation returns a new one.
    """

    __slots__ = ("cores",)

    def __init__(self, cores: Sequence[torch.Tensor]) -> None:
        cores = _checked_cores(cores, 3)
        d = len(cores)
        for k in range(d):
            if cores[k].shape[2] != cores[(k + 1) % d].shape[0]:
                raise ValueError(
                    f"cores[{k}] has right rank {cores[k].shape[2]} but cores[{(k + 1) % d}] has left rank "
                    f"{cores[(k + 1) % d].shape[0]} (a ring closes: the last right rank is the first left rank)"
                )
        self.cores = cores

    @classmethod
    def _trusted(cls, cores: Sequence[torch.Tensor]) -> TensorRing:
        obj = TensorRing.__new__(TensorRing)
        obj.cores = list(cores)
        return obj

    # ----------------------------------------------------------------- construction
    @classmethod
    def random(
        cls,
        shape: Sequence[int],
        rank: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> TensorRing:
        """A TR with every rank ``rank`` and i.i.d. Gaussian cores scaled by ``1/sqrt(r n_k)`` (entries O(1)).
        ``shape`` and ``rank`` take Python or numpy/torch integers; ``dtype`` float32 or float64
        (None: ``torch.get_default_dtype()``).
        Cost ``O(d n r²)``."""
        dtype, device, gdev = check_random_options(dtype, device, generator)
        shape, rank = as_shape("shape", shape), as_positive_int("rank", rank)
        cores = [
            torch.randn(rank, n, rank, dtype=dtype, device=gdev, generator=generator) / math.sqrt(rank * n)
            for n in shape
        ]
        return cls._trusted([c.to(device) for c in cores])

    @classmethod
    def from_dense(cls, A: torch.Tensor, max_rank: int | None = None, eps: float | None = None) -> TensorRing:
        """TR-SVD of the dense tensor ``A (n_1, ..., n_d)``: :func:`tr_svd` (arguments, accuracy and cost there)."""
        return cls._trusted(tr_svd(A, max_rank, eps))

    # ----------------------------------------------------------------- properties
    @property
    def ranks(self) -> tuple[int, ...]:
        """The d ranks ``(r_1, ..., r_d)``: ``r_k`` is the left rank of core k (``r_1`` closes the ring)."""
        return tuple(c.shape[0] for c in self.cores)

    # ----------------------------------------------------------------- evaluation
    def full(self) -> torch.Tensor:
        """The dense tensor ``(n_1, ..., n_d)``: :func:`tr_full` of the cores. Cost ``O(n^d r²)``; memory ``O(n^d)``
        beyond the two half products (``O(n^{⌈d/2⌉} r²)``)."""
        return tr_full(self.cores)

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Entries at ``index: (N, d)`` (integers), returned as ``(N,)``. Cost ``O(N d r³)``."""
        index = check_index("index", index, self.shape, self.device)
        M = self.cores[0][:, index[:, 0], :].permute(1, 0, 2)  # (N, r_1, r_2)
        for k, c in enumerate(self.cores[1:], start=1):
            M = torch.bmm(M, c[:, index[:, k], :].permute(1, 0, 2))
        return M.diagonal(dim1=1, dim2=2).sum(-1)

    # ----------------------------------------------------------------- linear algebra
    def inner(self, other: TensorRing | torch.Tensor) -> torch.Tensor:
        """``<X, Y> = Σ_i X[i] Y[i]`` with a TensorRing (cost ``O(d n r_X² r_Y² (r_X + r_Y))``: the transfer
        products ``Σ_i X_k[i] ⊗ Y_k[i]`` applied to a running ``(r_X r_Y) × (r_X r_Y)`` matrix) or with a dense tensor
        of the same shape (cost ``O(n^d r²)``)."""
        if isinstance(other, TensorRing):
            if other.shape != self.shape:
                raise ValueError(f"shapes differ: {self.shape} and {other.shape}")
            check_same("operands", (self.cores[0], other.cores[0]))
            a, b = self.cores[0].shape[0], other.cores[0].shape[0]
            # M[(α, β), (α', β')] over the ring's start (α, β) and the current bond (α', β')
            M = torch.eye(a * b, dtype=self.dtype, device=self.device).reshape(a * b, a, b)
            for x, y in zip(self.cores, other.cores):
                T = torch.tensordot(M, x, dims=([1], [0]))  # (ab, β, i, α'): O(n r_X² r_Y² r_X)
                M = torch.tensordot(T, y, dims=([1, 2], [0, 1]))  # (ab, α', β'): O(n r_X² r_Y² r_Y)
            return M.reshape(a * b, a * b).trace()
        if isinstance(other, torch.Tensor):
            if tuple(other.shape) != self.shape:
                raise ValueError(f"other must have shape {self.shape}, got {tuple(other.shape)}")
            check_same("operands", (self.cores[0], other))
            return (self.full() * other).sum()
        raise TypeError(f"other must be a TensorRing or a tensor, got {type(other).__name__}")

    def norm(self) -> torch.Tensor:
        """Frobenius norm ``sqrt(<X, X>)``. Cost ``O(d n r⁵)`` (:meth:`inner`)."""
        return self.inner(self).clamp_min(0).sqrt()


def tr_svd(A: torch.Tensor, max_rank: int | None = None, eps: float | None = None) -> list[torch.Tensor]:
    """TR-SVD (Zhao et al. 2016, Algorithm 1): the ring cores ``(r_k, n_k, r_{k+1})`` of the dense tensor
    ``A (n_1, ..., n_d)``.

    The first unfolding ``(n_1, n_2 ⋯ n_d)`` is truncated to a rank ``R = r_1 r_2`` split as evenly as its
    divisors allow; the rest, with ``r_2`` joined to ``n_2`` and ``r_1`` to ``n_d``, is the left-to-right TT-SVD of
    :func:`~lowrankopt.formats.tt_svd`, so its last core carries the ring rank ``r_1``.

    Args:
        A: dense float32/float64 tensor, ``d ≥ 2`` dimensions.
        max_rank: cap on every rank (the first split keeps ``r_1, r_2 ≤ max_rank``).
        eps: relative accuracy: ``‖A − X‖ ≤ eps ‖A‖`` when ``max_rank`` does not bind (per-step thresholds
            ``√2 eps ‖A‖ / √d`` for the first SVD and ``eps ‖A‖ / √d`` after). None keeps every nonzero
            singular value (with ``max_rank`` None: exact up to roundoff).

    Returns:
        The d cores, in ``A``'s dtype and on its device (differentiable: SVDs and products).

    Cost: ``O(n^{d+1} r²)``, dominated by the first SVD.
    """
    check_tensor("A", A)
    if A.dim() < 2:
        raise ValueError("A must have at least two dimensions")
    max_rank = None if max_rank is None else as_positive_int("max_rank", max_rank)
    eps = None if eps is None else as_tolerance("eps", eps)
    shape, d = tuple(A.shape), A.dim()
    norm = float(torch.linalg.vector_norm(A))
    tiny = torch.finfo(A.dtype).eps * norm  # "nonzero" singular values when eps is None
    delta = tiny if eps is None else max(eps * norm / math.sqrt(d), tiny)
    U, s, Vh = torch.linalg.svd(A.reshape(shape[0], -1), full_matrices=False)
    cap = None if max_rank is None else max_rank * max_rank
    R = _trunc_rank(s, math.sqrt(2) * delta, cap)
    r1, r2 = _split(R, max_rank, s.numel())
    R = r1 * r2
    first = U[:, :R].reshape(shape[0], r1, r2).permute(1, 0, 2)
    # the rest (r1, r2, n_2, ..., n_d) with r1 moved last: a TT-SVD of (r2 n_2, n_3, ..., n_{d-1}, n_d r1)
    C = (s[:R, None] * Vh[:R]).reshape(r1, r2, -1).permute(1, 2, 0)
    if d == 2:
        return [first, C.reshape(r2, shape[1], r1)]
    C = C.reshape(r2 * shape[1], *shape[2:-1], shape[-1] * r1)
    rest = _tt_svd(C, None if max_rank is None else [max_rank] * (d - 2), delta, d - 2)
    rest[0] = rest[0].reshape(r2, shape[1], rest[0].shape[2])
    rest[-1] = rest[-1].reshape(rest[-1].shape[0], shape[-1], r1)
    return [first, *rest]


def tr_full(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The dense tensor of a ring, or of a batch of rings of one shape: ``cores[k]: (*batch, r_k, n_k, r_{k+1})``
    (the last right rank equal to the first left rank; batch dimensions shared by all cores) give
    ``(*batch, n_1, ..., n_d)`` with ``X[i_1, ..., i_d] = Tr(G_1[:, i_1, :] ⋯ G_d[:, i_d, :])``.

    The products of the first ``⌈d/2⌉`` and of the last ``⌊d/2⌋`` cores are formed separately and closed by one
    contraction over both ring bonds, so no ``(n^d, r²)`` intermediate exists. No validation (a building block for
    :meth:`TensorRing.full` and for batched weights, e.g. :mod:`lowrankopt.nn.tbasis`): differentiable, any float
    dtype. Cost ``O(n^d r²)`` flops (plus ``O(n^{⌈d/2⌉} r³)`` for the halves); memory ``O(n^d + n^{⌈d/2⌉} r²)``
    per ring.
    """
    cores = list(cores)
    if not cores:
        raise ValueError("cores must be a non-empty sequence of (*batch, r_k, n_k, r_{k+1}) tensors")
    batch = cores[0].shape[:-3]
    modes = [c.shape[-2] for c in cores]
    h = (len(cores) + 1) // 2
    left = _chain(cores[:h])
    if len(cores) == 1:
        flat = left.diagonal(dim1=-3, dim2=-1).sum(-1)
    else:
        flat = torch.einsum("...aib,...bja->...ij", left, _chain(cores[h:]))
    return flat.reshape(*batch, *modes)


def _chain(cores: list[torch.Tensor]) -> torch.Tensor:
    """``(*batch, r, n_k, r')`` cores → their product ``(*batch, r_first, Π n_k, r_last)`` (mode indices in C order).
    Cost ``O(n^j r³)`` for j cores."""
    res = cores[0]
    for c in cores[1:]:
        res = torch.einsum("...anb,...bmc->...anmc", res, c)
        res = res.reshape(*res.shape[:-4], res.shape[-4], -1, res.shape[-1])
    return res


def _split(R: int, max_rank: int | None, limit: int) -> tuple[int, int]:
    """``(r_1, r_2)``, ``r_1 ≤ r_2 ≤ max_rank``, the most even factorization of the smallest total ``≥ R`` (at most
    ``limit``, the number of singular values) that has one — so the accuracy the rank R was chosen for is kept —
    else of the largest total below R. (For one total the most even factorization has the smallest larger
    factor.)"""

    def even(total: int) -> tuple[int, int]:
        a = next(a for a in range(math.isqrt(total), 0, -1) if total % a == 0)
        return a, total // a

    for total in [*range(R, limit + 1), *range(R - 1, 0, -1)]:
        a, b = even(total)
        if max_rank is None or b <= max_rank:
            return a, b
    return 1, 1
