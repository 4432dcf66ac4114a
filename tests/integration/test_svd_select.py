"""The svd and select stages end to end on synthetic collected activations.

The collect stage is not needed: each test writes a collect folder in its real format
(``activations.write_layer_shard`` + ``mark_shard_done``) and a model card, then calls the
stage functions through their registry entries with a real :class:`RunConfig`. The ``kl``
test runs prepare and degrade through the real runner on the tiny random Llama.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from recoup.orchestrator.runconfig import RunConfig
from recoup.orchestrator.runner import run_pipeline, stage_context
from recoup.orchestrator.stage import (
    Executor,
    InProcessExecutor,
    Metrics,
    Resources,
    get_stage,
)
from recoup.stages.lcc import activations
from recoup.stages.lcc.heads import HeadScores
from recoup.stages.lcc.heads_file import read_heads
from recoup.stages.model import modelio
from recoup.stages.prepare import CARD, MODEL_DIR
from recoup.stages.select import HEADS, PLOT
from recoup.stages.svd import read_svd_layer, svd_file
from tests.conftest import tiny_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HeadSet = set[tuple[int, int]]


# --------------------------------------------------------------------------- helpers


def write_card(prepare_dir: Path, *, layers: int, heads: int, d_head: int) -> None:
    card = modelio.ModelCard(
        model_type="llama", layers=layers, heads=heads, kv_heads=heads, d_head=d_head,
        hidden=heads * d_head, intermediate=4 * heads * d_head, vocab=259, max_positions=128,
        dtype="float32", parameters=0,
    )
    prepare_dir.mkdir(parents=True, exist_ok=True)
    (prepare_dir / CARD).write_text(json.dumps(card.to_json()))


def write_collect(root: Path, *, layers: int, heads: int, d_head: int, samples: int,
                  planted: HeadSet, shifted: HeadSet = frozenset(), seed: int = 0,
                  shards: int = 2, signal: float = 3.0) -> None:
    """Synthetic activations in the collect format.

    Heads in ``planted`` carry the contrastive signal: their z_dense(q + r+) and
    z_dense(q + r-) differ by +-``signal`` along a fixed direction; every other head's r+
    and r- views are i.i.d. noise (a probe is at chance there). Heads in ``shifted`` lose
    a large constant in the degraded model (the mse selector's favourite).
    """
    g = torch.Generator().manual_seed(seed)
    ids = [f"s{i:04d}" for i in range(samples)]
    for layer in range(layers):
        dense_q = torch.randn(samples, heads, d_head, generator=g)  # (N, H, d)
        degraded_q = 0.8 * dense_q + 0.3 * torch.randn(samples, heads, d_head, generator=g)
        pos = torch.randn(samples, heads, d_head, generator=g)
        neg = torch.randn(samples, heads, d_head, generator=g)
        for pl, ph in planted:
            if pl == layer:
                u = torch.nn.functional.normalize(torch.randn(d_head, generator=g), dim=0)
                pos[:, ph] += signal * u
                neg[:, ph] -= signal * u
        for sl, sh in shifted:
            if sl == layer:
                degraded_q[:, sh] -= 5.0
        views = {"dense_q": dense_q, "dense_pos": pos, "dense_neg": neg,
                 "degraded_q": degraded_q}
        for shard in range(shards):
            rows = list(range(shard, samples, shards))
            sample_ids = [ids[i] for v in views for i in rows]
            names = [v for v in views for _ in rows]
            acts = torch.cat([z[rows].reshape(len(rows), heads * d_head)  # (n, H * d)
                              for z in views.values()])
            activations.write_layer_shard(activations.shard_file(root, layer, shard),
                                          sample_ids, names, acts, "float32")
    for shard in range(shards):
        activations.mark_shard_done(root, shard, {"samples": len(range(shard, samples, shards))})


def synthetic_run(tmp: Path, *, cluster: dict[str, Any] | None = None,
                  **sections: dict[str, Any]) -> RunConfig:
    """A run config whose prepare/degrade folders are stand-ins (nothing reads a model)."""
    data: dict[str, Any] = {
        "run": {"dir": str(tmp)}, "cluster": cluster or {"mode": "inprocess"},
        "prepare": {"source": "tiny-llama"},
    }
    data.update(sections)
    return RunConfig.model_validate(data)


def call_stage(name: str, cfg: RunConfig, inputs: dict[str, Path],
               executor: Executor | None = None) -> Metrics:
    """Run one stage through an executor, as the runner does (a fresh output folder)."""
    spec = get_stage(name)
    out = cfg.run.dir / name
    out.mkdir(parents=True, exist_ok=True)
    ctx = stage_context(cfg, spec, out_dir=out, inputs={r: inputs[r] for r in spec.requires},
                        fingerprint=f"test-{name}", upstream={}, progress=False)
    resources = Resources(num_cpus=cfg.cluster.stage_cpus)
    return (executor or InProcessExecutor()).execute(spec, ctx, resources)


def svd_then_select(cfg: RunConfig, prepare: Path, collect: Path,
                    executor: Executor | None = None) -> tuple[Metrics, Metrics]:
    degrade = cfg.run.dir / "degrade-unused"
    degrade.mkdir(parents=True, exist_ok=True)
    inputs = {"prepare": prepare, "collect": collect, "degrade": degrade}
    svd_m = call_stage("svd", cfg, inputs, executor)
    sel_m = call_stage("select", cfg, {**inputs, "svd": cfg.run.dir / "svd"}, executor)
    return svd_m, sel_m


# --------------------------------------------------------------------------- tests

PLANTED = {(0, 2), (2, 1)}
SHIFTED = {(1, 3)}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("small")
    write_card(root / "prepare", layers=3, heads=4, d_head=8)
    write_collect(root / "collect", layers=3, heads=4, d_head=8, samples=80,
                  planted=PLANTED, shifted=SHIFTED)
    return root / "prepare", root / "collect"


def test_probe_ranks_planted_heads_first_through_the_stages(
    tmp_path: Path, small_data: tuple[Path, Path]
) -> None:
    prepare, collect = small_data
    cfg = synthetic_run(tmp_path, select={"selector": {"method": "probe", "top_count": 2}})
    svd_m, sel_m = svd_then_select(cfg, prepare, collect)

    assert svd_m["shapes"] == {"V": [4, 8, 8], "S": [4, 8]}
    assert svd_m["samples"] == 80 and svd_m["shards"] == 2
    for layer in range(3):
        V, S = read_svd_layer(tmp_path / "svd", layer)
        assert V.shape == (4, 8, 8) and S.shape == (4, 8) and V.dtype == torch.float32
        torch.testing.assert_close(V @ V.transpose(1, 2), torch.eye(8).expand(4, 8, 8),
                                   atol=1e-5, rtol=0)
    with safe_open(str(svd_file(tmp_path / "svd", 1)), framework="pt") as f:
        assert set(f.keys()) == {"V", "S"}

    doc = json.loads((tmp_path / "select" / HEADS).read_text())
    assert set(doc) == {"method", "chosen", "scores"} and doc["method"] == "probe"
    assert {tuple(h) for h in doc["chosen"]} == PLANTED
    assert len(doc["scores"]) == 12
    _, chosen, scores = read_heads(tmp_path / "select")
    assert set(scores.ranked()[:2]) == PLANTED
    assert min(scores.score(h) for h in PLANTED) >= 0.95
    others = [scores.score((lay, h)) for lay in range(3) for h in range(4)
              if (lay, h) not in PLANTED]
    assert max(others) < 0.85
    assert sel_m["n_chosen"] == 2 and {tuple(h) for h in sel_m["chosen"]} == PLANTED
    assert (tmp_path / "select" / PLOT).read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("method", ["mse", "random", "all"])
def test_ablation_selectors_through_the_stage(
    tmp_path: Path, small_data: tuple[Path, Path], method: str
) -> None:
    prepare, collect = small_data
    cfg = synthetic_run(tmp_path, select={"selector": {"method": method, "top_fraction": 0.25}})
    _, sel_m = svd_then_select(cfg, prepare, collect)
    got_method, chosen, scores = read_heads(tmp_path / "select")
    assert got_method == method and len(chosen) == 3  # round(0.25 * 12)
    assert chosen == scores.ranked()[:3]
    if method == "mse":
        assert chosen[0] == next(iter(SHIFTED))
    if method == "all":
        assert chosen == [(0, 0), (0, 1), (0, 2)]
    assert (tmp_path / "select" / PLOT).is_file()


def test_layer_head_indexing_with_30_layers_and_9_heads(tmp_path: Path) -> None:
    """SmolLM2's grid: a flat index decoded with n_layers instead of n_heads would move
    every planted head elsewhere (e.g. (25, 3) = flat 228 -> (7, 18), not even a head)."""
    planted = {(25, 3), (7, 8), (29, 0)}
    write_card(tmp_path / "prepare", layers=30, heads=9, d_head=4)
    write_collect(tmp_path / "collect", layers=30, heads=9, d_head=4, samples=60,
                  planted=planted, signal=4.0)
    cfg = synthetic_run(tmp_path / "run",
                        select={"selector": {"method": "probe", "top_count": 3}})
    svd_m, sel_m = svd_then_select(cfg, tmp_path / "prepare", tmp_path / "collect")
    assert svd_m["layers"] == 30 and svd_m["heads"] == 9
    assert sorted(p.name for p in (tmp_path / "run" / "svd").glob("layer=*.safetensors")) == [
        f"layer={i:02d}.safetensors" for i in range(30)
    ]
    doc = json.loads((tmp_path / "run" / "select" / HEADS).read_text())
    assert {tuple(h) for h in doc["chosen"]} == planted
    records = {(r["layer"], r["head"]): r["score"] for r in doc["scores"]}
    assert len(records) == 270 and set(records) == {(lay, h) for lay in range(30)
                                                     for h in range(9)}
    assert min(records[h] for h in planted) > max(
        s for h, s in records.items() if h not in planted)
    assert sel_m["n_layers"] == 30 and sel_m["n_heads"] == 9


@pytest.fixture
def local_ray():  # noqa: ANN201 - yields the ray module
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _outputs(run_dir: Path) -> dict[str, bytes]:
    files = sorted((run_dir / "svd").glob("layer=*.safetensors"))
    out = {f"svd/{p.name}": p.read_bytes() for p in files}
    out["select/heads.json"] = (run_dir / "select" / HEADS).read_bytes()
    return out


def test_results_do_not_depend_on_workers(
    tmp_path: Path, small_data: tuple[Path, Path], local_ray: Any
) -> None:
    prepare, collect = small_data
    selector = {"method": "probe", "top_count": 2}
    one = synthetic_run(tmp_path / "one", svd={"workers": 1},
                        select={"selector": selector, "workers": 1})
    two = synthetic_run(tmp_path / "two", cluster={"mode": "ray", "stage_cpus": 2.0},
                        svd={"workers": 2}, select={"selector": selector, "workers": 2})
    svd_then_select(one, prepare, collect)
    # As under `cluster.mode: ray`: each stage is a Ray task holding both CPUs, and its
    # layer tasks run on the CPUs it hands back while it waits for them.
    from recoup.cluster.runtime import RayExecutor

    executor = RayExecutor(two.cluster)
    svd_then_select(two, prepare, collect, executor)
    executor.close()
    assert local_ray.is_initialized()  # the executor joined the fixture's cluster
    a, b = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 4
    for name in a:
        assert a[name] == b[name], f"{name} differs between 1 in-process and 2 Ray workers"


# --------------------------------------------------------------------------- kl


SHARED_DIRECTION_SCALE = 2.0
"""Size of the direction added to every token embedding, in units of the mean embedding
norm. Real LLMs' hidden states share large common directions, which make a head's output
largely input-independent; a random tiny Llama has none, its heads' outputs are nearly
all input-dependent, and a constant (mean) compensation could not honestly be expected to
help. With the shared direction, zeroing a head loses mostly a constant, as in real models."""


def _planted_models(dense_dir: Path, degraded_dir: Path) -> set[tuple[int, int]]:
    """A tiny Llama with a shared embedding direction, and its damaged copy: the last
    layer's first KV head's value rows are zeroed, so q heads 0..n_rep-1 of that layer
    (sharing KV head 0) output exactly zero and no other head of the network changes.
    Returns the damaged (layer, head)s."""
    tiny = modelio.TinyLlamaConfig()
    model, tok = modelio.build_tiny_llama(tiny, torch.float32)
    d_head = tiny.hidden // tiny.heads
    last = tiny.layers - 1
    emb = model.model.embed_tokens.weight
    shared = torch.randn(tiny.hidden, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb += SHARED_DIRECTION_SCALE * float(emb.norm(dim=1).mean()) * shared / shared.norm()
    modelio.save_model(model, tok, dense_dir)
    with torch.no_grad():
        model.model.layers[last].self_attn.v_proj.weight[:d_head] = 0.0  # KV head 0
    modelio.save_model(model, tok, degraded_dir)
    return {(last, h) for h in range(tiny.heads // tiny.kv_heads)}


def _collect_from_models(root: Path, dense: Any, degraded: Any, tok: Any,
                         prompts: list[str]) -> None:
    """A minimal collect: o_proj inputs at the last token of each text, both models."""

    def last_token_inputs(model: Any, text: str) -> list[torch.Tensor]:
        got: list[torch.Tensor] = []
        hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
            lambda _m, args: got.append(args[0][0, -1].clone()))
            for layer in model.model.layers]
        try:
            with torch.inference_mode():
                model(torch.tensor([tok(text)["input_ids"]]))
        finally:
            for h in hooks:
                h.remove()
        return got  # one (H * d,) per layer

    rows: dict[str, list[list[torch.Tensor]]] = {v: [] for v in activations.VIEWS}
    for p in prompts:
        rows["dense_q"].append(last_token_inputs(dense, p))
        rows["degraded_q"].append(last_token_inputs(degraded, p))
        rows["dense_pos"].append(last_token_inputs(dense, p + " yes, indeed."))
        rows["dense_neg"].append(last_token_inputs(dense, p + " no, never."))
    ids = [f"s{i:03d}" for i in range(len(prompts))]
    for layer in range(len(dense.model.layers)):
        acts = torch.stack([r[layer] for v in activations.VIEWS for r in rows[v]])
        names = [v for v in activations.VIEWS for _ in prompts]
        activations.write_layer_shard(activations.shard_file(root, layer, 0),
                                      ids * len(activations.VIEWS), names, acts, "float32")
    activations.mark_shard_done(root, 0, {"samples": len(prompts)})


def test_kl_selector_scores_the_damaged_heads(tmp_path: Path, data_dir: Path) -> None:
    damaged = _planted_models(tmp_path / "dense", tmp_path / "given")
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog "
                                f"number {i * 7}." for i in range(40)))
    cfg = tiny_config(
        tmp_path / "run", data_dir,
        run={"pipeline": ["prepare", "degrade"]},
        prepare={"source": str(tmp_path / "dense")},
        degrade={"method": "given", "given_path": str(tmp_path / "given")},
        select={"selector": {"method": "kl", "top_count": len(damaged),
                             "top_k_directions": 16},
                "kl": {"calibration": {"data": {"source": "text", "path": str(text)},
                                       "num_samples": 3, "seq_len": 32},
                       "batch_size": 5}},
    )
    run_pipeline(cfg, progress=False, echo=lambda s: None)
    run = cfg.run.dir
    dense = modelio.load_model(run / "prepare" / MODEL_DIR, torch.float32)
    degraded = modelio.load_model(run / "degrade" / MODEL_DIR, torch.float32)
    tok = modelio.load_tokenizer(run / "prepare" / MODEL_DIR)
    prompts = [f"Question {i}: what is {i} plus {2 * i}?" for i in range(12)]
    _collect_from_models(run / "collect", dense, degraded, tok, prompts)

    inputs = {"prepare": run / "prepare", "degrade": run / "degrade", "collect": run / "collect"}
    call_stage("svd", cfg, inputs)
    m = call_stage("select", cfg, {**inputs, "svd": run / "svd"})

    _, chosen, scores = read_heads(run / "select")
    assert torch.isfinite(scores.scores).all()
    assert set(chosen) == damaged
    for head in damaged:
        assert scores.score(head) > 0.0  # compensating the mean brings it closer to dense
    untouched = [h for h in scores.ranked() if h not in damaged]
    assert all(scores.score(h) == 0.0 for h in untouched)  # c == 0: nothing to inject
    assert m["kl_base"] > 0 and m["kl_sequences"] == len(damaged) * 3
    assert isinstance(scores, HeadScores)
