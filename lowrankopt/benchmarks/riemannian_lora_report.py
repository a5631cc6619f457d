"""The rows, curves and plots of the ``riemannian-lora`` MiniLM case from its runs (:mod:`.riemannian_lora`): the best
learning rate of each method's sweep, its accuracy over the seeds, time per step against the baseline's, the steps
to reach the baseline's final accuracy."""

from __future__ import annotations

import math
import statistics

from .timing import Timing, timing_row

__all__ = ["minilm_result"]

SMOOTH = 10  # steps of the running mean of the plotted training loss


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.fmean(xs) if xs else math.nan


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _final(run: dict) -> float:
    return run["evals"][-1][1]


def _sweep(runs: dict[float, list[dict]]) -> dict[float, dict]:
    return {
        lr: {
            "accuracies": [_final(r) for r in rs],
            "mean": _mean([_final(r) for r in rs]),
            "std": _std([_final(r) for r in rs]),
        }
        for lr, rs in runs.items()
    }


def _accuracy_curve(runs: list[dict]) -> tuple[list[int], list[float]]:
    """Mean test accuracy over the seeds at each evaluated step."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for step, acc in run["evals"]:
            by_step.setdefault(step, []).append(acc)
    steps = sorted(by_step)
    return steps, [_mean(by_step[s]) for s in steps]


def _loss_curve(runs: list[dict]) -> list[float]:
    """Mean training loss over the seeds at each step, then a running mean over :data:`SMOOTH` steps."""
    mean = [_mean(list(xs)) for xs in zip(*(r["loss"] for r in runs), strict=True)]
    out = []
    for i in range(len(mean)):
        window = mean[max(0, i - SMOOTH + 1) : i + 1]
        out.append(statistics.fmean(window) if not any(math.isnan(x) for x in window) else math.nan)
    return out


def _per_step(runs: dict[float, list[dict]]) -> Timing:
    """Seconds per step: one value per run (its median step time), over the whole sweep."""
    medians = [statistics.median(r["times"]) for rs in runs.values() for r in rs if r["times"]]
    return Timing.of(medians or [math.nan])  # NaN: every run diverged at its first steps


def minilm_result(results: dict[str, dict], baseline: str, steps: int) -> dict:
    """The benchmark's result dict from ``{label: {"runs": {lr: [run per seed]}, "best_lr", "memory", "params"}}`` (or
    ``{label: {"skipped": reason}}``); each run has ``loss`` (per step), ``times`` (seconds per step), ``evals``
    (``(step, test accuracy)``) and ``init_time``; ``best_lr`` (optional) is the learning rate chosen by the sweep
    (default: the best mean final accuracy). Ratios and "steps to" are against ``baseline``'s row."""
    best: dict[str, float] = {}
    for label, res in results.items():
        if "runs" in res:
            sweep = _sweep(res["runs"])
            best[label] = res.get("best_lr") or max(sweep, key=lambda lr: (sweep[lr]["mean"], -lr))
    target = None
    if baseline in best:
        target = statistics.fmean(_final(r) for r in results[baseline]["runs"][best[baseline]])
    base_time = _per_step(results[baseline]["runs"]) if baseline in best else None
    rows, curves, acc_series, lr_series = [], [], [], []
    for label, res in results.items():
        if "runs" not in res:
            rows.append({"variant": label, "skipped": res["skipped"]})
            continue
        sweep, lr = _sweep(res["runs"]), best[label]
        chosen = res["runs"][lr]
        t = _per_step(res["runs"])
        eval_steps, accs = _accuracy_curve(chosen)
        reached = None if target is None else next((s for s, a in zip(eval_steps, accs) if a >= target - 1e-12), None)
        init = [r["init_time"] for r in chosen if r.get("init_time") is not None]
        figures = {
            "test accuracy": sweep[lr]["mean"],
            "accuracy std": sweep[lr]["std"],
            "best lr": lr,
            "peak step memory (MB)": res["memory"],
            "steps to LoRA's final accuracy": reached,
            "trainable parameters": res["params"],
            "LOI time (s)": statistics.fmean(init) if init else None,
        }
        status = "sweep " + " ".join(f"{x:g}:{v['mean']:.3f}" for x, v in sweep.items())
        row = timing_row(label, t, figures=figures, status=status, seeds=len(chosen))
        row["sweep"] = {str(x): v for x, v in sweep.items()}
        if base_time is not None:
            row["ratio"] = t.median / base_time.median
        rows.append(row)
        loss = _loss_curve(chosen)
        curves.append({
            "label": f"{label} (lr {lr:g})",
            "iter": list(range(1, len(loss) + 1)),
            "time": [t.median * k for k in range(1, len(loss) + 1)],
            "error": loss,
        })  # fmt: skip
        acc_series.append({"label": label, "x": eval_steps, "y": accs})
        lr_series.append({"label": label, "x": list(sweep), "y": [v["mean"] for v in sweep.values()]})
    seeds = max((row.get("seeds", 0) for row in rows), default=0)
    xy = [
        {"title": f"test accuracy at the best learning rate (mean over {seeds} seed(s))", "xlabel": "training step",
         "ylabel": "test accuracy", "xlog": False, "ylog": False, "series": acc_series},
        {"title": f"final test accuracy after {steps} steps vs learning rate (mean over {seeds} seed(s))",
         "xlabel": "learning rate", "ylabel": "test accuracy", "xlog": True, "ylog": False, "series": lr_series},
    ]  # fmt: skip
    return {
        "rows": rows,
        "curves": curves,
        "xy": xy,
        "target": None,
        "error_label": f"training loss (mean over seeds, running mean of {SMOOTH} steps)",
        "time_label": "seconds (median step time × steps)",
    }
