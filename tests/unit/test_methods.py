"""The recovery method registry: what each method needs, and duplicates refused."""

from __future__ import annotations

import pytest

from recoup.stages.recovery.methods import get_method, method_names, register_method
from recoup.stages.train import TrainConfig


def test_method_registry() -> None:
    assert set(method_names()) >= {"lcc", "lora", "lcc+lora", "lcc-closed", "eora",
                                   "lcc-closed+eora"}
    assert get_method("lcc").needs_heads and not get_method("lora").needs_heads
    assert get_method("lcc").uses_lcc and not get_method("lcc").training_free
    free = get_method("lcc-closed")
    assert free.training_free and free.uses_lcc and not free.needs_heads and not free.uses_lora
    assert get_method("eora").training_free and get_method("eora").uses_lora
    with pytest.raises(ValueError, match="registered twice"):
        register_method("lcc", needs_heads=True, uses_lora=False)(lambda *a: None)  # type: ignore
    with pytest.raises(ValueError, match="unknown recovery method"):
        TrainConfig(method="nope")
