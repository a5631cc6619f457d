"""The Riemannian LoRA adapter layer (:mod:`.lora`): ``y = base(x) + (X − X₀) x`` with ``X`` a point of the fixed-rank
manifold and ``X₀`` its frozen copy at creation, its merge into the base weight and back (float64, checked, all layers
or none), and its merge state in the ``state_dict``. Forward ``O(B (out + in) r)``; a merge ``O(out · in · r)``."""

from __future__ import annotations

import hashlib

import torch

from ...formats.lowrank import LowRankMatrix
from ...manifolds.base import qr_positive
from ...manifolds.geoopt import GeooptFixedRank, manifold_parameter
from ...manifolds.step_guard import MERGED
from .._common import HALF_OR_FULL, _check_input
from ..adapters.layer import AdapterLayer, merge_all
from ..surgery import is_linear
from .lora_config import RiemannianLoRAConfig
from .lora_product import delta_product

__all__ = ["RiemannianLoRALinear"]

PREFIX = "lora_"  # the names of the adapter's own parameter and buffers (what training changes)


def _merge_dtype(device: torch.device) -> torch.dtype:
    """Merging and unmerging compute in float64 (where the device has it) and round once, at the end."""
    return torch.float32 if device.type == "mps" else torch.float64


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by ``(seed, name)``: each layer's random start is reproducible and independent of the
    order in which the layers are built."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


class RiemannianLoRALinear(AdapterLayer):
    """A frozen linear layer with a Riemannian LoRA adapter: ``y = base(x) + (X − X₀) x`` (the math:
    :mod:`lowrankopt.nn.manifold.lora`).

    Args:
        base_layer: an ``nn.Linear`` or a GPT-2-style ``Conv1D`` (weight stored ``(in, out)``, ``y = x W + b``), with
            a float16 / bfloat16 / float32 / float64 weight (and bias of the same dtype and device); it is kept as
            ``base_layer`` and never modified but by :meth:`merge`.
        config: the :class:`RiemannianLoRAConfig` (rank ``r``, ``init_scale``, ``compute_dtype``, ``seed``).
        name: the layer's qualified name (error messages, the seed of its random start).

    The state: ``lora_X`` (the packed point ``[C | V]``, ``(out + in) r`` entries, in the compute dtype), ``lora_C0``
    ``(out, r)`` and ``lora_V0`` ``(in, r)`` (the offset ``X₀``; ``(out, 0)`` / ``(in, 0)`` for no offset, e.g. a
    layer converted from a trained PEFT LoRA), ``merged_flag`` and the record ``merged_left``, ``merged_right``.
    ``weight`` reads as the adapted dense weight (``O(out · in · r)``, for code that reads it directly, e.g.
    ``nn.MultiheadAttention``'s ``out_proj``).

    Raises ``TypeError`` for a base layer that is not linear or a weight dtype that is not floating, ``ValueError``
    for ``r > min(out, in)`` or a bias on another device or dtype than the weight — naming the argument; nothing is
    built then.
    """

    adapter_prefix = PREFIX

    def __init__(self, base_layer: torch.nn.Module, config: RiemannianLoRAConfig, name: str = "") -> None:
        if not isinstance(config, RiemannianLoRAConfig):
            raise TypeError(f"config must be a RiemannianLoRAConfig, got {type(config).__name__}")
        w = self._check_base(base_layer, name or "layer")
        super().__init__(base_layer, name, fan_in_fan_out=not isinstance(base_layer, torch.nn.Linear))
        m, n = (w.shape[1], w.shape[0]) if self.fan_in_fan_out else tuple(w.shape)
        if config.r > min(m, n):
            raise ValueError(
                f"{self.layer_name}: r={config.r} is larger than min(out_features, in_features) = {min(m, n)} of this "
                f"{type(base_layer).__name__} ({n} -> {m}): choose r <= {min(m, n)} or exclude the layer"
            )
        self.in_features, self.out_features, self.rank = n, m, config.r
        self.init_scale, self.seed = config.scale, config.seed  # the random start's, for re-drawing it later
        dtype = config.dtype_for(w.dtype)
        g = layer_generator(config.seed, self.layer_name)
        U = torch.linalg.qr(torch.randn(m, config.r, dtype=torch.float64, generator=g))[0]
        V = torch.linalg.qr(torch.randn(n, config.r, dtype=torch.float64, generator=g))[0]
        S = config.scale * torch.eye(config.r, dtype=torch.float64)
        manifold = GeooptFixedRank(m, n, config.r)
        packed = manifold.pack(LowRankMatrix._trusted(U, S, V)).to(dtype=dtype, device=w.device)
        self.lora_X = manifold_parameter(packed, manifold, f"{self.layer_name}.lora_X (RiemannianLoRALinear)")
        C, V = manifold.unpack_tensor(packed)
        self._set_offset(C.clone(), V.clone())  # X₀ = X, bit for bit: ΔW = 0 exactly

    @staticmethod
    def _check_base(base_layer: object, name: str) -> torch.Tensor:
        """The base layer's weight, after checking what the adapter needs of the base layer (errors name it)."""
        if not isinstance(base_layer, torch.nn.Module) or not is_linear(base_layer):
            raise TypeError(
                f"{name}: base_layer must be an nn.Linear or a GPT-2-style Conv1D (2-D weight stored (in, out)), got "
                f"{type(base_layer).__name__}"
            )
        w = base_layer.weight
        if w.dtype not in HALF_OR_FULL:
            raise TypeError(
                f"{name}: base_layer.weight has dtype {w.dtype}; Riemannian LoRA adapts float16, bfloat16, float32 "
                "or float64 weights (dequantize the layer first)"
            )
        if w.device.type == "meta":
            raise ValueError(f"{name}: base_layer.weight is on the meta device (no values); materialize it first")
        b = getattr(base_layer, "bias", None)
        if isinstance(b, torch.Tensor) and (b.device != w.device or b.dtype != w.dtype):
            raise ValueError(
                f"{name}: base_layer.bias is {b.dtype} on {b.device} but base_layer.weight is {w.dtype} on "
                f"{w.device}: move the layer to one device and dtype first"
            )
        return w

    # ------------------------------------------------------------------ state
    @property
    def manifold(self) -> GeooptFixedRank:
        """The packed fixed-rank manifold ``lora_X`` lives on."""
        return self.lora_X.manifold

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the adapter's parameter and math (float32 or float64)."""
        return self.lora_X.dtype

    @property
    def has_offset(self) -> bool:
        """Whether ``ΔW = X − X₀`` (False: ``ΔW = X``, no offset stored)."""
        return self.lora_C0.shape[1] > 0

    def _set_offset(self, C0: torch.Tensor, V0: torch.Tensor) -> None:
        """(Re)register the offset ``X₀ = C₀ V₀ᵀ`` (``r`` columns, or 0 for none) and the merge record of the matching
        width ``r + r₀``."""
        r0 = C0.shape[1]
        if r0 not in (0, self.rank) or V0.shape[1] != r0:
            raise ValueError(f"{self.layer_name}: the offset must have 0 or r={self.rank} columns, got {r0}")
        kw = dict(dtype=self.lora_X.dtype, device=self.lora_X.device)
        self.register_buffer("lora_C0", C0.to(**kw))
        self.register_buffer("lora_V0", V0.to(**kw))
        self.register_buffer("merged_left", torch.zeros(self.out_features, self.rank + r0, **kw))
        self.register_buffer("merged_right", torch.zeros(self.in_features, self.rank + r0, **kw))

    def _factors(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ΔW = L Rᵀ`` at the packed point ``p``: ``L = [C − C₀ | C₀]``, ``R = [V | V − V₀]`` (``(C, V)`` without an
        offset). ``O((out + in) r)``."""
        C, V = self.manifold.unpack_tensor(p)
        if not self.has_offset:
            return C, V
        C0, V0 = self.lora_C0, self.lora_V0
        return torch.cat([C - C0, C0], 1), torch.cat([V, V - V0], 1)

    def delta_weight(self) -> LowRankMatrix:
        """``ΔW = X − X₀`` ``(out, in)`` as a LowRankMatrix of rank ``≤ 2r`` (``r`` without an offset), detached
        copies in the compute dtype, never dense. Cost ``O((out + in) r + r²)``."""
        L, R = self._factors(self.lora_X.detach())
        return LowRankMatrix._trusted(L.clone(), torch.eye(L.shape[1], dtype=L.dtype, device=L.device), R.clone())

    def point(self) -> LowRankMatrix:
        """``X``, the manifold point (a detached copy whose frames are the packed factors)."""
        return self.manifold.unpack(self.lora_X, f"{self.layer_name}.lora_X")

    @torch.no_grad()
    def set_point(self, C: torch.Tensor, V: torch.Tensor, *, offset: bool = True) -> None:
        """Move the adapter to the point ``X = C Vᵀ`` (``C: (out, r)``, ``V: (in, r)``, any factors of a rank-r
        product: they are brought to the packed form, ``V`` orthonormal, in float64 and rounded once to the compute
        dtype). ``offset=True``: also ``X₀ := X`` bit for bit, so ``ΔW = 0`` and the layer computes its base layer's
        outputs exactly (a new start, as at creation); ``offset=False``: no offset, ``ΔW = X``.

        Raises ``ValueError`` (nothing changed) for a merged adapter, factors of the wrong shape, non-finite entries
        or a product of rank below r. An optimizer's state for ``lora_X`` (momentum) refers to the old point: build
        the optimizer after. Cost ``O((out + in) r²)``.
        """
        if self.merged:
            raise ValueError(f"{self.layer_name}: the adapter is merged; unmerge it before setting its point")
        m, n, r = self.out_features, self.in_features, self.rank
        for name, t, rows in (("C", C, m), ("V", V, n)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (rows, r):
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{self.layer_name}: {name} must be a tensor of shape ({rows}, {r}), got {got}")
            if not torch.isfinite(t).all():
                raise ValueError(f"{self.layer_name}: {name} has non-finite entries")
        dtype = _merge_dtype(self.lora_X.device)
        C, V = C.to(device=self.lora_X.device, dtype=dtype), V.to(device=self.lora_X.device, dtype=dtype)
        s = torch.linalg.svdvals(torch.linalg.qr(C)[1] @ torch.linalg.qr(V)[1].T)
        if not bool(s[-1] > s[0] * max(m, n) * torch.finfo(dtype).eps):
            raise ValueError(f"{self.layer_name}: C Vᵀ has rank below r={r} (singular values {s.tolist()})")
        eye = torch.eye(r, dtype=dtype, device=C.device)
        packed = self.manifold.pack(LowRankMatrix._trusted(C, eye, V)).to(self.compute_dtype)
        self.lora_X.copy_(packed)
        if offset:
            C, V = self.manifold.unpack_tensor(self.lora_X.detach())
            self._set_offset(C.clone(), V.clone())  # X₀ = X, bit for bit: ΔW = 0 exactly
        else:
            self._set_offset(torch.zeros(m, 0), torch.zeros(n, 0))

    def adapter_state_keys(self) -> list[str]:
        """``lora_X`` and the offset ``lora_C0``, ``lora_V0`` (what :func:`~lowrankopt.nn.adapter_state_dict`
        saves)."""
        return ["lora_X", "lora_C0", "lora_V0"]

    def _loadable(self, key: str, value: torch.Tensor) -> bool:
        """The offset loads with ``r`` columns or none (a layer with an offset takes one without, and back)."""
        if key in ("lora_C0", "lora_V0"):
            rows = self.out_features if key == "lora_C0" else self.in_features
            return value.dim() == 2 and value.shape[0] == rows and value.shape[1] in (0, self.rank)
        return super()._loadable(key, value)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.rank}, "
            f"offset={self.has_offset}, compute_dtype={self.compute_dtype}"
        )

    # ------------------------------------------------------------------ forward
    def _check_adapter(self) -> None:
        """What a forward needs (``O(1)``): the adapter in float32/float64 on the base weight's device."""
        p, w = self.lora_X, self.base_layer.weight
        if p.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"{self.layer_name}: lora_X has dtype {p.dtype}; the adapter computes in float32 or float64 (its "
                "manifold point needs QR and SVD): cast the base layer alone (layer.base_layer.to(...)), or cast the "
                "model before converting it"
            )
        if p.device != w.device:
            raise RuntimeError(
                f"{self.layer_name}: base_layer.weight is on {w.device} but the adapter (lora_X) is on {p.device}: "
                "move the whole layer (layer.to(device)), not its base layer alone"
            )

    def _delta(self, x2: torch.Tensor) -> torch.Tensor:
        """``ΔW x`` for the rows of ``x2: (B, in)`` in the compute dtype; when a gradient is needed, through
        :func:`~.lora_product.delta_product`, so that ``lora_X.grad = [G V | Gᵀ U]`` (δ-coordinates) without forming
        ``G``. Cost ``O(B (out + in) r)`` (+ ``O(out r²)`` in the backward)."""
        p = self.lora_X
        L, R = self._factors(p.detach())
        if torch.is_grad_enabled() and p.requires_grad:
            C = self.manifold.unpack_tensor(p.detach())[0]
            return delta_product(x2, p, L, R, C, self.manifold.pack_point)
        return (x2 @ R) @ L.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (..., in)`` -> ``(..., out)``: ``base(x) + ΔW x``, the adapter in the compute dtype (outside autocast)
        and its output added to the base output in the compute dtype, rounded once to the base output's dtype. A
        merged or disabled adapter: ``base(x)``."""
        self._check_not_disabled_while_merged()
        if self.disabled or self.merged:
            return self.base_layer(x)
        x2 = _check_input(x, self.in_features, self.base_layer.weight)
        self._check_adapter()
        y = self.base_layer(x)
        dtype = self.compute_dtype
        with torch.autocast(x.device.type, enabled=False):
            d = self._delta(x2.to(dtype)).reshape(*x.shape[:-1], self.out_features)
            return y + d if y.dtype == dtype else (y.to(dtype) + d).to(y.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The weight in effect, in the base layer's layout and dtype: ``W + ΔW`` formed densely (``O(out · in · r)``,
        differentiable in ``lora_X`` through the straight-through form), or the base layer's weight when merged or
        disabled. For code that reads ``.weight`` instead of calling the layer. Read-only."""
        self._check_not_disabled_while_merged()
        w = self.base_layer.weight
        if self.merged or self.disabled:
            return w
        self._check_adapter()
        dtype = self.compute_dtype
        with torch.autocast(w.device.type, enabled=False):
            W = (self._weight().to(dtype) + self._dense_delta()).to(w.dtype)
        return W.T if self.fan_in_fan_out else W

    def _dense_delta(self) -> torch.Tensor:
        """``ΔW = L Rᵀ`` ``(out, in)``, with the straight-through terms ``z_C Vᵀ + U z_Vᵀ`` when a gradient is needed.
        Cost ``O(out · in · r)``."""
        p = self.lora_X
        pd = p.detach()
        L, R = self._factors(pd)
        D = L @ R.T
        if torch.is_grad_enabled() and p.requires_grad:
            C, V = self.manifold.unpack_tensor(pd)
            zC, zV = self.manifold.unpack_tensor(p - pd)
            D = D + zC @ V.T + qr_positive(C)[0] @ zV.T
        return D

    # ------------------------------------------------------------------ merging (the AdapterLayer protocol)
    def _set_merged(self, merged: bool) -> None:
        super()._set_merged(merged)
        setattr(self.lora_X.manifold, MERGED, self.layer_name if merged else None)  # read by the step guard

    def _adapter_keys(self) -> list[str]:
        return ["left", "right"]

    @torch.no_grad()
    def _merge_record(self) -> dict[str, torch.Tensor]:
        L, R = self._factors(self.lora_X.detach())
        return {"left": L.clone(), "right": R.clone()}

    @torch.no_grad()
    def _surely_finite(self, merge: bool) -> bool:
        """Whether ``W ± L Rᵀ`` is proven finite without forming it: every entry is at most
        ``‖W‖_F + ‖L‖_F ‖R‖_F``, and below half the largest float of the weight's dtype no rounding reaches infinity.
        False (not proven) also for non-finite values. Cost ``O(out · in + (out + in) r)``."""
        a = self._merge_record() if merge else self._recorded()
        W = self._weight()
        dtype = _merge_dtype(W.device)
        norms = [torch.linalg.vector_norm(t, dtype=dtype) for t in (W, a["left"], a["right"])]
        bound = norms[0] + norms[1] * norms[2]
        return bool(bound < min(torch.finfo(W.dtype).max, torch.finfo(dtype).max) / 2)

    @torch.no_grad()
    def _with_delta(self, a: dict[str, torch.Tensor], sign: float) -> torch.Tensor:
        """``W + sign · L Rᵀ`` ``(out, in)`` in float64 outside autocast, rounded once to the weight's dtype; refused
        (``ValueError``) if not finite. Cost ``O(out · in · r)``."""
        W = self._weight()
        dtype = _merge_dtype(W.device)
        with torch.autocast(W.device.type, enabled=False):
            L, R = a["left"].to(dtype), a["right"].to(dtype)
            out = torch.addmm(W.to(dtype), L, R.T, alpha=sign).to(W.dtype)
        if not torch.isfinite(out).all():
            what = "merging would write" if sign > 0 else "unmerging produced"
            raise ValueError(
                f"{self.layer_name}: {what} non-finite values into the weight; nothing was {'un' * (sign < 0)}merged"
            )
        return out

    def _merge_result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a = self._merge_record()
        return self._with_delta(a, 1.0), a

    def _unmerge_result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._with_delta(self._recorded(), -1.0), {}

    def merge(self) -> None:
        """Fold ``ΔW`` into the base weight (``W + L Rᵀ`` in float64, rounded once) and record ``L``, ``R``. Cost
        ``O(out · in · r)``. Raises ``ValueError`` (nothing changed) if the result would not be finite. A tied base
        weight is refused by :func:`~lowrankopt.nn.merge_adapter` (this method does not see the model)."""
        merge_all([self], merge=True)

    def unmerge(self) -> None:
        """Restore the base weight, ``W′ − L Rᵀ`` with the recorded factors, to rounding (exactly what was added,
        whatever the adapter became since). Cost ``O(out · in · r)``."""
        merge_all([self], merge=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # a state dict with or without an offset loads into a layer with or without one: resize the buffers first
        C0 = state_dict.get(prefix + "lora_C0")
        if isinstance(C0, torch.Tensor) and C0.dim() == 2 and C0.shape[1] != self.lora_C0.shape[1]:
            if C0.shape[1] in (0, self.rank):
                empty = torch.zeros(self.in_features, C0.shape[1], dtype=self.compute_dtype)
                self._set_offset(torch.zeros(self.out_features, C0.shape[1], dtype=self.compute_dtype), empty)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
