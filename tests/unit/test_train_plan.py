"""`recoup plan` for the train stage: what a worker holds with a partitioned load, activation
checkpointing and the cached teacher, against hand computation from the Llama-2 shapes."""

from __future__ import annotations

from pathlib import Path

import pytest

from recoup.cluster.capacity import DEEPSPEED_ENGINE_HOST_BYTES
from recoup.orchestrator.config import load_config
from recoup.orchestrator.estimate import GB, Hardware, StageEstimate, chosen_count
from recoup.orchestrator.plan import plan_stages, resolve_model
from recoup.orchestrator.runconfig import RunConfig
from recoup.stages.recovery.footprint import min_world_size, train_parts

REPO = Path(__file__).resolve().parents[2]
H80 = Hardware(gpu_bytes=80 * GB)


def cfg_of(name: str, *overrides: str) -> RunConfig:
    return load_config(RunConfig, REPO / "configs" / f"{name}.yaml", list(overrides))


def train_estimate(cfg: RunConfig) -> StageEstimate:
    return {e.stage: e for e in plan_stages(cfg, resolve_model(cfg), H80)}["train"]


def heads_of(cfg: RunConfig) -> int:
    card = resolve_model(cfg).card
    sel = cfg.select.selector
    return chosen_count(sel.top_count, sel.top_fraction, card.layers * card.heads)


def test_13b_trains_on_one_gpu() -> None:
    cfg = cfg_of("llama-13b", "train.engine.workers=1")
    est = train_estimate(cfg)
    assert est.fits and est.gpus_min == 1
    # one worker of ZeRO-3 holds every weight, and still fits with the cached teacher
    kl = train_estimate(cfg_of("llama-13b", "train.engine.workers=1", "train.loss.kl_weight=1"))
    assert kl.fits and kl.gpus_min == 1


def test_the_cached_teacher_adds_its_rows_a_pass_before_training_and_a_file() -> None:
    cfg = cfg_of("llama-70b", "train.loss.kl_weight=1", "train.loss.teacher_top_k=32")
    shape = resolve_model(cfg)
    parts = train_parts(shape, cfg.train, 8, heads=heads_of(cfg))
    tokens = cfg.train.engine.micro_batch * cfg.train.max_seq_len
    # int64 ids + float32 log-probs per kept token, the tail; the student's float32
    # log-softmax, its tail and their gradients for 64 tokens at a time (chunk_tokens)
    assert parts["KL on the teacher's top-32, 64 tokens at a time"] == tokens * (
        32 * 12 + 4) + 64 * 32000 * 4 * 4
    assert parts["logits and their gradient (16-bit)"] == tokens * 32000 * 2 * 2
    whole = cfg_of("llama-70b", "train.loss.kl_weight=1", "train.loss.teacher_top_k=32",
                   "train.loss.chunk_tokens=0")
    parts = train_parts(shape, whole.train, 8, heads=heads_of(cfg))
    assert parts["KL on the teacher's top-32 (its rows, the student's tail)"] == tokens * (
        32 * 12 + 4 + 32000 * 4)
    assert not any("teacher: dense model" in k for k in parts)
    est = train_estimate(cfg)
    assert est.fits and est.workers == 8
    assert any(n.startswith("teacher pass before training") for n in est.notes)
    # int32 ids and float32 log-probs per kept token, a float32 tail per position
    assert est.disk_bytes == 2048 * 512 * (32 * 8 + 4)


def test_the_exact_kl_keeps_the_whole_teacher_and_70b_does_not_fit() -> None:
    cfg = cfg_of("llama-70b", "train.loss.kl_weight=1", "train.loss.teacher_top_k=0")
    shape = resolve_model(cfg)
    parts = train_parts(shape, cfg.train, 8, heads=heads_of(cfg))
    assert parts["teacher: dense model, whole on every worker"] == shape.weights_bytes
    est = train_estimate(cfg)
    assert not est.fits and est.gpus_min is None
    assert est.host_bytes is not None and est.host_bytes > shape.weights_bytes
    assert min_world_size(shape, cfg.train, H80.usable, heads=heads_of(cfg)) is None


def test_masked_lora_keeps_masks_and_one_block_of_deltas_when_checkpointing() -> None:
    cfg = cfg_of("llama-13b", "train.method=lcc+lora", "train.lora.auto_layers=4")
    shape = resolve_model(cfg)
    adapted = sum(o * i for _, o, i in shape.block_linears)  # every linear of a block
    parts = train_parts(shape, cfg.train, 8, heads=heads_of(cfg))
    assert parts["keep masks of the adapted linears (bool)"] == 4 * adapted
    assert parts["masked LoRA deltas kept for backward"] == adapted * 2  # one block, bf16
    off = cfg_of("llama-13b", "train.method=lcc+lora", "train.lora.auto_layers=4",
                 "train.engine.activation_checkpointing=false")
    parts = train_parts(shape, off.train, 8, heads=heads_of(cfg))
    assert parts["masked LoRA deltas kept for backward"] == 4 * adapted * 2


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_host_memory_while_loading(zero_stage: int) -> None:
    cfg = cfg_of("llama-13b", f"train.engine.zero_stage={zero_stage}")
    shape = resolve_model(cfg)
    est = train_estimate(cfg)
    if zero_stage == 2:  # loaded whole on the host, then moved to the GPU
        assert est.host_bytes is not None and est.host_bytes >= shape.weights_bytes
    else:  # rank 0 reads one module at a time: the embeddings are the largest; and the
        # DeepSpeed engine's own host memory
        v = heads_of(cfg) * 128 * 128 * 4
        assert est.host_bytes == 32000 * 5120 * 2 + v + DEEPSPEED_ENGINE_HOST_BYTES
