"""export: the recovered model as a Hugging Face checkpoint that plain ``transformers`` loads.

- LoRA is merged under the sparsity mask, ``W <- W + M * (B A) * alpha / r``, so every
  pruned weight stays zero; the merged weights are checked finite before anything is
  written (as ``peft``'s ``safe_merge``). The unmerged PEFT adapter is copied to
  ``adapter/`` as well: loaded on the degraded model it keeps all of the sparsity.
  Without a mask file (fake quantization) the mask is the weight's non-zero pattern.
- Compensation is folded into an ``o_proj`` bias ``W_o c`` with the weight the model
  runs with (degraded, plus the masked LoRA delta when ``o_proj`` has an adapter). The
  config gets ``attention_bias: true`` and q/k/v (and untouched o) biases of zero, which
  is how Llama checkpoints carry attention biases, so ``transformers`` (and vLLM) load it
  with no custom code.

The stage checks its own work and fails rather than write a wrong model: the zero count
of every degraded matrix is unchanged, and the exported model, reloaded from disk with
plain ``AutoModelForCausalLM``, gives the logits of the degraded model with the trained
parameters attached (hooks, masked merge) on a few tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import load_file

from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.stage import Metrics, StageContext, register_stage
from recoup.orchestrator.store import atomic_write_json, commit_path, tmp_path_for
from recoup.stages.degrade import MASKS
from recoup.stages.lcc.compensation import Compensation, attach, fold_bias, o_proj_modules
from recoup.stages.model import modelio
from recoup.stages.prepare import CARD, MODEL_DIR
from recoup.stages.recovery.methods import LCC_FILE, LORA_DIR, SUMMARY_FILE
from recoup.stages.train import PARAMS_DIR

ADAPTER_DIR = "adapter"
REPORT = "export.json"
#: model types whose config has ``attention_bias`` and builds q/k/v/o biases from it
BIAS_CAPABLE = frozenset({"llama"})


class ExportConfig(StrictModel):
    check_tokens: int = Field(
        32, ge=2, description="Length of the random token sequence the self-check runs."
    )
    atol: float = Field(
        1e-4, gt=0,
        description="Largest allowed |logit difference| between the exported model and the "
        "degraded model with the trained parameters attached (float32; loosen for bf16).",
    )
    seed: int = Field(0, description="Seed of the self-check tokens.")


def masked_lora_merge(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                      mask: torch.Tensor) -> torch.Tensor:
    """``W + mask * (B @ A) * scale``: (out, in), computed in float32 or wider.

    ``A`` (r, in), ``B`` (out, r), ``mask`` (out, in) bool keep-mask. Raises if the result
    is not finite (an overflowing adapter must not reach a checkpoint).
    """
    if mask.shape != W.shape or A.shape[1] != W.shape[1] or B.shape[0] != W.shape[0]:
        raise ValueError(f"shapes do not fit: W {tuple(W.shape)}, A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}, mask {tuple(mask.shape)}")
    work = torch.promote_types(W.dtype, torch.float32)
    delta = (B.to(work) @ A.to(work)) * scale  # (out, in)
    merged = W.to(work) + delta * mask.to(work)
    if not torch.isfinite(merged).all():
        raise ValueError("the merged LoRA weight is not finite; refusing to export it")
    return merged.to(W.dtype)


def zero_counts(model: Any) -> dict[str, int]:
    params = dict(model.named_parameters())
    return {n: int((params[n].detach() == 0).sum()) for n in modelio.linear_weight_names(model)}


def _load_masks(degrade_dir: Path, model: Any) -> dict[str, torch.Tensor]:
    path = degrade_dir / MASKS
    if path.is_file():
        return load_file(str(path))
    params = dict(model.named_parameters())
    return {n: params[n].detach() != 0 for n in modelio.linear_weight_names(model)}


def merge_lora(model: Any, adapter_dir: Path, masks: dict[str, torch.Tensor]) -> tuple[Any, int]:
    """Load the adapter on ``model``, merge it under ``masks``, return (plain model, count)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    merged = 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            base = module.get_base_layer()
            key = name.removeprefix("base_model.model.") + ".weight"
            if key not in masks:
                raise ValueError(f"no sparsity mask for {key}")
            with torch.no_grad():
                base.weight.copy_(masked_lora_merge(
                    base.weight, module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                    float(module.scaling[adapter]), masks[key].to(base.weight.device)))
            merged += 1
    return peft_model.unload(), merged


def fold_compensation(model: Any, comp: Compensation) -> list[int]:
    """Give every attention projection a bias (zeros) and fold ``comp`` into ``o_proj``'s.

    Returns the layers whose ``o_proj`` bias is non-zero. Sets ``attention_bias`` in the
    config so that a plain ``from_pretrained`` builds (and loads) these biases.
    """
    if model.config.model_type not in BIAS_CAPABLE:
        raise ValueError(
            f"cannot fold compensation into a {model.config.model_type!r} checkpoint: its "
            f"config has no attention_bias switch (supported: {', '.join(sorted(BIAS_CAPABLE))})"
        )
    vectors = comp.full_vectors()
    o_projs = o_proj_modules(model)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            if proj.bias is None:
                proj.bias = torch.nn.Parameter(
                    torch.zeros(proj.out_features, dtype=proj.weight.dtype,
                                device=proj.weight.device), requires_grad=False)
        if i in vectors:
            with torch.no_grad():
                o_projs[i].bias.add_(fold_bias(o_projs[i].weight, vectors[i].to(o_projs[i].weight)))
    model.config.attention_bias = True
    return sorted(vectors)


def _read_comp(params: Path, n_heads: int) -> Compensation:
    path = params / LCC_FILE
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "n_heads" in meta and int(meta["n_heads"]) != n_heads:
        raise ValueError(f"{path} is for {meta['n_heads']} heads, the model has {n_heads}")
    return Compensation.from_state(load_file(str(path)), n_heads=n_heads)


def _check_ids(cfg: ExportConfig, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(cfg.seed)
    return torch.randint(0, vocab, (2, cfg.check_tokens), generator=gen)  # (2, T)


@torch.no_grad()
def _hooked_logits(model: Any, comp: Compensation | None, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` with ``comp`` attached by hooks (what training optimised)."""
    hooks = attach(model, comp) if comp is not None else None
    try:
        return model(input_ids=ids, use_cache=False).logits.float()
    finally:
        if hooks is not None:
            hooks.remove()


@torch.no_grad()
def _max_logit_diff(reference: torch.Tensor, folder: Path, dtype: torch.dtype,
                    ids: torch.Tensor) -> float:
    """Max |logit difference| between ``reference`` and ``folder`` loaded by plain
    ``AutoModelForCausalLM.from_pretrained`` (no recoup code involved)."""
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return float((exported(input_ids=ids, use_cache=False).logits.float() - reference)
                 .abs().max())


def export_stage(ctx: StageContext) -> Metrics:
    cfg: ExportConfig = ctx.config
    params = ctx.input("train") / PARAMS_DIR
    summary = json.loads((params / SUMMARY_FILE).read_text())
    card = modelio.ModelCard.read(ctx.input("prepare") / CARD)
    dtype = modelio.DTYPES[card.dtype]
    degrade_dir = ctx.input("degrade")
    model = modelio.load_model(degrade_dir / MODEL_DIR, dtype)
    tokenizer = modelio.load_tokenizer(degrade_dir / MODEL_DIR)
    zeros_before = zero_counts(model)
    metrics: Metrics = {
        "method": summary["method"],
        "trainable_params": summary["trainable_params"],
        "base_params": summary["base_params"],
        "trainable_fraction": summary["trainable_fraction"],
    }
    has_lora = (params / LORA_DIR).is_dir()
    if has_lora:
        masks = _load_masks(degrade_dir, model)
        model, metrics["lora_merged_modules"] = merge_lora(model, params / LORA_DIR, masks)
    comp = None
    if (params / LCC_FILE).is_file():
        comp = _read_comp(params, card.heads)
        metrics["lcc_heads"] = len(comp.chosen)
    probe = _check_ids(cfg, card.vocab)
    reference = _hooked_logits(model, comp, probe)  # before folding: hooks + masked merge
    if comp is not None:
        metrics["folded_layers"] = fold_compensation(model, comp)
    zeros_after = zero_counts(model)
    changed = [n for n in zeros_before if zeros_after[n] != zeros_before[n]]
    if changed:
        raise ValueError(f"export would change the zero count of {changed[:3]}; refusing")
    modelio.save_model(model, tokenizer, ctx.out_dir / MODEL_DIR)
    # A failed check leaves no manifest, so the written folder never counts as an output.
    diff = _max_logit_diff(reference, ctx.out_dir / MODEL_DIR, dtype, probe)
    if diff > cfg.atol:
        raise ValueError(f"the exported model's logits differ from the hooked model's by "
                         f"{diff:.3g} (> export.atol={cfg.atol})")
    if has_lora:
        tmp_adapter = tmp_path_for(ctx.out_dir / ADAPTER_DIR)
        shutil.copytree(params / LORA_DIR, tmp_adapter)
        commit_path(tmp_adapter, ctx.out_dir / ADAPTER_DIR)
    metrics.update(max_abs_logit_diff=diff, zero_counts_unchanged=True,
                   linear_zeros=sum(zeros_after.values()))
    atomic_write_json(ctx.out_dir / REPORT, metrics)
    return metrics


def _summary(m: Metrics) -> str:
    return (f"{m['method']}: {m['trainable_params']} trainable "
            f"({100 * m['trainable_fraction']:.3f}%), max |dlogit| {m['max_abs_logit_diff']:.1e}")


register_stage(name="export", version=1, requires=("prepare", "degrade", "train"),
               summarize=_summary)(export_stage)


__all__ = ("ExportConfig", "export_stage", "fold_compensation", "masked_lora_merge",
           "merge_lora", "zero_counts")
