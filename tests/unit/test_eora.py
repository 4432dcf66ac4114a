"""EoRA factors against direct formulas: exact at full rank, optimal in the
activation-weighted norm at low rank, peft's scaling accounted for."""

from __future__ import annotations

import pytest
import torch

from recoup.stages.recovery.eora import eora_factors, peft_factors, svd_factors, weighted_error


def _problem(out: int = 12, n_in: int = 10, tokens: int = 200, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(out, n_in, generator=gen, dtype=torch.float64)
    # anisotropic inputs: a few directions carry most of the energy
    scales = torch.logspace(1, -2, n_in, dtype=torch.float64)
    X = torch.randn(tokens, n_in, generator=gen, dtype=torch.float64) * scales
    return delta, X, X.T @ X


def test_full_rank_reproduces_the_compression_error() -> None:
    delta, _, cov = _problem()
    B, A = eora_factors(delta, cov, rank=min(delta.shape))
    torch.testing.assert_close(B @ A, delta, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_low_rank_beats_plain_svd_in_the_activation_weighted_norm(rank: int) -> None:
    delta, X, cov = _problem()
    B, A = eora_factors(delta, cov, rank)
    assert B.shape == (12, rank) and A.shape == (rank, 10)
    e_eora = weighted_error(delta, B, A, cov)
    e_svd = weighted_error(delta, *svd_factors(delta, rank), cov)
    assert e_eora < e_svd
    # the direct formula: ||(delta - BA) X^T||_F^2
    direct = float(((delta - B @ A) @ X.T).pow(2).sum())
    assert e_eora == pytest.approx(direct, rel=1e-8)


def test_eckart_young_in_the_eigenspace_is_optimal() -> None:
    """The weighted error equals the tail of the projected problem's singular values."""
    delta, _, cov = _problem()
    lam, Q = torch.linalg.eigh(cov)
    s = torch.linalg.svdvals(delta @ Q * lam.sqrt())
    B, A = eora_factors(delta, cov, 4)
    assert weighted_error(delta, B, A, cov) == pytest.approx(float((s[4:] ** 2).sum()), rel=1e-8)


def test_directions_without_input_are_dropped_and_rank_is_padded() -> None:
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    X = torch.randn(50, 2, generator=gen, dtype=torch.float64) @ torch.randn(
        2, 5, generator=gen, dtype=torch.float64)  # inputs span 2 of 5 directions
    cov = X.T @ X
    B, A = eora_factors(delta, cov, rank=4)
    assert B.shape == (6, 4) and A.shape == (4, 5) and torch.isfinite(A).all()
    assert (B[:, 2:] == 0).all() and (A[2:] == 0).all()
    # on the inputs it sees, the correction is exact
    torch.testing.assert_close(X @ (B @ A).T, X @ delta.T, atol=1e-8, rtol=1e-8)


def test_covariance_scale_does_not_matter() -> None:
    delta, _, cov = _problem()
    B1, A1 = eora_factors(delta, cov, 3)
    B2, A2 = eora_factors(delta, cov * 1e-3, 3)
    torch.testing.assert_close(B1 @ A1, B2 @ A2, atol=1e-8, rtol=1e-6)


def test_peft_factors_keep_the_product_under_the_lora_scale() -> None:
    delta, _, cov = _problem()
    B, A = eora_factors(delta, cov, 3)
    lora_A, lora_B = peft_factors(B, A, scale=2.0)
    torch.testing.assert_close(2.0 * lora_B @ lora_A, B @ A, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lora_B.norm(dim=0), lora_A.norm(dim=1))  # balanced


def test_bad_shapes_and_empty_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="cov"):
        eora_factors(torch.zeros(3, 4), torch.eye(3), 1)
    with pytest.raises(ValueError, match="saw no input"):
        eora_factors(torch.ones(3, 4), torch.zeros(4, 4), 1)
