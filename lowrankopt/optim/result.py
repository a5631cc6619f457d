"""The result record of :func:`lowrankopt.minimize` (SciPy's ``OptimizeResult`` conventions)."""

from __future__ import annotations

# Status codes: >= 0 are normal terminations, < 0 errors. ``success`` is True for the ones that mean
# "the requested accuracy was reached, or the best this precision allows" (or the caller asked to stop).
GTOL, MAX_ITER, MAX_TIME, FTOL, CALLBACK, NO_PROGRESS, PRECISION = 0, 1, 2, 3, 4, 5, 6
NON_FINITE = -1
SUCCESS = {GTOL, FTOL, CALLBACK, PRECISION}


class OptimizeResult(dict):
    """Result of :func:`lowrankopt.minimize`; a dict with attribute access.

    Fields:
        x: the final point (the last point at which f and its gradient were finite).
        fun: ``f(x)`` (float).
        grad: the Riemannian gradient at ``x`` (a tangent vector); ``grad_norm`` its norm (float).
        nit: iterations (outer iterations; for the trust-region method rejected steps count too).
        nfev, ngev, nhev: evaluations of f (each gradient evaluation includes one), of the Riemannian
            gradient and of Hessian-vector products.
        success, status, message: whether the requested accuracy was reached; status codes are
            ``0`` gradient norm ≤ gtol, ``1`` max_iter reached, ``2`` max_time reached, ``3`` relative
            change of f ≤ ftol (only when ``ftol > 0``), ``4`` stopped by the callback, ``5`` no progress at a
            point that is not stationary (the line search failed or the trust region collapsed while the gradient
            is above gtol and above its rounding noise: not a success), ``6`` converged to the floating-point floor
            (f cannot decrease further and the gradient is at its own rounding noise, measured at the final
            point — gtol is below what this precision can resolve), ``-1`` f or its gradient became NaN/Inf.
        history: one dict per iteration (``iter``, ``fun``, ``grad_norm``, ``time`` seconds since the
            start, ``nfev``, ``ngev``, ``nhev``, and method-specific entries such as ``step_size``, ``backtracks``,
            ``radius``, ``rho``, ``accepted``, ``inner_iter``, ``tcg_stop``). A callback may add its own
            entries to ``history[-1]``.
        method, time: the method name and the total wall-clock time in seconds.
    """

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    __setattr__ = dict.__setitem__
    __delattr__ = dict.__delitem__

    def __repr__(self) -> str:
        keys = ("success", "status", "message", "fun", "grad_norm", "nit", "nfev", "ngev", "nhev", "time")
        body = "\n".join(f"{k:>10}: {self[k]!r}" for k in keys if k in self)
        return f"{type(self).__name__}(method={self.get('method')!r})\n{body}"

    def __dir__(self):
        return list(self.keys())
