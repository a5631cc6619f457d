"""TT-cross, the differentiable cross and the out-of-core sources, against dense references and counts."""

import math

import numpy as np
import pytest
import torch

from lowrankopt.cross import ArraySource, CrossInfo, Quantization, cross_forward, tt_cross
from lowrankopt.cross.tt_cross import fiber_index
from lowrankopt.formats.tt import TensorTrain

D = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _dense_index(shape):
    return torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, len(shape))


def _relative_error(Y: TensorTrain, dense: torch.Tensor) -> float:
    return float((Y.full() - dense).norm() / dense.norm())


class Counting:
    """f wrapped to record every index it is asked for."""

    def __init__(self, f):
        self.f, self.seen = f, []

    def __call__(self, index):
        self.seen.append(index.clone())
        return self.f(index)

    @property
    def count(self):
        return sum(len(i) for i in self.seen)


def test_recovers_a_random_low_rank_tt_exactly_from_few_entries():
    shape = (10, 9, 10, 8, 10, 9)
    T = TensorTrain.random(shape, 3, generator=_gen(0), dtype=torch.float64)
    f = Counting(T.gather)
    Y, info = tt_cross(f, shape, eps=1e-10, nswp=10, generator=_gen(1))
    assert info.stop == "eps"
    assert _relative_error(Y, T.full()) < 1e-12
    assert info.evaluations < 0.02 * math.prod(shape)
    # the counts of the info record are what f saw, and the cache never asks for an entry twice
    assert f.count == info.evaluations
    seen = torch.cat(f.seen)
    assert len(torch.unique(seen, dim=0)) == len(seen)
    # fixed ranks with plain maxvol: exact at the true rank
    Y3, info3 = tt_cross(T.gather, shape, nswp=2, init=3, rank_increase=0, generator=_gen(2))
    assert info3.ranks == (3, 3, 3, 3, 3) and _relative_error(Y3, T.full()) < 1e-12


def test_cache_off_counts_every_request_and_matches_cache_on():
    shape = (6, 5, 7, 6)
    T = TensorTrain.random(shape, 2, generator=_gen(3), dtype=torch.float64)
    on, off = Counting(T.gather), Counting(T.gather)
    Y_on, info_on = tt_cross(on, shape, nswp=3, generator=_gen(4))
    Y_off, info_off = tt_cross(off, shape, nswp=3, generator=_gen(4), cache=False)
    assert off.count == info_off.evaluations and info_off.cache_hits == 0
    assert info_on.evaluations + info_on.cache_hits == info_off.evaluations  # same requests, served by the cache
    assert _relative_error(Y_on, Y_off.full()) < 1e-13


def test_budget_is_respected_and_the_interpolation_holds_at_a_mid_sweep_stop():
    shape = (8,) * 6
    x = torch.linspace(0, 1, 8, dtype=D)

    def f(index):
        return 1 / (1 + x[index].sum(1))

    for budget in (400, 900, 2500):
        Y, info = tt_cross(f, shape, budget=budget, generator=_gen(5))
        assert info.stop == "budget" and info.evaluations <= budget
        # the result reproduces f on every entry of the fiber block at its pivot
        left, right = info.fibers[info.pivot]
        idx = fiber_index(left, shape[info.pivot], right)
        assert torch.allclose(Y.gather(idx), f(idx), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="budget"):
        tt_cross(f, shape, budget=20, generator=_gen(5))


def test_accuracy_on_a_smooth_function_and_the_domain_interface():
    d, n = 5, 12
    grid = torch.linspace(-1, 1, n, dtype=D)
    domain = [grid] * d

    def g(x):  # on coordinates
        return torch.exp(-(x**2).sum(1)) + torch.sin(x.sum(1))

    Y, info = tt_cross(g, domain=domain, eps=1e-10, nswp=20, generator=_gen(6))
    dense = g(torch.cartesian_prod(*domain)).reshape((n,) * d)
    assert _relative_error(Y, dense) < 1e-10
    assert info.domain is not None and info.evaluations < dense.numel() / 5
    Yi, _ = tt_cross(lambda i: g(grid[i]), (n,) * d, eps=1e-10, nswp=20, generator=_gen(6))
    assert _relative_error(Yi, Y.full()) < 1e-13  # same algorithm, indices or coordinates


def test_validation_stop_and_recorded_errors():
    shape = (7,) * 5
    x = torch.linspace(0.1, 1, 7, dtype=D)

    def f(index):
        return 1 / x[index].sum(1)

    index = torch.randint(0, 7, (300, 5), generator=_gen(7))
    values = f(index)
    Y, info = tt_cross(f, shape, validation=(index, values), validation_tol=1e-6, nswp=30, generator=_gen(8))
    assert info.stop == "validation"
    assert len(info.validation_errors) == info.sweeps
    err = float((Y.gather(index) - values).norm() / values.norm())
    assert info.validation_errors[-1] == pytest.approx(err, rel=1e-10) and err <= 1e-6
    assert len(info.changes) == info.sweeps - 1


def test_warm_start_from_a_previous_result_and_float32():
    shape = (6,) * 5
    T = TensorTrain.random(shape, 2, generator=_gen(9), dtype=torch.float64)
    Y, _ = tt_cross(T.gather, shape, nswp=1, generator=_gen(10))
    # with fixed ranks the start decides them: a rank-1 start stays rank 1, the previous result's rank-2 rounding
    # gives rank 2 and the exact tensor
    Y1, _ = tt_cross(T.gather, shape, nswp=2, rank_increase=0, generator=_gen(11))
    assert Y1.ranks == (1, 1, 1, 1) and _relative_error(Y1, T.full()) > 1e-3
    Y2, _ = tt_cross(T.gather, shape, nswp=2, init=Y.round(max_rank=2), rank_increase=0, generator=_gen(11))
    assert Y2.ranks == (2, 2, 2, 2) and _relative_error(Y2, T.full()) < 1e-12
    T32 = T.to(torch.float32)
    Y32, _ = tt_cross(T32.gather, shape, nswp=3, dtype=torch.float32, generator=_gen(12))
    assert Y32.dtype == torch.float32 and _relative_error(Y32.to(D), T.full()) < 1e-4


def test_cross_forward_rebuilds_the_result_from_the_same_fibers():
    shape = (7, 6, 8, 5, 6)
    x = torch.linspace(0, 1, 8, dtype=D)

    def f(index):
        return torch.exp(-x[index].sum(1)) / (1 + x[index].square().sum(1))

    for kwargs in ({"nswp": 2}, {"budget": 700}):  # pivot at the first core, and mid-sweep
        Y, info = tt_cross(f, shape, max_rank=4, generator=_gen(13), **kwargs)
        counting = Counting(f)
        Z = cross_forward(info, counting)
        assert Z.ranks == Y.ranks
        assert _relative_error(Z, Y.full()) < 1e-10
        assert counting.count == info.fiber_entries and len(counting.seen) == 1  # one batched call


def test_cross_forward_gradient_matches_finite_differences():
    shape = (6,) * 4
    x = torch.linspace(0, 1, 6, dtype=D)
    theta = torch.tensor([0.7, -0.4, 1.3], dtype=D, requires_grad=True)

    def f(index, theta=theta):
        X = x[index]
        return torch.exp(-theta[0] * X.sum(1)) + theta[1] * torch.sin(X @ torch.arange(1.0, 5.0, dtype=D)) + theta[2]

    _, info = tt_cross(lambda i: f(i).detach(), shape, max_rank=3, nswp=2, generator=_gen(14))
    probe = torch.randint(0, 6, (50, 4), generator=_gen(15))
    weights = torch.randn(50, dtype=D, generator=_gen(16))

    def loss(t):
        Y = cross_forward(info, lambda i: f(i, t))
        return (Y.gather(probe) * weights).sum() + Y.norm() ** 2 / 100

    loss(theta).backward()
    h = 1e-6
    for j in range(3):
        e = torch.zeros(3, dtype=D)
        e[j] = h
        with torch.no_grad():
            fd = (loss(theta + e) - loss(theta - e)) / (2 * h)
        assert theta.grad[j].item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-8)


def test_cross_forward_rebuilds_a_core_whose_rows_are_all_selected_in_another_order():
    # rect-maxvol may select every row of a fiber matrix, permuted: the core is then that permutation, not I
    from lowrankopt.cross.interpolation import _interpolation_core

    M = torch.randn(4, 3, dtype=D, generator=_gen(40))
    rows = torch.tensor([1, 2, 0, 3])
    X = _interpolation_core(M, rows)
    assert torch.equal(X[rows], torch.eye(4, dtype=D)) and torch.allclose(X @ M[rows], M, atol=1e-15)
    f = lambda i: torch.cos(i.double().sum(1)) + 1  # noqa: E731  (its fibers at (3, 1, 4) select every row)
    shape = (3, 1, 4)
    Y, info = tt_cross(f, shape, nswp=3, generator=_gen(0))
    dense = f(_dense_index(shape)).reshape(shape)
    assert _relative_error(Y, dense) < 1e-14 and _relative_error(cross_forward(info, f), dense) < 1e-14


def _rank3(d, n, seed):
    """A rank-3 function of d indices (a sum of three products of random factors) and a rank-1 one."""
    g = _gen(seed)
    F = [torch.randn(n, 4, dtype=D, generator=g) for _ in range(d)]

    def product(index, columns):
        out = torch.ones(len(index), len(columns), dtype=D)
        for k in range(d):
            out = out * F[k][index[:, k]][:, columns]
        return out.sum(1)

    return (lambda i: product(i, [0, 1, 2])), (lambda i: product(i, [3]))


@pytest.mark.parametrize("stop", ["eps", "budget mid-sweep", "budget during the cut"])
def test_cross_forward_differentiates_after_a_rank_adaptive_cross_of_a_low_rank_function(stop):
    # issue 23.7: the passes grow the ranks of a rank-3 function to ~7; its fiber matrices are then rank-deficient
    # and their interpolation had no derivative. tt_cross now cuts them to the numerical rank.
    d, n = 5, 8
    f0, g = _rank3(d, n, 30)
    shape = (n,) * d
    dense = f0(_dense_index(shape)).reshape(shape)
    _, uncut = tt_cross(f0, shape, eps=1e-10, rank_tol=0.0, generator=_gen(31))
    assert max(uncut.ranks) > 3  # the overshoot this test is about
    theta0 = torch.tensor([0.0, 0.0], dtype=D)
    f = lambda i, t=theta0: (1 + t[1]) * f0(i) + t[0] * g(i)  # noqa: E731
    E = uncut.evaluations
    if stop == "budget during the cut":  # without the cache every cut block is new: it cannot fit in E
        _, uncut = tt_cross(f0, shape, eps=1e-10, rank_tol=0.0, cache=False, generator=_gen(31))
        E = uncut.evaluations
    budget = {"eps": None, "budget mid-sweep": int(0.75 * E), "budget during the cut": E}
    cache = stop != "budget during the cut"
    Y, info = tt_cross(f0, shape, eps=1e-10, budget=budget[stop], cache=cache, generator=_gen(31))
    assert info.stop == ("budget" if stop == "budget mid-sweep" else "eps")
    assert info.cut == ("ranks" if stop == "eps" else "columns") and uncut.cut == "off"
    assert _relative_error(Y, dense) < 1e-12
    if stop == "eps":  # enough budget for the cut blocks: the ranks come back to the function's
        assert info.ranks == (3,) * (d - 1) and info.evaluations >= uncut.evaluations
    else:  # no new entry: only the columns are cut, the bonds stay
        assert info.evaluations <= budget[stop]
        assert stop == "budget mid-sweep" or (info.ranks, info.evaluations) == (uncut.ranks, uncut.evaluations)
    assert _relative_error(cross_forward(info, f0), Y.full()) < 1e-12  # the fibers rebuild the result
    probe = torch.randint(0, n, (60, d), generator=_gen(32))
    weights = torch.randn(60, dtype=D, generator=_gen(33))

    def loss(t):
        Z = cross_forward(info, lambda i: f(i, t))
        return (Z.gather(probe) * weights).sum() + Z.norm() ** 2 / 1000

    theta = torch.tensor([0.05, 0.1], dtype=D, requires_grad=True)  # f_θ has rank 4: the cut fibers approximate it
    loss(theta).backward()
    h = 1e-6
    for j in range(2):
        e = torch.zeros(2, dtype=D)
        e[j] = h
        with torch.no_grad():
            fd = (loss(theta.detach() + e) - loss(theta.detach() - e)) / (2 * h)
        assert theta.grad[j].item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-8)
    # without the cut the same fibers have no derivative: what this test guards
    with pytest.raises(ValueError, match="rank-deficient"):
        cross_forward(uncut, lambda i: f(i, theta))


def test_sparse_functions_and_huge_shapes_never_ask_twice():
    # a δ at the origin: most fiber matrices are zero, rect-maxvol must still add distinct rows
    delta = Counting(lambda i: (i == 0).all(1).double())
    Y, info = tt_cross(delta, (5,) * 4, nswp=6, generator=_gen(22))
    seen = torch.cat(delta.seen)
    assert len(torch.unique(seen, dim=0)) == len(seen) == info.evaluations
    assert Y.gather(torch.zeros(1, 4, dtype=torch.long)).item() == pytest.approx(1.0)
    # 2⁶⁴ entries: the cache keys no longer fit an int64, so it falls back to a dict of index tuples
    w = torch.linspace(0.5, 1.5, 64, dtype=D)
    product = Counting(lambda i: (1 + w * i).prod(1))
    Y, info = tt_cross(product, (2,) * 64, nswp=2, generator=_gen(23))
    seen = torch.cat(product.seen)
    assert len(torch.unique(seen, dim=0)) == len(seen) == info.evaluations and info.cache_hits > 0
    probe = torch.randint(0, 2, (200, 64), generator=_gen(24))
    assert torch.allclose(Y.gather(probe), (1 + w * probe).prod(1), rtol=1e-12)


def test_cross_forward_refuses_fibers_that_are_singular_for_a_new_function():
    shape = (6,) * 4
    x = torch.linspace(0, 1, 6, dtype=D)
    _, info = tt_cross(lambda i: torch.exp(-x[i].sum(1)) / (1 + x[i].sum(1)), shape, max_rank=3, nswp=2)
    with pytest.raises(ValueError, match="singular"):
        cross_forward(info, lambda i: torch.zeros(len(i), dtype=D) + (i[:, 0] == 99))
    with pytest.raises(ValueError, match="non-finite"):
        cross_forward(info, lambda i: torch.full((len(i),), math.inf, dtype=D))


def test_bad_input_is_refused_with_the_argument_named():
    f = lambda i: i.sum(1).double()  # noqa: E731
    with pytest.raises(ValueError, match="stopping rule"):
        tt_cross(f, (3, 3))
    for bad in (-1e-3, 1.0, math.nan):
        with pytest.raises(ValueError, match="rank_tol"):
            tt_cross(f, (3, 3), nswp=1, rank_tol=bad)
    with pytest.raises(ValueError, match="shape"):
        tt_cross(f, (3, 0), nswp=1)
    with pytest.raises(ValueError, match="shape or domain"):
        tt_cross(f, nswp=1)
    with pytest.raises(ValueError, match="disagrees"):
        tt_cross(f, (3, 4), domain=[torch.zeros(3), torch.zeros(3)], nswp=1)
    with pytest.raises(ValueError, match="budget"):
        tt_cross(f, (3, 3), budget=-5)
    with pytest.raises(ValueError, match="rank_increase"):
        tt_cross(f, (3, 3), nswp=1, rank_increase=(2, 1))
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        tt_cross(lambda i: torch.zeros(len(i) + 1), (3, 3), nswp=1)
    with pytest.raises(ValueError, match="non-finite"):
        tt_cross(lambda i: torch.full((len(i),), math.nan), (3, 3), nswp=1)
    with pytest.raises(ValueError, match="validation_tol needs"):
        tt_cross(f, (3, 3), validation_tol=0.1)
    with pytest.raises(ValueError, match="max_rank"):
        tt_cross(f, (3, 3, 3), nswp=1, init=3, max_rank=2)
    with pytest.raises(TypeError, match="CrossInfo"):
        cross_forward(CrossInfo(shape=(3,)), f)
    with pytest.raises(TypeError, match="real"):
        tt_cross(lambda i: torch.ones(len(i), dtype=torch.complex128), (3, 3), nswp=1)
    with pytest.raises(ValueError, match="non-empty"):
        tt_cross(f, (3, 3), validation=(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=D)), nswp=1)
    with pytest.raises(TypeError, match="tol"):
        tt_cross(f, (3, 3), nswp=1, tol=None)
    with pytest.raises(ValueError, match="init.cores"):
        tt_cross(f, (3, 3), nswp=1, init=TensorTrain._trusted([torch.full((1, 3, 1), math.nan, dtype=D)] * 2))
    Y, _ = tt_cross(f, (3, 3), nswp=1, rank_increase=np.int64(1))  # numpy integers are integers
    assert Y.shape == (3, 3)
    with pytest.raises(TypeError, match="real"):
        ArraySource(np.ones((2, 2), dtype=np.complex64))


def test_quantization_maps_are_inverse_and_ordered():
    for order in ("sequential", "interleaved"):
        q = Quantization((8, 4, 16), order=order)
        assert q.shape == (2,) * 9
        idx = _dense_index((8, 4, 16))
        assert torch.equal(q.to_array(q.to_tensor(idx)), idx)
        digits = _dense_index(q.shape)
        assert len(torch.unique(q.to_array(digits), dim=0)) == 8 * 4 * 16  # a bijection
    q = Quantization((4, 4))  # sequential: the digits of axis 0 (most significant first), then of axis 1
    assert q.to_tensor(torch.tensor([[2, 3]])).tolist() == [[1, 0, 1, 1]]
    qi = Quantization((4, 4), order="interleaved")  # level by level
    assert qi.to_tensor(torch.tensor([[2, 3]])).tolist() == [[1, 1, 0, 1]]
    assert Quantization((9, 27), base=3).shape == (3,) * 5
    with pytest.raises(ValueError, match="power"):
        Quantization((12, 8))


def test_array_source_reads_only_what_is_asked_and_counts_it():
    a = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    src = ArraySource(a)
    idx = torch.tensor([[0, 0, 0], [2, 3, 4], [1, 2, 3]])
    assert src(idx).tolist() == [0.0, 59.0, 33.0]
    assert src.reads == 3 and src.fraction == 3 / 60
    with pytest.raises(ValueError, match="outside"):
        src(torch.tensor([[3, 0, 0]]))


def test_a_512_cubed_volume_on_disk_is_approximated_reading_under_one_percent(tmp_path):
    N = 512
    path = tmp_path / "volume.npy"
    volume = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(N, N, N))
    x = (np.arange(N) + 0.5) / N

    def field(X, Y, Z):
        blobs = np.exp(-((X - 0.3) ** 2 + (Y - 0.5) ** 2 + (Z - 0.6) ** 2) / 0.02)
        return blobs + 0.2 * np.sin(3 * X) * np.cos(2 * Y + Z)

    for i in range(0, N, 64):
        volume[i : i + 64] = field(x[i : i + 64, None, None], x[None, :, None], x[None, None, :])
    volume.flush()
    del volume
    source = ArraySource(np.load(path, mmap_mode="r"))
    q = Quantization((N, N, N))
    Y, info = tt_cross(q.wrap(source), q.shape, eps=1e-5, nswp=12, generator=_gen(17))
    assert source.reads == info.evaluations and source.fraction < 0.01
    probe = torch.randint(0, N, (5000, 3), generator=_gen(18))
    truth = torch.from_numpy(field(*(x[probe[:, j].numpy()] for j in range(3))).astype(np.float32)).double()
    error = float((Y.gather(q.to_tensor(probe)) - truth).norm() / truth.norm())
    assert error < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    shape = (6, 5, 7, 6)
    T = TensorTrain.random(shape, 2, generator=_gen(20), dtype=torch.float64)
    Tc = T.to("cuda")
    Y, info = tt_cross(T.gather, shape, nswp=3, generator=_gen(21))
    Yc, info_c = tt_cross(Tc.gather, shape, nswp=3, generator=_gen(21), device="cuda")
    assert Yc.device.type == "cuda"  # the pivots may differ from the CPU's in roundoff, the tensor may not
    assert _relative_error(Yc.to("cpu"), Y.full()) < 1e-10
    Z = cross_forward(info_c, Tc.gather)
    assert _relative_error(Z.to("cpu"), T.full()) < 1e-10
    grid = torch.linspace(0, 1, 6, dtype=D)  # a CPU domain is moved to the device
    Yd, _ = tt_cross(lambda x: x.sum(1), domain=[grid] * 3, nswp=2, device="cuda")
    assert Yd.device.type == "cuda"
