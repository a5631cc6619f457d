"""Tangent vectors: δ-coordinates plus the base point they belong to."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .._checks import check_scalar

# For an annotation only. base imports this module first; ``from . import`` then binds base while it is still being
# initialized, which is harmless: the annotations are strings, evaluated after both modules are loaded.
from . import base as _base


class TangentVector:
    """A tangent vector ξ at ``base`` in orthonormal δ-coordinates ``coords``.

    Matrices: ``coords = (A, B)`` with ``ξ = A Vᵀ + U Bᵀ`` and ``Vᵀ B = 0``.
    Tensor trains: ``coords = (δ_1, ..., δ_d)`` with ``ξ = Σ_k U_{<k} δ_k V_{>k}`` and the right gauge
    ``δ_k V_kᵀ = 0`` (right unfoldings) for k ≥ 2.
    The coordinates are orthonormal: ``<ξ, η> = Σ <coords_ξ, coords_η>``. Arithmetic costs
    ``O(#coordinates)``; combining vectors at different base points raises ``ValueError``.

    This constructor does not check its arguments (it is on every hot path); build vectors from raw coordinates
    with the manifold's ``tangent(x, coords)``, which checks shapes, dtype, device and finiteness. The manifolds'
    operations check that a vector's coordinates have its base point's dtype and device.
    """

    __slots__ = ("manifold", "base", "coords")

    def __init__(self, manifold: _base.LowRankManifold, base: Any, coords: Iterable[torch.Tensor]) -> None:
        self.manifold, self.base, self.coords = manifold, base, tuple(coords)

    def _check(self, other: TangentVector, op: str) -> None:
        if not isinstance(other, TangentVector):
            raise TypeError(f"cannot {op} a TangentVector and a {type(other).__name__}")
        if other.base is not self.base:
            raise ValueError(
                f"cannot {op} tangent vectors at different base points; move one with manifold.transp first"
            )
        if other.dtype != self.dtype or other.device != self.device:  # only hand-built vectors can differ
            raise TypeError(
                f"cannot {op} tangent vectors of dtypes/devices {self.dtype}/{self.device} and "
                f"{other.dtype}/{other.device}"
            )

    def _new(self, coords) -> TangentVector:
        return TangentVector(self.manifold, self.base, coords)

    def __add__(self, other: TangentVector) -> TangentVector:
        self._check(other, "add")
        return self._new(a + b for a, b in zip(self.coords, other.coords))

    def __sub__(self, other: TangentVector) -> TangentVector:
        self._check(other, "subtract")
        return self._new(a - b for a, b in zip(self.coords, other.coords))

    def __neg__(self) -> TangentVector:
        return self._new(-a for a in self.coords)

    def __mul__(self, alpha) -> TangentVector:
        if isinstance(alpha, TangentVector):
            return NotImplemented
        alpha = check_scalar("alpha", alpha)
        return self._new(a * alpha for a in self.coords)

    __rmul__ = __mul__

    def __truediv__(self, alpha) -> TangentVector:
        alpha = check_scalar("alpha", alpha, nonzero=True)
        return self._new(a / alpha for a in self.coords)

    def inner(self, other: TangentVector) -> torch.Tensor:
        """Riemannian inner product with a vector at the same base point."""
        self._check(other, "take the inner product of")
        return sum((a * b).sum() for a, b in zip(self.coords, other.coords))

    def norm(self) -> torch.Tensor:
        return torch.sqrt(sum((a * a).sum() for a in self.coords))

    def to_ambient(self) -> Any:
        """ξ as a rank-2r LowRankMatrix / TensorTrain (see the manifold's ``to_ambient``)."""
        return self.manifold.to_ambient(self.base, self)

    def detach(self) -> TangentVector:
        return self._new(a.detach() for a in self.coords)

    @property
    def dtype(self) -> torch.dtype:
        return self.coords[0].dtype

    @property
    def device(self) -> torch.device:
        return self.coords[0].device

    def __repr__(self) -> str:
        return f"TangentVector(manifold={self.manifold!r}, coords={[tuple(c.shape) for c in self.coords]})"
