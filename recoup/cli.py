"""Console entry point; the commands live in :mod:`recoup.orchestrator.cli`."""

from recoup.orchestrator.cli import main

__all__ = ["main"]
