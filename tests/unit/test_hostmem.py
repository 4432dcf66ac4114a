"""glibc's mmap threshold, fixed by recoup.cluster.hostmem: freed tensors go back to the OS.

Each case runs in a fresh interpreter (the threshold is per process and, once fixed, stays).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from recoup.cluster.hostmem import MMAP_THRESHOLD_BYTES, MMAP_THRESHOLD_ENV, worker_env

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

# 100 freed 8 MiB tensors, each allocated before a small one that stays alive (as a gathered
# block's weight sits below the activations made with it); prints the MiB handed back
PROGRAM = """
import gc, sys, torch
from recoup.cluster.hostmem import fix_mmap_threshold
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
x = torch.ones(16 << 20, dtype=torch.uint8); del x  # glibc's threshold rises past 8 MiB
big, keep = [], []
for _ in range(100):
    big.append(torch.ones(8 << 20, dtype=torch.uint8))
    keep.append(torch.ones(256))
before = anon(); del big; gc.collect()
print((before - anon()) / 2**20)
"""


def _freed_mib(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != MMAP_THRESHOLD_ENV}
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def test_freed_tensors_return_to_the_os_only_with_the_threshold_fixed() -> None:
    assert _freed_mib("dynamic") < 50  # glibc's own threshold: kept on the heap
    assert _freed_mib("fixed") > 780   # 800 MiB freed, 800 MiB handed back


def test_workers_inherit_the_threshold_unless_the_environment_sets_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MMAP_THRESHOLD_ENV, raising=False)
    assert worker_env() == {MMAP_THRESHOLD_ENV: str(MMAP_THRESHOLD_BYTES)}
    monkeypatch.setenv(MMAP_THRESHOLD_ENV, "4194304")
    assert worker_env() == {}


def test_cluster_config_sets_or_leaves_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cluster.mmap_threshold``: a number is what workers get, null leaves glibc's dynamic
    threshold (nothing set, nothing fixed), and a value glibc refuses names the field."""
    from pydantic import ValidationError

    from recoup.cluster.config import ClusterConfig
    from recoup.cluster.hostmem import fix_mmap_threshold

    monkeypatch.delenv(MMAP_THRESHOLD_ENV, raising=False)
    assert ClusterConfig().mmap_threshold == MMAP_THRESHOLD_BYTES
    assert worker_env(ClusterConfig(mmap_threshold=4 << 20).mmap_threshold) == {
        MMAP_THRESHOLD_ENV: str(4 << 20)}
    dynamic = ClusterConfig(mmap_threshold=None).mmap_threshold
    assert worker_env(dynamic) == {}
    assert fix_mmap_threshold(dynamic) is False
    with pytest.raises(ValidationError, match="mmap_threshold"):
        ClusterConfig(mmap_threshold=64 << 20)
