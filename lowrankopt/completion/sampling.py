"""Random index sets for completion: :func:`sample_indices`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._checks import as_int, as_shape, check_random_options

__all__ = ["sample_indices"]


def sample_indices(
    shape: Sequence[int],
    count: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``count`` distinct multi-indices drawn uniformly at random from a tensor of ``shape``.

    Returns an int64 tensor ``(count, len(shape))`` in random order. Cost ``O(count log count)``: draws
    linear indices with replacement, keeps the distinct ones and tops up until there are enough, so the
    ``Π shape`` index space is never materialized. ``shape`` and ``count`` take Python or numpy/torch integers.
    """
    shape = as_shape("shape", shape)
    _, device, _ = check_random_options(torch.float64, device, generator)  # (checks the device and the generator)
    total = math.prod(shape)
    count = as_int("count", count, minimum=0)
    if count > total:
        raise ValueError(f"count must be an int in [0, {total}] (the number of entries), got {count!r}")
    if total >= 2**63:
        raise ValueError(f"shape {tuple(shape)} has more than 2^63 entries; linear indices would overflow int64")
    gdev = generator.device if generator is not None else torch.device("cpu")
    chosen = torch.empty(0, dtype=torch.int64, device=gdev)
    while chosen.numel() < count:
        need = count - chosen.numel()
        draw = torch.randint(0, total, (need + need // 8 + 16,), generator=generator, device=gdev)
        chosen = torch.unique(torch.cat([chosen, draw]))
        if total - chosen.numel() < need and count > total // 2:  # dense request: take a permutation
            chosen = torch.randperm(total, generator=generator, device=gdev)[:count]
            break
    chosen = chosen[torch.randperm(chosen.numel(), generator=generator, device=gdev)[:count]]
    idx = torch.stack(torch.unravel_index(chosen, tuple(shape)), dim=1)
    return idx.to(device if device is not None else gdev)
