"""Device memory and time of block-by-block pruning (wanda, sparsegpt) on a random Llama.

    python benchmarks/prune_memory.py                     # small, ~1-2 min on a 2-core CPU
    python benchmarks/prune_memory.py --config llama-13b  # the 13B shape, for one GPU

Prints, per method, the peak device bytes of `degrade_blockwise` divided by the bytes of the
whole model, and the seconds per decoder block; the last line is
`prune_peak_memory_ratio: <value>`, the larger of the two methods' ratios.

On CUDA the peak is `torch.cuda.max_memory_allocated`; elsewhere it is the driver's own
accounting of the tensors it places on the compute device (see BlockwiseResult), not an
allocator reading.

How the model is built (both configs, so the 13B path is the one exercised here): the
model is constructed on the meta device, so no memory is allocated, then the embedding and
each decoder block are materialised on the CPU one at a time and filled like Hugging Face's
init (linear weights N(0, initializer_range), norms 1). The final norm and the LM head stay
on meta: the degrade driver never reads them, and "full model bytes" counts them from their
shapes. Host memory therefore peaks at the embedding plus the decoder blocks (about 26 GB in
bf16 for 13B), never at two copies. Each method gets a freshly built model from the same
seed. Calibration ids are random tokens; the weights are random, so only memory and time
are meaningful, not the pruned model's quality.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from recoup.stages.compress.blockwise import BlockwiseResult, degrade_blockwise
from recoup.stages.compress.methods import DegradeSpec

METHODS = ("wanda", "sparsegpt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Llama's MLP width is about 8/3 of hidden, rounded; 1376 for hidden 512 (as 11008 for 4096)
MLP_RATIO = 2.6875


@dataclass(frozen=True, kw_only=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    dtype: str
    samples: int
    seq: int
    micro_batch: int


PRESETS: dict[str, Shape] = {
    "small": Shape(
        layers=4,
        hidden=512,
        heads=8,
        kv_heads=8,
        intermediate=int(512 * MLP_RATIO),
        vocab=32000,
        dtype="float32",
        samples=16,
        seq=256,
        micro_batch=4,
    ),
    # Llama-2-13B; calibration as in the Wanda / SparseGPT papers (128 x 2048 tokens)
    "llama-13b": Shape(
        layers=40,
        hidden=5120,
        heads=40,
        kv_heads=40,
        intermediate=13824,
        vocab=32000,
        dtype="bfloat16",
        samples=128,
        seq=2048,
        micro_batch=8,
    ),
}


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(PRESETS), default="small")
    for name in Shape.__dataclass_fields__:
        flag = "--" + name.replace("_", "-")
        kind = str if name == "dtype" else int
        parser.add_argument(flag, type=kind, default=None, help=f"override the preset's {name}")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--offload-activations", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice). On a busy small CPU, 1 can be much "
        "faster: SparseGPT's per-column updates are tiny and OpenMP waits on descheduled threads",
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args()


def _shape(args: argparse.Namespace) -> Shape:
    preset = PRESETS[args.config]
    overrides = {
        name: getattr(args, name)
        for name in Shape.__dataclass_fields__
        if getattr(args, name) is not None
    }
    if "hidden" in overrides and "intermediate" not in overrides:
        overrides["intermediate"] = int(overrides["hidden"] * MLP_RATIO)
    values = {**preset.__dict__, **overrides}
    if values["dtype"] not in DTYPES:
        raise SystemExit(f"--dtype {values['dtype']} is not one of {', '.join(DTYPES)}.")
    return Shape(**values)


def _hf_init(module: nn.Module, std: float) -> None:
    """Hugging Face's Llama init on an already materialised module."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear | nn.Embedding):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
        elif isinstance(sub, LlamaRMSNorm):
            nn.init.ones_(sub.weight)


def build_random_llama(shape: Shape, seed: int) -> LlamaForCausalLM:
    """Meta-constructed Llama with the embedding and blocks materialised one at a time on
    the CPU (final norm and LM head left on meta; see the module docstring)."""
    config = LlamaConfig(
        num_hidden_layers=shape.layers,
        hidden_size=shape.hidden,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        vocab_size=shape.vocab,
        max_position_embeddings=max(shape.seq, 4096),
    )
    dtype = DTYPES[shape.dtype]
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for module in (model.model.embed_tokens, *model.model.layers):
        module.to_empty(device="cpu")
        with torch.no_grad():
            _hf_init(module, config.initializer_range)
    torch.random.set_rng_state(generator_state)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # non-persistent buffers
    return model.eval()


def _model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _run(method: str, shape: Shape, args: argparse.Namespace) -> tuple[int, BlockwiseResult, float]:
    model = build_random_llama(shape, args.seed)
    full = _model_bytes(model)
    calib = torch.randint(
        0, shape.vocab, (shape.samples, shape.seq), generator=torch.Generator().manual_seed(1)
    )
    started = time.perf_counter()
    result = degrade_blockwise(
        model,
        calib,
        DegradeSpec(method=method, sparsity=args.sparsity),
        device=torch.device(args.device),
        micro_batch=shape.micro_batch,
        offload_activations=args.offload_activations,
        progress=not args.no_progress,
    )
    return full, result, time.perf_counter() - started


def main() -> None:
    args = _parse()
    shape = _shape(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"model: random Llama, layers={shape.layers} hidden={shape.hidden} heads={shape.heads} "
        f"kv_heads={shape.kv_heads} intermediate={shape.intermediate} vocab={shape.vocab} "
        f"dtype={shape.dtype}"
    )
    print(
        f"calibration: samples={shape.samples} seq={shape.seq} micro_batch={shape.micro_batch} "
        f"device={args.device} offload_activations={args.offload_activations} "
        f"sparsity={args.sparsity} threads={torch.get_num_threads()}"
    )
    ratios = []
    for method in METHODS:
        full, result, total = _run(method, shape, args)
        ratio = result.peak_device_bytes / full
        ratios.append(ratio)
        per_block = result.seconds_per_block
        print(
            f"{method}: peak device bytes {result.peak_device_bytes:,} ({result.peak_source}) / "
            f"full model bytes {full:,} = {ratio:.4f}; seconds per block mean "
            f"{sum(per_block) / len(per_block):.2f} "
            f"[{', '.join(f'{s:.2f}' for s in per_block)}]; total {total:.1f} s"
        )
    print(f"prune_peak_memory_ratio: {max(ratios):.4f}")


if __name__ == "__main__":
    main()
