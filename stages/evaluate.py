"""evaluate: WikiText-2 perplexity and token-level KL to the dense model.

Both models run window by window side by side, so the dense logits needed for the KL
are never stored: memory is two models plus one batch of logits.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from tqdm.auto import tqdm

from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.stage import Metrics, StageContext, register_stage
from recoup.orchestrator.store import atomic_write_json
from recoup.stages import lm_metrics, modelio
from recoup.stages.prepare import CARD, MODEL_DIR

RESULTS = "results.json"
#: Table order: the references first, then what recovery produced.
MODEL_ORDER = ("dense", "degraded", "recovered")


class EvaluateConfig(StrictModel):
    wikitext: str = Field(
        "wikitext2/wiki.test.raw", description="WikiText-2 test file, relative to the data dir."
    )
    seq_len: int = Field(512, ge=8, description="Tokens per perplexity window.")
    max_windows: int | None = Field(
        16, ge=1, description="Windows evaluated (from the start); unset: the whole test set."
    )
    batch_size: int = Field(2, ge=1, description="Windows per forward pass.")


def evaluate_models(models: dict[str, Any], dense: Any, ids: torch.Tensor, batch_size: int,
                    device: torch.device, progress: bool) -> dict[str, dict[str, float]]:
    """Perplexity of each model and mean token KL(dense || model) on windows ``ids`` (W, T)."""
    nll = dict.fromkeys(models, 0.0)
    kl = dict.fromkeys(models, 0.0)
    n_pred = n_kl = 0
    bar = tqdm(range(0, ids.shape[0], batch_size), desc="evaluate", disable=not progress,
               unit="batch")
    with torch.inference_mode():
        for start in bar:
            batch = ids[start:start + batch_size].to(device)  # (B, T)
            ref = dense(batch).logits
            for name, model in models.items():
                logits = ref if model is dense else model(batch).logits
                nll[name] += float(lm_metrics.token_nll(logits, batch).double().sum())
                kl[name] += float(lm_metrics.token_kl(ref, logits).double().sum())
            n_pred += batch.shape[0] * (batch.shape[1] - 1)
            n_kl += batch.numel()
    return {
        name: {"ppl": lm_metrics.perplexity(nll[name], n_pred), "kl_to_dense": kl[name] / n_kl}
        for name in models
    }


def format_table(m: Metrics) -> str:
    head = f"WikiText-2 ({m['windows']} windows x {m['seq_len']} tokens)"
    lines = [f"{'model':<12} {'perplexity':>12} {'KL to dense':>12}", "-" * 38]
    models = m["models"]
    for name in sorted(models, key=lambda k: (MODEL_ORDER.index(k) if k in MODEL_ORDER else 99, k)):
        r = models[name]
        lines.append(f"{name:<12} {r['ppl']:>12.3f} {r['kl_to_dense']:>12.4f}")
    if "recovered" in models:
        lines.append("")
        lines.append(f"gap closed: perplexity {gap_closed(models, 'ppl'):.1%}, "
                     f"KL {gap_closed(models, 'kl_to_dense'):.1%}")
    return head + "\n" + "\n".join(lines)


def gap_closed(models: dict[str, dict[str, float]], metric: str) -> float:
    """Fraction of the dense-vs-degraded gap that recovery closed (1 = back to dense)."""
    dense, degraded = models["dense"][metric], models["degraded"][metric]
    if degraded == dense:
        return 0.0
    return (degraded - models["recovered"][metric]) / (degraded - dense)


def _summary(m: Metrics) -> str:
    return ", ".join(f"{k} ppl {v['ppl']:.2f}" for k, v in m["models"].items())


@register_stage(name="evaluate", version=1, requires=("prepare", "degrade"),
                optional=("export",), summarize=_summary, report=format_table)
def evaluate(ctx: StageContext) -> Metrics:
    cfg: EvaluateConfig = ctx.config
    device = torch.device(ctx.run.run.device)
    prepared = ctx.input("prepare")
    card = modelio.ModelCard.read(prepared / CARD)
    dtype = modelio.DTYPES[card.dtype]
    if cfg.seq_len > card.max_positions:
        raise ValueError(
            f"evaluate.seq_len={cfg.seq_len} exceeds the model's {card.max_positions} positions"
        )
    text = lm_metrics.read_wikitext(ctx.run.run.resolved_data_dir() / cfg.wikitext)
    tokenizer = modelio.load_tokenizer(prepared / MODEL_DIR)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    wins = lm_metrics.windows(ids, cfg.seq_len, cfg.max_windows)  # (W, seq_len)
    dense = modelio.load_model(prepared / MODEL_DIR, dtype, str(device))
    models = {"dense": dense,
              "degraded": modelio.load_model(ctx.input("degrade") / MODEL_DIR, dtype, str(device))}
    if "export" in ctx.inputs:
        models["recovered"] = modelio.load_model(ctx.input("export") / MODEL_DIR, dtype,
                                                 str(device))
    results = evaluate_models(models, dense, wins, cfg.batch_size, device, ctx.progress)
    metrics: Metrics = {"windows": int(wins.shape[0]), "seq_len": cfg.seq_len, "models": results}
    atomic_write_json(ctx.out_dir / RESULTS, metrics)
    return metrics
