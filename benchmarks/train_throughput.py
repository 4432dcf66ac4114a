"""Training throughput: DeepSpeed ZeRO on 2 Ray Train CPU workers vs a plain PyTorch loop.

Both train the same trainable parameters (compensation and/or LoRA, built by the same
:class:`recoup.stages.recovery.task.RecoveryTask`) on the same Alpaca samples in the same order,
with the same global batch per optimizer step, in one run of this script. Throughput is
tokens per second of the training loop itself (model loading, Ray and DeepSpeed start-up
excluded; both loops include their first step). The plain loop gets all CPUs as torch
threads, each DeepSpeed worker ``--cpus-per-worker`` of them.

    python benchmarks/train_throughput.py                 # small defaults, a few minutes
    python benchmarks/train_throughput.py --method lora --zero-stage 3 --steps 40

The last line is ``train_throughput_ratio: <DeepSpeed tokens/s / plain tokens/s>``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from recoup.cluster.config import ClusterConfig  # noqa: E402
from recoup.cluster.engine import EngineConfig, lr_factor  # noqa: E402
from recoup.cluster.train import run_training  # noqa: E402
from recoup.cluster.train_state import sample_indices  # noqa: E402
from recoup.stages.lcc.directions import svd_directions  # noqa: E402
from recoup.stages.model import modelio  # noqa: E402
from recoup.stages.recovery.batching import encode_sample  # noqa: E402
from recoup.stages.recovery.config import LccConfig, LoraAdapterConfig, LossConfig  # noqa: E402
from recoup.stages.recovery.job import TrainJob  # noqa: E402
from recoup.stages.recovery.task import build_task  # noqa: E402
from recoup.stages.text.datasources import AlpacaSourceConfig, load_samples  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="lcc+lora", choices=["lcc", "lora", "lcc+lora"])
    p.add_argument("--zero-stage", type=int, default=2, choices=[2, 3])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared/data/alpaca/train.jsonl")
    return p.parse_args()


def _job(args: argparse.Namespace, root: Path) -> TrainJob:
    """A tiny random Llama saved as the 'degraded' model, random V, a quarter of the heads."""
    tiny = modelio.TinyLlamaConfig(layers=args.layers, hidden=args.hidden, heads=args.heads,
                                   kv_heads=max(1, args.heads // 2),
                                   intermediate=2 * args.hidden)
    model, tok = modelio.build_tiny_llama(tiny, torch.float32)
    modelio.save_model(model, tok, root / "model")
    d_head = args.hidden // args.heads
    gen = torch.Generator().manual_seed(0)
    chosen = [(layer, h) for layer in range(args.layers) for h in range(args.heads)
              if (layer * args.heads + h) % 4 == 0]
    V = {hd: svd_directions(torch.randn(32, d_head, generator=gen))[0] for hd in chosen}
    samples = load_samples(AlpacaSourceConfig(path=args.data, num_samples=args.samples))
    encoded = [encode_sample(tok, s.prompt, s.response, args.seq_len) for s in samples]
    encoded = [e for e in encoded if len(e.ids) > e.prompt_len]
    return TrainJob(method=args.method, degraded_dir=root / "model", dense_dir=root / "model",
                    dtype="float32", samples=tuple(encoded), pad_id=int(tok.pad_token_id),
                    loss=LossConfig().spec(), n_heads=args.heads, lcc=LccConfig().spec(),
                    chosen=tuple(chosen), V=V, lora=LoraAdapterConfig(rank=8).spec(),
                    lora_layers=tuple(range(args.layers)))


def plain_loop(job: TrainJob, engine: EngineConfig, world: int) -> dict[str, float]:
    """The same steps in one process with torch AdamW: every step runs the micro-batches
    the ``world`` ranks would run, one after the other, and averages their gradients."""
    torch.manual_seed(engine.seed)
    task = build_task(job, torch.device("cpu"))
    params = [p for p in task.module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=engine.lr, betas=engine.betas,
                            weight_decay=engine.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
        s, warmup_steps=engine.warmup_steps, total_steps=engine.steps, schedule=engine.schedule))
    module = task.module
    tokens, losses = 0, []
    t0, cpu0 = time.perf_counter(), time.process_time()
    for step in range(engine.steps):
        step_losses = []
        for micro in range(engine.grad_accum):
            g = step * engine.grad_accum + micro
            for r in range(world):  # each rank's micro-batch as it is: the same padding
                idx = sample_indices(task.num_samples(), seed=engine.seed,
                                     micro_batch=engine.micro_batch, world_size=world, g=g,
                                     rank=r)
                batch = task.batch(idx, torch.device("cpu"))
                loss, _, n = task.loss(module, batch)
                (loss / (engine.grad_accum * world)).backward()
                step_losses.append(float(loss.detach()))
                tokens += n
        if engine.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, engine.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(sum(step_losses) / len(step_losses))  # as log.jsonl's loss
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"tokens": tokens, "seconds": elapsed, "cpu_seconds": cpu,
            "tokens_per_s": tokens / elapsed, "tokens_per_cpu_s": tokens / cpu,
            "final_loss": losses[-1]}


def main() -> None:
    args = _args()
    engine = EngineConfig(workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                          zero_stage=args.zero_stage, micro_batch=args.micro_batch,
                          steps=args.steps, checkpoint_every=args.steps, lr=1e-3)
    cpus = int(round(args.workers * args.cpus_per_worker))
    with tempfile.TemporaryDirectory(prefix="recoup-bench-") as tmp:
        root = Path(tmp)
        job = _job(args, root)
        print(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads; method "
              f"{args.method}; {len(job.samples)} samples, {args.steps} steps, global batch "
              f"{args.micro_batch * args.workers}", flush=True)
        # The plain loop first: after a Ray session the driver process runs torch several
        # times slower for a while (measured), which would flatter DeepSpeed.
        torch.set_num_threads(cpus)
        plain = plain_loop(job, engine, args.workers)
        ds = run_training(make_task=build_task, task_spec=job, engine=engine,
                          cluster=ClusterConfig(mode="ray", num_cpus=cpus), device="cpu",
                          out_dir=root / "train", fingerprint="bench", progress=False)
    ds_tps = float(ds["tokens_per_s"])
    report = {
        "deepspeed": {"workers": args.workers, "zero_stage": args.zero_stage,
                      "tokens": ds["session_tokens"], "seconds": ds["session_seconds"],
                      "cpu_seconds": ds["session_cpu_seconds"], "tokens_per_s": ds_tps,
                      "tokens_per_cpu_s": ds["session_tokens"] / ds["session_cpu_seconds"],
                      "final_loss": ds["final_loss"],
                      "trainable_params": ds["trainable_params"]},
        "plain": {"threads": cpus, **plain},
    }
    print(json.dumps(report, indent=2))
    print(f"deepspeed {ds_tps:.1f} tokens/s on {args.workers} workers (ZeRO-{args.zero_stage}), "
          f"plain torch {plain['tokens_per_s']:.1f} tokens/s on {cpus} threads; per CPU-second "
          f"{report['deepspeed']['tokens_per_cpu_s']:.1f} vs {plain['tokens_per_cpu_s']:.1f} "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"train_throughput_ratio: {ds_tps / plain['tokens_per_s']:.4f}")


if __name__ == "__main__":
    main()
