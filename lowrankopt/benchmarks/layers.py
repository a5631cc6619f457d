"""Benchmark ``layers``: forward + backward of the structured layers against the dense layer they replace.

Each case is one shape; every layer of the case is timed in the same process, interleaved with the dense one
(one warm-up call each, then interleaved rounds), and its ratio is the median of the per-round ratios to the dense
layer. One step is ``zero_grad``, the forward of a float32 batch, ``.square().mean().backward()``: what a training
step costs the layer (its parameterization included: STTP/SVDP build U and V from Householder parameters, TTLinear
and LowRankLinear the frames of their points).

- ``linear-<in>x<out>``: batch 256 through ``nn.Linear(in, out)``, ``TTLinear(in, out, rank=8)`` (3 cores,
  default balanced factors; and with ``d=2``: fewer, larger modes, larger products), ``LowRankLinear(in, out, 8)``,
  ``STTPLinear(in, out, 8)`` and ``SVDPLinear(in, out)`` (full rank ``min(in, out)``; skipped where its Householder
  products of ``min(in, out)`` reflectors of length ``max(in, out)`` make one step take more than a few seconds).
- ``conv-c<c>-s<s>``: ``nn.Conv2d(c, c, 3, padding=1)`` and ``TTConv2d(c, c, 3, rank=c/4, padding=1)`` on a
  batch of ``c × s × s`` images.
"""

from __future__ import annotations

import torch

from ..nn import LowRankLinear, STTPLinear, SVDPLinear, TTConv2d, TTLinear, count_parameters
from .registry import Benchmark, Case
from .runner import Context, ratio, timing_row

#: SVDP at full rank n builds an n × n Householder product per step (O(n³)): past this size a run would spend
#: minutes on it alone.
SVDP_MAX = 1024


def _step(layer: torch.nn.Module, x: torch.Tensor):
    def go():
        layer.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()

    return go


def _layers(case: Case, g: torch.Generator) -> tuple[torch.nn.Module, dict[str, torch.nn.Module], torch.Tensor, str]:
    p = case.params
    if case.name.startswith("conv"):
        c, s, B, r = p["channels"], p["size"], p["batch"], p["rank"]
        torch.manual_seed(int(torch.randint(2**31, (), generator=g)))  # nn.Conv2d's init has no generator argument
        dense = torch.nn.Conv2d(c, c, 3, padding=1)
        layers = {f"TTConv2d rank {r}": TTConv2d(c, c, 3, r, padding=1, generator=g)}
        x = torch.randn(B, c, s, s, generator=g)
        return dense, layers, x, f"nn.Conv2d({c}, {c}, 3), {c}×{s}×{s}, batch {B}"
    n_in, n_out, B, r = p["in"], p["out"], p["batch"], p["rank"]
    torch.manual_seed(int(torch.randint(2**31, (), generator=g)))
    dense = torch.nn.Linear(n_in, n_out)
    layers: dict[str, torch.nn.Module | str] = {
        f"TTLinear rank {r}": TTLinear(n_in, n_out, r, generator=g),
        f"TTLinear rank {r}, 2 cores": TTLinear(n_in, n_out, r, d=2, generator=g),
        f"LowRankLinear rank {r}": LowRankLinear(n_in, n_out, r, generator=g),
        f"STTPLinear rank {r}": STTPLinear(n_in, n_out, r, generator=g),
    }
    svdp = f"SVDPLinear rank {min(n_in, n_out)}"
    if not p["svdp"]:
        layers[svdp] = "skipped in quick mode (see the full run)"
    elif max(n_in, n_out) <= SVDP_MAX:
        layers[svdp] = SVDPLinear(n_in, n_out, generator=g)
    else:
        layers[svdp] = f"skipped: full rank {min(n_in, n_out)} builds O(n³) Householder products (n > {SVDP_MAX})"
    x = torch.randn(B, n_in, generator=g)
    return dense, layers, x, f"nn.Linear({n_in}, {n_out}), batch {B}"


def run(case: Case, ctx: Context) -> dict:
    dense, layers, x, what = _layers(case, ctx.generator())
    dense, x = dense.to(ctx.device), x.to(ctx.device)
    timed = {k: v.to(ctx.device) for k, v in layers.items() if isinstance(v, torch.nn.Module)}
    t = ctx.time({"dense": _step(dense, x), **{k: _step(v, x) for k, v in timed.items()}})
    name = type(dense).__name__
    rows = [
        timing_row(
            f"nn.{name}", t["dense"], ratio=1.0, status=f"forward + backward: {what}",
            figures={"parameters": count_parameters(dense)},
        )
    ]  # fmt: skip
    for label, layer in layers.items():
        if isinstance(layer, str):
            rows.append({"variant": label, "skipped": layer})
            continue
        share = 100 * count_parameters(layer) / count_parameters(dense)
        figures = {"parameters": count_parameters(layer), "% of dense parameters": share}
        rows.append(timing_row(label, t[label], ratio=ratio(t[label], t["dense"]), figures=figures))
    return {"rows": rows, "time_label": "seconds per forward + backward"}


def _linear(shapes, svdp: bool = True, rank: int = 8, batch: int = 256) -> tuple[Case, ...]:
    return tuple(
        Case(f"linear-{i}x{o}", {"in": i, "out": o, "batch": batch, "rank": rank, "svdp": svdp}) for i, o in shapes
    )


def _conv(shapes) -> tuple[Case, ...]:
    return tuple(Case(f"conv-c{c}-s{s}", {"channels": c, "size": s, "batch": b, "rank": c // 4}) for c, s, b in shapes)


BENCHMARK = Benchmark(
    name="layers",
    summary="forward+backward of TTLinear, LowRankLinear, STTPLinear, SVDPLinear, TTConv2d vs nn.Linear/nn.Conv2d",
    baseline="time of the row / time of the dense layer of the same shape (nn.Linear or nn.Conv2d), per round",
    figures=("forward+backward time", "parameters"),
    quick=_linear([(256, 128)]) + _linear([(1024, 1024)], svdp=False) + _conv([(64, 32, 8)]),
    full=_linear([(256, 128), (1024, 128), (1024, 1024), (4096, 4096)]) + _conv([(64, 32, 32), (256, 16, 32)]),
    run=run,
    repeats={"quick": 3, "full": 9},
)
