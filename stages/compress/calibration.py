"""Calibration token windows for pruning: text from any data source, seeded windows.

Wanda and SparseGPT need a few hundred thousand tokens of representative text. Here the
source's samples (prompt + response) are joined with blank lines, tokenized once, and
``num_samples`` windows of ``seq_len`` tokens start at seeded random offsets. Nothing is
hard-coded: count, length and seed come from the config.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.rundir import check_text_file, resolve_data_file
from recoup.stages.text.datasources import AlpacaSourceConfig, SourceConfig, load_samples
from recoup.stages.text.generation import SYNTHETIC_FILE


class CalibrationConfig(StrictModel):
    data: SourceConfig = Field(
        AlpacaSourceConfig(path=Path("alpaca/train.jsonl")),
        description="Data source of calibration text (relative paths: from the data dir).",
    )
    num_samples: int = Field(32, ge=1, description="Calibration windows.")
    seq_len: int = Field(256, ge=8, description="Tokens per calibration window.")
    seed: int = Field(0, description="Seed of the window offsets.")


def resolve_source_paths(data: Any, data_dir: Path | Callable[[], Path], *,
                         synthesized: Path | None = None, field: str = "data.source") -> Any:
    """Relative ``path`` fields of a source config are read from the data dir.

    ``data_dir`` may be a function, called only when a relative path needs it: a data-free
    run need not have a data folder.
    A ``synthetic`` source without a path reads this run's synthesize stage output
    (``synthesized``: that stage's folder, when it is in the pipeline).
    """
    path = getattr(data, "path", None)
    if getattr(data, "source", None) == "synthetic" and path is None:
        if synthesized is None:
            raise ValueError(f"{field} is 'synthetic' without a path, so it reads this run's "
                             "synthesize stage; add synthesize to run.pipeline before this stage")
        return data.model_copy(update={"path": synthesized / SYNTHETIC_FILE})
    if isinstance(path, Path) and not path.is_absolute():
        folder = data_dir() if callable(data_dir) else data_dir
        resolved = resolve_data_file(str(path), folder)  # warns if it leaves the data dir
        assert resolved is not None
        check_text_file(resolved, f"{field}.path")
        return data.model_copy(update={"path": folder / path})
    if isinstance(path, Path):
        check_text_file(path, f"{field}.path")
    return data


def calibration_ids(cfg: CalibrationConfig, tokenizer: Any, data_dir: Path | Callable[[], Path],
                    *, max_positions: int, synthesized: Path | None = None,
                    field: str = "degrade.calibration") -> torch.Tensor:
    """(num_samples, seq_len) token ids drawn from the configured text."""
    if cfg.seq_len > max_positions:
        raise ValueError(
            f"{field}.seq_len={cfg.seq_len} is longer than the model allows "
            f"({max_positions} positions)"
        )
    samples = load_samples(resolve_source_paths(cfg.data, data_dir, synthesized=synthesized,
                                                field=f"{field}.data"))
    text = "\n\n".join(s.prompt + s.response for s in samples)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if ids.numel() <= cfg.seq_len:
        raise ValueError(
            f"calibration text has {ids.numel()} tokens, not enough for windows of "
            f"{field}.seq_len={cfg.seq_len}"
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, ids.numel() - cfg.seq_len, (cfg.num_samples,), generator=gen)
    return torch.stack([ids[s:s + cfg.seq_len] for s in starts.tolist()])  # (N, seq_len)
