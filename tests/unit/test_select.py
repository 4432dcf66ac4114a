"""Unit tests for the select stage's SelectorConfig."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from recoup.stages.select import SelectorConfig

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "nope"}, "method"),
        ({"top_k_directions": 0}, "top_k_directions"),
        ({"top_fraction": 1.5}, "top_fraction"),
        ({"top_fraction": 0.0}, "top_fraction"),
        ({"top_count": 0}, "top_count"),
        ({"seed": -1}, "seed"),
        ({"train_fraction": 1.0}, "train_fraction"),
        ({"probe_steps": 0}, "probe_steps"),
        ({"probe_l2": 0.0}, "probe_l2"),
        ({"top_fraction": 0.1, "top_count": 3}, "top_fraction or top_count"),
        ({"top_fraction": None}, "top_fraction or top_count"),
        ({"topk": 3}, "topk"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        SelectorConfig(**kwargs)


def test_config_defaults_and_frozen() -> None:
    cfg = SelectorConfig()
    assert (cfg.method, cfg.top_k_directions, cfg.top_fraction, cfg.train_fraction) == (
        "probe",
        10,
        0.25,
        0.7,
    )
    assert SelectorConfig(top_count=3).top_fraction is None
    with pytest.raises(ValidationError):
        cfg.seed = 3  # type: ignore[misc]
