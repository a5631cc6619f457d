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
from hypothesis import event, given, settings
from hypothesis import strategies as st
from reference import matrix_projector

from lowrankopt import FixedRankMatrices, minimize

DT = torch.float64
# Status codes as documented in OptimizeResult (written out here, not imported from the code under test).
SUCCESS_STATUSES = {0, 3, 4, 6}
DOCUMENTED_STATUSES = {-1, 0, 1, 2, 3, 4, 5, 6}


def examples(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def check_outcome(call, problems):
    """``call()`` when ``problems`` (names of the invalid arguments) is empty; else assert that it raises a
    ValueError / TypeError naming one of them (any other exception propagates: the test fails)."""
    event("valid input" if not problems else "invalid input")  # shown by --hypothesis-show-statistics
    if not problems:
        return call()
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert any(name in str(info.value) for name in problems), f"{info.value!r} names none of {problems}"
    return None


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
    x0 = FixedRankMatrices(*SHAPE, RANK).random_point(generator=g)
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
