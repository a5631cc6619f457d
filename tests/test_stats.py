"""Kronecker-sum covariance: the rearrangement, PRLS / truncation / flip-flop against independent references."""

import math

import numpy as np
import pytest
import torch

from lowrankopt.stats import KroneckerCovariance, rearrange, rearrange_inverse

D = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def spd(n, g):
    A = torch.randn(n, n, dtype=D, generator=g)
    return A @ A.T / n + 0.5 * torch.eye(n, dtype=D)


def ar1(n, rho):
    i = torch.arange(n, dtype=D)
    return rho ** (i[:, None] - i[None]).abs()


def gaussian(Sigma, n, g):
    return torch.randn(n, Sigma.shape[0], dtype=D, generator=g) @ torch.linalg.cholesky(Sigma).T


def test_rearrange_matches_a_loop_and_is_an_isometry():
    p, q = 3, 4
    g = gen(0)
    S = torch.randn(2, p * q, p * q, dtype=D, generator=g)
    R = rearrange(S, p, q)
    assert R.shape == (2, p * p, q * q)
    for b in range(2):
        for i in range(p):
            for j in range(p):
                block = S[b, i * q : (i + 1) * q, j * q : (j + 1) * q]
                assert torch.equal(R[b, i * p + j], block.reshape(-1))
    assert torch.equal(rearrange_inverse(R, p, q), S)
    assert torch.allclose(R.norm(), S.norm(), rtol=1e-15)
    A, B = torch.randn(p, p, dtype=D, generator=g), torch.randn(q, q, dtype=D, generator=g)
    assert torch.allclose(rearrange(torch.kron(A, B), p, q), torch.outer(A.reshape(-1), B.reshape(-1)))
    with pytest.raises(ValueError, match="S must have shape"):
        rearrange(S, 4, 3 + 1)
    with pytest.raises(ValueError, match="R must have shape"):
        rearrange_inverse(S, p, q)


def exact_samples(Sigma):
    """n = d samples whose (uncentered) sample covariance is Σ exactly: √d times the columns of a square root."""
    d = Sigma.shape[0]
    return math.sqrt(d) * torch.linalg.cholesky(Sigma).T


def test_exact_kronecker_sum_is_recovered():
    p, q = 4, 5  # p² = 16 > the 12-vector block: the matrix-free path iterates
    g = gen(1)
    Sigma = torch.kron(spd(p, g), spd(q, g)) + 0.3 * torch.kron(spd(p, g), spd(q, g))
    X = exact_samples(Sigma)
    sv = torch.linalg.svdvals(rearrange(Sigma, p, q))
    for est in (
        KroneckerCovariance(p, q, "truncated", n_terms=2, assume_centered=True),
        KroneckerCovariance(p, q, "truncated", n_terms=2, assume_centered=True, solver="matrix-free", generator=gen(0)),
        KroneckerCovariance(p, q, penalty=1e-9, assume_centered=True),
        KroneckerCovariance(p, q, penalty=1e-9, assume_centered=True, solver="matrix-free", generator=gen(0)),
    ):
        est.fit(X)
        assert est.n_terms_ == 2
        assert torch.allclose(est.covariance_, Sigma, atol=1e-9 * Sigma.norm())
        assert torch.allclose(est.singular_values_[:2], sv[:2], rtol=1e-12)
        assert est.error_norm(Sigma) < 1e-7 * Sigma.norm()  # a difference of squares: √ε accuracy
        assert all(torch.trace(A) >= 0 for A, _ in est.factors_)
    none = KroneckerCovariance(p, q, penalty=1e6, assume_centered=True).fit(X)
    assert none.n_terms_ == 0 and none.error_norm(Sigma) == pytest.approx(Sigma.norm().item())


def test_prls_equals_a_proximal_gradient_solve():
    p, q, n, lam = 3, 4, 30, 0.8
    g = gen(2)
    X = gaussian(torch.kron(ar1(p, 0.6), ar1(q, 0.3)), n, g)
    est = KroneckerCovariance(p, q, penalty=lam).fit(X)
    Xc = X - X.mean(0)
    R = rearrange(Xc.T @ Xc / n, p, q)
    M = torch.zeros_like(R)
    for _ in range(200):  # minimize ‖M − R‖² + λ‖M‖_*: gradient step 0.25, then the prox (SVT at 0.25 λ)
        U, s, Vh = torch.linalg.svd(M - 0.25 * 2 * (M - R), full_matrices=False)
        M = (U * (s - 0.25 * lam).clamp_min(0)) @ Vh
    assert torch.allclose(est.covariance_, rearrange_inverse(M, p, q), atol=1e-12)
    assert est.n_terms_ == int((torch.linalg.svdvals(R) > lam / 2).sum()) >= 1


def test_flip_flop_equals_a_generic_likelihood_maximization():
    p, q, n = 2, 3, 40
    g = gen(3)
    X = gaussian(torch.kron(spd(p, g), spd(q, g)), n, g)
    est = KroneckerCovariance(p, q, "flip-flop", tol=1e-13).fit(X)
    assert est.converged_ and est.n_iter_ < 1000
    Xc = X - X.mean(0)
    S = Xc.T @ Xc / n
    tri_p, tri_q = torch.tril_indices(p, p), torch.tril_indices(q, q)
    theta = torch.zeros(len(tri_p[0]) + len(tri_q[0]), dtype=D, requires_grad=True)

    def nll():  # −(2/n) log-likelihood up to constants, Σ = A ⊗ B with Cholesky parameters (log diagonals)
        La = torch.zeros(p, p, dtype=D).index_put((tri_p[0], tri_p[1]), theta[: len(tri_p[0])])
        Lb = torch.zeros(q, q, dtype=D).index_put((tri_q[0], tri_q[1]), theta[len(tri_p[0]) :])
        La = La.tril(-1) + torch.diag(La.diagonal().exp())
        Lb = Lb.tril(-1) + torch.diag(Lb.diagonal().exp())
        Sigma = torch.kron(La @ La.T, Lb @ Lb.T)
        return torch.logdet(Sigma) + torch.trace(torch.linalg.solve(Sigma, S)), Sigma

    opt = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        value = nll()[0]
        value.backward()
        return value

    opt.step(closure)
    reference = nll()[1].detach()
    assert torch.allclose(est.covariance_, reference, rtol=1e-7, atol=1e-9)
    A, B = est.factors_[0]
    assert torch.linalg.matrix_norm(A).item() == pytest.approx(1.0, rel=1e-12)  # the scale is fixed on A


def test_matrix_free_equals_dense():
    p, q, n = 12, 11, 60
    g = gen(4)
    X = gaussian(torch.kron(ar1(p, 0.7), ar1(q, 0.5)) + 0.5 * torch.kron(torch.eye(p, dtype=D), ar1(q, -0.3)), n, g)
    for kwargs in (dict(penalty=3.0), dict(method="truncated", n_terms=3)):
        dense = KroneckerCovariance(p, q, solver="dense", **kwargs).fit(X)
        free = KroneckerCovariance(p, q, solver="matrix-free", generator=gen(5), **kwargs).fit(X)
        assert dense.n_terms_ == free.n_terms_ >= 2
        assert torch.allclose(free.covariance_, dense.covariance_, atol=1e-10 * dense.covariance_.norm())
        assert free.error_norm(dense.covariance_) < 1e-7 * dense.covariance_.norm()
        Sigma = torch.eye(p * q, dtype=D)
        assert free.error_norm(Sigma) == pytest.approx((free.covariance_ - Sigma).norm().item(), rel=1e-10)
        k = free.singular_values_.numel()
        assert torch.allclose(free.singular_values_, dense.singular_values_[:k], rtol=1e-10)


def test_cv_picks_the_grid_minimizer_of_the_held_out_error():
    p, q, n = 3, 3, 40
    X = gaussian(torch.kron(ar1(p, 0.6), ar1(q, 0.4)), n, gen(6))
    X = X - X.mean(0)
    est = KroneckerCovariance(p, q, penalty="cv", cv_folds=4, assume_centered=True, generator=gen(7)).fit(X)
    folds = torch.tensor_split(torch.randperm(n, generator=gen(7)), 4)
    direct = []
    for lam in est.cv_grid_.tolist():
        err = 0.0
        for test in folds:
            mask = torch.ones(n, dtype=torch.bool)
            mask[test] = False
            fit = KroneckerCovariance(p, q, penalty=lam, assume_centered=True).fit(X[mask])
            S_test = X[test].T @ X[test] / len(test)
            err += float((fit.covariance_ - S_test).square().sum() - S_test.square().sum())
        direct.append(err)
    assert torch.allclose(est.cv_errors_, torch.tensor(direct, dtype=D), rtol=1e-9, atol=1e-12)
    assert est.penalty_ == pytest.approx(float(est.cv_grid_[int(np.argmin(direct))]))


def test_plugin_penalty_estimates_the_oracle():
    p = q = 6
    Sigma = torch.kron(ar1(p, 0.7), ar1(q, 0.5)) + 0.5 * torch.kron(torch.eye(p, dtype=D), ar1(q, -0.3))
    ratios = []
    for seed in range(3):
        X = gaussian(Sigma, 200, gen(10 + seed))
        est = KroneckerCovariance(p, q, generator=gen(seed)).fit(X)
        Xc = X - X.mean(0)
        oracle = 2 * torch.linalg.matrix_norm(rearrange(Xc.T @ Xc / 200 - Sigma, p, q), 2).item()
        ratios.append(est.penalty_ / oracle)
    assert 0.6 < min(ratios) and max(ratios) < 1.6, ratios
    again = KroneckerCovariance(p, q, generator=gen(2)).fit(X)
    assert again.penalty_ == est.penalty_  # deterministic given the generator


@pytest.mark.parametrize("method", ["flip-flop", "truncated"])
def test_score_and_mahalanobis_match_dense_gaussian(method):
    p, q = 3, 2
    g = gen(8)
    Sigma = torch.kron(spd(p, g), spd(q, g)) + 0.2 * torch.eye(p * q, dtype=D)
    X = gaussian(Sigma, 50, g) + 1.5
    est = KroneckerCovariance(p, q, method, n_terms=2).fit(X)
    Y = gaussian(Sigma, 7, g)
    mvn = torch.distributions.MultivariateNormal(est.location_.reshape(-1), est.covariance_)
    assert est.score(Y) == pytest.approx(mvn.log_prob(Y).mean().item(), rel=1e-12)
    diff = Y - est.location_.reshape(-1)
    dense = (diff * torch.linalg.solve(est.covariance_, diff.T).T).sum(1)
    assert torch.allclose(est.mahalanobis(Y), dense, rtol=1e-10)
    out = est.mahalanobis(Y.numpy())
    assert isinstance(out, np.ndarray) and np.allclose(out, dense.numpy(), rtol=1e-10)
    assert torch.allclose(est.mahalanobis(Y.reshape(7, p, q)), dense, rtol=1e-10)


def test_inputs_numpy_three_way_and_float32():
    p, q = 3, 4
    X = gaussian(torch.kron(ar1(p, 0.5), ar1(q, 0.5)), 30, gen(9))
    a = KroneckerCovariance(p, q, penalty=0.5).fit(X)
    b = KroneckerCovariance(p, q, penalty=0.5).fit(X.numpy().reshape(30, p, q))
    c = KroneckerCovariance(p, q, penalty=0.5).fit(X.float())
    assert torch.allclose(a.covariance_, b.covariance_, atol=1e-14)
    assert c.covariance_.dtype == torch.float32
    assert torch.allclose(c.covariance_.double(), a.covariance_, atol=1e-5)


def test_bad_input():
    p, q = 2, 3
    X = torch.randn(10, p * q, dtype=D)
    est = KroneckerCovariance(p, q)
    with pytest.raises(ValueError, match="at least 2 samples"):
        est.fit(X[:1])
    with pytest.raises(ValueError, match=r"X must have shape \(n, 6\)"):
        est.fit(torch.randn(10, 7, dtype=D))
    with pytest.raises(ValueError, match="NaN"):
        est.fit(X.clone().index_fill_(0, torch.tensor([3]), float("nan")))
    with pytest.raises(TypeError, match="X must be"):
        est.fit([[1.0] * 6] * 3)
    with pytest.raises(RuntimeError, match="fit"):
        est.score(X)
    with pytest.raises(ValueError, match="method"):
        KroneckerCovariance(p, q, "mle")
    with pytest.raises(ValueError, match="penalty"):
        KroneckerCovariance(p, q, penalty=-1.0)
    with pytest.raises(ValueError, match="n_terms"):
        KroneckerCovariance(p, q, "truncated")
    with pytest.raises(ValueError, match="solver"):
        KroneckerCovariance(p, q, solver="lanczos")
    with pytest.raises(ValueError, match="cv_folds"):
        KroneckerCovariance(p, q, penalty="cv").fit(X[:3])
    indefinite = KroneckerCovariance(p, q, penalty=0.0).fit(X[:3])  # rank-deficient: not positive definite
    with pytest.raises(ValueError, match="not positive definite"):
        indefinite.score(X)


def test_float32_matrix_free_and_flip_flop_converge():
    p, q = 5, 4
    X = gaussian(torch.kron(ar1(p, 0.6), ar1(q, 0.4)), 60, gen(11)).float()
    free = KroneckerCovariance(p, q, "truncated", n_terms=2, solver="matrix-free", generator=gen(0)).fit(X)
    dense = KroneckerCovariance(p, q, "truncated", n_terms=2, solver="dense").fit(X.double())
    assert free.covariance_.dtype == torch.float32
    assert torch.allclose(free.covariance_.double(), dense.covariance_, atol=1e-5 * dense.covariance_.norm())
    ff = KroneckerCovariance(p, q, "flip-flop").fit(X)
    ff64 = KroneckerCovariance(p, q, "flip-flop").fit(X.double())
    assert ff.converged_ and ff64.converged_
    assert torch.allclose(ff.covariance_.double(), ff64.covariance_, atol=1e-5)
    assert ff.score(X) == pytest.approx(ff64.score(X.double()), rel=1e-5)


def test_matrix_free_cv_matches_dense_cv_where_it_can():
    p, q, n = 5, 5, 60
    X = gaussian(
        torch.kron(ar1(p, 0.7), ar1(q, 0.5)) + 0.5 * torch.kron(torch.eye(p, dtype=D), ar1(q, -0.3)), n, gen(12)
    )
    dense = KroneckerCovariance(p, q, penalty="cv", solver="dense", generator=gen(3)).fit(X)
    free = KroneckerCovariance(p, q, penalty="cv", solver="matrix-free", generator=gen(3)).fit(X)
    assert torch.allclose(free.cv_grid_, dense.cv_grid_)
    ok = torch.isfinite(free.cv_errors_)
    assert 0 < int(ok.sum()) < len(ok)  # the smallest λ need more than 10 terms: not candidates
    assert torch.allclose(free.cv_errors_[ok], dense.cv_errors_[ok], rtol=1e-9, atol=1e-9)
    best = int(torch.argmin(dense.cv_errors_))
    if bool(ok[best]):
        assert free.penalty_ == pytest.approx(dense.penalty_)


def test_chunked_products_equal_one_chunk(monkeypatch):
    from lowrankopt.stats.kronecker import _RearrangedCovariance

    X = torch.randn(7, 3, 4, dtype=D, generator=gen(13))
    op = _RearrangedCovariance(X)
    V, U = torch.randn(16, 3, dtype=D, generator=gen(14)), torch.randn(9, 3, dtype=D, generator=gen(15))
    M = op.dense()
    assert torch.allclose(op.matmat(V), M @ V, atol=1e-13) and torch.allclose(op.rmatmat(U), M.T @ U, atol=1e-13)
    monkeypatch.setattr(_RearrangedCovariance, "_CHUNK_ELEMENTS", 1)  # one sample per chunk
    assert torch.allclose(op.matmat(V), M @ V, atol=1e-13) and torch.allclose(op.rmatmat(U), M.T @ U, atol=1e-13)


def test_flip_flop_on_degenerate_data_names_the_cause():
    """Issue 18: constant data were blamed on the sample size."""
    p, q, n = 2, 3, 40  # n is far above max(p/q, q/p) + 1: the sample size is not the problem
    est = KroneckerCovariance(p, q, method="flip-flop")
    with pytest.raises(ValueError, match=r"X is constant.*sample covariance is zero"):
        est.fit(torch.full((n, p * q), 3.0, dtype=D))
    X = torch.randn(n, p, q, dtype=D, generator=gen(4))
    X[:, 1, :] = 7.0  # row 1 of every sample is the same: the row covariance A is singular
    with pytest.raises(ValueError, match=r"row 1 of the 2 × 3 samples of X is constant"):
        est.fit(X)
    X = torch.randn(n, p, q, dtype=D, generator=gen(4))
    X[:, :, 2] = X[:, :, 0]  # column 2 repeats column 0: the column covariance B is singular
    with pytest.raises(ValueError, match=r"singular.*X"):
        est.fit(X)
    with pytest.raises(ValueError, match=r"n = 2 samples"):  # too few samples is still reported as such
        KroneckerCovariance(6, 1, method="flip-flop").fit(torch.randn(2, 6, dtype=D, generator=gen(5)))
