"""evaluate: WikiText-2 perplexity, KL to dense, and zero-shot accuracy of every model.

The models are the dense one (prepare), the degraded one (degrade) and, when ``export``
is in the pipeline, the recovered one. Three measurements each:

- perplexity on WikiText-2 test windows (:mod:`recoup.stages.model.lm_metrics`, the pruning
  papers' protocol) and the mean token KL(dense || model) on the same windows. The models
  run window by window beside the dense one, so the dense logits the KL needs are never
  stored: memory is two models plus one batch of logits;
- zero-shot multiple-choice accuracy (``acc``, ``acc_norm``) on the commonsense tasks,
  scored by lm-evaluation-harness (:mod:`recoup.stages.scoring.zeroshot`). Each model's documents
  are cut into ``zeroshot.shards`` shards that run as Ray tasks
  (:func:`recoup.cluster.tasks.map_layers`; serially in-process without Ray), each
  loading the model once.

Cache: every result is stored under ``RUN/.cache/evaluate/<model key>/``, where the model
key is the sha256 of the model's files as its stage manifest records them, and each file
name carries a hash of the settings it depends on. A re-run after a new recovery
therefore scores only the recovered model: dense and degraded come from the cache (the
dense model still runs over the WikiText windows when a new model needs its KL, because
its logits are never stored). Zero-shot shard files are written by the workers as they
finish, so a killed evaluation resumes at the first missing shard. The manifest metrics
say what was computed and what was reused (``cache``); ``results.json`` holds only the
results, which do not depend on the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from tqdm.auto import tqdm

from recoup.orchestrator import store
from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.stage import Metrics, StageContext, register_stage
from recoup.orchestrator.store import atomic_write_json
from recoup.stages.model import lm_metrics, modelio
from recoup.stages.prepare import CARD, MODEL_DIR
from recoup.stages.scoring import zeroshot
from recoup.stages.scoring.zeroshot import DEFAULT_TASKS, DocScore, TaskSpec

RESULTS = "results.json"
#: Table order: the references first, then what recovery produced.
MODEL_ORDER = ("dense", "degraded", "recovered")
#: model name -> the stage whose ``model/`` folder it is
MODEL_STAGES = {"dense": "prepare", "degraded": "degrade", "recovered": "export"}
CACHE_DIR = Path(".cache") / "evaluate"
#: Bump when a cached result's meaning changes, to ignore older entries.
WIKITEXT_CACHE_VERSION = 1
ZEROSHOT_CACHE_VERSION = 1


class ZeroShotConfig(StrictModel):
    """Zero-shot multiple-choice tasks, scored by lm-evaluation-harness."""

    tasks: tuple[TaskSpec, ...] = Field(
        DEFAULT_TASKS,
        description="Tasks (name, format, path[, labels]); default: piqa, arc_easy, "
        "arc_challenge, boolq, openbookqa from the data dir. Empty: no zero-shot evaluation.",
    )
    limit: int | None = Field(
        None, ge=1,
        description="Score the first this many documents of each task (lm-eval's --limit), "
        "for quick CPU runs; unset: every document, as the papers report.",
    )
    batch_size: int = Field(
        16, ge=1, description="Requests (context + one answer choice) per forward pass."
    )
    shards: int = Field(
        2, ge=1,
        description="Pieces each model's documents are split into: one Ray task each (it "
        "loads the model once), and the unit of resume. Results do not depend on it.",
    )
    cpus_per_shard: float = Field(
        1.0, gt=0, description="CPUs each shard task asks Ray for; also its torch threads."
    )
    workers: int | None = Field(
        None, ge=1,
        description="Most shard tasks in flight at once (each holds one model in memory); "
        "unset: all. No effect with cluster.mode=inprocess.",
    )


class EvaluateConfig(StrictModel):
    wikitext: str = Field(
        "wikitext2/wiki.test.raw", description="WikiText-2 test file, relative to the data dir."
    )
    seq_len: int = Field(512, ge=8, description="Tokens per perplexity window.")
    max_windows: int | None = Field(
        16, ge=1, description="Windows evaluated (from the start); unset: the whole test set."
    )
    batch_size: int = Field(2, ge=1, description="Windows per forward pass.")
    zeroshot: ZeroShotConfig = Field(
        ZeroShotConfig(), description="Zero-shot accuracy on multiple-choice tasks."
    )


# --------------------------------------------------------------------------- the math


def evaluate_models(models: dict[str, Any], dense: Any, ids: torch.Tensor, batch_size: int,
                    device: torch.device, progress: bool) -> dict[str, dict[str, float]]:
    """Perplexity of each model and mean token KL(dense || model) on windows ``ids`` (W, T)."""
    nll = dict.fromkeys(models, 0.0)
    kl = dict.fromkeys(models, 0.0)
    n_pred = n_kl = 0
    bar = tqdm(range(0, ids.shape[0], batch_size), desc="evaluate", disable=not progress,
               unit="batch")
    with torch.inference_mode():
        for start in bar:
            batch = ids[start:start + batch_size].to(device)  # (B, T)
            ref = dense(batch).logits
            for name, model in models.items():
                logits = ref if model is dense else model(batch).logits
                nll[name] += float(lm_metrics.token_nll(logits, batch).double().sum())
                kl[name] += float(lm_metrics.token_kl(ref, logits).double().sum())
            n_pred += batch.shape[0] * (batch.shape[1] - 1)
            n_kl += batch.numel()
    return {
        name: {"ppl": lm_metrics.perplexity(nll[name], n_pred), "kl_to_dense": kl[name] / n_kl}
        for name in models
    }


def gap_closed(models: dict[str, dict[str, float]], metric: str) -> float:
    """Fraction of the dense-vs-degraded gap that recovery closed (1 = back to dense)."""
    dense, degraded = models["dense"][metric], models["degraded"][metric]
    if degraded == dense:
        return 0.0
    return (degraded - models["recovered"][metric]) / (degraded - dense)


# --------------------------------------------------------------------------- models, cache


@dataclass(frozen=True, kw_only=True)
class ModelRef:
    """A model to evaluate: its folder and the key its cached results are stored under."""

    name: str
    folder: Path
    key: str


def model_key(stage_dir: Path) -> str:
    """sha256 over the model files' checksums recorded in the stage's manifest: the same
    weights, config and tokenizer give the same key, whichever run or stage wrote them."""
    manifest = store.read_manifest(stage_dir)
    prefix = MODEL_DIR + "/"
    files = {k[len(prefix):]: v.sha256 for k, v in manifest.outputs.items()
             if k.startswith(prefix)}
    if not files:
        raise ValueError(f"{stage_dir}: its manifest lists no files under {MODEL_DIR}/")
    return _hash(files, n=64)


def _hash(obj: Any, n: int = 16) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _read_json(path: Path) -> Any | None:
    """A cached result, or None when absent (a torn file cannot exist: writes are atomic)."""
    return json.loads(path.read_text()) if path.is_file() else None


def linear_sparsity(folder: Path) -> dict[str, float]:
    """Fraction of exact zeros in the decoder blocks' linear weights (the matrices recoup
    degrades: 2-D tensors under ``model.layers.``), read from the safetensors files."""
    from safetensors import safe_open

    zeros = total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if ".layers." not in name or len(f.get_slice(name).get_shape()) != 2:
                    continue
                w = f.get_tensor(name)
                zeros += int((w == 0).sum())
                total += w.numel()
    if total == 0:
        raise ValueError(f"{folder}: no decoder linear weights found in its safetensors files")
    return {"linear_sparsity": zeros / total, "linear_params": total}


# --------------------------------------------------------------------------- zero-shot


@dataclass(frozen=True, kw_only=True)
class ShardJob:
    """One task's share of documents for one model; the worker writes ``out``."""

    spec: TaskSpec
    indices: tuple[int, ...]
    out: Path


@contextmanager
def _quiet_bars(progress: bool):  # noqa: ANN202 - a context manager
    """lm-eval draws its own tqdm bars; ``TQDM_DISABLE`` silences them when asked."""
    if progress:
        yield
        return
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


def zeroshot_shard(model_dir: Path, dtype: str, device: str, data_dir: Path,
                   jobs: Sequence[ShardJob], batch_size: int, progress: bool) -> int:
    """Load one model and score each job's documents with lm-eval; runs as a Ray task.

    Each job's per-document scores are written to ``job.out`` atomically as soon as they
    exist, so a killed evaluation keeps what finished. Returns the documents scored.
    """
    with _quiet_bars(progress):
        model = modelio.load_model(model_dir, modelio.DTYPES[dtype], device)
        tokenizer = modelio.load_tokenizer(model_dir)
        lm = zeroshot.make_lm(model, tokenizer, batch_size)
        scored = 0
        for job in jobs:
            docs = zeroshot.load_docs(job.spec, data_dir)
            scores = zeroshot.score_task(lm, job.spec, docs, job.indices, data_dir)
            atomic_write_json(job.out, [s.to_json() for s in scores])
            scored += len(scores)
    return scored


def _zeroshot_dir(cache: Path, ref: ModelRef, spec: TaskSpec, limit: int | None) -> Path:
    key = _hash({"task": spec.model_dump(mode="json"), "limit": limit,
                 "lm_eval": zeroshot.lm_eval_version(), "version": ZEROSHOT_CACHE_VERSION})
    return cache / ref.key / f"zeroshot-{spec.name}-{key}"


def run_zeroshot(ctx: StageContext, refs: Sequence[ModelRef], dtype: str, cache: Path,
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, int]]]:
    """Per model: ``{task: summary}``; and per model how many shard files were computed
    and how many came from the cache."""
    cfg: ZeroShotConfig = ctx.config.zeroshot
    data_dir = ctx.run.run.resolved_data_dir()
    plan: dict[str, dict[str, list[Path]]] = {r.name: {} for r in refs}
    items: list[tuple[Any, ...]] = []
    counts = {r.name: {"computed": 0, "cached": 0} for r in refs}
    n_docs = {spec.name: len(zeroshot.load_docs(spec, data_dir)) for spec in cfg.tasks}
    for ref in refs:
        per_shard: list[list[ShardJob]] = [[] for _ in range(cfg.shards)]
        for spec in cfg.tasks:
            chosen = zeroshot.selected_indices(n_docs[spec.name], cfg.limit)
            folder = _zeroshot_dir(cache, ref, spec, cfg.limit)
            files = plan[ref.name].setdefault(spec.name, [])
            for i in range(cfg.shards):
                out = folder / f"shard-{i:03d}-of-{cfg.shards:03d}.json"
                files.append(out)
                indices = tuple(zeroshot.shard_indices(chosen, i, cfg.shards))
                if out.is_file():
                    counts[ref.name]["cached"] += 1
                elif indices:
                    per_shard[i].append(ShardJob(spec=spec, indices=indices, out=out))
                    counts[ref.name]["computed"] += 1
                else:  # more shards than documents: an empty shard
                    atomic_write_json(out, [])
        items += [(ref.folder, dtype, ctx.run.run.device, data_dir, jobs, cfg.batch_size,
                   ctx.progress) for jobs in per_shard if jobs]
    if items:
        from recoup.cluster.tasks import map_layers

        ctx.log.info("zero-shot: %d shard tasks for %s", len(items),
                     ", ".join(r.name for r in refs if counts[r.name]["computed"]))
        map_layers(zeroshot_shard, items, ctx.run.cluster,
                   num_cpus_per_task=cfg.cpus_per_shard, max_parallel=cfg.workers,
                   desc="zero-shot", progress=ctx.progress)
    results: dict[str, dict[str, Any]] = {}
    for ref in refs:
        results[ref.name] = {}
        for task, files in plan[ref.name].items():
            scores = [DocScore.from_json(o) for f in files for o in _read_json(f) or []]
            results[ref.name][task] = zeroshot.summarize_task(scores)
    return results, counts


# --------------------------------------------------------------------------- wikitext


def run_wikitext(ctx: StageContext, refs: Sequence[ModelRef], dtype: str, cache: Path,
                 ) -> tuple[dict[str, dict[str, float]], dict[str, str], int]:
    """Perplexity and KL to dense of every model, computing only what the cache lacks.
    Returns the results, per model ``"cached"``/``"computed"``, and the window count."""
    cfg: EvaluateConfig = ctx.config
    dense_ref = next(r for r in refs if r.name == "dense")
    wkey = _hash({"wikitext": cfg.wikitext, "seq_len": cfg.seq_len,
                  "max_windows": cfg.max_windows, "version": WIKITEXT_CACHE_VERSION})
    paths = {r.name: cache / r.key / f"wikitext-{wkey}-kl-{dense_ref.key[:16]}.json"
             for r in refs}
    cached = {r.name: _read_json(paths[r.name]) for r in refs}
    todo = [r for r in refs if cached[r.name] is None]
    state = {r.name: ("computed" if cached[r.name] is None else "cached") for r in refs}
    if todo:
        device = torch.device(ctx.run.run.device)
        torch_dtype = modelio.DTYPES[dtype]
        text = lm_metrics.read_wikitext(ctx.run.run.resolved_data_dir() / cfg.wikitext)
        tokenizer = modelio.load_tokenizer(dense_ref.folder)
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        wins = lm_metrics.windows(ids, cfg.seq_len, cfg.max_windows)  # (W, seq_len)
        dense = modelio.load_model(dense_ref.folder, torch_dtype, str(device))
        models = {r.name: dense if r is dense_ref
                  else modelio.load_model(r.folder, torch_dtype, str(device)) for r in todo}
        fresh = evaluate_models(models, dense, wins, cfg.batch_size, device, ctx.progress)
        for name, res in fresh.items():
            cached[name] = {**res, "windows": int(wins.shape[0])}
            atomic_write_json(paths[name], cached[name])
    windows = int(cached["dense"]["windows"])
    return ({n: {"ppl": c["ppl"], "kl_to_dense": c["kl_to_dense"]} for n, c in cached.items()},
            state, windows)


# --------------------------------------------------------------------------- the stage


def _model_refs(ctx: StageContext) -> list[ModelRef]:
    refs = []
    for name, stage in MODEL_STAGES.items():
        if stage in ctx.inputs:
            folder = ctx.input(stage)
            refs.append(ModelRef(name=name, folder=folder / MODEL_DIR, key=model_key(folder)))
    return refs


def _sorted_models(names: Sequence[str]) -> list[str]:
    return sorted(names, key=lambda k: (MODEL_ORDER.index(k) if k in MODEL_ORDER else 99, k))


def format_table(m: Metrics) -> str:
    """The table printed at the end of a run: one row per model."""
    models = m["models"]
    tasks = m.get("zeroshot_tasks", [])
    head = f"WikiText-2 ({m['windows']} windows x {m['seq_len']} tokens)"
    if tasks:
        limit = m.get("zeroshot_limit")
        head += (f"; zero-shot acc (lm-eval, "
                 f"{'all documents' if limit is None else f'first {limit} per task'})")
    cols = [("perplexity", 12), ("KL to dense", 12)]
    if tasks:
        cols += [(t, max(len(t), 6)) for t in tasks] + [("avg acc", 8)]
    header = f"{'model':<12} " + " ".join(f"{c:>{w}}" for c, w in cols)
    lines = [header, "-" * len(header)]
    for name in _sorted_models(models):
        r = models[name]
        cells = [f"{r['ppl']:>12.3f}", f"{r['kl_to_dense']:>12.4f}"]
        for t, w in cols[2:-1] if tasks else []:
            cells.append(f"{r['zeroshot'][t]['acc']:>{w}.3f}")
        if tasks:
            cells.append(f"{r['zeroshot_avg']['acc']:>8.3f}")
        lines.append(f"{name:<12} " + " ".join(cells))
    if "recovered" in models:
        lines.append("")
        gap = (f"gap closed: perplexity {gap_closed(models, 'ppl'):.1%}, "
               f"KL {gap_closed(models, 'kl_to_dense'):.1%}")
        if tasks:
            avg = {k: v["zeroshot_avg"] for k, v in models.items()}
            gap += f", avg acc {gap_closed(avg, 'acc'):.1%}"
        lines.append(gap)
    return head + "\n" + "\n".join(lines)


def _summary(m: Metrics) -> str:
    parts = []
    for k in _sorted_models(m["models"]):
        v = m["models"][k]
        text = f"{k} ppl {v['ppl']:.2f}"
        if v.get("zeroshot_avg"):
            text += f" acc {v['zeroshot_avg']['acc']:.3f}"
        parts.append(text)
    return ", ".join(parts)


@register_stage(name="evaluate", version=2, requires=("prepare", "degrade"),
                optional=("export",), summarize=_summary, report=format_table)
def evaluate(ctx: StageContext) -> Metrics:
    cfg: EvaluateConfig = ctx.config
    prepared = ctx.input("prepare")
    card = modelio.ModelCard.read(prepared / CARD)
    if cfg.seq_len > card.max_positions:
        raise ValueError(
            f"evaluate.seq_len={cfg.seq_len} exceeds the model's {card.max_positions} positions"
        )
    cache = ctx.run_dir / CACHE_DIR
    refs = _model_refs(ctx)
    timing: dict[str, float] = {}
    models: dict[str, dict[str, Any]] = {r.name: {} for r in refs}
    for ref in refs:
        facts_path = cache / ref.key / "model.json"
        facts = _read_json(facts_path)
        if facts is None:
            facts = linear_sparsity(ref.folder)
            atomic_write_json(facts_path, facts)
        models[ref.name]["linear_sparsity"] = facts["linear_sparsity"]
    report: dict[str, dict[str, Any]] = {r.name: {} for r in refs}

    if cfg.zeroshot.tasks:
        t0 = time.perf_counter()
        zs, counts = run_zeroshot(ctx, refs, card.dtype, cache)
        timing["zeroshot"] = time.perf_counter() - t0
        for name, tasks in zs.items():
            models[name]["zeroshot"] = tasks
            models[name]["zeroshot_avg"] = zeroshot.average_accuracy(tasks)
            report[name]["zeroshot_shards"] = counts[name]

    t0 = time.perf_counter()
    wiki, wiki_state, n_windows = run_wikitext(ctx, refs, card.dtype, cache)
    timing["wikitext"] = time.perf_counter() - t0
    for name, res in wiki.items():
        models[name].update(res)
        report[name]["wikitext"] = wiki_state[name]

    results: Metrics = {
        "windows": n_windows, "seq_len": cfg.seq_len, "models": models,
        "zeroshot_tasks": [t.name for t in cfg.zeroshot.tasks],
        "zeroshot_limit": cfg.zeroshot.limit,
    }
    if cfg.zeroshot.tasks:
        results["lm_eval"] = zeroshot.lm_eval_version()
    atomic_write_json(ctx.out_dir / RESULTS, results)
    return {**results, "cache": report, "model_keys": {r.name: r.key for r in refs},
            "timing_s": timing}
