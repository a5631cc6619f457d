"""Building blocks for running lowrankopt across processes with ``torch.distributed``.

A loss that is a sum over observed entries (completion) splits into per-shard losses, ``f = Σ_p f_p``. The
Riemannian gradient is linear in f, so it is the sum of the per-shard gradients; in δ-coordinates that sum is one
all-reduce of ``O(#coordinates)`` numbers — ``O((m + n) r)`` for matrices, ``O(d n r²)`` for tensor trains —
whatever the number of entries. These helpers do that reduction and check that the ranks keep one point.

They need an initialized default process group (``torch.distributed.init_process_group``; gloo on CPU, NCCL on
GPU) or an explicit ``group``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ._checks import as_int
from .autodiff import riemannian_grad, riemannian_grad_and_hessian
from .formats import LowRankMatrix, TensorTrain
from .manifolds import LowRankManifold, manifold_of
from .manifolds.tangent import TangentVector
from .optim import OptimizeResult

Point = LowRankMatrix | TensorTrain  # a point of a manifold

__all__ = [
    "Failures",
    "ShardedObjective",
    "ShardedRun",
    "agree",
    "all_reduce_tangent",
    "check_identical",
    "shard",
    "sharded_grad",
    "sharded_objective",
]


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(flat: torch.Tensor, like) -> list[torch.Tensor]:
    out, start = [], 0
    for t in like:
        out.append(flat[start : start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out


def all_reduce_tangent(v: TangentVector, group: dist.ProcessGroup | None = None) -> TangentVector:
    """The sum of ``v`` over the ranks of ``group``: its δ-coordinates flattened into one buffer and all-reduced
    (one collective of ``#coordinates`` numbers). Every rank must hold a vector at the same point."""
    if not isinstance(v, TangentVector):
        raise TypeError(f"v must be a TangentVector, got {type(v).__name__}")
    flat = _flat(v.coords)
    dist.all_reduce(flat, group=group)
    return TangentVector(v.manifold, v.base, _unflat(flat, v.coords))


def sharded_grad(
    f_shard: Callable, x: Point, *, group: dist.ProcessGroup | None = None, manifold: LowRankManifold | None = None
) -> tuple[float, TangentVector]:
    """Value and Riemannian gradient of ``f = Σ_ranks f_shard`` at ``x``: each rank differentiates its own
    shard (δ-trick autodiff), then values and δ-coordinates are all-reduced together in one collective.

    Returns ``(f(x), grad f(x))``, identical on every rank. Communication: ``#coordinates + 1`` numbers.
    """
    val, g = riemannian_grad(f_shard, x, manifold=manifold)
    flat = torch.cat([val.reshape(1).to(g.dtype), _flat(g.coords)])
    dist.all_reduce(flat, group=group)
    return float(flat[0]), TangentVector(g.manifold, g.base, _unflat(flat[1:], g.coords))


def reducers(group: dist.ProcessGroup | None = None, traffic: dict | None = None) -> tuple[Callable, Callable]:
    """``(reduce, reduce_tangent)``: sums over the ranks of ``group`` of a tensor (a new tensor) and of a tangent
    vector. ``traffic`` (a dict), if given, accumulates ``"bytes"`` (payload all-reduced by this rank) and
    ``"calls"``. Raises ``RuntimeError`` when no process group is initialized."""
    _require_group()
    traffic = {} if traffic is None else traffic
    traffic.setdefault("bytes", 0)
    traffic.setdefault("calls", 0)

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, group=group)
        traffic["bytes"] += t.numel() * t.element_size()
        traffic["calls"] += 1
        return t

    def reduce_tangent(v: TangentVector) -> TangentVector:
        traffic["bytes"] += sum(c.numel() * c.element_size() for c in v.coords)
        traffic["calls"] += 1
        return all_reduce_tangent(v, group=group)

    return reduce, reduce_tangent


class ShardedObjective:
    """``Σ_ranks f_shard`` for :func:`~lowrankopt.minimize`, with the plain path's single pass per point.

    At a point x, :meth:`grad` runs one δ-trick pass over this process's shard — f's value, the δ-gradient and the
    Hessian operator's tape together (:func:`~lowrankopt.riemannian_grad_and_hessian`, which shares index plans and
    frame interfaces between them) — and all-reduces ``[f_p(x), δ-gradient_p]`` in **one** collective of
    ``#coordinates + 1`` numbers. The sums and the shard's Hessian operator are kept for the last two points (the
    trust-region method returns to x after a rejected step), so that

    - :meth:`f` at such a point is the kept sum (no pass, no collective): :class:`~lowrankopt.optim.objective.Objective`
      asks for the gradient before the value for this reason; at any other point (a backtracking trial) it is one
      forward pass without a tape and one all-reduce of a scalar;
    - :meth:`hvp` applies the kept operator (the second backward pass only, as in the plain path) and all-reduces
      the δ-coordinates (one collective of ``#coordinates`` numbers); at a point not kept it runs the pass first.

    Cost per point beyond the single-process path: the two all-reduces above, ``O(d n r²)`` numbers for tensor trains
    (``O((m + n) r)`` for matrices), whatever the number of entries. Every process must call the methods in the same
    order at the same points (they do: the points are identical, :func:`check_identical`).

    With ``failures`` (:class:`Failures`), an exception in this process's shard is kept there and NaN takes the
    place of its value and coordinates in the sums, so that every process sees the same non-finite f and stops.
    """

    keep = 2  # points whose sums and Hessian operator are kept (x and a trust-region candidate)

    def __init__(
        self,
        f_shard: Callable,
        *,
        curvature: bool = True,
        group: dist.ProcessGroup | None = None,
        traffic: dict | None = None,
        failures: Failures | None = None,
    ) -> None:
        if not callable(f_shard):
            raise TypeError(f"f_shard must be callable, got {type(f_shard).__name__}")
        self.f_shard, self.curvature, self.group, self.failures = f_shard, curvature, group, failures
        self._reduce, self._reduce_tangent = reducers(group, traffic)
        self._kept: list[dict] = []  # newest last: {"x", "f", "grad", "hess"}

    def _guard(self, fn: Callable, fallback: Callable) -> Any:
        return fn() if self.failures is None else self.failures.guard(fn, fallback)

    def _at(self, x: Point) -> dict:
        """The kept pass at x, or a new one: the shard's pass, then one all-reduce of its value and δ-gradient."""
        for entry in self._kept:
            if entry["x"] is x:
                return entry

        def local():
            return riemannian_grad_and_hessian(self.f_shard, x, curvature=self.curvature)

        val, g, h = self._guard(local, lambda: (_nan_scalar(x), _nan_tangent(x), None))
        total = self._reduce(torch.cat([val.reshape(1).to(g.coords[0].dtype), _flat(g.coords)]))
        entry = {
            "x": x,
            "f": total[0],
            "grad": TangentVector(g.manifold, g.base, _unflat(total[1:], g.coords)),
            "hess": h,
        }
        self._kept = [*self._kept, entry][-self.keep :]
        return entry

    def f(self, x: Point) -> torch.Tensor:
        """``Σ f_p(x)`` (0-dim): kept from the gradient pass at x, else a forward pass and one scalar all-reduce."""
        for entry in self._kept:
            if entry["x"] is x:
                return entry["f"]

        def local():
            with torch.no_grad():
                return self.f_shard(x).detach().reshape(())

        return self._reduce(self._guard(local, lambda: _nan_scalar(x)))

    def grad(self, x: Point) -> TangentVector:
        """``Σ grad f_p(x)`` (with ``Σ f_p(x)``: one pass, one collective; see the class docstring)."""
        return self._at(x)["grad"]

    def hvp(self, x: Point, v: TangentVector) -> TangentVector:
        """``Σ Hess f_p(x)[v]``: the kept Hessian operator at x applied to v, then one all-reduce."""
        entry = self._at(x)
        hv = self._guard(lambda: entry["hess"](v), lambda: _nan_tangent(x))
        return self._reduce_tangent(hv)


def sharded_objective(
    f_shard: Callable,
    *,
    curvature: bool = True,
    group: dist.ProcessGroup | None = None,
    traffic: dict | None = None,
    failures: Failures | None = None,
) -> tuple[Callable, Callable, Callable]:
    """``(f, grad, hvp)`` for :func:`~lowrankopt.minimize` (``minimize(f, x, grad=grad, hvp=hvp, ...)``) on
    ``Σ_ranks f_shard``: the methods of a :class:`ShardedObjective`. ``grad(x)`` differentiates the shard once
    (value, δ-gradient and the Hessian operator's tape, δ-trick) and all-reduces value and δ-coordinates in one
    collective; ``f(x)`` at that point is the value from that pass (elsewhere one forward pass and a scalar
    all-reduce); ``hvp(x, v)`` applies the shard's Hessian operator kept from the pass and all-reduces it.

    With ``failures``, an exception in this process's shard is kept there and NaN takes the shard's place in the
    sum, so that every process sees the same non-finite value and stops (see :class:`Failures`)."""
    obj = ShardedObjective(f_shard, curvature=curvature, group=group, traffic=traffic, failures=failures)
    return obj.f, obj.grad, obj.hvp


def _nan_scalar(like) -> torch.Tensor:
    """A 0-dim NaN of ``like``'s dtype and device (the stand-in for a shard's value that failed)."""
    return torch.full((), math.nan, dtype=like.dtype, device=like.device)


def _nan_tangent(x) -> TangentVector:
    """The tangent vector at x whose coordinates are all NaN (the stand-in for a shard's vector that failed).
    Built directly: tangent-vector arithmetic refuses non-finite scalars."""
    M = manifold_of(x)
    return TangentVector(M, x, [torch.full_like(c, math.nan) for c in M.zero_tangent(x).coords])


class Failures:
    """Exceptions of this process, agreed on by every process of ``group`` so that none is left waiting.

    :meth:`guard` runs a local computation (a shard's loss, a user's callback); if it raises, the exception is
    kept and a stand-in is returned (NaN for a value that is about to be all-reduced), so that this process still
    joins the collectives the others are in. The NaN stops every process's optimizer at the same iteration
    (a non-finite f). :meth:`any` (one all-reduce of ``world_size`` integers) tells every process whether some
    process failed — call it at the same point on every process, once per iteration; :meth:`raise_if_any` then
    raises on every process: the original exception where it happened, a ``RuntimeError`` naming the process and
    its error elsewhere.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        _require_group()
        self.group = group
        self.error: BaseException | None = None

    def guard(self, fn: Callable, fallback: Callable) -> Any:
        """``fn()``, or ``fallback()`` if it raises (or if an earlier guarded call of this process did)."""
        if self.error is not None:
            return fallback()
        try:
            return fn()
        except Exception as exc:  # kept, and re-raised by raise_if_any on every process
            self.error = exc
            return fallback()

    def value(self, fn: Callable) -> Callable:
        """``fn(x, ...)`` (a scalar tensor about to be all-reduced) guarded, with NaN standing in."""
        return lambda x, *args: self.guard(lambda: fn(x, *args), lambda: _nan_scalar(x))

    def tangent(self, fn: Callable) -> Callable:
        """``fn(x, ...)`` (a tangent vector at x about to be all-reduced) guarded, with NaN standing in."""
        return lambda x, *args: self.guard(lambda: fn(x, *args), lambda: _nan_tangent(x))

    def failed_ranks(self) -> list[int]:
        """The ranks that have failed so far (one collective; the same list on every process)."""
        flags = torch.zeros(dist.get_world_size(self.group), dtype=torch.int64, device=_collective_device(self.group))
        flags[dist.get_rank(self.group)] = int(self.error is not None)
        dist.all_reduce(flags, group=self.group)
        return [r for r, flag in enumerate(flags.tolist()) if flag]

    def any(self) -> bool:
        """Whether some process has failed (one collective)."""
        return bool(self.failed_ranks())

    def raise_if_any(self) -> None:
        """Raise on every process if some process failed (collectives; call it on every process)."""
        failed = self.failed_ranks()
        if not failed:
            return
        messages: list = [None] * dist.get_world_size(self.group)
        mine = None if self.error is None else f"{type(self.error).__name__}: {self.error}"
        dist.all_gather_object(messages, mine, group=self.group)
        if self.error is not None:
            raise self.error
        first = failed[0]
        raise RuntimeError(f"process {first} raised {messages[first]}; this process stops too (failed: {failed})")


def _collective_device(group) -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    )


def _require_group() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("distributed=True needs torch.distributed.init_process_group(...) first")


def agree(error: Exception | None, call: Any, *, group: dist.ProcessGroup | None = None) -> None:
    """Make every process of ``group`` raise together or not at all: all-gathers whether each rejected its input
    (``error``) and a digest of its call (``call``: sizes and options that must match). Raises ``ValueError`` on
    every process if any rejected its input or the calls differ."""
    _require_group()
    digest = zlib.crc32(repr(call).encode())  # not hash(): string hashing differs between processes
    local = torch.tensor([0 if error is None else 1, digest], dtype=torch.int64, device=_collective_device(group))
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    failed = [r for r, t in enumerate(gathered) if t[0]]
    if error is not None:
        raise ValueError(f"{error} (rejected on this process; the others stop too)") from error
    if failed:
        raise ValueError(f"process(es) {failed} rejected their input; see their error")
    if len({int(t[1]) for t in gathered}) > 1:
        raise ValueError("the processes called with different sizes or options (shape, rank, method, max_iter, ...)")


def _option_digest(value) -> str:
    """What must agree across processes of an option: callables by name (their identity differs per process)."""
    if callable(value):
        return f"callable {getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    return repr(value)


class ShardedRun:
    """The collectives of one solve whose data are sharded over the processes of ``group``, as
    :func:`~lowrankopt.complete` (``distributed=True``) uses them.

    Construction is the agreement (:func:`agree`): every process passes the error its input checks raised (or None),
    ``call`` (the sizes that must match: shape, rank, method, ...; None where the checks failed) and ``options`` (the
    keyword options passed on to the optimizer: they choose the collectives, so they must match too; callables compare
    by qualified name). Every process raises ``ValueError`` together, or none does. Then:

    - :attr:`reduce` / :attr:`reduce_tangent`: sums over the processes of a tensor / a tangent vector, counted in
      :attr:`traffic` (``bytes`` all-reduced by this process and ``calls``); :attr:`quiet`: a sum not counted (held-out
      errors are not part of the solve);
    - :attr:`value` / :attr:`tangent` / :meth:`guard`: shard-local computations guarded by :class:`Failures` (an
      exception is kept and NaN stands in, so that every process still joins the collectives);
    - :meth:`objective`: ``(f, grad, hvp)`` of a sum of shard losses (:func:`sharded_objective`: one pass of the
      shard's loss and one collective per point, as the single-process path plus the all-reduces);
    - :meth:`check` (every ``check_every`` iterations, :func:`check_identical`), :meth:`stop_all` (one collective:
      did some process fail?) and :meth:`finish` (raise on every process if one failed, check the final point,
      record the traffic).

    Cost: construction is one all-gather of ``2 world_size`` integers; each method's collective is stated there.
    """

    def __init__(
        self,
        error: Exception | None,
        call: tuple | None,
        options: dict,
        *,
        group: dist.ProcessGroup | None = None,
        check_every: int = 10,
    ) -> None:
        call = (call, tuple(sorted((k, _option_digest(v)) for k, v in options.items())))
        agree(error, call, group=group)  # raises on every process, or on none
        self.group, self.check_every = group, check_every
        self.traffic: dict = {}
        self.failures = Failures(group)  # an exception on one process ends the run on all of them
        self.reduce, self.reduce_tangent = reducers(group, self.traffic)
        self.quiet, _ = reducers(group)
        self.value, self.tangent, self.guard = self.failures.value, self.failures.tangent, self.failures.guard

    def norm(self, t: torch.Tensor) -> float:
        """``‖t‖`` of the vector that the processes' ``t`` together make (one uncounted all-reduce of a scalar)."""
        return math.sqrt(float(self.quiet(t.square().sum())))

    def objective(self, f_shard: Callable, curvature: bool) -> tuple[Callable, Callable, Callable]:
        """``(f, grad, hvp)`` of ``Σ_processes f_shard`` (see :func:`sharded_objective`), counted in the traffic."""
        return sharded_objective(
            f_shard, curvature=curvature, group=self.group, traffic=self.traffic, failures=self.failures
        )

    def check(self, x: Point, iteration: int) -> None:
        """:func:`check_identical` at every ``check_every``-th iteration (``RuntimeError`` if the points differ)."""
        if iteration % self.check_every == 0:
            check_identical(x, group=self.group)

    def stop_all(self) -> bool:
        """Whether some process has failed (one collective: call it on every process at the same point)."""
        return self.failures.any()

    def finish(self, res: OptimizeResult) -> None:
        """At the end of the solve: raise on every process if one failed (:meth:`Failures.raise_if_any`), check that
        ``res.x`` is one point, and record this process's traffic in ``res.communication``."""
        self.failures.raise_if_any()
        check_identical(res.x, group=self.group)
        res.communication = dict(self.traffic)  # bytes and all-reduce calls of this process, all stages


def check_identical(x: Point, *, group: dist.ProcessGroup | None = None, name: str = "x") -> None:
    """Raise ``RuntimeError`` unless every rank holds the same factors/cores of ``x`` (compared by a checksum:
    two weighted sums per factor, all-gathered; cost O(#parameters) and a few numbers of communication)."""
    tensors = [x.U, x.S, x.V] if hasattr(x, "U") else list(x.cores)
    sums = []
    for t in tensors:
        t = t.detach().to(torch.float64).reshape(-1)
        w = torch.arange(1, t.numel() + 1, dtype=torch.float64, device=t.device)
        sums += [t.sum(), (t * w).sum() / t.numel()]
    local = torch.stack(sums)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    for r, other in enumerate(gathered):
        if not torch.equal(other, local):
            raise RuntimeError(f"{name} differs between this rank and rank {r}: the ranks no longer hold one point")


def shard(n: int, rank: int, world_size: int) -> slice:
    """The contiguous slice of ``range(n)`` that rank ``rank`` of ``world_size`` holds (sizes differ by ≤ 1)."""
    n, world_size, rank = as_int("n", n, 0), as_int("world_size", world_size), as_int("rank", rank, 0)
    if not rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))
