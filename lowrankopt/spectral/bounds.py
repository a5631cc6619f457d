"""Upper bounds on the spectral norm of a convolution that do not depend on the input size, and the HOPM estimate.

For a kernel ``K (c_out, c_in, h, w)`` and stride 1, the conv's Jacobian J satisfies

    ‖J‖₂ ≤ sup_ω ‖K̂(ω)‖₂,   K̂(ω) = Σ_{p,q} K[:, :, p, q] e^{−i(ω₁p + ω₂q)},

for **zero padding** of any amount (symmetric or not, "same" included) at any input size (the padded input
sits in a larger periodic grid, where the conv is circular; J is that circular conv with input and output
coordinates restricted, and the circular norm is a max of ``‖K̂(ω)‖₂`` over a grid), and for **circular
padding** when ``2·pad ≤ k − 1`` on each axis (at most "same") and the input size is divisible by the stride:
then J's rows are distinct rows of the periodic conv. Other circular convs (which the paper's "arbitrary
padding" would include) repeat input pixels in their output, and their norm can exceed the bound (the
all-ones 3×3 kernel: by 43 % with circular padding 2 on 6 × 6 inputs, by 15 % with stride 2 on 5 × 5 inputs;
in the tests): no bound here covers them, nor reflect or replicate padding.
A stride s is handled on the polyphase kernel (:func:`~lowrankopt.spectral.polyphase_kernel`):
``h, w → ⌈h/s⌉, ⌈w/s⌉``.

Writing ``K̂(ω)`` as K contracted with the vectors ``(e^{−iω₁p})_p`` and ``(e^{−iω₂q})_q`` of norms √h and √w,

    sup_ω ‖K̂(ω)‖₂ ≤ √(hw) · ‖K‖_σ,   ‖K‖_σ = max over complex unit u₁..u₄ of |Σ K[o,c,p,q] u₁[o] u₂[c] u₃[p] u₄[q]|,

the tensor spectral norm (Grishina, Gorbunov & Rakhuba, ECCV 2024). ``‖K‖_σ`` is NP-hard in general: the
higher-order power method (:func:`tensor_norm_estimate`) finds a local maximum, a value *below* it, so only
upper bounds on ``‖K‖_σ`` certify: :func:`tensor_norm_bound` (every matricization's norm) and
:func:`fantastic_four_bound` (four of them; Singla & Feizi). :func:`~lowrankopt.spectral.symbol_norm_bound`
bounds ``sup_ω ‖K̂(ω)‖₂`` itself, within a chosen tolerance.
"""

from __future__ import annotations

import math

import torch

from .._checks import as_positive_int
from ._kernel import (
    IterationState,
    certified_matrix_norm,
    check_kernel,
    check_stride,
    complex_dtype,
    fourier_vectors,
    polyphase_kernel,
    round_up,
    trim_zero_taps,
)

__all__ = ["fantastic_four_bound", "tensor_norm_bound", "tensor_norm_estimate"]

# the matricizations of K[o, c, p, q]: (row modes, column modes); every one's spectral norm is ≥ ‖K‖_σ
_ALL_UNFOLDINGS = (
    ((0,), (1, 2, 3)),
    ((1,), (0, 2, 3)),
    ((2,), (0, 1, 3)),
    ((3,), (0, 1, 2)),
    ((0, 1), (2, 3)),
    ((0, 2), (1, 3)),
    ((0, 3), (1, 2)),
)
_FANTASTIC_FOUR = (((0, 2), (1, 3)), ((0, 3), (1, 2)), ((0,), (1, 2, 3)), ((1,), (0, 2, 3)))


def _unfolding_bound(K: torch.Tensor, unfoldings) -> torch.Tensor:
    """``√(hw) · min`` over ``unfoldings`` of their spectral norms, for ``K (..., c_out, c_in, h, w)``: each norm
    certified after its float64 SVD (:func:`~lowrankopt.spectral._kernel.certified_matrix_norm`), the product
    rounded up into K's dtype — a guaranteed upper bound on ``√(hw)‖K‖_σ`` in floating point. Differentiable
    (through the SVD of the smallest)."""
    *batch, co, ci, h, w = K.shape
    K64 = K.to(torch.float64)  # exact
    nb, dims = len(batch), (co, ci, h, w)
    norms = []
    for rows, cols in unfoldings:
        m = math.prod(dims[i] for i in rows)
        A = K64.permute(*range(nb), *(nb + i for i in rows + cols)).reshape(*batch, m, -1)
        norms.append(certified_matrix_norm(A))
    bound = math.sqrt(h * w) * torch.stack(norms, -1).amin(-1)
    return round_up(bound * (1 + 4 * torch.finfo(torch.float64).eps), K.dtype)  # and the rounding of √(hw)·


def fantastic_four_bound(K: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Singla & Feizi's bound ``√(hw) · min(‖R₁‖₂, ‖R₂‖₂, ‖R₃‖₂, ‖R₄‖₂)`` on the conv's ``‖J‖₂``.

    The unfoldings of ``K (…, c_out, c_in, h, w)``: ``R₁ (c_out h) × (c_in w)``, ``R₂ (c_out w) × (c_in h)``,
    ``R₃ c_out × (c_in h w)``, ``R₄ (c_out h w) × c_in``. Their norms are SVDs in float64 certified after the fact
    (Singla & Feizi use a power iteration, which approaches from below; see :func:`tensor_norm_bound`) and rounded
    up, so the value is a guaranteed upper bound for the paddings and sizes of the module docstring.
    :func:`tensor_norm_bound` is never larger. Differentiable. Returns ``(...)``, in K's dtype.

    Cost: four SVDs of matrices with ``c_out c_in h w`` entries, O(c_out c_in h w · min side), in float64.
    """
    K = polyphase_kernel(check_kernel(K), check_stride(stride))
    return _unfolding_bound(K, _FANTASTIC_FOUR)


def tensor_norm_bound(K: torch.Tensor, stride: int = 1, **removed: object) -> torch.Tensor:
    """A guaranteed upper bound ``√(hw) · min_M ‖M‖₂ ≥ √(hw)·‖K‖_σ ≥ ‖J‖₂`` on the norm of a conv with kernel ``K``.

    ``M`` runs over the seven matricizations of ``K[o, c, p, q]`` (one mode against the other three, four ways;
    two against two, three ways). Why it is guaranteed: for complex unit vectors,
    ``|K(u₁, u₂, u₃, u₄)| = |xᵀ M y|`` with ``x, y`` the Kronecker products of the u's on M's row and column
    modes, unit vectors too, so ``|K(u₁, u₂, u₃, u₄)| ≤ ‖M‖₂`` and ``‖K‖_σ ≤ ‖M‖₂``; the constant √(hw) is the
    paper's (module docstring), with ``h × w`` the (polyphase) kernel without its border rows and columns of zero
    taps: dropping them shifts the kernel, which multiplies ``K̂(ω)`` by a unit scalar and changes neither
    ``sup_ω ‖K̂(ω)‖₂`` nor ``‖K‖_σ`` (a zero-padded kernel has the bound of the unpadded one). Each ``‖M‖₂`` is an
    SVD in float64 (not a power iteration, which would approach from below) certified after the fact by Weyl's
    inequality with its computed residual (:func:`~lowrankopt.spectral._kernel.certified_matrix_norm`: it rests
    on IEEE float64 arithmetic, not on the SVD's accuracy), and the result is rounded up into K's dtype.

    It holds for zero padding of any amount and any input size, and for circular padding up to "same" on
    input sizes divisible by the stride (module docstring); not for larger circular padding.
    It is never smaller than :func:`tensor_norm_estimate` (a value of the maximized function) and never larger
    than :func:`fantastic_four_bound` (three more matricizations); on random kernels about as large (1.7× the
    conv's norm for 64 × 64 × 3 × 3). :func:`~lowrankopt.spectral.symbol_norm_bound` is within a chosen
    tolerance of the n-independent norm, at a higher cost; :func:`tensor_norm_estimate` is the HOPM value of
    √(hw)‖K‖_σ, tighter but not a bound.

    Args:
        K: ``(..., c_out, c_in, h, w)``, float32 or float64; leading dims are a batch of kernels.
        stride: the conv's stride; the bound is then that of the polyphase kernel.
        **removed: the HOPM options of the former ``tensor_norm_bound`` (``restarts``, ``iters``, ``tol``,
            ``grid``, ``state``, ``refresh``, ``generator``) are refused with a ``TypeError`` that points to
            :func:`tensor_norm_estimate`: a call that asked for the HOPM value must not silently get another.

    Returns ``(...)``, in K's dtype; differentiable in K (through the SVD of the smallest matricization).
    Cost: seven SVDs (with vectors, and three residual products each) of matrices with ``c_out c_in h w``
    entries in float64, O(c_out c_in h w · min side); independent of the input size.
    """
    if removed:
        raise TypeError(
            f"tensor_norm_bound() got HOPM option(s) {sorted(removed)}: tensor_norm_bound is now a guaranteed bound "
            "(exact SVDs, no iterations). For the HOPM value, a lower estimate of the bound (for a penalty or "
            "tracking in training), call tensor_norm_estimate(K, stride, ...) with the same options"
        )
    K = trim_zero_taps(polyphase_kernel(check_kernel(K), check_stride(stride)))
    return _unfolding_bound(K, _ALL_UNFOLDINGS)


def _unit(u: torch.Tensor) -> torch.Tensor:
    return u / torch.linalg.vector_norm(u, dim=-1, keepdim=True).clamp_min(torch.finfo(u.real.dtype).tiny)


def _random_unit(shape, dtype, device, generator) -> torch.Tensor:
    real = torch.randn(*shape, 2, dtype=torch.float64, generator=generator)
    return _unit(torch.view_as_complex(real).to(device=device, dtype=dtype))


def _spectral_start(K: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit Fourier vectors ``(e^{−iω₁p})/√h, (e^{−iω₂q})/√w`` at the ω of a ``grid × grid`` grid where
    ``‖K̂(ω)‖_F`` is largest, per kernel: ``(B, h), (B, w)``."""
    B, co, ci, h, w = K.shape
    omega = 2 * math.pi * torch.arange(grid, dtype=torch.float64, device=K.device) / grid
    E3, E4 = fourier_vectors(omega, h, K.dtype) / math.sqrt(h), fourier_vectors(omega, w, K.dtype) / math.sqrt(w)
    sym = torch.einsum("bochw,fh,gw->bfgoc", K.to(E3.dtype), E3, E4)
    best = torch.linalg.matrix_norm(sym).flatten(1).argmax(1)
    return E3[best // grid], E4[best % grid]


def _real_matmul(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``A @ x`` for real ``A (B, m, k)`` and complex ``x (B, k, R)``, as one real product with 2R columns."""
    y = A @ torch.cat([x.real, x.imag], dim=-1)
    R = x.shape[-1]
    return torch.complex(y[..., :R], y[..., R:])


def _contract(K: torch.Tensor, us: list[torch.Tensor], skip: int) -> torch.Tensor:
    """K contracted with every vector but ``us[skip]``: ``(B, R, dim_skip)``; K real ``(B, co, ci, h, w)``, the
    vectors complex ``(B, R, dim)``. Two batched products, O(R · co ci h w)."""
    B, co, ci, h, w = K.shape
    u1, u2, u3, u4 = (u.transpose(1, 2) for u in us)  # (B, dim, R)
    R = u1.shape[-1]
    if skip < 2:  # contract the taps first: (B, co ci, hw) @ (u3 ⊗ u4)
        taps = (u3[:, :, None, :] * u4[:, None, :, :]).reshape(B, h * w, R)
        T = _real_matmul(K.reshape(B, co * ci, h * w), taps).reshape(B, co, ci, R)
        out = (T * u2[:, None]).sum(2) if skip == 0 else (T * u1[:, :, None]).sum(1)
    else:  # contract the channels first: u1ᵀ (B, co, ci hw), then u2
        T = _real_matmul(K.reshape(B, co, ci * h * w).mT, u1).reshape(B, ci, h, w, R)
        T = (T * u2[:, :, None, None]).sum(1)  # (B, h, w, R)
        out = (T * u4[:, None]).sum(2) if skip == 2 else (T * u3[:, :, None]).sum(1)
    return out.transpose(1, 2)


def tensor_norm_estimate(
    K: torch.Tensor,
    stride: int = 1,
    *,
    restarts: int = 3,
    iters: int = 100,
    tol: float = 1e-8,
    grid: int = 8,
    state: IterationState | None = None,
    refresh: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """An **estimate** of the tensor-norm bound ``√(hw) · ‖K‖_σ`` by the higher-order power method: never above
    it, and it can be below the conv's norm ‖J‖₂. Not a certificate (use :func:`tensor_norm_bound` or
    :func:`~lowrankopt.spectral.symbol_norm_bound`); for a penalty or for tracking in training, where a value a
    little low is harmless and a cheap warm-started gradient matters.

    ``‖K‖_σ`` is approached by the complex higher-order power method (HOPM, alternating maximization of
    ``|K(u₁, u₂, u₃, u₄)|``): each ``u_k ← conj(K(…, ·, …))/‖·‖`` given the others, which never decreases the
    value. The returned value is ``√(hw) |K(u₁, u₂, u₃, u₄)|`` at the final unit vectors (``h × w`` without the
    border rows and columns of zero taps, as in :func:`tensor_norm_bound`; the vectors still span every tap) — a
    value of the maximized function, so at most ``√(hw)‖K‖_σ`` and at most :func:`tensor_norm_bound` —
    differentiable in K;
    at a stationary point its gradient ``√(hw) Re(e^{−iφ} u₁⊗u₂⊗u₃⊗u₄)`` is the exact gradient of the
    maximum it found (envelope theorem), so it costs one contraction, no SVD.

    **Local maxima.** HOPM converges to a stationary point, which can be a local maximum below ``‖K‖_σ``; the
    value can then fall below ``‖J‖₂`` (30 % below on a kernel built for it in the tests; with the defaults,
    up to 6 % below the best of 30 long runs on random 64 × 32 × 3 × 3 kernels; the ``conv-bound-tightness``
    benchmark measures the gap on random and trained kernels).
    Against that:

    - ``restarts`` starts run as one batch and the best is kept. The first is a spectral start (u₃, u₄ the
      Fourier vectors of the frequency, on a ``grid × grid`` grid, with the largest ``‖K̂(ω)‖_F``), which begins
      near ``‖K̂(ω)‖₂/√(hw)`` and so near the true norm; the others are random complex vectors from
      ``generator``.
    - ``state`` (an :class:`IterationState`) warm-starts from the vectors of the previous call, in place of the
      restarts, and stores the best ones after the call: across training steps the kernel moves little, so a
      few iterations (``iters=1…5``) keep tracking the maximum found before, at a fraction of a cold start.
      But the tracked maximum can stop being the global one as the kernel changes: with ``refresh=True`` the
      warm vectors run together with ``restarts`` fresh starts and the best is kept (do it every ~100 steps,
      with more ``iters``; :class:`ConvNormRegularizer` and :func:`conv_spectral_normalization` do).

    Complex vectors are required: the real maximum can be smaller than ``sup_ω ‖K̂(ω)‖₂/√(hw)``.

    Args:
        K: ``(..., c_out, c_in, h, w)``, float32 or float64; leading dims are a batch of kernels.
        stride: the conv's stride; the estimate is then that of the polyphase kernel.
        restarts: starts of a cold call (≥ 1).
        iters: HOPM sweeps at most (0 with a warm ``state``: the value at the stored vectors).
        tol: stop when no start's value changes by more than ``tol`` (relative) in a sweep; 0 runs exactly
            ``iters`` sweeps.
        grid: frequencies per axis searched for the spectral start.
        state: warm-start state (updated in place), or None.
        refresh: with a warm ``state``, add ``restarts`` fresh starts to the warm one.
        generator: draws the random starts.

    Returns ``(...)``. Cost per sweep O(R · c_out c_in h w) for R starts (plus the start, O(grid² c_out c_in h w))
    — independent of the input size n.
    """
    K = polyphase_kernel(check_kernel(K), check_stride(stride))
    restarts, grid = as_positive_int("restarts", restarts), as_positive_int("grid", grid)
    warm = state is not None and bool(state.vectors)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < (0 if warm else 1):
        raise ValueError(f"iters must be an int ≥ {0 if warm else 1}, got {iters!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be non-negative, got {tol}")
    *batch, co, ci, h, w = K.shape
    Kb = K.reshape(-1, co, ci, h, w)
    B, cdt = Kb.shape[0], complex_dtype(K.dtype)
    dims = (co, ci, h, w)
    if warm:
        us = [_unit(u) for u in state.vectors]  # unit vectors, whatever the state was given
        expected = [(B, us[0].shape[1], d) for d in dims]
        if [tuple(u.shape) for u in us] != expected or any(u.dtype != cdt or u.device != K.device for u in us):
            raise ValueError(
                f"state holds vectors of shapes {[tuple(u.shape) for u in us]} ({us[0].dtype}, {us[0].device}), "
                f"expected {expected} ({cdt}, {K.device}): it belongs to a kernel of another shape, dtype or device "
                "(use a new IterationState or state.reset())"
            )
    if not warm or refresh:
        cold = [_random_unit((B, restarts, d), cdt, K.device, generator) for d in dims]
        u3, u4 = _spectral_start(Kb.detach(), grid)
        cold[2][:, 0], cold[3][:, 0] = u3, u4
        us = [torch.cat([u, c], dim=1) for u, c in zip(us, cold, strict=True)] if warm else cold
    with torch.no_grad():
        Kd = Kb.detach()
        last, converged, it, value = None, False, 0, None
        for it in range(1, iters + 1):  # noqa: B007
            for k in range(4):
                g = _contract(Kd, us, skip=k).conj()
                norm = torch.linalg.vector_norm(g, dim=-1)
                us[k] = _unit(g)
            value = norm  # after the last update, |K(u₁, u₂, u₃, u₄)| = ‖g‖
            if tol > 0 and last is not None and bool(((value - last).abs() <= tol * value).all()):
                converged = True
                break
            last = value
        if value is not None:  # keep the best start (iters = 0: the warm vectors as they are)
            best = value.argmax(1)
            us = [u[torch.arange(B, device=K.device), best][:, None] for u in us]
    f = (_contract(Kb, us, skip=0) * us[0]).sum(-1)[:, 0]  # differentiable in K: one contraction
    h, w = trim_zero_taps(K).shape[-2:]  # the vectors span every tap (stable state shapes), the constant not
    bound = math.sqrt(h * w) * f.abs().reshape(batch)
    if state is not None:
        state.vectors, state.converged, state.value = us, converged, bound.detach()
        state.iterations += it
    return bound
