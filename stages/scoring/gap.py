"""Gap closed: the share of what degradation cost that recovery won back.

One definition, used by the evaluate stage's printed table and by the report, so a run
never shows two numbers for it. For a metric where lower is better::

    gap closed = (degraded - recovered) / (degraded - dense)

1 is back to dense, 0 no better than degraded, negative worse than degraded. Where
degradation cost nothing (degraded equal to or better than dense) there is no gap to
close and the answer is None (printed "—"), not 0 or a ratio of noise.

Perplexity is compared on its log, the mean token NLL: that is the scale the training loss
works on, a perplexity ratio is a difference of logs, and on the plain scale a bad
degradation (ppl 25 -> 400) makes any partial recovery look nearly complete. KL to dense
and accuracies are compared as they are (KL already is a difference of log-probabilities).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Scale = Literal["linear", "log"]


@dataclass(frozen=True, kw_only=True)
class GapRule:
    """How one metric is compared: its direction and the scale the gap is measured on."""

    higher_is_better: bool
    scale: Scale = "linear"


#: the evaluate stage's metrics; accuracies (acc, acc_norm, in fractions or percent) are
#: higher-is-better and linear
RULES: Mapping[str, GapRule] = {
    "ppl": GapRule(higher_is_better=False, scale="log"),
    "kl_to_dense": GapRule(higher_is_better=False),
    "acc": GapRule(higher_is_better=True),
    "acc_norm": GapRule(higher_is_better=True),
}


def gap_closed(dense: float, degraded: float, recovered: float, *, higher_is_better: bool,
               scale: Scale = "linear") -> float | None:
    """Share of the dense-vs-degraded gap recovered on ``scale``; None when there is no gap."""
    if scale == "log":
        dense, degraded, recovered = math.log(dense), math.log(degraded), math.log(recovered)
    lost = dense - degraded if higher_is_better else degraded - dense
    if lost <= 0:
        return None
    return (degraded - recovered) / (degraded - dense)


def metric_gap_closed(metric: str, dense: float, degraded: float,
                      recovered: float) -> float | None:
    """:func:`gap_closed` with the rule of the evaluate metric named ``metric``."""
    rule = RULES[metric]
    return gap_closed(dense, degraded, recovered, higher_is_better=rule.higher_is_better,
                      scale=rule.scale)
