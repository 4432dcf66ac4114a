"""Throughput of activation collection against a plain batched forward pass, on SmolLM2-135M.

    python benchmarks/collect_throughput.py                  # ~4 min on a 2-core CPU
    python benchmarks/collect_throughput.py --samples 64 --workers 1,2,4

What runs, all in this one process and its Ray actors, on the same inputs:

1. setup (not timed): SmolLM2-135M-Instruct from ``modelio.load_source("smollm2-135m")``
   saved as the dense model, a 50% magnitude-pruned copy as the degraded one, ``--samples``
   Alpaca samples that fit ``--max-length`` tokens, and their MiniLM triplets;
2. baseline: this process, all cores; load both models, tokenize the four views of every
   sample, and run the decoder of the right model over exactly the batches collect forms
   (the same shards, the same longest-first batches, the same padding): no hooks, no output;
3. collect with N Ray actors (``--workers``), N = 1 and 2 by default: ``run_collect`` with the
   cores split between the actors, writing Parquet shards and markers;
4. the baseline again (the machine may be shared: the two baseline runs bracket the others
   and their mean is the reference).

Throughput = real (unpadded) tokens / seconds; every ratio is collect / baseline, so above
1 means collect is faster. Two ratios per worker count:

- ``steady``: from the first shard's start to the last shard's end (forward passes with
  hooks, tokenization, Parquet writes) vs the baseline's forward passes and tokenization;
- ``end-to-end``: the whole ``run_collect`` call (actor processes starting, importing torch
  and loading both models, then the shards) vs the baseline including its model loading.

With ``--rounds R`` steps 3-4 repeat R times and each ratio is the median over the rounds.
The last line is ``collect_throughput_ratio: <value>``: the smallest steady ratio over the
worker counts. Then the disk size: bytes on disk per 1,000 samples, measured (float32, and
float16 by rewriting the same shards), and the projection to Llama-13B (40 layers x 40 heads
x 128) and Llama-70B (80 x 64 x 128) from the measured bytes per stored value.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from recoup.cluster.config import ClusterConfig
from recoup.orchestrator.store import atomic_write_json
from recoup.stages import data as data_stage
from recoup.stages.collect import (
    VIEW_MODEL,
    CollectConfig,
    CollectJob,
    describe_bytes,
    run_collect,
    view_sequences,
)
from recoup.stages.compress.blockwise import degrade_blockwise
from recoup.stages.compress.methods import DegradeSpec
from recoup.stages.lcc import activations
from recoup.stages.model import capture, layout, modelio
from recoup.stages.text.datasources import AlpacaSourceConfig
from recoup.stages.text.triplets import (
    MiniLMEncoder,
    Triplet,
    build_triplets,
    read_parquet,
    write_parquet,
)

#: (layers, heads, d_head) of the models the disk size is projected to
PROJECTIONS = {"Llama-13B": (40, 40, 128), "Llama-70B": (80, 64, 128)}
PER_THOUSAND = 1000


def _data_dir() -> Path:
    env = os.environ.get("RECOUP_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def setup(work: Path, args: argparse.Namespace) -> tuple[CollectJob, modelio.ModelCard]:
    """Dense and degraded SmolLM2 folders and the triplets file in ``work``; the job."""
    dense_dir, degraded_dir = work / "dense", work / "degraded"
    card_path = work / "model_card.json"
    triplets_path = work / f"triplets-{args.samples}-{args.max_length}.parquet"
    if not (dense_dir.is_dir() and degraded_dir.is_dir() and card_path.is_file()):
        model, tokenizer = modelio.load_source(modelio.SMOLLM2_ALIAS, torch.float32,
                                               trust_remote_code=False,
                                               tiny=modelio.TinyLlamaConfig())
        params = sum(p.numel() for p in model.parameters())
        card = modelio.card_from_config(model.config, "float32", params)
        modelio.save_model(model, tokenizer, dense_dir)
        degrade_blockwise(model, None, DegradeSpec(method="magnitude", sparsity=0.5),
                          device=torch.device("cpu"), progress=False)
        modelio.save_model(model, tokenizer, degraded_dir)
        atomic_write_json(card_path, card.to_json())
        del model
    card = modelio.ModelCard.read(card_path)
    if not triplets_path.is_file():
        cfg = data_stage.DataConfig(
            source=AlpacaSourceConfig(path=Path("alpaca/train.jsonl"),
                                      num_samples=args.samples),
            max_length=args.max_length)
        tokenizer = modelio.load_tokenizer(dense_dir)
        samples, _ = data_stage.select_samples(cfg, tokenizer, _data_dir())
        write_parquet(build_triplets(samples, MiniLMEncoder()), triplets_path)
    job = CollectJob(
        dense_dir=dense_dir, degraded_dir=degraded_dir, model_dtype="float32",
        triplets_path=triplets_path, out_dir=work / "acts-out", num_samples=args.samples,
        samples_per_shard=args.samples_per_shard, max_length=args.max_length,
        batch_size=args.batch_size, act_dtype="float32", position="last_token",
        padding_side="right", device="cpu", num_gpus_per_worker=0.0, key="bench",
    )
    return job, card


@torch.no_grad()
def baseline(job: CollectJob, threads: int) -> dict[str, float]:
    """Plain batched forward passes over collect's exact batches, in this process."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    models = {"dense": modelio.load_model(job.dense_dir, torch.float32),
              "degraded": modelio.load_model(job.degraded_dir, torch.float32)}
    tokenizer = modelio.load_tokenizer(job.dense_dir)
    load_s = time.perf_counter() - t0
    rows = read_parquet(job.triplets_path, Triplet)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = 0
    t0 = time.perf_counter()
    for shard in range(job.num_shards):
        seqs = [view_sequences(tokenizer, t, job.max_length) for t in rows[job.shard_slice(shard)]]
        for name, model in models.items():
            flat = [s[v] for v in activations.VIEWS if VIEW_MODEL[v] == name for s in seqs]
            decoder = layout.decoder(model)
            for index in capture.plan_batches([len(s.ids) for s in flat], job.batch_size):
                batch = capture.pad_batch([flat[i] for i in index], pad_id=pad,
                                          padding_side=job.padding_side, position=job.position)
                decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, use_cache=False)
                tokens += batch.real_tokens
    forward_s = time.perf_counter() - t0
    del models
    return {"load_s": load_s, "forward_s": forward_s, "tokens": tokens}


def collect(job: CollectJob, card: modelio.ModelCard, workers: int,
            cluster: ClusterConfig) -> dict[str, float]:
    out = job.out_dir.with_name(f"acts-{workers}w")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    run = dataclasses.replace(job, out_dir=out)
    t0 = time.perf_counter()
    m = run_collect(run, CollectConfig(workers=workers), cluster, card=card, progress=False)
    wall_s = time.perf_counter() - t0
    markers = [activations_marker(out, s) for s in range(job.num_shards)]
    window_s = max(x["finished"] for x in markers) - min(x["started"] for x in markers)
    return {"wall_s": wall_s, "window_s": window_s, "tokens": m["tokens"], "out": out}


def activations_marker(root: Path, shard: int) -> dict:
    return json.loads(activations.marker_file(root, shard).read_text())


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def float16_copy(src: Path, dst: Path) -> None:
    """The same shards stored as float16, through the writer collect uses."""
    for path in sorted((src / activations.ACTS_DIR).rglob("*.parquet")):
        table = pq.read_table(path)
        width = table.column("act").type.list_size
        acts = pc.list_flatten(table.column("act")).to_numpy(zero_copy_only=False)
        rel = path.relative_to(src)
        activations.write_layer_shard(dst / rel, table.column("sample_id").to_pylist(),
                                      table.column("view").to_pylist(),
                                      torch.from_numpy(acts.copy()).view(-1, width), "float16")
    for path in (src / activations.SHARDS_DIR).glob("*.json"):
        (dst / activations.SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        (dst / activations.SHARDS_DIR / path.name).write_bytes(path.read_bytes())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=16, help="Alpaca samples (default 16)")
    p.add_argument("--max-length", type=int, default=256, help="tokens of prompt + response")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--samples-per-shard", type=int, default=4)
    p.add_argument("--workers", default="1,2", help="Ray worker counts to measure")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the collect runs; the ratio is the median over rounds")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                   help="cores for the baseline and the local Ray (default: all)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="keep models and triplets here between runs (default: a temp dir)")
    args = p.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory(prefix="recoup-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        job, card = setup(work, args)
        print(f"setup: SmolLM2-135M dense + 50% magnitude, {args.samples} Alpaca triplets "
              f"in {time.perf_counter() - t0:.0f} s; {job.num_shards} shards of "
              f"{args.samples_per_shard}, batch {args.batch_size}, {args.cpus} cores", flush=True)

        import ray  # only to start one local Ray for every measurement, and stop it

        from recoup.cluster.runtime import start_ray

        cluster = ClusterConfig(mode="ray", num_cpus=args.cpus)
        start_ray(cluster)
        try:
            # baseline, then per round: every worker count, then the baseline again, so each
            # round's collect runs are bracketed by two baseline runs (the machine may be shared)
            bases = [baseline(job, args.cpus)]
            rounds: list[dict[int, dict]] = []
            for _ in range(args.rounds):
                rounds.append({w: collect(job, card, w, cluster) for w in workers})
                bases.append(baseline(job, args.cpus))
        finally:
            ray.shutdown()

        tokens = bases[0]["tokens"]
        print(f"\ntokens per pass: {tokens} real, 4 views x {args.samples} samples")
        print("baseline forward passes: "
              + ", ".join(f"{b['forward_s']:.1f} s" for b in bases)
              + f" (+ model load {statistics.fmean(b['load_s'] for b in bases):.1f} s)")
        steady: dict[int, list[float]] = {w: [] for w in workers}
        for r, runs in enumerate(rounds):
            fwd = statistics.fmean(b["forward_s"] for b in bases[r:r + 2])
            full = statistics.fmean(b["forward_s"] + b["load_s"] for b in bases[r:r + 2])
            print(f"round {r + 1}: baseline {tokens / fwd:.1f} tok/s")
            for w, run in runs.items():
                assert run["tokens"] == tokens, (run["tokens"], tokens)
                steady[w].append(fwd / run["window_s"])
                print(f"  collect, {w} Ray worker{'s' if w > 1 else ' '}: "
                      f"{tokens / run['window_s']:.1f} tok/s steady (ratio {steady[w][-1]:.3f}); "
                      f"end-to-end {run['wall_s']:.1f} s (ratio {full / run['wall_s']:.3f})")
        ratio = {w: statistics.median(v) for w, v in steady.items()}
        for w in workers:
            print(f"collect_throughput_ratio_{w}w: {ratio[w]:.3f}")

        src = rounds[0][workers[0]]["out"]
        f16 = work / "acts-float16"
        float16_copy(src, f16)
        print()
        measured = {"float32": disk_bytes(src), "float16": disk_bytes(f16)}
        values = args.samples * len(activations.VIEWS) * card.layers * card.heads * card.d_head
        for dtype, size in measured.items():
            per_k = size / args.samples * PER_THOUSAND
            per_value = size / values
            line = (f"disk per 1000 samples, {dtype}: SmolLM2-135M {describe_bytes(per_k)} "
                    f"({per_value:.2f} B per value)")
            for name, (layers, heads, d_head) in PROJECTIONS.items():
                proj = per_value * layers * heads * d_head * len(activations.VIEWS) * PER_THOUSAND
                line += f"; {name} {describe_bytes(proj)}"
            print(line)
        print(f"collect_throughput_ratio: {min(ratio.values()):.3f}")


if __name__ == "__main__":
    main()
