"""Matrix and tensor-train completion: recovery of exactly low-rank targets, checked on held-out entries
and on the full dense tensor; sampling of index sets; input validation."""

import math

import pytest
import torch
from reference import rel, tt_full

from lowrankopt import FixedTTRank, LowRankMatrix, TensorTrain
from lowrankopt.completion import complete, completion_loss, sample_indices
from lowrankopt.completion.scaling import balance_modes

DT = torch.float64


def linear(idx, shape):
    """Row-major linear indices, computed here."""
    out = torch.zeros(idx.shape[0], dtype=torch.int64)
    for k, n in enumerate(shape):
        out = out * n + idx[:, k]
    return out


def complement(idx, shape):
    """Every multi-index of ``shape`` not in ``idx`` (a test set disjoint from Ω)."""
    mask = torch.ones(math.prod(shape), dtype=torch.bool)
    mask[linear(idx, shape)] = False
    return torch.stack(torch.unravel_index(torch.nonzero(mask).squeeze(1), shape), 1)


# ---------------------------------------------------------------------------------------------- sample_indices
@pytest.mark.parametrize(
    "shape,count", [((7, 5), 9), ((7, 5), 30), ((4, 3, 5), 1), ((2, 3, 2, 4), 40), ((50, 60, 70), 2000)]
)
def test_sample_indices_are_distinct_and_in_range(shape, count):
    idx = sample_indices(shape, count, generator=torch.Generator().manual_seed(0))
    assert idx.shape == (count, len(shape)) and idx.dtype == torch.int64
    assert bool((idx >= 0).all()) and bool((idx < torch.tensor(shape)).all())
    assert torch.unique(linear(idx, shape)).numel() == count


def test_sample_indices_full_count_is_a_permutation():
    shape = (3, 4, 2)
    idx = sample_indices(shape, 24, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.sort(linear(idx, shape)).values, torch.arange(24))
    assert sample_indices(shape, 0).shape == (0, 3)


def test_sample_indices_is_deterministic_given_the_generator():
    a = sample_indices((20, 30), 100, generator=torch.Generator().manual_seed(5))
    b = sample_indices((20, 30), 100, generator=torch.Generator().manual_seed(5))
    c = sample_indices((20, 30), 100, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("count", [3, 9])  # sparse (draw-and-deduplicate) and dense (count > total / 2) regimes
def test_sample_indices_are_uniform(count):
    """Each of the 12 entries is chosen with probability count / 12; 5σ binomial bounds over 3000 draws."""
    shape, reps = (3, 4), 3000
    g = torch.Generator().manual_seed(2)
    hits = torch.zeros(12)
    for _ in range(reps):
        hits += torch.bincount(linear(sample_indices(shape, count, generator=g), shape), minlength=12)
    p = count / 12
    assert float((hits - reps * p).abs().max()) < 5 * math.sqrt(reps * p * (1 - p))


@pytest.mark.parametrize("count", [-1, 13, 2.0, True, None])
def test_sample_indices_bad_count(count):
    with pytest.raises(ValueError, match="count"):
        sample_indices((3, 4), count)


# ---------------------------------------------------------------------------------------------- completion_loss
def test_completion_loss_matches_a_dense_formula():
    g = torch.Generator().manual_seed(0)
    tt = TensorTrain.random((3, 4, 5), 2, generator=g, dtype=torch.float64)
    idx = sample_indices((3, 4, 5), 20, generator=g)
    vals = torch.randn(20, dtype=DT, generator=g)
    dense = tt_full(tt.cores)
    ref = 0.5 * float(((dense[tuple(idx.T)] - vals) ** 2).sum())
    assert float(completion_loss(idx, vals)(tt)) == pytest.approx(ref, rel=1e-14)


# ---------------------------------------------------------------------------------------------- matrices
M_SHAPE, M_RANK = (60, 50), 3


def matrix_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    m, n = M_SHAPE
    A = torch.randn(m, M_RANK, dtype=DT, generator=g) @ torch.randn(M_RANK, n, dtype=DT, generator=g)
    idx = sample_indices(M_SHAPE, 5 * M_RANK * (m + n - M_RANK), generator=g)
    test = complement(idx, M_SHAPE)
    return A, idx, A[idx[:, 0], idx[:, 1]], (test, A[test[:, 0], test[:, 1]])


@pytest.mark.parametrize("method", ["cg", "trust-region"])
def test_matrix_completion_recovers_the_target(method):
    A, idx, vals, test = matrix_data()
    res = complete(idx, vals, M_SHAPE, M_RANK, method=method, test=test, generator=torch.Generator().manual_seed(1))
    assert res.success and res.train_error <= 1e-12
    assert res.test_error < 1e-8
    X = res.x.full()
    assert rel(X, A) < 1e-8
    # the recorded errors are the relative residuals of the returned point, recomputed densely here
    assert res.train_error == pytest.approx(rel(X[idx[:, 0], idx[:, 1]], vals), rel=1e-6, abs=1e-15)
    assert res.test_error == pytest.approx(rel(X[test[0][:, 0], test[0][:, 1]], test[1]), rel=1e-6, abs=1e-15)
    check_history(res, {M_RANK}, vals)


def check_history(res, ranks, vals, balanced_vals=None):
    """Every record has the completion keys; train_error is ‖P_Ω X − values‖ / ‖values‖ = √(2f) / ‖values‖ (the
    balanced values' in the records marked ``balanced``: then the result's train_error is the plain residual of
    res.x, recomputed here, and the final plain stage may evaluate f once at its start without a record)."""
    h = res.history
    for rec in h:
        assert {"train_error", "test_error", "solve_time", "rank", "iter", "fun", "balanced"} <= rec.keys()
        norm = torch.linalg.vector_norm(balanced_vals if rec["balanced"] else vals)
        expected = math.sqrt(2 * max(rec["fun"], 0.0)) / float(norm)
        assert rec["train_error"] == pytest.approx(expected, rel=1e-12, abs=1e-300)
    assert {rec["rank"] for rec in h} == ranks
    assert [rec["iter"] for rec in h] == list(range(len(h)))
    times = [rec["solve_time"] for rec in h]
    assert all(0 <= a <= b for a, b in zip(times, times[1:]))
    assert res.nit == h[-1]["iter"]
    if balanced_vals is None:
        assert res.train_error == h[-1]["train_error"]
    for key in ("nfev", "ngev", "nhev"):
        counts = [rec[key] for rec in h]
        assert all(a <= b for a, b in zip(counts, counts[1:]))
        assert res[key] == counts[-1] if balanced_vals is None else 0 <= res[key] - counts[-1] <= 1


# ---------------------------------------------------------------------------------------------- tensor trains
T_SHAPE, T_RANK = (5,) * 5, 2


def tt_data(seed=0):
    """A nonnegative TT (uniform cores as in lowrankopt.demo, built here) observed on 20·dim entries."""
    g = torch.Generator().manual_seed(seed)
    full = [1] + [T_RANK] * (len(T_SHAPE) - 1) + [1]
    cores = [torch.rand(full[k], n, full[k + 1], dtype=DT, generator=g) * (2 / full[k]) for k, n in enumerate(T_SHAPE)]
    A = tt_full(cores)
    count = 20 * FixedTTRank(T_SHAPE, T_RANK).dim
    idx = sample_indices(T_SHAPE, count, generator=g)
    test = complement(idx, T_SHAPE)
    return A, idx, A[tuple(idx.T)], (test, A[tuple(test.T)])


@pytest.mark.parametrize("method", ["cg", "trust-region"])
def test_tt_completion_recovers_the_target(method):
    A, idx, vals, test = tt_data()
    runs = [
        complete(idx, vals, T_SHAPE, T_RANK, method=method, test=test, generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    res = runs[0]
    assert res.success and res.train_error <= 1e-12 and res.test_error < 1e-8
    assert res.x.ranks == (T_RANK,) * (len(T_SHAPE) - 1)
    assert rel(tt_full(res.x.cores), A) < 1e-8
    # rank continuation: a rank-1 stage first; train_error and f are those of the balanced problem (values ∘ w)
    check_history(res, {1, T_RANK}, vals, vals * balance_modes(idx, vals, T_SHAPE).weights(idx))
    resid = rel(res.x.gather(idx), vals)  # the result's train_error: the plain residual of res.x
    assert res.train_error == pytest.approx(resid, rel=1e-9)
    g = torch.Generator().manual_seed(3)
    plain = complete(idx, vals, T_SHAPE, T_RANK, method=method, test=test, balance=False, generator=g)
    assert plain.train_error <= 1e-12 and rel(tt_full(plain.x.cores), A) < 1e-8
    check_history(plain, {1, T_RANK}, vals)  # without balancing: the plain residual
    # deterministic given the generator
    assert [h["fun"] for h in runs[1].history] == [h["fun"] for h in res.history]
    assert torch.equal(tt_full(runs[1].x.cores), tt_full(res.x.cores))


def test_tt_completion_without_test_set_and_from_a_given_start():
    A, idx, vals, _ = tt_data(seed=1)
    g = torch.Generator().manual_seed(4)
    x0 = TensorTrain.from_dense(A + 1e-3 * torch.randn(T_SHAPE, dtype=DT, generator=g), max_rank=T_RANK)
    res = complete(idx, vals, T_SHAPE, T_RANK, x0=x0)
    assert res.success and res.test_error is None
    assert {h["rank"] for h in res.history} == {T_RANK}
    assert rel(tt_full(res.x.cores), A) < 1e-8


def test_loose_tol_stops_early():
    A, idx, vals, test = matrix_data()
    res = complete(idx, vals, M_SHAPE, M_RANK, tol=1e-3, test=test)
    assert res.success and res.train_error <= 1e-3
    assert all(h["train_error"] > 1e-3 for h in res.history[:-1])


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_raises():
    A, idx, vals, _ = matrix_data()
    bad_idx = idx.clone()
    bad_idx[0, 1] = M_SHAPE[1]
    with pytest.raises(ValueError, match="outside"):
        complete(bad_idx, vals, M_SHAPE, M_RANK)
    with pytest.raises(ValueError, match="outside"):
        complete(-idx - 1, vals, M_SHAPE, M_RANK)
    with pytest.raises(ValueError, match="rows"):
        complete(idx, vals[:-1], M_SHAPE, M_RANK)
    with pytest.raises(ValueError, match="empty"):
        complete(idx[:0], vals[:0], M_SHAPE, M_RANK)
    nan_vals = vals.clone()
    nan_vals[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        complete(idx, nan_vals, M_SHAPE, M_RANK)
    with pytest.raises(TypeError, match="callback"):
        complete(idx, vals, M_SHAPE, M_RANK, callback=lambda r: False)
    with pytest.raises(TypeError, match="integer"):
        complete(idx.double(), vals, M_SHAPE, M_RANK)
    with pytest.raises(ValueError):
        complete(idx[:, :1], vals, M_SHAPE, M_RANK)
    with pytest.raises(ValueError, match="test"):
        complete(idx, vals, M_SHAPE, M_RANK, test=(idx, vals.float()))
    with pytest.raises(ValueError):
        complete(idx, vals, M_SHAPE, M_RANK, test=(idx[:5], vals[:4]))
    with pytest.raises(ValueError, match="modes"):
        complete(idx[:, :1], vals, M_SHAPE[:1], M_RANK)


def test_matrix_least_squares_closed_forms_match_dense_references():
    """f, the Riemannian gradient, the Gauss–Newton Hessian and ‖P_Ω ξ‖² of the CSR implementation against a
    dense computation, with unsorted and repeated indices."""
    from reference import matrix_projector

    from lowrankopt import FixedRankMatrices
    from lowrankopt.completion import _MatrixLeastSquares

    g = torch.Generator().manual_seed(0)
    m, n, r, N = 13, 9, 3, 70
    M = FixedRankMatrices(m, n, r)
    x = M.random_point(generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randint(0, m, (N,), generator=g), torch.randint(0, n, (N,), generator=g)], 1)
    vals = torch.randn(N, dtype=DT, generator=g)
    lsq = _MatrixLeastSquares(idx, vals, (m, n), M)
    X = x.full()
    mask_apply = lambda Z: torch.zeros(m, n, dtype=DT).index_put_((idx[:, 0], idx[:, 1]), Z, accumulate=True)  # noqa: E731
    P = matrix_projector(X, r)
    resid = X[idx[:, 0], idx[:, 1]] - vals
    assert float(lsq.value(x)) == pytest.approx(0.5 * float((resid**2).sum()), rel=1e-13)
    G = mask_apply(resid)  # dense Euclidean gradient
    assert rel(M.to_ambient(x, lsq.grad(x)).full().reshape(-1), P @ G.reshape(-1)) < 1e-12
    v = M.random_tangent(x, generator=g)
    Vd = M.to_ambient(x, v).full()
    Hv = P @ mask_apply(Vd[idx[:, 0], idx[:, 1]]).reshape(-1)  # P_x P_Ω P_x ξ, duplicates counted twice
    assert rel(M.to_ambient(x, lsq.hvp(x, v)).full().reshape(-1), Hv) < 1e-12
    assert float(lsq.curvature_along(x, v)) == pytest.approx(float((Vd[idx[:, 0], idx[:, 1]] ** 2).sum()), rel=1e-12)


def test_reusing_a_start_point_across_calls_gives_each_call_its_own_loss():
    """Regression: the residual cache once lived on the point, keyed by id(), and leaked between calls."""
    import gc

    g = torch.Generator().manual_seed(0)
    m, n, r = 30, 20, 2
    L, R = torch.randn(m, r, dtype=DT, generator=g), torch.randn(n, r, dtype=DT, generator=g)
    idx = sample_indices((m, n), 300, generator=g)
    base = (L[idx[:, 0]] * R[idx[:, 1]]).sum(1)
    from lowrankopt import FixedRankMatrices

    x0 = FixedRankMatrices(m, n, r).random_point(generator=g, dtype=torch.float64)
    X0 = x0.full()
    for scale in range(1, 8):
        vals = base * scale
        res = complete(idx, vals, (m, n), r, x0=x0, max_iter=0)
        expected = 0.5 * float(((X0[idx[:, 0], idx[:, 1]] - vals) ** 2).sum())
        assert res.history[0]["fun"] == pytest.approx(expected, rel=1e-12)
        gc.collect()


@pytest.mark.parametrize("method", ["cg", "trust-region"])
def test_float32_completion_keeps_the_dtype_and_reaches_its_tolerance(method):
    g = torch.Generator().manual_seed(0)
    m, n, r = 60, 50, 3
    L, R = torch.randn(m, r, generator=g), torch.randn(n, r, generator=g)
    idx = sample_indices((m, n), 1000, generator=g)
    test_idx = sample_indices((m, n), 500, generator=g)
    entries = lambda i: (L[i[:, 0]] * R[i[:, 1]]).sum(1)  # noqa: E731
    res = complete(idx, entries(idx), (m, n), r, method=method, test=(test_idx, entries(test_idx)), generator=g)
    assert res.x.dtype == torch.float32 and res.success
    assert res.train_error <= 1e-5 and res.test_error < 1e-4  # float32 default tol 1e-5


# ---------------------------------------------------------------------------------------------- zero data
@pytest.mark.parametrize("method", ["cg", "trust-region"])
@pytest.mark.parametrize("shape,rank", [((6, 5), 2), ((3, 4, 3), [2, 3])])
def test_all_zero_values_complete_to_the_zero_tensor(shape, rank, method):
    """Issue 18: was a ZeroDivisionError. The least-squares fit of zero data is the zero tensor; it has rank 0, so
    it is returned in the rank-r format with a zero S / first core, at once, whatever x0."""
    g = torch.Generator().manual_seed(0)
    idx = sample_indices(shape, 12, generator=g)
    test_idx = complement(idx, shape)
    test_vals = torch.randn(len(test_idx), dtype=DT, generator=g)
    zeros = torch.zeros(12, dtype=DT)
    x0 = FixedTTRank(shape, rank).random_point(generator=g, dtype=torch.float64) if len(shape) > 2 else None
    res = complete(idx, zeros, shape, rank, method=method, test=(test_idx, test_vals), x0=x0, generator=g)
    assert res.success and res.nit == 0 and "all observed values are zero" in res.message
    assert torch.equal(res.x.full(), torch.zeros(shape, dtype=DT))
    assert res.fun == 0.0 and res.grad_norm == 0.0 and res.train_error == 0.0
    assert res.test_error == 1.0  # ‖P_Γ(0 − A)‖ / ‖P_Γ A‖
    if len(shape) == 2:
        assert res.x.rank == rank and torch.allclose(res.x.U.T @ res.x.U, torch.eye(rank, dtype=DT))
    else:
        assert res.x.ranks == tuple(rank)
    res32 = complete(idx, zeros.float(), shape, rank, test=(test_idx, torch.zeros(len(test_idx))))
    assert res32.success and res32.x.dtype == torch.float32 and res32.test_error == 0.0  # 0 / 0: a perfect fit


def test_all_zero_values_still_check_the_rank_and_x0():
    idx = sample_indices((6, 5), 12, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="rank"):
        complete(idx, torch.zeros(12, dtype=DT), (6, 5), 6)
    with pytest.raises(ValueError, match="x0"):
        complete(idx, torch.zeros(12, dtype=DT), (6, 5), 2, x0=LowRankMatrix.random(6, 5, 3, dtype=DT))
    with pytest.raises(ValueError, match="underflow"):
        complete(idx, torch.full((12,), 1e-30), (6, 5), 2)  # nonzero, but their squares are 0 in float32


def test_zero_test_values_give_an_infinite_relative_test_error():
    """‖P_Γ(X − 0)‖ / ‖P_Γ 0‖ is +inf when X is nonzero on Γ (was a ZeroDivisionError)."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(6, 1, dtype=DT, generator=g) @ torch.randn(1, 5, dtype=DT, generator=g)
    idx = sample_indices((6, 5), 20, generator=g)
    test_idx = complement(idx, (6, 5))
    res = complete(idx, A[idx[:, 0], idx[:, 1]], (6, 5), 1, test=(test_idx, torch.zeros(10, dtype=DT)), max_iter=3)
    assert res.test_error == math.inf and all(h["test_error"] == math.inf for h in res.history)


def test_the_spectral_start_takes_repeated_observations_at_their_mean():
    """A position observed three times enters the start's sparse matrix once, at the mean of its observations
    (coalescing summed them, so the start fitted 3× the value): with all entries of an exact rank-2 matrix, and
    some repeated, the start is that matrix."""
    from lowrankopt.completion import _spectral_start

    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 2, dtype=torch.float64, generator=g) @ torch.randn(2, 6, dtype=torch.float64, generator=g)
    idx = torch.cartesian_prod(torch.arange(8), torch.arange(6))
    rep = torch.cat([idx, idx[:10], idx[:10]])
    x = _spectral_start(rep, A[rep[:, 0], rep[:, 1]], (8, 6), 2, torch.Generator().manual_seed(1))
    assert float(torch.linalg.vector_norm(x.full() - A) / torch.linalg.vector_norm(A)) < 1e-12
