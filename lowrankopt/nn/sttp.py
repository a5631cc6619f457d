"""Deprecated module path of lowrankopt 0.1, moved to :mod:`lowrankopt.nn.spectral.sttp` (public names: also in
:mod:`lowrankopt.nn`). Importing it warns once; every name, public or private, is forwarded, so that code and pickles
(``torch.save`` of a whole model) naming ``lowrankopt.nn.sttp.X`` keep working for one release."""

# ruff: noqa: F822 (the names of __all__ are forwarded by __getattr__)

from ._common import _forward_module

__all__ = [
    "OrthonormalTT",
    "STTPConv2d",
    "STTPLinear",
    "SVDPConv2d",
    "SVDPLinear",
    "count_parameters",
    "dopt_penalty",
    "sttp_convert",
    "sttp_to_dense",
]

__getattr__, __dir__ = _forward_module(
    __name__, "lowrankopt.nn.spectral.sttp", "lowrankopt.nn._deprecated", "lowrankopt.nn.surgery"
)
