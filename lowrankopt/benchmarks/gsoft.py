"""Benchmark ``gsoft``: GSOFT adapters against PEFT's LoRA, OFT and BOFT on one linear layer.

A frozen ``nn.Linear(n, n)`` with one adapter; forward + backward of a batch of 256 (float32), all methods
interleaved in rounds; the baseline is full fine-tuning of the same layer (all weights trainable).
Configurations with about ``8 n`` trainable parameters: LoRA r = 4, OFT block 16, BOFT block 8 with 2
butterfly factors (as PEFT applies it), GSOFT block 8 (and double GSOFT, about ``15 n``). Also reported:
trainable parameters and the bytes of the adapter's buffers (PEFT's BOFT keeps dense n × n permutation
matrices; GSOFT keeps index maps), and on CUDA the peak memory of a step.
"""

from __future__ import annotations

import torch

from ..nn import GSOFTConfig, inject_gsoft
from .registry import Benchmark, Case
from .runner import Context, ratio, timing_row


class _One(torch.nn.Module):
    def __init__(self, n: int, device):
        super().__init__()
        self.lin = torch.nn.Linear(n, n, device=device)

    def forward(self, x):
        return self.lin(x)


def _peft(n: int, method: str, device):
    try:
        from peft import BOFTConfig, LoraConfig, OFTConfig, get_peft_model
    except ImportError:
        return None
    cfg = {
        "LoRA r=4": lambda: LoraConfig(r=4, target_modules=["lin"]),
        "OFT block 16": lambda: OFTConfig(oft_block_size=16, r=0, target_modules=["lin"]),
        "BOFT block 8, 2 factors": lambda: BOFTConfig(
            boft_block_size=8, boft_n_butterfly_factor=2, target_modules=["lin"]
        ),
    }[method]()
    return get_peft_model(_One(n, device), cfg)


def _ours(n: int, double: bool, device):
    model = _One(n, device)
    inject_gsoft(model, GSOFTConfig(block_size=8, target_modules=["lin"], double=double))
    return model


def run(case: Case, ctx: Context) -> dict:
    n, B = case.params["n"], 256
    torch.manual_seed(ctx.seed)
    x = torch.randn(B, n, generator=ctx.generator()).to(ctx.device)
    models = {"full fine-tuning": _One(n, ctx.device)}
    rows = []
    for method in ("LoRA r=4", "OFT block 16", "BOFT block 8, 2 factors"):
        ctx.status(f"building PEFT {method}")
        m = _peft(n, method, ctx.device)
        if m is None:
            rows.append({"variant": f"PEFT {method}", "skipped": "skipped: install peft"})
        else:
            models[f"PEFT {method}"] = m
    models["GSOFT block 8"] = _ours(n, False, ctx.device)
    models["double GSOFT block 8"] = _ours(n, True, ctx.device)

    def step(model):
        def go():
            model.zero_grad(set_to_none=True)
            model(x).square().mean().backward()

        return go

    t = ctx.time({name: step(m) for name, m in models.items()})
    base = t["full fine-tuning"]
    for name, m in models.items():
        figures = {
            "trainable parameters": sum(p.numel() for p in m.parameters() if p.requires_grad),
            "buffer bytes": sum(b.numel() * b.element_size() for b in m.buffers()),
        }
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
            step(m)()
            figures["peak memory (MB)"] = torch.cuda.max_memory_allocated(ctx.device) / 2**20
        extra = {"status": "baseline"} if name == "full fine-tuning" else {"ratio": ratio(t[name], base)}
        rows.append(timing_row(name, t[name], figures=figures, **extra))
    return {"rows": rows, "time_label": "seconds per forward + backward (batch 256)"}


BENCHMARK = Benchmark(
    name="gsoft",
    summary="GSOFT vs PEFT's LoRA / OFT / BOFT on one Linear(n, n): forward + backward time, parameters, buffers",
    baseline="time of the row / time of full fine-tuning of the layer (same process, interleaved rounds)",
    figures=("median seconds per step", "trainable parameters", "buffer bytes", "peak memory (CUDA)"),
    quick=(Case("linear768", dict(n=768)),),
    full=(Case("linear768", dict(n=768)), Case("linear4096", dict(n=4096))),
    run=run,
    scaling=("n",),
    peers=("peft",),
    repeats={"quick": 3, "full": 5},
)
