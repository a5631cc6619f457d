"""lowrankopt: Riemannian optimization on low-rank matrix and tensor-train manifolds, in PyTorch.

Every name of ``__all__`` and every subpackage is loaded on first attribute access (PEP 562): ``lro.minimize``,
``from lowrankopt import minimize`` and ``lro.nn.STTPLinear`` import what they need then. ``import lowrankopt`` itself
imports neither torch nor any submodule, so that the ``lowrankopt`` command (:mod:`lowrankopt.cli`, a submodule: its
import runs this file first) parses its arguments and answers ``--help`` without the 1.5 s torch import. The first
access to a core name (formats, manifolds, autodiff, optim — with the stochastic ``torch.optim`` optimizers
``RiemannianSGD``, ``RiemannianAdam`` and ``Riemannion``, which import no geoopt — completion, diagnostics) loads
torch and the core; the other subpackages (``lowrankopt.nn``, ``.spectral``, ``.stats``, ``.cross``,
``.distributed``, ``.benchmarks``) and the geoopt bridge (:class:`GeooptManifold`, :class:`GeooptFixedRank`,
:class:`GeooptFixedTTRank`, :class:`GeooptFixedTTMatrixRank`, which import geoopt) load only when they are used.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what __getattr__ loads lazily, for type checkers, IDEs and docs (`import x as x`: a re-export)
    from . import allocator as allocator
    from . import autodiff as autodiff
    from . import benchmarks as benchmarks
    from . import completion as completion
    from . import cross as cross
    from . import diagnostics as diagnostics
    from . import distributed as distributed
    from . import formats as formats
    from . import manifolds as manifolds
    from . import nn as nn
    from . import optim as optim
    from . import spectral as spectral
    from . import stats as stats
    from .allocator import tune_cpu_allocator as tune_cpu_allocator
    from .autodiff import riemannian_grad as riemannian_grad
    from .autodiff import riemannian_grad_and_hessian as riemannian_grad_and_hessian
    from .autodiff import riemannian_grad_and_hvp as riemannian_grad_and_hvp
    from .autodiff import riemannian_hvp as riemannian_hvp
    from .completion import complete as complete
    from .completion import completion_loss as completion_loss
    from .completion import sample_indices as sample_indices
    from .diagnostics import check_gradient as check_gradient
    from .diagnostics import check_hessian as check_hessian
    from .formats import LowRankMatrix as LowRankMatrix
    from .formats import TensorRing as TensorRing
    from .formats import TensorTrain as TensorTrain
    from .formats import TTMatrix as TTMatrix
    from .formats import Tucker as Tucker
    from .manifolds import FixedRankMatrices as FixedRankMatrices
    from .manifolds import FixedTTMatrixRank as FixedTTMatrixRank
    from .manifolds import FixedTTRank as FixedTTRank
    from .manifolds import FixedTuckerRank as FixedTuckerRank
    from .manifolds import LowRankManifold as LowRankManifold
    from .manifolds import TangentVector as TangentVector
    from .manifolds import manifold_of as manifold_of
    from .manifolds.geoopt import GeooptFixedRank as GeooptFixedRank
    from .manifolds.geoopt import GeooptFixedTTMatrixRank as GeooptFixedTTMatrixRank
    from .manifolds.geoopt import GeooptFixedTTRank as GeooptFixedTTRank
    from .manifolds.geoopt import GeooptManifold as GeooptManifold
    from .optim import OptimizeResult as OptimizeResult
    from .optim import RiemannianAdam as RiemannianAdam
    from .optim import RiemannianSGD as RiemannianSGD
    from .optim import Riemannion as Riemannion
    from .optim import minimize as minimize

__version__ = "0.1.0"

__all__ = [
    "FixedRankMatrices",
    "FixedTTMatrixRank",
    "FixedTTRank",
    "FixedTuckerRank",
    "GeooptFixedRank",
    "GeooptFixedTTMatrixRank",
    "GeooptFixedTTRank",
    "GeooptManifold",
    "LowRankManifold",
    "LowRankMatrix",
    "OptimizeResult",
    "RiemannianAdam",
    "RiemannianSGD",
    "Riemannion",
    "TTMatrix",
    "TangentVector",
    "TensorRing",
    "TensorTrain",
    "Tucker",
    "check_gradient",
    "check_hessian",
    "complete",
    "completion_loss",
    "manifold_of",
    "minimize",
    "riemannian_grad",
    "riemannian_grad_and_hessian",
    "riemannian_grad_and_hvp",
    "riemannian_hvp",
    "sample_indices",
    "tune_cpu_allocator",
]

# Submodules reachable as attributes (``lro.nn``) without an explicit import; the first access imports them (and the
# import binds them in globals(), so that later accesses skip __getattr__). tests/test_lazy_import.py checks that
# this lists every public submodule.
_SUBMODULES = frozenset(
    {
        "allocator", "autodiff", "benchmarks", "cli", "completion", "cross", "demo", "diagnostics", "distributed",
        "formats", "manifolds", "nn", "optim", "spectral", "stats",
    }
)  # fmt: skip
# Names of __all__ -> the module (relative to this package) that defines them, imported on first access.
_LAZY_NAMES = {
    "tune_cpu_allocator": ".allocator",
    **dict.fromkeys(("riemannian_grad", "riemannian_grad_and_hessian", "riemannian_grad_and_hvp"), ".autodiff"),
    "riemannian_hvp": ".autodiff",
    **dict.fromkeys(("complete", "completion_loss", "sample_indices"), ".completion"),
    **dict.fromkeys(("check_gradient", "check_hessian"), ".diagnostics"),
    **dict.fromkeys(("LowRankMatrix", "TensorRing", "TensorTrain", "TTMatrix", "Tucker"), ".formats"),
    **dict.fromkeys(
        ("FixedRankMatrices", "FixedTTMatrixRank", "FixedTTRank", "FixedTuckerRank", "LowRankManifold"), ".manifolds"
    ),
    **dict.fromkeys(("TangentVector", "manifold_of"), ".manifolds"),
    # geoopt costs ~0.7 s at import: the bridge loads only when one of its names is used
    **dict.fromkeys(
        ("GeooptFixedRank", "GeooptFixedTTMatrixRank", "GeooptFixedTTRank", "GeooptManifold"), ".manifolds.geoopt"
    ),
    **dict.fromkeys(("OptimizeResult", "RiemannianAdam", "RiemannianSGD", "Riemannion", "minimize"), ".optim"),
}


def __getattr__(name: str) -> Any:
    """Module attribute fallback (PEP 562), called only for names not already in the module's namespace."""
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # the import also binds it in globals()
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
        globals()[name] = value  # later accesses skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}", name=name, obj=sys.modules[__name__])


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES | set(_LAZY_NAMES))
