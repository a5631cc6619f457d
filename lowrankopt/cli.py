"""Command-line interface: ``lowrankopt demo`` (the ``lowrankopt`` console script; also ``python -m lowrankopt``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from . import __version__

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
PROBLEM_NAMES = ("tt-completion", "matrix-completion")  # lowrankopt.demo.PROBLEMS, without importing it here


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
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
    demo.add_argument("--iters", type=_nonnegative_int, default=300, help="maximum number of iterations (default: 300)")
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
    demo.set_defaults(func=_run_demo)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import PROBLEMS

    torch.set_num_threads(args.threads)
    kwargs = {"samples": args.samples, "iters": args.iters, "seed": args.seed, "dtype": _DTYPES[args.dtype]}
    if args.rank is not None:
        kwargs["rank"] = args.rank
    PROBLEMS[args.problem](method=args.method, progress=not args.no_progress, **kwargs)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowrankopt`` console script; returns the process exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
