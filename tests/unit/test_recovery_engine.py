"""Pure pieces of recovery training: LR schedule, DeepSpeed config, data order, layer
ranking, masked LoRA merge, sample encoding."""

from __future__ import annotations

import pytest
import torch

from recoup.cluster.engine import EngineConfig, deepspeed_config, lr_factor, use_bf16
from recoup.cluster.train import sample_indices
from recoup.stages.export import masked_lora_merge
from recoup.stages.recovery.methods import (
    Encoded,
    collate,
    encode_sample,
    get_method,
    layer_output_errors,
    method_names,
    register_method,
    top_layers,
)
from recoup.stages.train import TrainConfig


def test_lr_warmup_starts_above_zero_then_holds_or_decays() -> None:
    f = [lr_factor(s, warmup_steps=4, total_steps=10, schedule="constant") for s in range(10)]
    assert f[:5] == [0.25, 0.5, 0.75, 1.0, 1.0] and f[-1] == 1.0
    d = [lr_factor(s, warmup_steps=2, total_steps=6, schedule="linear") for s in range(6)]
    assert d == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert lr_factor(0, warmup_steps=0, total_steps=3, schedule="constant") == 1.0


def test_deepspeed_config_from_the_typed_config() -> None:
    cfg = EngineConfig(zero_stage=3, offload_optimizer=True, offload_params=True, micro_batch=2,
                       grad_accum=3, grad_clip=0.5)
    ds = deepspeed_config(cfg, world_size=2, bf16=False)
    assert ds["train_batch_size"] == 12
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                       "offload_param": {"device": "cpu"}}
    assert ds["bf16"] == {"enabled": False}
    assert use_bf16(EngineConfig(), "cuda") and not use_bf16(EngineConfig(), "cpu")


def test_engine_config_refuses_param_offload_without_zero3() -> None:
    with pytest.raises(ValueError, match="zero_stage 3"):
        EngineConfig(zero_stage=2, offload_params=True)


def test_data_order_is_a_pure_function_covering_every_sample_per_epoch() -> None:
    n, mb, world = 10, 2, 2
    per_step = [sample_indices(n, seed=3, micro_batch=mb, world_size=world, g=g, rank=r)
                for g in range(5) for r in range(world)]
    flat = [i for chunk in per_step for i in chunk]
    assert sorted(flat[:10]) == list(range(10))  # the first epoch is a permutation
    again = sample_indices(n, seed=3, micro_batch=mb, world_size=world, g=3, rank=1)
    assert again == per_step[3 * world + 1]
    other = [sample_indices(n, seed=4, micro_batch=mb, world_size=world, g=g, rank=0)
             for g in range(5)]
    assert other != [per_step[g * world] for g in range(5)]


def test_layer_errors_and_top_layers() -> None:
    d = [torch.ones(1, 2, 3), torch.ones(1, 2, 3), torch.ones(1, 2, 3)]
    g = [torch.ones(1, 2, 3), torch.zeros(1, 2, 3), 1.5 * torch.ones(1, 2, 3)]
    errs = layer_output_errors(d, g)
    torch.testing.assert_close(errs, torch.tensor([0.0, 1.0, 0.25], dtype=torch.float64))
    assert top_layers(errs, 2) == [1, 2]
    mask = torch.tensor([[1, 0]])
    g[0] = torch.cat([torch.ones(1, 1, 3), 9 * torch.ones(1, 1, 3)], dim=1)  # only the pad moved
    assert float(layer_output_errors(d, g, mask)[0]) == 0.0


def test_masked_merge_keeps_pruned_weights_zero_and_refuses_non_finite() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 5, generator=g)
    mask = torch.rand(6, 5, generator=g) > 0.5
    W = W * mask
    A, B = torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
    merged = masked_lora_merge(W, A, B, 0.5, mask)
    assert (merged[~mask] == 0).all()
    torch.testing.assert_close(merged[mask], (W + 0.5 * B @ A)[mask])
    with pytest.raises(ValueError, match="not finite"):
        masked_lora_merge(W, A, B * float("inf"), 1.0, mask)


def test_encode_and_collate_mark_the_response() -> None:
    from recoup.stages.model.modelio import byte_tokenizer

    tok = byte_tokenizer()
    e = encode_sample(tok, "Q:", "ab", max_len=100)
    assert e.prompt_len == 2 and len(e.ids) == 5 and e.ids[-1] == tok.eos_token_id
    cut = encode_sample(tok, "Q:", "abcdef", max_len=4)
    assert len(cut.ids) == 4 and cut.prompt_len == 2
    batch = collate([e, Encoded(ids=(5, 6, 7), prompt_len=1)], pad_id=0)
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert batch["target_mask"].tolist() == [[False, False, True, True, True],
                                             [False, True, True, False, False]]


def test_method_registry() -> None:
    assert set(method_names()) >= {"lcc", "lora", "lcc+lora"}
    assert get_method("lcc").needs_heads and not get_method("lora").needs_heads
    with pytest.raises(ValueError, match="registered twice"):
        register_method("lcc", needs_heads=True, uses_lora=False)(lambda *a: None)  # type: ignore
    with pytest.raises(ValueError, match="unknown recovery method"):
        TrainConfig(method="nope")
