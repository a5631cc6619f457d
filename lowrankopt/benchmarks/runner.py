"""The benchmark runner of ``lowrankopt bench``: checks the settings, runs every case of the selected benchmarks in
this process (a case that raises is recorded with its error), shows progress, and writes the results after every case.

The pieces: :mod:`.timing` (:class:`Context`, :class:`Timing`, :func:`ratio`, :func:`timing_row`,
:func:`ratios_to_first`), :mod:`.environment` (what is recorded about the machine; thread limits), :mod:`.report`
(``results.json``, ``results.md``) and :mod:`.plots`. Output, in the ``out`` directory: ``results.json``
(everything, including the environment), ``results.md`` (the tables) and PNG plots: convergence curves (error vs time
and vs iterations) and scaling plots (time vs a size parameter, log axes).
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .environment import _environment_line, _limited_threads, environment
from .plots import _plots
from .registry import Benchmark, Case, registry
from .report import _case_markdown, _write_json, to_markdown
from .timing import Context, Timing
from .timing import ratio as ratio
from .timing import ratios_to_first as ratios_to_first
from .timing import timing_row as timing_row

__all__ = ["Context", "Timing", "environment", "run_benchmarks", "to_markdown"]


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
