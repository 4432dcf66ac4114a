"""Every shipped SmolLM2 config gets past its data stage: the samples it asks for fit its
``data.max_length`` under the real tokenizer.

The reference config once asked for 2000 Alpaca samples at ``max_length: 384``, where only
1791 fit; its data stage refused after the model had been prepared and degraded, and no
test had noticed because nothing ran it. This selects each config's samples the way the
data stage does (seconds: tokenizing, no model), so a config that cannot run fails here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from recoup.orchestrator.config import load_config
from recoup.orchestrator.runconfig import RunConfig
from recoup.stages.data import select_samples
from recoup.stages.model import modelio

pytestmark = pytest.mark.real

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
#: sources written by an earlier stage of the run itself (synthesize), not read from files
GENERATED = {"synthetic"}


def _file_sourced() -> list[Path]:
    out = []
    for path in sorted(CONFIGS.glob("smollm2-*.yaml")):
        cfg = load_config(RunConfig, path)
        if "data" in cfg.run.pipeline and cfg.data.source.source not in GENERATED:
            out.append(path)
    return out


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    gguf = modelio.smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def test_the_shipped_configs_are_found() -> None:
    names = {p.name for p in _file_sourced()}
    assert {"smollm2-recover.yaml", "smollm2-recover-reference.yaml"} <= names, names


@pytest.mark.parametrize("path", _file_sourced(), ids=lambda p: p.stem)
def test_the_asked_samples_fit(path: Path, tokenizer: Any, data_dir: Path) -> None:
    cfg = load_config(RunConfig, path)
    assert cfg.prepare.source == modelio.SMOLLM2_ALIAS, "the tokenizer here is SmolLM2's"
    chosen, stats = select_samples(cfg.data, tokenizer, data_dir)
    if cfg.data.source.num_samples is not None:
        assert len(chosen) == cfg.data.source.num_samples
    assert stats["tokens_max"] <= cfg.data.max_length
