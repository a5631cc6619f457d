"""lowrankopt.check_gradient / check_hessian: autodiff derivatives pass with slopes 2 and 3 on both built-in manifolds
(a quartic f written with gather and norm), wrong derivatives fail with the slope their error predicts (1, resp. 2:
the Hessian without its curvature term is not the Riemannian Hessian away from a critical point), non-tangent
vectors are flagged, a sphere with user derivatives (its normalization retraction is the metric projection: second
order), exact models, plots, reproducibility, float32, and bad input."""

import math
import sys

import pytest
import torch
from reference import Euclidean

import lowrankopt as lro
from lowrankopt import TangentVector, check_gradient, check_hessian, riemannian_grad, riemannian_hvp
from lowrankopt.diagnostics import GradientCheck, HessianCheck

DT = torch.float64


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def quartic(kind, dtype=DT, seed=0):
    """``(M, x, f, f_without_norm)``: f(X) = ¼ Σ (X[idx]² − a)² + ½‖X‖² on 60 entries, at a random point."""
    g = torch.Generator().manual_seed(seed)
    if kind == "matrix":
        M = lro.FixedRankMatrices(12, 9, 3)
        idx = torch.stack([torch.randint(0, 12, (60,), generator=g), torch.randint(0, 9, (60,), generator=g)], 1)
    else:
        M = lro.FixedTTRank((4, 5, 3, 4), (2, 3, 2))
        idx = torch.stack([torch.randint(0, n, (60,), generator=g) for n in (4, 5, 3, 4)], 1)
    a = torch.randn(60, dtype=dtype, generator=g)
    x = M.random_point(generator=g, dtype=dtype)

    def part(X):
        return 0.25 * ((X.gather(idx) ** 2 - a) ** 2).sum()

    return M, x, (lambda X: part(X) + 0.5 * X.norm() ** 2), part


class Sphere:
    """The unit sphere in ℝⁿ, not a lowrankopt manifold: retr (normalization), inner, norm, and proj if asked."""

    def __init__(self, n, with_proj=True):
        self.n = n
        if with_proj:
            self.proj = lambda x, z: z - x * (x @ z)

    def retr(self, x, v):
        y = x + v
        return y / torch.linalg.vector_norm(y)

    def inner(self, x, u, v):
        return u @ v

    def norm(self, x, v):
        return torch.linalg.vector_norm(v)


def rayleigh(n=10, dtype=DT, seed=0):
    """f(x) = xᵀBx on the sphere with its Riemannian gradient and Hessian, and the Euclidean ones (not tangent)."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, dtype=dtype, generator=g)
    B = B + B.T
    x = torch.randn(n, dtype=dtype, generator=g)
    x = x / torch.linalg.vector_norm(x)

    def grad(x):
        return 2 * (B @ x - (x @ B @ x) * x)

    def hvp(x, v):
        w = 2 * (B @ v)
        return w - x * (x @ w) - 2 * (x @ B @ x) * v

    return x, (lambda x: x @ B @ x), grad, hvp, B


# ---------------------------------------------------------------------------------------------- 1. autodiff passes
@pytest.mark.parametrize("kind", ["matrix", "tt"])
def test_autodiff_derivatives_pass_with_slopes_2_and_3(kind):
    _, x, f, _ = quartic(kind)
    res = check_gradient(f, x, generator=gen())
    assert isinstance(res, GradientCheck) and res.ok and bool(res)
    assert res.slope == pytest.approx(2.0, abs=0.05) and res.tangency < 1e-14
    assert "decays as t^2.0" in res.reason and res.window is not None
    assert res.t.shape == res.E.shape == (51,) and res.t[0] == pytest.approx(math.sqrt(torch.finfo(DT).eps))
    hes = check_hessian(f, x, generator=gen())
    assert isinstance(hes, HessianCheck) and hes.ok, hes
    assert hes.slope == pytest.approx(3.0, abs=0.05)
    assert hes.tangency < 1e-14 and hes.linearity < 1e-13 and hes.symmetry < 1e-13
    assert "ok" in repr(hes) and "linearity" in hes.summary()


# ---------------------------------------------------------------------------------------------- 2. wrong ones fail
@pytest.mark.parametrize("kind", ["matrix", "tt"])
def test_wrong_gradient_fails_with_slope_1(kind):
    _, x, f, part = quartic(kind)
    missing = check_gradient(f, x, lambda y: riemannian_grad(part, y)[1], generator=gen())  # the ½‖X‖² term missing
    assert not missing.ok and missing.slope == pytest.approx(1.0, abs=0.05)
    assert "grad is not the gradient of f" in missing.reason
    # 10% too long: along the gradient itself the error is 10% of the directional derivative
    g = riemannian_grad(f, x)[1]
    scaled = check_gradient(f, x, lambda y: 1.1 * riemannian_grad(f, y)[1], direction=g / g.norm())
    assert not scaled.ok and scaled.slope == pytest.approx(1.0, abs=0.05)
    # a wrong gradient also breaks the Hessian check, whose reason points at the gradient
    hes = check_hessian(f, x, grad=lambda y: riemannian_grad(part, y)[1], generator=gen())
    assert not hes.ok and hes.slope == pytest.approx(1.0, abs=0.1) and "check_gradient" in hes.reason


@pytest.mark.parametrize("kind", ["matrix", "tt"])
def test_hessian_without_curvature_term_fails_with_slope_2(kind):
    # x is not a critical point, so P_x ∇²f P_x alone is not the Riemannian Hessian: <v, H v> is off
    _, x, f, _ = quartic(kind)
    res = check_hessian(f, x, lambda y, v: riemannian_hvp(f, y, v, curvature=False), generator=gen())
    assert not res.ok and res.slope == pytest.approx(2.0, abs=0.05)
    assert "misses the second derivative" in res.reason
    assert res.linearity < 1e-13 and res.symmetry < 1e-13  # linear and symmetric all the same
    wrong = check_hessian(f, x, lambda y, v: 1.5 * riemannian_hvp(f, y, v), generator=gen())
    assert not wrong.ok and wrong.slope == pytest.approx(2.0, abs=0.05)


def test_non_linear_or_non_symmetric_hvp_is_flagged():
    M, x, f, _ = quartic("matrix")
    w0 = M.random_tangent(x, gen(7))
    squared = check_hessian(f, x, lambda y, v: riemannian_hvp(f, y, v) + v.inner(v) * w0, generator=gen())
    assert not squared.ok and squared.linearity > 1e-3 and "not linear" in squared.reason
    sym = check_hessian(f, x, lambda y, v: riemannian_hvp(f, y, v) + v.inner(w0) * w0, generator=gen())
    assert sym.symmetry < 1e-13 and sym.linearity < 1e-13  # a wrong Hessian, but linear and self-adjoint
    rank_one = M.random_tangent(x, gen(8))
    asym = check_hessian(f, x, lambda y, v: riemannian_hvp(f, y, v) + v.inner(w0) * rank_one, generator=gen())
    assert not asym.ok and asym.symmetry > 1e-3 and "not symmetric" in asym.reason


# ---------------------------------------------------------------------------------------------- 3. tangency
def test_non_tangent_gradient_is_flagged():
    M, x, f, _ = quartic("tt")
    g = riemannian_grad(f, x)[1]
    raw = [torch.randn(s, dtype=DT, generator=gen(3)) for s in M.coord_shapes]
    normal = [r - p for r, p in zip(raw, M.gauge(x, raw))]  # orthogonal to every tangent vector: no Taylor effect
    bad = TangentVector(M, x, [c + 0.1 * n for c, n in zip(g.coords, normal)])
    res = check_gradient(f, x, lambda y: bad, generator=gen())
    assert res.slope == pytest.approx(2.0, abs=0.05) and not res.ok
    assert res.tangency > 1e-3 and "not a tangent vector" in res.reason


def test_sphere_euclidean_gradient_and_hvp_are_not_tangent():
    x, f, grad, hvp, B = rayleigh()
    M = Sphere(10)
    res = check_gradient(f, x, lambda y: 2 * B @ y, manifold=M, generator=gen())
    assert not res.ok and res.slope == pytest.approx(2.0, abs=0.05) and res.tangency > 0.1
    hes = check_hessian(f, x, lambda y, v: hvp(y, v) + y * (y @ B @ v), grad=grad, manifold=M, generator=gen())
    assert not hes.ok and hes.tangency > 1e-3 and "hvp(x, v) is not a tangent vector" in hes.reason


# ---------------------------------------------------------------------------------------------- 4. another manifold
def test_sphere_with_user_derivatives():
    x, f, grad, hvp, B = rayleigh()
    M = Sphere(10)
    res = check_gradient(f, x, grad, manifold=M, generator=gen())
    assert res.ok and res.slope == pytest.approx(2.0, abs=0.05) and res.tangency < 1e-14
    hes = check_hessian(f, x, hvp, grad=grad, manifold=M, generator=gen())
    assert hes.ok and hes.slope == pytest.approx(3.0, abs=0.05), hes  # normalization is a second-order retraction
    assert hes.linearity < 1e-13 and hes.symmetry < 1e-13
    # the Euclidean Hessian projected, without the curvature term -2 (xᵀBx) v, is not the Riemannian one
    ehvp = lambda y, v: 2 * B @ v - y * (y @ (2 * B @ v))  # noqa: E731
    wrong = check_hessian(f, x, ehvp, grad=grad, manifold=M, generator=gen())
    assert not wrong.ok and wrong.slope == pytest.approx(2.0, abs=0.05)


def test_sphere_without_proj_needs_a_direction():
    x, f, grad, hvp, _ = rayleigh()
    M = Sphere(10, with_proj=False)
    with pytest.raises(TypeError, match="pass direction="):
        check_gradient(f, x, grad, manifold=M)
    v = torch.randn(10, dtype=DT, generator=gen())
    v = v - x * (x @ v)
    res = check_gradient(f, x, grad, manifold=M, direction=v)
    assert res.ok and res.tangency is None and "tangency not checked" in res.reason
    hes = check_hessian(f, x, hvp, grad=grad, manifold=M, direction=v)  # u = v, w = H v / ‖H v‖
    assert hes.ok and hes.slope == pytest.approx(3.0, abs=0.05) and hes.symmetry < 1e-13


def test_other_manifolds_need_user_derivatives():
    x, f, grad, hvp, _ = rayleigh()
    with pytest.raises(TypeError, match="not a lowrankopt manifold.*pass grad="):
        check_gradient(f, x, manifold=Sphere(10))
    with pytest.raises(TypeError, match="pass grad= and hvp="):
        check_hessian(f, x, grad=grad, manifold=Sphere(10))
    with pytest.raises(TypeError, match="has no retr"):
        check_gradient(f, x, grad, manifold=object())


def test_exact_models_pass_with_their_reason():
    c = torch.randn(6, dtype=DT, generator=gen())
    x = torch.randn(6, dtype=DT, generator=gen(2))
    v = torch.randn(6, dtype=DT, generator=gen(3))
    linear = check_gradient(lambda y: c @ y, x, lambda y: c, manifold=Euclidean(6), direction=v)
    assert linear.ok and math.isnan(linear.slope) and linear.window is None and "exact" in linear.reason
    A = torch.randn(6, 6, dtype=DT, generator=gen(4))
    A = A + A.T
    quad = check_hessian(
        lambda y: 0.5 * y @ A @ y + c @ y,
        x,
        lambda y, w: A @ w,
        grad=lambda y: A @ y + c,
        manifold=Euclidean(6),
        direction=v,
    )
    assert quad.ok and math.isnan(quad.slope) and "exact" in quad.reason


# ---------------------------------------------------------------------------------------------- 5. plot
def test_plot_returns_a_figure_with_the_lines():
    from matplotlib.figure import Figure

    _, x, f, _ = quartic("matrix")
    res = check_gradient(f, x, generator=gen(), plot=True)
    assert isinstance(res.figure, Figure)
    (ax,) = res.figure.axes
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["Taylor residual E(t)", "rounding level", f"fit: slope {res.slope:.2f}", "slope 2"]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    hes = check_hessian(f, x, generator=gen(), plot=True)
    assert "slope 3" in [line.get_label() for line in hes.figure.axes[0].get_lines()]
    assert check_gradient(f, x, generator=gen()).figure is None


def test_plot_without_matplotlib_says_how_to_install(monkeypatch):
    _, x, f, _ = quartic("matrix")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # the import fails as if it were not installed
    with pytest.raises(ImportError, match="pip install matplotlib"):
        check_gradient(f, x, generator=gen(), plot=True)


# ---------------------------------------------------------------------------------------------- 6. determinism
def test_seeded_checks_are_reproducible():
    _, x, f, _ = quartic("tt")
    a, b = check_hessian(f, x, generator=gen(5)), check_hessian(f, x, generator=gen(5))
    assert torch.equal(a.E, b.E) and a.slope == b.slope and a.linearity == b.linearity and a.symmetry == b.symmetry
    c = check_hessian(f, x, generator=gen(6))
    assert not torch.equal(a.E, c.E)
    xs, fs, grad, _, _ = rayleigh()
    r1 = check_gradient(fs, xs, grad, manifold=Sphere(10), generator=gen(5))
    r2 = check_gradient(fs, xs, grad, manifold=Sphere(10), generator=gen(5))
    assert torch.equal(r1.E, r2.E)


# ---------------------------------------------------------------------------------------------- 7. bad input
def test_bad_input_is_named():
    M, x, f, _ = quartic("matrix")
    with pytest.raises(TypeError, match="f must be callable"):
        check_gradient(3.0, x)
    with pytest.raises(TypeError, match="x must be a"):
        check_gradient(f, torch.zeros(12, 9))
    with pytest.raises(TypeError, match="grad must be callable"):
        check_gradient(f, x, grad=1)
    with pytest.raises(TypeError, match="hvp must be callable"):
        check_hessian(f, x, hvp="no")
    with pytest.raises(TypeError, match="grad\\(x\\) must be a TangentVector"):
        check_gradient(f, x, lambda y: y.full())
    wrong_shape = TangentVector(M, x, [torch.zeros(12, 3, dtype=DT), torch.zeros(8, 3, dtype=DT)])
    with pytest.raises(ValueError, match="grad\\(x\\) has coordinates of shapes"):
        check_gradient(f, x, lambda y: wrong_shape)
    with pytest.raises(TypeError, match="hvp\\(x, v\\) must be a TangentVector"):
        check_hessian(f, x, lambda y, v: 0.0)
    with pytest.raises(TypeError, match="direction must be a TangentVector"):
        check_gradient(f, x, direction=torch.zeros(12, 9))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        check_gradient(f, x, generator=0)
    with pytest.raises(TypeError, match="f must return a scalar tensor"):
        check_gradient(lambda X: X.full(), x)
    with pytest.raises(ValueError, match="f\\(x\\) is nan"):
        check_gradient(lambda X: X.norm() * math.nan, x)
    with pytest.raises(ValueError, match="steps must be"):
        check_gradient(f, x, steps=[1e-3, -1.0])
    with pytest.raises(ValueError, match="window must be"):
        check_gradient(f, x, window=2)
    xs, fs, grad, _, _ = rayleigh()
    with pytest.raises(ValueError, match="grad\\(x\\) is not a tangent vector at x that manifold.inner can take"):
        check_gradient(fs, xs, lambda y: torch.zeros(3, dtype=DT), manifold=Sphere(10))
    with pytest.raises(TypeError, match="grad\\(x\\) is None"):
        check_gradient(fs, xs, lambda y: None, manifold=Sphere(10))


# ---------------------------------------------------------------------------------------------- 8. float32
@pytest.mark.parametrize("kind", ["matrix", "tt"])
def test_float32_gradient_checks_use_float32_tolerances(kind):
    _, x, f, part = quartic(kind, dtype=torch.float32)
    res = check_gradient(f, x, generator=gen())
    eps = torch.finfo(torch.float32).eps
    assert res.ok and res.slope == pytest.approx(2.0, abs=0.1) and res.dtype == torch.float32
    assert res.tol == pytest.approx(math.sqrt(eps)) and res.t[0] == pytest.approx(math.sqrt(eps))
    assert 1e-9 < res.tangency < res.tol  # float32 rounding, far below sqrt(eps)
    wrong = check_gradient(f, x, lambda y: riemannian_grad(part, y)[1], generator=gen())
    assert not wrong.ok and wrong.slope < 1.5


def test_float32_sphere_hessian():
    # float32 leaves about a decade of steps for the t³ of the Hessian check (see lowrankopt.diagnostics): it is
    # indicative there; on this seeded, well-scaled problem it gives the right verdicts
    x, f, grad, hvp, B = rayleigh(dtype=torch.float32)
    M = Sphere(10)
    assert check_gradient(f, x, grad, manifold=M, generator=gen()).ok
    hes = check_hessian(f, x, hvp, grad=grad, manifold=M, generator=gen())
    assert hes.ok and hes.slope > 2.9 and hes.linearity < 1e-5 and hes.symmetry < 1e-5
    assert not hes.conclusive and "inconclusive" in repr(hes)  # float32 Hessian checks are always rough
    ehvp = lambda y, v: 2 * B @ v - y * (y @ (2 * B @ v))  # noqa: E731
    assert not check_hessian(f, x, ehvp, grad=grad, manifold=M, generator=gen()).ok


# ---------------------------------------------------------------------------------------------- review regressions
@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_rounding_of_the_retraction_does_not_fail_a_correct_gradient(dtype):
    """f = <X, A> − <x, A> is zero at x while its gradient is large: a floor from |f| alone (eps · S) sat ten times
    below the rounding of f along the curve (the retraction's own), and the fitted slope fell to 1.66-1.86 (float64
    seed 2, float32 seeds 0 and 1 here failed). The floor now includes the measured noise of f at steps far below
    the smallest."""
    _, x, _, _ = quartic("matrix", dtype=dtype)
    A = torch.randn(12, 9, dtype=dtype, generator=gen(3)) * 100
    c = float((x.full() * A).sum())
    for seed in range(3):
        res = check_gradient(lambda X: (X.full() * A).sum() - c, x, generator=gen(seed))
        assert res.ok and abs(res.slope - 2) < 0.05, res


def test_f_not_finite_along_the_curve_fails():
    """Was: every residual NaN read as 'the model is exact' and passed whatever the gradient."""
    M, x, _, _ = quartic("matrix")
    n0 = float(x.norm())
    f = lambda X: torch.sqrt(-((X.norm() - n0) ** 2))  # noqa: E731  (0 at x, NaN elsewhere)
    res = check_gradient(f, x, lambda y: M.zero_tangent(y), generator=gen())
    assert not res.ok and "not finite along the curve" in res.reason


def test_window_larger_than_the_steps_is_refused():
    M, x, f, _ = quartic("matrix")
    with pytest.raises(ValueError, match="window=10 is larger than the number of steps"):
        check_gradient(f, x, steps=[1e-3, 1e-2, 1e-1], generator=gen())
