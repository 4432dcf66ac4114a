"""Bad input through `recoup run`: one clear sentence, a non-zero exit, nothing half-written.

Each case writes a config for the tiny Llama with one thing wrong and runs the CLI entry
point in this process (the same ``main`` the console script calls). The error must name
the offending field, file or value; the exit status is 2 for a config the loader refuses
and 1 for a stage that fails on its input; and the run directory must hold no manifest
for the failed stage and no staging or temporary leftovers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from recoup.orchestrator.cli import EXIT_FAILED, EXIT_USAGE, main
from recoup.orchestrator.store import FAILED, MANIFEST, TMP_MARK
from recoup.stages.model import modelio


def _gpt2_folder(root: Path) -> Path:
    """A tiny GPT-2: a causal LM that recoup does not handle (no Llama-layout blocks)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = root / "gpt2"
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(modelio.byte_tokenizer()))
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    modelio.byte_tokenizer().save_pretrained(folder)
    return folder


def _other_llama(root: Path) -> Path:
    """A Llama with a different width than the run's tiny dense model."""
    model, tok = modelio.build_tiny_llama(modelio.TinyLlamaConfig(hidden=32, heads=2,
                                                                  kv_heads=1), torch.float32)
    folder = root / "other"
    modelio.save_model(model, tok, folder)
    return folder


def _empty_jsonl(root: Path) -> Path:
    path = root / "empty.jsonl"
    path.write_text("")
    return path


# (name, config sections, setup returning extra sections, exit code, message, failed stage)
CASES: list[tuple[str, dict[str, Any], Any, int, str, str | None]] = [
    ("missing model path", {"prepare": {"source": "/nonexistent/model"}}, None,
     EXIT_FAILED, "prepare.source '/nonexistent/model' is neither", "prepare"),
    ("unsupported architecture", {}, lambda r: {"prepare": {"source": str(_gpt2_folder(r))}},
     EXIT_FAILED, "model type 'gpt2' is not supported", "prepare"),
    ("dense and degraded do not match", {},
     lambda r: {"degrade": {"method": "given", "given_path": str(_other_llama(r))}},
     EXIT_FAILED, "the dense model has", "degrade"),
    ("missing data file",
     {"run": {"pipeline": ["prepare", "data"]},
      "data": {"source": {"source": "alpaca", "path": "nope/train.jsonl"}, "triplets": False}},
     None, EXIT_FAILED, "nope/train.jsonl does not exist", "data"),
    ("empty dataset", {"run": {"pipeline": ["prepare", "data"]}},
     lambda r: {"data": {"source": {"source": "jsonl", "path": str(_empty_jsonl(r))},
                         "triplets": False}},
     EXIT_FAILED, "empty.jsonl holds no records", "data"),
    ("too-short dataset",
     {"run": {"pipeline": ["prepare", "data"]},
      "data": {"source": {"source": "alpaca", "path": "alpaca/train.jsonl",
                          "num_samples": 10_000_000}, "triplets": False}},
     None, EXIT_FAILED, "data.source.num_samples=10000000", "data"),
    ("tokenizer without a chat template",
     {"run": {"pipeline": ["prepare", "synthesize"]},
      "synthesize": {"mode": "chat", "num_samples": 2}},
     None, EXIT_FAILED, "needs a tokenizer with a chat template", "synthesize"),
    ("synthetic source without its stage",
     {"run": {"pipeline": ["prepare", "data"]},
      "data": {"source": {"source": "synthetic"}, "triplets": False}},
     None, EXIT_FAILED, "add synthesize to run.pipeline", "data"),
    ("sparsity out of range", {"degrade": {"sparsity": 1.5}}, None,
     EXIT_USAGE, "degrade.sparsity", None),
    ("bad N:M pattern", {"degrade": {"pattern": "5:4"}}, None, EXIT_USAGE, "5:4", None),
    ("rank out of range", {"train": {"lora": {"rank": 0}}}, None, EXIT_USAGE, "rank", None),
    ("unknown key", {"degrade": {"sparsty": 0.5}}, None, EXIT_USAGE, "sparsty", None),
]


@pytest.fixture(autouse=True)
def _own_console_handler() -> Any:
    """``main`` adds a console handler bound to this test's captured stderr; drop it after,
    or the next test's records go to a closed stream."""
    logger = logging.getLogger("recoup")
    before = list(logger.handlers)
    yield
    for h in logger.handlers[:]:
        if h not in before:
            logger.removeHandler(h)


def _config(tmp_path: Path, data_dir: Path, sections: dict[str, Any]) -> Path:
    data: dict[str, Any] = {
        "run": {"dir": str(tmp_path / "run"), "data_dir": str(data_dir),
                "pipeline": ["prepare", "degrade"]},
        "cluster": {"mode": "inprocess"},
        "prepare": {"source": "tiny-llama"},
        "degrade": {"method": "magnitude", "sparsity": 0.5},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(("sections", "setup", "code", "message", "stage"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_sentence_and_nothing_half_written(
        tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str],
        sections: dict[str, Any], setup: Any, code: int, message: str,
        stage: str | None) -> None:
    extra = setup(tmp_path) if setup else {}
    merged = {k: {**sections.get(k, {}), **extra.get(k, {})} for k in {*sections, *extra}}
    rc = main(["run", str(_config(tmp_path, data_dir, merged)), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == code, err
    lines = [line for line in err.splitlines() if line.startswith("recoup: error:")]
    assert len(lines) == 1, err
    # the sentence is on the error line; a config error lists its problems under it
    assert message in err[err.index(lines[0]):], err
    assert "Traceback" not in err
    run_dir = tmp_path / "run"
    if stage is None:  # refused before anything ran
        assert not (run_dir / "prepare" / MANIFEST).exists()
        return
    assert not (run_dir / stage / MANIFEST).exists()
    failed = json.loads((run_dir / stage / FAILED).read_text())
    assert message.split("=")[0] in failed["error"]
    leftovers = [p for p in run_dir.rglob("*") if TMP_MARK in p.name or p.name == ".lock"]
    assert not leftovers, leftovers
