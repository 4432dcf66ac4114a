"""The collect stage on the tiny Llama: its Parquet rows equal a direct single-process forward
pass (bit for bit in float32), in-process and over 2 Ray actors; a killed worker is retried;
a resumed run recomputes only the missing shard, and a re-run only the damaged ones (the shard
markers' checksums); shards of another config are never reused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recoup.orchestrator import store
from recoup.orchestrator.runner import plan_run, run_pipeline
from recoup.stages import data as data_stage
from recoup.stages.collect import CollectConfig, CollectJob, run_collect, view_sequences
from recoup.stages.lcc import activations
from recoup.stages.model import capture, layout, modelio
from recoup.stages.text.triplets import Triplet, read_parquet
from tests.conftest import tiny_config

NUM_SAMPLES = 10
MAX_LENGTH = 384
PER_SHARD = 4  # 10 samples -> shards of 4, 4, 2
BATCH = 3  # does not divide a shard's 8 or 4 dense sequences: ragged last batches
PIPELINE = ["prepare", "degrade", "data", "collect"]
TINY = modelio.TinyLlamaConfig()


def _cfg(run_dir: Path, data_dir: Path, *, mode: str = "inprocess", **collect: object):  # noqa: ANN202
    return tiny_config(
        run_dir, data_dir, run={"pipeline": PIPELINE}, cluster={"mode": mode},
        data={"source": {"source": "alpaca", "path": "alpaca/train.jsonl",
                         "num_samples": NUM_SAMPLES}, "max_length": MAX_LENGTH},
        collect={"samples_per_shard": PER_SHARD, "batch_size": BATCH, **collect},
    )


def _run(cfg):  # noqa: ANN001, ANN202
    return run_pipeline(cfg, progress=False, echo=lambda _: None)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A run with prepare, degrade and data done, copied by each test."""
    run_dir = tmp_path_factory.mktemp("collect") / "run"
    cfg = _cfg(run_dir, data_dir)
    _run(cfg.model_copy(update={"run": cfg.run.model_copy(
        update={"pipeline": ("prepare", "degrade", "data")})}))
    return run_dir


def _copy(upstream: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(upstream, run_dir)
    return run_dir


def _o_proj_inputs(model: torch.nn.Module, batch: capture.Batch) -> torch.Tensor:
    """The full o_proj inputs of a plain forward pass of the causal LM: (L, B, T, W)."""
    inputs: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, a: inputs.append(a[0].clone()))
               for m in layout.o_proj_modules(model)]
    try:
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=batch.position_ids)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(inputs)


def _direct(run_dir: Path, *, position: str = "last_token", dtype: torch.dtype = torch.float32,
            ) -> dict[tuple[str, str], torch.Tensor]:
    """(view, sample id) -> (L, W): one plain forward pass per batch in this process, with the
    batches collect forms (shards of PER_SHARD samples, view-major, longest first), the rows
    read from the full o_proj inputs at each sample's last real token."""
    dense = modelio.load_model(run_dir / "prepare" / "model", torch.float32)
    degraded = modelio.load_model(run_dir / "degrade" / "model", torch.float32)
    tok = modelio.load_tokenizer(run_dir / "prepare" / "model")
    rows = read_parquet(run_dir / "data" / data_stage.TRIPLETS, Triplet)
    out: dict[tuple[str, str], torch.Tensor] = {}
    for start in range(0, len(rows), PER_SHARD):
        shard = rows[start:start + PER_SHARD]
        seqs = [view_sequences(tok, t, MAX_LENGTH) for t in shard]
        for model, views in ((dense, activations.VIEWS[:3]), (degraded, activations.VIEWS[3:])):
            keys = [(v, t.id) for v in views for t in shard]
            flat = [s[v] for v in views for s in seqs]
            for index in capture.plan_batches([len(s.ids) for s in flat], BATCH):
                batch = capture.pad_batch([flat[i] for i in index], pad_id=tok.pad_token_id,
                                          padding_side="right", position=position)
                x = _o_proj_inputs(model, batch)  # (L, B, T, W)
                for b, i in enumerate(index):
                    if position == "last_token":
                        last = int(batch.attention_mask[b].nonzero()[-1])
                        row = x[:, b, last]
                    else:
                        s = flat[i]
                        lo, hi = capture.token_selection(s, position)  # right padding: no offset
                        row = x[:, b, lo:hi].mean(dim=1)
                    out[keys[i]] = row.to(dtype).float()
    return out


def _stored(stage_dir: Path, layers: int) -> dict[tuple[str, str], torch.Tensor]:
    per_layer = [activations.read_layer(stage_dir, layer) for layer in range(layers)]
    out = {}
    for view in activations.VIEWS:
        ids, _ = per_layer[0][view]
        for j, sid in enumerate(ids):
            out[(view, sid)] = torch.stack([per_layer[layer][view][1][j]
                                            for layer in range(layers)])
    return out


def _assert_equal_to(got: dict, ref: dict, *, exact: bool = True) -> None:
    assert got.keys() == ref.keys()
    assert len(ref) == NUM_SAMPLES * len(activations.VIEWS)
    for k in ref:
        if exact:
            assert torch.equal(got[k], ref[k]), k
        else:
            # float16 storage: a float32 difference of rounding size may land the two on
            # neighbouring float16 values, one ulp (eps * |x|) apart
            torch.testing.assert_close(got[k], ref[k], atol=1e-5,
                                       rtol=torch.finfo(torch.float16).eps)


def test_inprocess_rows_equal_a_direct_forward_pass(upstream: Path, tmp_path: Path,
                                                    data_dir: Path) -> None:
    run_dir = _copy(upstream, tmp_path)
    out = _run(_cfg(run_dir, data_dir))
    m = out.metrics["collect"]
    stage = run_dir / "collect"
    width = TINY.hidden  # heads * d_head
    assert m["activation_bytes_per_sample"] == TINY.layers * width * 4 * 4
    assert store.read_manifest(stage).metrics["activation_bytes_per_sample"] == \
        m["activation_bytes_per_sample"]
    assert (m["shards"], m["shards_computed"], m["shards_reused"]) == (3, 3, 0)
    files = sorted(str(p.relative_to(stage)) for p in store.iter_output_files(stage))
    assert files == sorted(
        [f"acts/layer={layer:02d}/shard-{s:04d}.parquet" for layer in range(2) for s in range(3)]
        + [f"shards/shard-{s:04d}.json" for s in range(3)])
    table = pq.read_table(activations.shard_file(stage, 1, 0))
    assert table.schema.field("act").type == pa.list_(pa.float32(), width)
    assert table.num_rows == PER_SHARD * 4
    assert set(table.column("view").to_pylist()) == set(activations.VIEWS)
    got = _stored(stage, TINY.layers)
    _assert_equal_to(got, _direct(run_dir))
    # the response views are not the prompt view: the probe gets different inputs
    some = next(iter(k[1] for k in got))
    assert not torch.equal(got[("dense_pos", some)], got[("dense_q", some)])


def test_other_config_recomputes_every_shard(upstream: Path, tmp_path: Path,
                                             data_dir: Path) -> None:
    """float16 and mean_response: a marker of another config is never reused."""
    run_dir = _copy(upstream, tmp_path)
    _run(_cfg(run_dir, data_dir))
    out = _run(_cfg(run_dir, data_dir, dtype="float16", position="mean_response"))
    m = out.metrics["collect"]
    assert (m["shards_computed"], m["shards_reused"]) == (3, 0)
    table = pq.read_table(activations.shard_file(run_dir / "collect", 0, 2))
    assert table.schema.field("act").type == pa.list_(pa.float16(), TINY.hidden)
    ref = _direct(run_dir, position="mean_response", dtype=torch.float16)
    _assert_equal_to(_stored(run_dir / "collect", TINY.layers), ref, exact=False)


def test_resume_recomputes_only_the_missing_shard(upstream: Path, tmp_path: Path,
                                                  data_dir: Path) -> None:
    run_dir = _copy(upstream, tmp_path)
    cfg = _cfg(run_dir, data_dir)
    _run(cfg)
    stage = run_dir / "collect"
    before = _stored(stage, TINY.layers)
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in store.iter_output_files(stage)}
    activations.marker_file(stage, 1).unlink()
    activations.shard_file(stage, 1, 1).unlink()
    # what a writer killed mid-shard leaves: a layer file, no marker (here: a broken one)
    activations.shard_file(stage, 0, 1).write_bytes(b"PAR1 not a parquet file")
    out = _run(cfg)
    assert out.ran == ["collect"]
    m = out.metrics["collect"]
    assert (m["shards_computed"], m["shards_reused"]) == (1, 2)
    for p, stamp in stamps.items():
        if "shard-0001" not in p.name:
            assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, p
    _assert_equal_to(_stored(stage, TINY.layers), before)


def _stamps(paths: list[Path]) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def test_a_damaged_shard_is_recomputed_alone_and_named_in_the_log(
        upstream: Path, tmp_path: Path, data_dir: Path) -> None:
    """After the manifest was written, one shard file gets a flipped byte (same size) and
    another is truncated. The runner re-runs collect (a sha256 / size mismatch with the
    manifest) and keeps its folder; the shard markers' own checksums make collect recompute
    exactly those two shards, log each bad file's path, and leave the intact shard's files
    untouched. The result equals the first run's."""
    run_dir = _copy(upstream, tmp_path)
    cfg = _cfg(run_dir, data_dir)
    _run(cfg)
    stage = run_dir / "collect"
    before = _stored(stage, TINY.layers)
    for shard in range(3):
        marker = json.loads(activations.marker_file(stage, shard).read_text())
        assert marker[activations.FILES_KEY] == activations.file_records(stage, shard, 2)
    flipped, truncated = activations.shard_file(stage, 1, 0), activations.shard_file(stage, 0, 2)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:100])
    intact = [activations.shard_file(stage, layer, 1) for layer in range(TINY.layers)]
    stamps = _stamps([*intact, activations.marker_file(stage, 1)])

    plan = {p.name: p for p in plan_run(cfg)}["collect"]
    assert plan.state == "stale" and str(truncated) in plan.reasons[0]
    out = _run(cfg)
    assert out.ran == ["collect"]
    m = out.metrics["collect"]
    assert (m["shards_computed"], m["shards_reused"]) == (2, 1)
    assert _stamps(list(stamps)) == stamps
    _assert_equal_to(_stored(stage, TINY.layers), before)
    log = (run_dir / "logs" / "collect.log").read_text()
    assert f"recomputing shard 0: {flipped} does not match its sha256 in the shard marker" in log
    assert f"recomputing shard 2: {truncated} has 100 bytes, its shard marker says" in log


def test_a_marker_without_checksums_is_not_trusted(upstream: Path, tmp_path: Path,
                                                   data_dir: Path) -> None:
    """A marker that records no checksums (written before markers had them) cannot vouch
    for its files: that shard is recomputed, the others are reused."""
    run_dir = _copy(upstream, tmp_path)
    cfg = _cfg(run_dir, data_dir)
    _run(cfg)
    stage = run_dir / "collect"
    marker = activations.marker_file(stage, 2)
    old = json.loads(marker.read_text())
    del old[activations.FILES_KEY]
    marker.write_text(json.dumps(old))
    (stage / store.MANIFEST).unlink()  # what an interrupted run leaves: collect runs again
    m = _run(cfg).metrics["collect"]
    assert (m["shards_computed"], m["shards_reused"]) == (1, 2)
    assert activations.FILES_KEY in json.loads(marker.read_text())
    assert f"{marker} records no checksums" in (run_dir / "logs" / "collect.log").read_text()


@pytest.fixture(scope="module")
def local_ray():  # noqa: ANN201
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             configure_logging=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_two_ray_workers_equal_a_direct_forward_pass(local_ray, upstream: Path,  # noqa: ANN001
                                                     tmp_path: Path, data_dir: Path) -> None:
    """The stage runs as a Ray task (as `recoup run` does) and starts 2 actors from it."""
    from recoup.cluster.runtime import RayExecutor

    run_dir = _copy(upstream, tmp_path)
    cfg = _cfg(run_dir, data_dir, mode="ray", workers=2)
    out = run_pipeline(cfg, executor_factory=lambda: RayExecutor(cfg.cluster), progress=False,
                       echo=lambda _: None)
    assert out.ran == ["collect"] and out.metrics["collect"]["shards_computed"] == 3
    _assert_equal_to(_stored(run_dir / "collect", TINY.layers), _direct(run_dir))


def test_a_killed_worker_is_retried_with_identical_results(local_ray, upstream: Path,  # noqa: ANN001
                                                           tmp_path: Path, data_dir: Path) -> None:
    run_dir = _copy(upstream, tmp_path)
    crash = tmp_path / "crash-once"
    crash.write_text("the first worker to read this exits mid-shard")
    cfg = _cfg(run_dir, data_dir, mode="ray", workers=2)
    out_dir = tmp_path / "acts-out"
    out_dir.mkdir()
    job = CollectJob(
        dense_dir=run_dir / "prepare" / "model", degraded_dir=run_dir / "degrade" / "model",
        model_dtype="float32", triplets_path=run_dir / "data" / data_stage.TRIPLETS,
        out_dir=out_dir, num_samples=NUM_SAMPLES, samples_per_shard=PER_SHARD,
        max_length=MAX_LENGTH, batch_size=BATCH, act_dtype="float32", position="last_token",
        padding_side="right", device="cpu", num_gpus_per_worker=0.0, key="test",
        crash_file=crash,
    )
    card = modelio.ModelCard.read(run_dir / "prepare" / "model_card.json")
    m = run_collect(job, CollectConfig(workers=2, max_retries=1), cfg.cluster, card=card,
                    progress=False)
    assert not crash.exists()  # a worker did exit
    assert m["shards_computed"] == 3
    assert activations.done_shards(out_dir) == {0, 1, 2}
    assert not [p for p in out_dir.rglob("*") if store.TMP_MARK in p.name]
    _assert_equal_to(_stored(out_dir, TINY.layers), _direct(run_dir))
