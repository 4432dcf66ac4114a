"""Window ranges of the WikiText cut (stages/scoring/wikitext.py)."""

from __future__ import annotations

import pytest
import torch

from recoup.stages.model import lm_metrics
from recoup.stages.scoring.wikitext import window_range


def test_window_start_zero_is_the_papers_cut() -> None:
    ids = torch.arange(100)
    assert torch.equal(window_range(ids, 8, 0, 5), lm_metrics.windows(ids, 8, 5))
    assert torch.equal(window_range(ids, 8, 0, None), lm_metrics.windows(ids, 8, None))


def test_held_out_windows_continue_the_same_cut() -> None:
    ids = torch.arange(100)  # 12 windows of 8, the last 4 tokens dropped
    wins = window_range(ids, 8, 10, 5)  # (2, 8): only windows 10 and 11 exist
    assert wins.shape == (2, 8)
    assert wins[0, 0].item() == 80 and wins[-1, -1].item() == 95
    with pytest.raises(ValueError, match="past the text's last window"):
        window_range(ids, 8, 12, 1)
