"""One run per run directory: an exclusive lock file that knows its holder.

The lock file is created with O_EXCL, so two processes can't both take it. A lock whose
holder process is gone is stale: a SIGKILLed run must not block its own restart, so a
stale lock is taken over with a warning. The holder is recorded as host, boot id, pid
and the process's start time, because a pid alone is reused: after a reboot, or once
the pid counter wraps, another process may carry the dead holder's pid, and a lock that
only knew the pid would then block forever. A lock file that cannot be read (empty, not
JSON, a list, a pid that is not a number: a crash while it was written, or damage) has no
live holder to name; it is taken over too, once it is old enough not to be a lock that
another run is writing at this instant.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

LOCK_NAME = ".lock"
#: a lock file this much younger than now that cannot be read may be being written
_FRESH_S = 2.0
log = logging.getLogger("recoup.lock")


class LockHeldError(RuntimeError):
    """Another live process holds the run directory."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def boot_id() -> str | None:
    """This boot of the machine (Linux); None where the system does not say."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux ``/proc``); None where
    unknown. With the boot id it tells a live holder from a later process with its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def holder_identity() -> dict[str, Any]:
    """What a lock or a running-stage marker records about the process that writes it."""
    me: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    if (b := boot_id()) is not None:
        me["boot_id"] = b
    if (start := process_start(os.getpid())) is not None:
        me["start"] = start
    return me


def _valid_holder(obj: Any) -> dict[str, Any] | None:
    """The holder record if it has the shape one has (a JSON object with an integer pid and
    a host name), else None."""
    if not isinstance(obj, dict):
        return None
    pid, host = obj.get("pid"), obj.get("host")
    if not isinstance(pid, int) or isinstance(pid, bool) or not isinstance(host, str):
        return None
    return obj


def read_holder(run_dir: Path) -> dict[str, Any] | None:
    """The lock's holder record; None when there is no lock or it cannot be read."""
    try:
        return _valid_holder(json.loads((run_dir / LOCK_NAME).read_text()))
    except (OSError, ValueError):
        return None


def holder_alive(holder: Any) -> bool:
    """Whether the process a lock or marker names still runs. Another host's processes
    cannot be checked: assumed alive. On this host: the same boot, the pid alive, and (when
    both are known) the same start time."""
    holder = _valid_holder(holder)
    if holder is None:
        return False
    if holder["host"] != socket.gethostname():
        return True
    if holder.get("boot_id") is not None and boot_id() is not None \
            and holder["boot_id"] != boot_id():
        return False
    if not _pid_alive(holder["pid"]):
        return False
    start = holder.get("start")
    if isinstance(start, int) and not isinstance(start, bool):
        now = process_start(holder["pid"])
        if now is not None and now != start:
            return False
    return True


def _since(holder: dict[str, Any]) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
    except (TypeError, ValueError, OverflowError, OSError):
        return "an unknown time"


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME

    def _unreadable_is_fresh(self) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime < _FRESH_S
        except OSError:
            return False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = holder_identity()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_holder(self.path.parent)
                if holder is None and self._unreadable_is_fresh():
                    time.sleep(_FRESH_S)  # another run may be writing it right now
                    holder = read_holder(self.path.parent)
                if holder_alive(holder):
                    assert holder is not None
                    raise LockHeldError(
                        f"run directory {self.path.parent} is in use by pid {holder['pid']} on "
                        f"{holder['host']} since {_since(holder)}; wait for it to finish or "
                        f"stop it (lock file: {self.path})"
                    ) from None
                if holder is None:
                    log.warning("taking over the unreadable lock file %s (damaged, or left by "
                                "a crash while it was written)", self.path)
                else:
                    log.warning("taking over a stale lock %s left by %s", self.path, holder)
                self.path.unlink(missing_ok=True)
                continue
            # Not store.atomic_path: its rename would replace a lock another run just
            # took; O_EXCL creation is what makes taking the lock exclusive.
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
