"""The GSOFT adapter layer (:mod:`.gsoft`): a frozen linear layer ``y = s ⊙ (Q_out W Q_in x) + b`` with GS orthogonal
rotations, its merge into the base weight and back (in float64, checked, all layers or none), and its merge state in
the ``state_dict``. Cost per vector ``O(n_in b)`` (+ ``O(n_out b)`` double) on top of the frozen ``W x``; a merge or
unmerge ``O(n_out n_in b)``."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .._common import _check_input, _full_precision
from ..adapters.layer import AdapterLayer, merge_all
from .gs import GSMatrix, GSOrthogonal, gs_apply
from .gsoft_config import GSOFTConfig

__all__ = ["GSOFTLinear"]

PREFIX = "gsoft_"  # the names of the adapter's parameters (what training changes)


def _q_form(q: GSOrthogonal, L: torch.Tensor, R: torch.Tensor) -> GSMatrix:
    """``Pᵀ L P R`` with ``q``'s shuffle P: Q itself (``q``'s blocks) or ``Q⁻ᵀ`` (blocks ``L⁻ᵀ, R⁻ᵀ``)."""
    return GSMatrix([R, L], [None, q.perm, q.inverse_perm])


def _reversed_form(q: GSOrthogonal, L: torch.Tensor, R: torch.Tensor) -> GSMatrix:
    """``R Pᵀ L P`` with ``q``'s shuffle P: ``Qᵀ`` (blocks ``Lᵀ, Rᵀ``) or ``Q⁻¹`` (blocks ``L⁻¹, R⁻¹``)."""
    return GSMatrix([L, R], [q.perm, q.inverse_perm, None])


def rotate_weight_cost(
    tokens: int, n_in: int, n_out: int, b_in: int, b_out: int | None, *, training: bool, input_grad: bool
) -> tuple[int, int]:
    """Multiply-adds of one GSOFT layer call — rotating the activations vs rotating the weight — for ``tokens``
    input vectors, a weight ``(n_out, n_in)`` and block sizes ``b_in`` (``b_out``: double GSOFT, else None).

    A rotation of a vector of size n costs ``2 n b`` (two block-diagonal factors); the frozen product
    ``tokens · n_out · n_in``. Activations: ``Q_in x`` (and ``Q_out y``) per token; weight: ``Q_out W Q_in`` once,
    ``n_out`` rows (``n_in`` columns) of rotations. Training (``training``: grad mode on and the adapter trainable)
    adds the backward: with rotated activations the frozen product's input gradient is always needed (it reaches
    ``Q_in``), each rotation's block gradient costs its forward again and its input gradient too where needed;
    with a rotated weight the rotated weight's gradient (``tokens · n_out · n_in`` more) replaces the rotations'
    per-token backward, and the input gradient of the product is needed only with ``input_grad``. So in training the
    weight wins only for tiny layers (about ``n_out < 6 b``); without gradients it wins when ``n_out < tokens``."""
    mn = n_out * n_in
    act = tokens * mn + 2 * tokens * n_in * b_in + (2 * tokens * n_out * b_out if b_out else 0)
    wt = tokens * mn + 2 * mn * b_in + (2 * mn * b_out if b_out else 0)
    if training:
        act += tokens * mn + 2 * tokens * n_in * b_in * (2 if input_grad else 1)
        act += 4 * tokens * n_out * b_out if b_out else 0  # block gradient and input gradient of Q_out
        wt += tokens * mn * (2 if input_grad else 1) + 2 * mn * b_in + (4 * mn * b_out if b_out else 0)
    return act, wt


def _keep_current(module: torch.nn.Module, state_dict: dict, prefix: str) -> None:
    """Replace the entries of ``module`` (under ``prefix``) in the state dict being loaded by their current values:
    after a refused check, its submodules — which torch loads after it, from the same (copied) state dict — then
    load nothing new, and report no missing key for the refusal."""
    current = module.state_dict(prefix=prefix)
    for key in list(state_dict):
        if key in current:
            state_dict[key] = current[key]


def _compute_dtype(device: torch.device) -> torch.dtype:
    """Merging and unmerging compute in float64 (where the device has it) and round once, at the end: the round
    trip then restores a float32 weight to about one rounding (computing in float32 costs a few)."""
    return torch.float32 if device.type == "mps" else torch.float64


class GSOFTLinear(AdapterLayer):
    """A frozen linear layer with a GSOFT adapter (see :mod:`lowrankopt.nn.orthogonal.gsoft`). ``base_layer`` keeps the
    original module; :meth:`merge` folds the adapter into its weight, :meth:`unmerge` takes it out again.

    ``weight`` and ``bias`` read like those of the base layer, for code that reads them directly instead of
    calling the layer (``nn.MultiheadAttention`` reads ``out_proj.weight``; torch's transformer fast path
    reads ``linear1.weight``): ``weight`` is the adapted weight ``diag(s) Q_out W Q_in`` in the base layer's
    layout, differentiable in the adapter (cost ``O(n_out n_in b)`` per read).

    The merge state is part of the ``state_dict``: ``merged_flag`` (a 0-dim bool, whether
    ``base_layer.weight`` holds the adapted weight) and ``merged_*``, the exact orthogonal blocks and scale
    that were folded in (``2 n b`` entries per rotation + ``n_out``). A checkpoint saved merged loads merged,
    one saved unmerged loads unmerged, whatever state the receiving model was in. :meth:`unmerge` undoes the
    recorded blocks, so the adapter may change while merged (an optimizer step, loaded adapter weights) without
    corrupting the base weight; the changed adapter takes effect when unmerged. (The merge state, the state-dict
    checks and the all-or-none merge are :class:`~lowrankopt.nn.adapters.AdapterLayer`'s.)

    The permutation of each rotation (``shuffle``) is recorded too, as the rotation's ``gsoft_in._extra_state``
    (:meth:`GSOrthogonal.get_extra_state`), and checked on load — for the rotation's parameters and for the merge
    record, whose blocks are undone with the layer's permutation: a state dict saved with another permutation, or
    without a record (lowrankopt before issue 23, now ``shuffle="legacy"``) into a layer with another permutation, is
    an error of ``load_state_dict`` (also with ``strict=False``) naming the ``shuffle`` to build with, and nothing of
    the layer is loaded.
    """

    adapter_prefix = PREFIX

    def __init__(self, base_layer: torch.nn.Module, config: GSOFTConfig, name: str = "") -> None:
        w = base_layer.weight
        # nn.Linear stores (out, in) whatever the config says (PEFT also ignores fan_in_fan_out for it)
        super().__init__(
            base_layer, name, fan_in_fan_out=config.fan_in_fan_out and not isinstance(base_layer, torch.nn.Linear)
        )
        out_f, in_f = (w.shape[1], w.shape[0]) if self.fan_in_fan_out else tuple(w.shape)
        kw = dict(
            map=config.map, neumann_terms=config.neumann_terms, shuffle=config.shuffle, dtype=w.dtype, device=w.device
        )
        self.gsoft_in = GSOrthogonal(in_f, config.block_for(in_f, self.layer_name), **kw)
        self.gsoft_out = GSOrthogonal(out_f, config.block_for(out_f, self.layer_name), **kw) if config.double else None
        self.gsoft_scale = (
            torch.nn.Parameter(torch.ones(out_f, dtype=w.dtype, device=w.device)) if config.scale else None
        )
        for side, q in self._rotations():
            blocks = torch.eye(q.block_size, dtype=w.dtype, device=w.device).expand(q.nblocks, -1, -1)
            self.register_buffer(f"merged_{side}_L", blocks.clone())
            self.register_buffer(f"merged_{side}_R", blocks.clone())
        if self.gsoft_scale is not None:
            self.register_buffer("merged_scale", torch.ones(out_f, dtype=w.dtype, device=w.device))

    @property
    def weight(self) -> torch.Tensor:
        """The weight in effect, in the base layer's layout: the adapted ``diag(s) Q_out W Q_in``, differentiable
        in the adapter (cost ``O(n_out n_in b)``), or the base layer's weight when merged or disabled. Read-only."""
        self._check_not_disabled_while_merged()
        if self.merged or self.disabled:
            return self.base_layer.weight
        W = self._adapt(self._weight(), self._adapter())
        return W.T if self.fan_in_fan_out else W

    def parameter_counts(self) -> dict[str, int]:
        """The adapter's trainable parameters, ``{"stored": …, "paper": …}``: as stored here (packed skew,
        ``n (b − 1)`` per rotation) and as the paper's tables count them (``2 n b`` per rotation), each plus the
        scale's ``n_out`` (:meth:`GSOrthogonal.parameter_counts`)."""
        counts = {"stored": 0, "paper": 0}
        for _, q in self._rotations():
            for key, value in GSOrthogonal.parameter_counts(q.n, q.block_size).items():
                counts[key] += value
        scale = 0 if self.gsoft_scale is None else self.gsoft_scale.numel()
        return {key: value + scale for key, value in counts.items()}

    def adapter_state_keys(self) -> list[str]:
        """The adapter's parameters (``gsoft_in.L``, ``gsoft_in.R``, …, ``gsoft_scale``) and its rotations' records of
        their permutation (``gsoft_in._extra_state``, …): what :func:`~lowrankopt.nn.adapter_state_dict` saves."""
        return super().adapter_state_keys() + [f"gsoft_{side}._extra_state" for side, _ in self._rotations()]

    def _loadable(self, key: str, value: torch.Tensor) -> bool:
        """A rotation's permutation record loads only if it is the rotation's permutation: ``ValueError`` naming the
        ``shuffle`` to build with otherwise (raised before anything is loaded)."""
        for side, q in self._rotations():
            if key == f"gsoft_{side}._extra_state":
                error = q._permutation_mismatch(value, f"GSOrthogonal {self.layer_name}.gsoft_{side}")
                if error is not None:
                    raise ValueError(error)
                return True
        return super()._loadable(key, value)

    def _fill_absent_records(self, state_dict: dict[str, torch.Tensor], name: str) -> None:
        """For an adapter file (keys ``{name}.gsoft_in.L``, …) that holds a rotation's entries without its permutation
        record — saved by lowrankopt before issue 23, so with the legacy permutation —: ``ValueError`` naming
        ``shuffle="legacy"`` unless the rotation's permutation is that one, else the record is added to
        ``state_dict`` (in place) so that the file loads as a current one. Rotations with a record, or with no entry,
        are left alone (checked, or reported missing, when loaded)."""
        for side, q in self._rotations():
            prefix = f"{name}.gsoft_{side}." if name else f"gsoft_{side}."
            key = f"{prefix}_extra_state"
            if key in state_dict or not any(k.startswith(prefix) for k in state_dict):
                continue
            error = q._permutation_mismatch(None, f"GSOrthogonal {prefix[:-1]}")
            if error is not None:
                raise ValueError(error)
            state_dict[key] = q.get_extra_state()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """:class:`~lowrankopt.nn.adapters.AdapterLayer`'s loading, after a check of the permutations: where the
        state dict holds a rotation's parameters or its merge record (``merged_in_L``, …), the saved permutation
        (the rotation's ``_extra_state``; none: lowrankopt before issue 23, ``"legacy"``) must be the rotation's. A
        mismatch is an error of ``load_state_dict`` (also with ``strict=False``); nothing of this layer (its base layer
        included) is loaded then: unmerging an old merged record with another permutation would corrupt the base
        weight."""
        errors = []
        for side, q in self._rotations():
            sub = f"{prefix}gsoft_{side}."
            if any(k.startswith(sub) or k.startswith(f"{prefix}merged_{side}_") for k in state_dict):
                error = q._permutation_mismatch(state_dict.get(f"{sub}_extra_state"), f"GSOrthogonal {sub[:-1]}")
                if error is not None:
                    errors.append(error)
        if errors:
            error_msgs.extend(e for e in errors if e not in error_msgs)
            _keep_current(self, state_dict, prefix)  # the submodules (base layer, rotations) load what they hold
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @torch.no_grad()
    def load_reference(self, state: dict[str, torch.Tensor]) -> None:
        """Load a GSOFT layer of the authors' code (gsoft_demo, ``glue/models/layers/gsoft.py``, ``GSOFTLayer``:
        ``y = s ⊙ (W · GS(x)) + b``) from its ``state_dict``: ``gs_ort.gsoft_L``, ``gs_ort.gsoft_R`` (full
        ``(nblocks, b, b)`` generators, see :meth:`GSOrthogonal.load_reference`) and ``gsoft_s`` (the scale; its
        ``pre_layer.*`` entries, the frozen base layer, are not read). The diffusion code's layout is accepted too:
        ``ort_gs.L``, ``ort_gs.R`` (its scale lives in the attention processor, as ``q_scale`` etc.: pass it as
        ``gsoft_s``). One-sided layers only (the reference's double GSOFT is two such layers around the weight: load
        the output side with ``layer.gsoft_out.load_reference``). Needs ``shuffle="paper"`` and ``map="cayley"`` or
        ``"exp"``; raises ``ValueError`` on missing or extra adapter keys, mismatched shapes or non-finite (NaN / Inf)
        entries, naming the entry; everything is checked before anything is written (nothing loaded then)."""
        layouts = (("gs_ort.gsoft_L", "gs_ort.gsoft_R"), ("ort_gs.L", "ort_gs.R"))
        found = [pair for pair in layouts if pair[0] in state and pair[1] in state]
        if len(found) != 1:
            raise ValueError(f"state must hold exactly one of the reference layouts {layouts}, got {sorted(state)}")
        known = set(found[0]) | {"gsoft_s"}
        extra = [key for key in state if key not in known and not key.startswith("pre_layer.")]
        if extra:
            raise ValueError(f"unexpected keys in the reference state: {extra}")
        scale = state.get("gsoft_s")
        if (scale is None) != (self.gsoft_scale is None):
            raise ValueError("the reference state has a scale 'gsoft_s' iff the layer has one (config.scale)")
        if scale is not None:
            if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != tuple(self.gsoft_scale.shape):
                got = tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
                raise ValueError(f"gsoft_s must be a tensor of shape {tuple(self.gsoft_scale.shape)}, got {got}")
            if not scale.is_floating_point():
                raise ValueError(f"gsoft_s must be a real floating tensor, got dtype {scale.dtype}")
            scale = scale.to(self.gsoft_scale)
            if not torch.isfinite(scale).all():
                raise ValueError(
                    f"gsoft_s has non-finite entries (NaN or Inf, or beyond the range of {self.gsoft_scale.dtype})"
                )
        if self.merged:
            raise ValueError(f"{self.layer_name}: unmerge before loading reference parameters")
        L, R = (state[key] for key in found[0])
        self.gsoft_in.load_reference(L, R)  # checks L and R fully (and the shuffle, the map) before writing them
        if scale is not None:
            self.gsoft_scale.copy_(scale)

    def _rotations(self) -> Iterator[tuple[str, GSOrthogonal]]:
        yield "in", self.gsoft_in
        if self.gsoft_out is not None:
            yield "out", self.gsoft_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_not_disabled_while_merged()
        if self.disabled or self.merged:
            return self.base_layer(x)
        W = self._weight()
        q_in, q_out = self.gsoft_in, self.gsoft_out
        _check_input(x, q_in.n, q_in.L)
        if self._rotate_weight(x, W):  # W ← Q_out W Q_in (rows: w_iᵀ Q_in = (Q_inᵀ w_i)ᵀ; columns: Q_out w_j)
            with _full_precision(x):
                W = gs_apply(W, *q_in.blocks(), transpose=True, shuffle=q_in._shuffle())
                if q_out is not None:
                    W = gs_apply(W.T, *q_out.blocks(), shuffle=q_out._shuffle()).T
            y = F.linear(x, W)
        else:  # the rotations' own forward, less its checks and module call (the product checks the sizes)
            y = F.linear(gs_apply(x, *q_in.full_precision_blocks(x), shuffle=q_in._shuffle()), W)
            if q_out is not None:
                y = gs_apply(y, *q_out.full_precision_blocks(y), shuffle=q_out._shuffle())
        # under autocast y has F.linear's dtype, as nn.Linear's output would: the scale and bias follow it
        bias = self.bias
        if self.gsoft_scale is None:
            return y if bias is None else y + bias.to(y.dtype)
        scale = self.gsoft_scale.to(y.dtype)
        return y * scale if bias is None else torch.addcmul(bias.to(y.dtype), y, scale)  # one pass: s ⊙ y + b

    def _rotate_weight(self, x: torch.Tensor, W: torch.Tensor) -> bool:
        """Whether rotating the weight costs fewer multiply-adds than rotating the activations
        (:func:`rotate_weight_cost`). Only with the skew parametrization: the orthogonal one rotates activations."""
        q_in, q_out = self.gsoft_in, self.gsoft_out
        if q_in.parametrization != "skew":
            return False
        rotations = (q_in,) if q_out is None else (q_in, q_out)
        training = torch.is_grad_enabled() and any(q.L.requires_grad or q.R.requires_grad for q in rotations)
        n_out, n_in = W.shape
        act, wt = rotate_weight_cost(
            x.numel() // n_in, n_in, n_out, q_in.block_size, None if q_out is None else q_out.block_size,
            training=training, input_grad=x.requires_grad,
        )  # fmt: skip
        return wt < act

    def _adapter(self) -> dict[str, torch.Tensor]:
        """The adapter now: the rotations' orthogonal blocks (``in_L``, ``in_R``, ``out_L``, ``out_R``) and the
        scale, keyed as the ``merged_*`` buffers that record them."""
        adapter = {}
        for side, q in self._rotations():
            adapter[f"{side}_L"], adapter[f"{side}_R"] = q.blocks()
        if self.gsoft_scale is not None:
            adapter["scale"] = self.gsoft_scale
        return adapter

    def _adapt(self, W: torch.Tensor, a: dict[str, torch.Tensor]) -> torch.Tensor:
        """``diag(s) Q_out W Q_in`` for ``W: (out, in)``, one GS factor at a time: ``O(n_out n_in b)``."""
        W = _reversed_form(self.gsoft_in, a["in_L"].mT, a["in_R"].mT).matmul(W)  # row i: w_iᵀ Q_in = (Q_inᵀ w_i)ᵀ
        if self.gsoft_out is not None:
            W = _q_form(self.gsoft_out, a["out_L"], a["out_R"]).matmul(W.T).T  # column j: Q_out w_j
        return W if "scale" not in a else a["scale"][:, None] * W

    def _unadapt(self, W: torch.Tensor, a: dict[str, torch.Tensor]) -> torch.Tensor:
        """The inverse of :meth:`_adapt` for the same blocks and scale, ``Q_out⁻¹ diag(s)⁻¹ W Q_in⁻¹``, by inverses
        of the ``b × b`` blocks (exact also for the nearly orthogonal Neumann map): ``O(n_out n_in b)``."""
        inv = self._inverted_blocks(a)
        if "scale" in a:
            W = W / a["scale"][:, None]
        if self.gsoft_out is not None:
            W = _reversed_form(self.gsoft_out, inv["out_L"], inv["out_R"]).matmul(W.T).T  # column j: Q_out⁻¹ w_j
        inverse_t = _q_form(self.gsoft_in, inv["in_L"].mT, inv["in_R"].mT)
        return inverse_t.matmul(W)  # row i: w_iᵀ Q_in⁻¹ = (Q_in⁻ᵀ w_i)ᵀ

    def _inverted_blocks(self, a: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverses of the ``b × b`` blocks of ``a`` (``O(n b²)``); a singular one (a corrupted record of what
        was merged) is refused with a ValueError."""
        inverses = {}
        for key, blocks in a.items():
            if key != "scale":
                inverses[key], info = torch.linalg.inv_ex(blocks)
                if bool((info != 0).any()):
                    raise ValueError(
                        f"{self.layer_name}: the record of what was merged (merged_{key}) has a singular block; "
                        "nothing was unmerged"
                    )
        return inverses

    def _in_compute_dtype(self, fn, a: dict[str, torch.Tensor]) -> torch.Tensor:
        """``fn(W, a)`` on the base weight, in float64 and outside autocast, rounded to the weight's dtype."""
        W = self._weight()
        dtype = _compute_dtype(W.device)
        with torch.autocast(W.device.type, enabled=False):
            return fn(W.to(dtype), {k: v.to(dtype) for k, v in a.items()}).to(W.dtype)

    @torch.no_grad()
    def _merge_record(self) -> dict[str, torch.Tensor]:
        """The adapter to fold in (detached copies of its blocks and scale), refused (ValueError) if a scale entry is
        (nearly) 0: the merge could not be undone."""
        a = {k: v.detach().clone() for k, v in self._adapter().items()}
        if "scale" in a and (a["scale"].abs() < 1e-12).any():
            raise ValueError(
                f"{self.layer_name}: a scale entry is (nearly) 0: merging could not be undone; nothing was merged"
            )
        return a

    @torch.no_grad()
    def _surely_finite(self, merge: bool) -> bool:
        """Whether merging (``merge=True``; unmerging otherwise) is proven to give a finite weight, without computing
        it. Every entry of the result and of every intermediate is at most
        ``‖W‖_F · max(1, s) · Π_B max(1, max_i ‖B_i‖_F)``, with ``s`` the largest |scale| entry (unmerging: the
        inverse of the smallest) and ``B`` the four (two) block factors applied (unmerging: their inverses): each
        factor is block diagonal up to a permutation, so its 2-norm is ``max_i ‖B_i‖₂ ≤ max_i ‖B_i‖_F``. Below half
        the largest float of the weight's dtype no rounding reaches infinity. False (not proven) also when a value is
        not finite. Cost ``O(n_out n_in)`` (the norm of W) + ``O(n b²)`` (the blocks, or their inverses). Raises what
        :meth:`_merge_record` and :meth:`_inverted_blocks` raise."""
        a = self._merge_record() if merge else self._recorded()
        W = self._weight()
        dtype = _compute_dtype(W.device)
        a = {k: v.to(dtype) for k, v in a.items()}
        blocks = [v for k, v in a.items() if k != "scale"] if merge else list(self._inverted_blocks(a).values())
        growth = [torch.linalg.matrix_norm(B).amax() for B in blocks]
        if "scale" in a:
            growth.append(a["scale"].abs().amax() if merge else 1 / a["scale"].abs().amin())
        bound = torch.linalg.vector_norm(W, dtype=dtype) * torch.stack(growth).clamp_min(1).prod()
        return bool(bound < min(torch.finfo(W.dtype).max, torch.finfo(dtype).max) / 2)

    @torch.no_grad()
    def _merge_result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The merged weight ``(out, in)`` and the adapter it folds in, checked; nothing is written."""
        a = self._merge_record()
        W = self._in_compute_dtype(self._adapt, a)
        if not torch.isfinite(W).all():
            raise ValueError(
                f"{self.layer_name}: merging would write non-finite values into the weight; nothing was merged"
            )
        return W, a

    @torch.no_grad()
    def _unmerge_result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The base weight ``(out, in)`` recovered from the recorded (merged) blocks and scale, checked."""
        W = self._in_compute_dtype(self._unadapt, self._recorded())
        if not torch.isfinite(W).all():
            raise ValueError(f"{self.layer_name}: unmerging produced non-finite values; nothing was unmerged")
        return W, {}

    def _adapter_keys(self) -> list[str]:
        return [f"{side}_{f}" for side, _ in self._rotations() for f in "LR"] + (
            ["scale"] if self.gsoft_scale is not None else []
        )

    def merge(self) -> None:
        """Fold the adapter into the base weight (forward then costs what the base layer costs) and record the
        blocks and scale folded in. Cost ``O(n_out n_in b)``. Raises ``ValueError`` (nothing changed) if a scale
        entry is (nearly) 0 or the merged weight would not be finite."""
        merge_all([self], merge=True)

    def unmerge(self) -> None:
        """Restore the base weight, ``Q_out⁻¹ diag(s)⁻¹ W' Q_in⁻¹`` with the recorded (merged) blocks and scale —
        to rounding (about 1e-7 relative in float32), whatever the adapter became since. Cost ``O(n_out n_in b)``."""
        merge_all([self], merge=False)
