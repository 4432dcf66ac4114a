"""The dense model's per-token log-probs over the WikiText windows, float16 on disk.

evaluate's KL to dense needs the dense distribution at every position of every window
while another model runs; keeping the dense model resident beside it would double the
memory, so the dense pass writes its log-softmax here once and each other model reads it
back, batch by batch (:func:`recoup.stages.scoring.wikitext.score_one_at_a_time`).

The file is a plain ``.npy`` array (W, T, V) of float16, written through a memory map
so that neither writer nor reader ever holds more than one batch in memory. It lives in
the stage's staging folder for the duration of the scoring only: removed when the scoring
ends, and, were the process killed first, with the staging folder the runner clears
before the next attempt. It is therefore never reused and needs no checksum; a reader
still checks its header (shape, dtype) against the windows it scores. Size: W x T x V x 2
bytes (22 GB for the whole WikiText-2 test set at a 32k vocabulary).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

#: float16 keeps log-probs to 2**-11 relative, half the bytes of float32; bfloat16 would
#: keep 2**-8, too coarse for a KL of a few hundredths.
STORED_DTYPE = np.float16


class DenseLogProbs:
    """A (W, T, V) float16 array on disk: :meth:`write` batches in order during the dense
    pass, :meth:`finish`, then :meth:`read` any window range."""

    def __init__(self, path: Path, *, windows: int, seq_len: int) -> None:
        self.path = path
        self.windows = windows
        self.seq_len = seq_len
        self._array: np.memmap | None = None
        self._written = 0
        self._finished = False

    @property
    def vocab(self) -> int:
        if self._array is None:
            raise RuntimeError(f"{self.path}: no dense log-probs written yet")
        return int(self._array.shape[2])

    def write(self, start: int, logp: torch.Tensor) -> None:
        """Store the log-probs (B, T, V) of windows ``start .. start + B - 1``; batches come
        in order. The file is created at the first batch, when V is known."""
        if self._finished:
            raise RuntimeError(f"{self.path}: written after finish()")
        if start != self._written:
            raise ValueError(f"{self.path}: batch at window {start}, expected {self._written}")
        if self._array is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._array = np.lib.format.open_memmap(
                self.path, mode="w+", dtype=STORED_DTYPE,
                shape=(self.windows, self.seq_len, int(logp.shape[-1])))
        stop = start + logp.shape[0]
        self._array[start:stop] = logp.to(torch.float16).cpu().numpy()  # half on device
        self._written = stop

    def finish(self) -> None:
        """Flush the dense pass's writes and reopen the file read-only."""
        if self._array is None or self._written != self.windows:
            raise RuntimeError(f"{self.path}: the dense pass wrote {self._written} of "
                               f"{self.windows} windows")
        self._array.flush()
        self._array = None
        array = np.load(self.path, mmap_mode="r")
        expected = (self.windows, self.seq_len)
        if array.dtype != STORED_DTYPE or array.shape[:2] != expected:
            raise ValueError(f"{self.path}: holds {array.dtype} {array.shape}, expected "
                             f"float16 {expected} x vocab")
        self._array = array
        self._finished = True

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Log-probs of windows ``start .. stop - 1``: (stop - start, T, V) float16, CPU."""
        if not self._finished or self._array is None:
            raise RuntimeError(f"{self.path}: read before the dense pass finished")
        return torch.from_numpy(np.array(self._array[start:stop]))  # a copy, writable

    def remove(self) -> None:
        """Close and delete the file (nothing if it was never created)."""
        self._array = None
        self.path.unlink(missing_ok=True)
