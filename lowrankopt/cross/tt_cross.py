"""TT-cross: a tensor train from a black-box function, reading only a few fibers of the tensor.

Notation. For a tensor ``A (n_1, ..., n_d)`` and core k (0-based), a *left set* ``I_{<k}`` is a list of multi-indices
over modes ``0..k-1`` and a *right set* ``J_{>k}`` a list over modes ``k+1..d-1``. The *fiber block* of core k is the
``(|I_{<k}|, n_k, |J_{>k}|)`` array ``A[I_{<k}, :, J_{>k}]``. A left-to-right pass evaluates the fiber block of
each core in turn, orthogonalizes it as a ``(|I_{<k}| n_k, |J_{>k}|)`` matrix, and lets :func:`rect_maxvol` pick the
rows that form the next left set ``I_{≤k}`` (a few more rows than columns, which is how the rank grows). The core
becomes the interpolation coefficients B (``M = B M[I]``, ``B[I] = I``). The right-to-left pass mirrors it.
(Oseledets & Tyrtyshnikov 2010; Savostyanov & Oseledets 2011; the rank-adaptive variant of teneva.)

The approximation is the *interpolation* ``left coefficient cores · one fiber block (the pivot) · right coefficient
cores``: it reproduces A exactly on the pivot's fiber block and, after a complete sweep, on the fiber block of every
core (a budget stop in mid-sweep leaves the other blocks reproduced only approximately). :func:`cross_forward`
rebuilds the same tensor from the same fibers of a (possibly new, differentiable) function — the differentiable
cross of C-PIC (Usvyatsov et al., ICCV 2021).
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .._checks import (
    FLOAT_DTYPES,
    as_positive_int,
    as_shape,
    check_index,
    check_random_options,
    check_scalar,
    check_tensor,
)
from ..formats.tt import TensorTrain
from .maxvol import _maxvol, _rect_maxvol

__all__ = ["CrossInfo", "tt_cross", "cross_forward"]

_EMPTY = (1, 0)  # the index set of no modes: one empty multi-index


@dataclass
class CrossInfo:
    """What :func:`tt_cross` did, and the fibers its result is built from.

    Attributes:
        shape: the tensor shape.
        evaluations: entries of f computed (each distinct entry once, with the cache).
        cache_hits: entries requested again and served by the cache.
        sweeps: completed sweeps (one sweep = a left-to-right and a right-to-left pass).
        ranks: the TT ranks of the result.
        stop: why it stopped: ``"budget"``, ``"eps"`` (relative change between sweeps), ``"validation"``,
            ``"sweeps"`` or ``"converged"`` (a whole sweep found every entry in the cache: nothing new to learn).
        changes: relative change ``‖Y_s − Y_{s−1}‖ / ‖Y_s‖`` after each sweep.
        validation_errors: relative error on the validation set after each sweep, and of the result at a budget stop
            (when a validation set is given).
        seconds: wall time.
        fibers: per core, ``(I_{<k}, J_{>k})`` as int64 tensors ``(a, k)`` and ``(b, d − k − 1)``: the fiber block the
            core was built from.
        selected: per core, the rows of its fiber matrix that the core interpolates at (None for the pivot).
        pivot: the core that holds fiber values; cores before it are left interpolation cores
            (``(a n_k, b)`` matrix, rows selected), cores after it right ones (``(a, n_k b)``, columns selected).
        domain: the coordinate grids when :func:`tt_cross` was called with ``domain=``.
    """

    shape: tuple[int, ...]
    evaluations: int = 0
    cache_hits: int = 0
    sweeps: int = 0
    ranks: tuple[int, ...] = ()
    stop: str = ""
    changes: list[float] = field(default_factory=list)
    validation_errors: list[float] = field(default_factory=list)
    seconds: float = 0.0
    fibers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    selected: list[torch.Tensor | None] = field(default_factory=list, repr=False)
    pivot: int = 0
    domain: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def fiber_entries(self) -> int:
        """How many entries one :func:`cross_forward` evaluates: ``Σ_k |I_{<k}| n_k |J_{>k}|``."""
        return sum(left.shape[0] * n * right.shape[0] for (left, right), n in zip(self.fibers, self.shape))


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


def fiber_index(left: torch.Tensor, n: int, right: torch.Tensor) -> torch.Tensor:
    """The multi-indices ``(a·n·b, d)`` of the fiber block ``I_{<k} × [n] × J_{>k}``, in C order over (a, i, b)."""
    a, b = left.shape[0], right.shape[0]
    i = torch.arange(n, device=left.device)
    return torch.cat(
        [
            left[:, None, None, :].expand(a, n, b, left.shape[1]),
            i[None, :, None, None].expand(a, n, b, 1),
            right[None, None, :, :].expand(a, n, b, right.shape[1]),
        ],
        dim=3,
    ).reshape(a * n * b, -1)


def _select(M: torch.Tensor, tol, dr, max_rank, maxvol_tol, maxvol_iters):
    """Rows of the tall fiber matrix ``M`` and the coefficients B (``M ≈ B M[rows]``): QR, then rect-maxvol."""
    Q = torch.linalg.qr(M).Q
    m, r = Q.shape
    if m <= r:
        return torch.arange(m, device=M.device), torch.eye(m, dtype=M.dtype, device=M.device)
    hi = min(r + dr[1], m, max(max_rank, r))
    if hi == r:
        return _maxvol(Q, maxvol_tol, maxvol_iters, check_rank=False)
    return _rect_maxvol(Q, tol, min(r + dr[0], hi), hi, maxvol_tol, maxvol_iters, check_rank=False)


def _check_function_args(shape, domain, dtype):
    if domain is not None:
        if isinstance(domain, torch.Tensor) or not isinstance(domain, Sequence) or not domain:
            raise TypeError("domain must be a non-empty sequence of 1-D tensors (one grid per mode)")
        for k, g in enumerate(domain):
            if not isinstance(g, torch.Tensor) or g.dim() != 1 or len(g) < 1:
                raise ValueError(f"domain[{k}] must be a non-empty 1-D tensor")
        grid_shape = tuple(len(g) for g in domain)
        if shape is not None and tuple(shape) != grid_shape:
            raise ValueError(f"shape {tuple(shape)} disagrees with the domain's grid sizes {grid_shape}")
        shape = grid_shape
    if shape is None:
        raise ValueError("give shape or domain")
    shape = as_shape("shape", shape)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return shape


def _optional_positive(name, value, kind=float):
    if value is None:
        return None
    if isinstance(value, np.generic):  # numpy scalars as the Python numbers they hold (np.bool_ becomes a bool)
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if kind is int:
        return as_positive_int(name, value)
    return float(value)


def tt_cross(
    f: Callable[[torch.Tensor], torch.Tensor],
    shape: Sequence[int] | None = None,
    *,
    budget: int | None = None,
    max_rank: int | None = None,
    eps: float | None = None,
    nswp: int | None = None,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    validation_tol: float | None = None,
    domain: Sequence[torch.Tensor] | None = None,
    init: TensorTrain | int = 1,
    rank_increase: int | tuple[int, int] = 1,
    tol: float = 1.1,
    maxvol_tol: float = 1.05,
    maxvol_iters: int = 100,
    cache: bool = True,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[TensorTrain, CrossInfo]:
    """Approximate the tensor ``A[i] = f(i)`` in TT format by rank-adaptive cross interpolation.

    Args:
        f: batched function; ``f(index)`` with ``index`` an int64 ``(N, d)`` tensor returns ``(N,)`` values (a tensor
            or array). With ``domain``, f receives the coordinates ``(N, d)`` ``x[:, k] = domain[k][index[:, k]]``.
        shape: ``(n_1, ..., n_d)`` (or take it from ``domain``).
        budget: stop before the evaluations of f would exceed this (blocks are evaluated whole, so the count may
            stay below it).
        max_rank: cap on every TT rank.
        eps: stop when the relative change between sweeps is at most eps.
        nswp: stop after this many sweeps.
        validation: ``(index (N, d), values (N,))``; with ``validation_tol``, stop when the relative error
            ``‖Y[index] − values‖ / ‖values‖`` is at most it. The errors are recorded in either case.
        domain: one 1-D coordinate grid per mode (like tntorch's ``domain=``).
        init: a starting TT — the first right index sets come from a right-to-left maxvol pass over its cores (no
            evaluations; e.g. the previous result, to refresh a cross) — or the rank of a random start (default 1).
        rank_increase: rows rect-maxvol adds per core and pass, ``(min, max)`` or one int for both; 0 keeps the
            ranks fixed (plain maxvol).
        tol: rect-maxvol's row-norm tolerance τ ≥ 1.
        maxvol_tol: :func:`maxvol`'s dominance tolerance.
        maxvol_iters: :func:`maxvol`'s swap limit.
        cache: keep every computed entry and never ask f twice for one (the budget counts distinct entries).
        dtype: of the result (f's values are cast to it).
        device: of the result and of the indices f receives (default: the domain's, else CPU).
        generator: for the random start.

    At least one of ``budget``, ``eps``, ``nswp`` or ``validation_tol`` must be given.

    Returns ``(Y, info)``: the TT and a :class:`CrossInfo`. Cost per sweep: f at about ``2 Σ_k r_{k−1} n_k r_k``
    entries (in batches of one fiber block), and ``O(d n r³)`` flops for the QRs and maxvols; memory ``O(d n r²)``
    plus the cache. Every pass adds ``rank_increase`` rows per core, so ranks grow past what the tensor needs while
    the sweeps go on (``Y.round(eps=...)`` recompresses). ``rank_increase=(0, k)`` adds rows only where some row of
    the coefficients exceeds ``tol`` — from a rank-1 start that may never happen.
    """
    start = time.perf_counter()
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    shape = _check_function_args(shape, domain, dtype)
    _, device, _ = check_random_options(dtype, device, generator)
    budget = _optional_positive("budget", budget, int)
    max_rank = _optional_positive("max_rank", max_rank, int) or math.inf
    eps = _optional_positive("eps", eps)
    nswp = _optional_positive("nswp", nswp, int)
    validation_tol = _optional_positive("validation_tol", validation_tol)
    if budget is None and eps is None and nswp is None and validation_tol is None:
        raise ValueError("give at least one stopping rule: budget, eps, nswp or validation_tol")
    if validation_tol is not None and validation is None:
        raise ValueError("validation_tol needs validation=(index, values)")
    maxvol_iters = as_positive_int("maxvol_iters", maxvol_iters)
    if not isinstance(cache, bool):
        raise TypeError(f"cache must be a bool, got {cache!r}")
    dr = _rank_increase(rank_increase)
    for name, value in (("tol", tol), ("maxvol_tol", maxvol_tol)):
        if not check_scalar(name, value) >= 1:
            raise ValueError(f"{name} must be ≥ 1, got {value}")
    device = device if device is not None else (domain[0].device if domain else torch.device("cpu"))
    if domain is not None:
        domain = [g.to(device) for g in domain]
    if validation is not None:
        if not isinstance(validation, (tuple, list)) or len(validation) != 2:
            raise TypeError("validation must be a pair (index (N, d), values (N,))")
        val_index = check_index("validation[0]", validation[0], shape, device)
        val_values = check_tensor("validation[1]", validation[1], 1).to(dtype=dtype, device=device)
        if len(val_values) != len(val_index) or not len(val_index):
            raise ValueError("validation index and values must be non-empty and of one length")
    evaluate = _Evaluator(f, shape, domain, budget, cache, dtype, device)
    info = CrossInfo(shape=shape, domain=None if domain is None else list(domain))
    Y0 = _initial(init, shape, max_rank, dtype, device, generator)
    stops = (budget, eps, nswp, validation_tol, None if validation is None else (val_index, val_values))
    with torch.inference_mode():  # no autograd bookkeeping: a fifth of the time of small problems
        Y = _sweeps(evaluate, Y0, info, stops, (tol, dr, max_rank, maxvol_tol, maxvol_iters))
    # Hand out ordinary tensors (inference tensors cannot enter autograd graphs later).
    Y = TensorTrain._trusted([c.clone() for c in Y.cores])
    info.fibers = [(left.clone(), right.clone()) for left, right in info.fibers]
    info.selected = [None if rows is None else rows.clone() for rows in info.selected]
    info.evaluations, info.cache_hits = evaluate.evaluations, evaluate.hits
    info.ranks = Y.ranks
    info.seconds = time.perf_counter() - start
    return Y, info


def _sweeps(evaluate: _Evaluator, Y0: TensorTrain, info: CrossInfo, stops, selection) -> TensorTrain:
    """The sweeps of :func:`tt_cross`; fills ``info`` and returns the TT."""
    budget, eps, nswp, validation_tol, validation = stops
    tol, dr, max_rank, maxvol_tol, maxvol_iters = selection
    shape, d, dtype, device = info.shape, len(info.shape), Y0.dtype, Y0.device
    # Right sets from the starting TT by a right-to-left maxvol pass over its cores (no evaluations).
    left = [torch.empty(_EMPTY, dtype=torch.int64, device=device)] * (d + 1)
    right = [torch.empty(_EMPTY, dtype=torch.int64, device=device)] * (d + 1)  # right[k]: modes k..d-1
    carry = torch.ones(1, 1, dtype=dtype, device=device)
    for k in range(d - 1, 0, -1):
        core = torch.tensordot(Y0.cores[k], carry, 1)
        a, n, b = core.shape
        Q, R = torch.linalg.qr(_right_matrix(core))
        rows, _ = (
            _maxvol(Q, maxvol_tol, maxvol_iters, False)
            if Q.shape[0] > Q.shape[1]
            else (torch.arange(Q.shape[0], device=Q.device), None)
        )
        right[k] = _grow_right(right[k + 1], n, rows)
        carry = (Q[rows] @ R).T

    cores: list[torch.Tensor] = [torch.empty(0)] * d
    info.fibers = [(left[k], right[k + 1]) for k in range(d)]
    info.selected = [None] * d
    Y_old = None
    last = None  # (k, fiber block) of the latest core processed
    try:
        while True:
            hits_before, evals_before = evaluate.hits, evaluate.evaluations
            for forward in (True, False):
                order = range(d) if forward else range(d - 1, -1, -1)
                for k in order:
                    n = shape[k]
                    Z = evaluate(fiber_index(left[k], n, right[k + 1])).reshape(left[k].shape[0], n, -1)
                    a, _, b = Z.shape
                    info.fibers[k] = (left[k], right[k + 1])
                    last = (k, Z)
                    if k == (d - 1 if forward else 0):
                        cores[k], info.selected[k] = Z, None
                        continue
                    if forward:
                        rows, B = _select(_left_matrix(Z), tol, dr, max_rank, maxvol_tol, maxvol_iters)
                        cores[k] = _left_core(B, a, n)
                        left[k + 1] = _grow_left(left[k], n, rows)
                    else:
                        rows, B = _select(_right_matrix(Z), tol, dr, max_rank, maxvol_tol, maxvol_iters)
                        cores[k] = _right_core(B, n, b)
                        right[k] = _grow_right(right[k + 1], n, rows)
                    info.selected[k] = rows
            info.pivot = 0
            info.sweeps += 1
            Y = TensorTrain._trusted(cores)
            if Y_old is not None:
                info.changes.append(_relative_distance(Y, Y_old))
            Y_old = Y
            if validation is not None:
                info.validation_errors.append(_relative_error(Y, *validation))
            if evaluate.evaluations == evals_before and evaluate.hits > hits_before:
                info.stop = "converged"
            elif validation_tol is not None and info.validation_errors[-1] <= validation_tol:
                info.stop = "validation"
            elif eps is not None and info.changes and info.changes[-1] <= eps:
                info.stop = "eps"
            elif nswp is not None and info.sweeps >= nswp:
                info.stop = "sweeps"
            if info.stop:
                break
    except _Budget:
        info.stop = "budget"
        done = sum(c.numel() > 0 for c in cores)
        if done < d:
            raise ValueError(
                f"budget = {budget} does not cover one left-to-right pass: {evaluate.evaluations} evaluations "
                f"covered {done} of {d} cores"
            ) from None
        k, Z = last
        cores[k], info.selected[k], info.pivot = Z, None, k
        Y = TensorTrain._trusted(cores)
        if validation is not None:
            info.validation_errors.append(_relative_error(Y, *validation))
    return Y


def _rank_increase(value) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, numbers.Integral) else value
    ok = isinstance(pair, (tuple, list)) and len(pair) == 2
    ok = ok and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0 for x in pair)
    if not ok or pair[0] > pair[1]:
        raise ValueError(f"rank_increase must be an int ≥ 0 or (min, max) with 0 ≤ min ≤ max, got {value!r}")
    return int(pair[0]), int(pair[1])


# Fiber matrices: the block ``(a, n, b)`` as ``(a n, b)`` (rows ``α·n + i``) for a left core and as ``(n b, a)``
# (rows ``i·b + β``) for a right one.
def _left_matrix(Z: torch.Tensor) -> torch.Tensor:
    return Z.reshape(-1, Z.shape[2])


def _left_core(B: torch.Tensor, a: int, n: int) -> torch.Tensor:
    return B.reshape(a, n, -1)


def _grow_left(left: torch.Tensor, n: int, rows: torch.Tensor) -> torch.Tensor:
    """``I_{≤k}``: the chosen rows ``α·n + i`` of ``I_{<k} × [n]``."""
    return torch.cat([left[rows // n], (rows % n)[:, None]], 1)


def _right_matrix(Z: torch.Tensor) -> torch.Tensor:
    return Z.reshape(Z.shape[0], -1).T


def _right_core(B: torch.Tensor, n: int, b: int) -> torch.Tensor:
    return B.T.reshape(-1, n, b)


def _grow_right(right: torch.Tensor, n: int, rows: torch.Tensor) -> torch.Tensor:
    """``J_{≥k}``: the chosen rows ``i·b + β`` of ``[n] × J_{>k}``."""
    rows = rows.to(right.device)
    b = right.shape[0]
    return torch.cat([(rows // b)[:, None], right[rows % b]], 1)


def _initial(init, shape, max_rank, dtype, device, generator) -> TensorTrain:
    if isinstance(init, TensorTrain):
        if init.shape != tuple(shape):
            raise ValueError(f"init has shape {init.shape}, expected {tuple(shape)}")
        if max(init.ranks, default=1) > max_rank:
            raise ValueError(f"init has ranks {init.ranks} above max_rank = {max_rank}")
        for k, core in enumerate(init.cores):
            check_tensor(f"init.cores[{k}]", core.detach())
        return TensorTrain._trusted([c.detach().to(dtype=dtype, device=device) for c in init.cores])
    rank = as_positive_int("init", init)
    if rank > max_rank:
        raise ValueError(f"init rank {rank} exceeds max_rank = {max_rank}")
    return TensorTrain.random(shape, rank, dtype=dtype, generator=generator).to(device)


def _accurate_norm(Y: TensorTrain) -> torch.Tensor:
    """‖Y‖ from its left-orthogonal form: accurate to roundoff even for a difference of close tensors (the Gram
    formula ``sqrt(<Y, Y>)`` of :meth:`TensorTrain.norm` cannot resolve below ``sqrt(ε)`` of the operands' norms)."""
    return Y.orthogonalize("left").cores[-1].norm()


def _relative_distance(Y: TensorTrain, Y_old: TensorTrain) -> float:
    return float(_accurate_norm(Y - Y_old) / _accurate_norm(Y).clamp_min(torch.finfo(Y.dtype).tiny))


def _relative_error(Y: TensorTrain, index: torch.Tensor, values: torch.Tensor) -> float:
    return float((Y._gather(index) - values).norm() / values.norm().clamp_min(torch.finfo(values.dtype).tiny))


def _singular(R: torch.Tensor) -> bool:
    """Is the triangular factor R numerically singular (relative to its largest diagonal entry)?"""
    diag = R.detach().diagonal().abs()
    return bool((diag <= torch.finfo(R.dtype).eps * R.shape[-1] * diag.max()).any())


def _interpolation_core(M: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``X = Q Q[rows]⁺`` for an orthonormal basis Q of the fiber matrix M, with ``X[rows] = I``: the coefficients
    ``M = X M[rows]`` that :func:`tt_cross` computes (equal to ``M M[rows]⁺`` when M has full column rank, and
    bounded when it does not, since ``Q[rows]`` is a maxvol submatrix). Differentiable through the two QRs."""
    if len(rows) == M.shape[0]:  # every row is selected: the identity
        return torch.eye(len(rows), dtype=M.dtype, device=M.device)
    Q, R = torch.linalg.qr(M)
    if M.requires_grad and _singular(R):  # QR's derivative divides by R's diagonal
        raise ValueError(
            "a fiber matrix is numerically rank-deficient, so the cross has no derivative there: f has lower "
            "rank than the cross; rerun tt_cross with a smaller max_rank (or rank_increase=0)"
        )
    Qs, Rs = torch.linalg.qr(Q[rows])
    if _singular(Rs):
        raise ValueError(
            "the selected rows of a fiber matrix are singular for this f (they were picked for another one): "
            "refresh the fibers with tt_cross(f, ..., init=...)"
        )
    X = torch.linalg.solve_triangular(Rs, Q, upper=True, left=False) @ Qs.T
    eye = torch.eye(len(rows), dtype=M.dtype, device=M.device)
    return X.index_put((rows.to(M.device),), eye)


def cross_forward(info: CrossInfo, f: Callable[[torch.Tensor], torch.Tensor]) -> TensorTrain:
    """The cross interpolation of f on the fibers of ``info`` (differentiable cross, C-PIC).

    Evaluates f once, batched, on the ``info.fiber_entries`` entries of the stored fiber blocks ``I_{<k} × [n_k] ×
    J_{>k}`` and builds each core by the interpolation formula: left of the pivot ``G_k = M_k M_k[S_k]⁺`` (with
    ``G_k[S_k] = I``) for the fiber matrix ``M_k (a n_k, b)`` and selected rows ``S_k``, right of it the mirror
    image, and the fiber block itself at the pivot. For the f that :func:`tt_cross` saw this is its result (up to
    roundoff); for a new f (say a network with new weights) it is the cross approximation on the same fibers, and
    autograd carries gradients into f's parameters through the values of just these entries. Refresh the fibers
    now and then by running :func:`tt_cross` again (``init=`` the current result).

    Args:
        info: from :func:`tt_cross`; its ``domain`` (if any) is used.
        f: as for :func:`tt_cross`; its values keep their dtype and device (and autograd graph).

    Cost: one call of f on ``info.fiber_entries`` entries, and O(d n r³) for the small QRs and solves.
    """
    if not isinstance(info, CrossInfo) or not info.fibers:
        raise TypeError("info must be the CrossInfo returned by tt_cross")
    blocks = [fiber_index(left, n, right) for (left, right), n in zip(info.fibers, info.shape)]
    index = torch.cat(blocks)
    y = _values(f, index, info.domain)
    if y.dtype not in FLOAT_DTYPES:
        raise TypeError(f"f must return a float32 or float64 tensor (it carries the gradient), got {y.dtype}")
    if not bool(torch.isfinite(y.detach()).all()):
        raise ValueError("f returned a non-finite value on the fibers")
    cores = []
    for k, (V, ((left, right), n)) in enumerate(zip(y.split([len(b) for b in blocks]), zip(info.fibers, info.shape))):
        a, b = left.shape[0], right.shape[0]
        rows = info.selected[k]
        if k == info.pivot:
            cores.append(V.reshape(a, n, b))
        elif k < info.pivot:
            cores.append(_left_core(_interpolation_core(_left_matrix(V.reshape(a, n, b)), rows), a, n))
        else:
            cores.append(_right_core(_interpolation_core(_right_matrix(V.reshape(a, n, b)), rows), n, b))
    return TensorTrain(cores)
