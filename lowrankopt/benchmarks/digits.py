"""scikit-learn's bundled 8×8 digits for the layer benchmarks: a fixed split, a training loop, accuracy, and the
pieces of their results (the row without scikit-learn, a row per trained model, the accuracy-vs-parameters plot)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import torch

from .runner import Context
from .timing import Timing, timing_row


def digits_split(ctx: Context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(X_train, y_train, X_test, y_test)`` on ``ctx.device``: images ``(N, 1, 8, 8)`` in [0, 1], a fixed
    80/20 split drawn with ``ctx.generator()``; None without scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=ctx.generator())
    test, train = perm[: len(y) // 5], perm[len(y) // 5 :]
    return tuple(t.to(ctx.device) for t in (X[train], y[train], X[test], y[test]))


def fit(
    model: torch.nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    ctx: Context,
    label: str,
    lr: float = 3e-3,
    penalty: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[], object] | None = None,
) -> list[float]:
    """Adam on the trainable parameters, cross-entropy (``+ penalty()`` if given), batches of 64, ``after_step()``
    after each step; returns the seconds of each epoch (penalty and hook included)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = ctx.generator(1)
    times = []
    for epoch in range(epochs):
        ctx.status(f"{label}: epoch {epoch + 1}/{epochs}")
        perm = torch.randperm(len(y), generator=g).to(ctx.device)
        ctx.sync()
        t0 = time.perf_counter()
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
            (loss if penalty is None else loss + penalty()).backward()
            opt.step()
            if after_step is not None:
                after_step()
        ctx.sync()
        times.append(time.perf_counter() - t0)
    return times


def accuracy(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``X`` whose arg-max prediction is ``y``."""
    with torch.no_grad():
        return (model(X).argmax(1) == y).float().mean().item()


def digits_skipped(variant: str = "digits CNN") -> dict:
    """The result of a digits benchmark where scikit-learn (the data) is missing: one skipped row."""
    return {"rows": [{"variant": variant, "skipped": "skipped: install scikit-learn"}]}


def epoch_row(label: str, times: Sequence[float], epochs: int, figures: dict) -> dict:
    """The row of a model trained ``epochs`` epochs by :func:`fit`: ``times`` its seconds per epoch, and ``figures``."""
    return timing_row(label, Timing.of(times), figures=figures, status=f"{epochs} epochs; time: per epoch")


def accuracy_plot(title: str, series: Iterable[tuple[str, Sequence[tuple[float, float]]]]) -> dict:
    """An xy plot of test accuracy against % of the dense model's parameters (log x axis): one series per
    ``(label, [(x, y), ...])``, empty ones left out."""
    return {
        "title": title,
        "xlabel": "% of the dense model's parameters",
        "ylabel": "test accuracy",
        "xlog": True,
        "series": [
            {"label": label, "x": [x for x, _ in points], "y": [y for _, y in points]}
            for label, points in series
            if points
        ],
    }
