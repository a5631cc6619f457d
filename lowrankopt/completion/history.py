"""One history across the stages of :func:`~lowrankopt.complete`: :class:`History` is minimize's callback (it adds
the completion errors and the solve time to each record, and decides when to stop) and stitches the stages'
records and counts into one numbering."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from ..optim import OptimizeResult
from ..optim.result import CALLBACK, NO_PROGRESS
from .problem import Collectives, HeldOut, relative

__all__ = ["History"]

_COUNTS = ("iter", "nfev", "ngev", "nhev", "time")  # numbered on across the stages
#: an attempt of complete(starts=k) stalls when its training residual at the target rank fell by less than
#: 1 − STALL_FACTOR over the last STALL_WINDOW iterations (a run that converges falls by orders of magnitude there)
STALL_WINDOW, STALL_FACTOR = 50, 0.9


class History:
    """The records of every stage, numbered as one run.

    Each record gets ``rank`` (the stage's), ``train_error`` (``‖P_Ω X − values‖ / ‖values‖ = √(2f) / ‖values‖``),
    ``test_error`` (with ``held_out``) and ``solve_time`` (seconds since this object was made, without the time spent
    on test errors and ``monitor``); ``iter``, ``nfev``, ``ngev``, ``nhev`` and ``time`` continue from the previous
    stage. :meth:`callback` returns True (stop) once ``train_error <= tol``, when some process failed (``run``), or,
    with ``watch_stall``, once the stage stalls (its record gets ``stalled``: see ``STALL_WINDOW``). ``train_error``
    is that of the problem solved (the balanced one with ``complete(balance=...)``).
    ``point`` maps the solver's point to the caller's (balanced coordinates) for ``monitor``.
    Cost per record: O(1), plus a held-out error (one gather) and ``run``'s checks.
    """

    def __init__(
        self,
        *,
        norm: float,
        tol: float,
        held_out: HeldOut | None,
        run: Collectives,
        monitor: Callable | None,
        point: Callable | None = None,
    ) -> None:
        self.norm, self.tol, self.held_out, self.run, self.monitor = norm, tol, held_out, run, monitor
        self.point = point  # the solver's point -> the caller's (balanced coordinates), for monitor
        self.attempt = 0  # complete(starts=k): the attempt the records belong to
        self.watch_stall = False  # stop the current stage when it stalls (set by the caller per stage)
        self.stalled = False  # the last watched stage stalled
        self.records: list[dict] = []
        self.base = {"iter": 0, "nfev": 0, "ngev": 0, "nhev": 0, "time": 0.0, "rank": 0}
        self.failed = False  # some process failed (distributed): stop every stage
        self.t_start, self.overhead = time.perf_counter(), 0.0
        self._stage_start = dict(self.base)

    @property
    def converged(self) -> bool:
        """Whether the last record reached ``tol``."""
        return self.records[-1]["train_error"] <= self.tol

    def callback(self, res: OptimizeResult) -> bool:
        """minimize's callback: complete ``res.history[-1]``, call ``monitor``; True to stop."""
        t = time.perf_counter()
        rec = res.history[-1]
        for key in _COUNTS:
            rec[key] += self.base[key]
        rec["rank"], rec["attempt"], rec["balanced"] = self.base["rank"], self.attempt, self.point is not None
        rec["train_error"] = relative(math.sqrt(2 * max(res.fun, 0.0)), self.norm)
        if self.held_out is not None:
            rec["test_error"] = self.held_out.error(res.x)
        self.run.check(res.x, rec["iter"])
        rec["solve_time"] = t - self.t_start - self.overhead
        if self.monitor is not None:
            # in the caller's coordinates: x mapped back, the gradient (a tangent vector at the solver's point) left out
            seen = res if self.point is None else OptimizeResult({**res, "x": self.point(res.x), "grad": None})
            self.run.guard(lambda: self.monitor(seen), lambda: None)
        stop = rec["train_error"] <= self.tol
        if not stop and self.watch_stall and len(res.history) > STALL_WINDOW:
            before = res.history[-1 - STALL_WINDOW].get("train_error", math.inf)
            if rec["train_error"] > STALL_FACTOR * before:  # (the same on every process: the errors are reduced)
                stop = self.stalled = rec["stalled"] = True
        if self.run.stop_all():  # one collective per iteration (distributed): every process stops here together
            stop = self.failed = True
        self.overhead += time.perf_counter() - t
        return stop

    def plain(self, norm: float) -> None:
        """The stages that follow solve the caller's problem (``‖values‖ = norm``), in the caller's coordinates:
        no more mapping of points for ``monitor`` and the held-out errors."""
        self.norm, self.point, self.watch_stall = norm, None, False
        if self.held_out is not None:
            self.held_out.point = None

    def begin_stage(self, rank: int) -> None:
        """The records that follow belong to a stage at rank ``rank``."""
        self.base["rank"] = rank
        self._stage_start = dict(self.base)

    def end_stage(self, res: OptimizeResult) -> None:
        """Append the stage's records; ``res``'s counts become totals over the stages so far."""
        if "train_error" not in res.history[-1]:  # stopped (gtol, ftol) before the callback saw it
            self.callback(res)
        # a later stage's first record is the grown point, which repeats the previous stage's iteration number
        self.records.extend(res.history[1:] if self.records else res.history)
        start = self._stage_start
        for key in ("nit", "nfev", "ngev", "nhev"):  # totals over the stages (evaluations after the last record too)
            res[key] += start["iter" if key == "nit" else key]
        self.base.update(iter=res.nit, nfev=res.nfev, ngev=res.ngev, nhev=res.nhev, time=self.records[-1]["time"])

    def finish(self, res: OptimizeResult, last: int = -1, train_error: float | None = None) -> OptimizeResult:
        """``res`` (the last stage's of the returned attempt) with the whole history, and ``train_error`` (given, or
        from the record ``last``: that stage's last), ``test_error`` from that record, ``time`` from the last one."""
        res.history = self.records
        res.train_error = self.records[last]["train_error"] if train_error is None else train_error
        if res.status == CALLBACK and res.train_error <= self.tol:
            res.message = f"relative training residual {res.train_error:.3e} <= tol = {self.tol:g}"
        elif self.records[last].get("stalled"):  # stopped by the stall test: not a success
            res.success, res.status = False, NO_PROGRESS
            res.message = (
                f"stalled: relative training residual {res.train_error:.3e} fell by less than "
                f"{1 - STALL_FACTOR:.0%} in {STALL_WINDOW} iterations"
            )
        res.test_error = self.records[last].get("test_error")
        res.time = self.records[-1]["solve_time"]
        return res
