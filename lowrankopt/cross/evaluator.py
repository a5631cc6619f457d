"""The black-box function of a cross, as the sweeps see it: f on integer multi-indices (or on the coordinates of a
domain grid), checked, with a cache of the entries computed so far and a budget on how many it may compute.

Cost: a lookup of N indices in a cache of M entries is O(N log M) (a sorted table of linear indices); inserting them
is one sort while the table is small, then an O(M + N log N) merge.
"""

from __future__ import annotations

import math

import torch


class _Budget(Exception):
    """The next block of evaluations would exceed the budget."""


class _Evaluator:
    """f on integer multi-indices with a cache of computed entries and counts of evaluations and hits.

    Keys are linear indices in a sorted int64 tensor when ``prod(shape) < 2⁶²`` (vectorized lookups); otherwise a
    dict keyed by the index tuple.
    """

    def __init__(self, f, shape, domain, budget, cache, dtype, device):
        self.f, self.shape, self.domain, self.budget, self.cache = f, shape, domain, budget, cache
        self.dtype, self.device = dtype, device
        self.evaluations = self.hits = 0
        self.linear = math.prod(shape) < 2**62
        if self.linear:
            strides = [math.prod(shape[k + 1 :]) for k in range(len(shape))]
            self.strides = torch.tensor(strides, dtype=torch.int64, device=device)
            self.keys = torch.empty(0, dtype=torch.int64, device=device)
            self.values = torch.empty(0, dtype=dtype, device=device)
        else:
            self.table: dict[tuple[int, ...], float] = {}

    def _call(self, index: torch.Tensor) -> torch.Tensor:
        if self.budget is not None and self.evaluations + index.shape[0] > self.budget:
            raise _Budget
        y = _values(self.f, index, self.domain).to(dtype=self.dtype, device=self.device)
        if not bool(torch.isfinite(y).all()):
            bad = index[~torch.isfinite(y)][0].tolist()
            raise ValueError(f"f returned a non-finite value (first at index {bad})")
        self.evaluations += index.shape[0]
        return y

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        """Values at ``index (N, d)``, whose rows are distinct (fiber blocks of distinct index sets are)."""
        if not self.cache:
            return self._call(index)
        if not self.linear:
            return self._call_dict(index)
        keys = (index * self.strides).sum(1)  # no int64 matmul: CUDA has none
        if not len(self.keys):
            values = self._call(index)
            self._insert(keys, values)
            return values
        pos = torch.searchsorted(self.keys, keys).clamp_max_(len(self.keys) - 1)
        found = self.keys[pos] == keys
        hits = int(found.sum())
        if hits == len(keys):
            values = self.values[pos]
        elif hits == 0:
            values = self._call(index)
            self._insert(keys, values)
        else:
            values = self.values[pos]
            new = ~found
            values[new] = self._call(index[new])
            self._insert(keys[new], values[new])
        self.hits += hits  # after the call: a block the budget refused serves nothing
        return values

    def _insert(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add new keys to the sorted table: one sort while it is small, then a merge (O(M + k log k), no re-sort of
        the M stored keys)."""
        if len(self.keys) < 4096:
            self.keys, order = torch.sort(torch.cat([self.keys, keys]))
            self.values = torch.cat([self.values, values])[order]
            return
        keys, order = torch.sort(keys)
        slots = torch.searchsorted(self.keys, keys) + torch.arange(len(keys), device=self.device)
        size = len(self.keys) + len(keys)
        is_new = torch.zeros(size, dtype=torch.bool, device=self.device)
        is_new[slots] = True
        merged_keys = torch.empty(size, dtype=torch.int64, device=self.device)
        merged_values = torch.empty(size, dtype=self.dtype, device=self.device)
        merged_keys[slots], merged_values[slots] = keys, values[order]
        merged_keys[~is_new], merged_values[~is_new] = self.keys, self.values
        self.keys, self.values = merged_keys, merged_values

    def _call_dict(self, index: torch.Tensor) -> torch.Tensor:
        rows = [tuple(r) for r in index.tolist()]
        missing = list(dict.fromkeys(r for r in rows if r not in self.table))
        if missing:
            y = self._call(torch.tensor(missing, dtype=torch.int64, device=self.device))
            self.table.update(zip(missing, y.tolist()))
        self.hits += len(rows) - len(missing)
        return torch.tensor([self.table[r] for r in rows], dtype=self.dtype, device=self.device)


def _argument(index: torch.Tensor, domain) -> torch.Tensor:
    """What f receives: the indices, or on a domain the coordinates ``x[:, k] = domain[k][index[:, k]]``."""
    return index if domain is None else torch.stack([g[index[:, k]] for k, g in enumerate(domain)], 1)


def _values(f, index: torch.Tensor, domain) -> torch.Tensor:
    """``f`` at ``index``, checked: a real ``(N,)`` tensor (arrays are converted)."""
    y = f(_argument(index, domain))
    if not isinstance(y, torch.Tensor):
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"f must return a tensor or an array of numbers, got {type(y).__name__}") from None
    if y.shape != (index.shape[0],):
        raise ValueError(f"f must return shape ({index.shape[0]},) for {index.shape[0]} indices, got {tuple(y.shape)}")
    if y.is_complex():
        raise TypeError(f"f must return real values, got {y.dtype}")
    return y
