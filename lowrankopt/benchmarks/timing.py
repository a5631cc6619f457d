"""Timing for the benchmarks: :class:`Context` (what a benchmark's ``run(case, ctx)`` gets), :class:`Timing` and
the result-row helpers.

Every benchmark case is measured in one process, baseline included, so each ratio compares two measurements taken
side by side on the same machine state. :meth:`Context.time` makes one warm-up call of each function, then
``repeats`` interleaved rounds (each round calls every function once, so a slow spell of the machine hits a whole
round alike); the median, min and max over the rounds are reported, and :func:`ratio` is the median of per-round
ratios. Solver benchmarks time whole runs instead (see their modules).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Context", "Timing", "ratio", "ratios_to_first", "timing_row"]


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

    ``status``, if given, receives each message of :meth:`status` (the runner shows it in its progress bar).
    """

    def __init__(
        self,
        mode: str,
        device: torch.device,
        repeats: int,
        seed: int,
        max_time: float,
        status: Callable[[str], None] | None = None,
    ) -> None:
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


def timing_row(variant: str, t: Timing, **extra: object) -> dict:
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


def ratios_to_first(rows: list[dict]) -> list[dict]:
    """Set each timed row's ``ratio`` to its ``time`` over the first timed row's (rows without a time, e.g. skipped
    ones, get none); returns ``rows``."""
    timed = [r for r in rows if r.get("time") is not None]
    for r in timed:
        r["ratio"] = r["time"] / timed[0]["time"]
    return rows
