"""The environment recorded with every benchmark run (machine, software, peers' versions, git commit) and the
thread limits the runner sets for every library compared."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch

__all__ = ["environment"]


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
def _limited_threads(threads: int) -> Iterator[str]:
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


def _environment_line(env: dict) -> str:
    gpu = f", {env['gpu']}" if "gpu" in env else ""
    return (
        f"lowrankopt {env['lowrankopt']} ({env['git_commit'] or 'installed'}), torch {env['torch']}, "
        f"{env['cpu']} ({env['cpu_count']} cores), {env['torch_threads']} torch thread(s), "
        f"BLAS threads {env['blas_threads']}, {env['allocator']} allocator, device {env['device']}{gpu}"
    )
