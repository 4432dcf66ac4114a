"""Recovery quality: every recovery method on one degraded model, at one training budget.

    python benchmarks/recovery_quality.py                      # SmolLM2-135M, Wanda 50%
    python benchmarks/recovery_quality.py --degrade sparsegpt-2:4
    python benchmarks/recovery_quality.py --degrade rtn-int3 --budget 0.5   # half the budget
    python benchmarks/recovery_quality.py --methods lcc,lcc-closed --split tune
    python benchmarks/recovery_quality.py --methods lcc+lora --budget 2  # the recipe's budget
    python benchmarks/recovery_quality.py --data synthetic  # trained on the dense model's text

What it runs is what a user runs: ``recoup run`` on ``configs/smollm2-recover.yaml`` (the
shipped recipe: its losses, learning rates, inits, head count, length-grouped batches and bf16
training), with

- one shared prefix (prepare -> degrade -> data -> collect -> svd -> select) computed once
  in ``OUT/prefix`` and copied into one run directory per method, so every method sees the
  same degraded model, the same samples and the same chosen heads;
- the same training budget for every trained method: ``--budget`` scales the number of
  samples and optimizer steps together (batch size fixed), so tokens seen are equal;
- evaluation on WikiText-2 test windows that neither training (Alpaca) nor calibration
  (Alpaca) nor tuning saw: ``--split report`` (the default) scores windows
  [REPORT_START, REPORT_START + windows); ``--split tune`` scores the first windows, the
  split the recipes were tuned on. The two never overlap.

Per method it prints perplexity, KL to dense, the share of the log-perplexity gap and of
the KL gap closed (:func:`gap_closed`), the train stage's wall time and the trainable (or
fitted) parameter count. Run directories are kept, so a second run reuses every finished
method (``--fresh`` starts over). The last line is ``lcc_lora_gap_closed: X`` (log-ppl).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "configs" / "smollm2-recover.yaml"
PREFIX = ("prepare", "degrade", "data", "collect", "svd", "select")
#: the first held-out window; the tuning split is windows [0, TUNE_WINDOWS)
REPORT_START = 64
TUNE_WINDOWS = 16

#: training text: the recipe's Alpaca samples, or text the dense model writes itself (the
#: data-free path: a ``synthesize`` stage joins the prefix, ``--synth-length`` new tokens each)
DATA = ("alpaca", "synthetic")

DEGRADE = {
    "wanda": ["degrade.method=wanda", "degrade.sparsity=0.5", "degrade.pattern=unstructured"],
    "sparsegpt-2:4": ["degrade.method=sparsegpt", "degrade.pattern=2:4"],
    "rtn-int3": ["degrade.method=rtn", "degrade.bits=3", "degrade.group_size=128"],
}

#: method name -> overrides on top of the shipped recipe. Training-free methods fit in
#: closed form (no optimizer steps); the "+init" variants train from a closed-form start.
METHODS: dict[str, list[str]] = {
    "lcc-closed": ["train.method=lcc-closed"],
    "eora": ["train.method=eora"],
    "lcc-closed+eora": ["train.method=lcc-closed+eora"],
    "lcc": ["train.method=lcc", "train.lcc.init=normal"],
    "lcc@closed": ["train.method=lcc", "train.lcc.init=closed_form"],
    "lora": ["train.method=lora", "train.lora.init=random"],
    "lora@eora": ["train.method=lora", "train.lora.init=eora"],
    "lcc+lora": ["train.method=lcc+lora"],
    "lcc+lora-masked": ["train.method=lcc+lora", "train.lora.layers=auto",
                        "train.lora.rank=8", "train.lora.alpha=16", "train.lora.init=random",
                        "train.lora.merge=masked", "train.engine.lr=0.001"],
}
HEADLINE = "lcc+lora"
#: what one command measures within an hour on 2 CPU cores: the training-free adapter,
#: trained compensation alone, and the shipped combination (``lcc-closed+eora``, +0.4 points
#: over ``eora`` in docs/recovery.md, is left to ``--methods`` for time)
DEFAULT_METHODS = ("eora", "lcc@closed", "lcc+lora")


def gap_closed(dense: float, degraded: float, recovered: float) -> float:
    """Share of the dense-vs-degraded gap that recovery closed (1 = back to dense), by
    :func:`recoup.stages.scoring.gap.gap_closed`; NaN where degradation cost nothing."""
    from recoup.stages.scoring.gap import gap_closed as share_closed

    share = share_closed(dense, degraded, recovered, higher_is_better=False)
    return math.nan if share is None else share


def run(config: Path, run_dir: Path, overrides: list[str], log: Path) -> float:
    """``recoup run`` in a subprocess (its console to ``log``); returns wall seconds."""
    cmd = [sys.executable, "-m", "recoup", "run", str(config), f"run.dir={run_dir}",
           *overrides]
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"recoup run failed ({run_dir}); last lines of {log}:\n"
                         + "\n".join(tail))
    return time.perf_counter() - t0


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--degrade", choices=sorted(DEGRADE), default="wanda")
    ap.add_argument("--data", choices=DATA, default="alpaca",
                    help="training text: Alpaca (the recipe's) or synthetic (written by the "
                         "dense model; the degrade calibration stays Alpaca, so the degraded "
                         "model is the same)")
    ap.add_argument("--synth-length", type=int, default=128,
                    help="--data synthetic: new tokens per sequence (default 128, about "
                         "Alpaca's mean sample of 126 tokens)")
    ap.add_argument("--budget", type=float, default=1.0,
                    help="scales training samples and optimizer steps together (default 1)")
    ap.add_argument("--samples", type=int, default=512,
                    help="training samples at budget 1 (default 512, one epoch: half the "
                         "shipped recipe's 1024, so that the default run fits an hour; "
                         "--budget 2 is the recipe's)")
    ap.add_argument("--steps", type=int, default=64,
                    help="optimizer steps at budget 1 (default 64: one epoch of the samples)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated, from {', '.join(METHODS)} (default: "
                         f"{', '.join(DEFAULT_METHODS)}: 35 minutes measured on 2 CPU cores)")
    ap.add_argument("--split", choices=("report", "tune"), default="report")
    ap.add_argument("--windows", type=int, default=16,
                    help="WikiText-2 windows x 512 tokens (each evaluation runs the dense "
                         "model and one other over them)")
    ap.add_argument("--config", type=Path, default=BASE_CONFIG)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "recovery-quality")
    ap.add_argument("--fresh", action="store_true", help="delete earlier results first")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for every method (repeatable), e.g. train.engine.lr=3e-3")
    ap.add_argument("--label", default=None,
                    help="run one method under this name (its own run directory and row), "
                         "to compare a variant made with --set beside the recipe's")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    if args.label is not None and len(methods) != 1:
        ap.error("--label names one variant: give exactly one --methods")
    if args.budget <= 0 or not math.isfinite(args.budget):
        ap.error("--budget must be a positive number")

    out = (args.out / (args.degrade if args.data == "alpaca" else
                       f"{args.degrade}-{args.data}{args.synth_length}")).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "console.log"
    samples = max(16, round(args.samples * args.budget))
    steps = max(1, round(args.steps * args.budget))
    start = 0 if args.split == "tune" else REPORT_START
    windows = TUNE_WINDOWS if args.split == "tune" else args.windows
    common = [*DEGRADE[args.degrade], f"data.source.num_samples={samples}",
              f"train.engine.steps={steps}", "evaluate.zeroshot.tasks=[]",
              f"evaluate.window_start={start}", f"evaluate.max_windows={windows}",
              *args.set]
    prefix_stages = PREFIX
    if args.data == "synthetic":
        # num_samples before dedup: a few more than the data stage keeps
        common += [f"synthesize.num_samples={samples + samples // 8}",
                   f"synthesize.length={args.synth_length}", "data.source.source=synthetic",
                   "data.source.path=null"]
        prefix_stages = ("prepare", "synthesize", *PREFIX[1:])
    print(f"recovery quality: SmolLM2-135M, {args.degrade}; {samples} samples, {steps} steps; "
          f"WikiText-2 windows [{start}, {start + windows}) x 512 ({args.split} split); "
          f"runs in {out} (console: {log})", flush=True)

    prefix = out / "prefix"
    seconds = run(args.config, prefix, common + ["run.pipeline=[" + ",".join(
        (*prefix_stages, "evaluate")) + "]"], log)
    base = manifest(prefix, "evaluate")["metrics"]["models"]
    print(f"prefix + dense/degraded evaluation: {seconds:.0f} s", flush=True)

    rows = []
    for method in methods:
        name = args.label or method
        run_dir = out / name
        if not (run_dir / "evaluate" / "manifest.json").exists():
            if run_dir.exists():
                shutil.rmtree(run_dir)
            shutil.copytree(prefix, run_dir, ignore=shutil.ignore_patterns(
                "evaluate", "logs", ".lock", "*.tmp-*"))
        pipeline = "run.pipeline=[" + ",".join(
            (*prefix_stages, "train", "export", "evaluate")) + "]"
        run(args.config, run_dir, METHODS[method] + common + [pipeline], log)
        models = manifest(run_dir, "evaluate")["metrics"]["models"]
        train = manifest(run_dir, "train")
        rec = models["recovered"]
        rows.append({
            "method": name, "ppl": rec["ppl"], "kl": rec["kl_to_dense"],
            "ppl_gap": gap_closed(math.log(base["dense"]["ppl"]),
                                  math.log(base["degraded"]["ppl"]), math.log(rec["ppl"])),
            "kl_gap": gap_closed(0.0, base["degraded"]["kl_to_dense"], rec["kl_to_dense"]),
            "train_s": train["duration_s"],
            "params": train["metrics"].get("trainable_params", 0),
            "sparsity": rec.get("linear_sparsity"),
        })
        r = rows[-1]
        print(f"  {name:<11} ppl {r['ppl']:8.3f}  log-ppl gap {r['ppl_gap']:6.1%}  "
              f"KL gap {r['kl_gap']:6.1%}  train {r['train_s']:6.0f} s", flush=True)

    d, g = base["dense"], base["degraded"]
    print()
    print(f"{'method':<12}{'ppl':>9}{'KL':>9}{'log-ppl gap':>13}{'KL gap':>9}"
          f"{'train s':>9}{'params':>10}{'sparsity':>10}")
    print(f"{'dense':<12}{d['ppl']:>9.3f}{0:>9.4f}")
    print(f"{'degraded':<12}{g['ppl']:>9.3f}{g['kl_to_dense']:>9.4f}{0:>13.1%}{0:>9.1%}"
          f"{'':>9}{'':>10}{g.get('linear_sparsity', 0):>10.4f}")
    for r in rows:
        print(f"{r['method']:<12}{r['ppl']:>9.3f}{r['kl']:>9.4f}{r['ppl_gap']:>13.1%}"
              f"{r['kl_gap']:>9.1%}{r['train_s']:>9.0f}{r['params']:>10}"
              f"{(r['sparsity'] or 0):>10.4f}")
    (out / "results.json").write_text(json.dumps(
        {"degrade": args.degrade, "samples": samples, "steps": steps, "split": args.split,
         "window_start": start, "windows": windows, "dense": d, "degraded": g, "rows": rows},
        indent=2))
    head = next((r for r in rows if r["method"] == HEADLINE), None)
    if head is None:
        print(f"({HEADLINE} was not among --methods: its figure is nan)")
    print(f"lcc_lora_gap_closed: {head['ppl_gap'] if head else float('nan'):.4f}")


if __name__ == "__main__":
    main()
