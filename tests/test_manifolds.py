"""Manifold geometry against dense references (projector from an SVD / a dense Jacobian)."""

from contextlib import contextmanager

import pytest
import torch
from reference import loglog_slope, matrix_projector, rel, tt_full, tt_projector, tucker_projector

from lowrankopt import (
    FixedRankMatrices,
    FixedTTMatrixRank,
    FixedTTRank,
    FixedTuckerRank,
    LowRankMatrix,
    TangentVector,
    TensorTrain,
    TTMatrix,
    Tucker,
)

DT = torch.float64


def make(kind, g):
    if kind == "matrix":
        M = FixedRankMatrices(7, 5, 2)
        x = M.random_point(generator=g, dtype=torch.float64)
        return M, x, matrix_projector(x.full(), 2), (7, 5)
    if kind == "ttmatrix":  # merged modes (4, 6, 3): the ranks are not clipped by the merged modes alone
        M = FixedTTMatrixRank((2, 3, 1), (2, 2, 3), (3, 3))
        x = TTMatrix.random(M.row_shape, M.col_shape, list(M.ranks), generator=g, dtype=DT)  # generic cores
        return M, x, tt_projector(x), M.ambient_shape
    if kind == "tucker":
        M = FixedTuckerRank((4, 3, 5), (2, 3, 3))
        factors = [torch.randn(n, r, dtype=DT, generator=g) for n, r in zip(M.shape, M.ranks)]  # not orthonormal
        x = Tucker(torch.randn(M.ranks, dtype=DT, generator=g), factors)
        return M, x, tucker_projector(x), M.shape
    M = FixedTTRank((3, 4, 2, 3), (2, 3, 2))
    x = TensorTrain.random(
        M.shape, list(M.ranks), generator=g, dtype=torch.float64
    )  # a generic (non-canonical) representation
    return M, x, tt_projector(x), M.shape


def random_format(kind, M, rank, g):
    """A random object of the point format (not on M: rank ``rank``), for projections."""
    if kind == "matrix":
        return LowRankMatrix.random(M.m, M.n, rank, generator=g, dtype=DT)
    if kind == "ttmatrix":
        return TTMatrix.random(M.row_shape, M.col_shape, rank, generator=g, dtype=DT)
    if kind == "tucker":
        return Tucker.random(M.shape, [min(rank, n) for n in M.shape], generator=g, dtype=DT)
    return TensorTrain.random(M.shape, rank, generator=g, dtype=DT)


def projector(kind, y):
    if kind == "tucker":
        return tucker_projector(y)
    return matrix_projector(y.full(), y.rank) if kind == "matrix" else tt_projector(y)


def tt_unfolding_ranks(kind, Y, M):
    """The ranks of the dense unfoldings of Y (of the merged modes for a TT-matrix): the TT-ranks; for Tucker the
    ranks of the mode-k unfoldings, the multilinear ranks."""
    if kind == "tucker":
        return tuple(int(torch.linalg.matrix_rank(Y.movedim(k, 0).reshape(Y.shape[k], -1))) for k in range(Y.dim()))
    if kind == "ttmatrix":
        d = len(M.row_shape)
        Y = Y.reshape(*M.row_shape, *M.col_shape).permute([p for k in range(d) for p in (k, d + k)])
        shape = [m * n for m, n in zip(M.row_shape, M.col_shape)]
    else:
        shape = M.shape
    Y = Y.reshape(shape)
    return tuple(
        int(torch.linalg.matrix_rank(Y.reshape(int(torch.tensor(shape[:k]).prod()), -1))) for k in range(1, len(shape))
    )


KINDS = ["matrix", "tt", "ttmatrix", "tucker"]

_HOST_READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist")


@contextmanager
def host_reads():
    """Count the reads of tensor values by Python (bool(t), float(t), t.item(), ...) made inside the block: on a GPU
    each is a device-to-host synchronization. Yields a list whose length is the count."""
    reads, saved = [], {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def counting(name):
        def read(self, *args, **kwargs):
            reads.append(name)
            return saved[name](self, *args, **kwargs)

        return read

    try:
        for name in _HOST_READS:
            setattr(torch.Tensor, name, counting(name))
        yield reads
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.fixture
def g():
    return torch.Generator().manual_seed(3)


@pytest.mark.parametrize("kind", KINDS)
def test_dim_matches_dense_tangent_space(kind, g):
    M, x, P, _ = make(kind, g)
    assert M.dim == round(float(torch.trace(P)))


@pytest.mark.parametrize("kind", KINDS)
def test_proj_of_dense_equals_dense_projector(kind, g):
    M, x, P, shape = make(kind, g)
    Z = torch.randn(shape, dtype=DT, generator=g)
    v = M.proj(x, Z)
    assert rel(v.to_ambient().full().reshape(-1), P @ Z.reshape(-1)) < 1e-12
    # idempotent, self-adjoint (in the ambient inner product)
    assert rel(M.proj(x, v.to_ambient()).to_ambient().full(), v.to_ambient().full()) < 1e-12
    W = torch.randn(shape, dtype=DT, generator=g)
    assert torch.isclose((v.to_ambient().full() * W).sum(), (Z * M.proj(x, W).to_ambient().full()).sum(), rtol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_proj_of_formatted_input_equals_dense(kind, g):
    M, x, P, shape = make(kind, g)
    z = random_format(kind, M, 3, g)
    assert rel(M.proj(x, z).to_ambient().full().reshape(-1), P @ z.full().reshape(-1)) < 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_coordinates_are_orthonormal(kind, g):
    M, x, P, _ = make(kind, g)
    u, v = M.random_tangent(x, generator=g), M.random_tangent(x, generator=g)
    U, V = u.to_ambient().full(), v.to_ambient().full()
    assert torch.isclose(M.inner(x, u, v), (U * V).sum(), rtol=1e-12)
    assert torch.isclose(M.norm(x, u), torch.tensor(1.0, dtype=DT), rtol=1e-13)
    assert rel(P @ U.reshape(-1), U.reshape(-1)) < 1e-12  # to_ambient lies in the tangent space


@pytest.mark.parametrize("kind", KINDS)
def test_tangent_arithmetic(kind, g):
    M, x, _, _ = make(kind, g)
    u, v = M.random_tangent(x, generator=g), M.random_tangent(x, generator=g)
    U, V = u.to_ambient().full(), v.to_ambient().full()
    assert torch.allclose((u + v).to_ambient().full(), U + V, atol=1e-13)
    assert torch.allclose((u - 2 * v).to_ambient().full(), U - 2 * V, atol=1e-13)
    assert torch.allclose((-u / 4).to_ambient().full(), -U / 4, atol=1e-13)
    assert float(M.zero_tangent(x).norm()) == 0.0
    y = M.random_point(generator=g, dtype=torch.float64)
    w = M.random_tangent(y, generator=g)
    with pytest.raises(ValueError, match="different base points"):
        u + w
    with pytest.raises(ValueError, match="not a tangent vector at this point"):
        M.inner(x, u, w)


@pytest.mark.parametrize("kind", KINDS)
def test_retraction_is_second_order_and_keeps_ranks(kind, g):
    M, x, P, shape = make(kind, g)
    xi = M.random_tangent(x, generator=g)
    X, Xi = x.full(), xi.to_ambient().full()
    ts = [1e-1 / 2**k for k in range(5)]
    first, tangential = [], []
    for t in ts:
        y = M.retr(x, xi * t)
        Y = y.full()
        if kind == "matrix":
            assert y.rank == 2 and torch.linalg.matrix_rank(Y) == 2
        else:
            assert y.ranks == M.ranks
            assert tt_unfolding_ranks(kind, Y, M) == M.ranks  # exact TT ranks
        D = (Y - X - t * Xi).reshape(-1)
        first.append(float(D.norm()))
        tangential.append(float((P @ D).norm()))
    assert loglog_slope(ts, first) > 1.8  # a retraction: R(tξ) = x + tξ + O(t²)
    assert loglog_slope(ts, tangential) > 2.8  # second order: the t² term is normal


@pytest.mark.parametrize("kind", KINDS)
def test_transport_lands_in_new_tangent_space(kind, g):
    M, x, _, _ = make(kind, g)
    xi = M.random_tangent(x, generator=g)
    y = M.retr(x, xi * 0.3)
    w = M.transp(x, y, xi)
    assert w.base is y
    Py = projector(kind, y)
    assert rel(w.to_ambient().full().reshape(-1), Py @ xi.to_ambient().full().reshape(-1)) < 1e-11


@pytest.mark.parametrize("kind", KINDS)
def test_random_is_reproducible(kind):
    M, x, _, _ = make(kind, torch.Generator().manual_seed(1))
    a = M.random_tangent(x, generator=torch.Generator().manual_seed(7))
    b = M.random_tangent(x, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(p, q) for p, q in zip(a.coords, b.coords))


def test_tangent_from_coords_applies_the_gauge(g):
    M, x, P, shape = make("tt", g)
    raw = [torch.randn(c.shape, dtype=DT, generator=g) for c in M.zero_tangent(x).coords]
    v = M.tangent(x, raw)
    again = M.tangent(x, v.coords)
    assert all(torch.allclose(a, b, atol=1e-14) for a, b in zip(v.coords, again.coords))


def test_float32_geometry():
    g = torch.Generator().manual_seed(0)
    M = FixedTTRank((4, 5, 4), (3, 3))
    x = M.random_point(dtype=torch.float32, generator=g)
    xi = M.random_tangent(x, generator=g)
    y = M.retr(x, xi * 0.1)
    assert y.dtype == torch.float32 and y.ranks == (3, 3)
    assert abs(float(xi.norm()) - 1) < 1e-5


def test_bad_input_raises(g):
    with pytest.raises(ValueError, match="rank must be <="):
        FixedRankMatrices(3, 4, 5)
    with pytest.raises(ValueError, match="positive int"):
        FixedRankMatrices(3, 4, 0)
    with pytest.raises(ValueError, match=r"ranks\[0\] = 5 is not attainable"):
        FixedTTRank((2, 3, 4), (5, 2))
    with pytest.raises(ValueError, match=r"ranks\[0\] = 4 is not attainable"):
        FixedTTRank((3, 1, 3), (4, 2))  # r_1 <= min(3, 3) fails, and r_1 > n_2 r_2
    with pytest.raises(ValueError, match="2 positive ints"):
        FixedTTRank((2, 3, 4), (2,))
    M = FixedTTRank((3, 4, 3), (2, 2))
    with pytest.raises(ValueError, match="x must have shape"):
        M.random_tangent(TensorTrain.random((3, 4, 3), (2, 3), generator=g))
    with pytest.raises(TypeError, match="x must be a TensorTrain"):
        M.zero_tangent(LowRankMatrix.random(3, 4, 2))
    x = M.random_point(generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="z must have shape"):
        M.proj(x, torch.randn(3, 3, 3, dtype=DT))
    with pytest.raises(ValueError, match="z contains NaN"):
        M.proj(x, torch.full((3, 4, 3), float("nan"), dtype=DT))
    with pytest.raises(ValueError, match="coords must have shapes"):
        M.tangent(x, [torch.zeros(2, dtype=DT)])
    assert tt_full(x.cores).shape == (3, 4, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_tangent_inputs_of_another_dtype_or_device_or_not_finite_are_refused(kind, g):
    """Issue 18: these failed with torch's matmul dtype error, or were accepted and then failed in linalg.svd."""
    M, x, _, shape = make(kind, g)
    x32 = x.to(torch.float32)
    coords = [torch.randn(c.shape, dtype=DT, generator=g) for c in M.zero_tangent(x).coords]
    with pytest.raises(TypeError, match=r"coords\[0\] has dtype torch.float64 but x has torch.float32"):
        M.tangent(x32, coords)
    with pytest.raises(ValueError, match=r"coords\[1\] is on meta but x on cpu"):
        M.tangent(x, [coords[0]] + [c.to("meta") for c in coords[1:]])
    with pytest.raises(TypeError, match=r"coords\[0\] must be float32 or float64"):
        M.tangent(x, [coords[0].to(torch.complex128)] + coords[1:])
    bad = [c.clone() for c in coords]
    bad[-1].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=rf"coords\[{len(bad) - 1}\] contains NaN or Inf"):
        M.tangent(x, bad)
    with pytest.raises(TypeError, match="z has dtype torch.float64 but x has torch.float32"):
        M.proj(x32, torch.randn(shape, dtype=DT, generator=g))
    z = random_format(kind, M, 2, g)
    with pytest.raises(TypeError, match="z has dtype torch.float64 but x has torch.float32"):
        M.proj(x32, z)
    v = M.tangent(x, coords)
    y32 = M.random_point(dtype=torch.float32, generator=g)
    with pytest.raises(TypeError, match="y has dtype torch.float32 but x has torch.float64"):
        M.transp(x, y32, v)
    with pytest.raises(TypeError, match="z has dtype torch.float64 but x has torch.float32"):
        M.proj(y32, v)  # a transport by projection, across dtypes
    overflowed = v * 1e300 * 1e300  # finite factors, infinite coordinates
    with pytest.raises(ValueError, match=r"v.coords\[0\] contains NaN or Inf"):
        M.retr(x, overflowed)
    # transport is linear and factorization-free: not checked (no per-step cost), non-finite in, non-finite out
    moved = M.transp(x, M.random_point(generator=g, dtype=torch.float64), overflowed)
    assert not all(bool(torch.isfinite(c).all()) for c in moved.coords)
    hand_built = TangentVector(M, x, [c.float() for c in v.coords])  # the low-level constructor does not check
    for call in (lambda: M.inner(x, v, hand_built), lambda: M.retr(x, hand_built), lambda: v + hand_built):
        with pytest.raises(TypeError, match="float32"):
            call()
    with pytest.raises(TypeError, match="generator"):
        M.random_tangent(x, generator=3)
    # the same operations in one dtype are unchanged: float32 tangent coordinates at a float32 point
    w = M.tangent(x32, [c.float() for c in coords])
    assert w.dtype == torch.float32 and M.retr(x32, w * 0.1).dtype == torch.float32
    assert rel(w.to_ambient().full().double(), v.to_ambient().full()) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_retr_and_transp_read_nothing_back_from_the_device(kind, g):
    """Issue 18 review: retr and transp checked their coordinates for NaN/Inf on every call (a reduction and a host
    synchronization per call, on the optimizers' hot path). Finite input now costs no host read at all."""
    M, x, _, _ = make(kind, g)
    v = M.random_tangent(x, generator=g)
    y = M.retr(x, v * 0.1)
    M.frames(y)  # the frames are computed once per point either way
    with host_reads() as reads:
        M.retr(x, v * 0.1)
        M.transp(x, y, v)
        M.proj(y, v)  # a transport by projection
    assert reads == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_retr_of_any_non_finite_coordinate_names_it(kind, value, g):
    """Issue 18: NaN/Inf coordinates failed in linalg.svd; retr names them whichever entry is not finite (now detected
    where the factorization fails, at no cost for finite input)."""
    M, x, _, _ = make(kind, g)
    v = M.random_tangent(x, generator=g)
    for i, c in enumerate(v.coords):
        for j in range(0, c.numel(), 3):
            coords = [t.clone() for t in v.coords]
            coords[i].view(-1)[j] = value
            with pytest.raises(ValueError, match=rf"v.coords\[{i}\] contains NaN or Inf"):
                M.retr(x, TangentVector(M, x, coords))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_points_with_frames_that_are_not_orthonormal_are_refused(kind, dtype, g):
    """Issue 22 (bad input): a packed point is taken with its frames as they are; frames that are not orthonormal
    would make every tangent coordinate at it wrong, silently. Canonical ones round-trip, in either precision."""
    M, x, _, _ = make(kind, g)
    x = x.to(dtype)
    flat = M.pack_point(x)
    assert rel(M.unpack_point(flat).full().double(), x.full().double()) < 1e-5
    for i in range(1, len(M.coord_shapes)):  # (part 0, C / C_1 / the Tucker core, is no frame: any values do)
        bad = flat.clone()
        M.split(bad)[i].view(-1)[0] += 0.1  # a view of bad
        with pytest.raises(ValueError, match=r"flat is not a canonical packed point.*part \d"):
            M.unpack_point(bad)
    nan = flat.clone()
    nan[0] = float("nan")
    with pytest.raises(ValueError, match="flat contains NaN"):
        M.unpack_point(nan)
