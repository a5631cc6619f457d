"""The completion cost ``½‖P_Ω(X − A)‖²`` as a pymanopt user writes it: dense or on the observed entries only, in
the PyTorch backend (gradient by its autodiff) or the NumPy backend (gradient by hand: it has no autodiff)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def _make_cost(pymanopt, manifold, m, n, rows, cols, vals, cost, backend):
    """Returns ``(cost_function, euclidean_gradient_or_None)`` decorated for ``pymanopt.Problem``."""
    if cost == "dense":
        need = 6 * m * n * 8  # mask, A0, X, X - A0, masked residual, its gradient
        if need > 16 * 2**30:
            raise MemoryError(f"dense cost for {m}x{n} needs ~{need / 2**30:.0f} GiB; use cost='sparse'")
        mask_np = np.zeros((m, n))
        mask_np[rows, cols] = 1.0
        A0_np = np.zeros((m, n))
        A0_np[rows, cols] = vals

    if backend == "pytorch":
        import torch

        if cost == "dense":
            mask = torch.from_numpy(mask_np)
            A0 = torch.from_numpy(A0_np)

            @pymanopt.function.pytorch(manifold)
            def f(u, s, vt):
                X = u @ torch.diag(s) @ vt
                return 0.5 * torch.sum((mask * (X - A0)) ** 2)

        else:
            rows_t = torch.from_numpy(rows)
            cols_t = torch.from_numpy(cols)
            vals_t = torch.from_numpy(vals)

            @pymanopt.function.pytorch(manifold)
            def f(u, s, vt):
                pred = ((u[rows_t] * s) * vt[:, cols_t].T).sum(1)
                return 0.5 * torch.sum((pred - vals_t) ** 2)

        return f, None

    # numpy: pymanopt's NumPy backend has no autodiff ("No autodiff support available for the NumPy backend"), so
    # a numpy user supplies the Euclidean gradient w.r.t. the factors (u, s, vt) by hand, as in pymanopt's examples.
    if cost == "dense":

        @pymanopt.function.numpy(manifold)
        def f(u, s, vt):
            X = u @ np.diag(s) @ vt
            return 0.5 * np.sum((mask_np * (X - A0_np)) ** 2)

        @pymanopt.function.numpy(manifold)
        def egrad(u, s, vt):
            Rm = mask_np * (u @ np.diag(s) @ vt - A0_np)
            RV = Rm @ vt.T
            return [RV * s, np.sum(u * RV, axis=0), s[:, None] * (u.T @ Rm)]

        return f, egrad

    # sparse numpy: residual as a CSR matrix with the fixed pattern of Ω (structure built once, values refreshed)
    perm_mat = sp.csr_matrix((np.arange(1, rows.shape[0] + 1, dtype=np.float64), (rows, cols)), shape=(m, n))
    perm = perm_mat.data.astype(np.int64) - 1
    Rm = sp.csr_matrix((np.zeros(rows.shape[0]), perm_mat.indices, perm_mat.indptr), shape=(m, n))

    def _residual(u, s, vt):
        return np.einsum("ij,ji->i", u[rows] * s, vt[:, cols]) - vals

    @pymanopt.function.numpy(manifold)
    def f(u, s, vt):
        r = _residual(u, s, vt)
        return 0.5 * float(r @ r)

    @pymanopt.function.numpy(manifold)
    def egrad(u, s, vt):
        Rm.data = _residual(u, s, vt)[perm]
        RV = Rm @ vt.T
        return [RV * s, np.sum(u * RV, axis=0), s[:, None] * (Rm.T @ u).T]

    return f, egrad
