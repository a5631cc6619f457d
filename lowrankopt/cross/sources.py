"""Out-of-core sources for cross approximation: arrays read entry by entry, and quantized tensorization.

A cross approximation reads ``O(d n r²)`` entries per sweep, so an array on disk need never be loaded: wrap it in
:class:`ArraySource` (which reads only the requested entries and counts them) and, for a large grid, tensorize it
with :class:`Quantization` — an ``N × N × N`` volume with ``N = 2^L`` becomes a ``2 × 2 × ... × 2`` tensor of
``3L`` modes, so a sweep reads ``O(r² log N)`` voxels instead of ``O(r² N)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .._checks import FLOAT_DTYPES, as_positive_int, check_index

__all__ = ["ArraySource", "Quantization"]


class ArraySource:
    """Entries of an array-like fetched on demand, with a count of entries read.

    Args:
        array: a numpy array or ``numpy.memmap`` (or anything with ``shape`` that supports numpy's integer-array
            indexing ``array[i_1, ..., i_m]``), of any real dtype.
        dtype: of the returned values.
        device: of the returned values.

    Calling ``source(index)`` with an integer ``(N, m)`` tensor returns the ``(N,)`` entries; only those entries are
    read (a memmap touches only the pages that hold them). ``reads`` counts every entry returned (TT-cross's cache
    asks for each entry once); ``fraction`` is ``reads`` over the array's size. Cost: one read per entry.
    """

    def __init__(
        self, array: Any, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> None:
        shape = getattr(array, "shape", None)
        if shape is None or len(shape) < 1 or any(int(n) < 1 for n in shape):
            raise TypeError(f"array must be a non-empty array-like with a shape, got {type(array).__name__}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        kind = np.dtype(getattr(array, "dtype", np.float64)).kind
        if kind not in "biuf":
            raise TypeError(f"array must hold real numbers, got dtype {array.dtype}")
        self.array = array
        self.shape = tuple(int(n) for n in shape)
        self.dtype, self.device = dtype, torch.device(device or "cpu")
        self.reads = 0

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def fraction(self) -> float:
        """Entries read so far over the number of entries."""
        return self.reads / self.size

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        """The entries at ``index (N, m)`` as a ``(N,)`` tensor. Cost: N reads."""
        index = check_index("index", index, self.shape, torch.device("cpu")).numpy()
        values = np.asarray(self.array[tuple(index.T)], dtype=np.float64 if self.dtype == torch.float64 else np.float32)
        self.reads += len(index)
        return torch.from_numpy(values).to(self.device)


class Quantization:
    """Index maps between an array of shape ``(N_1, ..., N_m)``, ``N_j = base^{L_j}``, and a tensor with ``ΣL_j``
    modes of size ``base`` (quantized tensor train, QTT; Oseledets 2010, Khoromskij 2011).

    Args:
        array_shape: the array's shape; every size a power of ``base``.
        base: the mode size (2 gives the most modes and the fewest reads per sweep).
        order: ``"sequential"`` (default) takes the digits of axis 1 (most significant first), then those of axis 2,
            and so on; ``"interleaved"`` orders the modes level by level, the most significant digit of every axis
            first (a Morton order). On smooth fields sequential gives lower ranks (measured in the cross benchmark);
            interleaved can suit fields whose features are local in all axes at once.

    ``shape`` (the tensor's), ``to_array(index)`` and ``to_tensor(index)`` map between the two; ``wrap(f)`` turns a
    function on array indices into one on tensor indices, for :func:`~lowrankopt.cross.tt_cross`.
    """

    def __init__(self, array_shape: Sequence[int], base: int = 2, order: str = "sequential") -> None:
        base = as_positive_int("base", base)
        if base < 2:
            raise ValueError(f"base must be at least 2, got {base}")
        if isinstance(array_shape, (int, torch.Tensor)) or not array_shape:
            raise ValueError(f"array_shape must be a non-empty sequence of ints, got {array_shape!r}")
        array_shape = tuple(as_positive_int(f"array_shape[{j}]", n) for j, n in enumerate(array_shape))
        levels = []
        for j, n in enumerate(array_shape):
            L = round(math.log(n, base))
            if base**L != n:
                raise ValueError(f"array_shape[{j}] = {n} is not a power of base = {base}")
            levels.append(L)
        if order == "interleaved":  # (axis, level) with level 0 the most significant digit; coarse levels first
            modes = [(j, lvl) for lvl in range(max(levels)) for j in range(len(levels)) if lvl < levels[j]]
        elif order == "sequential":
            modes = [(j, lvl) for j in range(len(levels)) for lvl in range(levels[j])]
        else:
            raise ValueError(f"order must be 'interleaved' or 'sequential', got {order!r}")
        if not modes:
            raise ValueError("every axis has size 1: nothing to quantize")
        self.array_shape, self.base, self.order, self.levels = array_shape, base, order, levels
        self.shape = (base,) * len(modes)
        axis = torch.tensor([j for j, _ in modes])
        weight = torch.tensor([base ** (levels[j] - 1 - lvl) for j, lvl in modes])
        # array index = digits @ W, W[mode, axis] = base^(L_axis - 1 - level)
        self._weights = torch.zeros(len(modes), len(levels), dtype=torch.int64)
        self._weights[torch.arange(len(modes)), axis] = weight
        self._axis, self._weight = axis, weight

    def to_array(self, index: torch.Tensor) -> torch.Tensor:
        """Tensor indices ``(N, D)`` (digits) to array indices ``(N, m)``. Cost O(N D m)."""
        index = check_index("index", index, self.shape, _device(index))
        return (index[:, :, None] * self._weights.to(index.device)).sum(1)  # no int64 matmul: CUDA has none

    def to_tensor(self, index: torch.Tensor) -> torch.Tensor:
        """Array indices ``(N, m)`` to tensor indices ``(N, D)``. Cost O(N D)."""
        index = check_index("index", index, self.array_shape, _device(index))
        return (index[:, self._axis.to(index.device)] // self._weight.to(index.device)) % self.base

    def wrap(self, f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``g(tensor_index) = f(to_array(tensor_index))``: a function of the quantized tensor's indices."""

        def g(index: torch.Tensor) -> torch.Tensor:
            return f(self.to_array(index))

        return g


def _device(index: object) -> torch.device:
    return index.device if isinstance(index, torch.Tensor) else torch.device("cpu")
