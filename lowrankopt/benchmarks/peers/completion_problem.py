"""The matrix-completion problem every completion solver of the benchmarks is run on (lowrankopt's and the peers').

:func:`make_problem` generates LRGeomCG-style data (Vandereycken 2013): ``A = L Rᵀ`` with Gaussian factors, a sampling
set Ω of ``round(OS·k(m+n−k))`` entries drawn uniformly without repetition, an independent test set Γ of the same size,
and the start point of LRGeomCG's ``make_start_x``: the rank-k truncated SVD of the zero-filled sparse ``P_Ω A``.
:func:`test_error` is the relative error on Γ. Neither forms the m×n matrix A (entries are computed from
the factors, in chunks).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import scipy.sparse.linalg as spla

__all__ = ["make_problem", "test_error"]


def _sample_without_replacement(rng: np.random.Generator, population: int, size: int) -> np.ndarray:
    """``size`` distinct linear indices drawn uniformly from ``range(population)``, sorted (int64).

    ``Generator.choice(population, size, replace=False)`` uses Floyd's algorithm with a hash set when
    ``size <= population // 50`` (and ``population > 10000``), i.e. it does not materialize ``range(population)``
    (m = n = 20000: population 4e8, size 2e6).  For denser samples it permutes the whole population, so there it
    is only used when the population is small; otherwise draw with replacement, deduplicate and top up, then keep
    a uniformly random subset of the right size (each subset of that size is equally likely by exchangeability).
    """
    if size > population:
        raise ValueError(f"cannot draw {size} distinct entries out of {population}")
    if population <= 10000 or size <= population // 50 or population <= 50_000_000:
        idx = rng.choice(population, size=size, replace=False)
    else:
        idx = np.unique(rng.integers(0, population, size=size, dtype=np.int64))
        while idx.size < size:
            extra = rng.integers(0, population, size=2 * (size - idx.size) + 16, dtype=np.int64)
            idx = np.union1d(idx, extra)
        if idx.size > size:
            idx = rng.choice(idx, size=size, replace=False)
    return np.sort(idx.astype(np.int64, copy=False))


def _entries(L: np.ndarray, R: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """``(L Rᵀ)[rows, cols]`` without forming ``L Rᵀ``."""
    out = np.empty(rows.shape[0], dtype=np.float64)
    for a in range(0, rows.shape[0], chunk):
        b = a + chunk
        out[a:b] = np.einsum("ij,ij->i", L[rows[a:b]], R[cols[a:b]])
    return out


def make_problem(
    m: int, n: int, k: int, oversampling: float, seed: int, *, rescale_start: bool = False, kappa: float | None = None
) -> dict:
    """LRGeomCG-style random completion problem, generated with ``numpy.random.default_rng(seed)``.

    In this order from the one generator: ``L`` (m×k) and ``R`` (n×k) i.i.d. N(0, 1), ``A = L Rᵀ`` (never formed;
    with ``kappa``, ``A = Q_L diag(σ) Q_Rᵀ`` instead, ``Q`` the orthonormal factors of the QRs of L and R and
    ``σ_i = √(mn) · kappa^{−(i−1)/(k−1)}`` geometric, so that the condition number of A is ``kappa``);
    Ω = ``round(oversampling·k(m+n−k))`` distinct linear indices (row-major, ``i·n + j``), uniform without
    repetition, sorted; Γ = an independent draw of the same size (also without repetition; Γ may intersect Ω, as in
    the LRGeomCG experiments); then the ARPACK start vector of the SVD below.

    Start point: LRGeomCG's ``make_start_x`` takes the rank-k truncated SVD (``lansvd``, or ``svds`` in later
    versions) of the zero-filled ``sparse(Ω_i, Ω_j, data)``, *without* rescaling by ``1/p`` (some derived copies of
    that code divide by ``p = |Ω|/(mn)``).  We do the same with ``scipy.sparse.linalg.svds`` (ARPACK, default
    tolerance) on a ``csr_matrix``; ``rescale_start=True`` divides ``s0`` by ``p`` instead (singular vectors are the
    same either way).  ``s0`` is sorted in decreasing order.

    Returns a dict of numpy arrays and scalars: ``m, n, k, oversampling, seed, p, L, R, rows, cols, vals,
    test_rows, test_cols, test_vals, U0 (m×k), s0 (k,), Vt0 (k×n)`` (index arrays int64, values float64, all
    C-contiguous), ``rescale_start``.
    """
    if not 0 < k < min(m, n):
        raise ValueError(f"need 0 < k < min(m, n), got k={k}, m={m}, n={n}")
    rng = np.random.default_rng(seed)
    L = rng.standard_normal((m, k))
    R = rng.standard_normal((n, k))
    if kappa is not None:
        sigma = math.sqrt(m * n) * float(kappa) ** -(np.arange(k) / max(k - 1, 1))
        L, R = np.linalg.qr(L)[0] * sigma, np.linalg.qr(R)[0]
    size = int(round(oversampling * k * (m + n - k)))
    omega = _sample_without_replacement(rng, m * n, size)
    gamma = _sample_without_replacement(rng, m * n, size)
    rows, cols = np.divmod(omega, n)
    test_rows, test_cols = np.divmod(gamma, n)
    vals = _entries(L, R, rows, cols)
    test_vals = _entries(L, R, test_rows, test_cols)

    p = size / (m * n)
    M = sp.csr_matrix((vals, (rows, cols)), shape=(m, n))
    v0 = rng.standard_normal(min(m, n))
    u, s, vt = spla.svds(M, k=k, v0=v0)  # ascending singular values
    order = np.argsort(s)[::-1]
    U0 = np.ascontiguousarray(u[:, order])
    s0 = np.ascontiguousarray(s[order])
    Vt0 = np.ascontiguousarray(vt[order, :])
    if rescale_start:
        s0 = s0 / p
    return {
        "m": m,
        "n": n,
        "k": k,
        "oversampling": oversampling,
        "seed": seed,
        "p": p,
        "L": L,
        "R": R,
        "rows": rows,
        "cols": cols,
        "vals": vals,
        "test_rows": test_rows,
        "test_cols": test_cols,
        "test_vals": test_vals,
        "U0": U0,
        "s0": s0,
        "Vt0": Vt0,
        "rescale_start": rescale_start,
        "kappa": kappa,
    }


def test_error(
    U: npt.ArrayLike,
    s: npt.ArrayLike,
    Vt: npt.ArrayLike,
    test_rows: np.ndarray,
    test_cols: np.ndarray,
    test_vals: np.ndarray,
    chunk: int = 1 << 20,
) -> float:
    """Relative test error ``‖P_Γ(U diag(s) Vt − A)‖ / ‖P_Γ A‖`` (numpy, chunked)."""
    U = np.asarray(U)
    Vt = np.asarray(Vt)
    Us = U * np.asarray(s)
    sq = 0.0
    for a in range(0, test_rows.shape[0], chunk):
        b = a + chunk
        pred = np.einsum("ij,ji->i", Us[test_rows[a:b]], Vt[:, test_cols[a:b]])
        d = pred - test_vals[a:b]
        sq += float(d @ d)
    return math.sqrt(sq) / float(np.linalg.norm(test_vals))
