"""``lowrankopt bench``: the registry, the runner's timing and output, and the command in a subprocess."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowrankopt.benchmarks import Benchmark, Case, registry, run_benchmarks
from lowrankopt.benchmarks import runner as runner_mod
from lowrankopt.benchmarks.runner import Context, Timing, ratio

ROOT = Path(__file__).resolve().parents[1]


def _run_module(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "lowrankopt", *args], capture_output=True, text=True, env=env, timeout=600, cwd=cwd
    )


def test_registry_declarations_are_complete():
    table = registry()
    assert {"autodiff", "matrix-completion", "tt-completion"} <= set(table)
    for name, b in table.items():
        assert b.name == name and b.summary and b.baseline and b.figures
        assert b.quick and b.full, name
        for mode in ("quick", "full"):
            names = [c.name for c in b.cases(mode)]
            assert len(names) == len(set(names)), (name, mode)
            assert b.repeats[mode] >= 1
    with pytest.raises(ValueError, match="mode"):
        table["autodiff"].cases("medium")


def test_timing_and_per_round_ratios():
    t = Timing.of([3.0, 1.0, 2.0, 10.0])
    assert (t.median, t.min, t.max, t.repeats) == (2.5, 1.0, 10.0, 4)
    a, b = Timing.of([2.0, 4.0, 30.0]), Timing.of([1.0, 1.0, 10.0])
    assert ratio(a, b) == 3.0  # median of 2, 4, 3 — not 4/1 (ratio of medians)


def test_context_time_warms_up_once_and_repeats():
    calls = {"a": 0, "b": 0}

    def bump(key):
        calls[key] += 1

    ctx = Context("quick", torch.device("cpu"), repeats=3, seed=0, max_time=1.0)
    out = ctx.time({"a": lambda: bump("a"), "b": lambda: bump("b")})
    assert calls == {"a": 4, "b": 4}  # one warm-up + three rounds
    assert out["a"].repeats == 3 and all(x >= 0 for x in out["a"].rounds)


def _fake_benchmarks(monkeypatch):
    def run(case, ctx):
        if case.params["n"] == 3:
            raise RuntimeError("boom")
        t = ctx.time({"f": lambda: sum(range(100)), "g": lambda: sum(range(300))})
        # a peer that is missing in one case and timed in another (the scaling plot must cope)
        peer = (
            {"variant": "peer", "skipped": "skipped: install nothing"}
            if case.params["n"] == 1
            else runner_mod.timing_row("peer", t["g"])
        )
        return {
            "rows": [
                runner_mod.timing_row("f", t["f"], status="baseline"),
                runner_mod.timing_row("g", t["g"], ratio=ratio(t["g"], t["f"])),
                peer,
            ],
            "curves": [{"label": "g", "time": [0.1, 0.2], "iter": [0, 1], "error": [1.0, float("nan")]}],
        }

    # two groups over n (m = 1 and m = 2); n = 3 raises
    cases = tuple(Case(f"n{n}m{m}", {"n": n, "m": m}) for m in (1, 2) for n in (1, 2, 3))
    fake = Benchmark("fake", "a fake benchmark", "time / time of f", ("times",), cases, cases, run, scaling=("n",))
    monkeypatch.setattr(runner_mod, "registry", lambda: {"fake": fake})


def test_runner_records_errors_skips_and_writes_files(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    _fake_benchmarks(monkeypatch)
    threads = torch.get_num_threads()
    res = run_benchmarks("fake", out=tmp_path, repeats=3, threads=2, progress=False, log=lambda _m: None)
    assert torch.get_num_threads() == threads  # restored
    assert res["errors"] == 2
    cases = res["benchmarks"]["fake"]["cases"]
    assert [c["case"] for c in cases] == ["n1m1", "n2m1", "n3m1", "n1m2", "n2m2", "n3m2"]
    assert "RuntimeError: boom" in cases[2]["error"]
    f, g = cases[0]["rows"][:2]
    # the row's figures recomputed from its rounds
    assert g["repeats"] == len(g["rounds"]) == 3 and g["time"] == sorted(g["rounds"])[1]
    assert (g["time_min"], g["time_max"]) == (min(g["rounds"]), max(g["rounds"]))
    assert g["ratio"] == sorted(a / b for a, b in zip(g["rounds"], f["rounds"], strict=True))[1]
    env = res["environment"]
    assert env["torch_threads"] == 2 and env["allocator"] == "default"
    for key in ("torch", "device", "cpu", "date", "python", "blas_threads"):
        assert env[key] not in (None, ""), key
    on_disk = json.loads((tmp_path / "results.json").read_text())  # strict JSON: NaN written as a string
    assert on_disk["errors"] == 2 and on_disk["benchmarks"]["fake"]["cases"][0]["curves"][0]["error"][1] == "nan"
    md = (tmp_path / "results.md").read_text()
    assert "skipped: install nothing" in md and "RuntimeError: boom" in md
    expected = [f"fake_n{n}m{m}_convergence.png" for n in (1, 2) for m in (1, 2)]
    assert sorted(res["plots"]) == sorted(expected + ["fake_scaling_n.png", "fake_scaling_n_1.png"])
    for p in res["plots"]:
        assert (tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_completion_rows_and_ratios():
    from lowrankopt.benchmarks.completion import _row, _with_ratios

    def run(t):
        return {"time_to_target": t, "iters_to_target": 5, "final_test_error": 1e-9, "history": [{"time": 9.0}]}

    ours = _row("lowrankopt cg", [run(2.0), run(1.0), run(4.0)], "ok")
    assert (ours["time"], ours["time_min"], ours["time_max"], ours["repeats"]) == (2.0, 1.0, 4.0, 3)
    slow = _row("peer", [run(7.0)], "ok")
    missed = _row("peer2", [run(None)], "stopped")
    crashed = _row("peer3", [run(None)], "RuntimeError", failed=True)
    rows = _with_ratios([ours, slow, missed, crashed])
    assert ours["ratio"] == 1.0 and slow["ratio"] == 3.5 and "ratio" not in missed
    assert missed["status"] == "stopped; 1e-8 not reached in 9 s" and crashed["status"] == "RuntimeError"
    assert rows[0] is ours


def test_runner_rejects_unknown_names_and_missing_cuda(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark"):
        run_benchmarks(["nonsense"], out=tmp_path)
    for bad in (dict(repeats=0), dict(threads=0), dict(max_time=-1.0), dict(mode="medium"), dict(allocator="x")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            run_benchmarks(["autodiff"], out=tmp_path, **bad)
    autodiff = registry()["autodiff"]
    with pytest.raises(ValueError, match="distinct"):
        run_benchmarks([autodiff, autodiff], out=tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            run_benchmarks(["autodiff"], device="cuda", out=tmp_path)


def test_missing_peer_gives_a_skipped_row(monkeypatch):
    from lowrankopt.benchmarks import completion
    from lowrankopt.benchmarks.peers.pymanopt_completion import make_problem

    monkeypatch.setitem(sys.modules, "pymanopt", None)  # import pymanopt now raises ImportError
    P = make_problem(30, 20, 2, 3.0, seed=0)
    ctx = Context("quick", torch.device("cpu"), repeats=1, seed=0, max_time=5.0)
    row, curve = completion._pymanopt(ctx, P, "sparse", "cg")
    assert row["skipped"] == "skipped: install pymanopt" and curve is None


def test_bench_list_and_quick_run_in_a_subprocess(tmp_path):
    pytest.importorskip("matplotlib")
    listed = _run_module("bench", "--list")
    assert listed.returncode == 0, listed.stderr
    for name in ("autodiff", "matrix-completion", "tt-completion"):
        assert name in listed.stdout
    lines = listed.stdout.splitlines()
    starts = {len(line) - len(line.split(" ", 1)[1].lstrip()) for line in lines[::2]}  # where each summary begins
    starts |= {len(line) - len(line.lstrip()) for line in lines[1::2]}  # and each case list
    assert len(starts) == 1, starts  # one column, however long a name
    out = tmp_path / "res"
    run = _run_module("bench", "--quick", "autodiff", "--repeats", "1", "--out", str(out), "--no-progress")
    assert run.returncode == 0, run.stderr
    assert "riemannian_grad" in run.stdout and "wrote" in run.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["mode"] == "quick" and list(res["benchmarks"]) == ["autodiff"]
    cases = res["benchmarks"]["autodiff"]["cases"]
    assert [c["case"] for c in cases] == [c.name for c in registry()["autodiff"].quick]
    for case in cases:
        f, grad = (next(r for r in case["rows"] if r["variant"] == v) for v in ("f(x)", "riemannian_grad"))
        assert grad["ratio"] == grad["rounds"][0] / f["rounds"][0]  # --repeats 1: the one round's ratio
        assert grad["time"] == grad["rounds"][0]
    assert (out / "results.md").read_text().startswith("# lowrankopt bench (quick)")
    assert {f"autodiff_scaling_{p}.png" for p in "dnr"} <= {p.name for p in out.glob("*.png")}


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "nonsense"],
        ["bench", "--quick", "--full"],
        ["bench", "--device", "tpu"],
        ["bench", "--repeats", "0"],
        ["bench", "--max-time", "-1"],
        ["bench", "autodiff", "autodiff"],
        ["bench", "--seed", "-1"],
    ],
)
def test_bench_bad_arguments_give_usage_and_status_2(args):
    out = _run_module(*args)
    assert out.returncode == 2 and "usage:" in out.stderr, (args, out.stderr)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_bench_device_cuda_without_cuda_is_a_usage_error():
    out = _run_module("bench", "--device", "cuda", "autodiff")
    assert out.returncode == 2 and "no CUDA device" in out.stderr


def test_conv_norms_rows_and_extrapolated_skips():
    from lowrankopt.benchmarks import spectral
    from lowrankopt.spectral import circular_spectral_norm, fantastic_four_bound

    spectral._LAST.clear()
    ctx = Context("quick", torch.device("cpu"), 1, 0, max_time=1e-9)  # no budget: only first measurements run
    rows = {r["variant"]: r for r in spectral.run_norms(Case("a", dict(c=8, n=8)), ctx)["rows"]}
    assert len(rows) == 10 and not any("skipped" in r for r in rows.values())
    K = torch.randn(8, 8, 3, 3, generator=ctx.generator(8)) * math.sqrt(2 / 72)
    exact = rows["exact circular (FFT + SVD)"]
    assert exact["figures"]["value"] == pytest.approx(circular_spectral_norm(K, 8).item(), rel=1e-6)
    assert exact["figures"]["value / exact"] == 1 and exact["ratio"] == pytest.approx(1)
    assert rows["Fantastic Four"]["figures"]["value"] == pytest.approx(fantastic_four_bound(K).item(), rel=1e-6)
    for name in (spectral.COLD, "tensor-norm estimate, warm (5 sweeps)", "Gram iteration t=6 (circular)"):
        assert 1 - 1e-5 <= rows[name]["figures"]["value / exact"] <= rows["Fantastic Four"]["figures"]["value / exact"]
    certified = rows[spectral.CERTIFIED]["figures"]
    assert 1 <= certified["value / exact"] <= rows["Fantastic Four"]["figures"]["value / exact"]
    estimate = rows[spectral.COLD]["figures"]["value"]
    assert certified["certified / estimate"] == pytest.approx(certified["value"] / estimate)
    rows = {r["variant"]: r for r in spectral.run_norms(Case("b", dict(c=8, n=16)), ctx)["rows"]}
    growing = ("exact circular (FFT + SVD)", "Gram iteration t=6 (circular)", "power iteration, zeros (50 it.)")
    assert all(rows[v]["skipped"].startswith("not run: about") for v in growing)
    assert "value / exact" not in rows["Fantastic Four"]["figures"]  # no exact value to compare with
    assert rows[spectral.COLD]["time"] > 0
    spectral._LAST.clear()


def test_kronecker_covariance_rows():
    from lowrankopt.benchmarks import covariance

    ctx = Context("quick", torch.device("cpu"), 1, 0, max_time=60)
    res = covariance.run_errors(Case("t", dict(p=4, n=(12, 48), reps=2)), ctx)
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == list(covariance.ESTIMATORS)
    sample = rows["sample covariance"]
    assert sample["ratio"] == 1.0 and sample["figures"]["error n=  12"] > sample["figures"]["error n=  48"]
    for r in rows.values():
        f = r["figures"]
        slope = math.log(f["error n=  48"] / f["error n=  12"]) / math.log(4)
        assert f["slope (log error / log n)"] == pytest.approx(slope) == pytest.approx(f["slope, last two n"])
        assert r["ratio"] == pytest.approx(f["error n=  48"] / sample["figures"]["error n=  48"])
    assert [s["label"] for s in res["xy"][0]["series"]] == list(covariance.ESTIMATORS)
    scale = {r["variant"]: r for r in covariance.run_scale(Case("s", dict(p=5, n=20, dense_max=4)), ctx)["rows"]}
    free = scale["matrix-free (subspace iteration)"]
    assert free["time"] > 0 and free["figures"]["peak RSS (MB)"] > 10 and free["figures"]["terms"] >= 1
    assert scale["dense (Ŝ, R(Ŝ), full SVD)"]["skipped"].startswith("not run")
