"""Peer baseline: pymanopt's Riemannian CG on ``FixedRankEmbedded`` for low-rank matrix completion.

Written against pymanopt 2.2.1 (the current release on PyPI; its optimizers have no public per-iteration
callback, see :func:`run_pymanopt` for how iterations are monitored).

``make_problem`` (:mod:`.completion_problem`) generates LRGeomCG-style data (Vandereycken 2013): ``A = L Rᵀ`` with
Gaussian factors, a sampling set Ω of ``round(OS·k(m+n−k))`` entries drawn uniformly without repetition, an
independent test set Γ of the same size, and the start point of LRGeomCG's ``make_start_x``: the rank-k truncated SVD
of the zero-filled sparse ``P_Ω A``.

``run_pymanopt`` runs pymanopt on those data from that start point, the way a pymanopt user would write it (cost
in the backend's array language, gradient by the backend's autodiff; hand-written for the NumPy backend, which has
none), and records cost, gradient norm and the test error ``‖P_Γ(X − A)‖ / ‖P_Γ A‖`` at every iteration, against
wall time and iteration count. The cost functions are in :mod:`.pymanopt_cost`, the monitoring in
:mod:`.pymanopt_monitor`.

Caveats measured with pymanopt 2.2.1 (see the report in the docstring of :func:`run_pymanopt`): every iteration
converts numpy ↔ torch; ``FixedRankEmbedded.transport``/``projection`` of a low-rank ambient vector evaluates
``U @ S @ V.T @ matrix`` left to right and so forms a dense m×n matrix (twice per transport, two transports per CG
iteration) whatever the cost, so the "sparse" cost does not make pymanopt scale to m = n = 20000 (3.2 GB per
temporary); ``TrustRegions`` fails on ``FixedRankEmbedded`` (the autodiff Hessian is handed the embedded
``(U, S, V)`` direction, whose shapes do not match the point layout ``(u, s, vt)``, and the manifold has no
``weingarten``).
"""

from __future__ import annotations

import time
import traceback

import numpy as np
import numpy.typing as npt

from . import PeerUnavailable
from .completion_problem import make_problem, test_error
from .pymanopt_cost import _make_cost
from .pymanopt_monitor import _TARGET_MSG, _cpu_counters, _Monitor, _monitored, _other_process_cores

__all__ = ["make_problem", "run_pymanopt", "test_error", "PeerUnavailable"]


def _import_pymanopt():
    try:
        import pymanopt
        from pymanopt.manifolds import FixedRankEmbedded
        from pymanopt.optimizers import ConjugateGradient, TrustRegions
    except ImportError as exc:  # pymanopt missing (or broken)
        raise PeerUnavailable("install pymanopt") from exc
    return pymanopt, FixedRankEmbedded, ConjugateGradient, TrustRegions


def _short_path(path: str) -> str:
    for marker in ("site-packages/", "benchmarks/"):
        if marker in path:
            return path.split(marker, 1)[1] if marker == "site-packages/" else marker + path.split(marker, 1)[1]
    return path


def run_pymanopt(
    m: int,
    n: int,
    k: int,
    rows: npt.ArrayLike,
    cols: npt.ArrayLike,
    vals: npt.ArrayLike,
    test_rows: npt.ArrayLike,
    test_cols: npt.ArrayLike,
    test_vals: npt.ArrayLike,
    U0: npt.ArrayLike,
    s0: npt.ArrayLike,
    Vt0: npt.ArrayLike,
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
