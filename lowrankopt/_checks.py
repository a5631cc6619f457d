"""Input validation shared by the formats and manifolds.

Every public entry point validates its arguments here so that bad input fails with an error that
names the argument, instead of producing a wrong answer deep inside a contraction.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def check_dtype(name: str, dtype: object) -> torch.dtype:
    """``dtype`` if it is float32 or float64, else the one TypeError for every entry point, naming ``name`` (and
    saying why half precision and complex dtypes are refused)."""
    if dtype in FLOAT_DTYPES:
        return dtype
    why = ""
    if dtype in (torch.float16, torch.bfloat16):
        why = (
            " (half precision is not supported: the factorizations used here (QR, SVD, solves) have no "
            "float16/bfloat16 kernels on every device, and need the accuracy of float32 at least)"
        )
    elif isinstance(dtype, torch.dtype) and dtype.is_complex:
        why = " (complex tensors are not supported: the manifolds are real, with a real inner product)"
    raise TypeError(f"{name} must be float32 or float64, got {dtype}{why}")


def check_tensor(name: str, t: object, ndim: int | None = None, finite: bool = True) -> torch.Tensor:
    """Check that ``t`` is a floating tensor (float32/float64) with ``ndim`` dims and finite entries."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_dtype(name, t.dtype)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if finite and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def check_same(name: str, tensors: Sequence[torch.Tensor]) -> None:
    """Check that all tensors share one dtype and one device."""
    dtypes = {t.dtype for t in tensors}
    devices = {t.device for t in tensors}
    if len(dtypes) > 1:
        raise TypeError(f"{name} mix dtypes {sorted(map(str, dtypes))}")
    if len(devices) > 1:
        raise ValueError(f"{name} live on different devices {sorted(map(str, devices))}")


def check_like(name: str, value: object, ref_name: str, ref: object) -> None:
    """``value`` has the dtype and the device of ``ref`` (tensors, formats or tangent vectors: anything with
    ``dtype`` and ``device``): a TypeError / ValueError naming both otherwise."""
    if value.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {value.dtype} but {ref_name} has {ref.dtype}; cast one with .to()")
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} on {ref.device}; move one with .to()")


def check_finite(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Every tensor of the ``(name, tensor)`` pairs is finite: one reduction per tensor and one host sync (the
    offending name is looked up only on failure)."""
    if named and not bool(torch.stack([torch.isfinite(t).all() for _, t in named]).all()):
        name = next(name for name, t in named if not bool(torch.isfinite(t).all()))
        raise ValueError(f"{name} contains NaN or Inf")


def as_index_tensor(idx: object) -> torch.Tensor:
    """``idx`` as a tensor: tensors as they are, anything else through ``torch.as_tensor`` — int64 when empty (an
    empty list would otherwise become a float tensor)."""
    if isinstance(idx, torch.Tensor):
        return idx
    idx = torch.as_tensor(idx)
    return idx.long() if idx.numel() == 0 else idx


def _index_state(idx: torch.Tensor) -> tuple | None:
    """What anything computed from ``idx`` depends on: its version counter (bumped by every in-place write by torch,
    through views too), storage, shape and strides; None where it cannot be read (inference tensors, functorch
    wrappers), which are then never cached. Writes that torch does not see — through ``.data``, through a NumPy
    array or a DLPack capsule sharing the memory — leave the state unchanged: pass a new tensor (or ``.clone()``)
    after such a write, as for a tensor saved for autograd."""
    try:
        return (idx._version, idx.data_ptr(), idx.storage_offset(), tuple(idx.shape), idx.stride())
    except (RuntimeError, NotImplementedError):
        return None


class IndexCache:
    """Values computed from an index tensor (its validation, a sort plan), kept per tensor while it lives and is
    unchanged (:func:`_index_state`, whose caveat applies): an optimizer evaluates f at one index thousands of
    times, and the lookup reads none of it. Entries are keyed by the tensor's id with a weak reference, dropped when
    the tensor dies or changes; at most ``maxsize`` tensors (the least recently used out first) and ``per_tensor``
    values per tensor (the oldest out first: a rank-adaptive solver asks for a plan per rank)."""

    def __init__(self, maxsize: int, per_tensor: int = 4) -> None:
        self._entries: dict[int, tuple[weakref.ref, tuple, dict]] = {}
        self._maxsize, self._per_tensor = maxsize, per_tensor

    def get(self, idx: torch.Tensor, key: Any, build: Any) -> Any:
        """The value ``build()`` gave for ``(idx, key)``, computed now if ``idx`` is new, changed or not cacheable."""
        state = _index_state(idx)
        if state is None:
            return build()
        entry = self._entries.pop(id(idx), None)  # re-inserted below: the most recently used last
        if entry is None or entry[0]() is not idx or entry[1] != state:
            while len(self._entries) >= self._maxsize:
                self._entries.pop(next(iter(self._entries)), None)
            entry = (weakref.ref(idx, self._forget(id(idx))), state, {})
        self._entries[id(idx)] = entry
        values = entry[2]
        if key not in values:
            while len(values) >= self._per_tensor:
                values.pop(next(iter(values)))
            values[key] = build()
        return values[key]

    def _forget(self, key: int):
        """The callback of an entry's weak reference: drop the entry when its tensor dies (if it is still this one's:
        a later tensor may have the same id)."""
        entries = self._entries

        def forget(ref: weakref.ref) -> None:
            entry = entries.get(key)
            if entry is not None and entry[0] is ref:
                entries.pop(key, None)

        return forget


# Index tensors found valid (the range check reads all of the index: a host sync on GPU)
_VALID_INDICES = IndexCache(64)


def check_index(name: str, idx: object, bounds: Sequence[int], device: torch.device) -> torch.Tensor:
    """Check an integer index tensor of shape (N, len(bounds)) (or (N,) when one bound) in range.

    An int64 ``(N, len(bounds))`` tensor on ``device`` that passed before and has not changed since (same version
    counter, storage, shape, strides; see :func:`_index_state`) is returned at once: ``O(1)`` instead of ``O(N)``.
    """
    cacheable = (
        isinstance(idx, torch.Tensor)
        and idx.dtype == torch.int64
        and idx.dim() == 2
        and idx.shape[1] == len(bounds)
        and idx.device == torch.device(device)
        and not idx.is_inference()
    )
    if not cacheable:
        return _check_index(name, idx, bounds, device)
    _VALID_INDICES.get(idx, tuple(bounds), lambda: _check_index(name, idx, bounds, device) is idx)  # (int64, on device)
    return idx


def _check_index(name: str, idx: object, bounds: Sequence[int], device: torch.device) -> torch.Tensor:
    idx = as_index_tensor(idx)
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor, got {idx.dtype}")
    d = len(bounds)
    if idx.dim() == 1 and (d == 1 or idx.numel() == 0):  # (N,) with one bound; an empty list for any number
        idx = idx.reshape(-1, d)
    if idx.dim() != 2 or idx.shape[1] != d:
        raise ValueError(f"{name} must have shape (N, {d}), got {tuple(idx.shape)}")
    idx = idx.to(device=device, dtype=torch.int64)
    if idx.numel():
        lo, top = torch.aminmax(idx)  # one pass: entries in [0, min(bounds)) need no per-column check
        if int(lo) < 0 or (int(top) >= min(bounds) and bool((idx >= torch.tensor(list(bounds), device=device)).any())):
            raise ValueError(f"{name} has entries outside the shape {tuple(bounds)}")
    return idx


def as_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as a Python int ``>= minimum``.

    Python ints and numpy / torch integer scalars are accepted (converted with ``operator.index``); bools, floats
    (even integral ones: a size is not a measurement) and tensors with more than one element are refused with a
    ValueError that names ``name``.
    """
    what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    is_bool = isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)
    if is_bool or (isinstance(value, torch.Tensor) and value.dim() != 0):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be {what}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def as_positive_int(name: str, value: object) -> int:
    """``value`` as a Python int ``>= 1`` (see :func:`as_int`)."""
    return as_int(name, value, 1)


def as_shape(name: str, shape: object) -> tuple[int, ...]:
    """A non-empty sequence of positive ints (each entry as in :func:`as_int`) as a tuple of Python ints."""
    if isinstance(shape, (str, bytes)) or not _is_sequence(shape) or not list(shape):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {shape!r}")
    return tuple(as_positive_int(f"{name}[{k}]", n) for k, n in enumerate(shape))


def as_mode_shapes(row_shape: object, col_shape: object) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The checked mode sizes of a TT-matrix: two sequences of positive ints of one length."""
    row_shape, col_shape = as_shape("row_shape", row_shape), as_shape("col_shape", col_shape)
    if len(row_shape) != len(col_shape):
        raise ValueError(
            f"row_shape and col_shape must have one entry per mode each, got {len(row_shape)} and "
            f"{len(col_shape)} entries ({list(row_shape)} and {list(col_shape)})"
        )
    return row_shape, col_shape


def as_rank_list(name: str, ranks: object, d: int) -> list[int]:
    """An int-like or a sequence of ``d - 1`` int-likes as the list of the ``d - 1`` inner ranks (positive ints)."""
    what = f"a positive int or {d - 1} positive ints" if d > 1 else "a positive int or [] (one mode has no inner rank)"
    if isinstance(ranks, (str, bytes)) or not _is_sequence(ranks):
        try:
            return [as_positive_int(name, ranks)] * (d - 1)
        except ValueError:
            raise ValueError(f"{name} must be {what}, got {ranks!r}") from None
    ranks = list(ranks)
    if len(ranks) != d - 1:
        raise ValueError(f"{name} must be {what}, got {ranks!r}")
    return [as_positive_int(f"{name}[{k}]", r) for k, r in enumerate(ranks)]


def _is_sequence(value: object) -> bool:
    """Whether ``value`` iterates (a 0-dim tensor or array has ``__iter__`` but refuses)."""
    try:
        iter(value)
    except TypeError:
        return False
    return True


def as_tolerance(name: str, value: object) -> float:
    """A finite number ``>= 0`` (bools refused) as a Python float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    if not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return float(value)


def as_device(device: object) -> torch.device:
    """``device`` (a torch.device, a string such as ``"cpu"`` or ``"cuda:0"``, or an index) as a torch.device."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be a torch.device or a device string such as 'cpu', got {device!r}") from None


def check_random_options(
    dtype: object, device: object, generator: object
) -> tuple[torch.dtype, torch.device | None, torch.device | None]:
    """The checked ``(dtype, device, draw_device)`` of a random factory: ``dtype`` float32/float64 (None: torch's
    default dtype, as ``torch.randn`` does), ``device`` None or a valid torch device, ``generator`` None or a
    ``torch.Generator``; ``draw_device`` is where the generator draws (its own device; ``device`` without one)."""
    if dtype is None:
        dtype = torch.get_default_dtype()
    check_dtype("dtype", dtype)
    device = None if device is None else as_device(device)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return dtype, device, (generator.device if generator is not None else device)


def cast_all(tensors: Sequence[torch.Tensor], *args: Any, **kwargs: Any) -> list[torch.Tensor]:
    """``[t.to(*args, **kwargs) for t in tensors]`` for the ``to`` of a format: a cast to a dtype other than
    float32/float64 is refused (TypeError naming ``dtype``) after converting the first tensor only; a string that is
    no device (``x.to("float64")``) is refused naming ``device``."""
    for arg in (*args, kwargs.get("device")):
        if isinstance(arg, str):
            as_device(arg)
    first = tensors[0].to(*args, **kwargs)
    check_dtype("dtype", first.dtype)
    return [first] + [t.to(*args, **kwargs) for t in tensors[1:]]


def check_scalar(name: str, value: object, nonzero: bool = False) -> float | torch.Tensor:
    """A Python number or a real 0-dim tensor, finite (Python numbers) and, with ``nonzero``, not zero (a divisor)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise TypeError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if value.is_complex():  # would turn a real format complex
            raise TypeError(f"{name} must be real, got a tensor of dtype {value.dtype}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    elif value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if nonzero and bool(value == 0):
        raise ValueError(f"{name} must be nonzero (a divisor), got {value}")
    return value
