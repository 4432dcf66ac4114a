"""Training on a streamed frozen base (``train.engine.frozen_weights: streamed``).

The degraded model's frozen weights stay in its checkpoint and every module reads its own
when it runs (:mod:`recoup.stages.model.streamed`). On the tiny random Llama of
``test_train_zero3_partitioned`` (prepare and degrade through the real runner):

- the file reader returns the stored tensors exactly, without mapping the file, and the
  rows the embeddings and the chunked LM head read are the stored rows;
- a streamed model is the resident one: the module holds only what trains, logits and
  gradients equal (masked LoRA with keep masks read from the checkpoint, compensation),
  each block is read again by the backward's recompute, nothing stays loaded after;
- DeepSpeed training on it (ZeRO-3 and ZeRO-2, the cached and the exact-KL teacher both
  streamed too) follows resident training step for step and saves the same parameters,
  and a stopped run resumes from its checkpoint;
- on a GPU (marker ``gpu``, skipped without CUDA): a bf16 streamed run trains.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recoup.cluster.engine import EngineConfig
from recoup.cluster.train_state import LOG, read_log
from recoup.cluster.train_task import WorkerSetup
from recoup.stages.model import layout, modelio
from recoup.stages.model.partitioned import checkpoint_files
from recoup.stages.model.streamed import (
    RowReader,
    _ChunkedLinear,
    read_unmapped,
    streamed_model,
)
from recoup.stages.recovery.batching import collate
from recoup.stages.recovery.masked_lora import KEEP_BUFFER, lora_layers
from recoup.stages.recovery.task import build_model, count_parameters
from recoup.stages.recovery.teacher import TEACHER_DIR
from tests.integration.test_train_zero3_partitioned import (
    _train,
    make_job,
    spawn_on_cuda,
    upstream,
)

__all__ = ("upstream",)  # the fixture, shared with the ZeRO-3 tests
CPU = torch.device("cpu")
#: modules with frozen weights of their own per decoder block: 7 linears, 2 norms
PER_BLOCK = 9


def test_the_reader_returns_the_stored_tensors(upstream: Path) -> None:
    folder = upstream / "degrade" / "model"
    stored = checkpoint_files(folder)
    want = load_file(str(next(iter(stored.values()))))
    got = read_unmapped(stored, list(want))
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_rows_read_by_token_and_by_chunk_are_the_stored_ones(upstream: Path) -> None:
    """The embedding lookup's rows and the chunked LM head (forward and backward, chunks
    smaller than the vocabulary, the last one short) against the stored matrices."""
    folder = upstream / "degrade" / "model"
    stored = checkpoint_files(folder)
    weights = load_file(str(next(iter(stored.values()))))
    embed = RowReader(stored, "model.embed_tokens.weight", {})
    ids = torch.tensor([[5, 3, 5, 200], [0, 3, 258, 7]])
    assert torch.equal(embed.take(ids), weights["model.embed_tokens.weight"][ids])
    with pytest.raises(IndexError, match="outside the vocabulary"):
        embed.take(torch.tensor([embed.rows]))
    head = RowReader(stored, "lm_head.weight", {})
    head.chunk = 50  # 259 rows: five full chunks and a short one
    W = weights["lm_head.weight"]
    x = torch.randn(2, 3, W.shape[1], requires_grad=True)
    out = _ChunkedLinear.apply(x, head, CPU, torch.float32)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(out, x @ W.T)
    torch.testing.assert_close(grad, g @ W)


def test_a_streamed_model_is_the_resident_one(upstream: Path) -> None:
    job = make_job(upstream, n=2)
    torch.manual_seed(0)
    whole, whole_params = build_model(job, WorkerSetup(device=CPU,
                                                       activation_checkpointing=True))
    torch.manual_seed(0)
    streamed, streamed_params = build_model(job, WorkerSetup(device=CPU, streamed=True))
    assert streamed_params == whole_params
    # only what trains is a parameter: all DeepSpeed will see
    assert count_parameters(streamed) == (count_parameters(whole)[0], 0)
    masks = {n: getattr(m, KEEP_BUFFER) for n, m in lora_layers(whole.base).items()}
    got = {n: getattr(m, KEEP_BUFFER) for n, m in lora_layers(streamed.base).items()}
    assert masks.keys() == got.keys() and masks
    for n in masks:  # read from the checkpoint, not from the stand-ins
        assert torch.equal(got[n], masks[n]) and not bool(masks[n].all())

    b = collate(list(job.samples), job.pad_id)
    logits, grads = {}, {}
    for name, model in (("whole", whole), ("streamed", streamed)):
        model.train()
        out = model(b["input_ids"], b["attention_mask"])
        out.float().pow(2).mean().backward()
        logits[name] = out.detach()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(logits["streamed"], logits["whole"], rtol=0, atol=0)
    assert grads["streamed"].keys() == grads["whole"].keys()
    for n, g in grads["whole"].items():
        torch.testing.assert_close(grads["streamed"][n], g, rtol=1e-6, atol=1e-7)

    weights = streamed.streamed
    layers = layout.num_layers(streamed.base)
    # every module read once in the forward, each block's once more in the recompute; the
    # embeddings and the LM head read by rows (not counted here)
    assert weights.reads == len(weights.slots) - 2 + PER_BLOCK * layers
    # nothing left loaded but the module whose recompute was cut short (it stops once the
    # backward has what it needs), and that one is dropped by the next read or by hand
    held = {id(s.owner) for slots in weights.slots.values() for s in slots
            if not getattr(s.owner, s.attr).is_meta}
    assert len(held) <= 1
    weights.release_all()
    assert all(getattr(s.owner, s.attr).is_meta for slots in weights.slots.values()
               for s in slots)


def test_a_streamed_teacher_is_the_dense_model(upstream: Path) -> None:
    job = make_job(upstream, n=3)
    dense = modelio.load_model(job.dense_dir, torch.float32)
    streamed = streamed_model(job.dense_dir, torch.float32, CPU)
    assert not list(streamed.parameters())
    b = collate(list(job.samples), job.pad_id)
    with torch.no_grad():
        want = dense(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        got = streamed(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(("stage", "top_k"), [(3, 8), (2, 0)])
def test_streamed_training_is_resident_training(upstream: Path, tmp_path: Path, stage: int,
                                                top_k: int) -> None:
    job = make_job(upstream, n=4, kl_weight=1.0, teacher_top_k=top_k, temperature=2.0)
    runs = {}
    for frozen in ("resident", "streamed"):
        out = tmp_path / frozen
        runs[frozen] = (_train(job, out, zero_stage=stage, steps=3, frozen_weights=frozen,
                               activation_checkpointing=True), read_log(out / LOG), out)
    (res, res_log, res_out), (st, st_log, st_out) = runs["resident"], runs["streamed"]
    assert st["trainable_params"] == res["trainable_params"] > 0
    assert st["final_loss"] < st["first_loss"]
    for x, y in zip(st_log, res_log, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-7)
    assert (st_out / TEACHER_DIR).exists() == (top_k > 0)
    for f in (res_out / "params").rglob("*.safetensors"):
        want = load_file(str(f))
        got = load_file(str(st_out / f.relative_to(res_out)))
        for name, t in want.items():
            torch.testing.assert_close(got[name], t, rtol=1e-4, atol=1e-6)


def test_a_stopped_streamed_run_resumes_where_it_stopped(upstream: Path,
                                                          tmp_path: Path) -> None:
    """The DeepSpeed checkpoint of a streamed run holds what trains (the module has nothing
    else), and a resume from it ends where an uninterrupted run ends."""
    from recoup.cluster.config import ClusterConfig
    from recoup.cluster.train import TrainingStopped, run_training
    from recoup.stages.recovery.task import build_task

    job = make_job(upstream, n=4, kl_weight=1.0, teacher_top_k=8)
    cfg = EngineConfig(workers=1, zero_stage=3, micro_batch=2, steps=4, lr=1e-2,
                       checkpoint_every=2, frozen_weights="streamed")

    def train(out: Path, stop: int | None = None) -> dict:
        return run_training(make_task=build_task, task_spec=job, engine=cfg,
                            cluster=ClusterConfig(mode="inprocess"), device="cpu",
                            out_dir=out, fingerprint="job", progress=False,
                            stop_after_steps=stop)

    whole = train(tmp_path / "whole")
    with pytest.raises(TrainingStopped):
        train(tmp_path / "stopped", stop=3)  # last checkpoint: step 2
    resumed = train(tmp_path / "stopped")
    assert resumed["resumed_from"] == 2
    for x, y in zip(read_log(tmp_path / "whole" / LOG), read_log(tmp_path / "stopped" / LOG),
                    strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-7)
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-5, abs=1e-7)


def test_streaming_needs_activation_checkpointing() -> None:
    with pytest.raises(ValueError, match="frozen_weights 'streamed' needs activation_checkp"):
        EngineConfig(frozen_weights="streamed", activation_checkpointing=False)
    assert EngineConfig(frozen_weights="streamed").activation_checkpointing == "auto"


def _gpu_body(_rank: int, job: object, out: Path) -> None:
    """In a process of its own: DeepSpeed picks its accelerator once per process."""
    from deepspeed.accelerator import get_accelerator

    from recoup.cluster.config import ClusterConfig
    from recoup.cluster.train import run_training
    from recoup.stages.recovery.task import build_task

    assert get_accelerator().device_name() == "cuda"
    torch.cuda.set_device(0)
    cfg = EngineConfig(workers=1, zero_stage=3, micro_batch=4, steps=2, lr=1e-2,
                       checkpoint_every=10, frozen_weights="streamed")
    result = run_training(make_task=build_task, task_spec=job, engine=cfg,
                          cluster=ClusterConfig(mode="inprocess"), device="cuda",
                          out_dir=out, fingerprint="gpu", progress=False)
    assert result["bf16"] and result["steps"] == 2 and result["trainable_params"] > 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["kl"] > 0
               for r in read_log(out / LOG))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_streamed_training_on_gpu(upstream: Path, tmp_path: Path) -> None:
    """bf16 on the GPU, the cached teacher streamed too, ZeRO-3 on the trainable parts."""
    job = make_job(upstream, n=4, kl_weight=1.0, teacher_top_k=16)
    spawn_on_cuda(_gpu_body, job, tmp_path / "t")
