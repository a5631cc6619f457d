"""Deprecated module path of lowrankopt 0.1, moved to :mod:`lowrankopt.nn.orthogonal.gsoft` (public names: also in
:mod:`lowrankopt.nn`). Importing it warns once; every name, public or private, is forwarded, so that code and pickles
(``torch.save`` of a whole model) naming ``lowrankopt.nn.gsoft.X`` keep working for one release."""

# ruff: noqa: F822 (the names of __all__ are forwarded by __getattr__)

from ._common import _forward_module

__all__ = [
    "GSOFTConfig",
    "GSOFTLinear",
    "disable_adapters",
    "gsoft_state_dict",
    "inject_gsoft",
    "load_gsoft_state_dict",
    "merge_adapter",
    "merge_and_unload",
    "unmerge_adapter",
]

__getattr__, __dir__ = _forward_module(
    __name__, "lowrankopt.nn.orthogonal.gsoft", "lowrankopt.nn._deprecated", "lowrankopt.nn.surgery"
)
