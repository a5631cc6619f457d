"""What is recorded while pymanopt runs: the test error at every iterate (by a subclass of the optimizer, since
pymanopt 2.2.1 has no callback; the time spent recording is measured and excluded) and how busy other processes kept
the machine."""

from __future__ import annotations

import os
import sys
import time

from .completion_problem import test_error


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
