"""Recovery losses against direct per-token formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recoup.stages.recovery.losses import (
    distill_kl,
    recovery_loss,
    response_cross_entropy,
    response_target_mask,
    topk_distill_kl,
    weighted_sum,
)

B, T, V = 2, 6, 11


@pytest.fixture()
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "logits": torch.randn(B, T, V, generator=g),
        "teacher": torch.randn(B, T, V, generator=g),
        "ids": torch.randint(0, V, (B, T), generator=g),
        # sample 0: prompt 2 tokens, 6 in all; sample 1: prompt 3, 5 in all (1 pad)
        "mask": response_target_mask(torch.tensor([2, 3]), torch.tensor([6, 5]), T),
        "attn": torch.tensor([[1] * 6, [1] * 5 + [0]]),
    }


def test_target_mask_marks_response_tokens_only() -> None:
    m = response_target_mask(torch.tensor([2, 3]), torch.tensor([6, 5]), T)
    assert m.tolist() == [[False, False, True, True, True, True],
                          [False, False, False, True, True, False]]


def test_cross_entropy_is_the_mean_over_response_tokens(batch: dict[str, torch.Tensor]) -> None:
    logits, ids, mask = batch["logits"], batch["ids"], batch["mask"]
    total, n = 0.0, 0
    for b in range(B):
        for t in range(1, T):
            if mask[b, t]:
                total += -float(F.log_softmax(logits[b, t - 1], -1)[ids[b, t]])
                n += 1
    got = response_cross_entropy(logits, ids, mask)
    assert n == 6
    assert float(got) == pytest.approx(total / n, rel=1e-6)


def test_cross_entropy_ignores_prompt_positions(batch: dict[str, torch.Tensor]) -> None:
    logits = batch["logits"].clone()
    before = response_cross_entropy(logits, batch["ids"], batch["mask"])
    logits[0, 0] += 100.0  # predicts token 1 of sample 0: a prompt token
    logits[1, 5] -= 50.0  # the pad position of sample 1
    after = response_cross_entropy(logits, batch["ids"], batch["mask"])
    assert float(after) == pytest.approx(float(before), rel=1e-6)


def test_cross_entropy_refuses_a_batch_without_targets(batch: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="no target tokens"):
        response_cross_entropy(batch["logits"], batch["ids"], torch.zeros(B, T, dtype=torch.bool))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_matches_the_direct_formula(batch: dict[str, torch.Tensor], temperature: float) -> None:
    t, s, pos = batch["teacher"], batch["logits"], batch["attn"].bool()
    total, n = 0.0, 0
    for b in range(B):
        for i in range(T):
            if pos[b, i]:
                p = F.softmax(t[b, i] / temperature, -1)
                q = F.softmax(s[b, i] / temperature, -1)
                total += float((p * (p.log() - q.log())).sum())
                n += 1
    got = distill_kl(t, s, pos, temperature)
    assert float(got) == pytest.approx(temperature**2 * total / n, rel=1e-5)


def test_kl_is_zero_for_equal_logits_and_gives_no_teacher_gradient(
        batch: dict[str, torch.Tensor]) -> None:
    teacher = batch["teacher"].clone().requires_grad_(True)
    student = batch["teacher"].clone().requires_grad_(True)
    kl = distill_kl(teacher, student, batch["attn"].bool())
    assert abs(float(kl.detach())) < 1e-6
    (kl + (student**2).sum() * 0).backward()
    assert teacher.grad is None


def test_topk_kl_with_the_whole_vocabulary_is_the_full_kl(batch: dict[str, torch.Tensor]) -> None:
    t, s, pos = batch["teacher"], batch["logits"], batch["attn"].bool()
    vals, idx = t.topk(V, dim=-1)
    torch.testing.assert_close(topk_distill_kl(vals, idx, s, pos, 1.5), distill_kl(t, s, pos, 1.5))


def test_weighted_sum_skips_zero_weights() -> None:
    a, b = torch.tensor(2.0), torch.tensor(5.0)
    assert float(weighted_sum({"a": (0.5, a), "b": (2.0, b)})) == 11.0
    assert float(weighted_sum({"a": (1.0, a), "b": (0.0, None)})) == 2.0
    with pytest.raises(ValueError, match="no value"):
        weighted_sum({"a": (1.0, None)})


def test_recovery_loss_combines_ce_and_kl(batch: dict[str, torch.Tensor]) -> None:
    loss, parts = recovery_loss(batch["logits"], batch["ids"], batch["mask"], batch["attn"],
                                batch["teacher"], ce_weight=0.3, kl_weight=0.7, temperature=2.0)
    ce = response_cross_entropy(batch["logits"], batch["ids"], batch["mask"])
    kl = distill_kl(batch["teacher"], batch["logits"], batch["attn"].bool(), 2.0)
    assert float(loss) == pytest.approx(0.3 * float(ce) + 0.7 * float(kl), rel=1e-6)
    assert parts == pytest.approx({"ce": float(ce), "kl": float(kl)})
    assert math.isfinite(float(loss))


def test_kl_on_response_positions_predicts_response_tokens(batch: dict[str, torch.Tensor]) -> None:
    loss, _ = recovery_loss(batch["logits"], batch["ids"], batch["mask"], batch["attn"],
                            batch["teacher"], ce_weight=0.0, kl_weight=1.0, kl_on="response")
    positions = torch.zeros_like(batch["mask"])
    positions[:, :-1] = batch["mask"][:, 1:]
    torch.testing.assert_close(loss, distill_kl(batch["teacher"], batch["logits"], positions))
