"""The one prompt/response tokenisation rule: EOS after a response, the response cut first."""

from __future__ import annotations

from recoup.stages.model import capture
from recoup.stages.model.modelio import byte_tokenizer
from recoup.stages.model.tokenize import join_prompt_response, pair_ids, tokenize_pair


def test_join_cuts_only_the_response() -> None:
    s = join_prompt_response([1, 2, 3], [4, 5, 6, 7], max_length=5)
    assert s.ids == (1, 2, 3, 4, 5) and s.response_start == 3
    assert capture.token_selection(s, "mean_response") == (3, 5)
    assert capture.token_selection(s, "last_token") == (4, 5)
    q = join_prompt_response([1, 2, 3], [])
    assert not q.has_response and capture.token_selection(q, "mean_response") == (2, 3)


def test_a_prompt_longer_than_max_length_is_cut_and_keeps_no_response() -> None:
    """The resolved disagreement: training's rule (cut the prompt, no response left) wins
    over the data stage's old error; stages that need the whole prompt check its length."""
    s = join_prompt_response([1, 2, 3], [4], max_length=2)
    assert s.ids == (1, 2) and s.response_start == 2 and not s.has_response


def test_eos_follows_a_response_and_is_cut_first() -> None:
    tok = byte_tokenizer()
    full = tokenize_pair(tok, "Q:", "ab")
    assert full.ids[-1] == tok.eos_token_id and len(full.ids) - full.response_start == 3
    cut = tokenize_pair(tok, "Q:", "ab", max_length=len(full.ids) - 1)
    assert cut.ids == full.ids[:-1]  # the EOS went first
    q = tokenize_pair(tok, "Q:", "")
    assert not q.has_response and tok.eos_token_id not in q.ids[1:]
    assert q.ids == full.ids[:full.response_start]  # the prompt's tokens never depend on r
    ((p, r),) = pair_ids(tok, ["Q:"], ["ab"])
    assert tuple(p + r) == full.ids
