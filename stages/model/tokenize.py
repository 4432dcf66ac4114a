"""The one rule that turns a (prompt, response) pair into model input.

Every stage that feeds a sample to a model uses it: the data stage counts lengths with it,
collect builds its four views with it, sensitivity and train encode their samples with it.
Two rules used to exist (the data stage's without EOS and with the prompt never cut;
training's with EOS and the whole sequence cut), so the data stage's length filter and
the training input disagreed on what a sample is. The rule now:

- the prompt is tokenized *with* the tokenizer's special tokens (BOS where it adds one),
  the response *without*, and the two are concatenated, so a prompt's tokens are the same
  whatever response follows and the prompt/response boundary is exact;
- **EOS**: a non-empty response is followed by the tokenizer's EOS (when it has one). The
  dense model ends its answers there; training and distillation on response tokens must
  include that position, or a recovered model learns not to stop. A prompt-only input
  (an empty response) gets no EOS: its last token is the last prompt token;
- **truncation** to ``max_length``: the response is cut from its tail (so EOS goes first);
  the prompt is cut only when it alone is longer than ``max_length``, and then no response
  token is left (``has_response`` is False; such a sample teaches nothing and training
  drops it). The data stage keeps only samples whose whole encoding fits, so stages fed by
  it never cut a prompt.

Pure: the standard library only; ``tokenizer`` is anything callable like a Hugging Face
tokenizer (``tokenizer(texts, add_special_tokens=...)["input_ids"]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class TokenSeq:
    """One model input: token ids, and where its response starts (``len(ids)``: none)."""

    ids: tuple[int, ...]
    response_start: int

    def __post_init__(self) -> None:
        if not self.ids:
            raise ValueError("a token sequence needs at least one token")
        if not 0 < self.response_start <= len(self.ids):
            raise ValueError(
                f"response_start {self.response_start} is outside 1..{len(self.ids)} "
                "(a sequence needs at least one prompt token)"
            )

    @property
    def has_response(self) -> bool:
        return self.response_start < len(self.ids)


def pair_ids(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str],
             ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids with EOS) of each pair, uncut; batched tokenizer calls."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return []
    p_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    out = []
    for response, p, r in zip(responses, p_ids, r_ids, strict=True):
        r = list(r) if response else []
        if r and eos is not None:
            r.append(int(eos))
        out.append(([int(i) for i in p], [int(i) for i in r]))
    return out


def join_prompt_response(prompt_ids: Sequence[int], response_ids: Sequence[int],
                         max_length: int | None = None) -> TokenSeq:
    """``prompt + response`` cut to ``max_length`` by the rule in the module docstring."""
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    ids = (tuple(prompt_ids) + tuple(response_ids))[:max_length]
    return TokenSeq(ids=ids, response_start=min(len(prompt_ids), len(ids)))


def tokenize_pair(tokenizer: Any, prompt: str, response: str,
                  max_length: int | None = None) -> TokenSeq:
    """The model input of ``prompt + response`` (EOS after a non-empty response), cut to
    ``max_length`` tokens: the response's tail first, the prompt only if it alone is longer."""
    ((p, r),) = pair_ids(tokenizer, [prompt], [response])
    return join_prompt_response(p, r, max_length)


__all__ = ("TokenSeq", "join_prompt_response", "pair_ids", "tokenize_pair")
