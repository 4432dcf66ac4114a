"""One readable console: worker output into the stage's log, progress back to the driver.

A stage that runs on Ray runs in other processes (the stage task, its pool actors, layer
tasks, Ray Train workers). Left alone, each of them prints to the driver's console through
Ray, prefixed and interleaved: weight-loading bars, lm-eval's bars, DeepSpeed and Ray Train
chatter. Instead:

- every worker process of a stage runs inside :func:`attached`: its stdout and stderr
  (file descriptors 1 and 2, so C++ and subprocess output too) go to the stage's log file
  ``RUN/logs/<stage>.log``, and Ray does not forward worker output to the driver
  (``log_to_driver=False``);
- progress goes to a small Ray actor, the :class:`ProgressBoard`, which the driver polls
  and draws as *one* bar for the running stage (:class:`DriverDisplay`). A bar opened in a
  worker with :func:`bar` reports to it; workers that share a count (zero-shot documents
  over several shard tasks) :func:`advance` the bar their stage opened;
- warnings of recoup's own loggers in a worker (``recoup.*`` at WARNING and above) are
  also sent to the board and printed on the driver's console, each message once;
- ``recoup run --verbose`` makes the driver print the stage's log file as it grows.

What a worker needs (the board's handle, the log file's path) travels as a :class:`Channel`
argument; :func:`current` gives it to code running in that worker (to pass it on to the
tasks or actors it starts). Ray is imported only inside functions that need it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

REPORT_INTERVAL_S = 0.5
"""A worker's bar sends its count to the board at most this often (and when it closes)."""

POLL_INTERVAL_S = 0.5
"""How often the driver reads the board and redraws its bar."""

WORKER_TQDM_INTERVAL_S = 10
"""Bars that only draw into a log file (lm-eval's, transformers') redraw this rarely."""

RECORD_FORMAT = "%(asctime)s %(levelname)s %(name)s [pid %(process)d]: %(message)s"


@dataclass
class _Bar:
    desc: str
    unit: str
    total: float | None
    n: float = 0
    opened: float = field(default_factory=time.monotonic)
    closed: bool = False


class ProgressBoard:
    """Bars and warnings reported by a stage's workers; the driver reads :meth:`snapshot`.

    Runs as a Ray actor (or as a plain object in tests). Keys are chosen by whoever opens a
    bar; re-opening a key keeps its count (a restarted worker)."""

    def __init__(self) -> None:
        self._bars: dict[str, _Bar] = {}
        self._warnings: list[str] = []

    def open(self, key: str, desc: str, unit: str, total: float | None,
             initial: float = 0) -> None:
        if key in self._bars:
            bar = self._bars[key]
            bar.total, bar.closed = total, False
        else:
            self._bars[key] = _Bar(desc=desc, unit=unit, total=total, n=initial)

    def advance(self, key: str, n: float) -> None:
        if key in self._bars:
            self._bars[key].n += n

    def close(self, key: str) -> None:
        if key in self._bars:
            self._bars[key].closed = True

    def warn(self, message: str) -> None:
        self._warnings.append(message)

    def snapshot(self, warnings_seen: int = 0) -> dict[str, Any]:
        """The most recently opened bar still open (None if none) and the warnings after
        the first ``warnings_seen``."""
        live = [(k, b) for k, b in self._bars.items() if not b.closed]
        top = max(live, key=lambda kb: kb[1].opened, default=None)
        bar = None if top is None else {"key": top[0], "desc": top[1].desc,
                                        "unit": top[1].unit, "total": top[1].total,
                                        "n": top[1].n}
        return {"bar": bar, "warnings": self._warnings[warnings_seen:]}


@dataclass(frozen=True)
class Channel:
    """What a worker process of a stage needs to stay off the console: the board's actor
    handle (None: report nothing) and the stage's log file (None: leave output alone)."""

    board: Any = None
    log_path: Path | None = None


_CURRENT: list[Channel] = []
"""The channels of the :func:`attached` blocks this process is in (innermost last)."""


def current() -> Channel | None:
    """The channel this process was attached to by its caller, if any."""
    return _CURRENT[-1] if _CURRENT else None


class _WarningsToBoard(logging.Handler):
    def __init__(self, board: Any):
        super().__init__(logging.WARNING)
        self.board = board

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.board.warn.remote(f"{record.name.removeprefix('recoup.')}: "
                                   f"{record.getMessage()}")
        except Exception:  # noqa: BLE001 - a lost warning must not fail the stage
            pass


@contextmanager
def _fds_into(path: Path) -> Iterator[None]:
    """This process's stdout and stderr (fds 1, 2, and Python's streams) append to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)


@contextmanager
def attached(channel: Channel | None, *, log_records: bool = True) -> Iterator[None]:
    """Run the block as a worker of the channel's stage (see the module docstring); a None
    channel changes nothing. ``log_records``: also write recoup's log records (INFO and
    up) into the log file; the stage task itself leaves that to ``run_stage_fn``."""
    if channel is None:
        yield
        return
    recoup_log = logging.getLogger("recoup")
    handlers: list[logging.Handler] = []
    saved = (recoup_log.level, recoup_log.propagate, os.environ.get("TQDM_MININTERVAL"))
    _CURRENT.append(channel)
    try:
        if channel.board is not None:
            handlers.append(_WarningsToBoard(channel.board))
        if channel.log_path is None:
            for h in handlers:
                recoup_log.addHandler(h)
            yield
            return
        os.environ["TQDM_MININTERVAL"] = str(WORKER_TQDM_INTERVAL_S)
        with _fds_into(channel.log_path):
            # records reach the file once: not again through the root logger's handlers
            recoup_log.propagate = False
            if log_records:
                records = logging.StreamHandler(sys.stderr)  # fd 2: the log file
                records.setFormatter(logging.Formatter(RECORD_FORMAT))
                handlers.append(records)
                recoup_log.setLevel(min(recoup_log.getEffectiveLevel(), logging.INFO))
            for h in handlers:
                recoup_log.addHandler(h)
            yield
    finally:
        _CURRENT.pop()
        for h in handlers:
            recoup_log.removeHandler(h)
        recoup_log.setLevel(saved[0])
        recoup_log.propagate = saved[1]
        if channel.log_path is not None:
            if saved[2] is None:
                os.environ.pop("TQDM_MININTERVAL", None)
            else:
                os.environ["TQDM_MININTERVAL"] = saved[2]


class _ReportingBar(tqdm):  # type: ignore[misc]
    """A tqdm bar that also sends its count to the board (at most every
    :data:`REPORT_INTERVAL_S`, and when it closes)."""

    def __init__(self, *args: Any, board: Any, key: str, **kwargs: Any):
        self._board, self._key = board, key
        self._sent, self._last = 0.0, 0.0
        super().__init__(*args, **kwargs)  # a disabled tqdm keeps no desc or unit: pass them
        board.open.remote(key, kwargs.get("desc") or key, kwargs.get("unit", "it"),
                          kwargs.get("total"), self.n)
        self._sent = self.n

    def _report(self, force: bool) -> None:
        now = time.monotonic()
        if self.n != self._sent and (force or now - self._last >= REPORT_INTERVAL_S):
            self._board.advance.remote(self._key, self.n - self._sent)
            self._sent, self._last = self.n, now

    def update(self, n: float | None = 1) -> bool | None:
        out = super().update(n)
        self._report(force=False)
        return out

    def close(self) -> None:
        if getattr(self, "_board", None) is not None and not getattr(self, "_closed", False):
            self._closed = True
            self._report(force=True)
            self._board.close.remote(self._key)
        super().close()


def bar(*, total: int | None, desc: str, unit: str, disable: bool = False,
        initial: int = 0, key: str | None = None) -> Any:
    """A progress bar (tqdm's API: ``update``, ``set_postfix``, ``close``) that draws where
    this process draws (the stage's log in a worker, the console in-process) and, in a
    worker attached to a board, also reports to the driver's bar. A disabled bar does
    neither (``recoup run --no-progress``)."""
    channel = current()
    if channel is None or channel.board is None or disable:
        return tqdm(total=total, desc=desc, unit=unit, disable=disable, initial=initial)
    return _ReportingBar(total=total, desc=desc, unit=unit, disable=disable, initial=initial,
                         board=channel.board, key=key or f"{desc}:{os.getpid()}:{time.time()}")


def open_shared(key: str, *, total: int, desc: str, unit: str) -> None:
    """Open a bar on the board that several workers :func:`advance` (no local drawing)."""
    channel = current()
    if channel is not None and channel.board is not None:
        channel.board.open.remote(key, desc, unit, total, 0)


def advance(key: str, n: int) -> None:
    """Add ``n`` to the board's bar ``key`` (no-op without a board)."""
    channel = current()
    if channel is not None and channel.board is not None:
        channel.board.advance.remote(key, n)


def close_shared(key: str) -> None:
    channel = current()
    if channel is not None and channel.board is not None:
        channel.board.close.remote(key)


class DriverDisplay:
    """The driver's side: one tqdm bar for the running stage, the workers' warnings once
    each, and (verbose) the stage's log file as it grows. Call :meth:`poll` often and
    :meth:`close` at the end."""

    def __init__(self, board: Any, *, stage: str, progress: bool, verbose: bool,
                 log_path: Path | None, seen_warnings: set[str]):
        self.board, self.stage = board, stage
        self.progress, self.verbose, self.log_path = progress, verbose, log_path
        self.seen = seen_warnings
        self._n_warnings = 0
        self._bar: Any = None
        self._key: str | None = None
        self._offset = log_path.stat().st_size if log_path and log_path.is_file() else 0

    def poll(self) -> None:
        import ray

        snap = ray.get(self.board.snapshot.remote(self._n_warnings))
        self._n_warnings += len(snap["warnings"])
        for message in snap["warnings"]:
            if message not in self.seen:
                self.seen.add(message)
                # a stage's own logger already names it ("evaluate: ..."); others get it
                named = message.split(":", 1)[0].split(".", 1)[0] == self.stage
                text = message if named else f"{self.stage}: {message}"
                tqdm.write(f"warning: {text}", file=sys.stderr)
        if self.verbose:
            self._tail()
        if self.progress:
            self._draw(snap["bar"])

    def _tail(self) -> None:
        if self.log_path is None or not self.log_path.is_file():
            return
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        if end:
            self._offset += end
            for line in chunk[:end].decode(errors="replace").splitlines():
                tqdm.write(f"  {self.stage} | {line.rsplit(chr(13), 1)[-1]}", file=sys.stderr)

    def _draw(self, state: dict[str, Any] | None) -> None:
        if state is None:
            return
        if state["key"] != self._key:
            if self._bar is not None:
                self._bar.close()
            self._key = state["key"]
            self._bar = tqdm(total=state["total"], desc=f"{self.stage}: {state['desc']}",
                             unit=state["unit"], leave=False, file=sys.stderr,
                             dynamic_ncols=True)
        step = state["n"] - self._bar.n
        if step > 0:
            self._bar.update(step)

    def close(self) -> None:
        try:
            self.poll()
        except Exception:  # noqa: BLE001 - the stage's own result matters, not the display
            pass
        if self._bar is not None:
            self._bar.close()
            self._bar = None
