"""The one definition of the gap closed (stages/scoring/gap.py)."""

from __future__ import annotations

import math

import pytest

from recoup.stages.scoring.gap import gap_closed, metric_gap_closed


def test_gap_closed_only_where_degradation_cost_something() -> None:
    assert gap_closed(10.0, 30.0, 15.0, higher_is_better=False) == pytest.approx(0.75)
    assert gap_closed(0.6, 0.4, 0.3, higher_is_better=True) == pytest.approx(-0.5)
    assert gap_closed(0.6, 0.7, 0.65, higher_is_better=True) is None  # degraded better
    assert gap_closed(0.6, 0.6, 0.65, higher_is_better=True) is None


def test_perplexity_gap_is_the_share_of_the_nll_gap() -> None:
    # ppl 10 -> 30 -> 15: half the perplexity ratio is won back, log 2 / log 3 of the NLL gap
    share = metric_gap_closed("ppl", 10.0, 30.0, 15.0)
    assert share == pytest.approx(math.log(2) / math.log(3))
    assert share == pytest.approx(gap_closed(math.log(10), math.log(30), math.log(15),
                                             higher_is_better=False))
    assert metric_gap_closed("ppl", 10.0, 30.0, 10.0) == pytest.approx(1.0)
    assert metric_gap_closed("kl_to_dense", 0.0, 0.4, 0.1) == pytest.approx(0.75)
    assert metric_gap_closed("acc", 0.6, 0.4, 0.5) == pytest.approx(0.5)
