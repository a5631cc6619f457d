"""Matrix and tensor-train completion: lowrankopt's CG and trust-region against pymanopt, same data and start.

Cases (float64, CPU):

- ``matrix-k40-os3``: 1000 × 1000, rank 40, OS = 3 (LRGeomCG's ``small_example``);
- ``matrix-k10-os5``: 1000 × 1000, rank 10, OS = 5 (Manopt's ``low_rank_matrix_completion``);
- ``matrix-big``: 20000 × 20000, rank 10, OS = 5 (LRGeomCG's ``big_example``; with ``--full`` only);
- ``tt-r4``, ``tt-r6``, ``tt-r8``: d = 10, n = 20, TT-rank r, |Ω| = |Γ| = 10·d·n·r² (RTTC's setup).

Matrix data, test set and start point (rank-k truncated SVD of the zero-filled P_Ω A, scipy ``svds``) come
from ``benchmarks/peers/pymanopt_completion.make_problem`` and are shared by every solver. pymanopt runs
``ConjugateGradient`` on ``FixedRankEmbedded`` with its PyTorch autodiff backend, with the cost written densely
(``cost=dense``, how users write it) and on the observed entries only (``cost=sparse``); with the dense cost and a
hand-written NumPy gradient (pymanopt's fastest path, for an expert user); and ``TrustRegions`` (recorded as an
error if it raises). TT targets have i.i.d. uniform [0, 2/r) cores (nonnegative); lowrankopt starts
from the best constant tensor with rank continuation (``complete``'s default). Reported: time and iterations until
the relative test error ``‖P_Γ(X − A)‖/‖P_Γ A‖`` first reaches 1e-8 (the solvers' own time, test-error evaluation
excluded), final test error, and the ratio of pymanopt's time to ours. Writes ``completion.json`` and one PNG per
case (test error vs time and vs iterations) to ``--out``.

    PYTHONPATH=. python benchmarks/bench_completion.py [--cases NAME,...] [--full] [--max-time S] [--threads T]
                                                       [--allocator default|tuned] [--merge] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys

# Thread counts must be fixed before numpy / torch load their BLAS: one thread each by default, so that the
# peers are compared on equal terms (and a 2-core machine is not oversubscribed).
_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--threads", type=int, default=1)
_THREADS = _pre.parse_known_args()[0].threads
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, str(_THREADS))

import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import PeerUnavailable  # noqa: E402
from peers.pymanopt_completion import make_problem, run_pymanopt  # noqa: E402

from lowrankopt import LowRankMatrix, tune_cpu_allocator  # noqa: E402
from lowrankopt.completion import complete, sample_indices  # noqa: E402
from lowrankopt.demo import _random_truth  # noqa: E402

TARGET = 1e-8
MATRIX_CASES = {
    "matrix-k40-os3": dict(m=1000, n=1000, k=40, oversampling=3.0),
    "matrix-k10-os5": dict(m=1000, n=1000, k=10, oversampling=5.0),
    "matrix-big": dict(m=20000, n=20000, k=10, oversampling=5.0),
}
TT_CASES = {f"tt-r{r}": dict(d=10, n=20, r=r) for r in (4, 6, 8)}
DEFAULT_CASES = ["matrix-k40-os3", "matrix-k10-os5", "tt-r4", "tt-r6", "tt-r8"]


def _first_below(history, key_time="solve_time"):
    for rec in history:
        if rec.get("test_error") is not None and rec["test_error"] <= TARGET:
            return rec[key_time], rec["iter"]
    return None, None


def _ours(name, idx, vals, shape, rank, test, x0, method, max_time, seed):
    torch.manual_seed(seed)
    t = time.perf_counter()
    res = complete(
        idx,
        vals,
        shape,
        rank,
        method=method,
        test=test,
        x0=x0,
        max_iter=100_000,
        max_time=max_time,
        generator=torch.Generator().manual_seed(seed),
    )
    wall = time.perf_counter() - t
    t_target, it_target = _first_below(res.history)
    return {
        "solver": f"lowrankopt {method}",
        "status": res.message,
        "time_to_target": t_target,
        "iters_to_target": it_target,
        "final_test_error": res.test_error,
        "iterations": res.nit,
        "nfev": res.nfev,
        "ngev": res.ngev,
        "nhev": res.nhev,
        "solve_time": res.time,
        "wall_time": wall,
        "history": [
            {k: rec.get(k) for k in ("iter", "solve_time", "test_error", "train_error", "rank")} for rec in res.history
        ],
    }


def _pymanopt(P, cost, optimizer, max_time, backend="pytorch"):
    name = f"pymanopt {optimizer} ({cost} cost{', hand-written numpy gradient' if backend == 'numpy' else ''})"
    try:
        out = run_pymanopt(
            P["m"],
            P["n"],
            P["k"],
            P["rows"],
            P["cols"],
            P["vals"],
            P["test_rows"],
            P["test_cols"],
            P["test_vals"],
            P["U0"],
            P["s0"],
            P["Vt0"],
            cost=cost,
            backend=backend,
            optimizer=optimizer,
            max_time=max_time,
            max_iterations=100_000,
            target_test_error=TARGET,
        )
    except PeerUnavailable as exc:
        return {"solver": name, "skipped": f"skipped: {exc}"}
    out["solver"] = name
    for rec in out.get("history", []):
        rec["solve_time"] = rec.pop("time")
    return out


def run_matrix(name, spec, max_time, seed):
    t = time.perf_counter()
    P = make_problem(spec["m"], spec["n"], spec["k"], spec["oversampling"], seed)
    gen_time = time.perf_counter() - t
    idx = torch.from_numpy(np.stack([P["rows"], P["cols"]], 1))
    vals = torch.from_numpy(P["vals"])
    test = (torch.from_numpy(np.stack([P["test_rows"], P["test_cols"]], 1)), torch.from_numpy(P["test_vals"]))
    x0 = LowRankMatrix(torch.from_numpy(P["U0"]), torch.from_numpy(P["s0"]), torch.from_numpy(P["Vt0"].T.copy()))
    runs = [
        _ours(name, idx, vals, (spec["m"], spec["n"]), spec["k"], test, x0, m, max_time, seed)
        for m in ("cg", "trust-region")
    ]
    if spec["m"] * spec["n"] > 5e7:
        # pymanopt 2.2.1's FixedRankEmbedded.projection/transport evaluate U @ S @ V.T @ Z left to right: two
        # dense m × n temporaries per transport (3.2 GB each at 20000²) whatever the cost function.
        reason = "skipped: pymanopt's FixedRankEmbedded transport forms dense m×n matrices (3.2 GB each here)"
        runs.append({"solver": "pymanopt cg", "skipped": reason})
    else:
        runs += [_pymanopt(P, cost, "cg", max_time) for cost in ("sparse", "dense")]
        runs.append(_pymanopt(P, "dense", "cg", max_time, backend="numpy"))
        runs.append(_pymanopt(P, "sparse", "trust-regions", min(max_time, 60)))
    return {"case": name, **spec, "samples": int(len(P["vals"])), "data_time": gen_time, "runs": runs}


def run_tt(name, spec, max_time, seed):
    d, n, r = spec["d"], spec["n"], spec["r"]
    g = torch.Generator().manual_seed(seed)
    shape = [n] * d
    truth = _random_truth(shape, r, torch.float64, g)
    N = 10 * d * n * r * r
    idx, tidx = sample_indices(shape, N, generator=g), sample_indices(shape, N, generator=g)
    vals, tvals = truth.gather(idx), truth.gather(tidx)
    runs = [_ours(name, idx, vals, shape, r, (tidx, tvals), None, m, max_time, seed) for m in ("cg", "trust-region")]
    runs.append({"solver": "t3f / TTeMPS", "skipped": "skipped: no PyTorch/Python peer for Riemannian TT completion"})
    return {"case": name, **spec, "samples": N, "runs": runs}


def _plot(case, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for run in case["runs"]:
        hist = [h for h in run.get("history", []) if h.get("test_error") is not None]
        if not hist:
            continue
        ts = [max(h["solve_time"], 1e-3) for h in hist]
        ax1.loglog(ts, [h["test_error"] for h in hist], label=run["solver"])
        ax2.semilogy([h["iter"] for h in hist], [h["test_error"] for h in hist], label=run["solver"])
    for ax, xl in ((ax1, "time (s)"), (ax2, "iterations")):
        ax.axhline(TARGET, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(xl)
        ax.set_ylabel("relative test error")
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(case["case"])
    fig.tight_layout()
    path = out / f"completion_{case['case']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def markdown(results) -> str:
    lines = []
    for case in results["cases"]:
        lines += [
            f"### {case['case']}",
            "",
            "| solver | time to 1e-8 (s) | iterations | final test error | pymanopt time / ours (CG, TR) | status |",
            "|---|---|---|---|---|---|",
        ]
        ours = [
            next((r.get("time_to_target") for r in case["runs"] if r["solver"] == f"lowrankopt {m}"), None)
            for m in ("cg", "trust-region")
        ]
        for run in case["runs"]:
            if "skipped" in run:
                lines.append(f"| {run['solver']} | | | | | {run['skipped']} |")
                continue
            ratio = ""
            if run["solver"].startswith("pymanopt") and all(ours):
                t = run.get("time_to_target")
                if t:
                    ratio = " / ".join(f"{t / o:.1f}×" for o in ours)
                elif run.get("history") and not run.get("error"):
                    ratio = " / ".join(f"> {run['history'][-1]['solve_time'] / o:.1f}×" for o in ours)
            status = run.get("error") or run.get("status") or ""
            lines.append(
                f"| {run['solver']} | {_fmt(run.get('time_to_target'), '.2f')} | "
                f"{_fmt(run.get('iters_to_target'), 'd')} | {_fmt(run.get('final_test_error'), '.1e')} | "
                f"{ratio} | {str(status)[:90]} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=None, help=f"comma-separated, from {list(MATRIX_CASES) + list(TT_CASES)}")
    ap.add_argument("--full", action="store_true", help="also the 20000 × 20000 case")
    ap.add_argument("--max-time", type=float, default=300.0, help="per solver run, seconds (default 300)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--merge", action="store_true", help="keep other cases of an existing completion.json")
    ap.add_argument(
        "--allocator",
        choices=("default", "tuned"),
        default="tuned",
        help="tuned: lowrankopt.tune_cpu_allocator() for the whole process, i.e. for every solver (default)",
    )
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.allocator == "tuned":
        tune_cpu_allocator()
    names = args.cases.split(",") if args.cases else DEFAULT_CASES + (["matrix-big"] if args.full else [])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "benchmark": "completion",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "allocator": args.allocator,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "target_test_error": TARGET,
        "cases": [],
    }
    previous = out / "completion.json"
    if args.merge and previous.exists():  # keep the cases of an earlier run that are not re-run now
        results["cases"] = [c for c in json.loads(previous.read_text())["cases"] if c["case"] not in names]
    for name in names:
        if name not in MATRIX_CASES and name not in TT_CASES:
            ap.error(f"unknown case {name!r}")
        print(f"== {name}", flush=True)
        case = (
            run_matrix(name, MATRIX_CASES[name], args.max_time, args.seed)
            if name in MATRIX_CASES
            else run_tt(name, TT_CASES[name], args.max_time, args.seed)
        )
        case["plot"] = _plot(case, out)
        results["cases"].append(case)
        print(markdown({"cases": [case]}), flush=True)
        (out / "completion.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "completion.md").write_text(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def render(path: str) -> None:
    """Print the markdown tables of a results JSON written by this script."""
    print(markdown(json.loads(Path(path).read_text())))
