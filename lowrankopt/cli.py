"""Command-line interface: ``lowrankopt demo`` (the ``lowrankopt`` console script)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from . import __version__

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


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
        help="tensor-train completion of a synthetic 20^10 tensor by Riemannian CG",
        description="Tensor-train completion of a random nonnegative TT-rank-r tensor of shape 20^10 from "
        "random entries, by Riemannian conjugate gradients with rank continuation; prints progress and the "
        "final relative error on held-out entries.",
    )
    demo.add_argument("--rank", type=_positive_int, default=4, help="TT-rank of the ground truth (default: 4)")
    demo.add_argument(
        "--samples",
        type=_positive_int,
        default=None,
        help="number of training entries (default: 20 x the manifold dimension)",
    )
    demo.add_argument(
        "--iters", type=_nonnegative_int, default=300, help="maximum number of CG iterations (default: 300)"
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
    demo.set_defaults(func=_run_demo)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_tt_completion

    torch.set_num_threads(args.threads)
    run_tt_completion(rank=args.rank, samples=args.samples, iters=args.iters, seed=args.seed, dtype=_DTYPES[args.dtype])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lowrankopt`` console script; returns the process exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
