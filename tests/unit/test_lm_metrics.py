"""Perplexity windows, NLL and KL against direct formulas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from recoup.stages.model import lm_metrics


def test_windows_are_non_overlapping_and_bounded() -> None:
    ids = torch.arange(23)
    w = lm_metrics.windows(ids, 5, None)
    assert w.shape == (4, 5) and torch.equal(w[1], torch.arange(5, 10))
    assert lm_metrics.windows(ids, 5, 2).shape == (2, 5)
    with pytest.raises(ValueError, match="fewer than seq_len=30"):
        lm_metrics.windows(ids, 30, None)


def test_token_nll_matches_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=g)
    ids = torch.randint(0, 11, (2, 7), generator=g)
    nll = lm_metrics.token_nll(logits, ids)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1),
                          reduction="none").view(2, 6)
    assert torch.allclose(nll, ref, atol=1e-6)
    assert lm_metrics.perplexity(float(nll.sum()), nll.numel()) == pytest.approx(
        float(torch.exp(ref.mean())), rel=1e-6)


def test_token_kl_direct_formula_and_zero_on_itself() -> None:
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(1, 3, 5, generator=g), torch.randn(1, 3, 5, generator=g)
    p, q = t.softmax(-1), s.softmax(-1)
    direct = (p * (p.log() - q.log())).sum(-1)
    assert torch.allclose(lm_metrics.token_kl(t, s), direct, atol=1e-6)
    assert torch.allclose(lm_metrics.token_kl(t, t), torch.zeros(1, 3), atol=1e-7)


def test_read_wikitext_joins_lines_with_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "w.raw"
    f.write_text(" = A = \n\n text one \n")
    assert lm_metrics.read_wikitext(f) == " = A = \n\n\n\n text one "
    with pytest.raises(FileNotFoundError, match="nope.raw"):
        lm_metrics.read_wikitext(tmp_path / "nope.raw")
