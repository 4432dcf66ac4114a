"""collect: the o_proj inputs of every layer for four views of every sample, into Parquet.

Views (:data:`recoup.stages.lcc.activations.VIEWS`): dense(q), dense(q + r+), dense(q + r-),
degraded(q), with q, r+, r- from the data stage's triplets. Each view's row per layer is
taken at the token(s) ``collect.position`` names (:mod:`recoup.stages.model.capture`).

Samples are cut into shards of ``samples_per_shard`` in ``triplets.parquet`` order; a pool
of workers (:func:`recoup.cluster.pool.run_shards`: Ray actors, or one in-process worker)
processes shards. Dense and degraded are never resident together, nor is either whole: a
shard's dense views run block by block (:mod:`recoup.stages.model.block_capture`: one
decoder block read from the model's files onto the device at a time, the views' hidden
states kept between blocks), then its degraded view the same way, so a 70B worker fits
one GPU; the rows are those of a whole-model forward pass. A shard writes one Parquet
file per layer through temporary names, then its marker; see
:mod:`recoup.stages.lcc.activations` for the layout. The stage is resumable through
:class:`recoup.orchestrator.shards.ShardSet`: a shard whose marker exists, carries this
run's shard key *and* whose layer files still match the sizes and sha256 the marker
recorded is kept, everything else in the folder is deleted and recomputed. The key
hashes what changes the numbers (batching, padding, position, dtype, shard size, device
kind, and the upstream stages' fingerprints), so a shard from another config is never
mixed in, while a change of worker count reuses every finished shard.

Inputs are built by :func:`recoup.stages.model.tokenize.tokenize_pair`: q + r views end
with EOS after the response (version 2; version 1 had no EOS, unlike training). Over-long
inputs: the data stage keeps only samples whose prompt + own response fit in
``data.max_length`` tokens; q + r- (another sample's response) may not, and its response
tail is cut to fit. The prompt is never cut: a prompt longer than ``max_length`` is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from recoup.cluster.pool import PoolConfig, run_shards, worker_device
from recoup.orchestrator import store
from recoup.orchestrator.estimate import (
    FP32,
    ITEMSIZE,
    EstimateInputs,
    ModelShape,
    StageEstimate,
    forward_working_bytes,
    gb,
    gpus_for,
    placement_note,
)
from recoup.orchestrator.shards import ShardSet
from recoup.orchestrator.stage import Metrics, StageContext, register_stage
from recoup.stages import data as data_stage
from recoup.stages.lcc import activations
from recoup.stages.model import block_capture, capture, modelio
from recoup.stages.model.block_capture import BlockWeights
from recoup.stages.model.capture import PaddingSide, Position
from recoup.stages.model.tokenize import TokenSeq, tokenize_pair
from recoup.stages.prepare import CARD, MODEL_DIR
from recoup.stages.text.triplets import Triplet, read_parquet

log = logging.getLogger("recoup.collect")

#: which model computes each view
VIEW_MODEL = {"dense_q": "dense", "dense_pos": "dense", "dense_neg": "dense",
              "degraded_q": "degraded"}
_ITEMSIZE = {"float16": 2, "float32": 4}


class CollectConfig(PoolConfig):
    """Collection settings; the pool keys (workers, GPUs, CPUs, retries) come from
    :class:`PoolConfig`. A worker uses one GPU (one decoder block at a time)."""

    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
    dtype: Literal["float16", "float32"] = Field(
        "float32", description="Stored activation dtype; float16 halves the disk for 13B+.")
    position: Position = Field(
        "last_token",
        description="'last_token': each view's last token (q views: the last prompt token; "
        "q+r views: the last response token); 'mean_response': the mean over the response "
        "tokens (q views: their last token).",
    )
    padding_side: PaddingSide = Field(
        "right", description="Side padded in a batch; results do not depend on it.")
    samples_per_shard: int = Field(
        64, ge=1, description="Samples per shard: the unit of work, retry and resume.")


@dataclass(frozen=True, kw_only=True)
class CollectJob:
    """Everything a collect worker needs, picklable: it travels to every Ray actor."""

    dense_dir: Path
    degraded_dir: Path
    model_dtype: str
    triplets_path: Path
    out_dir: Path
    num_samples: int
    samples_per_shard: int
    max_length: int
    batch_size: int
    act_dtype: Literal["float16", "float32"]
    position: Position
    padding_side: PaddingSide
    #: torch device of a worker without GPUs; workers granted GPUs use "cuda"
    device: str
    num_gpus_per_worker: float
    #: identifies what a shard's numbers depend on; a marker with another key is stale
    key: str
    #: test hook: the first worker to find this file deletes it and kills its own process
    #: right after writing its first layer file (to exercise recovery); never set in runs
    crash_file: Path | None = None

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.samples_per_shard)

    def shard_set(self, layers: int) -> ShardSet:
        """The shards of this job: one Parquet file per layer, and a marker."""
        return ShardSet(
            root=self.out_dir, key=self.key, num_shards=self.num_shards,
            files_of=lambda shard: activations.layer_files(self.out_dir, shard, layers),
            data_dirs=(activations.ACTS_DIR,), expect={"layers": layers}, name="collect",
        )

    def shard_slice(self, shard: int) -> slice:
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} is outside 0..{self.num_shards - 1}")
        start = shard * self.samples_per_shard
        return slice(start, min(start + self.samples_per_shard, self.num_samples))


def activation_bytes_per_sample(card: modelio.ModelCard, dtype: str) -> int:
    """Raw activation bytes one sample adds: layers x heads x d_head x views x itemsize."""
    return card.layers * card.heads * card.d_head * len(activations.VIEWS) * _ITEMSIZE[dtype]


def view_sequences(tokenizer: Any, t: Triplet, max_length: int) -> dict[str, TokenSeq]:
    """The four model inputs of a triplet, in :data:`activations.VIEWS` order.

    The prompt is never cut (its last token is what the q views are read at): a prompt
    longer than ``max_length`` is an error rather than a silently different sample.
    """
    q = tokenize_pair(tokenizer, t.prompt, "")
    if len(q.ids) > max_length:
        raise ValueError(f"sample {t.id}: the prompt has {len(q.ids)} tokens, more than the "
                         f"maximum length {max_length}")
    pos = tokenize_pair(tokenizer, t.prompt, t.positive, max_length)
    neg = tokenize_pair(tokenizer, t.prompt, t.negative, max_length)
    return {"dense_q": q, "dense_pos": pos, "dense_neg": neg, "degraded_q": q}


def padded_tokens(lengths: list[int], batch_size: int) -> int:
    """Tokens the forward passes process, padding included, under :func:`plan_batches`."""
    return sum(len(b) * max(lengths[i] for i in b)
               for b in capture.plan_batches(lengths, batch_size))


class CollectWorker:
    """Computes shards (a pool worker), reading both models block by block from their
    files (:class:`block_capture.BlockWeights`): no model is ever loaded whole."""

    def __init__(self, job: CollectJob) -> None:
        self.job = job
        # block by block, one GPU holds everything: a worker granted more uses its first
        self.device = torch.device(worker_device(job.num_gpus_per_worker, job.device))
        dtype = modelio.DTYPES[job.model_dtype]
        self.tokenizer = modelio.load_tokenizer(job.dense_dir)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id or 0)
        self.triplets = read_parquet(job.triplets_path, Triplet)
        if len(self.triplets) != job.num_samples:
            raise ValueError(f"{job.triplets_path} has {len(self.triplets)} triplets, the job "
                             f"expects {job.num_samples}")
        self.models = {"dense": BlockWeights(job.dense_dir, dtype),
                       "degraded": BlockWeights(job.degraded_dir, dtype)}
        block_capture.check_same_architecture(self.models["dense"], self.models["degraded"])

    def compute(self, rows: list[Triplet]) -> tuple[torch.Tensor, dict[str, int]]:
        """Activations of ``rows``: (L, len(VIEWS) * n, H * d_head), view-major rows."""
        job = self.job
        per_sample = [view_sequences(self.tokenizer, t, job.max_length) for t in rows]
        n = len(rows)
        parts: dict[str, torch.Tensor] = {}
        counts = {"tokens": 0, "padded_tokens": 0}
        for model_name, model in self.models.items():
            views = [v for v in activations.VIEWS if VIEW_MODEL[v] == model_name]
            seqs = [s[v] for v in views for s in per_sample]  # view-major
            lengths = [len(s.ids) for s in seqs]
            counts["tokens"] += sum(lengths)
            counts["padded_tokens"] += padded_tokens(lengths, job.batch_size)
            acts = block_capture.capture_blockwise(
                model, seqs, batch_size=job.batch_size, pad_id=self.pad_id,
                padding_side=job.padding_side, position=job.position, device=self.device,
            )  # (L, len(views) * n, W)
            for i, v in enumerate(views):
                parts[v] = acts[:, i * n:(i + 1) * n]
        return torch.cat([parts[v] for v in activations.VIEWS], dim=1), counts

    def run_shard(self, shard: int) -> dict[str, Any]:
        job = self.job
        started = time.time()
        rows = self.triplets[job.shard_slice(shard)]
        acts, counts = self.compute(rows)  # (L, 4 * n, W)
        ids = [t.id for _ in activations.VIEWS for t in rows]
        views = [v for v in activations.VIEWS for _ in rows]
        for layer in range(acts.shape[0]):
            activations.write_layer_shard(activations.shard_file(job.out_dir, layer, shard),
                                          ids, views, acts[layer], job.act_dtype)
            if layer == 0:
                self._maybe_crash()
        layers = int(acts.shape[0])
        info = {"shard": shard, "samples": len(rows), "rows": len(ids),
                "layers": layers, "first_id": rows[0].id, "last_id": rows[-1].id,
                **counts, "started": started, "finished": time.time()}
        return job.shard_set(layers).mark_done(shard, info)

    def _maybe_crash(self) -> None:
        if self.job.crash_file is None:
            return
        try:
            os.unlink(self.job.crash_file)  # only one worker wins the file
        except FileNotFoundError:
            return
        os._exit(1)


def shard_key(cfg: CollectConfig, *, device: str, upstream: Mapping[str, str]) -> str:
    """What a shard's numbers depend on; not the worker count, retries or CPU split."""
    payload = {
        "batch_size": cfg.batch_size, "dtype": cfg.dtype, "position": cfg.position,
        "padding_side": cfg.padding_side, "samples_per_shard": cfg.samples_per_shard,
        "device": torch.device(worker_device(cfg.num_gpus_per_worker, device)).type,
        "upstream": dict(sorted(upstream.items())),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def reusable_shards(job: CollectJob, layers: int) -> set[int]:
    """Finished shards of this job; every other file in the folder is deleted.

    A shard is reused when its marker carries ``job.key`` and each of its layer files has
    the size and sha256 the marker recorded. The runner re-runs collect when it finds an
    output that disagrees with the manifest, keeping the folder (the stage is resumable):
    the checksums make that re-run recompute the damaged shard instead of reusing it, and
    the log names the bad file.
    """
    return job.shard_set(layers).reusable(log)


def describe_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def run_collect(job: CollectJob, cfg: CollectConfig, cluster_cfg: Any, *,
                card: modelio.ModelCard, progress: bool = True) -> Metrics:
    """Compute every shard of ``job`` that is not finished yet; return the stage metrics."""
    per_sample = activation_bytes_per_sample(card, cfg.dtype)
    message = (f"collect: {job.num_samples} samples x {len(activations.VIEWS)} views x "
               f"{card.layers} layers x {card.heads} heads x {card.d_head} ({cfg.dtype}) = "
               f"{describe_bytes(per_sample)} of activations per sample, "
               f"{describe_bytes(per_sample * job.num_samples)} in all")
    log.info(message)
    print(message, flush=True)
    started = time.time()
    keep = reusable_shards(job, card.layers)
    todo = [s for s in range(job.num_shards) if s not in keep]
    if keep:
        log.info("collect: reusing %d finished shards, computing %d", len(keep), len(todo))
    results = run_shards(CollectWorker, (job,), todo, cluster_cfg, cfg, desc="collect",
                         progress=progress)
    store.remove_temporaries(job.out_dir)  # left by workers that died mid-write
    missing = [s for s in range(job.num_shards) if s not in activations.done_shards(job.out_dir)]
    if missing:
        raise RuntimeError(f"collect finished without the markers of shards {missing}")
    seconds = time.time() - started
    tokens = sum(r["tokens"] for r in results.values())
    return {
        "samples": job.num_samples, "shards": job.num_shards, "shards_computed": len(todo),
        "shards_reused": len(keep), "layers": card.layers, "width": card.heads * card.d_head,
        "views": list(activations.VIEWS), "dtype": cfg.dtype, "position": cfg.position,
        "activation_bytes_per_sample": per_sample,
        "activation_bytes": per_sample * job.num_samples,
        "tokens": tokens,
        "padded_tokens": sum(r["padded_tokens"] for r in results.values()),
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "seconds": seconds, "shard_key": job.key,
    }


def _summary(m: Metrics) -> str:
    return (f"{m['samples']} samples, {m['shards']} shards ({m['shards_reused']} reused), "
            f"{describe_bytes(m['activation_bytes_per_sample'])}/sample, "
            f"{m['tokens_per_s']:.0f} tok/s")


# version 2: q + r views end with EOS (one tokenisation rule with training)
def collect_parts(shape: ModelShape, batch_size: int, max_length: int,
                  shard_samples: int) -> dict[str, int]:
    """Device bytes of one collect worker, block by block (:mod:`block_capture`): one
    decoder block, the hidden states of a shard's dense views (the larger of the two
    streams: 3 views a sample) with their causal masks (bool) and rotary tables, at
    ``data.max_length`` tokens each, and one batch's forward working set (no KV cache, no
    logits: only the decoder blocks run)."""
    card, item = shape.card, shape.itemsize
    seqs = shard_samples * sum(VIEW_MODEL[v] == "dense" for v in activations.VIEWS)
    return {
        "one decoder block": shape.block_bytes,
        f"hidden states of a shard's {seqs} dense views (x max_length x hidden)":
            seqs * max_length * card.hidden * item,
        "their causal masks and rotary tables": seqs * max_length * (
            max_length + 2 * card.d_head * item),
        "forward working set (batch x max_length)": forward_working_bytes(
            card, batch_size * max_length, item),
    }


def estimate_collect(inp: EstimateInputs) -> StageEstimate:
    """Per worker: one block and a shard's hidden states (:func:`collect_parts`); on the
    host a shard's rows (twice: per view, then joined); on disk the views of every sample
    (:func:`activation_bytes_per_sample`).

    The embedding matrix and the block weights are not host memory of the worker:
    ``safe_open(...).get_tensor`` returns tensors backed by the file's mmap, so what is read
    of them is page cache (shared by the node's workers, dropped by the kernel under
    pressure), and the embedding lookup touches only the rows of the shard's tokens. Counting
    them as resident put the plan 50% above the measured peak on the CPU (where the block
    stays in those pages: no copy is made for the "device")."""
    from recoup.cluster.placement import worker_group

    c: CollectConfig = inp.config
    data = inp.sections["data"]
    shape, hw, card = inp.shape, inp.hardware, inp.shape.card
    n = data.source.num_samples
    shard = c.samples_per_shard if n is None else min(c.samples_per_shard, n)
    parts = collect_parts(shape, c.batch_size, data.max_length, shard)
    dev = sum(parts.values())
    need = gpus_for(dev, hw.usable)
    per_sample = activation_bytes_per_sample(card, c.dtype)
    rows = card.layers * len(activations.VIEWS) * shard * card.heads * card.d_head * FP32
    host = 2 * rows
    notes = [f"activations on disk: {per_sample / 1e6:.2f} MB per sample "
             f"({card.layers} layers x {card.heads} heads x {card.d_head} "
             f"x {len(activations.VIEWS)} views x {ITEMSIZE[c.dtype]} B)",
             f"block by block: each shard reads both models' weights once from their files "
             f"({gb(2 * shape.weights_bytes)}, memory-mapped: page cache shared by the "
             "node's workers, not counted as host memory)"]
    if n is None:
        notes.append("data.source.num_samples is unset (all records): disk total unknown")
    fits = c.num_gpus_per_worker >= need or not inp.on_gpu
    if c.num_gpus_per_worker < need and inp.on_gpu:
        notes.append(f"needs {need} GPU per worker: set collect.num_gpus_per_worker={need}")
    elif c.num_gpus_per_worker > need and inp.on_gpu:
        notes.append(f"a worker uses {need} GPU; num_gpus_per_worker="
                     f"{c.num_gpus_per_worker:g} leaves the rest idle (set {need}, and "
                     "workers to the GPUs available)")
    gpw = max(c.num_gpus_per_worker, float(need))
    note = placement_note(hw, worker_group(c.workers, gpus=gpw,
                                           cpus=c.num_cpus_per_worker or 1.0))
    if note:
        notes.append(note)
        fits = False
    return StageEstimate(stage=inp.stage, workers=c.workers, device_bytes=dev,
                         host_bytes=host, disk_bytes=None if n is None else n * per_sample,
                         gpus_config=c.workers * c.num_gpus_per_worker, gpus_min=need,
                         fits=fits, parts=parts, notes=tuple(notes))


@register_stage(name="collect", version=2, requires=("prepare", "degrade", "data"),
                resumable=True, summarize=_summary, estimate=estimate_collect,
                holds_gpus=False)
def collect(ctx: StageContext) -> Metrics:
    cfg: CollectConfig = ctx.config
    prepared, data_dir = ctx.input("prepare"), ctx.input("data")
    card = modelio.ModelCard.read(prepared / CARD)
    info = data_stage.read_info(data_dir)
    if not info["triplets"]:
        raise ValueError("collect needs the data stage's triplets; set data.triplets: true")
    upstream = {name: ctx.upstream[name] for name in ("prepare", "degrade", "data")}
    job = CollectJob(
        dense_dir=prepared / MODEL_DIR, degraded_dir=ctx.input("degrade") / MODEL_DIR,
        model_dtype=card.dtype, triplets_path=data_dir / data_stage.TRIPLETS,
        out_dir=ctx.out_dir, num_samples=int(info["samples"]),
        samples_per_shard=cfg.samples_per_shard, max_length=int(info["max_length"]),
        batch_size=cfg.batch_size, act_dtype=cfg.dtype, position=cfg.position,
        padding_side=cfg.padding_side, device=ctx.device,
        num_gpus_per_worker=cfg.gpus_on(ctx.cluster),
        key=shard_key(cfg, device=ctx.device, upstream=upstream),
    )
    return run_collect(job, cfg, ctx.cluster, card=card, progress=ctx.progress)
