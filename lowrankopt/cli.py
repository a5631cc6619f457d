"""Command-line interface: ``lowrankopt demo`` and ``lowrankopt bench`` (the ``lowrankopt`` console script;
also ``python -m lowrankopt``).

The arguments are parsed before torch is imported (``lowrankopt --help`` and usage errors cost no torch import,
about 1.5 s): this module imports no torch at its top, and ``lowrankopt/__init__`` loads its torch-using names on
first access.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import __version__

_DTYPES = ("float32", "float64")  # torch dtype names, resolved after parsing
PROBLEM_NAMES = ("tt-completion", "matrix-completion")  # lowrankopt.demo.PROBLEMS, without importing it here


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``lowrankopt`` argument parser (one subcommand per action)."""
    parser = argparse.ArgumentParser(
        prog="lowrankopt",
        description="Riemannian optimization on low-rank matrix and tensor-train manifolds, in PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        help="solve a built-in completion problem (default: TT completion of a 20^10 tensor)",
        description="Solve a built-in synthetic completion problem with a progress bar and a final summary: "
        "tt-completion (a random nonnegative TT-rank-r tensor of shape 20^10, Riemannian CG with rank "
        "continuation) or matrix-completion (a random 2000 x 2000 matrix of rank r, LRGeomCG-style). The "
        "relative error on held-out entries is reported.",
    )
    demo.add_argument(
        "--problem", choices=sorted(PROBLEM_NAMES), default="tt-completion", help="the problem (default: tt-completion)"
    )
    demo.add_argument("--method", choices=["cg", "trust-region"], default="cg", help="Riemannian solver (default: cg)")
    demo.add_argument(
        "--rank", type=_positive_int, default=None, help="rank of the ground truth (default: 4 for TT, 10 for matrices)"
    )
    demo.add_argument(
        "--samples",
        type=_positive_int,
        default=None,
        help="number of training entries (default: 20 x the manifold dimension for TT, 5 x for matrices)",
    )
    demo.add_argument(
        "--iters",
        type=_nonnegative_int,
        default=None,
        help="iteration limit of each stage at the final (target) rank: for TT, the balanced stage of each run and "
        "the final stage on the plain problem each; the rank-continuation stages below it run --warmup-iters each on "
        "top (for TT, a run that stalls at the target rank is restarted, up to 4 runs, each with these limits, so at "
        "most 4 x (iters + warmup-iters x (rank - 1)) + iters iterations in all), and the summary reports the split "
        "(default: 300 for TT, 500 for matrices)",
    )
    demo.add_argument(
        "--warmup-iters",
        type=_nonnegative_int,
        default=None,
        help="iterations of each rank-continuation stage below the target rank (default: 8 for TT, where the "
        "TT-rank climbs from 1; for matrices, which usually start at the target rank, 4 with cg, 2 with "
        "trust-region)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument(
        "--dtype", choices=sorted(_DTYPES), default="float64", help="floating-point precision (default: float64)"
    )
    demo.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads (default: 1; the demo's kernels are too small to gain from more, "
        "and oversubscribed threads on a busy machine slow it down many times)",
    )
    demo.add_argument("--no-progress", action="store_true", help="print progress lines instead of a progress bar")
    demo.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="also write the settings as used (defaults resolved), the summary, the per-stage iteration counts and "
        "the history as JSON to FILE",
    )
    demo.set_defaults(func=_run_demo)

    bench = sub.add_parser(
        "bench",
        help="run the registered benchmarks; write results.json, results.md and plots",
        description="Run the registered benchmarks (all, or those NAMEd; --list lists them) side by side with "
        "their baselines and peers in this process, print the result tables, and write results.json, "
        "results.md and PNG plots (convergence curves, scaling plots) to --out. A peer that is not installed "
        "gives a 'skipped: install X' row. Exit status 1 if a benchmark case raised.",
    )
    bench.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    size = bench.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help="small sizes, about 5 minutes on 2 cores (default)",
    )
    size.add_argument("--full", dest="mode", action="store_const", const="full", help="the published problem sizes")
    bench.set_defaults(mode="quick")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where lowrankopt runs (default: cpu)")
    bench.add_argument(
        "--out", default="bench-results", metavar="DIR", help="output directory (default: bench-results)"
    )
    bench.add_argument("--list", action="store_true", help="list the registered benchmarks and exit")
    bench.add_argument(
        "--repeats",
        type=_positive_int,
        default=None,
        help="timed repeats per measurement, or runs per solver and peer (default: per benchmark)",
    )
    bench.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch threads and, with threadpoolctl installed (in the bench extra), NumPy/SciPy BLAS threads: the "
        "same for every library compared (default: 1)",
    )
    bench.add_argument(
        "--max-time", type=_positive_float, default=None, help="seconds per solver run (default: 60 quick, 300 full)"
    )
    bench.add_argument("--seed", type=_nonnegative_int, default=0, help="random seed (default: 0)")
    bench.add_argument(
        "--allocator",
        choices=["default", "tuned"],
        default="tuned",
        help="tuned: lowrankopt.tune_cpu_allocator() for the whole process, i.e. for every library compared "
        "(default: tuned)",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(func=_run_bench, parser=bench)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from .demo import PROBLEMS

    torch.set_num_threads(args.threads)
    kwargs = {"samples": args.samples, "seed": args.seed, "dtype": getattr(torch, args.dtype)}
    for name in ("rank", "iters", "warmup_iters"):  # None: the problem's default, which the result records
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    result = PROBLEMS[args.problem](method=args.method, progress=not args.no_progress, **kwargs)
    if args.out is not None:
        import json
        from pathlib import Path

        settings = {**result.pop("settings"), "threads": args.threads, "progress": not args.no_progress}
        Path(args.out).write_text(json.dumps({"settings": settings, **result}, indent=1))
        print(f"wrote {args.out}")
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    from .benchmarks import registry, run_benchmarks

    table = registry()
    if args.list:
        width = max(map(len, table))  # one column for the descriptions, however long the names
        for name, b in table.items():
            peers = f" [peers: {', '.join(b.peers)}]" if b.peers else ""
            print(f"{name:{width}s} {b.summary}{peers}")
            quick, full = (", ".join(c.name for c in cases) for cases in (b.quick, b.full))
            print(f"{'':{width}s} quick: {quick}; full: {full}")
        return 0
    unknown = [n for n in args.names if n not in table]
    if unknown:
        args.parser.error(f"unknown benchmark(s): {', '.join(unknown)} (choose from {', '.join(table)})")
    if len(set(args.names)) < len(args.names):
        args.parser.error(f"benchmark named twice: {' '.join(args.names)}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        args.parser.error("--device cuda: no CUDA device is available to torch")
    results = run_benchmarks(
        args.names,
        mode=args.mode,
        device=args.device,
        out=args.out,
        repeats=args.repeats,
        threads=args.threads,
        seed=args.seed,
        max_time=args.max_time,
        allocator=args.allocator,
        progress=not args.no_progress,
    )
    return 1 if results["errors"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowrankopt`` console script; returns the process exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
