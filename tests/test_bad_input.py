"""Bad input to the formats and manifolds: every public constructor and factory refuses it with a ValueError /
TypeError that names the argument, and integer-like input (numpy / torch integer scalars) is accepted.

The first part holds one regression test per defect of issue 18; the second part is property-based (hypothesis):
over random shapes, ranks, dtypes and entries, valid and invalid, the result is either correct (checked against a
dense reference computed here) or a ValueError / TypeError naming the argument."""

import math

import numpy as np
import pytest
import torch
from reference import tt_full

from lowrankopt import FixedRankMatrices, FixedTTRank, LowRankMatrix, TensorRing, TensorTrain, TTMatrix
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
    x = TensorTrain.random(np.array([3, 4, 5]), np.int64(2), generator=gen())
    assert x.shape == (3, 4, 5) and x.ranks == (2, 2)
    assert TensorTrain.random(torch.tensor([3, 4]), torch.tensor(2)).shape == (3, 4)
    assert TensorTrain.from_dense(A, max_rank=np.int32(2)).ranks == (2, 2)
    assert TensorRing.from_dense(A, max_rank=np.int64(1)).ranks == (1, 1, 1)
    assert TensorRing.random((np.int64(3), 4), np.int16(2)).ranks == (2, 2)
    assert LowRankMatrix.random(np.int64(5), np.int32(4), np.int64(2)).shape == (5, 4)
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
    x = LowRankMatrix.random(5, 4, 2, generator=gen())
    with pytest.raises(ValueError, match="rows and cols"):
        x.gather(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    rows, cols = torch.tensor([0, 4, 2]), torch.tensor([3, 0, 1])
    assert torch.allclose(x.gather(rows, cols), (x.U @ x.S @ x.V.T)[rows, cols], atol=1e-14)


# -------------------------------------------------------------------------------------------- half precision
def points():
    g = gen(1)
    return {
        "LowRankMatrix": LowRankMatrix.random(5, 4, 2, generator=g),
        "TensorTrain": TensorTrain.random([3, 4, 2], 2, generator=g),
        "TensorRing": TensorRing.random([3, 4, 2], 2, generator=g),
        "TTMatrix": TTMatrix.random([2, 3], [3, 2], 2, generator=g),
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
