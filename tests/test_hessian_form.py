"""⟨v, Hess f(x)[v]⟩ from a curve through x (autodiff.riemannian_hessian_form), the curve's native gather, the line
search that uses it, and the cached validation of index tensors — against dense references written here."""

import pytest
import torch
from reference import dense_hvp, rel
from test_autodiff import MRANK, MSHAPE, matrix_problems

import lowrankopt.optim.objective as objective_module
from lowrankopt import FixedRankMatrices, LowRankMatrix, minimize, riemannian_grad_and_hessian
from lowrankopt.autodiff import riemannian_hessian_form
from lowrankopt.formats.curve_lowrank import CurveLowRank
from lowrankopt.formats.lowrank import rowdot

DT = torch.float64


def setup(seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    M = FixedRankMatrices(*MSHAPE, MRANK)
    x = M.random_point(generator=g, dtype=torch.float64).to(dtype)
    v = M.random_tangent(x, generator=g)
    return M, x, v, matrix_problems(g), g


@pytest.mark.parametrize("name", list(matrix_problems(torch.Generator().manual_seed(0))))
def test_form_without_curvature_is_the_dense_second_derivative(name):
    M, x, v, probs, _ = setup()
    f, f_dense = probs[name]
    Xi = v.to_ambient().full()
    ref = (Xi * dense_hvp(f_dense, x.full(), Xi)).sum()  # ⟨ξ, ∇²f ξ⟩ = ⟨ξ, P ∇²f P ξ⟩ for tangent ξ
    assert rel(riemannian_hessian_form(f, x, v, curvature=False), ref) < 1e-12


@pytest.mark.parametrize("name", list(matrix_problems(torch.Generator().manual_seed(0))))
def test_form_with_curvature_is_the_second_derivative_along_the_retraction(name):
    """The metric-projection retraction is second order, so (f∘R_x)''(0) along v is ⟨v, Hess f(x)[v]⟩ (Absil,
    Mahony, Sepulchre, Prop. 5.5.5): central second differences of the dense f."""
    M, x, v, probs, _ = setup()
    f, f_dense = probs[name]
    h = 1e-3

    def phi(t):
        return f_dense(M.retr(x, v * t).full()) if t else f_dense(x.full())

    ref = (phi(h) - 2 * phi(0.0) + phi(-h)) / h**2
    assert rel(riemannian_hessian_form(f, x, v), ref) < 1e-5


@pytest.mark.parametrize("curvature", [True, False])
@pytest.mark.parametrize("name", list(matrix_problems(torch.Generator().manual_seed(0))))
def test_form_equals_the_hessian_vector_product_path(name, curvature):
    M, x, v, probs, _ = setup(1)
    f = probs[name][0]
    _, grad, hess = riemannian_grad_and_hessian(f, x, curvature=curvature)
    ref = M.inner(x, v, hess(v))
    assert rel(riemannian_hessian_form(f, x, v, curvature=curvature), ref) < 1e-12
    assert rel(riemannian_hessian_form(f, x, v, grad=grad, curvature=curvature), ref) < 1e-12
    assert riemannian_hessian_form(f, x, v).dtype == DT and not riemannian_hessian_form(f, x, v).requires_grad


def test_form_in_float32_agrees_with_float64():
    M, x, v, probs, _ = setup(2)
    f = probs["completion"][0]
    x32 = x.to(torch.float32)
    v32 = M.proj(x32, v.to_ambient().to(torch.float32))
    val = riemannian_hessian_form(f, x32, v32)
    assert val.dtype == torch.float32
    assert rel(val.double(), riemannian_hessian_form(f, x, v)) < 1e-4


def test_form_of_a_function_that_ignores_x_is_zero():
    M, x, v, _, _ = setup()
    assert float(riemannian_hessian_form(lambda X: torch.tensor(3.0, dtype=DT), x, v)) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_curve_gather_is_the_dense_curve_and_its_derivatives_in_t(dtype):
    """Entries of C(t) = Σ t^p L Rᵀ at duplicate, unsorted indices, and their first and second derivatives in t,
    against the dense matrix polynomial."""
    g = torch.Generator().manual_seed(3)
    m, n, r = 9, 7, 3
    L0, L1 = (torch.randn(m, r, generator=g, dtype=DT).to(dtype) for _ in range(2))
    R0, R1 = (torch.randn(n, r, generator=g, dtype=DT).to(dtype) for _ in range(2))
    R0 = R0.T.contiguous().T  # a column-major factor, as QR returns
    idx = torch.tensor([[8, 6], [0, 0], [3, 2], [8, 6], [1, 5], [3, 2], [0, 4]])  # duplicates, unsorted
    w = torch.randn(len(idx), generator=g, dtype=DT).to(dtype)
    t0 = 0.37
    t = torch.tensor(t0, dtype=dtype, requires_grad=True)
    terms = [(0, L0, R0), (1, L1, R0), (1, L0, R1), (2, L1, R1)]
    eye = torch.eye(r, dtype=dtype)
    C = CurveLowRank.of(L0 + t * L1, eye, R0 + t * R1, t, terms)
    y = C.gather(idx)
    d1 = torch.autograd.grad((w * y).sum(), t, create_graph=True)[0]
    d2 = torch.autograd.grad(d1, t)[0]
    # dense: C(t) = L0 R0ᵀ + t (L1 R0ᵀ + L0 R1ᵀ) + t² L1 R1ᵀ
    D0, D1, D2 = (a.double() @ b.double().T for a, b in ((L0, R0), (L1, R0), (L1, R1)))
    D1 = D1 + L0.double() @ R1.double().T
    r_, c_ = idx[:, 0], idx[:, 1]
    tol = 1e-13 if dtype == DT else 1e-5
    assert rel(y.detach().double(), (D0 + t0 * D1 + t0**2 * D2)[r_, c_]) < tol
    assert rel(d1.detach().double(), (w.double() * (D1 + 2 * t0 * D2)[r_, c_]).sum()) < tol
    assert rel(d2.double(), (w.double() * 2 * D2[r_, c_]).sum()) < tol
    assert rel(C.full().detach().double(), D0 + t0 * D1 + t0**2 * D2) < tol  # generic ops: the factors


def test_rowdot_is_the_rowwise_dot_product():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(11, 5, generator=g, dtype=DT), torch.randn(11, 5, generator=g, dtype=DT)
    assert rel(rowdot(a, b), torch.tensor([float(a[i] @ b[i]) for i in range(11)], dtype=DT)) < 1e-14
    assert rowdot(a[:0], b[:0]).shape == (0,)


def completion_problem(seed=5, m=30, n=25, r=3, N=400):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, r, generator=g, dtype=DT) @ torch.randn(r, n, generator=g, dtype=DT)
    idx = torch.stack([torch.randint(0, m, (N,), generator=g), torch.randint(0, n, (N,), generator=g)], 1)
    vals = A[idx[:, 0], idx[:, 1]] + 0.01 * torch.randn(N, generator=g, dtype=DT)
    x0 = LowRankMatrix.random(m, n, r, dtype=DT, generator=g)
    return (lambda X: 0.5 * ((X.gather(idx) - vals) ** 2).sum() + 0.1 * (X.gather(idx) ** 4).sum() / N), x0


@pytest.mark.parametrize("method", ["sd", "cg"])
@pytest.mark.parametrize("curvature", [True, False])
def test_line_search_model_step_takes_no_hessian_tape_and_matches_the_hvp_path(method, curvature, monkeypatch):
    """The model step's curvature from the curve (no Hessian tape at any point) gives the iterates of the
    Hessian-vector-product path (float64, same counters)."""
    f, x0 = completion_problem()
    ref = None
    with monkeypatch.context() as mp:
        mp.setattr(objective_module, "has_chart_hessian_form", lambda M: False)
        ref = minimize(f, x0, method, curvature=curvature, max_iter=15, gtol=0)
    with monkeypatch.context() as mp:
        mp.setattr(
            objective_module, "riemannian_grad_and_hessian", lambda *a, **k: pytest.fail("a Hessian tape was built")
        )
        res = minimize(f, x0, method, curvature=curvature, max_iter=15, gtol=0)
    assert res.nit == ref.nit == 15
    assert (res.nfev, res.ngev, res.nhev) == (ref.nfev, ref.ngev, ref.nhev) and res.nhev == 15
    assert abs(res.fun - ref.fun) <= 1e-10 * abs(ref.fun)
    assert rel(res.x.full(), ref.x.full()) < 1e-8
    steps, ref_steps = (torch.tensor([h["step_size"] for h in r.history[1:]]) for r in (res, ref))
    assert rel(steps, ref_steps) < 1e-8


def test_an_index_modified_in_place_is_validated_again():
    x = LowRankMatrix.random(5, 4, 2, dtype=DT, generator=torch.Generator().manual_seed(6))
    idx = torch.tensor([[0, 1], [4, 3], [2, 2]])
    X = x.full()
    assert rel(x.gather(idx), X[idx[:, 0], idx[:, 1]]) < 1e-14
    assert rel(x.gather(idx), X[idx[:, 0], idx[:, 1]]) < 1e-14  # validated once, then found valid
    idx[1, 0] = 5  # out of range, in place
    with pytest.raises(ValueError, match="outside the shape"):
        x.gather(idx)
    idx[1, 0] = 3
    assert rel(x.gather(idx), X[idx[:, 0], idx[:, 1]]) < 1e-14
    view = idx[1:]
    view[0, 1] = 9  # through a view: the version counter is shared
    with pytest.raises(ValueError, match="outside the shape"):
        x.gather(idx)
    with pytest.raises(ValueError, match="outside the shape"):  # a refusal is not remembered as a pass
        x.gather(idx)
    wide = LowRankMatrix.random(5, 10, 2, dtype=DT, generator=torch.Generator().manual_seed(7))
    assert rel(wide.gather(idx), wide.full()[idx[:, 0], idx[:, 1]]) < 1e-14  # valid against other bounds
    with pytest.raises(ValueError, match="outside the shape"):
        x.gather(idx)  # and still invalid against x's


def test_index_validation_skips_tensors_whose_state_it_cannot_read():
    x = LowRankMatrix.random(5, 4, 2, dtype=DT, generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        idx = torch.tensor([[0, 1], [4, 3]])
    for _ in range(2):
        assert rel(x.gather(idx), x.full()[idx[:, 0], idx[:, 1]]) < 1e-14


def test_curve_gather_with_factors_of_different_widths():
    """Terms of different ranks (no batched Gram product): term by term, against the dense polynomial."""
    g = torch.Generator().manual_seed(9)
    m, n = 6, 5
    L0, R0 = torch.randn(m, 3, generator=g, dtype=DT), torch.randn(n, 3, generator=g, dtype=DT)
    L1, R1 = torch.randn(m, 1, generator=g, dtype=DT), torch.randn(n, 1, generator=g, dtype=DT)
    idx = torch.tensor([[5, 4], [0, 0], [5, 4], [2, 1]])
    t = torch.tensor(-0.6, dtype=DT, requires_grad=True)
    C = CurveLowRank.of(
        torch.cat([L0, t * L1], 1), torch.eye(4, dtype=DT), torch.cat([R0, R1], 1), t, [(0, L0, R0), (1, L1, R1)]
    )
    D = L0 @ R0.T + float(t.detach()) * L1 @ R1.T
    y = C.gather(idx)
    assert rel(y.detach(), D[idx[:, 0], idx[:, 1]]) < 1e-14
    (d1,) = torch.autograd.grad(y.sum(), t)
    assert rel(d1, (L1 @ R1.T)[idx[:, 0], idx[:, 1]].sum()) < 1e-14
