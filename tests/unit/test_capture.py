"""Unit tests for o_proj capture on a tiny random Llama: the rows are the o_proj inputs at
the right token of each sample, whatever the padding side and batch composition."""

from __future__ import annotations

import pytest
import torch

from recoup.stages.model import capture, layout
from recoup.stages.model.modelio import TinyLlamaConfig, build_tiny_llama
from recoup.stages.model.tokenize import TokenSeq

PAD = 2
#: (prompt tokens, response tokens); mixed lengths so every batch needs padding
SHAPES = [(5, 3), (9, 0), (3, 7), (12, 4), (7, 1)]
#: batching changes GEMM shapes and attention lengths, so rows agree to rounding only
ROUNDING = 1e-5


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    m, _ = build_tiny_llama(TinyLlamaConfig(layers=2, hidden=64, heads=4, kv_heads=2),
                            torch.float32)
    return m


@pytest.fixture(scope="module")
def seqs() -> list[TokenSeq]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n_prompt, n_resp in SHAPES:
        ids = torch.randint(3, 250, (n_prompt + n_resp,), generator=g).tolist()
        out.append(TokenSeq(ids=tuple(ids), response_start=n_prompt))
    return out


def _o_proj_inputs_alone(model: torch.nn.Module, seq: TokenSeq) -> torch.Tensor:
    """Reference: one unpadded sequence, full o_proj inputs of every layer: (L, T, W)."""
    inputs: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, a: inputs.append(a[0][0].clone()))
               for m in layout.o_proj_modules(model)]
    try:
        with torch.no_grad():
            model(torch.tensor([seq.ids]))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(inputs)


def test_last_token_rows_are_the_o_proj_inputs_at_each_last_token(model, seqs) -> None:
    got = capture.capture_sequences(model, seqs, batch_size=3, pad_id=PAD,
                                    padding_side="right", position="last_token")
    layers = len(layout.o_proj_modules(model))
    assert got.shape == (layers, len(seqs), 64)  # (L, N, heads * d_head)
    for i, s in enumerate(seqs):
        ref = _o_proj_inputs_alone(model, s)[:, -1]  # (L, W)
        torch.testing.assert_close(got[:, i], ref, atol=ROUNDING, rtol=0)


def test_mean_response_averages_response_tokens_and_q_views_use_last(model, seqs) -> None:
    got = capture.capture_sequences(model, seqs, batch_size=2, pad_id=PAD,
                                    padding_side="left", position="mean_response")
    for i, s in enumerate(seqs):
        full = _o_proj_inputs_alone(model, s)  # (L, T, W)
        ref = full[:, s.response_start:].mean(dim=1) if s.has_response else full[:, -1]
        torch.testing.assert_close(got[:, i], ref, atol=ROUNDING, rtol=0)


@pytest.mark.parametrize("position", ["last_token", "mean_response"])
def test_padding_side_and_batch_size_do_not_change_rows(model, seqs, position) -> None:
    alone = capture.capture_sequences(model, seqs, batch_size=1, pad_id=PAD,
                                      padding_side="right", position=position)
    for side in ("left", "right"):
        for batch_size in (2, len(seqs)):
            got = capture.capture_sequences(model, seqs, batch_size=batch_size, pad_id=PAD,
                                            padding_side=side, position=position)
            torch.testing.assert_close(got, alone, atol=ROUNDING, rtol=0)


def test_positions_restart_at_each_samples_first_token(seqs) -> None:
    for side in ("left", "right"):
        batch = capture.pad_batch(seqs, pad_id=PAD, padding_side=side, position="last_token")
        for b, s in enumerate(seqs):
            real = batch.attention_mask[b].bool()
            assert batch.position_ids[b, real].tolist() == list(range(len(s.ids)))
            assert batch.input_ids[b, real].tolist() == list(s.ids)
            assert batch.select[b].nonzero().flatten().tolist() == [int(real.nonzero()[-1])]


def test_rows_are_exact_copies_of_the_batch_inputs(model, seqs) -> None:
    """In the same padded batch, a last-token row is bit-identical to the o_proj input."""
    batch = capture.pad_batch(seqs, pad_id=PAD, padding_side="right", position="last_token")
    inputs: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, a: inputs.append(a[0].clone()))
               for m in layout.o_proj_modules(model)]
    try:
        with torch.no_grad():
            model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids)
    finally:
        for h in handles:
            h.remove()
    got = capture.capture_batch(model, batch)  # (L, B, W)
    last = torch.tensor([len(s.ids) - 1 for s in seqs])
    for layer, x in enumerate(inputs):
        assert torch.equal(got[layer], x[torch.arange(len(seqs)), last])
    assert all(not m._forward_pre_hooks for m in layout.o_proj_modules(model))


def test_reduce_rows_against_direct_formula() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 4, generator=g)  # (B, T, W)
    select = torch.zeros(3, 6, dtype=torch.bool)
    select[0, 5] = True
    select[1, 1:4] = True
    select[2, :] = True
    got = capture.reduce_rows(x, select)
    ref = torch.stack([x[0, 5], x[1, 1:4].mean(0), x[2].mean(0)])
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="at least one selected token"):
        capture.reduce_rows(x, torch.zeros(3, 6, dtype=torch.bool))


def test_plan_batches_is_longest_first_and_covers_each_index_once() -> None:
    lengths = [4, 9, 4, 1, 9, 6]
    plan = capture.plan_batches(lengths, 4)
    assert plan == [[1, 4, 5, 0], [2, 3]]
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    with pytest.raises(ValueError):
        capture.plan_batches(lengths, 0)
