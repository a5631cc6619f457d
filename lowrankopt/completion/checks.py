"""The argument checks of :func:`~lowrankopt.complete` (named ``ValueError`` / ``TypeError`` on bad input)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from .._checks import as_shape, check_index, check_random_options, check_tensor
from .continuation import GROWTH

__all__ = ["Arguments", "check_arguments"]

_DEFAULT_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


class Arguments(NamedTuple):
    """complete()'s arguments as checked: ``indices (N, d)`` on values' device, ``shape`` a list, ``test`` a pair
    ``(indices, values)`` or None, ``tol`` a number, ``options`` for minimize (``gtol`` defaulting to 0)."""

    indices: torch.Tensor
    shape: list[int]
    test: tuple[torch.Tensor, torch.Tensor] | None
    tol: float
    options: dict


def check_arguments(
    indices: Any,
    values: Any,
    shape: Sequence[int],
    *,
    test: Any,
    x0: Any,
    tol: float | None,
    warmup_iters: int | None,
    check_every: int,
    generator: torch.Generator | None,
    monitor: Callable | None,
    distributed: bool,
    options: dict,
    rank_continuation: bool | None = None,
    balance: bool | None = None,
    starts: int | None = None,
    growth: str | None = None,
) -> Arguments:
    """Check complete()'s arguments (see there); raises on the first bad one. Cost O(N d) (the index range check)."""
    check_tensor("values", values, 1)
    shape = list(as_shape("shape", shape))
    if len(shape) < 2:
        raise ValueError(f"shape must have at least 2 modes, got {shape}")
    indices = check_index("indices", indices, shape, values.device)
    if indices.shape[0] != values.shape[0]:
        raise ValueError(f"indices has {indices.shape[0]} rows but values has {values.shape[0]} entries")
    if values.shape[0] == 0 and not distributed:  # with distributed, the total count is checked after the agreement
        raise ValueError("values is empty: nothing to complete from")
    if test is not None:
        test = _check_test(test, shape, values)
    tol = _DEFAULT_TOL.get(values.dtype, 1e-12) if tol is None else tol
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a non-negative number, got {tol!r}")
    if warmup_iters is not None and (
        isinstance(warmup_iters, bool) or not isinstance(warmup_iters, int) or warmup_iters < 0
    ):
        raise ValueError(f"warmup_iters must be a non-negative int or None, got {warmup_iters!r}")
    check_random_options(values.dtype, None, generator)  # (checks the generator)
    if monitor is not None and not callable(monitor):
        raise TypeError(f"monitor must be callable or None, got {type(monitor).__name__}")
    if x0 is not None and getattr(x0, "dtype", None) != values.dtype:
        raise TypeError(f"x0 must have the dtype of values ({values.dtype}), got {getattr(x0, 'dtype', None)}")
    if rank_continuation is not None and not isinstance(rank_continuation, bool):  # (1 == True: not a flag)
        raise TypeError(f"rank_continuation must be None, True or False, got {rank_continuation!r}")
    if rank_continuation is not None and len(shape) != 2:
        raise ValueError("rank_continuation applies to matrices; tensor trains always climb from TT-rank 1 without x0")
    if balance is not None and not isinstance(balance, bool):
        raise TypeError(f"balance must be None, True or False, got {balance!r}")
    if balance and len(shape) == 2:
        raise ValueError("balance applies to tensor trains (len(shape) > 2); matrices are not rescaled")
    if starts is not None and (isinstance(starts, bool) or not isinstance(starts, int) or starts < 1):
        raise ValueError(f"starts must be a positive int or None, got {starts!r}")
    if starts is not None and starts > 1 and (len(shape) == 2 or x0 is not None):
        raise ValueError("starts > 1 applies to tensor trains without x0 (each run climbs from the constant tensor)")
    if growth is not None and growth not in GROWTH:
        raise ValueError(f"growth must be None or one of {', '.join(map(repr, GROWTH))}, got {growth!r}")
    if growth is not None and (len(shape) == 2 or x0 is not None):
        raise ValueError(
            "growth applies to tensor trains without x0 (matrices grow by the greedy rank-one step; x0 is used as is)"
        )
    if rank_continuation and x0 is not None:
        raise ValueError("rank_continuation=True needs the spectral start: pass x0=None (x0 is used at its rank)")
    options = {"gtol": 0.0, **options}
    if distributed and "max_time" in options:
        raise ValueError("max_time would stop the processes at different iterations; use max_iter with distributed")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be a positive int, got {check_every!r}")
    if distributed and generator is None:
        raise ValueError("distributed=True needs a generator, seeded the same on every process")
    if "callback" in options:
        raise TypeError("complete() records its own callback; use minimize() with completion_loss() for yours")
    return Arguments(indices, shape, test, tol, options)


def _check_test(test: Any, shape: list[int], values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(test, (tuple, list)) or len(test) != 2:
        raise TypeError(f"test must be a pair (indices (N, d), values (N,)), got {type(test).__name__}")
    test_idx, test_vals = test
    check_tensor("test values", test_vals, 1)
    test_idx = check_index("test indices", test_idx, shape, values.device)
    if test_idx.shape[0] != test_vals.shape[0] or test_vals.dtype != values.dtype:
        raise ValueError("test must be (indices (N, d), values (N,)) with the dtype of values")
    return test_idx, test_vals
