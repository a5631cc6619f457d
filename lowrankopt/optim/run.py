"""Bookkeeping shared by every method: the current point, stopping tests, history, the verbose table
and the final :class:`OptimizeResult`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from . import result as st
from .objective import Local, Objective
from .precision import Noise, at_floor
from .result import OptimizeResult


class Run:
    """One call of :func:`minimize`. Methods report each new point with :meth:`accept` (or a rejected
    trust-region step with :meth:`reject`); both return True when the run must stop."""

    def __init__(
        self,
        method: str,
        objective: Objective,
        *,
        max_iter: int,
        gtol: float,
        ftol: float,
        max_time: float,
        callback: Callable | None,
        verbose: int,
        columns: tuple[str, ...] = (),
    ) -> None:
        self.method, self.obj = method, objective
        self.max_iter, self.gtol, self.ftol, self.max_time = max_iter, gtol, ftol, max_time
        self.callback, self.verbose, self.columns = callback, int(verbose), columns
        self.history: list[dict] = []
        self.nit = 0
        self.local: Local | None = None
        self.status: int | None = None
        self.message = ""
        self._t0 = time.perf_counter()

    # ------------------------------------------------------------------ reporting points
    def start(self, local: Local) -> bool:
        """The initial point (iteration 0)."""
        if not local.finite:  # recorded (history[0] always exists), but no stopping test or callback sees it
            self.local = local
            self.history.append(self._row(local, {}))
            return self.stop(st.NON_FINITE, "f or its gradient is NaN/Inf at the initial point")
        return self._record(local, accepted=True, extra={})

    def accept(self, local: Local, **extra: Any) -> bool:
        """A new iterate. If f or its gradient is not finite there, stop and keep the previous point."""
        if not local.finite:
            return self.stop(
                st.NON_FINITE,
                f"f or its gradient is NaN/Inf at iteration {self.nit + 1} (f = {local.fun}, |grad| = "
                f"{local.grad_norm}); returning the last point where both were finite",
            )
        self.nit += 1
        return self._record(local, accepted=True, extra=extra)

    def reject(self, **extra: Any) -> bool:
        """A rejected step: the point stays, the iteration counts."""
        self.nit += 1
        return self._record(self.local, accepted=False, extra=extra)

    def non_finite_trial(self, value: float) -> bool:
        return self.stop(
            st.NON_FINITE,
            f"f is {value} at a trial point in iteration {self.nit + 1}; returning the last point where f "
            "and its gradient were finite",
        )

    def stop(self, status: int, message: str) -> bool:
        self.status, self.message = status, message
        return True

    def stop_at_floor(self, noise: Noise) -> bool:
        """f cannot decrease further and the gradient at the current point is rounding noise: converged."""
        return self.stop(
            st.PRECISION,
            f"converged to the floating-point floor: the gradient norm {self.local.grad_norm:.3e} is at the level "
            f"of its rounding noise ({noise.grad:.3e}, measured at another factorization of x), so gtol = "
            f"{self.gtol:g} is below what {_dtype_name(self.local.x)} resolves here",
        )

    def stop_no_progress(
        self, noise: Noise | None, reason: str, *, f_resolved: bool, inconsistent: Noise | None = None
    ) -> bool:
        """The method cannot move from the current point: converged if the gradient is rounding noise there,
        otherwise a stall at a non-stationary point (not a success). ``f_resolved``: whether the last change of
        f that was tried is above f's rounding (then f went up, not sideways, along the model's descent).
        ``inconsistent``: a noise measurement that was far above rounding (f or grad depends on the factors)."""
        if at_floor(self.local, noise):
            return self.stop_at_floor(noise)
        g = f"gradient norm {self.local.grad_norm:.3e} > gtol = {self.gtol:g}"
        if inconsistent is not None:
            why = (
                f"f or its gradient differ between two factorizations of the same point (by {inconsistent.fun:.1e} "
                f"and {inconsistent.grad:.1e}), far more than rounding: f (or grad=) reads the factors rather than "
                "the point (riemannian_grad(f, x, check_invariance=True) checks f)"
            )
            return self.stop(st.NO_PROGRESS, f"{reason}, at a point that is not stationary ({g}); {why}")
        if noise is None:
            g += " (its rounding noise cannot be measured on this manifold)"
        else:
            g += f", above its rounding noise {noise.grad:.1e}"
        if f_resolved:
            why = "f increases along the descent direction: is the gradient f's (grad=, and f a function of the point)?"
        else:
            why = (
                "f changes only at its rounding level here: if f carries a large constant, subtract it, or use float64"
            )
        return self.stop(st.NO_PROGRESS, f"{reason}, at a point that is not stationary ({g}); {why}")

    # ------------------------------------------------------------------ internals
    def _row(self, local: Local, extra: dict) -> dict:
        return {
            "iter": self.nit,
            "fun": local.fun,
            "grad_norm": local.grad_norm,
            "time": time.perf_counter() - self._t0,
            "nfev": self.obj.nfev,
            "ngev": self.obj.ngev,
            "nhev": self.obj.nhev,
            **extra,
        }

    def _record(self, local: Local, *, accepted: bool, extra: dict) -> bool:
        previous = self.local
        self.local = local
        rec = self._row(local, extra)
        self.history.append(rec)
        self._print(rec)
        if accepted and local.grad_norm <= self.gtol:
            return self.stop(st.GTOL, f"gradient norm {local.grad_norm:.3e} <= gtol = {self.gtol:g}")
        if accepted and self.ftol > 0 and previous is not None and self.nit > 0:
            change = abs(previous.fun - local.fun)
            if change <= self.ftol * max(abs(previous.fun), abs(local.fun), math.ulp(1.0)):
                return self.stop(st.FTOL, f"relative change of f {change:.3e} <= ftol = {self.ftol:g}")
        if self.callback is not None:
            try:
                if self.callback(self.result(intermediate=True)):
                    return self.stop(st.CALLBACK, "stopped by the callback")
            except StopIteration:
                return self.stop(st.CALLBACK, "stopped by the callback (StopIteration)")
        if self.nit >= self.max_iter:
            return self.stop(st.MAX_ITER, f"reached max_iter = {self.max_iter}")
        if rec["time"] >= self.max_time:
            return self.stop(st.MAX_TIME, f"reached max_time = {self.max_time:g} s")
        return False

    def _print(self, rec: dict) -> None:
        if not self.verbose or rec["iter"] % self.verbose:
            return
        if not self.history[:-1]:
            cols = "".join(f"{c:>12}" for c in self.columns)
            print(f"{'iter':>6}{'f':>16}{'|grad|':>12}{cols}{'time (s)':>10}")
        cells = "".join(f"{_cell(rec.get(c)):>12}" for c in self.columns)
        print(f"{rec['iter']:>6}{rec['fun']:>16.8e}{rec['grad_norm']:>12.3e}{cells}{rec['time']:>10.2f}")

    def result(self, *, intermediate: bool = False) -> OptimizeResult:
        loc = self.local
        res = OptimizeResult(
            x=loc.x,
            fun=loc.fun,
            grad=loc.grad,
            grad_norm=loc.grad_norm,
            nit=self.nit,
            nfev=self.obj.nfev,
            ngev=self.obj.ngev,
            nhev=self.obj.nhev,
            history=self.history,
            method=self.method,
            time=time.perf_counter() - self._t0,
        )
        if not intermediate:
            res.update(status=self.status, success=self.status in st.SUCCESS, message=self.message)
            if self.verbose:
                print(f"{self.method}: {self.message} ({self.nit} iterations, {res.time:.2f} s)")
        return res


def _dtype_name(x) -> str:
    return str(getattr(x, "dtype", "this precision")).replace("torch.", "")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3e}"
    return str(value)
