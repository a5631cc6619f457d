"""Independent dense references for the tests (never built from the code under test's internals)."""

from __future__ import annotations

import math

import torch


def dense_tangent_projector(factor_fn, params) -> torch.Tensor:
    """Orthogonal projector onto the range of d full(params) / d params (the tangent space of the
    manifold of the parametrization at this point), from a dense Jacobian and an SVD."""
    sizes = [p.numel() for p in params]

    def full(flat):
        parts = torch.split(flat, sizes)
        return factor_fn([q.reshape(p.shape) for q, p in zip(parts, params)]).reshape(-1)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    J = torch.autograd.functional.jacobian(full, flat, vectorize=True)
    U, s, _ = torch.linalg.svd(J, full_matrices=False)
    rank = int((s > s[0] * 1e-10).sum())
    Q = U[:, :rank]
    return Q @ Q.T


def tt_full(cores) -> torch.Tensor:
    """Dense tensor from TT cores by explicit contraction (independent of TensorTrain.full)."""
    res = cores[0]
    for c in cores[1:]:
        res = torch.tensordot(res, c, dims=([res.dim() - 1], [0]))
    return res.squeeze(0).squeeze(-1)


def tt_matrix_full(cores) -> torch.Tensor:
    """Dense ``(Π m_k, Π n_k)`` matrix from TT-matrix cores ``(r, m_k, n_k, r')`` by explicit contraction and one
    permutation (independent of TTMatrix.full and of the merged-mode layout)."""
    d = len(cores)
    res = cores[0]
    for c in cores[1:]:
        res = torch.tensordot(res, c, dims=([res.dim() - 1], [0]))
    res = res.squeeze(0).squeeze(-1)  # (m_1, n_1, m_2, n_2, ...)
    res = res.permute([2 * k for k in range(d)] + [2 * k + 1 for k in range(d)])
    return res.reshape(math.prod(c.shape[1] for c in cores), math.prod(c.shape[2] for c in cores))


def tucker_full(parts) -> torch.Tensor:
    """Dense tensor of a Tucker ``[core, U_1, ..., U_d]`` by one einsum (independent of Tucker.full)."""
    core, *factors = parts
    letters = "abcdefgh"[: core.dim()]
    spec = f"{letters}," + ",".join(f"{'ijklmnop'[k]}{letters[k]}" for k in range(core.dim()))
    return torch.einsum(f"{spec}->{'ijklmnop'[: core.dim()]}", core, *factors)


def tucker_projector(x) -> torch.Tensor:
    """The tangent projector of a Tucker tensor (range of the parametrization's Jacobian)."""
    return dense_tangent_projector(tucker_full, [x.core, *x.factors])


def tt_projector(x) -> torch.Tensor:
    """The tangent projector of a TensorTrain, or of a TTMatrix on the ``(M, N)`` matrices (row-major entries)."""
    return dense_tangent_projector(tt_matrix_full if x.cores[0].dim() == 4 else tt_full, list(x.cores))


def matrix_projector(X: torch.Tensor, rank: int) -> torch.Tensor:
    """P Z = UUᵀZ + ZVVᵀ − UUᵀZVVᵀ as a dense (mn × mn) matrix, U, V from a dense SVD of X."""
    U, _, Vh = torch.linalg.svd(X)
    Pu, Pv = U[:, :rank] @ U[:, :rank].T, Vh[:rank].T @ Vh[:rank]
    m, n = X.shape
    Im, In = torch.eye(m, dtype=X.dtype), torch.eye(n, dtype=X.dtype)
    # vec(A Z B) = (A ⊗ Bᵀ) vec(Z) for row-major vec
    return torch.kron(Pu, In) + torch.kron(Im, Pv) - torch.kron(Pu, Pv)


def dense_grad(f_dense, X: torch.Tensor) -> torch.Tensor:
    X = X.detach().clone().requires_grad_(True)
    (G,) = torch.autograd.grad(f_dense(X), X)
    return G


def dense_hvp(f_dense, X: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    return torch.autograd.functional.hvp(f_dense, X.detach(), V)[1]


def loglog_slope(ts, errs) -> float:
    """Least-squares slope of log(err) against log(t)."""
    lt = torch.tensor([math.log(t) for t in ts], dtype=torch.float64)
    le = torch.tensor([math.log(max(e, 1e-300)) for e in errs], dtype=torch.float64)
    lt, le = lt - lt.mean(), le - le.mean()
    return float((lt * le).sum() / (lt * lt).sum())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def linear_map_matrix(f, c_in: int, n: int, dtype=torch.float64) -> torch.Tensor:
    """The dense matrix ``(out numel, c_in n²)`` of the affine map f on ``(B, c_in, n, n)`` inputs, its constant
    part removed: f applied to every basis image."""
    N = c_in * n * n
    X = torch.eye(N, dtype=dtype).reshape(N, c_in, n, n)
    with torch.no_grad():
        Y = f(X) - f(torch.zeros(1, c_in, n, n, dtype=dtype))
    return Y.reshape(N, -1).T


class Euclidean:
    """ℝⁿ as a "manifold" for optimizer tests: the dot product, identity retraction and transport (the CG and
    trust-region rules then reduce to their linear-algebra counterparts: an independent reference)."""

    def __init__(self, n):
        self.dim = n

    def retr(self, x, v):
        return x + v

    def transp(self, x, y, v):
        return v

    def inner(self, x, u, v):
        return u @ v

    def norm(self, x, v):
        return torch.linalg.vector_norm(v)
