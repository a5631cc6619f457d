"""Spectral tensor-train parameterization (STTP) of linear and convolutional layers.

Obukhov, Rakhuba, Liniger, Huang, Georgoulis, Dai, Van Gool, *Spectral Tensor Train Parameterization of
Deep Learning Layers*, AISTATS 2021 (re-derived; no code copied). A weight ``W: (d_out, d_in)`` (a conv
kernel reshaped to ``C_out × C_in k_h k_w``) is a compact SVD

    W = U diag(σ) Vᵀ,     U: (d_out, r),  V: (d_in, r)  with orthonormal columns,

and U, V are each a tensor train over a factorization of their rows, ``d = n_1 ⋯ n_D``: cores
``G_k: (R_{k−1}, n_k, R_k)``, ``R_0 = 1``, ``R_D = r``, ``R_k = min(R, n_1 ⋯ n_k, n_{k+1} ⋯ n_D r)`` (R the
``rank`` argument, the maximal TT-rank; ``r = min(R, d_out, d_in)``), whose left unfoldings
``(R_{k−1} n_k) × R_k`` have orthonormal columns — then U has orthonormal columns (STTP's Prop. 1).

**Modes.** By default (``mode_factorization="paper"``) the modes are the prime factors of ``d_out`` and of ``d_in``
— for a conv, of the whole ``C_in k_h k_w``, as STTP's eq. 9 — and W's TT reads ``U``'s modes, σ, then ``V``'s modes
reversed (the largest input prime next to σ). ``"reference"`` is the authors' code's layout (``k_h k_w`` one mode at
the far end, the input primes increasing away from σ) and ``"legacy"`` the default of lowrankopt before issue 23
(``k_h k_w`` one mode next to σ); see :data:`~.sttp_base.FACTORIZATIONS` for each one's TT and parameter count.

**Non-redundant gauge.** Each core is a Householder product (:mod:`lowrankopt.nn.orthogonal.householder`): the
*reduced* layout (Grassmann, ``(R_{k−1} n_k − R_k) R_k`` parameters) for every core except the two next to σ, which
are full Stiefel; with ``spectrum="identity"`` the last U core is reduced too (``(U, V) ~ (UQ, VQ)``). The parameter
count is then exactly

    Σ_k R_{k−1} n_k R_k − Σ_k R_k²          (learned spectrum: the dimension of the TT manifold of W),

minus ``r (r + 1) / 2`` for the identity spectrum (σ = 1 and the O(r) gauge). At maximal ranks this is
SVDP (``U, V`` single Stiefel factors), :class:`SVDPLinear`.

**Spectrum.** ``"identity"``: σ = ±1 (fixed signs, a buffer set by :meth:`~STTPBase.load_dense`; they make
both determinant components of ``U Vᵀ`` reachable when the Householder maps alone reach one). ``"learned"``:
a parameter s (initialized to 1) and ``σ = lipschitz · s / max|s|``, so ``‖W‖₂ = lipschitz`` exactly (1 by
default: a 1-Lipschitz layer; the overall scale of s is then one redundant parameter); with
``lipschitz=None``, ``σ = s`` (unconstrained). For :class:`STTPConv2d` the bound holds for the reshaped
kernel matrix (as in spectral normalization, Miyato et al.), not for the conv operator, whose norm can be
up to ``sqrt(k_h k_w)`` times larger. ``"learned+dopt"``: as learned, and
:func:`dopt_penalty` adds the D-optimal regularizer ``−log |s / max|s||``, averaged over the singular values of all
such layers of the model together (as the authors' code; ``reduction="layer-mean"`` averages each layer first).

**Two ways to train the same layer** (``parametrization``): ``"householder"`` — Euclidean parameters
(the reflector entries, exactly the degrees of freedom above), any ``torch.optim`` optimizer, U and V
orthonormal by construction; ``"stiefel"`` — every core is a point on ``geoopt.EuclideanStiefel`` (QR retraction; a
``geoopt.ManifoldParameter``, one per group of equally shaped cores; the TT gauge is then free, so the
parameter count exceeds the formula), trained with ``geoopt.optim.RiemannianSGD`` / ``RiemannianAdam``.
In both, equally shaped cores are built together: one batched Householder product per (core shape, layout)
of U and of V.

Forward cost: U and V are contracted from their cores (``O(d r Σ R_k)`` for d rows) and applied as
two thin products, ``O(B (d_in + d_out) r)`` for a batch of B — W is never formed (``to_dense`` forms it
on request).

This module is the family's entry point and its converter; the shared factors and spectrum are :mod:`.sttp_base`, the
layers :mod:`.sttp_layers` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..._checks import as_positive_int
from .._common import LegacyPatterns, _legacy_selection
from ..orthogonal.orthonormal_tt import OrthonormalTT  # noqa: F401 (the 0.1 path lowrankopt.nn.sttp.OrthonormalTT)
from ..surgery import Targets, replace_modules, select_modules
from .sttp_base import PARAMETRIZATIONS, SPECTRA, STTPBase, prime_factors  # noqa: F401 (their path before the split)
from .sttp_layers import STTPConv2d, STTPLinear, SVDPConv2d, SVDPLinear

__all__ = [
    "STTPConv2d",
    "STTPLinear",
    "SVDPConv2d",
    "SVDPLinear",
    "convert_to_sttp",
    "dopt_penalty",
]


def _sttp_eligible(m: torch.nn.Module) -> bool:
    """What the STTP converter replaces: plain ``nn.Linear`` and ``nn.Conv2d`` with ``groups = 1`` (subclasses, which
    may be read differently by their owners, are left alone)."""
    return type(m) is torch.nn.Linear or (type(m) is torch.nn.Conv2d and m.groups == 1)


def convert_to_sttp(
    model: torch.nn.Module,
    rank: int | Callable[[str, torch.nn.Module], int],
    *,
    target_modules: Targets | None = None,
    exclude_modules: Targets | None = None,
    svdp: bool = False,
    include: LegacyPatterns | None = None,
    exclude: LegacyPatterns | None = None,
    **layer_kwargs: Any,
) -> dict[str, torch.nn.Module]:
    """Replace the ``nn.Linear`` / ``nn.Conv2d`` (groups = 1) submodules of ``model`` by STTP layers, in place.

    Each new layer is initialized from the dense weight (:meth:`~STTPBase.load_dense`: truncated SVD, then
    TT-SVD of U and V), with ``lipschitz=None`` unless given, so that at full rank the outputs are reproduced.
    The replacement is :func:`~lowrankopt.nn.surgery.replace_modules`': all or nothing (an error, e.g. a bad rank for
    one layer, leaves the model untouched), a module used at several places becomes one STTP layer used at all of
    them, and a weight tied to another place is refused rather than silently untied.

    Args:
        model: the module to convert (in place).
        rank: the maximal TT-rank, an int or ``rank(name, module) -> int`` (each layer caps it at what its
            factors allow).
        target_modules: which layers (:func:`~lowrankopt.nn.surgery.select_modules`: module-name suffixes, a regex,
            ``"all-linear"``, a predicate ``fn(name, module)``); None: all.
        exclude_modules: the same forms, for layers to leave dense.
        svdp: use :class:`SVDPLinear` / :class:`SVDPConv2d` instead.
        include: deprecated (fnmatch patterns or a predicate of the name); use ``target_modules``.
        exclude: deprecated; use ``exclude_modules``.
        **layer_kwargs: passed to the layers (``spectrum``, ``lipschitz``, ``parametrization``, …).

    Returns ``{qualified name: new layer}``. Cost: one dense SVD per converted layer.
    """
    target_modules, exclude_modules = _legacy_selection(target_modules, exclude_modules, include, exclude)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(rank):  # checked even when nothing is converted
        as_positive_int("rank", rank)
    targets = select_modules(model, target_modules, exclude_modules, eligible=_sttp_eligible)

    def build(name: str, m: torch.nn.Module) -> torch.nn.Module:
        r = as_positive_int("rank", rank(name, m) if callable(rank) else rank)
        if isinstance(m, torch.nn.Linear):
            return (SVDPLinear if svdp else STTPLinear).from_linear(m, r, **layer_kwargs)
        return (SVDPConv2d if svdp else STTPConv2d).from_conv(m, r, **layer_kwargs)

    return replace_modules(model, targets, build)


DOPT_REDUCTIONS = ("pooled", "layer-mean")


def dopt_penalty(model: torch.nn.Module, *, reduction: str = "pooled") -> torch.Tensor:
    """The D-optimal regularizer of the layers of ``model`` with ``spectrum="learned+dopt"`` (0 if there are none): add
    ``λ · dopt_penalty(model)`` to the loss.

    With ``σ̂_i = |s_i| / max_j |s_j|`` the normalized singular values of each layer (r_ℓ of them in layer ℓ):

    - ``"pooled"`` (default; the authors' code, toshas/sttp ``spectral_penalties.py``): the mean of ``−log σ̂_i``
      over all singular values of all those layers together, ``−Σ_ℓ Σ_i log σ̂_{ℓ,i} / Σ_ℓ r_ℓ`` — a layer weighs
      by its rank;
    - ``"layer-mean"`` (the default of lowrankopt before issue 23): the mean over layers of each layer's mean,
      :meth:`~lowrankopt.nn.spectral.sttp_base.STTPBase.dopt_penalty` — every layer weighs the same.

    They agree when all those layers have the same rank. Cost ``O(Σ_ℓ r_ℓ)``.
    """
    if reduction not in DOPT_REDUCTIONS:
        raise ValueError(f"reduction must be one of {DOPT_REDUCTIONS}, got {reduction!r}")
    layers = [m for m in model.modules() if isinstance(m, STTPBase) and m.spectrum == "learned+dopt"]
    if not layers:
        p = next(model.parameters(), None)
        return torch.zeros((), dtype=p.dtype if p is not None else None)
    if reduction == "pooled":
        return torch.cat([m._dopt_terms() for m in layers]).mean()
    return torch.stack([m.dopt_penalty() for m in layers]).mean()
