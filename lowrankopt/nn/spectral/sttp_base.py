"""What the STTP layers (:mod:`.sttp`) share: the orthonormal factors U and V (tensor trains of Householder or Stiefel
cores, :class:`~lowrankopt.nn.orthogonal.orthonormal_tt.OrthonormalTT`), the spectrum σ (identity, learned,
Lipschitz-bounded) and its D-optimal penalty, the degrees of freedom, the loading of a dense weight (truncated SVD, then
TT-SVD of the singular vectors), and the mode factorizations. The math and the costs are in :mod:`.sttp`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from ..._checks import as_positive_int
from ...formats.tt import tt_svd
from .._common import _full_precision, _init_bias, _int_record, _kw, _load_with_record, _refuse_half
from ..orthogonal.orthonormal_tt import OrthonormalTT

__all__ = ["FACTORIZATIONS", "PARAMETRIZATIONS", "SPECTRA", "ModeFactorization", "Modes", "STTPBase", "prime_factors"]

SPECTRA = ("identity", "learned", "learned+dopt")
PARAMETRIZATIONS = ("householder", "stiefel")
FACTORIZATIONS = ("paper", "reference", "legacy")
"""The named mode factorizations of the STTP layers (``"auto"`` is ``"paper"``). With ``p(n)`` the prime factors of
n in non-decreasing order, ``↓`` the same reversed, and ``K = k_h k_w`` (1 for a linear layer), the TT of W reads,
from the output end to the input end:

- ``"paper"`` (the default; STTP's eq. 9): ``p(C_out), Σ, p(C_in K)↓`` — the whole input size ``C_in k_h k_w``
  factored into primes, the largest next to Σ. V's rows are row-major over ``p(C_in K)``: a plain reshape of the
  kernel's flat input index ``c K + i k_w + j``.
- ``"reference"`` (the authors' code, toshas/sttp ``spectral_tensors_factory.py``): ``p(C_out), Σ, p(C_in), K`` —
  the input primes in non-decreasing order away from Σ and ``k_h k_w`` one mode at the far end (omitted when 1). The
  kernel's input index is row-major in this order, so V's TT (``V.modes = K, p(C_in)↓``) indexes its rows in
  reversed mode order; the layer permutes them (a reshape and a transpose, ``O(d_in r)``).
- ``"legacy"`` (the default of lowrankopt before issue 23, to rebuild its checkpoints): ``p(C_out), Σ, K,
  p(C_in)↓`` — ``k_h k_w`` one mode next to Σ. V's rows are row-major over ``p(C_in), K``.

For a linear layer ``"paper"`` and ``"legacy"`` coincide. In every case the trainable parameter count (learned
spectrum, Householder) is ``Σ_k R_{k−1} n_k R_k − Σ_k R_k²`` over the TT above, ``R_k = min(R, n_1 ⋯ n_k,
n_{k+1} ⋯ n_D)`` (:meth:`STTPBase.dof`). E.g. at ``C_out × C_in × 3 × 3`` (paper / reference / legacy):
64×64, R = 8: 704 / 648 / 960; 128×64, R = 16: 2560 / 2336 / 3584; 16×8, R = 4: 128 / 116 / 192."""

Modes = int | Sequence[int] | None
"""The mode sizes of one factor: a sequence of positive ints with the factor's size as product, one int (one mode), or
None (its prime factors)."""

ModeFactorization = Literal["auto", "paper", "reference", "legacy"] | Sequence[Modes]
"""How the STTP layers factor their sizes: a name of :data:`FACTORIZATIONS` (``"auto"``: ``"paper"``) or a pair
``(out_modes, in_modes)`` of :data:`Modes` (V's rows row-major over ``in_modes``)."""


def prime_factors(n: int) -> list[int]:
    """The prime factors of n in non-decreasing order (``[n]`` for n ≤ 3; ``[1]`` for n = 1)."""
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out + [n] if n > 1 or not out else out


def _spectrum(spectrum: str) -> str:
    if spectrum not in SPECTRA:
        raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
    return spectrum


class STTPBase(torch.nn.Module):
    """What the linear and conv layers share: the factors U (out side), V (in side), σ, and their loading."""

    #: V's TT indexes its rows row-major over its modes reversed (the ``"reference"`` factorization); a class default
    #: so that layers pickled before it existed read their rows as they were built
    _in_reversed: bool = False
    #: V's modes under the default of lowrankopt before issue 23 ("legacy"), which a state dict without a layout record
    #: was saved with, when this layer was built with a named factorization; None: not checked (a given pair of modes,
    #: or a layer pickled before the record existed)
    _unrecorded_in_modes: tuple[int, ...] | None = None

    def _init_parameters(
        self,
        d_out: int,
        d_in: int,
        rank: int,
        mode_factorization: ModeFactorization,
        bias: bool,
        spectrum: str,
        lipschitz: float | None,
        parametrization: str,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
        generator: torch.Generator | None,
        kernel_numel: int = 1,
    ) -> None:
        """The factors U (``d_out`` rows), V (``d_in = C_in · kernel_numel`` rows), σ and the bias of a new layer
        (``rank`` checked by the caller); ``mode_factorization`` as :data:`ModeFactorization`."""
        dtype, device, _ = _kw(dtype, device, generator)
        out_modes, in_modes, self._in_reversed = _factorization(mode_factorization, d_out, d_in, kernel_numel)
        out_modes, in_modes = _modes("out_modes", d_out, out_modes), _modes("in_modes", d_in, in_modes)
        if isinstance(mode_factorization, str):
            self._unrecorded_in_modes = tuple(_factorization("legacy", d_out, d_in, kernel_numel)[1])
        self.spectrum = _spectrum(spectrum)
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {parametrization!r}")
        self.max_rank = rank
        rank = min(rank, d_out, d_in)  # the number of singular values
        if lipschitz is not None and (
            isinstance(lipschitz, bool) or not (isinstance(lipschitz, int | float) and 0 < lipschitz < math.inf)
        ):
            raise ValueError(f"lipschitz must be a positive number or None, got {lipschitz!r}")
        self.rank, self.lipschitz, self.parametrization = rank, lipschitz, parametrization
        learned = spectrum != "identity"
        common = dict(max_rank=self.max_rank, parametrization=parametrization, dtype=dtype, generator=generator)
        name = f"{type(self).__name__}(d_out={d_out}, d_in={d_in}, rank={self.max_rank})"
        self.U = OrthonormalTT(out_modes, rank, last="full" if learned else "reduced", owner=f"{name}.U", **common)
        self.V = OrthonormalTT(in_modes, rank, last="full", owner=f"{name}.V", **common)
        self.s = torch.nn.Parameter(torch.ones(rank, dtype=dtype)) if learned else None
        # identity spectrum: fixed signs ±1 (set by load_dense), so that both determinant components of
        # U Vᵀ are reachable when the Householder maps alone reach one (square last cores)
        self.register_buffer("signs", None if learned else torch.ones(rank, dtype=dtype))
        self.to(device)
        self.bias = _init_bias(d_out, d_in, bias, dtype, device, generator)

    def singular_values(self) -> torch.Tensor:
        """σ, the diagonal of the compact SVD ``W = U diag(σ) Vᵀ`` (signs may be negative). Cost ``O(r)``."""
        if self.s is None:
            return self.signs
        if self.lipschitz is None:
            return self.s
        return self.lipschitz * self.s / self.s.abs().max().clamp_min(torch.finfo(self.s.dtype).tiny)

    def dopt_penalty(self) -> torch.Tensor:
        """The D-optimal regularizer ``−mean log |s / max|s||`` of this layer (≥ 0; 0 when all singular values are
        equal). Cost ``O(r)``."""
        return self._dopt_terms().mean()

    def _dopt_terms(self) -> torch.Tensor:
        """``−log |s_i / max|s||`` for each of the r learned singular values (both clamped below at the dtype's
        eps): what :meth:`dopt_penalty` and :func:`~lowrankopt.nn.spectral.sttp.dopt_penalty` average."""
        if self.s is None:
            raise ValueError("dopt_penalty needs a learned spectrum")
        eps = torch.finfo(self.s.dtype).eps
        return -torch.log((self.s.abs() / self.s.abs().max().clamp_min(eps)).clamp_min(eps))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, σ, V)`` with ``U: (d_out, r)``, ``V: (d_in, r)`` (rows in the order of the dense weight's columns).
        Cost ``O((d_out + d_in) r Σ R_k)``."""
        V = self.V.matrix()
        if self._in_reversed:
            V = _reverse_rows(V, self.V.modes)
        return self.U.matrix(), self.singular_values(), V

    def _forward_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`factors` for a forward on ``x``: refused in half precision, built with autocast off (in the
        parameters' dtype; only the products with ``x`` autocast)."""
        needs = "its orthonormal factors need QR (Householder products, Stiefel retractions)"
        _refuse_half(self, self.U.params[0].dtype, needs)
        with _full_precision(x):
            return self.factors()

    def weight_matrix(self) -> torch.Tensor:
        """The dense ``(d_out, d_in)`` weight (tests, ``to_dense``). Cost ``O(d_out d_in r)``."""
        U, s, V = self.factors()
        return (U * s) @ V.T

    def dof(self) -> int:
        """Degrees of freedom: ``Σ R_{k−1} n_k R_k − Σ R_k²`` over the TT of W (learned spectrum), minus
        ``r (r + 1) / 2`` for the identity spectrum. Equals the trainable parameter count with the
        Householder parameterization."""
        ranks = list(self.U.bonds[1:]) + list(reversed(self.V.bonds[1:-1]))
        modes = list(self.U.modes) + list(reversed(self.V.modes))
        bonds = [1] + ranks + [1]
        tt_dim = sum(bonds[k] * n * bonds[k + 1] for k, n in enumerate(modes)) - sum(b * b for b in ranks)
        return tt_dim - (self.rank * (self.rank + 1) // 2 if self.s is None else 0)

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor) -> None:
        """Set U, σ, V from a dense ``(d_out, d_in)`` weight: rank-r truncated SVD, then TT-SVD of U and V
        (left-orthonormal cores; the last core re-orthonormalized by its polar factor). Exact when the rank
        is ≥ the weight's rank and the TT ranks are maximal. With ``spectrum="identity"`` only the singular
        vectors are kept; with ``lipschitz`` set, σ is scaled to max ``lipschitz``. Cost: a dense SVD."""
        W = weight.detach().to(torch.float64).cpu()
        if not torch.isfinite(W).all():
            raise ValueError("weight has NaN or Inf entries")
        if tuple(W.shape) != (math.prod(self.U.modes), math.prod(self.V.modes)):
            raise ValueError(f"weight must have shape ({math.prod(self.U.modes)}, {math.prod(self.V.modes)})")
        P, S, Qt = torch.linalg.svd(W, full_matrices=False)
        P, S, Q = P[:, : self.rank], S[: self.rank], Qt[: self.rank].T
        if self._in_reversed:  # V's TT holds the rows in reversed mode order
            Q = _reverse_rows(Q, self.V.modes[::-1])
        u_cores, v_cores = _tt_svd(P, self.U.shapes), _tt_svd(Q, self.V.shapes)
        if self.s is None:  # U G (V G D)ᵀ with signs D: W = U G diag(D) (V G D)ᵀ
            G = self.U.set_cores(u_cores)
            d = torch.diagonal(self.V.set_cores(v_cores, right=G, allow_sign_flips=True))
            self.signs.copy_(d.to(self.signs.dtype))
            return
        du = torch.diagonal(self.U.set_cores(u_cores, allow_sign_flips=True))
        dv = torch.diagonal(self.V.set_cores(v_cores, allow_sign_flips=True))
        s = S * du.to(S.dtype) * dv.to(S.dtype)  # U D_u diag(D_u D_v s) (V D_v)ᵀ = U diag(s) Vᵀ
        self.s.copy_(s.to(self.s.dtype))

    @torch.no_grad()
    def _load_dense_and_bias(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """:meth:`load_dense` of a trained layer's ``(d_out, d_in)`` weight, and a copy of its bias (if any): what
        ``from_linear`` / ``from_conv`` load."""
        self.load_dense(weight)
        if bias is not None:
            self.bias.copy_(bias)

    def get_extra_state(self) -> torch.Tensor:
        """The layout of V's rows, saved in the state dict (key ``_extra_state``): int64 ``[in_reversed, *in_modes]``.
        ``"paper"`` and ``"reference"`` can have the same core shapes and the same modes with V's rows in another
        order (a 2-channel 1×2 conv: in_modes (2, 2) both); without the record one would load into the other
        silently, as another kernel."""
        return torch.tensor([int(self._in_reversed), *self.V.modes], dtype=torch.int64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Nothing to set: the layout is fixed at construction; :meth:`_load_from_state_dict` checks the saved one."""

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """torch's loading, after a check of the saved layout of V's rows against this layer's when the state dict
        holds any of the layer's entries: a mismatch is an error of ``load_state_dict`` (also with ``strict=False``)
        and nothing of the layer is loaded then. A state dict without the record (saved before issue 23) is taken to
        have the old default layout (``"legacy"``, rows row-major); it loads into a layer whose rows are row-major
        too."""
        _load_with_record(
            self, super()._load_from_state_dict, lambda saved: self._layout_mismatch(saved, state_dict, prefix),
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs=error_msgs,
        )  # fmt: skip

    def _layout_mismatch(self, saved, state_dict, prefix: str) -> str | None:
        """The error for a state dict whose layout of V's rows is not this layer's, else None."""
        own = (bool(self._in_reversed), tuple(self.V.modes))
        name = f"{type(self).__name__} {prefix.rstrip('.') or '(root)'}"
        if saved is not None:
            record = _int_record(saved)
            if record is None:
                return f"{name}: unreadable record of the mode factorization in the state dict: {saved!r}"
            if _row_order(bool(record[0]), record[1:]) == _row_order(*own):
                return None
            order = "reversed" if record[0] else "row-major"
            return (
                f"{name}: the state dict was saved with in_modes={tuple(record[1:])} ({order} rows), this layer "
                f"has in_modes={own[1]} ({'reversed' if own[0] else 'row-major'} rows); build it with the "
                "mode_factorization the state dict was saved with"
            )
        if self._unrecorded_in_modes is None or (
            _row_order(*own) == _row_order(False, ()) and not self._shapes_differ(state_dict, prefix)
        ):
            return None
        return (  # reversed rows, or parameters shaped by the old default factorization
            f"{name}: the state dict records no mode factorization (saved by lowrankopt before issue 23, whose "
            f"default, now mode_factorization='legacy', gave in_modes={self._unrecorded_in_modes}); this layer has "
            f"in_modes={own[1]}. Build it with mode_factorization='legacy' (or the (out_modes, in_modes) pair "
            "used then)"
        )

    def _shapes_differ(self, state_dict, prefix: str) -> bool:
        """Does the state dict hold one of this layer's tensors in another shape? (Absent ones torch reports.)"""
        own = {k: v for k, v in self.state_dict().items() if k != "_extra_state"}
        return any(prefix + k in state_dict and state_dict[prefix + k].shape != v.shape for k, v in own.items())

    def _factor_modes(self) -> str:
        order = ", in_order='reversed'" if self._in_reversed else ""
        ranks = f"{self.U.bonds[1:-1]}|{self.V.bonds[1:-1]}"
        return f"out_modes={self.U.modes}, in_modes={self.V.modes}{order}, ranks={ranks}"


def _tt_svd(M: torch.Tensor, shapes: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Left-orthonormal TT cores of the ``d × r`` matrix M (rows over the modes) with the given shapes: the TT-SVD
    (:func:`lowrankopt.formats.tt_svd`, exact ranks) of M as a tensor ``(n_1, …, n_{D−1}, n_D r)``; the last core is
    replaced by its polar factor so that the product has orthonormal columns."""
    modes, r = [n for _, n, _ in shapes], shapes[-1][2]
    cores = tt_svd(M.reshape(*modes[:-1], modes[-1] * r), [r1 for _, _, r1 in shapes[:-1]], exact=True)
    r0, n, _ = shapes[-1]
    A, _, Bt = torch.linalg.svd(cores[-1].reshape(r0 * n, r), full_matrices=False)
    cores[-1] = (A @ Bt).reshape(r0, n, r)  # polar factor: the nearest orthonormal matrix
    return cores


def _modes(name: str, d: int, given: Modes) -> list[int]:
    if given is None:
        return prime_factors(d)
    given = [given] if isinstance(given, int) else given
    if isinstance(given, str | bytes) or not isinstance(given, Sequence):
        raise TypeError(f"{name} must be a sequence of positive ints, got {type(given).__name__}")
    modes = [as_positive_int(f"{name}[{k}]", m) for k, m in enumerate(given)]
    if math.prod(modes) != d:
        raise ValueError(f"{name} {modes} has product {math.prod(modes)}, not {d}")
    return modes


def _row_order(reversed_: bool, modes: Sequence[int]) -> tuple:
    """What the layout record protects: the order of V's rows, row-major over the kernel's input index (any
    factorization) or its digits reversed over the modes — a permutation only with two modes of size > 1. Equal
    parameter shapes with equal row orders compute the same kernel (torch checks the shapes)."""
    digits = tuple(int(m) for m in modes if m > 1)
    return ("reversed", digits) if reversed_ and len(digits) > 1 else ("row-major",)


def _reverse_rows(M: torch.Tensor, modes: Sequence[int]) -> torch.Tensor:
    """The ``d × r`` matrix M, rows row-major over ``modes``, with its rows row-major over the modes reversed (the
    digits of each row index reversed). Its own inverse with ``modes[::-1]``. Cost: one copy, ``O(d r)``."""
    D = len(modes)
    return M.reshape(*modes, M.shape[-1]).permute(*range(D - 1, -1, -1), D).reshape(M.shape)


def _factorization(
    mode_factorization: ModeFactorization, d_out: int, d_in: int, kernel_numel: int
) -> tuple[Modes, Modes, bool]:
    """``(out_modes, in_modes, in_reversed)`` of a named factorization (:data:`FACTORIZATIONS`) of a layer
    ``d_out × (C_in · kernel_numel)``, or the given pair (``in_reversed`` False)."""
    if isinstance(mode_factorization, str):
        name = "paper" if mode_factorization == "auto" else mode_factorization
        if name not in FACTORIZATIONS:
            raise ValueError(
                f"mode_factorization must be one of {FACTORIZATIONS}, 'auto' or (out_modes, in_modes), "
                f"got {mode_factorization!r}"
            )
        c_in, kk = d_in // kernel_numel, kernel_numel
        if name == "paper":  # eq. 9: C_in k_h k_w factored as a whole
            return None, prime_factors(d_in), False
        if name == "legacy":  # C_in's primes, then k_h k_w as one mode (next to Σ)
            return None, prime_factors(c_in) + ([kk] if kk > 1 else []), False
        # reference: Σ, p(C_in), k_h k_w along W's TT; V's TT runs the other way (its last core next to Σ)
        primes = [p for p in prime_factors(c_in) if p > 1]
        return None, ([kk] if kk > 1 else []) + primes[::-1] or [1], True
    if not isinstance(mode_factorization, Sequence) or len(mode_factorization) != 2:
        raise ValueError(
            f"mode_factorization must be one of {FACTORIZATIONS}, 'auto' or a pair (out_modes, in_modes), "
            f"got {mode_factorization!r}"
        )
    return mode_factorization[0], mode_factorization[1], False
