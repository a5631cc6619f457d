import json

import pytest
import torch

from lowrankopt.cli import main
from lowrankopt.demo import run_tt_completion


def test_small_completion_recovers_the_tensor():
    """The balanced run fits the exact data to tol, so the plain stage makes no iteration: no record, no stage, and
    the summary says nothing about it."""
    lines = []
    res = run_tt_completion(d=4, n=6, rank=2, seed=1, log=lines.append)
    assert res["converged"] and res["test_error"] < 1e-8
    assert all(rec["balanced"] for rec in res["history"]) and res["attempt"] == 0
    ranks = [rec["rank"] for rec in res["history"][1:]]
    k = len(ranks) - 8
    assert ranks == [1] * 8 + [2] * k and k > 0
    assert res["stages"] == [
        {"rank": 1, "iterations": 8, "balanced": True},
        {"rank": 2, "iterations": k, "balanced": True},
    ]
    assert lines[-2].startswith(f"converged after {8 + k} iterations in ")
    assert f"(8 in rank-continuation stages at rank 1, {k} at rank 2; relative training residual " in lines[-2]
    assert "plain" not in lines[-2] and "balanced" not in lines[-2]
    # the progress lines still show the plain stage's start (the plain residual of the mapped-back point)
    assert (
        lines[-4]
        == "finishing on the plain problem at rank 2 from the balanced run's point, mapped back (next line: its start)"
    )
    assert lines[-3].startswith(f"iter {8 + k:4d}  rank 2  train ")


def test_demo_is_deterministic():
    a = run_tt_completion(d=3, n=5, rank=2, seed=3, log=None)
    b = run_tt_completion(d=3, n=5, rank=2, seed=3, log=None)
    assert a["test_error"] == b["test_error"] and a["iterations"] == b["iterations"]


def test_float32_demo_runs():
    res = run_tt_completion(d=3, n=5, rank=2, seed=0, dtype=torch.float32, log=None)
    assert res["test_error"] < 1e-3


def test_cli(capsys):
    assert main(["demo", "--iters", "0", "--rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "TT completion: shape 20^10" in out and "final test relative error" in out
    with pytest.raises(SystemExit) as exc:
        main(["nonsense"])
    assert exc.value.code == 2


def test_matrix_completion_demo_recovers_the_matrix():
    from lowrankopt.demo import run_matrix_completion

    res = run_matrix_completion(m=80, n=60, rank=3, seed=2, log=None)
    assert res["converged"] and res["test_error"] < 1e-8


def _run_module(*args):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    return subprocess.run(
        [sys.executable, "-m", "lowrankopt", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_python_m_lowrankopt_demo_runs_in_a_subprocess():
    out = _run_module("demo", "--problem", "matrix-completion", "--rank", "3", "--iters", "200")
    assert out.returncode == 0, out.stderr
    assert "matrix completion: 2000 x 2000, rank 3" in out.stdout and "final test relative error" in out.stdout
    err = float(out.stdout.strip().splitlines()[-1].split()[-1])
    assert err < 1e-8


def test_bad_arguments_give_usage_and_status_2():
    for args in (["demo", "--problem", "nonsense"], ["demo", "--rank", "0"], ["frobnicate"]):
        out = _run_module(*args)
        assert out.returncode == 2 and "usage:" in out.stderr, args


def test_demo_writes_its_summary_file(tmp_path):
    path = tmp_path / "demo.json"
    run = _run_module("demo", "--problem", "matrix-completion", "--rank", "2", "--iters", "200", "--out", str(path))
    assert run.returncode == 0, run.stderr
    res = json.loads(path.read_text())
    assert res["settings"]["problem"] == "matrix-completion" and res["settings"]["rank"] == 2
    assert res["history"][-1]["iter"] == res["iterations"] and res["test_error"] < 1e-8


def test_iters_is_the_limit_at_the_target_rank_and_the_summary_splits_the_stages():
    """TT-rank 3 climbs from 1: two rank-continuation stages of ``warmup_iters`` each, then ``iters`` at rank 3 on
    the balanced problem, then ``iters`` more at rank 3 on the plain problem (a run this short cannot reach the
    tolerance, so every stage runs to its limit)."""
    lines = []
    res = run_tt_completion(d=4, n=6, rank=3, samples=300, iters=5, warmup_iters=3, seed=1, log=lines.append)
    assert not res["converged"] and res["attempt"] == 0
    # the records: attempt, rank and balanced per iteration
    assert [(rec["attempt"], rec["rank"], rec["balanced"]) for rec in res["history"][1:]] == (
        [(0, 1, True)] * 3 + [(0, 2, True)] * 3 + [(0, 3, True)] * 5 + [(0, 3, False)] * 5
    )
    assert res["stages"] == [
        {"rank": 1, "iterations": 3, "balanced": True},
        {"rank": 2, "iterations": 3, "balanced": True},
        {"rank": 3, "iterations": 5, "balanced": True},
        {"rank": 3, "iterations": 5, "balanced": False},
    ]
    assert res["runs"] == [{"attempt": 0, "stages": res["stages"], "iterations": 16, "stalled": False}]
    assert res["iterations"] == 16 == len(res["history"]) - 1 == res["history"][-1]["iter"]
    assert lines[-2].startswith("stopped after 16 iterations in ")
    assert lines[-2].endswith(
        "(6 in rank-continuation stages at ranks 1-2, 5 at rank 3 (balanced), 5 at rank 3 on the plain problem; "
        "reached iters = 5 at rank 3 on the plain problem)"
    )
    assert (
        "finishing on the plain problem at rank 3 from the balanced run's point, mapped back (next line: its start)"
        in lines
    )


def test_summary_of_a_run_without_rank_continuation():
    from lowrankopt.demo import run_matrix_completion

    lines = []
    res = run_matrix_completion(m=60, n=50, rank=3, iters=4, seed=1, log=lines.append)
    assert res["stages"] == [{"rank": 3, "iterations": 4, "balanced": False}]
    assert res["iterations"] == 4 == len(res["history"]) - 1
    assert lines[-2].endswith(" (4 at rank 3; reached iters = 4 at rank 3)")
    assert res["settings"]["warmup_iters"] == 4 and res["settings"]["oversampling"] == 5.0
    assert res["settings"]["samples"] == 5 * 3 * (60 + 50 - 3) == res["samples"]


def test_demo_out_records_the_settings_used(tmp_path, capsys):
    path = tmp_path / "demo.json"
    assert main(["demo", "--rank", "2", "--iters", "3", "--no-progress", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    res = json.loads(path.read_text())
    # TT-rank-2 manifold of 20^10: cores 1·20·2 + 8·(2·20·2) + 2·20·1 = 720 parameters, minus 9 gauges of 2² each
    dim = 720 - 9 * 4
    expected = {"problem": "tt-completion", "d": 10, "n": 20, "rank": 2, "samples": 20 * dim, "test_samples": 10_000}
    expected |= {"oversampling": 20.0, "iters": 3, "warmup_iters": 8, "method": "cg", "tol": 1e-12, "seed": 0}
    expected |= {"dtype": "float64", "threads": 1, "progress": False}
    assert res["settings"] == expected
    assert res["samples"] == 20 * dim and res["dim"] == dim
    assert res["stages"] == [
        {"rank": 1, "iterations": 8, "balanced": True},
        {"rank": 2, "iterations": 3, "balanced": True},
        {"rank": 2, "iterations": 3, "balanced": False},
    ]
    assert [rec["balanced"] for rec in res["history"]] == [True] * 12 + [False] * 3
    assert res["iterations"] == 14 == len(res["history"]) - 1 == sum(st["iterations"] for st in res["stages"])
    assert "stopped after 14 iterations" in out
    assert (
        "(8 in rank-continuation stages at rank 1, 3 at rank 2 (balanced), 3 at rank 2 on the plain problem; "
        "reached iters = 3 at rank 2 on the plain problem)"
    ) in out
    assert f"{20 * dim} training / 10000 test entries" in out


def test_help_and_usage_errors_import_no_torch():
    """``lowrankopt --help`` parses before importing torch (1.5 s); checked on sys.modules, in a fresh interpreter."""
    import os
    import subprocess
    import sys

    code = """
import contextlib, io, sys
from lowrankopt.cli import main
for argv in (["--help"], ["demo", "--help"], ["bench", "--help"], ["--version"], ["demo", "--rank", "0"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == (2 if "--rank" in argv else 0), (argv, exc.code)
        else:
            raise AssertionError(argv)
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("lowrankopt"))
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["ok"]


def test_iters_help_states_its_meaning():
    from lowrankopt.cli import build_parser

    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    text = " ".join(demo.format_help().split())
    assert "iteration limit of each stage at the final (target) rank" in text and "--warmup-iters each on top" in text
    assert "the balanced stage of each run and the final stage on the plain problem each" in text
    assert "at most 4 x (iters + warmup-iters x (rank - 1)) + iters iterations in all" in text


def _stalling_problem():
    """A TT-rank-4 target (uniform cores, 6^4) completed at TT-rank 2 from 600 entries: the residual cannot vanish,
    so ``complete`` restarts every run of the rank continuation but the last (see test_completion_restarts.py)."""
    from lowrankopt import TensorTrain
    from lowrankopt.completion import sample_indices

    shape, g = [6, 6, 6, 6], torch.Generator().manual_seed(0)
    ranks = [1, 4, 4, 4, 1]
    A = TensorTrain([torch.rand(a, n, b, generator=g, dtype=torch.float64) for a, n, b in zip(ranks, shape, ranks[1:])])
    idx = sample_indices(shape, 600, generator=g)
    test = sample_indices(shape, 200, generator=g)
    return shape, A, idx, test


def test_summary_and_runs_of_a_completion_that_restarts():
    """Every run but the last stalls at TT-rank 2 on the balanced problem; the last (the best here) runs to ``iters``,
    then the plain stage continues it (records with its attempt, last in the history) up to ``iters`` more."""
    from lowrankopt.demo import _solve

    shape, A, idx, test = _stalling_problem()
    lines = []
    out = _solve(
        idx, A.gather(idx), (test, A.gather(test)), shape, 2, method="cg", tol=1e-12, iters=80, warmup_iters=8,
        generator=torch.Generator().manual_seed(1), print_every=1000, emit=lines.append, progress=False,
    )  # fmt: skip
    runs, records = out["runs"], out["history"][1:]
    n = len(runs)
    assert 1 < n <= 4 and [run["attempt"] for run in runs] == list(range(n)) and out["attempt"] == n - 1
    # the plain stage comes last in the history, with the returned run's attempt and the target rank
    p = sum(not rec["balanced"] for rec in records)
    assert p > 0 and [(rec["attempt"], rec["rank"], rec["balanced"]) for rec in records[-p:]] == [(n - 1, 2, False)] * p
    # the split, checked against the records grouped here by attempt, rank and balanced
    for run in runs:
        a = run["attempt"]
        ranks = [rec["rank"] for rec in records if rec["attempt"] == a and rec["balanced"]]
        k = len(ranks) - 8
        assert ranks == [1] * 8 + [2] * k
        stages = [{"rank": 1, "iterations": 8, "balanced": True}, {"rank": 2, "iterations": k, "balanced": True}]
        if a < n - 1:  # a stalled run stops after more than the stall window (50) and before iters; no plain stage
            assert 50 < k < 80 and run["stalled"]
        else:  # the last runs to iters on the balanced problem, then the plain stage
            assert k == 80 and not run["stalled"]
            stages.append({"rank": 2, "iterations": p, "balanced": False})
        assert run["stages"] == stages and run["iterations"] == 8 + k + (p if a == n - 1 else 0)
    assert out["stages"] == runs[-1]["stages"]
    assert sum(run["iterations"] for run in runs) == out["iterations"] == len(records) == records[-1]["iter"]
    assert p == 80  # the noisy fit's plain stage runs to its limit too
    stalled = f"runs 1-{n - 1} stalled at rank 2 and were" if n > 2 else "run 1 stalled at rank 2 and was"
    assert lines[-2] == (
        f"stopped after {len(records)} iterations in {out['time']:.2f}s ({n} runs of the rank continuation: "
        f"{stalled} restarted; run {n} returned: 8 in rank-continuation stages at rank 1, 80 at rank 2 (balanced), "
        "80 at rank 2 on the plain problem; reached iters = 80 at rank 2 on the plain problem)"
    )
    restarts = [s for s in lines if "restarting" in s]
    assert restarts == [
        f"run {k + 1}: restarting the rank continuation from rank 1 (run {k} stalled at rank 2)" for k in range(1, n)
    ]
    finishing = [s for s in lines if "plain problem" in s]
    assert (
        finishing[0]
        == f"finishing on the plain problem at rank 2 from run {n}'s point, mapped back (next line: its start)"
    )
    assert len(finishing) == 2  # and the summary


def test_summary_when_an_earlier_run_is_returned():
    """Synthetic records: run 1 (attempt 0) stalled with the lowest residual, run 2 ended higher; the line names both,
    and the iterations are all records' (``len(history) − 1``), not only those up to the returned run. With
    balancing, the plain stage's records come last with the returned run's attempt: they join run 1."""
    from types import SimpleNamespace

    from lowrankopt.demo import Stage, _runs, _summary

    def recs(attempt, ranks, **balanced):
        return [{"attempt": attempt, "rank": r, "train_error": 0.5, **balanced} for r in ranks]

    # without balancing (records without "balanced", as from balance=False: not balanced)
    history = recs(0, [1]) + recs(0, [1] * 3 + [3] * 60) + recs(1, [1] * 3 + [2] * 2 + [3] * 70)
    res = SimpleNamespace(history=history, attempt=0, time=1.25, message="stalled: relative training residual ...")
    runs = _runs(history)
    assert runs == [(0, [(1, 3, False), (3, 60, False)]), (1, [(1, 3, False), (2, 2, False), (3, 70, False)])]
    assert _summary(res, runs, iters=70, converged=False) == (
        "stopped after 138 iterations in 1.25s (2 runs of the rank continuation: run 1 stalled at rank 3 and was "
        "restarted; run 2 ended at rank 3 with a higher training residual; run 1 returned: 3 in rank-continuation "
        "stages at rank 1, 60 at rank 3; stalled: relative training residual ...)"
    )
    # with balancing: the same runs on the balanced problem, then 70 iterations on the plain one from run 1's point
    history = (
        recs(0, [1], balanced=True)
        + recs(0, [1] * 3 + [3] * 60, balanced=True)
        + recs(1, [1] * 3 + [2] * 2 + [3] * 70, balanced=True)
        + recs(0, [3] * 70, balanced=False)
    )
    res = SimpleNamespace(history=history, attempt=0, time=1.25, message="reached max_iter = 70")
    runs = _runs(history)
    assert runs == [
        (0, [Stage(1, 3, True), Stage(3, 60, True), Stage(3, 70, False)]),
        (1, [Stage(1, 3, True), Stage(2, 2, True), Stage(3, 70, True)]),
    ]
    assert _summary(res, runs, iters=70, converged=False) == (
        "stopped after 208 iterations in 1.25s (2 runs of the rank continuation: run 1 stalled at rank 3 and was "
        "restarted; run 2 ended at rank 3 with a higher training residual; run 1 returned: 3 in rank-continuation "
        "stages at rank 1, 60 at rank 3 (balanced), 70 at rank 3 on the plain problem; reached iters = 70 at rank 3 "
        "on the plain problem)"
    )
    # the plain stage stopped short of iters: its own message; the balanced stage at the limit says nothing more
    res.message = "relative training residual 9.000e-13 <= tol = 1e-12"
    res.history = history = history[: -70 + 12]
    runs = _runs(history)
    assert _summary(res, runs, iters=60, converged=True).endswith(
        "run 1 returned: 3 in rank-continuation stages at rank 1, 60 at rank 3 (balanced), 12 at rank 3 on the plain "
        "problem; relative training residual 9.000e-13 <= tol = 1e-12)"
    )
    assert _summary(res, runs, iters=60, converged=True).startswith("converged after 150 iterations in 1.25s (")
