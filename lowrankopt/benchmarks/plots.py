"""Plots of a benchmark run (PNG, next to ``results.json``): convergence curves (error vs time and vs
iterations), labelled x–y series, and scaling plots (time vs a size parameter, log axes). Needs matplotlib; without
it the run writes no plots."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def _plots(results: dict, out: Path, log: Callable[[str], None]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        log("plots skipped: install matplotlib")
        return []
    written = []
    for name, bench in results["benchmarks"].items():
        for case in bench["cases"]:
            if case.get("curves"):
                written.append(_convergence_plot(plt, name, case, out))
            for k, spec in enumerate(case.get("xy", [])):
                written.append(_xy_plot(plt, f"{name}_{case['case']}_{k}.png", spec, out))
        for param in bench["scaling"]:
            written += _scaling_plots(plt, ticker, name, bench["cases"], param, out)
    return written


def _convergence_plot(plt, name: str, case: dict, out: Path) -> str:
    fig, (ax_t, ax_i) = plt.subplots(1, 2, figsize=(11, 4))
    for curve in case["curves"]:
        ax_t.loglog([max(t, 1e-4) for t in curve["time"]], curve["error"], label=curve["label"])
        ax_i.semilogy(curve["iter"], curve["error"], label=curve["label"])
    for ax, xlabel in ((ax_t, "time (s)"), (ax_i, "iterations")):
        if case.get("target") is not None:
            ax.axhline(case["target"], color="gray", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(case.get("error_label", "error"))
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"{name}: {case['case']}")
    fig.tight_layout()
    path = f"{name}_{case['case']}_convergence.png"
    fig.savefig(out / path, dpi=110)
    plt.close(fig)
    return path


def _xy_plot(plt, path: str, spec: dict, out: Path) -> str:
    """A plot of labelled series ``{"title", "xlabel", "ylabel", "xlog", "ylog", "series": [{"label", "x", "y"}]}``."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for series in spec["series"]:
        ax.plot(series["x"], series["y"], marker="o", label=series["label"])
    if spec.get("xlog"):
        ax.set_xscale("log")
        xs = sorted({x for series in spec["series"] for x in series["x"]})
        if len(xs) <= 8:  # label the measured x values, not log-axis minor ticks
            from matplotlib import ticker

            ax.set_xticks(xs)
            ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    if spec.get("ylog"):
        ax.set_yscale("log")
    ax.set_xlabel(spec["xlabel"])
    ax.set_ylabel(spec["ylabel"])
    ax.set_title(spec["title"], fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / path, dpi=110)
    plt.close(fig)
    return path


def _scaling_plots(plt, ticker, name: str, cases: list[dict], param: str, out: Path) -> list[str]:
    """One plot per group of cases that differ only in ``param`` (at least two values): time vs param."""
    groups: dict[tuple, list[dict]] = {}
    for case in cases:
        if param in case["params"] and "error" not in case:
            key = tuple(sorted((k, str(v)) for k, v in case["params"].items() if k != param))
            groups.setdefault(key, []).append(case)
    written = []
    for key, group in groups.items():
        if len({c["params"][param] for c in group}) < 2:
            continue
        group.sort(key=lambda c: c["params"][param])
        fig, ax = plt.subplots(figsize=(6, 4.5))
        variants = dict.fromkeys(r["variant"] for c in group for r in c["rows"] if r.get("time") is not None)
        for variant in variants:
            pts = [
                (c["params"][param], r["time"])
                for c in group
                for r in c["rows"]
                if r["variant"] == variant and r.get("time") is not None
            ]
            ax.loglog(*zip(*pts, strict=True), marker="o", label=variant)
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xticks(sorted({c["params"][param] for c in group}))
        ax.set_xlabel(param)
        ax.set_ylabel(group[0].get("time_label", "time (s)"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fixed = ", ".join(f"{k}={v}" for k, v in key)
        ax.set_title(f"{name}: time vs {param} ({fixed})", fontsize=9)
        fig.tight_layout()
        path = f"{name}_scaling_{param}_{len(written)}.png" if len(written) else f"{name}_scaling_{param}.png"
        fig.savefig(out / path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
