"""geoopt bridge: :class:`FixedRankMatrices` and :class:`FixedTTRank` as ``geoopt.Manifold`` s on
*packed* parameters, so that ``geoopt.ManifoldParameter`` with ``geoopt.optim.RiemannianSGD``
(plain, momentum, Nesterov) and ``geoopt.optim.RiemannianAdam`` train low-rank modules unmodified.

geoopt needs one tensor per parameter (``ndim = 1``: the last dimension is the manifold's, leading
dimensions are a batch). A point is one flat tensor packing the factors of a canonical form; a tangent
vector is a flat tensor of the same numel holding orthonormal tangent coordinates in the same layout.

* :class:`GeooptFixedRank` ``(m, n, rank)``: point ``[U | S | V]`` (``U: (m, r)`` and ``V: (n, r)``
  orthonormal, ``S: (r, r)`` invertible, each flattened row-major), ``X = U S Vᵀ``. Tangent vector
  ``[Up | M | Vp]`` with ``Uᵀ Up = 0``, ``Vᵀ Vp = 0``: ``ξ = U M Vᵀ + Up Vᵀ + U Vpᵀ``.
* :class:`GeooptFixedTTRank` ``(shape, ranks)``: point ``[C_1 | V_2 | ... | V_d]``, the cores of the
  right-orthogonal form (``V_k`` with orthonormal rows of the right unfolding ``(r_{k-1}, n_k r_k)``).
  Tangent vector ``[δ_1 | ... | δ_d]`` with the right gauge ``δ_k V_kᵀ = 0`` (k ≥ 2), exactly the
  coordinates of :class:`FixedTTRank`'s :class:`TangentVector` at this point:
  ``ξ = Σ_k U_{<k} δ_k V_{>k}`` with ``U_k`` the left-orthogonal cores from a QR sweep (R with a
  positive diagonal) of the packed cores.

In both layouts the coordinates are orthonormal: ``<ξ, η> = Σ u_i v_i``. So ``inner`` is the dot
product and ``component_inner`` is ``u * v``, which is what ``RiemannianAdam``'s second moment uses.

**Gradients: straight-through zeros.** A module builds its user-facing object from the parameter ``p``
with :meth:`straight_through`, which uses ``z = p − p.detach()`` (value 0, gradient identity) and
detached frames: for matrices ``X = U (S + z_S) Vᵀ + z_U Vᵀ + U z_Vᵀ``, for TT the linearization
``x + T_x(z)`` (``z_1`` in ``C_1``'s slot). Then ``p.grad`` is the raw δ-gradient
(matrices: ``(G V, Uᵀ G V, Gᵀ U)`` for ``G = ∇f(X)``) and :meth:`egrad2rgrad` is just the gauge
projection (:meth:`proju`); no ``S⁻¹`` and no SVD on the tape. A module that builds its object from the
raw factors instead gets factor gradients, for which ``egrad2rgrad`` is **wrong**.

**The step guard.** A global optimizer step pre-hook, registered when the library creates or loads (unpickles: a
``torch.load`` in a new process, a model sent to a spawned worker) its first manifold parameter (a packed one, or a
``geoopt.EuclideanStiefel`` one of the ``nn`` layers, made by :func:`manifold_parameter`), raises

* ``TypeError`` when an optimizer that is not one of geoopt's Riemannian optimizers (``torch.optim.Adam``,
  ``SGD``, ...) is about to step such a parameter that has a gradient: a Euclidean step would leave the
  manifold silently. The message names the parameter (its layer and attribute, param group and position).
  Plain parameters can stay with any optimizer; give the manifold parameters to ``RiemannianSGD`` /
  ``RiemannianAdam``.
* ``ValueError`` for any param group holding a packed parameter with ``weight_decay != 0``: decaying packed
  factors is meaningless (it would shrink orthonormal frames; ``torch.optim.AdamW`` defaults to 0.01: give
  these parameters their own group with ``weight_decay=0``).
"""

from __future__ import annotations

import math
import weakref

import geoopt
import torch
from geoopt.tensor import ManifoldTensor
from geoopt.utils import size2shape
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .._checks import FLOAT_DTYPES
from ..formats.tt import TensorTrain
from .fixed_rank import FixedRankMatrices
from .tangent import TangentVector
from .tt import FixedTTRank

__all__ = ["GeooptFixedRank", "GeooptFixedTTRank"]

_PACKED = "geoopt_packed"  # cache flag: the object's frames are exactly its packed factors


def _qr_pos(A: torch.Tensor):
    """Thin QR (batched) with ``R`` having a non-negative diagonal: unique for full column rank, and
    ``(A, I)`` up to rounding when ``A`` has orthonormal columns (so re-orthonormalizing is idempotent)."""
    Q, R = torch.linalg.qr(A)
    s = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return Q * s[..., None, :], R * s[..., :, None]


def _polar(M: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor of ``M`` (closest orthogonal matrix). Cost ``O(r³)``."""
    W, _, Zh = torch.linalg.svd(M)
    return W @ Zh


def _orth_defect(Q: torch.Tensor, rows: bool) -> torch.Tensor:
    """max |QᵀQ − I| (columns) or |QQᵀ − I| (rows), per batch item."""
    G = Q @ Q.mT if rows else Q.mT @ Q
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    return (G - eye).abs().amax(dim=(-2, -1))


class _PackedLowRank(geoopt.Manifold):
    """Shared machinery: layout, checks, batching, elementwise metric, geoopt API."""

    ndim = 1
    reversible = False
    base: FixedRankMatrices | FixedTTRank

    def __init__(self, base: FixedRankMatrices | FixedTTRank):
        super().__init__()
        _register_step_guard()
        self.base = base

    def __setstate__(self, state) -> None:
        # unpickling (torch.load, a spawned worker) skips __init__: the guard must still be installed
        super().__setstate__(state)
        _register_step_guard()

    @property
    def dim(self) -> int:
        return self.base.dim

    # ------------------------------------------------------------------ subclass hooks
    # "parts": the packed factors split and reshaped (leading batch dims kept where noted).
    _shapes: list[tuple[int, ...]]  # shapes of the parts, in packing order

    def _frame_parts(self, xo) -> list[torch.Tensor]:
        """The packed parts of an object from :meth:`_unpack` (its cached frames)."""
        raise NotImplementedError

    def _proju_parts(self, xp, up) -> list[torch.Tensor]:
        """Gauge projection of tangent parts ``up`` at point parts ``xp`` (batched, broadcasting)."""
        raise NotImplementedError

    def _projx_parts(self, xp) -> list[torch.Tensor]:
        """Re-orthonormalized point parts (batched)."""
        raise NotImplementedError

    def _orth_defects(self, xp, tol: float):
        """``(True, reason)`` if the frames are not orthonormal within ``tol`` (batched)."""
        raise NotImplementedError

    def _rank_defect(self, xp):
        """``(True, reason)`` if the point has lower rank than the manifold's (batched)."""
        raise NotImplementedError

    def _unpack_parts(self, parts):
        """A point object from unbatched parts, with its frames set to exactly those parts."""
        raise NotImplementedError

    def _to_coords(self, xo, up) -> list[torch.Tensor]:
        """Gauged packed tangent parts at ``xo`` -> the coords of the base manifold's TangentVector."""
        raise NotImplementedError

    def _from_coords(self, xo, coords) -> list[torch.Tensor]:
        """TangentVector coords at ``xo`` (frames = packed) -> packed tangent parts."""
        raise NotImplementedError

    def _st_deltas(self, xo, z) -> list[torch.Tensor]:
        """The δ of the base manifold's linearization from the straight-through zero parts ``z``."""
        raise NotImplementedError

    def _packed_parts_of(self, y, ref) -> list[torch.Tensor]:
        """Parts of a retraction output ``y`` (orthonormal frames), rotated to be closest to ``ref``."""
        raise NotImplementedError

    def _canonical_parts(self, x) -> list[torch.Tensor]:
        """Parts of any point object: orthonormalized by QR with signs fixed."""
        raise NotImplementedError

    # ------------------------------------------------------------------ equality, repr
    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.base == self.base

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.base))

    @property
    def numel(self) -> int:
        """Number of entries of a packed point (and of a packed tangent vector)."""
        return sum(math.prod(s) for s in self._shapes)

    # ------------------------------------------------------------------ layout
    def _split(self, t: torch.Tensor) -> list[torch.Tensor]:
        lead, parts, pos = t.shape[:-1], [], 0
        for s in self._shapes:
            k = math.prod(s)
            parts.append(t[..., pos : pos + k].reshape(*lead, *s))
            pos += k
        return parts

    def _join(self, parts) -> torch.Tensor:
        lead = torch.broadcast_shapes(*(p.shape[: p.dim() - len(s)] for p, s in zip(parts, self._shapes)))
        return torch.cat([p.expand(*lead, *s).reshape(*lead, -1) for p, s in zip(parts, self._shapes)], -1)

    def _check_packed(self, name: str, t, *, like: torch.Tensor | None = None, batched: bool = True) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (a packed {self.name} tensor), got {type(t).__name__}")
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

    # ------------------------------------------------------------------ geoopt: shape checks
    def _check_shape(self, shape, name):
        ok = len(shape) >= 1 and shape[-1] == self.numel
        reason = None if ok else f"'{name}' on {self!r} must have last dimension {self.numel}, got shape {tuple(shape)}"
        return ok, reason

    def assert_check_point(self, x: torch.Tensor):
        self._check_packed("x", x)

    def assert_check_vector(self, u: torch.Tensor):
        self._check_packed("u", u)

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        if not bool(torch.isfinite(x).all()):
            return False, "x contains NaN or Inf"
        xp = self._split(x.detach())
        bad, reason = self._orth_defects(xp, atol + rtol)
        if bad:
            return False, reason
        deficient, reason = self._rank_defect(xp)
        if deficient:
            return False, reason
        return True, None

    def _check_vector_on_tangent(self, x, u, *, atol=1e-5, rtol=1e-5):
        u = u.detach()
        err = (self.proju(x.detach(), u) - u).abs().amax()
        tol = atol + rtol * u.abs().amax()
        if bool(err > tol):
            return False, f"u violates the gauge (max deviation {float(err):.3g} > {float(tol):.3g})"
        return True, None

    # ------------------------------------------------------------------ metric (orthonormal coordinates)
    def inner(self, x, u, v=None, *, keepdim=False):
        """``<u, v>`` — the dot product of the packed coordinates (they are orthonormal). Cost ``O(numel)``."""
        self._check_packed("u", u)
        if v is None:
            v = u
        else:
            self._check_packed("v", v, like=u)
        return (u * v).sum(-1, keepdim=keepdim)

    def component_inner(self, x, u, v=None):
        """``u * v`` elementwise: per-coordinate second moments for ``RiemannianAdam``."""
        self._check_packed("u", u)
        if v is not None:
            self._check_packed("v", v, like=u)
        return u * (u if v is None else v)

    def norm(self, x, u, *, keepdim=False):
        return self.inner(x, u, keepdim=keepdim).clamp_min(0).sqrt()

    # ------------------------------------------------------------------ projections
    def proju(self, x, u):
        """Orthogonal projection of the packed vector ``u`` onto the gauge subspace (the tangent
        coordinates at ``x``). Batched; cost ``O(numel · r)``."""
        self._check_packed("x", x)
        self._check_packed("u", u, like=x)
        return self._join(self._proju_parts(self._split(x.detach()), self._split(u)))

    def egrad2rgrad(self, x, u):
        """The Riemannian gradient from ``p.grad`` of a parameter used through :meth:`straight_through`:
        that gradient is the raw δ-gradient, so this is the gauge projection :meth:`proju`."""
        return self.proju(x, u)

    def projx(self, x):
        """Re-orthonormalize the packed frames without changing the matrix / tensor (QR with R's
        diagonal positive). Idempotent up to rounding on a packed point. Batched; cost
        ``O((m + n) r²)`` / ``O(d n r³)``."""
        self._check_packed("x", x)
        return self._join(self._projx_parts(self._split(x.detach())))

    # ------------------------------------------------------------------ retraction and transport
    def _tangent(self, xo, u1) -> TangentVector:
        up = self._proju_parts(self._frame_parts(xo), self._split(u1))
        return TangentVector(self.base, xo, self._to_coords(xo, up))

    def _retr1(self, x1, u1):
        xo = self._unpack(x1)
        y = self.base.retr(xo, self._tangent(xo, u1))
        return self._join(self._packed_parts_of(y, self._split(x1)))

    def _transp1(self, x1, y1, v1):
        xo, yo = self._unpack(x1), self._unpack(y1)
        w = self.base.transp(xo, yo, self._tangent(xo, v1))
        return self._join(self._from_coords(yo, w.coords))

    def _retr_transp1(self, x1, u1, v1):
        xo = self._unpack(x1)
        y = self.base.retr(xo, self._tangent(xo, u1))
        y1 = self._join(self._packed_parts_of(y, self._split(x1)))
        yo = self._unpack(y1)
        w = self.base.transp(xo, yo, self._tangent(xo, v1))
        return y1, self._join(self._from_coords(yo, w.coords))

    def retr(self, x, u):
        """Retraction: the manifold's (metric-projection / TT-SVD) retraction of ``x + ξ(u)``, packed
        with orthonormal frames rotated to be closest to those of ``x`` (so coordinates of consecutive
        iterates stay comparable, which ``RiemannianAdam``'s per-coordinate statistics rely on).
        ``u`` is first projected onto the gauge (``RiemannianSGD``'s first momentum step passes a raw
        gradient). Batched (a loop over items); not differentiable. Cost ``O((m + n) r² + r³)`` /
        ``O(d n r³)``."""
        return self._batched(self._retr1, ("x", "u"), x, u)

    def expmap(self, x, u):
        """Not the exponential map (unknown in closed form here): the second-order retraction
        :meth:`retr`, which is what geoopt's optimizers need."""
        return self.retr(x, u)

    def transp(self, x, y, v):
        """Vector transport from ``T_x`` to ``T_y``: orthogonal projection of the ambient vector
        ``ξ(v)`` (a rank-2r object, never densified) onto ``T_y``. ``v`` is first projected onto the gauge.
        Batched (a loop); cost ``O((m + n) r²)`` / ``O(d n r³)``."""
        return self._batched(self._transp1, ("x", "y", "v"), x, y, v)

    def retr_transp(self, x, u, v):
        """``(retr(x, u), transp(x, retr(x, u), v))`` sharing the frames of both points."""
        return self._batched(self._retr_transp1, ("x", "u", "v"), x, u, v)

    # ------------------------------------------------------------------ points <-> objects
    def pack_point(self, *tensors: torch.Tensor) -> torch.Tensor:
        """Concatenate factor tensors (as :meth:`unpack_tensor` returns them; leading batch dims
        allowed) into one packed tensor, as they are (no orthonormalization: see :meth:`projx`)."""
        if len(tensors) != len(self._shapes):
            raise ValueError(f"expected {len(self._shapes)} factor tensors {self._shapes}, got {len(tensors)}")
        for i, (t, s) in enumerate(zip(tensors, self._shapes)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape[t.dim() - len(s) :]) != tuple(s):
                raise ValueError(f"tensors[{i}] must end with shape {s}, got {getattr(t, 'shape', type(t).__name__)}")
        return self._join(tensors)

    def unpack_tensor(self, tensor: torch.Tensor):
        """The factor tensors (views) of a packed tensor, leading batch dims kept."""
        self._check_packed("tensor", tensor)
        return tuple(self._split(tensor))

    def _unpack(self, p: torch.Tensor):
        """Point object whose cached frames are exactly the packed factors (views of ``p``)."""
        xo = self._unpack_parts(self._split(p))
        xo._cache[_PACKED] = self
        return xo

    def unpack(self, p: torch.Tensor):
        """The point as a LowRankMatrix / TensorTrain (a detached copy) whose frames are the packed
        factors, so that :class:`TangentVector` s at it have the packed coordinates."""
        self._check_packed("p", p, batched=False)
        return self._unpack(p.detach().clone())

    def pack(self, x) -> torch.Tensor:
        """A LowRankMatrix / TensorTrain as a packed point (detached). Objects from :meth:`unpack`
        round-trip exactly; others are brought to canonical form (QR, signs fixed). Cost
        ``O((m + n) r²)`` / ``O(d n r³)``."""
        self.base._check_point(x)
        if x._cache.get(_PACKED) == self:
            return self._join([t.detach() for t in self._frame_parts(x)])
        with torch.no_grad():
            return self._join(self._canonical_parts(x))

    def pack_tangent(self, v: TangentVector) -> torch.Tensor:
        """A :class:`TangentVector` as a packed tangent vector at ``pack(v.base)`` (detached). At an
        object from :meth:`unpack` this is a change of layout; otherwise ξ is re-projected onto the
        (identical) tangent space in the packed frames."""
        if not isinstance(v, TangentVector):
            raise TypeError(f"v must be a TangentVector, got {type(v).__name__}")
        if v.manifold != self.base:
            raise ValueError(f"v lives on {v.manifold!r}, not on {self.base!r}")
        xo = v.base
        if xo._cache.get(_PACKED) != self:
            yo = self._unpack(self.pack(xo))
            v = self.base.proj(yo, self.base.to_ambient(xo, v))
            xo = yo
        return self._join([c.detach() for c in self._from_coords(xo, v.coords)])

    def unpack_tangent(self, x, u: torch.Tensor) -> TangentVector:
        """The packed tangent vector ``u`` at ``x`` (a packed point, or an object returned by
        :meth:`unpack`) as a :class:`TangentVector` at ``unpack(x)`` (resp. ``x``); ``u`` is projected
        onto the gauge first."""
        if isinstance(x, torch.Tensor):
            xo = self.unpack(x)
        elif getattr(x, "_cache", {}).get(_PACKED) == self:
            xo = x
        else:
            raise TypeError("x must be a packed point tensor or an object returned by unpack()")
        self._check_packed("u", u, batched=False)
        if u.dtype != xo.dtype:
            raise ValueError(f"u has dtype {u.dtype} but x has dtype {xo.dtype}")
        return self._tangent(xo, u.detach())

    def straight_through(self, p: torch.Tensor):
        """The user-facing object of the parameter ``p`` with straight-through zeros, so that ``p.grad``
        comes out in δ-coordinates (see the module docstring). Its value is the point; use it with the
        format's operations (``@``, ``gather``, ``inner``, ``full``, ...). Cost ``O((m + n) r²)`` /
        ``O(d n r³)`` (the frames), plus the operations at rank 2r."""
        self._check_packed("p", p, batched=False)
        pd = p.detach()
        xo = self._unpack(pd)
        return self.base._linearization(xo, self._st_deltas(xo, self._split(p - pd)))

    # ------------------------------------------------------------------ sampling
    def random(self, *size, dtype=None, device=None, generator: torch.Generator | None = None) -> ManifoldTensor:
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

    def origin(self, *size, dtype=None, device=None, seed: int | None = 42) -> ManifoldTensor:
        """A deterministic random point (:meth:`random` with a generator seeded by ``seed``)."""
        g = torch.Generator()
        if seed is None:
            g.seed()
        else:
            g.manual_seed(seed)
        return self.random(*size, dtype=dtype, device=device, generator=g)


class GeooptFixedRank(_PackedLowRank):
    """:class:`FixedRankMatrices` ``(m, n, rank)`` as a ``geoopt.Manifold`` on packed parameters.

    Point ``[U | S | V]`` (``numel = (m + n) r + r²``), tangent ``[Up | M | Vp]``; see the module docstring.
    ``dim = (m + n − r) r``.
    """

    name = "FixedRank"

    def __init__(self, m: int, n: int, rank: int):
        super().__init__(FixedRankMatrices(m, n, rank))
        self.m, self.n, self.rank = m, n, rank
        self._shapes = [(m, rank), (rank, rank), (n, rank)]

    def extra_repr(self) -> str:
        return f"m={self.m}, n={self.n}, rank={self.rank}"

    def _frame_parts(self, xo):
        return list(xo._cache["frames"])

    def _proju_parts(self, xp, up):
        U, _, V = xp
        Up, M, Vp = up
        return [Up - U @ (U.mT @ Up), M, Vp - V @ (V.mT @ Vp)]

    def _projx_parts(self, xp):
        U, S, V = xp
        Qu, Ru = _qr_pos(U)
        Qv, Rv = _qr_pos(V)
        return [Qu, Ru @ S @ Rv.mT, Qv]

    def _orth_defects(self, xp, tol):
        U, _, V = xp
        for name, Q in (("U", U), ("V", V)):
            err = float(_orth_defect(Q, rows=False).max())
            if err > tol:
                return True, f"{name} is not orthonormal (max |{name}ᵀ{name} − I| = {err:.3g})"
        return False, None

    def _rank_defect(self, xp):
        s = torch.linalg.svdvals(xp[1])
        thresh = s[..., :1] * self.rank * torch.finfo(s.dtype).eps
        if bool((s[..., -1:] <= thresh).any()):
            return True, f"S is singular: the matrix has rank < {self.rank}"
        return False, None

    def _unpack_parts(self, parts):
        U, S, V = parts
        return self.base._point_from_frames(U, S, V)

    def _to_coords(self, xo, up):
        U = xo._cache["frames"][0]
        Up, M, Vp = up
        return [Up + U @ M, Vp]

    def _from_coords(self, xo, coords):
        U = xo._cache["frames"][0]
        A, B = coords
        M = U.T @ A
        return [A - U @ M, M, B]

    def _st_deltas(self, xo, z):
        U = xo._cache["frames"][0]
        zU, zS, zV = z
        return [zU + U @ zS, zV]

    def _packed_parts_of(self, y, ref):
        # y = U' S' V'ᵀ with orthonormal U', V': rotate to U' Qu ≈ U, V' Qv ≈ V (polar factors).
        U, _, V = ref
        Qu, Qv = _polar(y.U.T @ U), _polar(y.V.T @ V)
        return [y.U @ Qu, Qu.T @ y.S @ Qv, y.V @ Qv]

    def _canonical_parts(self, x):
        return self._projx_parts([x.U.detach(), x.S.detach(), x.V.detach()])


class GeooptFixedTTRank(_PackedLowRank):
    """:class:`FixedTTRank` ``(shape, ranks)`` as a ``geoopt.Manifold`` on packed parameters.

    Point: the right-orthogonal cores ``[C_1 | V_2 | ... | V_d]`` (``numel = Σ r_{k-1} n_k r_k``);
    tangent: δ-coordinates with the right gauge; see the module docstring.
    ``dim = Σ_k r_{k-1} n_k r_k − Σ_k r_k²``.
    """

    name = "FixedTTRank"

    def __init__(self, shape, ranks):
        super().__init__(FixedTTRank(shape, ranks))
        self.shape, self.ranks = self.base.shape, self.base.ranks
        full = [1, *self.ranks, 1]
        self._shapes = [(full[k], n, full[k + 1]) for k, n in enumerate(self.shape)]

    def extra_repr(self) -> str:
        return f"shape={self.shape}, ranks={self.ranks}"

    def _frame_parts(self, xo):
        fr = xo._cache["frames"]
        return [fr["C"], *fr["V"][1:]]

    def _proju_parts(self, xp, up):
        out = [up[0]]
        for V, D in zip(xp[1:], up[1:]):
            a, n, b = V.shape[-3:]
            Dr, Vr = D.reshape(*D.shape[:-3], a, n * b), V.reshape(*V.shape[:-3], a, n * b)
            P = Dr - (Dr @ Vr.mT) @ Vr  # broadcast over the batch dims of x and u
            out.append(P.reshape(*P.shape[:-2], a, n, b))
        return out

    def _projx_parts(self, xp):
        cores = list(xp)
        for k in range(len(cores) - 1, 0, -1):
            a, n, b = cores[k].shape[-3:]
            Q, R = _qr_pos(cores[k].reshape(*cores[k].shape[:-3], a, n * b).mT)
            cores[k] = Q.mT.reshape(cores[k].shape)
            c = cores[k - 1]
            cores[k - 1] = (c.reshape(*c.shape[:-3], -1, a) @ R.mT).reshape(c.shape)
        return cores

    def _orth_defects(self, xp, tol):
        for k, V in enumerate(xp[1:], start=2):
            a, n, b = V.shape[-3:]
            err = float(_orth_defect(V.reshape(*V.shape[:-3], a, n * b), rows=True).max())
            if err > tol:
                return True, f"core {k} is not right-orthogonal (max |V Vᵀ − I| = {err:.3g})"
        return False, None

    def _rank_defect(self, xp):
        Y = xp[0]
        for k in range(len(xp) - 1):
            a, n, b = Y.shape[-3:]
            _, R = torch.linalg.qr(Y.reshape(*Y.shape[:-3], a * n, b))
            s = torch.diagonal(R, dim1=-2, dim2=-1).abs()
            if bool((s.amin(-1) <= s.amax(-1) * b * torch.finfo(s.dtype).eps).any()):
                return True, f"the TT-rank at bond {k + 1} is less than {self.ranks[k]}"
            nxt = xp[k + 1]
            Y = (R @ nxt.reshape(*nxt.shape[:-3], b, -1)).reshape(nxt.shape)
        return False, None

    def _unpack_parts(self, parts):
        xo = TensorTrain._trusted(parts)
        with torch.no_grad():
            xo._cache["frames"] = self.base._frames_from_right(parts, qr=_qr_pos)
        return xo

    def _to_coords(self, xo, up):
        return list(up)

    def _from_coords(self, xo, coords):
        return list(coords)

    def _st_deltas(self, xo, z):
        return list(z)

    def _packed_parts_of(self, y, ref):
        # y: right-orthogonal cores. Sweep right to left rotating each bond (W_k -> Qᵀ W_k Q') so
        # that the right unfolding of core k is closest to the reference core's.
        cores, Q = list(y.cores), None
        for k in range(len(cores) - 1, 0, -1):
            W = cores[k] if Q is None else torch.tensordot(cores[k], Q, dims=1)
            a, n, b = W.shape
            Wr = W.reshape(a, n * b)
            Q = _polar(Wr @ ref[k].reshape(a, n * b).T)
            cores[k] = (Q.T @ Wr).reshape(a, n, b)
        cores[0] = torch.tensordot(cores[0], Q, dims=1)
        return cores

    def _canonical_parts(self, x):
        return self._projx_parts([c.detach() for c in x.cores])


# ---------------------------------------------------------------------- optimizer step guard
OWNER = "lowrankopt_owner"  # on the manifold (deep copies and pickles keep it): who made the parameter, an _Owner
HINT = "lowrankopt_hint"  # on the manifold: a Euclidean way to train the same layer, if there is one


class _Owner(str):
    """The owner mark of a guarded parameter (a str naming it). Creating one installs the step guard — also when a
    pickle holding one is loaded, in any process: a ``geoopt.EuclideanStiefel`` parameter (a geoopt class, which
    runs no code of ours when unpickled) carries the guard with it through ``torch.load`` and spawned workers."""

    def __new__(cls, owner: str):
        _register_step_guard()
        return super().__new__(cls, owner)

    def __reduce__(self):
        return type(self), (str(self),)


def manifold_parameter(
    data: torch.Tensor, manifold: geoopt.Manifold, owner: str, hint: str | None = None
) -> geoopt.ManifoldParameter:
    """A ``geoopt.ManifoldParameter`` created by the library: the optimizer step guard is installed and the
    parameter is marked as guarded, with ``owner`` (e.g. ``"TTConv2d(4, 6, kernel_size=3, rank=2).first"``) and
    ``hint`` (a Euclidean alternative) for the guard's error messages. ``manifold`` must be a fresh instance
    (the marks live on it)."""
    setattr(manifold, OWNER, _Owner(owner))  # installs the guard, here and wherever the parameter is unpickled
    setattr(manifold, HINT, hint)
    return geoopt.ManifoldParameter(data, manifold=manifold)


def _is_ours(p) -> bool:
    """A parameter the guard protects: on a packed manifold, or made by :func:`manifold_parameter`."""
    m = getattr(p, "manifold", None) if isinstance(p, ManifoldTensor) else None
    return isinstance(m, _PackedLowRank) or getattr(m, OWNER, None) is not None


def _is_riemannian(optimizer) -> bool:
    """geoopt's Riemannian optimizers (RiemannianSGD, RiemannianAdam, their sparse versions, the line search)
    share ``OptimMixin``; they step a ManifoldTensor by its manifold's retraction."""
    return isinstance(optimizer, geoopt.optim.mixin.OptimMixin)


def _euclidean_step_error(optimizer, i: int, j: int, p) -> TypeError:
    owner = getattr(p.manifold, OWNER, None) or f"a parameter on {p.manifold!r}"
    hint = getattr(p.manifold, HINT, None)
    return TypeError(
        f"{type(optimizer).__name__} is not a Riemannian optimizer, but param group {i}, parameter {j} "
        f"(shape {tuple(p.shape)}) is {owner}, a lowrankopt manifold parameter: a Euclidean step would move it off "
        "its manifold (its orthonormal factors would stop being orthonormal). Train manifold parameters with "
        "geoopt.optim.RiemannianSGD or geoopt.optim.RiemannianAdam (plain parameters can keep any torch optimizer: "
        "give the manifold parameters to a Riemannian one)" + (f"; or {hint}" if hint else "") + "."
    )


class _GuardPlan:
    """What the guard must look at in one optimizer, found by one scan of its parameters: the guarded parameters
    ``(group index, position, parameter)``, the groups holding packed ones ``(group index, group, a packed
    parameter)``, and the ``state`` whose ``"step"`` entries were last made ints (``RiemannianAdam``).

    Valid while the optimizer's groups are the same objects with the same param lists of the same lengths — what
    ``add_param_group`` (a new group), ``load_state_dict`` (new group dicts) and assigning ``group["params"]``
    change; checking that costs ``O(#groups)`` (replacing one element of a param list in place, which no torch API
    does, is not seen). The plan holds the groups and lists it was made from, so they cannot be freed and their
    ids reused while it lives."""

    __slots__ = ("groups", "lists", "lengths", "guarded", "packed_groups", "state")

    def __init__(self, optimizer):
        self.groups = list(optimizer.param_groups)
        self.lists = [g["params"] for g in self.groups]
        self.lengths = [len(ps) for ps in self.lists]
        self.guarded = [(i, j, p) for i, ps in enumerate(self.lists) for j, p in enumerate(ps) if _is_ours(p)]
        first_packed = {}  # group index -> its first packed parameter (named by the weight-decay error)
        for i, _, p in self.guarded:
            if isinstance(p.manifold, _PackedLowRank):
                first_packed.setdefault(i, p)
        self.packed_groups = [(i, self.groups[i], p) for i, p in first_packed.items()]
        self.state = None

    def fits(self, optimizer) -> bool:
        groups = optimizer.param_groups
        return len(groups) == len(self.groups) and all(
            g is h and g["params"] is ps and len(ps) == n
            for g, h, ps, n in zip(groups, self.groups, self.lists, self.lengths)
        )


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> _GuardPlan


def _plan(optimizer) -> _GuardPlan:
    """The optimizer's :class:`_GuardPlan`, made again when its param groups changed (at every step for an optimizer
    that cannot be a weak dictionary key: unhashable, or without weak references)."""
    try:
        plan = _PLANS.get(optimizer)
        if plan is None or not plan.fits(optimizer):
            plan = _PLANS[optimizer] = _GuardPlan(optimizer)
    except TypeError:
        plan = _GuardPlan(optimizer)
    return plan


def _step_pre_hook(optimizer, args, kwargs):
    """Global optimizer step pre-hook for the manifold parameters of lowrankopt (:func:`_is_ours`).

    * A step of a non-Riemannian optimizer (``torch.optim.Adam``, ``SGD``, ...) on one of them, with a gradient,
      is an error (``TypeError``, naming the parameter): it would leave the manifold silently.
    * Weight decay on packed parameters is an error (``ValueError``).
    * ``torch.optim.Adam.__setstate__`` (run by ``load_state_dict``) turns geoopt's integer ``state["step"]``
      into a float32 tensor, so ``RiemannianAdam``'s bias corrections would change after a checkpoint round
      trip; turn it back into the int geoopt keeps (for every parameter of the optimizer), so that training
      resumes bit-identically.

    Cost per step: ``O(#groups + #guarded parameters)`` — the scan of all parameters is cached per optimizer
    (:class:`_GuardPlan`) and redone only when its param groups change; the ``"step"`` entries are converted once
    per ``optimizer.state`` object (``load_state_dict`` makes a new one).
    """
    plan = _plan(optimizer)
    if not _is_riemannian(optimizer):
        for i, j, p in plan.guarded:
            if p.grad is not None:
                raise _euclidean_step_error(optimizer, i, j, p)
    for i, group, p in plan.packed_groups:
        wd = group.get("weight_decay", 0)
        if wd:
            raise ValueError(
                f"{type(optimizer).__name__}: param group {i} has weight_decay={wd} but holds a lowrankopt "
                f"manifold parameter (on {p.manifold!r}); decaying packed factors is meaningless and breaks "
                "their orthonormality: use weight_decay=0 for lowrankopt manifold parameters (put them in their "
                "own param group)."
            )
    if isinstance(optimizer, geoopt.optim.RiemannianAdam) and plan.state is not optimizer.state:
        for state in optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = int(state["step"].item())
        plan.state = optimizer.state
    return None


_STEP_PRE_HOOK = None


def _register_step_guard() -> None:
    """Install the global step pre-hook once, when the first manifold parameter of the library is created (so
    importing lowrankopt does not touch the optimizers of users who never use these parameters)."""
    global _STEP_PRE_HOOK
    if _STEP_PRE_HOOK is None:
        _STEP_PRE_HOOK = register_optimizer_step_pre_hook(_step_pre_hook)
