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

from typing import Literal, NamedTuple

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


class TeacherTopK(NamedTuple):
    """A teacher stored as its top-k next-token distribution per position (B, T, ...).

    ``ids`` (B, T, K) int64: the k most likely tokens; ``logprobs`` (B, T, K): their
    log-probabilities under ``softmax(teacher_logits / T)``; ``tail`` (B, T): the log of the
    remaining mass ``log(1 - sum(exp(logprobs)))`` (``-inf`` when K is the vocabulary).
    """

    ids: Tensor
    logprobs: Tensor
    tail: Tensor


def teacher_topk(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> TeacherTopK:
    """The top-``k`` of ``softmax(teacher_logits / temperature)`` and the log tail mass.

    ``teacher_logits`` (..., V) -> ids, logprobs (..., k) and tail (...). The tail is computed
    as ``logsumexp`` over the tokens outside the top-k minus ``logsumexp`` over all, so a
    tail far below float32's resolution of 1 keeps its magnitude.
    """
    if not 1 <= k <= teacher_logits.shape[-1]:
        raise ValueError(f"top-k needs 1 <= k <= the vocabulary size "
                         f"({teacher_logits.shape[-1]}), got {k}")
    z = teacher_logits.detach().float() / temperature  # (..., V)
    lse = torch.logsumexp(z, dim=-1)  # (...)
    top, ids = z.topk(k, dim=-1)  # (..., k) each
    rest = z.scatter(-1, ids, float("-inf"))  # (..., V): the top-k left out
    tail = torch.logsumexp(rest, dim=-1) - lse  # (...), -inf when k == V
    return TeacherTopK(ids=ids, logprobs=top - lse[..., None], tail=tail)


def _plogp(logp: Tensor) -> Tensor:
    """``p log p`` from ``log p``, 0 where ``p == 0`` (``log p == -inf``)."""
    p = logp.exp()
    return torch.where(p > 0, p * logp, torch.zeros_like(p))


def _topk_tail_kl_sum(ids: Tensor, logprobs: Tensor, tail: Tensor, student_logits: Tensor,
                      position_mask: Tensor, temperature: float) -> Tensor:
    """The sum over the masked positions of :func:`topk_tail_kl`'s per-position KL (not
    scaled): ``ids``, ``logprobs`` (B, T, K), ``tail`` (B, T), ``student_logits`` (B, T, V),
    ``position_mask`` (B, T)."""
    s = student_logits.float()  # (B, T, V)
    if temperature != 1.0:  # (at 1 no copy: the vocabulary-wide tensors are the peak)
        s = s / temperature
    lse = torch.logsumexp(s, dim=-1)  # (B, T)
    log_q = s.gather(-1, ids) - lse[..., None]  # (B, T, K)
    # the student's tail: the top-k pushed to the float32 minimum (not -inf, whose gradient
    # through logsumexp is NaN when k is the whole vocabulary)
    rest = s.scatter(-1, ids, torch.finfo(s.dtype).min)  # (B, T, V)
    log_q_tail = torch.logsumexp(rest, dim=-1) - lse  # (B, T)
    logp, tail = logprobs.detach().float(), tail.detach().float()
    kl = (_plogp(logp) - logp.exp() * log_q).sum(-1)  # (B, T)
    kl = kl + _plogp(tail) - tail.exp() * log_q_tail  # (B, T)
    return (kl * position_mask).sum()


def topk_tail_kl(teacher: TeacherTopK, student_logits: Tensor, position_mask: Tensor,
                 temperature: float = 1.0, *, chunk_tokens: int = 0) -> Tensor:
    """:func:`distill_kl` against a teacher kept as its top-k plus one tail bucket.

    ``KL(p || q) ~= sum_{i in topk} p_i (log p_i - log q_i) + p_tail (log p_tail - log
    q_tail)`` with ``q_tail = 1 - sum_{topk} q_i``: the KL of the two distributions coarsened
    to k + 1 outcomes. It equals :func:`distill_kl` when k is the vocabulary and is never
    above it otherwise (coarsening cannot increase a KL), so small k underestimates the
    distance only by the teacher's spread inside its tail. ``student_logits`` (B, T, V),
    ``position_mask`` (B, T) bool; scaled by ``T^2`` like :func:`distill_kl`.

    ``chunk_tokens`` > 0 (with gradients on): computed over about that many tokens of
    positions at a time, each chunk checkpointed (recomputed in the backward), so its
    vocabulary-wide float32 tensors (the student's log-softmax, its tail, their gradients:
    several times the logits) live for one chunk, not the micro-batch; the same value.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    n = position_mask.sum()
    if int(n) == 0:
        raise ValueError("no positions to distil on in the batch")
    parts = (teacher.ids, teacher.logprobs, teacher.tail, student_logits, position_mask)
    B, T = position_mask.shape
    step = max(1, chunk_tokens // B) if chunk_tokens > 0 else T
    if step >= T or not torch.is_grad_enabled():
        total = _topk_tail_kl_sum(*parts, temperature)
    else:
        from torch.utils.checkpoint import checkpoint

        total = sum(checkpoint(_topk_tail_kl_sum, *(t[:, a:a + step] for t in parts),
                               temperature, use_reentrant=False)
                    for a in range(0, T, step))
    return temperature**2 * total / n


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
    teacher: Tensor | TeacherTopK | None, *, ce_weight: float, kl_weight: float,
    temperature: float = 1.0, kl_on: KlPositions = "all", chunk_tokens: int = 0,
) -> tuple[Tensor, dict[str, float]]:
    """``ce_weight * CE + kl_weight * KL`` of one micro-batch and its parts (for logging).

    ``target_mask`` (B, T) marks response tokens, ``attention_mask`` (B, T) real tokens;
    ``teacher``: the dense model's logits (B, T, V) for the exact KL (:func:`distill_kl`),
    or its top-k per position (:class:`TeacherTopK`, :func:`topk_tail_kl`); None when
    ``kl_weight`` is 0. ``kl_on``: the positions the KL
    averages over, ``all`` real tokens or those that predict a ``response`` token;
    ``temperature`` as in :func:`distill_kl`; ``chunk_tokens`` as in :func:`topk_tail_kl`.
    """
    ce = kl = None
    if ce_weight:
        ce = response_cross_entropy(logits, ids, target_mask)
    if kl_weight:
        if teacher is None:
            raise ValueError("kl_weight > 0 needs the teacher's logits or top-k")
        if kl_on == "all":
            positions = attention_mask.bool()
        else:  # the positions that predict response tokens
            positions = torch.zeros_like(target_mask)
            positions[:, :-1] = target_mask[:, 1:]
        if isinstance(teacher, TeacherTopK):
            kl = topk_tail_kl(teacher, logits, positions, temperature,
                              chunk_tokens=chunk_tokens)
        else:
            kl = distill_kl(teacher, logits, positions, temperature)
    total = weighted_sum({"ce": (ce_weight, ce), "kl": (kl_weight, kl)})
    parts = {k: float(v.detach()) for k, v in (("ce", ce), ("kl", kl)) if v is not None}
    return total, parts


__all__ = (
    "KlPositions",
    "TeacherTopK",
    "recovery_loss",
    "distill_kl",
    "response_cross_entropy",
    "response_target_mask",
    "teacher_topk",
    "topk_distill_kl",
    "topk_tail_kl",
    "weighted_sum",
)
