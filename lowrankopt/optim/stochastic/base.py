"""The machinery the stochastic optimizers share: which parameters live on which manifold, one step as *check all,
compute all, check all, then write*, and the batching of same-shape fixed-rank parameters.

A subclass implements :meth:`RiemannianOptimizer._update` — the method's arithmetic on a stack of gradients (tangent
coordinates of the stack's points, or plain tensors) — and names the parameter kinds it can step; everything else
(gauge, retraction with the decay folded in, transport of the state, the non-finite checks, state writing) is here.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ...manifolds.base import LowRankManifold
from ...manifolds.fixed_rank import FixedRankMatrices
from .geometry import EuclideanStack, FixedRankStack, GeooptStack, ProtocolStack, scalable

__all__ = ["Item", "RiemannianOptimizer"]

FIXED_RANK, PACKED, GEOOPT, PLAIN = "fixed-rank", "packed", "geoopt", "plain"

# what a method's _update returns: direction, tangent state (transported), kept state, per-item scalar state
Update = tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict[str, Any]]]


def _kind(p: torch.Tensor) -> tuple[str, Any]:
    """``(kind, manifold)`` of a parameter: a packed lowrankopt manifold (fixed-rank, or another through the protocol;
    manifold: its base :class:`LowRankManifold`), another ``geoopt`` manifold, or plain (no manifold, or geoopt's
    ``Euclidean``). geoopt is imported only for a tensor that has a manifold, i.e. when it is loaded already."""
    M = getattr(p, "manifold", None)
    if M is None:
        return PLAIN, None
    base = getattr(M, "base", None)
    if getattr(M, "lowrankopt_packed", False) and isinstance(base, LowRankManifold):
        return (FIXED_RANK if isinstance(base, FixedRankMatrices) else PACKED), base
    import geoopt

    if isinstance(M, geoopt.Manifold) and not isinstance(M, geoopt.Euclidean):
        return GEOOPT, M
    return PLAIN, None


class Item:
    """One parameter with a gradient in this step: where it is (group ``i``, position ``j``), its kind and its
    manifold, and its param group."""

    __slots__ = ("i", "j", "p", "group", "kind", "manifold")

    def __init__(self, i: int, j: int, p: torch.Tensor, group: dict) -> None:
        self.i, self.j, self.p, self.group = i, j, p, group
        self.kind, self.manifold = _kind(p)

    @property
    def name(self) -> str:
        """The parameter as errors name it: group, position, shape, and the layer that made it when known."""
        owner = getattr(getattr(self.p, "manifold", None), "lowrankopt_owner", None)  # step_guard.OWNER
        return f"param group {self.i}, parameter {self.j} (shape {tuple(self.p.shape)}{f', {owner}' if owner else ''})"


def _check_finite(who: str, checks: list[tuple[Item, str, torch.Tensor]]) -> None:
    """``ValueError`` naming the parameter (and ``what`` of it) of the first ``(item, what, tensor)`` whose tensor has
    NaN/Inf: one reduction per tensor and one host read per device; the names are made only on failure."""
    by_device: dict[torch.device, list] = defaultdict(list)
    for check in checks:
        by_device[check[2].device].append(check)
    for group in by_device.values():
        if group and not bool(torch.stack([torch.isfinite(t).all() for _, _, t in group]).all()):
            item, what = next((it, what) for it, what, t in group if not bool(torch.isfinite(t).all()))
            raise ValueError(f"{who}: {item.name}: {what} contains NaN or Inf (nothing was changed)")


class RiemannianOptimizer(torch.optim.Optimizer):
    """Base of :class:`RiemannianSGD`, :class:`RiemannianAdam` and :class:`Riemannion`: a ``torch.optim.Optimizer``
    that steps a parameter on its manifold when it has one and by the ordinary (Euclidean) rule otherwise.

    * **Packed lowrankopt parameters** (``p.manifold`` a :class:`~lowrankopt.manifolds.geoopt.GeooptManifold`, e.g.
      the weight of :class:`~lowrankopt.nn.LowRankLinear`): ``p.grad`` is the δ-gradient (the layers use the
      straight-through form), projected onto the gauge here, so it is the Riemannian gradient in the packed
      coordinates. Tangent state (momentum) lives at the current point and is moved by vector transport (projection)
      after each retraction. Fixed-rank parameters of one param group and one ``(m, n, r, dtype, device)`` are
      stepped together: each QR/SVD is one batched call. Other manifolds (TT, ...): one parameter at a time, through
      the manifold protocol.
    * **Other geoopt manifolds** (``Stiefel``, ...): through geoopt's ``egrad2rgrad`` / ``proju`` / ``retr`` /
      ``transp``, one parameter at a time.
    * **Plain parameters** (biases, heads): the Euclidean rule of the method.

    **Weight decay** is decoupled: ``x ← R((1 − lr · wd) x − lr · d)``. A fixed-rank (or TT) point times a positive
    scalar stays on its manifold, so the decay acts on the matrix, never on the orthonormal frames; it is folded into
    the retraction at no cost. ``lr · wd < 1`` is required. Other geoopt manifolds: ``weight_decay`` must be 0.

    **Non-finite values**: a NaN/Inf gradient, or a NaN/Inf point or state after the step, raises ``ValueError``
    naming the parameter before any parameter or state is written: the last good point is kept. Cost: a reduction per
    tensor and one host read per device, twice per step.

    The step guard (:mod:`lowrankopt.manifolds.step_guard`) accepts these optimizers (the class attribute
    ``lowrankopt_riemannian``) for manifold parameters, with weight decay.
    """

    lowrankopt_riemannian = True  # read by lowrankopt.manifolds.step_guard (its RIEMANNIAN mark)
    kinds: tuple[str, ...] = (FIXED_RANK, PACKED, GEOOPT, PLAIN)  # the parameter kinds this method can step

    # ------------------------------------------------------------------ construction and checks
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (``torch.optim.Optimizer.add_param_group``); its hyperparameters and every parameter's
        manifold are checked now (``TypeError`` / ``ValueError`` naming them), and again at every step."""
        super().add_param_group(param_group)
        i, group = len(self.param_groups) - 1, self.param_groups[-1]
        self._check_group(i, group)
        for j, p in enumerate(group["params"]):
            self._check_item(Item(i, j, p, group))

    def _check_group(self, i: int, group: dict) -> None:
        """Hyperparameters of a group (subclasses extend): ``lr >= 0``, ``weight_decay >= 0``."""
        for key in ("lr", "weight_decay"):
            v = group[key]
            if isinstance(v, torch.Tensor) or not math.isfinite(float(v)) or float(v) < 0:
                raise ValueError(f"{type(self).__name__}: param group {i} has {key}={v!r}; need a finite float >= 0")

    def _check_item(self, item: Item) -> None:
        if item.kind not in self.kinds:
            raise TypeError(
                f"{type(self).__name__} cannot step {item.name}: it lives on {getattr(item.p, 'manifold', None)!r}, "
                f"and {type(self).__name__} steps only {' and '.join(self.kinds)} parameters"
            )
        if not item.p.is_floating_point():
            raise TypeError(f"{type(self).__name__}: {item.name} has dtype {item.p.dtype}; need a real float dtype")
        wd, lr = float(item.group["weight_decay"]), float(item.group["lr"])
        if not wd:
            return
        if item.kind == GEOOPT or (item.kind == PACKED and not scalable(item.manifold)):
            raise ValueError(
                f"{type(self).__name__}: param group {item.i} has weight_decay={wd}, but {item.name} lives on "
                f"{item.p.manifold!r}, which is not closed under scaling: put it in a param group with weight_decay=0"
            )
        if item.kind != PLAIN and lr * wd >= 1:
            raise ValueError(
                f"{type(self).__name__}: param group {item.i} has lr * weight_decay = {lr * wd:g} >= 1, which would "
                f"scale the manifold point of {item.name} by 1 − lr·wd <= 0"
            )

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step over every parameter with a gradient (see the class docstring); returns ``closure()`` if given
        (evaluated with gradients enabled, before the step)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items = []
        for i, group in enumerate(self.param_groups):
            self._check_group(i, group)
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                item = Item(i, j, p, group)
                if p.grad.is_sparse:
                    raise ValueError(f"{type(self).__name__}: {item.name} has a sparse gradient (not supported)")
                self._check_item(item)
                items.append(item)
        _check_finite(type(self).__name__, [(it, "its gradient", it.p.grad) for it in items])
        writes = []
        for stack_items, make in self._stacks(items):
            try:
                writes += self._step_stack(stack_items, make)
            except torch.linalg.LinAlgError as err:  # an SVD of an overflowed step (the gradients are finite)
                names = "; ".join(it.name for it in stack_items)
                raise ValueError(
                    f"{type(self).__name__}: the step of {names} is not finite or its factorization failed "
                    f"(lower lr?; nothing was changed): {err}"
                ) from err
        checks = [(it, "the new point", x) for it, x, _ in writes]
        checks += [(it, f"the new state {k!r}", v) for it, _, st in writes for k, v in st.items() if _is_t(v)]
        _check_finite(type(self).__name__, checks)
        for it, x, state in writes:  # nothing was written before this point
            it.p.copy_(x)
            old = self.state[it.p]
            for k, v in state.items():
                if _is_t(v) and _is_t(old.get(k)) and old[k].shape == v.shape:
                    old[k].copy_(v)  # keep the state tensors (and their storage) of earlier steps
                else:
                    old[k] = v.clone() if _is_t(v) else v  # a clone: not a view of the whole stack
        return loss

    def _stacks(self, items: list[Item]) -> Iterable[tuple[list[Item], Callable[[torch.Tensor], Any]]]:
        """The parameters grouped into stacks, each with the factory of its geometry: fixed-rank ones by (param
        group, manifold, dtype, device), every other one alone."""
        buckets: dict[tuple, list[Item]] = defaultdict(list)
        for it in items:
            if it.kind == FIXED_RANK:
                buckets[(it.i, it.manifold, it.p.dtype, it.p.device)].append(it)
        for bucket in buckets.values():
            yield bucket, lambda X, base=bucket[0].manifold: FixedRankStack(base, X)
        for it in items:
            if it.kind == PACKED:
                yield [it], lambda X, base=it.manifold: ProtocolStack(base, X)
            elif it.kind == GEOOPT:
                yield [it], lambda X, M=it.manifold: GeooptStack(M, X)
            elif it.kind == PLAIN:
                yield [it], EuclideanStack

    def _step_stack(self, items: list[Item], make: Callable[[torch.Tensor], Any]) -> list[tuple[Item, Any, dict]]:
        """New points and states of one stack (nothing written): gauge the gradients, the method's update, the
        retraction ``R((1 − lr·wd) x − lr·d)``, the transport of the tangent state."""
        group = items[0].group
        geo = make(torch.stack([it.p.detach() for it in items]))
        g = geo.rgrad(torch.stack([it.p.grad for it in items]))
        states = [self.state.get(it.p, {}) for it in items]
        d, tangent, kept, scalars = self._update(items, g, states, geo)
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        new = geo.retract(-lr * d, 1.0 - lr * wd)
        tangent = {k: geo.transport(v) for k, v in tangent.items()}
        out = []
        for n, it in enumerate(items):
            state = {k: v[n] for k, v in (*tangent.items(), *kept.items())}
            out.append((it, new[n], {**state, **(scalars[n] if scalars else {})}))
        return out

    # ------------------------------------------------------------------ what a method implements
    def _update(self, items: list[Item], g: torch.Tensor, states: list[dict], geo: Any) -> Update:
        """The method on a stack: ``g`` the gauged gradients ``(k, ...)``, ``states`` the items' states (empty dicts on
        the first step), ``geo`` the stack's geometry. Returns the direction ``d`` (tangent: the step is
        ``R((1 − lr·wd) x − lr·d)``), the tangent state to transport and the state to keep as it is (dicts of stacked
        tensors), and per-item scalar state (a list of dicts, or empty)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for methods
    @staticmethod
    def stacked(states: list[dict], key: str, like: torch.Tensor) -> torch.Tensor:
        """The items' state ``key`` stacked like ``like``, zeros where an item has none yet."""
        return torch.stack([s[key] if key in s else torch.zeros_like(like[0]) for s in states])

    @staticmethod
    def per_item(values: list[float], like: torch.Tensor) -> float | torch.Tensor:
        """One value per item of a stack: a float when they are equal, else a ``(k, 1, ...)`` tensor that broadcasts
        against the stack ``like``."""
        if all(v == values[0] for v in values):
            return float(values[0])
        t = torch.tensor(values, dtype=like.dtype, device=like.device)
        return t.reshape(-1, *([1] * (like.dim() - 1)))


def _is_t(v: object) -> bool:
    return isinstance(v, torch.Tensor)
