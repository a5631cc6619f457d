"""The manifold protocol: what a manifold of lowrankopt provides, and what every manifold gets for free.

A manifold here is an embedded submanifold of a Euclidean space (the *ambient* space: dense tensors of
``ambient_shape``) whose points are stored in a factored format (``point_type``) and whose tangent vectors are
stored in *orthonormal coordinates* (:class:`TangentVector`, a list of tensors of :attr:`coord_shapes`): the
inner product of two tangent vectors is the dot product of their coordinates. A subclass implements

* **points**: :meth:`check_point`, :attr:`dim`, :meth:`random_point`, :meth:`frames` (the canonical data of a
  point: orthonormal frames, computed once and cached on the point) and :meth:`from_frames` (a point built from
  frames taken as they are, so that coordinates refer to exactly those frames);
* **the gauge**: :meth:`gauge` (the orthogonal projection of raw coordinates onto the coordinates of tangent
  vectors; for factored points, the horizontal space that fixes the factorization's freedom) and, where a point has
  more than one factorization, :meth:`regauge` (another factorization of the same point);
* **the chart**: :meth:`linearization` (``x + T_x(δ)``, an object linear in δ with detached frames, on which
  autodiff evaluates f: its δ-gradient at 0, gauge-projected, is the Riemannian gradient) and
  :meth:`second_fundamental` (``Y(η) = D²φ[W(ξ), W(η)]`` of the chart φ whose differential is ``T_x``: the
  curvature term of the exact Riemannian Hessian);
* **steps**: :meth:`to_ambient` (ξ as an ambient object), :meth:`retr` (a retraction);
* **flat parameters**: :meth:`point_parts` (a canonical factorization whose factors have the coordinate shapes)
  and :meth:`point_from_parts`; with these :meth:`pack_point` / :meth:`unpack_point` / :meth:`pack_tangent` /
  :meth:`unpack_tangent` turn points and tangent vectors into one flat tensor of :attr:`numel` entries each, in the
  same coordinates, which is what the geoopt bridge (:class:`~lowrankopt.manifolds.geoopt.GeooptManifold`) needs.

Everything else — tangent-vector construction and arithmetic, inner products, projection of ambient objects,
transport by projection, packing — is written once, here, in terms of those methods; autodiff
(:mod:`lowrankopt.autodiff`) uses only the public methods. ``docs/writing-a-manifold.md`` adds a manifold in one
class.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .._checks import FLOAT_DTYPES, check_finite, check_like, check_random_options, check_tensor
from .tangent import TangentVector

Coords = list[torch.Tensor]


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


def qr_positive(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR (batched) with ``R`` having a non-negative diagonal: unique for full column rank, and ``(A, I)`` up to
    rounding when ``A`` has orthonormal columns (so re-orthonormalizing is idempotent). Cost ``O(m r²)``."""
    Q, R = torch.linalg.qr(A)
    s = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return Q * s[..., None, :], R * s[..., :, None]


def polar(M: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor of the square ``M`` (the closest orthogonal matrix). Cost ``O(r³)``."""
    W, _, Zh = torch.linalg.svd(M)
    return W @ Zh


_REGISTRY: list[type] = []  # manifold classes that can infer themselves from a point (see manifold_of)


def manifold_of(x: object) -> LowRankManifold:
    """The manifold a point lives on, inferred from the point (a LowRankMatrix: its shape and rank; a TensorTrain:
    its shape and TT-ranks). A manifold class takes part by defining the classmethod ``of(x)``. Points of manifolds
    that cannot be inferred (a plain tensor on a sphere) need ``manifold=`` where this is used."""
    for cls in reversed(_REGISTRY):
        if isinstance(x, cls.point_type):
            return cls.of(x)
    kinds = " or ".join(sorted({c.point_type.__name__ for c in _REGISTRY}))
    raise TypeError(f"x must be a {kinds} (or pass manifold=), got {type(x).__name__}")


class LowRankManifold(ABC):
    """The manifold protocol (see the module docstring); subclasses set :attr:`point_type` and
    :attr:`ambient_shape` and implement the abstract methods."""

    # Points are annotated ``Any``: their type is the subclass's ``point_type`` (a LowRankMatrix, a TensorTrain, a
    # plain tensor on a sphere, ...), and so are frames and ambient objects, whose form each subclass chooses.
    point_type: type
    ambient_shape: tuple[int, ...]
    #: Whether ``c x`` (``c > 0``) is the point whose first packed part (:meth:`point_parts`) is scaled by ``c``, with
    #: the same frames, so that tangent coordinates at x are coordinates at ``c x`` (what weight decay on a packed
    #: parameter needs). True for factorizations whose frames a positive scale leaves as they are.
    scales_by_first_part: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "of" in cls.__dict__:
            _REGISTRY.append(cls)

    # ------------------------------------------------------------------ the protocol: points
    @abstractmethod
    def check_point(self, x: object, name: str = "x") -> None:
        """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``x`` is a point of this manifold (type, shape,
        ranks; metadata only, ``O(1)``)."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """The dimension of the manifold."""

    @property
    @abstractmethod
    def coord_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The shapes of a tangent vector's coordinates (and of the factors :meth:`point_parts` returns)."""

    @abstractmethod
    def random_point(
        self,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Any:
        """A random point (dtype defaults to ``torch.get_default_dtype()``)."""

    @abstractmethod
    def frames(self, x: Any) -> Any:
        """The canonical data of ``x`` (orthonormal frames) that coordinates refer to, computed once and cached on x."""

    @abstractmethod
    def from_frames(self, frames: Any) -> Any:
        """A point whose frames are ``frames``, taken as they are (no re-orthogonalization): coordinates at the
        result refer to exactly these frames. The inverse of :meth:`frames`."""

    # ------------------------------------------------------------------ the protocol: gauge and chart
    @abstractmethod
    def gauge(self, x: Any, coords: Sequence[torch.Tensor]) -> Coords:
        """The orthogonal projection of raw coordinates (of :attr:`coord_shapes`) onto the coordinates of tangent
        vectors at x. Linear and idempotent."""

    def regauge(self, x: Any, seed: int = 0) -> Any:
        """``x`` in another factorization (the same point; ``None`` if points have only one), with random bond
        rotations drawn from ``seed``: what :mod:`lowrankopt.optim.precision` compares to measure rounding noise.
        Default: ``None``."""
        return None

    @abstractmethod
    def linearization(self, x: Any, deltas: Sequence[torch.Tensor]) -> Any:
        """The object ``x + T_x(δ)`` (frames detached, linear in the δ of :attr:`coord_shapes`) on which autodiff
        evaluates f: ``∂f(x + T_x(δ))/∂δ`` at δ = 0, gauge-projected, is the Riemannian gradient.

        The δ must be **zero-valued** (autodiff's zeros, the geoopt bridge's ``p − p.detach()``): the object's value
        is x and only its derivatives in δ carry ``T_x``, so the formats' native operations on it (``gather``, a
        TT-matrix's ``matvec``) evaluate x alone in the forward pass. For the value ``x + ξ`` at a nonzero ξ use
        :meth:`to_ambient` (``x`` plus it) or :meth:`retr`."""

    @abstractmethod
    def second_fundamental(self, x: Any, xi: TangentVector, deltas: Sequence[torch.Tensor]) -> tuple[Any, Any]:
        """``(x + Y(η), Y(η))`` with ``Y(η) = D²φ[W(ξ), W(η)]`` linear in ``η = deltas`` (φ: the chart whose
        differential at 0 is ``T_x``). Autodiff's curvature term is the δ-gradient in η of
        ``f(x + Y(η)) − <P_x ∇f(x), Y(η)>`` (see :mod:`lowrankopt.autodiff`)."""

    def chart_curve(
        self, x: Any, v: TangentVector, t: torch.Tensor, curvature: bool
    ) -> tuple[Any, Callable[[TangentVector], torch.Tensor] | None] | None:
        """Optional: a curve through ``x`` with velocity ``v`` as an object of the point format whose value depends on
        the 0-dim ``t`` (on the autograd tape; built under ``enable_grad``), so that the quadratic form
        ``⟨v, Hess f(x)[v]⟩`` is a second derivative in one scalar, without a first backward pass kept at x
        (:func:`~lowrankopt.autodiff.riemannian_hessian_form`). With ``curvature``, a chart curve ``c`` (``c'(0) =
        v``) and the map ``grad ↦ ⟨grad, c''(0)⟩`` (the tangential part of ``c''(0)``, subtracted); without, the line
        ``x + t v`` and ``None``. Default ``None``: the form is taken from one Hessian-vector product."""
        return None

    def ambient_inner(self, a: Any, b: Any) -> torch.Tensor:
        """``<a, b>`` of two ambient objects (format objects: their ``inner``; tensors: the sum of products — not
        ``torch.Tensor.inner``, which contracts only the last dimension)."""
        return (a * b).sum() if isinstance(a, torch.Tensor) or not hasattr(a, "inner") else a.inner(b)

    # ------------------------------------------------------------------ the protocol: steps
    @abstractmethod
    def to_ambient(self, x: Any, v: TangentVector) -> Any:
        """ξ as an ambient object (a format object of small rank, or a tensor)."""

    @abstractmethod
    def retr(self, x: Any, v: TangentVector) -> Any:
        """A retraction: a point near ``x + ξ``."""

    def rank_defect(self, x: Any) -> str | None:
        """Why ``x``'s chart is singular (``" at bond k"``-style reason: a rank lower than the manifold's), or
        ``None``. Default: never."""
        return None

    # ------------------------------------------------------------------ the protocol: flat parameters
    @abstractmethod
    def point_parts(self, x: Any, like: Sequence[torch.Tensor] | None = None) -> Coords:
        """A canonical factorization of ``x`` whose factors have the :attr:`coord_shapes` (detached), such that
        :meth:`point_from_parts` gives x back with tangent coordinates in the frames of these factors. With
        ``like`` (the parts of a nearby point), the factorization closest to ``like`` (rotated within the gauge), so
        that coordinates of consecutive iterates stay comparable."""

    @abstractmethod
    def point_from_parts(self, parts: Sequence[torch.Tensor]) -> Any:
        """The point with the factors ``parts`` (as :meth:`point_parts` returns them, taken as they are)."""

    @abstractmethod
    def canonical_parts(self, parts: Sequence[torch.Tensor]) -> Coords:
        """Factors of :attr:`coord_shapes` of any factorization (e.g. with frames no longer orthonormal) brought to
        the canonical one of the same point; idempotent up to rounding (the geoopt bridge's ``projx``)."""

    def _key(self) -> tuple:
        return (type(self).__name__, *self._dims())

    def _dims(self) -> tuple:
        return (self.ambient_shape,)

    def __eq__(self, other) -> bool:
        return isinstance(other, LowRankManifold) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    # ------------------------------------------------------------------ tangent vectors (generic)
    def check_tangent(self, x: Any, v: object, name: str = "v") -> None:
        """``v`` is a TangentVector at ``x`` whose coordinates have x's dtype and device (metadata only: no reduction,
        no host read, as this runs on every step; finiteness is checked where vectors are built, :meth:`tangent`, and
        named by :func:`naming_non_finite` where a retraction fails on it)."""
        if not isinstance(v, TangentVector):
            raise TypeError(f"{name} must be a TangentVector, got {type(v).__name__}")
        if v.base is not x:
            raise ValueError(f"{name} is not a tangent vector at this point x (its base point is another object)")
        for i, c in enumerate(v.coords):
            check_like(f"{name}.coords[{i}]", c, "x", x)

    def tangent(self, x: Any, coords: Sequence[torch.Tensor]) -> TangentVector:
        """The tangent vector with the given raw coordinates after the gauge projection.

        ``coords`` must have the :attr:`coord_shapes`, x's dtype and device, and finite entries (else
        ``ValueError``/``TypeError`` naming the coordinate). Cost: one :meth:`gauge` (``O(dim · r)``).
        """
        self.check_point(x)
        shapes = self.coord_shapes
        coords = list(coords)
        for i, c in enumerate(coords):
            check_tensor(f"coords[{i}]", c, finite=False)
        if len(coords) != len(shapes) or any(tuple(c.shape) != s for c, s in zip(coords, shapes)):
            raise ValueError(f"coords must have shapes {list(shapes)}, got {[tuple(c.shape) for c in coords]}")
        for i, c in enumerate(coords):
            check_like(f"coords[{i}]", c, "x", x)
        check_finite([(f"coords[{i}]", c) for i, c in enumerate(coords)])
        return TangentVector(self, x, self.gauge(x, coords))

    def zero_deltas(self, x: Any, requires_grad: bool = False) -> Coords:
        """Zero coordinates of :attr:`coord_shapes` with x's dtype and device. Cost ``O(numel)``."""
        return [torch.zeros(s, dtype=x.dtype, device=x.device, requires_grad=requires_grad) for s in self.coord_shapes]

    def zero_tangent(self, x: Any) -> TangentVector:
        """The zero vector of T_x. Cost ``O(numel)``."""
        self.check_point(x)
        return TangentVector(self, x, self.zero_deltas(x))

    def random_tangent(self, x: Any, generator: torch.Generator | None = None) -> TangentVector:
        """A unit-norm tangent vector with Gaussian (isotropic in T_x) direction. Cost: one :meth:`gauge`."""
        self.check_point(x)
        _, _, gdev = check_random_options(x.dtype, x.device, generator)
        raw = [torch.randn(s, dtype=x.dtype, device=gdev, generator=generator).to(x.device) for s in self.coord_shapes]
        v = TangentVector(self, x, self.gauge(x, raw))
        return v / v.norm()

    def inner(self, x: Any, u: TangentVector, v: TangentVector) -> torch.Tensor:
        """Riemannian (Euclidean, induced) inner product; the coordinates are orthonormal so this is the coordinate
        dot product. Cost ``O(numel)``."""
        self.check_tangent(x, u, "u")
        self.check_tangent(x, v, "v")
        return u.inner(v)

    def norm(self, x: Any, u: TangentVector) -> torch.Tensor:
        """``‖u‖``. Cost ``O(numel)``."""
        self.check_tangent(x, u, "u")
        return u.norm()

    def proj(self, x: Any, z: Any) -> TangentVector:
        """Orthogonal projection of ``z`` onto T_x.

        ``z`` may be a dense tensor of the ambient shape, an object of the point format (never densified), or a
        TangentVector (transported by projection, as :meth:`transp`: not checked for NaN/Inf, which a linear map
        carries over to the result). ``z`` must have x's dtype and device; a dense ``z`` must have finite entries.
        Computed as the gauged δ-gradient of the linear function ``<z, x + T_x(δ)>`` (one backward pass through
        :meth:`linearization`: for a format object of rank ``r_z`` ``O((m + n) r r_z)`` / ``O(d n r r_z (r + r_z))``,
        for a dense one ``O(N r)``, N its number of entries).
        """
        self.check_point(x)
        if isinstance(z, TangentVector):
            if z.base is x:
                return z
            z.manifold.check_tangent(z.base, z, "z")
            return self.proj(x, z.manifold.to_ambient(z.base, z))
        self._check_ambient(x, z)
        deltas = self.zero_deltas(x, requires_grad=True)
        with torch.enable_grad():
            s = self.ambient_inner(self.linearization(x, deltas), z)
            grads = torch.autograd.grad(s, deltas, allow_unused=True) if s.requires_grad else [None] * len(deltas)
        coords = [torch.zeros_like(d) if g is None else g.detach() for g, d in zip(grads, deltas)]
        return TangentVector(self, x, self.gauge(x, coords))

    def transp(self, x: Any, y: Any, v: TangentVector) -> TangentVector:
        """Vector transport from T_x to T_y by orthogonal projection of the ambient vector (see :meth:`proj`).

        A linear map of v, computed without a factorization: coordinates with NaN/Inf give a vector with NaN/Inf
        coordinates (not checked: a check would cost a reduction and a host read per step; :meth:`tangent` refuses
        such coordinates and :meth:`retr` names them)."""
        self.check_tangent(x, v)
        self.check_point(y, "y")
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

    def check_full_rank(self, x: Any, needed: str) -> None:
        """Refuse a point at which the chart is singular (:meth:`rank_defect`): the curvature term of the exact
        Hessian divides by what vanishes there. Checked once per point: a pass is kept in x's cache, next to its
        frames, so Hessian-vector products at x (many per trust-region step) pay no factorization and no host read."""
        cache = getattr(x, "_cache", None)
        if cache is not None and cache.get("full_rank"):
            return
        reason = self.rank_defect(x)
        if reason is not None:
            raise ValueError(
                f"x is rank-deficient{reason}: the curvature term needs {needed} exactly "
                "(use curvature=False, or a point of exact rank)"
            )
        if cache is not None:
            cache["full_rank"] = True

    # ------------------------------------------------------------------ flat parameters (generic)
    @property
    def numel(self) -> int:
        """Entries of a packed point and of a packed tangent vector (``Σ`` of the :attr:`coord_shapes`)."""
        return sum(math.prod(s) for s in self.coord_shapes)

    def split(self, flat: torch.Tensor) -> Coords:
        """A flat tensor ``(..., numel)`` as views of :attr:`coord_shapes` (leading dims kept). ``O(1)``."""
        lead, parts, pos = flat.shape[:-1], [], 0
        for s in self.coord_shapes:
            k = math.prod(s)
            parts.append(flat[..., pos : pos + k].reshape(*lead, *s))
            pos += k
        return parts

    def join(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Parts of :attr:`coord_shapes` (common leading dims broadcast) as one flat tensor ``(..., numel)``."""
        shapes = self.coord_shapes
        lead = torch.broadcast_shapes(*(p.shape[: p.dim() - len(s)] for p, s in zip(parts, shapes)))
        return torch.cat([p.expand(*lead, *s).reshape(*lead, -1) for p, s in zip(parts, shapes)], -1)

    def pack_point(self, x: Any) -> torch.Tensor:
        """``x`` as one flat tensor of :attr:`numel` entries: its canonical factors (:meth:`point_parts`; a point
        from :meth:`unpack_point` round-trips exactly). Detached."""
        self.check_point(x)
        return self.join(self.point_parts(x))

    def unpack_point(self, flat: torch.Tensor) -> Any:
        """The point of a packed tensor, with frames built from the packed factors as they are (a copy). The factors
        must be canonical (:meth:`check_canonical`: e.g. orthonormal frames), else tangent coordinates at the result
        would refer to frames that are not orthonormal: ``ValueError`` naming ``flat``. Cost: one
        :meth:`canonical_parts` (``O(numel · r)``)."""
        self._check_flat("flat", flat)
        parts = [p.clone() for p in self.split(flat.detach())]
        self.check_canonical(parts, "flat")
        return self.point_from_parts(parts)

    def check_canonical(self, parts: Sequence[torch.Tensor], name: str = "parts") -> None:
        """Raise ``ValueError`` naming ``name`` unless ``parts`` (of :attr:`coord_shapes`) are a canonical
        factorization (what :meth:`point_from_parts` takes as it is): :meth:`canonical_parts` must leave each part
        unchanged within ``√eps`` relative to its largest entry — orthonormal factors stay, any others are found.
        NaN/Inf entries are refused too. Cost: one :meth:`canonical_parts` and one host read."""
        for i, p in enumerate(parts):
            if not bool(torch.isfinite(p).all()):
                raise ValueError(f"{name} contains NaN or Inf (part {i})")
        moved = [
            float((c - p).abs().max() / p.abs().max().clamp_min(torch.finfo(p.dtype).tiny)) if p.numel() else 0.0
            for p, c in zip(parts, self.canonical_parts(parts))
        ]
        tol = math.sqrt(torch.finfo(parts[0].dtype).eps)
        bad = [f"part {i} (shape {tuple(parts[i].shape)}) by {m:.3g}" for i, m in enumerate(moved) if m > tol]
        if bad:  # (all of them: the part that carries the scale absorbs the others' corrections and moves too)
            raise ValueError(
                f"{name} is not a canonical packed point of {self!r}: re-orthonormalizing moves {', '.join(bad)} "
                "(relative to the part's largest entry; the frames must be orthonormal: pack points with pack_point, "
                "or bring factors to canonical form with canonical_parts)"
            )

    def pack_tangent(self, v: TangentVector) -> torch.Tensor:
        """A tangent vector's coordinates as one flat tensor (at a point from :meth:`unpack_point`: in the frames
        of the packed factors). Detached; ``O(numel)``."""
        if not isinstance(v, TangentVector):
            raise TypeError(f"v must be a TangentVector, got {type(v).__name__}")
        if v.manifold != self:
            raise ValueError(f"v lives on {v.manifold!r}, not on {self!r}")
        return self.join([c.detach() for c in v.coords])

    def unpack_tangent(self, x: Any, flat: torch.Tensor) -> TangentVector:
        """The tangent vector at ``x`` with the packed coordinates ``flat`` (projected onto the gauge)."""
        self.check_point(x)
        self._check_flat("flat", flat)
        check_like("flat", flat, "x", x)
        return TangentVector(self, x, self.gauge(x, self.split(flat.detach())))

    def _check_flat(self, name: str, t) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32 or float64, got {t.dtype}")
        if tuple(t.shape) != (self.numel,):
            raise ValueError(f"{name} must have shape ({self.numel},) (packed {self!r}), got {tuple(t.shape)}")


class ShapeAndRanks:
    """What the manifolds given by a shape and ranks (:class:`~lowrankopt.manifolds.FixedTTRank`,
    :class:`~lowrankopt.manifolds.FixedTuckerRank`) share: equality, the ambient shape and the repr."""

    shape: tuple[int, ...]
    ranks: tuple[int, ...]

    def _dims(self) -> tuple:
        return (self.shape, self.ranks)

    @property
    def ambient_shape(self) -> tuple[int, ...]:
        return self.shape

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, ranks={self.ranks})"
