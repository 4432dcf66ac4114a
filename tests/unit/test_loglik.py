"""Shared-context scoring gives lm-eval's own log-likelihoods and accuracies, and the
progress board reports the bar the driver should draw."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recoup.cluster.progress import ProgressBoard
from recoup.stages.model import modelio
from recoup.stages.scoring import loglik, zeroshot
from recoup.stages.scoring.zeroshot import DEFAULT_TASKS


def test_requests_group_by_context_and_batch_longest_first() -> None:
    reqs = [([1, 2], [3]), ([1, 2], [4, 5]), ([7], [8]), ([1, 2, 9], [3])]
    groups = loglik.group_by_context(reqs)
    assert [g.members for g in groups] == [(0, 1), (2,), (3,)]
    packed = loglik.batches(groups, requests_per_batch=2)
    assert [[len(g.context) for g in b] for b in packed] == [[3], [2], [1]]
    with pytest.raises(ValueError, match="non-empty"):
        loglik.group_by_context([([], [1])])


@pytest.mark.parametrize("task", ["arc_challenge", "piqa", "boolq"])
def test_shared_context_scores_equal_lm_eval(task: str, data_dir: Path) -> None:
    """Same documents through lm-eval's own HFLM loop and through shared-context scoring:
    the same log-likelihoods (to float rounding) and the same acc / acc_norm."""
    model, tok = modelio.build_tiny_llama(modelio.TinyLlamaConfig(seed=5), torch.float32)
    spec = next(t for t in DEFAULT_TASKS if t.name == task)
    docs = zeroshot.load_docs(spec, data_dir)
    indices = [0, 1, 2, 3, 4, 5]
    seen: list[int] = []
    ref = zeroshot.score_task(zeroshot.make_lm(model, tok, 4, shared_context=False), spec,
                              docs, indices, data_dir)
    got = zeroshot.score_task(zeroshot.make_lm(model, tok, 4, on_documents=seen.append),
                              spec, docs, indices, data_dir)
    assert sum(seen) == len(indices)  # one context per document
    for g, r in zip(got, ref, strict=True):
        assert (g.doc, g.gold, g.acc, g.acc_norm) == (r.doc, r.gold, r.acc, r.acc_norm)
        assert g.ll == pytest.approx(r.ll, abs=1e-4)


def test_board_shows_the_newest_open_bar_and_each_warning_once() -> None:
    board = ProgressBoard()
    assert board.snapshot()["bar"] is None
    board.open("a", "zero-shot", "doc", 10)
    board.advance("a", 3)
    board.open("b", "perplexity", "window", 4)
    board.advance("b", 1)
    assert board.snapshot()["bar"]["key"] == "b"
    board.close("b")
    snap = board.snapshot()
    assert snap["bar"] == {"key": "a", "desc": "zero-shot", "unit": "doc", "total": 10, "n": 3}
    board.warn("w1")
    board.warn("w2")
    assert board.snapshot()["warnings"] == ["w1", "w2"]
    assert board.snapshot(warnings_seen=1)["warnings"] == ["w2"]
