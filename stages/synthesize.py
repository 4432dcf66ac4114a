"""synthesize: training text written by the dense model itself, for data-free recovery.

Recover-LoRA's point is that a degraded model can be repaired without the data it was
trained on: the dense model is the teacher *and* the data generator. Each sequence starts
from one token drawn uniformly from the vocabulary (special and added tokens excluded, so
no sequence starts inside a chat-template marker), continues with ``greedy_tokens`` greedy
steps (the model commits to a topic instead of wandering off a random token), and is then
sampled with ``temperature`` and ``top_p`` up to ``length`` new tokens or the first stop
token. Modes:

- ``text``: the whole sequence is LM text. It is stored as a prompt (the start token plus
  the greedy tokens) and a response (the sampled rest), so every loss and the collect
  stage's "last prompt token" have something sensible to work on;
- ``chat`` (needs a chat template): the model first writes a *user message* from the
  start token inside the template's user turn, then answers it as the assistant. The
  prompt is the rendered template, the response the answer: real prompt/response pairs,
  so triplets and response-only losses work as on Alpaca.

Work is cut into shards of ``samples_per_shard`` sequences, spread over a pool of workers
(:func:`recoup.cluster.pool.run_shards`; Ray actors, each loading the dense model once).
Every shard draws its start tokens and samples from its own seed (``seed``, shard index),
so a shard's text does not depend on which worker ran it or how many there were (the
generation itself: :mod:`recoup.stages.text.generation`). A shard is a Parquet file written
atomically, then a marker with its sha256 (:class:`recoup.orchestrator.shards.ShardSet`);
the stage is resumable, and a rerun recomputes only shards whose marker is missing, from
another config, or whose file no longer matches its checksum. At the end all shards are joined,
exact duplicates (after whitespace normalisation) and texts shorter than ``min_tokens``
are dropped, and ``synthetic.parquet`` (``id, prompt, response``) is written: the file
the ``synthetic`` data source reads.

Outputs::

    shards/shard-0003.parquet   id, prompt, response, tokens   (one shard)
    shards/shard-0003.json      marker: key, files (size, sha256), counts
    synthetic.parquet           id, prompt, response           (deduplicated, in id order)
    synthetic.json              counts and throughput
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field, model_validator

from recoup.cluster.pool import PoolConfig, run_shards, worker_device
from recoup.orchestrator import shards, store
from recoup.orchestrator.config import ADDED_FIELD, fingerprint_dump
from recoup.orchestrator.estimate import (
    FP32,
    ITEMSIZE,
    EstimateInputs,
    StageEstimate,
    forward_working_bytes,
    gpus_for,
)
from recoup.orchestrator.shards import SHARDS_DIR, ShardSet
from recoup.orchestrator.stage import Metrics, StageContext, register_stage
from recoup.stages.model import modelio
from recoup.stages.prepare import CARD, MODEL_DIR
from recoup.stages.text.datasources import Sample
from recoup.stages.text.generation import (
    SYNTHETIC_FILE,
    Sampling,
    chat_user_prefix,
    deduplicate,
    generate,
    left_pad,
    shard_seed,
    start_token_pool,
    stop_tokens,
)
from recoup.stages.text.triplets import write_parquet

log = logging.getLogger("recoup.synthesize")

OUTPUT = SYNTHETIC_FILE
INFO = "synthetic.json"
ID_PREFIX = "synthetic"
SHARD_SCHEMA = pa.schema([
    pa.field("id", pa.string()), pa.field("prompt", pa.string()),
    pa.field("response", pa.string()), pa.field("tokens", pa.int32()),
])


class SynthesizeConfig(PoolConfig):
    """How the dense model writes its own training text; the pool keys (workers, GPUs,
    CPUs, retries) come from :class:`PoolConfig`. Each worker loads the dense model once."""

    num_samples: int = Field(256, ge=1, description="Sequences to generate (before dedup).")
    mode: Literal["text", "chat"] = Field(
        "text", description="'text': plain LM text; 'chat': the model writes a user message, "
        "then answers it (needs a chat template).")
    length: int = Field(
        128, ge=1, description="Most new tokens per sequence ('text') or per answer ('chat').")
    prompt_length: int = Field(
        48, ge=1, description="'chat': most tokens of a model-written user message.")
    greedy_tokens: int = Field(
        3, ge=0, description="Greedy steps after the random start token, before sampling.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")
    min_tokens: int = Field(
        8, ge=1, description="Generated sequences with fewer new tokens are dropped.")
    batch_size: int = Field(16, ge=1, description="Sequences generated together.")
    samples_per_shard: int = Field(
        64, ge=1, description="Sequences per shard: the unit of work, retry and resume.")
    seed: int = Field(0, description="Seed of the start tokens and the sampling.")
    dtype: Literal["model", "float32", "bfloat16"] = Field(
        "model",
        description="Compute dtype of the generation. 'model': the prepared model's own. "
        "bfloat16 is how a GPU generates, and on a CPU with bf16 instructions (avx512_bf16, "
        "AMX) faster than float32 (1.5x: benchmarks/synthesize_dtype.py); the "
        "text differs from float32's, sampled from the same seeds.",
        json_schema_extra=ADDED_FIELD)

    @model_validator(mode="after")
    def _greedy_fits(self) -> SynthesizeConfig:
        budget = self.prompt_length if self.mode == "chat" else self.length
        if self.greedy_tokens >= budget:
            raise ValueError(f"synthesize.greedy_tokens={self.greedy_tokens} leaves nothing to "
                             f"sample in {budget} tokens")
        return self


def generation_dtype(cfg: SynthesizeConfig, model_dtype: str) -> str:
    """The dtype the dense model generates in: ``cfg.dtype``, or the prepared model's own."""
    return model_dtype if cfg.dtype == "model" else cfg.dtype


# --------------------------------------------------------------------------- the worker


@dataclass(frozen=True, kw_only=True)
class SynthesizeJob:
    """Everything a generating worker needs, picklable: it travels to every Ray actor."""

    model_dir: Path
    model_dtype: str
    out_dir: Path
    config: SynthesizeConfig
    device: str
    #: what a shard's text depends on; a marker with another key is stale
    key: str

    @property
    def num_shards(self) -> int:
        return -(-self.config.num_samples // self.config.samples_per_shard)

    def shard_set(self) -> ShardSet:
        """The shards of this job: one Parquet file each, and a marker."""
        return ShardSet(root=self.out_dir, key=self.key, num_shards=self.num_shards,
                        files_of=lambda shard: [shard_file(self.out_dir, shard)],
                        name="synthesize")

    def shard_range(self, shard: int) -> range:
        per = self.config.samples_per_shard
        return range(shard * per, min((shard + 1) * per, self.config.num_samples))


def shard_file(root: Path, shard: int) -> Path:
    return root / SHARDS_DIR / f"shard-{shard:04d}.parquet"


def marker_file(root: Path, shard: int) -> Path:
    return shards.marker_file(root, shard)


def write_shard(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """One shard's rows as a Parquet file, written atomically."""
    table = pa.Table.from_pylist([dict(r) for r in rows], schema=SHARD_SCHEMA)
    with store.atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


class SynthesizeWorker:
    """Loads the dense model once; generates shards of sequences."""

    def __init__(self, job: SynthesizeJob) -> None:
        self.job = job
        # a worker given several GPUs (a model larger than one) spreads the model over them,
        # each keeping room for a batch's generation; its inputs go to the first, where the
        # embeddings are
        dtype = generation_dtype(job.config, job.model_dtype)
        device = worker_device(job.config.num_gpus_per_worker, job.device)
        reserve = 0
        if torch.device(device).type == "cuda":
            from transformers import AutoConfig

            card = modelio.card_from_config(AutoConfig.from_pretrained(job.model_dir), dtype, 0)
            reserve = sum(generation_working_parts(card, job.config, ITEMSIZE[dtype]).values())
        self.model = modelio.load_model_spread(job.model_dir, modelio.DTYPES[dtype], device,
                                               reserve_bytes=reserve)
        self.device = modelio.input_device(self.model)
        self.tokenizer = modelio.load_tokenizer(job.model_dir)
        cfg = job.config
        self.stop = stop_tokens(self.tokenizer, self.model.generation_config)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.stop, default=0))
        self.pool = start_token_pool(self.tokenizer, self.model.config.vocab_size)
        self.prefix = (self.tokenizer(chat_user_prefix(self.tokenizer),
                                      add_special_tokens=False)["input_ids"]
                       if cfg.mode == "chat" else [])

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _text_batch(self, starts: torch.Tensor) -> list[tuple[str, str, int]]:
        cfg = self.job.config
        ids = starts[:, None]  # (B, 1)
        new = generate(self.model, ids.to(self.device), torch.ones_like(ids).to(self.device),
                       Sampling(max_new_tokens=cfg.length, greedy_tokens=cfg.greedy_tokens,
                                temperature=cfg.temperature, top_p=cfg.top_p),
                       self.stop, self.pad_id)
        out = []
        for start, toks in zip(starts.tolist(), new, strict=True):
            head = [start, *toks[:cfg.greedy_tokens]]
            out.append((self._decode(head), self._decode(toks[cfg.greedy_tokens:]), len(toks)))
        return out

    def _chat_batch(self, starts: torch.Tensor) -> list[tuple[str, str, int]]:
        cfg = self.job.config
        prefix = torch.tensor(self.prefix, dtype=torch.long)
        ids = torch.cat([prefix.expand(len(starts), -1), starts[:, None]], dim=1)  # (B, P + 1)
        asked = generate(self.model, ids.to(self.device), torch.ones_like(ids).to(self.device),
                         Sampling(max_new_tokens=cfg.prompt_length,
                                  greedy_tokens=cfg.greedy_tokens,
                                  temperature=cfg.temperature, top_p=cfg.top_p),
                         self.stop, self.pad_id)
        users = [self._decode([s, *q]).strip() for s, q in zip(starts.tolist(), asked,
                                                                strict=True)]
        prompts = [str(self.tokenizer.apply_chat_template(
            [{"role": "user", "content": u}], tokenize=False, add_generation_prompt=True))
            for u in users]
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        ids, mask = left_pad(encoded, self.pad_id)
        answers = generate(self.model, ids.to(self.device), mask.to(self.device),
                           Sampling(max_new_tokens=cfg.length, greedy_tokens=0,
                                    temperature=cfg.temperature, top_p=cfg.top_p),
                           self.stop, self.pad_id)
        return [(p, self._decode(a), len(a)) for p, a in zip(prompts, answers, strict=True)]

    def generate_shard(self, shard: int) -> list[dict[str, Any]]:
        """One shard's rows (id, prompt, response, tokens), from the shard's own seed: the
        same text whichever worker, or benchmark, generates it."""
        job, cfg = self.job, self.job.config
        indices = job.shard_range(shard)
        seed = shard_seed(cfg.seed, shard)
        gen = torch.Generator().manual_seed(seed)
        starts = self.pool[torch.randint(len(self.pool), (len(indices),), generator=gen)]
        make = self._chat_batch if cfg.mode == "chat" else self._text_batch
        rows: list[dict[str, Any]] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # generate() samples from the global generator
            for b in range(0, len(indices), cfg.batch_size):
                for i, (prompt, response, n) in zip(indices[b:b + cfg.batch_size],
                                                    make(starts[b:b + cfg.batch_size]),
                                                    strict=True):
                    rows.append({"id": f"{ID_PREFIX}#{i}", "prompt": prompt,
                                 "response": response, "tokens": n})
        return rows

    def run_shard(self, shard: int) -> dict[str, Any]:
        job = self.job
        started = time.time()
        rows = self.generate_shard(shard)
        write_shard(shard_file(job.out_dir, shard), rows)
        info = {"shard": shard, "rows": len(rows), "tokens": sum(r["tokens"] for r in rows),
                "started": started, "finished": time.time()}
        return job.shard_set().mark_done(shard, info)


# --------------------------------------------------------------------------- the stage


def shard_key(cfg: SynthesizeConfig, *, device: str, upstream: str) -> str:
    """What a shard's text depends on: the generation settings and the device kind, not
    the pool's size, CPU split or retries."""
    payload = {
        "config": {k: v for k, v in fingerprint_dump(cfg).items()
                   if k not in PoolConfig.model_fields},
        "device": torch.device(worker_device(cfg.num_gpus_per_worker, device)).type,
        "upstream": upstream,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def reusable_shards(job: SynthesizeJob) -> set[int]:
    """Finished shards of this job whose file still matches its marker's checksum.

    Everything else in ``shards/`` (no marker: a killed writer; another key; a corrupted
    file; beyond the shard count) is deleted, so the folder holds this run's shards only.
    """
    return job.shard_set().reusable(log)


def read_shard_rows(root: Path, num_shards: int) -> list[dict[str, Any]]:
    """Every shard's rows, in shard and then id order."""
    rows: list[dict[str, Any]] = []
    for shard in range(num_shards):
        rows.extend(pq.read_table(shard_file(root, shard)).to_pylist())
    return rows


def run_synthesize(job: SynthesizeJob, cluster_cfg: Any, *, progress: bool = True) -> Metrics:
    """Generate every shard of ``job`` not finished yet, then write the deduplicated set."""
    cfg = job.config
    started = time.time()
    keep = reusable_shards(job)
    todo = [s for s in range(job.num_shards) if s not in keep]
    if keep:
        log.info("synthesize: reusing %d finished shards, generating %d", len(keep), len(todo))
    results = run_shards(SynthesizeWorker, (job,), todo, cluster_cfg, cfg, desc="synthesize",
                         progress=progress)
    seconds = time.time() - started
    store.remove_temporaries(job.out_dir)
    rows = read_shard_rows(job.out_dir, job.num_shards)
    long_enough = [r for r in rows if r["tokens"] >= cfg.min_tokens]
    kept, duplicates = deduplicate(long_enough)
    if not kept:
        raise ValueError(f"synthesize: none of the {len(rows)} generated sequences has "
                         f"synthesize.min_tokens={cfg.min_tokens} tokens")
    write_parquet([Sample(id=r["id"], prompt=r["prompt"], response=r["response"])
                   for r in kept], job.out_dir / OUTPUT)
    generated = sum(r["rows"] for r in results.values())
    per_s = 1 / seconds if generated and seconds > 0 else 0.0  # this session's work only
    metrics: Metrics = {
        "generated": len(rows), "samples": len(kept), "duplicates": duplicates,
        "too_short": len(rows) - len(long_enough), "mode": cfg.mode,
        "shards": job.num_shards, "shards_computed": len(todo), "shards_reused": len(keep),
        "tokens": sum(int(r["tokens"]) for r in rows),
        "samples_per_s": generated * per_s,
        "new_tokens_per_s": sum(r["tokens"] for r in results.values()) * per_s,
        "seconds": seconds, "workers": cfg.workers, "shard_key": job.key,
    }
    store.atomic_write_json(job.out_dir / INFO, metrics)
    return metrics


def _summary(m: Metrics) -> str:
    return (f"{m['samples']} {m['mode']} samples ({m['duplicates']} duplicates, "
            f"{m['too_short']} too short dropped), {m['samples_per_s']:.2f} samples/s")


def generation_working_parts(card: modelio.ModelCard, cfg: SynthesizeConfig,
                             item: int) -> dict[str, int]:
    """Device bytes of generating a batch beside the weights: the KV cache of a batch of
    sequences at their longest, one decoding step's working set and the float32 logits
    sampling reads."""
    longest = 1 + cfg.length + (cfg.prompt_length if cfg.mode == "chat" else 0)
    return {
        "KV cache (batch x longest sequence)":
            2 * card.layers * cfg.batch_size * longest * card.kv_heads * card.d_head * item,
        "one decoding step's working set": forward_working_bytes(card, cfg.batch_size, item),
        "logits of a step (and float32 for sampling)": cfg.batch_size * card.vocab * (
            item + FP32),
    }


def estimate_synthesize(inp: EstimateInputs) -> StageEstimate:
    """Per worker: the dense model resident, the KV cache of a batch of sequences at their
    longest, one decoding step's working set and the float32 logits sampling reads."""
    cfg: SynthesizeConfig = inp.config
    shape, hw = inp.shape, inp.hardware
    item = ITEMSIZE[generation_dtype(cfg, shape.card.dtype)]
    parts = {"dense weights": shape.params * item,
             **generation_working_parts(shape.card, cfg, item)}
    dev = sum(parts.values())
    need = gpus_for(dev, hw.usable)
    notes = [f"{cfg.workers} workers, each loading the dense model once"]
    fits = cfg.num_gpus_per_worker >= need or not inp.on_gpu
    if not fits:
        notes.append(f"needs {need} GPUs per worker: set synthesize.num_gpus_per_worker={need}")
    return StageEstimate(stage=inp.stage, workers=cfg.workers, device_bytes=dev,
                         host_bytes=shape.params * item, disk_bytes=None,
                         gpus_config=cfg.workers * cfg.num_gpus_per_worker, gpus_min=need,
                         fits=fits, parts=parts, notes=tuple(notes))


@register_stage(name="synthesize", version=1, requires=("prepare",), resumable=True,
                summarize=_summary, estimate=estimate_synthesize, holds_gpus=False)
def synthesize(ctx: StageContext) -> Metrics:
    cfg: SynthesizeConfig = ctx.config
    prepared = ctx.input("prepare")
    card = modelio.ModelCard.read(prepared / CARD)
    cfg = cfg.model_copy(update={"num_gpus_per_worker": cfg.gpus_on(ctx.cluster)})
    job = SynthesizeJob(
        model_dir=prepared / MODEL_DIR, model_dtype=card.dtype, out_dir=ctx.out_dir,
        config=cfg, device=ctx.device,
        key=shard_key(cfg, device=ctx.device, upstream=ctx.upstream["prepare"]),
    )
    ctx.log.info("synthesize: %d %s sequences of up to %d tokens in %d shards on %d workers",
                 cfg.num_samples, cfg.mode, cfg.length, job.num_shards, cfg.workers)
    return run_synthesize(job, ctx.cluster, progress=ctx.progress)
