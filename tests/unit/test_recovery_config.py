"""The train stage's part settings: checked at load, reduced to the specs the library takes."""

from __future__ import annotations

import pytest

from recoup.stages.recovery.config import LccConfig, LoraAdapterConfig, LossConfig
from recoup.stages.recovery.job import LccSpec, LoraSpec, LossSpec


def test_loss_config_needs_a_loss() -> None:
    with pytest.raises(ValueError, match="nothing to train"):
        LossConfig(ce_weight=0.0, kl_weight=0.0)


def test_lcc_lr_is_unset_unless_given() -> None:
    assert LccConfig().lr is None and LccConfig(lr=0.05).lr == 0.05


def test_configs_reduce_to_their_specs() -> None:
    assert LossConfig(kl_weight=0.5, kl_on="response").spec() == LossSpec(
        ce_weight=1.0, kl_weight=0.5, temperature=1.0, kl_on="response")
    lcc = LccConfig(init="lost_component", lr=0.05).spec()
    assert lcc == LccSpec(init="lost_component", init_std=LccConfig().init_std, lr=0.05)
    lora = LoraAdapterConfig(layers=(1,), rank=2, alpha=4.0, targets=("q_proj",)).spec()
    assert lora == LoraSpec(rank=2, alpha=4.0, dropout=0.0, targets=("q_proj",))
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        LoraAdapterConfig(targets=("nope",))
