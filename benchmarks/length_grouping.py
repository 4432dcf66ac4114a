"""Length-grouped batches against random ones: the same training, less padding.

A micro-batch is right-padded to its longest sample, and a data-parallel step waits for
its slowest rank, so with Alpaca's lengths (median ~110 tokens, cut at 256) a random batch
of 4 per rank computes about 1.7 tokens for every real one. ``train.engine.group_by_length``
sorts each window of 50 global batches of the sample stream by length and shuffles its
batches (:func:`recoup.cluster.train_state.grouped_window`). This script trains the same job twice
through the real loop (:func:`recoup.cluster.train.run_training`: Ray Train workers,
DeepSpeed ZeRO-2), once per order, on the same samples for the same steps, and prints for
each the share of computed tokens that are real (``real / (steps x world x micro x longest
of the slowest rank)``), the loop's tokens per second, and the ratio.

The model is SmolLM2-135M with the recipe's trainables (compensation on a quarter of the
heads, rank-32 adapters on every linear of every layer), its own tokenizer giving the
samples their real lengths; the loss is the cross-entropy on responses, so no teacher
pass precedes the loop (the padding, which is what differs, is the same for any loss).

    python benchmarks/length_grouping.py                 # ~6 minutes on 2 CPU cores
    python benchmarks/length_grouping.py --steps 32 --samples 512

The last line is ``length_grouping_speedup: <grouped tokens/s / random tokens/s>``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from recoup.cluster.config import ClusterConfig  # noqa: E402
from recoup.cluster.engine import EngineConfig  # noqa: E402
from recoup.cluster.train import run_training  # noqa: E402
from recoup.cluster.train_state import sample_indices  # noqa: E402
from recoup.stages.data import fit_samples  # noqa: E402
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
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--samples", type=int, default=400,
                   help="Alpaca samples read (those over --seq-len tokens are skipped)")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared/data/alpaca/train.jsonl")
    return p.parse_args()


def _job(args: argparse.Namespace, root: Path) -> TrainJob:
    """SmolLM2-135M saved as the 'degraded' model, a quarter of the heads with random
    directions, the recipe's adapters; samples encoded by its own tokenizer."""
    model, tok = modelio.load_source(modelio.SMOLLM2_ALIAS, torch.float32,
                                     trust_remote_code=False, tiny=modelio.TinyLlamaConfig())
    modelio.save_model(model, tok, root / "model")
    cfg = model.config
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    d_head = cfg.hidden_size // heads
    del model
    gen = torch.Generator().manual_seed(0)
    chosen = [(layer, h) for layer in range(layers) for h in range(heads)
              if (layer * heads + h) % 4 == 0]
    V = {hd: torch.linalg.qr(torch.randn(d_head, d_head, generator=gen))[0] for hd in chosen}
    # the data stage's rule: a sample longer than the cut is skipped, not cut
    samples = load_samples(AlpacaSourceConfig(path=args.data, num_samples=args.samples))
    fitting, _ = fit_samples(samples, tok, args.seq_len)
    encoded = [encode_sample(tok, s.prompt, s.response, args.seq_len) for s in fitting]
    encoded = [e for e in encoded if len(e.ids) > e.prompt_len]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return TrainJob(method=args.method, degraded_dir=root / "model", dense_dir=root / "model",
                    dtype="float32", samples=tuple(encoded), pad_id=int(pad),
                    loss=LossConfig(ce_weight=1.0, kl_weight=0.0).spec(), n_heads=heads,
                    lcc=LccConfig().spec(), chosen=tuple(chosen), V=V,
                    lora=LoraAdapterConfig(rank=32, alpha=32).spec(),
                    lora_layers=tuple(range(layers)))


def real_share(lengths: list[int], engine: EngineConfig, world: int, grouped: bool) -> float:
    """Real tokens over the tokens a step computes: every rank pads to its longest sample
    and the step lasts as long as its slowest rank."""
    real = computed = 0
    for g in range(engine.steps * engine.grad_accum):
        ranks = [sample_indices(len(lengths), seed=engine.seed, micro_batch=engine.micro_batch,
                                world_size=world, g=g, rank=r,
                                lengths=lengths if grouped else None) for r in range(world)]
        real += sum(lengths[i] for idx in ranks for i in idx)
        computed += world * engine.micro_batch * max(lengths[i] for idx in ranks for i in idx)
    return real / computed


def main() -> None:
    args = _args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="recoup-bench-") as tmp:
        root = Path(tmp)
        job = _job(args, root)
        lengths = [len(s.ids) for s in job.samples]
        print(f"model: SmolLM2-135M; method {args.method}; "
              f"{len(job.samples)} Alpaca samples (mean {sum(lengths) / len(lengths):.0f} "
              f"tokens, longest {max(lengths)}), {args.steps} steps of {args.workers} x "
              f"{args.micro_batch}", flush=True)
        for grouped in (False, True):
            name = "grouped" if grouped else "random"
            engine = EngineConfig(workers=args.workers, micro_batch=args.micro_batch,
                                  steps=args.steps, checkpoint_every=args.steps, lr=1e-3,
                                  group_by_length=grouped)
            out = run_training(make_task=build_task, task_spec=job, engine=engine,
                               cluster=ClusterConfig(mode="ray", num_cpus=args.workers),
                               device="cpu", out_dir=root / name, fingerprint=name,
                               progress=False)
            results[name] = {"real_share": real_share(lengths, engine, args.workers, grouped),
                             "tokens": out["session_tokens"], "seconds": out["session_seconds"],
                             "tokens_per_s": out["tokens_per_s"],
                             "final_loss": out["final_loss"]}
            print(f"{name:8s} real/computed tokens {results[name]['real_share']:.3f}, "
                  f"{out['tokens_per_s']:.1f} tokens/s ({out['session_tokens']} tokens in "
                  f"{out['session_seconds']:.1f} s)", flush=True)
    print(json.dumps(results, indent=2))
    speedup = results["grouped"]["tokens_per_s"] / results["random"]["tokens_per_s"]
    print(f"length_grouping_speedup: {speedup:.4f}")


if __name__ == "__main__":
    main()
