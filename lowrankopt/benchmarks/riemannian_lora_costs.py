r"""Cost measurements of the ``riemannian-lora`` benchmark: the peak memory of training steps (:class:`PeakMemory`,
:func:`step_peak_memory`) and the ``linear*`` case — one large linear layer fitted to a low-rank teacher, time per step
and peak memory of our Riemannian LoRA adapter against PEFT's LoRA and a dense gradient projection.

**Peak memory.** On CUDA: ``torch.cuda.max_memory_allocated`` over the measured steps minus what was allocated before
them. On the CPU, where torch keeps no allocator statistics (and ``tracemalloc`` does not see its buffers):
:class:`PeakMemory`, a ``TorchDispatchMode`` that adds up the bytes of every tensor storage an aten op creates during
the steps (forward, backward — the autograd engine's ops included — and the optimizer step with the state it creates)
and subtracts a storage's bytes when it is freed (a ``weakref.finalize`` on the storage); the peak of that sum is the
figure. It counts tensor bytes exactly, not the allocator's caching or fragmentation, and not what existed before (the
model's weights, the data). Both are measured over the first two steps of a fresh optimizer, so the optimizer's state
is included.

**The linear case.** ``y = (W₀ + T) x`` with ``W₀`` a random ``m × n`` weight (the frozen base) and ``T`` a rank-r
teacher, plus noise; the student is ``W₀`` plus a rank-r adapter, trained on the mean squared error of a batch of
``B`` rows. Rows: PEFT LoRA with AdamW (the baseline of the ratio); ours (:class:`~lowrankopt.nn.RiemannianLoRALinear`)
with :class:`~lowrankopt.RiemannianAdam` and with :class:`~lowrankopt.Riemannion`; and the **dense gradient
projection**: the same adapter and Riemannion, but the forward goes through the dense weight ``W₀ + ΔW`` (the layer's
``weight`` property), so autograd forms the dense ``m × n`` gradient ``G`` and projects it, ``[G V | Gᵀ U]`` in
``O(m n r)`` — what a port of Riemannion that takes the gradient of a dense weight does. Ours computes the same
δ-gradient from the activations in ``O(B (m + n) r)``. Each timed call is ``steps_per_call`` training steps; calls are
interleaved in rounds (:meth:`~lowrankopt.benchmarks.timing.Context.time`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..nn import RiemannianLoRAConfig, convert_to_riemannian_lora
from ..optim import RiemannianAdam, Riemannion
from .registry import Case
from .timing import Context, timing_row

__all__ = ["PeakMemory", "run_linear", "step_peak_memory"]


class PeakMemory(TorchDispatchMode):
    """The bytes of the tensor storages that aten ops create inside the ``with`` block and that are still alive:
    ``live`` now, ``peak`` its maximum. Storages that an op returns but that one of its inputs already used (views,
    in-place results) and storages created before the block are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _freed(self, ptr: int) -> None:
        self.live -= self._sizes.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in inputs or ptr in self._sizes:
                continue
            self._sizes[ptr] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, ptr)
        return out


def step_peak_memory(step: Callable[[], object], device: torch.device, steps: int = 2) -> float:
    """Peak bytes above what is allocated before, over ``steps`` calls of ``step`` (CUDA: the allocator's peak; CPU:
    :class:`PeakMemory`), in MB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - resident) / 2**20
    with PeakMemory() as mem:
        for _ in range(steps):
            step()
    return mem.peak / 2**20


class _One(torch.nn.Module):
    def __init__(self, m: int, n: int, W0: torch.Tensor) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(n, m, bias=False, device=W0.device)
        with torch.no_grad():
            self.lin.weight.copy_(W0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class _DenseGradient(_One):
    """The adapter's forward through its dense weight ``W₀ + ΔW``: autograd forms the ``m × n`` gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.lin.weight)


def _models(m: int, n: int, r: int, W0: torch.Tensor, lrs: dict[str, float], seed: int):
    """``{label: (model, optimizer)}`` of the linear case, or ``{label: reason}`` for a skipped row."""
    out: dict[str, object] = {}
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        out["PEFT LoRA (AdamW)"] = "skipped: install peft"
    else:
        torch.manual_seed(seed)
        model = get_peft_model(_One(m, n, W0), LoraConfig(r=r, target_modules=["lin"]))
        params = [p for p in model.parameters() if p.requires_grad]
        out["PEFT LoRA (AdamW)"] = (model, torch.optim.AdamW(params, lr=lrs["lora"], weight_decay=0.0))
    for label, cls, make_opt in (
        ("ours: Riemannion", _One, lambda ps: Riemannion(ps, lr=lrs["riemannion"])),
        ("ours: RiemannianAdam", _One, lambda ps: RiemannianAdam(ps, lr=lrs["radam"])),
        ("dense gradient projection + Riemannion", _DenseGradient, lambda ps: Riemannion(ps, lr=lrs["riemannion"])),
    ):
        model = cls(m, n, W0)
        convert_to_riemannian_lora(model, RiemannianLoRAConfig(r=r, target_modules=["lin"], seed=seed))
        out[label] = (model, make_opt([p for p in model.parameters() if p.requires_grad]))
    return out


def run_linear(case: Case, ctx: Context) -> dict:
    """One ``m × n`` linear layer fitted to a rank-r teacher: time per step and peak memory of each method."""
    m, n, r, B, k = (case.params[key] for key in ("m", "n", "r", "batch", "steps_per_call"))
    g = ctx.generator(11)
    W0 = (torch.randn(m, n, generator=g) / n**0.5).to(ctx.device)
    teacher = (torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) / (n * r) ** 0.5).to(ctx.device)
    x = torch.randn(B, n, generator=g).to(ctx.device)
    y = x @ (W0 + teacher).T + 0.01 * torch.randn(B, m, generator=g).to(ctx.device)  # the teacher's part: O(1) entries
    with torch.no_grad():
        loss0 = float(torch.nn.functional.mse_loss(x @ W0.T, y))
    lrs = {"lora": 1e-3, "riemannion": 1e-2, "radam": 1e-3}
    built = _models(m, n, r, W0, lrs, ctx.seed)

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> Callable[[], None]:
        def go() -> None:
            for _ in range(k):
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()

        return go

    runnable = {label: v for label, v in built.items() if not isinstance(v, str)}
    memory = {}
    for label, (model, opt) in runnable.items():  # before timing: the first two steps, fresh optimizer state
        ctx.status(f"{label}: peak memory")
        memory[label] = step_peak_memory(step(model, opt), ctx.device)
    times = ctx.time({label: step(*mo) for label, mo in runnable.items()})
    base = "PEFT LoRA (AdamW)"
    rows = []
    for label, v in built.items():
        if isinstance(v, str):
            rows.append({"variant": label, "skipped": v})
            continue
        model, _ = v
        with torch.no_grad():
            loss = float(torch.nn.functional.mse_loss(model(x), y))
        figures = {"peak step memory (MB)": memory[label], "loss after the timed steps / at start": loss / loss0}
        row = timing_row(label, times[label], figures=figures, status=f"lr {_lr_of(label, lrs):g}; {k} steps/call")
        if base in times:
            row["ratio"] = times[label].median / times[base].median
        rows.append(row)
    if base not in times:
        rows[0]["status"] = "no ratio: PEFT is not installed"
    return {"rows": rows, "time_label": f"seconds per {k} training steps (batch {B})"}


def _lr_of(label: str, lrs: dict[str, float]) -> float:
    return lrs["lora"] if label.startswith("PEFT") else lrs["radam"] if "Adam" in label else lrs["riemannion"]
