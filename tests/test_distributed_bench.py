"""The distributed-completion benchmark on a tiny case: its rows, interleaved rounds and communication figures
(nothing is timed against a threshold)."""

import pytest
import torch
import torch.distributed as dist

from lowrankopt.benchmarks.distributed import BENCHMARK
from lowrankopt.benchmarks.registry import Case
from lowrankopt.benchmarks.timing import Context


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_distributed_benchmark_rows_on_a_tiny_case():
    case = Case("tiny", dict(d=3, n=4, r=2, entries=60, max_iter=2))
    rows = BENCHMARK.run(case, Context("quick", torch.device("cpu"), repeats=2, seed=0, max_time=60.0))["rows"]
    assert [r["variant"].split(",")[0] for r in rows] == [
        "1 process",
        "strong: 1 process",
        "strong: 2 processes",
        "weak: 1 process",
        "weak: 2 processes",
    ]
    assert rows[0]["ratio"] == 1.0 and all(r["repeats"] == 2 and len(r["rounds"]) == 2 for r in rows)
    sharded = [r["figures"] for r in rows[1:]]
    assert all(f["bytes / iteration"] > 0 and f["all-reduces / iteration"] > 0 for f in sharded)
    assert sharded[1] == sharded[3]  # weak scaling's 2-process run is strong scaling's: the same data and split
    assert "bytes / iteration" not in rows[0]["figures"]
