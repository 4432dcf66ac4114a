"""The pure parts of synthetic data generation, on the byte tokenizer and a tiny Llama."""

from __future__ import annotations

import pytest
import torch

from recoup.stages.model import modelio
from recoup.stages.model.modelio import TinyLlamaConfig
from recoup.stages.synthesize import SynthesizeConfig
from recoup.stages.text.generation import (
    Sampling,
    chat_user_prefix,
    cut_at_stop,
    deduplicate,
    generate,
    left_pad,
    normalized,
    shard_seed,
    start_token_pool,
)

CHATML = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    return modelio.build_tiny_llama(TinyLlamaConfig(), torch.float32)


def test_start_tokens_exclude_special_and_added_tokens() -> None:
    tok = modelio.byte_tokenizer()
    pool = set(start_token_pool(tok, vocab_size=len(tok)).tolist())
    assert not pool & set(tok.all_special_ids)
    assert len(pool) == len(tok) - len(set(tok.all_special_ids))
    assert max(pool) < len(tok)
    # a model vocabulary smaller than the tokenizer's bounds the pool
    assert max(start_token_pool(tok, vocab_size=100).tolist()) < 100


def test_cut_at_stop_and_dedup() -> None:
    assert cut_at_stop([5, 6, 2, 7, 2], {2}) == [5, 6]
    assert cut_at_stop([5, 6], {2}) == [5, 6]
    assert normalized("  a \n\n b\t c ") == "a b c"
    rows = [{"id": "x#0", "prompt": "a", "response": "b c"},
            {"id": "x#1", "prompt": "a", "response": " b  c\n"},
            {"id": "x#2", "prompt": "a", "response": "b d"}]
    kept, dropped = deduplicate(rows)
    assert [r["id"] for r in kept] == ["x#0", "x#2"] and dropped == 1


def test_shard_seeds_are_stable_and_distinct() -> None:
    assert shard_seed(0, 3) == shard_seed(0, 3)
    assert len({shard_seed(s, k) for s in range(3) for k in range(50)}) == 150
    assert shard_seed(0, 3) == 1404577725682996086  # sha256-based: the same on every machine


def test_greedy_steps_equal_greedy_decoding(tiny: tuple[torch.nn.Module, object]) -> None:
    """With every step greedy the sampler must reproduce ``generate(do_sample=False)``."""
    model, _ = tiny
    ids = torch.tensor([[10, 20, 30], [40, 50, 60]])
    mask = torch.ones_like(ids)
    torch.manual_seed(0)
    ours = generate(model, ids, mask, Sampling(max_new_tokens=6, greedy_tokens=6,
                                               temperature=1.5, top_p=0.9), stop=set(), pad_id=2)
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                         pad_token_id=2, eos_token_id=None)
    assert ours == ref[:, 3:].tolist()


def test_sampling_after_the_greedy_steps_is_seeded(tiny: tuple[torch.nn.Module, object]) -> None:
    model, _ = tiny
    ids = torch.tensor([[10], [11], [12], [13]])
    mask = torch.ones_like(ids)
    s = Sampling(max_new_tokens=12, greedy_tokens=2, temperature=1.0, top_p=1.0)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(generate(model, ids, mask, s, stop=set(), pad_id=2))
    torch.manual_seed(8)
    other = generate(model, ids, mask, s, stop=set(), pad_id=2)
    assert runs[0] == runs[1]
    assert [r[:2] for r in other] == [r[:2] for r in runs[0]]  # greedy part: seed-free
    assert other != runs[0]


def test_left_padding_keeps_each_continuation(tiny: tuple[torch.nn.Module, object]) -> None:
    """A batch of prompts of different lengths, left-padded, continues each prompt as it
    would alone (greedy, so the comparison is exact up to float noise in argmax)."""
    model, _ = tiny
    prompts = [[10, 20, 30, 40, 50], [60, 70]]
    ids, mask = left_pad(prompts, pad_id=2)
    assert ids.shape == (2, 5) and mask.tolist()[1] == [0, 0, 0, 1, 1]
    s = Sampling(max_new_tokens=5, greedy_tokens=5, temperature=1.0, top_p=1.0)
    batched = generate(model, ids, mask, s, stop=set(), pad_id=2)
    alone = [generate(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), s,
                      stop=set(), pad_id=2)[0] for p in prompts]
    assert batched == alone


def test_chat_prefix_needs_a_template() -> None:
    tok = modelio.byte_tokenizer()
    with pytest.raises(ValueError, match="chat template"):
        chat_user_prefix(tok)
    tok.chat_template = CHATML
    assert chat_user_prefix(tok) == "<s>user\n"


def test_config_refuses_all_greedy() -> None:
    with pytest.raises(ValueError, match="greedy_tokens"):
        SynthesizeConfig(length=3, greedy_tokens=3)
    with pytest.raises(ValueError, match="greedy_tokens"):
        SynthesizeConfig(mode="chat", prompt_length=2, greedy_tokens=2)
