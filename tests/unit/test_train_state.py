"""Training state: the data order is a pure function of the seed, step and rank."""

from __future__ import annotations

from recoup.cluster.train_state import sample_indices


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
