"""Benchmarks of lowrankopt against its baselines and peers, run by ``lowrankopt bench``.

:mod:`.registry` declares what a benchmark is and lists the registered ones; :mod:`.runner` times them,
captures the environment and writes ``results.json``, ``results.md`` and plots. One module per
benchmark (:mod:`.autodiff`, :mod:`.completion`); peer libraries are wrapped in :mod:`.peers`.
"""

from .registry import Benchmark, Case, registry
from .runner import Context, Timing, ratio, run_benchmarks, timing_row

__all__ = ["Benchmark", "Case", "Context", "Timing", "ratio", "registry", "run_benchmarks", "timing_row"]
