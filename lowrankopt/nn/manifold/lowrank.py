"""Linear layers whose weight lives on a fixed-rank / fixed-TT-rank manifold, trained by geoopt's
Riemannian optimizers (``RiemannianSGD``, ``RiemannianAdam``) unmodified.

The weight is a ``geoopt.ManifoldParameter`` holding the packed factors (see
:mod:`lowrankopt.manifolds.geoopt`); ``forward`` makes ``.grad`` come out in δ-coordinates (the straight-through
form; for TTLinear a node with the same gradient at rank r, :mod:`.tt_product`). Never form the dense weight; use
``weight_decay=0`` for these parameters. A step of a Euclidean optimizer (``torch.optim.Adam``, ...) on the weight
raises ``TypeError`` (it would leave the manifold).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..._checks import as_positive_int
from ...formats.lowrank import LowRankMatrix
from ...formats.tt import TensorTrain, TTMatrix
from ...manifolds.base import qr_positive
from ...manifolds.geoopt import GeooptFixedRank, GeooptFixedTTMatrixRank, GeooptManifold, manifold_parameter
from .._common import _autocast_output, _check_input, _dense_linear, _full_precision, _init_bias, _kw, _refuse_half

__all__ = ["LowRankLinear", "TTLinear"]


class _PackedLinear(torch.nn.Module):
    """What :class:`LowRankLinear` and :class:`TTLinear` share: ``weight``, a ``ManifoldParameter`` on one of
    the packed geoopt manifolds, and an optional plain ``bias``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        """Check and record the sizes (positive ints); the subclass then builds ``weight`` and ``bias``."""
        super().__init__()
        self.in_features = as_positive_int("in_features", in_features)
        self.out_features = as_positive_int("out_features", out_features)

    def _init_parameters(
        self,
        packed: torch.Tensor,
        manifold: GeooptManifold,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | None,
        generator: torch.Generator | None,
    ) -> None:
        """``weight``, the packed point ``packed`` of ``manifold`` as a ``ManifoldParameter`` named after the layer,
        and ``bias`` (``nn.Linear``'s initialization) if asked for."""
        self.weight = manifold_parameter(packed, manifold, f"{self._name()}.weight")
        self.bias = _init_bias(self.out_features, self.in_features, bias, dtype, device, generator)

    @property
    def manifold(self) -> GeooptManifold:
        """The packed manifold ``weight`` lives on."""
        return self.weight.manifold

    def _name(self) -> str:
        """The layer as error messages name it."""
        return f"{type(self).__name__}(in_features={self.in_features}, out_features={self.out_features})"

    def _weight(self) -> torch.Tensor:
        """The packed weight, refused in half precision (the packed manifolds need QR and SVD)."""
        _refuse_half(self, self.weight.dtype, "its packed weight lives on a manifold whose retraction needs QR and SVD")
        return self.weight

    def _output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Add the bias and restore the leading dimensions of ``x``."""
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)  # a no-op but under autocast, where y has the autocast dtype
        return y.reshape(*x.shape[:-1], self.out_features)


class LowRankLinear(_PackedLinear):
    """``y = x Wᵀ + b`` with ``W: (out_features, in_features)`` of rank exactly ``rank``.

    The weight is a ``ManifoldParameter`` on :class:`GeooptFixedRank` ``(out_features, in_features,
    rank)`` packing ``W = C Vᵀ`` (``C: (out, r)``, ``V: (in, r)`` orthonormal); ``numel = (in + out) r``.
    (lowrankopt 0.1 packed ``[U | S | V]``: such state dicts are converted when loaded.)
    Train it with ``geoopt.optim.RiemannianSGD`` / ``RiemannianAdam``
    and ``weight_decay=0`` for the weight.

    Args:
        in_features: size of the input.
        out_features: size of the output.
        rank: the rank r, ``1 <= r <= min(in, out)``.
        bias: learn an additive bias (a plain ``nn.Parameter``).
        dtype: of the parameters (default: ``torch.get_default_dtype()``).
        device: of the parameters.
        generator: for the initialization. ``U``, ``V`` Haar-random, ``S = s I`` with
            ``s = sqrt(out / (3 r))``, so that the mean squared entry of W is ``1 / (3 in)`` as for
            ``nn.Linear``'s default; bias ``U(-1/sqrt(in), 1/sqrt(in))``.

    Forward cost ``O(B (in + out) r)`` for a batch of B rows, ``W`` never formed; training doubles it
    (the straight-through terms).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(in_features, out_features)
        rank = as_positive_int("rank", rank)
        most = min(self.in_features, self.out_features)
        if rank > most:
            raise ValueError(f"rank must be <= min(in_features, out_features) = {most}")
        dtype, device, gdev = _kw(dtype, device, generator)
        self.rank = rank
        manifold = GeooptFixedRank(self.out_features, self.in_features, rank)
        kw = dict(dtype=dtype, device=gdev, generator=generator)
        U = torch.linalg.qr(torch.randn(self.out_features, rank, **kw))[0]
        V = torch.linalg.qr(torch.randn(self.in_features, rank, **kw))[0]
        S = math.sqrt(self.out_features / (3 * rank)) * torch.eye(rank, dtype=dtype, device=gdev)
        packed = manifold.pack(LowRankMatrix._trusted(U, S, V)).to(device)
        self._init_parameters(packed, manifold, bias, dtype, device, generator)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (..., in)`` -> ``(..., out)``: ``x Wᵀ = (x V) Cᵀ``. When a gradient is needed, the straight-through
        form of the manifold's linearization ``(C + z_C) Vᵀ + U z_Vᵀ`` (``z = p − p.detach()`` split like the
        factors, ``U`` the orthonormal factor of C), so that ``weight.grad`` is the δ-gradient:
        ``(x V)(C + z_C)ᵀ + (x z_V) Uᵀ`` (one more ``O(out r²)`` QR per training step)."""
        x2 = _check_input(x, self.in_features, self._weight())
        p = self.weight
        C, V = self.manifold.unpack_tensor(p.detach())
        xv = x2 @ V
        if torch.is_grad_enabled() and p.requires_grad:
            zC, zV = self.manifold.unpack_tensor(p - p.detach())
            U = qr_positive(C)[0]  # the frame the manifold's coordinates refer to
            y = xv @ (C + zC).T + (x2 @ zV) @ U.T
        else:
            y = xv @ C.T
        return self._output(y, x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Convert a weight packed by lowrankopt 0.1 (``[U | S | V]``, ``(in + out) r + r²`` entries) to ``[C | V]``."""
        key, r = prefix + "weight", self.rank
        w = state_dict.get(key)
        if isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() == (self.in_features + self.out_features + r) * r:
            m, n = self.out_features, self.in_features
            U, S, V = w[: m * r].reshape(m, r), w[m * r : m * r + r * r].reshape(r, r), w[m * r + r * r :].reshape(n, r)
            state_dict[key] = self.manifold.pack(LowRankMatrix._trusted(U, S, V)).to(w.dtype)  # torch's own copy
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def weight_matrix(self) -> LowRankMatrix:
        """The weight as a LowRankMatrix (a detached copy, orthonormal ``U``, ``V``). For a
        differentiable one use ``self.manifold.straight_through(self.weight)``."""
        return self.manifold.unpack(self.weight, f"{self._name()}.weight")

    def to_dense(self) -> torch.nn.Linear:
        """An equivalent ``nn.Linear`` (forms the dense weight: ``O(in · out · r)``)."""
        return _dense_linear(self.weight_matrix().full(), None if self.bias is None else self.bias.detach())

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, rank: int) -> LowRankLinear:
        """The best rank-``rank`` approximation (truncated SVD) of ``linear``'s weight, and its bias.
        Cost ``O(in · out · min(in, out))``. The result must have rank exactly ``rank``."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        W = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            dtype=W.dtype,
            device=W.device,
        )
        with torch.no_grad():
            X = LowRankMatrix.from_dense(W, rank)
            s = torch.diagonal(X.S)
            if float(s[-1]) <= float(s[0]) * max(W.shape) * torch.finfo(W.dtype).eps:
                raise ValueError(f"linear.weight has rank < {rank}: choose a smaller rank")
            layer.weight.copy_(layer.manifold.pack(X))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer


# ---------------------------------------------------------------------- TT-matrix layer
def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _balanced_factors(n: int, d: int) -> list[int]:
    """d positive ints, non-decreasing, with product n, closest to n^(1/d) (least squares in log)."""
    target = math.log(n) / d
    best, best_cost = None, math.inf
    divs = _divisors(n)

    def rec(rem, k, lo, acc, cost):
        nonlocal best, best_cost
        if k == 1:
            if rem >= lo:
                c = cost + (math.log(rem) - target) ** 2
                if c < best_cost:
                    best, best_cost = acc + [rem], c
            return
        for f in divs:
            if f < lo or rem % f or f**k > rem:
                continue
            rec(rem // f, k - 1, f, acc + [f], cost + (math.log(f) - target) ** 2)

    rec(n, d, 1, [], 0.0)
    return best


def _factors(name: str, features: int, factors, d: int | None) -> list[int] | None:
    if factors is None:
        return None
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence):
        raise TypeError(f"{name} must be a sequence of positive ints, got {type(factors).__name__}")
    factors = [as_positive_int(f"{name}[{k}]", f) for k, f in enumerate(factors)]
    if not factors:
        raise ValueError(f"{name} must not be empty")
    if math.prod(factors) != features:
        raise ValueError(f"{name} {factors} has product {math.prod(factors)}, not {features}")
    if d is not None and len(factors) != d:
        raise ValueError(f"{name} has {len(factors)} factors but d = {d}")
    return factors


class TTLinear(_PackedLinear):
    """``y = x Wᵀ + b`` with ``W: (out, in)`` a TT-matrix of fixed TT-ranks.

    ``W[(i_1..i_d), (j_1..j_d)] = G_1[i_1, j_1] ⋯ G_d[i_d, j_d]`` with cores
    ``G_k: (r_{k-1}, out_k, in_k, r_k)``, row and column indices flattened row-major
    (``out = Π out_k``, ``in = Π in_k``; see :class:`TTMatrix`). The weight is a point of the manifold of
    TT-matrices (:class:`~lowrankopt.manifolds.FixedTTMatrixRank`, on :class:`GeooptFixedTTMatrixRank`), packed as
    its right-orthogonal merged cores ``(r_{k-1}, out_k · in_k, r_k)``.

    Args:
        in_features: size of the input.
        out_features: size of the output.
        rank: an int (the maximal TT-rank; each bond is clipped to the largest rank its modes allow)
            or ``d − 1`` ints (exact ranks; must be attainable).
        in_factors: the input mode sizes (product ``in_features``). If ``in_factors`` and
            ``out_factors`` are None they are chosen balanced (as close to ``features^(1/d)`` as the divisors allow),
            ``in_factors`` non-decreasing and ``out_factors`` non-increasing so that the merged
            modes ``out_k · in_k`` are balanced too.
        out_factors: the output mode sizes (product ``out_features``).
        d: the number of cores, when neither factor list is given (default 3; factors of 1 are allowed).
        bias: learn an additive bias.
        dtype: as for :class:`LowRankLinear`.
        device: as for :class:`LowRankLinear`.
        generator: for the initialization: Gaussian cores, scaled so that the mean squared entry of W
            is ``1 / (3 in)`` (``nn.Linear``'s default).

    **Cost.** The forward pass applies the TT-matrix to the batch by the cheaper of two sweeps
    (:meth:`TTMatrix.matvec`; multiply-adds for B rows, ``o_k``/``i_k`` the out/in factors, ``r_k`` the ranks):

    - left to right: ``B Σ_k o_1⋯o_k · i_k⋯i_d · r_{k-1} r_k``;
    - right to left: ``B Σ_k i_1⋯i_k · o_k⋯o_d · r_{k-1} r_k``

    (at ``1024 → 1024``, factors ``(8, 8, 16)``, ``(16, 8, 8)``, ranks 8, B = 256: 335M and 101M), chosen per call
    from the shapes; the dense W is never formed (memory stays ``O(B · state + d n r²)``). Training (a gradient for
    the weight) runs one autograd node at the ranks r (:func:`~lowrankopt.formats.tt_product.tt_delta_product`):
    three sweeps of the cheaper cost above in all, forward and backward, plus ``O(d n r³)`` for the frames — not the
    matvec on the straight-through TT-matrix, whose ranks ``2 r_k`` make each sweep up to 4× dearer (that one serves
    only a backward pass under ``create_graph``). Measured against ``nn.Linear`` in docs/benchmarks.md (``layers``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | Sequence[int],
        in_factors: Sequence[int] | None = None,
        out_factors: Sequence[int] | None = None,
        bias: bool = True,
        *,
        d: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(in_features, out_features)
        if d is not None:
            d = as_positive_int("d", d)
        in_f = _factors("in_factors", self.in_features, in_factors, d)
        out_f = _factors("out_factors", self.out_features, out_factors, d)
        if in_f is not None and out_f is not None and len(in_f) != len(out_f):
            raise ValueError(f"in_factors has {len(in_f)} factors but out_factors has {len(out_f)}")
        d = len(in_f) if in_f is not None else len(out_f) if out_f is not None else (3 if d is None else d)
        if d < 2:
            raise ValueError(f"a TT-matrix layer needs d >= 2 cores, got d = {d}")
        if in_f is None:
            in_f = _balanced_factors(self.in_features, d)
        if out_f is None:
            out_f = _balanced_factors(self.out_features, d)[::-1]
        modes = [o * i for o, i in zip(out_f, in_f)]
        ranks = self._ranks(rank, modes)
        dtype, device, _ = _kw(dtype, device, generator)
        self.in_factors, self.out_factors = tuple(in_f), tuple(out_f)
        manifold = GeooptFixedTTMatrixRank(out_f, in_f, ranks)
        self.ranks = manifold.ranks
        x = TensorTrain.random(modes, list(ranks), dtype=dtype, device=device, generator=generator)
        packed = manifold.pack(TTMatrix.from_merged(x, out_f, in_f))
        C = manifold.unpack_tensor(packed)[0]  # ‖X‖ = ‖C_1‖ in right-orthogonal form
        C.mul_(math.sqrt(self.out_features / 3) / torch.linalg.vector_norm(C))
        self._init_parameters(packed, manifold, bias, dtype, device, generator)

    @staticmethod
    def _ranks(rank, modes) -> list[int]:
        d = len(modes)
        if isinstance(rank, (str, bytes)):
            raise TypeError(f"rank must be an int or {d - 1} ints, got {type(rank).__name__}")
        if not isinstance(rank, Sequence):  # one maximal rank (a Python, numpy or torch integer)
            r = as_positive_int("rank", rank)
            full = [1] + [r] * (d - 1) + [1]
            for k in range(1, d):  # clip to what the modes allow, from both sides
                full[k] = min(full[k], full[k - 1] * modes[k - 1])
            for k in range(d - 1, 0, -1):
                full[k] = min(full[k], full[k + 1] * modes[k])
            return full[1:-1]
        ranks = [as_positive_int(f"rank[{k}]", r) for k, r in enumerate(rank)]
        if len(ranks) != d - 1:
            raise ValueError(f"rank must be an int or {d - 1} ints (one per bond), got {len(ranks)}")
        return ranks  # attainability is checked by FixedTTRank

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, in_factors={self.in_factors}, "
            f"out_factors={self.out_factors}, ranks={self.ranks}, bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (..., in)`` -> ``(..., out)`` by the TT-matrix matvec, the cheaper sweep (class docstring), W never
        formed. With a gradient needed for the weight, the matvec of the manifold's linearization (the δ-product
        node), so that ``weight.grad`` is the δ-gradient."""
        x2 = _check_input(x, self.in_features, self._weight())
        p = self.weight
        # under autocast: the products in the parameters' dtype (they must not autocast), the output cast once
        with _full_precision(x2):  # the frames (QR) in the parameters' dtype
            if torch.is_grad_enabled() and p.requires_grad:
                W = self.manifold.straight_through(p)
            else:
                W = self.manifold.base.point_from_parts(self.manifold.unpack_tensor(p.detach()))
            y = W.matvec(x2.to(p.dtype))
        return self._output(_autocast_output(y), x)

    def weight_matrix(self) -> TTMatrix:
        """The weight as a TTMatrix with cores ``(r_{k-1}, out_k, in_k, r_k)`` (a detached copy)."""
        return self.manifold.unpack(self.weight, f"{self._name()}.weight")

    def to_dense(self) -> torch.nn.Linear:
        """An equivalent ``nn.Linear`` (forms the dense weight: ``O(in · out · r)``)."""
        return _dense_linear(self.weight_matrix().full(), None if self.bias is None else self.bias.detach())
