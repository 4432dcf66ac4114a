"""Logging set-up shared by the driver and the processes that run stages."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_console(level: int = logging.INFO) -> None:
    root = logging.getLogger("recoup")
    root.setLevel(level)
    if not any(getattr(h, "_recoup_console", False) for h in root.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        h._recoup_console = True  # type: ignore[attr-defined]
        root.addHandler(h)


@contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Copy recoup's log records into ``path`` for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger("recoup")
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
