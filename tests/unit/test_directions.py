"""Unit tests for svd_directions and lost_component: tiny float64 tensors against formulas."""

from __future__ import annotations

import pytest
import torch

from recoup.stages.lcc.directions import lost_component, svd_directions

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _full_rank_delta(n: int = 40, d: int = 6, seed: int = 0) -> torch.Tensor:
    """(n, d) with well-separated singular values, so V is unique up to sign."""
    g = _gen(seed)
    q_left, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=F64))  # (n, d)
    q_right, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))  # (d, d)
    s = torch.linspace(10.0, 1.0, d, dtype=F64)
    return q_left @ torch.diag(s) @ q_right.T


@pytest.mark.parametrize("n", [40, 3])
def test_svd_orthonormal_descending_and_reconstructs(n: int) -> None:
    d = 6
    delta = torch.randn(n, d, generator=_gen(1), dtype=F64)
    V, S = svd_directions(delta)
    assert V.shape == (d, d) and S.shape == (min(n, d),)
    torch.testing.assert_close(V @ V.T, torch.eye(d, dtype=F64))
    assert torch.all(S[:-1] >= S[1:]) and torch.all(S >= 0)
    r = S.numel()
    U = delta @ V[:r].T / S  # (n, r)
    torch.testing.assert_close(U.T @ U, torch.eye(r, dtype=F64))  # S pairs with V
    torch.testing.assert_close(U @ torch.diag(S) @ V[:r], delta)


def test_svd_sign_convention_and_row_permutation() -> None:
    delta = _full_rank_delta()
    V, S = svd_directions(delta)
    pivots = V.gather(1, V.abs().argmax(dim=1, keepdim=True))
    assert torch.all(pivots > 0)
    perm = torch.randperm(delta.shape[0], generator=_gen(2))
    V2, S2 = svd_directions(delta[perm])
    torch.testing.assert_close(V2, V, rtol=0, atol=1e-10)
    torch.testing.assert_close(S2, S, rtol=0, atol=1e-10)
    V3, _ = svd_directions(-delta)  # the sign of the data cannot flip V either
    torch.testing.assert_close(V3, V, rtol=0, atol=1e-10)


def test_svd_keeps_dtype() -> None:
    V, S = svd_directions(torch.randn(10, 4, generator=_gen(3)))
    assert V.dtype == torch.float32 and S.dtype == torch.float32


@pytest.mark.parametrize("n", [40, 3])
def test_lost_component_full_rank_is_the_mean(n: int) -> None:
    delta = torch.randn(n, 6, generator=_gen(4), dtype=F64) + 2.0
    V, S = svd_directions(delta)
    for k in (6, 100):
        torch.testing.assert_close(
            lost_component(delta, V, S, k), delta.mean(0), rtol=0, atol=1e-12
        )


def test_lost_component_matches_reference_formula() -> None:
    delta = torch.randn(30, 5, generator=_gen(5), dtype=F64) + 1.0
    V, S = svd_directions(delta)
    U = delta @ V.T / S  # (N, d): the reference's U
    for k in (1, 2, 4):
        expected = sum(U[:, i].mean() * S[i] * V[i] for i in range(k))
        torch.testing.assert_close(lost_component(delta, V, S, k), expected)
        flipped = V * torch.tensor([-1.0, 1, -1, 1, 1], dtype=F64)[:, None]
        torch.testing.assert_close(lost_component(delta, flipped, S, k), expected)


def test_lost_component_k1_by_hand() -> None:
    # delta^T delta = diag(18, 1): S = (sqrt 18, 1), V = I. U_1 = (3, 0, 3) / sqrt 18, so
    # mean(U_1) S_1 V_1 = (6 / 3 / sqrt 18) * sqrt 18 * (1, 0) = (2, 0).
    delta = torch.tensor([[3.0, 0.0], [0.0, 1.0], [3.0, 0.0]], dtype=F64)
    V, S = svd_directions(delta)
    torch.testing.assert_close(S, torch.tensor([18.0**0.5, 1.0], dtype=F64))
    torch.testing.assert_close(
        lost_component(delta, V, S, 1), torch.tensor([2.0, 0.0], dtype=F64)
    )
    torch.testing.assert_close(
        lost_component(delta, V, S, 2), torch.tensor([2.0, 1.0 / 3.0], dtype=F64)
    )


def test_lost_component_zero_delta_is_zero_not_nan() -> None:
    delta = torch.zeros(5, 4, dtype=F64)
    V, S = svd_directions(delta)
    c = lost_component(delta, V, S, 3)
    assert torch.equal(c, torch.zeros(4, dtype=F64))
