"""A matrix with orthonormal columns as a tensor train whose cores have orthonormal left unfoldings, each core a
Householder product (:mod:`.householder`) or a point of geoopt's Stiefel manifold: the factors U and V of the STTP
layers (:mod:`lowrankopt.nn.spectral.sttp`; Obukhov et al., AISTATS 2021).

For a ``d × r`` matrix with rows over the modes ``d = n_1 ⋯ n_D``, cores ``G_k: (R_{k−1}, n_k, R_k)``, ``R_0 = 1``,
``R_D = r``: when every left unfolding ``(R_{k−1} n_k) × R_k`` has orthonormal columns, so has the matrix. Cost of
the matrix: ``O(d Σ_k R_{k−1} R_k)``; of the cores: one batched Householder product per distinct core shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import geoopt
import torch

from ...manifolds.geoopt import manifold_parameter
from .._common import _random_orthonormal
from .householder import householder_numel, householder_orthonormal, householder_params

__all__ = ["OrthonormalTT"]


class OrthonormalTT(torch.nn.Module):
    """A ``d × r`` matrix with orthonormal columns as a tensor train with orthonormal left unfoldings.

    Args:
        modes: ``n_1, …, n_D`` with ``d = n_1 ⋯ n_D`` (rows are indexed row-major over the modes).
        rank: the number of columns r (≤ d).
        max_rank: cap on the TT-ranks (default r).
        last: layout of the last core, ``"full"`` (Stiefel) or ``"reduced"`` (Grassmann); the other cores are
            always reduced.
        parametrization: ``"householder"`` or ``"stiefel"`` (see the module docstring).
        owner: how error messages name this factor (e.g. ``"STTPLinear(in_features=8, out_features=6).U"``).

    Ranks ``R_k = min(max_rank, n_1 ⋯ n_k, n_{k+1} ⋯ n_D r)``. Cores are random orthonormal (Haar per core) until
    :meth:`set_cores`. Building them costs one batched Householder product per distinct core shape.
    """

    def __init__(
        self,
        modes: Sequence[int],
        rank: int,
        *,
        max_rank: int | None = None,
        last: str,
        parametrization: str,
        dtype: torch.dtype,
        generator: torch.Generator | None = None,
        owner: str = "OrthonormalTT",
    ) -> None:
        super().__init__()
        self.modes = tuple(modes)
        self.rank = rank
        d = math.prod(self.modes)
        if rank > d:
            raise ValueError(f"rank {rank} exceeds the number of rows {d}")
        max_rank = rank if max_rank is None else max_rank
        # the largest TT-ranks a d × r matrix can have, capped at max_rank
        bonds = (
            [1]
            + [
                min(max_rank, math.prod(self.modes[: k + 1]), math.prod(self.modes[k + 1 :]) * rank)
                for k in range(len(self.modes) - 1)
            ]
            + [rank]
        )
        self.bonds = tuple(bonds)
        self.kinds = tuple(["reduced"] * (len(self.modes) - 1) + [last])
        self.parametrization = parametrization
        # groups of equally shaped cores: (rows, cols, kind) -> core indices
        groups: dict[tuple[int, int, str], list[int]] = {}
        for k, (n, kind) in enumerate(zip(self.modes, self.kinds, strict=True)):
            groups.setdefault((bonds[k] * n, bonds[k + 1], kind), []).append(k)
        self._groups = list(groups.items())
        self.params = torch.nn.ParameterList()
        for i, ((rows, cols, kind), members) in enumerate(self._groups):
            if parametrization == "householder":
                self.params.append(
                    torch.nn.Parameter(torch.zeros(len(members), householder_numel(rows, cols, kind), dtype=dtype))
                )
            else:
                eye = torch.eye(rows, cols, dtype=dtype).expand(len(members), rows, cols).clone()
                name = f"{owner}.params[{i}] ({len(members)} core(s) with orthonormal {rows} x {cols} unfoldings)"
                hint = "build the layer with parametrization='householder' (any torch optimizer)"
                self.params.append(manifold_parameter(eye, geoopt.EuclideanStiefel(), name, hint))
        cores = [
            _random_orthonormal(bonds[k] * n, bonds[k + 1], generator).view(bonds[k], n, bonds[k + 1])
            for k, n in enumerate(self.modes)
        ]
        self.set_cores(cores, allow_sign_flips=True)

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        """The core shapes ``(R_{k−1}, n_k, R_k)``."""
        return [(self.bonds[k], n, self.bonds[k + 1]) for k, n in enumerate(self.modes)]

    def dof(self) -> int:
        """Degrees of freedom of the Householder parameterization (``Σ`` of the per-core counts)."""
        return sum(
            householder_numel(r0 * n, r1, kind) for (r0, n, r1), kind in zip(self.shapes, self.kinds, strict=True)
        )

    def cores(self) -> list[torch.Tensor]:
        """The cores ``(R_{k−1}, n_k, R_k)`` (differentiable in the parameters). Cost ``O(Σ R_{k−1} n_k R_k²)``."""
        out: list[torch.Tensor | None] = [None] * len(self.modes)
        for ((rows, cols, kind), members), p in zip(self._groups, self.params, strict=True):
            Q = householder_orthonormal(p, rows, cols, kind) if self.parametrization == "householder" else p
            for j, k in enumerate(members):
                out[k] = Q[j].view(self.bonds[k], self.modes[k], self.bonds[k + 1])
        return out

    def matrix(self) -> torch.Tensor:
        """The ``d × r`` matrix (rows row-major over the modes). Cost ``O(d Σ_k R_{k−1} R_k)``."""
        M = None
        for core in self.cores():
            M = core.reshape(core.shape[1], core.shape[2]) if M is None else (M @ core.reshape(core.shape[0], -1))
            M = M.reshape(-1, core.shape[2])
        return M

    @torch.no_grad()
    def set_cores(
        self,
        cores: Sequence[torch.Tensor],
        *,
        right: torch.Tensor | None = None,
        allow_sign_flips: bool = False,
    ) -> torch.Tensor:
        """Represent the TT with the given orthonormal cores (times ``right``, an r × r orthogonal matrix).

        The Householder layout fixes a gauge per core; each gauge is passed into the next core, so the
        product is unchanged except for the returned r × r orthogonal ``G``: the represented matrix is
        ``(cores' matrix) @ right @ G``. ``G`` is the last core's gauge (reduced layout), a diagonal of
        signs (full layout with ``allow_sign_flips``) or the identity; float64. Cost ``O(Σ R_{k−1} n_k R_k²)``.
        """
        if len(cores) != len(self.modes):
            raise ValueError(f"expected {len(self.modes)} cores, got {len(cores)}")
        carry = None
        new = []
        tol = 1e-4 if any(c.dtype == torch.float32 for c in cores) else 1e-10
        for k, (core, shape, kind) in enumerate(zip(cores, self.shapes, self.kinds, strict=True)):
            if tuple(core.shape) != shape:
                raise ValueError(f"core {k} must have shape {shape}, got {tuple(core.shape)}")
            core = core.to(torch.float64)
            if carry is not None:
                core = torch.einsum("ab,bnc->anc", carry.T, core)
            Q = core.reshape(-1, shape[2])
            last = k == len(self.modes) - 1
            if last and right is not None:
                Q = Q @ right.to(torch.float64)
            if self.parametrization == "stiefel":
                new.append((Q, None))
                carry = torch.eye(shape[2], dtype=torch.float64)
                continue
            h, G = householder_params(Q, kind, allow_sign_flips=allow_sign_flips and last, tol=tol)
            new.append((Q @ G, h))
            carry = G
        for (_, members), p in zip(self._groups, self.params, strict=True):
            for j, k in enumerate(members):
                Q, h = new[k]
                p.data[j] = (Q if h is None else h).to(p.dtype)
        return carry
