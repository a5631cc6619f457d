"""Group-and-Shuffle (GS) matrices and GS orthogonal matrices.

Gorbunov, Yudin, Soboleva, Alanov, Naumov, Rakhuba, *Group and Shuffle: Efficient Structured Orthogonal
Parametrization*, NeurIPS 2024 (re-derived). A GS matrix of order m is

    A = P_m B_m P_{m−1} ⋯ P_1 B_1 P_0,

with block-diagonal factors ``B_j = diag(B_j1, …, B_jk)`` (blocks ``(b1, b2)``, all of one shape per factor)
and permutations ``P_j``. Definition 3.1 is order 2: ``A = P_L (L P R) P_R``. Permutations are index maps
(``(P x)_i = x[idx[i]]``, applied by indexing), never dense n × n matrices; :func:`shuffle_index` ``(k, n)`` is
the index map ``σ(i) = (i mod k)·n/k + ⌊i/k⌋``, a reshape to ``(k, n/k)`` and a transpose.

**Which shuffle is the paper's.** The paper (Definition 5.2) gives ``P_(k, n)`` by the same σ, and its matrix is the
one with ``P[σ(i), i] = 1`` (Proposition 1: "a nonzero element in the position (2, 4) as i = 4 and σ(4) = 2"), i.e.
``(P x)_{σ(i)} = x_i``: entry i is *sent* to σ(i). As an index map that is the inverse of σ, which is
``shuffle_index(n/k, n)`` (:func:`block_shuffle_index` ``(k, n)``). GSOFT uses ``Q = Pᵀ L P R`` with
``P = P_(r, br)`` (r blocks of size b, §6.1), so ``P x = x[shuffle_index(b, n)]`` — exactly what the authors' code
computes (``gsoft_demo``'s ``BlockdiagButterflyMultiply``: ``'b (r l) -> b (l r)'`` with ``l`` = the number of
blocks), and the paired channel shuffle of Appendix F is the reference's ``channel_shuffle`` only in this reading.
(Definition 5.2's prose, "reshape to k × n/k, transpose, flatten", reads the other way; it is the transpose, which
lowrankopt used before.) So every default permutation here is the paper's, and each takes ``shuffle="legacy"``
for the one of earlier lowrankopt versions (pass it to rebuild their matrices or load their checkpoints):

- :class:`GSOrthogonal`, :func:`gs_apply`: ``P = P_(r, br)`` gathers by ``shuffle_index(b, n)``; legacy: its
  transpose, gather by ``shuffle_index(r, n)``. The two coincide when ``b = r``.
- :class:`GSMatrix`, :meth:`GSMatrix.order2`, :func:`gs_matmul`, :func:`gs_project` (rectangular blocks allowed):
  between a factor with ``k_R`` blocks and the next one, with ``k_L`` blocks of width ``b2_L`` (n entries), the
  paper's ``P_(k_L, n)``: entry i is sent to ``σ(i)``, so consecutive outputs of one block go to different blocks of
  the next — gather by ``shuffle_index(b2_L, n)``. That is the authors' kernel for rectangular blocks (Monarch's
  ``blockdiag_butterfly_multiply``, which gsoft_demo calls as ``(x, R, L)``: ``'b (r l) -> b (l r)'`` with ``l`` =
  the number of blocks of the second factor), and GSOrthogonal's P when ``k_L = k_R``. Legacy: gather by
  ``shuffle_index(k_R, n)`` (the transpose of ``P_(k_R, n)``); the same index when ``b2_L = k_R``.

A permutation given explicitly (``perms=``, ``P=``) is always a gather index map, whatever ``shuffle`` says.

Applying A to a batch of B vectors costs ``O(B Σ_j k_j b1_j b2_j)`` — the number of block entries per vector.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Sequence

import geoopt
import torch

from ..._checks import as_device, as_positive_int
from ...manifolds.geoopt import manifold_parameter
from .._common import (
    HALF,
    HALF_OR_FULL,
    _autocasting,
    _check_input,
    _full_precision,
    _int_record,
    _load_with_record,
    _refuse_half,
)

__all__ = [
    "CayleyPool",
    "GSMatrix",
    "GSOrthogonal",
    "blockdiag_matmul",
    "block_shuffle_index",
    "gs_apply",
    "gs_matmul",
    "gs_project",
    "share_cayley_pool",
    "shuffle_index",
]

MAPS = ("cayley", "exp", "neumann")
SHUFFLES = ("paper", "legacy")  # see the module docstring
SHUFFLE_CODES = {"legacy": 0, "paper": 1}  # the permutation's record in state dicts (GSOrthogonal.get_extra_state)


def shuffle_index(k: int, n: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """The index map of the shuffle ``P_(k, n)``: ``σ(i) = (i mod k)·(n/k) + ⌊i/k⌋`` (k must divide n)."""
    if k < 1 or n % k:
        raise ValueError(f"k must be a positive divisor of n, got k={k}, n={n}")
    return torch.arange(n, device=device).reshape(k, n // k).T.reshape(-1)


def block_shuffle_index(
    nblocks: int, n: int, shuffle: str = "paper", *, device: torch.device | str | None = None
) -> torch.Tensor:
    """The index map of the GSOFT shuffle ``P`` of ``Q = Pᵀ L P R`` with ``nblocks`` blocks of size
    ``b = n / nblocks`` (``(P x)_i = x[idx[i]]``): ``shuffle="paper"`` — the paper's ``P_(r, br)`` (sends entry i
    to ``σ(i)``), ``idx = shuffle_index(b, n)``, as gsoft_demo computes it; ``shuffle="legacy"`` — its transpose,
    ``idx = shuffle_index(nblocks, n)``, lowrankopt's earlier choice (see the module docstring)."""
    _check_shuffle(shuffle)
    if nblocks < 1 or n % nblocks:
        raise ValueError(f"nblocks must be a positive divisor of n, got nblocks={nblocks}, n={n}")
    return shuffle_index(n // nblocks if shuffle == "paper" else nblocks, n, device=device)


def _check_shuffle(shuffle: str) -> None:
    if shuffle not in SHUFFLES:
        raise ValueError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}")


def _between(k_prev: int, k_next: int, n: int, shuffle: str, device: torch.device) -> torch.Tensor:
    """The default gather index between a factor with ``k_prev`` blocks and the next, with ``k_next`` blocks, over
    ``n`` entries (see the module docstring): ``"paper"`` — ``P_(k_next, n)``, sending consecutive outputs to
    different blocks of the next factor; ``"legacy"`` — gather by ``σ_(k_prev, n)``, the earlier default."""
    return block_shuffle_index(k_next if shuffle == "paper" else k_prev, n, shuffle, device=device)


def blockdiag_matmul(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``diag(B_1, …, B_k) x`` along the last dim: ``x: (..., k b2)``, ``blocks: (k, b1, b2)`` → ``(..., k b1)``.

    Cost ``O(k b1 b2)`` per vector.
    """
    k, b1, b2 = blocks.shape
    if x.shape[-1] != k * b2:
        raise ValueError(f"x must have last dim {k * b2} (= {k} blocks × {b2}), got {x.shape[-1]}")
    y = torch.einsum("...kj,kij->...ki", x.reshape(*x.shape[:-1], k, b2), blocks)
    return y.reshape(*x.shape[:-1], k * b1)


def _check_perm(name: str, idx, n: int):
    if idx is None:
        return None
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or idx.shape != (n,):
        raise ValueError(f"{name} must be None or an int64 index tensor of shape ({n},)")
    if not torch.equal(torch.sort(idx).values, torch.arange(n, device=idx.device)):
        raise ValueError(f"{name} is not a permutation of range({n})")
    return idx


class GSMatrix:
    """``A = P_m B_m ⋯ P_1 B_1 P_0`` (see the module docstring), applied without forming A.

    Args:
        blocks: ``[B_1, …, B_m]``, each ``(k_j, b1_j, b2_j)``; consecutive sizes must chain:
            ``k_j b2_j = k_{j−1} b1_{j−1}``.
        perms: ``[P_0, …, P_m]`` (m + 1 gather index tensors, ``(P x)_i = x[idx[i]]``, or None for the identity).
            Default: identity outside, and between ``B_{j−1}`` and ``B_j`` (``n_j = k_j b2_j`` entries) a shuffle
            that makes consecutive blocks mix, chosen by ``shuffle``.
        shuffle: the default ``perms`` between factors: ``"paper"`` (default since issue 23) — the paper's
            ``P_(k_j, n_j)`` over the *next* factor's ``k_j`` blocks, which sends entry i to ``σ(i)`` (gather by
            ``shuffle_index(b2_j, n_j)``; the authors' Monarch kernel, and :class:`GSOrthogonal`'s P); ``"legacy"``
            — gather by ``shuffle_index(k_{j−1}, n_j)`` over the previous factor's blocks, the default of earlier
            lowrankopt versions (the transpose of the paper's P when ``k_{j−1} = k_j``). Only the default is
            affected: given ``perms`` keep their meaning.

    Shapes: A is ``(k_m b1_m) × (k_1 b2_1)``.
    """

    def __init__(
        self,
        blocks: Sequence[torch.Tensor],
        perms: Sequence[torch.Tensor | None] | None = None,
        *,
        shuffle: str = "paper",
    ) -> None:
        _check_shuffle(shuffle)
        blocks = list(blocks)
        if not blocks or any(not isinstance(b, torch.Tensor) or b.dim() != 3 for b in blocks):
            raise ValueError("blocks must be a non-empty list of (k, b1, b2) tensors")
        sizes = [blocks[0].shape[0] * blocks[0].shape[2]] + [b.shape[0] * b.shape[1] for b in blocks]
        for j in range(1, len(blocks)):
            if blocks[j].shape[0] * blocks[j].shape[2] != sizes[j]:
                raise ValueError(
                    f"blocks[{j}] takes {blocks[j].shape[0] * blocks[j].shape[2]} inputs but blocks[{j - 1}] "
                    f"gives {sizes[j]} outputs"
                )
        if perms is None:
            inner = [
                _between(blocks[j - 1].shape[0], blocks[j].shape[0], sizes[j], shuffle, blocks[j].device)
                for j in range(1, len(blocks))
            ]
            perms = [None, *inner, None]
        if len(perms) != len(blocks) + 1:
            raise ValueError(f"perms must have {len(blocks) + 1} entries (one more than blocks), got {len(perms)}")
        self.blocks = blocks
        self.perms = [_check_perm(f"perms[{j}]", p, sizes[j]) for j, p in enumerate(perms)]
        self.shape = (sizes[-1], sizes[0])

    @classmethod
    def order2(
        cls,
        L: torch.Tensor,
        R: torch.Tensor,
        P: torch.Tensor | None = None,
        P_L: torch.Tensor | None = None,
        P_R: torch.Tensor | None = None,
        *,
        shuffle: str = "paper",
    ) -> GSMatrix:
        """Definition 3.1: ``A = P_L (L P R) P_R`` for ``L: (k_L, b1_L, b2_L)``, ``R: (k_R, b1_R, b2_R)``; the
        permutations are gather index maps (None: the identity). ``P`` defaults, as in :class:`GSMatrix`, to the
        paper's ``P_(k_L, n)`` (``n = k_L b2_L``: gather by ``shuffle_index(b2_L, n)``) or, with
        ``shuffle="legacy"``, to the default before issue 23 (gather by ``shuffle_index(k_R, n)``); a given ``P`` is
        used as it is."""
        _check_shuffle(shuffle)
        if P is None:
            P = _between(R.shape[0], L.shape[0], R.shape[0] * R.shape[1], shuffle, R.device)
        return cls([R, L], [P_R, P, P_L])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` along the last dim of ``x: (..., n)`` → ``(..., m)``. Cost ``O(Σ_j k_j b1_j b2_j)`` per vector."""
        if x.shape[-1] != self.shape[1]:
            raise ValueError(f"x must have last dim {self.shape[1]}, got {x.shape[-1]}")
        for j, B in enumerate(self.blocks):
            if self.perms[j] is not None:
                x = x[..., self.perms[j]]
            x = blockdiag_matmul(x, B)
        if self.perms[-1] is not None:
            x = x[..., self.perms[-1]]
        return x

    __matmul__ = matmul

    def to_dense(self) -> torch.Tensor:
        """The dense ``(m, n)`` matrix (for tests and inspection). Cost ``O(n Σ_j k_j b1_j b2_j)``."""
        eye = torch.eye(self.shape[1], dtype=self.blocks[0].dtype, device=self.blocks[0].device)
        return self.matmul(eye).T

    def numel(self) -> int:
        """Number of block entries (parameters of an unconstrained GS matrix)."""
        return sum(b.numel() for b in self.blocks)


def gs_matmul(
    x: torch.Tensor,
    blocks: Sequence[torch.Tensor],
    perms: Sequence[torch.Tensor | None] | None = None,
    *,
    shuffle: str = "paper",
) -> torch.Tensor:
    """``A x`` along the last dim for the GS matrix ``A = GSMatrix(blocks, perms, shuffle=shuffle)`` (functional
    form; ``shuffle`` chooses the default ``perms`` only)."""
    return GSMatrix(blocks, perms, shuffle=shuffle).matmul(x)


def gs_project(
    A: torch.Tensor,
    L_shape: Sequence[int],
    R_shape: Sequence[int],
    P: torch.Tensor | None = None,
    *,
    shuffle: str = "paper",
) -> GSMatrix:
    """The Frobenius-nearest matrix of ``GS(I, P, I)`` (Algorithm 1): ``L P R`` with L, R of the given block
    shapes ``(k_L, b1_L, b2_L)`` and ``(k_R, b1_R, b2_R)``, ``A: (k_L b1_L, k_R b2_R)``. ``P`` is a gather index
    map (``(P x)_t = x[P[t]]``); it defaults, as in :meth:`GSMatrix.order2`, to the paper's ``P_(k_L, n)``
    (``shuffle="paper"``) or the default before issue 23 (``shuffle="legacy"``). Returns
    ``GSMatrix.order2(L, R, P)``.

    Block ``(k1, k2)`` of ``L P R`` is the sum of the rank-one terms ``l_t r_{P[t]}ᵀ`` (column t of L, row
    ``P[t]`` of R) over the inner indices t of L-block k1 whose source ``P[t]`` lies in R-block k2 (Prop. 1), so
    the blocks are independent and each is projected by its SVD truncated to that count (Eckart–Young). Cost:
    one SVD per ``b1_L × b2_R`` block.
    """
    _check_shuffle(shuffle)
    kL, b1L, b2L = L_shape
    kR, b1R, b2R = R_shape
    m, n, inner = kL * b1L, kR * b2R, kR * b1R
    if A.shape != (m, n) or kL * b2L != inner:
        raise ValueError(f"A must be ({m}, {n}) and k_L b2_L = k_R b1_R, got A {tuple(A.shape)}, {L_shape}, {R_shape}")
    idx = _between(kR, kL, inner, shuffle, A.device) if P is None else _check_perm("P", P, inner)
    L = A.new_zeros(kL, b1L, b2L)
    R = A.new_zeros(kR, b1R, b2R)
    for k1 in range(kL):
        ts = torch.arange(k1 * b2L, (k1 + 1) * b2L, device=A.device)
        for k2 in range(kR):
            joined = ts[(idx[ts] // b1R) == k2]  # inner L-inputs t whose P-source is in R-block k2
            if len(joined) == 0:
                continue
            block = A[k1 * b1L : (k1 + 1) * b1L, k2 * b2R : (k2 + 1) * b2R]
            U, S, Vh = torch.linalg.svd(block, full_matrices=False)
            c = min(len(joined), len(S))
            root = S[:c].sqrt()
            for j in range(c):
                t = int(joined[j])
                L[k1, :, t - k1 * b2L] = U[:, j] * root[j]
                src = int(idx[t])
                R[k2, src - k2 * b1R, :] = Vh[j] * root[j]
    return GSMatrix.order2(L, R, idx)


def _skew(params: torch.Tensor, b: int) -> torch.Tensor:
    """``(k, b(b−1)/2)`` packed strictly-upper entries → skew-symmetric ``(k, b, b)``."""
    K = params.new_zeros(params.shape[0], b, b)
    rows, cols = torch.triu_indices(b, b, offset=1, device=params.device)
    K[:, rows, cols] = params
    return K - K.transpose(1, 2)


def _orthogonal(K: torch.Tensor, kind: str, terms: int) -> torch.Tensor:
    if K.dtype in (torch.float16, torch.bfloat16):  # no half LU / matrix_exp kernels: map in float32, round once
        return _orthogonal(K.float(), kind, terms).to(K.dtype)
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    if kind == "cayley":  # (I + K)(I − K)⁻¹ = (I − K)⁻¹(I + K)
        return torch.linalg.solve(eye - K, eye + K)
    if kind == "exp":
        return torch.linalg.matrix_exp(K)
    if torch.linalg.matrix_norm(K.detach()).max() >= 1:  # the series of (I − K)⁻¹ converges only for ‖K‖ < 1
        raise ValueError("the Neumann map needs ‖K‖_F < 1 for every block (the series diverges); use map='cayley'")
    inv, power = eye.expand_as(K).clone(), eye.expand_as(K)  # (I − K)⁻¹ ≈ Σ_{j ≤ terms} K^j
    for _ in range(terms):
        power = power @ K
        inv = inv + power
    return (eye + K) @ inv


def gs_apply(
    x: torch.Tensor, L: torch.Tensor, R: torch.Tensor, *, transpose: bool = False, shuffle: str = "paper"
) -> torch.Tensor:
    """``Q x`` (or ``Qᵀ x`` with ``transpose=True``) along the last dim of ``x: (..., n)`` for ``Q = Pᵀ L P R``
    with square blocks ``L, R: (k, b, b)`` and the shuffle ``P`` of :func:`block_shuffle_index` (``shuffle``:
    ``"paper"``, the default, or ``"legacy"``) — what :class:`GSOrthogonal` computes.

    The same numbers as ``GSMatrix([R, L], [None, P, Pᵀ]).matmul(x)``, by two batched products over the blocks
    and no index gathers: the shuffles are reshapes and transposes, and the products run on the vectors laid out
    feature-major ``(k, b, B)``, so each shuffle is one strided view or copy. Cost ``O(B n b)`` for B vectors
    (``2 B n b`` multiply-adds) plus two copies of ``B n`` entries.
    """
    _check_shuffle(shuffle)
    k, b, _ = L.shape
    n = k * b
    if x.shape[-1] != n:
        raise ValueError(f"x must have last dim {n}, got {x.shape[-1]}")
    lead = x.shape[:-1]
    B = x.numel() // n if n else 0
    xt = x.reshape(B, k, b)
    if shuffle == "paper":  # P: row m·b + r ← r·k + m (block m of P u takes entry m of every block of u)
        if not transpose:  # Q x = Pᵀ L P R x
            u = torch.bmm(R, xt.permute(1, 2, 0))  # (k, b, B): row kk·b + i of R x
            u = u.reshape(b, k, B).transpose(0, 1)  # P u, a strided view
            v = torch.bmm(L, u)  # (k, b, B): row m·b + t of L P R x
            return v.permute(2, 1, 0).reshape(*lead, n)  # Pᵀ: row t·k + m ← m·b + t
        # Qᵀ x = Rᵀ Pᵀ Lᵀ P x
        u = x.reshape(B, b, k).permute(2, 1, 0)  # P x, feature-major (k, b, B)
        v = torch.bmm(L.mT, u)
        v = v.transpose(0, 1).reshape(k, b, B)  # Pᵀ, regrouped into R's blocks (one copy)
        return torch.bmm(R.mT, v).reshape(n, B).T.reshape(*lead, n)
    if not transpose:  # legacy: Q x = Pᵀ L P R x, P: row i·k + kk ← kk·b + i
        u = torch.bmm(R, xt.permute(1, 2, 0))  # (k, b, B): row kk·b + i of R x
        u = u.transpose(0, 1).reshape(k, b, B)  # P: row i·k + kk ← kk·b + i
        v = torch.bmm(L, u)  # (k, b, B): row m·b + r of L P R x
        return v.reshape(b, k, B).permute(2, 1, 0).reshape(*lead, n)  # Pᵀ: row kk·b + j ← j·k + kk
    # Qᵀ x = Rᵀ Pᵀ Lᵀ P x
    u = xt.permute(2, 1, 0).reshape(k, b, B)  # P x, feature-major
    v = torch.bmm(L.mT, u)
    v = v.reshape(b, k, B).transpose(0, 1)  # Pᵀ (a strided view that bmm reads as it is)
    return torch.bmm(R.mT, v).reshape(n, B).T.reshape(*lead, n)


def _gj_inverse(A: torch.Tensor) -> torch.Tensor:
    """The inverses of the ``(b, b)`` matrices ``A: (N, b, b)`` by Gauss–Jordan elimination without pivoting, in
    place on a copy laid out ``(b, b, N)`` so that every step is one elementwise operation over all N matrices
    (LAPACK's batched inverse handles one small matrix per call: about 4 µs per 8 × 8 block on a CPU core, against
    under 1 µs here for thousands of blocks). For ``A = I − K``, K skew-symmetric, no pivot vanishes: every leading
    block and every Schur complement has symmetric part positive definite, and elimination without pivoting is
    stable for such matrices (growth ``O(1 + ‖K‖²)``; Golub & Van Loan, §4.4). Cost ``O(N b³)``."""
    b = A.shape[-1]
    X = A.permute(1, 2, 0).contiguous()
    for i in range(b):
        p = 1 / X[i, i]
        col = X[:, i].clone()
        col[i] = 0
        X[:, i] = 0
        X[i, i] = 1
        X[i] *= p  # row i: the pivot row divided by the pivot, and column i holds 1 / pivot
        X.addcmul_(col[:, None], X[i].clone()[None], value=-1)  # the other rows: minus their multiple of it
    return X.permute(2, 0, 1).contiguous()  # (N, b, b) strides: batched products take one call, not one per block


def _cayley_values(K: torch.Tensor) -> torch.Tensor:
    """``(I + K)(I − K)⁻¹ = 2 (I − K)⁻¹ − I`` for skew-symmetric ``K: (N, b, b)``, by :func:`_gj_inverse`
    (no autograd). Cost ``O(N b³)``."""
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    return 2 * _gj_inverse(eye - K) - eye


_SKEW_GRAD: dict[tuple, torch.Tensor] = {}


def _skew_grad_matrix(b: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``E: (b², b(b−1)/2)`` with ``½`` at the flat position ``r b + c`` of the packed entry ``(r, c)`` (r < c) and
    ``−½`` at ``c b + r``: ``vec(∇_K) E`` is the gradient in the packed parameters (halved), cached."""
    key = (b, dtype, str(device))
    if key not in _SKEW_GRAD:
        rows, cols = torch.triu_indices(b, b, offset=1)
        E = torch.zeros(b * b, len(rows), dtype=dtype)
        E[rows * b + cols, torch.arange(len(rows))] = 0.5
        E[cols * b + rows, torch.arange(len(rows))] = -0.5
        _SKEW_GRAD[key] = E.to(device)
    return _SKEW_GRAD[key]


def _cayley_grad(Q: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """The gradient in the packed skew parameters ``p: (N, b(b−1)/2)`` of ``⟨G, Q⟩`` for the Cayley blocks of p,
    ``Q = 2 (I − K)⁻¹ − I``: ``dQ = 2 (I − K)⁻¹ dK (I − K)⁻¹`` and ``(I − K)⁻¹ = (Q + I) / 2``, so
    ``∇_K = ½ (Qᵀ + I) G (Qᵀ + I)``, and ``K = S − Sᵀ`` (S the upper triangle holding p) gives
    ``∇_p = ∇_K[r, c] − ∇_K[c, r]`` (one product with :func:`_skew_grad_matrix`). Cost ``O(N b³)``."""
    N, b, _ = Q.shape
    A = Q.mT + torch.eye(b, dtype=Q.dtype, device=Q.device)
    GK = torch.bmm(torch.bmm(A, G), A).reshape(N, b * b)
    return GK @ _skew_grad_matrix(b, GK.dtype, GK.device)


class _PooledCayley(torch.autograd.Function):
    """The Cayley blocks of the packed skew parameters ``(pL, pR)`` given their values ``Q`` (``(2k, b, b)``: L's
    blocks, then R's), which :meth:`CayleyPool.refresh` computed for many modules at once; backward is
    :func:`_cayley_grad`, for both factors in one call. Under ``create_graph`` the backward recomputes Q from the
    parameters by differentiable operations, so higher derivatives stay exact. (The forward takes ``ctx``: a
    separate ``setup_context`` would make every call bind its arguments through ``inspect``, about 0.1 ms.)"""

    @staticmethod
    def forward(ctx, pL, pR, Q):
        ctx.save_for_backward(pL, pR, Q)
        k = pL.shape[0]
        return Q[:k].clone(memory_format=torch.contiguous_format), Q[k:].clone(memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, gL, gR):
        pL, pR, Q = ctx.saved_tensors
        k, b = pL.shape[0], Q.shape[-1]
        if torch.is_grad_enabled():  # create_graph: Q as a differentiable function of the parameters
            Q = _orthogonal(_skew(torch.cat([pL, pR]), b), "cayley", 0)
        G = torch.cat([torch.zeros_like(Q[:k]) if gL is None else gL, torch.zeros_like(Q[k:]) if gR is None else gR])
        grad = _cayley_grad(Q, G)
        return grad[:k], grad[k:], None


class CayleyPool:
    """Modules whose Cayley blocks are computed together (:meth:`GSOrthogonal.blocks`): :func:`.convert_to_gsoft`
    puts all rotations of a model in one pool; a :class:`GSOrthogonal` built alone has a pool of its own. Members
    are held weakly; a pickled or deep-copied pool starts empty and its modules rejoin at their next call."""

    def __init__(self) -> None:
        self._members: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def add(self, module: GSOrthogonal) -> None:
        self._members.add(module)

    def refresh(self, trigger: GSOrthogonal) -> None:
        """Recompute, in one batched Cayley map (:func:`_cayley_values`), the cached blocks of every member that
        shares ``trigger``'s block size, dtype and device and whose cache is stale: an optimizer step changes every
        member at once, so the first rotation of the next forward recomputes all of them. Cost ``O(N b³)`` for the
        N blocks, plus ``O(N b²)`` to compare the members' parameters with their caches."""
        key = trigger._pool_key()
        with self._lock:
            members = [q for q in list(self._members) if q is not trigger and q._poolable() and q._pool_key() == key]
            stale = [trigger] + [q for q in members if not q._cache_valid()]
            # not inference tensors even under inference_mode: a cache built there must serve later training too
            with torch.inference_mode(False), torch.no_grad(), torch.autocast(trigger.L.device.type, enabled=False):
                params = [(q.L.detach().clone(), q.R.detach().clone()) for q in stale]
                Q = _cayley_values(_skew(torch.cat([t for pair in params for t in pair]), trigger.block_size))
                start = 0
                for q, (pL, pR) in zip(stale, params):
                    q._cayley_cache = (pL, pR, Q[start : start + 2 * q.nblocks])
                    start += 2 * q.nblocks


def share_cayley_pool(modules: Iterable[torch.nn.Module]) -> CayleyPool:
    """Put the :class:`GSOrthogonal` modules among ``modules`` into one new :class:`CayleyPool` (their Cayley blocks
    are then computed in one batched call per block size) and return it."""
    pool = CayleyPool()
    for m in modules:
        if isinstance(m, GSOrthogonal):
            m._pool = pool
            m._cayley_cache = None
            pool.add(m)
    return pool


_QR_RETRACTION = "its blocks are retracted onto the orthogonal group by QR"  # why half precision is refused


class GSOrthogonal(torch.nn.Module):
    """An ``n × n`` orthogonal GS matrix ``Q = Pᵀ L P R`` with orthogonal blocks, applied as ``y = Q x``.

    L and R are block-diagonal with ``nblocks`` blocks of size ``b = n / nblocks``; ``P`` is the paper's
    ``P_(nblocks, n)`` (:func:`block_shuffle_index`; ``shuffle="legacy"``: its transpose, see below).
    Every orthogonal matrix of this GS class has such a representation (Theorem 1 of the paper), so
    orthogonal blocks lose nothing. Initialized at ``Q = I``.

    Args:
        n: the size.
        block_size: b (give this or ``nblocks``).
        nblocks: the number of blocks.
        map: how blocks are made orthogonal from skew-symmetric parameters K (``b(b−1)/2`` per block):
            ``"cayley"`` ``(I + K)(I − K)⁻¹`` (exactly orthogonal; never reaches eigenvalue −1), ``"exp"``
            (``matrix_exp``), ``"neumann"`` (Cayley with ``(I − K)⁻¹`` replaced by ``neumann_terms`` terms of its
            series: cheaper, orthogonal only up to ``O(‖K‖^{terms+1})``).
        parametrization: ``"skew"`` (Euclidean parameters, any torch optimizer) or ``"orthogonal"`` (each
            factor's blocks a ``geoopt.ManifoldParameter`` on the orthogonal group, ``EuclideanStiefel`` with
            QR retraction, for RiemannianSGD / RiemannianAdam; ``map`` is then unused).
        shuffle: ``"paper"`` (default since issue 23: the paper's ``P_(r, br)``, as the authors' gsoft_demo code
            computes it, so its checkpoints load with :meth:`load_reference`) or ``"legacy"`` (the transpose,
            which earlier lowrankopt versions used: build with ``shuffle="legacy"`` to load their state dicts).
            Outputs differ by O(1) between the two unless ``b = n / b``, while the parameters have the same shapes:
            the state dict therefore records the permutation (``_extra_state``, :meth:`get_extra_state`) and
            ``load_state_dict`` refuses (also with ``strict=False``) a state saved with another permutation, or one
            without the record (saved before issue 23, hence ``"legacy"``) into a module whose permutation is not the
            legacy one, naming the ``shuffle`` to build with.

    Parameters: ``n (b − 1)`` with ``"skew"`` (two factors of ``nblocks · b(b−1)/2``), ``2 n b`` stored entries
    with ``"orthogonal"``; the paper counts ``2 n b`` either way (its code stores full ``b × b`` matrices and
    skew-symmetrizes them): :meth:`parameter_counts` gives both. Applying Q costs ``O(B n b)`` for B vectors plus
    ``O(n b²)`` to build the blocks.
    """

    def __init__(
        self,
        n: int,
        block_size: int | None = None,
        *,
        nblocks: int | None = None,
        map: str = "cayley",
        parametrization: str = "skew",
        neumann_terms: int = 5,
        shuffle: str = "paper",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        _check_shuffle(shuffle)
        if (block_size is None) == (nblocks is None):
            raise ValueError("give exactly one of block_size and nblocks")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        b = block_size if block_size is not None else (n // nblocks if nblocks and n % nblocks == 0 else 0)
        if isinstance(b, bool) or not isinstance(b, int) or b < 1 or n % b:
            raise ValueError(f"the block size must divide n = {n} (block_size={block_size}, nblocks={nblocks})")
        if map not in MAPS:
            raise ValueError(f"map must be one of {MAPS}, got {map!r}")
        if parametrization not in ("skew", "orthogonal"):
            raise ValueError(f"parametrization must be 'skew' or 'orthogonal', got {parametrization!r}")
        if isinstance(neumann_terms, bool) or not isinstance(neumann_terms, int) or neumann_terms < 1:
            raise ValueError(f"neumann_terms must be a positive int, got {neumann_terms!r}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in HALF_OR_FULL:
            raise TypeError(f"dtype must be one of {HALF_OR_FULL}, got {dtype}")
        if parametrization == "orthogonal" and dtype in HALF:  # refused here already, not only at the first forward
            raise TypeError(
                f"dtype must be float32 or float64 with parametrization='orthogonal', got {dtype}: {_QR_RETRACTION}, "
                "which torch does not implement in half precision (parametrization='skew' supports it)"
            )
        device = None if device is None else as_device(device)
        self.n, self.block_size, self.nblocks = n, b, n // b
        self.map, self.parametrization, self.neumann_terms, self.shuffle = map, parametrization, neumann_terms, shuffle
        k = self.nblocks
        if parametrization == "skew":
            self.L = torch.nn.Parameter(torch.zeros(k, b * (b - 1) // 2, dtype=dtype, device=device))
            self.R = torch.nn.Parameter(torch.zeros(k, b * (b - 1) // 2, dtype=dtype, device=device))
        else:
            eye = torch.eye(b, dtype=dtype, device=device).expand(k, b, b).clone()
            name, hint = f"GSOrthogonal(n={n}, block_size={b})", "use parametrization='skew' (any torch optimizer)"
            self.L = manifold_parameter(eye.clone(), geoopt.EuclideanStiefel(), f"{name}.L", hint)
            self.R = manifold_parameter(eye, geoopt.EuclideanStiefel(), f"{name}.R", hint)
        self.register_buffer("perm", block_shuffle_index(k, n, shuffle, device=device), persistent=False)
        self.register_buffer("inverse_perm", torch.argsort(self.perm), persistent=False)
        self._cayley_cache: tuple[torch.Tensor, ...] | None = None  # (L, R as they were, their blocks)
        self._pool = CayleyPool()
        self._pool.add(self)

    def extra_repr(self) -> str:
        return (
            f"n={self.n}, block_size={self.block_size}, map={self.map!r}, parametrization={self.parametrization!r}, "
            f"shuffle={self.shuffle!r}"
        )

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The orthogonal blocks ``(L, R)``, each ``(nblocks, b, b)``. Cost ``O(n b²)``.

        With the Cayley map (float32 / float64) the blocks of all modules of one :class:`CayleyPool` (a model's
        rotations, see :func:`share_cayley_pool`) with one block size, dtype and device are computed together, in
        one batched map, and cached with a copy of the parameters they came from: a module's blocks are recomputed
        (with every other stale member's) only when its parameters changed, in place or not. The cache holds
        values only; each call builds its own autograd node (backward ``O(n b²)``, two batched products), so
        graphs are never shared between calls."""
        if self.parametrization == "orthogonal":
            return self.L, self.R
        if self._poolable():
            pool = getattr(self, "_pool", None)
            if pool is None:  # a module pickled before pools existed
                pool = self._pool = CayleyPool()
            pool.add(self)  # here rather than in __init__: copies (deepcopy, pickle) join too
            if not self._cache_valid():
                pool.refresh(self)
            return _PooledCayley.apply(self.L, self.R, self._cayley_cache[2])
        b = self.block_size
        return tuple(_orthogonal(_skew(p, b), self.map, self.neumann_terms) for p in (self.L, self.R))

    def _poolable(self) -> bool:
        """Whether the blocks come from the pooled Cayley map (skew parameters, float32/64, eager mode)."""
        return (
            self.parametrization != "orthogonal"
            and self.map == "cayley"
            and self.L.dtype in (torch.float32, torch.float64)
            and self.R.dtype == self.L.dtype
            and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()  # torch.func: the differentiable map
        )

    def _pool_key(self) -> tuple:
        return self.block_size, self.L.dtype, self.L.device

    def _cache_valid(self) -> bool:
        """Whether the cached blocks belong to the parameters' current values (compared entry by entry: in-place
        changes through ``.data`` do not show in version counters). Cost ``O(n b)``."""
        c = getattr(self, "_cayley_cache", None)
        if c is None:
            return False
        return all(
            old.dtype == new.dtype and old.device == new.device and old.shape == new.shape and torch.equal(old, new)
            for old, new in ((c[0], self.L), (c[1], self.R))
        )

    def gs_matrix(self) -> GSMatrix:
        """Q as a :class:`GSMatrix` ``Pᵀ L P R`` with this module's permutation (either ``shuffle``): its middle
        ``P`` is the default of ``GSMatrix([R, L], shuffle=self.shuffle)`` (square blocks, ``k_L = k_R``), and
        ``P_L = Pᵀ``."""
        L, R = self.blocks()
        return GSMatrix([R, L], [None, self.perm, self.inverse_perm])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``Q x`` along the last dim of ``x: (..., n)``. The blocks are built with autocast off (in the
        parameters' dtype); only the products with ``x`` autocast."""
        if self.parametrization == "orthogonal":
            _refuse_half(self, self.L.dtype, _QR_RETRACTION)
        _check_input(x, self.n, self.L)
        return gs_apply(x, *self.full_precision_blocks(x), shuffle=self._shuffle())

    def full_precision_blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`blocks`, built with autocast off on ``x``'s device (entering that context only under autocast:
        building one costs about 0.05 ms)."""
        if not _autocasting(x):
            return self.blocks()
        with _full_precision(x):
            return self.blocks()

    def matrix(self) -> torch.Tensor:
        """The dense ``n × n`` Q (tests, merging into a weight). Cost ``O(n² b)``."""
        return self.gs_matrix().to_dense()

    def _shuffle(self) -> str:
        return getattr(self, "shuffle", "legacy")  # a module pickled before the choice existed used the legacy one

    @staticmethod
    def num_parameters(n: int, block_size: int) -> int:
        """``n (b − 1)``: the skew parameters of both factors (``ValueError`` unless n, b are positive ints and b
        divides n)."""
        n, block_size = _checked_sizes(n, block_size)
        return 2 * (n // block_size) * block_size * (block_size - 1) // 2

    @staticmethod
    def parameter_counts(n: int, block_size: int) -> dict[str, int]:
        """The trainable parameters of one rotation, two ways: ``"stored"`` — what this module stores with
        ``parametrization="skew"``, the packed skew entries ``2 · (n/b) · b(b−1)/2 = n (b − 1)``; ``"paper"`` — how
        the paper's tables count them, the entries of the two block-diagonal factors ``2 · (n/b) · b² = 2 n b`` (the
        authors' code stores each block as a full ``b × b`` matrix A and uses ``K = (A − Aᵀ)/2``). ``ValueError`` unless
        n and b are positive ints (bools refused) and b divides n."""
        n, block_size = _checked_sizes(n, block_size)
        return {"stored": GSOrthogonal.num_parameters(n, block_size), "paper": 2 * n * block_size}

    @torch.no_grad()
    def load_reference(self, L: torch.Tensor, R: torch.Tensor) -> None:
        """Load the parameters of the authors' ``GSOrthogonal`` (gsoft_demo: ``L``, ``R`` in
        ``gsoft_diffusion/gsoft/model/gs_orthogonal.py``, ``gsoft_L``, ``gsoft_R`` in
        ``glue/models/layers/gs_orthogonal.py``): full ``(nblocks, b, b)`` matrices A whose blocks are
        ``cayley((A − Aᵀ)/2)`` (or ``matrix_exp`` with ``method="exp"``) and whose product is
        ``BlockdiagButterflyMultiply(x, R, L)`` = ``Pᵀ L P R x`` with the paper's P. Stores the packed skew entries
        of ``(A − Aᵀ)/2``, so this module then computes the same Q (with the same ``map``). Needs
        ``parametrization="skew"``, ``shuffle="paper"`` and ``map="cayley"`` or ``"exp"`` (the reference's two maps).
        Raises ``ValueError`` otherwise, on a shape mismatch, or on non-finite (NaN / Inf) entries, naming the
        argument; both L and R are checked before anything is written (nothing loaded then). Cost ``O(n b)``."""
        if self.parametrization != "skew":
            raise ValueError("load_reference needs parametrization='skew' (the reference stores skew generators)")
        if self._shuffle() != "paper":
            raise ValueError("load_reference needs shuffle='paper' (the reference's permutation)")
        if self.map not in ("cayley", "exp"):
            raise ValueError(
                f"load_reference needs map='cayley' or map='exp' (the reference's maps), this module has "
                f"map={self.map!r}"
            )
        k, b = self.nblocks, self.block_size
        rows, cols = torch.triu_indices(b, b, offset=1, device=self.L.device)
        packed = []
        for name, A, target in (("L", L, self.L), ("R", R, self.R)):  # check both before writing either
            if not isinstance(A, torch.Tensor) or tuple(A.shape) != (k, b, b):
                raise ValueError(f"{name} must be a tensor of shape ({k}, {b}, {b}), got {getattr(A, 'shape', A)}")
            if not A.is_floating_point():
                raise ValueError(f"{name} must be a real floating tensor, got dtype {A.dtype}")
            K = 0.5 * (A - A.mT).to(device=target.device, dtype=torch.float64)
            values = K[:, rows, cols].to(target.dtype)
            if not (torch.isfinite(A).all() and torch.isfinite(values).all()):
                raise ValueError(f"{name} has non-finite entries (NaN or Inf, or beyond the range of {target.dtype})")
            packed.append(values)
        for target, values in zip((self.L, self.R), packed):
            target.copy_(values)
        self._cayley_cache = None

    # ---------------------------------------------------------------- the permutation's record in state dicts
    def get_extra_state(self) -> torch.Tensor:
        """The permutation's setting, saved in the state dict (key ``_extra_state``): int64 ``[code]``, 1 for
        ``shuffle="paper"``, 0 for ``"legacy"`` (``SHUFFLE_CODES``). The parameters have the same shapes under
        both, so without the record a state dict would load into a module with the other permutation silently
        (outputs O(1) apart unless ``b = n / b``)."""
        return torch.tensor([SHUFFLE_CODES[self._shuffle()]], dtype=torch.int64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Nothing to set: the permutation is fixed at construction; :meth:`_load_from_state_dict` checks the saved
        one."""

    def _permutation_mismatch(self, saved: object, name: str) -> str | None:
        """None if a state saved with the record ``saved`` (None: no record, a state dict of lowrankopt before issue
        23, whose permutation is now ``shuffle="legacy"``) has this module's permutation; else the error message.
        Compares the permutations, not the names: ``"paper"`` and ``"legacy"`` coincide when ``b = n / b``."""
        own = self._shuffle()
        if saved is None:
            shuffle = "legacy"
        else:
            record = _int_record(saved)
            names = {code: key for key, code in SHUFFLE_CODES.items()}
            if record is None or len(record) != 1 or record[0] not in names:
                return f"{name}: unreadable record of the GS permutation in the state dict: {saved!r}"
            shuffle = names[record[0]]
        # the permutations themselves (not the buffer: on the meta device or after to_empty it holds no values)
        k, n = self.nblocks, self.n
        if torch.equal(block_shuffle_index(k, n, shuffle), block_shuffle_index(k, n, own)):
            return None
        sizes = f"n={self.n}, block_size={self.block_size}"
        if saved is None:
            return (
                f"{name}: the state dict records no GS permutation: it was saved by lowrankopt before issue 23, whose "
                f"permutation is now shuffle='legacy'; this module has shuffle={own!r}, another permutation for "
                f"{sizes}. Build it with shuffle='legacy' (GSOFT: GSOFTConfig(..., shuffle='legacy'))"
            )
        return (
            f"{name}: the state dict was saved with shuffle={shuffle!r}, this module has shuffle={own!r}, another "
            f"permutation for {sizes}. Build it with shuffle={shuffle!r}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """torch's loading, after a check of the saved permutation (:meth:`_permutation_mismatch`) when the state
        dict loads anything into this module: a mismatch is an error of ``load_state_dict`` (also with
        ``strict=False``), and nothing of this module is loaded then."""
        name = f"GSOrthogonal {prefix.rstrip('.') or '(root)'}"
        _load_with_record(
            self, super()._load_from_state_dict, lambda saved: self._permutation_mismatch(saved, name), state_dict,
            prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs=error_msgs,
        )  # fmt: skip


def _checked_sizes(n: object, block_size: object) -> tuple[int, int]:
    """``(n, b)`` as positive Python ints with b dividing n, else ``ValueError`` naming the argument."""
    n, block_size = as_positive_int("n", n), as_positive_int("block_size", block_size)
    if n % block_size:
        raise ValueError(f"block_size must divide n, got n={n}, block_size={block_size}")
    return n, block_size
