"""The recovery model: LoRA and the compensation's beta and b in their own parameter groups."""

from __future__ import annotations

import torch

from recoup.stages.lcc.compensation import Compensation
from recoup.stages.model.layout import LINEAR_TARGETS
from recoup.stages.recovery.job import LoraSpec
from recoup.stages.recovery.recovery_model import RecoveryModel, add_lora
from tests.conftest import tiny_pruned_llama


def test_lcc_gets_its_own_learning_rate() -> None:
    model = tiny_pruned_llama()
    cfg = LoraSpec(rank=2, alpha=16.0, dropout=0.0, targets=LINEAR_TARGETS)
    comp = Compensation.create([(0, 1)], {(0, 1): torch.eye(16)}, n_heads=4)
    rm = RecoveryModel(add_lora(model, cfg, [0]), comp)
    groups = rm.param_groups(1e-4, 3e-2)
    assert [g["lr"] for g in groups] == [1e-4, 3e-2]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in comp.parameters()}
    assert sum(len(g["params"]) for g in groups) == sum(
        1 for p in rm.parameters() if p.requires_grad)
    assert [g["lr"] for g in RecoveryModel(tiny_pruned_llama(), comp).param_groups(1e-3)] == [1e-3]
