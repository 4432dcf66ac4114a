"""`recoup plan`: figures against hand computation from the published Llama-2 shapes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from recoup.cluster.capacity import DEEPSPEED_ENGINE_HOST_BYTES, train_token_layer_bytes
from recoup.orchestrator.config import load_config
from recoup.orchestrator.estimate import GB, Hardware, chosen_count, gpus_for
from recoup.orchestrator.plan import builtin_shape, plan_stages, resolve_model
from recoup.orchestrator.runconfig import RunConfig
from recoup.stages.collect import activation_bytes_per_sample
from recoup.stages.degrade import degrade_parts
from recoup.stages.evaluate import evaluate_parts
from recoup.stages.recovery.footprint import min_world_size, train_parts

REPO = Path(__file__).resolve().parents[2]
H80 = Hardware(gpu_bytes=80 * GB)


def llama_params(*, vocab: int, hidden: int, inter: int, layers: int, kv_dim: int) -> int:
    """q, o (hidden x hidden), k, v (kv_dim x hidden), gate, up, down, two norms per block;
    embeddings and an untied lm_head; the final norm."""
    block = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * inter + 2 * hidden
    return layers * block + 2 * vocab * hidden + hidden


def cfg_of(name: str, *overrides: str) -> RunConfig:
    return load_config(RunConfig, REPO / "configs" / f"{name}.yaml", list(overrides))


def heads_of(cfg: RunConfig, shape) -> int:  # noqa: ANN001 - a ModelShape
    sel = cfg.select.selector
    return chosen_count(sel.top_count, sel.top_fraction, shape.card.layers * shape.card.heads)


@pytest.fixture(scope="module")
def c13() -> RunConfig:
    return cfg_of("llama-13b")


@pytest.fixture(scope="module")
def c70() -> RunConfig:
    return cfg_of("llama-70b")


def test_13b_and_70b_parameter_counts_and_bf16_weights(c13: RunConfig, c70: RunConfig) -> None:
    s13 = resolve_model(c13)
    assert s13.params == llama_params(vocab=32000, hidden=5120, inter=13824, layers=40,
                                      kv_dim=5120) == 13_015_864_320
    assert s13.weights_bytes == 2 * s13.params
    assert s13.weights_bytes / GB == pytest.approx(26.0, abs=0.1)  # "13B bf16 is 26 GB"
    assert "not on this machine" in s13.origin
    s70 = resolve_model(c70)
    assert s70.params == llama_params(vocab=32000, hidden=8192, inter=28672, layers=80,
                                      kv_dim=8 * 128)  # GQA: 8 KV heads of 128
    assert s70.weights_bytes / GB == pytest.approx(138.0, abs=0.1)  # "70B is ~140 GB"
    assert s70.block_params == 2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192
    s7 = resolve_model(cfg_of("llama-7b"))
    assert s7.weights_bytes / GB == pytest.approx(13.5, abs=0.1)


def test_collect_activation_bytes_per_sample_and_on_disk(c13: RunConfig) -> None:
    shape = resolve_model(c13)
    per = activation_bytes_per_sample(shape.card, "float16")
    assert per == 40 * 40 * 128 * 4 * 2  # layers x heads x d_head x 4 views x 2 B
    est = {e.stage: e for e in plan_stages(c13, shape, H80)}
    assert est["collect"].disk_bytes == c13.data.source.num_samples * per


def test_gpus_needed_rounds_up() -> None:
    usable = 72 * GB
    assert gpus_for(0, usable) == 0
    assert gpus_for(1, usable) == 1
    assert gpus_for(usable, usable) == 1
    assert gpus_for(usable + 1, usable) == 2
    assert gpus_for(3.01 * usable, usable) == 4


def _plan(cfg: RunConfig) -> dict:
    return {e.stage: e for e in plan_stages(cfg, resolve_model(cfg), H80)}


def test_70b_collect_fits_one_gpu_per_worker(c70: RunConfig) -> None:
    """Block by block: one decoder block and a shard's dense hidden states, never a model."""
    shape = resolve_model(c70)
    est = _plan(c70)["collect"]
    assert est.parts["one decoder block"] == shape.block_bytes
    # 128 samples a shard x 3 dense views x 512 tokens x hidden 8192, bf16
    views = "hidden states of a shard's 384 dense views (x max_length x hidden)"
    assert est.parts[views] == 384 * 512 * 8192 * 2
    assert est.gpus_min == 1 and est.device_bytes <= H80.usable and est.fits
    assert est.gpus_config == 8 and not any("idle" in n for n in est.notes)  # 8 x 1 GPU
    four = _plan(cfg_of("llama-70b", "collect.num_gpus_per_worker=4", "collect.workers=2"))
    assert four["collect"].fits
    assert any("leaves the rest idle" in n for n in four["collect"].notes)
    none = _plan(cfg_of("llama-70b", "collect.num_gpus_per_worker=0"))["collect"]
    assert not none.fits and "num_gpus_per_worker=1" in " ".join(none.notes)


def test_train_zero3_partitions_frozen_weights(c13: RunConfig) -> None:
    shape = resolve_model(c13)
    parts = train_parts(shape, c13.train, 8, heads=heads_of(c13, shape))
    assert parts["frozen weights / world size (ZeRO-3)"] == math.ceil(2 * shape.params / 8)
    card = shape.card
    assert parts["2 gathered blocks + the LM head (ZeRO-3)"] == 2 * (
        2 * shape.block_params + card.vocab * card.hidden)
    # the coalesced prefetch's receive buffer: one more block while it is consumed
    assert parts["all-gather buffer of the prefetched block (ZeRO-3)"] == 2 * shape.block_params
    heads = heads_of(c13, shape)
    assert heads == round(0.25 * 40 * 40)
    # beta and b (2 x d_head) per chosen head; 16 B each, all sharded under ZeRO-3
    assert parts["trainable params + grads + Adam"] == math.ceil(heads * 2 * 128 * 16 / 8)
    # per token and layer: two float32 norm inputs, q/k/v/out, gate/up/silu, bf16
    per = train_token_layer_bytes(shape.card, 2)
    assert per == 2 * 5120 * 4 + 2 * (4 * 5120 + 3 * 13824) == 164_864
    tokens = c13.train.engine.micro_batch * c13.train.max_seq_len
    # activation checkpointing (on GPU by default): every block's bf16 input, one block's
    # activations recomputed in backward
    assert parts["block inputs (activation checkpointing)"] == tokens * 40 * 5120 * 2
    assert parts["one block recomputed in backward"] == tokens * per
    off = cfg_of("llama-13b", "train.engine.activation_checkpointing=false")
    parts = train_parts(shape, off.train, 8, heads=heads)
    assert parts["activations for backward (all layers)"] == tokens * 40 * per


def test_min_world_size_is_the_smallest_that_fits(c70: RunConfig) -> None:
    shape = resolve_model(c70)
    usable = H80.usable
    heads = heads_of(c70, shape)
    w = min_world_size(shape, c70.train, usable, heads=heads)
    assert w is not None and w > 1
    assert sum(train_parts(shape, c70.train, w, heads=heads).values()) <= usable
    assert sum(train_parts(shape, c70.train, w - 1, heads=heads).values()) > usable
    zero2 = cfg_of("llama-70b", "train.engine.zero_stage=2")
    # ZeRO-2: the whole 138 GB on every GPU
    assert min_world_size(shape, zero2.train, usable, heads=heads) is None


def test_70b_training_fits_one_node_with_a_partitioned_load(c70: RunConfig) -> None:
    shape = resolve_model(c70)
    est = {e.stage: e for e in plan_stages(c70, shape, H80)}["train"]
    # ZeRO-3 builds the model partitioned: no worker loads the whole 138 GB
    assert est.fits and est.workers == 8 and est.gpus_min is not None and est.gpus_min <= 8
    assert est.device_bytes == sum(est.parts.values()) <= H80.usable
    assert est.host_bytes is not None and est.host_bytes < 0.01 * shape.weights_bytes


def test_degrade_sparsegpt_hessians_and_block(c13: RunConfig) -> None:
    shape = resolve_model(c13)
    parts = degrade_parts(shape, c13.degrade)
    # one float64 Hessian per distinct input: q/k/v, o, gate/up (5120), down (13824)
    assert parts["Hessians (float64, one per input)"] == 8 * (3 * 5120**2 + 13824**2)
    assert parts["calibration activations (N x seq x hidden)"] == 128 * 2048 * 5120 * 2
    assert parts["one decoder block"] == 2 * shape.block_params
    wanda = degrade_parts(shape, cfg_of("llama-13b", "degrade.method=wanda").degrade)
    assert wanda["input norms (float64)"] == 8 * (3 * 5120 + 13824)
    assert set(degrade_parts(shape, cfg_of("llama-13b", "degrade.method=magnitude").degrade)) == {
        "one decoder block"}


def test_evaluate_holds_one_model_and_spreads_70b_over_three_gpus(c13: RunConfig,
                                                                   c70: RunConfig) -> None:
    shape = resolve_model(c13)
    parts = evaluate_parts(shape, c13.evaluate)
    assert parts["one model (the models run one at a time)"] == shape.weights_bytes
    logits = c13.evaluate.batch_size * c13.evaluate.seq_len * 32000
    assert parts["logits of a batch"] == 2 * logits  # bf16
    assert parts["dense log-probs read back (float16), float32 copy, KL term"] == 10 * logits
    est = _plan(c13)["evaluate"]
    assert est.fits and est.gpus_min == 1 and est.device_bytes <= H80.usable
    # the whole WikiText-2 test set: 166 windows of 2048 tokens x 32000, float16
    assert est.disk_bytes == 166 * 2048 * 32000 * 2
    # 70B: 138 GB spread in 1.7 GB layers, each GPU keeping a batch and one layer spare
    e70 = _plan(c70)["evaluate"]
    assert e70.gpus_min == 3 and e70.fits  # the config gives its task three GPUs
    one = _plan(cfg_of("llama-70b", "cluster.stages.evaluate.gpus=1"))["evaluate"]
    assert not one.fits and "set cluster.stages.evaluate.gpus=3" in " ".join(one.notes)


def test_model_from_a_config_json_folder(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    hf.save_pretrained(tmp_path / "m")
    real = sum(p.numel() for p in LlamaForCausalLM(hf).parameters())
    cfg = cfg_of("tiny", f"prepare.source={tmp_path / 'm'}")
    assert resolve_model(cfg).params == real
    assert resolve_model(cfg_of("tiny"), str(tmp_path / "m" / "config.json")).params == real
    assert resolve_model(cfg_of("tiny"), "llama-2-7b-hf").name == "Llama-2-7b-hf"
    tiny = resolve_model(cfg_of("tiny"))
    assert tiny.card.layers == 2 and tiny.card.hidden == 64


def test_unknown_model_says_what_to_pass() -> None:
    cfg = cfg_of("tiny", "prepare.source=/nowhere/my-model")
    with pytest.raises(ValueError, match="--model"):
        resolve_model(cfg)
    with pytest.raises(ValueError, match="built-in"):
        builtin_shape("gpt-5", "bfloat16")


def test_plan_lists_every_stage_and_says_no_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from recoup.orchestrator import plan, stage

    every = cfg_of("llama-13b", "run.pipeline=[prepare,synthesize,degrade,data,sensitivity,"
                   "collect,svd,select,train,export,evaluate,report]")
    shape = resolve_model(every)
    rows = plan_stages(every, shape, H80)
    assert [e.stage for e in rows] == list(every.run.pipeline)
    assert all(e.estimated for e in rows)  # every stage declares its own estimate
    # a stage without one is listed, not skipped
    spec = stage.get_stage("report")
    monkeypatch.setitem(stage._REGISTRY._items, "report", replace(spec, estimate=None))
    rows = plan_stages(every, shape, H80)
    assert rows[-1].stage == "report" and not rows[-1].estimated
    assert "no estimate: report" in plan.format_plan(every, shape, H80, rows)


def test_cli_plan_prints_the_table_and_checks_the_cluster_yaml(capsys: pytest.CaptureFixture[
        str]) -> None:
    from recoup.orchestrator.cli import main

    assert main(["plan", str(REPO / "configs/llama-13b.yaml"), "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "13.02 B parameters, bfloat16: weights 26.0 GB" in out
    assert "72.0 GB" in out and "evaluate" in out
    cluster = str(REPO / "ray_cluster.yaml")
    assert main(["plan", str(REPO / "configs/llama-70b.yaml"), "--cluster", cluster,
                 "train.engine.workers=40"]) == 0
    out = capsys.readouterr().out
    assert "does not fit ray_cluster.yaml" in out  # 40 GPUs > 4 nodes x 8


def test_export_checks_in_float64_unless_told_the_model_dtype(c13: RunConfig) -> None:
    """The self-check's reload is a float64 copy (4x a bf16 model) by default."""
    weights = resolve_model(c13).weights_bytes
    assert _plan(c13)["export"].host_bytes == weights + 4 * weights
    model = _plan(cfg_of("llama-13b", "export.check_dtype=model"))["export"]
    assert model.host_bytes == 2 * weights and "model's dtype" in " ".join(model.notes)
    f32 = _plan(cfg_of("llama-13b", "export.check_dtype=float32"))["export"]
    assert f32.host_bytes == weights + 2 * weights and "float32" in " ".join(f32.notes)


def test_the_export_bound_of_a_16bit_model_allows_its_saved_bias_rounding() -> None:
    import torch

    from recoup.stages.export import ExportConfig, allowed_logit_diff

    cfg = ExportConfig()
    assert allowed_logit_diff(cfg, torch.float32, 35.0) == pytest.approx(1e-4 + 35e-5)
    for dtype in (torch.bfloat16, torch.float16):  # SmolLM2 bf16: 0.32-0.43 measured
        assert allowed_logit_diff(cfg, dtype, 35.0) == pytest.approx(1e-4 + 0.03 * 35)


def test_synthesize_in_bfloat16_plans_the_weights_at_two_bytes() -> None:
    base = "run.pipeline=[prepare,synthesize]"
    f32 = cfg_of("llama-7b", base, "prepare.dtype=float32")
    shape = resolve_model(f32)
    own, = plan_stages(f32, shape, H80)[1:]
    bf16, = plan_stages(cfg_of("llama-7b", base, "prepare.dtype=float32",
                               "synthesize.dtype=bfloat16"), shape, H80)[1:]
    assert own.parts["dense weights"] == shape.params * 4
    assert bf16.parts["dense weights"] == shape.params * 2 == bf16.host_bytes
    assert bf16.device_bytes < own.device_bytes


def test_the_kl_selector_holds_one_model_at_a_time_spread_over_the_task_gpus() -> None:
    """select's kl runs the dense model for its log-probs, then the degraded one: one 70B
    model (138 GB) on the device, which two 80 GB GPUs hold and one does not."""
    one = _plan(cfg_of("llama-70b", "select.selector.method=kl"))["select"]
    shape = builtin_shape("Llama-2-70b-hf", "bfloat16")
    assert shape.weights_bytes < one.device_bytes < shape.weights_bytes + 2 * GB
    assert one.gpus_min == 2 and not one.fits
    assert "cluster.stages.select.gpus=2" in " ".join(one.notes)
    two = _plan(cfg_of("llama-70b", "select.selector.method=kl", "cluster.stages.select.gpus=2"))
    assert two["select"].fits and two["select"].gpus_config == 2
    assert _plan(cfg_of("llama-70b"))["select"].device_bytes is None  # probe: CPU tasks only


def test_the_plan_names_a_training_free_fit_before_training() -> None:
    """A closed-form (or EoRA) start runs the fit as a task of its own before the workers:
    the plan gives its bytes on that GPU (two blocks, the calibration hidden states, the
    forward), and leaves the fit out when no init asks for it."""
    from recoup.stages.recovery.footprint import fit_parts

    cfg = cfg_of("llama-70b", "train.lcc.init=closed_form")
    fitted = _plan(cfg)["train"]
    note = next(n for n in fitted.notes if "training-free fit" in n)
    parts = fit_parts(resolve_model(cfg), cfg.train)
    assert f"{sum(parts.values()) / GB:.1f} GB on its GPU" in note
    assert parts["one decoder block of each model"] == pytest.approx(2 * 1.71e9, rel=0.01)
    assert not any("eigen" in k for k in parts)  # no EoRA: no covariances
    assert not any("training-free fit" in n for n in _plan(cfg_of("llama-70b"))["train"].notes)


def test_a_training_free_method_is_planned_as_its_fit() -> None:
    """eora at 70B: one task on one GPU (no training workers, no ZeRO terms), the widest
    input's float64 eigendecomposition the largest part (4 x 28672^2 x 8 bytes), and the
    host holds the fitted factors only (the save reads no weight). closed_form.offload
    moves both models' hidden states from the GPU to the host."""
    cfg = cfg_of("llama-70b", "train.method=eora")
    est = _plan(cfg)["train"]
    assert est.workers == 1 and est.fits and est.gpus_min == 1
    assert not any("ZeRO" in k for k in est.parts)
    assert est.parts["eigendecomposition of the widest input (float64)"] == 4 * 28672**2 * 8
    assert est.device_bytes < 60 * GB and est.host_bytes < 1 * GB
    off = _plan(cfg_of("llama-70b", "train.method=eora", "train.closed_form.offload=true"))
    states = 2 * 64 * cfg.train.max_seq_len * 8192 * 2  # both models, bf16
    assert est.device_bytes - off["train"].device_bytes == pytest.approx(
        states * (1 - cfg.train.closed_form.micro_batch / 64))
    assert off["train"].host_bytes - est.host_bytes == states


def test_a_streamed_base_trains_70b_on_one_gpu(c70: RunConfig) -> None:
    """train.engine.frozen_weights streamed: no share of the base on any worker, one block
    and the LM head read from the checkpoint; the host reads one module at a time."""
    shape = resolve_model(c70)
    card = shape.card
    cfg = cfg_of("llama-70b", "train.engine.frozen_weights=streamed")
    heads = heads_of(cfg, shape)
    parts = train_parts(shape, cfg.train, 8, heads=heads)
    # a chunk of LM-head rows: 32 MiB of stored bf16 rows of 8192 -> 2048 rows
    assert parts["streamed frozen weights: one block + a chunk of LM head rows"] == 2 * (
        shape.block_params + 2048 * card.hidden)
    assert not any("ZeRO-3" in k and "trainable" not in k for k in parts)
    assert min_world_size(shape, cfg.train, H80.usable, heads=heads) == 1
    assert min_world_size(shape, c70.train, H80.usable, heads=heads) > 1  # resident: 3
    est = _plan(cfg)["train"]
    assert est.fits and est.gpus_min == 1
    # the largest read: the MLP's linears (28672 x 8192, bf16), plus the chosen heads' V
    # and the DeepSpeed engine's own host memory
    v_bytes = heads * card.d_head * card.d_head * 4
    assert est.host_bytes == 28672 * 8192 * 2 + v_bytes + DEEPSPEED_ENGINE_HOST_BYTES
    assert any("streamed base" in n for n in est.notes)
