"""The top-k + tail distillation KL against the exact full-vocabulary KL."""

from __future__ import annotations

import math

import pytest
import torch

from recoup.stages.recovery.losses import (
    TeacherTopK,
    distill_kl,
    recovery_loss,
    teacher_topk,
    topk_tail_kl,
)

B, T, V = 2, 5, 40


@pytest.fixture()
def logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    teacher = 3.0 * torch.randn(B, T, V, generator=g)  # peaked: most mass in a few tokens
    student = teacher + torch.randn(B, T, V, generator=g)
    positions = torch.tensor([[True] * T, [True] * (T - 1) + [False]])
    return teacher, student, positions


def test_teacher_topk_keeps_the_largest_probabilities_and_the_tail_mass(
        logits: tuple[torch.Tensor, ...]) -> None:
    teacher = logits[0]
    got = teacher_topk(teacher, 7, temperature=2.0)
    p = torch.softmax(teacher / 2.0, dim=-1)
    top, ids = p.topk(7, dim=-1)
    torch.testing.assert_close(got.ids, ids)
    torch.testing.assert_close(got.logprobs.exp(), top)
    torch.testing.assert_close(got.tail.exp(), 1 - top.sum(-1), atol=1e-6, rtol=1e-5)
    assert torch.isneginf(teacher_topk(teacher, V).tail).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_equals_the_exact_kl_when_k_is_the_vocabulary(
        logits: tuple[torch.Tensor, ...], temperature: float) -> None:
    teacher, student, positions = logits
    exact = distill_kl(teacher, student, positions, temperature)
    got = topk_tail_kl(teacher_topk(teacher, V, temperature), student, positions, temperature)
    torch.testing.assert_close(got, exact, atol=1e-5, rtol=1e-5)


def test_topk_kl_is_a_lower_bound_that_tightens_with_k(logits: tuple[torch.Tensor, ...]) -> None:
    teacher, student, positions = logits
    exact = float(distill_kl(teacher, student, positions))
    values = [float(topk_tail_kl(teacher_topk(teacher, k), student, positions))
              for k in (1, 4, 16, 32, V)]
    assert all(v <= exact + 1e-6 for v in values)
    assert values == sorted(values)  # more outcomes kept, never less KL
    assert values[2] == pytest.approx(exact, rel=0.05)  # 16 of 40 tokens: within 5%


def test_topk_kl_matches_a_direct_k_plus_one_bucket_formula() -> None:
    p = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    teacher = teacher_topk(p.log()[None, None], 2)
    got = topk_tail_kl(teacher, q.log()[None, None], torch.ones(1, 1, dtype=torch.bool))
    expect = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.6)
    assert float(got) == pytest.approx(expect, rel=1e-5)


def test_topk_kl_gradients_are_finite_and_match_the_exact_kl_at_full_k(
        logits: tuple[torch.Tensor, ...]) -> None:
    teacher, student, positions = logits
    a = student.clone().requires_grad_(True)
    topk_tail_kl(teacher_topk(teacher, V), a, positions).backward()
    b = student.clone().requires_grad_(True)
    distill_kl(teacher, b, positions).backward()
    assert a.grad is not None and b.grad is not None and torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)
    c = student.clone().requires_grad_(True)
    topk_tail_kl(teacher_topk(teacher, 3), c, positions).backward()
    assert c.grad is not None and torch.isfinite(c.grad).all()
    assert float(c.grad[1, T - 1].abs().max()) == 0.0  # a masked position gets no gradient


def test_recovery_loss_takes_a_topk_teacher(logits: tuple[torch.Tensor, ...]) -> None:
    teacher, student, positions = logits
    ids = torch.zeros(B, T, dtype=torch.long)
    attn = positions.long()
    top = teacher_topk(teacher, 8)
    assert isinstance(top, TeacherTopK)
    loss, parts = recovery_loss(student, ids, positions, attn, top, ce_weight=0.0,
                                kl_weight=2.0)
    assert float(loss) == pytest.approx(2 * float(topk_tail_kl(top, student, positions)))
    assert parts["kl"] == pytest.approx(float(loss) / 2)


@pytest.mark.parametrize(("chunk", "temperature"), [(2, 1.0), (4, 2.0), (6, 1.0)])
def test_the_kl_in_chunks_is_the_kl_at_once(logits: tuple[torch.Tensor, ...], chunk: int,
                                            temperature: float) -> None:
    """``chunk_tokens`` (positions of chunk // B tokens each, checkpointed, the last one
    short) changes memory, not the value or its gradient."""
    teacher, student, positions = logits
    top = teacher_topk(teacher, 7, temperature)
    values, grads = [], []
    for chunk_tokens in (0, chunk):
        x = student.clone().requires_grad_(True)
        kl = topk_tail_kl(top, x, positions, temperature, chunk_tokens=chunk_tokens)
        (g,) = torch.autograd.grad(kl, x)
        values.append(kl.detach())
        grads.append(g)
    torch.testing.assert_close(values[1], values[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)
