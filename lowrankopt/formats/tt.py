"""Tensor trains (TT) and TT-matrices.

A :class:`TensorTrain` of shape ``(n_1, ..., n_d)`` has cores ``G_k: (r_{k-1}, n_k, r_k)`` with
``r_0 = r_d = 1``:

    X[i_1, ..., i_d] = G_1[:, i_1, :] G_2[:, i_2, :] ⋯ G_d[:, i_d, :].

``ranks`` are the d − 1 inner ranks ``(r_1, ..., r_{d-1})``. In costs below ``n = max n_k`` and
``r = max r_k``. No operation forms the dense tensor except :meth:`TensorTrain.full` and
:meth:`TensorTrain.from_dense`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

from .._checks import (
    IndexCache,
    as_mode_shapes,
    as_rank_list,
    as_shape,
    as_tolerance,
    cast_all,
    check_index,
    check_like,
    check_random_options,
    check_same,
    check_scalar,
    check_tensor,
)
from .decompositions import left_orthogonalize, right_orthogonalize, truncate_right_to_left, tt_svd
from .tt_gather import tt_gather

_svd_truncate_right_to_left = truncate_right_to_left  # the former private name, kept for one release

_C = TypeVar("_C", bound="_Cores")  # `to` keeps the format (autodiff's internal DeltaTT comes back a TensorTrain)


def _checked_cores(cores: Sequence[torch.Tensor], ndim: int) -> list[torch.Tensor]:
    """``cores`` as a list, checked: non-empty, each a finite float32/float64 tensor of ``ndim`` dims, one dtype and
    one device."""
    cores = list(cores)
    if not cores:
        raise ValueError(f"cores must be a non-empty sequence of {ndim}-D tensors")
    for k, c in enumerate(cores):
        check_tensor(f"cores[{k}]", c, ndim)
    check_same("cores", cores)
    return cores


class _Cores:
    """What every format stored as a list of ``cores`` of one dtype and device (:class:`TensorTrain`,
    :class:`TTMatrix`, :class:`~lowrankopt.formats.tr.TensorRing`) shares: ``dtype``, ``device`` and ``to``."""

    __slots__ = ()

    @property
    def dtype(self) -> torch.dtype:
        return self.cores[0].dtype

    @property
    def device(self) -> torch.device:
        return self.cores[0].device

    def to(self: _C, *args: Any, **kwargs: Any) -> _C:
        """Move/cast every core, as :meth:`torch.Tensor.to` (to float32 or float64 only)."""
        return type(self)._trusted(cast_all(self.cores, *args, **kwargs))


class _CoreList(_Cores):
    """What the core-list formats (:class:`TensorTrain`, :class:`~lowrankopt.formats.tr.TensorRing`) share: cores
    ``(r, n_k, r')``, hence ``shape``, ``ndim`` and ``repr`` (and ``dtype``, ``device``, ``to`` of :class:`_Cores`)."""

    __slots__ = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(c.shape[1] for c in self.cores)

    @property
    def ndim(self) -> int:
        return len(self.cores)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(shape={self.shape}, ranks={self.ranks}, dtype={self.dtype}, device={self.device})"


class TensorTrain(_CoreList):
    """A d-dimensional tensor in tensor-train format.

    Args:
        cores: sequence of d tensors, ``cores[k]: (r_{k-1}, n_k, r_k)`` with ``r_0 = r_d = 1``,
            one dtype (float32/float64) and one device.

    Storage ``O(d n r²)``. Objects are immutable: every operation returns a new one.
    """

    __slots__ = ("cores", "_cache")

    def __init__(self, cores: Sequence[torch.Tensor]) -> None:
        cores = _checked_cores(cores, 3)
        if cores[0].shape[0] != 1 or cores[-1].shape[2] != 1:
            raise ValueError("cores[0] must have shape (1, n_1, r_1) and cores[-1] shape (r_{d-1}, n_d, 1)")
        for k in range(len(cores) - 1):
            if cores[k].shape[2] != cores[k + 1].shape[0]:
                raise ValueError(
                    f"cores[{k}] has right rank {cores[k].shape[2]} but cores[{k + 1}] has left rank "
                    f"{cores[k + 1].shape[0]}"
                )
        self._set(cores)

    def _set(self, cores):
        self.cores = cores
        self._cache = {}

    @classmethod
    def _trusted(cls, cores: Sequence[torch.Tensor]) -> TensorTrain:
        """Internal constructor without validation (cores produced by our own code)."""
        obj = TensorTrain.__new__(TensorTrain)
        obj._set(list(cores))
        return obj

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_dense(
        cls, A: torch.Tensor, max_rank: int | Sequence[int] | None = None, eps: float | None = None
    ) -> TensorTrain:
        """TT-SVD of the dense tensor ``A`` (Oseledets 2011; :func:`tt_svd`, left to right: the last core carries
        the norm).

        Args:
            A: dense tensor of shape ``(n_1, ..., n_d)``.
            max_rank: int or d − 1 ints capping the ranks, or None.
            eps: relative accuracy; the result satisfies ``‖A − X‖ <= eps ‖A‖`` when ``max_rank``
                does not bind. None (with ``max_rank`` None) keeps every nonzero singular value.

        Cost: ``O(n^{d+1} r)`` dominated by the first SVD.
        """
        return cls._trusted(tt_svd(A, max_rank, eps))

    @classmethod
    def random(
        cls,
        shape: Sequence[int],
        ranks: int | Sequence[int],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> TensorTrain:
        """A TT with i.i.d. Gaussian cores scaled by ``1/sqrt(r_{k-1} n_k)`` (so entries are O(1)).

        ``shape`` and ``ranks`` (an int or d − 1 ints) take Python or numpy/torch integers; ranks above what the
        shape allows are clipped. ``dtype`` float32 or float64 (None: ``torch.get_default_dtype()``).
        Cost ``O(d n r²)``.
        """
        dtype, device, gdev = check_random_options(dtype, device, generator)
        shape = list(as_shape("shape", shape))
        d = len(shape)
        ranks = [1] + as_rank_list("ranks", ranks, d) + [1]
        for k in range(1, d):  # clip to the maximal ranks from both sides
            ranks[k] = min(ranks[k], ranks[k - 1] * shape[k - 1])
        for k in range(d - 1, 0, -1):
            ranks[k] = min(ranks[k], ranks[k + 1] * shape[k])
        cores = [
            torch.randn(ranks[k], shape[k], ranks[k + 1], dtype=dtype, device=gdev, generator=generator)
            / math.sqrt(ranks[k] * shape[k])
            for k in range(d)
        ]
        return cls._trusted([c.to(device) for c in cores])

    # ----------------------------------------------------------------- properties
    @property
    def ranks(self) -> tuple[int, ...]:
        """The d − 1 inner TT ranks ``(r_1, ..., r_{d-1})``."""
        return tuple(c.shape[2] for c in self.cores[:-1])

    # ----------------------------------------------------------------- canonical forms
    def orthogonalize(self, direction: str = "left") -> TensorTrain:
        """Left- (cores 1..d-1 left-orthogonal) or right- (cores 2..d right-orthogonal) canonical form
        of the same tensor. Cost ``O(d n r³)``."""
        if direction == "left":
            return TensorTrain._trusted(left_orthogonalize(self.cores))
        if direction == "right":
            return TensorTrain._trusted(right_orthogonalize(self.cores))
        raise ValueError(f"direction must be 'left' or 'right', got {direction!r}")

    def round(self, max_rank: int | Sequence[int] | None = None, eps: float | None = None) -> TensorTrain:
        """TT-rounding: recompress to ranks <= ``max_rank`` and/or relative accuracy ``eps``.

        ``‖X − round(X)‖ <= eps ‖X‖`` when ``max_rank`` does not bind; with only ``max_rank`` the
        error is at most ``sqrt(d − 1)`` times the best approximation error. The result is
        right-orthogonal. Cost ``O(d n R³)`` for input rank R.
        """
        if max_rank is None and eps is None:
            raise ValueError("give max_rank, eps or both")
        eps = 0.0 if eps is None else as_tolerance("eps", eps)
        max_ranks = None if max_rank is None else as_rank_list("max_rank", max_rank, self.ndim)
        return TensorTrain._trusted(truncate_right_to_left(left_orthogonalize(self.cores), max_ranks, eps))

    # ----------------------------------------------------------------- evaluation
    def full(self) -> torch.Tensor:
        """The dense tensor of shape ``(n_1, ..., n_d)``. Cost ``O(n^d r)``; memory ``O(n^d)``."""
        res = self.cores[0].reshape(-1, self.cores[0].shape[2])
        for c in self.cores[1:]:
            res = (res @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[2])
        return res.reshape(self.shape)

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Entries at ``index: (N, d)`` (integers), returned as ``(N,)``.

        Cost at most ``O(N d r²)``; less when N is large against the first and last modes, whose products are
        shared between samples (prefix and suffix tables of at most 2N rows, then one grouped GEMM per merged middle
        mode: :func:`~lowrankopt.formats.tt_gather.tt_gather`)."""
        return self._gather(check_index("index", index, self.shape, self.device))

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        return tt_gather(self.cores, index)

    # ----------------------------------------------------------------- linear algebra
    def _check_compatible(self, other: TensorTrain) -> None:
        if other.shape != self.shape:
            raise ValueError(f"shape mismatch: {self.shape} and {other.shape}")
        check_same("operands", (self.cores[0], other.cores[0]))

    def inner(self, other: TensorTrain | torch.Tensor) -> torch.Tensor:
        """Inner product ``<X, Y> = Σ X[i] Y[i]`` with a TensorTrain (cost ``O(d n r_X r_Y (r_X + r_Y))``)
        or a dense tensor of the same shape (cost ``O(n^d r)``)."""
        if isinstance(other, TensorTrain):
            self._check_compatible(other)
            M = self.cores[0].new_ones(1, 1)  # (rx, ry) interface of the contracted prefix
            for a, b in zip(self.cores, other.cores):
                M = torch.tensordot(torch.tensordot(M, a, dims=([0], [0])), b, dims=([0, 1], [0, 1]))
            return M.reshape(())
        if isinstance(other, torch.Tensor):
            if tuple(other.shape) != self.shape:
                raise ValueError(f"other must have shape {self.shape}, got {tuple(other.shape)}")
            check_same("operands", (self.cores[0], other))
            v = other.reshape(1, -1)  # (r_{k-1}, n_k ... n_d)
            for c in self.cores:
                a, n, b = c.shape
                v = c.reshape(a * n, b).T @ v.reshape(a * n, -1)
            return v.reshape(())
        raise TypeError(f"other must be a TensorTrain or a tensor, got {type(other).__name__}")

    def norm(self) -> torch.Tensor:
        """Frobenius norm ``sqrt(<X, X>)`` (no QR, cheap to differentiate). Cost ``O(d n r³)``."""
        return self.inner(self).clamp_min(0).sqrt()

    def __add__(self, other: TensorTrain) -> TensorTrain:
        """Sum with ranks ``r_X + r_Y`` (no recompression). Cost ``O(d n (r_X + r_Y)²)``."""
        if not isinstance(other, TensorTrain):
            return NotImplemented
        self._check_compatible(other)
        a, b = self.cores, other.cores
        if self.ndim == 1:
            return TensorTrain._trusted([a[0] + b[0]])
        cores = [torch.cat([a[0], b[0]], 2)]
        for x, y in zip(a[1:-1], b[1:-1]):
            top = torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], y.shape[2])], 2)
            bottom = torch.cat([y.new_zeros(y.shape[0], y.shape[1], x.shape[2]), y], 2)
            cores.append(torch.cat([top, bottom], 0))
        cores.append(torch.cat([a[-1], b[-1]], 0))
        return TensorTrain._trusted(cores)

    def __neg__(self) -> TensorTrain:
        return TensorTrain._trusted([-self.cores[0]] + list(self.cores[1:]))

    def __sub__(self, other: TensorTrain) -> TensorTrain:
        if not isinstance(other, TensorTrain):
            return NotImplemented
        return self + (-other)

    def __mul__(self, other) -> TensorTrain:
        """Scalar multiple (cost ``O(n r²)``) or elementwise (Hadamard) product with a TensorTrain,
        ranks ``r_X r_Y`` (cost ``O(d n r_X² r_Y²)``)."""
        if isinstance(other, TensorTrain):
            self._check_compatible(other)
            cores = []
            for x, y in zip(self.cores, other.cores):
                a, n, b = x.shape
                c, _, e = y.shape
                cores.append(torch.einsum("aib,cie->acibe", x, y).reshape(a * c, n, b * e))
            return TensorTrain._trusted(cores)
        alpha = check_scalar("alpha", other)
        return TensorTrain._trusted([self.cores[0] * alpha] + list(self.cores[1:]))

    __rmul__ = __mul__

    def __truediv__(self, alpha) -> TensorTrain:
        """``X / alpha`` (alpha nonzero). Cost ``O(n r²)``."""
        alpha = check_scalar("alpha", alpha, nonzero=True)
        return TensorTrain._trusted([self.cores[0] / alpha] + list(self.cores[1:]))


class TTMatrix(_Cores):
    """A linear operator ``(Π n_k) → (Π m_k)`` in TT-matrix format.

    Args:
        cores: d tensors ``cores[k]: (r_{k-1}, m_k, n_k, r_k)``, ``r_0 = r_d = 1``.

    Row index ``(i_1..i_d)`` and column index ``(j_1..j_d)`` are flattened row-major. The operator is the
    TensorTrain of the merged modes ``(m_k n_k)`` (each core reshaped, :meth:`merged`): the linear algebra of the
    vector space of TT-matrices (``inner``, ``norm``, ``+``, ``-``, scalar ``*``) is that of the merged tensor train.
    """

    __slots__ = ("cores", "_cache")

    def __init__(self, cores: Sequence[torch.Tensor]) -> None:
        cores = _checked_cores(cores, 4)
        if cores[0].shape[0] != 1 or cores[-1].shape[3] != 1:
            raise ValueError("cores[0] must have shape (1, m_1, n_1, r_1) and cores[-1] (r_{d-1}, m_d, n_d, 1)")
        for k in range(len(cores) - 1):
            if cores[k].shape[3] != cores[k + 1].shape[0]:
                raise ValueError(f"cores[{k}] and cores[{k + 1}] have mismatched ranks")
        self.cores = cores
        self._cache = {}

    @classmethod
    def _trusted(cls, cores) -> TTMatrix:
        obj = TTMatrix.__new__(TTMatrix)
        obj.cores = list(cores)
        obj._cache = {}
        return obj

    @classmethod
    def from_merged(cls, tt: TensorTrain, row_shape: Sequence[int], col_shape: Sequence[int]) -> TTMatrix:
        """The TT-matrix whose merged tensor train (:meth:`merged`) is ``tt`` (of shape ``(m_k n_k)``): its cores
        reshaped (views), ``tt`` kept as the merged object. ``O(d)``."""
        row_shape, col_shape = as_mode_shapes(row_shape, col_shape)
        if not isinstance(tt, TensorTrain):
            raise TypeError(f"tt must be a TensorTrain, got {type(tt).__name__}")
        if tt.shape != tuple(m * n for m, n in zip(row_shape, col_shape)):
            raise ValueError(f"tt of shape {tt.shape} is not merged from row_shape {row_shape}, col_shape {col_shape}")
        return cls._trusted_merged(tt, row_shape, col_shape)

    @classmethod
    def _trusted_merged(cls, tt: TensorTrain, row_shape: Sequence[int], col_shape: Sequence[int]) -> TTMatrix:
        """:meth:`from_merged` without validation (shapes produced by our own code: a manifold's steps)."""
        A = cls._trusted([c.reshape(c.shape[0], m, n, c.shape[2]) for c, m, n in zip(tt.cores, row_shape, col_shape)])
        A._cache["merged"] = tt
        return A

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(c.shape[1] for c in self.cores)

    @property
    def col_shape(self) -> tuple[int, ...]:
        return tuple(c.shape[2] for c in self.cores)

    @property
    def shape(self) -> tuple[int, int]:
        return (math.prod(self.row_shape), math.prod(self.col_shape))

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(c.shape[3] for c in self.cores[:-1])

    def merged(self) -> TensorTrain:
        """The TensorTrain of the merged modes ``(m_k n_k)`` (row-major: ``i_k n_k + j_k``), each core reshaped
        (views; kept: what is cached on it, a manifold point's frames, lives as long as this object). Cost ``O(d)``."""
        if "merged" not in self._cache:
            self._cache["merged"] = TensorTrain._trusted([c.reshape(c.shape[0], -1, c.shape[3]) for c in self.cores])
        return self._cache["merged"]

    def _check_compatible(self, other: TTMatrix) -> None:
        if (other.row_shape, other.col_shape) != (self.row_shape, self.col_shape):
            raise ValueError(
                f"mode mismatch: row_shape {self.row_shape}, col_shape {self.col_shape} and row_shape "
                f"{other.row_shape}, col_shape {other.col_shape}"
            )

    def inner(self, other: TTMatrix | torch.Tensor) -> torch.Tensor:
        """The Frobenius inner product ``Σ A[i, j] B[i, j]`` with a TTMatrix of the same modes (cost
        ``O(d m n r_A r_B (r_A + r_B))``) or a dense ``(Π m_k, Π n_k)`` tensor (cost ``O(M N r)``)."""
        if isinstance(other, TTMatrix):
            self._check_compatible(other)
            return self.merged().inner(other.merged())
        if isinstance(other, torch.Tensor):
            if tuple(other.shape) != self.shape:
                raise ValueError(f"other must have shape {self.shape}, got {tuple(other.shape)}")
            return self.merged().inner(merge_modes(other, self.row_shape, self.col_shape))
        raise TypeError(f"other must be a TTMatrix or a tensor, got {type(other).__name__}")

    def norm(self) -> torch.Tensor:
        """Frobenius norm (no QR, cheap to differentiate). Cost ``O(d m n r³)``."""
        return self.merged().norm()

    def __add__(self, other: TTMatrix) -> TTMatrix:
        """Sum with ranks ``r_A + r_B`` (no recompression). Cost ``O(d m n (r_A + r_B)²)``."""
        if not isinstance(other, TTMatrix):
            return NotImplemented
        self._check_compatible(other)
        return TTMatrix.from_merged(self.merged() + other.merged(), self.row_shape, self.col_shape)

    def __neg__(self) -> TTMatrix:
        return TTMatrix.from_merged(-self.merged(), self.row_shape, self.col_shape)

    def __sub__(self, other: TTMatrix) -> TTMatrix:
        if not isinstance(other, TTMatrix):
            return NotImplemented
        return self + (-other)

    def __mul__(self, alpha) -> TTMatrix:
        """Scalar multiple. Cost ``O(m n r²)``."""
        if isinstance(alpha, (TTMatrix, TensorTrain)):
            return NotImplemented
        return TTMatrix.from_merged(self.merged() * alpha, self.row_shape, self.col_shape)

    __rmul__ = __mul__

    def __truediv__(self, alpha) -> TTMatrix:
        """``A / alpha`` (alpha nonzero). Cost ``O(m n r²)``."""
        return TTMatrix.from_merged(self.merged() / alpha, self.row_shape, self.col_shape)

    def __repr__(self) -> str:
        return f"TTMatrix(row_shape={self.row_shape}, col_shape={self.col_shape}, ranks={self.ranks})"

    @classmethod
    def from_dense(
        cls,
        A: torch.Tensor,
        row_shape: Sequence[int],
        col_shape: Sequence[int],
        max_rank: int | Sequence[int] | None = None,
        eps: float | None = None,
    ) -> TTMatrix:
        """TT-SVD of the dense ``(Π m_k, Π n_k)`` matrix ``A`` with modes ``(m_k, n_k)`` merged.
        Same accuracy guarantee as :meth:`TensorTrain.from_dense`. Cost ``O((mn)^{d+1} r)``."""
        check_tensor("A", A, 2)
        row_shape, col_shape = as_mode_shapes(row_shape, col_shape)
        if tuple(A.shape) != (math.prod(row_shape), math.prod(col_shape)):
            raise ValueError(
                f"A of shape {tuple(A.shape)} does not match row_shape {row_shape} and col_shape {col_shape}"
            )
        cores = tt_svd(merge_modes(A, row_shape, col_shape), max_rank, eps)
        return cls._trusted([c.reshape(c.shape[0], m, n, c.shape[2]) for c, m, n in zip(cores, row_shape, col_shape)])

    @classmethod
    def random(
        cls,
        row_shape: Sequence[int],
        col_shape: Sequence[int],
        ranks: int | Sequence[int],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> TTMatrix:
        """Gaussian cores scaled by ``1/sqrt(r_{k-1} n_k)``; arguments as in :meth:`TensorTrain.random`.
        Cost ``O(d m n r²)``."""
        row_shape, col_shape = as_mode_shapes(row_shape, col_shape)
        merged = [m * n for m, n in zip(row_shape, col_shape)]
        tt = TensorTrain.random(merged, ranks, dtype=dtype, device=device, generator=generator)
        return cls._trusted(
            [c.reshape(c.shape[0], m, n, c.shape[2]) * math.sqrt(m) for c, m, n in zip(tt.cores, row_shape, col_shape)]
        )

    def full(self) -> torch.Tensor:
        """The dense ``(Π m_k, Π n_k)`` matrix. Built from the right: with ``R_{k+1}: (r_k, m_{k+1}⋯m_d,
        n_{k+1}⋯n_d)`` the part after core k, one product ``(r_{k-1} m_k n_k, r_k) @ (r_k, ·)`` and one transposition
        give ``R_k``, so that each copy moves runs of ``n_{k+1}⋯n_d`` contiguous entries (the last one, of the whole
        matrix, runs of ``N / n_1``). Cost ``Σ_{k<d} r_{k-1} (m_k n_k⋯m_d n_d) r_k`` (``M N r_1`` for the last step),
        memory ``O(M N)``."""
        c = self.cores[-1]
        R = c.reshape(c.shape[0], c.shape[1], c.shape[2])  # (r_{d-1}, m_d, n_d)
        for c in reversed(self.cores[:-1]):
            r0, m, n, r1 = c.shape
            _, Mr, Nr = R.shape
            R = (c.reshape(r0 * m * n, r1) @ R.reshape(r1, Mr * Nr)).reshape(r0, m, n, Mr, Nr)
            R = R.transpose(2, 3).reshape(r0, m * Mr, n * Nr)
        return R.reshape(self.shape)

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Entries at ``index: (N, 2)`` integer ``(row, column)`` pairs of the ``(Π m_k, Π n_k)`` matrix, as
        ``(N,)`` (the ``(N, d)`` convention of every format's ``gather``, here with d = 2). Each pair is split into
        its mode digits (row-major; kept per index tensor, so that a loss evaluated many times at one index splits
        it once) and the merged TT of modes ``(m_k, n_k)`` is gathered. Cost ``O(N d r²)``."""
        index = check_index("index", index, self.shape, self.device)
        rows, cols = self.row_shape, self.col_shape
        merged = _MERGED_INDICES.get(index, (rows, cols), lambda: _merge_index(index, rows, cols))
        return self.merged()._gather(merged)

    def matvec(self, X: torch.Tensor, order: str | None = None) -> torch.Tensor:
        """``A`` applied to each row of the dense batch ``X: (B, Π n_k)``, giving ``(B, Π m_k)``.

        Three contraction orders, with these costs in multiply-adds (:meth:`matvec_cost`):

        - ``"left"``: one sweep ``k = 1 … d``, each step one matrix product with the batch in the long dimension (the
          state after core k holds ``m_1⋯m_k r_k n_{k+1}⋯n_d`` numbers per row): ``B Σ_k m_1⋯m_k n_k⋯n_d r_{k-1} r_k``;
        - ``"right"``: the sweep ``k = d … 1`` (state ``n_1⋯n_{k-1} r_{k-1} m_k⋯m_d``):
          ``B Σ_k n_1⋯n_k m_k⋯m_d r_{k-1} r_k``;
        - ``"full"``: form the dense A (:meth:`full`, ``Σ_{k<d} r_{k-1} (m_k n_k⋯m_d n_d) r_k``), then
          one product ``B M N``: what a dense layer costs, plus the build and ``M N`` memory. Only on request: it
          densifies, which the format exists to avoid.

        ``None`` (default) takes the sweep of least modelled time (:meth:`matvec_time`; never ``"full"``). The sweeps'
        costs differ by large factors when the modes are unbalanced: ``m = (16, 8, 8)``, ``n = (8, 8, 16)``, ranks 8,
        B = 256: left 335M, right 101M (full 277M). Besides its product, each sweep step copies its state once (a
        transposition, so that the next core's mode sits next to the rank): ``O(B · state)``, ``r m_k`` times fewer
        numbers than the product's multiply-adds but strided. Differentiable in X and the cores whatever the order (the
        backward pass costs twice the forward).
        """
        self._check_batch(X)
        if order is None:
            order = min(("left", "right"), key=lambda o: self.matvec_time(X.shape[0], o))
        if order == "left":
            return _sweep_left(self.cores, X)
        if order == "right":
            return _sweep_right(self.cores, X)
        if order == "full":
            return X @ self.full().T
        raise ValueError(f"order must be one of {MATVEC_ORDERS} or None, got {order!r}")

    def _check_batch(self, X: torch.Tensor) -> None:
        """``X`` is a float ``(B, Π n_k)`` batch of A's dtype and device (read from the properties: a δ-object's cores
        are not built for this)."""
        check_tensor("X", X, 2, finite=False)
        check_like("X", X, "A", self)
        if X.shape[1] != self.shape[1]:
            raise ValueError(f"X must have shape (B, {self.shape[1]}), got {tuple(X.shape)}")

    def matvec_cost(self, batch: int, order: str) -> int:
        """Multiply-adds of :meth:`matvec` on ``batch`` rows in ``order`` (``"left"``, ``"right"`` or ``"full"``): the
        cost model :meth:`matvec` chooses its order by."""
        m, n = self.row_shape, self.col_shape
        r = (1, *self.ranks, 1)
        d = len(m)
        if order == "left":
            return batch * sum(math.prod(m[: k + 1]) * math.prod(n[k:]) * r[k] * r[k + 1] for k in range(d))
        if order == "right":
            return batch * sum(math.prod(n[: k + 1]) * math.prod(m[k:]) * r[k] * r[k + 1] for k in range(d))
        if order == "full":
            mn = [a * b for a, b in zip(m, n)]
            build = sum(r[k] * math.prod(mn[k:]) * r[k + 1] for k in range(d - 1))
            return build + batch * math.prod(m) * math.prod(n)
        raise ValueError(f"order must be one of {MATVEC_ORDERS}, got {order!r}")

    def matvec_time(self, batch: int, order: str) -> float:
        """The modelled time of :meth:`matvec` in ``order``, in units of one multiply-add of a large matrix product:
        :meth:`matvec_cost`, times :data:`SWEEP_WEIGHT` for a sweep, plus :data:`FULL_COPY` ``· M N`` for ``"full"``."""
        cost = self.matvec_cost(batch, order)
        return cost + FULL_COPY * self.shape[0] * self.shape[1] if order == "full" else SWEEP_WEIGHT * cost

    def __matmul__(self, X: TensorTrain) -> TensorTrain:
        """``A X`` for a TensorTrain X of shape ``col_shape``: a TT of ranks ``r_A r_X``.
        Cost ``O(d m n r_A² r_X²)``."""
        if not isinstance(X, TensorTrain):
            return NotImplemented
        if X.shape != self.col_shape:
            raise ValueError(f"X must have shape {self.col_shape}, got {X.shape}")
        check_same("A and X", (self.cores[0], X.cores[0]))
        cores = []
        for a, x in zip(self.cores, X.cores):
            ra, m, _, rb = a.shape
            rc, _, re = x.shape
            cores.append(torch.einsum("aijb,cje->acibe", a, x).reshape(ra * rc, m, rb * re))
        return TensorTrain._trusted(cores)


#: The contraction orders of :meth:`TTMatrix.matvec`.
MATVEC_ORDERS = ("left", "right", "full")
#: Time per multiply-add of a sweep of :meth:`TTMatrix.matvec` over one of a large product (which ``"full"`` runs).
#: Measured on a 2-core x86 CPU, 1 thread, float32, forward + backward at batch 16-256 and modes 4-16: 2-4 (the
#: products' inner dimension is only ``r n_k``, and each step copies its state with a strided transposition).
SWEEP_WEIGHT = 3
#: The ``"full"`` order's extra time per entry of A, in multiply-adds: forming A transposes it once, and its
#: gradient once more (same measurements: at 4096 × 4096 and batch 16 these copies dominate).
FULL_COPY = 32


def _sweep_left(cores: Sequence[torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    """:meth:`TTMatrix.matvec` sweeping ``k = 1 … d``. The state before core k is a view of layout
    ``(n_{k+1}⋯n_d · B · m_1⋯m_{k-1}, r_{k-1}, n_k)``; its ``reshape`` to ``(·, r_{k-1} n_k)`` is the step's one copy.
    The product with the core as ``(r_{k-1} n_k, m_k r_k)`` is ``(n_{k+1} · n_{k+2}⋯n_d B m_1⋯m_k, r_k)``, whose
    leading mode is the next core's: rotating it to the end is a view. After the last core the product is
    ``(B m_1⋯m_d, 1)``, the output as it is."""
    B, d = X.shape[0], len(cores)  # explicit sizes below, no -1: B may be 0
    n1 = cores[0].shape[2]
    rest = X.shape[1] // n1 * B  # n_{k+1}⋯n_d · B · m_1⋯m_{k-1}
    S = X.reshape(B, n1, X.shape[1] // n1).permute(2, 0, 1)  # (n_2⋯n_d, B, n_1): r_0 = 1
    for k, c in enumerate(cores):
        r0, m, n, r1 = c.shape
        Y = S.reshape(rest, r0 * n) @ c.permute(0, 2, 1, 3).reshape(r0 * n, m * r1)
        if k + 1 < d:
            nxt = cores[k + 1].shape[2]
            rest = rest // nxt * m
            S = Y.reshape(nxt, rest, r1).permute(1, 2, 0)
    return Y.reshape(B, rest * m // B if B else math.prod(c.shape[1] for c in cores))


def _sweep_right(cores: Sequence[torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    """:meth:`TTMatrix.matvec` sweeping ``k = d … 1``, the mirror of :func:`_sweep_left`. The state before core k is a
    view of layout ``(m_{k+1}⋯m_d · B · n_1⋯n_{k-1}, n_k, r_k)`` (before core d: X itself, no copy). The product with
    the core as ``(n_k r_k, r_{k-1} m_k)`` is ``(·, r_{k-1}, m_k)``, and ``m_k`` rotates to the front (a view). After
    core 1 the state is ``(m_1⋯m_d, B)``: its transpose is the output (a view)."""
    B = X.shape[0]  # explicit sizes below, no -1: B may be 0
    rest = B * X.shape[1] // cores[-1].shape[2]  # m_{k+1}⋯m_d · B · n_1⋯n_{k-1}
    S = X.reshape(rest, cores[-1].shape[2])  # r_d = 1
    for k in range(len(cores) - 1, -1, -1):
        r0, m, n, r1 = cores[k].shape
        Y = S.reshape(rest, n * r1) @ cores[k].permute(2, 3, 0, 1).reshape(n * r1, r0 * m)
        S = Y.reshape(rest, r0, m).permute(2, 0, 1)
        if k > 0:
            rest = rest // cores[k - 1].shape[2] * m
    return S.reshape(math.prod(c.shape[1] for c in cores), B).T


_MERGED_INDICES = IndexCache(16)


def _merge_index(index: torch.Tensor, row_shape: Sequence[int], col_shape: Sequence[int]) -> torch.Tensor:
    """``(N, 2)`` (row, column) pairs as ``(N, d)`` indices of the merged modes ``i_k n_k + j_k``. ``O(N d)``."""
    rows, cols = index[:, 0], index[:, 1]
    merged = []
    for m, n in zip(reversed(row_shape), reversed(col_shape)):
        merged.append((rows % m) * n + cols % n)
        rows, cols = rows // m, cols // n
    return torch.stack(merged[::-1], 1)


def merge_modes(A: torch.Tensor, row_shape: Sequence[int], col_shape: Sequence[int]) -> torch.Tensor:
    """The dense ``(Π m_k, Π n_k)`` matrix ``A`` as the tensor of merged modes ``(m_1 n_1, ..., m_d n_d)`` (one
    permutation: a copy of ``M N`` entries), the layout of a TT-matrix's merged tensor train."""
    d = len(row_shape)
    T = A.reshape(*row_shape, *col_shape).permute([p for k in range(d) for p in (k, d + k)])
    return T.reshape([m * n for m, n in zip(row_shape, col_shape)])
