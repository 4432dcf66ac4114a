"""Tokenised samples and their batches, shared by training and the layer measurements.

Training (:mod:`recoup.stages.recovery.task`), the sensitivity stage and ``lora.layers:
auto`` (:mod:`recoup.stages.recovery.layer_ranking`) all feed the models the same encoded
samples in the same right-padded batches, so the tokens a layer is ranked on are the tokens
it is trained on. One module, so there is one encoding and one padding rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from recoup.stages.model.tokenize import tokenize_pair
from recoup.stages.recovery.losses import response_target_mask


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


__all__ = ("Encoded", "collate", "encode_sample")
