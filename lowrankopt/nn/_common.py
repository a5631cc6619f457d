"""What the layers of :mod:`lowrankopt.nn` share: dtype and device defaults, input checks, autocast and half-precision
handling, dense equivalents, size arguments, random orthonormal initializations, deprecation aliases.

Private to the package: every family (``manifold``, ``orthogonal``, ``spectral``, ``compression``) imports these from
here, never from one another.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import geoopt
import torch

from .._checks import check_random_options
from ..manifolds.geoopt import manifold_parameter


def _kw(dtype, device, generator=None) -> tuple[torch.dtype, torch.device | None, torch.device | None]:
    """``(dtype, device, draw_device)`` of a layer's parameters, checked by :func:`check_random_options` (the one
    TypeError of the package for a dtype other than float32/float64): ``dtype`` defaults to torch's default dtype;
    ``draw_device`` is where ``generator`` draws."""
    return check_random_options(torch.get_default_dtype() if dtype is None else dtype, device, generator)


def _uniform(shape, bound: float, dtype, device, generator) -> torch.Tensor:
    _, _, draw_device = check_random_options(dtype, device, generator)
    u = torch.rand(shape, dtype=dtype, device=draw_device, generator=generator)
    return ((2 * u - 1) * bound).to(device)


def _init_bias(out_features, in_features, bias, dtype, device, generator):
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
    if not bias:
        return None
    # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return torch.nn.Parameter(_uniform((out_features,), 1 / math.sqrt(in_features), dtype, device, generator))


HALF = (torch.float16, torch.bfloat16)
HALF_OR_FULL = (*HALF, torch.float32, torch.float64)  # the parameter dtypes of the layers that support half precision


def _refuse_half(layer: torch.nn.Module, dtype: torch.dtype, needs: str) -> None:
    """The one error of the layers that do not run in half precision (checked at every forward; cost O(1))."""
    if dtype in HALF:
        raise TypeError(
            f"{type(layer).__name__} does not support {dtype} parameters: {needs}, which torch does not implement "
            "in half precision. Keep the layer in float32 (or float64) and run it under torch.autocast for mixed "
            "precision."
        )


def _autocasting(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type)


def _full_precision(x: torch.Tensor):
    """A context with autocast off on ``x``'s device: the layers build their factors (QR, Householder products,
    solves, norm bounds) in the parameters' dtype there; only the products with the input run under autocast."""
    return torch.autocast(x.device.type, enabled=False)


def _autocast_output(y: torch.Tensor) -> torch.Tensor:
    """``y`` in the dtype ``nn.Linear`` / ``nn.Conv2d`` would return under the active autocast (float32 results
    of a layer that accumulates in float32 are cast once, at the end)."""
    if _autocasting(y) and y.dtype == torch.float32:
        return y.to(torch.get_autocast_dtype(y.device.type))
    return y


def _check_input(x, in_features: int, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"input must have shape (..., {in_features}), got {tuple(x.shape)}")
    _check_dtype(x, like)
    return x.reshape(-1, in_features)


def _check_image(x, channels: int) -> None:
    """A conv layer's input: a ``(B, channels, H, W)`` tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"input must have shape (B, {channels}, H, W), got {tuple(x.shape)}")


def _check_dtype(x: torch.Tensor, like: torch.Tensor) -> None:
    """The input's dtype must be the layer's, except under autocast (which casts the products, as for nn.Linear)."""
    if x.dtype != like.dtype and not _autocasting(x):
        raise TypeError(f"input has dtype {x.dtype} but the layer has dtype {like.dtype}")


def _dense_linear(weight: torch.Tensor, bias) -> torch.nn.Linear:
    out_f, in_f = weight.shape
    lin = torch.nn.Linear(in_f, out_f, bias=bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _dense_conv(layer: torch.nn.Module, kernel: torch.Tensor) -> torch.nn.Conv2d:
    """An ``nn.Conv2d`` with ``kernel`` and the geometry (stride, padding, dilation, padding mode) and bias of
    ``layer``."""
    conv = torch.nn.Conv2d(
        layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
        getattr(layer, "dilation", 1), bias=layer.bias is not None, padding_mode=layer.padding_mode,
        dtype=kernel.dtype, device=kernel.device,
    )  # fmt: skip
    with torch.no_grad():
        conv.weight.copy_(kernel)
        if layer.bias is not None:
            conv.bias.copy_(layer.bias)
    return conv


def _pair(v, name: str, minimum: int | None = None) -> tuple[int, int]:
    """``v`` or ``(v, v)`` as a pair of ints (as ``nn.Conv2d`` takes sizes), each ``≥ minimum`` if given; bools and
    other types refused."""
    t = (v, v) if isinstance(v, int) and not isinstance(v, bool) else v
    if not isinstance(t, (tuple, list)) or len(t) != 2 or not all(type(a) is int for a in t):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    if minimum is not None and min(t) < minimum:
        raise ValueError(f"{name} must be an int ≥ {minimum} or a pair of them, got {v!r}")
    return int(t[0]), int(t[1])


def _conv_padding(padding, stride: tuple[int, int], kernel_size: tuple[int, int], dilation=(1, 1)) -> tuple:
    """``(padding, pads)``: ``padding`` as ``nn.Conv2d`` takes it (``"same"``, stride 1 only; ``"valid"``; an int or a
    pair of non-negative ints), checked, and the explicit ``(left, right, top, bottom)`` pads ``nn.Conv2d`` computes
    from it (for ``"same"`` with an odd total, the extra one on the right / bottom)."""
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}")
        if padding == "same" and tuple(stride) != (1, 1):
            raise ValueError("padding='same' needs stride 1 (as nn.Conv2d)")
        if padding == "valid":
            return padding, (0, 0, 0, 0)
        th, tw = (d * (k - 1) for d, k in zip(dilation, kernel_size, strict=True))
        return padding, (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    p = _pair(padding, "padding", 0)
    return p, (p[1], p[1], p[0], p[0])


def _random_orthonormal(rows: int, cols: int, generator) -> torch.Tensor:
    """A Haar-random ``rows × cols`` matrix with orthonormal columns (float64, CPU generator)."""
    Q, R = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=generator))
    return Q * torch.sign(torch.diagonal(R))


def _outer_cores(
    name: str,
    in_channels: int,
    out_channels: int,
    ranks: tuple[int, int],
    stiefel: bool,
    hint: str,
    dtype,
    device,
    generator,
) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """The outer cores of a TT conv (TTConv2d, SOTTConv2d): Haar-random ``first (c_in, r1)`` then ``last (c_out,
    r2)`` with orthonormal columns, as parameters on geoopt's Stiefel manifold (``stiefel``; ``name.first`` /
    ``name.last`` and ``hint`` in the error if another optimizer moves them off it) or plain ones."""
    first = _random_orthonormal(in_channels, ranks[0], generator).to(dtype=dtype, device=device)
    last = _random_orthonormal(out_channels, ranks[1], generator).to(dtype=dtype, device=device)
    if not stiefel:
        return torch.nn.Parameter(first), torch.nn.Parameter(last)
    stiefel_manifold = geoopt.EuclideanStiefel()
    return (
        manifold_parameter(first, stiefel_manifold, f"{name}.first", hint),
        manifold_parameter(last, stiefel_manifold, f"{name}.last", hint),
    )


def _int_record(saved: object) -> list[int] | None:
    """The integers of a record a layer saved as ``_extra_state`` (an int64 tensor), or None if ``saved`` is not
    one (a float, complex or empty tensor, or no tensor at all)."""
    try:
        tensor = torch.as_tensor(saved)
    except (TypeError, ValueError, RuntimeError):
        return None
    if tensor.is_floating_point() or tensor.is_complex() or tensor.numel() < 1:
        return None
    return [int(v) for v in tensor.reshape(-1).tolist()]


def _load_with_record(
    module: torch.nn.Module, load: Callable, check: Callable, state_dict, prefix: str, *args, error_msgs: list
) -> None:
    """A layer's ``_load_from_state_dict`` with a record: ``check(saved)`` (the state's ``_extra_state``, None when
    absent) when the state dict holds any of the layer's entries, then ``load`` (torch's loading of its own
    entries). A mismatch (``check`` returns the message) is an error of ``load_state_dict``, also with
    ``strict=False``, and nothing of the layer is loaded: its entries, its children's included (torch loads them
    after this), are replaced by their current values. A state without the record (an earlier version's) is not
    missing a key: ``check(None)`` decided it. ``args``: torch's ``local_metadata, strict, missing_keys,
    unexpected_keys``."""
    key = f"{prefix}_extra_state"
    if any(k.startswith(prefix) for k in state_dict):
        error = check(state_dict.get(key))
        if error is not None:
            if error not in error_msgs:  # an enclosing layer may have reported it already
                error_msgs.append(error)
            current = module.state_dict(prefix=prefix)
            for k in [k for k in state_dict if k in current]:
                state_dict[k] = current[k]
            return
    load(state_dict, prefix, *args, error_msgs)
    missing_keys = args[2]
    if key in missing_keys:
        missing_keys.remove(key)


_F = TypeVar("_F", bound=Callable)


def _deprecated_alias(new: _F, old_name: str, replacement: str | None = None) -> _F:
    """``new`` under its old name ``old_name``, for one release: each call emits a ``DeprecationWarning`` naming the
    replacement (``replacement``, default ``new``'s name), then calls ``new`` (same arguments, same result). Cost O(1)
    per call."""
    replacement = new.__name__ if replacement is None else replacement

    @functools.wraps(new)
    def alias(*args, **kwargs):
        warnings.warn(
            f"{old_name} is deprecated and will be removed in the next release; use {replacement} instead",
            DeprecationWarning,
            stacklevel=2,
        )
        return new(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old_name
    alias.__doc__ = f"Deprecated: use ``{replacement}`` (removed in the next release)."
    return alias  # type: ignore[return-value]


LegacyPatterns = str | Iterable[str] | Callable[[str], Any]
"""What the converters' deprecated ``include=`` / ``exclude=`` take: fnmatch patterns (one or several) or a predicate of
the qualified name."""


def _legacy_selection(target_modules, exclude_modules, include, exclude) -> tuple:
    """``(target_modules, exclude_modules)`` with the deprecated ``include`` / ``exclude`` of the converters (fnmatch
    patterns, or a predicate of the qualified name) translated into predicates ``fn(name, module)``; a
    ``DeprecationWarning`` when either is given. Giving both a new and an old argument is a ``TypeError``."""
    if include is None and exclude is None:
        return target_modules, exclude_modules
    warnings.warn(
        "include=/exclude= (fnmatch patterns or a predicate of the name) are deprecated and will be removed in the "
        "next release; use target_modules=/exclude_modules= (module-name suffixes, a regex, 'all-linear' or a "
        "predicate fn(name, module))",
        DeprecationWarning,
        stacklevel=3,
    )
    for old, new, name in ((include, target_modules, "target_modules"), (exclude, exclude_modules, "exclude_modules")):
        if old is not None and new is not None:
            raise TypeError(f"give {name} or the deprecated {'include' if name == 'target_modules' else 'exclude'}, "
                            "not both")  # fmt: skip
    return (
        target_modules if include is None else _glob("include", include),
        exclude_modules if exclude is None else _glob("exclude", exclude),
    )


def _glob(arg: str, spec) -> Callable[[str, torch.nn.Module], bool]:
    """The old converters' selection: a predicate of the name, or fnmatch patterns (one string or several)."""
    if callable(spec):
        return lambda name, m: bool(spec(name))
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, Iterable) or not all(isinstance(s, str) for s in spec):
        raise TypeError(f"{arg} must be fnmatch patterns (strings) or a predicate of the name, got {spec!r}")
    patterns = list(spec)
    return lambda name, m: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _forward_module(old: str, *homes: str) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for the deprecated module path ``old`` (a module of lowrankopt 0.1 that moved): every
    name, public or private, is looked up in the modules ``homes`` in order, so that code and pickles that name
    ``old.X`` keep working for one release. Called at the import of ``old``, it warns (``DeprecationWarning``, once:
    modules are imported once). Cost: one import of each home, then O(1) per lookup."""
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; import from {homes[0]} (or lowrankopt.nn)",
        DeprecationWarning,
        stacklevel=3,
    )

    def __getattr__(name: str):
        for home in homes:
            module = importlib.import_module(home)
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set().union(*(dir(importlib.import_module(home)) for home in homes)))

    return __getattr__, __dir__
