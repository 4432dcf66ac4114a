"""Pruning / fake-quantization math against direct formulas on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from recoup.stages.compress.pruning import (
    HessianAccumulator,
    InputNormAccumulator,
    magnitude_scores,
    nm_mask,
    nm_valid,
    rtn_fake_quantize,
    sparsegpt_prune,
    sparsity_of,
    unstructured_mask,
    wanda_scores,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated_inputs(tokens: int, features: int, seed: int) -> torch.Tensor:
    """(tokens, features) inputs with strongly correlated channels and uneven scales."""
    g = _gen(seed)
    latent = torch.randn(tokens, features // 4, generator=g)
    mix = torch.randn(features // 4, features, generator=g)
    scales = torch.exp(torch.randn(features, generator=g))
    return (latent @ mix + 0.1 * torch.randn(tokens, features, generator=g)) * scales


# ----------------------------------------------------------------------------- scores, stats


def test_wanda_scores_equal_direct_formula() -> None:
    g = _gen(0)
    W = torch.randn(6, 8, generator=g)
    X = torch.randn(3, 5, 8, generator=g)  # (batch, seq, in)
    acc = InputNormAccumulator(8)
    acc.add(X[:2])
    acc.add(X[2:])
    flat = X.reshape(-1, 8)
    assert acc.n_tokens == 15
    torch.testing.assert_close(acc.sq_sum, flat.double().square().sum(0))

    scores = wanda_scores(W, acc.sq_sum, acc.n_tokens)
    # |W_ij| * ||x_j||_2, up to the documented 1/sqrt(n_tokens) constant
    expected = W.abs() * flat.norm(dim=0).unsqueeze(0)
    torch.testing.assert_close(scores * acc.n_tokens**0.5, expected)
    # a constant factor cannot change a mask
    assert torch.equal(
        unstructured_mask(scores, 0.5, per_row=True),
        unstructured_mask(expected, 0.5, per_row=True),
    )


def test_magnitude_scores_are_abs() -> None:
    W = torch.tensor([[-2.0, 1.0], [0.5, -0.25]])
    torch.testing.assert_close(magnitude_scores(W), W.abs())


def test_hessian_accumulator_matches_2_over_n_xxt() -> None:
    X = torch.randn(20, 6, generator=_gen(1))  # (tokens, in)
    acc = HessianAccumulator(6)
    acc.add(X[:7])
    acc.add(X[7:].reshape(1, 13, 6))
    assert acc.xxt.dtype == torch.float64
    torch.testing.assert_close(acc.hessian(), (2 / 20) * X.double().T @ X.double())


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_unstructured_per_row_exact(sparsity: float) -> None:
    scores = torch.rand(5, 40, generator=_gen(2))
    keep = unstructured_mask(scores, sparsity, per_row=True)
    pruned_per_row = (~keep).sum(dim=1)
    assert torch.all(pruned_per_row == round(40 * sparsity))
    # every pruned score is below every kept score within its row
    for row in range(5):
        assert scores[row][~keep[row]].max() < scores[row][keep[row]].min()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_unstructured_whole_matrix_exact(sparsity: float) -> None:
    scores = torch.rand(7, 10, generator=_gen(3))
    keep = unstructured_mask(scores, sparsity, per_row=False)
    assert int((~keep).sum()) == round(70 * sparsity)
    assert scores[~keep].max() < scores[keep].min()


def test_unstructured_exact_with_ties() -> None:
    keep = unstructured_mask(torch.zeros(4, 8), 0.5, per_row=True)
    assert torch.all((~keep).sum(dim=1) == 4)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_valid(n: int, m: int) -> None:
    scores = torch.rand(6, 32, generator=_gen(4))
    keep = nm_mask(scores, n, m)
    groups = keep.reshape(6, 32 // m, m)  # (out, in/m, m)
    assert torch.all(groups.sum(-1) == n)
    assert nm_valid(scores * keep, n, m)
    # the kept entries are the top-n scores of each group
    kept_min = torch.where(groups, scores.reshape(6, -1, m), torch.inf).amin(-1)
    dropped_max = torch.where(~groups, scores.reshape(6, -1, m), -torch.inf).amax(-1)
    assert torch.all(kept_min > dropped_max)


def test_nm_valid_detects_violation_and_sparsity_of() -> None:
    W = torch.tensor([[1.0, 2.0, 0.0, 3.0, 0.0, 0.0, 1.0, 1.0]])
    assert not nm_valid(W, 2, 4)
    assert nm_valid(W, 3, 4)
    assert sparsity_of(W) == pytest.approx(3 / 8)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_bad_sparsity_names_value(bad: float) -> None:
    with pytest.raises(ValueError, match=f"got {bad}"):
        unstructured_mask(torch.rand(2, 4), bad, per_row=True)
    with pytest.raises(ValueError, match=f"got {bad}"):
        sparsegpt_prune(torch.rand(2, 4), torch.eye(4), sparsity=bad)


def test_bad_nm_names_values() -> None:
    with pytest.raises(ValueError, match="4:4"):
        nm_mask(torch.rand(2, 8), 4, 4)
    with pytest.raises(ValueError, match="5:4"):
        nm_valid(torch.rand(2, 8), 5, 4)
    with pytest.raises(ValueError, match="in_features=10 is not divisible by m=4"):
        nm_mask(torch.rand(2, 10), 2, 4)
    with pytest.raises(ValueError, match="in_features=10 is not divisible by m=4"):
        sparsegpt_prune(torch.rand(2, 10), torch.eye(10), n=2, m=4)


def test_sparsegpt_needs_exactly_one_pattern() -> None:
    with pytest.raises(ValueError, match="sparsity=0.5, n=2, m=4"):
        sparsegpt_prune(torch.rand(2, 8), torch.eye(8), sparsity=0.5, n=2, m=4)
    with pytest.raises(ValueError, match="sparsity=None, n=None, m=None"):
        sparsegpt_prune(torch.rand(2, 8), torch.eye(8))


# ----------------------------------------------------------------------------- SparseGPT


def test_sparsegpt_identity_hessian_is_magnitude() -> None:
    """With H = I there is no correlation to exploit: no weight is updated, and with one
    column block spanning the whole matrix the block-wise w^2/d^2 ranking (d constant) is the
    whole-matrix magnitude ranking."""
    W = torch.randn(8, 32, generator=_gen(5))
    H = torch.eye(32)
    W_new, keep = sparsegpt_prune(W, H, sparsity=0.5, blocksize=32)
    expected = unstructured_mask(magnitude_scores(W), 0.5, per_row=False)
    assert torch.equal(keep, expected)
    torch.testing.assert_close(W_new, W * expected)

    W_nm, keep_nm = sparsegpt_prune(W, H, n=2, m=4, blocksize=16)
    expected_nm = nm_mask(magnitude_scores(W), 2, 4)
    assert torch.equal(keep_nm, expected_nm)
    torch.testing.assert_close(W_nm, W * expected_nm)


def test_sparsegpt_identity_hessian_per_block_sparsity() -> None:
    """With blocks smaller than the matrix each column block reaches the target on its own."""
    W = torch.randn(4, 48, generator=_gen(6))
    _, keep = sparsegpt_prune(W, torch.eye(48), sparsity=0.5, blocksize=16)
    for start in range(0, 48, 16):
        assert int((~keep[:, start : start + 16]).sum()) == 32


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"n": 2, "m": 4}])
def test_sparsegpt_beats_magnitude_on_correlated_inputs(pattern: dict[str, float]) -> None:
    W = torch.randn(16, 64, generator=_gen(7))
    X = _correlated_inputs(512, 64, seed=8)  # (tokens, in)
    acc = HessianAccumulator(64)
    acc.add(X)
    W_sgpt, keep = sparsegpt_prune(W, acc.hessian(), blocksize=32, **pattern)
    if "n" in pattern:
        mag_keep = nm_mask(magnitude_scores(W), 2, 4)
        assert nm_valid(W_sgpt, 2, 4)
    else:
        mag_keep = unstructured_mask(magnitude_scores(W), 0.5, per_row=False)
        assert sparsity_of(W_sgpt) == pytest.approx(0.5)
    assert torch.all(W_sgpt[~keep] == 0)

    def err(W_new: torch.Tensor) -> float:
        return float(torch.linalg.norm(X @ W.T - X @ W_new.T))

    assert err(W_sgpt) < 0.7 * err(W * mag_keep)


def test_sparsegpt_dead_input_channel() -> None:
    W = torch.randn(4, 8, generator=_gen(9))
    X = torch.randn(100, 8, generator=_gen(10))
    X[:, 3] = 0
    acc = HessianAccumulator(8)
    acc.add(X)
    H = acc.hessian()
    W_new, keep = sparsegpt_prune(W, H, sparsity=0.25)
    assert torch.all(W_new[:, 3] == 0)
    assert not keep[:, 3].any()  # zeroed dead weights are pruned first
    assert torch.all(torch.isfinite(W_new))
    assert torch.equal(H, acc.hessian())  # the caller's H is not modified


def test_sparsegpt_keeps_dtype() -> None:
    W = torch.randn(4, 8, generator=_gen(11)).bfloat16()
    W_new, keep = sparsegpt_prune(W, torch.eye(8), n=2, m=4)
    assert W_new.dtype == torch.bfloat16
    assert keep.dtype == torch.bool


# ----------------------------------------------------------------------------- RTN


def _half_step(W: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Direct bound: half of (max(0, max) - min(0, min)) / (2^bits - 1), per group."""
    g = W.reshape(W.shape[0], -1, group)  # (out, in/g, g)
    span = g.amax(-1).clamp(min=0) - g.amin(-1).clamp(max=0)
    return (span / (2**bits - 1) / 2).repeat_interleave(group, dim=1)  # (out, in)


@pytest.mark.parametrize(("bits", "group"), [(8, 16), (4, 16), (3, 8), (4, 64), (2, 32)])
def test_rtn_error_within_half_step(bits: int, group: int) -> None:
    W = torch.randn(8, 64, generator=_gen(12))
    Q = rtn_fake_quantize(W, bits, group)
    assert Q.shape == W.shape and Q.dtype == W.dtype
    assert torch.all((Q - W).abs() <= _half_step(W, bits, group) * (1 + 1e-5) + 1e-7)
    levels = Q.reshape(8, -1, group).unsqueeze(-1)  # (out, in/g, g, 1)
    distinct = max(len(torch.unique(v)) for v in levels.reshape(-1, group))
    assert distinct <= 2**bits


def test_rtn_int8_error_tiny_and_per_row() -> None:
    W = torch.randn(8, 64, generator=_gen(13))
    rel = torch.linalg.norm(rtn_fake_quantize(W, 8, None) - W) / torch.linalg.norm(W)
    assert rel < 0.01
    torch.testing.assert_close(rtn_fake_quantize(W, 4, -1), rtn_fake_quantize(W, 4, 64))


def test_rtn_keeps_zeros_and_dtype() -> None:
    W = torch.randn(4, 16, generator=_gen(14))
    W[:, ::2] = 0
    W[1] = 0
    Q = rtn_fake_quantize(W.bfloat16(), 3, 8)
    assert Q.dtype == torch.bfloat16
    assert torch.all(Q.float()[W == 0] == 0)


@pytest.mark.parametrize("bits", [1, 9])
def test_rtn_bad_bits_named(bits: int) -> None:
    with pytest.raises(ValueError, match=f"got {bits}"):
        rtn_fake_quantize(torch.rand(2, 8), bits, 4)


def test_rtn_bad_group_named() -> None:
    with pytest.raises(ValueError, match="group_size=0"):
        rtn_fake_quantize(torch.rand(2, 8), 4, 0)


def test_rtn_partial_last_group_is_its_own_group() -> None:
    W = torch.randn(3, 13, generator=torch.Generator().manual_seed(0))
    Q = rtn_fake_quantize(W, 4, 5)  # groups of columns 0-4, 5-9 and 10-12
    expected = torch.cat([rtn_fake_quantize(W[:, :10], 4, 5),
                          rtn_fake_quantize(W[:, 10:], 4, -1)], dim=1)
    assert torch.equal(Q, expected)
    assert all(len(torch.unique(Q[r, 10:])) <= 3 for r in range(3))


def test_sparsegpt_singular_hessian_without_damping_is_explained() -> None:
    H = torch.ones(8, 8)  # rank 1, no dead channel: Cholesky meets an exact zero pivot
    with pytest.raises(ValueError, match="percdamp=0.0"):
        sparsegpt_prune(torch.randn(2, 8), H, sparsity=0.5, percdamp=0.0)
    sparsegpt_prune(torch.randn(2, 8), H, sparsity=0.5)  # the default damping fixes it
