"""Evaluation and report end to end: zero-shot results per model, the per-model cache
(a new degraded model does not re-evaluate the dense one), the report stage, the CLI
(`recoup report`, `recoup compare`), every plot, and the HTML page in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from recoup.orchestrator import store
from recoup.orchestrator.cli import main
from recoup.orchestrator.runner import StageFailedError, run_pipeline
from recoup.stages import report as rpt
from recoup.stages.document import facts as rpt_facts
from recoup.stages.document import pages as rpt_pages
from recoup.stages.document import tables as rpt_tables
from recoup.stages.evaluate import format_table
from recoup.stages.scoring import zeroshot
from tests.conftest import tiny_config

PIPELINE = ["prepare", "degrade", "evaluate", "report"]
TASKS = [
    {"name": "arc_challenge", "format": "arc", "path": "arc/ARC-Challenge-Test.jsonl"},
    {"name": "boolq", "format": "boolq", "path": "boolq/dev.jsonl"},
]
LIMIT, SHARDS = 3, 2


def _config(run_dir: Path, data_dir: Path, zeroshot_dtype: str = "model",
            **sections: dict[str, Any]):  # noqa: ANN202
    sections = {"run": {"pipeline": PIPELINE}, **sections}
    evaluate = {"seq_len": 64, "max_windows": 2, "batch_size": 2,
                "zeroshot": {"tasks": TASKS, "limit": LIMIT, "shards": SHARDS,
                             "batch_size": 4, "dtype": zeroshot_dtype}}
    return tiny_config(run_dir, data_dir, evaluate=evaluate, **sections)


def _run(cfg):  # noqa: ANN001, ANN202
    return run_pipeline(cfg, progress=False, echo=lambda s: None)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    out = _run(_config(run_dir, data_dir))
    assert out.ran == PIPELINE
    return run_dir


def _results(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "evaluate" / "results.json").read_text())


def _cache(run_dir: Path) -> dict[str, Any]:
    return store.read_manifest(run_dir / "evaluate").metrics["cache"]


def test_zero_shot_results_for_every_model_and_the_report(tiny_run: Path) -> None:
    res = _results(tiny_run)
    assert res["zeroshot_tasks"] == ["arc_challenge", "boolq"] and res["zeroshot_limit"] == LIMIT
    for name in ("dense", "degraded"):
        zs = res["models"][name]["zeroshot"]
        assert zs["arc_challenge"]["n"] == LIMIT and zs["boolq"]["n"] == LIMIT
        assert "acc_norm" in zs["arc_challenge"] and "acc_norm" not in zs["boolq"]
        avg = res["models"][name]["zeroshot_avg"]
        assert avg["acc"] == pytest.approx((zs["arc_challenge"]["acc"] + zs["boolq"]["acc"]) / 2)
    assert res["models"]["degraded"]["linear_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert res["models"]["dense"]["kl_to_dense"] == pytest.approx(0.0, abs=1e-6)
    cache = _cache(tiny_run)
    assert cache["dense"] == {"zeroshot_shards": {"computed": 4, "cached": 0},
                              "wikitext": "computed"}
    printed = format_table(store.read_manifest(tiny_run / "evaluate").metrics)
    assert "first 3 per task" in printed
    header = printed.splitlines()[1]
    assert all(c in header for c in ("perplexity", "arc_challenge", "boolq", "avg acc"))

    md = (tiny_run / "report" / rpt.MARKDOWN).read_text()
    assert "| arc_challenge acc (%) |" in md and "| boolq acc (%) |" in md
    assert "the first 3 documents of each task" in md
    assert "| evaluate |" in md  # wall time per stage
    page = (tiny_run / "report" / rpt.HTML).read_text()
    assert page.count("<img ") == 1  # only the accuracy bars: no select/svd/train here
    assert "http" not in page.replace('xmlns="http', "")  # nothing fetched


def test_a_new_degraded_model_reuses_the_dense_evaluation(tiny_run: Path, data_dir: Path,
                                                          tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    first = _results(run_dir)

    changed = _run(_config(run_dir, data_dir, degrade={"sparsity": 0.6}))
    assert changed.ran == ["degrade", "evaluate", "report"]
    cache = _cache(run_dir)
    assert cache["dense"] == {"zeroshot_shards": {"computed": 0, "cached": 4},
                              "wikitext": "cached"}
    assert cache["degraded"] == {"zeroshot_shards": {"computed": 4, "cached": 0},
                                 "wikitext": "computed"}
    assert _results(run_dir)["models"]["dense"] == first["models"]["dense"]

    # The same weights again (degrade is deterministic): the stage re-runs, nothing is
    # re-scored, and the results are those of the first run.
    back = _run(_config(run_dir, data_dir))
    assert back.ran == ["degrade", "evaluate", "report"]
    cache = _cache(run_dir)
    for name in ("dense", "degraded"):
        assert cache[name] == {"zeroshot_shards": {"computed": 0, "cached": 4},
                               "wikitext": "cached"}
    assert _results(run_dir) == first


def test_bf16_zero_shot_is_scored_anew_beside_the_fp32_results(tiny_run: Path, data_dir: Path,
                                                             tmp_path: Path) -> None:
    """A compute dtype other than the model's own is its own cache entry; perplexity and KL
    (always the model's dtype) are reused, and the results say which dtype scored them."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    first = _results(run_dir)
    out = _run(_config(run_dir, data_dir, zeroshot_dtype="bfloat16"))
    assert out.ran == ["evaluate", "report"]
    cache, res = _cache(run_dir), _results(run_dir)
    for name in ("dense", "degraded"):
        assert cache[name] == {"zeroshot_shards": {"computed": 4, "cached": 0},
                               "wikitext": "cached"}
        assert first["models"][name]["zeroshot_dtype"] == "float32"
        assert res["models"][name]["zeroshot_dtype"] == "bfloat16"
        assert res["models"][name]["ppl"] == first["models"][name]["ppl"]
        for task, got in res["models"][name]["zeroshot"].items():
            assert got["n"] == LIMIT
            # 3 documents: bf16 may flip a near-tie, not the whole task
            assert abs(got["acc"] - first["models"][name]["zeroshot"][task]["acc"]) <= 1 / LIMIT


def test_a_failed_evaluation_resumes_at_the_first_missing_shard(
        tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path / "run", data_dir, run={"pipeline": ["prepare", "degrade",
                                                                "evaluate"]})
    real, calls = zeroshot.score_task, []

    def dies_on_the_third_task(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[1].name)
        if len(calls) == 3:
            raise RuntimeError("worker lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(zeroshot, "score_task", dies_on_the_third_task)
    with pytest.raises(StageFailedError, match="worker lost"):
        _run(cfg)
    monkeypatch.setattr(zeroshot, "score_task", real)
    out = _run(cfg)
    assert out.ran == ["evaluate"]
    cache = _cache(tmp_path / "run")
    # dense shard 0 (both tasks) finished before the failure and is not scored again
    assert cache["dense"]["zeroshot_shards"] == {"computed": 2, "cached": 2}
    assert cache["degraded"]["zeroshot_shards"] == {"computed": 4, "cached": 0}
    assert _results(tmp_path / "run")["models"]["dense"]["zeroshot"]["boolq"]["n"] == LIMIT


def test_cli_report_and_compare(tiny_run: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["report", str(tiny_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| WikiText-2 perplexity ↓ |" in printed and str(out / rpt.HTML) in printed
    assert (out / rpt.MARKDOWN).read_text() == (tiny_run / "report" / rpt.MARKDOWN).read_text()

    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    assert main(["compare", str(tiny_run), str(other), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| metric | dense | degraded | run | other |" in printed
    assert "| degradation |  |  | magnitude 50.0% | magnitude 50.0% |" in printed
    assert (out / "compare.html").is_file()

    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "not a recoup run directory" in capsys.readouterr().err


@pytest.fixture
def local_ray():  # noqa: ANN201 - yields the ray module
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_shards_on_ray_workers_give_the_in_process_results(
        tiny_run: Path, tmp_path: Path, data_dir: Path, local_ray: Any) -> None:
    cfg = _config(tmp_path / "ray", data_dir, cluster={"mode": "ray"},
                  run={"pipeline": ["prepare", "degrade", "evaluate"]})
    out = _run(cfg)
    assert out.ran == ["prepare", "degrade", "evaluate"]
    assert local_ray.is_initialized()  # the shard tasks ran on the fixture's cluster
    assert _cache(tmp_path / "ray")["dense"]["zeroshot_shards"]["computed"] == 4
    on_ray, in_process = _results(tmp_path / "ray"), _results(tiny_run)
    for name in ("dense", "degraded"):
        assert on_ray["models"][name]["zeroshot"] == in_process["models"][name]["zeroshot"]


# --------------------------------------------------------------------------- a full run


def _manifest(folder: Path, stage: str, metrics: dict[str, Any], config: dict[str, Any],
              seconds: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    store.write_manifest(folder, store.Manifest(
        stage=stage, version=1, fingerprint=stage, config=config, upstream={},
        outputs=store.describe_outputs(folder), metrics=metrics, started_at=1000.0,
        finished_at=1000.0 + seconds))


def _zs(arc: float, arc_norm: float, boolq: float) -> dict[str, Any]:
    return {"arc_easy": {"n": 100, "acc": arc, "acc_norm": arc_norm},
            "boolq": {"n": 100, "acc": boolq}}


def full_run(root: Path) -> rpt_facts.RunFacts:
    """Stage folders as a complete lcc run leaves them (made up numbers, real formats)."""
    _manifest(root / "prepare", "prepare", {}, {"source": "tiny-llama"}, 3.0)
    _manifest(root / "degrade", "degrade", {"linear_sparsity": 0.5},
              {"method": "wanda", "sparsity": 0.5, "pattern": "unstructured"}, 65.0)
    g = torch.Generator().manual_seed(0)
    (root / "svd").mkdir(parents=True)
    for layer in range(2):
        S = torch.rand(4, 16, generator=g).sort(dim=1, descending=True).values * (layer + 1)
        save_file({"S": S, "V": torch.eye(16).expand(4, 16, 16).contiguous()},
                  str(root / "svd" / f"layer={layer:02d}.safetensors"))
    _manifest(root / "svd", "svd", {}, {}, 4.0)
    (root / "select").mkdir(parents=True)
    scores = [{"layer": a, "head": b, "score": 0.5 + 0.05 * (4 * a + b)}
              for a in range(2) for b in range(4)]
    (root / "select" / "heads.json").write_text(json.dumps(
        {"method": "probe", "chosen": [[1, 3], [1, 2]], "scores": scores}))
    _manifest(root / "select", "select", {"method": "probe"},
              {"selector": {"method": "probe", "top_fraction": 0.25}}, 6.0)
    (root / "train").mkdir(parents=True)
    (root / "train" / "log.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 3.0 / s, "lr": 1e-3}) + "\n" for s in range(1, 21)))
    tp = {"trainable_params": 256, "base_params": 128_000, "trainable_fraction": 0.002}
    _manifest(root / "train", "train", {"method": "lcc", **tp}, {"method": "lcc"}, 120.0)
    _manifest(root / "export", "export", {"method": "lcc", **tp}, {}, 2.0)
    models = {
        "dense": {"ppl": 10.0, "kl_to_dense": 0.0, "linear_sparsity": 0.0,
                  "zeroshot": _zs(0.6, 0.55, 0.7), "zeroshot_avg": {"acc": 0.65,
                                                                   "acc_norm": 0.625}},
        "degraded": {"ppl": 30.0, "kl_to_dense": 0.8, "linear_sparsity": 0.5,
                     "zeroshot": _zs(0.4, 0.35, 0.5), "zeroshot_avg": {"acc": 0.45,
                                                                      "acc_norm": 0.425}},
        "recovered": {"ppl": 15.0, "kl_to_dense": 0.2, "linear_sparsity": 0.5,
                      "zeroshot": _zs(0.5, 0.5, 0.6), "zeroshot_avg": {"acc": 0.55,
                                                                      "acc_norm": 0.55}},
    }
    _manifest(root / "evaluate", "evaluate",
              {"windows": 16, "seq_len": 512, "zeroshot_tasks": ["arc_easy", "boolq"],
               "zeroshot_limit": 100, "lm_eval": "0.4.13", "models": models,
               "model_keys": {"dense": "a", "degraded": "b", "recovered": "c"}}, {}, 90.0)
    stages = ("prepare", "degrade", "svd", "select", "train", "export", "evaluate")
    return rpt_facts.facts_from_folders("lcc-run", {s: root / s for s in stages})


def _row(table: rpt_tables.Table, label: str) -> tuple[str, ...]:
    return next(r for r in table.rows if r[0] == label)


def test_the_table_of_a_full_run(tmp_path: Path) -> None:
    facts = full_run(tmp_path / "run")
    table = rpt_tables.results_table(facts)
    assert table.header == ("metric", "dense", "degraded", "recovered", "gap closed")
    assert _row(table, "WikiText-2 perplexity ↓") == ("WikiText-2 perplexity ↓", "10.00",
                                                      "30.00", "15.00", "63.1%")
    assert _row(table, "arc_easy acc (%)")[1:] == ("60.0", "40.0", "50.0", "50.0%")
    assert _row(table, "arc_easy acc_norm (%)")[4] == "75.0%"
    assert _row(table, "average acc (%)")[1:] == ("65.0", "45.0", "55.0", "50.0%")
    assert _row(table, "linear sparsity (%)")[1:] == ("0.0", "50.0", "50.0", "kept 100.0%")
    assert _row(table, "trainable parameters")[3] == "256 (0.2000%)"
    timing = rpt_tables.timing_table(facts)
    assert [r[0] for r in timing.rows] == ["prepare", "degrade", "svd", "select", "train",
                                           "export", "evaluate", "total"]
    assert _row(timing, "train")[1] == "2 min 00 s" and _row(timing, "total")[1] == "4 min 50 s"

    shown = rpt_tables.describe_run(facts)
    assert shown["degradation"] == "wanda 50.0%" and shown["recovery"] == "lcc"
    assert shown["selector"] == "probe, top 25.0%"


def test_no_negative_zero_percent() -> None:
    assert rpt_tables._pct(-1e-9) == "0.0%"


def test_every_plot_is_in_the_page(tmp_path: Path) -> None:
    report = rpt_pages.build_report(full_run(tmp_path / "run"), spectra_heads=2)
    titles = re.findall(r"<figcaption>([^<:]+)", report.html)
    assert titles == ["Zero-shot accuracy per task", "Head scores",
                      "Singular value spectra", "Training loss"]
    for data in re.findall(r'src="data:image/png;base64,([^"]+)"', report.html):
        import base64

        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Plots (zero-shot accuracy per task, head scores" in report.markdown


# --------------------------------------------------------------------------- browser


PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images", ok + "/" + imgs.length);
  const t = document.getElementById("results");
  document.body.setAttribute("data-table-rows", t ? t.tBodies[0].rows.length : -1);
  document.body.setAttribute("data-table-width", t ? t.getBoundingClientRect().width : -1);
});
</script>"""


def test_the_html_page_renders_in_a_headless_browser(tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; `make test` "
                    "installs it when run as root)")
    report = rpt_pages.build_report(full_run(tmp_path / "run"), spectra_heads=2)
    n_rows = len(report.table.rows)
    # The page itself has no scripts; a copy with a probe reports what the browser saw.
    page = tmp_path / "probe.html"
    page.write_text(report.html.replace("</body>", PROBE + "</body>"))
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    dom = proc.stdout
    assert proc.returncode == 0 and "<body" in dom, proc.stderr[-2000:]
    assert 'data-images="4/4"' in dom, "not every image loaded"
    assert f'data-table-rows="{n_rows}"' in dom
    width = float(re.search(r'data-table-width="([\d.]+)"', dom).group(1))
    assert width > 200, "the results table has no width: it did not render"
    assert "<td>75.0%</td>" in dom


@pytest.fixture
def one_gpu_ray():  # noqa: ANN201 - yields the ray module
    """A local Ray that declares one GPU. Ray only counts it (the work runs on the CPU),
    which is all its scheduling of GPU tasks needs."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_on_a_one_gpu_cluster_evaluate_gives_its_gpu_to_each_model_task(
        tmp_path: Path, data_dir: Path, one_gpu_ray: Any) -> None:
    """``stage_gpus: 1`` on a one-GPU cluster: evaluate's own task holds no GPU (it waits on
    its tasks, and Ray keeps a waiting task's GPUs), so the perplexity task and every
    zero-shot shard get the GPU in turn. Were the stage's task holding it, its shards
    would wait forever: the run is given 5 minutes."""
    import threading

    from recoup.cluster.runtime import RayExecutor

    cfg = _config(tmp_path, data_dir, cluster={"mode": "ray", "stage_gpus": 1},
                  run={"pipeline": ["prepare", "degrade", "evaluate"]})
    done: dict[str, Any] = {}

    def run() -> None:  # each stage a Ray task, as `recoup run` runs it
        done["out"] = run_pipeline(cfg, progress=False, echo=lambda s: None,
                                   executor_factory=lambda: RayExecutor(cfg.cluster,
                                                                        progress=False))

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(timeout=300)
    assert "out" in done, "evaluate did not finish: its tasks never got the GPU"
    assert done["out"].ran == ["prepare", "degrade", "evaluate"]
    log = (tmp_path / "logs" / "evaluate.log").read_text()
    assert "score_models_task: on GPU " in log
    assert log.count("zeroshot_shard: on GPU ") == 4  # 2 shards x 2 models, each on the GPU


def test_run_task_runs_on_the_gpus_it_asks_for(one_gpu_ray: Any) -> None:
    """A stage's device work handed to :func:`run_task` (train's closed-form fit and layer
    errors) sees the GPU it asked for, and only it; in-process it is a plain call here."""
    import functools
    import os

    from recoup.cluster.config import ClusterConfig
    from recoup.cluster.tasks import run_task

    gpus = functools.partial(one_gpu_ray.get_gpu_ids)  # read in the task's process
    visible = functools.partial(os.getenv, "CUDA_VISIBLE_DEVICES", "unset")
    on_ray = ClusterConfig(mode="ray")
    assigned = run_task(gpus, on_ray, num_cpus=1, num_gpus=1, desc="t")
    assert len(assigned) == 1
    assert run_task(visible, on_ray, num_cpus=1, num_gpus=1, desc="t") == str(assigned[0])
    assert run_task(gpus, on_ray, num_cpus=1, num_gpus=0, desc="t") == []
    here = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    assert run_task(visible, ClusterConfig(mode="inprocess"), num_cpus=1, num_gpus=1,
                    desc="t") == here
