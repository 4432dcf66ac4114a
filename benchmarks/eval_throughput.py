"""Zero-shot scoring throughput: evaluate's path against a plain batched forward pass.

    python benchmarks/eval_throughput.py [--model smollm2|tiny] [--docs 16] [--batch-size 16]

One run measures, on the same model and the same token sequences (those lm-eval feeds the
model for the first ``--docs`` documents of each task: context + continuation, last token
dropped):

- *plain forward*: the sequences sorted by length, right-padded, ``--batch-size`` per
  ``model(ids).logits`` call; nothing else (no tokenising, no scoring);
- *evaluate's zero-shot path*: :func:`recoup.stages.scoring.zeroshot.score_task` with the
  LM that evaluate uses, from the documents to per-document scores (lm-eval builds the
  task and its requests, tokenises, scores, computes acc);
- *lm-eval's own HFLM loop* (the path before shared-context scoring), for reference.

Throughput is tokens of those sequences per second of wall time. The last line is
``eval_throughput_ratio: X`` = evaluate's path / plain forward (goal: >= 0.7; above 1 is
possible, since each document's context runs once, not once per answer choice). The
scores of evaluate's path and lm-eval's loop are compared too (max |delta ll|, acc equal).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's bars; read when tqdm is imported

from recoup.stages.model import modelio
from recoup.stages.scoring import zeroshot
from recoup.stages.scoring.zeroshot import DEFAULT_TASKS, DocScore, TaskSpec

TASKS = ("arc_easy", "piqa", "boolq")
"""Short contexts with 4 choices, two long choices, one long passage with 1-token answers."""


def _data_dir() -> Path:
    env = os.environ.get("RECOUP_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def _sequences(model: Any, tok: Any, spec: TaskSpec, docs: list, indices: list[int],
               data_dir: Path) -> list[list[int]]:
    """The token sequences lm-eval's HFLM feeds the model for these documents."""
    lm = zeroshot.make_lm(model, tok, 1, shared_context=False)
    seen: list[list[int]] = []

    def record(requests, disable_tqdm=False, override_bs=None):  # noqa: ANN001, ANN202
        for _, ctx, cont in requests:
            seen.append((ctx + cont)[-(lm.max_length + 1):][:-1])
        return [(0.0, False)] * len(requests)

    lm._loglikelihood_tokens = record
    zeroshot.score_task(lm, spec, docs, indices, data_dir)
    return seen


def plain_forward(model: Any, seqs: list[list[int]], batch_size: int) -> float:
    """Seconds for ``model(ids).logits`` over all sequences, sorted, right-padded."""
    order = sorted(seqs, key=len, reverse=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            ids = torch.zeros((len(chunk), len(chunk[0])), dtype=torch.long)  # (B, L)
            for i, s in enumerate(chunk):
                ids[i, :len(s)] = torch.tensor(s)
            _ = model(ids).logits
    return time.perf_counter() - t0


def timed_scores(model: Any, tok: Any, spec: TaskSpec, docs: list, indices: list[int],
                 data_dir: Path, batch_size: int, shared: bool) -> tuple[float, list[DocScore]]:
    t0 = time.perf_counter()
    lm = zeroshot.make_lm(model, tok, batch_size, shared_context=shared)
    scores = zeroshot.score_task(lm, spec, docs, indices, data_dir)
    return time.perf_counter() - t0, scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    p.add_argument("--docs", type=int, default=16, help="documents per task")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--tasks", nargs="*", default=list(TASKS))
    p.add_argument("--no-reference", action="store_true", help="skip lm-eval's own loop")
    args = p.parse_args()
    data_dir = _data_dir()
    source = modelio.SMOLLM2_ALIAS if args.model == "smollm2" else modelio.TINY_ALIAS
    model, tok = modelio.load_source(source, torch.float32, trust_remote_code=False,
                                     tiny=modelio.TinyLlamaConfig())
    print(f"model {args.model}, {torch.get_num_threads()} torch threads, "
          f"{args.docs} documents per task, batch {args.batch_size}")
    totals = {"plain": 0.0, "evaluate": 0.0, "lm-eval": 0.0}
    n_tokens = 0
    worst, same = 0.0, True
    for name in args.tasks:
        spec = next(t for t in DEFAULT_TASKS if t.name == name)
        docs = zeroshot.load_docs(spec, data_dir)
        indices = list(range(min(args.docs, len(docs))))
        seqs = _sequences(model, tok, spec, docs, indices, data_dir)
        tokens = sum(len(s) for s in seqs)
        plain_forward(model, seqs[:1], 1)  # warm-up
        t_plain = plain_forward(model, seqs, args.batch_size)
        t_eval, fast = timed_scores(model, tok, spec, docs, indices, data_dir,
                                    args.batch_size, shared=True)
        line = (f"{name:<14} {len(seqs):>4} sequences {tokens:>6} tokens | plain "
                f"{tokens / t_plain:8.1f} tok/s | evaluate {tokens / t_eval:8.1f} tok/s")
        totals["plain"] += t_plain
        totals["evaluate"] += t_eval
        if not args.no_reference:
            t_ref, ref = timed_scores(model, tok, spec, docs, indices, data_dir,
                                      args.batch_size, shared=False)
            totals["lm-eval"] += t_ref
            line += f" | lm-eval HFLM {tokens / t_ref:8.1f} tok/s"
            worst = max([worst] + [abs(a - b) for f, r in zip(fast, ref, strict=True)
                                   for a, b in zip(f.ll, r.ll, strict=True)])
            same &= all((f.acc, f.acc_norm) == (r.acc, r.acc_norm)
                        for f, r in zip(fast, ref, strict=True))
        n_tokens += tokens
        print(line, flush=True)
    print(f"total {n_tokens} tokens: plain forward {n_tokens / totals['plain']:.1f} tok/s, "
          f"evaluate's zero-shot path {n_tokens / totals['evaluate']:.1f} tok/s")
    if not args.no_reference:
        print(f"lm-eval's own HFLM loop: {n_tokens / totals['lm-eval']:.1f} tok/s, ratio "
              f"{totals['plain'] / totals['lm-eval']:.3f}; evaluate vs lm-eval: max |delta ll| "
              f"{worst:.2e}, acc and acc_norm {'identical' if same else 'DIFFER'}")
    print(f"eval_throughput_ratio: {totals['plain'] / totals['evaluate']:.3f}")


if __name__ == "__main__":
    main()
