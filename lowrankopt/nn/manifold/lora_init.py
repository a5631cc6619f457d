r"""Gradient-informed and weight-informed starts of Riemannian LoRA adapters (:mod:`.lora`): the locally optimal
initialization (LOI) of Bogachev et al. ("LoRA meets Riemannion", ICLR 2026, §5, Thm 5.1, Alg. 3), LoRA-GA-style and
PiSSA-style starts, and the converter's random start — each from the full-batch gradient of a few batches obtained by
backpropagation only, never forming a dense ``out × in`` gradient.

**The theorem.** The first Riemannian gradient at a start ``X₀ ∈ M_r`` is ``P_T(G)``, ``G = ∂L/∂W`` (at ``ΔW = 0``,
the base model). Every tangent vector ``ξ = A Vᵀ + U Bᵀ`` has rank ``≤ 2r``, so ``‖G − P_T G‖ ≥ ‖G − SVD_{2r}(G)‖``
(Eckart–Young), and ``X₀ = α U_{1:r} V_{r+1:2r}ᵀ`` (``U, Σ, V`` the SVD of G) attains it: its tangent space is
``{U₁ A + B V₂ᵀ}``, which holds ``U₁ Σ₁ V₁ᵀ`` and ``U₂ Σ₂ V₂ᵀ``, so ``P_T(G) = SVD_{2r}(G)``, the start whose tangent
space captures the most gradient energy ``‖P_T G‖²`` and whose first step decreases the loss fastest. Only the column
space ``U₁`` and the row space ``V₂`` matter: the mirrored pairing ``U₂ ... V₁ᵀ`` (PEFT's LoRA-GA "ArB2r") is optimal
too.

**The products.** The randomized SVD of rank ``2r`` needs only ``G N`` (``N: (in, k)``) and ``Gᵀ M`` (``M: (out, k)``).
Each is one forward and backward pass over the batches with zero probes in every adapted layer at once: the adapter's
update ``ΔW x`` is replaced by ``(x N) Z₁ᵀ`` with ``Z₁ = 0`` ``(out, k)``, whose gradient is
``∂L/∂Z₁ = Σ_b g_bᵀ (x_b N) = G N``, or by ``(x Z₂) Mᵀ`` with ``Z₂ = 0`` ``(in, k)``, ``∂L/∂Z₂ = Gᵀ M`` (the
single-backprop trick of the paper, §6, with general probes). The probes are zero, so the passes compute the base
model's loss; only ``torch.autograd.grad`` of the probes is taken, so no parameter's ``.grad`` changes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import torch

from ..._checks import as_int
from ..adapters.model import adapter_layers
from .lora_layer import RiemannianLoRALinear, layer_generator

__all__ = ["locally_optimal_init"]

METHODS = ("loi", "lora-ga", "pissa", "random")
GRADIENT_METHODS = ("loi", "lora-ga")
STABLE_GAMMA = 16  # PEFT's LoraGAConfig.stable_gamma default: LoRA-GA's "stable" scale out^{1/4} / √γ


def _dtype64(device: torch.device) -> torch.dtype:
    """The small factorizations compute in float64 where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def _randn(rows: int, cols: int, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """A standard normal ``(rows, cols)`` matrix from ``g`` (drawn on the generator's device), in ``like``'s dtype and
    on its device."""
    return torch.randn(rows, cols, dtype=torch.float64, generator=g, device=g.device).to(like)


def _complete(Q: torch.Tensor, r: int, g: torch.Generator) -> torch.Tensor:
    """``Q`` (orthonormal columns, ``j ≤ r`` of them) completed to ``r`` orthonormal columns by random directions
    orthogonal to ``Q`` (only needed where ``2r > min(out, in)``). Cost ``O(rows r²)``."""
    j = Q.shape[1]
    if j >= r:
        return Q[:, :r]
    Z = _randn(Q.shape[0], r - j, g, Q)
    for _ in range(2):  # twice is enough (Kahan–Parlett)
        Z = Z - Q @ (Q.T @ Z)
    return torch.cat([Q, torch.linalg.qr(Z)[0]], 1)


def _floor(s: torch.Tensor, top: float, rows: int, cols: int) -> torch.Tensor:
    """Singular values used as those of a rank-r point, floored at the numerical-rank tolerance of the largest
    (``top · max(rows, cols) · eps``; 1 if everything is 0), so the point has rank r exactly."""
    tol = top * max(rows, cols) * torch.finfo(s.dtype).eps if top > 0 else 1.0
    return s.clamp_min(tol)


# ---------------------------------------------------------------------- the probes
class _Probe:
    """The zero probe of one adapted layer in one pass: ``kind`` ``"left"`` (``ΔW x ↦ (x F) Zᵀ``, ``Z: (out, k)``,
    ``∂L/∂Z = G F``) or ``"right"`` (``ΔW x ↦ (x Z) Fᵀ``, ``Z: (in, k)``, ``∂L/∂Z = Gᵀ F``)."""

    def __init__(self, layer: RiemannianLoRALinear, kind: str, F: torch.Tensor) -> None:
        rows = layer.out_features if kind == "left" else layer.in_features
        self.kind = kind
        self.F = F.to(dtype=layer.compute_dtype, device=layer.lora_X.device)
        self.Z = torch.zeros(rows, F.shape[1], dtype=self.F.dtype, device=self.F.device, requires_grad=True)

    def delta(self, x2: torch.Tensor) -> torch.Tensor:
        """In place of ``ΔW x`` for the rows ``x2: (B, in)``: value 0, gradient to ``Z``. ``O(B (out + in) k)``."""
        return (x2 @ self.F) @ self.Z.T if self.kind == "left" else (x2 @ self.Z) @ self.F.T

    def dense(self) -> torch.Tensor:
        """In place of the dense ``ΔW`` (``Z Fᵀ`` or ``F Zᵀ``, ``(out, in)``), for code that reads the layer's
        ``weight`` instead of calling it (e.g. ``nn.MultiheadAttention.out_proj``), which forms a dense weight
        anyway."""
        return self.Z @ self.F.T if self.kind == "left" else self.F @ self.Z.T


@contextmanager
def _probing(model: torch.nn.Module, layers: list[RiemannianLoRALinear]):
    """The model in eval mode (no dropout: every pass sees the same ``G``; no running statistics updated) with every
    adapter enabled; each adapter computes ``W x`` plus its probe in place of ``ΔW x`` (so ``G`` is the gradient at the
    base weights whatever the adapters hold now). Everything is restored on exit, the training flag of each module as
    it was."""
    modes = [(m, m.training) for m in model.modules()]
    disabled = [(layer, layer.disabled) for layer in layers]
    model.eval()
    try:
        for layer in layers:
            layer.disabled = False
        yield
    finally:
        for layer, d in disabled:
            layer.disabled = d
        for m, mode in modes:
            m.training = mode


def _check_loss(loss: object, i: int) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a scalar tensor (the loss of one batch), got {type(loss).__name__}")
    if loss.numel() != 1 or not loss.is_floating_point():
        raise ValueError(
            f"loss_fn must return a floating scalar tensor (the loss of one batch), got shape {tuple(loss.shape)} "
            f"and dtype {loss.dtype} for batch {i}"
        )
    if not loss.requires_grad:
        raise ValueError(
            f"loss_fn's loss for batch {i} does not depend on any adapted layer (no gradient reaches the probes): "
            "compute it from model(...) with gradients enabled, without detaching"
        )
    if not bool(torch.isfinite(loss.detach()).all()):
        raise ValueError(f"loss_fn returned a non-finite loss ({loss.item()}) for batch {i}")
    return loss.reshape(())


def _pass(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: list[Any],
    probes: dict[RiemannianLoRALinear, _Probe],
) -> dict[RiemannianLoRALinear, torch.Tensor | None]:
    """One forward and backward pass over all batches with the probes installed: ``{layer: ∂L/∂Z}`` summed over the
    batches in float64 (None for a layer no batch's loss reaches)."""
    total: dict[RiemannianLoRALinear, torch.Tensor | None] = dict.fromkeys(probes)
    zs = [p.Z for p in probes.values()]
    try:
        for layer, probe in probes.items():
            layer.__dict__["_delta"] = probe.delta  # an instance attribute shadows the method for this pass only
            layer.__dict__["_dense_delta"] = probe.dense
        with torch.enable_grad():
            for i, batch in enumerate(batches):
                loss = _check_loss(loss_fn(model, batch), i)
                grads = torch.autograd.grad(loss, zs, allow_unused=True)
                for layer, g in zip(probes, grads):
                    if g is not None:
                        g = g.to(_dtype64(g.device))
                        total[layer] = g if total[layer] is None else total[layer] + g
    finally:
        for layer in probes:
            layer.__dict__.pop("_delta", None)
            layer.__dict__.pop("_dense_delta", None)
    for layer, t in total.items():
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"loss_fn: the gradient reaching {layer.layer_name} is not finite")
    return total


# ---------------------------------------------------------------------- the starts
def _gradient_svds(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: list[Any],
    layers: dict[str, RiemannianLoRALinear],
    gens: dict[str, torch.Generator],
    oversample: int,
    power_iters: int,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]], list[str]]:
    """The randomized SVD of rank 2r of each layer's ``G`` (Halko–Martinsson–Tropp with ``power_iters`` power steps;
    the paper's BackPropRSVD), every product by :func:`_pass`: ``{name: (U, σ, V, ‖G‖² estimate)}`` (``k`` columns)
    and the names of the layers the loss does not reach (``G = 0``). ``2 (power_iters + 1)`` passes.

    The energy estimate ``‖G‖² ≈ ‖Yᵀ G‖² + ‖(I − Y Yᵀ) G Ω′‖² / k`` is exact for the captured part and unbiased for the
    rest (``Ω′`` an independent Gaussian sketch of width ``k`` carried along in the first pass)."""
    width, omega = {}, {}
    for name, layer in layers.items():
        m, n = layer.out_features, layer.in_features
        k = min(2 * layer.rank + oversample, m, n)
        like = torch.empty(0, dtype=_dtype64(layer.lora_X.device), device=layer.lora_X.device)
        width[name] = k
        omega[name] = _randn(n, 2 * k, gens[name], like)  # [Ω | Ω′]
    with _probing(model, list(layers.values())):
        first = _pass(model, loss_fn, batches, {layers[n]: _Probe(layers[n], "left", omega[n]) for n in layers})
        sketch, unreached = {}, []
        for name, layer in layers.items():
            S = first[layer]
            if S is None or not bool(S[:, : width[name]].abs().amax() > 0):
                unreached.append(name)
            else:
                sketch[name] = S
        live = {n: layers[n] for n in sketch}

        def product(kind: str, F: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            """``{name: G F}`` (left) or ``{name: Gᵀ F}`` (right) for the live layers: one pass."""
            got = _pass(model, loss_fn, batches, {live[n]: _Probe(live[n], kind, F[n]) for n in live})
            return {n: got[live[n]] for n in live}

        Y = {n: torch.linalg.qr(sketch[n][:, : width[n]])[0] for n in live}
        out: dict[str, torch.Tensor] = {}
        if live:
            for _ in range(power_iters):
                P = {n: torch.linalg.qr(t)[0] for n, t in product("right", Y).items()}
                Y = {n: torch.linalg.qr(t)[0] for n, t in product("left", P).items()}
            out = product("right", Y)
    svds = {}
    for name in live:
        B = out[name]  # Gᵀ Y = (Yᵀ G)ᵀ, (in, k)
        Pb, s, Qbh = torch.linalg.svd(B, full_matrices=False)  # Yᵀ G = Qb diag(s) Pbᵀ
        k = width[name]
        S2 = sketch[name][:, k:]
        residual = S2 - Y[name] @ (Y[name].T @ S2)
        energy = float(B.square().sum() + residual.square().sum() / k)
        svds[name] = (Y[name] @ Qbh.T, s, Pb, energy)
    return svds, unreached


def _gradient_start(layer: RiemannianLoRALinear, svd: tuple, method: str, scale: float | None, g: torch.Generator):
    """Set the LOI or LoRA-GA start of one layer from its gradient's randomized SVD; its statistics."""
    U, s, V, energy = svd
    r, m, n = layer.rank, layer.out_features, layer.in_features
    j = min(2 * r, s.shape[0])  # the triplets used: 2r, fewer where 2r > min(out, in) (then completed at random)
    if method == "loi":
        alpha = -layer.init_scale if scale is None else scale
        C, Vp = alpha * U[:, :r], _complete(V[:, r:j], r, g)
    else:
        alpha = m**0.25 / math.sqrt(STABLE_GAMMA) if scale is None else scale
        s2 = torch.cat([s[r:j], s.new_zeros(r - (j - r))])
        C, Vp = alpha * _complete(U[:, r:j], r, g) * _floor(s2, float(s[0]), m, n), V[:, :r]
    layer.set_point(C, Vp)
    top = float(s[:j].square().sum())
    return {
        "captured_energy": min(1.0, top / energy) if energy > 0 else float("nan"),
        "grad_norm_sq": max(energy, top),
        "sigma_1": float(s[0]),
        "sigma_2r": float(s[j - 1]),
        "sigma_next": float(s[j]) if s.shape[0] > j else float("nan"),
        "scale": float(alpha),
        "reached": 1.0,
    }


def _pissa_start(layer: RiemannianLoRALinear, scale: float | None, oversample: int, power_iters: int, g):
    """X₀ = scale · U_r S_r V_rᵀ of the base weight (randomized SVD of W by matmuls); its statistics."""
    r, m, n = layer.rank, layer.out_features, layer.in_features
    w = layer.base_layer.weight.detach()
    W = (w.T if layer.fan_in_fan_out else w).to(_dtype64(w.device))
    k = min(r + oversample, m, n)
    Y = torch.linalg.qr(W @ _randn(n, k, g, W))[0]
    for _ in range(power_iters):
        Y = torch.linalg.qr(W @ torch.linalg.qr(W.T @ Y)[0])[0]
    Pb, s, Qbh = torch.linalg.svd(W.T @ Y, full_matrices=False)
    U, V = Y @ Qbh.T, Pb
    alpha = 1.0 if scale is None else scale
    layer.set_point(alpha * U[:, :r] * _floor(s[:r], float(s[0]), m, n), V[:, :r])
    total = float(W.square().sum())
    return {
        "captured_energy": float(s[:r].square().sum()) / total if total > 0 else float("nan"),
        "sigma_1": float(s[0]),
        "sigma_r": float(s[r - 1]),
        "scale": float(alpha),
    }


def _random_start(layer: RiemannianLoRALinear, scale: float | None, g: torch.Generator) -> dict[str, float]:
    """The converter's start ``X = α U Vᵀ`` (``U``, ``V`` Haar-random orthonormal, drawn as the converter does)."""
    r, m, n = layer.rank, layer.out_features, layer.in_features
    U = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=g, device=g.device))[0]
    V = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, generator=g, device=g.device))[0]
    alpha = layer.init_scale if scale is None else scale
    layer.set_point(alpha * U, V)
    return {"scale": float(alpha)}


# ---------------------------------------------------------------------- the entry point
def _check_args(model, loss_fn, method, scale, oversample, power_iters, generator) -> dict[str, RiemannianLoRALinear]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable loss_fn(model, batch) -> scalar tensor, got {loss_fn!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if scale is not None:
        bad = isinstance(scale, bool) or not isinstance(scale, (int, float))
        if bad or not math.isfinite(scale) or scale == 0:
            raise ValueError(f"scale must be a finite nonzero float or None, got {scale!r}")
    as_int("oversample", oversample, 0)
    as_int("power_iters", power_iters, 0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    layers = {n: m for n, m in adapter_layers(model).items() if isinstance(m, RiemannianLoRALinear)}
    if not layers:
        raise ValueError("model has no Riemannian LoRA adapters: convert it first (convert_to_riemannian_lora)")
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"{name}: the adapter is merged; unmerge it first (unmerge_adapter(model))")
    return layers


def locally_optimal_init(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    *,
    method: str = "loi",
    scale: float | None = None,
    oversample: int = 16,
    power_iters: int = 1,
    generator: torch.Generator | None = None,
) -> dict[str, dict[str, float]]:
    r"""Move every Riemannian LoRA adapter of ``model`` (after :func:`~lowrankopt.nn.convert_to_riemannian_lora` or
    :func:`~lowrankopt.nn.from_peft`), in place, to a new start ``X = X₀`` — so ``ΔW = 0`` and the model's outputs are
    the base model's exactly — chosen by ``method``:

    - ``"loi"`` (the locally optimal initialization of Bogachev et al., ICLR 2026, §5): ``X₀ = α U_{1:r}
      V_{r+1:2r}ᵀ`` with ``U, Σ, V`` the (randomized) SVD of rank 2r of ``G = ∂L/∂W``, the full-batch gradient of
      the layer's base weight summed over ``batches``. The tangent space at ``X₀`` captures the most gradient energy
      of any rank-r point: the first Riemannian gradient is ``P_T(G) = SVD_{2r}(G)`` (the module docstring).
    - ``"lora-ga"``: the LoRA-GA start as PEFT makes it by default (``LoraGAConfig(direction="ArB2r",
      scale="stable")``, ``lora_alpha = r``): ``X₀ = γ U_{r+1:2r} Σ_{r+1:2r} V_{1:r}ᵀ`` with
      ``γ = out^{1/4} / √16``. The same gradient subspaces in the mirrored pairing, so the same tangent space and first
      Riemannian gradient as LOI; the singular values of ``X₀`` are the gradient's ``σ_{r+1..2r}`` times ``γ`` (they
      scale with the loss) instead of ``|α|``.
    - ``"pissa"``: PiSSA's principal part of the frozen weight, ``X₀ = U_r S_r V_rᵀ`` (top-r singular triplets of
      ``W`` by a randomized SVD of ``W`` with sketch width ``r + oversample`` and ``power_iters`` power steps). PiSSA
      trains ``W_res + U_r S_r V_rᵀ`` with ``W_res = W − U_r S_r V_rᵀ``; here ``W`` stays and the offset subtracts
      ``X₀``: the same ``W + X − X₀``. ``batches`` and ``loss_fn`` are not used.
    - ``"random"``: the converter's random start ``X₀ = α U Vᵀ`` (``U``, ``V`` Haar-random orthonormal), re-drawn;
      with ``generator=None`` and ``scale=None`` the start :func:`~lowrankopt.nn.convert_to_riemannian_lora` drew (the
      same draw; the factors equal to rounding). ``batches`` and ``loss_fn`` are not used.

    **The sign of α.** ``X₀`` and ``−X₀`` have the same column and row spaces, hence the same tangent space and the
    same first Riemannian gradient ``P_T(G)``; to first order in the step the first update ``ΔW₁ ≈ −η P_T(G)`` is the
    same. The sign orients ``X₀`` relative to the gradient, which the retraction sees at second order: in the bases
    of ``U`` and ``V`` the two starts give steps ``D₁ ΔW₁ D₂`` and ``ΔW₁`` with ``D₁, D₂ = diag(I, −I)``, equal up to
    terms ``O(η² ‖G‖² / |α|)``. The default follows the paper's LLM setting, ``α = −0.01/√r``.

    Args:
        model: a model with Riemannian LoRA adapters (none merged).
        loss_fn: ``loss_fn(model, batch)`` → the scalar loss of one batch, from ``model(...)`` with gradients
            enabled (it must not call ``backward`` itself).
        batches: a finite iterable of batches, materialized once: every pass sees the same batches, and ``G`` is the
            gradient of the sum of their losses (its scale does not matter for ``"loi"``; it sets LoRA-GA's ``X₀``).
        method: ``"loi"``, ``"lora-ga"``, ``"pissa"`` or ``"random"``.
        scale: ``α``: ``"loi"``: ``X₀ = α U₁ V₂ᵀ``, None: ``−init_scale`` of the config (``−0.01/√r`` by default,
            the paper's); ``"lora-ga"``: ``γ``, None: ``out^{1/4}/√16``; ``"pissa"``: ``X₀ = α U_r S_r V_rᵀ``, None: 1;
            ``"random"``: the singular value, None: ``init_scale``. A finite nonzero float; its sign orients ``X₀``.
        oversample: ``p``: the sketch of the randomized SVD has ``k = 2r + p`` columns (``r + p`` for ``"pissa"``),
            at most ``min(out, in)`` (then the SVD is exact). The paper: ``p = 16``.
        power_iters: ``q``, the power steps (each two more passes over the batches). The paper: ``q = 1`` for LLMs.
        generator: the random sketches (and completions) are drawn from it, layer after layer in the model's order
            (reproducible for one generator state); None: from a generator seeded by the config's ``seed`` and the
            layer's name (for ``"random"``: the converter's own).

    Returns:
        ``{layer name: statistics}``. ``"loi"`` / ``"lora-ga"``: ``captured_energy`` ``≈ ‖P_T G‖² / ‖G‖²``
        (``Σ_{i≤2r} σ̂_i²`` over an estimate of ``‖G‖²``: exact on the sketched subspace plus an unbiased estimate of
        the rest, from an independent sketch), ``grad_norm_sq``, ``sigma_1``, ``sigma_2r``, ``sigma_next``
        (``σ̂_{2r+1}``: the theorem needs ``σ_{2r} > σ_{2r+1}``; nan without oversampling), ``scale``, ``reached``
        (1; 0 for a layer the loss does not reach — its gradient is 0 — which gets the ``"random"`` start instead,
        with a ``UserWarning`` naming it). ``"pissa"``: ``captured_energy`` ``Σ_{i≤r} σ_i² / ‖W‖²``, ``sigma_1``,
        ``sigma_r``, ``scale``. ``"random"``: ``scale``.

    The passes run in eval mode (no dropout, so every pass sees one ``G``, and no running statistics change) with
    every adapter enabled but computing its zero probe in place of ``ΔW``, so ``G`` is the gradient at the base
    weights even if the adapters were trained (that update is discarded). Afterwards each module's training flag,
    every parameter, buffer and ``.grad`` outside the adapters are as they were. An optimizer's state for the
    adapters refers to the old points: build the optimizer after.

    Raises (the model unchanged): ``TypeError`` for a ``model`` that is not a module, a ``loss_fn`` that is not
    callable or returns a non-tensor, a ``generator`` that is not one; ``ValueError`` for no Riemannian LoRA adapter
    in ``model``, a merged adapter, an unknown ``method``, a zero or non-finite ``scale``, a negative ``oversample``
    or ``power_iters``, empty ``batches`` (gradient methods), and a ``loss_fn`` loss that is not a floating scalar,
    is not finite or does not depend on the adapted layers — naming the argument. An exception of ``loss_fn`` itself
    propagates, with the model as it was.

    Cost: ``"loi"`` / ``"lora-ga"``: ``2 (q + 1)`` forward and backward passes over the batches (the paper's 4 with
    ``q = 1``), each adding ``O(B (out + in) k)`` per adapted layer and batch of ``B`` rows to the model's own, and
    ``O((out + in) k²)`` of QRs and small SVDs per layer and pass; extra memory ``O((out + in) k)`` per layer; no
    dense ``out × in`` tensor is formed (except for a layer whose ``weight`` is read instead of called, e.g.
    ``nn.MultiheadAttention.out_proj``, where the probe joins the dense weight that code forms anyway). ``"pissa"``:
    ``O(out · in · k (q + 1))`` per layer (a float64 copy of ``W`` at a time). ``"random"``: ``O((out + in) r²)``.
    """
    layers = _check_args(model, loss_fn, method, scale, oversample, power_iters, generator)
    if method in GRADIENT_METHODS:
        try:
            batches = list(batches)
        except TypeError:
            raise TypeError(f"batches must be an iterable of batches, got {type(batches).__name__}") from None
        if not batches:
            raise ValueError(f"batches is empty: method={method!r} needs at least one batch to compute the gradient")

    def gen(name: str, layer: RiemannianLoRALinear, what: str) -> torch.Generator:
        if generator is not None:
            return generator
        return layer_generator(layer.seed, layer.layer_name if what == "random" else f"{layer.layer_name}#{what}")

    stats: dict[str, dict[str, float]] = {}
    if method == "random":
        for name, layer in layers.items():
            stats[name] = _random_start(layer, scale, gen(name, layer, "random"))
    elif method == "pissa":
        for name, layer in layers.items():
            stats[name] = _pissa_start(layer, scale, oversample, power_iters, gen(name, layer, method))
    else:
        gens = {name: gen(name, layer, method) for name, layer in layers.items()}
        svds, unreached = _gradient_svds(model, loss_fn, batches, layers, gens, oversample, power_iters)
        for name, layer in layers.items():  # every product is in: only now is anything changed
            if name in svds:
                stats[name] = _gradient_start(layer, svds[name], method, scale, gens[name])
            else:
                stats[name] = {**_random_start(layer, None, gen(name, layer, "random")), "reached": 0.0}
        if unreached:
            warnings.warn(
                f"locally_optimal_init: the loss does not reach {unreached} (their gradient is 0): they got the random "
                "start; exclude them from target_modules if they are not used",
                UserWarning,
                stacklevel=2,
            )
    return stats
