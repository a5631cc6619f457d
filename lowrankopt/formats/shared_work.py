"""A scope in which repeated intermediate results are computed once.

One Riemannian HVP evaluates f twice (the δ-pass and the curvature pass) on objects that share the
index plan of every ``gather``, the interface vectors of the point's frames and f's value at x.
Inside :func:`shared_work` such results are memoized by the identity of the objects they come from;
outside it nothing is cached (so timing f alone measures f alone).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

import torch

_T = TypeVar("_T")
_F = TypeVar("_F", bound=type[torch.autograd.Function])

_SCOPE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("lowrankopt_shared_work", default=None)

# A memo tag set by a caller that will evaluate f again on curvature objects in the same scope: gathers then prefer
# the implementations whose intermediate results (index plans, frame interfaces) those later passes reuse.
CURVATURE_FOLLOWS = "curvature passes follow"


@contextlib.contextmanager
def shared_work(store: dict | None = None) -> Iterator[None]:
    """Memoize intermediate results inside this block in ``store`` (a new dict if None). Inside an
    active block this is a no-op: the outer memo is shared."""
    if _SCOPE.get() is not None:
        yield
        return
    token = _SCOPE.set({} if store is None else store)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def memo(tag: str, objs: tuple, compute: Callable[[], _T], extra: tuple = ()) -> _T:
    """``compute()``, memoized in the active scope under ``tag``, the identities of ``objs`` and the
    plain values ``extra``. The objects are kept alive by the memo, so identities cannot be reused."""
    scope = _SCOPE.get()
    if scope is None:
        return compute()
    key = (tag, tuple(id(o) for o in objs), extra)
    if key not in scope:
        scope[key] = (objs, compute())
    return scope[key][1]


def is_memoized(tag: str, objs: tuple, extra: tuple = ()) -> bool:
    scope = _SCOPE.get()
    return scope is not None and (tag, tuple(id(o) for o in objs), extra) in scope


def memoized_function(cls: _F) -> _F:
    """Class decorator for a ``torch.autograd.Function`` written as ``_forward(ctx, ...)`` and
    ``_backward(ctx, grad)``: both run inside one memo kept on ``ctx`` (nested under any active scope),
    so intermediate results of the forward pass are reused by the backward pass."""
    fwd, bwd = cls._forward, cls._backward

    def forward(ctx, *args):
        ctx.memo = {}
        with shared_work(ctx.memo):
            return fwd(ctx, *args)

    def backward(ctx, *grads):
        with shared_work(ctx.memo):
            return bwd(ctx, *grads)

    cls.forward, cls.backward = staticmethod(forward), staticmethod(backward)
    return cls


class _HasDeltas(Protocol):
    """A family of a δ-object: its δ tensors, or None for a constant term."""

    @property
    def deltas(self) -> tuple[torch.Tensor, ...] | None: ...


def unique_deltas(families: Iterable[_HasDeltas]) -> list[torch.Tensor]:
    """The δ tensors of ``families`` (objects with a ``deltas`` tuple or None), each once, in order."""
    seen = {}
    for fam in families:
        for t in fam.deltas or ():
            seen.setdefault(id(t), t)
    return list(seen.values())
