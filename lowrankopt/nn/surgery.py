r"""Module surgery, shared by every converter of :mod:`lowrankopt.nn`: which submodules to convert (one
target-selection language, PEFT's), swapping them all or none, putting the originals back, counting parameters.

**Selecting modules.** :func:`select_modules` takes what PEFT's ``target_modules`` takes:

* a list (tuple, set) of module-name suffixes, matched on whole dotted components: ``"q_proj"`` matches
  ``"layers.0.attn.q_proj"`` but not ``"layers.0.attn.kq_proj"``, ``"mlp.0"`` matches ``"block.mlp.0"``;
* a string: a regular expression matched against the whole qualified name (``re.fullmatch``), e.g.
  ``r"layers\.\d+\.attn\.(q|v)_proj"``;
* ``"all-linear"``: every ``nn.Linear`` (and Hugging Face's GPT-2-style ``Conv1D``) except the output layer, as PEFT
  defines it: the module the model returns from ``get_output_embeddings()`` (Hugging Face models; a plain
  ``nn.Module`` has no such method, and then every linear layer is selected);
* a predicate ``fn(name, module) -> bool``;
* None: every module the converter can convert.

``exclude_modules`` takes the same forms and wins over ``target_modules``. Only the modules a converter can convert are
candidates (its ``eligible`` test), the root module never (it cannot be replaced in place), and a candidate inside
another selected one is left to it. A module object reachable under several names (one module used at two places)
is one candidate: selected when one of its names matches ``target_modules`` and none matches ``exclude_modules``.

**Replacing them.** :func:`replace_modules` builds every replacement before it installs any, so an error while
building (a bad rank, a size that does not fit) leaves the model exactly as it was; a module used at several places
is built once and the one new module installed at every place; a parameter tied to another place of the model (the
same tensor registered by another module, e.g. an output layer tied to the input embedding) stays tied: a replacement
that keeps it (an adapter wrapping the original layer) keeps the tie, and one that would drop it is refused
(``ValueError``, the model unchanged). :func:`restore_modules` is the same routine in the other direction (adapters
unloaded, factorized layers written densely: :func:`convert_to_dense`).

**Counting parameters.** :func:`count_parameters` counts each tensor once (tied and shared ones included).

Cost: a selection or a replacement walks the module tree once per call (``O(modules + parameters)``) besides what
building the replacements costs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "ALL_LINEAR",
    "Targets",
    "convert_to_dense",
    "count_parameters",
    "is_linear",
    "replace_modules",
    "restore_modules",
    "select_modules",
    "tied_parameters",
]

ALL_LINEAR = "all-linear"

Targets = str | Iterable[str] | Callable[[str, nn.Module], bool]
"""What ``target_modules`` / ``exclude_modules`` take: suffixes, a regex, ``"all-linear"`` or a predicate."""

_FORMS = "a list of module-name suffixes, a regex string, 'all-linear' or a predicate fn(name, module) -> bool"


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is what ``"all-linear"`` targets: an ``nn.Linear`` or a GPT-2-style ``Conv1D`` (a class of
    that name with a 2-D ``weight`` stored ``(in, out)``, as PEFT's definition)."""
    if isinstance(module, nn.Linear):
        return True
    w = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2


def _output_layers(model: nn.Module) -> set[int]:
    """The ids of the output layer(s) ``"all-linear"`` leaves out: what ``model.get_output_embeddings()`` returns
    (Hugging Face's convention); none for a model without that method."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {id(head)} if isinstance(head, nn.Module) else set()


def _matcher(spec: Targets | None, arg: str, model: nn.Module) -> Callable[[str, nn.Module], bool] | None:
    """``spec`` as a predicate of (qualified name, module); None for None. Raises ``TypeError`` / ``ValueError``
    naming ``arg`` for what is none of the forms, or an invalid regex."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec.lower() == ALL_LINEAR:
            heads = _output_layers(model)
            return lambda name, m: is_linear(m) and id(m) not in heads
        try:
            pattern = re.compile(spec)
        except re.error as err:
            raise ValueError(f"{arg} is not a valid regular expression ({err}): {spec!r}") from None
        return lambda name, m: pattern.fullmatch(name) is not None
    if callable(spec):
        return lambda name, m: bool(spec(name, m))
    if isinstance(spec, bytes) or not isinstance(spec, Iterable):
        raise TypeError(f"{arg} must be {_FORMS}, got {type(spec).__name__}")
    suffixes = tuple(spec)
    for s in suffixes:
        if not isinstance(s, str) or not s:
            raise TypeError(f"{arg} must be {_FORMS}; as a list its items must be non-empty strings, got {s!r}")
    return lambda name, m: any(name == s or name.endswith("." + s) for s in suffixes)


def _eligibility(eligible) -> Callable[[nn.Module], bool]:
    if eligible is None:
        return lambda m: True
    if isinstance(eligible, type) or (isinstance(eligible, tuple) and all(isinstance(t, type) for t in eligible)):
        return lambda m: isinstance(m, eligible)
    if callable(eligible):
        return eligible
    raise TypeError(f"eligible must be a module type, a tuple of them or a predicate, got {type(eligible).__name__}")


def _locations(model: nn.Module, keep: Callable[[nn.Module], bool]) -> dict[int, tuple[nn.Module, list[str]]]:
    """``{id(module): (module, [every qualified name of it])}`` for the non-root submodules that ``keep`` accepts, in
    the order of ``named_modules``."""
    out: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if name and keep(m):
            out.setdefault(id(m), (m, []))[1].append(name)
    return out


def select_modules(
    model: nn.Module,
    target_modules: Targets | None = None,
    exclude_modules: Targets | None = None,
    *,
    eligible: type | tuple[type, ...] | Callable[[nn.Module], bool] | None = None,
) -> dict[str, nn.Module]:
    """The submodules of ``model`` that a converter should replace (see the module docstring for the forms).

    Args:
        model: the model.
        target_modules: suffixes, a regex, ``"all-linear"``, a predicate ``fn(name, module) -> bool``, or None (every
            eligible module).
        exclude_modules: the same forms, for modules to leave alone (wins over ``target_modules``).
        eligible: what the converter can convert: a module type, a tuple of types or a predicate of the module
            (default: any module).

    Returns ``{qualified name: module}`` in ``named_modules`` order, with every name of a module used at several
    places. Cost ``O(modules)`` predicate calls (one per name).
    """
    _check_model(model)
    target = _matcher(target_modules, "target_modules", model)
    exclude = _matcher(exclude_modules, "exclude_modules", model)
    candidates = _locations(model, _eligibility(eligible))
    chosen = {
        key: (m, names)
        for key, (m, names) in candidates.items()
        if (target is None or any(target(n, m) for n in names)) and not (exclude and any(exclude(n, m) for n in names))
    }
    inner = {id(sub) for m, _ in chosen.values() for sub in m.modules() if sub is not m}
    out = [(n, m) for key, (m, names) in chosen.items() if key not in inner for n in names]
    order = {n: k for k, (n, _) in enumerate(model.named_modules(remove_duplicate=False))}
    return dict(sorted(out, key=lambda item: order[item[0]]))


def tied_parameters(model: nn.Module, module: nn.Module) -> dict[str, list[str]]:
    """The parameters of ``module`` (a submodule of ``model``) that are tied to another place of ``model``: ``{name
    in module: [qualified names of the same tensor registered by modules outside module]}`` (e.g. an output layer's
    weight tied to the input embedding). A module used at several places is one module here, not a tie. Cost
    ``O(modules + parameters)``."""
    _check_model(model)
    inside = {id(m) for m in module.modules()}
    elsewhere: dict[int, list[str]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        if id(m) in inside:
            continue
        for pname, p in m._parameters.items():
            if p is not None:
                elsewhere.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    return {n: elsewhere[id(p)] for n, p in module.named_parameters() if id(p) in elsewhere}


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_modules(
    model: nn.Module,
    targets: Mapping[str, nn.Module] | Iterable[str],
    build: Callable[[str, nn.Module], nn.Module],
) -> dict[str, nn.Module]:
    """Replace each target module of ``model`` by ``build(name, module)``, in place, all or nothing.

    * Every replacement is built before any is installed: if ``build`` raises (or returns something that is not a
      module), the exception propagates and the model is untouched.
    * A module used at several places is built once (``build`` gets its first name) and the one new module is
      installed at every place, also at places ``targets`` does not name.
    * Tied parameters stay tied: a replacement that still holds a target's parameter (an adapter wrapping the
      original layer) keeps its ties; one that drops a parameter tied to another place of the model is refused with
      a ``ValueError`` naming both places, before anything is installed.

    Args:
        model: the model, changed in place.
        targets: ``{qualified name: module}`` (what :func:`select_modules` returns) or qualified names.
        build: ``build(name, module) -> new module``.

    Returns ``{qualified name: new module}`` for every place replaced. Cost: the builds, plus ``O(modules +
    parameters)`` per target for the tie check.
    """
    _check_model(model)
    named = dict(targets) if isinstance(targets, Mapping) else {n: None for n in targets}
    wanted: dict[int, nn.Module] = {}
    for name, m in named.items():
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"targets must be qualified names of submodules (the root cannot be replaced), got {name!r}"
            )
        found = model.get_submodule(name)
        if m is not None and found is not m:
            raise ValueError(f"targets[{name!r}] is not the module of model at {name!r}")
        wanted[id(found)] = found
    places = _locations(model, lambda m: id(m) in wanted)
    new_of: dict[int, nn.Module] = {}
    for key, (m, names) in places.items():  # build everything first: an error leaves the model untouched
        new = build(names[0], m)
        if not isinstance(new, nn.Module):
            raise TypeError(f"build({names[0]!r}, ...) must return a torch.nn.Module, got {type(new).__name__}")
        new_of[key] = new
    for key, (m, names) in places.items():
        kept = {id(p) for p in new_of[key].parameters()}
        dropped = {n: p for n, p in m.named_parameters() if id(p) not in kept}
        for pname, others in tied_parameters(model, m).items():
            if pname in dropped:
                raise ValueError(
                    f"{names[0]}.{pname} is tied to {others[0]} (the same tensor); replacing {names[0]!r} would untie "
                    "them: exclude one of the two modules or untie them first (nothing was changed)"
                )
    done: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for key, (m, names) in places.items():
            for name in names:
                parent, child = _parent(model, name)
                setattr(parent, child, new_of[key])
                done.append((parent, child, m))
    except BaseException:
        for parent, child, old in reversed(done):  # put back what was installed
            setattr(parent, child, old)
        raise
    return {name: new_of[key] for key, (_, names) in places.items() for name in names}


def restore_modules(
    model: nn.Module,
    layer_type: type | tuple[type, ...] | Callable[[nn.Module], bool],
    build: Callable[[str, nn.Module], nn.Module],
) -> dict[str, nn.Module]:
    """Replace every submodule of type ``layer_type`` (or accepted by it, a predicate) by ``build(name, layer)`` (e.g.
    an adapter by its base layer, a factorized layer by its dense equivalent), with :func:`replace_modules`'
    guarantees (all or nothing, shared layers once, ties kept). Returns ``{qualified name: restored module}``."""
    return replace_modules(model, select_modules(model, eligible=layer_type), build)


def convert_to_dense(model: nn.Module, types: type | tuple[type, ...] | None = None) -> dict[str, nn.Module]:
    """Replace every layer of ``model`` that has a dense equivalent (a ``to_dense()`` method: STTP / SVDP, TT conv,
    low-rank and TT linear layers) by that ``nn.Linear`` / ``nn.Conv2d``, in place (:func:`restore_modules`).

    Args:
        model: the model.
        types: only layers of these types (default: every layer with ``to_dense``).

    Returns ``{qualified name: dense module}``. Cost: forming each dense weight.
    """
    _check_model(model)

    def dense_able(m: nn.Module) -> bool:
        return callable(getattr(type(m), "to_dense", None)) and (types is None or isinstance(m, types))

    return restore_modules(model, dense_able, lambda name, m: m.to_dense())


def count_parameters(model: nn.Module, trainable_only: bool = True, *, exclude_modules: Targets | None = None) -> int:
    """The number of parameter entries of ``model``, each tensor once (tied and shared parameters count once).

    Args:
        model: the model.
        trainable_only: count only parameters with ``requires_grad``.
        exclude_modules: leave out the parameters of these modules (the forms of :func:`select_modules`), e.g. the
            T-Basis basis, shipped once with the code: ``exclude_modules=lambda name, m: isinstance(m, TBasis)``.

    Cost ``O(modules + parameters)``.
    """
    _check_model(model)
    if not isinstance(trainable_only, bool):
        raise TypeError(f"trainable_only must be a bool, got {type(trainable_only).__name__}")
    skip: set[int] = set()
    if exclude_modules is not None:
        for m in select_modules(model, exclude_modules).values():
            skip.update(id(p) for p in m.parameters())
    return sum(p.numel() for p in model.parameters() if id(p) not in skip and (p.requires_grad or not trainable_only))
