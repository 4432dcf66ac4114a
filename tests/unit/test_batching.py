"""Sample encoding and batching: the response is what the target mask marks."""

from __future__ import annotations

from recoup.stages.recovery.batching import Encoded, collate, encode_sample


def test_encode_and_collate_mark_the_response() -> None:
    from recoup.stages.model.modelio import byte_tokenizer

    tok = byte_tokenizer()
    e = encode_sample(tok, "Q:", "ab", max_len=100)
    assert e.prompt_len == 2 and len(e.ids) == 5 and e.ids[-1] == tok.eos_token_id
    cut = encode_sample(tok, "Q:", "abcdef", max_len=4)
    assert len(cut.ids) == 4 and cut.prompt_len == 2
    batch = collate([e, Encoded(ids=(5, 6, 7), prompt_len=1)], pad_id=0)
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert batch["target_mask"].tolist() == [[False, False, True, True, True],
                                             [False, True, True, False, False]]
