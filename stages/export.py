"""export: the recovered model as a Hugging Face checkpoint that plain ``transformers`` loads.

- LoRA is merged under the sparsity mask, ``W <- W + M * (B A) * alpha / r``, so every
  pruned weight stays zero; the merged weights are checked finite before anything is
  written (as ``peft``'s ``safe_merge``). Training ran the same masked delta in its forward
  pass (:mod:`recoup.stages.recovery.masked_lora`), so the merge is the trained model, not
  an approximation of it. The PEFT adapter is copied to ``adapter/`` as well; loaded on the
  degraded model by plain peft it runs *unmasked* (a different, denser model than the
  trained one). Without a mask file (fake quantization) the mask is the weight's non-zero
  pattern, in training and here alike.
- With ``train.lora.merge: none`` (EoRA's form) the adapter stays unmerged: the base
  weights keep their zeros untouched and ``adapter_config.json`` +
  ``adapter_model.safetensors`` sit beside them in ``model/``, which ``transformers`` loads
  as the base with the adapter attached (its peft integration). The adapter is a dense
  low-rank branch (``r (in + out)`` multiply-adds per token per linear); a masked merge
  would erase it where the compression error lives (on the pruned positions).
- Compensation is folded into an ``o_proj`` bias ``W_o c`` with the weight the model
  runs with (degraded, plus the masked LoRA delta when ``o_proj`` has an adapter). The
  config gets ``attention_bias: true`` and q/k/v (and untouched o) biases of zero, which
  is how Llama checkpoints carry attention biases, so ``transformers`` (and vLLM) load it
  with no custom code.

The stage checks its own work and fails rather than write a wrong model: the zero count
of every degraded matrix is unchanged, and the exported model, reloaded from disk with
plain ``AutoModelForCausalLM``, gives the logits of the trained model (the degraded model
with the trained parameters attached as training ran them: compensation hooks, unmerged
masked adapters; :func:`recoup.stages.recovery.recovery_model.load_recovered`) on a few tokens.
Training-free methods (``lcc-closed``, ``eora``) write the same files and export the same way.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import load_file

from recoup.orchestrator.config import ADDED_FIELD, StrictModel
from recoup.orchestrator.estimate import EstimateInputs, StageEstimate
from recoup.orchestrator.stage import Metrics, StageContext, register_stage
from recoup.orchestrator.store import atomic_write_json, commit_path, tmp_path_for
from recoup.stages.degrade import MASKS
from recoup.stages.lcc.compensation import Compensation, fold_bias
from recoup.stages.model import layout, modelio
from recoup.stages.prepare import CARD, MODEL_DIR
from recoup.stages.recovery.masked_lora import (
    keep_masks,
    lora_base_weights,
    lora_layers,
    masked_lora_merge,
)
from recoup.stages.recovery.recovery_model import LCC_FILE, LORA_DIR, load_recovered
from recoup.stages.recovery.task import SUMMARY_FILE
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
        "trained model (degraded + trained parameters as training ran them; float32: "
        "loosen for bf16, where merging rounds).",
    )
    rtol: float = Field(
        1e-5, ge=0,
        description="Allowed logit difference relative to the largest |logit| for a float32 "
        "model: the check is max|diff| <= atol + rtol * max|logit|. Folding c into a bias "
        "and merging LoRA change float32 rounding, which deep models with large activations "
        "carry to the logits (SmolLM2-135M: about 1.3e-4 on logits of about 20).",
    )
    rtol_16bit: float = Field(
        3e-2, ge=0,
        description="rtol for a bfloat16 or float16 model, whose folded o_proj bias is saved "
        "in 16 bits: SmolLM2-135M in bfloat16 differs by 0.32 (lcc, all heads) and 0.43 "
        "(lcc+lora) on logits of about 35 (1.2%), where a fold left out moves them by 20-43.",
        json_schema_extra=ADDED_FIELD,
    )
    seed: int = Field(0, description="Seed of the self-check tokens.")
    check_dtype: Literal["float64", "float32", "model"] = Field(
        "float64",
        description="Precision of the self-check's two forwards. 'float64': the forwards "
        "add no rounding of their own, which a deep model carries to the logits of random "
        "tokens: SmolLM2-135M with all 270 heads compensated differs by 6.2e-4 checked in "
        "float32 and 2.4e-4 in float64, the rest being the saved float32 bias's rounding "
        "(0 with the fold kept in float64). Costs a float64 copy of the model on the host "
        "(`recoup plan` counts it). 'float32': half that copy, enough for a 16-bit model "
        "(SmolLM2 in bfloat16: 0.43 either way). 'model': the model's own dtype, no copy; "
        "not for a 16-bit model, whose forward on random tokens is itself off by more than "
        "the check can allow (bfloat16 SmolLM2: 1.7 for the degraded model alone, 38 for an "
        "lcc+lora export whose float64 check passes at 0.43).",
    )


CHECK_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def rtol_field(model_dtype: torch.dtype) -> str:
    """The :class:`ExportConfig` field bounding a model saved in ``model_dtype``: its folded
    bias carries that dtype's rounding whatever the check's precision."""
    return "rtol_16bit" if model_dtype in (torch.bfloat16, torch.float16) else "rtol"


def allowed_logit_diff(cfg: ExportConfig, model_dtype: torch.dtype, max_logit: float) -> float:
    """The self-check's bound: ``atol + rtol * max|logit|``, rtol by :func:`rtol_field`."""
    return cfg.atol + getattr(cfg, rtol_field(model_dtype)) * max_logit


def zero_counts(model: Any) -> dict[str, int]:
    params = dict(model.named_parameters())
    return {n: int((params[n].detach() == 0).sum()) for n in layout.linear_weight_names(model)}


def merge_lora(model: Any, adapter_dir: Path, masks_file: Path | None) -> tuple[Any, int]:
    """Load the adapter on ``model``, merge it under the keep masks of ``masks_file`` (or
    the weights' non-zero pattern, :func:`masked_lora.keep_masks`), return (plain model,
    merged count)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    masks = keep_masks(masks_file, lora_base_weights(peft_model))
    merged = 0
    for name, module in lora_layers(peft_model).items():
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            base = module.get_base_layer()
            key = f"{name}.weight"
            with torch.no_grad():
                base.weight.copy_(masked_lora_merge(
                    base.weight, module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                    float(module.scaling[adapter]), masks[key].to(base.weight.device)))
            merged += 1
    return peft_model.unload(), merged


def o_proj_deltas(model: Any, adapter_dir: Path) -> dict[int, torch.Tensor]:
    """Layer -> ``scale * B A`` (out, in) of the adapter on that layer's ``o_proj``: what an
    unmerged adapter adds to the weight the compensation is folded through."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    deltas: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in lora_layers(peft_model).items():
            if not name.endswith("o_proj"):
                continue
            layer = int(name.split(".layers.", 1)[1].split(".", 1)[0])
            deltas[layer] = sum(module.get_delta_weight(a) for a in module.active_adapters
                                if a in module.lora_A).detach().clone()
    peft_model.unload()  # the adapters come off; the base weights were never touched
    return deltas


def fold_compensation(model: Any, comp: Compensation,
                      extra: dict[int, torch.Tensor] | None = None) -> list[int]:
    """Give every attention projection a bias (zeros) and fold ``comp`` into ``o_proj``'s.

    ``extra``: layer -> a delta the ``o_proj`` weight runs with beside its own (an unmerged
    adapter's ``scale * B A``, which sees the compensated input too). Returns the layers
    whose ``o_proj`` bias is non-zero. Sets ``attention_bias`` in the config so that a
    plain ``from_pretrained`` builds (and loads) these biases.
    """
    if model.config.model_type not in BIAS_CAPABLE:
        raise ValueError(
            f"cannot fold compensation into a {model.config.model_type!r} checkpoint: its "
            f"config has no attention_bias switch (supported: {', '.join(sorted(BIAS_CAPABLE))})"
        )
    vectors = comp.full_vectors()
    o_projs = layout.o_proj_modules(model)
    for i, layer in enumerate(layout.decoder_layers(model)):
        for proj in layout.attention_projections(layer):
            if proj.bias is None:
                proj.bias = torch.nn.Parameter(
                    torch.zeros(proj.out_features, dtype=proj.weight.dtype,
                                device=proj.weight.device), requires_grad=False)
        if i in vectors:
            w = o_projs[i].weight
            if extra and i in extra:
                w = w + extra[i].to(w)
            with torch.no_grad():
                o_projs[i].bias.add_(fold_bias(w, vectors[i].to(w)))
    model.config.attention_bias = True
    return sorted(vectors)


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def embed_adapter(adapter_dir: Path, model_dir: Path) -> int:
    """Put an unmerged adapter beside the base weights in ``model_dir``; returns its
    parameter count. ``transformers`` loads a folder holding ``config.json`` and
    ``adapter_config.json`` as the local base model with the adapter attached (its peft
    integration), so the exported folder stays one plain ``from_pretrained`` away."""
    missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{adapter_dir} lacks {', '.join(missing)}")
    for f in ADAPTER_FILES:
        shutil.copyfile(adapter_dir / f, model_dir / f)
    with safe_open(str(model_dir / ADAPTER_FILES[1]), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


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
def trained_logits(degraded_dir: Path, params: Path, masks_file: Path | None, n_heads: int,
                   dtype: torch.dtype, ids: torch.Tensor, *, masked: bool = True,
                   ) -> torch.Tensor:
    """Logits of the trained model (:func:`load_recovered`: the degraded model with the
    trained parameters attached as training ran them) on ``ids``."""
    base = modelio.load_model(degraded_dir, dtype)
    trained = load_recovered(base, params, n_heads=n_heads, masks_file=masks_file,
                             masked=masked)
    return trained(input_ids=ids).double()


@torch.no_grad()
def _max_logit_diff(reference: torch.Tensor, folder: Path, dtype: torch.dtype,
                    ids: torch.Tensor) -> float:
    """Max |logit difference| between ``reference`` and ``folder`` loaded by plain
    ``AutoModelForCausalLM.from_pretrained`` (no recoup code involved)."""
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return float((exported(input_ids=ids, use_cache=False).logits.double() - reference)
                 .abs().max())


def export_stage(ctx: StageContext) -> Metrics:
    cfg: ExportConfig = ctx.config
    params = ctx.input("train") / PARAMS_DIR
    summary = json.loads((params / SUMMARY_FILE).read_text())
    card = modelio.ModelCard.read(ctx.input("prepare") / CARD)
    dtype = modelio.DTYPES[card.dtype]
    degrade_dir = ctx.input("degrade")
    probe = _check_ids(cfg, card.vocab)
    has_lora = (params / LORA_DIR).is_dir()
    unmerged = has_lora and summary.get("lora_merge", "masked") == "none"
    # the trained model, loaded apart (and dropped) before the model that gets merged
    check_dtype = CHECK_DTYPES.get(cfg.check_dtype, dtype)
    reference = trained_logits(degrade_dir / MODEL_DIR, params, degrade_dir / MASKS,
                               card.heads, check_dtype, probe, masked=not unmerged)
    model = modelio.load_model(degrade_dir / MODEL_DIR, dtype)
    tokenizer = modelio.load_tokenizer(degrade_dir / MODEL_DIR)
    zeros_before = zero_counts(model)
    metrics: Metrics = {
        "method": summary["method"],
        "trainable_params": summary["trainable_params"],
        "base_params": summary["base_params"],
        "trainable_fraction": summary["trainable_fraction"],
    }
    metrics["lora_merge"] = summary.get("lora_merge", "masked") if has_lora else None
    if has_lora and not unmerged:
        model, metrics["lora_merged_modules"] = merge_lora(model, params / LORA_DIR,
                                                           degrade_dir / MASKS)
    comp = None
    if (params / LCC_FILE).is_file():
        comp = _read_comp(params, card.heads)
        metrics["lcc_heads"] = len(comp.chosen)
    if comp is not None:
        extra = o_proj_deltas(model, params / LORA_DIR) if unmerged else None
        metrics["folded_layers"] = fold_compensation(model, comp, extra)
    zeros_after = zero_counts(model)
    changed = [n for n in zeros_before if zeros_after[n] != zeros_before[n]]
    if changed:
        raise ValueError(f"export would change the zero count of {changed[:3]}; refusing")
    modelio.save_model(model, tokenizer, ctx.out_dir / MODEL_DIR)
    if unmerged:
        metrics["adapter_params"] = embed_adapter(params / LORA_DIR, ctx.out_dir / MODEL_DIR)
    # A failed check leaves no manifest, so the written folder never counts as an output.
    diff = _max_logit_diff(reference, ctx.out_dir / MODEL_DIR, check_dtype, probe)
    allowed = allowed_logit_diff(cfg, dtype, float(reference.abs().max()))
    if diff > allowed:
        rtol = rtol_field(dtype)
        raise ValueError(f"the exported model's logits differ from the trained model's by "
                         f"{diff:.3g} (> export.atol={cfg.atol} + export.{rtol}="
                         f"{getattr(cfg, rtol)} x max|logit| = {allowed:.3g})")
    if has_lora:
        tmp_adapter = tmp_path_for(ctx.out_dir / ADAPTER_DIR)
        shutil.copytree(params / LORA_DIR, tmp_adapter)
        commit_path(tmp_adapter, ctx.out_dir / ADAPTER_DIR)
    metrics.update(max_abs_logit_diff=diff, allowed_logit_diff=allowed, zero_counts_unchanged=True,
                   linear_zeros=sum(zeros_after.values()))
    atomic_write_json(ctx.out_dir / REPORT, metrics)
    return metrics


def _summary(m: Metrics) -> str:
    return (f"{m['method']}: {m['trainable_params']} trainable "
            f"({100 * m['trainable_fraction']:.3f}%), max |dlogit| {m['max_abs_logit_diff']:.1e}")


def estimate_export(inp: EstimateInputs) -> StageEstimate:
    """CPU: the degraded model, folded and saved, then reloaded to check it (a copy in the
    check's dtype: 8 bytes a parameter for float64, 4 for float32)."""
    weights = inp.shape.weights_bytes
    cfg: ExportConfig = inp.config
    item = CHECK_DTYPES[cfg.check_dtype].itemsize if cfg.check_dtype in CHECK_DTYPES else None
    check = weights * item // inp.shape.itemsize if item else weights
    precision = cfg.check_dtype if item else "the model's dtype"
    return StageEstimate(stage=inp.stage, workers=1, device_bytes=None,
                         host_bytes=weights + check, disk_bytes=weights,
                         gpus_config=inp.task_resources[1], gpus_min=0, fits=True,
                         notes=("CPU: the degraded model, folded, then reloaded to check it "
                                f"in {precision}",))


EXPORT_VERSION = 3
"""2: the self-check compares with the trained model (masked adapters unmerged); masks of
the adapted linears only. 3: the self-check in float64 by default (``check_dtype``)."""

register_stage(name="export", version=EXPORT_VERSION, requires=("prepare", "degrade", "train"),
               summarize=_summary, estimate=estimate_export)(export_stage)


__all__ = ("ExportConfig", "allowed_logit_diff", "export_stage", "fold_compensation",
           "masked_lora_merge", "merge_lora", "zero_counts")
