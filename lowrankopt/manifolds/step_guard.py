"""The optimizer step guard: a manifold parameter of lowrankopt never leaves its manifold silently, whatever optimizer
touches it.

A parameter on a packed manifold (:class:`~lowrankopt.manifolds.geoopt.GeooptManifold`), or one made by
:func:`manifold_parameter` (e.g. the ``geoopt.EuclideanStiefel`` parameters of the ``nn`` layers), must be stepped by
a Riemannian optimizer (geoopt's ``RiemannianSGD`` / ``RiemannianAdam``, or lowrankopt's own
:class:`~lowrankopt.optim.RiemannianSGD` / :class:`~lowrankopt.optim.RiemannianAdam` /
:class:`~lowrankopt.optim.Riemannion`), which moves it along its manifold by the retraction. An optimizer step pre-hook
raises

* ``TypeError`` when an optimizer that is not one of geoopt's Riemannian optimizers (``torch.optim.Adam``, ``SGD``,
  ...) is about to step such a parameter that has a gradient: a Euclidean step would leave the manifold silently. The
  message names the parameter (its layer and attribute, param group and position). Plain parameters can stay with any
  optimizer; give the manifold parameters to ``RiemannianSGD`` / ``RiemannianAdam``.
* ``ValueError`` for any param group holding a packed parameter with ``weight_decay != 0`` under an optimizer that
  decays the packed factors (geoopt's): that is meaningless (it would shrink orthonormal frames; give these parameters
  their own group with ``weight_decay=0``). lowrankopt's optimizers decay on the manifold (the matrix is scaled, the
  frames are not), so weight decay is allowed for them. Also for optimizer state whose tensors do not have their
  parameter's shape (a checkpoint of another packed layout).

An optimizer class takes part as a Riemannian optimizer that decays on the manifold by setting the class attribute
``RIEMANNIAN`` (``lowrankopt_riemannian = True``).

A parameter whose manifold carries the mark ``MERGED`` (set by an adapter layer while its adapter is folded into the
base weight, e.g. :class:`~lowrankopt.nn.RiemannianLoRALinear`) must not be stepped at all: any optimizer about to
step it with a gradient raises ``RuntimeError`` naming the layer (the step would change an adapter whose effect
is frozen in the weight; unmerge first).

**Why global.** The optimizers that must be refused are the user's own (``torch.optim.Adam(model.parameters())``),
made after and apart from our parameters; torch offers no hook on an optimizer's construction, and a per-optimizer
``register_step_pre_hook`` needs the optimizer object. So the hook is torch's global
``register_optimizer_step_pre_hook``, scoped as tightly as that allows: it is installed only when the first manifold
parameter of the library is created or unpickled (importing lowrankopt changes nothing for users who never make one),
it looks only at the parameters marked above, and its scan of an optimizer is cached (``O(#groups)`` per step).
"""

from __future__ import annotations

import weakref

import geoopt
import torch
from geoopt.tensor import ManifoldTensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

__all__ = ["manifold_parameter", "register_step_guard"]

OWNER = "lowrankopt_owner"  # on the manifold (deep copies and pickles keep it): who made the parameter, an _Owner
HINT = "lowrankopt_hint"  # on the manifold: a Euclidean way to train the same layer, if there is one
# on the manifold: the name of the merged adapter layer the parameter belongs to (None or absent: not merged)
MERGED = "lowrankopt_merged"
# on an optimizer class: it steps manifold parameters by their retraction and decays them on the manifold (set by
# lowrankopt.optim.stochastic, which does not import this module: it would import geoopt)
RIEMANNIAN = "lowrankopt_riemannian"


class _Owner(str):
    """The owner mark of a guarded parameter (a str naming it). Creating one installs the step guard — also when a
    pickle holding one is loaded, in any process: a ``geoopt.EuclideanStiefel`` parameter (a geoopt class, which
    runs no code of ours when unpickled) carries the guard with it through ``torch.load`` and spawned workers."""

    def __new__(cls, owner: str):
        register_step_guard()
        return super().__new__(cls, owner)

    def __reduce__(self):
        return type(self), (str(self),)


def manifold_parameter(
    data: torch.Tensor, manifold: geoopt.Manifold, owner: str, hint: str | None = None
) -> geoopt.ManifoldParameter:
    """A ``geoopt.ManifoldParameter`` created by the library: the optimizer step guard is installed and the
    parameter is marked as guarded, with ``owner`` (e.g. ``"TTConv2d(4, 6, kernel_size=3, rank=2).first"``) and
    ``hint`` (a Euclidean alternative) for the guard's error messages. ``manifold`` must be a fresh instance
    (the marks live on it)."""
    setattr(manifold, OWNER, _Owner(owner))  # installs the guard, here and wherever the parameter is unpickled
    setattr(manifold, HINT, hint)
    return geoopt.ManifoldParameter(data, manifold=manifold)


def _is_ours(p) -> bool:
    """A parameter the guard protects: on a packed manifold, or made by :func:`manifold_parameter`."""
    m = getattr(p, "manifold", None) if isinstance(p, ManifoldTensor) else None
    return _is_packed(m) or getattr(m, OWNER, None) is not None


def _is_packed(manifold) -> bool:
    """A packed manifold of the geoopt bridge (they set the class attribute ``lowrankopt_packed``)."""
    return bool(getattr(manifold, "lowrankopt_packed", False))


def _is_riemannian(optimizer) -> bool:
    """geoopt's Riemannian optimizers (RiemannianSGD, RiemannianAdam, their sparse versions, the line search)
    share ``OptimMixin``; they step a ManifoldTensor by its manifold's retraction. So do lowrankopt's
    (:func:`_decays_on_manifold`)."""
    return isinstance(optimizer, geoopt.optim.mixin.OptimMixin) or _decays_on_manifold(optimizer)


def _decays_on_manifold(optimizer) -> bool:
    """lowrankopt's stochastic optimizers (the class attribute ``RIEMANNIAN``): Riemannian, and their weight
    decay scales the point on its manifold instead of the packed factors."""
    return getattr(type(optimizer), RIEMANNIAN, False) is True


def _euclidean_step_error(optimizer, i: int, j: int, p) -> TypeError:
    owner = getattr(p.manifold, OWNER, None) or f"a parameter on {p.manifold!r}"
    hint = getattr(p.manifold, HINT, None)
    return TypeError(
        f"{type(optimizer).__name__} is not a Riemannian optimizer, but param group {i}, parameter {j} "
        f"(shape {tuple(p.shape)}) is {owner}, a lowrankopt manifold parameter: a Euclidean step would move it off "
        "its manifold (its orthonormal factors would stop being orthonormal). Train manifold parameters with "
        "geoopt.optim.RiemannianSGD or geoopt.optim.RiemannianAdam, or lowrankopt.optim.RiemannianSGD / "
        "RiemannianAdam / Riemannion, which also take the plain parameters and weight decay (plain parameters can "
        "keep any torch optimizer: give the manifold parameters to a Riemannian one)"
        + (f"; or {hint}" if hint else "")
        + "."
    )


def _merged_step_error(optimizer, i: int, j: int, p) -> RuntimeError:
    return RuntimeError(
        f"{type(optimizer).__name__}: param group {i}, parameter {j} (shape {tuple(p.shape)}) is the adapter of "
        f"{getattr(p.manifold, MERGED)!r}, which is merged into its base weight: a step would change an adapter "
        "whose effect is frozen in the merged weight. Unmerge the adapters (lowrankopt.nn.unmerge_adapter) before "
        "training, or clear the gradients (optimizer.zero_grad()) of a merged model."
    )


class _GuardPlan:
    """What the guard must look at in one optimizer, found by one scan of its parameters: the guarded parameters
    ``(group index, position, parameter)``, the groups holding packed ones ``(group index, group, a packed
    parameter)``, and the ``state`` whose ``"step"`` entries were last made ints (``RiemannianAdam``).

    Valid while the optimizer's groups are the same objects with the same param lists of the same lengths — what
    ``add_param_group`` (a new group), ``load_state_dict`` (new group dicts) and assigning ``group["params"]``
    change; checking that costs ``O(#groups)`` (replacing one element of a param list in place, which no torch API
    does, is not seen). The plan holds the groups and lists it was made from, so they cannot be freed and their
    ids reused while it lives."""

    __slots__ = ("groups", "lists", "lengths", "guarded", "packed_groups", "state")

    def __init__(self, optimizer):
        self.groups = list(optimizer.param_groups)
        self.lists = [g["params"] for g in self.groups]
        self.lengths = [len(ps) for ps in self.lists]
        self.guarded = [(i, j, p) for i, ps in enumerate(self.lists) for j, p in enumerate(ps) if _is_ours(p)]
        first_packed = {}  # group index -> its first packed parameter (named by the weight-decay error)
        for i, _, p in self.guarded:
            if _is_packed(p.manifold):
                first_packed.setdefault(i, p)
        self.packed_groups = [(i, self.groups[i], p) for i, p in first_packed.items()]
        self.state = None

    def fits(self, optimizer) -> bool:
        groups = optimizer.param_groups
        return len(groups) == len(self.groups) and all(
            g is h and g["params"] is ps and len(ps) == n
            for g, h, ps, n in zip(groups, self.groups, self.lists, self.lengths)
        )


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> _GuardPlan


def _plan(optimizer) -> _GuardPlan:
    """The optimizer's :class:`_GuardPlan`, made again when its param groups changed (at every step for an optimizer
    that cannot be a weak dictionary key: unhashable, or without weak references)."""
    try:
        plan = _PLANS.get(optimizer)
        if plan is None or not plan.fits(optimizer):
            plan = _PLANS[optimizer] = _GuardPlan(optimizer)
    except TypeError:
        plan = _GuardPlan(optimizer)
    return plan


def _step_pre_hook(optimizer, args, kwargs):
    """Global optimizer step pre-hook for the manifold parameters of lowrankopt (:func:`_is_ours`).

    * A step of a non-Riemannian optimizer (``torch.optim.Adam``, ``SGD``, ...) on one of them, with a gradient,
      is an error (``TypeError``, naming the parameter): it would leave the manifold silently.
    * Weight decay on packed parameters is an error (``ValueError``), except under lowrankopt's optimizers, which
      decay on the manifold (:func:`_decays_on_manifold`).
    * Any step of a parameter of a merged adapter (the mark ``MERGED``), with a gradient, is an error
      (``RuntimeError``, naming the layer).
    * ``torch.optim.Adam.__setstate__`` (run by ``load_state_dict``) turns geoopt's integer ``state["step"]``
      into a float32 tensor, so ``RiemannianAdam``'s bias corrections would change after a checkpoint round
      trip; turn it back into the int geoopt keeps (for every parameter of the optimizer), so that training
      resumes bit-identically.

    Cost per step: ``O(#groups + #guarded parameters)`` — the scan of all parameters is cached per optimizer
    (:class:`_GuardPlan`) and redone only when its param groups change; the ``"step"`` entries are converted once
    per ``optimizer.state`` object (``load_state_dict`` makes a new one).
    """
    plan = _plan(optimizer)
    for i, j, p in plan.guarded:
        if p.grad is not None and getattr(p.manifold, MERGED, None):
            raise _merged_step_error(optimizer, i, j, p)
    if not _is_riemannian(optimizer):
        for i, j, p in plan.guarded:
            if p.grad is not None:
                raise _euclidean_step_error(optimizer, i, j, p)
    for i, group, p in () if _decays_on_manifold(optimizer) else plan.packed_groups:
        wd = group.get("weight_decay", 0)
        if wd:
            raise ValueError(
                f"{type(optimizer).__name__}: param group {i} has weight_decay={wd} but holds a lowrankopt "
                f"manifold parameter (on {p.manifold!r}); decaying packed factors is meaningless and breaks "
                "their orthonormality: use weight_decay=0 for lowrankopt manifold parameters (put them in their "
                "own param group), or lowrankopt.optim's optimizers, which decay on the manifold."
            )
    if plan.state is not optimizer.state:
        _check_state_shapes(optimizer, plan)
        if isinstance(optimizer, geoopt.optim.RiemannianAdam):
            for state in optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = int(state["step"].item())
        plan.state = optimizer.state
    return None


def _check_state_shapes(optimizer, plan: _GuardPlan) -> None:
    """``ValueError`` if a packed parameter's optimizer state (momentum, moments) has another shape than the parameter:
    a checkpoint written for another packed layout (lowrankopt 0.1 packed matrices as ``[U | S | V]``; now
    ``[C | V]``), which would otherwise fail deep inside the optimizer or, broadcasting, train wrongly."""
    for i, j, p in plan.guarded:
        if not _is_packed(p.manifold):
            continue
        for key, t in optimizer.state.get(p, {}).items():
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape != p.shape:
                raise ValueError(
                    f"{type(optimizer).__name__}: the state {key!r} of param group {i}, parameter {j} has shape "
                    f"{tuple(t.shape)} but the parameter has shape {tuple(p.shape)} (an optimizer checkpoint of "
                    "another packed layout, e.g. lowrankopt 0.1's [U | S | V] matrices): start the optimizer afresh "
                    "(the model's state_dict converts)."
                )


_STEP_PRE_HOOK = None


def register_step_guard() -> None:
    """Install the global step pre-hook once, when the first manifold parameter of the library is created (so
    importing lowrankopt does not touch the optimizers of users who never use these parameters)."""
    global _STEP_PRE_HOOK
    if _STEP_PRE_HOOK is None:
        _STEP_PRE_HOOK = register_optimizer_step_pre_hook(_step_pre_hook)
