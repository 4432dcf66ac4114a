"""select: score every (layer, head) and choose the heads to compensate.

The selectors of :mod:`recoup.stages.lcc.selectors` (``probe``, the paper's contrastive probe;
``mse``, ``random``, ``all`` for ablations) score one layer from that layer's activations
and SVD alone, so they run as one Ray task per layer
(:func:`recoup.cluster.tasks.map_layers`) and give the same scores for any number of
workers. Heads are named by (layer, head) throughout, never by a flat index.

The ``kl`` selector is implemented here because it needs the models: a head's score is how
much the mean token KL(dense || degraded) on a few calibration windows drops when that
head's mean lost component ``c`` (from the collected activations and the SVD, top
``selector.top_k_directions`` directions) is added to the degraded model's ``o_proj`` input
at every token. The per-layer tasks compute the ``c`` vectors; the forwards run in this
process. Cost: one dense and one degraded forward over the windows for the baseline, then
``n_layers * n_heads * windows`` degraded sequences of ``seq_len`` tokens, batched
``kl.batch_size`` sequences per forward (heads whose ``c`` is exactly zero are skipped:
their drop is 0). For SmolLM2-135M (270 heads) with the defaults (4 windows of 64 tokens)
that is 1080 sequences, a few minutes on a 2-core CPU.

Outputs: ``heads.json`` (``method``, ``chosen`` as ``[[layer, head], ...]`` best first,
``scores`` as ``[{"layer", "head", "score"}, ...]``) and ``scores.png``, a layers x heads
heat map with the chosen heads outlined.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from recoup.cluster.tasks import map_layers
from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.estimate import (
    FP32,
    EstimateInputs,
    StageEstimate,
    forward_working_bytes,
    gb,
    gpus_spread,
    layer_task_host_bytes,
    layer_tasks_estimate,
)
from recoup.orchestrator.stage import Metrics, StageContext, register_stage
from recoup.stages.compress.calibration import CalibrationConfig, calibration_ids
from recoup.stages.document import heatmap
from recoup.stages.lcc import activations
from recoup.stages.lcc.directions import DEFAULT_TOP_K_DIRECTIONS, lost_component
from recoup.stages.lcc.heads import HeadId, HeadScores, split_heads
from recoup.stages.lcc.heads_file import HEADS_FILE, write_heads
from recoup.stages.lcc.probe import DEFAULT_PROBE_L2, DEFAULT_PROBE_STEPS, DEFAULT_TRAIN_FRACTION
from recoup.stages.lcc.selectors import (
    LayerInputs,
    ScoreParams,
    assemble_scores,
    score_layer,
    selector_names,
)
from recoup.stages.model import layout, lm_metrics, modelio
from recoup.stages.model.block_capture import BlockWeights, check_same_architecture
from recoup.stages.prepare import CARD, MODEL_DIR
from recoup.stages.scoring.wikitext import free_memory
from recoup.stages.svd import check_width, load_aligned, read_svd_layer
from recoup.stages.text.datasources import AlpacaSourceConfig

HEADS = HEADS_FILE
PLOT = "scores.png"
SELECT_VIEWS = ("dense_q", "degraded_q", "dense_pos", "dense_neg")
KL_METHOD = "kl"
"""The selector the config accepts but :mod:`~recoup.stages.lcc.selectors` does not register:
it needs the models (it scores a head by how much compensating it moves the logits), so
this stage runs it itself."""
DEFAULT_TOP_FRACTION = 0.25
"""Share of heads compensated; the paper uses 10-25%."""
DEFAULT_KL_RECORDS = 256
"""Alpaca records the kl calibration text is cut from: plenty for a few windows, and
tokenizing them takes a moment instead of the whole 52k-record file."""
TOP_IN_METRICS = 10
"""Best heads listed in the manifest metrics (all of them are in heads.json)."""


class SelectorConfig(StrictModel):
    """How the select stage scores heads and how many it keeps."""

    method: str = Field("probe", description="head selector: probe, mse, random, all or kl")
    top_k_directions: int = Field(
        DEFAULT_TOP_K_DIRECTIONS, ge=1, description="singular directions summed into c"
    )
    top_fraction: float | None = Field(
        DEFAULT_TOP_FRACTION, gt=0.0, le=1.0, description="share of heads kept"
    )
    top_count: int | None = Field(
        None, ge=1, description="number of heads kept; replaces top_fraction"
    )
    seed: int = Field(0, ge=0, description="seeds the probe split and the random selector")
    train_fraction: float = Field(
        DEFAULT_TRAIN_FRACTION, gt=0.0, lt=1.0, description="probe train share of samples"
    )
    probe_steps: int = Field(DEFAULT_PROBE_STEPS, ge=1, description="most Newton steps")
    probe_l2: float = Field(DEFAULT_PROBE_L2, gt=0.0, description="probe L2 on weights")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        names = sorted({*selector_names(), KL_METHOD})
        if value not in names:
            raise ValueError(f"method {value!r} is not a head selector; known: {', '.join(names)}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _one_size_rule(cls, data: Any) -> Any:
        """``top_count`` replaces the default ``top_fraction``; setting both is an error."""
        if isinstance(data, Mapping) and data.get("top_count") is not None:
            if data.get("top_fraction") is not None:
                raise ValueError("set top_fraction or top_count, not both")
            data = {**data, "top_fraction": None}
        return data

    @model_validator(mode="after")
    def _has_size_rule(self) -> SelectorConfig:
        if self.top_count is None and self.top_fraction is None:
            raise ValueError("set one of top_fraction or top_count")
        return self

    @property
    def params(self) -> ScoreParams:
        """The settings the registered selectors read."""
        return ScoreParams(top_k_directions=self.top_k_directions, seed=self.seed,
                           train_fraction=self.train_fraction, probe_steps=self.probe_steps,
                           probe_l2=self.probe_l2)

    def choose(self, scores: HeadScores) -> list[HeadId]:
        """The heads to compensate: ``top_count`` if set, else ``top_fraction``."""
        if self.top_count is not None:
            return scores.top(count=self.top_count)
        return scores.top(fraction=self.top_fraction)


class KlConfig(StrictModel):
    """Calibration windows and batching of the ``kl`` selector (unused by the others)."""

    calibration: CalibrationConfig = Field(
        CalibrationConfig(
            data=AlpacaSourceConfig(path=Path("alpaca/train.jsonl"),
                                    num_samples=DEFAULT_KL_RECORDS),
            num_samples=4, seq_len=64,
        ),
        description="Text windows the KL is measured on (num_samples windows of seq_len "
        "tokens); cost grows with n_heads_total * num_samples * seq_len.",
    )
    batch_size: int = Field(
        16, ge=1, description="Sequences (head, window pairs) per degraded-model forward."
    )


class SelectConfig(StrictModel):
    """The head selector and how its per-layer tasks run."""

    selector: SelectorConfig = Field(
        SelectorConfig(), description="Selector method, its parameters, and how many heads."
    )
    kl: KlConfig = Field(KlConfig(), description="Settings of the 'kl' selector.")
    workers: int | None = Field(
        None, ge=1,
        description="Most layer tasks in flight at once; unset: all layers. No effect with "
        "cluster.mode=inprocess. The scores do not depend on it.",
    )
    cpus_per_task: float = Field(
        1.0, gt=0,
        description="CPUs each layer task asks Ray for; also its torch thread count.",
    )


# --------------------------------------------------------------------------- per layer


def layer_inputs(collect_dir: Path, svd_dir: Path, layer: int, n_heads: int, d_head: int,
                 shards: tuple[int, ...] | None) -> LayerInputs:
    """One layer's activations, split per head, with its SVD: what a selector reads."""
    _, views = load_aligned(collect_dir, layer, SELECT_VIEWS, shards)
    check_width(views["dense_q"], layer, n_heads, d_head)
    V, S = read_svd_layer(svd_dir, layer)
    heads = {v: split_heads(z, n_heads) for v, z in views.items()}  # (N, H, d_head)
    return LayerInputs(layer=layer, z_dense_q=heads["dense_q"],
                       z_degraded_q=heads["degraded_q"], z_dense_pos=heads["dense_pos"],
                       z_dense_neg=heads["dense_neg"], V=V, S=S)


def score_layer_task(collect_dir: Path, svd_dir: Path, layer: int, n_heads: int, d_head: int,
                     shards: tuple[int, ...] | None, method: str,
                     params: ScoreParams) -> torch.Tensor:
    """Scores (n_heads,) of one layer's heads under a registered selector (a Ray task)."""
    inputs = layer_inputs(collect_dir, svd_dir, layer, n_heads, d_head, shards)
    return score_layer(inputs, method, params)


def lost_components(inputs: LayerInputs, k: int) -> torch.Tensor:
    """(n_heads, d_head) float64: each head's mean lost component over its top-k directions."""
    return torch.stack([
        lost_component(inputs.delta(h), inputs.V[h].to(torch.float64),
                                inputs.S[h].to(torch.float64), k)
        for h in range(inputs.n_heads)
    ])


def components_task(collect_dir: Path, svd_dir: Path, layer: int, n_heads: int, d_head: int,
                    shards: tuple[int, ...] | None, k: int) -> torch.Tensor:
    """(n_heads, d_head) lost components of one layer (a Ray task, for the kl selector)."""
    inputs = layer_inputs(collect_dir, svd_dir, layer, n_heads, d_head, shards)
    return lost_components(inputs, k)


# --------------------------------------------------------------------------- kl


class _Injector:
    """A forward pre-hook that adds a per-sequence vector to ``o_proj``'s input.

    ``add`` is (B, n_heads * d_head): row ``b`` is added at every token of sequence ``b``.
    """

    def __init__(self) -> None:
        self.add: torch.Tensor | None = None

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self.add is None:
            return None
        x = args[0]  # (B, T, n_heads * d_head)
        return (x + self.add[:, None, :].to(x.dtype), *args[1:])


def dense_log_probs(dense: Any, windows: torch.Tensor, *, batch_size: int) -> torch.Tensor:
    """(W, T, V) float32 log-softmax of the dense model on ``windows`` (W, T), on the CPU:
    the reference of every head's KL, computed before the degraded model is loaded, so the
    two models are never resident together (a 70B pair would need 276 GB)."""
    out = []
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size].to(modelio.input_device(dense))
            out.append(torch.log_softmax(dense(batch).logits.float(), dim=-1).cpu())
    return torch.cat(out)


def kl_head_scores(ref_logp: torch.Tensor, degraded: Any, components: torch.Tensor,
                   windows: torch.Tensor, *, batch_size: int,
                   progress: bool = False) -> tuple[torch.Tensor, float, int]:
    """Drop of mean token KL(dense || degraded) when one head's ``c`` is injected.

    ``ref_logp`` (W, T, V) is the dense model's :func:`dense_log_probs` on ``windows``
    (W, T) token ids; ``components`` is (n_layers, n_heads, d_head). Returns (scores
    (n_layers, n_heads) float64, the baseline KL, the sequences run). Score = baseline KL -
    KL with ``c`` added to that head's slice of ``o_proj``'s input in that layer at every
    token: positive when compensating the head brings the degraded model closer to the
    dense one. A head whose ``c`` is exactly zero scores exactly 0 without a forward.
    (head, window) pairs of one layer are batched ``batch_size`` at a time. The degraded
    model may be spread over GPUs: inputs go to its embedding's device, each injection to
    its ``o_proj``'s.
    """
    n_layers, n_heads, d_head = components.shape
    n_win, seq_len = windows.shape
    layers = layout.decoder_layers(degraded)
    if len(layers) != n_layers:
        raise ValueError(f"components cover {n_layers} layers, the model has {len(layers)}")
    device = modelio.input_device(degraded)
    tokens = n_win * seq_len
    base = 0.0
    with torch.inference_mode():
        for start in range(0, n_win, batch_size):
            logits = degraded(windows[start:start + batch_size].to(device)).logits  # (B, T, V)
            ref = ref_logp[start:start + batch_size].to(logits.device)
            # log_softmax of log-probs is itself, so token_kl takes them as teacher logits
            base += float(lm_metrics.token_kl(ref, logits).double().sum())
    base /= tokens
    scores = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    injector = _Injector()
    sequences = 0
    todo = [(layer, h) for layer in range(n_layers) for h in range(n_heads)
            if bool(components[layer, h].any())]
    bar = tqdm(total=len(todo), desc="kl heads", unit="head", disable=not progress)
    for layer in range(n_layers):
        heads = [h for lay, h in todo if lay == layer]
        if not heads:
            continue
        pairs = [(h, w) for h in heads for w in range(n_win)]
        kl_sum = torch.zeros(n_heads, dtype=torch.float64)
        o_proj = layout.o_proj_of(layers[layer])
        handle = o_proj.register_forward_pre_hook(injector)
        try:
            with torch.inference_mode():
                for start in range(0, len(pairs), batch_size):
                    chunk = pairs[start:start + batch_size]
                    head_idx = torch.tensor([h for h, _ in chunk])
                    win_idx = torch.tensor([w for _, w in chunk])
                    add = torch.zeros(len(chunk), n_heads, d_head, dtype=torch.float32)
                    add[torch.arange(len(chunk)), head_idx] = components[layer, head_idx].float()
                    injector.add = add.reshape(len(chunk), n_heads * d_head).to(
                        o_proj.weight.device)
                    logits = degraded(windows[win_idx].to(device)).logits  # (B, T, V)
                    kl = lm_metrics.token_kl(ref_logp[win_idx].to(logits.device), logits)
                    kl_sum.index_add_(0, head_idx, kl.double().sum(dim=1).cpu())
                    sequences += len(chunk)
        finally:
            injector.add = None
            handle.remove()
        for h in heads:
            scores[layer, h] = base - float(kl_sum[h]) / tokens
        bar.update(len(heads))
    bar.close()
    return scores, base, sequences


def _kl_scores(ctx: StageContext, cfg: SelectConfig, card: modelio.ModelCard,
               components: torch.Tensor) -> tuple[HeadScores, Metrics]:
    dtype = modelio.DTYPES[card.dtype]
    dense_dir = ctx.input("prepare") / MODEL_DIR
    degraded_dir = ctx.input("degrade") / MODEL_DIR
    check_same_architecture(BlockWeights(dense_dir, dtype), BlockWeights(degraded_dir, dtype))
    tokenizer = modelio.load_tokenizer(dense_dir)
    windows = calibration_ids(cfg.kl.calibration, tokenizer, ctx.data_dir,
                              max_positions=card.max_positions,
                              synthesized=ctx.inputs.get("synthesize"),
                              field="select.kl.calibration")  # (W, T)
    t0 = time.perf_counter()
    # one model resident at a time, each spread over the task's GPUs if larger than one
    dense = modelio.load_model_spread(dense_dir, dtype, ctx.device)
    ref = dense_log_probs(dense, windows, batch_size=cfg.kl.batch_size)  # (W, T, V)
    del dense
    free_memory()
    degraded = modelio.load_model_spread(degraded_dir, dtype, ctx.device)
    scores, base, sequences = kl_head_scores(ref, degraded, components, windows,
                                             batch_size=cfg.kl.batch_size,
                                             progress=ctx.progress)
    info = {"kl_base": base, "kl_sequences": sequences, "kl_seconds": time.perf_counter() - t0,
            "kl_windows": int(windows.shape[0]), "kl_seq_len": int(windows.shape[1])}
    return HeadScores(scores), info


# --------------------------------------------------------------------------- stage


def _summary(m: Metrics) -> str:
    best = m["top"][0] if m["top"] else None
    text = f"{m['method']}: {m['n_chosen']} of {m['n_layers'] * m['n_heads']} heads"
    if best is not None:
        text += f", best ({best['layer']},{best['head']}) {best['score']:.3f}"
    return text


def estimate_select(inp: EstimateInputs) -> StageEstimate:
    """One CPU task per layer holding that layer's views (the probe fits are small). The
    ``kl`` selector then runs in the stage's task: one model on the device at a time (the
    dense one for its log-probs, then the degraded one), spread over the task's GPUs when
    larger than one, with a batch's logits; the dense log-probs of every window on the
    host."""
    cfg: SelectConfig = inp.config
    n = inp.sections["data"].source.num_samples
    host = (None if n is None
            else layer_task_host_bytes(inp.shape.card, n, len(activations.VIEWS)))
    tasks = layer_tasks_estimate(inp, host_bytes=host, disk_bytes=None)
    if cfg.selector.method != KL_METHOD:
        return tasks
    shape, hw, card = inp.shape, inp.hardware, inp.shape.card
    cal, batch = cfg.kl.calibration, cfg.kl.batch_size
    parts = {"one model (dense, then degraded)": shape.weights_bytes,
             "forward working set": forward_working_bytes(card, batch * cal.seq_len,
                                                          shape.itemsize),
             # logits, their float32 log-softmax, the dense rows read back
             "logits of a batch and the KL": batch * cal.seq_len * card.vocab * (
                 shape.itemsize + 2 * FP32)}
    dev = sum(parts.values())
    need = gpus_spread(shape.weights_bytes, dev - shape.weights_bytes, shape.block_bytes,
                       hw.usable)
    _, gpus = inp.task_resources
    notes = [f"kl: {cal.num_samples} windows x {cal.seq_len} tokens; the dense log-probs "
             f"({gb(cal.num_samples * cal.seq_len * card.vocab * FP32)}) on the host"]
    fits = need is not None and (gpus >= need or inp.device == "cpu")
    if need is not None and gpus < need and inp.device != "cpu":
        notes.append(f"set cluster.stages.select.gpus={need} (its task asks for {gpus:g})")
    return dataclasses.replace(
        tasks, device_bytes=dev, gpus_config=gpus, gpus_min=need, fits=fits, parts=parts,
        host_bytes=max(host or 0, cal.num_samples * cal.seq_len * card.vocab * FP32),
        notes=(*tasks.notes, *notes))


@register_stage(name="select", version=1, requires=("prepare", "degrade", "collect", "svd"),
                optional=("synthesize",), summarize=_summary, estimate=estimate_select)
def select(ctx: StageContext) -> Metrics:
    cfg: SelectConfig = ctx.config
    sel = cfg.selector
    card = modelio.ModelCard.read(ctx.input("prepare") / CARD)
    collect_dir, svd_dir = ctx.input("collect"), ctx.input("svd")
    shards = tuple(sorted(activations.done_shards(collect_dir)))
    if not shards:
        raise FileNotFoundError(f"no complete activation shards in {collect_dir}")
    common = [(collect_dir, svd_dir, layer, card.heads, card.d_head, shards)
              for layer in range(card.layers)]
    t0 = time.perf_counter()
    extra: Metrics = {}
    if sel.method == KL_METHOD:
        comps = map_layers(components_task, [(*a, sel.top_k_directions) for a in common],
                           ctx.cluster, num_cpus_per_task=cfg.cpus_per_task,
                           max_parallel=cfg.workers, desc="select c", progress=ctx.progress)
        scores, extra = _kl_scores(ctx, cfg, card, torch.stack(comps))  # (L, H, d_head)
    else:
        per_layer = map_layers(score_layer_task,
                               [(*a, sel.method, sel.params) for a in common], ctx.cluster,
                               num_cpus_per_task=cfg.cpus_per_task, max_parallel=cfg.workers,
                               desc=f"select {sel.method}", progress=ctx.progress)
        scores = assemble_scores(dict(enumerate(per_layer)), card.layers)
    wall = time.perf_counter() - t0
    chosen = sel.choose(scores)
    write_heads(ctx.out_dir, sel.method, scores, chosen)
    heatmap.plot_head_scores(
        scores.scores, chosen, ctx.out_dir / PLOT,
        title=f"{sel.method} scores, {len(chosen)} chosen heads outlined",
    )
    values = scores.scores
    return {
        "method": sel.method, "n_layers": scores.n_layers, "n_heads": scores.n_heads,
        "n_chosen": len(chosen), "chosen": [[layer, h] for layer, h in chosen],
        "top": [{"layer": layer, "head": h, "score": scores.score((layer, h))}
                for layer, h in scores.ranked()[:TOP_IN_METRICS]],
        "score_min": float(values.min()), "score_max": float(values.max()),
        "score_mean": float(values.mean()), "wall_seconds": wall, **extra,
    }
