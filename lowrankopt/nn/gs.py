"""Deprecated module path of lowrankopt 0.1, moved to :mod:`lowrankopt.nn.orthogonal.gs` (public names: also in
:mod:`lowrankopt.nn`). Importing it warns once; every name, public or private, is forwarded, so that code and pickles
(``torch.save`` of a whole model) naming ``lowrankopt.nn.gs.X`` keep working for one release."""

# ruff: noqa: F822 (the names of __all__ are forwarded by __getattr__)

from ._common import _forward_module

__all__ = [
    "GSMatrix",
    "GSOrthogonal",
    "blockdiag_matmul",
    "gs_matmul",
    "gs_project",
    "shuffle_index",
]

__getattr__, __dir__ = _forward_module(
    __name__, "lowrankopt.nn.orthogonal.gs", "lowrankopt.nn._deprecated", "lowrankopt.nn.surgery"
)
