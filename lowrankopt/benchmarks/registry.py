"""The benchmark registry: what a benchmark declares, and the table of registered benchmarks.

A benchmark is a module that builds one :class:`Benchmark` (its name, the sizes of its ``--quick`` and
``--full`` runs, the baseline its ratios compare with, the figures it reports) and a ``run`` function
that measures one case through the :class:`~lowrankopt.benchmarks.runner.Context` the runner hands it.
Timing, environment capture, progress and output (``results.json``, ``results.md``, plots) belong to the
runner, so a benchmark module holds only the problem and the measurements.

To add one, write ``lowrankopt/benchmarks/<name>.py`` with a module-level ``BENCHMARK`` and list the
module in :data:`MODULES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Modules that define a ``BENCHMARK``, in the order ``lowrankopt bench`` runs them.
MODULES = (
    "autodiff",
    "completion",
    "approximation",
    "tucker",
    "tt_completion_phase",
    "sttp",
    "gsoft",
    "lipconvnet",
    "spectral",
    "covariance",
    "cross",
    "tbasis",
    "distributed",
    "riemannian_lora",
    "layers",
)


@dataclass(frozen=True)
class Case:
    """One problem size of a benchmark: a name unique within the benchmark and its parameters."""

    name: str
    params: Mapping[str, Any]


@dataclass(frozen=True)
class Benchmark:
    """What a benchmark declares.

    Attributes:
        name: the name ``lowrankopt bench NAME`` selects it by.
        summary: one line for ``lowrankopt bench --list``.
        baseline: what every ratio of the benchmark is measured against (run in the same process).
        figures: the figures each row reports.
        quick: the cases of ``--quick`` (the default; keep the registry's whole quick run to a few minutes
            on 2 cores).
        full: the cases of ``--full`` (the published problem sizes).
        run: ``run(case, ctx) -> dict`` measures one case; the dict has ``rows`` (one per solver or
            operation: ``variant``, times, ratios, or ``skipped``), and may have ``curves`` (for convergence
            plots: ``label``, ``time``, ``iter``, ``error``), ``target`` (a horizontal line on them),
            ``error_label`` and ``time_label`` (axis labels), and ``xy`` (other plots: ``title``, ``xlabel``,
            ``ylabel``, ``xlog``, ``ylog``, ``series`` of ``label``, ``x``, ``y``).
        scaling: case parameters to draw time-vs-parameter plots over (log axes), e.g. ``("d", "n", "r")``.
        peers: the peer libraries the benchmark compares with (for ``--list``; a missing one is skipped).
        repeats: timed repeats per measurement, as ``{"quick": k, "full": k}`` (``--repeats`` overrides).
    """

    name: str
    summary: str
    baseline: str
    figures: tuple[str, ...]
    quick: tuple[Case, ...]
    full: tuple[Case, ...]
    run: Callable[..., dict]
    scaling: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    repeats: Mapping[str, int] = field(default_factory=lambda: {"quick": 1, "full": 1})

    def cases(self, mode: str) -> tuple[Case, ...]:
        """The cases of ``mode`` (``"quick"`` or ``"full"``)."""
        if mode not in ("quick", "full"):
            raise ValueError(f"mode must be 'quick' or 'full', got {mode!r}")
        return self.quick if mode == "quick" else self.full


def registry() -> dict[str, Benchmark]:
    """``{name: Benchmark}`` of every registered benchmark, in run order (imports the modules)."""
    out: dict[str, Benchmark] = {}
    for module in MODULES:
        for bench in _declared(importlib.import_module(f"{__package__}.{module}")):
            if bench.name in out:
                raise RuntimeError(f"benchmark name {bench.name!r} is registered twice")
            out[bench.name] = bench
    return out


def _declared(module) -> tuple[Benchmark, ...]:
    found = getattr(module, "BENCHMARKS", None) or (getattr(module, "BENCHMARK", None),)
    if not all(isinstance(b, Benchmark) for b in found):
        raise RuntimeError(f"{module.__name__} must define BENCHMARK (or BENCHMARKS) of type Benchmark")
    return tuple(found)
