"""Tensors in Tucker format ``X = G ×_1 U_1 ×_2 ⋯ ×_d U_d``.

``G: (r_1, ..., r_d)`` is the core and ``U_k: (n_k, r_k)`` the factors; ``(r_1, ..., r_d)`` are the multilinear
ranks of the representation. The mode-k product ``T ×_k A`` multiplies the k-th index of T by the rows of A:
``(T ×_k A)_(k) = A T_(k)`` in mode-k unfoldings (mode k first, the others in order, row-major). In costs below
``n = max n_k``, ``r = max r_k``. No operation forms the dense tensor except :meth:`Tucker.full` and
:meth:`Tucker.from_dense`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._checks import (
    _is_sequence,
    as_positive_int,
    as_shape,
    cast_all,
    check_index,
    check_random_options,
    check_same,
    check_scalar,
    check_tensor,
)
from .lowrank import rowdot


def unfold(T: torch.Tensor, k: int) -> torch.Tensor:
    """The mode-k unfolding ``(n_k, Π_{j≠k} n_j)`` (a copy unless k = 0)."""
    return T.movedim(k, 0).reshape(T.shape[k], -1)


def mode_product(T: torch.Tensor, A: torch.Tensor, k: int) -> torch.Tensor:
    """``T ×_k A`` for ``A: (p, n_k)``: mode k of the result has size p. Cost ``p · numel(T)``."""
    return torch.tensordot(A, T, dims=([1], [k])).movedim(0, k)


def multi_mode_product(T: torch.Tensor, mats: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``T ×_1 A_1 ⋯ ×_d A_d`` (None: the identity), the modes of largest shrinkage first."""
    order = sorted((k for k, A in enumerate(mats) if A is not None), key=lambda k: mats[k].shape[0] / mats[k].shape[1])
    for k in order:
        T = mode_product(T, mats[k], k)
    return T


def as_multilinear_ranks(name: str, ranks: object, shape: Sequence[int]) -> list[int]:
    """One positive int or ``d`` positive ints as the list of the d multilinear ranks, each at most what a tensor of
    ``shape`` can have in its mode (``min(n_k, Π_(j≠k) n_j)``, the ranks of its unfoldings), else ``ValueError``."""
    d = len(shape)
    if isinstance(ranks, (str, bytes)) or not _is_sequence(ranks):
        ranks = [as_positive_int(name, ranks)] * d
    ranks = list(as_shape(name, ranks))
    if len(ranks) != d:
        raise ValueError(f"{name} must be a positive int or {d} positive ints (one per mode), got {ranks}")
    for k, (r, n) in enumerate(zip(ranks, shape)):
        most = min(n, math.prod(shape) // n)
        if r > most:
            raise ValueError(
                f"{name}[{k}] = {r} exceeds what mode {k} of a tensor of shape {tuple(shape)} can have "
                f"(min(n_k, Π_(j≠k) n_j) = {most})"
            )
    return ranks


class Tucker:
    """A d-dimensional tensor ``G ×_1 U_1 ⋯ ×_d U_d`` in Tucker format.

    Args:
        core: ``G: (r_1, ..., r_d)``.
        factors: d matrices ``U_k: (n_k, r_k)``; they need not be orthonormal (the manifold
            :class:`~lowrankopt.manifolds.FixedTuckerRank` orthonormalizes them once per point).

    One dtype (float32/float64) and one device; finite entries. Storage ``O(d n r + r^d)``. Objects are immutable:
    every operation returns a new one.
    """

    __slots__ = ("core", "factors", "_cache")

    def __init__(self, core: torch.Tensor, factors: Sequence[torch.Tensor]) -> None:
        check_tensor("core", core)
        factors = list(factors)
        if core.dim() < 1 or len(factors) != core.dim():
            raise ValueError(
                f"factors must have one matrix per mode of the core (core.dim() = {core.dim()}), got {len(factors)}"
            )
        for k, U in enumerate(factors):
            check_tensor(f"factors[{k}]", U, 2)
            if U.shape[1] != core.shape[k]:
                raise ValueError(
                    f"factors[{k}] has {U.shape[1]} columns but the core's mode {k} has size {core.shape[k]}"
                )
        check_same("core and factors", (core, *factors))
        self._set(core, factors)

    def _set(self, core, factors):
        self.core, self.factors = core, list(factors)
        self._cache = {}

    @classmethod
    def _trusted(cls, core: torch.Tensor, factors: Sequence[torch.Tensor]) -> Tucker:
        """Internal constructor without validation (tensors produced by our own code)."""
        obj = Tucker.__new__(Tucker)
        obj._set(core, factors)
        return obj

    # ----------------------------------------------------------------- properties
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(U.shape[0] for U in self.factors)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(U.shape[1] for U in self.factors)

    @property
    def ndim(self) -> int:
        return len(self.factors)

    @property
    def dtype(self) -> torch.dtype:
        return self.factors[0].dtype

    @property
    def device(self) -> torch.device:
        return self.factors[0].device

    def to(self, *args: Any, **kwargs: Any) -> Tucker:
        """Move/cast core and factors, as :meth:`torch.Tensor.to` (to float32 or float64 only)."""
        core, *factors = cast_all([self.core, *self.factors], *args, **kwargs)
        return Tucker._trusted(core, factors)

    def __repr__(self) -> str:
        return f"Tucker(shape={self.shape}, ranks={self.ranks}, dtype={self.dtype}, device={self.device})"

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_dense(cls, A: torch.Tensor, ranks: int | Sequence[int]) -> Tucker:
        """The truncated HOSVD of the dense tensor ``A`` (De Lathauwer et al. 2000): ``U_k`` the leading ``r_k`` left
        singular vectors of the unfolding ``A_(k)``, ``G = A ×_k U_kᵀ``. Quasi-optimal: ``‖A − X‖ ≤ √d`` times the
        best multilinear-rank-``ranks`` error. Orthonormal factors. Cost ``O(d n^{d+1})``."""
        check_tensor("A", A)
        ranks = as_multilinear_ranks("ranks", ranks, A.shape)
        factors = [torch.linalg.svd(unfold(A, k), full_matrices=False)[0][:, :r] for k, r in enumerate(ranks)]
        return cls._trusted(multi_mode_product(A, [U.T for U in factors]), factors)

    @classmethod
    def random(
        cls,
        shape: Sequence[int],
        ranks: int | Sequence[int],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tucker:
        """Orthonormal factors (QR of Gaussian matrices) and a standard Gaussian core. Cost ``O(d n r² + r^d)``."""
        shape = as_shape("shape", shape)
        ranks = as_multilinear_ranks("ranks", ranks, shape)
        dtype, device, gdev = check_random_options(dtype, device, generator)
        kw = dict(dtype=dtype, device=gdev, generator=generator)
        factors = [torch.linalg.qr(torch.randn(n, r, **kw))[0].to(device) for n, r in zip(shape, ranks)]
        return cls._trusted(torch.randn(*ranks, **kw).to(device), factors)

    # ----------------------------------------------------------------- evaluation
    def full(self) -> torch.Tensor:
        """The dense tensor. Cost ``O(n^d r)``; memory ``O(n^d)``."""
        return multi_mode_product(self.core, self.factors)

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Entries at ``index: (N, d)`` (integers), as ``(N,)``: the core contracted with one factor row per mode,
        mode by mode, the first through a table shared by the samples (:func:`tucker_entries`).
        Cost ``O(min(N, n_1) r^d + N r^{d−1})``."""
        return self._gather(check_index("index", index, self.shape, self.device))

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        return tucker_entries(self.core, self.factors, index)

    # ----------------------------------------------------------------- linear algebra
    def _check_compatible(self, other: Tucker) -> None:
        if other.shape != self.shape:
            raise ValueError(f"shape mismatch: {self.shape} and {other.shape}")
        check_same("operands", (self.core, other.core))

    def inner(self, other: Tucker | torch.Tensor) -> torch.Tensor:
        """``<X, Y> = Σ X[i] Y[i]`` with a Tucker tensor, ``<G, H ×_k (U_kᵀ W_k)>`` (cost ``O(d n r_X r_Y +
        r^{d+1})``), or a dense tensor of the same shape, ``<G, Y ×_k U_kᵀ>`` (cost ``O(n^d r)``)."""
        if isinstance(other, Tucker):
            self._check_compatible(other)
            H = multi_mode_product(other.core, [U.T @ W for U, W in zip(self.factors, other.factors)])
            return (self.core * H).sum()
        if isinstance(other, torch.Tensor):
            if tuple(other.shape) != self.shape:
                raise ValueError(f"other must have shape {self.shape}, got {tuple(other.shape)}")
            check_same("operands", (self.core, other))
            return (self.core * multi_mode_product(other, [U.T for U in self.factors])).sum()
        raise TypeError(f"other must be a Tucker tensor or a tensor, got {type(other).__name__}")

    def norm(self) -> torch.Tensor:
        """Frobenius norm ``sqrt(<X, X>)`` (no QR: cheap to differentiate). Cost ``O(d n r² + r^{d+1})``."""
        return self.inner(self).clamp_min(0).sqrt()

    def __add__(self, other: Tucker) -> Tucker:
        """Sum with ranks ``r_X + r_Y`` (factors side by side, block-diagonal core; no recompression).
        Cost ``O((r_X + r_Y)^d + d n (r_X + r_Y))``."""
        if not isinstance(other, Tucker):
            return NotImplemented
        self._check_compatible(other)
        return Tucker._trusted(*block_tucker([(self.core, self.factors), (other.core, other.factors)]))

    def __neg__(self) -> Tucker:
        return Tucker._trusted(-self.core, self.factors)

    def __sub__(self, other: Tucker) -> Tucker:
        if not isinstance(other, Tucker):
            return NotImplemented
        return self + (-other)

    def __mul__(self, alpha) -> Tucker:
        """Scalar multiple. Cost ``O(r^d)``."""
        if isinstance(alpha, Tucker):
            return NotImplemented
        return Tucker._trusted(self.core * check_scalar("alpha", alpha), self.factors)

    __rmul__ = __mul__

    def __truediv__(self, alpha) -> Tucker:
        """``X / alpha`` (alpha nonzero). Cost ``O(r^d)``."""
        return Tucker._trusted(self.core / check_scalar("alpha", alpha, nonzero=True), self.factors)

    def round(self, ranks: int | Sequence[int]) -> Tucker:
        """Truncation to multilinear ranks ``ranks`` by the HOSVD of the core after orthonormalizing the factors
        (QR): quasi-optimal (``√d`` times the best error), orthonormal factors. Cost ``O(d n R² + d R^{d+1})``, R the
        ranks of this representation."""
        ranks = as_multilinear_ranks("ranks", ranks, self.shape)
        Qs, Rs = zip(*(torch.linalg.qr(U) for U in self.factors))
        core = multi_mode_product(self.core, Rs)
        Ws = [torch.linalg.svd(unfold(core, k), full_matrices=False)[0][:, :r] for k, r in enumerate(ranks)]
        for k, (r, W) in enumerate(zip(ranks, Ws)):
            if W.shape[1] < r:
                raise ValueError(f"ranks[{k}] = {r} exceeds the rank {W.shape[1]} this representation has in mode {k}")
        return Tucker._trusted(multi_mode_product(core, [W.T for W in Ws]), [Q @ W for Q, W in zip(Qs, Ws)])


def tucker_entries(
    core: torch.Tensor,
    factors: Sequence[torch.Tensor],
    index: torch.Tensor,
    row: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Entries ``Σ_a G[a] Π_k U_k[i_k, a_k]`` of ``G ×_k U_k`` at ``index: (N, d)``, as ``(N,)``.

    Split the modes at k: the samples share the rows of the **table** ``G ×_1 U_1 ⋯ ×_k U_k`` over the first k
    modes (``n_1⋯n_k × r_{k+1}⋯r_d`` numbers), and each sample takes the dot product of its table row with the
    Kronecker product of its factor rows of the other modes (``r_{k+1}⋯r_d`` numbers). k (1 ≤ k < d) minimizes the
    modelled multiply-adds ``Σ_{j≤k} n_1⋯n_j r_j⋯r_d + N r_{k+1}⋯r_d``; with few samples (k = 0: no table) the
    core is contracted with each sample's rows instead, ``N r_1⋯r_d``. ``row(U, k)`` gives ``U[index[:, k]]``
    (default: indexing; a caller may share rows between terms with the same factors). Differentiable.
    Cost: that minimum, e.g. ``n_1 n_2 r³ + N r`` for d = 3 (against ``N r³`` without tables)."""
    if row is None:
        row = lambda U, k: U[index[:, k]]  # noqa: E731
    N, ranks, d = index.shape[0], tuple(core.shape), len(factors)
    shape = [U.shape[0] for U in factors]

    def cost(k: int) -> int:
        build = sum(math.prod(shape[: j + 1]) * math.prod(ranks[j:]) for j in range(k))
        return build + N * math.prod(ranks[k:])

    k = min(range(d), key=cost)
    rest = math.prod(ranks[k:])
    if k == 0:  # no table: each sample's rows of U_1, then the product with the core's unfolding
        T = row(factors[0], 0) @ core.reshape(ranks[0], rest // ranks[0])
        R = None
    else:
        table = multi_mode_product(core, [*factors[:k], *([None] * (d - k))]).reshape(-1, rest)
        lin = index[:, 0]
        for j in range(1, k):
            lin = lin * shape[j] + index[:, j]
        T, R = table[lin], row(factors[k], k)  # (N, r_{k+1}⋯r_d), (N, r_{k+1})
    for j in range(k + 1, d):  # the Kronecker product of the remaining rows
        Uj = row(factors[j], j)
        R = Uj if R is None else (R.unsqueeze(2) * Uj.unsqueeze(1)).reshape(N, R.shape[1] * Uj.shape[1])
    return T.reshape(N) if R is None else rowdot(T, R)


def block_tucker(terms: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor]]]) -> tuple[torch.Tensor, list]:
    """One Tucker representation ``(core, factors)`` of the sum of Tucker terms: per mode the distinct factor tensors
    (by identity) side by side, each term's core in its block of the joint core (autograd through the
    construction). Cost ``O(Π_k R_k + d n R)``, R_k the joint ranks."""
    d = terms[0][0].dim()
    cols: list[dict[int, tuple[int, torch.Tensor]]] = [{} for _ in range(d)]
    for _, factors in terms:
        for k, U in enumerate(factors):
            if id(U) not in cols[k]:
                start = sum(V.shape[1] for _, V in cols[k].values())
                cols[k][id(U)] = (start, U)
    widths = [sum(V.shape[1] for _, V in c.values()) for c in cols]
    core = None
    for G, factors in terms:
        pad = []
        for k in reversed(range(d)):  # F.pad lists the last dimension first
            start = cols[k][id(factors[k])][0]
            pad += [start, widths[k] - start - G.shape[k]]
        block = torch.nn.functional.pad(G, pad)
        core = block if core is None else core + block
    factors = [torch.cat([U for _, U in c.values()], 1) for c in cols]
    return core, factors
