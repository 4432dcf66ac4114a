"""Share of the log-perplexity gap a recovered model closes, by position in the window.

    python benchmarks/gap_by_position.py                         # runs/smollm2-recover-lcc
    python benchmarks/gap_by_position.py runs/recovery-quality/wanda/lcc@closed

A recovery trained on short samples (Alpaca's ~126 tokens, synthetic text's ~132) is
scored on 512-token WikiText-2 windows. If what it learned held only near the start of a
sequence, the gap closed would fall with the position; this measures it. It reads a
finished run directory (prepare, degrade and export done) and scores the dense, degraded
and exported models, one at a time, on the run's own held-out windows
(``evaluate.window_start``, ``evaluate.max_windows``, ``evaluate.seq_len``), then prints
per position bucket the three perplexities and the gap closed. Last line:
``gap_closed_spread: X``, the largest minus the smallest bucket's share (0: position does
not matter).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from recoup.orchestrator.config import load_config
from recoup.orchestrator.runconfig import RunConfig
from recoup.stages.model import lm_metrics, modelio
from recoup.stages.prepare import MODEL_DIR
from recoup.stages.scoring.gap import gap_closed
from recoup.stages.scoring.wikitext import window_range

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"dense": "prepare", "degraded": "degrade", "recovered": "export"}


def bucket_edges(seq_len: int) -> list[int]:
    """0, 32, 128, 256, ... doubling up to the window's last predicted position."""
    edges, e = [0, 32], 128
    while e < seq_len - 1:
        edges.append(e)
        e *= 2
    return [*edges, seq_len - 1]


@torch.no_grad()
def token_nll(folder: Path, wins: torch.Tensor, batch: int) -> torch.Tensor:
    """(W, T) windows -> (T-1,) next-token NLL at each position, averaged over windows."""
    model = modelio.load_model(folder, torch.float32)
    total = torch.zeros(wins.shape[1] - 1)
    for i in range(0, wins.shape[0], batch):
        x = wins[i:i + batch]  # (B, T)
        total += lm_metrics.token_nll(model(x).logits, x).sum(0)  # (B, T-1) -> (T-1,)
    return total / wins.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path, nargs="?", default=ROOT / "runs" / "smollm2-recover-lcc")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="where wikitext2/ lies (default: RECOUP_DATA_DIR or ../shared/data)")
    args = ap.parse_args()
    run = args.run_dir.resolve()
    missing = [s for s in MODELS.values() if not (run / s / "manifest.json").is_file()]
    if missing:
        raise SystemExit(f"{run}: stage(s) {missing} not finished; run the pipeline first")
    cfg = load_config(RunConfig, run / "config.yaml")
    ev = cfg.evaluate
    data_dir = args.data_dir or cfg.run.resolved_data_dir()
    text = lm_metrics.read_wikitext(data_dir / ev.wikitext)
    tokenizer = modelio.load_tokenizer(run / MODELS["dense"] / MODEL_DIR)
    ids = torch.tensor(tokenizer(text)["input_ids"])
    wins = window_range(ids, ev.seq_len, ev.window_start, ev.max_windows)  # (W, seq_len)
    print(f"{run}: windows [{ev.window_start}, {ev.window_start + wins.shape[0]}) x "
          f"{ev.seq_len} tokens", flush=True)
    nll = {name: token_nll(run / stage / MODEL_DIR, wins, ev.batch_size)
           for name, stage in MODELS.items()}
    edges = bucket_edges(ev.seq_len)
    buckets = [(f"[{a}, {b})", a, b) for a, b in zip(edges, edges[1:], strict=False)]
    print(f"{'positions':<12}{'dense':>9}{'degraded':>10}{'recovered':>11}{'gap closed':>12}")
    shares = {}
    for label, a, b in [*buckets, ("all", 0, ev.seq_len - 1)]:
        d, g, r = (nll[k][a:b].mean().item() for k in MODELS)  # mean NLL: log-perplexity
        shares[label] = gap_closed(d, g, r, higher_is_better=False)
        print(f"{label:<12}{math.exp(d):>9.2f}{math.exp(g):>10.2f}{math.exp(r):>11.2f}"
              f"{shares[label]:>12.1%}")
    per_bucket = [shares[label] for label, _, _ in buckets]
    print(f"gap_closed_spread: {max(per_bucket) - min(per_bucket):.4f}")


if __name__ == "__main__":
    main()
