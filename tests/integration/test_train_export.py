"""Recovery training and export on the tiny random Llama, end to end on CPU.

The upstream folders are built once per module: prepare and degrade through the real
runner, and the data / svd / select outputs written by hand in their documented formats
(samples.parquet from the Alpaca file; V from ``svd_directions`` of random deltas; chosen
heads listed), so these tests exercise train and export only. The stage functions are
called with a real :class:`RunConfig` and :class:`StageContext`, as the runner would.

DeepSpeed runs on its CPU accelerator with gloo: in-process (world size 1) for most tests,
and with 2 Ray Train workers under ZeRO-3 in one default test (ZeRO-2 in a slow one).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from recoup.cluster.train import CrashHook, TrainingStopped, run_training
from recoup.cluster.train_state import CHECKPOINTS, LOG, read_log
from recoup.orchestrator.runconfig import RunConfig
from recoup.orchestrator.runner import run_pipeline
from recoup.orchestrator.stage import DataDir, Metrics, StageContext
from recoup.stages.degrade import MASKS
from recoup.stages.export import ADAPTER_DIR, export_stage, merge_lora
from recoup.stages.lcc import activations
from recoup.stages.lcc.compensation import Compensation, attach
from recoup.stages.lcc.directions import lost_component, svd_directions
from recoup.stages.lcc.heads import split_heads
from recoup.stages.model import modelio
from recoup.stages.prepare import CARD, MODEL_DIR
from recoup.stages.recovery.batching import collate
from recoup.stages.recovery.losses import response_cross_entropy
from recoup.stages.recovery.recovery_model import LCC_FILE, LORA_DIR, load_recovered
from recoup.stages.recovery.task import build_model, build_task
from recoup.stages.scoring.sparsity import linear_sparsity
from recoup.stages.text.datasources import AlpacaSourceConfig, load_samples
from recoup.stages.text.triplets import write_parquet
from recoup.stages.train import PARAMS_DIR, build_job, train_stage
from tests.conftest import REPO, tiny_config

os.environ.setdefault("DS_ACCELERATOR", "cpu")

CHOSEN = [[0, 1], [1, 0], [1, 3]]
N_SAMPLES = 12
N_COLLECTED = 24
ENGINE = {"micro_batch": 2, "grad_accum": 2, "steps": 6, "lr": 1e-2, "warmup_steps": 1,
          "checkpoint_every": 2, "workers": 2}
TRAIN = {"max_seq_len": 320, "max_samples": N_SAMPLES,
         "lora": {"layers": [1], "rank": 4, "alpha": 8.0}}


@dataclass(frozen=True)
class Upstream:
    root: Path
    data_dir: Path

    @property
    def inputs(self) -> dict[str, Path]:
        return {n: self.root / n
                for n in ("prepare", "degrade", "data", "collect", "svd", "select")}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Upstream:
    return _build_upstream(tmp_path_factory.mktemp("upstream"), data_dir, "float32")


@pytest.fixture(scope="module")
def upstream_bf16(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Upstream:
    """The same, prepared in bfloat16 (as the llama-13b / 70b configs run)."""
    return _build_upstream(tmp_path_factory.mktemp("upstream-bf16"), data_dir, "bfloat16")


def _build_upstream(root: Path, data_dir: Path, dtype: str) -> Upstream:
    cfg = tiny_config(root, data_dir, run={"pipeline": ["prepare", "degrade"]},
                      prepare={"source": "tiny-llama", "dtype": dtype})
    run_pipeline(cfg, progress=False, echo=lambda s: None)
    samples = load_samples(AlpacaSourceConfig(path=data_dir / "alpaca/train.jsonl",
                                              num_samples=N_SAMPLES))
    write_parquet(samples, root / "data" / "samples.parquet")
    card = modelio.ModelCard.read(root / "prepare" / CARD)
    (root / "svd").mkdir()
    gen = torch.Generator().manual_seed(0)
    ids = [f"s{i:02d}" for i in range(N_COLLECTED)]
    for layer in range(card.layers):
        # collect format: prompt activations of both models; svd of their difference
        dense = torch.randn(N_COLLECTED, card.heads * card.d_head, generator=gen)
        degraded = dense - 0.3 - 0.1 * torch.randn(dense.shape, generator=gen)
        activations.write_layer_shard(activations.shard_file(root / "collect", layer, 0),
                                      ids * 2, ["dense_q"] * N_COLLECTED
                                      + ["degraded_q"] * N_COLLECTED,
                                      torch.cat([dense, degraded]), "float32")
        delta = split_heads(dense - degraded, card.heads)  # (N, heads, d_head)
        vs = [svd_directions(delta[:, h]) for h in range(card.heads)]
        save_file({"V": torch.stack([v for v, _ in vs]), "S": torch.stack([s for _, s in vs])},
                  str(root / "svd" / f"layer={layer:02d}.safetensors"))
    activations.mark_shard_done(root / "collect", 0, {"samples": N_COLLECTED})
    (root / "select").mkdir()
    (root / "select" / "heads.json").write_text(json.dumps({"method": "hand", "chosen": CHOSEN}))
    return Upstream(root, data_dir)


def _config(up: Upstream, *, mode: str = "inprocess", **train: Any) -> RunConfig:
    section = {**TRAIN, **train, "engine": {**ENGINE, **train.get("engine", {})}}
    return tiny_config(up.root, up.data_dir, cluster={"mode": mode, "num_cpus": 2},
                       train=section)


def _ctx(name: str, cfg: RunConfig, out: Path, inputs: dict[str, Path]) -> StageContext:
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(name=name, run_dir=out.parent, out_dir=out, inputs=inputs,
                        config=getattr(cfg, name), fingerprint=f"test-{name}", upstream={},
                        device=cfg.run.device, data_dir=DataDir(cfg.run.data_dir),
                        cluster=cfg.cluster, progress=False)


def _train_and_export(up: Upstream, out: Path, cfg: RunConfig) -> tuple[Metrics, Metrics]:
    trained = train_stage(_ctx("train", cfg, out / "train", up.inputs))
    inputs = {"prepare": up.root / "prepare", "degrade": up.root / "degrade",
              "train": out / "train"}
    exported = export_stage(_ctx("export", cfg, out / "export", inputs))
    return trained, exported


def _batch(up: Upstream, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """Every training sample as one batch, as the training task encodes them."""
    job, _ = build_job(_ctx("train", cfg, up.root / "unused", up.inputs))
    return collate(job.samples, job.pad_id)


def _degraded(up: Upstream) -> Any:
    return modelio.load_model(up.root / "degrade" / MODEL_DIR, torch.float32)


def _assert_zero_counts_unchanged(up: Upstream, exported: Any) -> None:
    degraded = dict(_degraded(up).named_parameters())
    params = dict(exported.named_parameters())
    masks = load_file(str(up.root / "degrade" / MASKS))
    assert masks, "the tiny model was not pruned"
    for name, keep in masks.items():
        before = int((degraded[name] == 0).sum())
        # an unmerged adapter (merge: none) wraps its linear: the weight is its base_layer's
        w = params.get(name, params.get(name.replace(".weight", ".base_layer.weight")))
        assert w is not None, name
        assert int((w == 0).sum()) == before, name
        assert (w[~keep] == 0).all(), name


@torch.no_grad()
def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@torch.no_grad()
def _trained_logits(up: Upstream, params: Path, batch: dict[str, torch.Tensor], *,
                    masked: bool = True) -> torch.Tensor:
    """Logits of the trained model: the degraded model with the saved parameters attached
    as training runs them (compensation hooks, masked adapters, nothing merged)."""
    trained = load_recovered(_degraded(up), params, n_heads=4,
                             masks_file=up.root / "degrade" / MASKS, masked=masked)
    return trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def _exported(out: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out / "export" / MODEL_DIR,
                                                dtype=torch.float32).eval()


# --------------------------------------------------------------------------- tests


def test_lcc_lowers_the_loss_and_exports_a_plain_checkpoint(upstream: Upstream,
                                                            tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = _config(upstream, method="lcc", engine={"zero_stage": 2})
    trained, exported_m = _train_and_export(upstream, tmp_path, cfg)
    card = modelio.ModelCard.read(upstream.root / "prepare" / CARD)
    assert trained["trainable_params"] == len(CHOSEN) * 2 * card.d_head
    assert exported_m["trainable_params"] == trained["trainable_params"]
    assert exported_m["trainable_fraction"] == pytest.approx(
        trained["trainable_params"] / card.parameters)
    log = read_log(tmp_path / "train" / LOG)
    assert [r["step"] for r in log] == list(range(1, 7))
    assert all({"loss", "lr", "tokens"} <= r.keys() for r in log)

    batch = _batch(upstream, cfg)
    comp = Compensation.from_state(load_file(str(tmp_path / "train" / PARAMS_DIR / LCC_FILE)),
                                   n_heads=card.heads)
    assert comp.chosen == sorted(tuple(h) for h in CHOSEN)
    degraded = _degraded(upstream)
    before = response_cross_entropy(_logits(degraded, batch), batch["input_ids"],
                                    batch["target_mask"])
    hooks = attach(degraded, comp)
    hooked = _logits(degraded, batch)
    hooks.remove()
    after = response_cross_entropy(hooked, batch["input_ids"], batch["target_mask"])
    assert float(after) < float(before) - 1e-3, (float(before), float(after))

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / MODEL_DIR,
                                                    dtype=torch.float32).eval()
    assert exported.config.attention_bias is True
    attn = exported.model.layers[0].self_attn
    assert attn.q_proj.bias.abs().max() == 0 and attn.o_proj.bias.abs().max() > 0
    assert (_logits(exported, batch) - hooked).abs().max() < 1e-4
    _assert_zero_counts_unchanged(upstream, exported)
    assert not (tmp_path / "export" / ADAPTER_DIR).exists()


def test_lcc_lora_on_two_ray_workers_with_zero3(upstream: Upstream, tmp_path: Path) -> None:
    """2 Ray Train workers (gloo) under ZeRO-3: the stage starts and stops its own Ray."""
    import ray
    from peft import PeftModel

    cfg = _config(upstream, mode="ray", method="lcc+lora", engine={"zero_stage": 3})
    try:
        trained, exported_m = _train_and_export(upstream, tmp_path, cfg)
    finally:
        assert not ray.is_initialized()
    assert trained["world_size"] == 2 and trained["zero_stage"] == 3
    assert trained["lora_layers"] == [1] and trained["lcc_heads"] == len(CHOSEN)
    assert exported_m["lora_merged_modules"] == 7

    batch = _batch(upstream, cfg)
    params = tmp_path / "train" / PARAMS_DIR
    merged, _ = merge_lora(_degraded(upstream), params / LORA_DIR,
                           upstream.root / "degrade" / MASKS)
    comp = Compensation.from_state(load_file(str(params / LCC_FILE)), n_heads=4)
    hooks = attach(merged, comp)
    reference = _logits(merged, batch)
    hooks.remove()
    exported = modelio.load_model(tmp_path / "export" / MODEL_DIR, torch.float32)
    assert (_logits(exported, batch) - reference).abs().max() < 1e-4
    assert (_logits(exported, batch) - _trained_logits(upstream, params, batch)).abs().max() \
        < 1e-4
    _assert_zero_counts_unchanged(upstream, exported)
    # The adapter was trained (B moved off its zero init) and loads on the degraded model.
    adapter = PeftModel.from_pretrained(_degraded(upstream), tmp_path / "export" / ADAPTER_DIR)
    lora_b = [p for n, p in adapter.named_parameters() if "lora_B" in n]
    assert lora_b and max(float(p.abs().max()) for p in lora_b) > 0


@pytest.mark.parametrize("zero_stage", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_resume_after_a_stop_ends_where_an_uninterrupted_run_ends(
        upstream: Upstream, tmp_path: Path, zero_stage: int) -> None:
    # length-grouped batches: the order a resume must reproduce is the grouped one
    cfg = _config(upstream, method="lcc", engine={"zero_stage": zero_stage,
                                                  "group_by_length": True})
    job, _ = build_job(_ctx("train", cfg, tmp_path / "unused", upstream.inputs))

    def train(out: Path, stop: int | None = None) -> dict[str, Any]:
        return run_training(make_task=build_task, task_spec=job, engine=cfg.train.engine,
                            cluster=cfg.cluster, device="cpu", out_dir=out, fingerprint="job",
                            progress=False, stop_after_steps=stop)

    whole = train(tmp_path / "whole")
    with pytest.raises(TrainingStopped):
        train(tmp_path / "killed", stop=5)  # last checkpoint: step 4; step 5 is lost
    assert json.loads((tmp_path / "killed" / CHECKPOINTS / "latest.json").read_text())["step"] == 4
    resumed = train(tmp_path / "killed")
    assert resumed["resumed_from"] == 4
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-5, abs=1e-6)
    a = read_log(tmp_path / "whole" / LOG)
    b = read_log(tmp_path / "killed" / LOG)
    assert [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-6)
        assert y["lr"] == pytest.approx(x["lr"])
    pa = load_file(str(tmp_path / "whole" / PARAMS_DIR / LCC_FILE))
    pb = load_file(str(tmp_path / "killed" / PARAMS_DIR / LCC_FILE))
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], atol=1e-6, rtol=1e-5)


def _assert_same_training(a: Path, b: Path) -> None:
    """The loss of every step and the trained parameters of two runs agree (float noise
    only: a Ray worker runs torch on fewer threads than this process)."""
    la, lb = read_log(a / LOG), read_log(b / LOG)
    assert [r["step"] for r in lb] == [r["step"] for r in la]
    for x, y in zip(la, lb, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-6)
        assert y["lr"] == pytest.approx(x["lr"])
    pa = load_file(str(a / PARAMS_DIR / LCC_FILE))
    pb = load_file(str(b / PARAMS_DIR / LCC_FILE))
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("workers", "zero_stage"), [
    (1, 2), pytest.param(2, 3, marks=pytest.mark.slow)])
def test_a_killed_ray_train_worker_restarts_from_the_last_checkpoint(
        upstream: Upstream, tmp_path: Path, workers: int, zero_stage: int) -> None:
    """A Ray Train worker process ends itself (``os._exit``, no cleanup) after step 3 of 6;
    Ray Train restarts the worker group (``cluster.train_max_failures``), the loop resumes
    from the step-2 checkpoint, and the run ends with the losses and trained parameters of
    an uninterrupted run. One worker: the reference runs in-process (same world size, so
    the same data order and seeds), keeping the default test to one Ray start; the slow
    case kills one of 2 ZeRO-3 workers and compares with an uninterrupted 2-worker run."""
    cfg = _config(upstream, mode="ray", method="lcc",
                  engine={"zero_stage": zero_stage, "workers": workers})
    job, _ = build_job(_ctx("train", cfg, tmp_path / "unused", upstream.inputs))

    def train(out: Path, mode: str, crash: CrashHook | None = None) -> dict[str, Any]:
        return run_training(make_task=build_task, task_spec=job, engine=cfg.train.engine,
                            cluster=cfg.cluster.model_copy(update={"mode": mode}),
                            device="cpu", out_dir=out, fingerprint="job", progress=False,
                            crash=crash)

    train(tmp_path / "whole", "inprocess" if workers == 1 else "ray")
    crash = tmp_path / "crash-once"
    crash.write_text("the first worker to delete this after step 3 exits")
    result = train(tmp_path / "killed", "ray", CrashHook(crash, after_step=3))
    assert not crash.exists(), "no worker crashed"
    assert result["resumed_from"] == 2 and result["world_size"] == workers
    _assert_same_training(tmp_path / "whole", tmp_path / "killed")


def test_checkpoints_of_another_job_are_not_resumed(upstream: Upstream, tmp_path: Path) -> None:
    cfg = _config(upstream, method="lcc", engine={"steps": 2, "checkpoint_every": 1})
    job, _ = build_job(_ctx("train", cfg, tmp_path / "unused", upstream.inputs))
    kw = {"make_task": build_task, "task_spec": job, "engine": cfg.train.engine,
          "cluster": cfg.cluster, "device": "cpu", "out_dir": tmp_path / "t", "progress": False}
    run_training(fingerprint="a", **kw)
    again = run_training(fingerprint="b", **kw)
    assert again["resumed_from"] == 0 and len(read_log(tmp_path / "t" / LOG)) == 2


def test_lcc_without_svd_and_select_says_which_stages_are_missing(upstream: Upstream,
                                                                  tmp_path: Path) -> None:
    cfg = _config(upstream, method="lcc")
    inputs = {n: upstream.root / n for n in ("prepare", "degrade", "data")}
    with pytest.raises(ValueError, match="needs the stages svd, select before train"):
        build_job(_ctx("train", cfg, tmp_path / "train", inputs))


def test_lost_component_init_starts_from_the_collected_shift(upstream: Upstream,
                                                             tmp_path: Path) -> None:
    cfg = _config(upstream, method="lcc", lcc={"init": "lost_component", "init_directions": 3})
    job, _ = build_job(_ctx("train", cfg, tmp_path / "train", upstream.inputs))
    comp = Compensation.create(list(job.chosen), job.V, n_heads=job.n_heads,
                               init="lost_component", lost=job.lost)
    n_heads = job.n_heads
    for layer, head in job.chosen:
        views = activations.read_layer(upstream.root / "collect", layer)
        delta = split_heads(views["dense_q"][1] - views["degraded_q"][1], n_heads)
        V, S = (load_file(str(upstream.root / "svd" / f"layer={layer:02d}.safetensors"))[k][head]
                for k in ("V", "S"))
        expected = lost_component(delta[:, head], V, S, 3)
        got = comp.layers[str(layer)].components()[comp.layers[str(layer)].heads.index(head)]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    inputs = {k: v for k, v in upstream.inputs.items() if k != "collect"}
    with pytest.raises(ValueError, match="needs the stages collect before train"):
        build_job(_ctx("train", cfg, tmp_path / "train", inputs))


def test_kl_to_the_dense_teacher_trains(upstream: Upstream, tmp_path: Path) -> None:
    cfg = _config(upstream, method="lcc", loss={"ce_weight": 0.5, "kl_weight": 1.0,
                                                "temperature": 2.0}, engine={"steps": 2})
    trained = train_stage(_ctx("train", cfg, tmp_path / "train", upstream.inputs))
    log = read_log(tmp_path / "train" / LOG)
    assert all(r["kl"] > 0 and r["ce"] > 0 for r in log)
    assert trained["final_loss"] == pytest.approx(log[-1]["loss"])


def test_lora_only_pipeline_skips_collect_svd_select(upstream: Upstream, tmp_path: Path) -> None:
    """The runner path: data, train (LoRA, auto layers), export, evaluate of the recovered."""
    cfg = tiny_config(
        tmp_path / "run", upstream.data_dir,
        run={"pipeline": ["prepare", "degrade", "data", "train", "export", "evaluate"]},
        data={"source": {"source": "alpaca", "path": "alpaca/train.jsonl",
                         "num_samples": N_SAMPLES}, "max_length": 512, "triplets": False},
        train={**TRAIN, "method": "lora",
               "lora": {"layers": "auto", "auto_layers": 1, "auto_samples": 4, "rank": 2},
               "engine": {**ENGINE, "steps": 3, "zero_stage": 2}},
    )
    out = run_pipeline(cfg, progress=False, echo=lambda s: None)
    assert out.ran == ["prepare", "degrade", "data", "train", "export", "evaluate"]
    t = out.metrics["train"]
    assert t["method"] == "lora" and len(t["lora_layers"]) == 1 and len(t["layer_errors"]) == 2
    assert "lcc_heads" not in t and t["trainable_params"] == out.metrics["export"][
        "trainable_params"]
    assert (tmp_path / "run" / "export" / ADAPTER_DIR / "adapter_config.json").is_file()
    assert "recovered" in out.metrics["evaluate"]["models"]
    # Unchanged config: everything is reused, training included.
    again = run_pipeline(cfg, progress=False, echo=lambda s: None)
    assert again.ran == []


@pytest.mark.slow
def test_lora_on_two_ray_workers_with_zero2(upstream: Upstream, tmp_path: Path) -> None:
    cfg = _config(upstream, mode="ray", method="lora", engine={"zero_stage": 2})
    trained, exported_m = _train_and_export(upstream, tmp_path, cfg)
    assert trained["world_size"] == 2 and trained["zero_stage"] == 2
    assert exported_m["max_abs_logit_diff"] < 1e-4
    _assert_zero_counts_unchanged(
        upstream, modelio.load_model(tmp_path / "export" / MODEL_DIR, torch.float32))


@pytest.mark.slow
def test_pipeline_resumes_training_after_sigkill(upstream: Upstream, tmp_path: Path) -> None:
    """`recoup run` killed with SIGKILL mid-training; the rerun resumes from the last
    checkpoint and ends with the loss of an uninterrupted run."""
    def config(run_dir: Path) -> Path:
        data = {
            "run": {"dir": str(run_dir), "data_dir": str(upstream.data_dir),
                    "pipeline": ["prepare", "degrade", "data", "train"]},
            "cluster": {"mode": "inprocess"},
            "prepare": {"source": "tiny-llama"},
            "degrade": {"method": "magnitude", "sparsity": 0.5},
            "data": {"source": {"source": "alpaca", "path": "alpaca/train.jsonl",
                                "num_samples": N_SAMPLES}, "triplets": False},
            "train": {**TRAIN, "method": "lora", "engine": {
                **ENGINE, "steps": 40, "checkpoint_every": 10, "zero_stage": 2}},
        }
        path = run_dir.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(data))
        return path

    def recoup(cfg_path: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "recoup", "run", str(cfg_path)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)

    whole = tmp_path / "whole"
    assert recoup(config(whole)).wait(timeout=600) == 0
    killed = tmp_path / "killed"
    proc = recoup(config(killed))
    latest = killed / "train" / CHECKPOINTS / "latest.json"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and json.loads(latest.read_text())["step"] >= 10:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "train" / "manifest.json").exists()
    assert recoup(config(killed)).wait(timeout=600) == 0
    a = json.loads((whole / "train" / "manifest.json").read_text())["metrics"]
    b = json.loads((killed / "train" / "manifest.json").read_text())["metrics"]
    assert b["resumed_from"] >= 10
    assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(("method", "merge"), [
    ("lcc-closed", "masked"), ("eora", "masked"), ("lcc-closed+eora", "masked"),
    ("lora", "masked"), ("lcc-closed+eora", "none"), ("lcc+lora", "none")])
def test_the_exported_checkpoint_is_the_trained_model(upstream: Upstream, tmp_path: Path,
                                                      method: str, merge: str) -> None:
    """Plain ``transformers`` loads the export; its logits are the trained (or fitted)
    model's within 1e-4 and every linear keeps the degraded model's zero count. The
    training-free methods start neither DeepSpeed nor Ray and say how long the fit took.
    With ``merge: none`` the adapter sits unmerged in the exported folder (loaded by
    transformers' peft integration) and the compensation folds through its delta."""
    cfg = _config(upstream, method=method, engine={"steps": 2, "zero_stage": 2},
                  closed_form={"samples": 6, "micro_batch": 4},
                  lora={"layers": [1], "rank": 4, "alpha": 8.0, "init": "random",
                        "merge": merge, "targets": ["q_proj", "o_proj", "down_proj"]})
    trained, exported_m = _train_and_export(upstream, tmp_path, cfg)
    batch = _batch(upstream, cfg)
    exported = _exported(tmp_path)
    reference = _trained_logits(upstream, tmp_path / "train" / PARAMS_DIR, batch,
                                masked=merge == "masked")
    assert (_logits(exported, batch) - reference).abs().max() < 1e-4
    assert exported_m["max_abs_logit_diff"] < 1e-4
    _assert_zero_counts_unchanged(upstream, exported)
    free = method not in ("lora", "lcc+lora")
    assert bool(trained.get("training_free")) is free
    assert exported_m["lora_merge"] == (None if method == "lcc-closed" else merge)
    adapter_in_folder = (tmp_path / "export" / MODEL_DIR / "adapter_config.json").is_file()
    assert adapter_in_folder is (merge == "none")
    if merge == "none":  # the pruned weights' sparsity, the adapter's file left out
        assert linear_sparsity(tmp_path / "export" / MODEL_DIR)["linear_sparsity"] == \
            pytest.approx(linear_sparsity(upstream.root / "degrade" / MODEL_DIR)
                          ["linear_sparsity"])
        assert exported_m["adapter_params"] > 0
    assert not (tmp_path / "train" / CHECKPOINTS).exists() if free else True
    if free:
        assert trained["fit_seconds"] > 0 and trained["calibration_samples"] == 6
        assert trained["trainable_params"] > 0 and trained["steps"] == 0
    if "lcc" in method:  # the select stage's chosen heads
        assert trained["chosen_heads"] == len(CHOSEN) and exported_m["lcc_heads"] == len(CHOSEN)
    if method in ("eora", "lora") or merge == "none":
        # the fit / training changed the model (EoRA: the masked correction is not zero)
        assert (reference - _logits(_degraded(upstream), batch)).abs().max() > 1e-4


def test_a_bfloat16_export_passes_its_check_within_the_16bit_rounding(
        upstream_bf16: Upstream, tmp_path: Path) -> None:
    """A 16-bit model saves its folded bias in 16 bits: the float64 check sees that
    rounding, over the float32 bound and within ``rtol_16bit``; the saved model is bf16."""
    cfg = _config(upstream_bf16, method="lcc-closed+eora",
                  closed_form={"samples": 6, "micro_batch": 4},
                  lora={"layers": [1], "rank": 4, "alpha": 8.0, "merge": "none",
                        "targets": ["q_proj", "o_proj", "down_proj"]})
    _, m = _train_and_export(upstream_bf16, tmp_path, cfg)
    assert m["max_abs_logit_diff"] <= m["allowed_logit_diff"]
    # the float32 bound refuses this correct export (the 16-bit bias rounding alone)
    strict = cfg.model_copy(update={"export": cfg.export.model_copy(
        update={"rtol_16bit": cfg.export.rtol})})
    inputs = {"prepare": upstream_bf16.root / "prepare",
              "degrade": upstream_bf16.root / "degrade", "train": tmp_path / "train"}
    with pytest.raises(ValueError, match=r"export\.rtol_16bit=1e-05"):
        export_stage(_ctx("export", strict, tmp_path / "export-strict", inputs))
    folder = tmp_path / "export" / MODEL_DIR
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118


def test_training_free_fit_recovers_and_starts_the_trained_methods(upstream: Upstream,
                                                                   tmp_path: Path) -> None:
    """lcc-closed+eora brings the degraded model closer to the dense one (KL on the
    training samples), and the closed_form / eora inits of lcc+lora start training at
    exactly that fitted model."""
    from recoup.stages.recovery.losses import distill_kl

    common = {"closed_form": {"samples": 12, "heads": "chosen"},
              "lora": {"layers": [0, 1], "rank": 4, "alpha": 8.0}}
    free = _config(upstream, method="lcc-closed+eora", **common)
    job_free, facts = build_job(_ctx("train", free, tmp_path / "a", upstream.inputs))
    assert facts["eora_modules"] == 14 and facts["calibration_tokens"] > 12
    init = _config(upstream, method="lcc+lora", lcc={"init": "closed_form"},
                   **{**common, "lora": {**common["lora"], "init": "eora"}})
    job_init, _ = build_job(_ctx("train", init, tmp_path / "b", upstream.inputs))
    batch = _batch(upstream, free)
    fitted, _ = build_model(job_free, "cpu")
    start, _ = build_model(job_init, "cpu")
    with torch.no_grad():
        a = fitted.eval()(batch["input_ids"], batch["attention_mask"])
        b = start.eval()(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    dense = modelio.load_model(upstream.root / "prepare" / MODEL_DIR, torch.float32)
    teacher = _logits(dense, batch)
    mask = batch["attention_mask"].bool()
    kl_before = float(distill_kl(teacher, _logits(_degraded(upstream), batch), mask))
    kl_after = float(distill_kl(teacher, a, mask))
    assert kl_after < kl_before, (kl_before, kl_after)


@pytest.mark.parametrize("merge", ["masked", "none"])
def test_a_training_free_fit_is_saved_without_reading_the_model(upstream: Upstream,
                                                                 tmp_path: Path,
                                                                 merge: str) -> None:
    """save_training_free builds the method on a weightless stand-in of the degraded model
    (nothing of it is read; a 70B fit no longer needs the model on the host to save): its
    files are what the model built from the checkpoint saves, byte for byte in the tensors,
    and the same recovery.json (parameter counts included)."""
    from safetensors.torch import load_file as load

    from recoup.stages.recovery.task import (
        count_parameters,
        save_recovered,
        save_training_free,
    )

    cfg = _config(upstream, method="lcc-closed+eora",
                  closed_form={"samples": 6, "micro_batch": 4},
                  lora={"layers": [0, 1], "rank": 4, "alpha": 8.0, "merge": merge})
    job, _ = build_job(_ctx("train", cfg, tmp_path / "job", upstream.inputs))
    save_training_free(job, tmp_path / "free")
    module, base_params = build_model(job, "cpu")
    (tmp_path / "ref").mkdir()
    trainable, _ = count_parameters(module)
    save_recovered(module, job, tmp_path / "ref", trainable, base_params)
    free, ref = tmp_path / "free" / PARAMS_DIR, tmp_path / "ref"
    assert json.loads((free / "recovery.json").read_text()) == \
        json.loads((ref / "recovery.json").read_text())
    for rel in (LCC_FILE, f"{LORA_DIR}/adapter_model.safetensors"):
        a, b = load(str(free / rel)), load(str(ref / rel))
        assert a.keys() == b.keys() and a, rel
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert json.loads((free / LORA_DIR / "adapter_config.json").read_text()) == \
        json.loads((ref / LORA_DIR / "adapter_config.json").read_text())


def test_lcc_learning_rate_is_its_own_param_group(upstream: Upstream, tmp_path: Path) -> None:
    cfg = _config(upstream, method="lcc", lcc={"lr": 0.05},
                  engine={"steps": 2, "lr": 1e-3, "zero_stage": 2})
    train_stage(_ctx("train", cfg, tmp_path / "train", upstream.inputs))
    log = read_log(tmp_path / "train" / LOG)
    assert log[0]["lr"] == pytest.approx(0.05)  # lcc only: its group is the first
