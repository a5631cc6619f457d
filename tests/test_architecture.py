"""The package's layering, checked on the source: no module imports a private name (a ``_name`` module, function or
class) from outside its own package, and the core layers import only downwards."""

from __future__ import annotations

import ast
from pathlib import Path

import lowrankopt

ROOT = Path(lowrankopt.__file__).parent


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
            package = parts
        else:
            package = parts[:-1]
        yield path, ".".join(parts), package


def _imports(path: Path, package: list[str]):
    """``(line, dotted target)`` of every ``from X import name`` / ``import X`` in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                yield node.lineno, f"{mod}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def _owner_of_private(target: str) -> str | None:
    """The package that owns the first private component of ``target`` (None if nothing in it is private): the
    package it is defined in (a private name in a module belongs to the module's package)."""
    parts = target.split(".")
    for i, p in enumerate(parts):
        if p.startswith("_") and not (p.startswith("__") and p.endswith("__")):
            owner = parts[:i]
            if ROOT.parent.joinpath(*owner).with_suffix(".py").is_file():  # a module: its package owns it
                owner = owner[:-1]
            return ".".join(owner)
    return None


def test_no_module_imports_a_private_name_from_outside_its_package():
    offenders = []
    for path, _name, package in _modules():
        here = ".".join(package)
        for line, target in _imports(path, package):
            if not target.startswith("lowrankopt"):
                continue
            owner = _owner_of_private(target)
            if owner is not None and not (here == owner or here.startswith(owner + ".")):
                offenders.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target} (private to {owner})")
    assert not offenders, "private names imported across packages:\n" + "\n".join(offenders)


# what each core layer may import from the package (besides itself and the private helpers of the root package)
LAYERS = {
    "lowrankopt.formats": set(),
    "lowrankopt.manifolds": {"lowrankopt.formats"},
    "lowrankopt.autodiff": {"lowrankopt.formats", "lowrankopt.manifolds"},
    "lowrankopt.optim": {"lowrankopt.formats", "lowrankopt.manifolds", "lowrankopt.autodiff"},
}


def test_the_core_layers_import_only_downwards():
    offenders = []
    for path, name, package in _modules():
        layer = next((lay for lay in LAYERS if name == lay or name.startswith(lay + ".")), None)
        if layer is None:
            continue
        for line, target in _imports(path, package):
            if not target.startswith("lowrankopt.") or target.startswith(layer) or target.startswith("lowrankopt._"):
                continue
            if not any(target == a or target.startswith(a + ".") for a in LAYERS[layer]):
                offenders.append(f"{path.relative_to(ROOT.parent)}:{line} ({layer}) imports {target}")
    assert not offenders, "upward or sideways imports in the core:\n" + "\n".join(offenders)
