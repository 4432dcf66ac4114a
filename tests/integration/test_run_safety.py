"""Reliability, round two (issue 19), through ``recoup run`` on the tiny Llama: never touch
what is not ours, never serve a stale or forged result, Ctrl-C keeps what is done, and a
non-finite training loss fails the stage naming the step.

The cases share one finished run (module fixture: prepare, degrade, evaluate in-process
on a private copy of the WikiText file) and each works on a copy of it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from recoup.orchestrator import rundir, store
from recoup.orchestrator import stage as stage_module
from recoup.orchestrator.cli import EXIT_INTERRUPTED, EXIT_USAGE, main
from recoup.orchestrator.runner import CONFIG_FILE

WIKI = Path("wikitext2") / "wiki.test.raw"


def _config(path: Path, run_dir: Path, data_dir: Path, **extra: Any) -> Path:
    data = {
        "run": {"dir": str(run_dir), "data_dir": str(data_dir)},
        "cluster": {"mode": "inprocess"},
        "prepare": {"source": "tiny-llama"},
        "degrade": {"method": "magnitude", "sparsity": 0.5},
        "evaluate": {"seq_len": 64, "max_windows": 2, "batch_size": 2,
                     "zeroshot": {"tasks": []}},
    }
    for k, v in extra.items():
        data[k] = {**data.get(k, {}), **v}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("finished")
    (root / "data" / WIKI.parent).mkdir(parents=True)
    shutil.copy(data_dir / WIKI, root / "data" / WIKI)
    cfg = _config(root / "c.yaml", root / "run", root / "data")
    assert main(["run", str(cfg), "--no-progress"]) == 0
    return root


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run (and its data), with its config file pointing at it."""
    shutil.copytree(finished / "data", tmp_path / "data")
    shutil.copytree(finished / "run", tmp_path / "run")
    _config(tmp_path / "c.yaml", tmp_path / "run", tmp_path / "data")
    return tmp_path


def _rerun(root: Path, *overrides: str) -> int:
    return main(["run", str(root / "c.yaml"), "--no-progress", *overrides])


def _ppl(root: Path) -> float:
    return store.read_manifest(root / "run" / "evaluate").metrics["models"]["degraded"]["ppl"]


def test_fresh_run_dir_is_marked(run: Path) -> None:
    assert (run / "run" / rundir.MARK).is_file()


@pytest.mark.parametrize("user_path", ["data/notes.txt", "report/draft.md", CONFIG_FILE])
def test_user_folder_as_run_dir_is_refused_and_untouched(tmp_path: Path, data_dir: Path,
                                                         user_path: str,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    mine = tmp_path / "mine"
    (mine / user_path).parent.mkdir(parents=True, exist_ok=True)
    (mine / user_path).write_text("precious")
    cfg = _config(tmp_path / "c.yaml", mine, data_dir,
                  run={"pipeline": ["prepare", "degrade", "evaluate", "report"]})
    assert main(["run", str(cfg), "--no-progress"]) == EXIT_USAGE
    assert "not empty and recoup did not create it" in capsys.readouterr().err
    assert sorted(str(p.relative_to(mine)) for p in mine.rglob("*") if p.is_file()) \
        == [user_path]
    assert (mine / user_path).read_text() == "precious"


def test_refused_config_writes_nothing(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (run / "run" / CONFIG_FILE).read_bytes()
    assert _rerun(run, "run.pipeline=[prepare,bogus]") == EXIT_USAGE
    assert "unknown stage 'bogus'" in capsys.readouterr().err
    assert (run / "run" / CONFIG_FILE).read_bytes() == before
    assert main(["status", str(run / "run")]) == 0
    assert main(["report", str(run / "run"), "--out", str(run / "out")]) == 0


def test_foreign_folder_inside_a_run_dir_is_not_replaced(run: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    (run / "run" / "data").mkdir()
    (run / "run" / "data" / "mine.jsonl").write_text("{}\n")
    rc = _rerun(run, "run.pipeline=[prepare,degrade,data]",
                "data.source={source: alpaca, path: alpaca/train.jsonl, num_samples: 4}")
    assert rc != 0 and "was not made by recoup" in capsys.readouterr().err
    assert (run / "run" / "data" / "mine.jsonl").read_text() == "{}\n"


def test_killed_commit_leftovers_are_swept(run: Path) -> None:
    r = run / "run"
    shutil.copytree(r / "degrade", r / "degrade.tmp-old-99999")
    (r / "evaluate.tmp-staging").mkdir()
    (r / ".report.md.tmp-99999-abcdef").write_text("half")
    (r / ".config.yaml.tmp-99999-012345").write_text("half")
    assert _rerun(run) == 0
    assert not [p for p in r.rglob(f"*{store.TMP_MARK}*")]


def test_changed_data_file_reruns_evaluate_and_bypasses_cache(run: Path,
                                                              capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    ppl = _ppl(run)
    wiki = run / "data" / WIKI
    wiki.write_text(wiki.read_text()[::-1][:200_000])
    assert _rerun(run) == 0
    out = capsys.readouterr().out
    assert "evaluate   re-run" in out and "data file wikitext2/wiki.test.raw changed" in out
    assert "prepare    reused" in out and "degrade    reused" in out
    assert _ppl(run) != pytest.approx(ppl)


def test_other_data_dir_with_other_content_reruns_evaluate(run: Path) -> None:
    ppl = _ppl(run)
    other = run / "other"
    (other / WIKI.parent).mkdir(parents=True)
    (other / WIKI).write_text((run / "data" / WIKI).read_text()[5000:205_000])
    assert _rerun(run, f"run.data_dir={other}") == 0
    assert _ppl(run) != pytest.approx(ppl)


def test_edited_cache_entry_is_dropped_and_recomputed(run: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    ppl = _ppl(run)
    entries = sorted((run / "run" / ".cache" / "evaluate").rglob("wikitext-*.json"))
    assert entries
    for e in entries:
        obj = json.loads(e.read_text())
        obj["value"]["ppl"] = 1.0
        e.write_text(json.dumps(obj))
    (run / "run" / "evaluate" / "results.json").write_text("{}")  # forces evaluate to re-run
    with caplog.at_level(logging.WARNING):
        assert _rerun(run) == 0
    assert str(entries[0]) in caplog.text
    assert _ppl(run) == pytest.approx(ppl)


def test_edited_manifest_metric_is_not_shown_and_is_recomputed(
        run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = run / "run" / "evaluate" / store.MANIFEST
    obj = json.loads(path.read_text())
    obj["metrics"]["models"]["degraded"]["ppl"] = 1.0
    path.write_text(json.dumps(obj))
    assert main(["status", str(run / "run"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "checksum does not match" in out and str(path) in out
    assert _rerun(run) == 0
    assert _ppl(run) != 1.0


@pytest.mark.parametrize("damage", ['{"outputs": "x"}', "null", '{"metrics": []}'])
def test_wrong_shape_manifest_means_recompute(run: Path, damage: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    (run / "run" / "degrade" / store.MANIFEST).write_text(damage)
    assert main(["status", str(run / "run")]) == 0
    assert main(["report", str(run / "run"), "--out", str(run / "out")]) == 0
    assert _rerun(run) == 0
    assert "degrade    re-run" in capsys.readouterr().out


@pytest.mark.parametrize("content", ["", "[]", '{"pid": "abc", "host": "h"}'])
def test_damaged_lock_and_failure_record_do_not_block(run: Path, content: str) -> None:
    import os
    import time

    (run / "run" / ".lock").write_text(content)
    os.utime(run / "run" / ".lock", (time.time() - 60, time.time() - 60))
    (run / "run" / "evaluate" / store.FAILED).write_text(content)
    assert _rerun(run) == 0


def test_ctrl_c_in_a_stage_is_one_line_exit_130_and_keeps_done_stages(
        run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = stage_module.run_stage_fn

    def interrupted(spec: Any, ctx: Any) -> Any:
        if spec.name == "evaluate":
            raise KeyboardInterrupt
        return real(spec, ctx)

    monkeypatch.setattr(stage_module, "run_stage_fn", interrupted)
    assert _rerun(run, "evaluate.max_windows=3") == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert err.count("recoup: interrupted") == 1 and "Traceback" not in err
    assert store.read_manifest(run / "run" / "degrade").stage == "degrade"
    assert not (run / "run" / ".lock").exists()
    monkeypatch.setattr(stage_module, "run_stage_fn", real)
    assert _rerun(run, "evaluate.max_windows=3") == 0
    assert "degrade    reused" in capsys.readouterr().out


class _NanTask:
    """A one-parameter task whose loss turns NaN at its third step."""

    def __init__(self, spec: Any, device: torch.device):
        self.module = torch.nn.Linear(2, 1)
        self.calls = 0

    def num_samples(self) -> int:
        return 8

    def batch(self, indices: list[int], device: torch.device) -> dict[str, torch.Tensor]:
        return {"x": torch.ones(len(indices), 2)}

    def loss(self, engine: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float], int]:
        self.calls += 1
        out = engine(batch["x"]).pow(2).mean()
        return (out * float("nan") if self.calls >= 3 else out), {}, 1

    def save(self, folder: Path) -> dict[str, Any]:
        return {}


def test_non_finite_loss_fails_training_naming_the_step(tmp_path: Path) -> None:
    from recoup.cluster.config import ClusterConfig
    from recoup.cluster.engine import EngineConfig
    from recoup.cluster.train import run_training

    engine = EngineConfig(workers=1, micro_batch=2, steps=5, checkpoint_every=10, lr=0.01)
    with pytest.raises(Exception, match=r"training loss is nan at step 3 of 5"):
        run_training(make_task=_NanTask, task_spec=None, engine=engine,
                     cluster=ClusterConfig(mode="inprocess"), device="cpu",
                     out_dir=tmp_path / "t", fingerprint="f", progress=False)
