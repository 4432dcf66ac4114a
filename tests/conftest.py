"""Shared fixtures: the data directory and tiny run configs built in code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from recoup.orchestrator.config import validate
from recoup.orchestrator.runconfig import DATA_DIR_ENV, RunConfig

REPO = Path(__file__).resolve().parent.parent


def tiny_pruned_llama() -> Any:
    """A tiny random Llama with half of every projection weight zeroed (seed 0), frozen:
    the degraded model of the LoRA and compensation unit tests."""
    import torch

    from recoup.stages.model import modelio

    torch.manual_seed(0)
    model, _ = modelio.build_tiny_llama(modelio.TinyLlamaConfig(), torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_((torch.rand(p.shape) > 0.5).float())
    return model.requires_grad_(False).eval()


def find_data_dir() -> Path:
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else (REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = find_data_dir()
    if not (d / "wikitext2" / "wiki.test.raw").is_file():
        pytest.fail(f"test data not found in {d}; set {DATA_DIR_ENV}")
    return d


def tiny_config(run_dir: Path, data_dir: Path, **sections: dict[str, Any]) -> RunConfig:
    """A run config for the random tiny Llama, in-process, small evaluation windows, no
    zero-shot tasks (tests of zero-shot evaluation set ``evaluate.zeroshot`` themselves)."""
    data: dict[str, Any] = {
        "run": {"dir": str(run_dir), "data_dir": str(data_dir)},
        "cluster": {"mode": "inprocess"},
        "prepare": {"source": "tiny-llama"},
        "degrade": {"method": "magnitude", "sparsity": 0.5},
        "evaluate": {"seq_len": 64, "max_windows": 4, "batch_size": 2,
                     "zeroshot": {"tasks": []}},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return validate(RunConfig, data, source="test")
