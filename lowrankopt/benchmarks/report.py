"""Output of a benchmark run: ``results.json`` (strict JSON, written atomically) and the markdown tables of
``results.md``."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .environment import _environment_line
from .timing import Timing

__all__ = ["to_markdown"]


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
