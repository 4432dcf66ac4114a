"""Perplexity of SmolLM2-135M after each degrade method, on the same WikiText-2 windows.

    python benchmarks/degrade_quality.py [--windows 16] [--seq-len 512] [--out runs/degrade-quality]

Runs the real pipeline (prepare -> degrade -> evaluate) once per method, in-process, one run
directory per method (finished runs are reused, so a second call only prints). Prints a
table of dense / degraded perplexity and KL, and as its last line the ratio of SparseGPT's
to magnitude's perplexity at 50% unstructured (the literature expects well below 1).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from recoup.orchestrator.config import validate
from recoup.orchestrator.runconfig import RunConfig
from recoup.orchestrator.runner import run_pipeline

CASES: dict[str, dict] = {
    "magnitude 50%": {"method": "magnitude", "sparsity": 0.5},
    "wanda 50%": {"method": "wanda", "sparsity": 0.5},
    "sparsegpt 50%": {"method": "sparsegpt", "sparsity": 0.5},
    "magnitude 2:4": {"method": "magnitude", "pattern": "2:4"},
    "wanda 2:4": {"method": "wanda", "pattern": "2:4"},
    "sparsegpt 2:4": {"method": "sparsegpt", "pattern": "2:4"},
    "rtn int4 g128": {"method": "rtn", "bits": 4, "group_size": 128},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--out", type=Path, default=Path("runs/degrade-quality"))
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = p.parse_args()

    rows = []
    dense_source = "smollm2-135m"
    for i, name in enumerate(args.cases):
        run_dir = args.out / name.replace(" ", "-").replace("%", "").replace(":", "of")
        cfg = validate(RunConfig, {
            "run": {"dir": str(run_dir)},
            "cluster": {"mode": "inprocess"},
            "prepare": {"source": dense_source},
            "degrade": {**CASES[name], "calibration": {
                "num_samples": args.calib_samples, "seq_len": args.calib_seq_len}},
            # perplexity and KL only: zero-shot accuracy is not what this benchmark compares
            "evaluate": {"seq_len": args.seq_len, "max_windows": args.windows,
                         "zeroshot": {"tasks": []}},
        }, source="degrade_quality.py")
        out = run_pipeline(cfg, progress=False,
                           echo=lambda s, name=name: print(f"[{name}] {s}", flush=True))
        if i == 0:  # later runs copy the prepared model instead of dequantizing the GGUF again
            dense_source = str(run_dir / "prepare" / "model")
        models = out.metrics["evaluate"]["models"]
        rows.append((name, models["dense"]["ppl"], models["degraded"]["ppl"],
                     models["degraded"]["kl_to_dense"],
                     out.metrics["degrade"]["linear_sparsity"]))

    print(f"\nSmolLM2-135M, WikiText-2 {args.windows} x {args.seq_len} tokens")
    print(f"{'method':<16} {'dense ppl':>10} {'ppl':>10} {'KL':>8} {'sparsity':>9}")
    for name, dense, ppl, kl, sp in rows:
        print(f"{name:<16} {dense:>10.3f} {ppl:>10.3f} {kl:>8.4f} {sp:>9.3f}")
    by = {r[0]: r[2] for r in rows}
    if "sparsegpt 50%" in by and "magnitude 50%" in by:
        print(f"sparsegpt_over_magnitude_ppl: {by['sparsegpt 50%'] / by['magnitude 50%']:.4f}")


if __name__ == "__main__":
    main()
