"""Unit tests for the contrastive probe: features, split and held-out accuracy."""

from __future__ import annotations

import pytest
import torch

from recoup.stages.lcc.probe import probe_accuracy, probe_features, split_samples

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_probe_features_layout() -> None:
    zq, zr = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    c = torch.tensor([1.0, -1.0], dtype=F64)
    x = probe_features(zq, c, zr)
    assert torch.equal(x, torch.cat([zq + c, zr], dim=1))


def test_split_samples_is_seeded_and_disjoint() -> None:
    train, held = split_samples(10, 0.7, seed=3)
    assert len(train) == 7 and len(held) == 3
    assert set(train.tolist()).isdisjoint(held.tolist())
    assert sorted(train.tolist() + held.tolist()) == list(range(10))
    again = split_samples(10, 0.7, seed=3)
    assert torch.equal(again[0], train) and torch.equal(again[1], held)
    with pytest.raises(ValueError, match="empty side"):
        split_samples(2, 0.9, seed=0)


def test_probe_accuracy_extremes() -> None:
    g = _gen(6)
    x = torch.randn(50, 4, generator=g, dtype=F64)
    shift = torch.tensor([3.0, 0, 0, 0], dtype=F64)
    assert probe_accuracy(x + shift, x - shift, seed=0) == 1.0
    assert probe_accuracy(x, x.clone(), seed=0) == 0.5  # nothing to tell apart
    assert probe_accuracy(x + shift, x - shift, seed=0) == probe_accuracy(
        x + shift, x - shift, seed=0
    )


def test_probe_ignores_a_constant_shift_of_features() -> None:
    """Documents that a constant c cannot change a standardised linear probe's score."""
    g = _gen(7)
    base = torch.randn(80, 3, generator=g, dtype=F64)
    pos = torch.randn(80, 3, generator=g, dtype=F64) + 0.3 * base
    neg = torch.randn(80, 3, generator=g, dtype=F64)
    c = torch.tensor([5.0, -2.0, 0.5], dtype=F64)
    zero = torch.zeros(3, dtype=F64)
    plain = probe_accuracy(
        probe_features(base, zero, pos), probe_features(base, zero, neg), seed=1
    )
    shifted = probe_accuracy(
        probe_features(base, c, pos), probe_features(base, c, neg), seed=1
    )
    assert plain == shifted
