"""Lazy attribute access on the top-level package (PEP 562): ``import lowrankopt as lro; lro.nn.STTPLinear`` works
without importing ``lowrankopt.nn`` first, and ``import lowrankopt`` stays light (it imports neither the lazy
submodules nor geoopt). Each check runs in a fresh interpreter, since this test session has imported everything."""

import json
import os
import subprocess
import sys

import pytest

import lowrankopt

LAZY_SUBMODULES = ("benchmarks", "cross", "distributed", "nn", "spectral", "stats")
HEAVY = ("lowrankopt.nn", "lowrankopt.spectral", "lowrankopt.stats", "lowrankopt.cross", "lowrankopt.distributed")
HEAVY += ("lowrankopt.benchmarks", "lowrankopt.manifolds.geoopt", "geoopt")
# the bridge, loaded on first access
GEOOPT_NAMES = ("GeooptFixedRank", "GeooptFixedTTMatrixRank", "GeooptFixedTTRank", "GeooptManifold")


def _fresh(code: str) -> str:
    """Run ``code`` in a new interpreter importing this copy of the package; return its stdout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(lowrankopt.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_import_lowrankopt_imports_no_lazy_submodule_nor_geoopt():
    out = _fresh(f"import sys, json, lowrankopt; print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))")
    assert json.loads(out) == []


def test_import_lowrankopt_imports_no_torch_until_a_name_is_used():
    """The ``lowrankopt`` command's import (a submodule's) runs ``lowrankopt/__init__`` first: it must not load torch
    (1.5 s) before the arguments are parsed. The first name used loads it."""
    code = """
import sys, lowrankopt
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("lowrankopt."))
assert loaded == [], loaded
from lowrankopt import FixedTTRank
import torch
assert FixedTTRank.__module__ == "lowrankopt.manifolds.tt" and isinstance(lowrankopt.TensorTrain, type)
print("ok")
"""
    assert _fresh(code).split() == ["ok"]


def test_every_name_and_public_submodule_is_reachable_lazily():
    import pkgutil

    public = {m.name for m in pkgutil.iter_modules(lowrankopt.__path__) if not m.name.startswith("_")}
    assert set(lowrankopt._SUBMODULES) == public
    assert set(lowrankopt._LAZY_NAMES) == set(lowrankopt.__all__)
    for name, module in lowrankopt._LAZY_NAMES.items():  # each name is defined where the table says
        assert getattr(lowrankopt, name) is getattr(sys.modules[f"lowrankopt{module}"], name), name


def test_submodules_are_attributes_of_the_package_in_a_fresh_process():
    code = """
import sys, lowrankopt as lro
assert "lowrankopt.nn" not in sys.modules
cls = lro.nn.STTPLinear
from lowrankopt.nn import STTPLinear
assert cls is STTPLinear and lro.nn is sys.modules["lowrankopt.nn"]
assert lro.spectral.conv_singular_values is sys.modules["lowrankopt.spectral"].conv_singular_values
assert lro.stats.KroneckerCovariance.__module__ == "lowrankopt.stats.kronecker"
assert callable(lro.cross.tt_cross) and callable(lro.distributed.riemannian_grad)
assert lro.benchmarks.registry is sys.modules["lowrankopt.benchmarks"].registry
assert lro.formats.TensorTrain is lro.TensorTrain and lro.optim.minimize is lro.minimize
print("ok")
"""
    assert _fresh(code).split() == ["ok"]


def test_geoopt_bridge_names_are_loaded_on_first_access():
    code = """
import sys, lowrankopt as lro
assert "geoopt" not in sys.modules
M = lro.GeooptFixedRank(5, 4, 2)
assert "geoopt" in sys.modules and isinstance(M, sys.modules["geoopt"].Manifold)
from lowrankopt.manifolds.geoopt import GeooptFixedRank, GeooptFixedTTRank, GeooptManifold
assert lro.GeooptFixedRank is GeooptFixedRank and lro.GeooptFixedTTRank is GeooptFixedTTRank
assert lro.GeooptManifold is GeooptManifold and isinstance(M, GeooptManifold)
print("ok")
"""
    assert _fresh(code).split() == ["ok"]


def test_star_import_binds_every_name_of_all():
    code = """
import lowrankopt
ns = {}
exec("from lowrankopt import *", ns)
missing = [n for n in lowrankopt.__all__ if n not in ns]
assert not missing, missing
print("ok")
"""
    assert _fresh(code).split() == ["ok"]


def test_dir_lists_the_lazy_submodules_and_names():
    names = dir(lowrankopt)
    assert names == sorted(names)
    for name in (*LAZY_SUBMODULES, "formats", "manifolds", "optim", *GEOOPT_NAMES):
        assert name in names, name
    assert set(lowrankopt.__all__) <= set(names)
    out = _fresh("import lowrankopt, json; print(json.dumps(dir(lowrankopt)))")  # before anything was loaded
    assert set(LAZY_SUBMODULES) | set(GEOOPT_NAMES) <= set(json.loads(out))


def test_unknown_attribute_raises_the_usual_attribute_error():
    with pytest.raises(AttributeError, match=r"^module 'lowrankopt' has no attribute 'no_such_name'$") as info:
        lowrankopt.no_such_name  # noqa: B018
    assert info.value.name == "no_such_name" and info.value.obj is lowrankopt
    assert not hasattr(lowrankopt, "demo_not_a_submodule")
    assert getattr(lowrankopt, "no_such_name", 7) == 7
    with pytest.raises(ImportError, match="cannot import name 'no_such_name' from 'lowrankopt'"):
        from lowrankopt import no_such_name  # noqa: F401
