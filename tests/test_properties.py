"""Property-based tests (hypothesis) of the public API outside the formats and manifolds: ``minimize`` and its
``OptimizeResult``, completion (``complete``, ``sample_indices``, ``completion_loss``), cross approximation
(``maxvol``, ``rect_maxvol``, ``tt_cross``), ``KroneckerCovariance`` and the ``lowrankopt.nn`` layers and converters.

The property, for every call: either a correct result — checked against an independent reference computed in the
test (a dense computation or a closed form) — or a ``ValueError`` / ``TypeError`` whose message names the offending
argument. Never another exception type from deep inside torch or numpy, never a wrong result, never a hang, never a
changed input. Each property draws arguments that are valid or not; the test decides which are invalid from the
documented domains (independently of the code) and asserts the outcome accordingly.

Every ``@given`` runs with ``derandomize=True`` and ``database=None``: the same examples on every run (CI is
deterministic) and nothing written to the tree. The first tests of each section are plain regression tests, one per
defect these properties found (each failed before its fix).
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import event, example, given
from hypothesis import strategies as st
from lro_testing import check_outcome, examples
from reference import matrix_projector, tt_full

from lowrankopt import FixedRankMatrices, TensorTrain, complete, completion_loss, demo, minimize, sample_indices
from lowrankopt import nn as lnn
from lowrankopt.cross import maxvol, rect_maxvol, tt_cross
from lowrankopt.distributed import shard
from lowrankopt.stats import KroneckerCovariance

DT = torch.float64
# Status codes as documented in OptimizeResult (written out here, not imported from the code under test).
SUCCESS_STATUSES = {0, 3, 4, 6}
DOCUMENTED_STATUSES = {-1, 0, 1, 2, 3, 4, 5, 6}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def mostly(valid, bad, one_in=6):
    """Draws of ``valid``, and of ``bad`` about once in ``one_in``."""
    return st.sampled_from([False] * (one_in - 1) + [True]).flatmap(lambda is_bad: bad if is_bad else valid)


# ============================================================================================== minimize
# ½‖X − A‖² over 6 × 5 matrices of rank 2: the optimum is the truncated SVD of A (Eckart–Young), the Riemannian
# gradient the dense projection P_X (X − A).
SHAPE, RANK = (6, 5), 2


def matrix_problem(seed):
    g = gen(seed)
    A = torch.randn(*SHAPE, dtype=DT, generator=g)
    x0 = FixedRankMatrices(*SHAPE, RANK).random_point(generator=g, dtype=torch.float64)
    fstar = 0.5 * float((torch.linalg.svdvals(A)[RANK:] ** 2).sum())
    return (lambda X: 0.5 * ((X.full() - A) ** 2).sum()), x0, A, fstar


def factors(x):
    return [t.clone() for t in (x.U, x.S, x.V)]


def test_minimize_refuses_an_infinite_trust_region_radius_by_name():
    """Was: max_radius=inf (or initial_radius=inf) gave "alpha must be finite, got inf" from the retraction."""
    f, x0, *_ = matrix_problem(0)
    for name in ("max_radius", "initial_radius"):
        with pytest.raises(ValueError, match=name):
            minimize(f, x0, "trust-region", **{name: math.inf})


def test_minimize_refuses_an_infinite_rho_regularization():
    """Was: rho_regularization=inf made ρ = inf/inf = NaN at every step, and every run a stall (status 5)."""
    f, x0, *_ = matrix_problem(0)
    with pytest.raises(ValueError, match="rho_regularization"):
        minimize(f, x0, "trust-region", rho_regularization=math.inf)


def test_trust_region_takes_a_huge_theta():
    """Was: theta=1000 raised OverflowError from ``(‖r₀‖ / scale) ** theta`` in tCG (as soon as tCG iterates inside
    the region with ‖r₀‖ > scale). A huge θ only switches the superlinear test off (κ decides): the run converges to
    the Eckart–Young optimum."""
    f, x0, A, fstar = matrix_problem(0)
    res = minimize(f, x0, "trust-region", theta=1000.0, initial_radius=100.0, max_radius=200.0, gtol=1e-9)
    assert res.success and abs(res.fun - fstar) <= 1e-10 * fstar


def test_minimize_accepts_numpy_numbers_as_options():
    """Was: ``max_iter=np.int64(3)`` was refused ("must be an int") while numpy integers are accepted as sizes and
    ranks everywhere else."""
    f, x0, *_ = matrix_problem(0)
    res = minimize(f, x0, "cg", max_iter=np.int64(3), gtol=np.float32(1e-12))
    assert res.status == 1 and res.nit == 3


# Documented domains of the options (the docstring of minimize): (kind, low, high, low open, high open, None ok).
OPTION_DOMAINS = {
    "common": {
        "max_iter": ("int", 0, math.inf, False, True, False),
        "gtol": ("real", 0, math.inf, False, False, False),
        "ftol": ("real", 0, math.inf, False, False, False),
        "max_time": ("real", 0, math.inf, True, False, False),
        "verbose": ("int", 0, math.inf, False, True, False),
    },
    "sd": {
        "c1": ("real", 0, 0.5, True, False, False),
        "contraction": ("real", 0, 0.999, True, False, False),
        "max_backtracks": ("int", 0, math.inf, False, True, False),
    },
    "trust-region": {
        "max_radius": ("real", 0, math.inf, True, True, True),
        "initial_radius": ("real", 0, math.inf, True, True, True),
        "rho_prime": ("real", 0, 0.25, False, False, False),
        "kappa": ("real", 0, 1, True, False, False),
        "theta": ("real", 0, math.inf, True, False, False),
        "min_inner": ("int", 0, math.inf, False, True, False),
        "max_inner": ("int", 1, math.inf, False, True, True),
        "rho_regularization": ("real", 0, math.inf, False, True, False),
        "gradient_scale": ("real", 0, math.inf, True, False, True),
    },
}
OPTION_DOMAINS["cg"] = {**OPTION_DOMAINS["sd"], "restart_threshold": ("real", 0, math.inf, True, True, True)}
# candidate numbers (each option is drawn among those inside its domain) and values outside every domain
NUMBERS = [0, 1, 2, 7, 1e-300, 1e-3, 0.1, 0.25, 0.5, 0.9, 1.0, 1.5, 1000.0, 1e300, np.int64(3), np.float32(0.2)]
BAD_VALUES = [-1, math.nan, math.inf, -math.inf, True, False, None, "a", [1], torch.tensor(0.5), np.bool_(True)]


EXTRA_OPTIONS = [{}, {"beta": "hz"}, {"beta": "fr"}, {"initial_step": "secant"}, {"gradient_scale": "initial"}]
BAD_EXTRA_OPTIONS = [{"beta": "bogus"}, {"initial_step": 3}, {"callback": 3}]


def option_value(domain):
    """Values of one option: inside its domain, and about once in eight anything (often outside it)."""
    inside = [v for v in NUMBERS if option_ok(domain, v)]
    return mostly(st.sampled_from(inside), st.sampled_from(NUMBERS + BAD_VALUES), 8)


def option_ok(domain, v) -> bool:
    kind, lo, hi, open_lo, open_hi, none_ok = domain
    if v is None:
        return none_ok
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        return False
    if kind == "int" and not isinstance(v, (int, np.integer)):
        return False
    return (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi)


@examples(200)
@given(
    method=st.sampled_from(["sd", "cg", "trust-region"]),
    data=st.data(),
    extra=mostly(st.sampled_from(EXTRA_OPTIONS), st.sampled_from(BAD_EXTRA_OPTIONS), 10),
    seed=st.integers(0, 3),
)
def test_minimize_options(method, data, extra, seed):
    """Any option values: a run whose result is consistent (see ``check_result``), or a named error."""
    f, x0, A, fstar = matrix_problem(seed)
    domains = {**OPTION_DOMAINS["common"], **OPTION_DOMAINS[method]}
    names = data.draw(st.lists(st.sampled_from(sorted(domains)), min_size=1, max_size=3, unique=True))
    options = {name: data.draw(option_value(domains[name]), label=name) for name in names}
    options.update(extra)
    problems = [name for name, v in options.items() if not extra_option_ok(method, name, v, domains)]
    if "max_iter" not in options:
        options["max_iter"] = 15
    elif "max_iter" not in problems:
        options["max_iter"] = min(int(options["max_iter"]), 15)  # huge ones are valid too, but slow
    before = factors(x0)
    res = check_outcome(lambda: minimize(f, x0, method, **options), problems)
    assert all(torch.equal(a, b) for a, b in zip(before, factors(x0))), "minimize changed x0"
    if res is not None:
        check_result(res, A, fstar, options)


def extra_option_ok(method, name, v, domains) -> bool:
    if name == "gradient_scale" and v == "initial":
        return method == "trust-region"
    if name in domains:
        return option_ok(domains[name], v)
    if name == "beta":
        return method == "cg" and v in ("fr", "pr+", "hs", "hz")
    if name == "initial_step":
        return method != "trust-region" and v in ("auto", "model", "secant")
    if name == "callback":
        return v is None or callable(v)
    return False  # an option of another method


def check_result(res, A, fstar, options):
    """The OptimizeResult's documented invariants, and its x, fun and grad_norm against dense references."""
    assert res.status in DOCUMENTED_STATUSES
    assert res.success == (res.status in SUCCESS_STATUSES)
    assert isinstance(res.message, str) and res.message
    assert len(res.history) == res.nit + 1 and [h["iter"] for h in res.history] == list(range(res.nit + 1))
    assert res.fun == res.history[-1]["fun"] and res.grad_norm == res.history[-1]["grad_norm"]
    assert res.nfev >= res.nit + 1 and res.ngev >= 1
    X = res.x.full()
    assert torch.isfinite(X).all() and math.isfinite(res.fun)
    assert res.fun == pytest.approx(0.5 * float(((X - A) ** 2).sum()), rel=1e-12)
    dense_grad = matrix_projector(X, RANK) @ (X - A).reshape(-1)
    assert res.grad_norm == pytest.approx(float(torch.linalg.vector_norm(dense_grad)), rel=1e-9, abs=1e-12)
    assert res.fun >= fstar * (1 - 1e-12)  # Eckart–Young: no rank-2 matrix does better
    if res.status == 0:
        assert res.grad_norm <= options.get("gtol", 1e-6)
    if res.status == 1:
        assert res.nit == options["max_iter"]


@examples(30)
@given(
    method=st.sampled_from(["sd", "cg", "trust-region"]),
    stop_at=st.integers(0, 6),
    how=st.sampled_from(["true", "stop-iteration", "never", "tensor"]),
    seed=st.integers(0, 5),
)
def test_minimize_callback_and_result_fields(method, stop_at, how, seed):
    """A callback that stops at iteration k (by returning True, a true 0-dim tensor, or raising StopIteration) gives
    status 4 and nit == k; every intermediate result it sees is consistent with the final history."""
    f, x0, A, fstar = matrix_problem(seed)
    seen = []

    def callback(r):
        seen.append((r.nit, r.fun, len(r.history)))
        if r.nit < stop_at or how == "never":
            return False
        if how == "stop-iteration":
            raise StopIteration
        return torch.tensor(True) if how == "tensor" else True

    res = minimize(f, x0, method, callback=callback, gtol=1e-10, max_iter=40)
    check_result(res, A, fstar, {"gtol": 1e-10, "max_iter": 40})
    assert [(h["iter"], h["fun"]) for h in res.history[: len(seen)]] == [(n, v) for n, v, _ in seen]
    assert all(length == n + 1 for n, _, length in seen)
    if res.status == 4:
        assert how != "never" and (res.success, res.nit) == (True, stop_at)
    else:  # converged (or out of iterations) before the callback asked to stop
        assert res.status in (0, 1, 6) and (how == "never" or res.nit <= stop_at)
        if res.success:
            assert res.fun == pytest.approx(fstar, rel=1e-9)


@examples(20)
@given(
    method=st.sampled_from(["sd", "cg", "trust-region"]),
    level=st.floats(0.0, 1.0),
    value=st.sampled_from([math.nan, math.inf, -math.inf]),
    seed=st.integers(0, 5),
)
def test_minimize_stops_at_the_last_finite_point(method, level, value, seed):
    """f becomes NaN/±Inf once it would fall below a level between f* and f(x0): the run stops with status −1, not a
    success, at a point where f is finite (and equal to f there, recomputed) and recorded as the last history entry."""
    f, x0, A, fstar = matrix_problem(seed)
    threshold = fstar + level * (float(f(x0)) - fstar)

    def g(X):
        v = f(X)
        return v if float(v) >= threshold else v * 0 + value

    res = minimize(g, x0, method, max_iter=200, gtol=1e-10)
    if float(f(x0)) < threshold:  # (level = 1 can put x0 itself below the level by rounding)
        return
    assert res.status in DOCUMENTED_STATUSES and res.success == (res.status in SUCCESS_STATUSES)
    event(f"status {res.status}")
    if res.status == -1:
        assert not res.success
    X = res.x.full()
    assert math.isfinite(res.fun) and res.fun == pytest.approx(0.5 * float(((X - A) ** 2).sum()), rel=1e-12)
    assert res.fun >= threshold and res.history[-1]["fun"] == res.fun


# ============================================================================================== completion
def low_rank(m, n, r, seed, dtype=DT):
    g = gen(seed)
    return (torch.randn(m, r, dtype=DT, generator=g) @ torch.randn(r, n, dtype=DT, generator=g)).to(dtype)


def entries(A, idx):
    return A[tuple(idx.T)]


def test_complete_names_a_test_argument_that_is_not_a_pair():
    """Was: ``test=idx`` (or a triple) gave "too many values to unpack (expected 2)"."""
    A = low_rank(6, 5, 2, 0)
    idx = sample_indices((6, 5), 20, generator=gen(1))
    for test in (idx, (idx, entries(A, idx), entries(A, idx)), "held-out"):
        with pytest.raises((TypeError, ValueError), match="test"):
            complete(idx, entries(A, idx), (6, 5), 2, test=test)


def test_complete_and_sample_indices_refuse_a_generator_that_is_not_one():
    """Was: ``generator=3`` gave AttributeError "'int' object has no attribute 'device'" (and ``device="foo"``
    torch's RuntimeError in sample_indices)."""
    A = low_rank(6, 5, 2, 0)
    idx = sample_indices((6, 5), 20, generator=gen(1))
    with pytest.raises(TypeError, match="generator"):
        complete(idx, entries(A, idx), (6, 5), 2, generator=3)
    with pytest.raises(TypeError, match="generator"):
        sample_indices((6, 5), 3, generator=3)
    with pytest.raises(ValueError, match="device"):
        sample_indices((6, 5), 3, device="foo")


def test_completion_loss_names_indices_that_do_not_fit_the_point():
    """Was: (N, 3) indices with a matrix gave "gather() missing 1 required positional argument: 'cols'", and a
    dense tensor point torch's gather error."""
    X = FixedRankMatrices(6, 5, 2).random_point(generator=gen(0), dtype=torch.float64)
    idx3 = torch.zeros(4, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="indices"):
        completion_loss(idx3, torch.zeros(4, dtype=DT))(X)
    with pytest.raises(TypeError, match="LowRankMatrix"):
        completion_loss(idx3[:, :2], torch.zeros(4, dtype=DT))(X.full())


def test_matrix_completion_with_repeated_entries_is_their_least_squares_fit():
    """Was: repeated positions in ``indices`` gave torch's "copy_: only sparse compressed tensors with the same number
    of specified elements are supported" (the matrix path's CSR pattern had duplicate entries). Repeated
    observations of one entry are a least-squares fit of all of them: at the result, f is ½‖X[idx] − values‖² over
    every row of idx, and the Riemannian gradient of that sum — P_X of the dense Euclidean gradient, which adds up
    the residuals of repeated positions — vanishes (up to its rounding)."""
    m, n, r = 5, 4, 2
    A = low_rank(m, n, r, 0)
    idx = sample_indices((m, n), 16, generator=gen(1))
    idx = torch.cat([idx, idx[:6], idx[:2]])
    vals = entries(A, idx) + 0.1 * torch.randn(len(idx), dtype=DT, generator=gen(2))  # inconsistent repeats
    res = complete(idx, vals, (m, n), r, tol=0.0, max_iter=500, generator=gen(3))
    X = res.x.full()
    assert res.fun == pytest.approx(0.5 * float(((entries(X, idx) - vals) ** 2).sum()), rel=1e-12)
    G = torch.zeros(m, n, dtype=DT).index_put_(tuple(idx.T), entries(X, idx) - vals, accumulate=True)
    riemannian = matrix_projector(X, r) @ G.reshape(-1)
    assert float(torch.linalg.vector_norm(riemannian)) <= 1e-9
    assert res.grad_norm == pytest.approx(float(torch.linalg.vector_norm(riemannian)), rel=1e-3, abs=1e-12)
    exact = complete(idx, entries(A, idx), (m, n), r, generator=gen(3))  # consistent repeats: exact recovery
    assert exact.success and float(torch.linalg.matrix_norm(exact.x.full() - A)) <= 1e-9 * float(A.norm())


def completion_tolerance(dtype):
    """Absolute tolerance on relative errors recomputed here: rounding of the residual, not of its square."""
    return 1e3 * torch.finfo(dtype).eps


def check_completion(res, idx, vals, tol, test=None):
    """The documented fields of complete()'s result against dense references (in float64, from res.x's factors)."""
    X = res.x.full().double()
    vals64 = vals.double()
    norm = float(torch.linalg.vector_norm(vals64))
    resid = float(torch.linalg.vector_norm(entries(X, idx) - vals64))
    eps = completion_tolerance(vals.dtype)
    assert res.success == (res.status in SUCCESS_STATUSES) and res.status in DOCUMENTED_STATUSES
    assert abs(math.sqrt(2 * max(res.fun, 0.0)) - resid) <= (eps + 1e-6) * max(norm, resid)
    if norm == 0:  # documented: relative errors against zero data are 0 for a perfect fit
        assert res.train_error == 0.0 and resid == 0.0
        return
    ref = resid / norm
    assert abs(res.train_error - ref) <= eps + 1e-6 * ref
    if not res.history[-1].get("balanced"):  # (a balanced record has the balanced problem's residual)
        assert res.history[-1]["train_error"] == res.train_error
    if res.status == 4:
        assert res.train_error <= tol
    if test is not None:
        t_vals = test[1].double()
        t_ref = float(torch.linalg.vector_norm(entries(X, test[0]) - t_vals) / torch.linalg.vector_norm(t_vals))
        assert abs(res.test_error - t_ref) <= eps + 1e-6 * t_ref


INDEX_VARIANTS = {  # name -> (function of valid int64 indices, whether valid)
    "int64": (lambda i: i, True),
    "int32": (lambda i: i.int(), True),
    "list": (lambda i: i.tolist(), True),
    "float": (lambda i: i.double(), False),
    "bool": (lambda i: i > 0, False),
    "out of range": (lambda i: i + 100, False),
    "negative": (lambda i: -i - 1, False),
    "3 columns": (lambda i: torch.cat([i, i[:, :1]], 1), False),
    "transposed": (lambda i: i.T, False),
}
VALUE_VARIANTS = {
    "float64": (lambda v: v, True),
    "float32": (lambda v: v.float(), True),
    "zero": (lambda v: torch.zeros_like(v), True),
    "nan": (lambda v: torch.cat([v[:-1], v[-1:] * math.nan]), False),
    "inf": (lambda v: torch.cat([v[:-1], v[-1:] + math.inf]), False),
    "int": (lambda v: v.long(), False),
    "half": (lambda v: v.half(), False),
    "2-D": (lambda v: v[:, None], False),
    "one short": (lambda v: v[:-1], False),
    "list": (lambda v: v.tolist(), False),
}


@examples(80)
@given(
    m=st.integers(2, 7),
    n=st.integers(2, 7),
    rank=mostly(st.integers(1, 3), st.sampled_from([0, -1, 9, 2.0, True, "2", None])),
    fraction=st.sampled_from([0.5, 0.8, 1.0]),
    index=mostly(st.sampled_from(["int64", "int32", "list"]), st.sampled_from(sorted(INDEX_VARIANTS))),
    value=mostly(st.sampled_from(["float64", "float32", "zero"]), st.sampled_from(sorted(VALUE_VARIANTS))),
    shape=mostly(st.just("ok"), st.sampled_from(["float entry", "one mode", "too small"])),
    tol=mostly(st.sampled_from([None, 0.0, 1e-10, 1e-3]), st.sampled_from([-1.0, math.nan, "a", True])),
    max_iter=mostly(st.sampled_from([0, 3, 40]), st.sampled_from([-1, 2.5, None])),
    method=mostly(st.sampled_from(["cg", "sd", "trust-region"]), st.just("newton")),
    test=mostly(st.sampled_from([None, "ok"]), st.sampled_from(["short", "float32", "not a pair", "out of range"])),
    generator=mostly(st.just("ok"), st.sampled_from([3, "seed"])),
    seed=st.integers(0, 10),
)
def test_complete_matrix_arguments(m, n, rank, fraction, index, value, shape, tol, max_iter, method, test, generator,
                                   seed):  # fmt: skip
    """Any arguments of matrix completion: a consistent result (train/test errors recomputed densely; all-zero
    values give the zero matrix) or a named error; indices and values are never modified."""
    true_rank = min(2, m, n)
    A = low_rank(m, n, true_rank, seed)
    idx = sample_indices((m, n), max(1, round(fraction * m * n)), generator=gen(seed + 1))
    idx_arg, idx_ok = INDEX_VARIANTS[index][0](idx), INDEX_VARIANTS[index][1]
    vals_arg, vals_ok = VALUE_VARIANTS[value][0](entries(A, idx)), VALUE_VARIANTS[value][1]
    shape_arg = {"ok": (m, n), "float entry": (float(m), n), "one mode": (m,), "too small": (1, 1)}[shape]
    rank_ok = isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= min(m, n)
    held = sample_indices((m, n), min(5, m * n), generator=gen(seed + 2))
    test_arg = {
        None: None,
        "ok": (held, entries(A, held)),
        "short": (held, entries(A, held)[:-1]),
        "float32": (held, entries(A, held).float()),
        "not a pair": held,
        "out of range": (held + 50, entries(A, held)),
    }[test]
    problems = [name for name, ok in (("indices", idx_ok), ("values", vals_ok), ("rank", rank_ok)) if not ok]
    if shape != "ok":
        problems += ["shape", "indices", "modes"]
    if not (tol is None or (isinstance(tol, float) and tol >= 0)):
        problems.append("tol")
    if not (isinstance(max_iter, int) and max_iter >= 0):
        problems.append("max_iter")
    if method == "newton":
        problems.append("method")
    if test not in (None, "ok") or (test == "ok" and value == "float32"):
        problems.append("test")
    if generator != "ok":
        problems.append("generator")
    before = [t.clone() if isinstance(t, torch.Tensor) else t for t in (idx_arg, vals_arg)]
    call = lambda: complete(  # noqa: E731
        idx_arg, vals_arg, shape_arg, rank, tol=tol, max_iter=max_iter, method=method, test=test_arg,
        generator=gen(seed) if generator == "ok" else generator,
    )  # fmt: skip
    res = check_outcome(call, problems)
    for a, b in zip(before, (idx_arg, vals_arg)):
        assert not isinstance(a, torch.Tensor) or torch.equal(a, b), "complete() changed its input"
    if res is None:
        return
    dtype = vals_arg.dtype
    assert res.x.dtype == dtype and res.x.shape == (m, n) and res.x.rank == rank
    check_completion(res, idx, vals_arg, tol if tol is not None else {DT: 1e-12}.get(dtype, 1e-5), test_arg)
    if value == "zero":
        assert torch.equal(res.x.full(), torch.zeros(m, n, dtype=dtype)) and res.success and res.nit == 0


@examples(40)
@given(
    m=st.integers(3, 10),
    n=st.integers(3, 10),
    rank=st.integers(1, 3),
    fraction=st.sampled_from([0.7, 0.85, 1.0]),
    duplicates=st.sampled_from([0, 5]),
    method=st.sampled_from(["cg", "trust-region"]),
    seed=st.integers(0, 20),
)
def test_complete_recovers_exact_low_rank_matrices(m, n, rank, fraction, duplicates, method, seed):
    """Exact rank-r data observed at enough entries (1.5 times the manifold dimension, every row and column seen at
    least r + 1 times; repeated entries allowed) are recovered: the dense completion equals the matrix."""
    rank = min(rank, m - 1, n - 1)
    A = low_rank(m, n, rank, seed)
    idx = sample_indices((m, n), round(fraction * m * n), generator=gen(seed + 1))
    idx = torch.cat([idx, idx[:duplicates]])
    rows, cols = torch.bincount(idx[:, 0], minlength=m), torch.bincount(idx[:, 1], minlength=n)
    enough = len(idx) >= 1.5 * rank * (m + n - rank) and rows.min() > rank and cols.min() > rank
    event("enough samples" if enough else "too few samples")
    res = complete(idx, entries(A, idx), (m, n), rank, method=method, generator=gen(seed), max_iter=300)
    check_completion(res, idx, entries(A, idx), 1e-12)
    if enough:
        assert res.success, res.message
        assert float(torch.linalg.matrix_norm(res.x.full() - A) / torch.linalg.matrix_norm(A)) < 1e-8


@examples(20)
@given(
    shape=st.lists(st.integers(2, 4), min_size=3, max_size=3),
    true_rank=st.integers(1, 2),
    rank=mostly(st.sampled_from(["same", "list"]), st.sampled_from(["short list", 0, 2.5, "huge"])),
    fraction=st.sampled_from([0.6, 1.0]),
    seed=st.integers(0, 10),
)
def test_complete_tensor_trains(shape, true_rank, rank, fraction, seed):
    """TT completion of an exact TT-rank-r tensor: from every entry the completion is the tensor (dense reference);
    from fewer, a consistent result; a bad rank is named."""
    truth = TensorTrain.random(shape, true_rank, dtype=DT, generator=gen(seed))
    A = tt_full(truth.cores)
    total = math.prod(shape)
    idx = sample_indices(shape, max(1, round(fraction * total)), generator=gen(seed + 1))
    named = {"same": true_rank, "list": [true_rank, true_rank], "short list": [true_rank], "huge": 50}
    rank_arg = named.get(rank, rank)
    problems = ["rank"] if rank not in ("same", "list") else []
    max_iter = 200 if fraction == 1.0 else 30  # (underdetermined runs may go on slowly: a few iterations suffice)
    call = lambda: complete(idx, entries(A, idx), shape, rank_arg, generator=gen(seed), max_iter=max_iter)  # noqa: E731
    res = check_outcome(call, problems)
    if res is None:
        return
    check_completion(res, idx, entries(A, idx), 1e-12)
    assert res.x.shape == tuple(shape) and max(res.x.ranks) <= true_rank
    if fraction == 1.0:
        assert res.success, res.message
        assert float(torch.linalg.vector_norm(res.x.full() - A) / torch.linalg.vector_norm(A)) < 1e-8


@examples(40)
@given(
    shape=st.lists(mostly(st.integers(1, 6), st.sampled_from([0, -1, 2.5, True, "3"])), min_size=1, max_size=4),
    count=st.integers(-1, 40) | st.sampled_from([2.0, True, None, np.int64(3)]),
    generator=mostly(st.sampled_from(["seeded", None]), st.just(3)),
    device=mostly(st.sampled_from([None, "cpu"]), st.just("foo")),
)
def test_sample_indices(shape, count, generator, device):
    """``count`` distinct in-range int64 multi-indices, the same for the same seed; or a named error."""
    total = math.prod(n for n in shape if isinstance(n, int))
    problems = [f"shape[{k}]" for k, n in enumerate(shape) if not (type(n) is int and n >= 1)]
    count_ok = isinstance(count, (int, np.integer)) and not isinstance(count, bool) and 0 <= count <= total
    problems += [] if count_ok or problems else ["count"]
    problems += ["generator"] if generator == 3 else []
    problems += ["device"] if device == "foo" else []

    def call(seed=0):
        g = gen(seed) if generator == "seeded" else generator
        return sample_indices(shape, count, generator=g, device=device)

    idx = check_outcome(call, problems)
    if idx is None:
        return
    assert idx.dtype == torch.int64 and idx.shape == (count, len(shape))
    assert bool((idx >= 0).all()) and bool((idx < torch.tensor(shape)).all())
    assert len({tuple(row) for row in idx.tolist()}) == count
    if generator == "seeded":
        assert torch.equal(idx, call())


@examples(40)
@given(
    kind=st.sampled_from(["matrix", "tt"]),
    n_entries=st.integers(0, 12),
    index=mostly(st.just("ok"), st.sampled_from(["columns", "float", "out of range", "short"])),
    point=mostly(st.just("format"), st.just("dense")),
    seed=st.integers(0, 10),
)
def test_completion_loss(kind, n_entries, index, point, seed):
    """``completion_loss(indices, values)(X)`` is ½‖X[indices] − values‖² (dense reference), or a named error."""
    g = gen(seed)
    if kind == "matrix":
        shape, X = (5, 4), FixedRankMatrices(5, 4, 2).random_point(generator=g, dtype=torch.float64)
    else:
        shape, X = (3, 4, 2), TensorTrain.random([3, 4, 2], 2, dtype=DT, generator=g)
    idx = torch.stack([torch.randint(0, k, (n_entries,), generator=g) for k in shape], 1)
    vals = torch.randn(n_entries, dtype=DT, generator=g)
    idx_arg = {
        "ok": idx,
        "columns": torch.cat([idx, idx[:, :1]], 1),
        "float": idx.double(),
        "out of range": idx + 10,
        "short": idx[:-1] if n_entries else idx[:, :0],
    }[index]
    problems = [] if index == "ok" or (index == "out of range" and n_entries == 0) else ["indices", "index", "rows"]
    if point == "dense":
        problems.append("LowRankMatrix")
    value = check_outcome(lambda: completion_loss(idx_arg, vals)(X if point == "format" else X.full()), problems)
    if value is not None:
        D = X.full() if kind == "matrix" else tt_full(X.cores)
        assert float(value) == pytest.approx(0.5 * float(((entries(D, idx) - vals) ** 2).sum()), rel=1e-12, abs=1e-300)


# ============================================================================================== cross
def test_maxvol_names_a_tolerance_that_is_not_a_number():
    """Was: ``tol="a"`` / ``tol=None`` gave "'>=' not supported between instances of 'str' and 'int'"; rect_maxvol
    took any ``maxvol_tol`` (0.5: every swap loop ran to ``maxvol_iters``; NaN; a string gave the same message)."""
    A = torch.randn(8, 3, dtype=DT, generator=gen(0))
    for bad in ("a", None, [1.5]):
        with pytest.raises((TypeError, ValueError), match="tol"):
            maxvol(A, tol=bad)
        with pytest.raises((TypeError, ValueError), match="tol"):
            rect_maxvol(A, tol=bad)
    for bad in (0.5, math.nan, "a"):
        with pytest.raises((TypeError, ValueError), match="maxvol_tol"):
            rect_maxvol(A, maxvol_tol=bad)


def test_tt_cross_names_a_bad_function_and_device():
    """Was: a function that is not callable gave "'int' object is not callable", one returning None torch's
    RuntimeError "Could not infer dtype of NoneType" (a string: "new(): invalid data type 'str'"), and
    ``device="foo"`` torch's RuntimeError."""
    with pytest.raises(TypeError, match="f must be callable"):
        tt_cross(3, (4, 5), nswp=1)
    for value in (None, "x", object()):
        with pytest.raises(TypeError, match="f must return"):
            tt_cross(lambda i, v=value: v, (4, 5), nswp=1)
    with pytest.raises(ValueError, match="device"):
        tt_cross(lambda i: i.sum(1).double(), (4, 5), nswp=1, device="foo")
    with pytest.raises(TypeError, match="cache"):  # was: any truthy value (cache="no" kept the cache)
        tt_cross(lambda i: i.sum(1).double(), (4, 5), nswp=1, cache="no")


def test_tt_cross_takes_numpy_sizes_and_counts():
    """Was: ``nswp=np.int64(2)`` ("nswp must be a positive number") and a numpy array shape were refused, while numpy
    integers are accepted as sizes everywhere else."""
    f = lambda i: (i.double() + 1).prod(1)  # noqa: E731  (TT-rank 1)
    Y, info = tt_cross(f, np.array([3, 4]), nswp=np.int64(2), max_rank=np.int64(2), budget=np.int64(100))
    assert Y.shape == (3, 4) and info.sweeps <= 2
    assert torch.allclose(Y.full(), torch.outer(torch.arange(1.0, 4, dtype=DT), torch.arange(1.0, 5, dtype=DT)))


A_VARIANTS = {  # name -> (function of a random tall (n, r) float64 matrix, whether valid)
    "float64": (lambda A: A, True),
    "float32": (lambda A: A.float(), True),
    "wide": (lambda A: A.T if A.shape[0] > A.shape[1] else A[:0], False),
    "nan": (lambda A: A * math.nan, False),
    "int": (lambda A: A.long(), False),
    "1-D": (lambda A: A[:, 0], False),
    "3-D": (lambda A: A[None], False),
    "numpy": (lambda A: A.numpy(), False),
    "repeated column": (lambda A: torch.cat([A, A[:, :1]], 1) if A.shape[0] > A.shape[1] else A[:0], False),
}
TOLERANCES = mostly(st.sampled_from([1.0, 1.05, 1.5, 3.0]), st.sampled_from([0.5, math.nan, math.inf, "a", None]))


def tolerance_ok(tol):
    return isinstance(tol, float) and 1 <= tol < math.inf


@examples(60)
@given(
    n=st.integers(1, 12),
    r=st.integers(1, 5),
    variant=mostly(st.sampled_from(["float64", "float32"]), st.sampled_from(sorted(A_VARIANTS))),
    tol=TOLERANCES,
    seed=st.integers(0, 20),
)
def test_maxvol(n, r, variant, tol, seed):
    """r distinct rows I with ``B = A A[I]⁻¹`` (a dense solve), ``B[I] = I`` and ``max |B| ≤ tol``; or a named
    error (A not tall, not finite, not float, rank-deficient; tol not a number ≥ 1). A is never modified."""
    r = min(r, n)
    A0 = torch.randn(n, r, dtype=DT, generator=gen(seed))
    A, ok = A_VARIANTS[variant][0](A0), A_VARIANTS[variant][1]
    problems = ([] if ok else ["A"]) + ([] if tolerance_ok(tol) else ["tol"])
    before = A.clone() if isinstance(A, torch.Tensor) else None
    out = check_outcome(lambda: maxvol(A, tol=tol), problems)
    if before is not None:
        assert torch.equal(before, A) or bool(torch.isnan(before).any())
    if out is None:
        return
    I, B = out
    eps = 1e-10 if A.dtype == DT else 1e-3
    assert I.dtype == torch.int64 and I.shape == (r,) and len(set(I.tolist())) == r
    reference = torch.linalg.solve(A0[I].T, A0.T).T
    assert float((B.double() - reference).abs().max()) <= eps * max(1.0, float(reference.abs().max()))
    assert torch.allclose(B[I].double(), torch.eye(r, dtype=DT), atol=eps)
    assert float(B.abs().max()) <= tol * (1 + eps)


@examples(60)
@given(
    n=st.integers(1, 12),
    r=st.integers(1, 4),
    tol=TOLERANCES,
    min_extra=mostly(st.sampled_from([None, 0, 1, 3]), st.sampled_from([-1, 20, 2.5])),
    max_extra=mostly(st.sampled_from([None, 0, 2, 20]), st.sampled_from([-1, 2.5, True])),
    seed=st.integers(0, 20),
)
def test_rect_maxvol(n, r, tol, min_extra, max_extra, seed):
    """k rows I, ``min_rank ≤ k ≤ max_rank``, with ``A = B A[I]`` (dense), ``B[I] = I`` and every row of B of norm
    ``≤ tol`` unless max_rank stopped it; or a named error."""
    r = min(r, n)
    A = torch.randn(n, r, dtype=DT, generator=gen(seed))
    min_rank = None if min_extra is None else (min_extra if isinstance(min_extra, float) else r + min_extra)
    max_rank = None if max_extra is None else (max_extra if not isinstance(max_extra, int) else min(n, r + max_extra))
    if isinstance(max_extra, bool):
        max_rank = True
    lo, hi = (r if min_rank is None else min_rank), (n if max_rank is None else max_rank)
    problems = [] if tolerance_ok(tol) else ["tol"]
    for name, v in (("min_rank", min_rank), ("max_rank", max_rank)):
        if v is not None and (type(v) is not int or v < 1):
            problems.append(name)
    if not problems and not r <= lo <= hi <= n:
        problems += ["min_rank", "max_rank"]
    out = check_outcome(lambda: rect_maxvol(A, tol=tol, min_rank=min_rank, max_rank=max_rank), problems)
    if out is None:
        return
    I, B = out
    k = len(I)
    assert lo <= k <= hi and len(set(I.tolist())) == k and B.shape == (n, k)
    assert torch.equal(B[I], torch.eye(k, dtype=DT))
    assert float(torch.linalg.matrix_norm(A - B @ A[I])) <= 1e-10 * float(torch.linalg.matrix_norm(A))
    if k < hi:
        assert float(torch.linalg.vector_norm(B, dim=1).max()) <= tol * (1 + 1e-10)


def separable_function(kind, tables, tables2):
    """f(i) = Σ_k g_k(i_k) (TT-rank 2), Π_k g_k(i_k) (rank 1) or Π g_k + Π h_k (rank ≤ 2), and its dense tensor."""
    d = len(tables)

    def f(i):
        if kind == "sum":
            return sum(tables[k][i[:, k]] for k in range(d))
        product = math.prod(tables[k][i[:, k]] for k in range(d))
        return product if kind == "product" else product + math.prod(tables2[k][i[:, k]] for k in range(d))

    grids = torch.meshgrid(*[torch.arange(len(t)) for t in tables], indexing="ij")
    return f, f(torch.stack([x.reshape(-1) for x in grids], 1)).reshape([len(t) for t in tables])


TT_CROSS_BAD = {  # option -> invalid values
    "budget": [0, -5, 2.5, True],
    "max_rank": [0, 1.5],
    "eps": [0, math.nan, -1.0, "a"],
    "nswp": [0, True, 1.5],
    "init": [0, "x", -1],
    "rank_increase": [-1, (2, 1), 1.5],
    "tol": [0.5, math.nan, "a"],
    "dtype": [torch.float16, torch.int64, "float64"],
    "device": ["foo"],
    "generator": [3],
}


@examples(50)
@given(
    shape=st.lists(st.integers(2, 5), min_size=2, max_size=4),
    kind=st.sampled_from(["sum", "product", "two products"]),
    stop=st.sampled_from([{"nswp": 1}, {"nswp": 3}, {"eps": 1e-10, "nswp": 5}, {"budget": 60}]),
    on_domain=st.booleans(),
    bad=mostly(st.just(None), st.sampled_from([(k, v) for k, vs in sorted(TT_CROSS_BAD.items()) for v in vs]), 2),
    seed=st.integers(0, 20),
)
def test_tt_cross_reproduces_low_rank_functions(shape, kind, stop, on_domain, bad, seed):
    """Functions of known TT-rank ≤ 2 (sums and products of 1-D functions), on indices or on a coordinate domain: a
    cross with at least one sweep reproduces the dense tensor to rounding; a budget is never exceeded; a bad option
    is named."""
    g = gen(seed)
    tables = [torch.randn(n, dtype=DT, generator=g) for n in shape]
    tables2 = [torch.randn(n, dtype=DT, generator=g) for n in shape]
    f, full = separable_function(kind, tables, tables2)
    kwargs = dict(stop, generator=gen(seed))
    if on_domain:  # f of coordinates x_k = k-th grid: the grids are the indices as floats here
        domain = [torch.arange(n, dtype=DT) for n in shape]
        kwargs["domain"] = domain
        fun = lambda x: f(x.long())  # noqa: E731
    else:
        fun = f
    problems = []
    if bad is not None:
        kwargs[bad[0]] = bad[1]
        problems = [bad[0]]
    res = check_outcome(lambda: tt_cross(fun, None if on_domain else shape, **kwargs), problems)
    if res is None:
        return
    Y, info = res
    assert Y.shape == tuple(shape) and info.ranks == Y.ranks
    if "budget" in stop:
        assert info.evaluations <= stop["budget"]
    if info.sweeps >= 1:
        assert float(torch.linalg.vector_norm(Y.full() - full)) <= 1e-9 * float(torch.linalg.vector_norm(full))


# ============================================================================================== stats
def kronecker_samples(n, p, q, seed, dtype=DT):
    """n Gaussian samples (n, p, q) with covariance A ⊗ B (A, B random SPD)."""
    g = gen(seed)
    La = torch.randn(p, p, dtype=DT, generator=g) / p**0.5 + torch.eye(p, dtype=DT)
    Lb = torch.randn(q, q, dtype=DT, generator=g) / q**0.5 + torch.eye(q, dtype=DT)
    return (La @ torch.randn(n, p, q, dtype=DT, generator=g) @ Lb.T).to(dtype)


def test_kronecker_covariance_names_bad_tol_generator_and_assume_centered():
    """Was: ``tol="a"`` / ``tol=None`` gave "'>' not supported between instances of 'str' and 'int'", ``generator=3``
    torch's randint argument error at fit, and ``assume_centered="no"`` was taken as True."""
    for kwargs, name in (({"tol": "a"}, "tol"), ({"tol": None}, "tol"), ({"generator": 3}, "generator"),
                         ({"assume_centered": "no"}, "assume_centered")):  # fmt: skip
        with pytest.raises((TypeError, ValueError), match=name):
            KroneckerCovariance(3, 4, **kwargs)


def test_flip_flop_is_scale_equivariant_and_extreme_scales_are_named():
    """Was: flip-flop on X·1e77 or X·1e-100 (covariances 1e154, 1e-200: representable) failed with "the flip-flop
    iterate became singular ... a row or a column of the samples is a combination of the others"; X·1e200 made
    PRLS fail in linalg.svd ("input matrix contained non-finite values") and X·1e-170 gave a zero estimate. The MLE is
    equivariant: fit(c X) has covariance c² fit(X); data whose covariance is not representable are refused."""
    X = kronecker_samples(30, 3, 4, 0)
    reference = KroneckerCovariance(3, 4, "flip-flop").fit(X).covariance_
    for c in (2.0**-330, 2.0**255):  # powers of two: c X and c² Σ are exact
        scaled = KroneckerCovariance(3, 4, "flip-flop").fit(c * X).covariance_
        assert torch.allclose(scaled / c**2, reference, rtol=1e-12, atol=0)
    for method in ("prls", "flip-flop"):
        for c in (1e200, 1e-170):
            with pytest.raises(ValueError, match="rescale X"):
                KroneckerCovariance(3, 4, method).fit(c * X)


def test_kronecker_covariance_score_and_error_norm_arguments():
    """Was: score / mahalanobis of zero samples gave torch's reshape error, error_norm of a numpy array an
    AttributeError and of a NaN matrix a NaN."""
    X = kronecker_samples(30, 3, 4, 0)
    est = KroneckerCovariance(3, 4, "flip-flop").fit(X)
    assert est.mahalanobis(X[:0]).shape == (0,)
    with pytest.raises(ValueError, match="X"):
        est.score(X[:0])
    with pytest.raises(TypeError, match="Sigma"):
        est.error_norm(np.eye(12))
    with pytest.raises(ValueError, match="Sigma"):
        est.error_norm(torch.full((12, 12), math.nan, dtype=DT))


def rearranged(S, p, q):
    """R(S): ``R[i p + j, k q + l] = S[i q + k, j q + l]`` (the block (i, j) of S, q × q, flattened as row i p + j), so
    that ``R(A ⊗ B) = vec(A) vec(B)ᵀ`` (written here, independently of lowrankopt.stats.rearrange)."""
    return S.reshape(p, q, p, q).permute(0, 2, 1, 3).reshape(p * p, q * q)


def kron_sum(U, w, V, p, q):
    """``Σ_j w_j mat(u_j) ⊗ mat(v_j)`` as a dense pq × pq matrix."""
    out = torch.zeros(p * q, p * q, dtype=U.dtype)
    for j in range(len(w)):
        out += w[j] * torch.kron(U[:, j].reshape(p, p), V[:, j].reshape(q, q))
    return out


KC_BAD_ARGS = {
    "p": [0, 2.0, True],
    "method": ["mle"],
    "penalty": [-1.0, math.nan, math.inf, "x", None],
    "n_terms": [0, 1.5],
    "solver": ["lanczos"],
    "cv_folds": [1, 2.5],
    "bootstrap": [0],
    "tol": [0.0, "a", math.nan],
    "max_iter": [0, 2.5],
    "generator": [3],
    "assume_centered": ["no", 1],
}
DATA_VARIANTS = {  # name -> (function of samples (n, p, q), whether valid)
    "(n, p, q)": (lambda X: X, True),
    "(n, pq)": (lambda X: X.reshape(len(X), -1), True),
    "numpy": (lambda X: X.numpy(), True),
    "float32": (lambda X: X.float(), True),
    "constant": (lambda X: torch.ones_like(X), True),
    "nan": (lambda X: X * math.nan, False),
    "one sample": (lambda X: X[:1], False),
    "wrong shape": (lambda X: X[:, :, :-1] if X.shape[2] > 1 else X[:, :, :0], False),
    "bool": (lambda X: X > 0, False),
    "list": (lambda X: X.tolist(), False),
    "1e200": (lambda X: X * 1e200, False),
}


@examples(100)
@given(
    p=st.integers(1, 3),
    q=st.integers(1, 3),
    n=st.integers(2, 14),
    method=st.sampled_from(["prls", "truncated", "flip-flop"]),
    solver=st.sampled_from(["dense", "matrix-free"]),
    penalty=st.sampled_from([0.0, 0.3, "plugin", "cv"]),
    n_terms=st.sampled_from([None, 1, 2]),
    data=mostly(
        st.sampled_from(["(n, p, q)", "(n, pq)", "numpy", "float32", "constant"]),
        st.sampled_from(sorted(DATA_VARIANTS)),
    ),  # fmt: skip
    bad=mostly(st.just(None), st.sampled_from([(k, v) for k, vs in sorted(KC_BAD_ARGS.items()) for v in vs]), 5),
    seed=st.integers(0, 20),
)
def test_kronecker_covariance(p, q, n, method, solver, penalty, n_terms, data, bad, seed):
    """The estimate against dense references computed here from the sample covariance Ŝ: truncation = the top
    n_terms SVD terms of R(Ŝ); PRLS = its soft-thresholded SVD at the reported λ; flip-flop = a fixed point of the
    MLE equations ``A ∝ Σ X_i B⁻¹ X_iᵀ``, ``B ∝ Σ X_iᵀ A⁻¹ X_i``; score and mahalanobis = the dense Gaussian formulas.
    Or a named error (bad constructor arguments, bad data)."""
    if method == "truncated" and n_terms is None:
        n_terms = 2
    if penalty == "cv" and n < 5:
        penalty = 0.3
    kwargs = dict(method=method, penalty=penalty, n_terms=n_terms, solver=solver, generator=gen(seed))
    problems = []
    if bad is not None:
        kwargs[bad[0]] = bad[1]
        problems.append(bad[0])
    X0 = kronecker_samples(n, p, q, seed)
    X, data_ok = DATA_VARIANTS[data][0](X0), DATA_VARIANTS[data][1]
    if not problems and not data_ok:
        problems += ["X", "sample"]
    if not problems and method == "flip-flop" and (data == "constant" or n <= p * q):
        problems += ["X", "MLE"]  # constant data, or a singular Ŝ: the MLE may not exist (a named refusal)
        if data != "constant" and n > max(p / q, q / p) + 1:
            event("flip-flop: MLE may or may not exist")
            try:
                est = KroneckerCovariance(p, q, **kwargs).fit(X)
            except ValueError as exc:
                assert "MLE" in str(exc) or "X" in str(exc)
                return
            check_kronecker_estimate(est, X0.double() if data != "float32" else X0.float().double(), p, q)
            return
    est = check_outcome(lambda: KroneckerCovariance(p, q, **kwargs).fit(X), problems)
    if est is None:
        return
    Xd = X0.float().double() if data == "float32" else (torch.ones_like(X0) if data == "constant" else X0)
    check_kronecker_estimate(est, Xd, p, q)


def check_kronecker_estimate(est, X, p, q):
    n = len(X)
    tol = 1e-4 if est.location_.dtype == torch.float32 else 1e-8
    Xc = (X - X.mean(0)).reshape(n, -1)
    S = Xc.T @ Xc / n
    Sigma = est.covariance_.double()
    scale = max(float(torch.linalg.matrix_norm(S)), 1e-300)
    if est.method == "flip-flop":
        A, B = (f.double() for f in est.factors_[0])
        Xs = Xc.reshape(n, p, q)
        A1 = torch.einsum("nij,jk,nlk->il", Xs, torch.linalg.inv(B), Xs) / (n * q)
        B1 = torch.einsum("nji,jk,nkl->il", Xs, torch.linalg.inv(A1), Xs) / (n * p)
        assert float(torch.linalg.matrix_norm(torch.kron(A1, B1) - Sigma)) <= 1e2 * tol * scale
    else:
        U, s, Vh = torch.linalg.svd(rearranged(S, p, q), full_matrices=False)
        k = min(est.n_terms or s.numel(), s.numel())
        if est.method == "truncated":
            reference = kron_sum(U[:, :k], s[:k], Vh[:k].T, p, q)
            if k < s.numel() and float(s[k - 1] - s[k]) <= 1e-6 * scale:
                return  # a tie at the cut: the truncation is not unique
        else:
            w = (s - est.penalty_ / 2).clamp_min(0)[:k]
            reference = kron_sum(U[:, :k], w, Vh[:k].T, p, q)
        assert float(torch.linalg.matrix_norm(Sigma - reference)) <= 1e2 * tol * scale
    other = S + torch.eye(p * q, dtype=DT)  # error_norm: ‖Σ̃ − Σ‖_F to about √ε ‖Σ‖ (a difference of squares)
    error = float(torch.linalg.matrix_norm(Sigma - other))
    size = float(torch.linalg.matrix_norm(other)) + float(torch.linalg.matrix_norm(Sigma))
    assert abs(est.error_norm(other.to(est.location_)) - error) <= 1e2 * math.sqrt(tol) * size
    Y = X.to(est.location_)
    evals = torch.linalg.eigvalsh(Sigma)
    if not float(evals.min()) > 1e-6 * float(evals.abs().max()):
        event("estimate not positive definite")
        return  # no Gaussian likelihood to compare with
    diff = (X - est.location_.double()).reshape(n, -1)
    maha = (diff @ torch.linalg.solve(Sigma, diff.T)).diagonal()
    assert torch.allclose(est.mahalanobis(Y).double(), maha, rtol=1e2 * tol, atol=1e2 * tol)
    loglik = -0.5 * (p * q * math.log(2 * math.pi) + float(torch.logdet(Sigma)) + float(maha.mean()))
    assert est.score(Y) == pytest.approx(loglik, rel=1e2 * tol, abs=1e2 * tol)
    event("likelihood compared")


# ============================================================================================== nn layers
def test_layers_name_a_bad_generator_or_device():
    """Was: ``generator=3`` gave AttributeError "'int' object has no attribute 'device'" (LowRankLinear, T-Basis) or
    torch's randn argument error (STTP/SVDP, SOC), and ``device="foo"`` torch's RuntimeError in every layer."""
    makers = [
        lambda **kw: lnn.LowRankLinear(6, 5, 2, **kw),
        lambda **kw: lnn.TTLinear(8, 6, 2, **kw),
        lambda **kw: lnn.STTPLinear(8, 6, 2, **kw),
        lambda **kw: lnn.SVDPConv2d(4, 6, 3, **kw),
        lambda **kw: lnn.TTConv2d(4, 6, 3, 2, **kw),
        lambda **kw: lnn.SkewOrthogonalConv2d(4, 3, **kw),
        lambda **kw: lnn.TBasis(3, 2, 4, **kw),
    ]
    for make in makers:
        with pytest.raises(TypeError, match="generator"):
            make(generator=3)
        with pytest.raises(ValueError, match="device"):
            make(device="foo")
    for make in (lambda: lnn.GSOrthogonal(8, 2, device="foo"), lambda: lnn.TBasisFactory(None, rank=2, mode_size=4,
                                                                                         device="foo")):  # fmt: skip
        with pytest.raises(ValueError, match="device"):
            make()


def test_skew_orthogonal_convs_name_bad_arguments():
    """Was: channels=0 gave ZeroDivisionError, kernel_size=-1 / channels=-1 torch's "negative dimension", groups=0
    "integer modulo by zero", channels=2.0 torch's randn error, tol="a" / max_norm="3" / init_scale=None comparisons
    of str and int, and max_terms=0, init_scale=nan, dtype=int64 (a NotImplementedError later) and bias="yes" were
    accepted; GSOrthogonalConv2d's groups=2.0 gave "cannot unpack non-iterable float object"."""
    bad = {
        "channels": [0, -1, 2.0, None],
        "kernel_size": [-1, 2, (3, 2), "3"],
        "groups": [0, 2.0, (2, 3)],
        "tol": ["a", None, 0.0, 1.0],
        "max_terms": [0, 2.5],
        "max_norm": ["3", 0.0, math.nan],
        "init_scale": [None, math.nan, -1.0],
        "bias": ["yes", 1],
        "dtype": [torch.int64, torch.complex64],
    }
    for name, values in bad.items():
        for value in values:
            with pytest.raises((TypeError, ValueError), match=name):
                lnn.SkewOrthogonalConv2d(**{"channels": 4, "kernel_size": 3, name: value})
    for groups in (2.0, None, "3", (2,), 0):
        with pytest.raises((TypeError, ValueError), match="groups"):
            lnn.GSOrthogonalConv2d(8, 3, groups)


def test_factorized_layers_name_bad_sizes_bias_and_geometry():
    """Was: SVDPLinear(None, 6) gave "'<' not supported between instances of 'int' and 'NoneType'"; STTP layers and
    TTConv2d took any bias (bias="no" made one); STTPConv2d took kernel_size=-1, stride=0, dilation=0 and padding=-1
    (torch's conv errors at forward) and called kernel_size=0 a bad in_modes; a float mode gave "'float' object cannot
    be interpreted as an integer"; numpy sizes and ranks were refused by LowRankLinear, TTLinear and STTPLinear."""
    with pytest.raises(ValueError, match="in_features"):
        lnn.SVDPLinear(None, 6)
    with pytest.raises(ValueError, match="in_channels"):
        lnn.SVDPConv2d(None, 6, 3)
    for make in (lambda b: lnn.STTPLinear(8, 6, 2, bias=b), lambda b: lnn.STTPConv2d(4, 6, 3, rank=2, bias=b),
                 lambda b: lnn.TTConv2d(4, 6, 3, 2, bias=b)):  # fmt: skip
        with pytest.raises(TypeError, match="bias"):
            make("no")
    for name, value in (("kernel_size", -1), ("kernel_size", 0), ("stride", 0), ("dilation", 0), ("padding", -1)):
        with pytest.raises(ValueError, match=name):
            lnn.STTPConv2d(4, 6, **{"kernel_size": 3, "rank": 2, name: value})
    with pytest.raises(ValueError, match=r"out_modes\[0\]"):
        lnn.STTPLinear(8, 6, 2, mode_factorization=([2.0, 3], [2, 4]))
    n = np.int64
    assert lnn.LowRankLinear(n(6), n(5), n(2)).rank == 2
    assert lnn.TTLinear(n(8), n(6), n(2)).weight_matrix().full().shape == (6, 8)
    assert lnn.STTPLinear(n(8), n(6), n(2)).weight_matrix().shape == (6, 8)


def test_layers_name_inputs_of_the_wrong_kind():
    """Was: STTPLinear / SVDPLinear of a numpy array or a list gave AttributeError ("'str' object has no attribute
    'type'"); GSOrthogonal of a 0-d tensor an IndexError, of another dtype torch's "expected scalar type"; STTPConv2d
    and SkewOrthogonalConv2d called a numpy array a bad shape; GSOrthogonalConv2d of a 3-D or 5-D input gave "not
    enough values to unpack"; T-Basis layers gave torch's shape and dtype errors."""
    for layer in (lnn.STTPLinear(8, 6, 2), lnn.SVDPLinear(8, 6), lnn.GSOrthogonal(8, 2)):
        for x in (np.ones((3, 8), dtype=np.float32), [[1.0] * 8]):
            with pytest.raises(TypeError, match="input"):
                layer(x)
    q = lnn.GSOrthogonal(8, 2)
    with pytest.raises(ValueError, match="input"):
        q(torch.tensor(1.0))
    with pytest.raises(TypeError, match="dtype"):
        q(torch.randn(3, 8, dtype=DT))
    for layer in (lnn.STTPConv2d(4, 6, 3, rank=2), lnn.SkewOrthogonalConv2d(4, 3)):
        with pytest.raises(TypeError, match="input"):
            layer(np.ones((2, 4, 5, 5), dtype=np.float32))
    gso = lnn.GSOrthogonalConv2d(8, 3, 2)
    for x in (torch.randn(8, 5, 5), torch.randn(1, 2, 8, 5, 5), np.ones((2, 8, 5, 5), dtype=np.float32)):
        with pytest.raises((TypeError, ValueError), match="input"):
            gso(x)
    # T-Basis layers (was: torch's "mat1 and mat2 shapes cannot be multiplied" / conv2d's RuntimeError)
    factory = lnn.TBasisFactory(lnn.TBasis(3, 2, 9, generator=gen(0)))
    factory.add("fc", (5, 6), 0.3, generator=gen(1))
    factory.add("conv", (4, 3, 3, 3), 0.3, generator=gen(2))
    linear = lnn.TBasisLinear(factory, "fc", None)
    conv = lnn.TBasisConv2d(factory, "conv", torch.nn.Conv2d(3, 4, 3))
    for layer, bad_shape, ok_shape in ((linear, (2, 7), (2, 6)), (conv, (2, 4, 5, 5), (2, 3, 5, 5))):
        with pytest.raises(ValueError, match="input"):
            layer(torch.randn(bad_shape))
        with pytest.raises(TypeError, match="dtype"):
            layer(torch.randn(ok_shape, dtype=DT))


def test_gs_tbasis_and_gsoft_name_bad_types():
    """Was: GSOrthogonal(dtype=int64) gave torch's "Only Tensors of floating point ... can require gradients" (complex
    was accepted), TBasis(dtype=int64) a NotImplementedError, TBasisFactory(basis=3) "'int' object has no attribute
    'rank'", and GSOFTConfig took target_modules=3 (inject_gsoft then: "'int' object is not iterable"), double="yes"
    and neumann_terms=0."""
    for dtype in (torch.int64, torch.complex64):
        with pytest.raises(TypeError, match="dtype"):
            lnn.GSOrthogonal(8, 2, dtype=dtype)
        with pytest.raises(TypeError, match="dtype"):
            lnn.TBasis(3, 2, 4, dtype=dtype)
    with pytest.raises(TypeError, match="basis"):
        lnn.TBasisFactory(3)
    for name, value in (("target_modules", 3), ("exclude_modules", 3), ("modules_to_save", [1]), ("double", "yes"),
                        ("scale", None), ("fan_in_fan_out", 1), ("neumann_terms", 0)):  # fmt: skip
        with pytest.raises((TypeError, ValueError), match=name):
            lnn.GSOFTConfig(block_size=2, **{"target_modules": "all-linear", name: value})


def dense_tt_matrix(cores):
    """``W[(i_1..i_d), (j_1..j_d)] = G_1[i_1, j_1] ⋯ G_d[i_d, j_d]`` for cores ``(r, out_k, in_k, r')``, written out."""
    W = cores[0][0]  # (out_1, in_1, r_1)
    for G in cores[1:]:
        W = torch.einsum("ijr,rklt->ikjlt", W, G)
        W = W.reshape(W.shape[0] * W.shape[1], W.shape[2] * W.shape[3], W.shape[4])
    return W[..., 0]


def dense_weight(layer):
    """A linear layer's dense ``(out, in)`` weight, assembled here from its factors (never from its own dense form)."""
    if isinstance(layer, lnn.LowRankLinear):
        X = layer.weight_matrix()
        return X.U @ X.S @ X.V.T
    if isinstance(layer, lnn.TTLinear):
        return dense_tt_matrix(layer.weight_matrix().cores)
    U, s, V = layer.factors()
    return (U * s) @ V.T


LINEAR_KINDS = {
    "LowRankLinear": lambda i, o, r, **kw: lnn.LowRankLinear(i, o, r, **kw),
    "TTLinear": lambda i, o, r, **kw: lnn.TTLinear(i, o, r, **kw),
    "STTPLinear": lambda i, o, r, **kw: lnn.STTPLinear(i, o, r, **kw),
    "SVDPLinear": lambda i, o, r, **kw: lnn.SVDPLinear(i, o, r, **kw),
    "STTPLinear-stiefel": lambda i, o, r, **kw: lnn.STTPLinear(i, o, r, parametrization="stiefel", **kw),
    "STTPLinear-identity": lambda i, o, r, **kw: lnn.STTPLinear(i, o, r, spectrum="identity", **kw),
}
SIZE = mostly(st.integers(1, 12), st.sampled_from([0, -2, 2.0, True, None, "4"]), 10)
LAYER_RANK = mostly(st.integers(1, 13) | st.sampled_from([np.int64(2)]), st.sampled_from([0, -1, 2.5, True, "2"]), 8)
LAYER_DTYPE = mostly(st.sampled_from([torch.float32, torch.float64]), st.sampled_from(["float32", torch.int64]), 10)


def max_abs(t):
    return float(t.abs().max()) if t.numel() else 0.0


def positive(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1


def perturb_(module, seed, scale=0.3):
    """Move the plain (Euclidean) parameters off their initial values, which are often special (identity, zero)."""
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            if type(p) is torch.nn.Parameter:
                p.add_(scale * torch.randn(p.shape, dtype=torch.float64, generator=g).to(p.dtype))
    return module


@examples(80)
@given(
    kind=st.sampled_from(sorted(LINEAR_KINDS)),
    in_f=SIZE,
    out_f=SIZE,
    rank=LAYER_RANK,
    dtype=LAYER_DTYPE,
    bias=mostly(st.booleans(), st.sampled_from(["yes", None])),
    batch=st.sampled_from([(), (0,), (3,), (2, 3)]),
    x_kind=mostly(st.just("ok"), st.sampled_from(["last dim", "dtype", "numpy"])),
    seed=st.integers(0, 20),
)
def test_linear_layers(kind, in_f, out_f, rank, dtype, bias, batch, x_kind, seed):
    """Any sizes, ranks, dtypes and inputs: a layer whose forward is ``x Wᵀ + b`` with W assembled here from its
    factors (STTP: U, V with orthonormal columns, ‖W‖₂ = 1 at the default lipschitz), or a named error."""
    problems = [name for name, v in (("in_features", in_f), ("out_features", out_f)) if not positive(v)]
    if not positive(rank):
        problems.append("rank")
    elif kind == "LowRankLinear" and not problems and rank > min(in_f, out_f):
        problems.append("rank")
    if dtype not in (torch.float32, torch.float64):
        problems.append("dtype")
    if not isinstance(bias, bool):
        problems.append("bias")
    kwargs = dict(bias=bias, dtype=dtype, generator=gen(seed))
    layer = check_outcome(lambda: LINEAR_KINDS[kind](in_f, out_f, rank, **kwargs), problems)
    if layer is None:
        return
    if "stiefel" not in kind:
        perturb_(layer, seed + 1)
    in_f, out_f = int(in_f), int(out_f)
    x = torch.randn(*batch, in_f, dtype=torch.float64, generator=gen(seed + 2)).to(dtype)
    other = torch.float64 if dtype == torch.float32 else torch.float32
    x_arg = {"ok": x, "last dim": x[..., :-1], "dtype": x.to(other), "numpy": x.numpy()}[x_kind]
    y = check_outcome(lambda: layer(x_arg), [] if x_kind == "ok" else ["input"])
    if y is None:
        return
    with torch.no_grad():
        W = dense_weight(layer).double()
        reference = x.double() @ W.T + (0 if layer.bias is None else layer.bias.double())
    assert y.shape == (*batch, out_f) and y.dtype == dtype
    eps = 1e-12 if dtype == torch.float64 else 1e-5
    assert max_abs(y.double() - reference) <= eps * (1 + max_abs(reference))
    if kind.startswith(("STTP", "SVDP")):
        U, s, V = (t.double() for t in layer.factors())
        r = U.shape[1]
        assert r == min(int(rank), in_f, out_f)
        for F_ in (U, V):
            assert torch.allclose(F_.T @ F_, torch.eye(r, dtype=DT), atol=1e2 * eps)
        if kind != "STTPLinear-identity":
            assert float(s.abs().max()) == pytest.approx(1.0, rel=1e2 * eps)  # lipschitz = 1: ‖W‖₂ = max |σ| = 1


def dense_kernel(layer):
    """A conv layer's dense kernel ``(c_out, c_in, k_h, k_w)``, assembled here from its factors."""
    if isinstance(layer, lnn.TTConv2d):  # K[o, i, p, q] = Σ first[i, α] core[β, α, p, q] last[o, β]
        return torch.einsum("ia,bapq,ob->oipq", layer.first, layer.core, layer.last)
    U, s, V = layer.factors()
    return ((U * s) @ V.T).reshape(layer.out_channels, layer.in_channels, *layer.kernel_size)


CONV_KINDS = {
    "STTPConv2d": lambda ci, co, k, r, **kw: lnn.STTPConv2d(ci, co, k, rank=r, **kw),
    "SVDPConv2d": lambda ci, co, k, r, **kw: lnn.SVDPConv2d(ci, co, k, rank=r, **kw),
    "TTConv2d": lambda ci, co, k, r, **kw: lnn.TTConv2d(ci, co, k, r, **kw),
}


@examples(60)
@given(
    kind=st.sampled_from(sorted(CONV_KINDS)),
    c_in=mostly(st.integers(1, 5), st.sampled_from([0, 2.0])),
    c_out=mostly(st.integers(1, 5), st.sampled_from([0, None])),
    kernel=mostly(st.sampled_from([1, 2, 3]), st.sampled_from([0, -1, (3, 2)])),
    rank=LAYER_RANK,
    stride=mostly(st.sampled_from([1, 2]), st.sampled_from([0, (1, 1, 1)])),
    padding=mostly(st.sampled_from([0, 1, "same", "valid"]), st.sampled_from([-1, "full"])),
    padding_mode=mostly(st.sampled_from(["zeros", "circular"]), st.sampled_from(["reflect", "mirror"])),
    size=st.integers(3, 6),
    seed=st.integers(0, 20),
)
def test_conv_layers(kind, c_in, c_out, kernel, rank, stride, padding, padding_mode, size, seed):
    """Any geometry: a conv whose forward equals ``nn.Conv2d`` with the kernel assembled here from the layer's factors
    (same stride, padding, padding mode, bias), or a named error."""
    problems = [name for name, v in (("in_channels", c_in), ("out_channels", c_out), ("rank", rank)) if not positive(v)]
    if kernel in (0, -1) or (kernel == (3, 2) and kind == "TTConv2d"):
        problems.append("kernel_size")
    if stride != 1 and stride != 2:
        problems.append("stride")
    if padding in (-1, "full"):
        problems.append("padding")
    if padding == "same" and stride == 2:
        problems.append("padding")  # as nn.Conv2d: "same" needs stride 1
    if padding_mode == "mirror" or (padding_mode == "reflect" and kind == "TTConv2d"):
        problems.append("padding_mode")
    kwargs = dict(stride=stride, padding=padding, padding_mode=padding_mode, generator=gen(seed), dtype=DT)
    layer = check_outcome(lambda: CONV_KINDS[kind](c_in, c_out, kernel, rank, **kwargs), problems)
    if layer is None:
        return
    perturb_(layer, seed + 1)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randn(2, c_in, size + kh, size + kw, dtype=DT, generator=gen(seed + 2))
    if padding_mode == "reflect" and padding == 1 and min(x.shape[-2:]) <= 1:
        return
    reference = torch.nn.Conv2d(c_in, c_out, (kh, kw), stride, padding, padding_mode=padding_mode, dtype=DT,
                                bias=layer.bias is not None)  # fmt: skip
    with torch.no_grad():
        reference.weight.copy_(dense_kernel(layer))
        if layer.bias is not None:
            reference.bias.copy_(layer.bias)
        y, expected = layer(x), reference(x)
    assert y.shape == expected.shape
    assert max_abs(y - expected) <= 1e-12 * (1 + max_abs(expected))
    with pytest.raises((TypeError, ValueError), match="input"):
        layer(x[:, :0] if c_in > 1 else x[0])


def conv_operator(kernel, groups, shape):
    """The dense matrix of ``x ↦ conv2d(x, kernel, padding="same", groups)`` on images ``shape = (C, H, W)``, by
    applying the conv to every basis image."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=kernel.dtype).reshape(n, *shape)
    k = kernel.shape[-1]
    return torch.nn.functional.conv2d(basis, kernel, padding=k // 2, groups=groups).reshape(n, n).T


@examples(30)
@given(
    channels=st.sampled_from([2, 4, 6]),
    kernel=st.sampled_from([1, 3]),
    groups=st.sampled_from([1, 2]),
    max_norm=st.sampled_from([None, 0.5, 2.0]),
    tol=st.sampled_from([1e-3, 1e-6, 1e-10]),
    init_scale=st.sampled_from([0.0, 0.1, 1.0]),
    size=st.integers(1, 4),
    seed=st.integers(0, 20),
)
def test_skew_orthogonal_conv_is_the_exponential_of_its_skew_conv(channels, kernel, groups, max_norm, tol,
                                                                  init_scale, size, seed):  # fmt: skip
    """``y = exp(L) x + b``: against the matrix exponential of the dense operator of L (built here from the skew kernel
    by convolving basis images), within the certified truncation tol; L is skew, so ``‖y − b‖ = ‖x‖``."""
    layer = lnn.SkewOrthogonalConv2d(channels, kernel, groups, tol=tol, max_norm=max_norm, init_scale=init_scale,
                                     dtype=DT, generator=gen(seed))  # fmt: skip
    perturb_(layer, seed + 1, scale=0.05)
    x = torch.randn(3, channels, size, size, dtype=DT, generator=gen(seed + 2))
    with torch.no_grad():
        L = conv_operator(layer.skew_kernel(), groups, (channels, size, size))
        assert torch.allclose(L, -L.T, atol=1e-12)
        y = (layer(x) - layer.bias[:, None, None]).reshape(3, -1)
    expected = x.reshape(3, -1) @ torch.linalg.matrix_exp(L).T
    xn = torch.linalg.vector_norm(x.reshape(3, -1), dim=1)
    assert bool((torch.linalg.vector_norm(y - expected, dim=1) <= tol * xn + 1e-12 * xn).all())
    assert torch.allclose(torch.linalg.vector_norm(y, dim=1), xn, rtol=tol + 1e-12)


@examples(25)
@given(
    channels=st.sampled_from([4, 8]),
    kernel=st.sampled_from([1, 3]),
    groups=st.sampled_from([1, 2, 4, (2, 4), (4, 1)]),
    size=st.integers(1, 4),
    seed=st.integers(0, 20),
)
def test_gs_orthogonal_conv_is_orthogonal(channels, kernel, groups, size, seed):
    """Without bias the GS orthogonal conv preserves inner products: ``⟨y₁, y₂⟩ = ⟨x₁, x₂⟩`` (to its certified tol)."""
    layer = lnn.GSOrthogonalConv2d(channels, kernel, groups, tol=1e-10, bias=False, dtype=DT, generator=gen(seed))
    perturb_(layer, seed + 1, scale=0.05)
    x = torch.randn(4, channels, size, size, dtype=DT, generator=gen(seed + 2))
    with torch.no_grad():
        y = layer(x).reshape(4, -1)
    X = x.reshape(4, -1)
    assert torch.allclose(y @ y.T, X @ X.T, atol=1e-8 * float((X * X).sum()))


def shuffle_matrix(k, n):
    """The paper's P_(k, n) as a dense matrix (Definition 5.2 with the paper's matrix convention, Prop. 1): a 1 at
    ``(σ(i), i)``, ``σ(i) = (i mod k)·(n/k) + ⌊i/k⌋``, so ``(P x)_{σ(i)} = x_i``. (The legacy shuffle is its
    transpose.)"""
    P = torch.zeros(n, n, dtype=DT)
    for i in range(n):
        P[(i % k) * (n // k) + i // k, i] = 1.0
    return P


@examples(40)
@given(
    n=st.integers(1, 12),
    block=mostly(st.integers(1, 12), st.sampled_from([0, 2.0, None])),
    by_count=st.booleans(),
    map_=st.sampled_from(["cayley", "exp", "neumann"]),
    parametrization=st.sampled_from(["skew", "orthogonal"]),
    batch=st.sampled_from([(), (0,), (3,), (2, 2)]),
    seed=st.integers(0, 20),
)
@example(n=12, block=3, by_count=False, map_="cayley", parametrization="skew", batch=(3,), seed=0)  # b ≠ n/b
@example(n=8, block=4, by_count=True, map_="exp", parametrization="orthogonal", batch=(2, 2), seed=1)  # b = 2
def test_gs_orthogonal(n, block, by_count, map_, parametrization, batch, seed):
    """``Q = Pᵀ L P R`` with P the shuffle and L, R block-diagonal (assembled here from the layer's blocks): the forward
    is ``Q x``, the blocks orthogonal (except the Neumann map's, approximately); or a named error when the blocks do
    not divide n."""
    kwargs = {"nblocks" if by_count else "block_size": block}
    ok = positive(block) and n % block == 0
    layer = check_outcome(
        lambda: lnn.GSOrthogonal(n, map=map_, parametrization=parametrization, dtype=DT, **kwargs),
        [] if ok else ["block", "nblocks"],
    )
    if layer is None:
        return
    perturb_(layer, seed, scale=0.2 if map_ != "neumann" else 0.02)  # (the Neumann series needs ‖K‖_F < 1)
    b = layer.block_size
    with torch.no_grad():
        Lb, Rb = layer.blocks()
        L, R = torch.block_diag(*Lb), torch.block_diag(*Rb)
        P = shuffle_matrix(n // b, n)  # the paper's P_(r, br), r = n/b blocks (sends entry i to σ(i)), gsoft_demo's
        Q = P.T @ L @ P @ R
        x = torch.randn(*batch, n, dtype=DT, generator=gen(seed + 1))
        y = layer(x)
    assert y.shape == x.shape
    assert max_abs(y - x @ Q.T) <= 1e-12 * (1 + max_abs(x))
    if map_ != "neumann" or parametrization == "orthogonal":
        assert torch.allclose(Q.T @ Q, torch.eye(n, dtype=DT), atol=1e-12)


@examples(30)
@given(
    ks=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    b1s=st.lists(st.integers(1, 4), min_size=3, max_size=3),
    b2=st.integers(1, 4),
    shuffle=st.sampled_from([None, "paper", "legacy"]),
    seed=st.integers(0, 20),
)
@example(ks=[2, 2], b1s=[4, 2, 1], b2=2, shuffle=None, seed=0)  # 8 entries, next blocks of width 4: P's differ
@example(ks=[2, 2], b1s=[4, 2, 1], b2=2, shuffle="legacy", seed=0)
def test_gs_matrix_default_perms(ks, b1s, b2, shuffle, seed):
    """``GSMatrix(blocks)`` with default perms is ``B_m P_(k_m, n_m) ⋯ P_(k_2, n_2) B_1``: between two factors the
    paper's P over the next factor's blocks; with ``shuffle="legacy"`` the transpose of P over the previous factor's
    blocks (the earlier default); assembled here. The drawn chain stops at the first k that does not divide the
    previous factor's outputs."""
    g = gen(seed)
    blocks, size = [], None
    for j, k in enumerate(ks):
        inputs = b2 * k if size is None else size
        if inputs % k:  # the chain cannot continue with k blocks: stop there
            break
        blocks.append(torch.randn(k, b1s[j], inputs // k, dtype=DT, generator=g))
        size = k * b1s[j]
    kw = {} if shuffle is None else {"shuffle": shuffle}
    A = lnn.GSMatrix(blocks, **kw)
    ref = torch.block_diag(*blocks[0])
    for prev, B in zip(blocks, blocks[1:]):
        n = prev.shape[0] * prev.shape[1]
        P = shuffle_matrix(prev.shape[0], n).T if shuffle == "legacy" else shuffle_matrix(B.shape[0], n)
        ref = torch.block_diag(*B) @ P @ ref
    assert A.shape == tuple(ref.shape) and torch.allclose(A.to_dense(), ref, atol=1e-12)
    x = torch.randn(3, ref.shape[1], dtype=DT, generator=gen(seed + 1))
    assert torch.allclose(lnn.gs_matmul(x, blocks, **kw), x @ ref.T, atol=1e-12)


def gs_matrix_dense(q):
    """A GSOrthogonal's Q = Pᵀ L P R, assembled here from its blocks."""
    Lb, Rb = q.blocks()
    P = shuffle_matrix(q.nblocks, q.n)  # the paper's P_(r, br), the default since issue 23
    return P.T @ torch.block_diag(*Lb) @ P @ torch.block_diag(*Rb)


@examples(40)
@given(
    sizes=st.lists(st.sampled_from([2, 3, 4, 6, 8]), min_size=3, max_size=3),
    block=st.sampled_from([{"block_size": 1}, {"block_size": 2}, {"block_size": 4}, {"r": 2}, {"r": 1}]),
    double=st.booleans(),
    scale=st.booleans(),
    targets=st.sampled_from(["all-linear", ["0"], ["2"], ["3"], r"[02]"]),
    seed=st.integers(0, 20),
)
def test_gsoft_inject_merge_unmerge(sizes, block, double, scale, targets, seed):
    """convert_to_gsoft on a small MLP: the model is unchanged at injection; after adapter steps each adapted layer
    computes ``diag(s) Q_out W Q_in x + b`` (Q assembled here from the blocks); merging gives the same outputs with that
    weight written into the base layer, unmerging restores the base weight; and a config that does not fit the model
    raises a named error and leaves the model as it was (same outputs, nothing frozen, nothing wrapped)."""
    a, b, c = sizes
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(a, b), torch.nn.Tanh(), torch.nn.Linear(b, c)).double()
    x = torch.randn(5, a, dtype=DT, generator=gen(seed))
    with torch.no_grad():
        base_out = model(x)
    names = [n for n in ("0", "2") if targets == "all-linear" or n in targets or (isinstance(targets, str)
             and targets != "all-linear")]  # fmt: skip
    config = lnn.GSOFTConfig(target_modules=targets, double=double, scale=scale, **block)
    fits = all(config_block_fits(block, n) for name in names for n in layer_sizes(model, name, double))
    problems = []
    if not names:
        problems.append("target_modules")
    elif not fits:
        problems += ["block_size", "r", "divisible"]
    wrapped = check_outcome(lambda: lnn.convert_to_gsoft(model, config), problems)
    if wrapped is None:
        assert not any(isinstance(m, lnn.GSOFTLinear) for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())
        assert torch.equal(model(x), base_out)
        return
    assert sorted(wrapped) == names
    assert all(p.requires_grad == (".gsoft_" in f".{n}") for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.allclose(model(x), base_out, rtol=0, atol=1e-12)
        perturb_(model, seed + 1, scale=0.2)  # (only the adapters are trainable; the frozen weights move too here)
        adapted = {}
        for name in names:
            layer = wrapped[name]
            W = layer.base_layer.weight
            Wp = W @ gs_matrix_dense(layer.gsoft_in)
            if layer.gsoft_out is not None:
                Wp = gs_matrix_dense(layer.gsoft_out) @ Wp
            adapted[name] = Wp * (layer.gsoft_scale[:, None] if layer.gsoft_scale is not None else 1)
        h = x
        for name in ("0", "1", "2"):
            module = model.get_submodule(name)
            if name in adapted:
                h = h @ adapted[name].T + module.base_layer.bias
            else:
                h = module(h) if name == "1" else h @ module.weight.T + module.bias
        assert torch.allclose(model(x), h, rtol=1e-12, atol=1e-12)
        frozen = {name: wrapped[name].base_layer.weight.clone() for name in names}
        lnn.merge_adapter(model)
        for name in names:
            assert torch.allclose(wrapped[name].base_layer.weight, adapted[name], rtol=1e-12, atol=1e-12)
        assert torch.allclose(model(x), h, rtol=1e-12, atol=1e-12)
        lnn.unmerge_adapter(model)
        for name in names:
            assert torch.allclose(wrapped[name].base_layer.weight, frozen[name], rtol=1e-12, atol=1e-13)


def layer_sizes(model, name, double):
    linear = model.get_submodule(name)
    return [linear.in_features] + ([linear.out_features] if double else [])


def config_block_fits(block, n):
    size = block["block_size"] if "block_size" in block else (n // block["r"] if n % block["r"] == 0 else 0)
    return size >= 1 and n % size == 0


def ring_weight(factory, key, c_out, c_in):
    """A T-Basis linear weight from the definition: ``W[o, i] = Tr(Π_k ρ_k C_k[:, o_k n + i_k, :])`` with
    ``C_k = Σ_β α_kβ B_β``, ``ρ_k = diag(exp λ_k)`` and ``o_k``, ``i_k`` the k-th base-n digits (most significant
    first) of o and i."""
    n = factory.n
    alpha, lam = factory.coefficients[key].double(), factory.log_adapters[key].double()
    cores = torch.einsum("kb,brns->krns", alpha, factory.tbasis.basis.double()) * lam.exp()[:, :, None, None]
    m = len(cores)
    W = torch.zeros(c_out, c_in, dtype=DT)
    for o in range(c_out):
        for i in range(c_in):
            prod = torch.eye(factory.rank, dtype=DT)
            for k in range(m):
                ok, ik = (o // n ** (m - 1 - k)) % n, (i // n ** (m - 1 - k)) % n
                prod = prod @ cores[k, :, ok * n + ik, :]
            W[o, i] = torch.trace(prod)
    return W


@examples(20)
@given(
    c_out=st.integers(1, 6),
    c_in=st.integers(1, 6),
    basis_size=st.integers(1, 4),
    rank=st.integers(1, 3),
    mode_size=st.sampled_from([4, 9]),
    seed=st.integers(0, 20),
)
def test_tbasis_linear_is_the_tensor_ring_of_its_definition(c_out, c_in, basis_size, rank, mode_size, seed):
    """The decompressed weight of a T-Basis linear layer equals the ring traces of the definition (computed here entry
    by entry), and the layer computes ``x Wᵀ + b``."""
    factory = lnn.TBasisFactory(lnn.TBasis(basis_size, rank, mode_size, dtype=DT, generator=gen(seed)))
    factory.add("fc", (c_out, c_in), 0.5, generator=gen(seed + 1))
    perturb_(factory, seed + 2, scale=0.1)
    bias = torch.randn(c_out, dtype=DT, generator=gen(seed + 3))
    layer = lnn.TBasisLinear(factory, "fc", bias)
    x = torch.randn(3, c_in, dtype=DT, generator=gen(seed + 4))
    with torch.no_grad():
        W = ring_weight(factory, "fc", c_out, c_in)
        assert torch.allclose(layer.weight, W, rtol=1e-10, atol=1e-12)
        assert torch.allclose(layer(x), x @ W.T + bias, rtol=1e-10, atol=1e-12)


def test_converters_check_the_rank_even_with_nothing_to_convert():
    """Was: ``tt_conv_convert(mlp, 0)`` (no conv in the model) and ``sttp_convert(model_without_linears, "x")``
    returned {} without a word: the bad rank surfaced only once a model had a layer to convert."""
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match="rank"):
        lnn.convert_to_tt_conv(mlp, 0)
    with pytest.raises(ValueError, match="rank"):
        lnn.convert_to_sttp(torch.nn.Sequential(torch.nn.ReLU()), "x")


def small_net(kind, seed):
    torch.manual_seed(seed)
    if kind == "mlp":
        return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)).double(), (5, 6)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1, stride=2))
    return conv.double(), (2, 3, 5, 5)


@examples(20)
@given(
    kind=st.sampled_from(["mlp", "cnn"]),
    converter=st.sampled_from(["sttp", "svdp", "tt_conv", "tbasis"]),
    rank=mostly(st.just(64), st.sampled_from([0, 2.5, "full"])),
    seed=st.integers(0, 20),
)
def test_converted_models(kind, converter, rank, seed):
    """Converters at full rank reproduce the model's outputs (STTP / SVDP, TT conv); T-Basis with init="match" keeps
    each converted weight's standard deviation; a bad rank is named and leaves the model unchanged."""
    model, shape = small_net(kind, seed)
    x = torch.randn(*shape, dtype=DT, generator=gen(seed))
    with torch.no_grad():
        before = model(x)
        stds = {name: float(m.weight.std()) for name, m in model.named_children() if hasattr(m, "weight")}
    convert = {
        "sttp": lambda: lnn.convert_to_sttp(model, rank),
        "svdp": lambda: lnn.convert_to_sttp(model, rank, svdp=True),
        "tt_conv": lambda: lnn.convert_to_tt_conv(model, rank),
        "tbasis": lambda: lnn.convert_to_tbasis(model, 3, rank if rank != 64 else 2, init="match", generator=gen(seed)),
    }[converter]
    out = check_outcome(convert, [] if positive(rank) else ["rank"])
    with torch.no_grad():
        after = model(x)
    if out is None or (converter == "tt_conv" and kind == "mlp"):  # (no conv to convert: the model is unchanged)
        assert torch.equal(after, before)
        return
    if converter == "tbasis":
        for name, std in stds.items():
            assert float(model.get_submodule(name).weight.std()) == pytest.approx(std, rel=1e-6)
        return
    assert torch.allclose(after, before, rtol=1e-10, atol=1e-12)


# ============================================================================================== distributed, demo
def test_shard_and_demo_name_bad_arguments():
    """Was: ``shard(5, 0.5, 2)`` returned ``slice(1.5, 4.5)``, ``shard(2.5, 0, 2)`` a float slice, ``shard(5, 0, 0)``
    blamed the rank and ``shard(5, None, 2)`` compared int and None; ``run_tt_completion(d=2.5)`` gave "can't multiply
    sequence by non-int", ``seed=2.5`` torch's RuntimeError from manual_seed and ``oversampling=nan`` "cannot convert
    float NaN to integer"."""
    for args, name in (((5, 0.5, 2), "rank"), ((2.5, 0, 2), "n"), ((5, 0, 0), "world_size"), ((5, None, 2), "rank"),
                       ((5, 0, 2.0), "world_size"), ((-1, 0, 2), "n")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            shard(*args)
    small = dict(d=3, n=4, rank=2, iters=1, test_samples=10, log=None)
    for kwargs, name in (({"d": 2.5}, "d"), ({"seed": 2.5}, "seed"), ({"seed": None}, "seed"),
                         ({"oversampling": math.nan}, "oversampling"), ({"print_every": 2.5}, "print_every"),
                         ({"warmup_iters": -1}, "warmup_iters")):  # fmt: skip
        with pytest.raises((TypeError, ValueError), match=name):
            demo.run_tt_completion(**{**small, **kwargs})


@examples(60)
@given(
    n=mostly(st.integers(0, 30), st.sampled_from([-1, 2.5, None])),
    world=mostly(st.integers(1, 7), st.sampled_from([0, 1.0, True])),
    rank=mostly(st.integers(0, 7), st.sampled_from([-1, 0.5, None])),
)
def test_shard(n, world, rank):
    """The shards of ``range(n)`` over ``world`` ranks are contiguous, disjoint, cover it and differ in size by at most
    one; or a named error."""
    problems = []
    if not (type(n) is int and n >= 0):
        problems.append("n")
    if not (type(world) is int and world >= 1):
        problems.append("world_size")
    if not (type(rank) is int and rank >= 0 and (type(world) is not int or rank < world)):
        problems.append("rank")
    part = check_outcome(lambda: shard(n, rank, world), problems)
    if part is None:
        return
    parts = [range(n)[shard(n, r, world)] for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert range(n)[part] == parts[rank]
