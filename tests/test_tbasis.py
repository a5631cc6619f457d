"""T-Basis: tensorization maps, batched decompression against TensorRing, the paper's initialization, variance matching,
conversion, grads, a fixed basis shared by several models."""

import copy
import io
import itertools
import math

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
    factory = convert_to_tbasis(model, 8, 4, generator=_gen(6), init="match")
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


def _he_target(shape):
    """The reference's target (``TBasisLayerBase.initialize``): ``gain / √fan`` with torch's ReLU gain and the fan-in
    of the unpadded weight."""
    fan_in = nn.init._calculate_correct_fan(torch.empty(shape), "fan_in")
    return nn.init.calculate_gain("relu") / math.sqrt(fan_in)


def _by_hand(factory, key):
    """Layer ``key``'s weight from the definition: C_k = Σ_β α_kβ B_β, ρ_k = diag(exp λ_k) on the left rank."""
    plan, alpha, lam = factory.plans[key], factory.coefficients[key], factory.log_adapters[key]
    basis = factory.tbasis.basis
    cores = [lam[k].exp()[:, None, None] * torch.einsum("b,brns->rns", alpha[k], basis) for k in range(plan.modes)]
    return plan.to_weight(TensorRing(cores).full().reshape(-1))


HE_SHAPES = [(7, 5), (6, 9), (16, 16), (10, 3), (3, 40), (6, 4, 3, 3), (8, 8, 3, 3), (5, 3, 1, 1), (4, 2, 5, 5)]


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("kind", ["trainable", "fixed", "plain"])
def test_the_default_start_is_the_papers_he_variance_for_every_layer_and_seed(dtype, rel, kind):
    # the paper (Sec. 4.2, Eq. 13) and the reference: α ~ N(0, σ_ℓ^{2/m}) clamped at 3σ, then one scalar per layer so
    # that std(W_ℓ) = σ_ℓ = √2 / √fan_in exactly; the pre-issue-23 start (the replaced weight's std) is √6 off
    for seed in range(4):
        for n in (2, 3):
            basis = None
            if kind != "plain":
                basis = TBasis(
                    3 + seed, 2 + seed % 2, n * n, dtype=dtype, generator=_gen(seed), trainable=kind == "trainable"
                )
                factory = TBasisFactory(basis)
            else:
                factory = TBasisFactory(None, rank=2 + seed % 2, mode_size=n * n, dtype=dtype)
            for i, shape in enumerate(HE_SHAPES):
                key = f"l{i}"
                factory.add(key, shape, generator=_gen(100 * seed + i))
                w = factory.weight(key)
                assert w.shape == shape and w.dtype == dtype
                assert w.std().item() == pytest.approx(_he_target(shape), rel=rel)
                if basis is not None:
                    # the direction of α is the clamped normal draw: α = c · clamp(z, -3, 3) for one scalar c > 0
                    z = torch.randn(
                        factory.plans[key].modes, basis.basis_size, dtype=dtype, generator=_gen(100 * seed + i)
                    )
                    z = z.clamp(-3, 3)
                    ratio = factory.coefficients[key].detach() / z
                    assert ratio.min() > 0 and torch.allclose(ratio, ratio[0, 0], rtol=10 * rel)
                    tol = (1e-12 if dtype == D else 1e-5) * _he_target(shape)  # absolute: entries near 0 round apart
                    assert torch.allclose(w, _by_hand(factory, key), rtol=0, atol=tol)
                assert torch.equal(factory.log_adapters[key], torch.zeros_like(factory.log_adapters[key]))


def test_the_basis_draw_is_the_papers_clamped_normal_of_variance_one_over_b_r():
    B, R, N = 32, 16, 9
    basis = TBasis(B, R, N, dtype=D, generator=_gen(30)).basis.detach().reshape(-1)
    # Var(clamp(Z, -3, 3)) = P(|Z| < 3) − 6 φ(3) + 9 P(|Z| ≥ 3), then / (B R) (Eq. 13)
    inside = math.erf(3 / math.sqrt(2))
    phi3 = math.exp(-4.5) / math.sqrt(2 * math.pi)
    var = (inside - 6 * phi3 + 9 * (1 - inside)) / (B * R)
    assert basis.var().item() == pytest.approx(var, rel=0.03)  # 73 728 entries: relative s.e. 0.5 %
    assert abs(basis.mean().item()) < 5 * math.sqrt(var / basis.numel())
    bound = 3 / math.sqrt(B * R)
    assert basis.abs().max().item() == pytest.approx(bound, rel=1e-12)  # the clamp is reached (p = 0.27 %)...
    assert (basis.abs() > bound * (1 + 1e-12)).sum() == 0  # ...and never exceeded


def test_convert_starts_at_he_by_default_and_at_the_replaced_weights_with_match():
    torch.manual_seed(3)
    layers = [nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1), nn.Flatten(), nn.Linear(64, 10)]
    model = nn.Sequential(*layers).double()
    shapes = [tuple(m.weight.shape) for m in layers if not isinstance(m, nn.Flatten)]
    replaced = [m.weight.std().item() for m in layers if not isinstance(m, nn.Flatten)]
    old = copy.deepcopy(model)
    he = convert_to_tbasis(model, 8, 4, generator=_gen(31))
    match = convert_to_tbasis(old, 8, 4, generator=_gen(31), init="match")
    for key, shape, std in zip(he.plans, shapes, replaced):
        assert he.weight(key).std().item() == pytest.approx(_he_target(shape), rel=1e-10)
        assert match.weight(key).std().item() == pytest.approx(std, rel=1e-10)
    # the 64 → 64 conv (36 864 entries): PyTorch's default start is uniform with std 1/√(3 fan_in), √6 below He
    ratio = he.weight("1").std().item() / match.weight("1").std().item()
    assert ratio == pytest.approx(math.sqrt(6), rel=0.02)


def _two_models():
    torch.manual_seed(4)
    first = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    second = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return first, second


def test_a_fixed_basis_is_shared_saved_and_never_trained():
    basis = TBasis(4, 3, 4, dtype=D, generator=_gen(40), trainable=False)
    assert not basis.trainable and list(basis.parameters()) == [] and "fixed" in repr(basis)
    assert set(basis.state_dict()) == {"basis"}
    first, second = _two_models()
    f1 = convert_to_tbasis(first, basis=basis, generator=_gen(41))
    f2 = convert_to_tbasis(second, basis=basis, generator=_gen(42))
    assert f1.tbasis is basis and f2.tbasis is basis
    ptr, before = basis.basis.data_ptr(), basis.basis.clone()
    for model, factory in ((first, f1), (second, f2)):
        state = model.state_dict()
        keys = [k for k in state if k.endswith("tbasis.basis")]
        assert keys and all(state[k].data_ptr() == ptr for k in keys)  # saved with each model, one storage
        assert all(p.data_ptr() != ptr for p in model.parameters())
        # the storage formula without the basis: m (B + R) per layer, plus the biases
        modes = sum(p.modes for p in factory.plans.values())
        biases = sum(m.bias.numel() for m in model if hasattr(m, "bias"))
        assert count_parameters(model, trainable_only=False) == modes * (4 + 3) + biases
    for factory, shapes in ((f1, [(5, 6), (3, 5)]), (f2, [(4, 8), (2, 4)])):
        for key, shape in zip(["0", "2"], shapes):
            assert factory.weight(key).std().item() == pytest.approx(_he_target(shape), rel=1e-10)
    x1 = torch.randn(5, 6, dtype=D, generator=_gen(43))
    x2 = torch.randn(5, 8, dtype=D, generator=_gen(44))
    coefficients = [p.detach().clone() for p in f1.coefficients.values()]
    opt = torch.optim.Adam([*first.parameters(), *second.parameters()], lr=0.1, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        loss = first(x1).square().sum() + second(x2).square().sum()
        (loss + 1e-2 * (tbasis_penalty(first) + tbasis_penalty(second))).backward()
        opt.step()
    assert torch.equal(basis.basis, before) and basis.basis.grad is None and basis.basis.data_ptr() == ptr
    assert all(not torch.equal(p, q) for p, q in zip(f1.coefficients.values(), coefficients))
    for factory in (f1, f2):
        for key in factory.plans:
            assert torch.allclose(factory.weight(key), _by_hand(factory, key), rtol=1e-12, atol=1e-14)
    # copies: deep-copying the two models together keeps one basis between them
    c1, c2 = copy.deepcopy((first, second))
    assert c1[0].factory.tbasis is c2[0].factory.tbasis and c1[0].factory.tbasis is not basis
    assert torch.equal(c1(x1), first(x1)) and torch.equal(c2(x2), second(x2))


def test_loading_a_saved_model_restores_its_fixed_basis_and_old_state_dicts_load():
    first, _ = _two_models()
    convert_to_tbasis(first, basis=TBasis(4, 3, 4, dtype=D, generator=_gen(50), trainable=False), generator=_gen(51))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    x = torch.randn(5, 6, dtype=D, generator=_gen(52))
    # a fresh model on another fixed basis: its weights are cached before the load, read again after it without a
    # forward (the in-place copy into the buffer must invalidate them)
    fresh, _ = _two_models()
    other = TBasis(4, 3, 4, dtype=D, generator=_gen(53), trainable=False)
    factory = convert_to_tbasis(fresh, basis=other, generator=_gen(54))
    stale = factory.weight("0").detach().clone()
    other.load_state_dict(first[0].factory.tbasis.state_dict())  # the basis alone: only the buffer changes
    assert torch.equal(other.basis, first[0].factory.tbasis.basis)
    assert torch.allclose(factory.weight("0"), _by_hand(factory, "0"), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(factory.weight("0"), stale)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    assert torch.allclose(factory.weight("0"), first[0].factory.weight("0"), rtol=0, atol=0)
    assert torch.equal(fresh(x), first(x))
    # a state dict saved with a trainable basis (before this option existed, always) loads into a fixed one, and a
    # pre-trained basis alone loads into a fixed TBasis by its one key
    trained, _ = _two_models()
    convert_to_tbasis(trained, 4, 3, generator=_gen(55))
    fixed_model, _ = _two_models()
    convert_to_tbasis(fixed_model, basis=TBasis(4, 3, 4, dtype=D, trainable=False), generator=_gen(56))
    fixed_model.load_state_dict(trained.state_dict())
    assert torch.equal(fixed_model(x), trained(x)) and not fixed_model[0].factory.tbasis.trainable
    pretrained = TBasis(4, 3, 4, dtype=D, trainable=False)
    pretrained.load_state_dict(trained[0].factory.tbasis.state_dict())
    assert torch.equal(pretrained.basis, trained[0].factory.tbasis.basis)
    # a whole pickled model keeps its fixed basis a buffer
    buffer = io.BytesIO()
    torch.save(first, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    assert not again[0].factory.tbasis.trainable and torch.equal(again(x), first(x))


def test_freeze_turns_a_learned_basis_into_a_fixed_one_for_other_models():
    first, second = _two_models()
    f1 = convert_to_tbasis(first, 4, 3, generator=_gen(60))
    x = torch.randn(5, 6, dtype=D, generator=_gen(61))
    opt = torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    first(x).square().sum().backward()
    opt.step()
    basis = f1.tbasis
    ptr, learned, out = basis.basis.data_ptr(), basis.basis.detach().clone(), first(x).detach()
    total = count_parameters(first, trainable_only=False)
    assert basis.freeze() is basis and basis.freeze() is basis  # idempotent
    assert not basis.trainable and basis.basis.data_ptr() != ptr and torch.equal(basis.basis, learned)
    assert not basis.basis.requires_grad
    assert count_parameters(first, trainable_only=False) == total - 4 * 3 * 4 * 3
    assert torch.equal(first(x), out)
    opt.step()  # built before freeze (momentum, weight decay): it moves the old parameter, never the fixed basis
    assert torch.equal(basis.basis, learned)
    f2 = convert_to_tbasis(second, basis=basis, generator=_gen(62))  # a pre-trained basis for another model
    assert f2.tbasis is basis
    for key, shape in (("0", (4, 8)), ("2", (2, 4))):  # the correction is computed against the learned basis
        assert f2.weight(key).std().item() == pytest.approx(_he_target(shape), rel=1e-10)
    opt = torch.optim.SGD([*first.parameters(), *second.parameters()], lr=0.1, weight_decay=0.1)
    (first(x).square().sum() + second(torch.randn(5, 8, dtype=D)).square().sum()).backward()
    opt.step()
    assert torch.equal(basis.basis, learned)


def test_bad_init_and_basis_arguments_are_refused():
    model = nn.Sequential(nn.Linear(6, 5)).double()
    with pytest.raises(ValueError, match="init"):
        convert_to_tbasis(model, 4, 2, init="xavier")
    with pytest.raises(ValueError, match="rank"):
        convert_to_tbasis(model, 4)
    basis = TBasis(4, 2, 4, dtype=D, trainable=False)
    for kwargs, name in ((dict(basis_size=5), "basis_size"), (dict(rank=3), "rank"), (dict(mode_size=9), "mode_size")):
        with pytest.raises(ValueError, match=name):
            convert_to_tbasis(model, basis=basis, **kwargs)
    with pytest.raises(ValueError, match="basis is torch.float32"):
        convert_to_tbasis(model, basis=TBasis(4, 2, 4, dtype=torch.float32))
    with pytest.raises(TypeError, match="basis must be a TBasis"):
        convert_to_tbasis(model, basis=basis.basis)
    with pytest.raises(TypeError, match="trainable"):
        TBasis(4, 2, 4, trainable="no")
    factory = TBasisFactory(basis)
    for std in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="std"):
            factory.add("a", (3, 3), std)
    assert isinstance(model[0], nn.Linear)  # every refusal left the model untouched
    convert_to_tbasis(model, basis=basis, rank=2, mode_size=4)  # agreeing values are accepted


def test_casting_one_model_of_a_shared_basis_alone_is_named():
    first, second = _two_models()
    basis = TBasis(4, 3, 4, dtype=D, trainable=False)
    convert_to_tbasis(first, basis=basis, generator=_gen(70))
    convert_to_tbasis(second, basis=basis, generator=_gen(71))
    first.float()  # casts the shared basis too, not second's coefficients
    with pytest.raises(RuntimeError, match="shared basis"):
        second(torch.randn(5, 8, dtype=D))
