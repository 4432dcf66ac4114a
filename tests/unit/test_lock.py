"""The run-directory lock: one live holder; stale locks of dead processes are taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from recoup.orchestrator.lock import LOCK_NAME, LockHeldError, RunLock


def test_second_holder_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps(
            {"pid": child.pid, "host": socket.gethostname(), "since": 0}))
        with pytest.raises(LockHeldError, match=f"in use by pid {child.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        child.kill()
        child.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"pid": child.pid, "host": socket.gethostname(), "since": 0}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_is_exclusive_within_a_process(tmp_path: Path) -> None:
    with RunLock(tmp_path), pytest.raises(LockHeldError):
        RunLock(tmp_path).acquire()
