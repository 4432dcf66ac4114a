"""Logging set-up shared by the driver and the processes that run stages."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_console(level: int = logging.INFO, *, verbose: bool = True) -> None:
    """recoup's records at ``level`` and up go to the log files; the console shows them too
    when ``verbose``, else only warnings and errors (the runner prints one line per stage
    state itself, and the details are in ``RUN/logs/``)."""
    root = logging.getLogger("recoup")
    root.setLevel(level)
    shown = level if verbose else max(level, logging.WARNING)
    for h in root.handlers:
        if getattr(h, "_recoup_console", False):
            h.setLevel(shown)
            return
    h = logging.StreamHandler()
    h.setLevel(shown)
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
