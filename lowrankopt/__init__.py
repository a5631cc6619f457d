"""lowrankopt: Riemannian optimization on low-rank matrix and tensor-train manifolds, in PyTorch.

The core (formats, manifolds, autodiff, optim — with the stochastic ``torch.optim`` optimizers ``RiemannianSGD``,
``RiemannianAdam`` and ``Riemannion``, which import no geoopt — and completion) is imported with the package. The
other subpackages (``lowrankopt.nn``, ``.spectral``, ``.stats``, ``.cross``, ``.distributed``, ``.benchmarks``) and the
geoopt bridge (:class:`GeooptManifold`, :class:`GeooptFixedRank`, :class:`GeooptFixedTTRank`,
:class:`GeooptFixedTTMatrixRank`, which import geoopt) are loaded on first attribute access (PEP 562), so
``import lowrankopt as lro; lro.nn.STTPLinear`` works and ``import lowrankopt`` stays light.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from .allocator import tune_cpu_allocator
from .autodiff import (
    riemannian_grad,
    riemannian_grad_and_hessian,
    riemannian_grad_and_hvp,
    riemannian_hvp,
)
from .completion import complete, completion_loss, sample_indices
from .diagnostics import check_gradient, check_hessian
from .formats import LowRankMatrix, TensorRing, TensorTrain, TTMatrix, Tucker
from .manifolds import (
    FixedRankMatrices,
    FixedTTMatrixRank,
    FixedTTRank,
    FixedTuckerRank,
    LowRankManifold,
    TangentVector,
    manifold_of,
)
from .optim import OptimizeResult, RiemannianAdam, RiemannianSGD, Riemannion, minimize

if TYPE_CHECKING:  # what __getattr__ loads lazily, for type checkers and IDEs (`import x as x`: an explicit re-export)
    from . import benchmarks as benchmarks
    from . import cross as cross
    from . import distributed as distributed
    from . import formats as formats
    from . import manifolds as manifolds
    from . import nn as nn
    from . import optim as optim
    from . import spectral as spectral
    from . import stats as stats
    from .manifolds.geoopt import GeooptFixedRank, GeooptFixedTTMatrixRank, GeooptFixedTTRank, GeooptManifold

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

# Subpackages reachable as attributes (``lro.nn``) without an explicit import; the first access imports them (the
# core ones, formats/manifolds/optim, are already loaded by the imports above and never reach __getattr__).
_SUBMODULES = frozenset(
    {"benchmarks", "cross", "distributed", "formats", "manifolds", "nn", "optim", "spectral", "stats"}
)
# Names of __all__ defined in a module loaded on first access: name -> module (relative to this package).
_LAZY_NAMES = {
    "GeooptFixedRank": ".manifolds.geoopt",  # geoopt costs ~0.7 s at import, a third of `import lowrankopt`
    "GeooptFixedTTMatrixRank": ".manifolds.geoopt",
    "GeooptFixedTTRank": ".manifolds.geoopt",
    "GeooptManifold": ".manifolds.geoopt",
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
