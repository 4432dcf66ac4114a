"""Tokenised samples and their batches, shared by training and the layer measurements.

Training (:mod:`recoup.stages.recovery.task`), the sensitivity stage and ``lora.layers:
auto`` (:mod:`recoup.stages.recovery.layer_ranking`) all feed the models the same encoded
samples in the same right-padded batches, so the tokens a layer is ranked on are the tokens
it is trained on. One module, so there is one encoding and one padding rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from recoup.stages.model.tokenize import tokenize_pair
from recoup.stages.recovery.losses import TeacherTopK, response_target_mask


@dataclass(frozen=True)
class Encoded:
    """One tokenised sample: ``ids`` = prompt tokens then response tokens (+ EOS)."""

    ids: tuple[int, ...]
    prompt_len: int


def encode_sample(tokenizer: Any, prompt: str, response: str, max_len: int) -> Encoded:
    """The sample as :func:`recoup.stages.model.tokenize.tokenize_pair` encodes it for every
    stage (EOS after a non-empty response, cut to ``max_len`` tokens, response tail first)."""
    seq = tokenize_pair(tokenizer, prompt, response, max_len)
    return Encoded(ids=seq.ids, prompt_len=seq.response_start)


def collate(samples: Sequence[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``target_mask`` (B, T_max)."""
    lengths = torch.tensor([len(s.ids) for s in samples])
    t = int(lengths.max())
    ids = torch.full((len(samples), t), pad_id, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
    pos = torch.arange(t)[None, :]  # (1, T)
    attention = (pos < lengths[:, None]).long()  # (B, T)
    prompt = torch.tensor([s.prompt_len for s in samples])
    return {"input_ids": ids, "attention_mask": attention,
            "target_mask": response_target_mask(prompt, lengths, t)}


def pad_topk(rows: Sequence[TeacherTopK], seq_len: int, k: int) -> dict[str, Tensor]:
    """Each sample's teacher top-k rows (L_i, k) stacked and right-padded to ``seq_len``:
    ``teacher_ids`` (B, T, k) int64, ``teacher_logprobs`` (B, T, k), ``teacher_tail`` (B, T).

    A padded position holds a valid distribution (uniform over tokens ``0..k-1``, no tail)
    so every term of the KL stays finite there; the position mask leaves it out.
    """
    b = len(rows)
    ids = torch.arange(k).expand(b, seq_len, k).clone()  # (B, T, k)
    logprobs = torch.full((b, seq_len, k), -math.log(k))  # (B, T, k)
    tail = torch.full((b, seq_len), float("-inf"))  # (B, T)
    for i, r in enumerate(rows):
        n = min(len(r.tail), seq_len)
        ids[i, :n] = r.ids[:n]
        logprobs[i, :n] = r.logprobs[:n].float()
        tail[i, :n] = r.tail[:n].float()
    return {"teacher_ids": ids, "teacher_logprobs": logprobs, "teacher_tail": tail}


def topk_of(batch: Mapping[str, Tensor]) -> TeacherTopK | None:
    """The teacher top-k a :func:`pad_topk` batch carries (None when it has none)."""
    if "teacher_ids" not in batch:
        return None
    return TeacherTopK(batch["teacher_ids"], batch["teacher_logprobs"], batch["teacher_tail"])


__all__ = ("Encoded", "collate", "encode_sample", "pad_topk", "topk_of")
