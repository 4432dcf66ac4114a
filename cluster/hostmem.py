"""Host memory that a freed tensor gives back: glibc's allocator settings for recoup's
processes.

glibc serves an allocation from its heap unless it is larger than the *mmap threshold*,
which starts at 128 KiB and rises (up to 32 MiB) each time an mmap'ed block is freed. After
the first few large frees, every tensor below 32 MiB (a decoder block's weight gathered by
ZeRO-3, a batch's logits, a layer's activations) comes from the heap, and a heap hands
memory back to the OS only from its top: interleaved with live tensors, the freed ones stay
resident. Measured on a 1.5 GB Llama under ZeRO-3 on 2 workers (benchmarks/memory_scaling.py):
the teacher pass grew a worker by a whole model's worth (1.5 GB) of freed block weights, and
4 training steps by another 1.4 GB; with the threshold fixed both are gone (a worker's peak
4.4 GB -> 2.2 GB) and the peak is what the code holds.

A fixed threshold (``mallopt``; ``MALLOC_MMAP_THRESHOLD_`` for processes started later) maps
every allocation of :data:`MMAP_THRESHOLD_BYTES` or more on its own, so it returns to the
OS when freed; smaller ones, far more numerous, still come from the heap. On a GPU the
weights and activations live in the CUDA allocator and this only touches host buffers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

MMAP_THRESHOLD_BYTES = 1 << 20
"""Allocations of at least this many bytes get their own mapping (glibc). Measured at 1.5 GB
under ZeRO-3 (benchmarks/memory_scaling.py), a training worker's peak: 4.43 GB with glibc's
dynamic threshold, 2.79 GB at 4 MiB, 2.22 GB at 1 MiB. The price is on the CPU: each
mapping is page-faulted and zeroed anew, 1.33x the step time of a small Llama at 1 MiB and
none at 4 MiB (``python benchmarks/mmap_threshold.py``). recoup is for models whose memory
is the constraint, so 1 MiB by default; ``cluster.mmap_threshold`` (the SmolLM2 CPU recipes
set 4194304) or ``MALLOC_MMAP_THRESHOLD_`` in the environment (which recoup leaves alone)
trade host memory for CPU speed."""
MMAP_THRESHOLD_MAX = 32 << 20
"""The largest threshold glibc takes on 64-bit (``HEAP_MAX_SIZE / 2``)."""
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"
"""glibc reads it at a process's start; set for Ray's workers by :func:`worker_env`."""
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def _left_alone(nbytes: int | None) -> bool:
    """The threshold is not recoup's to set: the environment sets one (the user's choice
    stands), or ``nbytes`` is None (glibc's dynamic threshold)."""
    return MMAP_THRESHOLD_ENV in os.environ or nbytes is None


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once (``find_library`` runs ``ldconfig``)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def fix_mmap_threshold(nbytes: int | None = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix this process's mmap threshold at ``nbytes`` (glibc's ``mallopt``), unless the
    environment already sets one (the user's choice stands) or ``nbytes`` is None (glibc's
    dynamic threshold, left as it is). True if glibc took it; False where the C library has
    no ``mallopt`` (musl, macOS), the environment decides, or ``nbytes`` is None."""
    if _left_alone(nbytes):
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)))


def worker_env(nbytes: int | None = MMAP_THRESHOLD_BYTES) -> dict[str, str]:
    """Environment variables for worker processes started from here (Ray's): the same
    fixed threshold from their first allocation; empty when the environment sets one (the
    workers inherit it) or ``nbytes`` is None (glibc's dynamic threshold)."""
    if _left_alone(nbytes):
        return {}
    return {MMAP_THRESHOLD_ENV: str(int(nbytes))}


def trim_host_heap() -> None:
    """glibc's ``malloc_trim(0)``: hand the heap's free pages back to the OS now; a no-op
    where the C library has none."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


__all__ = ("MMAP_THRESHOLD_BYTES", "MMAP_THRESHOLD_ENV", "MMAP_THRESHOLD_MAX",
           "fix_mmap_threshold",
           "trim_host_heap", "worker_env")
