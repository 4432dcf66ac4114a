"""Peak GPU memory of each stage of a bf16 run on one CUDA GPU against ``recoup plan``.

    python benchmarks/gpu_memory.py                           # needs a CUDA GPU; minutes
    python benchmarks/gpu_memory.py --device cpu --size-gb 0.05   # the same path, no GPU

The GPU counterpart of ``memory_scaling.py`` (which measures host memory on the CPU, where
a 2-core machine can): the same random Llama (``--size-gb`` of float32 bytes, default 4 GB,
about 1B parameters) and the same run config, changed to what a GPU run uses:
``run.device: cuda``, the model prepared in bfloat16, activations kept in float16, training in bf16
under ZeRO-3 with activation checkpointing, one worker; then "train-streamed": train again
with the frozen base streamed from its checkpoint (``train.engine.frozen_weights:
streamed``); last, "fit": train again with the training-free ``eora`` (its block-by-block
fit on the GPU). Every stage runs in its own
``recoup run`` process with ``cluster.mode: inprocess`` (no Ray needed: the stage's work
happens in that process, training included, on a one-rank NCCL group).

What is measured, per stage process:
- ``allocated``: ``torch.cuda.max_memory_allocated()``, read at the process's exit: the
  largest sum of live tensors on the GPU, what the plan's device figure models;
- ``reserved``: ``torch.cuda.max_memory_reserved()``, what PyTorch's caching allocator took
  from the driver at most (allocated plus its cache and fragmentation);
- ``device used``: the GPU's used memory read through NVML every ``--interval`` seconds,
  less what was used before the stage started: reserved plus the CUDA context and the
  libraries' workspaces, what ``nvidia-smi`` shows. Absent without ``pynvml``.

What is predicted: ``recoup plan``'s device bytes per worker for the same config. The
verdict compares ``allocated`` with it: within 15% or "plan off by X%".

The last line is ``gpu_train_allocated_over_plan: X`` (the training process's allocated
peak over the plan's train figure). With ``--device cpu`` nothing is measured on a GPU (the
columns are empty) and the last line says so; that mode is the smoke test of the path.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import memory_scaling as ms  # noqa: E402  (the model, the config and the plan's figures)

REPO = BENCH.parent
GB = 1e9
OFF_LIMIT = 0.15
STAGES = tuple(s for s, _ in ms.STEPS)


# --------------------------------------------------------------------------- one stage


def stage_main(cfg: str, peaks: str) -> int:
    """``--stage-run CFG --peaks FILE``: ``recoup run CFG`` in this process; at exit the
    CUDA allocator's peaks go to FILE (also when the run fails)."""
    import torch

    def write() -> None:
        out: dict[str, int] = {}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out = {"allocated": torch.cuda.max_memory_allocated(),
                   "reserved": torch.cuda.max_memory_reserved()}
        Path(peaks).write_text(json.dumps(out))

    atexit.register(write)
    from recoup.orchestrator.cli import main

    return main(["run", cfg, "--no-progress"])


class DeviceMonitor(threading.Thread):
    """The GPU's used memory (NVML, the first visible GPU) polled until stopped; ``peak``
    is the largest reading. Inert where NVML cannot be loaded."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.peak, self.first = interval, 0, 0
        self._stop_event = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            # the GPU the stage processes use: the first visible one
            first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(int(first or 0))
            self._read = lambda: int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            self.first = self._read()
        except Exception:  # no NVML library or no GPU: nothing to read
            self._read = None

    @property
    def available(self) -> bool:
        return self._read is not None

    def run(self) -> None:
        while self._read is not None and not self._stop_event.is_set():
            self.peak = max(self.peak, self._read())
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        """Stop; the peak less the reading at the start (bytes), or 0 without NVML."""
        self._stop_event.set()
        if self.is_alive():
            self.join()
        return max(0, self.peak - self.first) if self.available else 0


def run_stage(i: int, stage: str, cfg: dict[str, Any], work: Path, env: dict[str, str],
              interval: float, failed: set[str]) -> dict[str, Any]:
    """One ``recoup run`` whose pipeline ends at ``stage`` (the stages before it reused,
    those in ``failed`` left out: a stage that does not need them still runs and is
    measured). A failure is returned as ``{"error": the log's tail}``: one call on a lent
    GPU should report every stage it can."""
    import yaml

    step = ms.with_variant(cfg, stage)
    names = ms.stage_steps([s for s in STAGES[: i + 1] if s not in failed])
    if stage in ms.VARIANTS:  # train again with the variant's settings, whatever train did
        names = [s for s in names if s != "train"] + ["train"]
    step["run"]["pipeline"] = names
    path = work / "configs" / f"{i}-{stage}.yaml"
    path.write_text(yaml.safe_dump(step, sort_keys=False))
    peaks = work / "configs" / f"{i}-{stage}.peaks.json"
    log = work / "recoup-run.log"
    monitor = DeviceMonitor(interval)
    monitor.start()
    started = time.perf_counter()
    before = log.stat().st_size if log.is_file() else 0
    with open(log, "ab") as out:
        rc = subprocess.run([sys.executable, __file__, "--stage-run", str(path), "--peaks",
                             str(peaks)], stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                            env=env, check=False).returncode
    seconds = time.perf_counter() - started
    used = monitor.stop()
    if rc != 0:
        with open(log, "rb") as f:
            f.seek(before)
            tail = f.read().decode(errors="replace")[-4000:]
        stage_log = Path(cfg["run"]["dir"]) / "logs" / f"{stage}.log"
        if stage_log.is_file():
            tail += f"\n--- {stage_log}\n" + stage_log.read_text(errors="replace")[-4000:]
        return {"seconds": seconds, "error": f"exit {rc}:\n{tail}"}
    got = json.loads(peaks.read_text()) if peaks.is_file() else {}
    return {"seconds": seconds, "used": used if monitor.available else None, **got}


# --------------------------------------------------------------------------- report


def gpu_config(args: argparse.Namespace, run_dir: Path, source: Path, shape: ms.Shape
               ) -> dict[str, Any]:
    """memory_scaling's config as a one-GPU bf16 run holds it (module docstring)."""
    ns = argparse.Namespace(
        workers=1, samples=args.samples, max_length=args.max_length, eval_seq_len=512,
        eval_windows=args.eval_windows, method=args.method, seq_len=args.seq_len,
        lora_layers=4, lora_merge="none", precision="bf16", no_checkpointing=False,
        micro_batch=args.micro_batch, steps=args.steps)
    cfg = ms.run_config(ns, run_dir, source, shape, args.data_dir)
    cfg["run"]["device"] = args.device
    cfg["prepare"]["dtype"] = "bfloat16"
    cfg["collect"]["dtype"] = "float16"  # the activations kept: float16 or float32
    cfg["cluster"] = {"mode": "inprocess", "num_cpus": 2}
    return cfg


def verdict(measured: int | None, planned: int) -> str:
    if not measured:
        return "not measured"
    gap = measured / planned - 1
    return (f"plan off by {gap:+.0%}" if abs(gap) > OFF_LIMIT
            else f"within {OFF_LIMIT:.0%} ({gap:+.0%})")


def report(runs: dict[str, dict[str, Any]], plan: dict[str, Any]) -> float | None:
    """The table; returns train's allocated / planned, None where not measured."""
    def g(n: int | None) -> str:
        return f"{n / GB:.3f}" if n else "-"

    head = (f"{'stage':<9} {'seconds':>7} {'allocated':>9} {'reserved':>9} {'dev used':>9} "
            f"{'plan':>7} {'alloc/plan':>10}  verdict")
    print("\nGB = 1e9 bytes; allocated / reserved = torch.cuda.max_memory_{allocated,reserved}"
          " of the stage process; dev used = NVML peak less the reading before the stage; "
          "plan = recoup plan's device bytes per worker")
    print(head)
    print("-" * len(head))
    train_ratio = None
    for stage, run in runs.items():
        if "error" in run:
            print(f"{stage:<9} {run['seconds']:7.0f}  FAILED (its log's tail is printed above)")
            continue
        est = plan.get(stage)
        planned = (est.device_bytes or 0) if est is not None else 0
        alloc = run.get("allocated")
        ratio = f"{alloc / planned:10.2f}" if alloc and planned else f"{'-':>10}"
        print(f"{stage:<9} {run['seconds']:7.0f} {g(alloc):>9} {g(run.get('reserved')):>9} "
              f"{g(run.get('used')):>9} {g(planned):>7} {ratio}  "
              f"{verdict(alloc, planned) if planned else 'no device figure in the plan'}")
        if stage == "train" and alloc and planned:
            train_ratio = alloc / planned
    print("\nplan parts (bytes as the plan states them):")
    for stage in runs:
        est = plan.get(stage)
        if est is None or not est.device_bytes:
            continue
        print(f"  {stage}: device {est.device_bytes / GB:.3f} GB per worker")
        for k, v in est.parts.items():
            print(f"      {v / GB:9.4f}  {k}")
    return train_ratio


# --------------------------------------------------------------------------- main


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=4.0,
                   help="float32 size of the random Llama (default 4; run in bf16: half)")
    p.add_argument("--device", default="cuda", help="run.device (default cuda; cpu: smoke)")
    p.add_argument("--steps", type=int, default=4, help="training steps")
    p.add_argument("--micro-batch", type=int, default=2, help="train.engine.micro_batch")
    p.add_argument("--seq-len", type=int, default=128, help="train.max_seq_len")
    p.add_argument("--method", default="lcc+lora", choices=["lcc", "lora", "lcc+lora"])
    p.add_argument("--samples", type=int, default=32, help="data.source.num_samples")
    p.add_argument("--max-length", type=int, default=256, help="data.max_length (tokens)")
    p.add_argument("--eval-windows", type=int, default=4, help="evaluate.max_windows")
    p.add_argument("--interval", type=float, default=0.05, help="seconds between NVML reads")
    p.add_argument("--data-dir", type=Path,
                   default=Path(os.environ.get("RECOUP_DATA_DIR", REPO.parent / "shared/data")))
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where the models and the run go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage-run", help=argparse.SUPPRESS)
    p.add_argument("--peaks", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = _args()
    if args.stage_run:
        sys.exit(stage_main(args.stage_run, args.peaks))
    gpu = args.device.startswith("cuda")
    # DeepSpeed picks its accelerator once, at import: each stage process is told which
    env = {**os.environ, "DS_ACCELERATOR": "cuda" if gpu else "cpu",
           "RECOUP_DATA_DIR": str(args.data_dir)}
    t_start = time.perf_counter()
    shape = ms.shape_for(args.size_gb)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="recoup-gpu-memory-"))
    (work / "configs").mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        params = ms.save_random_llama(shape, work / "source-model", args.seed)
        print(f"model: random Llama, {shape.layers} layers, hidden {shape.hidden}, "
              f"{shape.heads} heads ({shape.kv_heads} KV), MLP {shape.intermediate}, vocab "
              f"{ms.VOCAB}: {params / 1e6:.1f}M parameters, bf16 {2 * params / GB:.3f} GB "
              f"(built in {time.perf_counter() - t0:.0f} s); run.device {args.device}; "
              f"train {args.method}, ZeRO-3, 1 worker, bf16, {args.steps} steps of "
              f"{args.micro_batch} x {args.seq_len} tokens", flush=True)
        cfg = gpu_config(args, work / "run", work / "source-model", shape)
        import yaml

        full = work / "configs" / "full.yaml"
        full.write_text(yaml.safe_dump(cfg, sort_keys=False))
        _, plan = ms.plan_figures(full)
        for step in ms.VARIANTS:
            plan[step] = ms.variant_plan(cfg, step, work / "configs" / f"{step}.yaml")
        runs: dict[str, dict[str, Any]] = {}
        failed: set[str] = set()
        for i, stage in enumerate(STAGES):
            run = runs[stage] = run_stage(i, stage, cfg, work, env, args.interval, failed)
            if "error" in run:
                failed.add(stage)
                print(f"{stage}: FAILED after {run['seconds']:.0f} s, {run['error']}",
                      flush=True)
                continue
            print(f"{stage}: {run['seconds']:.0f} s, allocated "
                  f"{(run.get('allocated') or 0) / GB:.3f} GB", flush=True)
        ratio = report(runs, plan)
        print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
        if failed:
            raise SystemExit(f"gpu_train_allocated_over_plan: not measured (failed: "
                             f"{', '.join(sorted(failed))})")
        if ratio is None:
            print("gpu_train_allocated_over_plan: not measured (no GPU)")
        else:
            print(f"gpu_train_allocated_over_plan: {ratio:.4f}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
