"""Type hints on the public API: every public function and method (each module's ``__all__``, or its public names
when it has none, plus the top-level ``lowrankopt.__all__``) annotates each parameter and its return.

``CHECKED`` is the whole package. A failure lists every offender, one per line, with what is missing.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types
import typing
from collections.abc import Callable, Iterator

import pytest

import lowrankopt

CHECKED = ["lowrankopt"]  # every package and module of the library: its public API must be fully annotated

PUBLIC_DUNDERS = {"__init__", "__call__"}  # dunder methods that users call (the others follow their protocol)


def _in(module_name: str | None, prefixes: list[str]) -> bool:
    return module_name is not None and any(module_name == p or module_name.startswith(p + ".") for p in prefixes)


def _modules(prefixes: list[str]) -> Iterator[types.ModuleType]:
    """The modules named in ``prefixes`` and, for packages, all their submodules (private ones included)."""
    for name in prefixes:
        module = importlib.import_module(name)
        yield module
        if hasattr(module, "__path__"):
            for info in pkgutil.walk_packages(module.__path__, prefix=name + "."):
                if not info.name.endswith(".__main__"):  # importing it would run the CLI
                    yield importlib.import_module(info.name)


def _public_names(module: types.ModuleType) -> list[str]:
    """``__all__``, or the public functions and classes defined in the module when it has none."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == module.__name__
    ]


def _methods(cls: type, prefixes: list[str]) -> Iterator[tuple[str, Callable, bool]]:
    """Public methods and property getters of ``cls`` and of its bases defined under ``prefixes``: ``(where,
    function, whether its first parameter is self/cls)``, ``where`` naming the class that defines it."""
    for klass in cls.__mro__:
        if not _in(klass.__module__, prefixes):
            continue
        for name, attr in vars(klass).items():
            if name.startswith("_") and name not in PUBLIC_DUNDERS:
                continue
            if isinstance(attr, property):
                func, skip_first = attr.fget, True
            elif isinstance(attr, staticmethod):
                func, skip_first = attr.__func__, False
            elif isinstance(attr, classmethod):
                func, skip_first = attr.__func__, True
            elif inspect.isfunction(attr):
                func, skip_first = attr, True
            else:
                continue
            if func is not None and _in(getattr(func, "__module__", None), ["lowrankopt"]):
                yield f"{klass.__module__}.{klass.__qualname__}.{name}", func, skip_first


def public_callables(
    prefixes: list[str], extra_modules: tuple[types.ModuleType, ...] = ()
) -> list[tuple[str, Callable, bool]]:
    """Every public function, method and property getter defined in a module under ``prefixes`` and reachable from
    a public name of those modules (or of ``extra_modules``, whose re-exports count only if defined under
    ``prefixes``): ``(qualified name, function, whether its first parameter is self/cls)``, each once, sorted."""
    seen: set[int] = set()
    out: list[tuple[str, Callable, bool]] = []
    for module in (*extra_modules, *_modules(prefixes)):
        for name in _public_names(module):
            obj = getattr(module, name)
            if not callable(obj) or not _in(getattr(obj, "__module__", None), prefixes):
                continue
            if inspect.isclass(obj):
                entries = list(_methods(obj, prefixes))
            else:
                entries = [(f"{obj.__module__}.{obj.__qualname__}", obj, False)]
            for where, func, skip_first in entries:
                if id(func) not in seen:
                    seen.add(id(func))
                    out.append((where, func, skip_first))
    return sorted(out, key=lambda entry: entry[0])


def _missing(func: Callable, skip_first: bool) -> list[str]:
    """What ``func``'s signature leaves unannotated: parameter names and ``"return"``."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):  # no signature to inspect (a builtin): nothing we wrote
        return []
    params = list(sig.parameters.values())[1 if skip_first else 0 :]
    missing = [p.name for p in params if p.annotation is inspect.Parameter.empty]
    if sig.return_annotation is inspect.Signature.empty:
        missing.append("return")
    return missing


def offenders(prefixes: list[str], extra_modules: tuple[types.ModuleType, ...] = ()) -> list[str]:
    """``"module.qualname: missing a, b, return"`` for each of :func:`public_callables` that lacks an annotation."""
    return [
        f"{where}: missing {', '.join(missing)}"
        for where, func, skip_first in public_callables(prefixes, extra_modules)
        if (missing := _missing(func, skip_first))
    ]


def test_public_api_of_the_checked_packages_is_annotated():
    found = offenders(CHECKED, extra_modules=(lowrankopt,))
    if found:
        print("Public functions/methods missing annotations:\n" + "\n".join(found))
    assert not found, f"{len(found)} public functions/methods missing annotations:\n" + "\n".join(found)


def test_annotations_of_the_checked_packages_resolve():
    """``from __future__ import annotations`` keeps annotations as strings that nothing evaluates: a misspelt or
    unimported name would go unnoticed. ``typing.get_type_hints`` evaluates them as a type checker would."""
    unresolved = []
    for where, func, _ in public_callables(CHECKED, extra_modules=(lowrankopt,)):
        try:
            typing.get_type_hints(func)
        except Exception as e:  # NameError, AttributeError, TypeError (e.g. `X | Y` of non-types)
            unresolved.append(f"{where}: {type(e).__name__}: {e}")
    assert not unresolved, "annotations that do not resolve:\n" + "\n".join(unresolved)


@pytest.mark.parametrize("prefix", CHECKED)
def test_each_checked_entry_names_some_public_callable(prefix):
    """A typo in CHECKED (or an empty ``__all__``) would make the checks pass vacuously."""
    assert public_callables([prefix]), prefix


def test_the_checker_reports_what_is_missing():
    """The walker on a synthetic module: a missing parameter or return annotation is reported, ``self``/``cls`` are
    not, methods, properties, static and class methods and inherited methods of checked bases are walked, private
    names and non-public dunders are not."""
    code = """
from __future__ import annotations
__all__ = ["good", "bad_param", "bad_return", "Thing", "Child", "Other"]

def good(x: int, *args: int, y: str = "", **kw: object) -> None: ...
def bad_param(x, y: int) -> int: ...
def bad_return(x: int): ...
def _private(x): ...

class Thing:
    def __init__(self, a: int): ...
    def __call__(self, b: int) -> int: ...
    def __repr__(self): ...
    def method(self, c) -> int: ...
    def _helper(self, d): ...
    @property
    def prop(self): ...
    @staticmethod
    def stat(e: int) -> int: ...
    @classmethod
    def make(cls, f) -> Thing: ...

class Child(Thing):
    def own(self) -> None: ...

class Other:
    def fine(self, g: int) -> int: ...
"""
    module = types.ModuleType("lowrankopt._typing_probe")
    exec(compile(code, "<probe>", "exec"), module.__dict__)
    import sys

    sys.modules[module.__name__] = module
    try:
        found = offenders([], extra_modules=(module,))
        assert found == [], "nothing is checked outside the prefixes"
        found = offenders(["lowrankopt._typing_probe"])
    finally:
        del sys.modules[module.__name__]
    assert found == [
        "lowrankopt._typing_probe.Thing.__init__: missing return",
        "lowrankopt._typing_probe.Thing.make: missing f",
        "lowrankopt._typing_probe.Thing.method: missing c",
        "lowrankopt._typing_probe.Thing.prop: missing return",
        "lowrankopt._typing_probe.bad_param: missing x",
        "lowrankopt._typing_probe.bad_return: missing return",
    ]
