"""The benchmark runner: timing, environment capture, progress and output for ``lowrankopt bench``.

Every benchmark case is measured in this process, baseline included, so each ratio compares two
measurements taken side by side on the same machine state. :meth:`Context.time` makes one warm-up call
of each function, then ``repeats`` interleaved rounds (each round calls every function once, so a slow
spell of the machine hits a whole round alike); the median, min and max over the rounds are reported,
and :func:`ratio` is the median of per-round ratios. Solver benchmarks time whole runs instead (see
their modules). Output, in the ``out`` directory: ``results.json`` (everything,
including the environment), ``results.md`` (the tables) and PNG plots: convergence curves (error vs time
and vs iterations) and scaling plots (time vs a size parameter, log axes).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .registry import Benchmark, Case, registry

__all__ = ["Context", "Timing", "environment", "run_benchmarks", "to_markdown"]


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of one function over the timed rounds (warm-up excluded)."""

    median: float
    min: float
    max: float
    repeats: int
    rounds: tuple[float, ...]

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Timing:
        return cls(statistics.median(seconds), min(seconds), max(seconds), len(seconds), tuple(seconds))


class Context:
    """What a benchmark's ``run(case, ctx)`` gets from the runner: settings and the timing helpers.

    Attributes:
        mode: ``"quick"`` or ``"full"``.
        device: the ``torch.device`` the benchmark's tensors go on.
        repeats: timed rounds per measurement.
        seed: base random seed (use :meth:`generator`).
        max_time: seconds allowed to one solver run (convergence benchmarks).
    """

    def __init__(self, mode: str, device: torch.device, repeats: int, seed: int, max_time: float, status=None):
        self.mode, self.device, self.repeats, self.seed, self.max_time = mode, device, repeats, seed, max_time
        self._status = status

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded with ``seed + offset`` (generate on CPU, then move: same data on any device)."""
        return torch.Generator().manual_seed(self.seed + offset)

    def status(self, message: str) -> None:
        """Show what is being measured now (in the progress bar)."""
        if self._status is not None:
            self._status(message)

    def sync(self) -> None:
        """Wait for queued device work, so that wall-clock times cover it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fns: Mapping[str, Callable[[], Any]], repeats: int | None = None) -> dict[str, Timing]:
        """Time each function of ``fns``: one warm-up call each, then ``repeats`` interleaved rounds."""
        repeats = self.repeats if repeats is None else repeats
        for name, fn in fns.items():
            self.status(f"warm-up {name}")
            self._timed(fn)
        rounds: dict[str, list[float]] = {name: [] for name in fns}
        for k in range(repeats):
            self.status(f"round {k + 1}/{repeats}")
            for name, fn in fns.items():
                rounds[name].append(self._timed(fn))
        return {name: Timing.of(ts) for name, ts in rounds.items()}

    def _timed(self, fn: Callable[[], Any]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of ``a / b`` (robust to the machine's speed drifting between rounds)."""
    return statistics.median(x / y for x, y in zip(a.rounds, b.rounds, strict=True))


def timing_row(variant: str, t: Timing, **extra) -> dict:
    """A result row from a :class:`Timing` (with the seconds of every round)."""
    return {
        "variant": variant,
        "time": t.median,
        "time_min": t.min,
        "time_max": t.max,
        "repeats": t.repeats,
        "rounds": list(t.rounds),
        **extra,
    }


# ------------------------------------------------------------------------------------------------------------
# environment


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        run = lambda *cmd: subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=root, timeout=10)  # noqa: E731
        top = run("rev-parse", "--show-toplevel").stdout.strip()
        if not top or Path(top).resolve() != root:
            return None  # an installed copy (site-packages), possibly inside some other repository
        commit = run("rev-parse", "--short", "HEAD").stdout.strip()
        if commit and run("status", "--porcelain", "--", "lowrankopt").stdout.strip():
            commit += "+dirty"
        return commit or None
    except (OSError, subprocess.SubprocessError):
        return None  # not a checkout (an installed copy) or no git


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def environment(device: torch.device, threads: int, blas_threads: str) -> dict:
    """Machine and software facts recorded with every run."""
    from .. import __version__

    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lowrankopt": __version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "blas_threads": blas_threads,
        "device": str(device),
        "peers": {name: _version(name) for name in ("pymanopt", "geoopt", "peft", "scikit-learn", "numpy", "scipy")},
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


@contextlib.contextmanager
def _limited_threads(threads: int):
    """torch at ``threads`` threads, and NumPy/SciPy's BLAS too where threadpoolctl is installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if threadpool_limits is None:
            yield "not controlled (install threadpoolctl)"
        else:
            with threadpool_limits(limits=threads):
                yield str(threads)
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------------
# running


def run_benchmarks(
    names: Sequence[str | Benchmark] = (),
    *,
    mode: str = "quick",
    device: str | torch.device = "cpu",
    out: str | os.PathLike = "bench-results",
    repeats: int | None = None,
    threads: int = 1,
    seed: int = 0,
    max_time: float | None = None,
    allocator: str = "default",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run benchmarks and write their results to ``out``.

    Args:
        names: registered benchmark names, or :class:`Benchmark` objects (yours, unregistered); all
            registered benchmarks when empty.
        mode: ``"quick"`` or ``"full"`` (which cases each benchmark runs).
        device: where lowrankopt's tensors go (peers run where they run, usually on the CPU).
        out: output directory (created).
        repeats: timed repeats per measurement (default: each benchmark's own, per mode).
        threads: torch threads, and NumPy/SciPy BLAS threads where threadpoolctl is installed — the same
            for every library compared.
        seed: base random seed of the problems (non-negative).
        max_time: seconds per solver run (default 60 in quick mode, 300 in full mode).
        allocator: ``"tuned"`` calls :func:`lowrankopt.tune_cpu_allocator` first (process-wide and
            irreversible; it applies to every library compared), ``"default"`` leaves malloc alone. The
            ``lowrankopt bench`` command defaults to ``"tuned"``; this function does not change your
            process unless asked.
        progress: show a tqdm progress bar (on stderr).
        log: where the environment line and the summary go.

    Returns the results dict that is also written to ``out/results.json``. A benchmark case that raises
    is recorded with its error (and the others still run); ``results["errors"]`` counts them.
    """
    table = registry()
    if isinstance(names, str | Benchmark):
        names = [names]
    unknown = [n for n in names if not isinstance(n, Benchmark) and n not in table]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; registered: {list(table)}")
    if mode not in ("quick", "full"):
        raise ValueError(f"mode must be 'quick' or 'full', got {mode!r}")
    if allocator not in ("default", "tuned"):
        raise ValueError(f"allocator must be 'default' or 'tuned', got {allocator!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    for name, value in (("repeats", repeats), ("threads", threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if max_time is not None and not 0 < max_time < math.inf:
        raise ValueError(f"max_time must be a positive finite number of seconds, got {max_time!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    selected = [n if isinstance(n, Benchmark) else table[n] for n in (names or table)]
    if len({b.name for b in selected}) < len(selected):
        raise ValueError(f"benchmark names must be distinct, got {[b.name for b in selected]}")
    if allocator == "tuned":
        from ..allocator import tune_cpu_allocator

        allocator = "tuned" if tune_cpu_allocator() else "default (tuning needs glibc)"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    max_time = (60.0 if mode == "quick" else 300.0) if max_time is None else max_time
    work = [(b, c) for b in selected for c in b.cases(mode)]

    with _limited_threads(threads) as blas_threads:
        results = {
            "mode": mode,
            "environment": {**environment(device, threads, blas_threads), "allocator": allocator},
            "settings": {"repeats": repeats, "seed": seed, "max_time": max_time},
            "benchmarks": {b.name: _declaration(b, mode) for b in selected},
            "errors": 0,
        }
        log(_environment_line(results["environment"]))
        bar = _progress(len(work), progress)
        try:
            for bench, case in work:
                bar.set_description(f"{bench.name}:{case.name}")
                ctx = Context(
                    mode, device, repeats or bench.repeats[mode], seed, max_time, lambda m: bar.set_postfix_str(m)
                )
                result = _run_case(bench, case, ctx)
                results["benchmarks"][bench.name]["cases"].append(result)
                results["errors"] += "error" in result
                bar.write(_case_markdown(bench.name, result))
                bar.update()
                _write_json(out, results)  # after every case: a long run that is stopped keeps what it measured
        finally:
            bar.close()
    (out / "results.md").write_text(to_markdown(results))
    try:
        results["plots"] = _plots(results, out, log)
    except Exception as exc:  # the measurements are written already; a plotting failure must not lose them
        log(f"plots failed: {type(exc).__name__}: {exc}")
        results["plots"] = []
    _write_json(out, results)
    (out / "results.md").write_text(to_markdown(results))
    log(f"wrote {out / 'results.json'}, {out / 'results.md'} and {len(results['plots'])} plot(s)")
    return results


def _declaration(b: Benchmark, mode: str) -> dict:
    return {
        "summary": b.summary,
        "baseline": b.baseline,
        "figures": list(b.figures),
        "peers": list(b.peers),
        "scaling": list(b.scaling),
        "cases": [],
        "mode_cases": [c.name for c in b.cases(mode)],
    }


def _run_case(bench: Benchmark, case: Case, ctx: Context) -> dict:
    t0 = time.perf_counter()
    try:
        result = bench.run(case, ctx)
    except Exception as exc:  # recorded, reported, and counted in the exit status; the other cases still run
        result = {"rows": [], "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    return {"case": case.name, "params": dict(case.params), **result, "wall_time": time.perf_counter() - t0}


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="case", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _write_json(out: Path, results: dict) -> None:
    """Write ``results.json`` atomically (a run stopped mid-write keeps the previous complete file)."""
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(_jsonable(results), indent=1, allow_nan=False))
    os.replace(tmp, out / "results.json")


def _jsonable(obj):
    """Strict-JSON version of ``obj``: non-finite floats become the strings "nan", "inf", "-inf"."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Timing):
        return _jsonable(asdict(obj))
    if isinstance(obj, torch.Tensor | np.ndarray | np.generic):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot write {type(obj).__name__} to results.json")


def _environment_line(env: dict) -> str:
    gpu = f", {env['gpu']}" if "gpu" in env else ""
    return (
        f"lowrankopt {env['lowrankopt']} ({env['git_commit'] or 'installed'}), torch {env['torch']}, "
        f"{env['cpu']} ({env['cpu_count']} cores), {env['torch_threads']} torch thread(s), "
        f"BLAS threads {env['blas_threads']}, {env['allocator']} allocator, device {env['device']}{gpu}"
    )


# ------------------------------------------------------------------------------------------------------------
# tables


def _fmt(value, spec: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _case_markdown(name: str, case: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in case["params"].items())
    lines = [f"#### {name}: {case['case']} ({params})", ""]
    if "error" in case:
        return "\n".join([*lines, f"**error**: `{case['error']}`", ""])
    extra = sorted({k for row in case["rows"] for k in row.get("figures", {})})
    head = ["variant", "median (s)", "min–max (s)", "repeats", "ratio", *extra, "status"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in case["rows"]:
        if "skipped" in row:
            cells = [row["variant"], "", "", "", "", *[""] * len(extra), row["skipped"]]
        else:
            spread = f"{row['time_min']:.3g}–{row['time_max']:.3g}" if row.get("time_min") is not None else "—"
            ratio_cell = "" if row.get("ratio") is None else f"{row['ratio']:.2f}×"
            figs = row.get("figures", {})
            cells = [
                row["variant"],
                _fmt(row.get("time"), ".3g"),
                spread,
                _fmt(row.get("repeats"), "d"),
                ratio_cell,
                *[_fmt(figs.get(k), ".3g") for k in extra],
                str(row.get("status", ""))[:100],
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])


def to_markdown(results: dict) -> str:
    """The tables of a results dict (as written to ``results.md``)."""
    env = results["environment"]
    lines = [
        f"# lowrankopt bench ({results['mode']})",
        "",
        f"{env['date']} · {_environment_line(env)}",
        "",
    ]
    for name, b in results["benchmarks"].items():
        lines += [f"## {name}", "", b["summary"], "", f"Ratio column: {b['baseline']}", ""]
        lines += [_case_markdown(name, case) for case in b["cases"]]
        lines += [f"![{p}]({p})\n" for p in results.get("plots", []) if p.startswith(f"{name}_")]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# plots


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
