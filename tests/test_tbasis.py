"""T-Basis: tensorization maps, batched decompression against TensorRing, variance matching, conversion, grads."""

import copy
import itertools

import pytest
import torch
from torch import nn

from lowrankopt import TensorRing
from lowrankopt.nn import (
    TBasis,
    TBasisFactory,
    Tensorization,
    convert_to_tbasis,
    count_parameters,
    tbasis_penalty,
)

D = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _counts(model):
    """The T-Basis storage, split by ``count_parameters``: the shared basis (modules named ``tbasis``), the layers'
    coefficients and rank adapters, and the rest (biases, dense layers)."""
    total = count_parameters(model, trainable_only=False)
    without_basis = count_parameters(model, trainable_only=False, exclude_modules=["tbasis"])
    rest = count_parameters(model, trainable_only=False, exclude_modules=["tbasis", "coefficients", "log_adapters"])
    return {"total": total, "basis": total - without_basis, "layers": without_basis - rest, "other": rest}


@pytest.mark.parametrize("shape,n", [((5, 7), 2), ((6, 4, 3, 3), 3), ((3, 5, 3, 2), 2)])
def test_tensorization_interleaves_digits_and_crops(shape, n):
    plan = Tensorization(shape, n)
    E = torch.randn(plan.envelope, dtype=D, generator=_gen(0))
    d, s = plan.channel_digits, plan.kernel_digits
    # the ring tensor by explicit index arithmetic: mode j = (output digit j) · n + (input digit j), digits most
    # significant first; channel modes first, then kernel (row digit, column digit) modes
    T = torch.empty([n * n] * plan.modes, dtype=D)
    for idx in itertools.product(range(n * n), repeat=plan.modes):
        hi = [i // n for i in idx]
        lo = [i % n for i in idx]
        o = sum(h * n ** (d - 1 - j) for j, h in enumerate(hi[:d]))
        i = sum(x * n ** (d - 1 - j) for j, x in enumerate(lo[:d]))
        kern = ()
        if s:
            p = sum(h * n ** (s - 1 - j) for j, h in enumerate(hi[d:]))
            q = sum(x * n ** (s - 1 - j) for j, x in enumerate(lo[d:]))
            kern = (p, q)
        T[idx] = E[(o, i, *kern)]
    W = plan.to_weight(T.reshape(-1))
    assert W.shape == shape
    assert torch.equal(W, E[tuple(slice(0, k) for k in shape)])


def test_decompression_is_the_tensor_ring_of_the_combined_cores_and_matches_the_variance():
    basis = TBasis(4, 3, 4, dtype=D, generator=_gen(1))
    factory = TBasisFactory(basis)
    factory.add("a", (7, 5), std=0.3, generator=_gen(2))
    factory.add("b", (6, 9), std=0.05, generator=_gen(3))  # 4 modes against a's 3 and c's 2: three groups
    factory.add("c", (4, 3), std=1.7, generator=_gen(4))
    with torch.no_grad():
        factory.log_adapters["a"].normal_(0, 0.3, generator=_gen(5))
    for key, std in (("b", 0.05), ("c", 1.7)):  # untouched since init: the promised standard deviation
        assert factory.weight(key).std().item() == pytest.approx(std, rel=1e-10)
    for key in ("a", "b", "c"):
        plan = factory.plans[key]
        # cores by hand: C_k = Σ_β α_kβ B_β, then ρ_k = diag(exp λ_k) on the left rank
        alpha, lam = factory.coefficients[key], factory.log_adapters[key]
        cores = [
            lam[k].exp()[:, None, None] * torch.einsum("b,brns->rns", alpha[k], basis.basis) for k in range(plan.modes)
        ]
        expected = plan.to_weight(TensorRing(cores).full().reshape(-1))
        assert torch.allclose(factory.weight(key), expected, rtol=1e-12, atol=1e-14)


def test_a_converted_model_equals_the_dense_model_of_its_decompressed_weights():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.Flatten(), nn.Linear(6 * 3 * 3, 5)
    ).double()
    dense = copy.deepcopy(model)
    stds = [m.weight.std().item() for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    factory = convert_to_tbasis(model, 8, 4, generator=_gen(6))
    assert factory.mode_size == 9  # 3×3 convs present
    weights = [factory.weight(k) for k in factory.plans]
    for w, std in zip(weights, stds):
        assert w.std().item() == pytest.approx(std, rel=1e-10)  # variance matching to the replaced weights
    with torch.no_grad():
        for m, w in zip([m for m in dense if isinstance(m, (nn.Conv2d, nn.Linear))], weights):
            assert m.weight.shape == w.shape
            m.weight.copy_(w)
    x = torch.randn(3, 1, 8, 8, dtype=D, generator=_gen(7))
    assert torch.allclose(model(x), dense(x), rtol=1e-12, atol=1e-13)
    twin = copy.deepcopy(model)  # a copy owns its own factory and still refreshes it
    assert torch.allclose(twin(x), dense(x), rtol=1e-12, atol=1e-13)
    # the penalty is Σ ‖W‖², and parameters are counted by the storage formula
    assert tbasis_penalty(model).item() == pytest.approx(sum(w.square().sum().item() for w in weights), rel=1e-12)
    counts = _counts(model)
    B, R, N = 8, 4, 9
    modes = sum(p.modes for p in factory.plans.values())
    biases = sum(m.bias.numel() for m in dense if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert counts["basis"] == B * N * R * R and counts["layers"] == modes * (B + R) and counts["other"] == biases
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_a_training_step_changes_the_weights_and_gradients_match_finite_differences():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    factory = convert_to_tbasis(model, 3, 2, generator=_gen(8))
    x = torch.randn(4, 6, dtype=D, generator=_gen(9))
    params = [factory.tbasis.basis, *factory.coefficients.values(), *factory.log_adapters.values()]
    base = [p.detach().clone() for p in params]

    def loss_of(*values):
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
        return model(x).square().sum() + 1e-2 * tbasis_penalty(model)

    loss = loss_of(*base)
    grads = torch.autograd.grad(loss, params)
    h = 1e-6
    for j, (p, g) in enumerate(zip(params, grads)):
        e = torch.zeros_like(p).reshape(-1)
        e[0] = h
        e = e.reshape(p.shape)
        plus = [b + e if i == j else b for i, b in enumerate(base)]
        minus = [b - e if i == j else b for i, b in enumerate(base)]
        with torch.no_grad():
            fd = (loss_of(*plus) - loss_of(*minus)) / (2 * h)
        assert g.reshape(-1)[0].item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-9)
    loss_of(*base)
    opt = torch.optim.SGD(params, lr=0.1)
    before = factory.weight("0").detach().clone()
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()
    assert not torch.allclose(factory.weight("0"), before)  # the in-place step invalidates the decompressed cache


def test_plain_rings_without_a_basis_and_bad_input():
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3)).double()
    factory = convert_to_tbasis(model, None, 2, generator=_gen(10))
    assert factory.tbasis is None
    counts = _counts(model)
    assert counts["basis"] == 0 and counts["layers"] == sum(p.modes for p in factory.plans.values()) * (4 * 4 + 2)
    assert model(torch.randn(2, 6, dtype=D)).shape == (2, 3)
    with pytest.raises(ValueError, match="mode_size"):
        TBasis(4, 2, 5)
    with pytest.raises(ValueError, match="no nn.Linear"):
        convert_to_tbasis(nn.Sequential(nn.ReLU()), 4, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(1)
    cpu = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double()
    gpu = copy.deepcopy(cpu).cuda()
    convert_to_tbasis(cpu, 4, 3, generator=_gen(11))
    factory = convert_to_tbasis(gpu, 4, 3, generator=_gen(11))
    assert factory.tbasis.basis.device.type == "cuda"
    x = torch.randn(2, 1, 6, 6, dtype=D, generator=_gen(12))
    assert torch.allclose(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-10, atol=1e-12)
    X = TensorRing.random((3, 4, 5), 2, generator=_gen(13), dtype=torch.float64)
    assert torch.allclose(X.to("cuda").full().cpu(), X.full(), atol=1e-12)


def test_the_decompressed_weights_follow_every_change_they_depend_on():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    factory = convert_to_tbasis(model, 3, 2, generator=_gen(14))
    x = torch.randn(4, 6)
    # the penalty before the forward, two accumulation steps without an optimizer step
    for _ in range(2):
        (1e-2 * tbasis_penalty(model) + model(x).square().sum()).backward()
    # a fused Adam step (it bumps no version) after the backward is seen by the next read
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    w = factory.weight("0")
    before = w.detach().clone()
    (w.sum() + model(x).sum()).backward()
    opt.step()
    assert not torch.allclose(factory.weight("0"), before)
    # a no-grad evaluation does not leave gradient-free weights behind
    with torch.no_grad():
        model(x)
    assert tbasis_penalty(model).requires_grad
    # dtype changes reach the weights
    model.double()
    assert factory.weight("0").dtype == D and model(x.double()).dtype == D


def test_tied_modules_stay_tied_and_every_layer_reaches_the_factory():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 2))
    factory = convert_to_tbasis(model, 3, 2, generator=_gen(15))
    assert model[0] is model[2] and len(factory.plans) == 2
    model[0] = model[2] = nn.Identity()  # the first converted layer leaves: the factory stays with the others
    assert sum(p.numel() for p in model.parameters()) == _counts(model)["total"] > 0
    assert factory.tbasis.basis in set(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    assert factory.tbasis.basis.grad is not None


def test_invalid_sizes_are_refused_instead_of_hanging():
    with pytest.raises(ValueError, match="mode_size"):
        TBasisFactory(None, rank=2, mode_size=1)
    with pytest.raises(ValueError, match="rank"):
        TBasisFactory(None, rank=0, mode_size=4)
    with pytest.raises(ValueError, match="n must be"):
        Tensorization((5, 7), 1)
    with pytest.raises(ValueError, match="come from the basis"):
        TBasisFactory(TBasis(2, 2, 4), rank=3)
    with pytest.raises(TypeError, match="float32 or float64"):
        convert_to_tbasis(nn.Sequential(nn.Linear(3, 3).half()), 2, 2)
    with pytest.raises(ValueError, match="grouped"):
        convert_to_tbasis(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), 2, 2)
