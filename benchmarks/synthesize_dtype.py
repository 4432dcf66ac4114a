"""Synthetic text in bfloat16 against float32: generation speed, and how alike the text is.

    python benchmarks/synthesize_dtype.py                  # ~4 min on a 2-core CPU
    python benchmarks/synthesize_dtype.py --samples 64 --length 128

The ``synthesize`` stage writes the training text of the data-free recipes; on this CPU it
is the longest stage of ``configs/smollm2-recover-lcc.yaml``. ``synthesize.dtype:
bfloat16`` generates in bf16 (as a GPU does); this measures what that buys and costs, on
SmolLM2-135M-Instruct (``modelio.load_source("smollm2-135m")``, saved once as float32):

1. the stage's own worker (:class:`SynthesizeWorker`, the same start tokens and seeds as a
   shard) generates ``--samples`` sequences in this process, float32 then bfloat16, twice
   over (f32, bf16, f32, bf16) so that a shared machine's noise falls on both;
2. the float32 model scores both texts: mean negative log-likelihood per generated token
   (under float32, the teacher the training distils). bf16 text that the float32 model
   finds as likely as its own is as good a training text;
3. how many sequences came out token for token the same (sampling from the same seeds, the
   two diverge at the first token whose rounding changes the draw).

The last line is ``synthesize_bf16_speedup: <value>``: float32 generation time over
bfloat16's, each the mean of its two runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from synthesize_throughput import setup  # the same saved SmolLM2 (this folder is on sys.path)

from recoup.stages.synthesize import SynthesizeConfig, SynthesizeJob, SynthesizeWorker

Row = dict[str, Any]  # a shard row: id, prompt, response, tokens


def generate_all(worker: SynthesizeWorker) -> tuple[float, list[Row]]:
    """Every shard's rows, as the stage generates them, and the seconds it took."""
    t0 = time.perf_counter()
    rows = [r for shard in range(worker.job.num_shards) for r in worker.generate_shard(shard)]
    return time.perf_counter() - t0, rows


@torch.no_grad()
def nll_per_token(model: object, tokenizer: object, rows: list[Row]) -> float:
    """Mean NLL (nats) of each response's tokens given its prompt, under ``model``."""
    total = count = 0.0
    for row in rows:
        prompt, response = row["prompt"], row["response"]
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        if not p or not r:
            continue
        ids = torch.tensor([p + r])  # (1, P + R)
        logits = model(ids).logits[0, len(p) - 1:-1].float()  # type: ignore[operator]  # (R, V)
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, len(p):],
                                                         reduction="sum"))
        count += len(r)
    return total / max(count, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=32, help="sequences per run")
    p.add_argument("--length", type=int, default=128, help="new tokens per sequence")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="keep the saved model here between runs (default: a temp dir)")
    args = p.parse_args()
    torch.set_num_threads(args.cpus)

    with tempfile.TemporaryDirectory(prefix="recoup-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir = setup(work)
        workers = {}
        for dtype in ("float32", "bfloat16"):
            cfg = SynthesizeConfig(num_samples=args.samples, length=args.length,
                                   batch_size=args.batch_size, samples_per_shard=args.batch_size,
                                   dtype=dtype)
            job = SynthesizeJob(model_dir=model_dir, model_dtype="float32", out_dir=work,
                                config=cfg, device="cpu", key="bench")
            workers[dtype] = SynthesizeWorker(job)
        print(f"SmolLM2-135M: {args.samples} sequences of up to {args.length} new tokens, "
              f"batch {args.batch_size}, {args.cpus} threads", flush=True)

        seconds: dict[str, list[float]] = {d: [] for d in workers}
        texts: dict[str, list[Row]] = {}
        for _ in range(2):
            for dtype, worker in workers.items():
                s, rows = generate_all(worker)
                seconds[dtype].append(s)
                texts[dtype] = rows
                tok_s = sum(r["tokens"] for r in rows) / s
                print(f"  {dtype:8s} {s:6.1f} s, {tok_s:6.1f} new tok/s",
                      flush=True)

        scorer = workers["float32"]
        print("\n| dtype | generation s (2 runs) | new tokens | new tok/s "
              "| float32 NLL per token |")
        print("|---|---|---|---|---|")
        mean_s = {}
        for dtype, rows in texts.items():
            mean_s[dtype] = statistics.fmean(seconds[dtype])
            n = sum(r["tokens"] for r in rows)
            nll = nll_per_token(scorer.model, scorer.tokenizer, rows)
            print(f"| {dtype} | {' / '.join(f'{x:.1f}' for x in seconds[dtype])} | {n} | "
                  f"{n / mean_s[dtype]:.1f} | {nll:.3f} |")
        pairs = zip(texts["float32"], texts["bfloat16"], strict=True)
        same = sum(a["response"] == b["response"] for a, b in pairs)
        print(f"\nsequences identical in both dtypes: {same} of {len(texts['float32'])}")
        print(f"synthesize_bf16_speedup: {mean_s['float32'] / mean_s['bfloat16']:.3f}")


if __name__ == "__main__":
    main()
