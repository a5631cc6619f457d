"""Peer baseline: pymanopt's Riemannian CG on ``FixedRankEmbedded`` for low-rank matrix completion.

Written against pymanopt 2.2.1 (the current release on PyPI; its optimizers have no public per-iteration
callback, see :func:`run_pymanopt` for how iterations are monitored).

``make_problem`` generates LRGeomCG-style data (Vandereycken 2013): ``A = L Rᵀ`` with Gaussian factors, a sampling set
Ω of ``round(OS·k(m+n−k))`` entries drawn uniformly without repetition, an independent test set Γ of the same size,
and the start point of LRGeomCG's ``make_start_x``: the rank-k truncated SVD of the zero-filled sparse ``P_Ω A``.

``run_pymanopt`` runs pymanopt on those data from that start point, the way a pymanopt user would write it (cost
in the backend's array language, gradient by the backend's autodiff; hand-written for the NumPy backend, which has
none), and records cost, gradient norm and the test error ``‖P_Γ(X − A)‖ / ‖P_Γ A‖`` at every iteration, against
wall time and iteration count.

Caveats measured with pymanopt 2.2.1 (see the report in the docstring of :func:`run_pymanopt`): every iteration
converts numpy ↔ torch; ``FixedRankEmbedded.transport``/``projection`` of a low-rank ambient vector evaluates
``U @ S @ V.T @ matrix`` left to right and so forms a dense m×n matrix (twice per transport, two transports per CG
iteration) whatever the cost, so the "sparse" cost does not make pymanopt scale to m = n = 20000 (3.2 GB per
temporary); ``TrustRegions`` fails on ``FixedRankEmbedded`` (the autodiff Hessian is handed the embedded
``(U, S, V)`` direction, whose shapes do not match the point layout ``(u, s, vt)``, and the manifold has no
``weingarten``).
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from . import PeerUnavailable

__all__ = ["make_problem", "run_pymanopt", "test_error", "PeerUnavailable"]


def _import_pymanopt():
    try:
        import pymanopt
        from pymanopt.manifolds import FixedRankEmbedded
        from pymanopt.optimizers import ConjugateGradient, TrustRegions
    except ImportError as exc:  # pymanopt missing (or broken)
        raise PeerUnavailable("install pymanopt") from exc
    return pymanopt, FixedRankEmbedded, ConjugateGradient, TrustRegions


# ----------------------------------------------------------------------------------------------------------------
# data


def _sample_without_replacement(rng: np.random.Generator, population: int, size: int) -> np.ndarray:
    """``size`` distinct linear indices drawn uniformly from ``range(population)``, sorted (int64).

    ``Generator.choice(population, size, replace=False)`` uses Floyd's algorithm with a hash set when
    ``size <= population // 50`` (and ``population > 10000``), i.e. it does not materialize ``range(population)``
    (m = n = 20000: population 4e8, size 2e6).  For denser samples it permutes the whole population, so there it
    is only used when the population is small; otherwise draw with replacement, deduplicate and top up, then keep
    a uniformly random subset of the right size (each subset of that size is equally likely by exchangeability).
    """
    if size > population:
        raise ValueError(f"cannot draw {size} distinct entries out of {population}")
    if population <= 10000 or size <= population // 50 or population <= 50_000_000:
        idx = rng.choice(population, size=size, replace=False)
    else:
        idx = np.unique(rng.integers(0, population, size=size, dtype=np.int64))
        while idx.size < size:
            extra = rng.integers(0, population, size=2 * (size - idx.size) + 16, dtype=np.int64)
            idx = np.union1d(idx, extra)
        if idx.size > size:
            idx = rng.choice(idx, size=size, replace=False)
    return np.sort(idx.astype(np.int64, copy=False))


def _entries(L: np.ndarray, R: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """``(L Rᵀ)[rows, cols]`` without forming ``L Rᵀ``."""
    out = np.empty(rows.shape[0], dtype=np.float64)
    for a in range(0, rows.shape[0], chunk):
        b = a + chunk
        out[a:b] = np.einsum("ij,ij->i", L[rows[a:b]], R[cols[a:b]])
    return out


def make_problem(m: int, n: int, k: int, oversampling: float, seed: int, *, rescale_start: bool = False) -> dict:
    """LRGeomCG-style random completion problem, generated with ``numpy.random.default_rng(seed)``.

    In this order from the one generator: ``L`` (m×k) and ``R`` (n×k) i.i.d. N(0, 1), ``A = L Rᵀ`` (never formed);
    Ω = ``round(oversampling·k(m+n−k))`` distinct linear indices (row-major, ``i·n + j``), uniform without
    repetition, sorted; Γ = an independent draw of the same size (also without repetition; Γ may intersect Ω, as in
    the LRGeomCG experiments); then the ARPACK start vector of the SVD below.

    Start point: LRGeomCG's ``make_start_x`` takes the rank-k truncated SVD (``lansvd``, or ``svds`` in later
    versions) of the zero-filled ``sparse(Ω_i, Ω_j, data)``, *without* rescaling by ``1/p`` (some derived copies of
    that code divide by ``p = |Ω|/(mn)``).  We do the same with ``scipy.sparse.linalg.svds`` (ARPACK, default
    tolerance) on a ``csr_matrix``; ``rescale_start=True`` divides ``s0`` by ``p`` instead (singular vectors are the
    same either way).  ``s0`` is sorted in decreasing order.

    Returns a dict of numpy arrays and scalars: ``m, n, k, oversampling, seed, p, L, R, rows, cols, vals,
    test_rows, test_cols, test_vals, U0 (m×k), s0 (k,), Vt0 (k×n)`` (index arrays int64, values float64, all
    C-contiguous), ``rescale_start``.
    """
    if not 0 < k < min(m, n):
        raise ValueError(f"need 0 < k < min(m, n), got k={k}, m={m}, n={n}")
    rng = np.random.default_rng(seed)
    L = rng.standard_normal((m, k))
    R = rng.standard_normal((n, k))
    size = int(round(oversampling * k * (m + n - k)))
    omega = _sample_without_replacement(rng, m * n, size)
    gamma = _sample_without_replacement(rng, m * n, size)
    rows, cols = np.divmod(omega, n)
    test_rows, test_cols = np.divmod(gamma, n)
    vals = _entries(L, R, rows, cols)
    test_vals = _entries(L, R, test_rows, test_cols)

    p = size / (m * n)
    M = sp.csr_matrix((vals, (rows, cols)), shape=(m, n))
    v0 = rng.standard_normal(min(m, n))
    u, s, vt = spla.svds(M, k=k, v0=v0)  # ascending singular values
    order = np.argsort(s)[::-1]
    U0 = np.ascontiguousarray(u[:, order])
    s0 = np.ascontiguousarray(s[order])
    Vt0 = np.ascontiguousarray(vt[order, :])
    if rescale_start:
        s0 = s0 / p
    return {
        "m": m,
        "n": n,
        "k": k,
        "oversampling": oversampling,
        "seed": seed,
        "p": p,
        "L": L,
        "R": R,
        "rows": rows,
        "cols": cols,
        "vals": vals,
        "test_rows": test_rows,
        "test_cols": test_cols,
        "test_vals": test_vals,
        "U0": U0,
        "s0": s0,
        "Vt0": Vt0,
        "rescale_start": rescale_start,
    }


def test_error(U, s, Vt, test_rows, test_cols, test_vals, chunk: int = 1 << 20) -> float:
    """Relative test error ``‖P_Γ(U diag(s) Vt − A)‖ / ‖P_Γ A‖`` (numpy, chunked)."""
    U = np.asarray(U)
    Vt = np.asarray(Vt)
    Us = U * np.asarray(s)
    sq = 0.0
    for a in range(0, test_rows.shape[0], chunk):
        b = a + chunk
        pred = np.einsum("ij,ji->i", Us[test_rows[a:b]], Vt[:, test_cols[a:b]])
        d = pred - test_vals[a:b]
        sq += float(d @ d)
    return math.sqrt(sq) / float(np.linalg.norm(test_vals))


# ----------------------------------------------------------------------------------------------------------------
# costs as a pymanopt user writes them


def _make_cost(pymanopt, manifold, m, n, rows, cols, vals, cost, backend):
    """Returns ``(cost_function, euclidean_gradient_or_None)`` decorated for ``pymanopt.Problem``."""
    if cost == "dense":
        need = 6 * m * n * 8  # mask, A0, X, X - A0, masked residual, its gradient
        if need > 16 * 2**30:
            raise MemoryError(f"dense cost for {m}x{n} needs ~{need / 2**30:.0f} GiB; use cost='sparse'")
        mask_np = np.zeros((m, n))
        mask_np[rows, cols] = 1.0
        A0_np = np.zeros((m, n))
        A0_np[rows, cols] = vals

    if backend == "pytorch":
        import torch

        if cost == "dense":
            mask = torch.from_numpy(mask_np)
            A0 = torch.from_numpy(A0_np)

            @pymanopt.function.pytorch(manifold)
            def f(u, s, vt):
                X = u @ torch.diag(s) @ vt
                return 0.5 * torch.sum((mask * (X - A0)) ** 2)

        else:
            rows_t = torch.from_numpy(rows)
            cols_t = torch.from_numpy(cols)
            vals_t = torch.from_numpy(vals)

            @pymanopt.function.pytorch(manifold)
            def f(u, s, vt):
                pred = ((u[rows_t] * s) * vt[:, cols_t].T).sum(1)
                return 0.5 * torch.sum((pred - vals_t) ** 2)

        return f, None

    # numpy: pymanopt's NumPy backend has no autodiff ("No autodiff support available for the NumPy backend"), so
    # a numpy user supplies the Euclidean gradient w.r.t. the factors (u, s, vt) by hand, as in pymanopt's examples.
    if cost == "dense":

        @pymanopt.function.numpy(manifold)
        def f(u, s, vt):
            X = u @ np.diag(s) @ vt
            return 0.5 * np.sum((mask_np * (X - A0_np)) ** 2)

        @pymanopt.function.numpy(manifold)
        def egrad(u, s, vt):
            Rm = mask_np * (u @ np.diag(s) @ vt - A0_np)
            RV = Rm @ vt.T
            return [RV * s, np.sum(u * RV, axis=0), s[:, None] * (u.T @ Rm)]

        return f, egrad

    # sparse numpy: residual as a CSR matrix with the fixed pattern of Ω (structure built once, values refreshed)
    perm_mat = sp.csr_matrix((np.arange(1, rows.shape[0] + 1, dtype=np.float64), (rows, cols)), shape=(m, n))
    perm = perm_mat.data.astype(np.int64) - 1
    Rm = sp.csr_matrix((np.zeros(rows.shape[0]), perm_mat.indices, perm_mat.indptr), shape=(m, n))

    def _residual(u, s, vt):
        return np.einsum("ij,ji->i", u[rows] * s, vt[:, cols]) - vals

    @pymanopt.function.numpy(manifold)
    def f(u, s, vt):
        r = _residual(u, s, vt)
        return 0.5 * float(r @ r)

    @pymanopt.function.numpy(manifold)
    def egrad(u, s, vt):
        Rm.data = _residual(u, s, vt)[perm]
        RV = Rm @ vt.T
        return [RV * s, np.sum(u * RV, axis=0), s[:, None] * (Rm.T @ u).T]

    return f, egrad


# ----------------------------------------------------------------------------------------------------------------
# monitoring


class _Monitor:
    """Records (iter, time, fun, grad_norm, test_error); time spent here is excluded from the reported times."""

    def __init__(self, test_rows, test_cols, test_vals, target):
        self.test = (test_rows, test_cols, test_vals)
        self.target = target
        self.history: list[dict] = []
        self.overhead = 0.0
        self.t0 = None
        self.reached = False

    def start(self):
        self.t0 = time.perf_counter()
        self.overhead = 0.0

    def elapsed(self, now=None):
        return (time.perf_counter() if now is None else now) - self.t0 - self.overhead

    def record(self, it, point, fun, grad_norm, elapsed=None):
        now = time.perf_counter()
        u, s, vt = point
        err = test_error(u, s, vt, *self.test)
        self.history.append(
            {
                "iter": int(it),
                "time": self.elapsed(now) if elapsed is None else elapsed,
                "fun": None if fun is None else float(fun),
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "test_error": err,
            }
        )
        if err <= self.target:
            self.reached = True
        if self.t0 is not None:
            self.overhead += time.perf_counter() - now


_TARGET_MSG = "Terminated - target test error reached"


def _monitored(base_cls, monitor: _Monitor, iter_offset: int):
    """Subclass of a pymanopt optimizer that reports each iterate to ``monitor`` and stops at its target.

    pymanopt 2.2.1 has no callback; its ``ConjugateGradient`` calls ``self._add_log_entry(iteration=i, point=x,
    cost=..., gradient_norm=...)`` at the top of iteration i (x = iterate after i-1 steps) and then
    ``self._check_stopping_criterion(start_time=..., ...)``.  ``TrustRegions`` never calls ``_add_log_entry``; there
    the current iterate is read from the caller's frame (locals ``x``, ``fx``) in ``_check_stopping_criterion``,
    which it calls after completing iteration i.  ``start_time`` is shifted by the monitoring time so that
    pymanopt's own ``max_time`` also ignores it.
    """

    class Monitored(base_cls):
        def _add_log_entry(self, *, iteration, point, cost, **kwargs):
            monitor.record(iteration - iter_offset, point, cost, kwargs.get("gradient_norm"))

        def _check_stopping_criterion(self, *, start_time, **kwargs):
            it = kwargs.get("iteration", -1) - iter_offset
            if not monitor.history or monitor.history[-1]["iter"] != it:
                loc = sys._getframe(1).f_locals
                if "x" in loc:
                    monitor.record(it, loc["x"], loc.get("fx", loc.get("cost")), kwargs.get("gradient_norm"))
            if monitor.reached:
                return _TARGET_MSG
            return super()._check_stopping_criterion(start_time=start_time + monitor.overhead, **kwargs)

    Monitored.__name__ = base_cls.__name__
    return Monitored


# ----------------------------------------------------------------------------------------------------------------
# the run


def _cpu_counters():
    """(machine busy CPU seconds, this process's CPU seconds) from /proc (Linux), or None."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
        own = time.process_time()
        return busy / os.sysconf("SC_CLK_TCK"), own
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _other_process_cores(before, after, wall):
    """Mean number of cores other processes kept busy between two ``_cpu_counters`` samples."""
    if before is None or after is None or wall <= 0:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / wall)


def _short_path(path: str) -> str:
    for marker in ("site-packages/", "benchmarks/"):
        if marker in path:
            return path.split(marker, 1)[1] if marker == "site-packages/" else marker + path.split(marker, 1)[1]
    return path


def run_pymanopt(
    m,
    n,
    k,
    rows,
    cols,
    vals,
    test_rows,
    test_cols,
    test_vals,
    U0,
    s0,
    Vt0,
    *,
    cost: str = "sparse",
    backend: str = "pytorch",
    optimizer: str = "cg",
    max_iterations: int = 1000,
    max_time: float = 60.0,
    target_test_error: float = 1e-8,
    min_gradient_norm: float = 0.0,
    min_step_size: float = 1e-10,
    beta_rule: str = "HestenesStiefel",
    warmup: bool = True,
) -> dict:
    """Run pymanopt on the completion problem ``min ½‖P_Ω(X − A)‖²`` over rank-k matrices from ``(U0, s0, Vt0)``.

    ``cost="dense"``: ``X = u @ diag(s) @ vt`` formed densely, ``½‖mask ⊙ (X − A_zero_filled)‖²`` with a dense m×n
    mask (a typical user's first version).  ``cost="sparse"``: observed entries only,
    ``pred = ((u[rows]*s) * vt[:, cols].T).sum(1)``, ``½‖pred − vals‖²``.  ``backend="pytorch"``: gradient by
    pymanopt's PyTorch autodiff (cost evaluated in torch on tensors that share memory with pymanopt's numpy
    arrays; every cost/gradient call converts numpy → torch → numpy).  ``backend="numpy"``: pymanopt's NumPy backend
    has no autodiff, so the Euclidean gradient w.r.t. ``(u, s, vt)`` is hand-written (sparse: CSR residual with a
    precomputed pattern).  pymanopt turns it into the Riemannian gradient with ``FixedRankEmbedded``'s
    ``euclidean_to_riemannian_gradient``.  ``optimizer="cg"``: ``ConjugateGradient`` (default beta rule
    Hestenes-Stiefel, adaptive line search, as pymanopt defaults); ``"trust-regions"``: ``TrustRegions`` with
    autodiff Hessian (pymanopt's docs say ``FixedRankEmbedded`` is not compatible with it; the error is returned).

    Timing: ``time`` is wall time (``perf_counter``) since just before ``optimizer.run`` was called, MINUS the time
    spent in our monitoring (test-error evaluation and bookkeeping at each iterate), which is measured and
    subtracted; pymanopt's ``max_time`` check is shifted by the same amount.  It includes pymanopt's first
    cost/gradient evaluation.  Setup (building the tensors/mask, the Problem and, with ``warmup=True``, one
    cost + gradient evaluation at ``x0`` to pay one-time library initialization) is outside the timed region.
    ``iter`` = number of completed optimizer iterations (0 = start point).  For ``"trust-regions"`` the entry for
    iter 0 is evaluated before the run (time 0, no gradient norm).

    Stopping: when the test error at an iterate is ``<= target_test_error`` (checked by the monitor, which makes
    pymanopt's stopping check return), or by pymanopt's own criteria ``max_iterations``, ``max_time``,
    ``min_gradient_norm`` (default 0 = off, so the test-error target decides), ``min_step_size`` (pymanopt's
    default 1e-10).  ``max_cost_evaluations`` is not checked by pymanopt 2.2.1's CG or TR.

    Returns ``{"peer": "pymanopt", "version", "cost", "backend", "optimizer", "history": [{"iter", "time", "fun",
    "grad_norm", "test_error"}], "time_to_target", "iters_to_target", "final_test_error", "status", "error",
    "stopping_criterion", "wall_time", "monitor_overhead", "setup_time", "torch_threads",
    "other_process_cores", "settings"}``;
    ``status`` is ``"target_reached"``, ``"stopped"`` (a pymanopt criterion; see ``stopping_criterion``) or
    ``"error"`` (the run raised; ``error`` = ``"ExceptionType: message"``, ``error_type``, ``error_message``,
    ``error_where`` = innermost frame).  Raises ``PeerUnavailable("install pymanopt")`` if pymanopt is missing.
    """
    pymanopt, FixedRankEmbedded, ConjugateGradient, TrustRegions = _import_pymanopt()
    if cost not in ("dense", "sparse"):
        raise ValueError(f"cost must be 'dense' or 'sparse', got {cost!r}")
    if backend not in ("pytorch", "numpy"):
        raise ValueError(f"backend must be 'pytorch' or 'numpy', got {backend!r}")
    if optimizer not in ("cg", "trust-regions"):
        raise ValueError(f"optimizer must be 'cg' or 'trust-regions', got {optimizer!r}")

    rows = np.ascontiguousarray(rows, dtype=np.int64)
    cols = np.ascontiguousarray(cols, dtype=np.int64)
    vals = np.ascontiguousarray(vals, dtype=np.float64)
    test_rows = np.ascontiguousarray(test_rows, dtype=np.int64)
    test_cols = np.ascontiguousarray(test_cols, dtype=np.int64)
    test_vals = np.ascontiguousarray(test_vals, dtype=np.float64)
    U0 = np.array(U0, dtype=np.float64, order="C")
    s0 = np.array(s0, dtype=np.float64, order="C")
    Vt0 = np.array(Vt0, dtype=np.float64, order="C")
    if U0.shape != (m, k) or s0.shape != (k,) or Vt0.shape != (k, n):
        raise ValueError(f"start point shapes {U0.shape}, {s0.shape}, {Vt0.shape} != ({m},{k}), ({k},), ({k},{n})")

    try:
        import torch

        torch_threads = torch.get_num_threads()
    except ImportError:
        torch_threads = None

    result = {
        "peer": "pymanopt",
        "version": pymanopt.__version__,
        "cost": cost,
        "backend": backend,
        "optimizer": optimizer,
        "history": [],
        "time_to_target": None,
        "iters_to_target": None,
        "final_test_error": None,
        "status": None,
        "error": None,
        "stopping_criterion": None,
        "wall_time": None,
        "monitor_overhead": None,
        "setup_time": None,
        "torch_threads": torch_threads,
        "other_process_cores": None,
        "settings": {
            "m": m,
            "n": n,
            "k": k,
            "n_obs": int(rows.shape[0]),
            "n_test": int(test_rows.shape[0]),
            "max_iterations": max_iterations,
            "max_time": max_time,
            "target_test_error": target_test_error,
            "min_gradient_norm": min_gradient_norm,
            "min_step_size": min_step_size,
            "beta_rule": beta_rule if optimizer == "cg" else None,
            "warmup": warmup,
        },
    }

    monitor = _Monitor(test_rows, test_cols, test_vals, target_test_error)
    t_setup = time.perf_counter()
    try:
        manifold = FixedRankEmbedded(m, n, k)
        f, egrad = _make_cost(pymanopt, manifold, m, n, rows, cols, vals, cost, backend)
        problem = pymanopt.Problem(manifold, f, euclidean_gradient=egrad)
        x0 = (U0, s0, Vt0)
        common = dict(
            max_time=max_time,
            max_iterations=max_iterations,
            min_gradient_norm=min_gradient_norm,
            min_step_size=min_step_size,
            verbosity=0,
            log_verbosity=0,
        )
        if warmup:  # one untimed cost + gradient evaluation: one-time library/autograd initialization
            problem.riemannian_gradient(x0)
            problem.cost(x0)
        if optimizer == "cg":
            opt = _monitored(ConjugateGradient, monitor, iter_offset=1)(beta_rule=beta_rule, **common)
        else:
            opt = _monitored(TrustRegions, monitor, iter_offset=0)(**common)
            monitor.record(0, x0, problem.cost(x0), None, elapsed=0.0)
    except MemoryError as exc:
        result.update(
            status="error", error=f"{type(exc).__name__}: {exc}", error_type=type(exc).__name__, error_message=str(exc)
        )
        return result
    result["setup_time"] = time.perf_counter() - t_setup

    cpu0 = _cpu_counters()
    t0 = time.perf_counter()
    monitor.start()
    try:
        res = opt.run(problem, initial_point=x0)
    except Exception as exc:  # a peer crash is a result, not a bug of the harness
        wall = monitor.elapsed()
        frames = traceback.extract_tb(exc.__traceback__)
        trace = [f"{_short_path(fr.filename)}:{fr.lineno} in {fr.name}" for fr in frames]
        result.update(
            status="error",
            error=f"{type(exc).__name__}: {exc}",
            error_type=type(exc).__name__,
            error_message=str(exc),
            error_where=trace[-1] if trace else None,
            error_trace=trace,
        )
    else:
        wall = monitor.elapsed()
        result["stopping_criterion"] = res.stopping_criterion
        result["status"] = "target_reached" if res.stopping_criterion == _TARGET_MSG else "stopped"
    result["wall_time"] = wall
    result["other_process_cores"] = _other_process_cores(cpu0, _cpu_counters(), time.perf_counter() - t0)
    result["monitor_overhead"] = monitor.overhead

    hist = monitor.history
    result["history"] = hist
    if hist:
        result["final_test_error"] = hist[-1]["test_error"]
        hit = next((h for h in hist if h["test_error"] <= target_test_error), None)
        if hit is not None:
            result["time_to_target"] = hit["time"]
            result["iters_to_target"] = hit["iter"]
    return result
