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
so a shard's text does not depend on which worker ran it or how many there were. A shard
is a Parquet file written atomically, then a marker with its sha256; the stage is
resumable, and a rerun recomputes only shards whose marker is missing, from another
config, or whose file no longer matches its checksum. At the end all shards are joined,
exact duplicates (after whitespace normalisation) and texts shorter than ``min_tokens``
are dropped, and ``synthetic.parquet`` (``id, prompt, response``) is written: the file
the ``synthetic`` data source reads.

Outputs::

    shards/shard-0003.parquet   id, prompt, response, tokens   (one shard)
    shards/shard-0003.json      marker: key, sha256, counts
    synthetic.parquet           id, prompt, response           (deduplicated, in id order)
    synthetic.json              counts and throughput
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field, model_validator

from recoup.cluster.pool import PoolConfig, run_shards, worker_device
from recoup.orchestrator import store
from recoup.orchestrator.stage import Metrics, StageContext, register_stage
from recoup.stages.model import modelio
from recoup.stages.prepare import CARD, MODEL_DIR
from recoup.stages.text.datasources import Sample
from recoup.stages.text.triplets import write_parquet

log = logging.getLogger("recoup.synthesize")

SHARDS_DIR = "shards"
OUTPUT = "synthetic.parquet"
INFO = "synthetic.json"
ID_PREFIX = "synthetic"
_USER_MARK = "\x00RECOUP_USER_TEXT\x00"
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

    @model_validator(mode="after")
    def _greedy_fits(self) -> SynthesizeConfig:
        budget = self.prompt_length if self.mode == "chat" else self.length
        if self.greedy_tokens >= budget:
            raise ValueError(f"synthesize.greedy_tokens={self.greedy_tokens} leaves nothing to "
                             f"sample in {budget} tokens")
        return self


# --------------------------------------------------------------------------- pure parts


def start_token_pool(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """Ids a sequence may start from: the model's vocabulary minus special and added tokens.

    Added tokens (``<|im_start|>``, ``<repo_name>``...) are control markers, not text; a
    sequence started from one imitates a file format instead of language.
    """
    banned = set(int(i) for i in tokenizer.all_special_ids)
    banned |= {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    pool = [i for i in range(min(vocab_size, len(tokenizer))) if i not in banned]
    if not pool:
        raise ValueError("the tokenizer has no ordinary tokens to start a sequence from")
    return torch.tensor(pool, dtype=torch.long)


def shard_seed(seed: int, shard: int) -> int:
    """One seed per shard, so a shard's text depends on (seed, shard) only."""
    digest = hashlib.sha256(f"{seed}:{shard}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def cut_at_stop(ids: Sequence[int], stop: set[int]) -> list[int]:
    """The tokens before the first stop token (all of them when none occurs)."""
    out: list[int] = []
    for t in ids:
        if t in stop:
            break
        out.append(int(t))
    return out


def normalized(text: str) -> str:
    """The text duplicates are judged by: whitespace runs collapsed, ends stripped."""
    return re.sub(r"\s+", " ", text).strip()


def deduplicate(rows: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """First occurrence (in the given order) of each normalised prompt + response."""
    seen: set[str] = set()
    kept: list[dict[str, Any]] = []
    dropped = 0
    for row in rows:
        key = normalized(row["prompt"]) + "\x00" + normalized(row["response"])
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        kept.append(dict(row))
    return kept, dropped


def stop_tokens(tokenizer: Any, generation_config: Any) -> set[int]:
    """Ids that end a sequence: the tokenizer's EOS and the model's generation EOS ids
    (SmolLM2-Instruct ends a turn with ``<|im_end|>``, listed in either)."""
    eos = getattr(generation_config, "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])]
    return {int(i) for i in ids if i is not None}


def chat_user_prefix(tokenizer: Any) -> str:
    """The rendered chat template up to where the user's message goes."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("synthesize.mode=chat needs a tokenizer with a chat template; this "
                         "model's tokenizer has none (use mode: text)")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _USER_MARK}],
                                             tokenize=False)
    if _USER_MARK not in rendered:
        raise ValueError("the chat template does not place the user's message verbatim")
    return str(rendered.split(_USER_MARK)[0])


class _GreedyFirst:
    """Logits processor: the first ``steps`` generated tokens are the argmax.

    Masking every other logit makes the sampler pick the argmax, so one ``generate`` call
    does the greedy steps and then samples (temperature and top-p keep the argmax).
    """

    def __init__(self, start_len: int, steps: int) -> None:
        self.start_len, self.steps = start_len, steps

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] - self.start_len >= self.steps:
            return scores
        keep = scores.argmax(dim=-1, keepdim=True)  # (B, 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, keep, scores.gather(-1, keep))


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """The decoding settings of one ``generate`` call."""

    max_new_tokens: int
    greedy_tokens: int
    temperature: float
    top_p: float


@torch.no_grad()
def generate(model: Any, ids: torch.Tensor, attention_mask: torch.Tensor, s: Sampling,
             stop: set[int], pad_id: int) -> list[list[int]]:
    """New tokens of each row of ``ids`` (B, T), left-padded, cut at the first stop token."""
    from transformers import LogitsProcessorList

    out = model.generate(
        input_ids=ids, attention_mask=attention_mask, do_sample=True,
        temperature=s.temperature, top_p=s.top_p, top_k=0, max_new_tokens=s.max_new_tokens,
        eos_token_id=sorted(stop), pad_token_id=pad_id,
        logits_processor=LogitsProcessorList([_GreedyFirst(ids.shape[1], s.greedy_tokens)]),
    )  # (B, T + new)
    return [cut_at_stop(row.tolist(), stop) for row in out[:, ids.shape[1]:]]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T_max) ids and attention mask, padded on the left so generation continues each."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, t - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[i, t - len(s):] = 1
    return ids, mask


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

    def shard_range(self, shard: int) -> range:
        per = self.config.samples_per_shard
        return range(shard * per, min((shard + 1) * per, self.config.num_samples))


def shard_file(root: Path, shard: int) -> Path:
    return root / SHARDS_DIR / f"shard-{shard:04d}.parquet"


def marker_file(root: Path, shard: int) -> Path:
    return root / SHARDS_DIR / f"shard-{shard:04d}.json"


def _shard_bytes(rows: Sequence[Mapping[str, Any]]) -> bytes:
    table = pa.Table.from_pylist([dict(r) for r in rows], schema=SHARD_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class SynthesizeWorker:
    """Loads the dense model once; generates shards of sequences."""

    def __init__(self, job: SynthesizeJob) -> None:
        self.job = job
        self.device = worker_device(job.config.num_gpus_per_worker, job.device)
        self.model = modelio.load_model(job.model_dir, modelio.DTYPES[job.model_dtype],
                                        self.device)
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

    def run_shard(self, shard: int) -> dict[str, Any]:
        job, cfg = self.job, self.job.config
        started = time.time()
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
        data = _shard_bytes(rows)
        store.atomic_write_bytes(shard_file(job.out_dir, shard), data)
        info = {"key": job.key, "shard": shard, "rows": len(rows),
                "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                "tokens": sum(r["tokens"] for r in rows),
                "started": started, "finished": time.time()}
        store.atomic_write_json(marker_file(job.out_dir, shard), info)
        return info


# --------------------------------------------------------------------------- the stage


def shard_key(cfg: SynthesizeConfig, *, device: str, upstream: str) -> str:
    """What a shard's text depends on: the generation settings and the device kind, not
    the pool's size, CPU split or retries."""
    payload = {
        "config": cfg.model_dump(mode="json", exclude=set(PoolConfig.model_fields)),
        "device": torch.device(worker_device(cfg.num_gpus_per_worker, device)).type,
        "upstream": upstream,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def reusable_shards(job: SynthesizeJob) -> set[int]:
    """Finished shards of this job whose file still matches its marker's checksum.

    Everything else in ``shards/`` (no marker: a killed writer; another key; a corrupted
    file; beyond the shard count) is deleted, so the folder holds this run's shards only.
    """
    root = job.out_dir
    keep: set[int] = set()
    for shard in range(job.num_shards):
        marker, path = marker_file(root, shard), shard_file(root, shard)
        try:
            info = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if info.get("key") != job.key or not path.is_file():
            continue
        if store.sha256_file(path) != info.get("sha256"):
            log.warning("synthesize: %s does not match its marker's sha256; regenerating it",
                        path)
            continue
        keep.add(shard)
    wanted = {p for s in keep for p in (marker_file(root, s), shard_file(root, s))}
    folder = root / SHARDS_DIR
    if folder.is_dir():
        for p in folder.iterdir():
            if p not in wanted:
                p.unlink()
    return keep


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


@register_stage(name="synthesize", version=1, requires=("prepare",), resumable=True,
                summarize=_summary)
def synthesize(ctx: StageContext) -> Metrics:
    cfg: SynthesizeConfig = ctx.config
    prepared = ctx.input("prepare")
    card = modelio.ModelCard.read(prepared / CARD)
    cfg = cfg.model_copy(update={"num_gpus_per_worker": cfg.gpus_on(ctx.run.cluster)})
    job = SynthesizeJob(
        model_dir=prepared / MODEL_DIR, model_dtype=card.dtype, out_dir=ctx.out_dir,
        config=cfg, device=ctx.run.run.device,
        key=shard_key(cfg, device=ctx.run.run.device,
                      upstream=store.read_manifest(prepared).fingerprint),
    )
    ctx.log.info("synthesize: %d %s sequences of up to %d tokens in %d shards on %d workers",
                 cfg.num_samples, cfg.mode, cfg.length, job.num_shards, cfg.workers)
    return run_synthesize(job, ctx.run.cluster, progress=ctx.progress)
