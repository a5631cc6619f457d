"""Benchmark ``tbasis``: a digits CNN compressed with T-Basis against the dense model and plain tensor rings.

The CNN has three 3×3 convs (1→32, 32→64 stride 2, 64→64 stride 2) and a linear layer 256→10 (58k parameters),
trained with Adam (lr 3·10⁻³, batches of 64) on scikit-learn's 8×8 digits. Every layer but the first conv (kept
dense, as in the paper) becomes a tensor ring of 5 modes (the linear layer: 6) of size N = 9 (``convert_to_tbasis``,
the paper's start: decompressed weights of standard deviation √(2 / fan_in)):

- T-Basis at (B, R) ∈ {(4, 4), (8, 8), (16, 16), (32, 16)}: one shared basis, per layer only coefficients and rank
  adapters; the decompressed-weight L2 penalty 3·10⁻⁴ of the paper;
- plain tensor rings (no shared basis) at R ∈ {4, 8, 16}: every layer owns its cores, same penalty;
- the dense model.

Figures: test accuracy, % of the dense model's parameters with and without the basis (a basis shipped once with
the code is the paper's "without"), parameters, time per epoch (ratio: over the dense model's).
"""

from __future__ import annotations

import torch

from ..nn import TBasis, convert_to_tbasis, count_parameters, tbasis_penalty
from .digits import accuracy, accuracy_plot, digits_skipped, digits_split, epoch_row, fit
from .registry import Benchmark, Case
from .runner import Context, ratios_to_first


def _cnn(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(64 * 2 * 2, 10),
    )


def run(case: Case, ctx: Context) -> dict:
    data = digits_split(ctx)
    if data is None:
        return digits_skipped()
    Xtr, ytr, Xte, yte = data
    epochs, penalty = case.params["epochs"], case.params["penalty"]
    dense_params = count_parameters(_cnn(ctx.seed))
    variants = [("dense", None)]
    variants += [(f"T-Basis B={B}, R={R}", (B, R)) for B, R in case.params["tbasis"]]
    variants += [(f"plain tensor rings R={R}", (None, R)) for R in case.params["plain"]]
    rows, series = [], {"T-Basis": [], "T-Basis (without the basis)": [], "plain tensor rings": [], "dense": []}
    for label, spec in variants:
        model = _cnn(ctx.seed)
        extra = None
        if spec is not None:
            convert_to_tbasis(model, spec[0], spec[1], exclude_modules=["0"], generator=ctx.generator(2))
            extra = lambda model=model: penalty * tbasis_penalty(model)  # noqa: E731
        model = model.to(ctx.device)
        times = fit(model, Xtr, ytr, epochs, ctx, label, penalty=extra)
        acc = accuracy(model, Xte, yte)
        total = count_parameters(model)
        without = count_parameters(model, exclude_modules=lambda name, m: isinstance(m, TBasis))
        figures = {
            "test accuracy": acc,
            "% parameters": 100 * total / dense_params,
            "% parameters without the basis": 100 * without / dense_params,
            "parameters": total,
        }
        rows.append(epoch_row(label, times, epochs, figures))
        if spec is None:
            series["dense"].append((100.0, acc))
        elif spec[0] is None:
            series["plain tensor rings"].append((figures["% parameters"], acc))
        else:
            series["T-Basis"].append((figures["% parameters"], acc))
            series["T-Basis (without the basis)"].append((figures["% parameters without the basis"], acc))
    title = f"digits CNN, {epochs} epochs: test accuracy vs parameters"
    return {"rows": ratios_to_first(rows), "xy": [accuracy_plot(title, series.items())]}


BENCHMARK = Benchmark(
    name="tbasis",
    summary="T-Basis on a digits CNN at (B, R) up to (32, 16) vs dense and plain tensor rings: accuracy, % params",
    baseline="time per epoch of the dense model (accuracy and % parameters against it too)",
    figures=("test accuracy", "% parameters (with / without the basis)", "time per epoch"),
    quick=(Case("digits-3ep", dict(epochs=3, tbasis=((4, 4), (16, 16)), plain=(8,), penalty=3e-4)),),
    full=(
        Case(
            "digits-40ep",
            dict(epochs=40, tbasis=((4, 4), (8, 8), (16, 16), (32, 16)), plain=(4, 8, 16), penalty=3e-4),
        ),
    ),
    run=run,
    peers=("scikit-learn (data)",),
)
