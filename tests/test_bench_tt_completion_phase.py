"""Benchmark ``tt-completion-phase``: a tiny case run end to end, its recorded successes checked against a dense
reconstruction of the target, the bisection over the ladder, the transition points and the skipped teneva row."""

import math
import sys

import pytest
import torch

from lowrankopt.benchmarks import registry
from lowrankopt.benchmarks import tt_completion_phase as phase
from lowrankopt.benchmarks.registry import Case
from lowrankopt.benchmarks.runner import Context

D, N_MODE, R = 4, 5, 2
LEVELS = (0.25, 0.5, 0.75, 10.0)  # below 1 there are fewer samples than unknowns: no solver can recover the target


def _dense_uniform_target(seed: int) -> torch.Tensor:
    """The ``uniform`` target of ``seed`` built here, densely: the same draws, contracted by einsum."""
    g = torch.Generator().manual_seed(seed)
    ranks = [1] + [R] * (D - 1) + [1]
    cores = [torch.rand(ranks[k], N_MODE, ranks[k + 1], dtype=torch.float64, generator=g) * (2 / ranks[k])
             for k in range(D)]  # fmt: skip
    return torch.einsum("aib,bjc,ckd,dle->ijkl", *cores)


def test_tiny_case_recovers_where_determined_and_bisects(monkeypatch):
    monkeypatch.setitem(sys.modules, "teneva", None)  # import teneva now raises ImportError
    captured = []
    solve = phase.SOLVERS["complete-cg"]

    def spy(problem):
        x = solve(problem)
        captured.append((problem.indices.clone(), problem.values.clone(), x))
        return x

    monkeypatch.setitem(phase.SOLVERS, "complete-cg", spy)
    params = dict(target="uniform", d=D, n=N_MODE, r=R, seeds=2, levels=LEVELS, max_iter=200,
                  solvers=("complete-cg", "teneva-als"))  # fmt: skip
    ctx = Context("quick", torch.device("cpu"), repeats=1, seed=0, max_time=30.0)
    res = phase.run(Case("tiny", params), ctx)

    dim = phase.FixedTTRank([N_MODE] * D, R).dim
    assert dim == (D - 2) * N_MODE * R * R + 2 * N_MODE * R - (D - 1) * R * R  # 48
    assert res["samples"] == [round(level * dim) for level in LEVELS]
    rows = {row["variant"]: row for row in res["rows"]}
    assert rows["teneva-als"]["skipped"].startswith("skipped: teneva is not installed")
    cg = rows["complete-cg"]
    cells = cg["cells"]
    # bisection from the middle: 0.5 fails on every seed, then 0.75 fails, then 10 succeeds; 0.25 below a failed
    # level is never measured (success is taken to be monotone in |Ω|)
    assert [c["level"] for c in cells] == [0.5, 0.75, 10.0]
    assert cells[2]["successes"] == 2 and cells[1]["successes"] == 0 and cells[0]["successes"] == 0
    assert cg["figures"]["transition ≥9/10 (#Ω/dim)"] == 10.0 == cg["figures"]["transition ≥5/10 (#Ω/dim)"]
    assert cg["figures"][phase._key(0.25)] == "—" and cg["figures"][phase._key(10.0)].startswith("2/2 · ")
    assert res["xy"][0]["series"] == [{"label": "complete-cg", "x": [0.5, 0.75, 10.0], "y": [0.0, 0.0, 1.0]}]

    # the seeds run only until a level's question is decided (2 seeds: "≥ 9/10" needs both to succeed, so one
    # failure decides it; "≥ 5/10" needs one success): 0.5 and 0.75 fail seed 0 in the ≥ 9/10 search, then the
    # ≥ 5/10 search runs their seed 1
    assert [[run["seed"] for run in c["runs"]] for c in cells] == [[0, 1], [0, 1], [0, 1]]
    assert cg["figures"][phase._key(0.5)] == "0/2"

    # every run's recorded outcome, checked against the target rebuilt densely here (all entries, not only Γ); the
    # solver saw a level's seeds in order, so its calls at a level (same |Ω|) match that cell's runs in order
    assert len(captured) == 6
    for cell in cells:
        calls = [c for c in captured if c[0].shape[0] == cell["samples"]]
        for run, (idx, vals, x) in zip(cell["runs"], calls, strict=True):
            dense = _dense_uniform_target(run["seed"])
            torch.testing.assert_close(vals, dense[tuple(idx.T)], rtol=1e-13, atol=0)  # the target's entries
            held_out = torch.ones_like(dense, dtype=torch.bool)
            held_out[tuple(idx.T)] = False
            err = float(
                torch.linalg.vector_norm((x.full() - dense)[held_out]) / torch.linalg.vector_norm(dense[held_out])
            )
            if run["success"]:
                assert err < 1e-6 and run["test_error"] < phase.SUCCESS
            else:
                assert err > 1e-3 and run["test_error"] >= phase.SUCCESS
            assert math.isfinite(run["time"]) and run["time"] > 0


def _run_scripted(monkeypatch, wins: list[int]) -> tuple[tuple[float, ...], dict]:
    """The phase search with a scripted solver: seed s at ladder index i succeeds iff (3 s + i) mod 10 < wins[i]."""
    levels = tuple(float(2 + i) for i in range(len(wins)))
    dim = phase.FixedTTRank([N_MODE] * D, R).dim
    level_of = {round(level * dim): i for i, level in enumerate(levels)}
    calls: dict[int, int] = {}
    outcome = {}

    def scripted(problem):
        i = level_of[problem.indices.shape[0]]
        s = calls[i] = calls.get(i, -1) + 1  # the solver is called with a level's seeds in order
        outcome["success"] = (3 * s + i) % 10 < wins[i]
        return problem.x0

    monkeypatch.setitem(phase.SOLVERS, "scripted", scripted)
    monkeypatch.setattr(phase, "_relative_test_error", lambda x, tidx, tvals: 0.0 if outcome["success"] else 1.0)
    params = dict(target="uniform", d=D, n=N_MODE, r=R, seeds=10, levels=levels, solvers=("scripted",))
    ctx = Context("quick", torch.device("cpu"), repeats=1, seed=0, max_time=30.0)
    (_, row) = phase.run(Case("scripted", params), ctx)["rows"]
    return levels, row


def _seeds_to_decide(wins: list[int], i: int, need: int) -> int:
    """Brute force over the scripted outcomes: the seeds to run at index i before "≥ need of 10" is decided."""
    won = lost = 0
    for s in range(10):
        won, lost = won + ((3 * s + i) % 10 < wins[i]), lost + ((3 * s + i) % 10 >= wins[i])
        if won >= need or lost > 10 - need:
            return s + 1
    raise AssertionError


def test_seeds_run_until_the_question_is_decided(monkeypatch):
    """The transitions equal those of all 10 seeds at every level, and each level ran exactly the seeds needed to
    decide what was asked there."""
    wins = [0, 0, 1, 3, 4, 5, 6, 8, 9, 10]  # successes of the 10 seeds per level: 5/10 first at index 5, 9/10 at 8
    levels, row = _run_scripted(monkeypatch, wins)
    assert row["figures"]["transition ≥9/10 (#Ω/dim)"] == levels[8]
    assert row["figures"]["transition ≥5/10 (#Ω/dim)"] == levels[5]

    ran = {levels.index(c["level"]): len(c["runs"]) for c in row["cells"]}
    assert sum(ran.values()) < 10 * len(ran)  # fewer runs than full levels
    for i, m in ran.items():
        asked = [_seeds_to_decide(wins, i, 9)] + ([_seeds_to_decide(wins, i, 5)] if i < 8 else [])
        assert m in (asked[0], max(asked)), (i, m, asked)  # the ≥ 9/10 search, maybe continued by the ≥ 5/10 one
        assert row["cells"][list(ran).index(i)]["successes"] == sum((3 * s + i) % 10 < wins[i] for s in range(m))


def test_a_ladder_where_nothing_passes_ends_at_its_top_level(monkeypatch):
    wins = [0, 0, 0, 0, 0, 1, 1, 2, 3, 4]  # never 5/10
    levels, row = _run_scripted(monkeypatch, wins)
    assert row["figures"]["transition ≥9/10 (#Ω/dim)"] is None is row["figures"]["transition ≥5/10 (#Ω/dim)"]
    # the ≥ 9/10 bisection (indices 4, 7, 8, 9: until two failures each), then index 9 asked ≥ 5/10: done
    expected = [(i, _seeds_to_decide(wins, i, 9)) for i in (4, 7, 8)] + [(9, _seeds_to_decide(wins, 9, 5))]
    assert [(levels.index(c["level"]), len(c["runs"])) for c in row["cells"]] == expected
    assert expected[0] == (4, 2) and expected[-1][1] >= 6


def test_registered_and_quick_cases_are_small():
    bench = registry()["tt-completion-phase"]
    assert bench is phase.BENCHMARK
    assert len(bench.full) == 2 * 2 * 2 * 3
    for case in bench.quick:
        p = case.params
        assert p["target"] in phase.TARGETS and p["seeds"] == 3 and len(p["levels"]) == 3
    with pytest.raises(ValueError, match="target"):
        phase.make_target("cauchy", [3, 3], 2, torch.Generator())


def test_gaussian_target_has_unit_rms_entry():
    x = phase.make_target("gaussian", [4, 5, 6], 2, torch.Generator().manual_seed(3))
    dense = x.full()
    assert list(x.ranks) == [2, 2]
    assert float(dense.pow(2).mean().sqrt()) == pytest.approx(1.0, rel=1e-12)


def test_every_solver_recovers_a_well_sampled_tiny_target():
    pytest.importorskip("teneva")
    params = dict(target="uniform", d=D, n=N_MODE, r=R, seeds=2, levels=(10.0,), max_iter=200, als_sweeps=100)
    ctx = Context("quick", torch.device("cpu"), repeats=1, seed=0, max_time=30.0)
    rows = {row["variant"]: row for row in phase.run(Case("tiny", params), ctx)["rows"]}
    for name in phase.SOLVERS:
        (cell,) = rows[name]["cells"]
        assert cell["successes"] == 2, (name, cell["runs"])
        assert all(run["test_error"] < phase.SUCCESS and not run["capped"] for run in cell["runs"]), name


def test_bisection_finds_the_smallest_passing_level_of_a_monotone_ladder():
    for threshold in range(0, 14):  # successes: 0 below index `threshold`, 10 from it on (13 levels)
        seen = []

        def measure(i, threshold=threshold, seen=seen):
            seen.append(i)
            return 10 if i >= threshold else 0

        assert phase._bisect(lambda i, measure=measure: measure(i) >= 9, -1, 13) == threshold
        assert len(seen) <= 4 and len(set(seen)) == len(seen)


def test_start_families():
    """``start="uniform"`` draws RTTC's nonnegative start (unit norm, the target's ranks); Gaussian starts are the
    default, a full case starts from its target's family and its name says so; an unknown start is refused."""
    ctx = Context("quick", torch.device("cpu"), repeats=1, seed=0, max_time=30.0)
    shape = [N_MODE] * D
    target, x0 = phase._seed_data("uniform", shape, R, ctx, 1, "uniform")
    dense = x0.full()
    assert list(x0.ranks) == [R] * (D - 1)
    assert float(torch.linalg.vector_norm(dense)) == pytest.approx(1.0, rel=1e-12)
    assert bool((dense >= 0).all())
    # the target does not depend on the start (drawn first from the seed's generator)
    same_target, gaussian_x0 = phase._seed_data("uniform", shape, R, ctx, 1)
    torch.testing.assert_close(same_target.full(), target.full(), rtol=0, atol=0)
    assert float(torch.linalg.vector_norm(gaussian_x0.full())) == pytest.approx(1.0, rel=1e-12)
    # a nonnegative start is far from orthogonal to a nonnegative target (the reason RTTC's script starts there)
    t = target.full() / torch.linalg.vector_norm(target.full())
    assert float((t * dense).sum()) > 0.3 > 10 * abs(float((t * gaussian_x0.full()).sum()))  # 0.47, 0.006

    for case in phase.BENCHMARK.full:
        p = case.params
        assert p["start"] == p["target"]
        assert case.name.endswith("-uniform-start") == (p["target"] == "uniform")
    params = dict(target="uniform", d=D, n=N_MODE, r=R, seeds=1, levels=(10.0,), start="sobol")
    with pytest.raises(ValueError, match="start"):
        phase.run(Case("bad", params), ctx)
