"""Issue 23: the GS permutation and parameter layout of the authors' code (Skonor/gsoft_demo), re-implemented here in a
few lines from its formulas, against our default (``shuffle="paper"``), the reference loader, and the two parameter
counts. All in float64."""

import io
import itertools
import pickle

import pytest
import torch

from lowrankopt.nn import GSOFTConfig, GSOrthogonal, convert_to_gsoft, load_adapter_state_dict
from lowrankopt.nn.orthogonal.gs import block_shuffle_index, gs_apply, shuffle_index
from lowrankopt.nn.orthogonal.gsoft import gsoft_parameter_counts, gsoft_state_dict, load_gsoft_state_dict
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


def randomized_gsoft(shuffle, n_in=24, n_out=8, b=4, double=False, seed=3):
    """A one-layer model with a GSOFT adapter (base weight from seed 0) and random adapter parameters."""
    m = torch.nn.Sequential(torch.nn.Linear(n_in, n_out, dtype=D))
    torch.manual_seed(0)
    m[0].reset_parameters()
    convert_to_gsoft(m, GSOFTConfig(block_size=b, target_modules=["0"], double=double, shuffle=shuffle))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, dtype=D, generator=g))
    return m


def without_records(state):
    """A state dict as lowrankopt saved it before issue 23: no permutation records (their absence marks it old)."""
    return {k: v for k, v in state.items() if not k.endswith("_extra_state")}


def round_trip(state):
    """``torch.save`` then ``torch.load(..., weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_legacy_shuffle_config_round_trip():
    """A state dict saved with the legacy permutation loads into a shuffle='legacy' model and gives its outputs; into
    a 'paper' model (same parameter shapes, another permutation) it is refused, naming shuffle='legacy', also with
    strict=False, and nothing of the adapter is loaded."""
    saved, same, other = randomized_gsoft("legacy"), randomized_gsoft("legacy", seed=4), randomized_gsoft("paper")
    sd = round_trip(saved.state_dict())
    assert torch.equal(sd["0.gsoft_in._extra_state"], torch.tensor([0]))  # int64 tensors: weights_only loads them
    same.load_state_dict(sd)
    x = torch.randn(4, 24, dtype=D, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (same(x) - saved(x)).abs().max() < 1e-13
    before = {k: v.clone() for k, v in other.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="saved with shuffle='legacy'.*Build it with shuffle='legacy'"):
            other.load_state_dict(sd, strict=strict)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match="shuffle"):
        GSOFTConfig(block_size=4, target_modules=["0"], shuffle="monarch")
    with pytest.raises(ValueError, match="shuffle"):
        GSOrthogonal(8, 2, shuffle="gather")


@pytest.mark.parametrize("dtype", [torch.float32, D])
@pytest.mark.parametrize("n, b", [(24, 4), (16, 4)])
def test_state_dict_without_the_record_is_the_legacy_one(n, b, dtype):
    """A state dict saved before issue 23 (no record) is the legacy permutation's: it loads into a 'legacy' module
    with its outputs, and into a 'paper' one only where the two permutations coincide (b = n/b); otherwise it is
    refused (strict or not) naming shuffle='legacy'. The same for a whole GSOFT model's state."""
    g = torch.Generator().manual_seed(n + b)
    old = GSOrthogonal(n, b, dtype=dtype, shuffle="legacy")
    with torch.no_grad():
        for p in old.parameters():
            p.normal_(generator=g)
    sd = round_trip(without_records(old.state_dict()))
    assert set(sd) == {"L", "R"}
    x = torch.randn(3, n, dtype=dtype, generator=g)
    legacy, paper = GSOrthogonal(n, b, dtype=dtype, shuffle="legacy"), GSOrthogonal(n, b, dtype=dtype)
    legacy.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(legacy(x), old(x))
    if b * b == n:  # the same permutation: loads, same outputs
        paper.load_state_dict(sd)
        with torch.no_grad():
            assert torch.equal(paper(x), old(x))
    else:
        for strict in (True, False):
            with pytest.raises(RuntimeError, match="before issue 23.*shuffle='legacy'"):
                paper.load_state_dict(sd, strict=strict)
        assert not paper.L.any() and not paper.R.any()  # nothing loaded
    saved = randomized_gsoft("legacy", n_in=n, n_out=2 * b, b=b, double=True)
    model = randomized_gsoft("paper", n_in=n, n_out=2 * b, b=b, double=True, seed=7)
    if b * b != n:
        with pytest.raises(RuntimeError, match="0.gsoft_in: .*before issue 23.*shuffle='legacy'"):
            model.load_state_dict(without_records(saved.state_dict()), strict=False)
    legacy_model = randomized_gsoft("legacy", n_in=n, n_out=2 * b, b=b, double=True, seed=7)
    legacy_model.load_state_dict(without_records(saved.state_dict()))
    xs = torch.randn(3, n, dtype=D, generator=g)
    with torch.no_grad():
        assert (legacy_model(xs) - saved(xs)).abs().max() < 1e-13


def test_unreadable_or_paper_records():
    """A 'paper' record loads into 'paper'; an unreadable record is refused."""
    a, b = GSOrthogonal(12, 2, dtype=D), GSOrthogonal(12, 2, dtype=D)
    with torch.no_grad():
        a.L.fill_(0.1)
    b.load_state_dict(round_trip(a.state_dict()))
    assert torch.equal(a.L, b.L) and torch.equal(a.get_extra_state(), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="unreadable record"):
        b.load_state_dict(dict(a.state_dict(), _extra_state=torch.tensor([7])))


@pytest.mark.parametrize("double", [False, True])
def test_gsoft_adapter_files_carry_and_check_the_permutation(double):
    """gsoft_state_dict saves each rotation's record; load_gsoft_state_dict refuses (ValueError, nothing loaded) a file
    with another permutation or an old file (no records) into adapters whose permutation is not the legacy one, and
    loads an old file into legacy adapters with the saved outputs."""
    saved = randomized_gsoft("legacy", double=double)
    sides = ["in", "out"] if double else ["in"]
    adapters = round_trip(gsoft_state_dict(saved))
    assert {k for k in adapters if k.endswith("_extra_state")} == {f"0.gsoft_{s}._extra_state" for s in sides}
    x = torch.randn(4, 24, dtype=D, generator=torch.Generator().manual_seed(6))
    for file, load in itertools.product(
        (adapters, without_records(adapters)), (load_gsoft_state_dict, load_adapter_state_dict)
    ):
        paper = randomized_gsoft("paper", double=double, seed=8)
        before = {k: v.clone() for k, v in gsoft_state_dict(paper).items()}
        with pytest.raises(ValueError, match="shuffle='legacy'"):
            load(paper, file)
        assert all(torch.equal(v, before[k]) for k, v in gsoft_state_dict(paper).items())
        legacy = randomized_gsoft("legacy", double=double, seed=8)
        load(legacy, file)
        with torch.no_grad():
            assert (legacy(x) - saved(x)).abs().max() < 1e-13
    paper_file = gsoft_state_dict(randomized_gsoft("paper", double=double))
    with pytest.raises(ValueError, match="saved with shuffle='paper'.*Build it with shuffle='paper'"):
        load_gsoft_state_dict(randomized_gsoft("legacy", double=double), paper_file)


def test_old_merged_record_is_checked_before_unmerging():
    """A model merged by lowrankopt before issue 23 (legacy permutation, no record): its full state dict is refused by
    a 'paper' model (unmerging the record with the other permutation would corrupt the base weight), also when it
    holds only the base weight and the merge record; a 'legacy' model loads it and unmerges to the base weight."""
    saved = randomized_gsoft("legacy", double=True)
    w0 = saved[0].base_layer.weight.detach().clone()
    saved[0].merge()
    full = without_records(saved.state_dict())
    record_only = {k: v for k, v in full.items() if not k.startswith("0.gsoft_")}
    for sd, strict in ((full, True), (full, False), (record_only, False)):
        paper = randomized_gsoft("paper", double=True, seed=9)
        before = {k: v.clone() for k, v in paper.state_dict().items()}
        with pytest.raises(RuntimeError, match="before issue 23.*shuffle='legacy'") as error:
            paper.load_state_dict(sd, strict=strict)
        assert "Missing key" not in str(error.value)  # the refusal is the only error
        assert all(torch.equal(v, before[k]) for k, v in paper.state_dict().items())  # nothing of it loaded
        assert not paper[0].merged
        legacy = randomized_gsoft("legacy", double=True, seed=9)
        legacy.load_state_dict(sd, strict=False)
        assert legacy[0].merged
        legacy[0].unmerge()
        assert (legacy[0].base_layer.weight - w0).abs().max() < 1e-13


def test_pickled_modules_keep_their_permutation():
    """Whole modules pickle and unpickle with their permutation; a module pickled before the choice existed (no
    ``shuffle`` attribute) is the legacy one, and its state dict says so."""
    for shuffle in ("paper", "legacy"):
        m = randomized_gsoft(shuffle)
        copy = pickle.loads(pickle.dumps(m))
        x = torch.randn(2, 24, dtype=D)
        with torch.no_grad():
            assert torch.equal(copy(x), m(x))
        assert torch.equal(copy.state_dict()["0.gsoft_in._extra_state"], m.state_dict()["0.gsoft_in._extra_state"])
    old = GSOrthogonal(12, 2, dtype=D, shuffle="legacy")
    del old.shuffle
    old = pickle.loads(pickle.dumps(old))
    assert torch.equal(old.state_dict()["_extra_state"], torch.tensor([0]))
    GSOrthogonal(12, 2, dtype=D, shuffle="legacy").load_state_dict(old.state_dict())


def test_load_reference_checks_everything_before_writing():
    """L and R (and GSOFTLinear's scale) are checked fully before anything is written: a bad R, a NaN / Inf entry or
    a bad scale leaves every parameter as it was; map='neumann' (not a map of the reference) is refused."""
    g = torch.Generator().manual_seed(11)
    A = torch.randn(4, 3, 3, dtype=D, generator=g)
    q = GSOrthogonal(12, block_size=3, dtype=D)
    nan, inf = A.clone(), A.clone()
    nan[0, 0, 1], inf[1, 2, 0] = float("nan"), float("inf")
    for (L, R), match in [
        ((A, torch.randn(4, 3, 2, dtype=D)), "R must be a tensor of shape"),
        ((nan, A), "L has non-finite"),
        ((A, inf), "R has non-finite"),
        ((A, A.to(torch.int64)), "R must be a real floating tensor"),
    ]:
        with pytest.raises(ValueError, match=match):
            q.load_reference(L, R)
        assert not q.L.any() and not q.R.any()
    q32 = GSOrthogonal(12, block_size=3, dtype=torch.float32)
    with pytest.raises(ValueError, match="L has non-finite.*range"):
        q32.load_reference(A * 1e300, A)  # finite in float64, not in float32
    with pytest.raises(ValueError, match="map='neumann'"):
        GSOrthogonal(12, block_size=3, dtype=D, map="neumann").load_reference(A, A)
    model = torch.nn.Sequential(torch.nn.Linear(12, 6, dtype=D))
    convert_to_gsoft(model, GSOFTConfig(block_size=3, target_modules=["0"]))
    layer = model[0]
    before = {k: v.detach().clone() for k, v in layer.named_parameters() if "gsoft" in k}
    s_nan = torch.ones(6, dtype=D)
    s_nan[2] = float("nan")
    bad_states = [
        ({"gs_ort.gsoft_L": A, "gs_ort.gsoft_R": torch.randn(4, 2, 3, dtype=D), "gsoft_s": 2 * s_nan.nan_to_num()},
         "R must be"),
        ({"gs_ort.gsoft_L": A, "gs_ort.gsoft_R": nan, "gsoft_s": torch.ones(6, dtype=D)}, "R has non-finite"),
        ({"gs_ort.gsoft_L": A, "gs_ort.gsoft_R": A, "gsoft_s": s_nan}, "gsoft_s has non-finite"),
        ({"gs_ort.gsoft_L": A, "gs_ort.gsoft_R": A, "gsoft_s": [1.0] * 6}, "gsoft_s must be a tensor"),
    ]  # fmt: skip
    for state, match in bad_states:
        with pytest.raises(ValueError, match=match):
            layer.load_reference(state)
        assert all(torch.equal(v, before[k]) for k, v in layer.named_parameters() if "gsoft" in k)


@pytest.mark.parametrize("args", [(12, 0), (12, -3), (True, 1), (12, True), (12, 5), (12.0, 3), (0, 1)])
def test_parameter_counts_refuse_bad_sizes(args):
    with pytest.raises(ValueError, match="n|block_size"):
        GSOrthogonal.parameter_counts(*args)
    with pytest.raises(ValueError, match="n|block_size"):
        GSOrthogonal.num_parameters(*args)


def test_permutation_check_on_meta_and_to_empty_modules_and_malformed_records():
    # built on the meta device (or moved to empty memory), the perm buffer holds no values: the check must not read it
    src = GSOrthogonal(12, block_size=3, dtype=D)
    with torch.no_grad():
        src.L.normal_(generator=torch.Generator().manual_seed(1))
        src.R.normal_(generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, 12, dtype=D)
    with torch.device("meta"):
        meta = GSOrthogonal(12, block_size=3, dtype=D)
    meta.load_state_dict(src.state_dict(), assign=True)
    with torch.device("meta"):
        empty = GSOrthogonal(12, block_size=3, dtype=D)
    empty = empty.to_empty(device="cpu")
    empty.load_state_dict(src.state_dict())
    for q in (meta, empty):
        assert torch.allclose(q(x), src(x), rtol=0, atol=1e-14)
    with pytest.raises(RuntimeError, match="unreadable record"):  # a float record is not a code
        GSOrthogonal(12, block_size=3, dtype=D).load_state_dict(
            dict(src.state_dict(), _extra_state=torch.tensor([1.7]))
        )
