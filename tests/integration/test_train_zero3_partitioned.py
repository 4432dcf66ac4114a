"""ZeRO-3 training that never holds a whole model, and distillation from a cached teacher.

On the tiny random Llama (prepare and degrade through the real runner; the training job
built by hand, so these tests cover the worker side only):

- a model built partitioned (``deepspeed.zero.Init`` + a per-module checkpoint copy) is the
  model a whole load gives: every parameter, the logits, the masked LoRA and compensation
  attached to it; on one rank in-process and on two spawned gloo ranks (the broadcast of
  rank 0's reads, the teacher pass's collectives with unequal sample counts per rank);
- the KL on the teacher's top-k computed before training trains, equals the exact KL with
  the teacher resident when k is the whole vocabulary, and is reused on a rerun;
- activation checkpointing changes memory, not training;
- on a GPU (marker ``gpu``, skipped without CUDA): the partitioned load and a bf16 train step.

DeepSpeed runs on its CPU accelerator with gloo, ZeRO-3, world size 1 in-process unless said.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from recoup.cluster.config import ClusterConfig
from recoup.cluster.engine import EngineConfig, deepspeed_config
from recoup.cluster.train import run_training
from recoup.cluster.train_state import CHECKPOINTS, LOG, read_log
from recoup.cluster.train_task import WorkerSetup
from recoup.orchestrator.runner import run_pipeline
from recoup.stages.degrade import MASKS
from recoup.stages.model import modelio
from recoup.stages.model.partitioned import (
    full_numel,
    gathered,
    gathered_forward,
    is_partitioned,
    load_partitioned,
)
from recoup.stages.prepare import CARD, MODEL_DIR
from recoup.stages.recovery.batching import Encoded, collate
from recoup.stages.recovery.config import LccConfig, LoraAdapterConfig, LossConfig
from recoup.stages.recovery.job import TrainJob
from recoup.stages.recovery.losses import teacher_topk
from recoup.stages.recovery.masked_lora import KEEP_BUFFER, lora_layers
from recoup.stages.recovery.task import build_model, build_task, count_parameters
from recoup.stages.recovery.teacher import (
    TEACHER_DIR,
    cache_teacher,
    compute_shard,
    rank_batches,
    teacher_dtype,
)
from tests.conftest import tiny_config

os.environ.setdefault("DS_ACCELERATOR", "cpu")

LENGTHS = (24, 17, 30, 12, 21)  # 5 samples: 3 on rank 0 and 2 on rank 1 of two
CHOSEN = ((0, 1), (1, 2))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("upstream")
    cfg = tiny_config(root, data_dir, run={"pipeline": ["prepare", "degrade"]})
    run_pipeline(cfg, progress=False, echo=lambda s: None)
    return root


def make_job(root: Path, *, method: str = "lcc+lora", n: int = len(LENGTHS),
             **loss: Any) -> TrainJob:
    """A training job on the tiny model: random samples, random orthonormal V."""
    card = modelio.ModelCard.read(root / "prepare" / CARD)
    gen = torch.Generator().manual_seed(0)
    samples = tuple(
        Encoded(ids=tuple(torch.randint(3, card.vocab, (t,), generator=gen).tolist()),
                prompt_len=4) for t in LENGTHS[:n])
    V = {h: torch.linalg.qr(torch.randn(card.d_head, card.d_head, generator=gen))[0]
         for h in CHOSEN}
    return TrainJob(
        method=method, degraded_dir=root / "degrade" / MODEL_DIR,
        dense_dir=root / "prepare" / MODEL_DIR, dtype=card.dtype, samples=samples, pad_id=2,
        loss=LossConfig(**loss).spec(), n_heads=card.heads, lcc=LccConfig().spec(),
        chosen=CHOSEN, V=V, lora=LoraAdapterConfig(rank=4, alpha=8.0).spec(),
        lora_layers=(1,), masks_file=root / "degrade" / MASKS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process_group(rank: int = 0, world: int = 1, port: int | None = None,
                  backend: str = "gloo") -> Iterator[None]:
    """A process group as a launcher would start it; torn down through DeepSpeed, which
    caches groups derived from it."""
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    env = {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port or _free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        yield
    finally:
        if ds_comm.is_initialized():
            ds_comm.destroy_process_group()
        elif dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def zero3_setup(rank: int, world: int, work_dir: Path) -> WorkerSetup:
    engine = EngineConfig(zero_stage=3, micro_batch=2, workers=world)
    return WorkerSetup(device=torch.device("cpu"), rank=rank, world_size=world,
                       zero_init=deepspeed_config(engine, world_size=world, bf16=False),
                       micro_batch=2, work_dir=work_dir, job_key="test")


def _logits(model: Any, job: TrainJob) -> torch.Tensor:
    b = collate(list(job.samples), job.pad_id)
    with torch.no_grad(), gathered_forward(model) as run:
        out = run(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    return out if isinstance(out, torch.Tensor) else out.logits


def check_partitioned_build(job: TrainJob, setup: WorkerSetup) -> None:
    """Every parameter of a partitioned load is the checkpoint's; the partitioned recovery
    model (masked LoRA, compensation) has the whole one's masks, counts and logits."""
    plain = modelio.load_model(job.degraded_dir, torch.float32)
    base = load_partitioned(job.degraded_dir, setup.zero_init or {})
    assert all(is_partitioned(p) and p.numel() == 0 for p in base.parameters())
    expected = plain.state_dict()
    for name, p in base.named_parameters():
        with gathered([p]):
            torch.testing.assert_close(p.detach().clone(), expected[name], rtol=0, atol=0)
    torch.testing.assert_close(_logits(base, job), _logits(plain, job), rtol=0, atol=0)

    torch.manual_seed(0)
    whole, whole_params = build_model(job, "cpu")
    torch.manual_seed(0)
    parted, parted_params = build_model(job, setup)
    assert parted_params == whole_params == sum(p.numel() for p in plain.parameters())
    assert count_parameters(parted) == count_parameters(whole)
    masks = {n: getattr(m, KEEP_BUFFER) for n, m in lora_layers(whole.base).items()}
    got = {n: getattr(m, KEEP_BUFFER) for n, m in lora_layers(parted.base).items()}
    assert masks.keys() == got.keys() and masks
    for n in masks:
        assert torch.equal(got[n], masks[n]) and not bool(masks[n].all())
    torch.testing.assert_close(_logits(parted, job), _logits(whole, job), rtol=1e-6, atol=1e-6)


def check_teacher_pass(job: TrainJob, setup: WorkerSetup) -> None:
    """The cached top-k of every sample is ``teacher_topk`` of the dense model's logits."""
    store = cache_teacher(job, setup)
    dense = modelio.load_model(job.dense_dir, torch.float32)
    k, t = job.loss.teacher_top_k, job.loss.temperature
    for i, s in enumerate(job.samples):
        with torch.no_grad():
            logits = dense(input_ids=torch.tensor([s.ids]), use_cache=False).logits[0]
        want = teacher_topk(logits, k, t)
        got = store.rows(i)
        assert torch.equal(got.ids, want.ids)
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.tail, want.tail, rtol=1e-5, atol=1e-5)


def test_a_partitioned_build_is_the_whole_model(upstream: Path, tmp_path: Path) -> None:
    job = make_job(upstream, kl_weight=1.0, teacher_top_k=8, temperature=2.0)
    with process_group():
        setup = zero3_setup(0, 1, tmp_path)
        check_partitioned_build(job, setup)
        check_teacher_pass(job, setup)


def _two_ranks(rank: int, world: int, port: int, job: TrainJob, out: Path) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    torch.set_num_threads(1)
    with process_group(rank, world, port):
        setup = zero3_setup(rank, world, out)
        check_partitioned_build(job, setup)
        check_teacher_pass(job, setup)


@pytest.mark.slow
def test_two_ranks_load_partitioned_and_share_the_teacher_pass(upstream: Path,
                                                                tmp_path: Path) -> None:
    """Two spawned gloo ranks: rank 0 reads, both hold the checkpoint's values; the teacher
    pass runs 2 micro-batches on rank 0 and 1 + a repeat on rank 1, one file each. Slow only
    for its two process starts (about 45 s on 2 cores)."""
    import torch.multiprocessing as mp

    job = make_job(upstream, kl_weight=1.0, teacher_top_k=8)
    assert [len(b) for b in rank_batches(LENGTHS, 1, 2, 2)] == [2, 2]
    assert rank_batches(LENGTHS, 1, 2, 2)[0] == rank_batches(LENGTHS, 1, 2, 2)[1]
    mp.spawn(_two_ranks, args=(2, _free_port(), job, tmp_path), nprocs=2, join=True)
    assert sorted(p.name for p in (tmp_path / TEACHER_DIR).iterdir()) == [
        "topk-00000-of-00002.safetensors", "topk-00001-of-00002.safetensors"]


def _train(job: TrainJob, out: Path, **engine: Any) -> dict[str, Any]:
    cfg = EngineConfig(**{"workers": 1, "zero_stage": 3, "micro_batch": 4, "steps": 4,
                          "lr": 1e-2, "checkpoint_every": 10, **engine})
    return run_training(make_task=build_task, task_spec=job, engine=cfg,
                        cluster=ClusterConfig(mode="inprocess"), device="cpu", out_dir=out,
                        fingerprint="job", progress=False)


def test_the_cached_teacher_trains_and_is_the_exact_kl_at_full_k(upstream: Path,
                                                                 tmp_path: Path) -> None:
    vocab = modelio.ModelCard.read(upstream / "prepare" / CARD).vocab
    loss = {"ce_weight": 0.0, "kl_weight": 1.0, "temperature": 2.0}
    cached = _train(make_job(upstream, n=4, teacher_top_k=16, **loss), tmp_path / "k16")
    log = read_log(tmp_path / "k16" / LOG)
    # the random tiny model's distributions are flat, so the KL is small, but it falls
    assert cached["final_loss"] < 0.8 * cached["first_loss"], log
    files = list((tmp_path / "k16" / TEACHER_DIR).iterdir())
    assert len(files) == 1
    with safe_open(str(files[0]), "pt") as f:
        assert f.get_slice("ids").get_shape() == [sum(LENGTHS[:4]), 16]
    stamp = files[0].stat().st_mtime_ns
    shutil.rmtree(tmp_path / "k16" / CHECKPOINTS)  # the same job trains again from step 0
    again = _train(make_job(upstream, n=4, teacher_top_k=16, **loss), tmp_path / "k16")
    assert files[0].stat().st_mtime_ns == stamp  # its complete teacher file was reused
    assert again["final_loss"] == pytest.approx(cached["final_loss"], rel=1e-6)

    full = _train(make_job(upstream, n=4, teacher_top_k=vocab, **loss), tmp_path / "full",
                  steps=2)
    exact = _train(make_job(upstream, n=4, teacher_top_k=0, **loss), tmp_path / "exact",
                   steps=2)
    assert not (tmp_path / "exact" / TEACHER_DIR).exists()
    # equal up to the float noise of two teacher forwards (batched differently) in a KL of
    # two nearly equal distributions (~1e-3)
    a, b = read_log(tmp_path / "full" / LOG), read_log(tmp_path / "exact" / LOG)
    for x, y in zip(a, b, strict=True):
        assert x["kl"] == pytest.approx(y["kl"], abs=1e-6)
    assert full["final_loss"] == pytest.approx(exact["final_loss"], abs=1e-6)


def test_a_bf16_engine_runs_its_teacher_in_bf16(upstream: Path, tmp_path: Path) -> None:
    """Under train.engine.precision bf16 the teacher pass runs the dense model in bf16 (what
    the student's forward costs), and a float32 set of teacher files is not taken for it."""
    job = make_job(upstream, n=4, kl_weight=1.0, teacher_top_k=8)
    fp32 = WorkerSetup(device=torch.device("cpu"), micro_batch=2, work_dir=tmp_path,
                       job_key="test")
    bf16 = dataclasses.replace(fp32, compute_dtype=torch.bfloat16)
    assert teacher_dtype(job, fp32) == torch.float32
    assert teacher_dtype(job, bf16) == torch.bfloat16
    batches = rank_batches([len(s.ids) for s in job.samples], 0, 1, 2)
    want = {}
    for dtype in (torch.float32, torch.bfloat16):
        dense = modelio.load_model(job.dense_dir, dtype)
        want[dtype] = compute_shard(dense, job.samples, batches, k=8, temperature=1.0,
                                    pad_id=job.pad_id, device=torch.device("cpu"))
    assert not torch.allclose(want[torch.float32]["logprobs"],
                              want[torch.bfloat16]["logprobs"], atol=1e-4)
    for setup, dtype in ((fp32, torch.float32), (bf16, torch.bfloat16)):
        store = cache_teacher(job, setup)  # the fp32 files exist: bf16 computes its own
        for j, i in enumerate(want[dtype]["samples"].tolist()):
            a, b = want[dtype]["offsets"][j], want[dtype]["offsets"][j + 1]
            assert torch.equal(store.rows(i).logprobs, want[dtype]["logprobs"][a:b])

    # whole runs: DeepSpeed's bf16 engine on the CPU trains, and what is saved is the
    # optimizer's float32 master weights, not the module's bf16 copies
    for stage in (2, 3):
        out = tmp_path / f"run-z{stage}"
        result = _train(job, out, zero_stage=stage, precision="bf16", steps=2)
        assert result["bf16"] and math.isfinite(result["final_loss"])
        saved = {}
        for f in (out / "params").rglob("*.safetensors"):
            saved.update(load_file(str(f)))
        assert saved and all(t.dtype == torch.float32 for t in saved.values())
        assert any(not torch.equal(t, t.bfloat16().float()) for t in saved.values())


def test_activation_checkpointing_changes_memory_not_training(upstream: Path,
                                                              tmp_path: Path) -> None:
    job = make_job(upstream, n=4)
    on = _train(job, tmp_path / "on", activation_checkpointing=True, steps=3)
    off = _train(job, tmp_path / "off", activation_checkpointing=False, steps=3)
    for x, y in zip(read_log(tmp_path / "on" / LOG), read_log(tmp_path / "off" / LOG),
                    strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6)
    assert on["final_loss"] < on["first_loss"]
    assert on["trainable_params"] == off["trainable_params"] > 0


def test_checkpointed_blocks_run_again_in_backward(upstream: Path) -> None:
    """With checkpointing each decoder block runs twice per step (forward, recompute) and the
    gradients of the adapters and the compensation are the ones without it."""
    job = make_job(upstream, n=2)
    grads = {}
    for on in (False, True):
        torch.manual_seed(0)
        model, _ = build_model(job, WorkerSetup(device=torch.device("cpu"),
                                                activation_checkpointing=on))
        model.train()
        calls = []
        for block in model.base.base_model.model.model.layers:  # (the recompute calls the
            # block's forward, not the block: count a module inside it)
            block.mlp.register_forward_pre_hook(lambda m, a, c=calls: c.append(1))
        b = collate(list(job.samples), job.pad_id)
        model(b["input_ids"], b["attention_mask"]).float().pow(2).mean().backward()
        assert len(calls) == (4 if on else 2)
        grads[on] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g)


def _gpu_body(_rank: int, job: TrainJob, out: Path) -> None:
    """The GPU test's body, in a process of its own: DeepSpeed picks its accelerator once per
    process, and the CPU tests of a session have picked the CPU one."""
    from deepspeed.accelerator import get_accelerator

    assert get_accelerator().device_name() == "cuda"
    torch.cuda.set_device(0)
    # the partitioned base on the GPU, in bf16, holds the checkpoint's values
    with process_group(backend="nccl"):
        ds = deepspeed_config(EngineConfig(zero_stage=3, micro_batch=2, workers=1),
                              world_size=1, bf16=True)
        base = load_partitioned(job.degraded_dir, ds)
        plain = modelio.load_model(job.degraded_dir, torch.bfloat16)
        for name, p in base.named_parameters():
            assert p.numel() == 0 and full_numel(p) > 0
            with gathered([p]):
                assert p.device.type == "cuda" and p.dtype == torch.bfloat16
                assert torch.equal(p.detach().cpu(), plain.get_parameter(name))
        del base
    # a training run: bf16 and activation checkpointing (both 'auto': on for a GPU), the
    # cached teacher, ZeRO-3
    cfg = EngineConfig(workers=1, zero_stage=3, micro_batch=4, steps=2, lr=1e-2,
                       checkpoint_every=10)
    result = run_training(make_task=build_task, task_spec=job, engine=cfg,
                          cluster=ClusterConfig(mode="inprocess"), device="cuda",
                          out_dir=out, fingerprint="gpu", progress=False)
    assert result["bf16"] and result["zero_stage"] == 3 and result["steps"] == 2
    log = read_log(out / LOG)
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["kl"] > 0 for r in log)
    assert result["trainable_params"] > 0
    assert (out / TEACHER_DIR / "topk-00000-of-00001.safetensors").is_file()


def spawn_on_cuda(body: Any, *args: Any) -> None:
    """Run ``body(0, *args)`` in a process of its own with DeepSpeed's CUDA accelerator
    (DeepSpeed picks its accelerator once per process, and the CPU tests picked the CPU)."""
    import torch.multiprocessing as mp

    saved = os.environ.get("DS_ACCELERATOR")
    os.environ["DS_ACCELERATOR"] = "cuda"  # the spawned process's environment
    try:
        mp.spawn(body, args=args, nprocs=1, join=True)
    finally:
        if saved is None:
            os.environ.pop("DS_ACCELERATOR", None)
        else:
            os.environ["DS_ACCELERATOR"] = saved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_zero3_partitioned_load_and_a_train_step_on_gpu(upstream: Path, tmp_path: Path) -> None:
    job = make_job(upstream, n=4, kl_weight=1.0, teacher_top_k=16)
    spawn_on_cuda(_gpu_body, job, tmp_path / "t")


def _gathered_at_head(folder: Path, ds_config: dict[str, Any],
                      steps: int = 3) -> tuple[list[int], int, int]:
    """Train the Llama in ``folder`` loaded partitioned (world 1, every parameter
    partitioned, activation checkpointing) for ``steps`` steps; per step, the parameter
    elements held gathered when the LM head runs, the largest block's and the whole model's
    size."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from recoup.cluster.train_task import largest_block_params

    model = load_partitioned(folder, ds_config)
    model.train().activation_checkpointing_enable({"use_reentrant": False})
    params = list(model.parameters())
    block, total = largest_block_params(model), sum(full_numel(p) for p in params)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                      optimizer=torch.optim.SGD(params, lr=1e-3))
    live: list[int] = []
    model.lm_head.register_forward_pre_hook(lambda *_: live.append(sum(
        full_numel(p) for p in params if p.ds_status == ZeroParamStatus.AVAILABLE)))
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    return live, block, total


def test_zero3_limits_keep_two_blocks_gathered_not_the_model(tmp_path: Path) -> None:
    """DeepSpeed's default gathering limits (1e9 elements) keep every block gathered once a
    step has used it twice (checkpointing's recompute), so from the second step a rank holds
    the whole model; the limits sized by the block (``with_zero3_limits``) hold at most two
    blocks and the LM head."""
    from recoup.cluster.engine import with_zero3_limits

    model, _ = modelio.build_tiny_llama(modelio.TinyLlamaConfig(layers=6), torch.float32)
    model.save_pretrained(tmp_path)
    head = model.lm_head.weight.numel()
    base = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    with process_group():
        default, block, total = _gathered_at_head(tmp_path, base)
    assert block > 0 and default[0] < total // 2 and default[-1] == total, default
    with process_group():
        limited, _, _ = _gathered_at_head(tmp_path, with_zero3_limits(base, block))
    assert max(limited) <= 2 * block + head < total, (limited, block, head)
