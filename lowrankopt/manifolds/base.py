"""What the fixed-rank and fixed-TT-rank manifolds share: tangent-space arithmetic in δ-coordinates
and the δ-gradient engine (differentiate f at a point through an object linear in δ with detached
frames; see DESIGN.md, "The delta trick")."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

from .._checks import check_finite, check_like, check_random_options, check_tensor
from .tangent import TangentVector


def grad_or_zeros(
    out: torch.Tensor, inputs, create_graph: bool = False, grad_outputs=None, retain_graph: bool | None = None
) -> list[torch.Tensor]:
    """torch.autograd.grad that returns zeros for inputs ``out`` does not depend on."""
    if out.requires_grad:
        grads = torch.autograd.grad(
            out,
            inputs,
            grad_outputs=grad_outputs,
            create_graph=create_graph,
            retain_graph=retain_graph,
            allow_unused=True,
        )
    else:
        grads = [None] * len(inputs)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


def check_scalar_output(val) -> torch.Tensor:
    if not isinstance(val, torch.Tensor) or val.numel() != 1:
        raise TypeError(
            f"f must return a scalar tensor, got {type(val).__name__}"
            + (f" of shape {tuple(val.shape)}" if isinstance(val, torch.Tensor) else "")
        )
    return val.reshape(())


def check_full_rank(x, bond_scales: Callable[[], Iterable[tuple[str, torch.Tensor]]], needed: str) -> None:
    """Refuse a point ``x`` at which the curvature term of the exact Hessian does not exist: it divides by the
    ``scales`` of each ``(where, scales)`` pair of ``bond_scales()`` (singular values of S, or ``|diag R_k|`` at TT bond
    k), so they must all be clearly nonzero (the smallest > largest · count · eps); otherwise the term would be garbage
    or a "singular" error from deep inside torch. Checked once per point: a pass is kept in x's cache, next to its
    frames, so Hessian-vector products at x (many per trust-region step) pay no SVD and no host read."""
    if x._cache.get("full_rank"):
        return
    for where, scales in bond_scales():
        scales = scales.detach().abs()
        if float(scales.min()) <= float(scales.max()) * scales.numel() * torch.finfo(scales.dtype).eps:
            raise ValueError(
                f"x is rank-deficient{where}: the curvature term needs {needed} exactly "
                "(use curvature=False, or a point of exact rank)"
            )
    x._cache["full_rank"] = True


@contextmanager
def naming_non_finite(v: TangentVector, name: str = "v") -> Iterator[None]:
    """Run the factorizations (QR, SVD) of a step from ``x`` along ``v``; if one fails (``torch.linalg.LinAlgError``,
    as an SVD of NaN does) and ``v`` has NaN/Inf coordinates, raise the ValueError that names the coordinate instead.
    ``v`` is looked at only after a failure, so finite input costs nothing (no reduction, no host read per step)."""
    try:
        yield
    except torch.linalg.LinAlgError as err:
        for i, c in enumerate(v.coords):
            if not bool(torch.isfinite(c).all()):
                raise ValueError(f"{name}.coords[{i}] contains NaN or Inf") from err
        raise


class LowRankManifold(ABC):
    """Base class: a manifold of fixed-rank objects with δ-coordinate tangent vectors.

    Subclasses set ``point_type`` and ``ambient_shape`` and implement the hooks below.
    """

    point_type: type

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def _check_point(self, x, name: str = "x") -> None: ...

    @abstractmethod
    def _coord_shapes(self, x) -> list[tuple[int, ...]]: ...

    @abstractmethod
    def _gauge(self, x, coords) -> list[torch.Tensor]:
        """Orthogonal projection of raw coordinates onto the gauge (horizontal) subspace."""

    @abstractmethod
    def _linearization(self, x, deltas):
        """The object ``x + T_x(δ)`` (frames detached) on which f is differentiated."""

    @abstractmethod
    def _second_fundamental(self, x, xi: TangentVector, deltas):
        """Objects ``(x + Y(η), Y(η))`` with ``Y(η) = D²φ[W(ξ), W(η)]`` (see autodiff.py)."""

    @abstractmethod
    def to_ambient(self, x, v: TangentVector): ...

    @abstractmethod
    def retr(self, x, v: TangentVector): ...

    @property
    @abstractmethod
    def dim(self) -> int: ...

    def _key(self):
        return (type(self).__name__,) + tuple(self._dims())

    def __eq__(self, other) -> bool:
        return isinstance(other, LowRankManifold) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    # ------------------------------------------------------------------ tangent vectors
    def _check_tangent(self, x, v, name: str = "v") -> None:
        """``v`` is a TangentVector at ``x`` whose coordinates have x's dtype and device (metadata only: no reduction,
        no host read, as this runs on every step; finiteness is checked where vectors are built, :meth:`tangent`, and
        named by :func:`naming_non_finite` where a retraction fails on it)."""
        if not isinstance(v, TangentVector):
            raise TypeError(f"{name} must be a TangentVector, got {type(v).__name__}")
        if v.base is not x:
            raise ValueError(f"{name} is not a tangent vector at this point x (its base point is another object)")
        for i, c in enumerate(v.coords):
            check_like(f"{name}.coords[{i}]", c, "x", x)

    def tangent(self, x, coords) -> TangentVector:
        """The tangent vector with the given raw coordinates after the gauge projection.

        ``coords`` must have the shapes of :meth:`zero_tangent`'s coordinates, x's dtype and device, and finite
        entries (else ``ValueError``/``TypeError`` naming the coordinate). Cost ``O(dim · r)``.
        """
        self._check_point(x)
        shapes = self._coord_shapes(x)
        coords = list(coords)
        for i, c in enumerate(coords):
            check_tensor(f"coords[{i}]", c, finite=False)
        if len(coords) != len(shapes) or any(tuple(c.shape) != s for c, s in zip(coords, shapes)):
            raise ValueError(f"coords must have shapes {shapes}, got {[tuple(c.shape) for c in coords]}")
        for i, c in enumerate(coords):
            check_like(f"coords[{i}]", c, "x", x)
        check_finite([(f"coords[{i}]", c) for i, c in enumerate(coords)])
        return TangentVector(self, x, self._gauge(x, coords))

    def zero_tangent(self, x) -> TangentVector:
        """The zero vector of T_x. Cost ``O(dim)``."""
        self._check_point(x)
        return TangentVector(self, x, [torch.zeros(s, dtype=x.dtype, device=x.device) for s in self._coord_shapes(x)])

    def random_tangent(self, x, generator: torch.Generator | None = None) -> TangentVector:
        """A unit-norm tangent vector with Gaussian (isotropic in T_x) direction. Cost ``O(dim · r)``."""
        self._check_point(x)
        _, _, gdev = check_random_options(x.dtype, x.device, generator)
        raw = [
            torch.randn(s, dtype=x.dtype, device=gdev, generator=generator).to(x.device) for s in self._coord_shapes(x)
        ]
        v = TangentVector(self, x, self._gauge(x, raw))
        return v / v.norm()

    def inner(self, x, u: TangentVector, v: TangentVector) -> torch.Tensor:
        """Riemannian (Euclidean, induced) inner product; the δ-coordinates are orthonormal so this is
        the coordinate dot product. Cost ``O(dim)``."""
        self._check_tangent(x, u, "u")
        self._check_tangent(x, v, "v")
        return u.inner(v)

    def norm(self, x, u: TangentVector) -> torch.Tensor:
        self._check_tangent(x, u, "u")
        return u.norm()

    # ------------------------------------------------------------------ δ-gradients
    def _zero_deltas(self, x) -> list[torch.Tensor]:
        return [torch.zeros(s, dtype=x.dtype, device=x.device, requires_grad=True) for s in self._coord_shapes(x)]

    def _delta_grad(self, x, f, create_graph: bool = False):
        """``(f(x), ∂f(x + T_x(δ))/∂δ at δ = 0, δ)`` — the raw (un-gauged) δ-gradient."""
        deltas = self._zero_deltas(x)
        with torch.enable_grad():
            val = check_scalar_output(f(self._linearization(x, deltas)))
            grads = grad_or_zeros(val, deltas, create_graph=create_graph)
        return val, grads, deltas

    def proj(self, x, z) -> TangentVector:
        """Orthogonal projection of ``z`` onto T_x.

        ``z`` may be a dense tensor of the ambient shape (cost ``O(N r)``, N = its number of
        entries), a LowRankMatrix / TensorTrain of rank ``r_z`` (cost ``O((m + n) r r_z)`` /
        ``O(d n r r_z (r + r_z))``, never densified), or a TangentVector (transported by projection, as
        :meth:`transp`: not checked for NaN/Inf, which a linear map carries over to the result).
        Computed as the gauged δ-gradient of the linear function ``<z, ·>``. ``z`` must have x's dtype and device;
        a dense ``z`` must have finite entries.
        """
        self._check_point(x)
        if isinstance(z, TangentVector):
            if z.base is x:
                return z
            z.manifold._check_tangent(z.base, z, "z")
            return self.proj(x, z.manifold.to_ambient(z.base, z))
        self._check_ambient(x, z)
        _, grads, _ = self._delta_grad(x, lambda Y: Y.inner(z))
        return TangentVector(self, x, self._gauge(x, [g.detach() for g in grads]))

    def transp(self, x, y, v: TangentVector) -> TangentVector:
        """Vector transport from T_x to T_y by orthogonal projection of the ambient vector.

        A linear map of v, computed without a factorization: coordinates with NaN/Inf give a vector with NaN/Inf
        coordinates (not checked: a check would cost a reduction and a host read per step; :meth:`tangent` refuses
        such coordinates and :meth:`retr` names them)."""
        self._check_tangent(x, v)
        self._check_point(y, "y")
        check_like("y", y, "x", x)
        return self.proj(y, self.to_ambient(x, v))

    def _check_ambient(self, x, z) -> None:
        """``z`` is a dense tensor or a point-format object of the ambient shape, with x's dtype and device."""
        if isinstance(z, torch.Tensor):
            check_tensor("z", z)
        elif not isinstance(z, self.point_type):
            raise TypeError(f"z must be a tensor, {self.point_type.__name__} or TangentVector, got {type(z).__name__}")
        if tuple(z.shape) != tuple(self.ambient_shape):
            raise ValueError(f"z must have shape {tuple(self.ambient_shape)}, got {tuple(z.shape)}")
        check_like("z", z, "x", x)
