"""Unit tests for head naming, splitting and HeadScores (and the heads.json file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recoup.stages.lcc.heads import HeadScores, flat_index, head_from_flat, merge_heads, split_heads

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_split_heads_layout() -> None:
    z = torch.arange(2 * 3 * 4, dtype=F64).reshape(2, 12)  # (N, n_heads * d_head)
    heads = split_heads(z, 3)
    assert heads.shape == (2, 3, 4)
    assert torch.equal(heads[:, 1], z[:, 4:8])
    assert torch.equal(merge_heads(heads), z)
    with pytest.raises(ValueError, match="not divisible"):
        split_heads(z, 5)


def test_head_indexing_with_30_layers_and_9_heads() -> None:
    n_layers, n_heads = 30, 9  # SmolLM2-135M
    flat = torch.rand(n_layers * n_heads, generator=_gen(8), dtype=F64) * 0.5
    target = (27, 4)
    index = flat_index(target, n_heads)
    assert index == 27 * 9 + 4
    flat[index] = 10.0
    scores = HeadScores.from_flat(flat, n_heads)
    assert scores.scores.shape == (30, 9)
    assert scores.top(count=1) == [target]
    assert scores.score(target) == 10.0
    assert head_from_flat(index, n_heads) == target
    assert divmod(index, n_layers) != target  # the reference's decoding would miss it
    assert torch.equal(scores.flat(), flat)
    for i in (0, 8, 9, 100, 269):
        assert flat_index(head_from_flat(i, n_heads), n_heads) == i
    back = HeadScores.from_records(json.loads(json.dumps(scores.to_records())))
    assert torch.equal(back.scores, scores.scores)


def test_head_scores_ranking_and_records() -> None:
    scores = HeadScores(torch.tensor([[0.5, 0.9], [0.9, 0.1]]))
    assert scores.ranked() == [(0, 1), (1, 0), (0, 0), (1, 1)]  # tie -> (layer, head)
    assert scores.top(fraction=0.5) == [(0, 1), (1, 0)]
    assert scores.top(fraction=0.01) == [(0, 1)]  # at least one head
    with pytest.raises(ValueError, match="exactly one"):
        scores.top(fraction=0.5, count=1)
    with pytest.raises(ValueError, match="between 1 and"):
        scores.top(count=5)
    recs = scores.to_records()
    assert recs[1] == {"layer": 0, "head": 1, "score": pytest.approx(0.9)}
    with pytest.raises(ValueError, match="full"):
        HeadScores.from_records(recs[:3])
    with pytest.raises(ValueError, match="twice"):
        HeadScores.from_records([*recs, recs[0]])
    with pytest.raises(ValueError, match="finite"):
        HeadScores(torch.tensor([[0.0, float("nan")]]))


def test_heads_file_round_trip_and_errors(tmp_path: Path) -> None:
    from recoup.stages.lcc.heads_file import HEADS_FILE, read_heads, write_heads

    scores = HeadScores(torch.tensor([[0.5, 0.9], [0.9, 0.1]]))
    write_heads(tmp_path, "probe", scores, scores.top(count=2))
    method, chosen, back = read_heads(tmp_path)
    assert (method, chosen) == ("probe", [(0, 1), (1, 0)])
    assert back is not None and torch.equal(back.scores, scores.scores)
    (tmp_path / HEADS_FILE).write_text('{"method": "hand", "chosen": [[1, 1]]}')
    assert read_heads(tmp_path).scores is None
    (tmp_path / HEADS_FILE).write_text('{"method": "hand", "chosen": []}')
    with pytest.raises(ValueError, match="chooses no heads"):
        read_heads(tmp_path)
    with pytest.raises(FileNotFoundError, match="select stage writes"):
        read_heads(tmp_path / "nowhere")
