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
