"""Bad input to the formats and manifolds: every public constructor and factory refuses it with a ValueError /
TypeError that names the argument, and integer-like input (numpy / torch integer scalars) is accepted.

The first part holds one regression test per defect of issue 18; the second part is property-based (hypothesis):
over random shapes, ranks, dtypes and entries, valid and invalid, the result is either correct (checked against a
dense reference computed here) or a ValueError / TypeError naming the argument."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lro_testing import check_outcome, examples
from reference import matrix_projector, tt_full, tt_projector

from lowrankopt import FixedRankMatrices, FixedTTRank, LowRankMatrix, TangentVector, TensorRing, TensorTrain, TTMatrix
from lowrankopt.completion import complete, sample_indices

DT = torch.float64
UNSUPPORTED = [torch.float16, torch.bfloat16, torch.complex64, torch.complex128, torch.int64]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ constructors and factories
FACTORIES = {
    "LowRankMatrix.random": lambda **kw: LowRankMatrix.random(5, 4, 2, **kw),
    "TensorTrain.random": lambda **kw: TensorTrain.random([3, 4, 2], 2, **kw),
    "TTMatrix.random": lambda **kw: TTMatrix.random([2, 3], [3, 2], 2, **kw),
    "TensorRing.random": lambda **kw: TensorRing.random([3, 4, 2], 2, **kw),
    "FixedRankMatrices.random_point": lambda **kw: FixedRankMatrices(5, 4, 2).random_point(**kw),
    "FixedTTRank.random_point": lambda **kw: FixedTTRank([3, 4, 2], 2).random_point(**kw),
}


@pytest.mark.parametrize("dtype", UNSUPPORTED, ids=str)
@pytest.mark.parametrize("factory", FACTORIES)
def test_factories_refuse_half_complex_and_integer_dtypes(factory, dtype):
    with pytest.raises(TypeError, match=r"dtype must be float32 or float64, got torch\."):
        FACTORIES[factory](dtype=dtype)


@pytest.mark.parametrize("factory", FACTORIES)
def test_factories_name_a_bad_device_or_generator(factory):
    with pytest.raises(ValueError, match="device"):
        FACTORIES[factory](device="no-such-device")
    with pytest.raises(TypeError, match="generator"):
        FACTORIES[factory](generator=0)


def test_ttmatrix_random_refuses_row_and_col_shapes_of_different_lengths():
    with pytest.raises(ValueError, match="row_shape.*col_shape"):
        TTMatrix.random([2, 3, 4], [2, 3], 2)  # the third row mode was silently dropped
    with pytest.raises(ValueError, match="row_shape.*col_shape"):
        TTMatrix.from_dense(torch.randn(24, 6, dtype=DT), [2, 3, 4], [2, 3])


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: TensorTrain.random([4.9, 3], 2), r"shape\[0\]"),
        (lambda: TensorTrain.random([4.0, 3], 2), r"shape\[0\]"),  # integral floats too: a shape is ints
        (lambda: TensorRing.random([3, 4.9], 2), r"shape\[1\]"),
        (lambda: TTMatrix.random([2, 3.5], [2, 3], 2), r"row_shape\[1\]"),
        (lambda: TTMatrix.from_dense(torch.randn(6, 6, dtype=DT), [2, 3], [2.0, 3]), r"col_shape\[0\]"),
        (lambda: sample_indices([10.7, 10], 5), r"shape\[0\]"),
        (lambda: complete(torch.tensor([[0, 0], [5, 4]]), torch.ones(2, dtype=DT), [6.9, 5], 1), r"shape\[0\]"),
        (lambda: LowRankMatrix.random(4.0, 3, 2), "m"),
        (lambda: FixedRankMatrices(4, 3.0, 2), "n"),
        (lambda: FixedTTRank([4.9, 3], 2), r"shape\[0\]"),
    ],
)
def test_float_shapes_are_refused_not_truncated(call, name):
    with pytest.raises(ValueError, match=name):
        call()


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: TensorTrain.random([3, 4], True), "ranks"),
        (lambda: TensorTrain.random([3, True], 1), r"shape\[1\]"),
        (lambda: TensorTrain.random([3, 0], 1), r"shape\[1\]"),
        (lambda: TensorTrain.random([3, -2], 1), r"shape\[1\]"),
        (lambda: TensorTrain.random([], 1), "shape"),
        (lambda: TensorTrain.random(5, 1), "shape"),
        (lambda: TensorTrain.random([3, 4], [0]), r"ranks\[0\]"),
        (lambda: TensorRing.random([3, 4], 0), "rank"),
        (lambda: TensorRing.random([3, 4], np.bool_(True)), "rank"),
        (lambda: LowRankMatrix.random(5, 4, torch.tensor(True)), "rank"),
        (lambda: LowRankMatrix.random(5, -4, 2), "n"),
        (lambda: LowRankMatrix.random(5, 4, 5), "rank"),
        (lambda: FixedTTRank([3, 4], 2.5), "ranks"),
        (lambda: FixedTTRank([3, 4, 5], [2, 2.5]), r"ranks\[1\]"),
        (lambda: FixedRankMatrices(5, 4, False), "rank"),
        (lambda: TensorTrain.from_dense(torch.randn(3, 4, dtype=DT), max_rank=1.5), "max_rank"),
        (lambda: TensorTrain.from_dense(torch.randn(3, 4, dtype=DT), eps=math.nan), "eps"),
        (lambda: TensorTrain.from_dense(torch.randn(3, 4, dtype=DT), eps=True), "eps"),
        (lambda: TensorRing.from_dense(torch.randn(3, 4, dtype=DT), max_rank=2.0), "max_rank"),
        (lambda: LowRankMatrix.from_dense(torch.randn(3, 4, dtype=DT), 2.0), "rank"),
    ],
)
def test_bool_zero_negative_and_float_sizes_are_refused(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_numpy_and_torch_integer_scalars_are_accepted_as_sizes():
    A = torch.randn(3, 4, 5, dtype=DT, generator=gen())
    x = TensorTrain.random(np.array([3, 4, 5]), np.int64(2), generator=gen(), dtype=torch.float64)
    assert x.shape == (3, 4, 5) and x.ranks == (2, 2)
    assert TensorTrain.random(torch.tensor([3, 4]), torch.tensor(2), dtype=torch.float64).shape == (3, 4)
    assert TensorTrain.from_dense(A, max_rank=np.int32(2)).ranks == (2, 2)
    assert TensorRing.from_dense(A, max_rank=np.int64(1)).ranks == (1, 1, 1)
    assert TensorRing.random((np.int64(3), 4), np.int16(2), dtype=torch.float64).ranks == (2, 2)
    assert LowRankMatrix.random(np.int64(5), np.int32(4), np.int64(2), dtype=torch.float64).shape == (5, 4)
    assert LowRankMatrix.from_dense(A[0], np.int64(2)).rank == 2
    M = FixedTTRank((np.int64(3), 4, 5), np.int64(2))
    assert M.shape == (3, 4, 5) and M.ranks == (2, 2) and all(type(n) is int for n in M.shape + M.ranks)
    assert M == FixedTTRank((3, 4, 5), 2) and hash(M) == hash(FixedTTRank((3, 4, 5), 2))
    assert FixedTTRank([3, 4, 5], [np.int64(2), torch.tensor(3)]).ranks == (2, 3)
    N = FixedRankMatrices(np.int64(5), 4, torch.tensor(2))
    assert (N.m, N.n, N.rank) == (5, 4, 2) and type(N.rank) is int
    idx = sample_indices(np.array([4, 5]), np.int64(7), generator=gen())
    assert idx.shape == (7, 2)


def test_sample_indices_names_a_negative_shape():
    with pytest.raises(ValueError, match=r"shape\[1\] must be a positive int, got -3"):
        sample_indices([10, -3], 0)  # was: "count must be in [0, -30]"


def test_lowrank_gather_with_rows_and_cols_of_different_lengths():
    x = LowRankMatrix.random(5, 4, 2, generator=gen(), dtype=torch.float64)
    with pytest.raises(ValueError, match="rows and cols"):
        x.gather(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    rows, cols = torch.tensor([0, 4, 2]), torch.tensor([3, 0, 1])
    assert torch.allclose(x.gather(rows, cols), (x.U @ x.S @ x.V.T)[rows, cols], atol=1e-14)


def test_found_by_the_property_tests():
    """Defects the hypothesis tests below found (each was an exception from inside torch)."""
    x = LowRankMatrix.random(5, 4, 2, generator=gen(), dtype=torch.float64)
    with pytest.raises(TypeError, match="other has dtype torch.float32 but X has torch.float64"):
        x.inner(torch.randn(5, 4))  # was torch's matmul dtype error
    assert x.gather([], []).shape == (0,)  # was "(rows, cols) must be an integer tensor, got torch.float32"
    assert TensorTrain.random([3, 4], 2, dtype=torch.float64).gather([]).shape == (0,)
    with pytest.raises(ValueError, match="device must be a torch.device or a device string"):
        x.to("float64")  # a string is a device for Tensor.to; was torch's "Invalid device string"


def test_division_by_zero_and_by_tiny_scalars():
    """Found by the property tests: x / 0 was a ZeroDivisionError, and x / 1e-310 was refused ("alpha must be
    finite, got inf": the reciprocal overflowed) even where the quotient is representable."""
    g = gen(2)
    M = FixedTTRank([3, 4], 2)
    y = M.random_point(generator=g, dtype=torch.float64)
    objects = [
        LowRankMatrix.random(5, 4, 2, generator=g, dtype=torch.float64),
        TensorTrain.random([3, 4], 2, generator=g, dtype=torch.float64),
    ]
    for x in [*objects, M.random_tangent(y, generator=g)]:
        for zero in (0, 0.0, torch.tensor(0.0, dtype=DT)):
            with pytest.raises(ValueError, match="alpha must be nonzero"):
                x / zero
    for x in objects:
        tiny = x * 1e-300
        quotient = (tiny / 1e-310).full()
        assert torch.isfinite(quotient).all() and torch.allclose(quotient, x.full() * 1e10, rtol=1e-12)


# -------------------------------------------------------------------------------------------- half precision
def points():
    g = gen(1)
    return {
        "LowRankMatrix": LowRankMatrix.random(5, 4, 2, generator=g, dtype=torch.float64),
        "TensorTrain": TensorTrain.random([3, 4, 2], 2, generator=g, dtype=torch.float64),
        "TensorRing": TensorRing.random([3, 4, 2], 2, generator=g, dtype=torch.float64),
        "TTMatrix": TTMatrix.random([2, 3], [3, 2], 2, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize("dtype", UNSUPPORTED, ids=str)
@pytest.mark.parametrize("kind", ["LowRankMatrix", "TensorTrain", "TensorRing", "TTMatrix"])
def test_to_refuses_half_complex_and_integer_dtypes(kind, dtype):
    x = points()[kind]
    for call in (lambda: x.to(dtype), lambda: x.to(dtype=dtype), lambda: x.to("cpu", dtype)):
        with pytest.raises(TypeError, match=r"dtype must be float32 or float64, got torch\."):
            call()
    y = x.to(torch.float32)  # the supported casts still work, and round-trip
    assert y.dtype == torch.float32 and x.to(device="cpu").dtype == DT


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_is_refused_with_one_message_everywhere(dtype):
    """Constructors, from_dense and the manifolds' point checks say the same thing (torch's QR/LU have no half
    kernels on the CPU, so accepting half tensors would fail later, deep inside)."""
    A = torch.randn(6, 4, dtype=dtype)
    calls = [
        lambda: LowRankMatrix(A[:, :2], torch.ones(2, dtype=dtype), A[:4, 2:]),
        lambda: LowRankMatrix.from_dense(A, 2),
        lambda: TensorTrain([A.reshape(1, 6, 4), A.T.reshape(4, 6, 1)]),
        lambda: TensorTrain.from_dense(A),
        lambda: TensorRing.from_dense(A),
        lambda: TTMatrix.from_dense(A, [6], [4]),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=rf"must be float32 or float64, got {dtype}.*half precision"):
            call()


# ==================================================================================== property-based (hypothesis)
# Each property draws arguments that are valid or not; the test computes which are invalid (independently of the
# code) and then asserts: no invalid argument -> a result equal to a dense reference computed here; some invalid
# argument -> a ValueError / TypeError whose message names one of them. Any other exception fails the test.
# derandomize: the same examples on every run (CI is deterministic); database=None: nothing written to the tree.
def valid_size(lo=1, hi=4):
    """``(value, int)``: an int in [lo, hi] as a Python, numpy or torch integer."""
    kinds = (int, np.int64, np.int32, torch.tensor)
    return st.tuples(st.integers(lo, hi), st.sampled_from(kinds)).map(lambda p: (p[1](p[0]), p[0]))


INVALID_SIZE = st.sampled_from(
    [
        0,
        -1,
        -3,
        2.0,
        2.5,
        4.9,
        math.nan,
        math.inf,
        True,
        False,
        None,
        "3",
        np.bool_(True),
        np.float64(2.0),
        torch.tensor(2.0),
        torch.tensor(True),
        torch.tensor([2]),
        np.array([2]),
    ]
).map(lambda v: (v, None))


def mostly(valid, bad, one_in=10):
    """Draws of ``valid``, and of ``bad`` about once in ``one_in`` (so that examples with several arguments are valid
    often enough to check the results too)."""
    # (a middle index: hypothesis favours the ends of a range, so "bad" would come far more often at one of them)
    return st.sampled_from([False] * (one_in // 2) + [True] + [False] * (one_in - one_in // 2 - 1)).flatmap(
        lambda is_bad: bad if is_bad else valid
    )


def size(lo=1, hi=4):
    """``(value, int or None)``: valid sizes (of several integer types), sometimes invalid ones (None)."""
    return mostly(valid_size(lo, hi), INVALID_SIZE)


def shape_arg(min_d=1, max_d=4, hi=4):
    """``(value, list of ints or None)`` for a shape argument."""
    entries = st.lists(size(1, hi), min_size=min_d, max_size=max_d).map(
        lambda items: ([v for v, _ in items], None if any(n is None for _, n in items) else [n for _, n in items])
    )
    return mostly(entries, st.sampled_from([([], None), (5, None), ("34", None)]))


RANK_ARG = st.tuples(
    st.sampled_from(["one", "each"]),  # one size for every bond, or a list with one per bond
    st.lists(size(1, 3), min_size=4, max_size=4),
    mostly(st.just(0), st.sampled_from([-1, 1])),  # the list's length is off by this
)


def rank_arg(drawn, d):
    """``(value, list of d - 1 ints or None)`` from a RANK_ARG draw, for d modes (None: an invalid shape)."""
    kind, items, off = drawn
    if kind == "one":
        value, n = items[0]
        return value, (None if n is None or d is None else [n] * (d - 1))
    items = items[: max((d or 2) - 1 + off, 0)]
    ns = [n for _, n in items]
    return [v for v, _ in items], (ns if d is not None and len(ns) == d - 1 and None not in ns else None)


OK_DTYPES = [torch.float64, torch.float32]
BAD_DTYPES = [torch.float16, torch.bfloat16, torch.complex64, torch.int64]
DTYPE = mostly(st.sampled_from(OK_DTYPES), st.sampled_from([*BAD_DTYPES, "float64"]), 5)  # a dtype argument
TENSOR_DTYPE = mostly(st.sampled_from(OK_DTYPES), st.sampled_from(BAD_DTYPES), 5)  # the dtype of a tensor


def dtype_ok(dtype):
    return dtype in (torch.float32, torch.float64)


def tol(dtype):
    return 1e-4 if dtype == torch.float32 else 1e-11


def invalid(**args):
    """The names whose validity flag is False."""
    return [name for name, ok in args.items() if not ok]


def unfolding_ranks(D, tolerance):
    """Numerical ranks of the d - 1 unfoldings of the dense tensor D (dense SVDs)."""
    out = []
    for k in range(1, D.dim()):
        s = torch.linalg.svdvals(D.reshape(math.prod(D.shape[:k]), -1).double())
        out.append(int((s > tolerance * s[0]).sum()) if s[0] > 0 else 0)
    return out


def unfolding_tails(D, ranks):
    """‖tail‖ of the singular values of unfolding k beyond ranks[k - 1]: the TT-SVD error is at most their
    root-sum-square (Oseledets 2011, Thm 2.2)."""
    tails = []
    for k, r in enumerate(ranks, start=1):
        s = torch.linalg.svdvals(D.reshape(math.prod(D.shape[:k]), -1).double())
        tails.append(float(s[r:].norm()))
    return math.sqrt(sum(t * t for t in tails))


def ring_dense(cores):
    """Σ over the bonds of Π_k G_k[a_k, i_k, a_{k+1}] with a_{d+1} = a_1: a running product, traced at the end."""
    P = cores[0].double()  # (a_1, n_1, a_2)
    for c in cores[1:]:
        P = torch.einsum("a...b,bjc->a...jc", P, c.double())
    return torch.einsum("a...a->...", P)


@examples(60)
@given(shape=shape_arg(), ranks=RANK_ARG, dtype=DTYPE, seed=st.integers(0, 999))
def test_property_tensor_train_random(shape, ranks, dtype, seed):
    (shape, n), d = shape, (len(shape[0]) if isinstance(shape[0], list) and shape[1] is not None else None)
    ranks, r = rank_arg(ranks, d)
    problems = invalid(shape=n is not None, ranks=r is not None, dtype=dtype_ok(dtype))
    call = lambda: TensorTrain.random(shape, ranks, dtype=dtype, generator=gen(seed))  # noqa: E731
    x = check_outcome(call, problems + (["shape"] if "ranks" in problems else []))
    if x is None:
        return
    D = tt_full(x.cores)
    assert x.shape == tuple(n) and x.dtype == dtype and torch.allclose(x.full(), D, rtol=tol(dtype), atol=0)
    # ranks clipped to the largest the shape allows: bond k is at most R_j times the modes between bonds j and k
    R = [1, *r, 1]
    reach = [[R[j] * math.prod(n[min(j, k) : max(j, k)]) for j in range(d + 1)] for k in range(1, d)]
    assert list(x.ranks) == [min(row) for row in reach]
    assert unfolding_ranks(D, 1e-4) == list(x.ranks)


@examples(30)
@given(
    rows=shape_arg(1, 3, 3),
    cols=shape_arg(3, 3, 3),
    cols_count=mostly(st.none(), st.integers(1, 3)),  # None: as many column modes as row modes
    ranks=RANK_ARG,
    dtype=DTYPE,
    seed=st.integers(0, 999),
)
def test_property_tt_matrix_random_and_matvec(rows, cols, cols_count, ranks, dtype, seed):
    (row_shape, m), (col_shape, n) = rows, cols
    if isinstance(col_shape, list):
        count = len(row_shape) if cols_count is None and isinstance(row_shape, list) else (cols_count or 3)
        col_shape, n = col_shape[:count], (None if n is None else n[:count])
    same = m is not None and n is not None and len(m) == len(n)
    ranks, r = rank_arg(ranks, len(m) if same else None)
    problems = invalid(row_shape=m is not None, col_shape=n is not None and same, ranks=r is not None)
    problems += invalid(dtype=dtype_ok(dtype))
    call = lambda: TTMatrix.random(row_shape, col_shape, ranks, dtype=dtype, generator=gen(seed))  # noqa: E731
    A = check_outcome(call, problems + (["row_shape", "col_shape"] if "ranks" in problems else []))
    if A is None:
        return
    d = len(m)
    merged = tt_full([c.reshape(c.shape[0], -1, c.shape[3]) for c in A.cores])  # modes (m_k n_k), merged
    dense = merged.reshape([s for k in range(d) for s in (m[k], n[k])])
    dense = dense.permute([2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]).reshape(math.prod(m), -1)
    assert A.row_shape == tuple(m) and A.col_shape == tuple(n) and A.dtype == dtype
    assert torch.allclose(A.full(), dense, rtol=tol(dtype), atol=tol(dtype))
    X = torch.randn(3, math.prod(n), dtype=dtype, generator=gen(seed))
    assert torch.allclose(A.matvec(X), X @ dense.T, rtol=10 * tol(dtype), atol=10 * tol(dtype))


@examples(30)
@given(shape=shape_arg(1, 4, 3), rank=size(1, 3), dtype=DTYPE, seed=st.integers(0, 999))
def test_property_tensor_ring_random(shape, rank, dtype, seed):
    (shape, n), (rank, r) = shape, rank
    problems = invalid(shape=n is not None, rank=r is not None, dtype=dtype_ok(dtype))
    x = check_outcome(lambda: TensorRing.random(shape, rank, dtype=dtype, generator=gen(seed)), problems)
    if x is None:
        return
    assert x.shape == tuple(n) and x.ranks == (r,) * len(n) and x.dtype == dtype
    assert torch.allclose(x.full().double(), ring_dense(x.cores), rtol=tol(dtype), atol=tol(dtype))


@examples(40)
@given(m=size(1, 6), n=size(1, 6), rank=size(1, 4), dtype=DTYPE, seed=st.integers(0, 999))
def test_property_low_rank_matrix_random_and_manifold(m, n, rank, dtype, seed):
    (m, mm), (n, nn), (rank, r) = m, n, rank
    fits = None not in (mm, nn, r) and r <= min(mm, nn)
    problems = invalid(m=mm is not None, n=nn is not None, rank=r is not None and fits, dtype=dtype_ok(dtype))
    X = check_outcome(lambda: LowRankMatrix.random(m, n, rank, dtype=dtype, generator=gen(seed)), problems)
    M = check_outcome(lambda: FixedRankMatrices(m, n, rank), [p for p in problems if p != "dtype"])
    if X is None:
        return
    eye = torch.eye(r, dtype=dtype)
    assert X.shape == (mm, nn) and X.rank == r and X.dtype == dtype
    assert torch.allclose(X.U.T @ X.U, eye, atol=tol(dtype)) and torch.allclose(X.V.T @ X.V, eye, atol=tol(dtype))
    assert torch.linalg.matrix_rank(X.full().double(), rtol=tol(dtype)) == r
    y = M.random_point(dtype=dtype, generator=gen(seed + 1))
    assert M.dim == (mm + nn - r) * r and torch.linalg.matrix_rank(y.full().double(), rtol=tol(dtype)) == r


@examples(40)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    fmt=st.sampled_from(["tt", "tr"]),
    max_rank=st.one_of(st.none(), st.none(), RANK_ARG),
    eps=mostly(st.one_of(st.none(), st.floats(0, 0.5)), st.sampled_from([-0.1, math.nan, math.inf, True, "0.1"]), 5),
    dtype=TENSOR_DTYPE,
    seed=st.integers(0, 999),
)
def test_property_from_dense_meets_its_error_bound(shape, fmt, max_rank, eps, dtype, seed):
    d = len(shape)
    A = torch.randn(shape, dtype=torch.float64, generator=gen(seed)).to(dtype)
    if max_rank is None:
        max_rank, caps = None, None
    elif fmt == "tt":
        max_rank, caps = rank_arg(max_rank, d)
    else:  # a tensor ring takes one cap for every rank, not a list
        kind, items, _ = max_rank
        max_rank, cap = items[0] if kind == "one" else ([v for v, _ in items], None)
        caps = None if cap is None else [cap] * d
    eps_ok = eps is None or (type(eps) is float and 0 <= eps < math.inf)
    problems = invalid(A=dtype_ok(dtype) and (fmt == "tt" or d >= 2), max_rank=max_rank is None or caps is not None)
    problems += invalid(eps=eps_ok)
    cls = TensorTrain if fmt == "tt" else TensorRing
    x = check_outcome(lambda: cls.from_dense(A, max_rank=max_rank, eps=eps), problems)
    if x is None:
        return
    err = float(torch.linalg.vector_norm(x.full().double() - A.double()))
    norm = float(torch.linalg.vector_norm(A.double()))
    slack = 10 * tol(dtype) * norm
    if caps is not None:
        assert all(r <= c for r, c in zip(x.ranks, caps))
    elif eps is not None or fmt == "tt":
        assert err <= (eps or 0.0) * norm + slack  # exact when eps is None (and no cap)
    if fmt == "tt":
        assert err <= unfolding_tails(A, x.ranks) * (1 + 1e-6) + slack  # Oseledets' bound with the ranks it chose


@examples(60)
@given(shape=shape_arg(2, 4, 4), ranks=RANK_ARG, dtype=DTYPE, seed=st.integers(0, 999))
def test_property_fixed_tt_rank_and_random_point(shape, ranks, dtype, seed):
    (shape, n) = shape
    d = len(n) if n is not None else None
    ranks, r = rank_arg(ranks, d)
    attainable = None not in (n, r) and d >= 2
    if attainable:
        full = [1, *r, 1]
        attainable = all(full[k] <= full[k - 1] * n[k - 1] and full[k] <= n[k] * full[k + 1] for k in range(1, d))
    problems = invalid(shape=n is not None and d >= 2, ranks=r is not None and attainable)
    M = check_outcome(lambda: FixedTTRank(shape, ranks), problems + (["shape"] if "ranks" in problems else []))
    if M is None:
        return
    assert M.shape == tuple(n) and M.ranks == tuple(r)
    x = check_outcome(lambda: M.random_point(dtype=dtype, generator=gen(seed)), invalid(dtype=dtype_ok(dtype)))
    if x is None:
        return
    D = tt_full(x.cores).double()
    assert x.dtype == dtype and unfolding_ranks(D, 1e-4) == list(r)
    assert abs(float(torch.linalg.vector_norm(D)) - 1) < tol(dtype)
    assert M.dim == round(float(torch.trace(tt_projector(x.to(torch.float64)))))


def manifold_point(kind, dtype, seed):
    g = gen(seed)
    if kind == "matrix":
        M = FixedRankMatrices(5, 4, 2)
        x = M.random_point(dtype=dtype, generator=g)
        return M, x, lambda y: matrix_projector(y.full().double(), 2)
    M = FixedTTRank((3, 2, 3), (2, 2))
    x = TensorTrain.random(M.shape, 2, dtype=dtype, generator=g)  # a generic, non-canonical representation
    return M, x, lambda y: tt_projector(y.to(torch.float64))


def flat(v):
    return v.to_ambient().full().double().reshape(-1)


@examples(60)
@given(
    kind=st.sampled_from(["matrix", "tt"]),
    point_dtype=st.sampled_from([torch.float64, torch.float32]),
    defect=st.sampled_from([None] * 6 + ["other float dtype", *BAD_DTYPES, "meta device", "shape", "nan", "inf"]),
    seed=st.integers(0, 999),
)
def test_property_tangent_from_coordinates(kind, point_dtype, defect, seed):
    M, x, P = manifold_point(kind, point_dtype, seed)
    shapes = [c.shape for c in M.zero_tangent(x).coords]
    if defect == "shape":
        shapes[-1] = (*shapes[-1][:-1], shapes[-1][-1] + 1)
    coords = [torch.randn(s, dtype=point_dtype, generator=gen(seed + 1)) for s in shapes]
    if defect in ("nan", "inf"):
        coords[-1].view(-1)[-1] = math.nan if defect == "nan" else -math.inf
    elif defect == "other float dtype":
        coords[0] = coords[0].to(torch.float64 if point_dtype == torch.float32 else torch.float32)
    elif defect == "meta device":
        coords[1] = coords[1].to("meta")
    elif defect in BAD_DTYPES:
        coords[0] = coords[0].to(defect)
    v = check_outcome(lambda: M.tangent(x, coords), [] if defect is None else ["coords"])
    if v is None:
        return
    xi, Px = flat(v), P(x)
    assert torch.allclose(Px @ xi, xi, atol=10 * tol(point_dtype))  # in the tangent space
    assert math.isclose(float(M.inner(x, v, v)), float(xi @ xi), rel_tol=10 * tol(point_dtype))
    again = M.tangent(x, v.coords)  # the gauge is a projection
    assert all(torch.allclose(a, b, atol=10 * tol(point_dtype)) for a, b in zip(v.coords, again.coords))


@examples(60)
@given(
    kind=st.sampled_from(["matrix", "tt"]),
    point_dtype=st.sampled_from([torch.float64, torch.float32]),
    other_dtype=st.sampled_from([torch.float64, torch.float32]),
    z_kind=st.sampled_from(["dense", "format", "nan", "wrong shape", "list"]),
    scale=st.sampled_from([1e-2, 0.3, "overflow"]),
    seed=st.integers(0, 999),
)
def test_property_proj_retr_transp(kind, point_dtype, other_dtype, z_kind, scale, seed):
    M, x, P = manifold_point(kind, point_dtype, seed)
    g = gen(seed + 2)
    shape = tuple(M.ambient_shape)
    Z = torch.randn(shape, dtype=torch.float64, generator=g)
    if z_kind == "format":
        Z = LowRankMatrix.from_dense(Z, 2) if kind == "matrix" else TensorTrain.from_dense(Z, max_rank=2)
    elif z_kind == "nan":
        Z[(0,) * len(shape)] = math.nan
    elif z_kind == "wrong shape":
        Z = Z.reshape(-1)
    elif z_kind == "list":
        Z = Z.tolist()
    Z = Z.to(other_dtype) if z_kind != "list" else Z
    ok = z_kind in ("dense", "format") and other_dtype == point_dtype
    v = check_outcome(lambda: M.proj(x, Z), [] if ok else ["z"])
    if v is not None:  # against the dense projector
        Zd = (Z.full() if z_kind == "format" else Z).double().reshape(-1)
        assert torch.allclose(flat(v), P(x) @ Zd, atol=10 * tol(point_dtype) * float(Zd.norm()))
    v = M.random_tangent(x, generator=g)
    step = v * 1e300 * 1e10 if scale == "overflow" else v * scale
    y = check_outcome(lambda: M.retr(x, step), [] if scale != "overflow" else ["v"])
    if y is not None:
        Xd = x.full().double() + flat(step).reshape(shape)
        Yd = y.full().double()
        if kind == "matrix":  # the metric projection: the truncated SVD of x + ξ
            U, s, Vh = torch.linalg.svd(Xd)
            assert torch.allclose(Yd, (U[:, :2] * s[:2]) @ Vh[:2], atol=10 * tol(point_dtype))
        else:  # exact ranks, and quasi-optimal: at most the TT-SVD bound of x + ξ at those ranks
            assert y.ranks == M.ranks and unfolding_ranks(Yd, 1e-4) == list(M.ranks)
            assert float((Yd - Xd).norm()) <= unfolding_tails(Xd, M.ranks) * (1 + 1e-6) + 10 * tol(point_dtype)
    y = M.random_point(dtype=other_dtype, generator=g)
    w = check_outcome(lambda: M.transp(x, y, v), [] if other_dtype == point_dtype else ["y"])
    if w is not None:  # P_y applied to the ambient ξ
        assert torch.allclose(flat(w), P(y) @ flat(v), atol=10 * tol(point_dtype))
    hand_built = TangentVector(M, x, [c.to(other_dtype) for c in v.coords])
    inner = check_outcome(lambda: M.inner(x, v, hand_built), [] if other_dtype == point_dtype else ["v", "float"])
    if inner is not None:
        assert math.isclose(float(inner), float(flat(v) @ flat(v)), rel_tol=10 * tol(point_dtype))


@examples(40)
@given(
    rows=st.lists(st.integers(-1, 6), max_size=5),
    extra=st.integers(-1, 1),
    index_kind=st.sampled_from(["tensor", "tensor", "list", "float"]),
    alpha=st.sampled_from([2.0, -0.5, 3, math.nan, math.inf, "2", torch.tensor(2.0), torch.tensor(1j), True]),
    other_dtype=TENSOR_DTYPE,
    seed=st.integers(0, 999),
)
def test_property_low_rank_matrix_operations(rows, extra, index_kind, alpha, other_dtype, seed):
    X = LowRankMatrix.random(6, 5, 2, generator=gen(seed), dtype=torch.float64)
    D = X.U @ X.S @ X.V.T  # dense, from the factors
    cols = [(3 * i + 1) % 7 - 1 for i in range(len(rows) + extra)] if len(rows) + extra >= 0 else []
    convert = {"tensor": torch.tensor, "list": list, "float": lambda v: torch.tensor(v, dtype=torch.float64)}
    r_arg, c_arg = convert[index_kind](rows), convert[index_kind](cols)
    in_range = all(0 <= i < 6 for i in rows) and all(0 <= j < 5 for j in cols)
    # float indices are refused, and so is torch.tensor([]) (float32); an empty list is an empty index
    ok = len(rows) == len(cols) and in_range and index_kind != "float" and (index_kind == "list" or rows)
    vals = check_outcome(lambda: X.gather(r_arg, c_arg), [] if ok else ["rows", "cols"])
    if vals is not None:
        assert torch.allclose(vals, D[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)])
    alpha_ok = (type(alpha) in (float, int) and math.isfinite(alpha)) or (
        isinstance(alpha, torch.Tensor) and not alpha.is_complex()
    )
    Y = check_outcome(lambda: X * alpha, [] if alpha_ok else ["alpha"])
    if Y is not None:
        assert torch.allclose(Y.full(), D * float(alpha), atol=1e-12) and Y.dtype == X.dtype
    other = torch.randn(6, 5, dtype=torch.float64, generator=gen(seed)).to(other_dtype)
    val = check_outcome(lambda: X.inner(other), [] if other_dtype == torch.float64 else ["other"])
    if val is not None:
        assert math.isclose(float(val), float((D * other).sum()), rel_tol=1e-12, abs_tol=1e-12)


@examples(40)
@given(
    shape=shape_arg(1, 3, 6),
    count=st.one_of(valid_size(0, 30), INVALID_SIZE.filter(lambda p: not (type(p[0]) is int and p[0] == 0))),
    seed=st.integers(0, 999),
)
def test_property_sample_indices(shape, count, seed):
    (shape, n), (count, c) = shape, count
    fits = n is not None and c is not None and c <= math.prod(n)
    problems = invalid(shape=n is not None, count=c is not None and fits)
    idx = check_outcome(lambda: sample_indices(shape, count, generator=gen(seed)), problems)
    if idx is None:
        return
    assert idx.shape == (c, len(n)) and idx.dtype == torch.int64
    assert bool((idx >= 0).all()) and bool((idx < torch.tensor(n)).all())
    assert len({tuple(i) for i in idx.tolist()}) == c  # distinct


@examples(40)
@given(kind=st.sampled_from(["LowRankMatrix", "TensorTrain", "TensorRing", "TTMatrix"]), dtype=DTYPE)
def test_property_to_keeps_the_value_or_refuses_the_dtype(kind, dtype):
    x = points()[kind]
    y = check_outcome(lambda: x.to(dtype), [] if dtype_ok(dtype) else ["dtype", "device"])  # a string: a device
    if y is not None:
        assert y.dtype == dtype and torch.allclose(y.full().double(), x.full(), rtol=tol(dtype), atol=tol(dtype))


@examples(50)
@given(
    shape=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    other=st.sampled_from(["same", "same", "same", "other shape", "float32", "dense", "dense float32"]),
    alpha=mostly(st.floats(-2, 2), st.sampled_from([math.nan, -math.inf, "2", torch.tensor(1j), None]), 4),
    index=st.sampled_from(["ok", "ok", "out of range", "float", "wrong width", "list"]),
    max_rank=mostly(st.integers(1, 3), st.sampled_from([0, 1.5, True, "2"]), 4),
    seed=st.integers(0, 999),
)
def test_property_tensor_train_operations(shape, other, alpha, index, max_rank, seed):
    g = gen(seed)
    x = TensorTrain.random(shape, 2, generator=g, dtype=torch.float64)
    X = tt_full(x.cores)
    d = len(shape)
    if other.startswith("dense"):
        y = torch.randn(shape, dtype=DT, generator=g)
        Y = y
    else:
        y = TensorTrain.random(
            shape if other != "other shape" else [*shape[:-1], shape[-1] + 1], 2, generator=g, dtype=torch.float64
        )
        Y = tt_full(y.cores)
    if other.endswith("float32"):
        y = y.to(torch.float32)
    compatible = other in ("same", "dense")
    for op, ref in (("inner", lambda: (X * Y).sum()), ("+", lambda: X + Y), ("-", lambda: X - Y), ("*", lambda: X * Y)):
        if op != "inner" and other.startswith("dense"):
            continue  # the arithmetic is between tensor trains
        call = {"inner": lambda: x.inner(y), "+": lambda: x + y, "-": lambda: x - y, "*": lambda: x * y}[op]
        out = check_outcome(call, [] if compatible else ["shape", "other", "operands"])
        if out is not None:
            got = out if op == "inner" else tt_full(out.cores)
            assert torch.allclose(got, ref(), atol=1e-12)
    alpha_ok = type(alpha) is float and math.isfinite(alpha)
    out = check_outcome(lambda: x * alpha, [] if alpha_ok else ["alpha"])
    if out is not None:
        assert torch.allclose(tt_full(out.cores), X * alpha, atol=1e-12)
    out = check_outcome(lambda: x / alpha, [] if alpha_ok and alpha != 0 else ["alpha"])
    if out is not None and torch.isfinite(X / alpha).all():  # (a tiny alpha may overflow, as for a tensor)
        assert torch.allclose(tt_full(out.cores), X / alpha, rtol=1e-12, atol=1e-12)
    idx = torch.stack([torch.randint(0, n, (7,), generator=g) for n in shape], 1)
    ok = index in ("ok", "list")
    if index == "out of range":
        idx[3, -1] = shape[-1]
    elif index == "float":
        idx = idx.double()
    elif index == "wrong width":
        idx = idx[:, :-1] if d > 1 else torch.zeros(7, 2, dtype=torch.long)
    elif index == "list":
        idx = idx.tolist()
    vals = check_outcome(lambda: x.gather(idx), [] if ok else ["index"])
    if vals is not None:
        assert torch.allclose(vals, X[tuple(torch.as_tensor(idx).T)], atol=1e-12)
    rank_ok = type(max_rank) is int and max_rank >= 1
    rounded = check_outcome(lambda: (x + x).round(max_rank=max_rank), [] if rank_ok else ["max_rank"])
    if rounded is not None:  # within √(d−1) of the best at those ranks: at most the TT-SVD bound of 2X
        assert all(r <= max_rank for r in rounded.ranks)
        err = float((tt_full(rounded.cores) - 2 * X).norm())
        assert err <= math.sqrt(max(d - 1, 1)) * unfolding_tails(2 * X, rounded.ranks) + 1e-10


@examples(40)
@given(
    m=st.integers(1, 5),
    n=st.integers(1, 5),
    operand=st.sampled_from(["vector", "matrix", "wrong length", "float32", "3-D", "list"]),
    side=st.sampled_from(["left", "right"]),
    other=st.sampled_from(["same", "same", "other shape", "float32"]),
    seed=st.integers(0, 999),
)
def test_property_low_rank_matrix_algebra(m, n, operand, side, other, seed):
    g = gen(seed)
    r = min(m, n, 2)
    x = LowRankMatrix.random(m, n, r, generator=g, dtype=torch.float64)
    X = x.U @ x.S @ x.V.T
    k = n if side == "right" else m  # the length the product needs
    B = {
        "vector": lambda: torch.randn(k, dtype=DT, generator=g),
        "matrix": lambda: torch.randn(k, 3, dtype=DT, generator=g) if side == "right" else torch.randn(3, k, dtype=DT),
        "wrong length": lambda: torch.randn(k + 1, dtype=DT, generator=g),
        "float32": lambda: torch.randn(k, generator=g),
        "3-D": lambda: torch.randn(2, k, k, dtype=DT, generator=g),
        "list": lambda: [1.0] * k,
    }[operand]()
    ok = operand in ("vector", "matrix")
    if side == "right":
        out = check_outcome(lambda: x @ B, [] if ok else ["B", "X and B", "unsupported operand"])
        ref = lambda: X @ B  # noqa: E731
    else:
        out = check_outcome(lambda: B @ x, [] if ok else ["B", "X and B", "unsupported operand"])
        ref = lambda: B @ X  # noqa: E731
    if out is not None:
        assert torch.allclose(out, ref(), atol=1e-12)
    y = LowRankMatrix.random(m + (other == "other shape"), n, 1, generator=g, dtype=torch.float64)
    if other == "float32":
        y = y.to(torch.float32)
    s = check_outcome(lambda: x - y, [] if other == "same" else ["shape", "operands"])
    if s is not None:
        Y = y.U @ y.S @ y.V.T
        assert torch.allclose(s.full(), X - Y, atol=1e-12) and torch.allclose(s.T.full(), (X - Y).T, atol=1e-12)
        assert math.isclose(float(s.norm()), float((X - Y).norm()), rel_tol=1e-10, abs_tol=1e-12)
