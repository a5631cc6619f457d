"""Issue 23: the GS permutation and parameter layout of the authors' code (Skonor/gsoft_demo), re-implemented here in a
few lines from its formulas, against our default (``shuffle="paper"``), the reference loader, and the two parameter
counts. All in float64."""

import pytest
import torch

from lowrankopt.nn import GSOFTConfig, GSOrthogonal, convert_to_gsoft
from lowrankopt.nn.orthogonal.gs import block_shuffle_index, gs_apply, shuffle_index
from lowrankopt.nn.orthogonal.gsoft import gsoft_parameter_counts
from lowrankopt.nn.orthogonal.gsoft_layer import GSOFTLinear

D = torch.float64


def reference_gs(x, L, R):
    """gsoft_demo's ``BlockdiagButterflyMultiply(x, R, L)`` for square blocks, as its dense "implementation 3"
    states it (glue/models/layers/blockdiag_butterfly_multiply.py): ``R x``, then ``'b (r l) -> b (l r)'`` with l
    the number of blocks, ``L ·``, then ``'b (l s) -> b (s l)'``."""
    k, b, _ = L.shape
    B = x.shape[0]
    out = x @ torch.block_diag(*R).T
    out = out.reshape(B, b, k).transpose(1, 2).reshape(B, k * b)
    out = out @ torch.block_diag(*L).T
    return out.reshape(B, k, b).transpose(1, 2).reshape(B, k * b)


def reference_cayley(A):
    """gsoft_demo's ``cayley_batch``: ``skew = (A − Aᵀ)/2``, ``solve(I − skew, I + skew, left=False)``."""
    S = 0.5 * (A - A.mT)
    eye = torch.eye(A.shape[-1], dtype=A.dtype).expand_as(A)
    return torch.linalg.solve(eye - S, eye + S, left=False)


# (n, nblocks): b != n/b both ways, and b = n/b
SIZES = [(24, 6), (24, 2), (32, 8), (16, 4), (36, 6)]


@pytest.mark.parametrize("n, k", SIZES)
def test_default_permutation_is_the_reference_one(n, k):
    """The reference's dense Q (its formula applied to the basis vectors) against ``Pᵀ L P R`` with our default P as
    a permutation matrix, and against :func:`gs_apply`; the legacy P is the transpose."""
    b = n // k
    g = torch.Generator().manual_seed(n + k)
    L = torch.randn(k, b, b, dtype=D, generator=g)
    R = torch.randn(k, b, b, dtype=D, generator=g)
    dense_ref = reference_gs(torch.eye(n, dtype=D), L, R).T  # columns: images of the basis vectors
    P = torch.eye(n, dtype=D)[block_shuffle_index(k, n)]  # (P x)_i = x[idx[i]]
    ours = P.T @ torch.block_diag(*L) @ P @ torch.block_diag(*R)
    assert (ours - dense_ref).abs().max() < 1e-12
    assert (gs_apply(torch.eye(n, dtype=D), L, R).T - dense_ref).abs().max() < 1e-12
    legacy = torch.eye(n, dtype=D)[block_shuffle_index(k, n, "legacy")]
    assert torch.equal(legacy, torch.eye(n, dtype=D)[shuffle_index(k, n)])
    q_legacy = legacy.T @ torch.block_diag(*L) @ legacy @ torch.block_diag(*R)
    if b == k:  # the two coincide exactly when b = n / b
        assert torch.equal(P, legacy)
    else:  # otherwise they differ by O(1)
        assert not torch.equal(P, legacy)
        assert (q_legacy - dense_ref).abs().max() > 0.1


@pytest.mark.parametrize("n, k", SIZES)
@pytest.mark.parametrize("method", ["cayley", "exp"])
def test_load_reference_gs_orthogonal(n, k, method):
    b = n // k
    g = torch.Generator().manual_seed(7 * n + k)
    A_L = torch.randn(k, b, b, dtype=D, generator=g)  # the reference's raw generators (not skew)
    A_R = torch.randn(k, b, b, dtype=D, generator=g)
    make = reference_cayley if method == "cayley" else (lambda A: torch.linalg.matrix_exp(0.5 * (A - A.mT)))
    x = torch.randn(5, n, dtype=D, generator=g)
    want = reference_gs(x, make(A_L), make(A_R))
    q = GSOrthogonal(n, nblocks=k, map=method, dtype=D)
    q.load_reference(A_L, A_R)
    assert (q(x) - want).abs().max() < 1e-12
    assert (q.matrix() - reference_gs(torch.eye(n, dtype=D), make(A_L), make(A_R)).T).abs().max() < 1e-12
    if b != k:  # the legacy permutation cannot take the reference's parameters
        with pytest.raises(ValueError, match="shuffle='paper'"):
            GSOrthogonal(n, nblocks=k, map=method, dtype=D, shuffle="legacy").load_reference(A_L, A_R)
    with pytest.raises(ValueError, match="shape"):
        q.load_reference(A_L[:1], A_R)


@pytest.mark.parametrize("layout", ["glue", "diffusion"])
def test_load_reference_gsoft_layer(layout):
    """A reference-layout GSOFT layer state (glue's GSOFTLayer: ``gs_ort.gsoft_L/R``, ``gsoft_s``, ``pre_layer.*``;
    or the diffusion layout ``ort_gs.L/R``) loads into our GSOFTLinear, whose output then equals the reference
    forward ``s ⊙ (W · GS(x)) + b`` to 1e-12."""
    g = torch.Generator().manual_seed(11)
    n_in, n_out, b = 24, 10, 4  # b = 4 ≠ n/b = 6
    k = n_in // b
    base = torch.nn.Linear(n_in, n_out, dtype=D)
    A_L = torch.randn(k, b, b, dtype=D, generator=g)
    A_R = torch.randn(k, b, b, dtype=D, generator=g)
    s = 1 + 0.1 * torch.randn(n_out, dtype=D, generator=g)
    names = ("gs_ort.gsoft_L", "gs_ort.gsoft_R") if layout == "glue" else ("ort_gs.L", "ort_gs.R")
    state = {names[0]: A_L, names[1]: A_R, "gsoft_s": s, "pre_layer.weight": base.weight.detach(),
             "pre_layer.bias": base.bias.detach()}  # fmt: skip
    model = torch.nn.Sequential(base)
    convert_to_gsoft(model, GSOFTConfig(block_size=b, target_modules=["0"]))
    layer = model[0]
    assert isinstance(layer, GSOFTLinear)
    layer.load_reference(state)
    x = torch.randn(7, n_in, dtype=D, generator=g)
    want = s * (reference_gs(x, reference_cayley(A_L), reference_cayley(A_R)) @ base.weight.T) + base.bias
    with torch.no_grad():
        assert (layer(x) - want).abs().max() < 1e-12
        layer.merge()
        assert (layer(x) - want).abs().max() < 1e-12
        layer.unmerge()
    bad = dict(state, extra=torch.zeros(1))
    with pytest.raises(ValueError, match="unexpected"):
        layer.load_reference(bad)
    with pytest.raises(ValueError, match="layouts"):
        layer.load_reference({"gsoft_s": s})


@pytest.mark.parametrize("n, b", [(24, 4), (768, 8), (12, 12), (10, 1)])
def test_parameter_counts_closed_form(n, b):
    counts = GSOrthogonal.parameter_counts(n, b)
    assert counts == {"stored": n * (b - 1), "paper": 2 * n * b}
    q = GSOrthogonal(n, b, dtype=D)
    assert sum(p.numel() for p in q.parameters()) == counts["stored"]
    q_orth = GSOrthogonal(n, b, dtype=D, parametrization="orthogonal")  # full blocks: the paper's count
    assert sum(p.numel() for p in q_orth.parameters()) == counts["paper"]
    with pytest.raises(ValueError, match="divide"):
        GSOrthogonal.parameter_counts(n + 1, b) if b > 1 else GSOrthogonal.parameter_counts(n, n + 1)


def test_gsoft_parameter_counts_of_a_model():
    """Two adapted layers, one double: closed forms ``n (b − 1)`` / ``2 n b`` per rotation plus ``n_out`` scale."""
    model = torch.nn.Sequential(torch.nn.Linear(24, 16, dtype=D), torch.nn.Linear(16, 8, dtype=D))
    convert_to_gsoft(model, GSOFTConfig(block_size=4, target_modules=["0", "1"], double=True))
    b = 4
    rotations = [24, 16, 16, 8]  # in and out sides of both layers
    want_stored = sum(n * (b - 1) for n in rotations) + 16 + 8
    want_paper = sum(2 * n * b for n in rotations) + 16 + 8
    assert gsoft_parameter_counts(model) == {"stored": want_stored, "paper": want_paper}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == want_stored
    with pytest.raises(ValueError, match="no GSOFT"):
        gsoft_parameter_counts(torch.nn.Linear(4, 4))


def test_paper_count_reproduces_the_glue_table():
    """GLUE, RoBERTa-base, GSOFT b = 8 on every attention and MLP linear (Table 1: 1.42M). One-sided GSOFT rotates
    the input side: q, k, v, o and fc1 (768 inputs) and fc2 (3072), plus the output scales, 12 layers."""
    b = 8
    per_layer = 5 * GSOrthogonal.parameter_counts(768, b)["paper"] + GSOrthogonal.parameter_counts(3072, b)["paper"]
    per_layer += 4 * 768 + 3072 + 768  # scales: q, k, v, o, fc1 (3072), fc2 (768)
    assert 12 * per_layer == 1_410_048  # 1.41M by the paper's count (ours stores 12 · … = 0.74M)


def test_legacy_shuffle_config_round_trip():
    """A state dict saved with the legacy permutation loads into a shuffle='legacy' model and gives its outputs."""
    g = torch.Generator().manual_seed(3)
    models = []
    for shuffle in ("legacy", "legacy", "paper"):
        m = torch.nn.Sequential(torch.nn.Linear(24, 6, dtype=D))
        torch.manual_seed(0)
        m[0].reset_parameters()
        convert_to_gsoft(m, GSOFTConfig(block_size=4, target_modules=["0"], shuffle=shuffle))
        models.append(m)
    with torch.no_grad():
        for p in models[0].parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, dtype=D, generator=g))
    sd = {k: v for k, v in models[0].state_dict().items()}
    models[1].load_state_dict(sd)
    models[2].load_state_dict(sd)
    x = torch.randn(4, 24, dtype=D, generator=g)
    with torch.no_grad():
        assert (models[1](x) - models[0](x)).abs().max() < 1e-13
        assert (models[2](x) - models[0](x)).abs().max() > 1e-3  # same parameters, the other permutation
    with pytest.raises(ValueError, match="shuffle"):
        GSOFTConfig(block_size=4, target_modules=["0"], shuffle="monarch")
    with pytest.raises(ValueError, match="shuffle"):
        GSOrthogonal(8, 2, shuffle="gather")
