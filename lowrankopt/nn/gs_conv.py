"""Deprecated module path of lowrankopt 0.1, moved to :mod:`lowrankopt.nn.orthogonal.gs_conv` (public names: also in
:mod:`lowrankopt.nn`). Importing it warns once; every name, public or private, is forwarded, so that code and pickles
(``torch.save`` of a whole model) naming ``lowrankopt.nn.gs_conv.X`` keep working for one release."""

# ruff: noqa: F822 (the names of __all__ are forwarded by __getattr__)

from ._common import _forward_module

__all__ = [
    "GSOrthogonalConv2d",
    "LipConvNet",
    "MaxMinPermuted",
    "SkewOrthogonalConv2d",
    "certified_accuracy",
    "certified_radius",
    "channel_shuffle",
]

__getattr__, __dir__ = _forward_module(
    __name__, "lowrankopt.nn.orthogonal.gs_conv", "lowrankopt.nn._deprecated", "lowrankopt.nn.surgery"
)
