"""The completion problem ``f(X) = ½ ‖P_Ω X − values‖²``: the loss, its closed form on fixed-rank matrices, the
held-out error, and :class:`CompletionProblem`, which hands :func:`~lowrankopt.minimize` its objective for a stage."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from .._checks import check_tensor
from ..formats.lowrank import LowRankMatrix
from ..formats.tt import TensorTrain
from ..manifolds import manifold_of
from ..manifolds.fixed_rank import FixedRankMatrices
from ..manifolds.tangent import TangentVector

__all__ = [
    "Collectives",
    "CompletionProblem",
    "HeldOut",
    "MatrixLeastSquares",
    "Point",
    "SingleProcess",
    "completion_loss",
    "entries",
]

Point = LowRankMatrix | TensorTrain  # a point of a completion problem (a matrix, or a tensor train)


def completion_loss(indices: torch.Tensor, values: torch.Tensor) -> Callable:
    """``f(X) = ½ ‖X[indices] − values‖²`` for a LowRankMatrix (indices ``(N, 2)``) or a TensorTrain
    (indices ``(N, d)``). Cost: one ``gather``."""
    check_tensor("values", values, 1)
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.shape[0] != values.shape[0]:
        raise ValueError(f"indices must be an (N, d) tensor with N = len(values) = {values.shape[0]}")
    return lambda X: 0.5 * ((entries(X, indices) - values) ** 2).sum()


def entries(X: Point, indices: torch.Tensor) -> torch.Tensor:
    """The entries ``(N,)`` of a LowRankMatrix / TensorTrain at ``indices (N, d)`` (a TypeError for anything else:
    a dense tensor's ``gather`` is torch's, with another meaning). Cost: one ``gather``."""
    if isinstance(X, torch.Tensor) or not hasattr(X, "gather"):
        raise TypeError(f"the point must be a LowRankMatrix or a TensorTrain, got {type(X).__name__}")
    d = len(X.shape)
    if isinstance(indices, torch.Tensor) and (indices.dim() != 2 or indices.shape[1] != d):
        raise ValueError(
            f"indices must have shape (N, {d}) for a point of shape {tuple(X.shape)}, got {tuple(indices.shape)}"
        )
    return X.gather(indices)


class MatrixLeastSquares:
    """``f(X) = ½ ‖P_Ω X − values‖²`` on fixed-rank matrices in closed form, with the observed pattern
    held as CSR (and its transpose) so that every product is a sampled dense-dense or a sparse-dense product:

    - ``P_Ω X`` for ``X = (US) Vᵀ``: ``sampled_addmm`` over the pattern, ``O(N r)``;
    - gradient ``P_x(S)`` with ``S = P_Ω X − values`` (sparse): ``A = S V``, ``B = (I − VVᵀ) Sᵀ U``,
      two CSR products, ``O(N r + (m + n) r²)``;
    - Gauss–Newton Hessian ``P_x P_Ω P_x`` applied to ξ (for least squares exactly the Hessian without the
      curvature term): ``P_Ω ξ`` by ``sampled_addmm`` with the rank-2r factors ``[A U] [V B]ᵀ``, then as above.

    No autograd tape and no ``(N, r)`` gathered temporaries. The residual of the last point is kept.

    Repeated positions (a CSR pattern must not repeat one): the ``c`` observations ``v_t`` of one entry are kept as
    one, with weight c and their mean ``v̄``, since ``½ Σ_t (x − v_t)² = ½ c (x − v̄)² + ½ Σ_t (v_t − v̄)²`` (the last
    sum, a constant, is added to f).
    """

    def __init__(
        self, indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], manifold: FixedRankMatrices
    ) -> None:
        m, n = shape
        # distinct positions in row-major (CSR) order, with their counts and the mean of their values
        keys, inverse, counts = torch.unique(indices[:, 0] * n + indices[:, 1], return_inverse=True, return_counts=True)
        rows, cols = keys // n, keys % n
        self.vals = torch.zeros(len(keys), dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
        self.vals /= counts
        self.weights = None if len(keys) == len(values) else counts.to(values.dtype)
        self.offset = 0.0 if self.weights is None else 0.5 * ((values - self.vals[inverse]) ** 2).sum()
        self.M = manifold
        self.pattern = self._csr(rows, cols, m, n)
        t_order = torch.argsort(cols * m + rows)  # CSR order of the transpose
        self.t_perm = t_order
        self.t_pattern = self._csr(cols[t_order], rows[t_order], n, m)
        self._last = (None, None)  # (point, residual): f and the gradient at one point share it

    def on(self, manifold: FixedRankMatrices) -> MatrixLeastSquares:
        """The same problem on ``manifold`` (another rank: a stage of the rank continuation), sharing the pattern
        (no new sort). Cost O(1)."""
        other = copy.copy(self)  # (the kept residual is keyed by its point, which has one rank)
        other.M = manifold
        return other

    def _weighted(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (values at the distinct positions) times the number of observations of each position."""
        return t if self.weights is None else t * self.weights

    def _csr(self, r, c, m, n):
        crow = torch.zeros(m + 1, dtype=torch.int64, device=r.device)
        crow[1:] = torch.cumsum(torch.bincount(r, minlength=m), 0)
        return crow, c

    def _sparse(self, values, transpose=False):
        crow, col = self.t_pattern if transpose else self.pattern
        shape = (self.M.n, self.M.m) if transpose else (self.M.m, self.M.n)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the kernels used here are stable
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)

    def _sample(self, L, R):
        """``(L Rᵀ)`` at the pattern, in CSR order."""
        return torch.sparse.sampled_addmm(self._sparse(torch.zeros_like(self.vals)), L, R.T, beta=0.0).values()

    def _project_sparse(self, x, values):
        U, _, V = self.M.frames(x)
        A = self._sparse(values) @ V
        B = self._sparse(values[self.t_perm], transpose=True) @ U
        return TangentVector(self.M, x, self.M.gauge(x, [A, B]))

    def residual(self, x: LowRankMatrix) -> torch.Tensor:
        """``P_Ω X − values`` at the distinct positions (CSR order); kept for the last point. Cost ``O(N r + m r²)``."""
        if self._last[0] is not x:
            U, S, V = self.M.frames(x)
            self._last = (x, self._sample(U @ S, V) - self.vals)
        return self._last[1]

    def euclidean_gradient(self, x: LowRankMatrix) -> tuple[torch.Tensor, torch.Tensor]:
        """The Euclidean gradient ``P_Ω X − values`` (weighted by the counts) as sparse CSR matrices ``(G, Gᵀ)``.
        Cost :meth:`residual`, then ``O(N)``."""
        g = self._weighted(self.residual(x))
        return self._sparse(g), self._sparse(g[self.t_perm], transpose=True)

    def line_coefficients(self, x: LowRankMatrix, L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """``[a, b]`` with ``f(X + t L Rᵀ) = f(X) + a t + ½ b t²`` (exact: f is quadratic), i.e.
        ``a = ⟨P_Ω X − values, P_Ω(L Rᵀ)⟩`` and ``b = ‖P_Ω(L Rᵀ)‖²`` (weighted by the counts). Cost ``O(N k)`` for
        k columns of L and R, plus :meth:`residual`."""
        d = self._sample(L, R)
        w = self._weighted(d)
        return torch.stack([(w * self.residual(x)).sum(), (w * d).sum()])

    def value(self, x: LowRankMatrix) -> torch.Tensor:
        """``f(x)``, a 0-dim tensor. Cost: :meth:`residual`."""
        r = self.residual(x)
        return 0.5 * (self._weighted(r) * r).sum() + self.offset

    def grad(self, x: LowRankMatrix) -> TangentVector:
        """The Riemannian gradient ``P_x(P_Ω X − values)``. Cost ``O(N r + (m + n) r²)``."""
        return self._project_sparse(x, self._weighted(self.residual(x)))

    def curvature_along(self, x: LowRankMatrix, v: TangentVector) -> torch.Tensor:
        """``⟨ξ, P_x P_Ω P_x ξ⟩ = ‖P_Ω ξ‖²``: one sampled product, no projection. Cost ``O(N r)``."""
        s = self._sample_tangent(x, v)
        return (self._weighted(s) * s).sum()

    def _sample_tangent(self, x, v):
        U, _, V = self.M.frames(x)
        A, B = v.coords
        return self._sample(torch.cat([A, U], 1), torch.cat([V, B], 1))

    def hvp(self, x: LowRankMatrix, v: TangentVector) -> TangentVector:
        """The Gauss–Newton Hessian ``P_x P_Ω P_x ξ``. Cost ``O(N r + (m + n) r²)``."""
        return self._project_sparse(x, self._weighted(self._sample_tangent(x, v)))


class Collectives(Protocol):
    """What the pieces of :func:`~lowrankopt.complete` need from the processes that hold the shards of the data:
    :class:`SingleProcess` (one process, every method the identity or a no-op) or
    :class:`~lowrankopt.distributed.ShardedRun` (see there for what each does and costs)."""

    traffic: dict | None

    def reduce(self, t: torch.Tensor) -> torch.Tensor: ...
    def reduce_tangent(self, v: TangentVector) -> TangentVector: ...
    def quiet(self, t: torch.Tensor) -> torch.Tensor: ...
    def value(self, fn: Callable) -> Callable: ...
    def tangent(self, fn: Callable) -> Callable: ...
    def guard(self, fn: Callable, fallback: Callable) -> Any: ...
    def norm(self, t: torch.Tensor) -> float: ...
    def objective(self, f_shard: Callable, curvature: bool) -> tuple[Callable, Callable, Callable] | None: ...
    def check(self, x: Point, iteration: int) -> None: ...
    def stop_all(self) -> bool: ...
    def finish(self, res: Any) -> None: ...


class SingleProcess:
    """The :class:`Collectives` of one process: sums over one shard are the values themselves, nothing to agree on,
    guard or check (every method is the identity or a no-op, cost O(1))."""

    traffic = None

    @staticmethod
    def reduce(t: Any) -> Any:
        """``t`` (a tensor, or a tangent vector for :meth:`reduce_tangent`)."""
        return t

    reduce_tangent = quiet = reduce

    @staticmethod
    def value(fn: Callable) -> Callable:
        """``fn`` itself (nothing to guard); also :meth:`tangent`."""
        return fn

    tangent = value

    @staticmethod
    def guard(fn: Callable, fallback: Callable) -> Any:
        """``fn()``: an exception propagates (no other process to warn)."""
        return fn()

    @staticmethod
    def norm(t: torch.Tensor) -> float:
        """``‖t‖``."""
        return float(torch.linalg.vector_norm(t))

    @staticmethod
    def objective(f_shard: Callable, curvature: bool) -> None:
        """None: :func:`~lowrankopt.minimize` differentiates ``f_shard`` itself."""
        return None

    @staticmethod
    def check(x: Point, iteration: int) -> None:
        """Nothing to compare."""

    @staticmethod
    def stop_all() -> bool:
        """False: no other process can fail."""
        return False

    @staticmethod
    def finish(res: Any) -> None:
        """Nothing to agree on or record."""


class HeldOut:
    """Held-out entries Γ (this process's shard of them): :meth:`error` is ``‖P_Γ(X − A)‖ / ‖P_Γ A‖`` (+inf when
    the held-out values are all zero and X is not there). Cost: one ``gather`` (and one uncounted all-reduce)."""

    def __init__(
        self, indices: torch.Tensor, values: torch.Tensor, run: Collectives, point: Callable | None = None
    ) -> None:
        self.indices, self.values, self.run, self.point = indices, values, run, point
        self.norm = run.norm(values)

    def error(self, x: Point) -> float:
        """The relative held-out error of ``x`` (over every process's held-out entries); ``point(x)`` first, when
        the solver's points are in other coordinates (:mod:`~lowrankopt.completion.scaling`)."""
        if self.point is not None:
            x = self.point(x)
        with torch.no_grad():
            sq = self.run.value(lambda x: (entries(x, self.indices) - self.values).square().sum())(x)
            return relative(math.sqrt(float(self.run.quiet(sq))), self.norm)


def relative(err: float, norm: float) -> float:
    """``err / norm``, with the limits of a zero reference: 0 for a perfect fit of zero data, +inf otherwise."""
    if norm > 0:
        return err / norm
    return 0.0 if err == 0 else math.inf


class CompletionProblem:
    """``f(X) = ½ ‖P_Ω X − values‖²`` over this process's observed entries (``indices (N, d)``, ``values (N,)``),
    summed over the processes by ``run`` (:class:`Collectives`: :class:`SingleProcess` or
    :class:`~lowrankopt.distributed.ShardedRun`); :attr:`norm` is ``‖values‖`` over every process.

    :meth:`objective` gives :func:`~lowrankopt.minimize` its ``f`` and options at a point's manifold: for matrices
    with the Gauss–Newton Hessian (``curvature=False``), the closed forms of :class:`MatrixLeastSquares` (value,
    gradient, Hessian product, and ``‖P_Ω η‖²`` for the exact linearized line search); otherwise the δ-trick
    autodiff of ``loss`` (sharded: :meth:`ShardedRun.objective`). Every shard-local computation is guarded by
    ``run``, so that with distributed data a shard that raises adds NaN to the sums instead of leaving the other
    processes in a collective.
    """

    def __init__(
        self,
        indices: torch.Tensor,
        values: torch.Tensor,
        shape: Sequence[int],
        loss: Callable,
        *,
        curvature: bool,
        run: Collectives,
    ) -> None:
        self.indices, self.values, self.shape = indices, values, list(shape)
        self.loss, self.curvature, self.run = loss, curvature, run
        self.norm = math.sqrt(float(run.reduce(values.square().sum())))  # ‖values‖ over every process
        self._least_squares: MatrixLeastSquares | None = None

    def least_squares(self, x: LowRankMatrix) -> MatrixLeastSquares:
        """The closed forms of this process's shard (:class:`MatrixLeastSquares`) on x's manifold; the pattern is
        sorted once (``O(N log N)``) and shared by every stage."""
        M = manifold_of(x)
        if self._least_squares is None:
            self._least_squares = MatrixLeastSquares(self.indices, self.values, self.shape, M)
        return self._least_squares.on(M)

    def objective(self, x: Point, method: str, options: dict) -> tuple[Callable, dict]:
        """``(f, options)`` for :func:`~lowrankopt.minimize` from ``x`` with ``method``: ``options`` with the
        problem's ``grad``, ``hvp`` and ``manifold`` (and a default ``initial_step``) where it provides them."""
        options = dict(options)
        if len(self.shape) == 2 and not self.curvature:
            return self._closed_form(x, method, options)
        sharded = self.run.objective(self.loss, self.curvature)
        if sharded is None:
            return self.loss, options
        f, grad, hvp = sharded
        options.update(grad=grad, hvp=hvp, manifold=manifold_of(x))
        return f, options

    def _closed_form(self, x, method: str, options: dict) -> tuple[Callable, dict]:
        lsq = self.least_squares(x)
        run = self.run
        options.update(
            grad=lambda x: run.reduce_tangent(run.tangent(lsq.grad)(x)),
            hvp=lambda x, v: run.reduce_tangent(run.tangent(lsq.hvp)(x, v)),
            manifold=lsq.M,
        )
        if method != "trust-region":
            # the exact line search of the linearized problem, α = −⟨g, η⟩ / ‖P_Ω η‖², without Hessian products.
            # (For TT the Hessian product is cheaper than a standalone δ-gather: it shares the gradient pass's
            # index plans and interfaces.)
            options.setdefault("initial_step", lambda x, v: run.reduce(run.value(lsq.curvature_along)(x, v)))
        return lambda x: run.reduce(run.value(lsq.value)(x)), options
