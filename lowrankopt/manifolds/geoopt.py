"""geoopt bridge: any :class:`~lowrankopt.manifolds.LowRankManifold` as a ``geoopt.Manifold`` on *packed*
parameters, so that ``geoopt.ManifoldParameter`` with ``geoopt.optim.RiemannianSGD`` (plain, momentum, Nesterov)
and ``geoopt.optim.RiemannianAdam`` train low-rank modules unmodified.

geoopt needs one tensor per parameter, with tangent vectors of the same shape (``ndim = 1``: the last dimension is
the manifold's, leading dimensions are a batch). :class:`GeooptManifold` packs through the manifold protocol alone:

* a point is the flat concatenation of the manifold's canonical factors (:meth:`LowRankManifold.point_parts`):
  ``[C | V]`` for :class:`FixedRankMatrices` (``x = C Vᵀ``, ``V`` orthonormal), the right-orthogonal cores
  ``[C_1 | V_2 | ... | V_d]`` for :class:`FixedTTRank`;
* a tangent vector is the flat concatenation of its coordinates (:attr:`LowRankManifold.coord_shapes`, the same
  shapes) in the frames of those factors: ``[A | B]`` with ``ξ = A Vᵀ + U Bᵀ`` for matrices, ``[δ_1 | ... | δ_d]``
  for TT — the δ-coordinates of :class:`TangentVector` everywhere else in the library.

The coordinates are orthonormal: ``<ξ, η> = Σ u_i v_i``. So ``inner`` is the dot product and ``component_inner`` is
``u * v``, which is what ``RiemannianAdam``'s second moment uses.

**Gradients: straight-through zeros.** A module builds its user-facing object from the parameter ``p`` with
:meth:`GeooptManifold.straight_through`: the manifold's linearization ``x + T_x(z)`` at the packed point, with
``z = p − p.detach()`` (value 0, gradient identity). Then ``p.grad`` is the raw δ-gradient and
:meth:`~GeooptManifold.egrad2rgrad` is just the gauge projection (:meth:`~GeooptManifold.proju`); no ``S⁻¹`` and
no SVD on the tape. A module that builds its object from the raw factors instead gets factor gradients, for which
``egrad2rgrad`` is **wrong**.

Packed parameters are protected by the optimizer step guard (:mod:`lowrankopt.manifolds.step_guard`): a Euclidean
optimizer or weight decay on them is an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import geoopt
import torch
from geoopt.tensor import ManifoldTensor
from geoopt.utils import size2shape

from .._checks import FLOAT_DTYPES
from .base import LowRankManifold
from .fixed_rank import FixedRankMatrices
from .step_guard import HINT, OWNER, manifold_parameter, register_step_guard
from .tangent import TangentVector
from .tt import FixedTTRank
from .tt_matrix import FixedTTMatrixRank

__all__ = [
    "GeooptFixedRank",
    "GeooptFixedTTMatrixRank",
    "GeooptFixedTTRank",
    "GeooptManifold",
    "HINT",
    "OWNER",
    "manifold_parameter",
]

_PACKED = "geoopt_packed"  # cache flag: the point's frames are exactly the packed factors of this bridge


class GeooptManifold(geoopt.Manifold):
    """``base`` (any :class:`LowRankManifold`) as a ``geoopt.Manifold`` on packed tensors of :attr:`numel` entries
    (see the module docstring). Batched over leading dimensions by a loop over items (the metric is vectorized)."""

    ndim = 1
    reversible = False
    lowrankopt_packed = True  # the step guard protects parameters on this manifold
    name = "Packed"

    def __init__(self, base: LowRankManifold) -> None:
        super().__init__()
        if not isinstance(base, LowRankManifold):
            raise TypeError(f"base must be a LowRankManifold, got {type(base).__name__}")
        register_step_guard()
        self.base = base

    def __setstate__(self, state) -> None:
        # unpickling (torch.load, a spawned worker) skips __init__: the guard must still be installed
        super().__setstate__(state)
        register_step_guard()

    def extra_repr(self) -> str:
        return repr(self.base)

    def __eq__(self, other) -> bool:
        return isinstance(other, GeooptManifold) and other.base == self.base

    def __hash__(self) -> int:
        return hash(("GeooptManifold", self.base))

    @property
    def dim(self) -> int:
        return self.base.dim

    @property
    def numel(self) -> int:
        """Number of entries of a packed point (and of a packed tangent vector)."""
        return self.base.numel

    # ------------------------------------------------------------------ checks and batching
    def _check_packed(self, name: str, t, *, like: torch.Tensor | None = None, batched: bool = True) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (a packed {self!r} tensor), got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32 or float64, got {t.dtype}")
        if t.dim() < 1 or t.shape[-1] != self.numel:
            raise ValueError(
                f"{name} must have last dimension {self.numel} (packed factors of {self!r}), got shape {tuple(t.shape)}"
            )
        if not batched and t.dim() != 1:
            raise ValueError(f"{name} must be one packed point of shape ({self.numel},), got shape {tuple(t.shape)}")
        if like is not None and t.dtype != like.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has dtype {like.dtype}")

    def _batched(self, fn, names, *tensors):
        """Apply the unbatched ``fn`` to every item of broadcast leading dimensions (a Python loop)."""
        for i, (n, t) in enumerate(zip(names, tensors)):
            self._check_packed(n, t, like=tensors[0] if i else None)
        lead = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
        tensors = [t.detach() for t in tensors]
        if not lead:
            return fn(*tensors)
        N = self.numel
        flat = [t.expand(*lead, N).reshape(-1, N) for t in tensors]
        outs = [fn(*items) for items in zip(*flat)]
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(o).reshape(*lead, N) for o in zip(*outs))
        return torch.stack(outs).reshape(*lead, N)

    def _point(self, x1: torch.Tensor):
        """The point of one packed tensor, its frames the packed factors (views of ``x1``); marked as such in its cache
        when it has one (a point that is a plain tensor, e.g. on a sphere, has none: see :meth:`_is_packed_point`)."""
        xo = self.base.point_from_parts(self.base.split(x1))
        cache = getattr(xo, "_cache", None)
        if cache is not None:
            cache[_PACKED] = self
        return xo

    def _is_packed_point(self, xo) -> bool:
        """``xo`` came from :meth:`_point` (its frames are packed factors of this bridge). Points without a cache (plain
        tensors) cannot be marked: :meth:`pack_tangent` / :meth:`unpack_tangent` treat them as points of the base
        manifold and move vectors to / from the packed frames by a projection — exact, and a no-op in value for points
        that are their own packed factors (a tensor on a sphere)."""
        cache = getattr(xo, "_cache", None)
        return cache is not None and cache.get(_PACKED) == self

    def _tangent(self, xo, u1: torch.Tensor) -> TangentVector:
        return TangentVector(self.base, xo, self.base.gauge(xo, self.base.split(u1)))

    # ------------------------------------------------------------------ geoopt: checks
    def _check_shape(self, shape, name):
        ok = len(shape) >= 1 and shape[-1] == self.numel
        reason = None if ok else f"'{name}' on {self!r} must have last dimension {self.numel}, got shape {tuple(shape)}"
        return ok, reason

    def assert_check_point(self, x: torch.Tensor) -> None:
        self._check_packed("x", x)

    def assert_check_vector(self, u: torch.Tensor) -> None:
        self._check_packed("u", u)

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        """The packed factors are in canonical form (``projx`` keeps them, within ``atol + rtol · max|x|``) and the
        point has the manifold's rank (:meth:`LowRankManifold.rank_defect`)."""
        if not bool(torch.isfinite(x).all()):
            return False, "x contains NaN or Inf"
        x = x.detach()
        dev = (self.projx(x) - x).abs().amax()
        tol = atol + rtol * x.abs().amax()
        if bool(dev > tol):
            return False, f"x is not a canonical factorization on {self.base!r} (max |projx(x) − x| = {float(dev):.3g})"
        for x1 in x.reshape(-1, self.numel):
            reason = self.base.rank_defect(self._point(x1))
            if reason is not None:
                return False, f"x is rank-deficient{reason} on {self.base!r}"
        return True, None

    def _check_vector_on_tangent(self, x, u, *, atol=1e-5, rtol=1e-5):
        u = u.detach()
        err = (self.proju(x.detach(), u) - u).abs().amax()
        tol = atol + rtol * u.abs().amax()
        if bool(err > tol):
            return False, f"u violates the gauge (max deviation {float(err):.3g} > {float(tol):.3g})"
        return True, None

    # ------------------------------------------------------------------ metric (orthonormal coordinates)
    def inner(
        self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None, *, keepdim: bool = False
    ) -> torch.Tensor:
        """``<u, v>`` — the dot product of the packed coordinates (they are orthonormal). Cost ``O(numel)``."""
        self._check_packed("u", u)
        if v is None:
            v = u
        else:
            self._check_packed("v", v, like=u)
        return (u * v).sum(-1, keepdim=keepdim)

    def component_inner(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        """``u * v`` elementwise: per-coordinate second moments for ``RiemannianAdam``."""
        self._check_packed("u", u)
        if v is not None:
            self._check_packed("v", v, like=u)
        return u * (u if v is None else v)

    def norm(self, x: torch.Tensor, u: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        return self.inner(x, u, keepdim=keepdim).clamp_min(0).sqrt()

    # ------------------------------------------------------------------ projections
    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection of the packed vector ``u`` onto the gauge subspace (the tangent coordinates at
        ``x``): the manifold's :meth:`~LowRankManifold.gauge`. Batched; cost one gauge per item."""

        def one(x1, u1):
            return self.base.join(self._tangent(self._point(x1), u1).coords)

        return self._batched(one, ("x", "u"), x, u)

    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The Riemannian gradient from ``p.grad`` of a parameter used through :meth:`straight_through`:
        that gradient is the raw δ-gradient, so this is the gauge projection :meth:`proju`."""
        return self.proju(x, u)

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        """Re-orthonormalize the packed factors without changing the point
        (:meth:`~LowRankManifold.canonical_parts`). Idempotent up to rounding on a packed point. Batched."""

        def one(x1):
            return self.base.join(self.base.canonical_parts(self.base.split(x1)))

        return self._batched(one, ("x",), x)

    # ------------------------------------------------------------------ retraction and transport
    def _retr1(self, x1, u1):
        xo = self._point(x1)
        y = self.base.retr(xo, self._tangent(xo, u1))
        return self.base.join(self.base.point_parts(y, like=self.base.split(x1)))

    def _transp1(self, x1, y1, v1):
        xo, yo = self._point(x1), self._point(y1)
        return self.base.join(self.base.transp(xo, yo, self._tangent(xo, v1)).coords)

    def _retr_transp1(self, x1, u1, v1):
        y1 = self._retr1(x1, u1)
        return y1, self._transp1(x1, y1, v1)

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Retraction: the manifold's retraction of ``x + ξ(u)``, packed with factors rotated to be closest to those
        of ``x`` (:meth:`~LowRankManifold.point_parts` with ``like``), so that coordinates of consecutive iterates
        stay comparable, which ``RiemannianAdam``'s per-coordinate statistics rely on. ``u`` is first projected
        onto the gauge (``RiemannianSGD``'s first momentum step passes a raw gradient). Batched (a loop over
        items); not differentiable. Cost: one retraction."""
        return self._batched(self._retr1, ("x", "u"), x, u)

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Not the exponential map (unknown in closed form here): the second-order retraction
        :meth:`retr`, which is what geoopt's optimizers need."""
        return self.retr(x, u)

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Vector transport from ``T_x`` to ``T_y``: the manifold's :meth:`~LowRankManifold.transp` (orthogonal
        projection of the ambient vector, never densified). ``v`` is first projected onto the gauge. Batched."""
        return self._batched(self._transp1, ("x", "y", "v"), x, y, v)

    def retr_transp(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(retr(x, u), transp(x, retr(x, u), v))``."""
        return self._batched(self._retr_transp1, ("x", "u", "v"), x, u, v)

    # ------------------------------------------------------------------ points <-> objects
    def pack_point(self, *tensors: torch.Tensor) -> torch.Tensor:
        """Concatenate factor tensors (as :meth:`unpack_tensor` returns them; leading batch dims allowed) into one
        packed tensor, as they are (no orthonormalization: see :meth:`projx`)."""
        shapes = self.base.coord_shapes
        if len(tensors) != len(shapes):
            raise ValueError(f"expected {len(shapes)} factor tensors {list(shapes)}, got {len(tensors)}")
        for i, (t, s) in enumerate(zip(tensors, shapes)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape[t.dim() - len(s) :]) != tuple(s):
                raise ValueError(f"tensors[{i}] must end with shape {s}, got {getattr(t, 'shape', type(t).__name__)}")
        return self.base.join(tensors)

    def unpack_tensor(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The factor tensors (views) of a packed tensor, leading batch dims kept."""
        self._check_packed("tensor", tensor)
        return tuple(self.base.split(tensor))

    def unpack(self, p: torch.Tensor, name: str = "p") -> Any:
        """The point as a LowRankMatrix / TensorTrain (a detached copy) whose frames are the packed factors, so that
        :class:`TangentVector` s at it have the packed coordinates. ``p`` must be canonical (orthonormal frames:
        :meth:`~LowRankManifold.check_canonical`, one QR sweep), else ``ValueError`` naming ``name`` (a parameter
        written to by hand: bring it back with ``p.copy_(manifold.projx(p))``)."""
        self._check_packed(name, p, batched=False)
        self.base.check_canonical(self.base.split(p.detach()), name)
        return self._point(p.detach().clone())

    def pack(self, x: Any) -> torch.Tensor:
        """A point of the base manifold as a packed point (detached). Points from :meth:`unpack` round-trip exactly;
        others are brought to canonical form (:meth:`~LowRankManifold.point_parts`)."""
        return self.base.pack_point(x)

    def pack_tangent(self, v: TangentVector) -> torch.Tensor:
        """A :class:`TangentVector` as a packed tangent vector at ``pack(v.base)`` (detached). At a point from
        :meth:`unpack` this is a change of layout; otherwise ξ is re-projected onto the (identical) tangent space in
        the packed frames."""
        if not isinstance(v, TangentVector):
            raise TypeError(f"v must be a TangentVector, got {type(v).__name__}")
        if v.manifold != self.base:
            raise ValueError(f"v lives on {v.manifold!r}, not on {self.base!r}")
        if not self._is_packed_point(v.base):
            v = self.base.proj(self._point(self.pack(v.base)), self.base.to_ambient(v.base, v))
        return self.base.pack_tangent(v)

    def unpack_tangent(self, x: Any, u: torch.Tensor) -> TangentVector:
        """The packed tangent vector ``u`` at ``x`` as a :class:`TangentVector`: at ``x`` if ``x`` is an object returned
        by :meth:`unpack` or another point of the base manifold (then ξ is moved from the packed frames to x's by one
        :meth:`~LowRankManifold.proj`, exact: the tangent space is the same), else at ``unpack(x)`` for a packed point
        tensor. ``u`` is projected onto the gauge first. (Points that are plain tensors, e.g. on a sphere, carry no
        mark of :meth:`unpack`: they are taken as points of the base manifold when they are ones.)"""
        at = None  # the point to move the vector to, when it is not the packed point itself
        if self._is_packed_point(x):
            xo = x
        elif self._is_base_point(x):
            xo, at = self._point(self.pack(x)), x
        elif isinstance(x, torch.Tensor):
            xo = self.unpack(x)
        else:
            raise TypeError(f"x must be a packed point tensor or a point of {self.base!r}, got {type(x).__name__}")
        self._check_packed("u", u, batched=False)
        if u.dtype != xo.dtype:
            raise ValueError(f"u has dtype {u.dtype} but x has dtype {xo.dtype}")
        v = self._tangent(xo, u.detach())
        return v if at is None else self.base.proj(at, self.base.to_ambient(xo, v))

    def _is_base_point(self, x) -> bool:
        try:
            self.base.check_point(x)
        except (TypeError, ValueError):
            return False
        return True

    def straight_through(self, p: torch.Tensor) -> Any:
        """The user-facing object of the parameter ``p`` with straight-through zeros, so that ``p.grad`` comes out in
        δ-coordinates (see the module docstring): the manifold's linearization at the packed point with
        ``δ = p − p.detach()``. Its value is the point; use it with the format's operations (``@``, ``gather``,
        ``inner``, ``full``, ...). Cost: the frames of the point (``O((m + n) r²)`` / ``O(d n r³)``), plus the
        operations on the linearized object."""
        self._check_packed("p", p, batched=False)
        pd = p.detach()
        return self.base.linearization(self._point(pd), self.base.split(p - pd))

    # ------------------------------------------------------------------ sampling
    def random(
        self,
        *size: int | Sequence[int],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> ManifoldTensor:
        """Random packed point(s) (see the base manifold's ``random_point``); ``size`` is empty or ends
        with :attr:`numel` (leading dims: a batch). dtype defaults to ``torch.get_default_dtype()``."""
        shape = size2shape(*size) if size else (self.numel,)
        ok, reason = self._check_shape(shape, "size")
        if not ok:
            raise ValueError(reason)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        n = math.prod(shape[:-1])
        pts = [self.pack(self.base.random_point(dtype=dtype, device=device, generator=generator)) for _ in range(n)]
        return ManifoldTensor(torch.stack(pts).reshape(shape), manifold=self)

    def origin(
        self,
        *size: int | Sequence[int],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        seed: int | None = 42,
    ) -> ManifoldTensor:
        """A deterministic random point (:meth:`random` with a generator seeded by ``seed``)."""
        g = torch.Generator()
        if seed is None:
            g.seed()
        else:
            g.manual_seed(seed)
        return self.random(*size, dtype=dtype, device=device, generator=g)


class GeooptFixedRank(GeooptManifold):
    """``GeooptManifold(FixedRankMatrices(m, n, rank))``: point ``[C | V]`` (``numel = (m + n) r``), tangent
    ``[A | B]``. ``dim = (m + n − r) r``."""

    name = "FixedRank"

    def __init__(self, m: int, n: int, rank: int) -> None:
        super().__init__(FixedRankMatrices(m, n, rank))
        self.m, self.n, self.rank = self.base.m, self.base.n, self.base.rank


class GeooptFixedTTRank(GeooptManifold):
    """``GeooptManifold(FixedTTRank(shape, ranks))``: point ``[C_1 | V_2 | ... | V_d]`` (``numel = Σ r_{k-1} n_k
    r_k``), tangent ``[δ_1 | ... | δ_d]``. ``dim = Σ_k r_{k-1} n_k r_k − Σ_k r_k²``."""

    name = "FixedTTRank"

    def __init__(self, shape: Sequence[int], ranks: int | Sequence[int]) -> None:
        super().__init__(FixedTTRank(shape, ranks))
        self.shape, self.ranks = self.base.shape, self.base.ranks


class GeooptFixedTTMatrixRank(GeooptManifold):
    """``GeooptManifold(FixedTTMatrixRank(row_shape, col_shape, ranks))``: point ``[C_1 | V_2 | ... | V_d]`` (the
    right-orthogonal merged cores ``(r_{k-1}, m_k n_k, r_k)``), tangent ``[δ_1 | ... | δ_d]``; the layout of
    :class:`GeooptFixedTTRank` of shape ``(m_k n_k)``. :meth:`straight_through` gives a TT-matrix whose ``matvec``
    runs the rank-r δ-product node (what :class:`~lowrankopt.nn.TTLinear` trains through)."""

    name = "FixedTTMatrixRank"

    def __init__(self, row_shape: Sequence[int], col_shape: Sequence[int], ranks: int | Sequence[int]) -> None:
        super().__init__(FixedTTMatrixRank(row_shape, col_shape, ranks))
        self.row_shape, self.col_shape, self.ranks = self.base.row_shape, self.base.col_shape, self.base.ranks
