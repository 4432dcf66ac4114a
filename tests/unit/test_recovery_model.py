"""The recovery model: LoRA and the compensation's beta and b in their own parameter groups."""

from __future__ import annotations

import torch

from recoup.stages.lcc.compensation import Compensation
from recoup.stages.model import modelio
from recoup.stages.model.layout import LINEAR_TARGETS
from recoup.stages.recovery.job import LoraSpec
from recoup.stages.recovery.recovery_model import RecoveryModel, add_lora


def _tiny_pruned() -> torch.nn.Module:
    torch.manual_seed(0)
    model, _ = modelio.build_tiny_llama(modelio.TinyLlamaConfig(), torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_((torch.rand(p.shape) > 0.5).float())
    return model.requires_grad_(False).eval()


def test_lcc_gets_its_own_learning_rate() -> None:
    model = _tiny_pruned()
    cfg = LoraSpec(rank=2, alpha=16.0, dropout=0.0, targets=LINEAR_TARGETS)
    comp = Compensation.create([(0, 1)], {(0, 1): torch.eye(16)}, n_heads=4)
    rm = RecoveryModel(add_lora(model, cfg, [0]), comp)
    groups = rm.param_groups(1e-4, 3e-2)
    assert [g["lr"] for g in groups] == [1e-4, 3e-2]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in comp.parameters()}
    assert sum(len(g["params"]) for g in groups) == sum(
        1 for p in rm.parameters() if p.requires_grad)
    assert [g["lr"] for g in RecoveryModel(_tiny_pruned(), comp).param_groups(1e-3)] == [1e-3]
