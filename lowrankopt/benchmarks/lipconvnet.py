"""Benchmark ``lipconvnet``: our compact LipConvNet against the reference LipConvNet layout (Singla & Feizi's, used by
the GS paper's §7.3 with GS-SOC layers) on the same data — clean and certified accuracy, parameters, training time.

Data: scikit-learn's bundled 8×8 digits (pixels in [0, 1], a fixed 80/20 split; CIFAR is not downloadable here).
Models (all 1-Lipschitz, :class:`~lowrankopt.nn.LipConvNet`):

* ``compact``: channels zero-padded to 16, 2 orthogonal 3×3 convs + activation, a 2×2 space-to-depth, a linear head
  with spectral norm ≤ 1 (``architecture="compact"``, the default layout);
* ``reference``: 3 blocks of 2 convs, planes 8 → 16 → 32, each block ending in a stride-2 conv that doubles the
  channels (space-to-depth, then slicing), the last one 1×1, and a final 1×1 SOC to the 10 classes
  (``architecture="reference"``: LipConvNet-n's layout with 3 blocks instead of 5, for 8×8 images).

Each with SOC convs (MaxMin activations in the reference layout, as SOC's code) and with GS orthogonal convs, groups
(4, 4), paired shuffles and MaxMinPermuted (the paper's Table 3 setting). Adam, lr 1e-2, cross-entropy, batches of
64, the same epochs for all. Certified accuracy at ℓ₂ radius ε counts test samples classified correctly with
margin / √2 > ε (:func:`~lowrankopt.nn.certified_accuracy`). The baseline of the time ratios is the first row (compact,
SOC), run in the same process.
"""

from __future__ import annotations

import time

import torch

from ..nn.orthogonal.gs_conv import LipConvNet, certified_accuracy
from .digits import digits_skipped, digits_split, fit
from .registry import Benchmark, Case
from .runner import Context, Timing, ratios_to_first, timing_row

#: Certified radii reported (in units of the [0, 1] pixel scale): SOC's 36/255 and two larger ones.
EPSILONS = (36, 72, 108)

#: (label, LipConvNet keyword arguments) of the compared models.
MODELS = (
    ("compact, SOC", dict(width=16, depth=2, stages=1, conv="soc")),
    ("compact, GS-SOC (4, 4)", dict(width=16, depth=2, stages=1, conv="gs", groups=(4, 4))),
    ("reference, SOC", dict(width=8, depth=2, stages=3, conv="soc", architecture="reference")),
    ("reference, GS-SOC (4, 4)", dict(width=8, depth=2, stages=3, conv="gs", groups=(4, 4), architecture="reference")),
)


def run(case: Case, ctx: Context) -> dict:
    """Train every model of :data:`MODELS` for ``case.params["epochs"]`` epochs on the digits and report clean and
    certified accuracy on the test split, parameters, seconds per epoch and in all."""
    data = digits_split(ctx)
    if data is None:
        return digits_skipped("LipConvNet")
    Xtr, ytr, Xte, yte = data
    epochs = case.params["epochs"]
    rows = []
    for label, kwargs in MODELS:
        torch.manual_seed(ctx.seed)
        net = LipConvNet(1, 10, 8, generator=ctx.generator(), device=ctx.device, **kwargs)
        start = time.perf_counter()
        times = fit(net, Xtr, ytr, epochs, ctx, label, lr=1e-2)
        total = time.perf_counter() - start
        figures: dict[str, float] = {}
        for eps in EPSILONS:
            clean, cert = certified_accuracy(net, Xte, yte, eps / 255)
            figures["clean accuracy"] = clean
            figures[f"certified accuracy (eps {eps}/255)"] = cert
        figures["parameters"] = sum(p.numel() for p in net.parameters())
        figures["training seconds"] = total
        status = f"{epochs} epochs; time: per epoch"
        rows.append(timing_row(label, Timing.of(times), figures=figures, status=status))
    return {"rows": ratios_to_first(rows)}


BENCHMARK = Benchmark(
    name="lipconvnet",
    summary="1-Lipschitz LipConvNet on digits: our compact layout vs the reference (SOC / GS paper) layout, SOC and "
    "GS-SOC convs: clean and certified accuracy, parameters, time",
    baseline="seconds per epoch of the row / those of the compact LipConvNet with SOC convs (same process)",
    figures=(
        "clean accuracy",
        *(f"certified accuracy (eps {eps}/255)" for eps in EPSILONS),
        "parameters",
        "training seconds",
    ),
    quick=(Case("digits", dict(epochs=4)),),
    full=(Case("digits", dict(epochs=20)),),
    run=run,
)
