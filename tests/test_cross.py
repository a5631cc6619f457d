"""maxvol and rectangular maxvol against brute force and their defining properties."""

import itertools
import math

import pytest
import torch

from lowrankopt.cross import maxvol, rect_maxvol

D = torch.float64


@pytest.mark.parametrize("n,r", [(6, 2), (8, 3), (7, 1), (5, 5), (9, 4)])
def test_maxvol_is_dominant_and_near_the_brute_force_maximum(n, r):
    for seed in range(5):
        A = torch.randn(n, r, dtype=D, generator=torch.Generator().manual_seed(100 * n + 10 * r + seed))
        I, B = maxvol(A, tol=1.05)
        assert len(set(I.tolist())) == r
        assert B.abs().max().item() <= 1.05 + 1e-12  # dominance
        assert torch.allclose(B[I], torch.eye(r, dtype=D), atol=1e-12)
        assert torch.allclose(B @ A[I], A, atol=1e-12)
        assert torch.allclose(B, A @ torch.linalg.inv(A[I]), atol=1e-10)
        vol = abs(torch.linalg.det(A[I]).item())
        best = max(abs(torch.linalg.det(A[list(J)]).item()) for J in itertools.combinations(range(n), r))
        assert best <= (math.sqrt(r) * 1.05) ** r * vol * (1 + 1e-12)  # Hadamard on B[J]
        exact_I, _ = maxvol(A, tol=1.0, max_iters=1000)
        assert abs(torch.linalg.det(A[exact_I]).item()) >= best / r ** (r / 2) * (1 - 1e-12)


@pytest.mark.parametrize(
    "tol,min_rank,max_rank", [(1.1, None, None), (1.0, None, None), (2.0, 6, None), (1.1, None, 5)]
)
def test_rect_maxvol_properties(tol, min_rank, max_rank):
    A = torch.randn(40, 4, dtype=D, generator=torch.Generator().manual_seed(7))
    I, B = rect_maxvol(A, tol, min_rank, max_rank)
    k = len(I)
    assert len(set(I.tolist())) == k and (min_rank or 4) <= k <= (max_rank or 40)
    assert torch.allclose(B[I], torch.eye(k, dtype=D))
    assert torch.allclose(B @ A[I], A, atol=1e-12)
    outside = torch.ones(40, dtype=torch.bool)
    outside[I] = False
    if max_rank is None or k < max_rank:
        assert B[outside].norm(dim=1).max().item() <= tol * (1 + 1e-12)
    I0, C = maxvol(A)  # outside I, B = C C[I]⁺ in the maxvol coordinates
    assert torch.equal(I[:4], I0)
    assert torch.allclose(B[outside], C[outside] @ torch.linalg.pinv(C[I]), atol=1e-10)


def test_float32_and_bad_input():
    A = torch.randn(30, 3, generator=torch.Generator().manual_seed(8))
    I, B = maxvol(A)
    assert B.dtype == torch.float32 and B.abs().max().item() <= 1.05 + 1e-5
    with pytest.raises(ValueError, match="tall"):
        maxvol(torch.randn(2, 3, dtype=D))
    with pytest.raises(ValueError, match="full column rank"):
        maxvol(torch.ones(5, 2, dtype=D))
    with pytest.raises(ValueError, match="NaN"):
        maxvol(torch.full((4, 2), float("nan"), dtype=D))
    with pytest.raises(ValueError, match="tol"):
        rect_maxvol(A.double(), tol=0.5)
    with pytest.raises(ValueError, match="min_rank"):
        rect_maxvol(A.double(), min_rank=2)


def test_rect_maxvol_never_repeats_a_row_even_when_the_rest_are_zero():
    A = torch.eye(6, 2, dtype=D)  # rows 2..5 are zero: every unchosen row has zero norm in B
    I, B = rect_maxvol(A, tol=1.1, min_rank=4)
    assert len(set(I.tolist())) == 4
    assert torch.equal(B[I], torch.eye(4, dtype=D)) and torch.allclose(B @ A[I], A)
