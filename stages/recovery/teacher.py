"""The dense teacher's top-k next-token distributions, computed once before training.

Distilling with the teacher resident beside the student costs a second model per worker
(a whole 70B teacher is 138 GB on every GPU). Instead, at the start of the training job and
before the student is built, the workers run the dense model once over the job's samples
and keep, per real token position, its ``k`` most likely next tokens, their
log-probabilities at the loss temperature and the log of the remaining (tail) mass
(:func:`recoup.stages.recovery.losses.teacher_topk`); training then reads them back a
micro-batch at a time for the top-k + tail KL (:func:`~recoup.stages.recovery.losses.
topk_tail_kl`). One model is resident at a time. The teacher runs in the engine's compute
dtype (:func:`teacher_dtype`): under bf16 it costs half an fp32 pass on a CPU with bf16
instructions, and it rounds as the student does.

Work split: rank ``r`` of ``w`` runs the samples ``i`` with ``i % w == r``, longest first, in
micro-batches. Under ZeRO-3 the teacher is loaded partitioned like the student
(:func:`recoup.stages.model.partitioned.load_partitioned`) and each block is gathered for
its own forward only (:func:`~recoup.stages.model.partitioned.gathered_forward`); gathers
are collectives, so every rank runs the same number of forwards (a rank with fewer samples
repeats its last micro-batch and drops the result).

Files, in ``teacher/`` of the stage folder, one per rank: ``topk-{r}-of-{w}.safetensors``
with ``ids`` (N, k) int32, ``logprobs`` (N, k) float32 and ``tail`` (N,) float32 for the N
token positions of its samples back to back, ``samples`` (n,) int64 (sample indices) and
``offsets`` (n + 1,) int64 (row ranges); the metadata ``key`` names the job, teacher, k,
temperature and samples it was computed for. A file is written atomically and counts only
with the right key, so a resumed or restarted job reuses a complete set and recomputes
anything else.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from recoup.cluster.hostmem import trim_host_heap
from recoup.cluster.train_task import WorkerSetup
from recoup.orchestrator.store import atomic_path
from recoup.stages.model import modelio
from recoup.stages.model.partitioned import gathered_forward, load_partitioned
from recoup.stages.model.streamed import streamed_model
from recoup.stages.recovery.batching import Encoded, collate, pad_topk
from recoup.stages.recovery.job import TrainJob
from recoup.stages.recovery.losses import TeacherTopK, teacher_topk

TEACHER_DIR = "teacher"


def shard_file(folder: Path, rank: int, world: int) -> Path:
    return folder / f"topk-{rank:05d}-of-{world:05d}.safetensors"


def teacher_dtype(job: TrainJob, setup: WorkerSetup) -> torch.dtype:
    """The teacher runs in the engine's compute dtype (bf16 when the student trains in
    bf16: the same forward cost and rounding as the student's), else the model's own."""
    return setup.compute_dtype or modelio.DTYPES[job.dtype]


def teacher_key(job: TrainJob, job_key: str, world: int,
                dtype: torch.dtype = torch.float32) -> str:
    """What a set of files was computed for: the job, the dense model, k, the temperature,
    the world size (the split), the teacher's dtype and the samples' token ids."""
    ids = hashlib.sha256()
    for s in job.samples:
        ids.update(json.dumps([s.prompt_len, list(s.ids)]).encode())
    payload = {"job": job_key, "dense": str(job.dense_dir), "k": job.loss.teacher_top_k,
               "temperature": job.loss.temperature, "world": world, "samples": ids.hexdigest()}
    if dtype != torch.float32:  # float32 keys stay what they were: cached files still count
        payload["dtype"] = str(dtype)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def rank_batches(lengths: Sequence[int], rank: int, world: int,
                 micro_batch: int) -> list[list[int]]:
    """This rank's micro-batches of sample indices (``i % world == rank``, longest first),
    padded to the count every rank runs by repeating the last one (or sample 0 for a rank
    without samples); a repeated batch's results are dropped by :func:`compute_shard`."""
    mine = sorted(range(rank, len(lengths), world), key=lambda i: (-lengths[i], i))
    batches = [mine[j: j + micro_batch] for j in range(0, len(mine), micro_batch)]
    forwards = math.ceil(math.ceil(len(lengths) / world) / micro_batch)
    filler = batches[-1] if batches else [0]
    return batches + [filler] * (forwards - len(batches))


@torch.no_grad()
def compute_shard(model: Any, samples: Sequence[Encoded], batches: Sequence[Sequence[int]], *,
                  k: int, temperature: float, pad_id: int,
                  device: torch.device) -> dict[str, Tensor]:
    """Top-k rows of the samples in ``batches`` (each sample once, in batch order) as the
    tensors of a shard file (see the module docstring)."""
    done: set[int] = set()
    order: list[int] = []
    parts: list[TeacherTopK] = []
    for batch in batches:
        b = collate([samples[i] for i in batch], pad_id)
        logits = model(input_ids=b["input_ids"].to(device),
                       attention_mask=b["attention_mask"].to(device), use_cache=False).logits
        top = teacher_topk(logits, k, temperature)  # (b, T, k), (b, T, k), (b, T)
        for j, i in enumerate(batch):
            if i in done:
                continue
            done.add(i)
            n = len(samples[i].ids)
            order.append(i)
            parts.append(TeacherTopK(top.ids[j, :n].cpu(), top.logprobs[j, :n].cpu(),
                                     top.tail[j, :n].cpu()))
    lengths = torch.tensor([len(p.tail) for p in parts], dtype=torch.int64)
    offsets = torch.zeros(len(parts) + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    empty = torch.empty(0, k)
    return {
        "ids": torch.cat([p.ids for p in parts]).int() if parts else empty.int(),
        "logprobs": torch.cat([p.logprobs for p in parts]).float() if parts else empty,
        "tail": torch.cat([p.tail for p in parts]).float() if parts else torch.empty(0),
        "samples": torch.tensor(order, dtype=torch.int64), "offsets": offsets,
    }


def _key_of(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("key")
    except Exception:  # noqa: BLE001 - an unreadable file is one to recompute
        return None


def _all_ranks_agree(flag: bool, setup: WorkerSetup) -> bool:
    """True when ``flag`` holds on every rank (the teacher pass is all or nothing: its
    ZeRO-3 gathers need every rank)."""
    if setup.world_size == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=setup.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _load_teacher(job: TrainJob, setup: WorkerSetup) -> Any:
    if setup.streamed:  # one block at a time, read from the checkpoint
        return streamed_model(job.dense_dir, teacher_dtype(job, setup), setup.device)
    if setup.zero_init is not None:  # in the engine's precision (zero_init_dtype)
        return load_partitioned(job.dense_dir, setup.zero_init)
    return modelio.load_model(job.dense_dir, teacher_dtype(job, setup), str(setup.device))


def _free_memory(device: torch.device) -> None:
    """Return a dropped model's memory now, before the student is built. On the host,
    glibc keeps freed blocks below its mmap threshold on its heap (:mod:`recoup.cluster.hostmem`
    fixes the threshold in recoup's workers; this is for a process where it is not fixed):
    ``malloc_trim`` hands them back to the OS."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    trim_host_heap()


def cache_teacher(job: TrainJob, setup: WorkerSetup) -> TopKStore:
    """Every rank's top-k file of the job's samples, computed now unless a complete set for
    this job is already in ``setup.work_dir``; the dense model is freed before returning.
    A collective: every rank calls it."""
    if setup.work_dir is None:
        raise ValueError("the cached teacher (train.loss.teacher_top_k > 0) needs a work "
                         "folder: build the task through run_training")
    folder = setup.work_dir / TEACHER_DIR
    key = teacher_key(job, setup.job_key, setup.world_size, teacher_dtype(job, setup))
    files = [shard_file(folder, r, setup.world_size) for r in range(setup.world_size)]
    if not _all_ranks_agree(all(_key_of(f) == key for f in files), setup):
        model = _load_teacher(job, setup)
        batches = rank_batches([len(s.ids) for s in job.samples], setup.rank,
                               setup.world_size, setup.micro_batch)
        with gathered_forward(model) as run:
            tensors = compute_shard(run, job.samples, batches, k=job.loss.teacher_top_k,
                                    temperature=job.loss.temperature, pad_id=job.pad_id,
                                    device=setup.device)
        del model, run
        _free_memory(setup.device)
        with atomic_path(files[setup.rank]) as tmp:
            save_file(tensors, str(tmp), metadata={"key": key})
        if setup.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
    return TopKStore(files, key)


class TopKStore:
    """The teacher's top-k of every sample, read from the rank files a micro-batch at a
    time (memory-mapped: a worker never holds the whole set)."""

    def __init__(self, files: Sequence[Path], key: str):
        self.where: dict[int, tuple[Path, int, int]] = {}
        for path in files:
            if _key_of(path) != key:
                raise ValueError(f"{path} is missing or belongs to another job; its teacher "
                                 "pass did not complete")
            with safe_open(str(path), "pt") as f:
                samples, offsets = f.get_tensor("samples"), f.get_tensor("offsets")
                self.k = int(f.get_slice("ids").get_shape()[1])
            for j, i in enumerate(samples.tolist()):
                self.where[i] = (path, int(offsets[j]), int(offsets[j + 1]))

    def rows(self, i: int) -> TeacherTopK:
        """Sample ``i``'s rows: ids (L, k) int64, logprobs (L, k), tail (L,)."""
        if i not in self.where:
            raise KeyError(f"sample {i} has no teacher top-k")
        path, a, b = self.where[i]
        with safe_open(str(path), "pt") as f:
            return TeacherTopK(f.get_slice("ids")[a:b].long(), f.get_slice("logprobs")[a:b],
                               f.get_slice("tail")[a:b])

    def batch(self, indices: Sequence[int], seq_len: int) -> dict[str, Tensor]:
        """The micro-batch's teacher as :func:`recoup.stages.recovery.batching.pad_topk`
        pads it to ``seq_len`` positions."""
        return pad_topk([self.rows(i) for i in indices], seq_len, self.k)


__all__ = ("TEACHER_DIR", "TopKStore", "cache_teacher", "compute_shard", "rank_batches",
           "shard_file", "teacher_dtype", "teacher_key")
