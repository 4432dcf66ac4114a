"""What fixing glibc's mmap threshold (recoup.cluster.hostmem) costs in step time.

    python benchmarks/mmap_threshold.py              # ~3 minutes on 2 CPU cores
    python benchmarks/mmap_threshold.py --rounds 5 --steps 8

A fixed threshold (recoup: 1 MiB) maps every allocation at least that large on its own, so each is
page-faulted in anew (and zeroed by the kernel) instead of reusing heap memory. This runs
the same forward + backward steps of a random Llama (each step in a fresh process per
setting, alternating settings round by round, since these machines are noisy) with glibc's
dynamic threshold and with recoup's fixed one, and prints the median seconds per step of
each, their ratio and each process's peak anon memory. Last line:
``mmap_fixed_over_dynamic_step_time: X`` (1.0 = no cost).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from recoup.cluster.hostmem import MMAP_THRESHOLD_BYTES

CHILD = r"""
import sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
threshold, steps, hidden, layers, seq, batch = map(int, sys.argv[1:7])
if threshold:
    from recoup.cluster.hostmem import fix_mmap_threshold
    assert fix_mmap_threshold(threshold)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                  num_hidden_layers=layers, num_attention_heads=hidden // 64,
                  num_key_value_heads=hidden // 128)
model = LlamaForCausalLM(cfg).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
ids = torch.randint(0, 8192, (batch, seq))
def step():
    opt.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
step()  # warm-up
t0 = time.perf_counter()
for _ in range(steps):
    step()
dt = (time.perf_counter() - t0) / steps
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(dt, hwm * 1024)
"""


def one(mode: str, args: argparse.Namespace) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(0 if mode == "dynamic" else args.threshold),
         str(args.steps), str(args.hidden), str(args.layers),
         str(args.seq_len), str(args.batch)], env=env, check=True, capture_output=True,
        text=True).stdout.split()
    return float(out[-2]), int(out[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threshold", type=int, default=MMAP_THRESHOLD_BYTES,
                   help="the fixed threshold to compare (bytes; default recoup's)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    times: dict[str, list[float]] = {"dynamic": [], "fixed": []}
    peaks: dict[str, list[int]] = {"dynamic": [], "fixed": []}
    for r in range(args.rounds):
        for mode in (("dynamic", "fixed") if r % 2 == 0 else ("fixed", "dynamic")):
            dt, hwm = one(mode, args)
            times[mode].append(dt)
            peaks[mode].append(hwm)
            print(f"round {r + 1} {mode:<8} {dt:.3f} s/step  peak RSS {hwm / 1e9:.3f} GB",
                  flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    for m in med:
        print(f"{m:<8} median {med[m]:.3f} s/step, peak RSS {max(peaks[m]) / 1e9:.3f} GB")
    print(f"mmap_fixed_over_dynamic_step_time: {med['fixed'] / med['dynamic']:.3f}")


if __name__ == "__main__":
    main()
