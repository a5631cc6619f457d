"""Kronecker-sum covariance estimation: penalized permuted least squares (PRLS), truncation, flip-flop MLE.

Model (Tsiligkaridis & Hero 2013; Puchkin & Rakhuba 2024): ``X ∈ ℝ^{pq}`` (a ``p × q`` array, row-major) with
``Σ = Σ_{k ≤ K} A_k ⊗ B_k``. The rearrangement R (:func:`~lowrankopt.stats.rearrange`) maps Σ to the rank-K
matrix ``Σ_k vec(A_k) vec(B_k)ᵀ``, so Σ is estimated by a low-rank approximation of ``R(Ŝ)``:

- PRLS: ``Σ̃ = R⁻¹(argmin_M ‖M − R(Ŝ)‖_F² + λ‖M‖_*) = Σ_j (σ_j − λ/2)₊ mat(u_j) ⊗ mat(v_j)`` from the SVD of
  ``R(Ŝ)`` (soft thresholding). If ``λ ≥ 2‖R(Ŝ − Σ)‖_op`` the error obeys the oracle inequality
  ``‖Σ̃ − Σ‖_F² ≤ inf_M ‖M − R(Σ)‖_F² + c λ² rank M``; Puchkin & Rakhuba bound ``‖R(Ŝ − Σ)‖_op`` free of the dimension.
- Truncation: the best K-term Kronecker approximation of Ŝ (the top K SVD terms, no shrinkage).
- Flip-flop: the Gaussian MLE of a single product ``A ⊗ B`` (Dutilleul 1999) by alternating closed-form updates.

**Matrix-free.** With ``X_i`` the centered ``p × q`` samples, ``R(Ŝ) = (1/n) Σ_i X_i ⊗ X_i``, so
``R(Ŝ) vec(V) = (1/n) Σ_i vec(X_i V X_iᵀ)`` and ``R(Ŝ)ᵀ vec(U) = (1/n) Σ_i vec(X_iᵀ U X_i)``: products with a block of
b vectors cost ``O(n b (p²q + pq²))``, and the leading singular triplets come from block subspace iteration — Ŝ
(``pq × pq``) and ``R(Ŝ)`` (``p² × q²``) are never formed.
"""

from __future__ import annotations

import math
from typing import overload

import numpy as np
import torch

from .._checks import as_positive_int, check_random_options, check_scalar, check_tensor
from ._svd import top_singular_triplets
from .rearrange import rearrange

__all__ = ["KroneckerCovariance"]

METHODS = ("prls", "truncated", "flip-flop")
SOLVERS = ("auto", "dense", "matrix-free")
_DENSE_LIMIT = 4_000_000  # entries of R(Ŝ) up to which solver="auto" takes the dense SVD


def _as_samples(X, p: int, q: int) -> tuple[torch.Tensor, bool]:
    """``(n, p, q)`` float tensor from an ``(n, pq)`` or ``(n, p, q)`` array or tensor; also whether it was numpy."""
    was_numpy = isinstance(X, np.ndarray)
    if was_numpy:
        X = torch.from_numpy(np.ascontiguousarray(X))
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"X must be a numpy array or a torch tensor, got {type(X).__name__}")
    if X.dtype not in (torch.float32, torch.float64):
        if X.is_floating_point() or X.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            X = X.to(torch.float64)
        else:
            raise TypeError(f"X must be real, got {X.dtype}")
    if X.dim() == 2 and X.shape[1] == p * q:
        X = X.reshape(X.shape[0], p, q)
    elif not (X.dim() == 3 and X.shape[1:] == (p, q)):
        raise ValueError(f"X must have shape (n, {p * q}) or (n, {p}, {q}) for p = {p}, q = {q}, got {tuple(X.shape)}")
    if not bool(torch.isfinite(X).all()):
        raise ValueError("X contains NaN or Inf")
    return X, was_numpy


class _RearrangedCovariance:
    """``M = Σ_i w_i X_i ⊗ X_i`` (``p² × q²``), applied without forming it; ``w = 1/n`` gives ``R(Ŝ)``.

    Products run over chunks of samples, so that the ``(chunk, b, p, q)`` intermediate stays under
    ``_CHUNK_ELEMENTS`` entries: memory O(n pq + b (p² + q²) + _CHUNK_ELEMENTS) whatever n and b."""

    _CHUNK_ELEMENTS = 1 << 24

    def __init__(self, X: torch.Tensor, w: torch.Tensor | None = None):
        self.X, self.n, (self.p, self.q) = X, X.shape[0], X.shape[1:]
        self.w = torch.full((self.n,), 1 / self.n, dtype=X.dtype, device=X.device) if w is None else w
        self.Xw = X * self.w[:, None, None]

    def _chunks(self, b: int):
        size = max(1, self._CHUNK_ELEMENTS // max(1, b * self.p * self.q))
        for start in range(0, self.n, size):
            yield slice(start, start + size)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:  # (q², b) -> (p², b): Σ w_i X_i V X_iᵀ
        b = V.shape[1]
        Vs = V.T.reshape(b, self.q, self.q)
        out = torch.zeros(b, self.p, self.p, dtype=V.dtype, device=V.device)
        for c in self._chunks(b):
            T = torch.matmul(self.X[c, None], Vs)  # (chunk, b, p, q): X_i V_r
            out += torch.einsum("nris,njs->rij", T, self.Xw[c])
        return out.reshape(b, -1).T

    def rmatmat(self, U: torch.Tensor) -> torch.Tensor:  # (p², b) -> (q², b): Σ w_i X_iᵀ U X_i
        b = U.shape[1]
        Us = U.T.reshape(b, self.p, self.p)
        out = torch.zeros(b, self.q, self.q, dtype=U.dtype, device=U.device)
        for c in self._chunks(b):
            T = torch.matmul(self.X[c, None].mT, Us)  # (chunk, b, q, p): X_iᵀ U_r
            out += torch.einsum("nrpj,njs->rps", T, self.Xw[c])
        return out.reshape(b, -1).T

    def triplets(self, k, generator=None, tol=None, above=None, max_iter=1000, criterion="residual", oversample=10):
        shape = (self.p * self.p, self.q * self.q)
        tol = _tol(self.X.dtype) if tol is None else tol
        return top_singular_triplets(
            self.matmat, self.rmatmat, shape, k, dtype=self.X.dtype, device=self.X.device, tol=tol,
            max_iter=max_iter, above=above, criterion=criterion, oversample=oversample, generator=generator,
        )  # fmt: skip

    def dense(self) -> torch.Tensor:
        Xf = self.X.reshape(self.n, -1)
        return rearrange(self.Xw.reshape(self.n, -1).T @ Xf, self.p, self.q)


def _check_scale(X: torch.Tensor) -> None:
    """Refuse (centered) samples whose covariance, of the size of ``max |X|²``, is not representable in X's dtype with
    full precision: it would overflow, or fall among the subnormal numbers. Zero data pass (they are diagnosed where
    they matter)."""
    info, largest = torch.finfo(X.dtype), float(X.abs().max())
    size = largest * largest
    if largest > 0 and not info.tiny / info.eps <= size <= info.max / (4 * X.shape[1] * X.shape[2]):
        raise ValueError(
            f"X has entries up to {largest:.1e}: its sample covariance (entries up to {size:.1e}) is not representable "
            f"in {X.dtype} with full precision; rescale X (the covariance scales with the square of X)"
        )


def _tol(dtype: torch.dtype) -> float:
    """The subspace iteration's residual tolerance: 1e-12, or 100 ε where the precision cannot reach it."""
    return max(1e-12, 100 * torch.finfo(dtype).eps)


class KroneckerCovariance:
    """Covariance estimation under the model ``Σ = Σ_k A_k ⊗ B_k`` (``A_k: p × p``, ``B_k: q × q``), scikit-learn style.

    Args:
        p: rows of each sample, a ``p × q`` array (flattened row-major to ``pq`` features).
        q: columns of each sample.
        method: ``"prls"`` (penalized permuted least squares, soft-thresholded SVD of ``R(Ŝ)``), ``"truncated"``
            (best ``n_terms``-term approximation of Ŝ) or ``"flip-flop"`` (Gaussian MLE of one ``A ⊗ B``).
        penalty: PRLS's λ — a number ≥ 0, ``"plugin"`` (λ = 2 × a multiplier-bootstrap estimate of
            ``‖R(Ŝ − Σ)‖_op``: the median over ``bootstrap`` draws of ``‖(1/n) Σ (ε_i − ε̄) X_i ⊗ X_i‖_op`` with
            Rademacher ε, the oracle inequality's ``λ ≥ 2‖R(Ŝ − Σ)‖_op``), or ``"cv"`` (``cv_folds``-fold
            cross-validation of the Frobenius prediction error ``‖Σ̃_λ(train) − Ŝ(test)‖_F²`` over a grid of λ).
        n_terms: cap on the number of Kronecker terms (required by ``"truncated"``; PRLS: at most this many).
        assume_centered: if False, the sample mean is subtracted (``location_``); Ŝ always divides by n.
        solver: ``"dense"`` (form ``R(Ŝ)``, full SVD, O(p²q² min(p², q²))), ``"matrix-free"`` (leading triplets by
            block subspace iteration on ``X_i ⊗ X_i`` products, O(n b (p²q + pq²)) per iteration, memory
            O(n pq + b (p² + q²)) plus a bounded work buffer), or ``"auto"`` (dense while ``R(Ŝ)`` has at most
            4·10⁶ entries).
        tol: flip-flop's stopping rule, ``‖ΔA‖_F + ‖ΔB‖_F / ‖B‖_F ≤ tol`` with ``‖A‖_F = 1`` (floored at 100 ε of
            the data's precision).
        max_iter: flip-flop's iteration cap.
        cv_folds: folds of ``penalty="cv"``.
        bootstrap: draws of ``penalty="plugin"``.
        generator: for the bootstrap, the folds and the subspace iteration's start.

    Attributes after :meth:`fit`: ``factors_`` ``[(A_k, B_k)]`` (``Σ̃ = Σ A_k ⊗ B_k``, ``trace A_k ≥ 0``),
    ``n_terms_``, ``singular_values_`` (every leading singular value of ``R(Ŝ)`` that was computed: all of them on
    the dense path, the block's on the matrix-free one, the top ``n_terms`` for truncation; None for flip-flop),
    ``penalty_`` (λ used, PRLS), ``location_``, ``n_samples_``, ``n_iter_`` / ``converged_`` (flip-flop),
    ``covariance_`` (the dense ``pq × pq`` estimate, formed on access: O(p²q² K)).
    """

    def __init__(
        self,
        p: int,
        q: int,
        method: str = "prls",
        penalty: float | str = "plugin",
        n_terms: int | None = None,
        assume_centered: bool = False,
        *,
        solver: str = "auto",
        cv_folds: int = 5,
        bootstrap: int = 5,
        tol: float = 1e-10,
        max_iter: int = 1000,
        generator: torch.Generator | None = None,
    ) -> None:
        self.p, self.q = as_positive_int("p", p), as_positive_int("q", q)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if isinstance(penalty, str):
            if penalty not in ("plugin", "cv"):
                raise ValueError(f"penalty must be a number ≥ 0, 'plugin' or 'cv', got {penalty!r}")
        elif (
            isinstance(penalty, bool)
            or not isinstance(penalty, (int, float))
            or not penalty >= 0
            or math.isinf(penalty)
        ):
            raise ValueError(f"penalty must be a finite number ≥ 0, 'plugin' or 'cv', got {penalty!r}")
        if n_terms is not None:
            n_terms = as_positive_int("n_terms", n_terms)
        if method == "truncated" and n_terms is None:
            raise ValueError("method='truncated' needs n_terms")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if not isinstance(assume_centered, (bool, np.bool_)):
            raise TypeError(f"assume_centered must be a bool, got {assume_centered!r}")
        check_random_options(torch.float64, None, generator)  # (checks the generator)
        self.method, self.penalty, self.n_terms, self.assume_centered = method, penalty, n_terms, bool(assume_centered)
        self.solver, self.generator = solver, generator
        self.cv_folds, self.bootstrap = as_positive_int("cv_folds", cv_folds), as_positive_int("bootstrap", bootstrap)
        if self.cv_folds < 2:
            raise ValueError(f"cv_folds must be at least 2, got {cv_folds}")
        if not check_scalar("tol", tol) > 0:
            raise ValueError(f"tol must be positive, got {tol}")
        self.tol, self.max_iter = tol, as_positive_int("max_iter", max_iter)

    # ------------------------------------------------------------------------------------------------ fitting

    def fit(self, X: torch.Tensor | np.ndarray) -> KroneckerCovariance:
        """Estimate Σ from the samples ``X``: ``(n, pq)`` or ``(n, p, q)``, numpy or torch (n ≥ 2). Samples whose
        covariance would overflow or be subnormal in their dtype are refused (``ValueError``: rescale them)."""
        X, _ = _as_samples(X, self.p, self.q)
        n = X.shape[0]
        if n < 2:
            raise ValueError(f"X needs at least 2 samples, got {n}")
        self.location_ = torch.zeros(self.p, self.q, dtype=X.dtype, device=X.device)
        if not self.assume_centered:
            self.location_ = X.mean(0)
            X = X - self.location_
        _check_scale(X)
        self.n_samples_ = n
        if self.method == "flip-flop":
            self._fit_flip_flop(X)
        else:
            self._fit_low_rank(X)
        return self

    def _dense(self) -> bool:
        return self.solver == "dense" or (self.solver == "auto" and self.p**2 * self.q**2 <= _DENSE_LIMIT)

    def _triplets(self, op: _RearrangedCovariance, k: int | None, above: float | None = None):
        """The leading ``k`` (all if None and dense) singular triplets of ``op``: ``U (p², k), s, V (q², k)``;
        matrix-free, converged to 1e-12 (relative residual) for those with ``s > above``."""
        if self._dense():
            U, s, Vh = torch.linalg.svd(op.dense(), full_matrices=False)
            k = s.numel() if k is None else min(k, s.numel())
            return U[:, :k], s[:k], Vh[:k].T
        U, s, V, info = op.triplets(k, self.generator, above=above)
        if not info["converged"]:
            raise RuntimeError(f"the subspace iteration did not converge (residual {info['residual']:.1e})")
        return U, s, V

    def _fit_low_rank(self, X: torch.Tensor) -> None:
        op = _RearrangedCovariance(X)
        cap = min(self.p**2, self.q**2) if self.n_terms is None else min(self.n_terms, self.p**2, self.q**2)
        if self.method == "truncated":
            U, s, V = self._triplets(op, cap)
            weights, self.penalty_ = s, None
        else:
            lam = self._penalty(X, op, cap)
            k = None if self._dense() else min(4, cap)
            while True:  # matrix-free: grow the block until a computed value falls below λ/2 (or the cap)
                U, s, V = self._triplets(op, k if k is None else min(k, cap), above=lam / 2)
                if k is None or s[-1] <= lam / 2 or s.numel() >= cap:
                    break
                k *= 2
            self.singular_values_ = s
            keep = min(int((s > lam / 2).sum()), cap)
            U, V = U[:, :keep], V[:, :keep]
            weights, self.penalty_ = s[:keep] - lam / 2, float(lam)
        if self.method == "truncated":
            self.singular_values_ = s
        self._set_factors(U, weights, V)

    def _set_factors(self, U: torch.Tensor, weights: torch.Tensor, V: torch.Tensor) -> None:
        factors = []
        for j in range(weights.numel()):
            A = U[:, j].reshape(self.p, self.p) * weights[j].sqrt()
            B = V[:, j].reshape(self.q, self.q) * weights[j].sqrt()
            if torch.trace(A) < 0:  # (−A) ⊗ (−B) = A ⊗ B: orient A to a nonnegative trace
                A, B = -A, -B
            factors.append((A, B))
        self.factors_ = factors
        self.n_terms_ = len(factors)

    # ------------------------------------------------------------------------------------------------ penalty

    def _penalty(self, X: torch.Tensor, op: _RearrangedCovariance, cap: int) -> float:
        if not isinstance(self.penalty, str):
            return float(self.penalty)
        if self.penalty == "plugin":
            return 2 * self.noise_norm(X)
        return self._cv_penalty(X, cap)

    def noise_norm(self, X: torch.Tensor | np.ndarray) -> float:
        """A multiplier-bootstrap estimate of ``‖R(Ŝ − Σ)‖_op`` for centered samples ``X``: the median over
        ``bootstrap`` Rademacher draws ε of ``‖Σ_i (ε_i − ε̄)/n · X_i ⊗ X_i‖_op``, each the leading singular value by
        subspace iteration until it changes by less than 1e-3 (relative) between checks. Cost: ``bootstrap``
        such solves, O(n (p²q + pq²)) per product."""
        X, _ = _as_samples(X, self.p, self.q)
        n = X.shape[0]
        values = []
        for _ in range(self.bootstrap):
            eps = torch.randint(0, 2, (n,), generator=self.generator).to(X) * 2 - 1
            op = _RearrangedCovariance(X, (eps - eps.mean()) / n)
            values.append(
                float(op.triplets(1, self.generator, tol=1e-3, max_iter=200, criterion="value", oversample=4)[1][0])
            )
        return float(np.median(values))

    def _cv_penalty(self, X: torch.Tensor, cap: int) -> float:
        """λ minimizing the K-fold error ``Σ_folds ‖Σ̃_λ(train) − Ŝ(test)‖_F²`` over a grid of 30 values (geometric,
        from 10⁻³ to 1 times 2σ₁), computed in the rearranged space: ``‖M_λ‖² − 2⟨M_λ, R(Ŝ_test)⟩ + const`` with
        ``⟨u vᵀ, R(Ŝ_test)⟩ = uᵀ R(Ŝ_test) v``. Matrix-free, each fold computes its 10 leading terms, and grid values
        below twice the smallest of them are not candidates (their error is recorded as inf)."""
        n = X.shape[0]
        if n < self.cv_folds:
            raise ValueError(f"penalty='cv' needs at least cv_folds = {self.cv_folds} samples, got {n}")
        perm = torch.randperm(n, generator=self.generator).to(X.device)
        folds = torch.tensor_split(perm, self.cv_folds)
        fold_fits, floor = [], 0.0
        for test in folds:
            mask = torch.ones(n, dtype=torch.bool, device=X.device)
            mask[test] = False
            train_op, test_op = _RearrangedCovariance(X[mask]), _RearrangedCovariance(X[test])
            U, s, V = self._triplets(train_op, None if self._dense() else min(cap, 10))
            if not self._dense() and s.numel() < min(self.p**2, self.q**2):
                floor = max(floor, 2 * float(s[-1]))  # below this λ a fold would need more than its computed terms
            inner = (U * test_op.matmat(V)).sum(0)  # u_jᵀ R(Ŝ_test) v_j
            fold_fits.append((s, inner))
        top = max(float(s[0]) for s, _ in fold_fits)
        grid = 2 * top * torch.logspace(-3, 0, 30, dtype=torch.float64)
        errors = []
        for lam in grid.tolist():
            if lam < floor:  # matrix-free: not every kept term was computed; not a candidate
                errors.append(math.inf)
                continue
            err = 0.0
            for s, inner in fold_fits:
                w = (s[:cap] - lam / 2).clamp_min(0)
                err += float((w * w).sum() - 2 * (w * inner[:cap]).sum())
            errors.append(err)
        self.cv_grid_, self.cv_errors_ = grid, torch.tensor(errors, dtype=torch.float64)
        return float(grid[int(torch.argmin(self.cv_errors_))])

    # ---------------------------------------------------------------------------------------------- flip-flop

    def _fit_flip_flop(self, X: torch.Tensor) -> None:
        n, p, q = X.shape
        # the MLE is equivariant (c X gives A ⊗ c² B): iterate on X / s, s a power of two near max |X| (exact), so
        # that no intermediate over- or underflows whatever the data's scale
        s = 2.0 ** math.frexp(float(X.abs().max()))[1] if bool(X.any()) else 1.0
        X = X / s
        A = torch.eye(p, dtype=X.dtype, device=X.device)
        B = torch.eye(q, dtype=X.dtype, device=X.device)
        self.converged_, self.n_iter_ = False, 0
        for it in range(1, self.max_iter + 1):
            A_old, B_old = A, B
            try:
                Bi = torch.linalg.inv(torch.linalg.cholesky(B))  # B⁻¹ = Biᵀ Bi
                Y = X @ Bi.T
                A = torch.einsum("niq,njq->ij", Y, Y) / (n * q)
                Ai = torch.linalg.inv(torch.linalg.cholesky(A))
                Z = Ai @ X
                B = torch.einsum("npi,npj->ij", Z, Z) / (n * p)
            except torch.linalg.LinAlgError:
                raise self._singular_flip_flop(X) from None
            scale = torch.linalg.matrix_norm(A)  # fix the scale: ‖A‖_F = 1 (A ⊗ B is unchanged)
            A, B = A / scale, B * scale
            self.n_iter_ = it
            dA, dB = torch.linalg.matrix_norm(A - A_old), torch.linalg.matrix_norm(B - B_old)
            if float(dA + dB / torch.linalg.matrix_norm(B)) <= max(self.tol, 100 * torch.finfo(X.dtype).eps):
                self.converged_ = True
                break
        self.factors_, self.n_terms_, self.penalty_, self.singular_values_ = [(A, B * s * s)], 1, None, None

    def _singular_flip_flop(self, X: torch.Tensor) -> ValueError:
        """Why the flip-flop iterate became singular for the (centered) samples ``X: (n, p, q)``, most specific
        cause first: constant data, a constant row or column of the samples, too few samples, else a singular
        sample covariance in general. Cost ``O(n p q)`` (only on failure)."""
        n, p, q = X.shape
        constant = "zero in every sample" if self.assume_centered else "constant (the same in every sample)"
        tiny = float(X.abs().max()) * 100 * torch.finfo(X.dtype).eps  # what centering leaves of a constant
        if tiny == 0:
            return ValueError(
                f"X is {'zero' if self.assume_centered else 'constant: every sample equals the mean'}, so the "
                "sample covariance is zero and the flip-flop MLE does not exist"
            )
        for dims, name in (((0, 2), "row"), ((0, 1), "column")):
            flat = torch.nonzero(X.abs().amax(dim=dims) <= tiny).flatten()
            if flat.numel():
                return ValueError(
                    f"{name} {int(flat[0])} of the {p} × {q} samples of X is {constant}: the sample covariance is "
                    f"singular, so the flip-flop MLE does not exist; drop that {name} or use method='prls'"
                )
        if n < max(p / q, q / p) + 1:
            return ValueError(
                f"the flip-flop iterate became singular: with n = {n} samples of {p} × {q}, the MLE may not exist "
                f"(it needs roughly n ≥ max(p/q, q/p) + 1)"
            )
        return ValueError(
            f"the flip-flop iterate became singular: the sample covariance of X (n = {n} samples of {p} × {q}) is "
            "singular in a Kronecker direction (a row or a column of the samples is a combination of the others), "
            "so the flip-flop MLE does not exist; use method='prls' or 'truncated'"
        )

    # --------------------------------------------------------------------------------------------- the model

    @property
    def covariance_(self) -> torch.Tensor:
        """The dense estimate ``Σ̃ = Σ_k A_k ⊗ B_k`` (``pq × pq``); formed on each access, O(K p²q²)."""
        self._check_fitted()
        d = self.p * self.q
        S = torch.zeros(d, d, dtype=self.location_.dtype, device=self.location_.device)
        for A, B in self.factors_:
            S += torch.kron(A, B)
        return S

    def _check_fitted(self) -> None:
        if not hasattr(self, "factors_"):
            raise RuntimeError("call fit(X) first")

    def _whiten(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L⁻¹ (x − μ), log det Σ̃)`` with ``Σ̃ = L Lᵀ``; Kronecker identities when there is one term."""
        Xc = X - self.location_
        if len(self.factors_) == 1:  # (A ⊗ B)^{-1/2} vec(X) = vec(La⁻¹ X Lb⁻ᵀ), log det = q log det A + p log det B
            A, B = self.factors_[0]
            La, Lb = self._cholesky(A, "A"), self._cholesky(B, "B")
            Z = torch.linalg.solve_triangular(La, Xc, upper=False)
            Z = torch.linalg.solve_triangular(Lb, Z.mT, upper=False).mT
            logdet = 2 * (self.q * La.diagonal().log().sum() + self.p * Lb.diagonal().log().sum())
            return Z.reshape(X.shape[0], self.p * self.q), logdet
        L = self._cholesky(self.covariance_, "the covariance estimate")
        Z = torch.linalg.solve_triangular(L, Xc.reshape(X.shape[0], self.p * self.q).T, upper=False).T
        return Z, 2 * L.diagonal().log().sum()

    @staticmethod
    def _cholesky(S: torch.Tensor, what: str) -> torch.Tensor:
        L, info = torch.linalg.cholesky_ex(S)
        if int(info) != 0:
            raise ValueError(f"{what} is not positive definite: no Gaussian likelihood (try a smaller penalty)")
        return L

    @overload
    def mahalanobis(self, X: np.ndarray) -> np.ndarray: ...

    @overload
    def mahalanobis(self, X: torch.Tensor) -> torch.Tensor: ...

    def mahalanobis(self, X: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Squared Mahalanobis distances ``(x_i − μ)ᵀ Σ̃⁻¹ (x_i − μ)``, shape ``(n,)`` (numpy in, numpy out).
        Cost O(n pq (p + q)) for one term, O((pq)³ + n (pq)²) otherwise."""
        self._check_fitted()
        X, was_numpy = _as_samples(X, self.p, self.q)
        Z, _ = self._whiten(X.to(self.location_))
        out = Z.square().sum(1)
        return out.cpu().numpy() if was_numpy else out

    def score(self, X: torch.Tensor | np.ndarray) -> float:
        """Mean Gaussian log-likelihood of ``X`` under ``N(location_, Σ̃)`` (scikit-learn's ``score``)."""
        self._check_fitted()
        X, _ = _as_samples(X, self.p, self.q)
        if X.shape[0] == 0:
            raise ValueError("X has no samples: the mean log-likelihood of none is undefined")
        Z, logdet = self._whiten(X.to(self.location_))
        d = self.p * self.q
        return float(-0.5 * (d * math.log(2 * math.pi) + logdet + Z.square().sum(1).mean()))

    def error_norm(self, Sigma: torch.Tensor) -> float:
        """``‖Σ̃ − Σ‖_F`` for a dense Σ, without forming Σ̃: ``‖Σ‖² − 2 Σ_k ⟨Σ, A_k ⊗ B_k⟩ + ‖Σ_k A_k ⊗ B_k‖²``
        in the rearranged space. A difference of squares: accurate to about ``√ε ‖Σ‖`` in absolute terms (ε the
        unit roundoff), plenty for estimation errors. Cost O(p²q² K)."""
        self._check_fitted()
        d = self.p * self.q
        if check_tensor("Sigma", Sigma, 2).shape != (d, d):
            raise ValueError(f"Sigma must have shape ({d}, {d}), got {tuple(Sigma.shape)}")
        R = rearrange(Sigma.to(self.location_), self.p, self.q)
        if not self.factors_:
            return float(R.norm())
        U = torch.stack([A.reshape(-1) for A, _ in self.factors_], 1)
        V = torch.stack([B.reshape(-1) for _, B in self.factors_], 1)
        sq = R.square().sum() - 2 * (U * (R @ V)).sum() + ((U.T @ U) * (V.T @ V)).sum()
        return float(sq.clamp_min(0).sqrt())
