"""Training losses of the recovery stage, as pure functions of logits and masks.

Conventions: ``logits`` (B, T, V) come from a causal LM on ``ids`` (B, T); position ``t``
predicts token ``t + 1``. A *target mask* (B, T) marks the tokens that count as targets
(response tokens for cross-entropy); the logits that predict them sit one position
earlier. A *position mask* (B, T) marks positions whose next-token distributions are
compared (for the KL). Every loss is a mean over the counted tokens, so micro-batches of
different lengths weigh tokens alike within a batch.

Weights and the temperature arrive as arguments; their checked config belongs to the train
stage (:class:`recoup.stages.recovery.config.LossConfig`), so this module needs torch alone.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

#: Positions the distillation KL averages over: every real token, or those predicting a
#: response token.
KlPositions = Literal["all", "response"]


def response_target_mask(prompt_lens: Tensor, lengths: Tensor, seq_len: int) -> Tensor:
    """(B,) prompt and total lengths -> (B, T) bool: True on response tokens.

    Token ``t`` of sample ``i`` is a response token when ``prompt_lens[i] <= t < lengths[i]``;
    prompt tokens and right padding are False.
    """
    pos = torch.arange(seq_len, device=lengths.device)[None, :]  # (1, T)
    return (pos >= prompt_lens[:, None]) & (pos < lengths[:, None])  # (B, T)


def response_cross_entropy(logits: Tensor, ids: Tensor, target_mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the tokens where ``target_mask`` is True.

    ``logits`` (B, T, V), ``ids`` (B, T), ``target_mask`` (B, T) bool. Token ``t``'s loss
    uses the logits at ``t - 1``, so the first token is never a target.
    """
    targets = target_mask[:, 1:]  # (B, T-1): which next tokens count
    n = targets.sum()
    if int(n) == 0:
        raise ValueError("no target tokens in the batch: every response was masked or cut")
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return (nll * targets).sum() / n


def distill_kl(teacher_logits: Tensor, student_logits: Tensor, position_mask: Tensor,
               temperature: float = 1.0) -> Tensor:
    """``T^2 * mean KL(softmax(teacher / T) || softmax(student / T))`` over masked positions.

    Both logits (B, T, V), ``position_mask`` (B, T) bool. The ``T^2`` keeps gradient
    magnitudes comparable across temperatures (Hinton et al.). The teacher gets no gradient.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    n = position_mask.sum()
    if int(n) == 0:
        raise ValueError("no positions to distil on in the batch")
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)  # (B, T, V)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    kl = (t.exp() * (t - s)).sum(-1)  # (B, T)
    return temperature**2 * (kl * position_mask).sum() / n


def topk_distill_kl(teacher_topk_logits: Tensor, teacher_topk_ids: Tensor, student_logits: Tensor,
                    position_mask: Tensor, temperature: float = 1.0) -> Tensor:
    """:func:`distill_kl` with a teacher stored as its top-k logits per position.

    ``teacher_topk_logits`` / ``teacher_topk_ids`` (B, T, K); the teacher distribution is
    its softmax over those K tokens (renormalised), compared with the student's full
    log-softmax read at the same ids. Equals :func:`distill_kl` when K is the vocabulary.
    """
    n = position_mask.sum()
    if int(n) == 0:
        raise ValueError("no positions to distil on in the batch")
    t = F.log_softmax(teacher_topk_logits.detach().float() / temperature, dim=-1)  # (B, T, K)
    s_full = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    s = s_full.gather(-1, teacher_topk_ids)  # (B, T, K)
    kl = (t.exp() * (t - s)).sum(-1)  # (B, T)
    return temperature**2 * (kl * position_mask).sum() / n


def weighted_sum(terms: dict[str, tuple[float, Tensor | None]]) -> Tensor:
    """``sum(weight * value)`` over terms with a non-zero weight; a zero weight skips the
    term entirely (its value may be None, e.g. no teacher loaded)."""
    used = [(w, v) for w, v in terms.values() if w != 0]
    if not used:
        raise ValueError("all loss weights are zero")
    missing = [k for k, (w, v) in terms.items() if w != 0 and v is None]
    if missing:
        raise ValueError(f"loss terms {missing} have a weight but no value")
    total = used[0][0] * used[0][1]
    for w, v in used[1:]:
        total = total + w * v
    return total


def recovery_loss(
    logits: Tensor, ids: Tensor, target_mask: Tensor, attention_mask: Tensor,
    teacher_logits: Tensor | None, *, ce_weight: float, kl_weight: float,
    temperature: float = 1.0, kl_on: KlPositions = "all",
) -> tuple[Tensor, dict[str, float]]:
    """``ce_weight * CE + kl_weight * KL`` of one micro-batch and its parts (for logging).

    ``target_mask`` (B, T) marks response tokens, ``attention_mask`` (B, T) real tokens;
    ``teacher_logits`` may be None when ``kl_weight`` is 0. ``kl_on``: the positions the KL
    averages over, ``all`` real tokens or those that predict a ``response`` token;
    ``temperature`` as in :func:`distill_kl`.
    """
    ce = kl = None
    if ce_weight:
        ce = response_cross_entropy(logits, ids, target_mask)
    if kl_weight:
        if teacher_logits is None:
            raise ValueError("kl_weight > 0 needs teacher logits")
        if kl_on == "all":
            positions = attention_mask.bool()
        else:  # the positions that predict response tokens
            positions = torch.zeros_like(target_mask)
            positions[:, :-1] = target_mask[:, 1:]
        kl = distill_kl(teacher_logits, logits, positions, temperature)
    total = weighted_sum({"ce": (ce_weight, ce), "kl": (kl_weight, kl)})
    parts = {k: float(v.detach()) for k, v in (("ce", ce), ("kl", kl)) if v is not None}
    return total, parts


__all__ = (
    "KlPositions",
    "recovery_loss",
    "distill_kl",
    "response_cross_entropy",
    "response_target_mask",
    "topk_distill_kl",
    "weighted_sum",
)
