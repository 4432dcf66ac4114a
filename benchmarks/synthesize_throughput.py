"""Throughput of synthetic data generation (the synthesize stage) on 1 and 2 Ray workers.

    python benchmarks/synthesize_throughput.py                 # ~3 min on a 2-core CPU
    python benchmarks/synthesize_throughput.py --samples 64 --length 64 --workers 1,2,4

What runs, on SmolLM2-135M-Instruct (``modelio.load_source("smollm2-135m")``, saved once):

1. baseline: this process, all cores, no Ray and no files: the stage's own worker
   generating every batch back to back (random start token, greedy steps, top-p sampling,
   the same seeds), which is what one process can do;
2. ``run_synthesize`` with N Ray actors (``--workers``; 1 and 2 by default), cores split
   between them: shards of ``--samples-per-shard`` sequences, Parquet shards, markers, the
   deduplicated output;
3. the baseline again; the two baselines bracket the Ray runs (the machine may be shared).

Throughput is generated sequences per second (and new tokens per second). Printed per
worker count: samples/s in the steady window (first shard start to last shard end) and
end to end (actors starting and loading the model included), each as a ratio to the
baseline. Every run generates the same text (shards are seeded by index), which is checked.
The last line is ``synthesize_speedup_2w: <value>``: steady samples/s of the largest worker
count over that of 1 worker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from recoup.cluster.config import ClusterConfig
from recoup.orchestrator.store import sha256_file
from recoup.stages.model import modelio
from recoup.stages.synthesize import (
    OUTPUT,
    SynthesizeConfig,
    SynthesizeJob,
    SynthesizeWorker,
    marker_file,
    run_synthesize,
)


def setup(work: Path) -> Path:
    model_dir = work / "dense"
    if not (model_dir / "config.json").is_file():
        model, tok = modelio.load_source("smollm2-135m", torch.float32, trust_remote_code=False,
                                         tiny=modelio.TinyLlamaConfig())
        modelio.save_model(model, tok, model_dir)
    return model_dir


def baseline(job: SynthesizeJob, cpus: int) -> dict[str, float]:
    """Every shard's batches generated in this process, nothing written."""
    torch.set_num_threads(cpus)
    t0 = time.perf_counter()
    worker = SynthesizeWorker(job)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = tokens = 0
    for shard in range(job.num_shards):
        rows = worker.generate_shard(shard)
        samples += len(rows)
        tokens += sum(r["tokens"] for r in rows)
    return {"load_s": load_s, "gen_s": time.perf_counter() - t0, "samples": samples,
            "tokens": tokens}


def ray_run(job: SynthesizeJob, workers: int, cluster: ClusterConfig) -> dict[str, float]:
    out = job.out_dir.with_name(f"synth-{workers}w")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    cfg = job.config.model_copy(update={"workers": workers})
    run = SynthesizeJob(model_dir=job.model_dir, model_dtype=job.model_dtype, out_dir=out,
                        config=cfg, device=job.device, key=job.key)
    t0 = time.perf_counter()
    m = run_synthesize(run, cluster, progress=False)
    wall_s = time.perf_counter() - t0
    markers = [json.loads(marker_file(out, s).read_text()) for s in range(job.num_shards)]
    window_s = max(x["finished"] for x in markers) - min(x["started"] for x in markers)
    return {"wall_s": wall_s, "window_s": window_s, "samples": m["generated"],
            "tokens": m["tokens"], "sha": sha256_file(out / OUTPUT)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=32, help="sequences to generate")
    p.add_argument("--length", type=int, default=48, help="new tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--samples-per-shard", type=int, default=8)
    p.add_argument("--workers", default="1,2", help="Ray worker counts to measure")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                   help="cores for the baseline and the local Ray (default: all)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="keep the saved model here between runs (default: a temp dir)")
    args = p.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory(prefix="recoup-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir = setup(work)
        cfg = SynthesizeConfig(num_samples=args.samples, length=args.length,
                               batch_size=args.batch_size,
                               samples_per_shard=args.samples_per_shard)
        job = SynthesizeJob(model_dir=model_dir, model_dtype="float32", out_dir=work / "synth",
                            config=cfg, device="cpu", key="bench")
        print(f"SmolLM2-135M: {args.samples} sequences of up to {args.length} new tokens, "
              f"batch {args.batch_size}, {job.num_shards} shards, {args.cpus} cores", flush=True)

        import ray

        from recoup.cluster.runtime import start_ray

        cluster = ClusterConfig(mode="ray", num_cpus=args.cpus)
        start_ray(cluster)
        try:
            bases = [baseline(job, args.cpus)]
            runs = {w: ray_run(job, w, cluster) for w in workers}
            bases.append(baseline(job, args.cpus))
        finally:
            ray.shutdown()

        gen_s = statistics.fmean(b["gen_s"] for b in bases)
        full_s = statistics.fmean(b["gen_s"] + b["load_s"] for b in bases)
        n = bases[0]["samples"]
        print("\nbaseline (1 process, no Ray, no files): "
              + ", ".join(f"{b['gen_s']:.1f} s" for b in bases)
              + f" -> {n / gen_s:.2f} samples/s, {bases[0]['tokens'] / gen_s:.1f} new tok/s")
        shas = {r["sha"] for r in runs.values()}
        assert len(shas) == 1, "worker counts generated different text"
        steady = {}
        for w, r in runs.items():
            steady[w] = r["samples"] / r["window_s"]
            print(f"synthesize, {w} Ray worker{'s' if w > 1 else ' '}: {steady[w]:.2f} samples/s "
                  f"({r['tokens'] / r['window_s']:.1f} new tok/s) steady, ratio "
                  f"{steady[w] / (n / gen_s):.3f}; end-to-end {r['wall_s']:.1f} s, ratio "
                  f"{full_s / r['wall_s']:.3f}")
        print("every worker count wrote the same synthetic.parquet (sha256 "
              f"{next(iter(shas))[:12]})")
        top = max(workers)
        print(f"synthesize_speedup_{top}w: {steady[top] / steady[min(workers)]:.3f}")


if __name__ == "__main__":
    main()
