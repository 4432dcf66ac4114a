"""The degrade stage through the runner: every method, its report, masks and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recoup.orchestrator.config import ConfigError
from recoup.orchestrator.runner import StageFailedError, run_pipeline
from recoup.stages.model import layout, modelio
from tests.conftest import tiny_config

CALIB = {"num_samples": 4, "seq_len": 32, "data": {"source": "alpaca",
                                                   "path": "alpaca/train.jsonl",
                                                   "num_samples": 40}}


def _degrade(tmp_path: Path, data_dir: Path, name: str, **degrade):  # noqa: ANN003, ANN202
    cfg = tiny_config(tmp_path / name, data_dir, run={"pipeline": ["prepare", "degrade"]},
                      degrade={"calibration": CALIB, **degrade})
    out = run_pipeline(cfg, progress=False, echo=lambda s: None)
    return out.metrics["degrade"], tmp_path / name / "degrade"


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4"),
                                            ("magnitude", "4:8")])
def test_pruning_methods_write_model_masks_and_report(tmp_path: Path, data_dir: Path,
                                                      method: str, pattern: str) -> None:
    metrics, out = _degrade(tmp_path, data_dir, method, method=method, pattern=pattern)
    assert metrics["linear_sparsity"] == pytest.approx(0.5, abs=1e-3)
    report = json.loads((out / "sparsity.json").read_text())
    model = modelio.load_model(out / "model", torch.float32)
    names = layout.linear_weight_names(model)
    assert sorted(report["matrices"]) == sorted(names)
    masks = load_file(str(out / "masks.safetensors"))
    params = dict(model.named_parameters())
    for name in names:
        assert torch.equal(masks[name], params[name] != 0), name
    if pattern != "unstructured":
        assert metrics["nm_valid"] is True
        assert all(r["nm_valid"] for r in report["matrices"].values())


def test_rtn_quantizes_without_masks(tmp_path: Path, data_dir: Path) -> None:
    metrics, out = _degrade(tmp_path, data_dir, "rtn", method="rtn", bits=4, group_size=16)
    assert not (out / "masks.safetensors").exists()
    model = modelio.load_model(out / "model", torch.float32)
    w = model.model.layers[0].self_attn.q_proj.weight.detach()
    groups = w.view(w.shape[0], -1, 16)  # (out, in/16, 16)
    distinct = max(len(torch.unique(g)) for g in groups.reshape(-1, 16))
    assert distinct <= 16
    assert metrics["linear_sparsity"] < 0.2


def test_given_model_is_checked_and_its_masks_derived(tmp_path: Path, data_dir: Path) -> None:
    _, first = _degrade(tmp_path, data_dir, "src", method="magnitude")
    metrics, out = _degrade(tmp_path, data_dir, "given", method="given",
                            given_path=str(first / "model"))
    assert metrics["linear_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert load_file(str(out / "masks.safetensors")).keys() == \
        load_file(str(first / "masks.safetensors")).keys()

    other, tok = modelio.build_tiny_llama(modelio.TinyLlamaConfig(hidden=32, heads=2, kv_heads=1),
                                          torch.float32)
    modelio.save_model(other, tok, tmp_path / "other")
    with pytest.raises(StageFailedError, match="has shape .* the dense model has"):
        _degrade(tmp_path, data_dir, "bad", method="given", given_path=str(tmp_path / "other"))


def test_calibration_longer_than_the_model_is_refused(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(StageFailedError, match="longer than the model allows"):
        _degrade(tmp_path, data_dir, "long", method="wanda",
                 calibration={**CALIB, "seq_len": 4096})


def test_unknown_method_names_the_known_ones(tmp_path: Path, data_dir: Path) -> None:
    # refused when the config is loaded, before any stage runs
    with pytest.raises(ConfigError, match="unknown; choose one of .*sparsegpt"):
        _degrade(tmp_path, data_dir, "unknown", method="obs")
