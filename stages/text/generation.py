"""Text generation by the dense model itself: the pure parts of the synthesize stage.

Each sequence starts from one token drawn uniformly from the vocabulary (special and added
tokens excluded, :func:`start_token_pool`), continues with greedy steps
(:class:`GreedyFirst`) and is then sampled (:func:`generate`). Every shard draws from its
own seed (:func:`shard_seed`), so its text depends on (seed, shard) only. After generation,
exact duplicates are dropped (:func:`deduplicate`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

SYNTHETIC_FILE = "synthetic.parquet"
"""The synthesize stage's deduplicated output, the file the ``synthetic`` data source reads."""
_USER_MARK = "\x00RECOUP_USER_TEXT\x00"


def start_token_pool(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """Ids a sequence may start from: the model's vocabulary minus special and added tokens.

    Added tokens (``<|im_start|>``, ``<repo_name>``...) are control markers, not text; a
    sequence started from one imitates a file format instead of language.
    """
    banned = set(int(i) for i in tokenizer.all_special_ids)
    banned |= {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    pool = [i for i in range(min(vocab_size, len(tokenizer))) if i not in banned]
    if not pool:
        raise ValueError("the tokenizer has no ordinary tokens to start a sequence from")
    return torch.tensor(pool, dtype=torch.long)


def shard_seed(seed: int, shard: int) -> int:
    """One seed per shard, so a shard's text depends on (seed, shard) only."""
    digest = hashlib.sha256(f"{seed}:{shard}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def cut_at_stop(ids: Sequence[int], stop: set[int]) -> list[int]:
    """The tokens before the first stop token (all of them when none occurs)."""
    out: list[int] = []
    for t in ids:
        if t in stop:
            break
        out.append(int(t))
    return out


def normalized(text: str) -> str:
    """The text duplicates are judged by: whitespace runs collapsed, ends stripped."""
    return re.sub(r"\s+", " ", text).strip()


def deduplicate(rows: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """First occurrence (in the given order) of each normalised prompt + response."""
    seen: set[str] = set()
    kept: list[dict[str, Any]] = []
    dropped = 0
    for row in rows:
        key = normalized(row["prompt"]) + "\x00" + normalized(row["response"])
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        kept.append(dict(row))
    return kept, dropped


def stop_tokens(tokenizer: Any, generation_config: Any) -> set[int]:
    """Ids that end a sequence: the tokenizer's EOS and the model's generation EOS ids
    (SmolLM2-Instruct ends a turn with ``<|im_end|>``, listed in either)."""
    eos = getattr(generation_config, "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])]
    return {int(i) for i in ids if i is not None}


def chat_user_prefix(tokenizer: Any) -> str:
    """The rendered chat template up to where the user's message goes."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("synthesize.mode=chat needs a tokenizer with a chat template; this "
                         "model's tokenizer has none (use mode: text)")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _USER_MARK}],
                                             tokenize=False)
    if _USER_MARK not in rendered:
        raise ValueError("the chat template does not place the user's message verbatim")
    return str(rendered.split(_USER_MARK)[0])


class GreedyFirst:
    """Logits processor: the first ``steps`` generated tokens are the argmax.

    Masking every other logit makes the sampler pick the argmax, so one ``generate`` call
    does the greedy steps and then samples (temperature and top-p keep the argmax).
    """

    def __init__(self, start_len: int, steps: int) -> None:
        self.start_len, self.steps = start_len, steps

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] - self.start_len >= self.steps:
            return scores
        keep = scores.argmax(dim=-1, keepdim=True)  # (B, 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, keep, scores.gather(-1, keep))


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """The decoding settings of one ``generate`` call."""

    max_new_tokens: int
    greedy_tokens: int
    temperature: float
    top_p: float


@torch.no_grad()
def generate(model: Any, ids: torch.Tensor, attention_mask: torch.Tensor, s: Sampling,
             stop: set[int], pad_id: int) -> list[list[int]]:
    """New tokens of each row of ``ids`` (B, T), left-padded, cut at the first stop token."""
    from transformers import LogitsProcessorList

    out = model.generate(
        input_ids=ids, attention_mask=attention_mask, do_sample=True,
        temperature=s.temperature, top_p=s.top_p, top_k=0, max_new_tokens=s.max_new_tokens,
        eos_token_id=sorted(stop), pad_token_id=pad_id,
        logits_processor=LogitsProcessorList([GreedyFirst(ids.shape[1], s.greedy_tokens)]),
    )  # (B, T + new)
    return [cut_at_stop(row.tolist(), stop) for row in out[:, ids.shape[1]:]]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T_max) ids and attention mask, padded on the left so generation continues each."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, t - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[i, t - len(s):] = 1
    return ids, mask


__all__ = (
    "SYNTHETIC_FILE",
    "GreedyFirst",
    "Sampling",
    "chat_user_prefix",
    "cut_at_stop",
    "deduplicate",
    "generate",
    "left_pad",
    "normalized",
    "shard_seed",
    "start_token_pool",
    "stop_tokens",
)
