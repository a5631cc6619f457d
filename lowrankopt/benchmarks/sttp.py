"""Benchmark ``sttp``: STTP/SVDP layers against dense ones — accuracy vs parameters, and throughput.

Two kinds of case:

- ``digits-*``: a small CNN (conv 1→32, conv 32→64 stride 2, linear 1024→128, linear 128→10, ReLU) on
  scikit-learn's bundled 8×8 digits (1797 images; a fixed 80/20 split), trained with Adam (lr 3e-3, batch
  64) from the same dense initialization. Variants: dense; SVDP (every layer but the first conv, full rank);
  STTP at several maximal TT-ranks (same layers; initialized from the dense weights by ``convert_to_sttp``,
  learned spectrum without a Lipschitz bound, Householder parameters). Reported: test accuracy, % of the
  dense model's parameters, median train time per epoch. Plot: accuracy vs % parameters.
- ``linear1024-r*``: forward + backward of a batch of 256 through ``STTPLinear(1024, 1024, r)`` against
  ``nn.Linear(1024, 1024)`` (float32), interleaved rounds, and the share of the STTP step spent building
  U, σ, V from the parameters (forward + backward of the factors alone). Scaling plot: time vs r.
"""

from __future__ import annotations

import statistics

import torch

from ..nn import STTPLinear, convert_to_sttp, count_parameters
from .digits import accuracy, accuracy_plot, digits_skipped, digits_split, epoch_row, fit
from .registry import Benchmark, Case
from .runner import Context, ratio, ratios_to_first, timing_row


def _cnn(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(64 * 4 * 4, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )


def run_digits(case: Case, ctx: Context) -> dict:
    data = digits_split(ctx)
    if data is None:
        return digits_skipped()
    Xtr, ytr, Xte, yte = data
    epochs, ranks = case.params["epochs"], case.params["ranks"]
    dense_params = count_parameters(_cnn(ctx.seed))
    variants = [("dense", None)] + [("SVDP (full rank)", "svdp")] + [(f"STTP rank {r}", r) for r in ranks]
    rows, points = [], []
    for label, spec in variants:
        model = _cnn(ctx.seed)
        if spec is not None:  # every layer but the first conv, from the same dense initialization
            convert_to_sttp(model, 10**6 if spec == "svdp" else spec, exclude_modules=["0"], svdp=spec == "svdp")
        model = model.to(ctx.device)
        times = fit(model, Xtr, ytr, epochs, ctx, label)
        acc = accuracy(model, Xte, yte)
        share = 100 * count_parameters(model) / dense_params
        figures = {"test accuracy": acc, "% parameters": share, "parameters": count_parameters(model)}
        rows.append(epoch_row(label, times, epochs, figures))
        points.append((label, share, acc))
    title = f"digits CNN, {epochs} epochs: test accuracy vs parameters"
    return {"rows": ratios_to_first(rows), "xy": [accuracy_plot(title, [(lbl, [(x, y)]) for lbl, x, y in points])]}


def run_throughput(case: Case, ctx: Context) -> dict:
    r, B, n = case.params["r"], case.params["batch"], case.params["n"]
    g = ctx.generator()
    dense = torch.nn.Linear(n, n).to(ctx.device)
    sttp = STTPLinear(n, n, r, generator=g).to(ctx.device)
    x = torch.randn(B, n, generator=g).to(ctx.device)

    def step(layer):
        def go():
            layer.zero_grad(set_to_none=True)
            layer(x).square().mean().backward()

        return go

    def build():  # forward + backward through U, σ, V alone: the cost of the parameterization
        sttp.zero_grad(set_to_none=True)
        U, s, V = sttp.factors()
        (U.sum() + s.sum() + V.sum()).backward()

    t = ctx.time({"dense": step(dense), "sttp": step(sttp), "build": build})
    return {
        "rows": [
            timing_row(
                "nn.Linear", t["dense"], status=f"forward + backward, batch {B}", figures={"parameters": n * n + n}
            ),
            timing_row(
                f"STTPLinear rank {r}",
                t["sttp"],
                ratio=ratio(t["sttp"], t["dense"]),
                figures={
                    "parameters": count_parameters(sttp),
                    "% of the step building U, V": 100
                    * statistics.median(b / a for a, b in zip(t["sttp"].rounds, t["build"].rounds, strict=True)),
                },
            ),
        ],
        "time_label": "seconds per forward + backward",
    }


def run(case: Case, ctx: Context) -> dict:
    return run_digits(case, ctx) if case.name.startswith("digits") else run_throughput(case, ctx)


def _throughput(ranks) -> tuple[Case, ...]:
    return tuple(Case(f"linear1024-r{r}", dict(n=1024, batch=256, r=r)) for r in ranks)


BENCHMARK = Benchmark(
    name="sttp",
    summary="STTP/SVDP layers vs dense: digits CNN accuracy vs % parameters; STTPLinear 1024² throughput",
    baseline="time of the row / time of the dense model (digits: per epoch) or nn.Linear (throughput)",
    figures=("test accuracy", "% parameters", "train time per epoch", "forward+backward time"),
    quick=(Case("digits-5ep", dict(epochs=5, ranks=(2, 8))),) + _throughput((8, 32)),
    full=(Case("digits-40ep", dict(epochs=40, ranks=(1, 2, 4, 8, 16))),) + _throughput((4, 8, 16, 32, 64, 128)),
    run=run,
    scaling=("r",),
    peers=("scikit-learn (data)",),
    repeats={"quick": 5, "full": 9},
)
