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
