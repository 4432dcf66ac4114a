"""Training state: the data order is a pure function of the seed, step and rank."""

from __future__ import annotations

import pytest
import torch

from recoup.cluster.train_state import GROUP_BATCHES, sample_indices
from recoup.cluster.train_task import sample_lengths


def test_data_order_is_a_pure_function_covering_every_sample_per_epoch() -> None:
    n, mb, world = 10, 2, 2
    per_step = [sample_indices(n, seed=3, micro_batch=mb, world_size=world, g=g, rank=r)
                for g in range(5) for r in range(world)]
    flat = [i for chunk in per_step for i in chunk]
    assert sorted(flat[:10]) == list(range(10))  # the first epoch is a permutation
    again = sample_indices(n, seed=3, micro_batch=mb, world_size=world, g=3, rank=1)
    assert again == per_step[3 * world + 1]
    other = [sample_indices(n, seed=4, micro_batch=mb, world_size=world, g=g, rank=0)
             for g in range(5)]
    assert other != [per_step[g * world] for g in range(5)]


def _batches(n: int, lengths: list[int] | None, *, epochs: int = 1) -> list[list[int]]:
    """Every global micro-batch (both ranks' samples) of ``epochs`` epochs of 2 x 4."""
    return [[i for r in range(2)
             for i in sample_indices(n, seed=0, micro_batch=4, world_size=2, g=g, rank=r,
                                     lengths=lengths)]
            for g in range(epochs * n // 8)]


def test_length_grouped_batches_cut_padding_and_still_cover_every_sample() -> None:
    gen = torch.Generator().manual_seed(1)
    n = 800  # two groups of 50 batches of 8
    lengths = torch.randint(8, 257, (n,), generator=gen).tolist()
    grouped, plain = _batches(n, lengths, epochs=2), _batches(n, None, epochs=2)
    for epoch in range(2):  # each epoch is still a permutation of the samples
        flat = [i for b in grouped[epoch * 100: (epoch + 1) * 100] for i in b]
        assert sorted(flat) == list(range(n))
    assert grouped[:100] != grouped[100:]  # and epochs differ in order

    def padded(batches: list[list[int]]) -> int:  # what a step costs: 8 x the longest
        return sum(8 * max(lengths[i] for i in b) for b in batches)

    real = 2 * sum(lengths)
    assert real / padded(grouped) > 0.95  # about one length per batch
    assert real / padded(plain) < 0.75  # a random batch pads to its longest
    # long and short batches interleave: the order of batches is shuffled, not sorted
    longest = [max(lengths[i] for i in b) for b in grouped[:100]]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    # a pure function of (seed, g, rank, lengths), as a resumed run needs
    again = sample_indices(n, seed=0, micro_batch=4, world_size=2, g=37, rank=1,
                           lengths=lengths)
    assert again == grouped[37][4:]


def test_length_grouping_refuses_lengths_of_another_sample_count() -> None:
    with pytest.raises(ValueError, match="3 sample lengths for 4 samples"):
        sample_indices(4, seed=0, micro_batch=2, world_size=1, g=0, rank=0, lengths=[1, 2, 3])


class _Unsized:
    """A task that knows its sample count but not the samples' lengths."""

    def num_samples(self) -> int:
        return 4


class _Sized(_Unsized):
    def sample_lengths(self) -> list[int]:
        return [5, 9, 2, 7]


def test_group_by_length_needs_a_task_that_knows_its_lengths() -> None:
    with pytest.raises(ValueError, match="group_by_length needs a task with sample_lengths"):
        sample_lengths(_Unsized())  # type: ignore[arg-type]
    assert sample_lengths(_Sized()) == [5, 9, 2, 7]  # type: ignore[arg-type]


def test_length_grouping_stays_aligned_when_batches_do_not_divide_the_samples() -> None:
    """284 samples are 35.5 global batches of 8: the grouped windows still cut the stream
    at whole batches, so each batch stays one length and each window holds the stream's
    own entries (the samples come as often as without grouping)."""
    gen = torch.Generator().manual_seed(2)
    n = 284
    lengths = torch.randint(8, 257, (n,), generator=gen).tolist()
    grouped, plain = _batches(n, lengths, epochs=3), _batches(n, None, epochs=3)
    size = GROUP_BATCHES  # batches per window
    for w in range(2):
        a = sorted(i for b in grouped[w * size: (w + 1) * size] for i in b)
        b = sorted(i for b in plain[w * size: (w + 1) * size] for i in b)
        assert a == b
    real = sum(lengths[i] for b in grouped for i in b)
    assert real / sum(8 * max(lengths[i] for i in b) for b in grouped) > 0.95
