"""Opt-in tuning of the CPU memory allocator for gather-heavy autodiff."""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def tune_cpu_allocator(cache_bytes: int = 1 << 30) -> bool:
    """Make glibc's ``malloc`` keep freed large blocks for reuse instead of returning them to the OS.

    PyTorch has no caching allocator on CPU. A Riemannian gradient or HVP through ``gather`` keeps
    ``O(d N r)`` interface vectors alive at once; with glibc's defaults each such block is fresh memory
    whose first touch costs page faults, which can double the run time at ``N = 10⁵, r = 40``
    (see docs/benchmarks.md). This sets ``M_MMAP_THRESHOLD`` to ``cache_bytes`` and raises
    ``M_TRIM_THRESHOLD``/``M_TOP_PAD``, so freed blocks up to that size are reused — the same as the
    environment variables ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_TOP_PAD_``,
    and the reason PyTorch's CPU performance guide recommends jemalloc or tcmalloc.

    The setting is process-wide and cannot be undone; the process keeps its peak heap. Call it once,
    at startup. Returns True when glibc accepted the settings, False (changing nothing) elsewhere.
    """
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or not 0 < cache_bytes < 1 << 31:
        raise ValueError(f"cache_bytes must be an int in (0, 2**31), got {cache_bytes!r}")
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, cache_bytes), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 1 << 26))
    return all(mallopt(opt, val) == 1 for opt, val in settings)
