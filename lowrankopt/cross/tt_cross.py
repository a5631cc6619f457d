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

This module checks the arguments and drives the sweeps; :mod:`.evaluator` calls f (cache, budget),
:mod:`.fibers` holds the index sets and fiber matrices, and :mod:`.interpolation` the result (:class:`CrossInfo`,
:func:`cross_forward`).
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence

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
from .evaluator import _Budget, _Evaluator
from .fibers import (
    _EMPTY,
    _grow_left,
    _grow_right,
    _left_core,
    _left_matrix,
    _right_core,
    _right_matrix,
    _select,
    fiber_index,
)
from .interpolation import CrossInfo, cross_forward
from .maxvol import _maxvol
from .truncation import cut_columns, default_rank_tol, truncate_fibers

__all__ = ["CrossInfo", "tt_cross", "cross_forward"]


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
    rank_tol: float | None = None,
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
        rank_tol: after the last sweep, each fiber matrix is cut to its numerical rank — its singular values above
            ``rank_tol · σ_max`` (default 2.2e-14 in float64, 1.2e-6 in float32: above the rounding noise of the
            values) — and the fiber sets with it, consistently from the last core to the first
            (:mod:`lowrankopt.cross.truncation`): ranks that the rank-adaptive passes overshot come back down, and
            :func:`cross_forward` can differentiate on the fibers. A few new entries are evaluated where ranks are
            cut; where they would exceed ``budget`` (and after a ``"budget"`` stop in mid-sweep) only the columns of
            the fiber matrices are cut, so the ranks stay and nothing new is read. After a ``"validation"`` stop the
            cut is kept only if the validation error stays within ``validation_tol``. ``rank_tol=0``: no cut.
            ``info.cut`` says which happened.
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
    rank_tol = default_rank_tol(dtype) if rank_tol is None else _rank_tol(rank_tol)
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
        Y = _sweeps(evaluate, Y0, info, stops, (tol, dr, max_rank, maxvol_tol, maxvol_iters, rank_tol))
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
    tol, dr, max_rank, maxvol_tol, maxvol_iters, rank_tol = selection
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
    blocks: list[torch.Tensor] = [torch.empty(0)] * d  # the fiber block of each core's latest pass
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
                    blocks[k] = Z
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
        if rank_tol > 0:
            Y = _cut(evaluate, blocks, left, right, cores, info, validation, validation_tol, selection)
        else:
            info.cut = "off"
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
        if rank_tol > 0:
            cores, info.fibers = cut_columns(
                blocks, info.fibers, info.selected, cores, k, rank_tol, maxvol_tol, maxvol_iters
            )
        info.cut = "columns" if rank_tol > 0 else "off"
        Y = TensorTrain._trusted(cores)
        if validation is not None:
            info.validation_errors.append(_relative_error(Y, *validation))
    return Y


def _cut(evaluate, blocks, left, right, cores, info, validation, validation_tol, selection) -> TensorTrain:
    """The fibers of a complete sweep cut to their numerical ranks (:mod:`.truncation`); only their columns when the
    new blocks do not fit in the budget. A validation stop keeps the uncut result if the cut one misses the tolerance
    (the fibers then stay as the sweeps left them)."""
    _, _, _, maxvol_tol, maxvol_iters, rank_tol = selection
    try:
        cut_cores, fibers, selected = truncate_fibers(
            evaluate, blocks, left, right, info.selected, cores, rank_tol, maxvol_tol, maxvol_iters
        )
        cut = "ranks"
    except _Budget:  # the cut blocks do not fit in the budget: cut columns only
        selected = info.selected
        cut_cores, fibers = cut_columns(blocks, info.fibers, selected, cores, 0, rank_tol, maxvol_tol, maxvol_iters)
        cut = "columns"
    Y = TensorTrain._trusted(cut_cores)
    if validation is not None:
        error = _relative_error(Y, *validation)
        if info.stop == "validation" and error > validation_tol:
            info.cut = "kept"
            return TensorTrain._trusted(cores)
        info.validation_errors[-1] = error  # the record is of the result
    info.fibers, info.selected, info.cut = fibers, selected, cut
    return Y


def _rank_tol(value) -> float:
    if not 0 <= check_scalar("rank_tol", value) < 1:
        raise ValueError(f"rank_tol must be in [0, 1), got {value}")
    return float(value)


def _rank_increase(value) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, numbers.Integral) else value
    ok = isinstance(pair, (tuple, list)) and len(pair) == 2
    ok = ok and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0 for x in pair)
    if not ok or pair[0] > pair[1]:
        raise ValueError(f"rank_increase must be an int ≥ 0 or (min, max) with 0 ≤ min ≤ max, got {value!r}")
    return int(pair[0]), int(pair[1])


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
