"""One run per run directory: an exclusive lock file that knows its holder.

The lock file is created with O_EXCL, so two processes can't both take it. A lock whose
holder process is gone (same host, pid no longer alive) is stale: a SIGKILLed run must
not block its own restart, so a stale lock is taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType

LOCK_NAME = ".lock"
log = logging.getLogger("recoup.lock")


class LockHeldError(RuntimeError):
    """Another live process holds the run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_holder(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / LOCK_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def holder_alive(holder: dict | None) -> bool:
    if not holder:
        return False
    if holder.get("host") != socket.gethostname():
        return True  # can't check another host's processes: assume alive
    return _pid_alive(int(holder.get("pid", -1)))


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_holder(self.path.parent)
                if holder_alive(holder):
                    since = time.strftime("%Y-%m-%d %H:%M:%S",
                                          time.localtime(float(holder.get("since", 0))))
                    raise LockHeldError(
                        f"run directory {self.path.parent} is in use by pid {holder['pid']} on "
                        f"{holder['host']} since {since}; wait for it to finish or stop it "
                        f"(lock file: {self.path})"
                    ) from None
                log.warning("taking over a stale lock %s left by %s", self.path, holder)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            return
        raise LockHeldError(f"could not take the lock {self.path}; another run raced for it")

    def release(self) -> None:
        holder = read_holder(self.path.parent)
        if holder and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
