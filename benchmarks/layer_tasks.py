"""Wall time of the per-layer svd + probe tasks on 2 Ray workers vs the same work in one process.

    python benchmarks/layer_tasks.py                    # ~2 min on a 2-core CPU
    python benchmarks/layer_tasks.py --samples 2048 --workers 4

The activations are RANDOM, of SmolLM2-135M's shape (30 layers, 9 heads, d_head 64,
``--samples`` samples, the four collect views), written in the collect stage's Parquet
format; a few heads carry a planted contrastive signal so the probe has something to find.
Real activations would need the collect stage to run first; the work per layer (read one
layer's Parquet partition, SVD per head, fit one probe per head) depends only on the
shapes, not on the values, so random values time it faithfully.

Timed, in one run on one machine:

1. one process: every layer's svd task, then every layer's probe task, serially
   (``cluster.mode: inprocess``), torch limited to 1 thread per task as on the workers;
2. Ray with ``--workers`` CPUs, one task per layer, 1 CPU each: first a warm-up task per
   worker (starting a Ray worker process and importing torch takes seconds, once per
   cluster, not per stage), then the same svd and probe tasks.

3. the ceiling: a fixed pure-compute task (matrix products), run ``--workers`` times in one
   process and once per worker on Ray. Its ratio is the most any parallel run could gain on
   this machine at that moment; on a shared machine other processes take CPU time, so it
   can be well under ``--workers``.

1 and 2 alternate ``--repeats`` times so both see the same background load; the best time
of each is kept. The outputs of both are compared (they must be identical). The last line
is ``layer_tasks_speedup: <one-process seconds / Ray seconds>`` (above 1: Ray is faster).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from recoup.cluster.config import ClusterConfig
from recoup.cluster.tasks import map_layers, ray_session
from recoup.stages.lcc import activations
from recoup.stages.lcc.selectors import assemble_scores
from recoup.stages.model import modelio
from recoup.stages.prepare import CARD
from recoup.stages.select import SelectorConfig, score_layer_task
from recoup.stages.svd import svd_file, svd_layer_task

SMOLLM2 = {"layers": 30, "heads": 9, "d_head": 64}
PLANTED = ((3, 4), (17, 0), (29, 8))
"""(layer, head)s whose r+ / r- activations differ along a fixed direction."""
SIGNAL = 3.0


def write_card(prepare_dir: Path, layers: int, heads: int, d_head: int) -> None:
    card = modelio.ModelCard(
        model_type="llama", layers=layers, heads=heads, kv_heads=3, d_head=d_head,
        hidden=heads * d_head, intermediate=1536, vocab=49152, max_positions=8192,
        dtype="float32", parameters=134_515_008,
    )
    prepare_dir.mkdir(parents=True, exist_ok=True)
    (prepare_dir / CARD).write_text(json.dumps(card.to_json()))


def write_random_collect(root: Path, *, layers: int, heads: int, d_head: int, samples: int,
                         shards: int, seed: int) -> None:
    """Random activations in the collect stage's format, ``shards`` shards by sample."""
    g = torch.Generator().manual_seed(seed)
    ids = [f"s{i:06d}" for i in range(samples)]
    for layer in range(layers):
        dense_q = torch.randn(samples, heads, d_head, generator=g)  # (N, H, d)
        degraded_q = 0.8 * dense_q + 0.3 * torch.randn(samples, heads, d_head, generator=g)
        pos = torch.randn(samples, heads, d_head, generator=g)
        neg = torch.randn(samples, heads, d_head, generator=g)
        for pl, ph in PLANTED:
            if pl == layer and ph < heads:
                u = torch.nn.functional.normalize(torch.randn(d_head, generator=g), dim=0)
                pos[:, ph] += SIGNAL * u
                neg[:, ph] -= SIGNAL * u
        views = {"dense_q": dense_q, "dense_pos": pos, "dense_neg": neg,
                 "degraded_q": degraded_q}
        for shard in range(shards):
            rows = list(range(shard, samples, shards))
            acts = torch.cat([z[rows].reshape(len(rows), heads * d_head)  # (n, H * d)
                              for z in views.values()])
            activations.write_layer_shard(
                activations.shard_file(root, layer, shard),
                [ids[i] for _ in views for i in rows], [v for v in views for _ in rows],
                acts, "float32",
            )
    for shard in range(shards):
        activations.mark_shard_done(root, shard, {"samples": len(range(shard, samples, shards))})


def _warm(_: int) -> int:
    """A no-op task that makes a Ray worker import what the layer tasks import."""
    import recoup.stages.select  # noqa: F401

    return 0


CEILING_MATMULS = 1000
"""Products of (256, 256) matrices per ceiling task: a few seconds of one core."""


def _compute(n: int) -> float:
    """Fixed CPU work (n matrix products), its wall seconds."""
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for _ in range(n):
        a = torch.tanh(a @ a)
    return time.perf_counter() - t0


def ceiling(cluster: ClusterConfig, workers: int) -> float:
    """Wall seconds of ``workers`` fixed compute tasks on ``cluster``."""
    t0 = time.perf_counter()
    map_layers(_compute, [(CEILING_MATMULS,)] * workers, cluster, max_parallel=workers,
               desc="ceiling", progress=False)
    return time.perf_counter() - t0


def run_tasks(collect: Path, out: Path, shape: dict[str, int], cluster: ClusterConfig,
              workers: int | None) -> tuple[float, torch.Tensor]:
    """svd tasks then probe tasks for every layer; (wall seconds, scores (L, H))."""
    layers, heads, d_head = shape["layers"], shape["heads"], shape["d_head"]
    shards = tuple(sorted(activations.done_shards(collect)))
    sel = SelectorConfig(method="probe", top_count=len(PLANTED))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    map_layers(svd_layer_task,
               [(collect, out, layer, heads, d_head, shards, "float32") for layer in range(layers)],
               cluster, num_cpus_per_task=1.0, max_parallel=workers, desc="svd", progress=False)
    per_layer = map_layers(
        score_layer_task,
        [(collect, out, layer, heads, d_head, shards, sel.method, sel.params)
         for layer in range(layers)],
        cluster, num_cpus_per_task=1.0, max_parallel=workers, desc="probe", progress=False,
    )
    wall = time.perf_counter() - t0
    return wall, assemble_scores(dict(enumerate(per_layer)), layers).scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1024, help="samples N per view")
    p.add_argument("--workers", type=int, default=2, help="Ray CPUs / tasks in flight")
    p.add_argument("--shards", type=int, default=4, help="collect shards the samples span")
    p.add_argument("--repeats", type=int, default=2,
                   help="alternating timed runs per mode; the best of each is reported")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    shape = SMOLLM2
    print(f"random activations of SmolLM2-135M's shape: {shape['layers']} layers x "
          f"{shape['heads']} heads x d_head {shape['d_head']}, {args.samples} samples, "
          f"4 views, {args.shards} shards (float32)")
    with tempfile.TemporaryDirectory(prefix="recoup-layer-tasks-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_card(root / "prepare", **shape)
        write_random_collect(root / "collect", samples=args.samples, shards=args.shards,
                             seed=args.seed, **shape)
        print(f"wrote activations in {time.perf_counter() - t0:.1f} s")

        one = ClusterConfig(mode="inprocess")
        ray_cfg = ClusterConfig(mode="ray", num_cpus=args.workers)
        serial_t: list[float] = []
        ray_t: list[float] = []
        ceil_one: list[float] = []
        ceil_ray: list[float] = []
        with ray_session(ray_cfg):
            t0 = time.perf_counter()
            map_layers(_warm, [(i,) for i in range(args.workers)], ray_cfg,
                       max_parallel=args.workers, desc="warm-up", progress=False)
            print(f"started {args.workers} Ray workers in {time.perf_counter() - t0:.1f} s "
                  "(not counted: once per cluster, not per stage)")
            # Alternate the two modes so that both see the same background load.
            for rep in range(args.repeats):
                s_one, serial_scores = run_tasks(root / "collect", root / "one", shape, one,
                                                 None)
                s_ray, ray_scores = run_tasks(root / "collect", root / "ray", shape, ray_cfg,
                                              args.workers)
                serial_t.append(s_one)
                ray_t.append(s_ray)
                ceil_one.append(ceiling(one, args.workers))
                ceil_ray.append(ceiling(ray_cfg, args.workers))
                print(f"repeat {rep}: one process {s_one:6.2f} s, {args.workers} Ray workers "
                      f"{s_ray:6.2f} s ({shape['layers']} svd + {shape['layers']} probe tasks); "
                      f"fixed compute {ceil_one[-1]:.2f} s vs {ceil_ray[-1]:.2f} s")
        serial_s, ray_s = min(serial_t), min(ray_t)
        print(f"one process : {serial_s:7.2f} s  (best of {args.repeats})")
        print(f"Ray workers : {ray_s:7.2f} s  (best of {args.repeats}; {args.workers} workers, "
              "1 CPU each)")
        print(f"ceiling     : {min(ceil_one) / min(ceil_ray):7.3f} x  (the same fixed compute "
              f"in one process / on {args.workers} Ray workers: what this machine allowed)")
        same_files = all(
            svd_file(root / "one", layer).read_bytes() == svd_file(root / "ray", layer).read_bytes()
            for layer in range(shape["layers"])
        )
        same_scores = torch.equal(serial_scores, ray_scores)
        print(f"identical outputs: svd files {same_files}, probe scores {same_scores}")
        ranked = sorted(((float(serial_scores[lay, h]), (lay, h))
                         for lay in range(shape["layers"]) for h in range(shape["heads"])),
                        reverse=True)
        print(f"probe top heads: {[lh for _, lh in ranked[:len(PLANTED)]]} "
              f"(planted: {sorted(PLANTED)})")
        if not (same_files and same_scores):
            raise SystemExit("outputs differ between one process and Ray workers")
    print(f"layer_tasks_speedup: {serial_s / ray_s:.3f}")


if __name__ == "__main__":
    main()
