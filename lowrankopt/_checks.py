"""Input validation shared by the formats and manifolds.

Every public entry point validates its arguments here so that bad input fails with an error that
names the argument, instead of producing a wrong answer deep inside a contraction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def check_tensor(name: str, t: object, ndim: int | None = None, finite: bool = True) -> torch.Tensor:
    """Check that ``t`` is a floating tensor (float32/float64) with ``ndim`` dims and finite entries."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
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


def check_index(name: str, idx: object, bounds: Sequence[int], device: torch.device) -> torch.Tensor:
    """Check an integer index tensor of shape (N, len(bounds)) (or (N,) when one bound) in range."""
    if not isinstance(idx, torch.Tensor):
        idx = torch.as_tensor(idx)
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor, got {idx.dtype}")
    d = len(bounds)
    if d == 1 and idx.dim() == 1:
        idx = idx[:, None]
    if idx.dim() != 2 or idx.shape[1] != d:
        raise ValueError(f"{name} must have shape (N, {d}), got {tuple(idx.shape)}")
    idx = idx.to(device=device, dtype=torch.int64)
    if idx.numel():
        hi = torch.tensor(list(bounds), device=device)
        if bool((idx < 0).any()) or bool((idx >= hi).any()):
            raise ValueError(f"{name} has entries outside the shape {tuple(bounds)}")
    return idx


def as_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_scalar(name: str, value: object) -> float | torch.Tensor:
    """A Python number or a 0-dim tensor, finite."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise TypeError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return value
