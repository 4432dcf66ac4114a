"""evaluate: WikiText-2 perplexity, KL to dense, and zero-shot accuracy of every model.

The models are the dense one (prepare), the degraded one (degrade) and, when ``export``
is in the pipeline, the recovered one. Three measurements each:

- perplexity on WikiText-2 test windows (:mod:`recoup.stages.scoring.wikitext`, the pruning
  papers' protocol; ``window_start`` moves the range past windows that tuning saw) and the
  mean token KL(dense || model) on the same windows, one model resident at a time: the
  dense one first, writing its float16 log-probs to disk for the others' KL. Memory is
  one model plus one batch of logits, the model spread over the task's GPUs when larger
  than one (:func:`recoup.stages.model.modelio.load_model_spread`);
- zero-shot multiple-choice accuracy (``acc``, ``acc_norm``) on the commonsense tasks,
  scored by lm-evaluation-harness (:mod:`recoup.stages.scoring.zeroshot`). Each model's
  documents are cut into ``zeroshot.shards`` shards that run as Ray tasks
  (:mod:`recoup.stages.scoring.zeroshot_worker` through
  :func:`recoup.cluster.tasks.map_layers`; serially in-process without Ray), each
  loading the model once.

GPUs: under Ray, the perplexity pass runs as one task and every zero-shot shard as one
task, each asking for the stage's GPUs (``cluster.stages.evaluate.gpus``, else
``cluster.stage_gpus``): those of one model, which it then sees alone. The stage's own
task holds none (``holds_gpus=False``): a task waiting on others keeps its GPUs, and on a
one-GPU machine its shards could never start.

The printed "gap closed" is :mod:`recoup.stages.scoring.gap`'s, the report's too.

Cache: every result is stored under ``RUN/.cache/evaluate/<model key>/``, where the model
key is the sha256 of the model's files as its stage manifest records them, and each file
name carries a hash of the settings it depends on. A re-run after a new recovery
therefore scores only the recovered model: dense and degraded come from the cache (the
dense model still runs over the WikiText windows when a new model needs its KL: its
log-probs are kept only while the stage runs). An entry failing its checksum is dropped
and recomputed (:mod:`recoup.stages.scoring.cache`). Zero-shot shard files are written by
the workers as they finish, so a killed evaluation resumes at the first missing shard. The
manifest metrics say what was computed and what was reused (``cache``); ``results.json``
holds only the results, which do not depend on the cache.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from recoup.orchestrator import store
from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.estimate import EstimateInputs, ModelShape, StageEstimate, gb, gpus_spread
from recoup.orchestrator.rundir import check_text_file, resolve_data_file
from recoup.orchestrator.stage import Metrics, StageContext, register_stage
from recoup.orchestrator.store import atomic_write_json
from recoup.stages.model import lm_metrics, modelio
from recoup.stages.prepare import CARD, MODEL_DIR
from recoup.stages.scoring import zeroshot
from recoup.stages.scoring.cache import read_checked, write_checked
from recoup.stages.scoring.footprint import logprobs_disk_bytes, working_parts
from recoup.stages.scoring.gap import metric_gap_closed
from recoup.stages.scoring.sparsity import linear_sparsity
from recoup.stages.scoring.wikitext import score_models_task, window_range
from recoup.stages.scoring.zeroshot import DocScore, TaskSpec
from recoup.stages.scoring.zeroshot_config import ZeroShotConfig, zeroshot_dtype
from recoup.stages.scoring.zeroshot_worker import ShardJob, zeroshot_shard

RESULTS = "results.json"
#: Table order: the references first, then what recovery produced.
MODEL_ORDER = ("dense", "degraded", "recovered")
#: model name -> the stage whose ``model/`` folder it is
MODEL_STAGES = {"dense": "prepare", "degraded": "degrade", "recovered": "export"}
CACHE_DIR = Path(".cache") / "evaluate"
#: the dense log-probs, in the staging folder while the WikiText scoring runs
DENSE_LOGPROBS = ".dense-logprobs.npy"
#: Bump when a cached result's meaning changes, to ignore older entries.
#: 3: KL against the stored float16 dense log-probs (was the dense logits, run beside)
WIKITEXT_CACHE_VERSION = 3
ZEROSHOT_CACHE_VERSION = 2
#: the driver's bar of zero-shot documents (recoup.cluster.progress)
ZEROSHOT_BAR = "evaluate:zero-shot"


class EvaluateConfig(StrictModel):
    wikitext: str = Field(
        "wikitext2/wiki.test.raw", description="WikiText-2 test file, relative to the data dir."
    )
    seq_len: int = Field(512, ge=8, description="Tokens per perplexity window.")
    window_start: int = Field(
        0, ge=0,
        description="First window evaluated, in the same non-overlapping cut of the test "
        "set: windows [window_start, window_start + max_windows) are scored for perplexity "
        "and KL. 0 is the papers' protocol; a later start scores windows that tuning (e.g. "
        "select's KL calibration on the first windows) never saw.",
    )
    max_windows: int | None = Field(
        16, ge=1,
        description="Windows evaluated (from window_start); unset: the rest of the test set.",
    )
    batch_size: int = Field(2, ge=1, description="Windows per forward pass.")
    zeroshot: ZeroShotConfig = Field(
        ZeroShotConfig(), description="Zero-shot accuracy on multiple-choice tasks."
    )


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


def data_sha(ctx: StageContext, name: str | None) -> str | None:
    """sha256 of a data file the stage reads: from the runner's digests (cached by size and
    mtime) or, for a stage called directly, hashed here. Cache keys carry it, so changed
    data is never answered from the cache."""
    if name is None:
        return None
    known = ctx.data_files.get(name)
    if known is not None:
        return known
    path = Path(name).expanduser()
    path = path if path.is_absolute() else ctx.data_dir() / path
    return store.sha256_file(path) if path.is_file() else "absent"


# --------------------------------------------------------------------------- zero-shot


def _zeroshot_dir(cache: Path, ref: ModelRef, spec: TaskSpec, limit: int | None,
                  data: dict[str, str | None] | None = None, dtype: str | None = None) -> Path:
    """``dtype``: a compute dtype other than the model's own (None: its own; such results
    keep the keys they had before the option existed)."""
    what = {"task": spec.model_dump(mode="json"), "limit": limit, "data": data,
            "lm_eval": zeroshot.lm_eval_version(), "version": ZEROSHOT_CACHE_VERSION}
    if dtype is not None:
        what["dtype"] = dtype
    key = _hash(what)
    return cache / ref.key / f"zeroshot-{spec.name}-{key}"


def run_zeroshot(ctx: StageContext, refs: Sequence[ModelRef], model_dtype: str, cache: Path,
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, int]]]:
    """Per model: ``{task: summary}``; and per model how many shard files were computed
    and how many came from the cache."""
    cfg: ZeroShotConfig = ctx.config.zeroshot
    dtype = zeroshot_dtype(cfg, model_dtype)
    other_dtype = dtype if dtype != model_dtype else None
    data_dir = ctx.data_dir()
    plan: dict[str, dict[str, list[Path]]] = {r.name: {} for r in refs}
    items: list[tuple[Any, ...]] = []
    counts = {r.name: {"computed": 0, "cached": 0} for r in refs}
    for spec in cfg.tasks:
        for name in (spec.path, spec.labels):
            if name is not None and (path := resolve_data_file(name, data_dir)) is not None:
                check_text_file(path, f"evaluate.zeroshot task {spec.name!r}")
    n_docs = {spec.name: len(zeroshot.load_docs(spec, data_dir)) for spec in cfg.tasks}
    for ref in refs:
        per_shard: list[list[ShardJob]] = [[] for _ in range(cfg.shards)]
        for spec in cfg.tasks:
            chosen = zeroshot.selected_indices(n_docs[spec.name], cfg.limit)
            folder = _zeroshot_dir(cache, ref, spec, cfg.limit, data={
                "path": data_sha(ctx, spec.path), "labels": data_sha(ctx, spec.labels)},
                dtype=other_dtype)
            files = plan[ref.name].setdefault(spec.name, [])
            for i in range(cfg.shards):
                out = folder / f"shard-{i:03d}-of-{cfg.shards:03d}.json"
                files.append(out)
                indices = tuple(zeroshot.shard_indices(chosen, i, cfg.shards))
                if read_checked(out) is not None:
                    counts[ref.name]["cached"] += 1
                elif indices:
                    per_shard[i].append(ShardJob(spec=spec, indices=indices, out=out))
                    counts[ref.name]["computed"] += 1
                else:  # more shards than documents: an empty shard
                    write_checked(out, [])
        items += [(ref.folder, dtype, ctx.device, data_dir, jobs, cfg.batch_size,
                   ctx.progress, ZEROSHOT_BAR) for jobs in per_shard if jobs]
    if items:
        from recoup.cluster import progress
        from recoup.cluster.tasks import device_task_resources, map_layers

        if ctx.progress:  # one bar of documents, fed by every shard task
            docs = sum(len(job.indices) for item in items for job in item[4])
            progress.open_shared(ZEROSHOT_BAR, total=docs, desc="zero-shot", unit="doc")

        ctx.log.info("zero-shot: %d shard tasks for %s", len(items),
                     ", ".join(r.name for r in refs if counts[r.name]["computed"]))
        map_layers(zeroshot_shard, items, ctx.cluster,
                   num_cpus_per_task=cfg.cpus_per_shard,
                   num_gpus_per_task=device_task_resources(ctx.cluster, "evaluate",
                                                           ctx.device)[1],
                   max_parallel=cfg.workers, desc="zero-shot", progress=False)
        progress.close_shared(ZEROSHOT_BAR)
    results: dict[str, dict[str, Any]] = {}
    for ref in refs:
        results[ref.name] = {}
        for task, files in plan[ref.name].items():
            scores = [DocScore.from_json(o) for f in files for o in read_checked(f) or []]
            results[ref.name][task] = zeroshot.summarize_task(scores)
    return results, counts


# --------------------------------------------------------------------------- wikitext


def run_wikitext(ctx: StageContext, refs: Sequence[ModelRef], card: modelio.ModelCard,
                 cache: Path) -> tuple[dict[str, dict[str, float]], dict[str, str], int]:
    """Perplexity and KL to dense of every model, computing only what the cache lacks, one
    model resident at a time (:func:`score_models_task`; each result is cached as soon
    as its model finishes). Returns the results, per model ``"cached"``/``"computed"``,
    and the window count."""
    cfg: EvaluateConfig = ctx.config
    dense_ref = next(r for r in refs if r.name == "dense")
    wkey = _hash({"wikitext": cfg.wikitext, "seq_len": cfg.seq_len,
                  "window_start": cfg.window_start, "max_windows": cfg.max_windows,
                  "data": data_sha(ctx, cfg.wikitext), "version": WIKITEXT_CACHE_VERSION})
    paths = {r.name: cache / r.key / f"wikitext-{wkey}-kl-{dense_ref.key[:16]}.json"
             for r in refs}
    cached = {r.name: read_checked(paths[r.name]) for r in refs}
    todo = [r for r in refs if cached[r.name] is None]
    state = {r.name: ("computed" if cached[r.name] is None else "cached") for r in refs}
    if todo:
        wikitext = resolve_data_file(cfg.wikitext, ctx.data_dir())
        assert wikitext is not None
        check_text_file(wikitext, "evaluate.wikitext")
        text = lm_metrics.read_wikitext(wikitext)
        ids = torch.tensor(modelio.load_tokenizer(dense_ref.folder)(text)["input_ids"])
        wins = window_range(ids, cfg.seq_len, cfg.window_start, cfg.max_windows)  # (W, seq_len)
        from recoup.cluster.tasks import device_task_resources, run_task

        reserve = sum(working_parts(card, batch_size=cfg.batch_size,
                                    seq_len=cfg.seq_len).values())
        # one task holding one model's GPUs (under Ray; a plain call in-process), the same
        # GPUs as each zero-shot shard: this stage's own task holds none
        cpus, gpus = device_task_resources(ctx.cluster, "evaluate", ctx.device)
        run_task(partial(
            score_models_task, {r.name: r.folder for r in refs}, [r.name for r in todo],
            "dense", card.dtype, ctx.device, wins, cfg.batch_size, ctx.out_dir / DENSE_LOGPROBS,
            {r.name: paths[r.name] for r in todo}, reserve, ctx.progress),
            ctx.cluster, num_cpus=cpus, num_gpus=gpus, desc="perplexity")
        cached = {r.name: read_checked(paths[r.name]) for r in refs}
        missing = [n for n, c in cached.items() if c is None]
        if missing:
            raise RuntimeError(f"the perplexity task wrote no result for {', '.join(missing)}")
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


def _gap(models: dict[str, dict[str, float]], metric: str) -> str:
    """The share of the gap closed on ``metric`` (:mod:`recoup.stages.scoring.gap`)."""
    share = metric_gap_closed(metric, *(models[k][metric] for k in MODEL_ORDER))
    return "—" if share is None else f"{share:.1%}"


def format_table(m: Metrics) -> str:
    """The table printed at the end of a run: one row per model."""
    models = m["models"]
    tasks = m.get("zeroshot_tasks", [])
    start = m.get("window_start", 0)
    head = (f"WikiText-2 ({m['windows']} windows x {m['seq_len']} tokens"
            + (f", from window {start}" if start else "") + ")")
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
        gap = (f"gap closed: log-perplexity {_gap(models, 'ppl')}, "
               f"KL {_gap(models, 'kl_to_dense')}")
        if tasks:
            avg = {k: v["zeroshot_avg"] for k, v in models.items()}
            gap += f", avg acc {_gap(avg, 'acc')}"
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


def evaluate_parts(shape: ModelShape, cfg: EvaluateConfig) -> dict[str, int]:
    """Device bytes of evaluate: one model's weights (the models run one at a time) and
    one batch's working set (:func:`recoup.stages.scoring.footprint.working_parts`)."""
    return {"one model (the models run one at a time)": shape.weights_bytes,
            **working_parts(shape.card, batch_size=cfg.batch_size, seq_len=cfg.seq_len)}


def estimate_evaluate(inp: EstimateInputs) -> StageEstimate:
    """Device: one model plus one batch (:func:`evaluate_parts`), the model spread over
    the task's GPUs when it does not fit one (:func:`gpus_spread`). Disk: the dense
    log-probs, held while the stage runs (:func:`footprint.logprobs_disk_bytes`)."""
    cfg: EvaluateConfig = inp.config
    shape, hw = inp.shape, inp.hardware
    _, gpus = inp.task_resources
    parts = evaluate_parts(shape, cfg)
    dev = sum(parts.values())
    need = gpus_spread(shape.weights_bytes, dev - shape.weights_bytes, shape.block_bytes,
                       hw.usable)
    disk = logprobs_disk_bytes(shape.card, seq_len=cfg.seq_len, window_start=cfg.window_start,
                               max_windows=cfg.max_windows)
    notes = [f"{3 if 'export' in inp.pipeline else 2} models scored in turn, one resident at "
             f"a time; the dense log-probs take {gb(disk)} of disk while the stage runs "
             "(float16, windows x seq_len x vocab; removed after)"]
    fits = need is not None and need <= hw.gpus_per_node
    if need is None:
        notes.append("a GPU cannot hold one decoder block beside a batch's working set")
    elif need > 1:
        notes.append(f"one model ({gb(shape.weights_bytes)}) is larger than one GPU: spread over "
                     f"{need} GPUs by accelerate's device_map (about "
                     f"{gb(shape.weights_bytes / need + dev - shape.weights_bytes)} each)"
                     + ("" if fits else f", more than a node's {hw.gpus_per_node}"))
    if need is not None and gpus < need and inp.device != "cpu":
        fits = False
        notes.append(f"set cluster.stages.evaluate.gpus={need} (each model task asks for "
                     f"{gpus:g})")
    if cfg.zeroshot.tasks:
        notes.append(f"zero-shot: {cfg.zeroshot.shards} shard tasks per model, each loading "
                     f"one model ({gb(shape.weights_bytes)}), spread like the above")
    return StageEstimate(stage=inp.stage, workers=1, device_bytes=dev,
                         host_bytes=shape.weights_bytes, disk_bytes=disk, gpus_config=gpus,
                         gpus_min=need, fits=fits, parts=parts, notes=tuple(notes))


# version 4: one model resident at a time; KL against the stored float16 dense log-probs
@register_stage(name="evaluate", version=4, requires=("prepare", "degrade"),
                optional=("export",), summarize=_summary, report=format_table,
                estimate=estimate_evaluate, holds_gpus=False)
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
        facts = read_checked(facts_path)
        if facts is None:
            facts = linear_sparsity(ref.folder)
            write_checked(facts_path, facts)
        models[ref.name]["linear_sparsity"] = facts["linear_sparsity"]
    report: dict[str, dict[str, Any]] = {r.name: {} for r in refs}

    if cfg.zeroshot.tasks:
        t0 = time.perf_counter()
        zs, counts = run_zeroshot(ctx, refs, card.dtype, cache)
        timing["zeroshot"] = time.perf_counter() - t0
        for name, tasks in zs.items():
            models[name]["zeroshot"] = tasks
            models[name]["zeroshot_avg"] = zeroshot.average_accuracy(tasks)
            models[name]["zeroshot_dtype"] = zeroshot_dtype(cfg.zeroshot, card.dtype)
            report[name]["zeroshot_shards"] = counts[name]

    t0 = time.perf_counter()
    wiki, wiki_state, n_windows = run_wikitext(ctx, refs, card, cache)
    timing["wikitext"] = time.perf_counter() - t0
    for name, res in wiki.items():
        models[name].update(res)
        report[name]["wikitext"] = wiki_state[name]

    results: Metrics = {
        "windows": n_windows, "window_start": cfg.window_start, "seq_len": cfg.seq_len,
        "models": models,
        "zeroshot_tasks": [t.name for t in cfg.zeroshot.tasks],
        "zeroshot_limit": cfg.zeroshot.limit,
    }
    if cfg.zeroshot.tasks:
        results["lm_eval"] = zeroshot.lm_eval_version()
    atomic_write_json(ctx.out_dir / RESULTS, results)
    return {**results, "cache": report, "model_keys": {r.name: r.key for r in refs},
            "timing_s": timing}
