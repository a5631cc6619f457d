"""Benchmarks of the conv spectral tools: ``conv-norms``, ``conv-bound-tightness``, ``conv-norm-training``,
``tt-conv``.

- ``conv-norms``: He-initialized 3×3 kernels ``c × c`` (c = 64…512, float32) and inputs n = 16…224. Each method's
  time and value: the exact circular norm (FFT + batched SVD), Gram iteration (circular, t = 6), power iteration
  with zero padding (50 iterations of conv / conv_transpose), the Fantastic-Four bound, the certified
  tensor-norm bound (seven unfoldings), LipGrid (Araujo et al. 2021: the 50 × 50 grid maximum of ``‖K̂(ω)‖_F``
  with a certified grid factor, and the paper theorem's per-channel form), the zero-padding Gram-iteration bound
  (Delattre et al. 2024, t = 4) and the tensor-norm *estimate* (HOPM) cold (3 starts, ≤ 100 sweeps) and
  warm (5 sweeps from the previous vectors). Ratios: time / time of the exact norm; value / exact norm (the
  n-independent bounds bound the norm at every n, zero padding included: their ratio to the circular norm at n
  falls toward their ratio to ``sup_ω ‖K̂(ω)‖₂`` as n grows); the certified row's "certified / estimate" is its
  value over the cold estimate's. The n-independent methods are re-timed at every n, so their flat line in the
  time-vs-n plot is measured. A method whose time, extrapolated as n² from the previous n (as c³ from the
  previous c for the n-independent ones), would exceed ``max_time / 5`` is not run (a row says so). On CUDA,
  float32 convs may run in TF32 (``torch.backends.cudnn.allow_tf32``), so the power-iteration value is then good
  to about 1e-3.
- ``conv-norm-training``: a 3-conv CNN on scikit-learn's 8×8 digits, trained with no control, with the
  tensor-norm regularizer ``λ Σ relu(estimate − 1)²`` (λ = 1; 5 warm HOPM sweeps per step), and with
  normalization of each conv to norm ≤ 1 (``W · min(1, 1/σ)``) with σ from a power iteration at its input size
  (1 warm iteration per step) or from the tensor-norm estimate (5 warm sweeps per step). Test accuracy, each
  conv's norm with its zero padding (power iteration to 1e-10), its tensor-norm estimate (a careful cold start:
  10 starts, ≤ 1000 sweeps), its certified n-independent bound (:func:`~lowrankopt.spectral.symbol_norm_bound`,
  rtol 1e-3), the product of the norms (a bound on the network's conv part), time per epoch.
- ``conv-bound-tightness``: per kernel (random He-initialized of several shapes and strides, a kernel built so
  that HOPM stops at a local maximum, and the three convs of the digits CNN after training without control),
  the n-independent norm ``sup_ω ‖K̂(ω)‖₂`` to 0.1 % (the certified interval of
  :func:`~lowrankopt.spectral.symbol_norm_bound`), the HOPM estimate at its defaults and at 20 starts ×
  1000 sweeps, the certified tensor-norm bound (unfoldings) and the certified symbol bound, their ratios
  ("certified / estimate": how much the guarantee costs against the HOPM value) and their times.
- ``tt-conv``: a 3-conv CNN on digits with its 2nd and 3rd convs replaced by :class:`~lowrankopt.nn.TTConv2d` at
  several ranks (initialized by TT-SVD of the same dense initialization, gauge-orthogonalized after each Adam
  step), vs the dense model: test accuracy, % parameters, time per epoch, and the layers' largest singular value
  (exact, circular at the layer's input size, from the core). One more row clips the TT layers' singular values
  to 1 every 10 steps (:meth:`~lowrankopt.nn.TTConv2d.clip_`) and after the last. Plot: accuracy vs % parameters.
"""

from __future__ import annotations

import math
import time

import torch

from ..nn import TTConv2d, convert_to_tt_conv
from ..spectral import (
    ConvNormRegularizer,
    IterationState,
    circular_spectral_norm,
    conv_spectral_norm,
    conv_spectral_normalization,
    fantastic_four_bound,
    gram_iteration_bound,
    lipgrid_bound,
    symbol_norm_bound,
    tensor_norm_bound,
    tensor_norm_estimate,
    zero_padding_gram_bound,
)
from .digits import accuracy, accuracy_plot, digits_skipped, digits_split, epoch_row, fit
from .registry import Benchmark, Case
from .runner import Context, Timing, ratios_to_first, timing_row

# ------------------------------------------------------------------------------------------------ conv-norms

_LAST: dict[tuple, tuple[int, float]] = {}  # (c, method) -> (n, seconds) of the last run, to extrapolate
CERTIFIED = "tensor-norm bound (certified, 7 unfoldings)"
COLD = "tensor-norm estimate, cold (HOPM, 3 starts)"


def _measure(ctx: Context, fn) -> tuple[Timing, float]:
    """Time ``fn``: a first timed call; if it took over a second, that call alone, else ``ctx.time`` rounds."""
    ctx.sync()
    t0 = time.perf_counter()
    value = fn()
    ctx.sync()
    first = time.perf_counter() - t0
    timing = Timing.of([first]) if first > 1.0 else ctx.time({"f": fn})["f"]
    return timing, float(value)


def run_norms(case: Case, ctx: Context) -> dict:
    c, n = case.params["c"], case.params["n"]
    K = (torch.randn(c, c, 3, 3, generator=ctx.generator(c)) * math.sqrt(2 / (9 * c))).to(ctx.device)
    warm_state = IterationState()
    tensor_norm_estimate(K, state=warm_state, generator=ctx.generator(1))
    v0 = torch.randn(1, c, n, n, generator=ctx.generator(2)).to(ctx.device)  # drawn once, outside the timing

    methods = {  # name: (function, grows with n)
        "exact circular (FFT + SVD)": (lambda: circular_spectral_norm(K, n), True),
        "Gram iteration t=6 (circular)": (lambda: gram_iteration_bound(K, n), True),
        "power iteration, zeros (50 it.)": (
            lambda: conv_spectral_norm(K, n, "zeros", iters=50, tol=0.0, state=IterationState(vectors=[v0])),
            True,
        ),
        "Fantastic Four": (lambda: fantastic_four_bound(K), False),
        CERTIFIED: (lambda: tensor_norm_bound(K), False),
        "LipGrid (Araujo 2021, sup ‖K̂‖_F, 50² grid)": (lambda: lipgrid_bound(K), False),
        "LipGrid per channel (Araujo 2021 theorem)": (lambda: lipgrid_bound(K, per_channel=True), False),
        "Gram iteration t=4, zero padding (Delattre 2024)": (lambda: zero_padding_gram_bound(K), False),
        COLD: (lambda: tensor_norm_estimate(K, generator=ctx.generator(1)), False),
        "tensor-norm estimate, warm (5 sweeps)": (lambda: tensor_norm_estimate(K, state=warm_state, iters=5), False),
    }
    budget = ctx.max_time / 5
    results = {}
    for name, (fn, grows) in methods.items():
        last = _LAST.get((c, name, ctx.device.type))
        if grows:
            estimate = last[1] * (n / last[0]) ** 2 if last and last[0] < n else 0.0
            trend = "the n² trend"
        elif last:  # n-independent and run at this c: re-timed at every n (its flat line is measured)
            estimate, trend = 0.0, ""
        else:  # first n at this c: c³ from the largest smaller c run (the SVDs and Gram products are cubic in c)
            smaller = [(c0, t) for (c0, nm, dev), (_, t) in _LAST.items() if nm == name and dev == ctx.device.type]
            smaller = [(c0, t) for c0, t in smaller if c0 < c]
            c0, t0 = max(smaller) if smaller else (c, 0.0)
            estimate, trend = t0 * (c / c0) ** 3, f"the c³ trend from c = {c0}"
        if estimate > budget:
            results[name] = f"not run: about {estimate:.0f} s by {trend} > max_time / 5 = {budget:.0f} s"
            continue
        ctx.status(f"c={c} n={n}: {name}")
        with torch.no_grad():
            results[name] = _measure(ctx, fn)
        _LAST[(c, name, ctx.device.type)] = (n, results[name][0].median)
    exact = results["exact circular (FFT + SVD)"]
    rows = []
    for name, res in results.items():
        if isinstance(res, str):
            rows.append({"variant": name, "skipped": res})
            continue
        timing, value = res
        figures = {"value": value}
        extra = {}
        if not isinstance(exact, str):
            figures["value / exact"] = value / exact[1]
            extra["ratio"] = timing.median / exact[0].median
        if name == CERTIFIED and not isinstance(results[COLD], str):
            figures["certified / estimate"] = value / results[COLD][1]
        rows.append(timing_row(name, timing, figures=figures, **extra))
    return {"rows": rows}


def _norm_cases(channels, sizes) -> tuple[Case, ...]:
    return tuple(Case(f"c{c}-n{n}", dict(c=c, n=n)) for c in channels for n in sizes)


NORMS = Benchmark(
    name="conv-norms",
    summary="conv spectral norm: exact FFT, Gram (circular; zero padding), power iteration, Fantastic Four, LipGrid, "
    "tensor-norm bound and estimate vs n and channels",
    baseline="time of the exact circular norm (FFT + batched SVD) at the same kernel and n; values / its value",
    figures=("time", "value", "value / exact"),
    quick=_norm_cases((64,), (16, 32, 64)),
    full=_norm_cases((64, 128, 256, 512), (16, 32, 64, 128, 224)),
    run=run_norms,
    scaling=("n",),
    repeats={"quick": 3, "full": 5},
)

# ---------------------------------------------------------------------------------------- conv-norm-training

_SIZES = (8, 8, 4)  # input size of each conv of _cnn on 8×8 digits


def _cnn(seed: int, width: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    w = width
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, w, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(2 * w, 2 * w, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(2 * w * 16, 10),
    )


def _conv_norms(model) -> tuple[list[float], list[float], list[float]]:
    """Each conv's operator norm with its own zero padding at its input size (power iteration to 1e-10), its
    tensor-norm estimate from a careful cold start (10 starts, ≤ 1000 sweeps) — not the tracked training value —
    and its certified bound for every input size (symbol search, rtol 1e-3)."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    norms, bounds, certified = [], [], []
    with torch.no_grad():
        for conv, n in zip(convs, _SIZES, strict=True):
            W = conv.weight.detach().double()
            g = torch.Generator().manual_seed(0)
            norm = conv_spectral_norm(
                W, n, "zeros", conv.stride[0], pad=conv.padding, iters=20000, tol=1e-10, generator=g
            )
            norms.append(float(norm))
            bounds.append(float(tensor_norm_estimate(W, conv.stride[0], restarts=10, iters=1000, generator=g)))
            certified.append(float(symbol_norm_bound(W, conv.stride[0])))
    return norms, bounds, certified


def run_training(case: Case, ctx: Context) -> dict:
    data = digits_split(ctx)
    if data is None:
        return digits_skipped()
    Xtr, ytr, Xte, yte = data
    epochs, width = case.params["epochs"], case.params["width"]
    rows = []
    labels = (
        "no control",
        "tensor-norm regularizer (target 1)",
        "power-iteration normalization (max 1)",
        "tensor-norm normalization (max 1)",
    )
    for label in labels:
        model = _cnn(ctx.seed, width).to(ctx.device)
        penalty = None
        if "regularizer" in label:
            penalty = ConvNormRegularizer(model, target=1.0, generator=ctx.generator(3))
        elif "normalization" in label:
            method = "power" if label.startswith("power") else "tensor-norm"
            convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
            for conv, n in zip(convs, _SIZES, strict=True):
                conv_spectral_normalization(conv, n, method=method, max_norm=1.0, generator=ctx.generator(4))
        model.train()
        times = fit(model, Xtr, ytr, epochs, ctx, label, penalty=penalty)
        model.eval()
        norms, bounds, certified = _conv_norms(model)
        figures = {
            "test accuracy": accuracy(model, Xte, yte),
            "conv norms (zeros)": ", ".join(f"{v:.3f}" for v in norms),
            "tensor-norm estimates": ", ".join(f"{v:.4f}" for v in bounds),
            "certified bounds (every n)": ", ".join(f"{v:.4f}" for v in certified),
            "product of conv norms": math.prod(norms),
        }
        rows.append(epoch_row(label, times, epochs, figures))
    return {"rows": ratios_to_first(rows)}


TRAINING = Benchmark(
    name="conv-norm-training",
    summary="digits CNN: no control vs tensor-norm regularizer vs normalization by power iteration / tensor norm",
    baseline="time per epoch of the row / that of the uncontrolled model",
    figures=(
        "test accuracy",
        "conv norms (zeros)",
        "tensor-norm estimates",
        "certified bounds (every n)",
        "product of conv norms",
        "time per epoch",
    ),
    quick=(Case("digits-5ep", dict(epochs=5, width=16)),),
    full=(Case("digits-30ep", dict(epochs=30, width=16)),),
    run=run_training,
    peers=("scikit-learn (data)",),
)

# ------------------------------------------------------------------------------------------- conv-bound-tightness


def _two_mode_kernel(c: int = 8, beta: float = 0.7) -> torch.Tensor:
    """Channel 0: a rank-one term with flat taps (symbol norm 3 at ω = 0); channels 1…c−1: β·Q ⊗ alternating taps
    (3β at ω = π, with the larger ‖K̂(ω)‖_F that the spectral start follows). The conv's norm is 3; HOPM from the
    second block stops at the local maximum 3β (as in the tests)."""
    e0 = torch.zeros(c, dtype=torch.float64)
    e0[0] = 1
    flat = torch.ones(3, dtype=torch.float64) / math.sqrt(3)
    alternating = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64) / math.sqrt(3)
    Q = torch.zeros(c, c, dtype=torch.float64)
    Q[1:, 1:] = torch.linalg.qr(
        torch.randn(c - 1, c - 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    )[0]
    return torch.einsum("o,c,p,q->ocpq", e0, e0, flat, flat) + beta * torch.einsum(
        "oc,p,q->ocpq", Q, alternating, alternating
    )


def _tightness_kernels(case: Case, ctx: Context) -> list[tuple[str, torch.Tensor, int]]:
    """(label, float64 kernel, stride): random He-initialized, the two-mode kernel, and the trained digits convs."""
    kernels = []
    for co, ci, k, s, seeds in case.params["random"]:
        for seed in range(seeds):
            g = ctx.generator(1000 * co + 10 * ci + k + seed)
            K = torch.randn(co, ci, k, k, generator=g, dtype=torch.float64) * math.sqrt(2 / (ci * k * k))
            label = f"random {co}×{ci}×{k}×{k}" + (f", stride {s}" if s > 1 else "") + f" #{seed}"
            kernels.append((label, K, s))
    kernels.append(("two-mode (HOPM trap) 8×8×3×3", _two_mode_kernel(), 1))
    data = digits_split(ctx)
    if data is not None:
        model = _cnn(ctx.seed, 16)
        fit(model, data[0], data[1], case.params["epochs"], ctx, "digits CNN, no control")
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        for i, conv in enumerate(convs):
            W = conv.weight.detach().double()
            shape = "×".join(map(str, W.shape))
            kernels.append((f"digits conv {i + 1} {shape}, stride {conv.stride[0]} (trained)", W, conv.stride[0]))
    return kernels


def _timed(ctx: Context, fn):
    ctx.sync()
    t0 = time.perf_counter()
    value = fn()
    ctx.sync()
    return value, time.perf_counter() - t0


def run_tightness(case: Case, ctx: Context) -> dict:
    rows = []
    for label, K, s in _tightness_kernels(case, ctx):
        K = K.to(ctx.device)
        ctx.status(label)
        with torch.no_grad():
            (lower, upper), t_symbol = _timed(ctx, lambda K=K, s=s: symbol_norm_bound(K, s, return_lower=True))
            certified, t_unfold = _timed(ctx, lambda K=K, s=s: tensor_norm_bound(K, s))
            estimate, t_hopm = _timed(ctx, lambda K=K, s=s: tensor_norm_estimate(K, s, generator=ctx.generator(1)))
            best = tensor_norm_estimate(K, s, restarts=20, iters=1000, generator=ctx.generator(2))
        lower, upper, certified, estimate, best = map(float, (lower, upper, certified, estimate, best))
        figures = {
            "norm, every n (sup ‖K̂‖, ±0.1 %)": upper,
            "estimate (HOPM defaults)": estimate,
            "estimate / norm": estimate / lower,
            "estimate / best of 20 starts": estimate / best,
            "certified (unfoldings)": certified,
            "certified / estimate": certified / estimate,
            "symbol bound / estimate": upper / estimate,
            "time: unfoldings (s)": t_unfold,
            "time: HOPM (s)": t_hopm,
        }
        status = "time: the symbol search (rtol 1e-3)"
        rows.append(timing_row(label, Timing.of([t_symbol]), figures=figures, status=status))
    return {"rows": rows}


TIGHTNESS = Benchmark(
    name="conv-bound-tightness",
    summary="certified conv-norm bounds vs the HOPM tensor-norm estimate on random, adversarial and trained kernels",
    baseline="none (times in seconds; ratios in the figures: certified / estimate, estimate / norm)",
    figures=(
        "norm, every n",
        "estimate (HOPM defaults)",
        "estimate / norm",
        "certified (unfoldings)",
        "certified / estimate",
        "symbol bound / estimate",
    ),
    quick=(Case("quick", dict(random=((16, 16, 3, 1, 2), (64, 32, 3, 1, 2)), epochs=5)),),
    full=(
        Case(
            "full",
            dict(
                random=(
                    (16, 16, 3, 1, 3),
                    (64, 32, 3, 1, 5),
                    (64, 64, 3, 1, 3),
                    (64, 64, 5, 1, 2),
                    (64, 32, 3, 2, 2),
                    (128, 128, 3, 1, 2),
                ),
                epochs=30,
            ),
        ),
    ),
    run=run_tightness,
    peers=("scikit-learn (data)",),
)

# ------------------------------------------------------------------------------------------------------ tt-conv


def run_tt_conv(case: Case, ctx: Context) -> dict:
    data = digits_split(ctx)
    if data is None:
        return digits_skipped()
    Xtr, ytr, Xte, yte = data
    epochs, width, ranks = case.params["epochs"], case.params["width"], case.params["ranks"]

    def conv_params(model):
        return sum(
            p.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d | TTConv2d) for p in m.parameters()
        )

    dense = _cnn(ctx.seed, width)
    dense_total, dense_conv = sum(p.numel() for p in dense.parameters()), conv_params(dense)
    rows, points = [], []
    clip_rank = max(ranks)
    for rank, clip in [(None, False)] + [(r, False) for r in ranks] + [(clip_rank, True)]:
        model = _cnn(ctx.seed, width)
        label = "dense Conv2d"
        if rank is not None:
            convert_to_tt_conv(model, rank, exclude_modules=["0"])  # the 1-channel first conv stays dense
            label = f"TTConv2d rank {rank}" + (", σ ≤ 1 (clip every 10 steps)" if clip else "")
        model = model.to(ctx.device)
        tt = [(m, n) for m, n in zip([model[2], model[4]], _SIZES[1:], strict=True) if isinstance(m, TTConv2d)]
        steps = [0]

        def after_step(tt=tt, clip=clip, steps=steps):
            steps[0] += 1
            for m, n in tt:
                m.clip_(1.0, n) if clip and steps[0] % 10 == 0 else m.orthogonalize_()

        times = fit(model, Xtr, ytr, epochs, ctx, label, after_step=after_step if tt else None)
        if clip:
            for m, n in tt:
                m.clip_(1.0, n)
        acc = accuracy(model, Xte, yte)
        share = 100 * sum(p.numel() for p in model.parameters()) / dense_total
        figures = {
            "test accuracy": acc,
            "% parameters": share,
            "% conv parameters": 100 * conv_params(model) / dense_conv,
        }
        if tt:
            with torch.no_grad():
                figures["largest σ (exact, circular)"] = max(float(m.singular_values(n).max()) for m, n in tt)
        else:
            with torch.no_grad():
                figures["largest σ (exact, circular)"] = max(
                    float(circular_spectral_norm(model[i].weight, n, model[i].stride[0]))
                    for i, n in zip((2, 4), _SIZES[1:], strict=True)
                )
        rows.append(epoch_row(label, times, epochs, figures))
        points.append((label, share, acc))
    title = f"digits CNN (width {width}), {epochs} epochs: TTConv2d vs dense"
    return {"rows": ratios_to_first(rows), "xy": [accuracy_plot(title, [(lbl, [(x, y)]) for lbl, x, y in points])]}


TT_CONV = Benchmark(
    name="tt-conv",
    summary="digits CNN with TTConv2d at several ranks vs dense Conv2d: accuracy, % parameters, time per epoch",
    baseline="time per epoch of the row / that of the dense model",
    figures=("test accuracy", "% parameters", "% conv parameters", "largest σ", "train time per epoch"),
    quick=(Case("digits-5ep", dict(epochs=5, width=32, ranks=(4, 16))),),
    full=(Case("digits-30ep", dict(epochs=30, width=32, ranks=(2, 4, 8, 16, 32))),),
    run=run_tt_conv,
    peers=("scikit-learn (data)",),
)

BENCHMARKS = (NORMS, TIGHTNESS, TRAINING, TT_CONV)
