"""The ``layers`` benchmark: its declaration and the rows of one tiny case of each kind (no timing is checked)."""

import torch

from lowrankopt.benchmarks import Case, registry
from lowrankopt.benchmarks.layers import run
from lowrankopt.benchmarks.runner import Context


def _ctx():
    return Context("quick", torch.device("cpu"), repeats=1, seed=0, max_time=10.0)


def test_layers_is_registered_with_the_issue_shapes():
    bench = registry()["layers"]
    full = {c.name for c in bench.full}
    assert {"linear-256x128", "linear-1024x1024", "linear-4096x4096", "conv-c64-s32", "conv-c256-s16"} <= full
    assert all(c.params["batch"] == 256 for c in bench.full if c.name.startswith("linear"))


def test_linear_case_rows():
    case = Case("linear-16x8", {"in": 16, "out": 8, "batch": 4, "rank": 2, "svdp": True})
    rows = run(case, _ctx())["rows"]
    assert [r["variant"] for r in rows] == [
        "nn.Linear",
        "TTLinear rank 2",
        "TTLinear rank 2, 2 cores",
        "LowRankLinear rank 2",
        "STTPLinear rank 2",
        "SVDPLinear rank 8",
    ]
    assert rows[0]["ratio"] == 1.0
    for r in rows:
        assert r["time"] > 0 and r["ratio"] > 0 and r["figures"]["parameters"] > 0
    skipped = run(Case("linear-16x8", {**case.params, "svdp": False}), _ctx())["rows"][-1]
    assert skipped["variant"] == "SVDPLinear rank 8" and "skipped" in skipped


def test_conv_case_rows():
    rows = run(Case("conv-c8-s4", {"channels": 8, "size": 4, "batch": 2, "rank": 2}), _ctx())["rows"]
    assert [r["variant"] for r in rows] == ["nn.Conv2d", "TTConv2d rank 2"]
    assert rows[1]["figures"]["parameters"] < rows[0]["figures"]["parameters"]
