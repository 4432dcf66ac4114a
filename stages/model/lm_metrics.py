"""Language-model metrics as pure functions: windows, negative log-likelihood, KL.

Perplexity follows the pruning literature (Wanda, SparseGPT): the WikiText-2 test split's
rows joined with blank lines, tokenized once, cut into non-overlapping windows of
``seq_len`` tokens (the remainder dropped), every token after the first of a window
predicted, perplexity = exp(mean NLL over all predicted tokens).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def read_wikitext(path: Path) -> str:
    """The test split as the HF rows joined by ``"\\n\\n"``: here the file's lines, each
    without its trailing newline, joined with ``"\\n\\n"`` (the HF dataset has one row per
    line of the raw file)."""
    if not path.is_file():
        raise FileNotFoundError(f"WikiText-2 test file not found: {path}")
    return "\n\n".join(path.read_text(encoding="utf-8").split("\n")[:-1])


def windows(ids: torch.Tensor, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """(T,) token ids -> (W, seq_len) non-overlapping windows from the start."""
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)  # (W, seq_len)


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of next-token prediction. logits (B, T, V), ids (B, T) -> (B, T-1)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, summed over the vocabulary. (B, T, V) -> (B, T)."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def perplexity(nll_sum: float, n_tokens: int) -> float:
    return float(torch.exp(torch.tensor(nll_sum / n_tokens, dtype=torch.float64)))
