"""Low-rank matrix and tensor-train completion: ``complete(indices, values, shape, rank)``.

Minimizes ``f(X) = ½ ‖P_Ω(X) − values‖²`` over matrices of rank r (:class:`FixedRankMatrices`) or
tensors of TT-rank r (:class:`FixedTTRank`) with :func:`minimize`. ``method="cg"`` is LRGeomCG
(Vandereycken 2013) for matrices and RTTC (Steinlechner 2016) for tensor trains: nonlinear CG, vector
transport by projection, and the exact line search of the linearized problem (the quadratic-model step
with ``curvature=False``), the default. ``method="trust-region"`` solves trust-region subproblems with the
same Hessian (Gauss–Newton); ``curvature=True`` uses the exact Riemannian Hessian.

Start points: matrices start from the rank-r truncated SVD of the zero-filled ``P_Ω A`` (LRGeomCG's
``make_start_x``, computed matrix-free by a randomized range finder on the sparse matrix); tensor trains
from the best constant tensor with rank continuation (a few iterations at TT-rank 1, 2, …, each stage
grown by a tiny random rank-1 term), because for d ≫ 2 a random TT-rank-r start is almost orthogonal to
the target and its tangent space.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

import torch

from ._checks import as_int, as_rank_list, as_shape, check_index, check_random_options, check_tensor
from .autodiff import manifold_of
from .formats.lowrank import LowRankMatrix
from .formats.tt import TensorTrain
from .manifolds.fixed_rank import FixedRankMatrices
from .manifolds.tangent import TangentVector
from .manifolds.tt import FixedTTRank
from .optim import OptimizeResult, minimize
from .optim.result import CALLBACK

__all__ = ["complete", "sample_indices", "completion_loss"]

_DEFAULT_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def sample_indices(shape, count: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """``count`` distinct multi-indices drawn uniformly at random from a tensor of ``shape``.

    Returns an int64 tensor ``(count, len(shape))`` in random order. Cost ``O(count log count)``: draws
    linear indices with replacement, keeps the distinct ones and tops up until there are enough, so the
    ``Π shape`` index space is never materialized. ``shape`` and ``count`` take Python or numpy/torch integers.
    """
    shape = as_shape("shape", shape)
    _, device, _ = check_random_options(torch.float64, device, generator)  # (checks the device and the generator)
    total = math.prod(shape)
    count = as_int("count", count, minimum=0)
    if count > total:
        raise ValueError(f"count must be an int in [0, {total}] (the number of entries), got {count!r}")
    if total >= 2**63:
        raise ValueError(f"shape {tuple(shape)} has more than 2^63 entries; linear indices would overflow int64")
    gdev = generator.device if generator is not None else torch.device("cpu")
    chosen = torch.empty(0, dtype=torch.int64, device=gdev)
    while chosen.numel() < count:
        need = count - chosen.numel()
        draw = torch.randint(0, total, (need + need // 8 + 16,), generator=generator, device=gdev)
        chosen = torch.unique(torch.cat([chosen, draw]))
        if total - chosen.numel() < need and count > total // 2:  # dense request: take a permutation
            chosen = torch.randperm(total, generator=generator, device=gdev)[:count]
            break
    chosen = chosen[torch.randperm(chosen.numel(), generator=generator, device=gdev)[:count]]
    idx = torch.stack(torch.unravel_index(chosen, tuple(shape)), dim=1)
    return idx.to(device if device is not None else gdev)


def completion_loss(indices: torch.Tensor, values: torch.Tensor):
    """``f(X) = ½ ‖X[indices] − values‖²`` for a LowRankMatrix (indices ``(N, 2)``) or a TensorTrain
    (indices ``(N, d)``). Cost: one ``gather``."""
    check_tensor("values", values, 1)
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.shape[0] != values.shape[0]:
        raise ValueError(f"indices must be an (N, d) tensor with N = len(values) = {values.shape[0]}")
    return lambda X: 0.5 * ((_entries(X, indices) - values) ** 2).sum()


class _MatrixLeastSquares:
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

    def __init__(self, indices, values, shape, manifold):
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
        return TangentVector(self.M, x, self.M._gauge(x, [A, B]))

    def residual(self, x):
        if self._last[0] is not x:
            _, _, V = self.M.frames(x)
            self._last = (x, self._sample(x._cache["US"], V) - self.vals)
        return self._last[1]

    def value(self, x):
        r = self.residual(x)
        return 0.5 * (self._weighted(r) * r).sum() + self.offset

    def grad(self, x):
        return self._project_sparse(x, self._weighted(self.residual(x)))

    def curvature_along(self, x, v) -> torch.Tensor:
        """``⟨ξ, P_x P_Ω P_x ξ⟩ = ‖P_Ω ξ‖²``: one sampled product, no projection. Cost ``O(N r)``."""
        s = self._sample_tangent(x, v)
        return (self._weighted(s) * s).sum()

    def _sample_tangent(self, x, v):
        U, _, V = self.M.frames(x)
        A, B = v.coords
        return self._sample(torch.cat([A, U], 1), torch.cat([V, B], 1))

    def hvp(self, x, v):
        return self._project_sparse(x, self._weighted(self._sample_tangent(x, v)))


def _entries(X, indices):
    """The entries of a LowRankMatrix / TensorTrain at ``indices (N, d)`` (named errors for anything else)."""
    if isinstance(X, LowRankMatrix):
        if indices.shape[1] != 2:
            raise ValueError(f"indices must have 2 columns for a LowRankMatrix, got shape {tuple(indices.shape)}")
        return X.gather(indices[:, 0], indices[:, 1])
    if isinstance(X, torch.Tensor) or not hasattr(X, "gather"):
        raise TypeError(f"the point must be a LowRankMatrix or a TensorTrain, got {type(X).__name__}")
    return X.gather(indices)


def _spectral_start(
    indices, values, shape, rank, generator, oversample: int = 10, power_iters: int = 4, reduce=lambda t: t
):
    """Rank-``rank`` truncated SVD of the zero-filled sparse matrix, by a randomized range finder with
    power iterations (Halko–Martinsson–Tropp). Cost ``O((N + (m + n) q) q · power_iters)``, q = rank +
    oversample; never forms the dense matrix. ``reduce`` sums each sparse product over the processes that hold
    the other shards of the entries (identity in one process)."""
    m, n = shape
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the kernels used here are stable
        warnings.simplefilter("ignore", UserWarning)
        # a repeated position enters with the mean of its observations (coalesce sums them: divide by the count)
        A = torch.sparse_coo_tensor(indices.T, values, (m, n), check_invariants=False).coalesce()
        counts = torch.sparse_coo_tensor(indices.T, torch.ones_like(values), (m, n), check_invariants=False)
        A = torch.sparse_coo_tensor(A.indices(), A.values() / counts.coalesce().values(), (m, n)).coalesce()
        At = A.t().coalesce().to_sparse_csr()
        A = A.to_sparse_csr()
    q = min(rank + oversample, m, n)
    gdev = generator.device if generator is not None else values.device
    omega = torch.randn(n, q, dtype=values.dtype, device=gdev, generator=generator).to(values.device)
    Q = torch.linalg.qr(reduce(A @ omega))[0]
    for _ in range(power_iters):
        Q = torch.linalg.qr(reduce(A @ torch.linalg.qr(reduce(At @ Q))[0]))[0]
    B = reduce(At @ Q).T  # Qᵀ A, shape (q, n)
    Ub, s, Vh = torch.linalg.svd(B, full_matrices=False)
    return LowRankMatrix._trusted(Q @ Ub[:, :rank], torch.diag(s[:rank]), Vh[:rank].T)


def complete(
    indices,
    values: torch.Tensor,
    shape,
    rank,
    *,
    method: str = "cg",
    test: tuple | None = None,
    x0=None,
    tol: float | None = None,
    max_iter: int = 1000,
    warmup_iters: int = 8,
    curvature: bool = False,
    generator: torch.Generator | None = None,
    monitor: Callable | None = None,
    distributed: bool = False,
    group=None,
    check_every: int = 10,
    **options,
) -> OptimizeResult:
    """Complete a matrix (``len(shape) == 2``) or a tensor (tensor train) of rank ``rank`` from its
    entries ``values`` at ``indices``.

    Args:
        indices: ``(N, d)`` integer tensor of observed positions (Ω; use :func:`sample_indices`). A position given
            k times is k observations: each counts in the least-squares loss.
        values: ``(N,)`` float32/float64 observed entries.
        shape: the shape of the full matrix / tensor.
        rank: matrix rank, or TT-ranks (an int or the d − 1 inner ranks).
        method: ``"cg"`` (default; LRGeomCG / RTTC: PR+ CG with the exact linearized line search),
            ``"trust-region"`` (Riemannian Gauss–Newton in a trust region, or the exact Hessian with
            ``curvature=True``) or ``"sd"`` — see :func:`minimize`. In docs/benchmarks.md CG was the faster
            of the two, except on the smallest matrix problems where they were equal.
        test: optional ``(indices, values)`` of held-out entries Γ; the relative test error
            ``‖P_Γ(X − A)‖ / ‖P_Γ A‖`` is recorded in the history (its cost is not counted in ``time``).
        x0: start point (LowRankMatrix / TensorTrain of the target rank); default as in the module doc.
        tol: stop when the relative training residual ``‖P_Ω X − values‖ / ‖values‖ ≤ tol``
            (default 1e-12 in float64, 1e-5 in float32).
        max_iter: iterations at the target rank (the rank-continuation stages take ``warmup_iters``
            each on top).
        curvature: Hessian used by the quadratic-model steps and the trust-region method (see
            :func:`minimize`); the default False gives the exact line search of LRGeomCG / RTTC.
        generator: for the randomized start (deterministic given it).
        monitor: ``monitor(intermediate_result)`` after every iteration, once ``history[-1]`` has the
            errors (e.g. to print progress); its time is not counted in ``solve_time``.
        distributed: each process of ``group`` (default: the default process group of ``torch.distributed``)
            passes its own shard of the observed entries (and of ``test``); f, its gradient, Hessian products and
            the line-search scalar are sums over the shards, all-reduced in δ-coordinates (``O((m + n) r)`` or
            ``O(d n r²)`` numbers per reduction, independent of the number of entries). Every process gets the same
            result; give every process the same ``generator`` seed and ``x0``.
            An exception on one process (in ``monitor``, or in its shard's loss) stops every process at the same
            iteration and is raised on all of them: the original where it happened, a ``RuntimeError`` naming that
            process elsewhere (one all-reduce of ``world_size`` integers per iteration agrees on it).
        group: the process group (``distributed=True``).
        check_every: with ``distributed``, compare a checksum of the point across processes every this many
            iterations (``RuntimeError`` if they differ).
        **options: passed to :func:`minimize` (``gtol`` defaults to 0 here: ``tol`` decides).

    Returns:
        The :class:`OptimizeResult` of the final stage, with ``train_error`` and ``test_error`` (final
        relative errors; test only with ``test``), and ``history`` covering all stages; each record has
        ``rank``, ``train_error``, ``test_error`` (+inf when the held-out values are all zero and X is not there)
        and ``solve_time`` (seconds since the call, including the
        start-point computation, without the time spent on test errors and ``monitor``). With ``distributed``,
        ``communication`` holds the ``bytes`` all-reduced by this process and the number of ``calls``. If a
        rank-continuation stage already reaches ``tol``, its point — of lower TT-rank — is returned (check
        ``res.x.ranks``): the data are explained by fewer parameters. If all ``values`` are zero, the answer is
        the zero tensor, returned at once (``nit == 0``, success, the message says so) in the format of rank
        ``rank`` with a zero ``S`` / first core: it has rank 0, so it is not a point of the fixed-rank manifold
        (its exact Hessian is undefined); ``x0`` is then only checked.
    """
    error = None
    try:  # with distributed, a rank that rejects its input must not leave the others waiting in a collective
        check_tensor("values", values, 1)
        shape = list(as_shape("shape", shape))
        d = len(shape)
        if d < 2:
            raise ValueError(f"shape must have at least 2 modes, got {shape}")
        indices = check_index("indices", indices, shape, values.device)
        if indices.shape[0] != values.shape[0]:
            raise ValueError(f"indices has {indices.shape[0]} rows but values has {values.shape[0]} entries")
        if values.shape[0] == 0 and not distributed:  # with distributed, the total count is checked below
            raise ValueError("values is empty: nothing to complete from")
        if test is not None:
            if not isinstance(test, (tuple, list)) or len(test) != 2:
                raise TypeError(f"test must be a pair (indices (N, d), values (N,)), got {type(test).__name__}")
            test_idx, test_vals = test
            check_tensor("test values", test_vals, 1)
            test_idx = check_index("test indices", test_idx, shape, values.device)
            if test_idx.shape[0] != test_vals.shape[0] or test_vals.dtype != values.dtype:
                raise ValueError("test must be (indices (N, d), values (N,)) with the dtype of values")
            test_norm = float(torch.linalg.vector_norm(test_vals))
        tol = _DEFAULT_TOL.get(values.dtype, 1e-12) if tol is None else tol
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
            raise ValueError(f"tol must be a non-negative number, got {tol!r}")
        if isinstance(warmup_iters, bool) or not isinstance(warmup_iters, int) or warmup_iters < 0:
            raise ValueError(f"warmup_iters must be a non-negative int, got {warmup_iters!r}")
        check_random_options(values.dtype, None, generator)  # (checks the generator)
        if monitor is not None and not callable(monitor):
            raise TypeError(f"monitor must be callable or None, got {type(monitor).__name__}")
        if x0 is not None and getattr(x0, "dtype", None) != values.dtype:
            raise TypeError(f"x0 must have the dtype of values ({values.dtype}), got {getattr(x0, 'dtype', None)}")
        options.setdefault("gtol", 0.0)
        if distributed and "max_time" in options:
            raise ValueError("max_time would stop the processes at different iterations; use max_iter with distributed")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be a positive int, got {check_every!r}")
        if distributed and generator is None:
            raise ValueError("distributed=True needs a generator, seeded the same on every process")
        if "callback" in options:
            raise TypeError("complete() records its own callback; use minimize() with completion_loss() for yours")
    except (TypeError, ValueError) as exc:
        if not distributed:
            raise
        error = exc
    if distributed:
        from . import distributed as dist_helpers

        call = (test is not None, str(getattr(values, "dtype", None)), tuple(int(n) for n in shape), str(rank))
        call += (method, max_iter, warmup_iters, curvature, check_every, tol, x0 is not None)
        call += tuple(sorted((k, _option_digest(v)) for k, v in options.items()))  # they choose the collectives
        dist_helpers.agree(error, call, group=group)  # raises on every process, or on none
        traffic: dict = {}
        failures = dist_helpers.Failures(group)  # an exception on one process ends the run on all of them
        guard, value, tangent = failures.guard, failures.value, failures.tangent
        reduce, reduce_tangent = dist_helpers.reducers(group, traffic)
        quiet, _ = dist_helpers.reducers(group)  # test errors: not part of the solve's traffic
        if int(quiet(torch.tensor([len(values)], device=values.device))) == 0:
            raise ValueError("values is empty on every process: nothing to complete from")
        if test is not None:
            test_norm = math.sqrt(float(quiet(test_vals.square().sum())))
    else:
        reduce, reduce_tangent = (lambda t: t), (lambda v: v)
        quiet = reduce
        guard, value, tangent = _unguarded, _as_is, _as_is
    loss = completion_loss(indices, values)
    vals_norm = math.sqrt(float(reduce(values.square().sum())))
    if vals_norm == 0:  # the fit is the zero tensor: start there, where f and its gradient vanish (x0 only checked)
        x0 = _zero_point(shape, rank, values, x0, distributed)
    t_start, overhead = time.perf_counter(), [0.0]
    history: list[dict] = []
    base = {"iter": 0, "nfev": 0, "ngev": 0, "nhev": 0, "time": 0.0, "rank": 0, "failed": False}

    def callback(res):
        t = time.perf_counter()
        rec = res.history[-1]
        for key in ("iter", "nfev", "ngev", "nhev", "time"):  # numbering continues across stages
            rec[key] += base[key]
        rec["rank"] = base["rank"]
        rec["train_error"] = _relative(math.sqrt(2 * max(res.fun, 0.0)), vals_norm)
        if test is not None:
            with torch.no_grad():
                sq = value(lambda x: (_entries(x, test_idx) - test_vals).square().sum())(res.x)
                err = math.sqrt(float(quiet(sq)))
            rec["test_error"] = _relative(err, test_norm)
        if distributed and rec["iter"] % check_every == 0:
            dist_helpers.check_identical(res.x, group=group)
        rec["solve_time"] = t - t_start - overhead[0]
        if monitor is not None:
            guard(lambda: monitor(res), lambda: None)
        stop = rec["train_error"] <= tol
        if distributed and failures.any():  # one collective per iteration: every process stops here together
            stop = base["failed"] = True
        overhead[0] += time.perf_counter() - t
        return stop

    def stage(x, r, iters):
        opts = dict(options)
        if method == "trust-region":
            # Manopt's defaults assume unit scale; completion points and gradients have the data's scale
            # (‖x‖ ~ ‖A‖ and tiny δ-gradients for large tensors): radius cap ‖x‖, inner test relative to ‖g(x0)‖.
            opts.setdefault("max_radius", max(float(x.norm()), math.sqrt(manifold_of(x).dim)))
            opts.setdefault("gradient_scale", "initial")
        base["rank"] = r
        f, curvature_along = loss, None
        if d == 2 and not curvature:
            lsq = _MatrixLeastSquares(indices, values, shape, manifold_of(x))
            # value/tangent: with distributed, a shard that raises adds NaN to the sums instead of leaving the other
            # processes in the collective
            opts.update(
                grad=lambda x: reduce_tangent(tangent(lsq.grad)(x)),
                hvp=lambda x, v: reduce_tangent(tangent(lsq.hvp)(x, v)),
                manifold=lsq.M,
            )
            f = lambda x: reduce(value(lsq.value)(x))  # noqa: E731
            curvature_along = lambda x, v: reduce(value(lsq.curvature_along)(x, v))  # noqa: E731
        elif distributed:
            f, grad, hvp = dist_helpers.sharded_objective(
                loss, curvature=curvature, group=group, traffic=traffic, failures=failures
            )
            opts.update(grad=grad, hvp=hvp, manifold=manifold_of(x))
        if method != "trust-region" and curvature_along is not None:
            # the exact line search of the linearized problem, α = −⟨g, η⟩ / ‖P_Ω η‖², without Hessian products.
            # (For TT the Hessian product is cheaper than a standalone δ-gather: it shares the gradient pass's
            # index plans and interfaces.)
            opts.setdefault("initial_step", curvature_along)
        start = dict(base)
        res = minimize(f, x, method, max_iter=iters, curvature=curvature, callback=callback, **opts)
        if "train_error" not in res.history[-1]:  # stopped (gtol, ftol) before the callback saw it
            callback(res)
        # a later stage's first record is the grown point, which repeats the previous stage's iteration number
        history.extend(res.history[1:] if history else res.history)
        for key in ("nit", "nfev", "ngev", "nhev"):  # totals over the stages (evaluations after the last record too)
            res[key] += start["iter" if key == "nit" else key]
        base.update(iter=res.nit, nfev=res.nfev, ngev=res.ngev, nhev=res.nhev, time=history[-1]["time"])
        return res

    if d == 2:
        M = FixedRankMatrices(shape[0], shape[1], rank)  # validates rank
        x = _spectral_start(indices, values, shape, rank, generator, reduce=reduce) if x0 is None else x0
        M._check_point(x, "x0")
        res = stage(x, rank, max_iter)
    else:
        ranks = as_rank_list("rank", rank, d)
        M = FixedTTRank(shape, ranks)  # validates attainability
        if x0 is not None:
            M._check_point(x0, "x0")
            res = stage(x0, max(ranks), max_iter)
        else:
            x = TensorTrain([torch.ones(1, n, 1, dtype=values.dtype, device=values.device) for n in shape])
            count = torch.tensor(float(len(values)), dtype=torch.float64, device=values.device)
            total = reduce(torch.stack([values.sum().to(torch.float64), count]))  # one collective, on the data's device
            x = x * (total[0] / total[1]).to(values.dtype)
            res = None
            for r in range(1, max(ranks) + 1):
                stage_ranks = [min(r, rk) for rk in ranks]
                if r > 1:
                    x = _grow_rank(x, stage_ranks, generator)
                final = stage_ranks == ranks
                res = stage(x, r, max_iter if final else warmup_iters)
                x = res.x
                if final or res.status < 0 or base["failed"] or history[-1]["train_error"] <= tol:
                    break
    if distributed:
        failures.raise_if_any()  # on every process, or on none
    res.history = history
    res.train_error = history[-1]["train_error"]
    if res.status == CALLBACK:
        res.message = f"relative training residual {res.train_error:.3e} <= tol = {tol:g}"
    if vals_norm == 0:
        res.message = (
            "all observed values are zero, so the completion is the zero tensor: rank 0, returned in the format of the "
            f"requested rank with a zero {'S' if d == 2 else 'first core'} (not a point of the fixed-rank manifold); "
            + res.message
        )
    res.test_error = history[-1].get("test_error")
    res.time = history[-1]["solve_time"]
    if distributed:
        dist_helpers.check_identical(res.x, group=group)
        res.communication = dict(traffic)  # bytes and all-reduce calls of this process, all stages
    return res


def _option_digest(value) -> str:
    """What must agree across processes of an option: callables by name (their identity differs per process)."""
    if callable(value):
        return f"callable {getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    return repr(value)


def _unguarded(fn, fallback):
    return fn()


def _as_is(fn):
    return fn


def _relative(err: float, norm: float) -> float:
    """``err / norm``, with the limits of a zero reference: 0 for a perfect fit of zero data, +inf otherwise."""
    if norm > 0:
        return err / norm
    return 0.0 if err == 0 else math.inf


def _zero_point(shape, rank, values: torch.Tensor, x0, distributed: bool):
    """The zero matrix / tensor in the format of rank ``rank``, with orthonormal frames (matrices ``U = I[:, :r]``,
    ``S = 0``, ``V = I[:, :r]``; TT: right-orthogonal cores ``I[:r_{k-1}, :n_k r_k]`` after a zero first core), on
    values' dtype and device: the least-squares fit of all-zero values. Checks ``rank`` and ``x0`` (then unused)."""
    if not distributed and bool(values.any()):  # (with distributed, the processes could disagree on this)
        raise ValueError(
            f"values are nonzero but their squares underflow to 0 in {values.dtype}: rescale them or use float64"
        )
    kw = dict(dtype=values.dtype, device=values.device)
    if len(shape) == 2:
        M = FixedRankMatrices(shape[0], shape[1], rank)
        r = M.rank
        x = LowRankMatrix._trusted(torch.eye(M.m, r, **kw), torch.zeros(r, r, **kw), torch.eye(M.n, r, **kw))
    else:
        M = FixedTTRank(shape, as_rank_list("rank", rank, len(shape)))
        full = [1, *M.ranks, 1]
        cores = [torch.eye(a, n * b, **kw).reshape(a, n, b) for a, n, b in zip(full, shape, full[1:])]
        cores[0] = torch.zeros_like(cores[0])
        x = TensorTrain._trusted(cores)
    if x0 is not None:
        M._check_point(x0, "x0")
    return x


def _grow_rank(x: TensorTrain, ranks, generator, eps: float = 1e-4) -> TensorTrain:
    """``x`` plus a random rank-1 TT of relative norm ``eps``, rounded to TT-ranks ``ranks`` (each one
    more than x's or equal): nearly the same tensor at the next stage's ranks. Cost ``O(d n r³)``."""
    z = TensorTrain.random(x.shape, 1, dtype=torch.float64, device=x.device, generator=generator).to(x.dtype)
    y = x + z * (eps * x.norm() / z.norm())
    return y if list(y.ranks) == list(ranks) else y.round(max_rank=list(ranks))
