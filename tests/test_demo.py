import json

import pytest
import torch

from lowrankopt.cli import main
from lowrankopt.demo import run_tt_completion


def test_small_completion_recovers_the_tensor():
    res = run_tt_completion(d=4, n=6, rank=2, seed=1, log=None)
    assert res["converged"] and res["test_error"] < 1e-8


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
    """TT-rank 3 climbs from 1: two rank-continuation stages of ``warmup_iters`` each, then ``iters`` at rank 3 (a
    run this short cannot reach the tolerance, so every stage runs to its limit)."""
    lines = []
    res = run_tt_completion(d=4, n=6, rank=3, samples=300, iters=5, warmup_iters=3, seed=1, log=lines.append)
    assert not res["converged"]
    assert res["stages"] == [{"rank": 1, "iterations": 3}, {"rank": 2, "iterations": 3}, {"rank": 3, "iterations": 5}]
    assert res["iterations"] == 11 == len(res["history"]) - 1 == res["history"][-1]["iter"]
    assert [rec["rank"] for rec in res["history"][1:]] == [1] * 3 + [2] * 3 + [3] * 5
    assert lines[-2].startswith("stopped after 11 iterations in ")
    assert lines[-2].endswith("(6 in rank-continuation stages at ranks 1-2, 5 at rank 3; reached iters = 5 at rank 3)")


def test_summary_of_a_run_without_rank_continuation():
    from lowrankopt.demo import run_matrix_completion

    lines = []
    res = run_matrix_completion(m=60, n=50, rank=3, iters=4, seed=1, log=lines.append)
    assert res["stages"] == [{"rank": 3, "iterations": 4}] and res["iterations"] == 4 == len(res["history"]) - 1
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
    assert res["stages"] == [{"rank": 1, "iterations": 8}, {"rank": 2, "iterations": 3}]
    assert res["iterations"] == 11 == len(res["history"]) - 1
    assert "stopped after 11 iterations" in out and "(8 in rank-continuation stages at rank 1, 3 at rank 2;" in out
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
    assert "iteration limit at the final (target) rank" in text and "--warmup-iters each on top" in text
